"""merge_tokens: spatial-temporal token merging (placeholder until implemented)."""
from __future__ import annotations

import torch.fx as fx

from .context import PassContext


def merge_tokens(gm: fx.GraphModule, ctx: PassContext) -> None:
    if not ctx.config.enable_token_merge:
        return
    raise NotImplementedError("enable_token_merge is not implemented yet")
