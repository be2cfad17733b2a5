"""Triton helpers shared by the divergence kernels (fused_linear_divergence, topk_divergence): the
lm_head tile product, the online log-sum-exp update and the divergence terms, mirroring
``kdengine/losses/divergences.py`` (its docstring has the algebra)."""

import triton
import triton.language as tl


@triton.jit
def _online(m, l, z):
    """Online log-sum-exp update of running max m and sum l [BN] with a tile z [BN, BV] (may hold -inf)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - m_safe)
    e = tl.exp(z - m_safe[:, None])
    return m_new, l * scale + tl.sum(e, axis=1), scale, e, m_safe


@triton.jit
def _div_terms(s, t, beta, LOG_FLOOR: tl.constexpr, DIV: tl.constexpr):
    """Elementwise loss terms and gradient factor h (see kdengine/losses/divergences.py): finite
    teacher log-probabilities are used exactly; masked (-inf) ones enter the log-ratios as LOG_FLOOR."""
    p_s = tl.exp(s)
    p_t = tl.exp(t)
    t_log = tl.where(t > -1e37, t, LOG_FLOOR)
    if DIV == 0:
        elem = tl.where(p_t > 0, p_t * (t_log - s), 0.0)
        h = p_s  # unused: forward_kl has dL/dz = p_s - p_t
    elif DIV == 1:
        h = s - t_log
        elem = p_s * h
    elif DIV == 5:
        elem = 0.5 * tl.abs(p_t - p_s)
        h = tl.where(p_s > p_t, 0.5, tl.where(p_s < p_t, -0.5, 0.0))
    else:
        if DIV == 4:  # skew_reverse_kl: m = beta p_s + (1 - beta) p_t
            a = s + tl.log(beta)
            b = t + tl.log(1.0 - beta)
        else:  # jsd, skew_forward_kl: m = beta p_t + (1 - beta) p_s
            a = t + tl.log(beta)
            b = s + tl.log(1.0 - beta)
        mx = tl.maximum(a, b)
        log_m = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
        if DIV == 2:
            elem = beta * tl.where(p_t > 0, p_t * (t - log_m), 0.0) + (1.0 - beta) * p_s * (s - log_m)
            h = (1.0 - beta) * (s - log_m)
        elif DIV == 3:
            elem = tl.where(p_t > 0, p_t * (t - log_m), 0.0)
            h = -(1.0 - beta) * tl.exp(t - log_m)
        else:
            ratio = s - log_m
            elem = p_s * ratio
            h = ratio - beta * tl.exp(ratio)
    return elem, h


@triton.jit
def _tile_logits(p_x, p_w, p_b, o_n, o_v, m_n, m_v, D, stride_xn, stride_wv, HAS_BIAS: tl.constexpr,
                 UPCAST: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """[BN, BV] fp32 tile of x @ w^T (+ b), looping over D in BD chunks; fp32 inputs use exact fp32
    products ("ieee", not tf32: the logits feed exp())."""
    acc = tl.zeros((BN, BV), dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(p_x + o_n[:, None] * stride_xn + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_w = tl.load(p_w + o_v[:, None] * stride_wv + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0)
        if UPCAST:
            b_x = b_x.to(tl.float32)
            b_w = b_w.to(tl.float32)
        acc = tl.dot(b_x, tl.trans(b_w), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(p_b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return acc
