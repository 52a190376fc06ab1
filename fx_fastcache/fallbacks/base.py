"""What a skipped block's output becomes: the fallback strategy interface.

A fallback owns, per *stream* (an output paired with the input it continues), the state it
needs (cached residuals, inputs, timesteps) as buffers, and exposes a pure function
``approx(x, t, *state) -> y`` that becomes the cheap branch of the block's ``torch.cond``.
The state tensors are passed into the branch as explicit operands, so the branch is pure
(ONNX-exportable, no aliasing of module buffers inside ``cond``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..calibration import Calibrator
from ..runtime.state_ops import as_count
from ..runtime.store import CalibrationStore


@dataclass(frozen=True)
class StreamInfo:
    """One residual stream of a block: ``name`` (the block argument) and tensor metadata."""

    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def dim(self) -> int:
        return self.out_shape[-1]


class Fallback(nn.Module):
    """Base class: per-stream state buffers, a computed-count ``n`` and the update rule."""

    name: str = ""
    #: Fewer computations than this since the generation began → the block must compute.
    min_computed: int = 1
    #: Whether calibration fits something for this fallback (its :meth:`calibrator` does).
    fitted: bool = False
    #: What the fallback amounts to before calibration (for the "uncalibrated" warning).
    uncalibrated: str = ""
    #: The cheap-branch function, ``approx(x, t, *state)``.
    approx: Callable[..., torch.Tensor]

    @classmethod
    def calibrator(cls, config) -> Calibrator | None:
        """What calibration records and fits for this fallback (``None``: nothing)."""
        return None

    def __init__(self, block: str, streams: list[StreamInfo], store: CalibrationStore) -> None:
        super().__init__()
        self.block_name = block
        self.streams = streams
        self.register_buffer("n", torch.tensor(0.0))
        for k, s in enumerate(streams):
            self.init_stream(k, s, store)

    def init_stream(self, k: int, s: StreamInfo, store: CalibrationStore) -> None:
        raise NotImplementedError

    def state_names(self, k: int) -> list[str]:
        """Buffer names passed to ``approx`` for stream ``k``, after ``x`` and ``t``."""
        raise NotImplementedError

    def state(self, k: int) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.state_names(k)]

    def update_stream(self, k: int, computed: torch.Tensor, t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def update_shared(self, computed, t) -> None:
        """State shared by the streams (e.g. the timesteps of the last computations); after the streams."""

    def update(self, computed, new_gen, t, ins, outs) -> None:
        for k, (x, y) in enumerate(zip(ins, outs)):
            self.update_stream(k, computed, t, x, y)
        self.update_shared(computed, t)
        n = torch.where(new_gen, torch.zeros_like(self.n), self.n)
        self.n.copy_(n + as_count(computed, n.dtype))

    def reset(self) -> None:
        self.n.zero_()

    def _zeros(self, shape: tuple[int, ...], s: StreamInfo) -> torch.Tensor:
        return torch.zeros(shape, dtype=s.dtype, device=s.device)
