"""cleanup: drop nodes left dead by the rewrite (state-mutating modules are marked impure; nodes that
write in place stay, also regions holding such writes: ``graph_protocol.drop_dead_nodes``)."""
from __future__ import annotations

import torch.fx as fx

from fx_fastcache import graph_protocol as gp

from .context import PassContext, finish


def cleanup(gm: fx.GraphModule, ctx: PassContext) -> None:
    before = len(gm.graph.nodes)
    gp.drop_dead_nodes(gm)
    ctx.note("cleanup", f"removed {before - len(gm.graph.nodes)} dead nodes")
    finish(gm)
