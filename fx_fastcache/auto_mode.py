"""Which execution mode ``optimize`` / ``enable_fastcache`` pick when ``step_dispatch="auto"`` (the default).

Why this exists: the fast mode depends on the device.  On CUDA, inductor lowers every in-graph
``torch.cond`` to ``if pred.item():`` (a device-to-host sync per guarded span) and skips CUDA
graphs for graphs that contain ``cond``; step dispatch (:mod:`fx_fastcache.step_dispatch`)
reads the step's decision once and replays a CUDA graph specialised for it (docs/GPU.md: 0.82×
the compiled baseline in-graph vs 92–102 % of the ceiling dispatched, on an H100).  On CPU the
in-graph ``cond`` costs no sync and step dispatch only adds a split.  The rule:

==========================================================  ==================================
model on CUDA, policy decides once per step (``step_forecast``,  ``step_dispatch="reduce-overhead"``
``teacache``, ``first_block_cache``) or ``schedule``, no token
routing/merging
model on CUDA, per-block policy (``chi2``) or token              in-graph guards (``None``): they
routing/merging                                                   decide inside the step
model not on CUDA                                                in-graph guards (``None``)
==========================================================  ==================================

An explicit ``step_dispatch`` (a compile mode, or ``None`` for in-graph guards) is always kept.
The choice is logged in one line at INFO level.
"""
from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from .policies import POLICIES

logger = logging.getLogger(__name__)

__all__ = ["AUTO", "EXECUTIONS", "COMPILE_MODES", "choose_step_dispatch", "resolve_step_dispatch",
           "resolve_execution", "model_is_cuda", "UNSET"]

AUTO = "auto"
#: ``execution=`` of ``optimize``/``enable_fastcache``: who runs the guarded graph.
EXECUTIONS = ("auto", "in_graph", "step_dispatch")
#: ``dispatch_compile=``: how step dispatch compiles its specialised copies.
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "eager")
#: ``step_dispatch=`` not given (its former spelling is still accepted).
UNSET: Any = object()


def model_is_cuda(model: nn.Module) -> bool:
    """Whether the model's parameters live on a CUDA device (the device check the rule reads)."""
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cuda"


def choose_step_dispatch(on_cuda: bool, config: Any) -> tuple[str | None, str]:
    """``(step_dispatch, why)`` for ``step_dispatch="auto"`` (see the module docstring)."""
    if not on_cuda:
        return None, "not on CUDA: in-graph guards cost no device sync here"
    if config.enable_token_routing or config.enable_token_merge:
        return None, "token routing/merging decides per block inside the step"
    if not POLICIES[config.policy].decides_per_step():
        return None, f"policy={config.policy!r} decides per block inside the step"
    return "reduce-overhead", (f"CUDA and policy={config.policy!r} fixes the whole step's pattern: one read per "
                               f"step and CUDA graphs instead of one sync per guarded span")


def resolve_step_dispatch(model: nn.Module, config: Any, step_dispatch: str | None) -> str | None:
    """The ``step_dispatch`` to install: ``"auto"`` resolved by the rule (and logged), else as given."""
    if step_dispatch != AUTO:
        return step_dispatch
    mode, why = choose_step_dispatch(model_is_cuda(model), config)
    logger.info("fx-fastcache: mode %s (%s)", f"step_dispatch={mode!r}" if mode else "in-graph guards", why)
    return mode


def resolve_execution(model: nn.Module, config: Any, execution: str = AUTO, dispatch_compile: str | None = None,
                      step_dispatch: Any = UNSET) -> str | None:
    """The step-dispatch compile mode to install (``None``: in-graph guards) for ``optimize``'s
    ``execution=`` / ``dispatch_compile=``, or for the former single argument ``step_dispatch=`` (a
    compile mode, ``None`` or ``"auto"``), which is still accepted."""
    if step_dispatch is not UNSET:
        if execution != AUTO or dispatch_compile is not None:
            raise ValueError("pass execution=/dispatch_compile= or their former spelling step_dispatch=, not both")
        return resolve_step_dispatch(model, config, step_dispatch)
    if execution not in EXECUTIONS:
        raise ValueError(f"execution={execution!r} is not supported; choose one of {EXECUTIONS}")
    if dispatch_compile is not None and dispatch_compile not in COMPILE_MODES:
        raise ValueError(f"dispatch_compile={dispatch_compile!r} is not supported; choose one of {COMPILE_MODES}")
    if execution == "in_graph":
        if dispatch_compile is not None:
            raise ValueError("dispatch_compile= applies to execution='step_dispatch' (or 'auto'), not 'in_graph'")
        return None
    if execution == "step_dispatch":
        return dispatch_compile or "reduce-overhead"
    mode = resolve_step_dispatch(model, config, AUTO)
    return (dispatch_compile or mode) if mode is not None else None
