"""First-Block-Cache (as in diffusers' ``apply_first_block_cache``), inside our framework.

Block 0 always computes.  If the relative L1 change of its residual (output − input) against
the residual of the last fully computed step is below ``cache_ratio_threshold``, every later
block is approximated.  With the ``residual`` fallback each skipped block adds its cached
residual, which sums to exactly the cached residual of the whole stack that diffusers adds.
"""
from __future__ import annotations

import torch

from .base import Decider, Policy, per_sample_mean_abs


class FirstBlockCacheDecider(Decider):
    def __init__(self, signal_shape, device, dtype) -> None:
        super().__init__()
        self.register_buffer("r_ref", torch.zeros(signal_shape, dtype=dtype, device=device))
        self.register_buffer("n", torch.tensor(0.0, device=device))
        self.register_buffer("last_stat", torch.zeros(signal_shape[0], device=device))

    def forward(self, step, new_gen, ok, threshold, t, r):
        n = torch.where(new_gen, torch.zeros_like(self.n), self.n)
        rel = per_sample_mean_abs(r - self.r_ref) / per_sample_mean_abs(self.r_ref).clamp_min(1e-12)
        self.last_stat.copy_(rel)
        pred = ok & (n >= 1) & (rel < threshold).all()
        computed = ~pred
        self.r_ref.copy_(torch.where(computed, r, self.r_ref))
        self.n.copy_(n + computed.to(n.dtype))
        return pred


class FirstBlockCachePolicy(Policy):
    name = "first_block_cache"
    scope = "step"
    signal = "residual0"
    anchor = "after_block0"

    def make_step_decider(self, signal_shape, device, dtype, store):
        return FirstBlockCacheDecider(signal_shape, device, dtype)

    def never_skip(self, index: int) -> bool:
        return index == 0
