"""FastCache for diffusers pipelines: ``enable_fastcache(pipe, **config)`` / ``disable_fastcache(pipe)``.

Why the pieces below exist:

* **Reset per pipeline call.**  Python looks ``pipe(...)`` up on the *type*, so an instance
  attribute ``__call__`` would be ignored.  ``enable_fastcache`` swaps the pipeline's class for
  a one-off subclass whose ``__call__`` resets the cache state and then runs the original
  ``__call__``; ``disable_fastcache`` swaps the class back.  Statistics therefore describe the
  most recent pipeline call.
* **Two transformer calls per step.**  Flux with ``true_cfg_scale > 1`` and a negative prompt
  (and Wan's CFG) calls the transformer twice per step with the *same* timestep, once inside
  ``transformer.cache_context("cond")`` and once inside ``cache_context("uncond")``.  One
  FastCache state would count each call as a step and mix the conditional and unconditional
  caches.  :class:`~fx_fastcache.module.FastCacheModule` keeps *one* captured graph per input
  signature (one export, one compile) and gives each named cache context its own run-time state
  (clock, cached residuals, decider state), swapped into the graph's buffers in place when the
  context changes (:mod:`fx_fastcache.context_state`).  Calls outside any context use the context of
  the first call.  Pipelines that do not name them (Flux img2img, inpaint, Kontext and ControlNet,
  Wan video-to-video, Chroma, HunyuanVideo image-to-video, CogView4 Control) pass one step's latents
  to both calls: inside such a pipeline's call, the calls of a step take ``"cond"``, ``"uncond"`` in
  turn by that identity (:meth:`~fx_fastcache.module.FastCacheModule.set_branch_turns`).
* **Batched CFG** (DiT, PixArt, SD3 double the batch) needs nothing special: the batch is one
  call per step, decisions are per step and cached tensors hold the whole batch.
* **Step dispatch** (``step_dispatch="reduce-overhead"``): on GPU every in-graph ``torch.cond``
  costs a host sync and forbids CUDA graphs; with a schedule the host already knows each step's
  pattern, and a step-level policy's decision is read once per step, so each context gets a
  :class:`~fx_fastcache.step_dispatch.StepDispatch` (reset with every pipeline call) that
  replays graphs specialised per pattern (see docs/GPU.md for the numbers).
* **Two experts** (Wan 2.2 A14B: ``transformer`` for the high-noise steps, ``transformer_2`` below
  ``boundary_ratio``): each is optimized with the same config and keeps its own state, graphs and
  calibration; :data:`TRANSFORMERS` names them, :func:`experts` lists the installed ones.
* ``pipe.transformer.config`` stays the *diffusers* config (the FastCache config is
  ``pipe.transformer.fastcache_config``): :class:`FastCacheModule` forwards unknown attributes.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from .auto_mode import UNSET
from .config import FastCacheConfig
from .module import FastCacheModule
from .policies import POLICIES

logger = logging.getLogger(__name__)

__all__ = ["enable_fastcache", "disable_fastcache"]

#: The pipeline components FastCache optimizes, when present (``transformer_2``: Wan 2.2's second expert).
TRANSFORMERS = ("transformer", "transformer_2")


def experts(pipe: Any) -> list[FastCacheModule]:
    """The FastCache modules installed on ``pipe`` by :func:`enable_fastcache`, in :data:`TRANSFORMERS` order."""
    return [m for m in _components(pipe).values() if isinstance(m, FastCacheModule)]


def optimized_modules(opt: Any) -> list[FastCacheModule]:
    """The optimized modules behind ``opt``: itself, or a pipeline's (Wan 2.2 has two experts)."""
    if isinstance(opt, FastCacheModule):
        return [opt]
    mods = experts(opt)
    if mods:
        return mods
    raise TypeError(f"expected a model returned by fastcache.optimize() (or a pipeline with FastCache enabled), "
                    f"got {type(opt).__name__}")


