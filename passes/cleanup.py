"""cleanup: drop nodes left dead by the rewrite (state-mutating modules are marked impure)."""
from __future__ import annotations

import torch.fx as fx

from .context import PassContext, finish


def cleanup(gm: fx.GraphModule, ctx: PassContext) -> None:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    ctx.note("cleanup", f"removed {before - len(gm.graph.nodes)} dead nodes")
    finish(gm)
