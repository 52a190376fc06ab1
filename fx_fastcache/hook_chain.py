"""Where a module's own forward sits when diffusers has put hooks around it.

diffusers (``HookRegistry``: context parallelism, group offloading, layerwise casting) installs its hooks
as the instance ``forward``; code that puts something in place of a module's own forward (the capture's
markers, a family's traceable forward) replaces the innermost link of that chain, so the hooks still run.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.nn as nn


def innermost_forward(module: nn.Module) -> tuple[Any, str] | None:
    """Where the module's own forward sits inside a diffusers hook chain, if it has one.

    diffusers (``HookRegistry``: context parallelism, group offloading, layerwise casting)
    replaces the instance ``forward`` with a chain whose innermost link is
    ``module._diffusers_hook._fn_refs[0].forward`` (``.original_forward`` when that hook brings
    its own ``new_forward``).  Returns ``(holder, attribute)`` of that link.
    """
    registry = module.__dict__.get("_diffusers_hook")
    refs = getattr(registry, "_fn_refs", None)
    if not refs:
        return None
    ref = refs[0]
    attr = "original_forward" if getattr(ref, "original_forward", None) is not None else "forward"
    return ref, attr


def own_forward_link(module: nn.Module) -> tuple[Any, str]:
    """``(holder, attribute)`` of the module's own forward: the innermost link of its hook chain, else its
    ``forward``."""
    return innermost_forward(module) or (module, "forward")


@contextlib.contextmanager
def swapped(holder: Any, attr: str, value: Any) -> Iterator[None]:
    """``holder.attr`` is ``value`` within the context; after it, what was in ``holder.__dict__`` before is
    put back, or the instance attribute removed if there was none (a diffusers hook chain stays as it was)."""
    d = holder.__dict__
    had, old = attr in d, d.get(attr)
    setattr(holder, attr, value)
    try:
        yield
    finally:
        if had:
            d[attr] = old
        else:
            d.pop(attr, None)