def optimized_module(opt: Any, what: str) -> FastCacheModule:
    """The one optimized module behind ``opt`` for the function ``what``; a pipeline with two experts names the fix."""
    mods = optimized_modules(opt)
    if len(mods) > 1:
        raise ValueError(f"{what}: this {type(opt).__name__} has two transformers (transformer and "
                         f"transformer_2), each with its own FastCache state and calibration; call "
                         f"{what}(pipe.transformer, ...) and {what}(pipe.transformer_2, ...)")
    return mods[0]


def _components(pipe: Any) -> dict[str, nn.Module]:
    return {name: m for name in TRANSFORMERS if isinstance(m := getattr(pipe, name, None), nn.Module)}


def _default_steps(call: Any) -> Any:
    """The pipeline's default ``num_inference_steps`` (``None`` if it has none)."""
    try:
        p = inspect.signature(call).parameters.get("num_inference_steps")
    except (TypeError, ValueError):
        return None
    return None if p is None else p.default


def _steps_run(kwargs: dict[str, Any], default_steps: Any) -> Any:
    """The steps a pipeline call will run: custom ``sigmas`` / ``timesteps`` set them, else
    ``num_inference_steps``, of which an image-to-image or video-to-video ``strength`` < 1 runs the last
    ``n − int(n − n·strength)`` (diffusers' ``get_timesteps``, after custom sigmas too: a 6-step call at
    strength 0.5 runs 3)."""
    given = next((kwargs[k] for k in ("sigmas", "timesteps") if kwargs.get(k) is not None), None)
    steps = len(given) if given is not None else kwargs.get("num_inference_steps", default_steps)
    strength = kwargs.get("strength")
    if isinstance(steps, int) and isinstance(strength, (int, float)) and 0 <= strength < 1:
        steps -= int(max(steps - steps * strength, 0))
    return steps


def _uses_cache_context(call: Any) -> bool:
    """Whether a pipeline's ``__call__`` names its transformer calls' cache contexts (unknown: yes)."""
    try:
        return "cache_context" in inspect.getsource(call)
    except (OSError, TypeError):
        return True


def _wrapped_call(original: Any):
    default_steps = _default_steps(original)
    warned: set[tuple[int, str]] = set()  # (module, message): warn once each
    # diffusers' FluxPipeline and WanPipeline name their CFG calls' contexts; Flux img2img, inpaint, Kontext
    # and ControlNet, Wan video-to-video, Chroma, HunyuanVideo image-to-video do not, so one state served
    # both branches (0 % replaced): the calls of a step take them in turn (FastCacheModule._next_turn)
    in_turn = not _uses_cache_context(original)

    @functools.wraps(original)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        installed = _components(self)
        replaced = [name for name, m in installed.items() if not isinstance(m, FastCacheModule)]
        if replaced or "transformer" not in installed:
            name = replaced[0] if replaced else "transformer"
            raise RuntimeError(f"pipe.{name} is no longer the FastCache module installed by enable_fastcache; "
                               f"call fastcache.disable_fastcache(pipe) before replacing it")
        mods = list(installed.values())
        check_sampler(self, mods[0].fastcache_config)  # `pipe.scheduler = ...` may have swapped it since enabling
        for tr in mods:
            tr.reset()
        # with two experts each runs a part of the steps, set by boundary_ratio, so the check is left out
        steps = _steps_run(kwargs, default_steps)
        tr = mods[0]
        policy = POLICIES[tr.fastcache_config.policy]
        check = len(mods) == 1 and not tr.force_compute  # calibrate refits the plan
        if check and isinstance(steps, int):
            why = policy.steps_mismatch(tr.store, steps)
            if why is not None and (id(tr), why) not in warned:
                warned.add((id(tr), why))
                logger.warning("fx-fastcache: %s", why)
        for m in mods:
            m._pipeline_calls += 1
            m.set_branch_turns(in_turn)
        recording = check and tr._seen_timesteps is None  # the schedule this call runs, read once after it
        if recording:
            tr._seen_timesteps = []
        seen: list[torch.Tensor] = []
        try:
            out = original(self, *args, **kwargs)
        finally:
            for m in mods:
                m._pipeline_calls -= 1
                m.set_branch_turns(False)
            if recording:
                seen, tr._seen_timesteps = tr._seen_timesteps or [], None
        if seen and (id(tr), "schedule") not in warned:
            why = policy.schedule_mismatch(tr.store, tr.schedule_of(seen))
            if why is not None:
                warned.add((id(tr), "schedule"))  # once: each other schedule would say it again
                logger.warning("fx-fastcache: %s", why)
        return out

    # the pipeline's own call without its torch.no_grad(): fit_output_rule's generate() runs
    # pipe.__call__.__wrapped__(pipe, ...) with gradients (it needs no reset: the fit starts each generation)
    __call__.__wrapped__ = getattr(original, "__wrapped__", original)
    return __call__


