"""The working-memory budget of the torch path's lm_head losses: which schedule runs, in what chunks.

The budget (``budget_mb=``, env ``KDENGINE_LOSS_BUDGET_MB``) is the working memory an op may use beyond
its inputs and their gradients. Defaults: 512 MB on CPU; on CUDA 1024 MB, lowered to 1/8 of the
device's free memory when that is smaller (``min(1024, free / 8)``, read at call time).

Two schedules of ``fused_linear_divergence`` (torch path):
    row_chunk  rows in chunks of C; a chunk's logits [C, V] (student) and [C, Vc] (teacher) are held,
               so each lm_head GEMM runs once and the gradient is formed in the forward:
               4 [N, V, D] GEMM units for a trainable head, 3 for a frozen one, 2 without grad.
               Taken when the budget holds a chunk of min(N, ROW_CHUNK_MIN_ROWS) rows and the loss
               is a scalar (reduction sum or mean).
    streaming  [rows, cols] blocks of logits recomputed in the backward (the budget sets the block
               width); for smaller budgets and reduction="none".
A budget below the smallest streaming block is a ValueError.
Not counted in the budget: the gradients themselves. With 16-bit inputs they are accumulated in fp32
([N, Ds], [V, Ds], [V]) and cast at the end, an accumulator beyond the weight's own gradient (as
streaming does); with fp32 or float64 inputs the accumulator is the returned gradient. The row-chunk
schedule holds them from the forward to the backward.
A leaf module: plain arithmetic on sizes, no kdengine imports.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

ENV = "KDENGINE_LOSS_BUDGET_MB"
DEFAULT_BUDGET_MB_CPU = 512.0
DEFAULT_BUDGET_MB_CUDA = 1024.0
CUDA_FREE_FRACTION = 8  # on CUDA the default is at most free device memory / 8
MB = 2**20

# streaming: [rows, cols] blocks with BLOCK_TEMPORARIES such blocks alive at once (two logits blocks,
# the online-softmax scratch of student, teacher and CE, forward_kl's difference block)
BLOCK_TEMPORARIES = 6
MAX_BLOCK_ROWS = 1024
MIN_BLOCK_COLS = 256
MAX_BLOCK_COLS = 65536

# row chunk: the elementwise work on a held chunk runs over SUB_COLS-wide column slices with at most
# SUB_TEMPORARIES [C, SUB_COLS] temporaries alive (jsd's terms and gradient are the widest; measured
# with kdengine.plan.live_bytes in tests/test_fused_linear_divergence_budget.py)
ROW_CHUNK_MIN_ROWS = 256
SUB_COLS = 4096
SUB_TEMPORARIES = 10


@dataclass(frozen=True)
class Schedule:
    """kind "row_chunk" (rows = C, cols = the elementwise column slice) or "streaming" (a [rows, cols] block)."""

    kind: str
    rows: int
    cols: int
    budget_mb: float


def default_budget_mb(device: torch.device) -> float:
    """512 MB on CPU; on CUDA min(1024, free device memory / 8) in MB."""
    if device.type != "cuda":
        return DEFAULT_BUDGET_MB_CPU
    free, _ = torch.cuda.mem_get_info(device)
    return min(DEFAULT_BUDGET_MB_CUDA, free / CUDA_FREE_FRACTION / MB)


def resolve_budget_mb(budget_mb, device: torch.device) -> tuple[float, str]:
    """(budget in MB, the name to quote in errors): the argument, else env KDENGINE_LOSS_BUDGET_MB, else
    the device default. A non-numeric or non-positive value is a ValueError naming where it came from."""
    name = "budget_mb"
    if budget_mb is None:
        raw = os.environ.get(ENV)
        if raw is None or raw.strip() == "":
            return default_budget_mb(device), name
        name, budget_mb = ENV, raw
    try:
        value = float(budget_mb)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(budget_mb, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={budget_mb!r}: expected a finite number of MB > 0")
    return value, name


def streaming_min_bytes(n: int, elem: int) -> int:
    """Bytes of the smallest streaming block: min(N, 1024) rows x 256 columns x 6 temporaries."""
    return min(n, MAX_BLOCK_ROWS) * MIN_BLOCK_COLS * BLOCK_TEMPORARIES * elem


def check_budget(budget_mb: float, name: str, n: int, elem: int) -> None:
    """ValueError when the budget cannot hold one streaming block of this call."""
    need = streaming_min_bytes(n, elem)
    if budget_mb * MB < need:
        raise ValueError(f"{name}={budget_mb:g} MB is below one streaming block of this call: at least "
                         f"{need / MB:.4g} MB (min(N, {MAX_BLOCK_ROWS}) = {min(n, MAX_BLOCK_ROWS)} rows x "
                         f"{MIN_BLOCK_COLS} columns x {BLOCK_TEMPORARIES} temporaries x {elem} bytes)")


def streaming_block(n: int, budget_mb: float, elem: int) -> tuple[int, int]:
    """(rows, cols) of a streaming block: min(N, 1024) rows, as many 256-multiples of columns as fit."""
    rows = max(1, min(n, MAX_BLOCK_ROWS))
    elems = int(budget_mb * MB / elem / BLOCK_TEMPORARIES)
    cols = max(MIN_BLOCK_COLS, min(MAX_BLOCK_COLS, (elems // rows) // MIN_BLOCK_COLS * MIN_BLOCK_COLS))
    return rows, cols


def row_chunk_row_bytes(v_student: int, vc: int, d_total: int, elem: int) -> int:
    """Working bytes per row of a chunk: the student logits row [V_s] (overwritten in place by its
    gradient, the dlogits), the teacher row [Vc], the column-slice temporaries and the rows of X in the
    compute dtype ([Ds + Dt]; a copy only for 16-bit inputs, counted always)."""
    return elem * (v_student + vc + SUB_TEMPORARIES * min(SUB_COLS, v_student) + d_total)


def row_chunk_fixed_bytes(d_total: int, elem: int, weights_in_compute_dtype: bool) -> int:
    """Bytes independent of C: 16-bit weights are converted a SUB_COLS-row slice at a time."""
    return 0 if weights_in_compute_dtype else SUB_COLS * d_total * elem


def choose_schedule(n: int, v_student: int, vc: int, d_total: int, elem: int, budget_mb: float,
                    reduction: str, weights_in_compute_dtype: bool = True) -> Schedule:
    """The schedule of one call (see the module docstring).

    v_student: student columns in play (V with labels, else Vc); d_total: Ds + Dt; elem: bytes of the
    compute dtype. Row chunks are balanced: C = ceil(N / ceil(N / C_max)) with C_max the rows that fit.
    """
    budget = budget_mb * MB
    c_max = int((budget - row_chunk_fixed_bytes(d_total, elem, weights_in_compute_dtype))
                // row_chunk_row_bytes(v_student, vc, d_total, elem))
    if reduction != "none" and c_max >= min(n, ROW_CHUNK_MIN_ROWS):
        c_max = max(1, min(n, c_max))
        chunks = max(1, math.ceil(n / c_max))
        return Schedule("row_chunk", max(1, math.ceil(n / chunks)), SUB_COLS, budget_mb)
    rows, cols = streaming_block(n, budget_mb, elem)
    return Schedule("streaming", rows, cols, budget_mb)
