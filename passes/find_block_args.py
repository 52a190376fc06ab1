"""find_block_args: record which graph node fed every tensor argument of every block.

Why: token routing and merging re-export a block for fewer tokens and must call it exactly as the
model did, from the nodes that fed its arguments; capture tags each argument with a
``fastcache::mark`` (``arg:<block>:<name>``).  This analysis runs before ``strip_markers`` and
stores ``tag -> producer node`` in ``ctx.extras["block_args"]``; it changes no node and does
nothing unless routing or merging is on.
"""
from __future__ import annotations

import torch.fx as fx

from fx_fastcache.graph_protocol import strip_identity
from fx_fastcache.markers import MARK

from .context import PassContext


def needs_block_args(ctx: PassContext) -> bool:
    return bool(ctx.config.enable_token_routing or ctx.config.enable_token_merge)


def find_block_args(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Record ``tag -> producer node`` for every ``arg:`` marker (no-op unless routing/merging)."""
    if not needs_block_args(ctx):
        return

    found = {n.args[1]: strip_identity(n, MARK) for n in gm.graph.nodes
             if n.op == "call_function" and n.target is MARK and str(n.args[1]).startswith("arg:")}
    ctx.extras["block_args"] = found
    ctx.note("find_block_args", f"{len(found)} block arguments")