@contextlib.contextmanager
def _as_diffusers_sees_it(pipe: Any) -> Iterator[None]:
    """Inside: the pipeline as diffusers knows it, its original class and the wrapped models as components.

    Why: diffusers' loader methods act on components that are ``ModelMixin``s only (``pipe.set_adapters``,
    ``fuse_lora``, ``unload_lora_weights``, ... did nothing to the optimized transformer, and
    ``set_adapters`` raised "not in the list of present adapters"), and ``save_pretrained`` wrote no
    transformer and a ``model_index.json`` naming the one-off class, which no loader could read.  The
    changes they make to the wrapped model are seen at the next call (:mod:`fx_fastcache.model_watch`)."""
    enabled_cls = type(pipe)
    optimized = {name: m for name, m in _components(pipe).items() if isinstance(m, FastCacheModule)}
    pipe.__class__ = enabled_cls._fastcache_original_class
    for name, m in optimized.items():
        pipe.__dict__[name] = m.model  # (not setattr: diffusers' __setattr__ would re-register the component)
    try:
        yield
    finally:
        for name, m in optimized.items():
            if pipe.__dict__.get(name) is m.model:
                pipe.__dict__[name] = m
        pipe.__class__ = enabled_cls


def _register_as_diffusers(pipe: Any, name: str, model: nn.Module) -> None:
    """diffusers' ``__setattr__`` (and a ``from_pipe`` pipeline's ``__init__``) registered the FastCacheModule
    as component ``name``'s class: register the wrapped model's, which ``save_pretrained`` writes."""
    config = getattr(pipe, "config", None)
    if not isinstance(config, dict) or not isinstance(config.get(name), (tuple, list)) or \
            not hasattr(pipe, "register_to_config"):
        return
    pipe.register_to_config(**{name: (type(model).__module__.split(".")[0], type(model).__name__)})


def _seen_as_diffusers(method: Any) -> Any:
    @functools.wraps(method)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        with _as_diffusers_sees_it(self):
            return method(self, *args, **kwargs)
    return run


def _loader_methods(cls: type) -> dict[str, Any]:
    """The pipeline's methods that diffusers' loader mixins define (LoRA, IP-Adapter, textual inversion, ...),
    and ``save_pretrained``: each runs on the pipeline as diffusers sees it (:func:`_as_diffusers_sees_it`)."""
    out = {}
    for name in dir(cls):
        owner = next((k for k in cls.__mro__ if name in k.__dict__), None)
        fn = owner.__dict__[name] if owner is not None else None
        if inspect.isfunction(fn) and not name.startswith("__") and (
                name == "save_pretrained" or owner.__module__.startswith("diffusers.loaders")):
            out[name] = _seen_as_diffusers(fn)
    return out


def _fastcache_class(cls: type) -> type:
    """The one-off subclass of pipeline class ``cls`` whose ``__call__`` resets the cache state and whose
    loader methods and ``save_pretrained`` see the wrapped transformers (:func:`_loader_methods`).  It keeps
    ``cls``'s name: diffusers finds related pipelines by class name (``AutoPipelineForImage2Image.from_pipe``
    raised "can't find a pipeline linked to FastCacheFluxPipeline")."""
    return type(cls.__name__, (cls,),
                {**_loader_methods(cls), "__call__": _wrapped_call(cls.__call__), "_fastcache_original_class": cls,
                 "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__reduce_ex__": _reduce_enabled})


