"""Step-level forecast-consistency rule ("mod0fc"), the best rule measured so far.

Before any block runs, block 0's modulated input ``u₀`` (which sees the timestep) is compared
with its linear extrapolation from the last two fully computed steps,
``û₀ = u_c + (t − t_c)(u_c − u_p)/(t_c − t_p)``; ``d = ‖u₀ − û₀‖/‖u₀‖``.  If every sample has
``d ≤ cache_ratio_threshold`` the whole step is approximated (block 0 included).  It pairs with
the ``forecast`` fallback: the statistic checks exactly what the forecast assumes (that the
trajectory is locally linear in t).  One decision per step, made before the blocks: on GPU
this is the rule that needs no per-block sync.  Measured (shared notes): DiT 40.3 dB, PixArt
39.9 dB mean PSNR at 60 % replaced.
"""
from __future__ import annotations

import torch

from ..runtime.state_ops import assign, forecast_slope, shift
from ..runtime.distributed import norm_ratio
from .base import Decider, Policy


class StepForecastDecider(Decider):
    def __init__(self, signal_shape, device, dtype, group=None) -> None:
        super().__init__()
        self.group = group
        self.register_buffer("u_c", torch.zeros(signal_shape, dtype=dtype, device=device))
        self.register_buffer("u_p", torch.zeros(signal_shape, dtype=dtype, device=device))
        self.register_buffer("t_c", torch.tensor(0.0, device=device))
        self.register_buffer("t_p", torch.tensor(0.0, device=device))
        self.register_buffer("n", torch.tensor(0.0, device=device))
        self.register_buffer("last_stat", torch.zeros(signal_shape[0], device=device))

    def forward(self, step, new_gen, ok, threshold, t, u):
        n = self.computed_count(new_gen)
        valid = (n >= 2) & (self.t_c != self.t_p)
        slope = forecast_slope(t, self.t_c, self.t_p, valid).to(u.dtype)
        u_hat = self.u_c + slope * (self.u_c - self.u_p)
        d = norm_ratio(u - u_hat, u, self.group)  # over every rank's tokens
        self.last_stat.copy_(d)
        pred = ok & valid & (d <= threshold).all()
        computed = ~pred
        shift(self.u_p, computed, self.u_c)
        assign(self.u_c, computed, u)
        shift(self.t_p, computed, self.t_c)
        assign(self.t_c, computed, t)
        self.count_computed(n, pred)
        return pred


class StepForecastPolicy(Policy):
    name = "step_forecast"
    scope = "step"
    signal = "probe"

    def make_step_decider(self, signal_shape, device, dtype, store, group=None):
        return StepForecastDecider(signal_shape, device, dtype, group)
