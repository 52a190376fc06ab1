"""TeaCache: accumulate a rescaled relative L1 change of block 0's modulated input.

Each step, ``rel = mean|u₀ − u₀(prev step)| / mean|u₀(prev step)|`` is rescaled by a polynomial
``p(rel)`` (fitted on calibration runs to predict the relative change of the model output;
identity when uncalibrated) and added to an accumulator.  While the accumulator stays below
``cache_ratio_threshold`` the step is approximated; when it crosses, the step is computed and
the accumulator resets.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..calibration import Calibrator, Observation, store_put
from ..runtime.distributed import mean_abs_ratio, total_mean_abs_ratio
from .base import Decider, Policy

logger = logging.getLogger(__name__)

POLY_DEGREE = 4
#: The calibration store key of the rescaling polynomial (highest power first).
COEFFS_KEY = "teacache.coeffs"


class TeaCacheCalibrator(Calibrator):
    """Pairs (block 0's relative input change, the relative change of the last block's output) of
    consecutive steps; fits the degree-4 polynomial from the first to the second."""

    def __init__(self) -> None:
        self.rel_in: list[float] = []
        self.rel_out: list[float] = []
        self._prev_out: torch.Tensor | None = None

    def observe(self, obs: Observation) -> None:
        if obs.step_stat is not None:
            self.rel_in.append(obs.step_stat)
        if obs.is_last:
            y = obs.outs[-1].detach().float()
            prev = self._prev_out
            if prev is not None and not obs.new_gen and prev.shape == y.shape:
                self.rel_out.append(float(total_mean_abs_ratio(y - prev, prev, self.group)))  # every rank's tokens
            self._prev_out = y

    def fit(self, store, dtype, config) -> dict[str, float]:
        n = min(len(self.rel_in), len(self.rel_out))
        if n < 6:
            logger.warning("fx-fastcache: teacache rescaling not fitted: the calibration runs gave %d pairs of steps, "
                           "it needs 6 (e.g. two generations of 4 steps); calibrate with full sampling loops", n)
            return {}
        coeffs = np.polyfit(np.asarray(self.rel_in[:n]), np.asarray(self.rel_out[:n]), POLY_DEGREE)
        store_put(store, COEFFS_KEY, torch.tensor(coeffs, dtype=torch.float32))
        return {"teacache.pairs": float(n)}


class TeaCacheDecider(Decider):
    def __init__(self, signal_shape, device, dtype, store, group=None) -> None:
        super().__init__()
        self.group = group
        self.register_buffer("u_prev", torch.zeros(signal_shape, dtype=dtype, device=device))
        self.register_buffer("acc", torch.tensor(0.0, device=device))
        self.register_buffer("n", torch.tensor(0.0, device=device))
        self.register_buffer("last_stat", torch.zeros(signal_shape[0], device=device))
        ident = torch.zeros(POLY_DEGREE + 1, device=device)
        ident[-2] = 1.0  # highest power first: p(x) = x
        self.register_buffer("coeffs", store.get(COEFFS_KEY, (POLY_DEGREE + 1,), lambda: ident))
        self._persistent_state = ("coeffs",)

    def forward(self, step, new_gen, ok, threshold, t, u):
        n = self.computed_count(new_gen)
        rel = mean_abs_ratio(u - self.u_prev, self.u_prev, self.group).max()  # over every rank's tokens
        self.last_stat.fill_(0.0)
        self.last_stat.add_(rel)
        scaled = torch.zeros_like(rel)
        for c in self.coeffs.unbind(0):
            scaled = scaled * rel + c
        acc = torch.where(new_gen, torch.zeros_like(self.acc), self.acc) + scaled.abs()
        pred = ok & (n >= 1) & (acc < threshold)
        computed = ~pred
        self.acc.copy_(torch.where(computed, torch.zeros_like(acc), acc))
        self.u_prev.copy_(u)
        self.count_computed(n, pred)
        return pred


class TeaCachePolicy(Policy):
    name = "teacache"
    scope = "step"
    signal = "probe"
    peer_fallback = "residual"
    needs_calibration = True

    @classmethod
    def calibrator(cls, config) -> TeaCacheCalibrator:
        return TeaCacheCalibrator()

    def make_step_decider(self, signal_shape, device, dtype, store, group=None):
        return TeaCacheDecider(signal_shape, device, dtype, store, group)
