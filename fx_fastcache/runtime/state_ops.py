"""In-graph state updates shared by the fallbacks, the policies' deciders and the runtime modules.

Every cached tensor in a rewritten graph is updated by one of these helpers, with a *flag* that
says whether the block (or step) was computed.  The flag is a 0-d bool tensor decided in the
graph, or a plain ``bool`` in a step-dispatch copy specialised for a known skip pattern; the
helpers pick the cheapest correct form for each (see :func:`host_branch` and :func:`shift`).
"""
from __future__ import annotations

import torch

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


def forecast_slope(t: torch.Tensor, t_c: torch.Tensor, t_p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(t − t_c) / (t_c − t_p)``: the first-order extrapolation factor from the last two computations
    at ``t_c`` and ``t_p`` (0 where ``valid`` is false or the two coincide, i.e. plain reuse).

    The step forecast policy extrapolates block 0's modulated input with it and the forecast
    fallback the blocks' residuals: one rule, so the statistic checks exactly what the fallback does.
    """
    valid = valid & (t_c != t_p)
    denom = torch.where(valid, t_c - t_p, torch.ones_like(t_c))
    return torch.where(valid, (t - t_c) / denom, torch.zeros_like(t_c))
