"""pin_cond_operands: give every computed ``cond`` operand a fixed, contiguous layout (inductor only).

See :mod:`fx_fastcache.runtime.pin` for why.  Operands that already have a fixed layout are left
alone: graph inputs, parameters and buffers (``get_attr``), outputs of another ``cond``
(inductor already forces a branch's outputs to their exact strides) and tensors of fewer than 2
dimensions.  One pin per
producer serves every block that reads it.  With the eager backend the pass does nothing: eager
``cond`` runs the branches on whatever strides it gets.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fx_fastcache.graph_protocol import CLONE, conds, is_cond
from fx_fastcache.runtime.pin import PIN

from .context import PassContext, finish


def _fixed_layout(n: fx.Node) -> bool:
    if n.op in ("placeholder", "get_attr"):
        return True
    if n.op == "call_function" and n.target is operator.getitem:  # an output of another cond
        src = n.args[0]
        return isinstance(src, fx.Node) and is_cond(src)
    return n.op == "call_function" and n.target is PIN


def pin_cond_operands(gm: fx.GraphModule, ctx: PassContext) -> None:
    if ctx.backend != "inductor":
        ctx.note("pin_cond_operands", f"nothing to do for backend={ctx.backend!r}")
        return
    g = gm.graph
    pins: dict[fx.Node, fx.Node] = {}
    for cond in conds(g):
        operands = list(cond.args[3])
        for j, o in enumerate(operands):
            val = o.meta.get("val") if isinstance(o, fx.Node) else None
            if not isinstance(val, torch.Tensor) or val.ndim < 2 or _fixed_layout(o):
                continue
            p = pins.get(o)
            if p is None and o.target is CLONE and all(is_cond(u) for u in o.users):
                o.target, o.kwargs = PIN, {}  # guard_blocks' contiguous copy: make it the pin itself
                pins[o] = p = o
            if p is None:
                with g.inserting_after(o):
                    p = g.call_function(PIN, (o,))
                p.meta["val"] = torch.empty_like(val, memory_format=torch.contiguous_format)  # pin's own fake
                pins[o] = p
            operands[j] = p
        cond.args = (*cond.args[:3], operands)
    ctx.note("pin_cond_operands", f"{len(pins)} computed operand(s) pinned to a contiguous layout")
    finish(gm)
