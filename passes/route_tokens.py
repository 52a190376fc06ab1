"""route_tokens: motion-aware token routing inside every computed block.

Why this rewrite exists: ``guard_blocks`` decides per block whether to compute it at all; this
pass makes a *computed* block cheaper by running it on only the ``k = ceil((1 -
motion_threshold) · N)`` most salient image tokens of every sample.  The block branch
``fastcache_block_i`` has the token count ``N`` baked into its reshapes, so it cannot run on
``k`` tokens; instead the block *module* (``ctx.model``'s block, called with the arguments the
model used, recorded at capture by ``markers.CALLS``) is exported again with ``k`` tokens.
The guarded cond becomes::

    active, idx = fastcache_guard_i.router("select", step, new_gen, force, warmup, x)
    outs = cond(pred, fallback_i, compute_i, [operands..., active, idx, resid, block args...])
        compute_i = cond(active, routed_i, block_i)      # routed_i: gather → block(k) → scatter
    fastcache_guard_i.router("update", pred, new_gen, active, idx, x, outs[hidden])

Static tokens take the cached residual ``x + R``.  Text/encoder streams (SD3, Flux) are passed
whole and never dropped; a per-position table of the joint sequence (Flux's rotary ``cos``/
``sin`` of shape ``(L + N, d)``) is gathered with the tokens, which needs one index set for the
whole batch (Flux only); otherwise indices are per sample.  Routed tokens attend only to
routed tokens (and to all text tokens); see docs/ROUTING.md.

The branch machinery it shares with ``merge_tokens`` is in ``passes/token_reduction.py``;
``find_block_args`` (its own pass) records which node fed every block argument.
"""
from __future__ import annotations

import torch.fx as fx

from .context import PassContext
from .token_reduction import reduce_blocks, routing_capacity

__all__ = ["route_tokens", "routing_capacity"]


def route_tokens(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Token routing (and merging of the routed tokens when ``enable_token_merge`` is also on)."""
    cfg = ctx.config
    if not cfg.enable_token_routing:
        return
    reduce_blocks(gm, ctx, route=True, merge=cfg.enable_token_merge, pass_name="route_tokens")
