"""The public functions: ``optimize``, ``calibrate``, ``reset``, ``configure``, statistics."""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from .calibration import calibrate, load_calibration, save_calibration
from .config import FastCacheConfig
from .module import FastCacheModule

logger = logging.getLogger(__name__)

__all__ = ["optimize", "calibrate", "save_calibration", "load_calibration", "get_cache_statistics", "reset",
           "configure", "set_schedule"]


def optimize(model: nn.Module, backend: str = "inductor", config: FastCacheConfig | None = None,
             blocks: str | list[str] | None = None, example_inputs: dict[str, Any] | None = None,
             step_dispatch: str | None = "auto", **overrides: Any) -> FastCacheModule:
    """Rewrite ``model`` so every transformer block is a guarded conditional with a fallback.

    Args:
        model: a diffusers DiT/PixArt/SD3/Flux transformer or any module with a ModuleList of blocks.
        backend: ``"inductor"`` (``torch.compile(fullgraph=True)`` of the rewritten graph) or
            ``"eager"`` (run the rewritten graph without compiling).
        config: a :class:`FastCacheConfig`; keyword ``overrides`` replace its fields.
        blocks: attribute path(s) of the block ModuleList(s) for models that are not a known family.
        example_inputs: keyword inputs to capture eagerly now instead of at the first call.
        step_dispatch: run each step through a graph specialised for its skip pattern, learned
            once per step (:mod:`fx_fastcache.step_dispatch`; the fast path on GPU, where every
            in-graph ``cond`` costs a sync and disables CUDA graphs): ``"reduce-overhead"``
            (CUDA graphs), ``"default"``, ``"max-autotune"`` or ``"eager"``.  The copies are
            compiled by the dispatcher, so pair it with ``backend="eager"`` to skip the unused
            compile of the guarded graph.  Step-level policies and schedules only.  With a
            schedule call ``fastcache.reset(opt)`` before each generation.  ``"auto"`` (default):
            ``"reduce-overhead"`` for a CUDA model with a step-level policy or a schedule, else
            ``None`` (in-graph guards); the rule is :mod:`fx_fastcache.auto_mode`, logged at INFO.
    """
    config = FastCacheConfig.resolve(config, **overrides)
    opt = FastCacheModule(model, config, backend=backend, blocks=blocks)
    from .auto_mode import resolve_step_dispatch

    opt.set_step_dispatch(resolve_step_dispatch(model, config, step_dispatch))
    if example_inputs is not None:
        if not isinstance(example_inputs, dict):
            raise TypeError("example_inputs must be a dict of the model's keyword arguments")
        opt.capture(**example_inputs)
    return opt


def _check(opt: Any) -> FastCacheModule:
    if isinstance(opt, FastCacheModule):
        return opt
    inner = getattr(opt, "transformer", None)  # a diffusers pipeline
    if isinstance(inner, FastCacheModule):
        return inner
    raise TypeError(f"expected a model returned by fastcache.optimize() (or a pipeline with FastCache enabled), "
                    f"got {type(opt).__name__}")


def reset(opt: Any) -> None:
    """Forget cached states and statistics (a new generation also resets state automatically)."""
    _check(opt).reset()


def configure(opt: Any, **changes: Any) -> None:
    """Change config fields; thresholds and other run-time fields apply without recompiling."""
    _check(opt).configure(**changes)


def set_schedule(opt: Any, table: torch.Tensor) -> None:
    """Install a steps × blocks boolean skip table for ``policy="schedule"``."""
    from .policies.schedule import MAX_STEPS

    opt = _check(opt)
    if opt.fastcache_config.policy != "schedule":
        raise ValueError(f"set_schedule needs policy='schedule', this model uses policy={opt.fastcache_config.policy!r}; "
                         f"optimize(model, policy='schedule') or fastcache.configure(model, policy='schedule')")
    table = torch.as_tensor(table, dtype=torch.bool)
    names = [name for name, _, _ in _blocks(opt)]
    if table.ndim != 2 or table.shape[1] != len(names) or table.shape[0] > MAX_STEPS:
        raise ValueError(f"schedule table has shape {tuple(table.shape)}; expected (steps<= {MAX_STEPS}, "
                         f"{len(names)} blocks)")
    for j, name in enumerate(names):
        col = torch.zeros(MAX_STEPS, dtype=torch.bool, device=opt.device)
        col[: table.shape[0]] = table[:, j].to(opt.device)
        cur = opt.store.tensors.get(f"{name}.schedule")
        if cur is None:
            opt.store.tensors[f"{name}.schedule"] = col
        else:
            cur.copy_(col)
    _recapture_split_spans(opt, table)


def _recapture_split_spans(opt: FastCacheModule, table: torch.Tensor) -> None:
    """Guarded spans (``passes/group_spans.py``) of a schedule follow the table installed at
    capture; a new table whose columns differ inside a captured span drops the graphs, so the
    next call re-captures with spans that fit it."""
    for e in opt.entries():
        for g in e.guards:
            first = g.index
            cols = table[:, first:first + len(g.blocks)]
            if len(g.blocks) > 1 and not bool((cols == cols[:, :1]).all()):
                logger.info("fx-fastcache: the new schedule splits the guarded span %s; graphs will be re-captured",
                            g.block_name)
                opt.drop_graphs()
                return


def _blocks(opt: FastCacheModule):
    from .families import block_modules

    return block_modules(opt.model, opt.spec)


def get_cache_statistics(opt: Any) -> dict[str, Any]:
    """Counters read from device (this is the only place they are synchronised)."""
    opt = _check(opt)
    names = [name for name, _, _ in _blocks(opt)]
    skipped = {n: 0.0 for n in names}
    evals = {n: 0.0 for n in names}
    steps = 0.0
    for e in opt.entries():
        steps += float(e.clock.calls)
        for g in e.guards:
            for name in g.blocks:  # a guarded span: each of its blocks counts
                skipped[name] += float(g.skipped)
                evals[name] += float(g.evaluations)
    from .runtime.routing import spatial_counts

    static_tok, all_tok = spatial_counts([g for e in opt.entries() for g in e.guards])
    total_eval = sum(evals.values())
    total_skip = sum(skipped.values())
    per_block = [{"name": n, "evaluations": int(evals[n]), "approximated": int(skipped[n]),
                  "ratio": skipped[n] / evals[n] if evals[n] else 0.0} for n in names]
    return {
        "block_approx_ratio": total_skip / total_eval if total_eval else 0.0,
        "spatial_approx_ratio": static_tok / all_tok if all_tok else 0.0,
        "block_evaluations": int(total_eval),
        "blocks_approximated": int(total_skip),
        "calls": int(steps),
        "per_block": per_block,
        "calibrated": opt.store.calibrated,
        "policy": opt.fastcache_config.policy,
        "fallback": opt.fastcache_config.fallback,
        "graphs": len(opt.entries()),
    }
