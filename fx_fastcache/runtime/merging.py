"""Spatial-temporal token merging: pure, static-shape functions for the reduced-token branch.

Why it exists: a computed block costs ~linear (projections, MLP) to quadratic (attention) in the
token count.  Merging replaces the ``n`` tokens entering a block by ``m`` cluster tokens, runs
the block on them and gives every token its cluster's residual back (unpooling).  Importance
follows the seed: ``S_i = ρ_sp,i · (1 + λ ρ_tm,i)`` with spatial density
``ρ_sp,i = exp(−mean_{j∈kNN(i)} ||h_i − h_j||² / σ²)`` (σ² = the sample's mean kNN distance, so
``exp`` never underflows) and temporal saliency ``ρ_tm,i = ||h_i − h_prev,i||`` (normalised by
its mean).  Each stage keeps the ``m_s`` most important tokens as cluster centres
(``torch.topk``, static), assigns every token to its nearest centre and averages each cluster
weighted by importance (``scatter_add``); ``num_stages`` stages shrink ``n`` geometrically to
``m``.  Everything is vectorised per sample: no Python loop over tokens, no ``.item()``.
"""
from __future__ import annotations

import math

import torch


def stage_sizes(n: int, ratio: float, stages: int) -> list[int]:
    """Token counts after each stage: ``ceil(n · ratio^(s/stages))``, strictly shrinking to
    ``ceil(n · ratio)`` (at least 1)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"merge_ratio={ratio!r} must be in (0, 1]")
    out = []
    prev = n
    for s in range(1, stages + 1):
        m = max(1, min(prev, math.ceil(n * ratio ** (s / stages) - 1e-9)))
        out.append(m)
        prev = m
    return out


def importance(h: torch.Tensor, prev: torch.Tensor, k_nn: int, lam: float) -> torch.Tensor:
    """``S_i = ρ_sp,i (1 + λ ρ_tm,i)`` per sample and token, (B, n) float32."""
    hf = h.float()
    n = hf.shape[1]
    d2 = torch.cdist(hf, hf).pow(2)  # (B, n, n)
    kk = min(k_nn + 1, n)
    knn = torch.topk(d2, kk, dim=-1, largest=False).values[..., 1:] if kk > 1 else d2[..., :1]
    mean_knn = knn.mean(-1)  # (B, n)
    sigma2 = mean_knn.mean(-1, keepdim=True).clamp_min(1e-12)
    rho_sp = torch.exp(-mean_knn / sigma2)
    tm = (hf - prev.float()).norm(dim=-1)
    rho_tm = tm / tm.mean(-1, keepdim=True).clamp_min(1e-12)
    return rho_sp * (1.0 + lam * rho_tm)


def merge_tokens(h: torch.Tensor, prev: torch.Tensor, sizes: list[int], k_nn: int,
                 lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``h`` (B, n, D) down through ``sizes``; returns ``(merged (B, m, D), assign (B, n))``
    where ``assign[b, i]`` is the cluster of token ``i``."""
    b, n, d = h.shape
    w = importance(h, prev, k_nn, lam)  # (B, n)
    cur = h.float()
    assign = torch.arange(n, device=h.device).unsqueeze(0).expand(b, n)
    for m in sizes:
        if m == cur.shape[1]:
            continue
        centres = torch.sort(torch.topk(w, m, dim=1, sorted=False).indices, dim=1).values  # (B, m)
        c = torch.gather(cur, 1, centres.unsqueeze(-1).expand(-1, -1, d))
        a = torch.cdist(cur, c).argmin(-1)  # (B, n_cur): nearest centre (a centre picks itself)
        num = torch.zeros(b, m, d, dtype=cur.dtype, device=cur.device).scatter_add(
            1, a.unsqueeze(-1).expand(-1, -1, d), cur * w.unsqueeze(-1))
        den = torch.zeros(b, m, dtype=cur.dtype, device=cur.device).scatter_add(1, a, w)
        cnt = torch.zeros(b, m, dtype=cur.dtype, device=cur.device).scatter_add(1, a, torch.ones_like(w))
        cur = num / den.clamp_min(1e-12).unsqueeze(-1)
        w = den / cnt.clamp_min(1.0)
        assign = torch.gather(a, 1, assign)
    return cur.to(h.dtype), assign.contiguous()


def unpool(h: torch.Tensor, merged_in: torch.Tensor, merged_out: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Every token gets its cluster's block residual: ``h_i + (Y − M)[assign_i]``."""
    r = merged_out - merged_in
    return h + torch.gather(r, 1, assign.unsqueeze(-1).expand(-1, -1, r.shape[-1]))
