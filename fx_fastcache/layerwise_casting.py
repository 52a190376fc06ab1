"""Capture a model under diffusers' layerwise casting, with the casts in the graph.

Why this exists: ``enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)``
keeps a model's linear and convolution weights in float8 (half the memory of bfloat16: how video DiTs such as
Wan 14B fit a 24 GB GPU) and casts each layer's weights up in a hook around its ``forward``
(``module.to(dtype)``, then back).  torch.export cannot trace that hook ("Couldn't swap Linear.weight"), and
the captured graph would never call it.  So for the capture each hooked layer runs its own forward on its
weights cast to the compute dtype (``torch.func``'s reparametrisation): the graph reads the float8 weights
and casts them where the layer uses them.  The casts sit inside the layer, so inside its block's region:
a block the cache skips casts nothing, and memory at run time is what the hook needs (one layer's
weights in the compute dtype at a time, in eager).  The model is left as it was (the hooks stay; a call
of the model itself still goes through them).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
from torch.nn.utils.stateless import _reparametrize_module

__all__ = ["HOOK_NAME", "casting_hook", "compute_dtype_of_hooks", "cast_in_graph"]

HOOK_NAME = "layerwise_casting"  # diffusers.hooks.layerwise_casting._LAYERWISE_CASTING_HOOK


def casting_hook(module: nn.Module):
    """The diffusers layerwise casting hook on ``module`` itself, or ``None``."""
    registry = module.__dict__.get("_diffusers_hook")
    return registry.get_hook(HOOK_NAME) if registry is not None and hasattr(registry, "get_hook") else None


def compute_dtype_of_hooks(modules: Iterable[nn.Module]) -> torch.dtype | None:
    """The compute dtype of the first layerwise casting hook on ``modules`` (diffusers' ``ModelMixin.dtype``
    reads it the same way), or ``None`` without one.  (A list of a Flux-sized model's modules takes about
    50 µs, its ``model.modules()`` walk 0.6 ms: callers on the per-call path pass the list they keep.)"""
    for m in modules:
        if "_diffusers_hook" in m.__dict__ and (hook := casting_hook(m)) is not None:
            return hook.compute_dtype
    return None


def _cast_forward(module: nn.Module, hook):
    """``module``'s forward as it was before the hook wrapped it (a forward patched earlier stays), on its
    weights cast to the hook's compute dtype."""
    inner = getattr(getattr(hook, "fn_ref", None), "forward", None) or type(module).forward.__get__(module)

    def forward(*args, **kwargs):
        own = (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        cast = {name: t.to(hook.compute_dtype) for name, t in own if t.is_floating_point()}
        with _reparametrize_module(module, cast):
            return inner(*args, **kwargs)
    return forward


@contextlib.contextmanager
def cast_in_graph(model: nn.Module) -> Iterator[int]:
    """Inside: every layer of ``model`` with a layerwise casting hook computes on its weights cast to the
    hook's compute dtype, with no hook (for torch.export).  Yields the number of such layers."""
    saved = []
    try:
        for m in model.modules():
            hook = casting_hook(m)
            if hook is None:
                continue
            if len(m._diffusers_hook.hooks) > 1:
                raise ValueError(f"{type(m).__name__} carries diffusers hooks {list(m._diffusers_hook.hooks)} beside "
                                 f"layerwise casting on the same layer; FastCache can trace layerwise casting alone "
                                 f"there: remove the other hooks from the model's layers")
            saved.append((m, m.__dict__.get("forward")))
            m.forward = _cast_forward(m, hook)
        yield len(saved)
    finally:
        for m, forward in saved:  # restore what was there (the hook registry's forward), never just pop
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward
