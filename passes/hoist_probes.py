"""hoist_probes: find each block's modulated input and move its computation before the block.

Why: a decision rule on the raw block input cannot see the timestep (it enters through adaLN),
so decisions collapse to whole steps.  The *probe* is the input of the block's first linear
layer that reads the hidden-state stream (``attn1.to_q`` in diffusers blocks): the normalised
and modulated hidden states.  Moving the nodes that produce it out of the block region lets
the guard read it before the ``torch.cond``, and the block branch reuses it as an operand, so
the statistic costs no extra compute.  Only blocks whose policy looks at the probe are hoisted.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .context import BlockRegion, PassContext, finish

LINEAR_OPS = {torch.ops.aten.linear.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
              torch.ops.aten.matmul.default}


def _find_probe(blk: BlockRegion, stream: str) -> fx.Node:
    src = blk.stream_inputs[stream]
    reach = {src}
    for n in blk.nodes:
        if any(a in reach for a in n.all_input_nodes):
            reach.add(n)
            if n.target in LINEAR_OPS:
                x = n.args[0] if n.target is not torch.ops.aten.addmm.default else n.args[1]
                if isinstance(x, fx.Node) and x in reach:
                    return x
    return src  # no linear layer on the stream: fall back to the raw input


def _ancestors_in(node: fx.Node, members: set[fx.Node]) -> set[fx.Node]:
    out: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in members and n not in out:
            out.add(n)
            stack.extend(n.all_input_nodes)
    return out


def blocks_needing_probe(ctx: PassContext) -> list[int]:
    policy = ctx.policy
    if policy.signal != "probe":
        return []
    return [b.index for b in ctx.blocks] if policy.scope == "block" else [0]


def hoist_probes(gm: fx.GraphModule, ctx: PassContext) -> None:
    for index in blocks_needing_probe(ctx):
        blk = ctx.blocks[index]
        stream = ctx.spec.stream_arg if ctx.spec.stream_arg in blk.stream_inputs else next(iter(blk.stream_inputs))
        probe = _find_probe(blk, stream)
        blk.probe = probe
        members = set(blk.nodes)
        if probe not in members:
            ctx.note("hoist_probes", f"{blk.name}: probe is the raw input {probe.name}")
            continue
        anc = _ancestors_in(probe, members)
        hoisted = [n for n in blk.nodes if n in anc]
        rest = [n for n in blk.nodes if n not in anc]
        if not rest:
            raise RuntimeError(f"{blk.name}: the whole block feeds its probe {probe.name}; nothing left to guard")
        for n in hoisted:  # keep their order, in front of the first node that stays in the block
            rest[0].prepend(n)
        blk.hoisted = hoisted
        blk.nodes = [n for n in blk.nodes if n not in anc]
        ctx.note("hoist_probes", f"{blk.name}: probe {probe.name} ({len(hoisted)} nodes hoisted)")
    finish(gm)
