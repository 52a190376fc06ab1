"""First-Block-Cache (as in diffusers' ``apply_first_block_cache``), inside our framework.

Block 0 always computes.  If the relative L1 change of its residual (output − input) against
the residual of the last fully computed step is at most ``cache_ratio_threshold``, every later
block is approximated.  The statistic is diffusers' exactly: ``mean|r − r_ref| / mean|r_ref|``
over the *whole* batch (cond and uncond rows together, not per sample), skip iff ``≤``
threshold, so that our runs reproduce diffusers' decisions on the same inputs (a test checks
it) and the side-by-side comparison is like for like.  With the ``residual`` fallback each
skipped block adds its cached residual, which sums to exactly the cached residual of the
whole stack that diffusers adds.
"""
from __future__ import annotations

import torch

from ..runtime.distributed import total_mean_abs_ratio
from ..runtime.state_ops import assign
from .base import Decider, Policy


class FirstBlockCacheDecider(Decider):
    def __init__(self, signal_shape, device, dtype, group=None) -> None:
        super().__init__()
        self.group = group
        self.register_buffer("r_ref", torch.zeros(signal_shape, dtype=dtype, device=device))
        self.register_buffer("n", torch.tensor(0.0, device=device))
        self.register_buffer("last_stat", torch.zeros(signal_shape[0], device=device))

    def forward(self, step, new_gen, ok, threshold, t, r):
        n = self.computed_count(new_gen)
        rel = total_mean_abs_ratio(r - self.r_ref, self.r_ref, self.group)  # over every rank's tokens
        self.last_stat.copy_(rel.expand_as(self.last_stat))
        pred = ok & (n >= 1) & (rel <= threshold)
        computed = ~pred
        assign(self.r_ref, computed, r)
        self.count_computed(n, pred)
        return pred


class FirstBlockCachePolicy(Policy):
    name = "first_block_cache"
    scope = "step"
    signal = "residual0"
    anchor = "after_block0"
    peer_fallback = "residual"  # diffusers adds the cached residual of the whole stack

    def make_step_decider(self, signal_shape, device, dtype, store, group=None):
        return FirstBlockCacheDecider(signal_shape, device, dtype, group)

    def never_skip(self, index: int) -> bool:
        return index == 0