def _reduce_enabled(pipe: Any, protocol: int) -> tuple:
    """Pickle an enabled pipeline: pickle finds a class by module and name, which the one-off
    subclass lacks, so the pipeline is saved with its original class and the subclass is rebuilt
    when loading (the transformer, FastCache config included, pickles as ``pipe.transformer``)."""
    state = pipe.__getstate__() if hasattr(pipe, "__getstate__") else pipe.__dict__  # Python 3.10: no default
    return _unpickle_enabled, (type(pipe)._fastcache_original_class,), state


def _unpickle_enabled(cls: type) -> Any:
    pipe = cls.__new__(cls)
    pipe.__class__ = _fastcache_class(cls)
    return pipe


#: Schedulers whose step is ``x += (σ_next − σ) · output`` with the transformer's timestep ∝ σ.
FLOW_EULER_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def check_sampler(pipe: Any, config: FastCacheConfig) -> None:
    """``drift_correction="flow_euler"`` is exact only for the flow-matching Euler step, and
    ``noise_forecast="flow_euler"`` reads the model output as a flow-matching velocity: refuse others."""
    sched = getattr(pipe, "scheduler", None)
    name = type(sched).__name__
    pipe_name = getattr(type(pipe), "_fastcache_original_class", type(pipe)).__name__  # not the one-off subclass
    if config.noise_forecast != "none" and not (
            name.startswith("FlowMatch") or
            getattr(getattr(sched, "config", None), "prediction_type", None) == "flow_prediction"):
        raise ValueError(f"noise_forecast={config.noise_forecast!r} reads the transformer's output as a flow-matching "
                         f"velocity; this {pipe_name} uses {name}, which is not a flow-matching scheduler (a "
                         f"FlowMatch* scheduler or prediction_type='flow_prediction'); use noise_forecast='none'")
    if config.drift_correction != "flow_euler":
        return
    if name not in FLOW_EULER_SCHEDULERS:
        raise ValueError(f"drift_correction='flow_euler' needs a flow-matching Euler scheduler "
                         f"({', '.join(FLOW_EULER_SCHEDULERS)}); this {pipe_name} uses {name}, whose "
                         f"step the correction would get wrong; use drift_correction='none' or that scheduler")
    if getattr(getattr(sched, "config", None), "stochastic_sampling", False):
        raise ValueError("drift_correction='flow_euler' assumes the deterministic Euler step; this scheduler has "
                         "stochastic_sampling=True; use drift_correction='none'")


