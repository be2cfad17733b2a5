"""torch path of ``gram_cosine_loss``: the Gram statistics through G = W^T W, never [P, V].

    P x P form (P <= D):  R = (H G) H^T, statistics as row dot products
    D x D form (P > D):   <R_s, R_t> = tr(G_s C G_t C^T) with C = H_s^T H_t, |R|^2 = tr((G M)^2), M = H^T H
Autograd differentiates both with respect to H_s and G_s.
"""

from __future__ import annotations

import torch


def _frob_stats(rs: torch.Tensor, rt: torch.Tensor) -> torch.Tensor:
    """[B, 3] = (<rs, rt>, |rs|^2, |rt|^2) per sample as row dot products (no elementwise temporaries)."""
    fs, ft = rs.flatten(1), rt.flatten(1)
    return torch.stack([torch.linalg.vecdot(fs, ft), torch.linalg.vecdot(fs, fs), torch.linalg.vecdot(ft, ft)], -1)


def gram_stats_torch(hs, gs, ht, gt):
    """P x P form when P <= max(Ds, Dt), else the D x D form; autograd handles H_s and G_s."""
    p = hs.shape[1]
    if p <= max(hs.shape[2], ht.shape[2]):
        return _frob_stats((hs @ gs) @ hs.transpose(1, 2), (ht @ gt) @ ht.transpose(1, 2))
    c = hs.transpose(1, 2) @ ht                      # [B, Ds, Dt]
    ms = gs @ (hs.transpose(1, 2) @ hs)              # G_s M_s, |R_s|^2 = tr((G_s M_s)^2)
    mt = gt @ (ht.transpose(1, 2) @ ht)
    dot = torch.linalg.vecdot((gs @ c @ gt).flatten(1), c.flatten(1))            # tr(G_s C G_t C^T)
    ns = torch.linalg.vecdot(ms.flatten(1), ms.transpose(1, 2).flatten(1))
    nt = torch.linalg.vecdot(mt.flatten(1), mt.transpose(1, 2).flatten(1))
    return torch.stack([dot, ns, nt], -1)
