"""External caching libraries run the way their users run them, with their skips counted.

Why this module exists: a comparison with our own re-implementation of First-Block-Cache
could hide a bug in that re-implementation.  So the benchmark also runs the peers' own code on
an untouched copy of the model:

* diffusers' ``apply_first_block_cache`` (``diffusers.hooks``).  The MNIST models are called
  outside a pipeline, so no ``cache_context`` is active; we set one with
  ``diffusers.hooks.hooks._set_cache_context(model, CacheContext("cond"))``.  Batched CFG
  (cond and uncond in one batch) is one call, as in diffusers' own pipelines.
* cache-dit's DBCache (``Fn_compute_blocks=1, Bn_compute_blocks=0``), when the package is
  installed.  It is optional: requesting it without the package raises a clear error.

Skips are counted without touching the peers' logic: for diffusers, each block's ``forward``
is wrapped *before* the hooks are installed, so the hook's "original forward" is our counter
and a skipped block never reaches it; cache-dit checks block signatures, so there we count
with forward pre-hooks on the blocks' inner attention modules (only reached when the block
really computes).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

__all__ = ["PeerRun", "diffusers_first_block_cache", "cache_dit_dbcache"]


@dataclass
class PeerRun:
    """A peer-cached copy of a model and its per-block computation counter."""

    model: nn.Module
    computed: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=lambda: [0])

    def reset_counts(self) -> None:
        self.computed[:] = [0] * len(self.computed)
        self.calls[0] = 0

    @property
    def evaluations(self) -> int:
        return self.calls[0] * len(self.computed)

    @property
    def replaced_fraction(self) -> float:
        ev = self.evaluations
        return 1.0 - sum(self.computed) / ev if ev else 0.0

    def per_block_skipped(self) -> list[int]:
        return [self.calls[0] - c for c in self.computed]


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `transformer_blocks` ModuleList; the peers need one")
    return blocks


def _count_model_calls(model: nn.Module, run: PeerRun) -> None:
    def pre_hook(_module, _args, _kwargs=None):
        run.calls[0] += 1

    model.register_forward_pre_hook(pre_hook)


def diffusers_first_block_cache(model: nn.Module, threshold: float) -> PeerRun:
    """A fresh deep copy of ``model`` with diffusers' First-Block-Cache applied at ``threshold``.

    A fresh copy per generation: diffusers' ``FBCSharedBlockState.reset`` keeps the head
    block's residual of the previous generation, so re-using hooked models would let one
    generation's state leak into the next.
    """
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    m = copy.deepcopy(model)
    blocks = _blocks(m)
    run = PeerRun(m, computed=[0] * len(blocks))
    for i, blk in enumerate(blocks):
        orig = blk.forward

        def counted(*args: Any, _orig=orig, _i=i, **kwargs: Any):
            run.computed[_i] += 1
            return _orig(*args, **kwargs)

        blk.forward = counted
    apply_first_block_cache(m, FirstBlockCacheConfig(threshold=float(threshold)))
    _set_cache_context(m, CacheContext("cond"))
    _count_model_calls(m, run)
    return run


def cache_dit_dbcache(model: nn.Module, threshold: float, steps: int, warmup_steps: int = 2) -> PeerRun:
    """A deep copy of ``model`` with cache-dit's DBCache (F1B0) at ``threshold``.

    Raises:
        ImportError: cache-dit is not installed (``pip install cache-dit``).
    """
    try:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern
    except ImportError as e:
        raise ImportError("method 'cache_dit' needs the cache-dit package: `pip install \"fx-fastcache[peers]\"` "
                          "or `pip install cache-dit` (it leaves torch and diffusers as they are); or drop it from "
                          "--methods") from e
    m = copy.deepcopy(model)
    blocks = _blocks(m)
    run = PeerRun(m, computed=[0] * len(blocks))
    for i, blk in enumerate(blocks):
        def pre(_mod, _args, _i=i):
            run.computed[_i] += 1

        blk.attn1.register_forward_pre_hook(pre)
    cache_dit.enable_cache(
        BlockAdapter(transformer=m, blocks=m.transformer_blocks, forward_pattern=ForwardPattern.Pattern_3),
        cache_config=DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=float(threshold),
                                   max_warmup_steps=int(warmup_steps), num_inference_steps=int(steps)),
    )
    _count_model_calls(m, run)
    return run
