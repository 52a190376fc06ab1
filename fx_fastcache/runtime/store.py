"""The calibration store: fitted tensors shared by every graph captured for one optimized model."""
from __future__ import annotations

from collections.abc import Callable

import torch


class CalibrationStore:
    """Fitted tensors shared by every captured graph of one optimized model (keyed by name).

    Graphs captured for different input shapes register the *same* tensor objects as buffers,
    so fitting or loading updates them all in place.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.calibrated = False
        self.meta: dict[str, str] = {}
        #: Bumped whenever a decision table is written (``install_table``, ``load_calibration``), so a
        #: host-side copy (step dispatch) knows to read it again without comparing tensors.
        self.table_version = 0

    def get(self, name: str, shape: tuple[int, ...], init: Callable[[], torch.Tensor]) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            t = init()
            self.tensors[name] = t
        elif tuple(t.shape) != tuple(shape):
            raise ValueError(f"calibration tensor {name!r} has shape {tuple(t.shape)} but this graph needs {shape}")
        return t
