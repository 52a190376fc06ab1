"""External caching libraries run the way their users run them, with their skips counted.

Why this module exists: a comparison with our own re-implementation of First-Block-Cache
could hide a bug in that re-implementation.  So the benchmark also runs the peers' own code on
an untouched copy of the model:

* diffusers' ``apply_first_block_cache`` (``diffusers.hooks``).  The MNIST models are called
  outside a pipeline, so no ``cache_context`` is active; we set one with
  ``diffusers.hooks.hooks._set_cache_context(model, CacheContext("cond"))``.  Batched CFG
  (cond and uncond in one batch) is one call, as in diffusers' own pipelines.
* cache-dit's DBCache (``Fn_compute_blocks=1, Bn_compute_blocks=0`` unless asked otherwise; optionally its
  TaylorSeer calibrator), when the package is installed, on PixArt, SD3, Flux and Wan with the block lists and
  forward patterns of cache-dit's own adapters.  It is optional: requesting it without the package raises a
  clear error.
* diffusers' ``apply_taylorseer_cache`` on **whole blocks** (``cache_identifiers`` = every
  block of every block list; its default hooks attention modules only) with float32 Taylor
  factors (its bf16 default only loses precision on these fp32 models).  Its schedule looks at
  no data: block calls ``0 .. disable_cache_before_step - 1`` and those with
  ``(step - before - 1) % cache_interval == 0`` compute (:func:`taylorseer_computed_steps`).
* diffusers' ``apply_mag_cache`` with ``mag_ratios`` from its own ``calibrate=True`` run
  (:func:`diffusers_mag_ratios`; the ratios it prints at the end of the calibration run are
  parsed, the way its docstring tells users to copy them).

For every peer the bytes of its cached tensors (its hooks' states) are recorded after each model
call; :attr:`PeerRun.state_bytes` is the maximum over a generation.

Skips are counted without touching the peers' logic: for diffusers, each block's ``forward``
is wrapped *before* the hooks are installed, so the hook's "original forward" is our counter
and a skipped block never reaches it; cache-dit checks block signatures, so there we count
with forward pre-hooks on the blocks' inner attention modules (only reached when the block
really computes); TaylorSeer's and MagCache's hooks replace a block's ``forward`` too, so they are
counted the same way.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

__all__ = ["PeerRun", "diffusers_first_block_cache", "cache_dit_dbcache", "diffusers_taylorseer",
           "taylorseer_computed_steps", "diffusers_mag_ratios", "diffusers_mag_cache", "peer_state_bytes",
           "cache_dit_state_tensors"]


@dataclass
class PeerRun:
    """A peer-cached copy of a model and its per-block computation counter."""

    model: nn.Module
    computed: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=lambda: [0])
    #: most bytes of tensors held in the peer's hook states after any model call so far
    state_bytes: int = 0

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


def _count_model_calls(model: nn.Module, run: PeerRun) -> None:
    def pre_hook(_module, _args, _kwargs=None):
        run.calls[0] += 1

    def post_hook(_module, _args, _out):
        run.state_bytes = max(run.state_bytes, peer_state_bytes(model))

    model.register_forward_pre_hook(pre_hook)
    model.register_forward_hook(post_hook)


def _tensors(obj: Any, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif depth < 4 and hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
        for v in vars(obj).values():
            yield from _tensors(v, depth + 1)


def cache_dit_state_tensors(model: nn.Module):
    """The tensors cache-dit holds for ``model``: every cache context's ``buffers`` (DBCache's residuals) and
    the states of its calibrators (TaylorSeer's derivative ladders).  cache-dit keeps its context manager in
    a module attribute (``model._context_manager`` for a transformer adapted without a pipeline)."""
    for mod in model.modules():
        for v in vars(mod).values():
            contexts = getattr(v, "_cached_context_manager", None)
            if not isinstance(contexts, dict) or isinstance(v, nn.Module):
                continue
            for ctx in contexts.values():
                yield from _tensors(getattr(ctx, "buffers", None))
                for name in ("calibrator", "encoder_calibrator", "cfg_calibrator", "cfg_encoder_calibrator"):
                    for st in (getattr(getattr(ctx, name, None), "states", None) or {}).values():
                        yield from _tensors(getattr(st, "state", None))


def _diffusers_hook_state_tensors(model: nn.Module):
    for mod in model.modules():
        reg = getattr(mod, "_diffusers_hook", None)
        if reg is None:
            continue
        for hook in reg.hooks.values():
            sm = getattr(hook, "state_manager", None)
            for state in (getattr(sm, "_state_cache", {}) or {}).values():
                yield from _tensors(state)


def peer_state_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors held in the peers' cache states under ``model``.

    Walks every module's ``_diffusers_hook`` registry, every hook's ``state_manager`` and the
    states it holds (per cache context), and cache-dit's cache contexts (buffers and calibrator states);
    a tensor shared by several states counts once.  Tensors a hook holds only during one call (e.g. a
    head block's input) are included when they are still referenced after the call.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for gen in (_diffusers_hook_state_tensors(model), cache_dit_state_tensors(model)):
        for t in gen:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += key[1]
    return total


def _attn(block: nn.Module) -> nn.Module:
    for name in ("attn1", "attn"):
        sub = getattr(block, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise ValueError(f"{type(block).__name__} has no attn1/attn submodule to count its computations with")


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    out = [(n, getattr(model, n)) for n in ("transformer_blocks", "single_transformer_blocks", "blocks")
           if isinstance(getattr(model, n, None), nn.ModuleList)]
    if not out:
        raise ValueError(f"{type(model).__name__} has no `transformer_blocks` ModuleList; the peers need one")
    return out


def _count_blocks_by_attention(model: nn.Module, run: PeerRun) -> None:
    """Count each block's computations with a pre-hook on its attention (reached only when it computes)."""
    blocks = [b for _, bl in _block_lists(model) for b in bl]
    run.computed[:] = [0] * len(blocks)
    for i, blk in enumerate(blocks):
        def pre(_mod, _args, _kwargs=None, _i=i):
            run.computed[_i] += 1

        _attn(blk).register_forward_pre_hook(pre)


def diffusers_first_block_cache(model: nn.Module, threshold: float) -> PeerRun:
    """A fresh deep copy of ``model`` with diffusers' First-Block-Cache applied at ``threshold``.

    A fresh copy per generation: diffusers' ``FBCSharedBlockState.reset`` keeps the head
    block's residual of the previous generation, so re-using hooked models would let one
    generation's state leak into the next.
    """
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    m = copy.deepcopy(model)
    blocks = [b for _, bl in _block_lists(m) for b in bl]  # Flux: its single blocks are cached too
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


def cache_dit_dbcache(model: nn.Module, threshold: float, steps: int, warmup_steps: int = 2,
                      taylorseer_order: int = 0, fn: int = 1, bn: int = 0, max_skip: int = 0) -> PeerRun:
    """A deep copy of ``model`` with cache-dit's DBCache (``Fn_compute_blocks=fn``, ``Bn_compute_blocks=bn``,
    default F1B0) at ``threshold``; ``taylorseer_order`` ≥ 1 adds cache-dit's TaylorSeer calibrator of that order
    (its skipped blocks' residuals are forecast, not reused); ``max_skip`` ≥ 1 caps consecutive cached steps
    (``max_continuous_cached_steps``; 0: no cap).  PixArt, SD3, Flux and Wan transformers (Flux: both block lists,
    as cache-dit's Flux adapter caches them; Wan: one cache context, where its adapter separates CFG into two).

    Raises:
        ImportError: cache-dit is not installed (``pip install cache-dit``).
        ValueError: another transformer (cache-dit fails on DiT), or ``fn + bn`` leaves no block to cache.
    """
    try:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig
    except ImportError as e:
        raise ImportError("method 'cache_dit' needs the cache-dit package: `pip install \"fx-fastcache[peers]\"` "
                          "or `pip install cache-dit` (it leaves torch and diffusers as they are); or drop it from "
                          "--methods") from e
    m = copy.deepcopy(model)
    lists = _block_lists(m)
    # the block lists and forward patterns cache-dit's own adapters give these families (its
    # ``block_adapters/adapters.py``: PixArt Pattern_3; SD3 Pattern_1; Flux both lists, Pattern_1; Wan Pattern_2)
    pattern = {"PixArtTransformer2DModel": ForwardPattern.Pattern_3, "SD3Transformer2DModel": ForwardPattern.Pattern_1,
               "FluxTransformer2DModel": ForwardPattern.Pattern_1,
               "WanTransformer3DModel": ForwardPattern.Pattern_2}.get(type(m).__name__)
    if pattern is None:
        raise ValueError(f"method 'cache_dit' runs on PixArt, SD3, Flux and Wan transformers, not {type(m).__name__} "
                         "(cache-dit's DBCache fails on DiT: its forward reads `transformer_blocks[0].norm1` after "
                         "cache-dit replaced the list); drop it from --methods for this model")
    short = [f"{name} ({len(bl)} blocks)" for name, bl in lists if fn + bn >= len(bl)]
    if fn < 1 or len(short) == len(lists):
        raise ValueError(f"cache_dit fn={fn}, bn={bn}: " + (f"{', '.join(short)} would have no block left to cache"
                                                            if fn >= 1 else "fn must be >= 1 (the block it compares)")
                         + "; choose fn >= 1 and fn + bn below the length of a block list")
    run = PeerRun(m)
    _count_blocks_by_attention(m, run)
    cache_dit.enable_cache(
        BlockAdapter(transformer=m, blocks=[bl for _, bl in lists] if len(lists) > 1 else lists[0][1],
                     forward_pattern=[pattern] * len(lists) if len(lists) > 1 else pattern),
        cache_config=DBCacheConfig(Fn_compute_blocks=int(fn), Bn_compute_blocks=int(bn),
                                   residual_diff_threshold=float(threshold), max_warmup_steps=int(warmup_steps),
                                   max_continuous_cached_steps=int(max_skip) if max_skip else -1,
                                   num_inference_steps=int(steps)),
        # SD3's last block returns no text stream (``context_pre_only``), so cache-dit's encoder calibrator
        # never gets a first value and fails at its first forecast; the image does not read that stream
        calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=int(taylorseer_order),
                                                     enable_encoder_calibrator=type(m).__name__ != "SD3Transformer2DModel")
        if taylorseer_order else None,
    )
    _count_model_calls(m, run)
    return run


