"""Residual reuse: ``y = x + R(t_c)``, the block's residual at its last full computation.

Measured on the trained DiT it gives ≈ 32 dB at 60 % of blocks replaced where the paper's pure
linear map gives ≈ 13 dB: a block's *change* is far more stable across steps than its map.
"""
from __future__ import annotations

import torch

from ..runtime.state_ops import assign_residual
from ..runtime.store import CalibrationStore
from .base import Fallback, StreamInfo


def residual_approx(x: torch.Tensor, t: torch.Tensor, r_c: torch.Tensor) -> torch.Tensor:
    return x + r_c


class ResidualFallback(Fallback):
    name = "residual"
    approx = staticmethod(residual_approx)

    def init_stream(self, k: int, s: StreamInfo, store: CalibrationStore) -> None:
        self.register_buffer(f"r_c{k}", self._zeros(s.out_shape, s))

    def state_names(self, k: int) -> list[str]:
        return [f"r_c{k}"]

    def update_stream(self, k, computed, t, x, y) -> None:
        assign_residual(getattr(self, f"r_c{k}"), computed, y, x)

    def reset(self) -> None:
        super().reset()
        for k in range(len(self.streams)):
            getattr(self, f"r_c{k}").zero_()
