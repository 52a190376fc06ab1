"""Residual reuse plus a learned linear correction of the input change:

``y = x + R(t_c) + (x − x(t_c)) Aᵀ + b``.  ``A`` and ``b`` are fitted in closed form (ridge
least squares) during calibration on pairs of steps ``lag`` apart (``ΔR ≈ Δx Aᵀ + b``, Δ = now −
then, lags 1..``calibration_lags``), so the correction predicts how the residual moves when the
input moves.  Uncalibrated, ``A = 0, b = 0`` (plain reuse).
"""
from __future__ import annotations

import torch

from ..calibration import StreamFits
from ..runtime.state_ops import assign, assign_residual
from ..runtime.store import CalibrationStore
from .base import Fallback, StreamInfo


def residual_linear_approx(x, t, r_c, x_c, a, b):
    # the fit keeps the dtype it was made in; the model may have been cast since (model.to(torch.float64))
    return x + r_c + torch.nn.functional.linear(x - x_c, a.to(x), b.to(x))


def store_keys(block: str, stream: str) -> tuple[str, str]:
    """The calibration store keys of ``(A, b)`` for one block stream."""
    key = f"{block}.{stream}.residual_linear"
    return f"{key}.A", f"{key}.b"


class ResidualLinearCalibrator(StreamFits):
    def samples(self, xr, yr, history):
        return [(xr - xp, (yr - xr) - (yp - xp)) for xp, yp in history]

    def keys(self, block, stream):
        return store_keys(block, stream)


class ResidualLinearFallback(Fallback):
    name = "residual_linear"
    fitted = True
    uncalibrated = "plain residual reuse"
    approx = staticmethod(residual_linear_approx)

    @classmethod
    def calibrator(cls, config) -> ResidualLinearCalibrator:
        return ResidualLinearCalibrator(config.calibration_lags)

    def init_stream(self, k: int, s: StreamInfo, store: CalibrationStore) -> None:
        self.register_buffer(f"r_c{k}", self._zeros(s.out_shape, s))
        self.register_buffer(f"x_c{k}", self._zeros(s.in_shape, s))
        d = s.dim
        a_key, b_key = store_keys(self.block_name, s.name)
        self.register_buffer(f"a{k}", store.get(a_key, (d, d), lambda: self._zeros((d, d), s)))
        self.register_buffer(f"b{k}", store.get(b_key, (d,), lambda: self._zeros((d,), s)))

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