def taylorseer_computed_steps(steps: int, interval: int, before: int) -> list[int]:
    """The steps on which diffusers' TaylorSeer computes a block, from its documented schedule.

    ``TaylorSeerCacheHook._measure_should_compute``: step ``s`` computes when ``s < before`` or
    ``(s - before - 1) % interval == 0`` (no ``disable_cache_after_step``).
    """
    return [s for s in range(steps) if s < before or (s - before - 1) % interval == 0]


def diffusers_taylorseer(model: nn.Module, interval: int, order: int = 1, before: int = 3) -> PeerRun:
    """A fresh deep copy of ``model`` with diffusers' TaylorSeer on every whole block.

    ``interval`` = ``cache_interval``, ``order`` = ``max_order``, ``before`` =
    ``disable_cache_before_step``; Taylor factors in float32.  A fresh copy per generation
    (its per-block step counters run on across generations unless reset).
    """
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    for name, v, lo in (("interval", interval, 1), ("order", order, 0), ("before", before, 1)):
        if int(v) != v or v < lo:
            raise ValueError(f"TaylorSeer {name}={v!r} is invalid: expected an integer >= {lo}"
                             + (" (step 0 must compute: TaylorSeer cannot predict before its first update)"
                                if name == "before" else ""))
    m = copy.deepcopy(model)
    run = PeerRun(m)
    _count_blocks_by_attention(m, run)
    # SD3's last joint block (``context_pre_only``) returns ``(None, hidden_states)``, which
    # TaylorSeer's state cannot store (AttributeError in ``TaylorSeerState.update``): it stays
    # uncached, i.e. always computed (and counted as such).
    ids = [rf"^{re.escape(n)}\.{i}$" for n, bl in _block_lists(m) for i, b in enumerate(bl)
           if not getattr(b, "context_pre_only", False)]
    if len(ids) < sum(len(bl) for _, bl in _block_lists(m)):
        logger.warning("TaylorSeer: %d block(s) return None outputs (context_pre_only) and stay uncached",
                       sum(len(bl) for _, bl in _block_lists(m)) - len(ids))
    apply_taylorseer_cache(m, TaylorSeerCacheConfig(
        cache_interval=int(interval), disable_cache_before_step=int(before), max_order=int(order),
        taylor_factors_dtype=torch.float32, cache_identifiers=ids))
    _set_cache_context(m, CacheContext("cond"))  # outside a pipeline: one context, as for FBC
    _count_model_calls(m, run)
    return run


