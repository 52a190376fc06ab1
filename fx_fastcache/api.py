"""The public functions: ``optimize``, ``calibrate``, ``reset``, ``configure``, statistics."""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .auto_mode import UNSET
from .calibration import (
    Recorder,
    model_fingerprint,
    read_calibration_file,
    write_calibration_file,
)
from .config import FastCacheConfig
from .fallbacks import FALLBACKS
from .module import FastCacheModule, calibration_conflict
from .pipelines import TRANSFORMERS, check_sampler, optimized_module, optimized_modules
from .policies import POLICIES, rule_fit
from .runtime.clock import repeat_message
from .runtime.routing import spatial_counts

logger = logging.getLogger(__name__)

__all__ = ["optimize", "calibrate", "save_calibration", "load_calibration", "get_cache_statistics", "reset",
           "configure", "set_schedule"]


def optimize(model: nn.Module, backend: str = "inductor", config: FastCacheConfig | None = None,
             blocks: Any = None, example_inputs: dict[str, Any] | None = None,
             execution: str = "auto", dispatch_compile: str | None = None, process_group: Any = None,
             step_dispatch: Any = UNSET, **overrides: Any) -> FastCacheModule:
    """Rewrite ``model`` so every transformer block is a guarded conditional with a fallback.

    Args:
        model: a diffusers DiT/PixArt/SD3/Flux transformer or any module with a ModuleList of blocks.
        backend: ``"inductor"`` (``torch.compile(fullgraph=True)`` of the rewritten graph) or
            ``"eager"`` (run the rewritten graph without compiling).
        config: a :class:`FastCacheConfig`; keyword ``overrides`` replace its fields.
        blocks: attribute path(s) of the block ModuleList(s) for models that are not a known family, or
            :class:`~fx_fastcache.BlockListSpec` objects that also name the streams of blocks returning
            several (``BlockListSpec("blocks", ("hidden_states", "encoder_hidden_states"),
            ("hidden_states", "encoder_hidden_states"))``).
        example_inputs: keyword inputs to capture eagerly now instead of at the first call.
        execution: who runs the guarded graph: ``"in_graph"`` (every guarded span is a ``torch.cond``
            in the compiled graph; the fast choice on CPU), ``"step_dispatch"`` (each step runs a copy
            specialised for its skip pattern, learned once per step; the fast choice on GPU) or
            ``"auto"`` (the default: step dispatch for a CUDA model with a step-level policy or a
            schedule, else in-graph; :mod:`fx_fastcache.auto_mode`, logged; decided again when the
            model moves, e.g. ``.to("cuda")`` after optimizing, or ``configure`` changes the policy).
        dispatch_compile: how step dispatch compiles its copies: ``"reduce-overhead"`` (CUDA graphs,
            the default), ``"default"``, ``"max-autotune"`` or ``"eager"``.
        step_dispatch: the former spelling of both (still accepted): run each step through a graph specialised for its skip pattern, learned
            once per step (:mod:`fx_fastcache.step_dispatch`; the fast path on GPU, where every
            in-graph ``cond`` costs a sync and disables CUDA graphs): ``"reduce-overhead"``
            (CUDA graphs), ``"default"``, ``"max-autotune"`` or ``"eager"``.  The copies are
            compiled by the dispatcher, so pair it with ``backend="eager"`` to skip the unused
            compile of the guarded graph.  Step-level policies and schedules only.  With a
            schedule, a generation stopped before its table ends needs ``fastcache.reset(opt)``
            before the next.  ``"auto"`` (default): ``"reduce-overhead"`` for a CUDA model with a
            step-level policy or a schedule, else ``None`` (in-graph guards); the rule is
            :mod:`fx_fastcache.auto_mode`, logged at INFO.
        process_group: the ``torch.distributed`` group (or 1-D ``DeviceMesh``) the model's tokens
            are split over, for sequence parallelism set up by hand.  Default: the group of
            diffusers' context parallelism (``model.enable_parallelism``), read from the model at
            capture, or none.  With a group every decision statistic is summed over its ranks
            inside the graph (one small all-reduce per decision), so all ranks take the same
            decisions (docs/MULTI_DEVICE.md).
    """
    config = FastCacheConfig.resolve(config, **overrides)
    # cache contexts on bare models too: a diffusers pipeline running CFG as two calls per step calls
    # transformer.cache_context(...), and so can a hand-written sampler loop
    opt = FastCacheModule(model, config, backend=backend, blocks=blocks, process_group=process_group)
    opt.set_execution(execution, dispatch_compile, step_dispatch)
    if example_inputs is not None:
        if not isinstance(example_inputs, dict):
            raise TypeError("example_inputs must be a dict of the model's keyword arguments")
        opt.capture(**example_inputs)
    return opt


