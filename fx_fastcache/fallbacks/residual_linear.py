"""Residual reuse plus a learned linear correction of the input change:

``y = x + R(t_c) + (x − x(t_c)) Aᵀ + b``.  ``A`` and ``b`` are fitted in closed form (ridge
least squares) during calibration on pairs of steps ``lag`` apart, so the correction predicts
how the residual moves when the input moves.  Uncalibrated, ``A = 0, b = 0`` (plain reuse).
"""
from __future__ import annotations

import torch

from .base import CalibrationStore, Fallback, StreamInfo, assign, assign_residual


def residual_linear_approx(x, t, r_c, x_c, a, b):
    return x + r_c + torch.nn.functional.linear(x - x_c, a, b)


class ResidualLinearFallback(Fallback):
    name = "residual_linear"
    fitted = True
    approx = staticmethod(residual_linear_approx)

    def init_stream(self, k: int, s: StreamInfo, store: CalibrationStore) -> None:
        self.register_buffer(f"r_c{k}", self._zeros(s.out_shape, s))
        self.register_buffer(f"x_c{k}", self._zeros(s.in_shape, s))
        d = s.dim
        key = f"{self.block_name}.{s.name}.residual_linear"
        self.register_buffer(f"a{k}", store.get(f"{key}.A", (d, d), lambda: self._zeros((d, d), s)))
        self.register_buffer(f"b{k}", store.get(f"{key}.b", (d,), lambda: self._zeros((d,), s)))

    def state_names(self, k: int) -> list[str]:
        return [f"r_c{k}", f"x_c{k}", f"a{k}", f"b{k}"]

    def update_stream(self, k, computed, t, x, y) -> None:
        assign_residual(getattr(self, f"r_c{k}"), computed, y, x)
        assign(getattr(self, f"x_c{k}"), computed, x)

    def reset(self) -> None:
        super().reset()
        for k in range(len(self.streams)):
            getattr(self, f"r_c{k}").zero_()
            getattr(self, f"x_c{k}").zero_()