def diffusers_mag_ratios(model: nn.Module, generate, steps: int) -> list[float]:
    """MagCache's ``mag_ratios`` for ``model``: its own ``calibrate=True`` run, printed ratios parsed.

    ``generate(m)`` must run one full generation of ``steps`` model calls with ``m`` (a hooked
    copy of ``model``), e.g. on the calibration seeds.
    """
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    m = copy.deepcopy(model)
    apply_mag_cache(m, MagCacheConfig(calibrate=True, num_inference_steps=int(steps)))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        generate(m)
    lists = re.findall(r"\[[^\[\]]*\]", buf.getvalue())
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios (output: {buf.getvalue()[-300:]!r}); "
                           f"did the generation make exactly {steps} model calls?")
    ratios = [float(r) for r in ast.literal_eval(lists[-1])]
    if len(ratios) != steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps")
    return ratios


def diffusers_mag_cache(model: nn.Module, threshold: float, mag_ratios: list[float], steps: int,
                        max_skip_steps: int = 3, retention_ratio: float = 0.2) -> PeerRun:
    """A fresh deep copy of ``model`` with diffusers' MagCache (calibrated ``mag_ratios``)."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    m = copy.deepcopy(model)
    run = PeerRun(m)
    _count_blocks_by_attention(m, run)
    apply_mag_cache(m, MagCacheConfig(threshold=float(threshold), max_skip_steps=int(max_skip_steps),
                                      retention_ratio=float(retention_ratio), num_inference_steps=int(steps),
                                      mag_ratios=list(mag_ratios)))
    _count_model_calls(m, run)
    return run
