"""pin_cond_operands: give every computed ``cond`` operand a fixed, contiguous layout (inductor only).

See :mod:`fx_fastcache.runtime.pin` for why.  Operands that already have a fixed layout are left
alone: graph inputs, parameters and buffers (``get_attr``), outputs of another ``cond``
(inductor already forces a branch's outputs to their exact strides) and tensors of fewer than 2
dimensions.  A pin goes right before the first ``cond`` that reads its tensor and serves every later
block that reads it, until the model writes into that tensor in place.  With the eager backend the pass
does nothing: eager ``cond`` runs the branches on whatever strides it gets.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fx_fastcache import graph_protocol as gp
from fx_fastcache.graph_protocol import CLONE, is_cond
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
    # a pin is a copy: it must be taken after every in-place write to its tensor that the cond should see
    # (h[:, 1:] += ... before the blocks; a pin right after h's producer was 0.44 off with approximation off),
    # so it goes right before the first cond that reads it and serves later ones until the tensor is written
    writes: dict[fx.Node, int] = {}  # base tensor -> in-place writes to it so far, in graph order
    pins: dict[fx.Node, tuple[fx.Node, int]] = {}
    made = 0
    for node in list(g.nodes):
        if not is_cond(node):
            for base in gp.written_bases(gm, [node]):
                writes[base] = writes.get(base, 0) + 1
            continue
        cond = node
        # a tensor the block writes into in place stays unpinned: a write into a copy would not reach the
        # model's later readers (a block's x += f(x) under a long skip, or temb.mul_: 0.8 and 1.2 off)
        own = gp.written_bases(gm, [cond])
        operands = list(cond.args[3])
        for j, o in enumerate(operands):
            val = o.meta.get("val") if isinstance(o, fx.Node) else None
            if not isinstance(val, torch.Tensor) or val.ndim < 2 or _fixed_layout(o) or gp.view_base(o) in own:
                continue
            seen = writes.get(gp.view_base(o), 0)
            p, at = pins.get(o, (None, -1))
            if at != seen:
                p = None
            if p is None and o.target is CLONE and all(is_cond(u) for u in o.users):
                o.target, o.kwargs = PIN, {}  # guard_blocks' contiguous copy: make it the pin itself
                p = o
                made += 1
            if p is None:
                with g.inserting_before(cond):
                    p = g.call_function(PIN, (o,))
                p.meta["val"] = torch.empty_like(val, memory_format=torch.contiguous_format)  # pin's own fake
                made += 1
            pins[o] = (p, seen)
            operands[j] = p
        cond.args = (*cond.args[:3], operands)
        for base in own:  # the cond's own writes: later conds read the tensor written
            writes[base] = writes.get(base, 0) + 1
    ctx.note("pin_cond_operands", f"{made} pin(s) of {len(pins)} computed operand(s) to a contiguous layout")
    finish(gm)
