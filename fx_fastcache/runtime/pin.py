"""``fastcache::pin``: a layout barrier for the operands of a compiled ``torch.cond``.

Why it exists: inductor (torch 2.13) compiles each ``cond`` branch for the strides its operands
had at export (``meta["val"]``) but lets the producer of an operand pick another layout (a
pointwise op fed by a transposed tensor inherits the transposition).  The branch then fails at
run time with ``assert_size_stride`` (seen on HunyuanVideo, whose patch embedding is
``Conv3d → flatten → transpose``).  ``.contiguous()`` and view chains do not help: inductor
drops or re-lays them.  A custom op's output has a fixed layout, so routing each computed
operand through ``pin`` (a contiguous copy) gives the branch exactly the strides it was
compiled for.  Only the inductor backend gets pins (``passes/pin_cond_operands.py``); graphs
without ``cond`` (step-dispatch copies) and ONNX export remove them with :func:`unpin`.
"""
from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["pin", "PIN", "unpin"]


@torch.library.custom_op("fastcache::pin", mutates_args=())
def pin(x: torch.Tensor) -> torch.Tensor:
    return x.clone(memory_format=torch.contiguous_format)


@pin.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


PIN = torch.ops.fastcache.pin.default


def unpin(graph: fx.Graph) -> int:
    """Replace every pin by its input (for graphs that are not compiled with ``cond``); returns
    how many were removed."""
    pins = [n for n in graph.nodes if n.op == "call_function" and n.target is PIN]
    for n in pins:
        n.replace_all_uses_with(n.args[0])
        graph.erase_node(n)
    return len(pins)