def enable_fastcache(pipe: Any, backend: str = "inductor", config: FastCacheConfig | None = None,
                     schedule: torch.Tensor | None = None, execution: str = "auto",
                     dispatch_compile: str | None = None, step_dispatch: Any = UNSET,
                     **overrides: Any) -> FastCacheModule:
    """Optimize ``pipe.transformer`` (and Wan 2.2's ``pipe.transformer_2``) in place; returns the installed
    ``pipe.transformer`` module.

    Args:
        pipe: a diffusers pipeline with a ``transformer`` (DiT, PixArt-α/Σ, SD3, Flux, ...).
        backend: ``"inductor"`` or ``"eager"`` (see :func:`fx_fastcache.optimize`).
        config: a :class:`FastCacheConfig`; keyword ``overrides`` replace its fields.
        schedule: a ``steps × blocks`` bool table (True = approximate); implies ``policy="schedule"``.
        execution, dispatch_compile: as in :func:`fx_fastcache.optimize` (``"auto"``: step dispatch
            with CUDA graphs on CUDA for step-level policies and schedules, else in-graph guards).
        step_dispatch: the former spelling of both (still accepted): learn each step's skip pattern once and replay a graph specialised for
            it (:mod:`fx_fastcache.step_dispatch`): with a schedule on the host (no sync), with a
            step-level policy (``step_forecast``, ``teacache``, ``first_block_cache``) by reading
            the in-graph decision once per step.  ``"reduce-overhead"`` (CUDA graphs; the fast
            choice on GPU), ``"default"``, ``"max-autotune"`` or ``"eager"``.  ``None`` keeps the
            in-graph ``torch.cond`` guards (the fast choice on CPU, and the only one for ``chi2``).
            ``"auto"`` (default): ``"reduce-overhead"`` on CUDA for step-level policies and
            schedules, else ``None`` (:mod:`fx_fastcache.auto_mode`; the choice is logged).

    Afterwards ``pipe(...)`` resets the cache state at the start of every call,
    ``fastcache.get_cache_statistics(pipe)`` reports the last call, and
    ``fastcache.configure(pipe, ...)`` / ``set_schedule(pipe, ...)`` / ``calibrate(pipe)``
    work as on an optimized model.
    """
    found = _components(pipe)
    if "transformer" not in found:
        raise TypeError(f"{type(pipe).__name__} has no `transformer` component; enable_fastcache supports "
                        f"transformer-based pipelines (DiT, PixArt, SD3, Flux, the video DiTs); for a bare model "
                        f"use fastcache.optimize")
    if getattr(type(pipe), "_fastcache_original_class", None) is not None:
        raise ValueError(f"FastCache is already enabled on this {type(pipe).__name__}; "
                         f"call fastcache.disable_fastcache(pipe) first to change the configuration")
    # a transformer optimized already: shared with an enabled pipeline (FluxImg2ImgPipeline.from_pipe(pipe))
    # or by fastcache.optimize; it is adopted as it is, with its config, state and calibration
    adopted = {name: m for name, m in found.items() if isinstance(m, FastCacheModule)}
    if adopted and (config is not None or overrides or schedule is not None):
        name = next(iter(adopted))
        raise ValueError(f"pipe.{name} is optimized already (shared with another enabled pipeline through from_pipe, "
                         f"or by fastcache.optimize): enable_fastcache(pipe) with no config adopts it as it is; "
                         f"change its config with fastcache.configure(pipe, ...)")
    if adopted:
        first = next(iter(adopted.values()))
        config, backend = first.fastcache_config, first.backend
    if schedule is not None and "policy" not in overrides:
        overrides["policy"] = "schedule"
    config = FastCacheConfig.resolve(config, **overrides)
    check_sampler(pipe, config)
    if schedule is not None and len(found) > 1:
        raise ValueError(f"schedule=: this {type(pipe).__name__} has two transformers ({', '.join(found)}), which run "
                         f"different steps; enable without it and call fastcache.set_schedule(pipe.transformer, "
                         f"table) and fastcache.set_schedule(pipe.transformer_2, table) with one table each")
    installed = {name: adopted.get(name) or FastCacheModule(m, config, backend=backend) for name, m in found.items()}
    for name, opt in installed.items():
        opt._installed_in_pipeline = True
        if name in adopted:
            continue
        if schedule is not None:
            opt.install_schedule(schedule)
        opt.set_execution(execution, dispatch_compile, step_dispatch)
    cls = type(pipe)
    for name, opt in installed.items():
        setattr(pipe, name, opt)
        _register_as_diffusers(pipe, name, opt.model)
    pipe.__class__ = _fastcache_class(cls)
    logger.info("fx-fastcache: enabled on %s (%s; policy=%s, fallback=%s, backend=%s)", cls.__name__,
                " and ".join(installed), config.policy, config.fallback, backend)
    return installed["transformer"]


def disable_fastcache(pipe: Any) -> nn.Module:
    """Restore the original transformer(s) and pipeline class; returns the original ``transformer``."""
    original_cls = getattr(type(pipe), "_fastcache_original_class", None)
    tr = getattr(pipe, "transformer", None)
    if original_cls is None or not isinstance(tr, FastCacheModule):
        raise ValueError(f"FastCache is not enabled on this {type(pipe).__name__} (enable it with "
                         f"fastcache.enable_fastcache(pipe))")
    pipe.__class__ = original_cls
    for name, m in _components(pipe).items():
        if isinstance(m, FastCacheModule):
            setattr(pipe, name, m.model)
    return tr.model
