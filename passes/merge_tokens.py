"""merge_tokens: spatial-temporal token merging inside every computed block.

Why this rewrite exists: like token routing, merging makes a *computed* block cheaper, here by
running it on ``ceil(merge_ratio · N)`` cluster tokens (``runtime/merging.py``: importance =
spatial density × (1 + λ · temporal saliency), ``num_stages`` clustering stages, importance-
weighted averages) and giving every token its cluster's residual back.  It reuses the
reduced-token branch of ``route_tokens`` (the block module re-exported for the reduced token
count, ``cond(active, reduced_i, block_i)`` inside the computed branch) with every token
"routed": the first computation of a generation and warm-up steps run the full block.

When ``enable_token_routing`` is on as well, ``route_tokens`` already merges the routed tokens
and this pass does nothing.  (``FastCacheConfig`` refuses ``enable_token_merge`` with
``merge_ratio=1.0``, which would merge nothing.)
"""
from __future__ import annotations

import torch.fx as fx

from .context import PassContext
from .token_reduction import reduce_blocks


def merge_tokens(gm: fx.GraphModule, ctx: PassContext) -> None:
    cfg = ctx.config
    if not cfg.enable_token_merge or cfg.enable_token_routing:
        return
    reduce_blocks(gm, ctx, route=False, merge=True, pass_name="merge_tokens")
