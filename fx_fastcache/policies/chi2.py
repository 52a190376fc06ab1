"""The seed paper's per-block rule, made meaningful.

Statistic: ``δ_l = ‖u_l − u_l(ref)‖_F / ‖u_l(ref)‖_F`` on the block's *modulated input*
``u_l`` (so the timestep is visible and blocks decide individually), against ``u_l`` at the
block's **last full computation** (accumulated drift, so consecutive skips cannot pile drift
up unnoticed).  Test: the block is approximated iff every sample has

    δ_l² / σ_l²  ≤  χ²_{ν_l, 1−α} / ν_l,       σ_l = cache_ratio_threshold · s_l

i.e. a χ² test of "the input moved no more than noise of relative scale σ_l".  The paper uses
``ν = N·D`` and ``s_l = 1``, which makes the bound ≈ 1.00x for any real N·D (vacuous).  Here
calibration measures, per block, the typical step-to-step change ``s_l`` (normalised to mean
1 over blocks, so ``cache_ratio_threshold`` keeps its meaning as a relative-change level) and
the effective degrees of freedom ``ν_l = 2 E[δ²]² / Var[δ²]`` (method of moments for a scaled
χ²): tokens are strongly correlated, ν is small, and ``significance_level`` then matters.
Uncalibrated: ``s_l = 1, ν = N·D`` (the paper's test).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
from scipy.stats import chi2

from ..calibration import Calibrator, Observation, store_put
from ..runtime.distributed import norm_ratio
from ..runtime.state_ops import assign
from .base import Decider, Policy


def store_keys(block: str) -> tuple[str, str]:
    """The calibration store keys of a block's ``(scale, dof)``."""
    return f"{block}.chi2.scale", f"{block}.chi2.dof"


class Chi2Calibrator(Calibrator):
    """Per block: the typical step-to-step relative change of the probe, normalised to mean 1 over
    blocks (``scale``), and the effective χ² degrees of freedom ``ν = 2E[δ²]²/Var[δ²]``."""

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = defaultdict(list)

    def observe(self, obs: Observation) -> None:
        decider = obs.guard.decider
        if decider is not None and hasattr(decider, "last_stat") and not obs.new_gen:
            self.stats[obs.block].extend(decider.last_stat.detach().float().cpu().tolist())

    def fit(self, store, dtype, config) -> dict[str, float]:
        typical = {b: float(np.median(v)) for b, v in self.stats.items() if v}
        mean_typical = float(np.mean(list(typical.values()))) if typical else 1.0
        for block, values in self.stats.items():
            if not values:
                continue
            d2 = np.square(np.asarray(values, dtype=np.float64))
            var = float(d2.var())
            nu = 2.0 * float(d2.mean()) ** 2 / var if var > 0 else 1e6
            nu = float(np.clip(nu, 1.0, 1e6))
            scale_key, dof_key = store_keys(block)
            store_put(store, scale_key, torch.tensor(typical[block] / max(mean_typical, 1e-12)))
            store_put(store, dof_key, torch.tensor(nu))
        return {"chi2.blocks": float(len(typical))}


class Chi2Decider(Decider):
    def __init__(self, block: str, signal_shape, device, dtype, store, alpha: float, group=None) -> None:
        super().__init__()
        self.group = group
        nd = 1
        for s in signal_shape[1:]:
            nd *= int(s)
        if group is not None:  # the uncalibrated ν = N·D counts the tokens of every rank
            nd *= dist.get_world_size(group)
        self.register_buffer("u_ref", torch.zeros(signal_shape, dtype=dtype, device=device))
        self.register_buffer("last_stat", torch.zeros(signal_shape[0], device=device))
        scale_key, dof_key = store_keys(block)
        self.register_buffer("scale", store.get(scale_key, (), lambda: torch.tensor(1.0, device=device)))
        self.register_buffer("dof", store.get(dof_key, (), lambda: torch.tensor(float(nd), device=device)))
        self.register_buffer("tau", torch.tensor(1.0, device=device))
        self._persistent_state = ("scale", "dof", "tau")
        self.refresh(alpha)

    def refresh(self, alpha: float) -> None:
        """Recompute the per-block bound from the calibrated scale and dof (host side, rare)."""
        nu = max(float(self.dof), 1e-3)
        self.tau.fill_(float(self.scale) * (chi2.ppf(1.0 - alpha, nu) / nu) ** 0.5)

    def forward(self, step, new_gen, ok, threshold, t, u):
        delta = norm_ratio(u - self.u_ref, self.u_ref, self.group)  # over every rank's tokens
        self.last_stat.copy_(delta)
        pred = ok & (delta <= threshold * self.tau).all()
        assign(self.u_ref, ~pred, u)
        return pred


class Chi2Policy(Policy):
    name = "chi2"
    scope = "block"
    signal = "probe"
    needs_calibration = True

    @classmethod
    def calibrator(cls, config) -> Chi2Calibrator:
        return Chi2Calibrator()

    def make_block_decider(self, index, block, signal_shape, device, dtype, store, group=None):
        return Chi2Decider(block, signal_shape, device, dtype, store, self.config.significance_level, group)
