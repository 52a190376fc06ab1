"""strip_markers: remove the capture-time ``fastcache::mark`` identities.

The regions found by ``find_blocks`` keep pointing at the real producer nodes, so after this
pass the graph computes exactly what ``torch.export`` captured, with no extra copies.
"""
from __future__ import annotations

import torch.fx as fx

from fx_fastcache.graph_protocol import strip_identity
from fx_fastcache.markers import MARK

from .context import PassContext, finish


def strip_markers(gm: fx.GraphModule, ctx: PassContext) -> None:
    def real(n: fx.Node) -> fx.Node:
        return strip_identity(n, MARK)

    if ctx.timestep is not None:
        ctx.timestep = real(ctx.timestep)
    if ctx.stream_input is not None:
        ctx.stream_input = real(ctx.stream_input)
    for blk in ctx.blocks:
        blk.stream_inputs = {k: real(v) for k, v in blk.stream_inputs.items()}
        blk.outputs = [(k, name, real(n)) for k, name, n in blk.outputs]
        blk.nodes = [n for n in blk.nodes if n.target is not MARK]
    removed = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is MARK:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            removed += 1
    ctx.note("strip_markers", f"removed {removed} markers")
    finish(gm)