def _outside_inference_mode(fn: Callable) -> Callable:
    """Run a function that writes the calibration store with inference mode off.

    Why: a store tensor created under ``torch.inference_mode()`` (calibrating, planning or loading a
    file in it) is an inference tensor, and the later in-place updates that every captured graph
    relies on (a new plan, a loaded file) fail outside inference mode.  Calls of the model may run in
    inference mode either way; only the store's writes must not.  Grad mode is kept as it was
    (``inference_mode(False)`` alone would turn it on for the generations ``search_plan`` runs).
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        grad = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            return fn(*args, **kwargs)
    return wrapper


def reset(opt: Any) -> None:
    """Forget cached states and statistics (a new generation also resets state automatically)."""
    for mod in optimized_modules(opt):
        mod.reset()


@_outside_inference_mode
def configure(opt: Any, **changes: Any) -> None:
    """Change config fields; thresholds and other run-time fields apply without recompiling."""
    mods = optimized_modules(opt)
    if mods[0] is not opt:  # a pipeline: its scheduler says whether the drift correction applies
        check_sampler(opt, mods[0].fastcache_config.replace(**changes))
    for mod in mods:  # every expert of a pipeline accepts the change before any takes it
        mod.check_configure(**changes)
    for mod in mods:
        mod.configure(**changes)


@_outside_inference_mode
def set_schedule(opt: Any, table: torch.Tensor) -> None:
    """Install a steps × blocks boolean skip table for ``policy="schedule"``."""
    optimized_module(opt, "set_schedule").install_schedule(table)


@_outside_inference_mode
def measure_sensitivity(opt: Any, generate: Callable[[], torch.Tensor],
                        metric: Callable[[torch.Tensor, torch.Tensor], Any] | None = None) -> list[float]:
    """``policy="planned"``: weigh each step by how much its forecast error grows by the end of the
    generation, and re-plan (optional, after ``calibrate``).

    ``generate()`` runs one whole generation on calibration inputs (fixed seeds) and returns its final
    output tensor (latents or images); it is called once in full and once per skippable step.
    ``metric(out, ref)`` (default: mean over samples of the L2 distance) scores a generation against
    the full one.  Trades some mean fidelity for the worst image (docs/BENCHMARKS.md).  Returns the
    per-step weights; they are saved with the calibration.
    """
    opt = optimized_module(opt, "measure_sensitivity")
    return POLICIES[opt.fastcache_config.policy].measure_sensitivity(opt, generate, metric)


@_outside_inference_mode
def protect_steps(opt: Any, generate: Callable[[], torch.Tensor], floor_db: float = 34.0,
                  data_range: float | None = None) -> list[int]:
    """``policy="planned"``: always compute every step whose skip alone takes some calibration sample
    below ``floor_db`` PSNR, and re-plan the other steps (optional, after ``calibrate``).

    ``generate()`` runs one whole generation on calibration inputs (fixed seeds; use more of them
    than for ``calibrate``, e.g. 32: the samples to catch are rare) and returns its final output
    tensor (latents or images, batch first); it is called once in full and once per skippable step.
    PSNR is per sample against the full run, with peak ``data_range`` (default: the full output's
    max − min).  Protects the worst image at a cost in mean fidelity at high fractions
    (docs/BENCHMARKS.md).  Returns the protected steps; they are saved with the calibration.
    """
    opt = optimized_module(opt, "protect_steps")
    return POLICIES[opt.fastcache_config.policy].protect_steps(opt, generate, floor_db, data_range)


@_outside_inference_mode
def search_plan(opt: Any, generate: Callable[[], torch.Tensor], fractions: Sequence[float] | None = None,
                data_range: float | None = None, max_runs: int = 150,
                objective: str = "mean") -> dict[float, list[int]]:
    """``policy="planned"``: choose each fraction's computed steps on whole generations (optional,
    after ``calibrate``, and after ``measure_sensitivity`` / ``protect_steps``, which re-plan).

    Starts from the calibrated plan and from evenly spaced and fixed-interval plans of the same
    budget, keeps the one whose ``generate()`` outputs score best against a full run, then moves one
    computed step at a time while that improves the score.  ``objective``: ``"mean"`` (the mean
    PSNR of the outputs) or ``"worst_quarter"`` (the mean PSNR of the worst quarter of them, for a
    plan that guards the worst images; give it more images, e.g. 32).  It sees what the planner's
    error model cannot: error growth, runs of forecasts and ``drift_correction``.  With
    ``drift_correction="flow_euler"`` it then fits, on the same generations, how far to damp the
    correction after long forecast runs (a few more generations per fraction; saved per fraction
    like the plan).  ``generate()`` runs one whole generation on calibration inputs (fixed seeds,
    e.g. 16 of them; not your evaluation seeds) and returns its final output, batch first; it is
    called once per plan tried, at most ``max_runs`` times per fraction.  ``fractions``: the
    ``target_fraction`` values to search (default: the configured one);
    ``configure(target_fraction=...)`` then installs each.  PSNR peak:
    ``data_range`` (default: the full output's max − min).  Returns ``{fraction: computed steps}``;
    the plans are saved with the calibration.
    """
    opt = optimized_module(opt, "search_plan")
    policy = POLICIES[opt.fastcache_config.policy]
    return policy.search_plan(opt, generate, fractions, data_range, max_runs, objective)


@_outside_inference_mode
def fit_output_rule(opt: Any, generate: Callable[[], torch.Tensor], fractions: Sequence[float] | None = None,
                    iters: int = 150, lr: float = 0.01, checkpoint: bool = True, data_range: float | None = None,
                    objective: str = "mean",
                    min_gain: float = rule_fit.MIN_GAIN_DB,
                    validate: Callable[[], torch.Tensor] | None = None) -> dict[float, dict[str, float | bool]]:
    """``output_rule="fitted"``: fit, for each fraction's plan, the linear rule that makes every step's output from
    the computed steps' outputs and latent, by gradient descent through the whole sampler (optional, after
    ``calibrate`` and ``search_plan``, which changes the plans a rule is fitted for).

    ``generate()`` runs one whole generation on calibration inputs (fixed seeds, e.g. 16 to 32 of them; not your
    evaluation seeds) **with gradients enabled**, calling the optimized model once per step, and returns its final
    output, batch first: a diffusers pipeline's ``__call__`` and ``fx_fastcache.trained.sample`` run under
    ``torch.no_grad()``, so call their ``__wrapped__`` (``pipe.__call__.__wrapped__(pipe, ...)``).  It is called once
    uncached (the target), ``iters`` times with the rule (Adam, learning rate ``lr``; during these calls the model
    runs eagerly at the computed steps, each call checkpointed unless ``checkpoint=False``), then twice per fraction
    through the graph: with the rule and with the library's rules alone.  The rule is kept where it scores more than
    ``min_gain`` dB better on ``objective`` (``"mean"`` or ``"worst_quarter"`` of the per-sample PSNRs, peak
    ``data_range``, default the full output's max − min), which the fit also minimises (as log squared errors).  By
    default that choice is made on the images the rule was fitted to, where a smaller gain did not hold on unseen
    images (docs/BENCHMARKS.md, "Thirty-second session"); ``validate``, a ``generate()`` on other calibration inputs
    (other seeds; no gradients needed), makes it on images the fit never saw instead.  Returns
    ``{fraction: {"library": score, "fitted": score, "kept": bool}}``; the rules are saved with the calibration.
    """
    mod = optimized_module(opt, "fit_output_rule")
    others = () if mod is opt else tuple(m for m in getattr(opt, "components", {}).values()
                                         if isinstance(m, nn.Module) and m is not mod)  # a pipeline's
    return rule_fit.fit_output_rule(mod, generate, fractions, iters=iters, lr=lr, checkpoint=checkpoint,
                                    data_range=data_range, objective=objective, min_gain=min_gain, validate=validate,
                                    others=others)


def get_cache_statistics(opt: Any) -> dict[str, Any]:
    """Counters read from device (this is the only place they are synchronised).  For a pipeline with
    two experts (Wan 2.2) the counts are summed and ``per_block`` lists the second one's blocks as
    ``transformer_2.<name>``."""
    mods = optimized_modules(opt)
    if len(mods) > 1:
        parts = [_statistics(m) for m in mods]
        out = dict(parts[0])
        for k in ("block_evaluations", "blocks_approximated", "calls", "uncached_calls", "graphs", "graphs_elsewhere"):
            out[k] = sum(p[k] for p in parts)
        out["block_approx_ratio"] = out["blocks_approximated"] / out["block_evaluations"] if out["block_evaluations"] else 0.0
        out["calibrated"] = all(p["calibrated"] for p in parts)
        static_tok, all_tok = spatial_counts([g for m in mods for e in m.entries() for g in e.guards])
        out["spatial_approx_ratio"] = static_tok / all_tok if all_tok else 0.0
        out["per_block"] = parts[0]["per_block"] + [dict(b, name=f"transformer_2.{b['name']}") for b in parts[1]["per_block"]]
        return out
    return _statistics(mods[0])


def _statistics(opt: FastCacheModule) -> dict[str, Any]:
    names = opt.block_names()
    skipped = {n: 0.0 for n in names}
    evals = {n: 0.0 for n in names}
    steps = 0.0
    for e in opt.entries():
        steps += float(e.clock.calls)
        for g in e.guards:
            for name in g.blocks:  # a guarded span: each of its blocks counts
                skipped[name] += float(g.skipped)
                evals[name] += float(g.evaluations)
    uncached = 0
    for skips, calls in opt.uncached_calls():  # calls that skip blocks ran the model itself: all computed
        uncached += calls
        for name in names:
            evals[name] += 0.0 if name in skips else calls
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
        "calls": int(steps) + uncached,  # every call of the model
        "uncached_calls": uncached,  # calls that skip blocks (SD3's skip-layer guidance) run the model itself
        "per_block": per_block,
        "calibrated": opt.store.calibrated,
        "policy": opt.fastcache_config.policy,
        "fallback": opt.fastcache_config.fallback,
        "graphs": len(opt.entries()),
        "graphs_elsewhere": opt.graphs_elsewhere(),  # kept for the model's other placements (devices, dtypes)
    }


@contextlib.contextmanager
def calibrate(opt: Any) -> Iterator[None]:
    """Full compute inside; records block I/O; fits the fallback's and the policy's parameters on exit.

    What is recorded and fitted belongs to the configured fallback and policy
    (``Fallback.calibrator`` / ``Policy.calibrator``, see :mod:`fx_fastcache.calibration`).
    ``opt`` is the optimized model or a pipeline with FastCache enabled (its transformer is calibrated;
    with two experts, both, each on the steps it runs).
    """
    mods = optimized_modules(opt)
    with contextlib.ExitStack() as stack:
        recorded = [stack.enter_context(_recording(mod)) for mod in mods]
        yield
    ran = [(mod, rec) for mod, (rec, _) in zip(mods, recorded) if rec.steps > 0]
    if not ran:
        raise RuntimeError("calibrate(): the model was not called inside the `with` block; run a few sampling loops")
    for name, mod, (rec, repeated) in zip(TRANSFORMERS, mods, recorded):
        if repeated:
            raise RuntimeError(repeat_message("calibrate() would fit both branches' calls as one sequence: nothing was "
                                              "fitted (with cache contexts, calibrate records the first context "
                                              "called inside it)"))
        if rec.steps == 0:  # a pipeline's second expert that no step reached (its boundary_ratio)
            logger.warning("fx-fastcache: calibrate(): pipe.%s ran no step inside the `with` block, so it keeps its "
                           "calibration (%s); check the pipeline's boundary_ratio", name,
                           "fitted before" if mod.store.calibrated else "none")
    for mod, rec in ran:
        _fit(mod, rec, mod.fastcache_config)


@contextlib.contextmanager
def _recording(opt: FastCacheModule) -> Iterator[list]:
    """Every block of ``opt`` computes and is recorded inside; yields ``[recorder, repeated]``, the
    second filled in on exit: whether a call repeated the previous one (two CFG branches in one context)."""
    cfg = opt.fastcache_config
    calibrators = [c for c in (FALLBACKS[cfg.fallback].calibrator(cfg), POLICIES[cfg.policy].calibrator(cfg))
                   if c is not None]
    rec = Recorder(calibrators, opt.entries, group=opt.process_group(), device=opt.device)
    out = [rec, False]
    opt.reset()
    opt.set_force_compute(True)
    opt.set_recorder(rec)
    try:
        yield out
    finally:
        opt.set_recorder(None)
        opt.set_force_compute(False)
        out[1] = any(float(e.clock.repeats) > 0 for e in opt.entries())  # read before reset zeroes them
        opt.reset()


@_outside_inference_mode
def _fit(opt: FastCacheModule, rec: Recorder, cfg: FastCacheConfig) -> None:
    fingerprint = model_fingerprint(opt.model)  # first: a model it cannot read leaves no half-fitted store
    summary = rec.fit(opt.store, opt.dtype, cfg)
    opt.store.meta.update(fitted_for(cfg.to_dict()), fingerprint=fingerprint)
    opt.refresh_deciders()
    logger.info("fx-fastcache: calibrated on %d steps (%d fits)", rec.steps, len(summary))


def fitted_for(config: dict[str, Any]) -> dict[str, Any]:
    """What a calibration was fitted for (kept in the store's meta; :func:`calibration_conflict` reads it)."""
    return {k: config[k] for k in ("fallback", "policy") if config.get(k) is not None}


def save_calibration(opt: Any, path: str | Path) -> None:
    """Save the fitted tensors with the model's fingerprint and the config (safetensors)."""
    opt = optimized_module(opt, "save_calibration")
    write_calibration_file(opt.store, path, opt.model, opt.fastcache_config)


@_outside_inference_mode
def load_calibration(opt: Any, path: str | Path) -> None:
    """Load a calibration file fitted on this model (same fingerprint); every error names the file.

    The file's tensors replace the model's; what ``search_plan`` fitted (plans marked searched, drift
    dampings) is dropped when the file holds none, so a file saved without a search loads as saved."""
    opt = optimized_module(opt, "load_calibration")
    saved_cfg, tensors = read_calibration_file(path, opt.model)
    cfg = opt.fastcache_config
    conflict = calibration_conflict(saved_cfg, cfg)
    if conflict is not None:
        raise ValueError(f"calibration file {str(path)!r} {conflict}: calibrate with fallback={cfg.fallback!r}, "
                         f"policy={cfg.policy!r} (this model's), or optimize the model with the file's "
                         f"fallback={saved_cfg.get('fallback')!r}, policy={saved_cfg.get('policy')!r}")
    policy = POLICIES[cfg.policy]
    resized = [k for k in policy.step_count_keys  # a file made for another step count replaces them all
               if k in tensors and k in opt.store.tensors and opt.store.tensors[k].shape != tensors[k].shape]
    stale = set(policy.step_count_keys) if resized else set()
    for key, val in tensors.items():  # check every shape before changing anything
        cur = opt.store.tensors.get(key)
        if cur is not None and key not in stale and cur.shape != val.shape:
            raise ValueError(f"calibration file {str(path)!r}: tensor {key!r} has shape {tuple(val.shape)}, this "
                             f"model needs {tuple(cur.shape)}; calibrate this model with this configuration")
    for key in stale:
        opt.store.tensors.pop(key, None)
    for key in policy.optional_keys:  # e.g. a file saved before search_plan ran
        if key not in tensors and opt.store.tensors.pop(key, None) is not None:
            logger.info("fx-fastcache: %s holds no %r; the model's is dropped", path, key)
    for key, val in tensors.items():
        cur = opt.store.tensors.get(key)
        if cur is None:  # in the file's dtype (the model's, for a fallback's weights: the fingerprint holds it)
            opt.store.tensors[key] = val.to(opt.device, opt.dtype if opt.follows_model_dtype(key) else val.dtype)
        else:
            cur.copy_(val.to(cur.device, cur.dtype))
    opt.store.table_version += 1  # a schedule's table may be among them
    policy.configure_store(opt.store, cfg, opt.device)  # e.g. a plan for this target_fraction
    opt.store.calibrated = True
    opt.store.meta.update(fitted_for(saved_cfg), fingerprint=model_fingerprint(opt.model))
    opt.refresh_deciders()
