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


class CalibrationStore:
    """Fitted tensors shared by every captured graph of one optimized model (keyed by name).

    Graphs captured for different input shapes register the *same* tensor objects as buffers,
    so fitting or loading updates them all in place.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.calibrated = False
        self.meta: dict[str, str] = {}

    def get(self, name: str, shape: tuple[int, ...], init: Callable[[], torch.Tensor]) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            t = init()
            self.tensors[name] = t
        elif tuple(t.shape) != tuple(shape):
            raise ValueError(f"calibration tensor {name!r} has shape {tuple(t.shape)} but this graph needs {shape}")
        return t


class Fallback(nn.Module):
    """Base class: per-stream state buffers, a computed-count ``n`` and the update rule."""

    name: str = ""
    #: Fewer computations than this since the generation began → the block must compute.
    min_computed: int = 1
    #: Whether calibration fits something for this fallback.
    fitted: bool = False
    #: The cheap-branch function, ``approx(x, t, *state)``.
    approx: Callable[..., torch.Tensor]

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

    def update(self, computed, new_gen, t, ins, outs) -> None:
        for k, (x, y) in enumerate(zip(ins, outs)):
            self.update_stream(k, computed, t, x, y)
        n = torch.where(new_gen, torch.zeros_like(self.n), self.n)
        self.n.copy_(n + as_count(computed, n.dtype))

    def reset(self) -> None:
        self.n.zero_()

    def _zeros(self, shape: tuple[int, ...], s: StreamInfo) -> torch.Tensor:
        return torch.zeros(shape, dtype=s.dtype, device=s.device)


#: A "computed" flag: a 0-d bool tensor (decided in the graph) or a plain ``bool`` (fixed when a
#: step-dispatch copy was specialised, so the state update compiles without any select).
Flag = torch.Tensor | bool


def keep_or(flag: Flag, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where ``flag`` holds, else ``old`` (in-graph select, or chosen here for a static flag)."""
    if isinstance(flag, bool):
        return new if flag else old
    return torch.where(flag, new, old)


def negate(flag: Flag) -> Flag:
    """``not flag`` for either kind of flag."""
    return (not flag) if isinstance(flag, bool) else ~flag


def as_count(flag: Flag, dtype: torch.dtype) -> torch.Tensor | float:
    """``flag`` as 1/0 in ``dtype`` (a Python float for a static flag)."""
    return float(flag) if isinstance(flag, bool) else flag.to(dtype)


def host_branch(pred: torch.Tensor) -> bool:
    """True when ``pred`` is a plain eager CPU tensor.

    Eager ``cond`` already evaluated the predicate on the host to pick its branch, so branching
    on it again in Python costs no extra sync and saves the full-tensor ``torch.where`` of every
    state update (≈ 10 % of an eager step on the trained DiT).  Traced, compiled and exported
    graphs (FakeTensor / FunctionalTensor / proxies) and CUDA tensors keep the in-graph form.
    """
    return type(pred) is torch.Tensor and pred.device.type == "cpu" and not torch.compiler.is_compiling()


def assign(buf: torch.Tensor, computed: Flag, new: torch.Tensor) -> None:
    """``buf ← new`` if the block was computed, else unchanged."""
    if isinstance(computed, bool):
        if computed:
            buf.copy_(new)
        return
    if host_branch(computed):
        if bool(computed):
            buf.copy_(new)
        return
    buf.copy_(torch.where(computed, new, buf))


def shift(dst: torch.Tensor, computed: Flag, src: torch.Tensor) -> None:
    """``dst ← src`` if the block was computed, where ``src`` is a state buffer that is itself
    overwritten later in the same call (``r_p ← r_c`` before ``r_c ← y − x``).

    With a static ``True`` flag this is *not* a plain ``dst.copy_(src)``: inductor (torch 2.13,
    CPU) miscompiles "copy buffer a into buffer b, then overwrite a" and stores the *new* ``a`` in
    ``b`` (also with a ``clone`` in between; tests/test_step_dispatch.py has the repro).  A select
    on a constant predicate keeps the read of the old value.
    """
    if isinstance(computed, bool):
        if computed:
            dst.copy_(torch.where(torch.ones((), dtype=torch.bool, device=dst.device), src, dst))
        return
    assign(dst, computed, src)


def assign_residual(buf: torch.Tensor, computed: Flag, y: torch.Tensor, x: torch.Tensor) -> None:
    """``buf ← y − x`` if the block was computed, else unchanged."""
    if isinstance(computed, bool):
        if computed:
            torch.sub(y, x, out=buf)
        return
    if host_branch(computed):
        if bool(computed):
            torch.sub(y, x, out=buf)
        return
    buf.copy_(torch.where(computed, y - x, buf))
