"""First-order forecast whose slope, after two computations at adjacent calls, is averaged with the
slope over a wider baseline.

Why this exists.  The ``forecast`` fallback extrapolates the residual along the line through its
last two computations.  When those two are adjacent steps, early in a generation, the line is set
by one short step and a sample that amplifies small early errors can break: on sd3-mnist one of
16 evaluation images falls to 19 dB at 60 % replaced, and every plan that breaks it forecasts from
two adjacent computed steps among steps 1–4 (docs/BENCHMARKS.md, "Seventh session").  Here, when
the last two computations (at ``t_p``, ``t_c``) were adjacent and an earlier one (``t_q``) exists,
the forecast is the mean of the two first-order forecasts through ``(t_p, t_c)`` and ``(t_q, t_c)``::

    y = x + R_c + ½·s_p·(R_c − R_p) + ½·s_q·(R_c − R_q),   s_j = (t − t_c) / (t_c − t_j)

Otherwise it is exactly the ``forecast`` fallback.  It keeps one more residual per stream than
``forecast`` (three instead of two).  It helps models whose worst image breaks that way and costs
others (the trained DiT loses up to 8 dB of worst image), so it is an option chosen per model on
calibration seeds, not the default (docs/BENCHMARKS.md, "Eighth session").  ``policy="planned"``
replays it when it plans.
"""
from __future__ import annotations

import torch

from ..runtime.state_ops import assign, assign_residual, forecast_slope, keep_or, shift
from ..runtime.store import CalibrationStore
from .base import Fallback, StreamInfo


def forecast_blend_approx(x, t, r_c, r_p, r_q, t_c, t_p, t_q, adjacent, n):
    s_p = forecast_slope(t, t_c, t_p, n >= 2)
    use_q = (adjacent > 0.5) & (n >= 3) & (t_c != t_q)
    s_q = forecast_slope(t, t_c, t_q, use_q)  # 0 unless the blend applies
    a = 1 - 0.5 * use_q.to(s_p.dtype)  # the plain slope's weight: ½ when blended, else 1
    return x + r_c + (a * s_p).to(r_c.dtype) * (r_c - r_p) + (0.5 * s_q).to(r_c.dtype) * (r_c - r_q)


class ForecastBlendFallback(Fallback):
    name = "forecast_blend"
    approx = staticmethod(forecast_blend_approx)

    def init_stream(self, k: int, s: StreamInfo, store: CalibrationStore) -> None:
        for r in ("r_c", "r_p", "r_q"):
            self.register_buffer(f"{r}{k}", self._zeros(s.out_shape, s))
        if k == 0:
            for name in ("t_c", "t_p", "t_q", "adjacent", "gap"):
                self.register_buffer(name, torch.tensor(0.0, device=s.device))

    def state_names(self, k: int) -> list[str]:
        return [f"r_c{k}", f"r_p{k}", f"r_q{k}", "t_c", "t_p", "t_q", "adjacent", "n"]

    def update_stream(self, k, computed, t, x, y) -> None:
        r_c, r_p, r_q = (getattr(self, f"{r}{k}") for r in ("r_c", "r_p", "r_q"))
        shift(r_q, computed, r_p)
        shift(r_p, computed, r_c)
        assign_residual(r_c, computed, y, x)

    def update_shared(self, computed, t) -> None:
        shift(self.t_q, computed, self.t_p)
        shift(self.t_p, computed, self.t_c)
        assign(self.t_c, computed, t)
        # ``adjacent``: no call was skipped between the last two computations; ``gap``: one was
        # skipped since the last computation (read before it is overwritten)
        assign(self.adjacent, computed, 1.0 - self.gap)
        self.gap.copy_(keep_or(computed, torch.zeros_like(self.gap), torch.ones_like(self.gap)))

    def reset(self) -> None:
        super().reset()
        for name in ("t_c", "t_p", "t_q", "adjacent", "gap"):
            getattr(self, name).zero_()
        for k in range(len(self.streams)):
            for r in ("r_c", "r_p", "r_q"):
                getattr(self, f"{r}{k}").zero_()
