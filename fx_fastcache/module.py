"""``FastCacheModule``: the drop-in wrapper that ``optimize`` returns.

It captures lazily at the first call with the real inputs (like ``torch.compile``), one graph
per input signature (shapes, dtypes, devices and non-tensor values), runs the pass pipeline
on it and, for ``backend="inductor"``, compiles it with ``fullgraph=True``.  Everything that
depends on tensor values happens inside those graphs; the Python side only picks the graph.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from fx_fastcache.passes import PassContext, PassResult, run_pipeline

from .config import RUNTIME_FIELDS, FastCacheConfig
from .fallbacks import FALLBACKS, CalibrationStore
from .families import FamilySpec, block_modules, resolve_family
from .markers import marked
from .policies import POLICIES
from .runtime.distributed import as_process_group, parallel_signature, process_group_of

logger = logging.getLogger(__name__)

BACKENDS = ("inductor", "eager")


@dataclass
class CapturedGraph:
    key: tuple
    gm: torch.fx.GraphModule
    run: Any
    ctx: PassContext
    passes: list[PassResult]

    @property
    def clock(self):
        return getattr(self.gm, "fastcache_clock")

    @property
    def guards(self) -> list:
        return [getattr(self.gm, n) for n in self.ctx.guards]

    @property
    def step_decider(self):
        return getattr(self.gm, self.ctx.step_decider) if self.ctx.step_decider else None

    def deciders(self) -> list[nn.Module]:
        out = [g.decider for g in self.guards if g.decider is not None]
        if self.step_decider is not None:
            out.append(self.step_decider)
        return out


def _describe(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), str(v.dtype), str(v.device))
    return ("V", repr(v))


class FastCacheModule(nn.Module):
    """The optimized model: same forward signature and outputs as the original."""

    def __init__(self, model: nn.Module, config: FastCacheConfig, backend: str = "inductor",
                 blocks: str | list[str] | None = None, process_group: Any = None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; choose one of {BACKENDS}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"optimize() expects a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, FastCacheModule):
            raise ValueError("this model is already optimized by fx-fastcache; pass the original model")
        self.model = model
        self.spec: FamilySpec = resolve_family(model, blocks)
        self.fastcache_config = config
        self.backend = backend
        self.store = CalibrationStore()
        self.graphs = nn.ModuleDict()
        self._entries: dict[tuple, CapturedGraph] = {}
        self._signature = inspect.signature(model.forward)
        self._last_key: tuple | None = None
        self._recorder: Any = None
        self._force_compute = False
        self._warned_uncalibrated = False
        self.record_passes = False
        # step dispatch (fx_fastcache.step_dispatch): compile mode, None = in-graph guards; one
        # StepDispatch per state (pipelines: per cache context), a plain dict (not submodules)
        self._dispatch_mode: str | None = None
        self._dispatchers: dict[str, Any] = {}
        if not any(True for _ in model.parameters()):
            raise ValueError(f"{type(model).__name__} has no parameters; nothing to optimize")
        # context parallelism (docs/MULTI_DEVICE.md): the group the deciders sum over, given by the
        # user or read from the model's diffusers parallel config at every capture
        self._process_group = as_process_group(process_group)
        self._parallel_sig: int | None = None  # parallel_signature(model) when the graphs were captured
        _check_parallel(config, self.process_group())

    # -- attribute passthrough so pipelines can read .config, .dtype, ... -------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.drop_graphs()
        for k, v in list(self.store.tensors.items()):
            self.store.tensors[k] = fn(v)
        return self

    def drop_graphs(self) -> None:
        """Forget every captured graph (the next call re-captures)."""
        self._entries.clear()
        self.graphs = nn.ModuleDict()
        self._last_key = None
        self.__dict__.get("_dispatchers", {}).clear()

    # -- step dispatch --------------------------------------------------------------------
    def set_step_dispatch(self, compile_mode: str | None) -> None:
        """Run calls through :class:`~fx_fastcache.step_dispatch.StepDispatch` (``None``: in-graph guards).

        ``compile_mode`` is ``"reduce-overhead"`` (CUDA graphs; the fast choice on GPU),
        ``"default"``, ``"max-autotune"`` or ``"eager"``.  Schedules are dispatched from the host;
        step-level policies read their decision once per step; per-block policies raise.
        """
        from .step_dispatch import COMPILE_MODES, dispatch_decide_mode

        if compile_mode is not None:
            dispatch_decide_mode(self.fastcache_config)  # per-block policies cannot dispatch per step
            if compile_mode not in COMPILE_MODES:
                raise ValueError(f"step_dispatch={compile_mode!r} is not supported; choose one of {COMPILE_MODES}")
        self._dispatch_mode = compile_mode
        self._dispatchers.clear()

    def _dispatcher(self, module: FastCacheModule, key: str = "") -> Any:
        """The StepDispatch running ``module`` (``self`` or a pipeline context's twin), built once."""
        from .step_dispatch import StepDispatch

        d = self._dispatchers.get(key)
        if d is None:  # a schedule table is read from the store (fastcache.set_schedule)
            d = StepDispatch(module, compile_mode=self._dispatch_mode)
            self._dispatchers[key] = d
        return d

    # -- calls ----------------------------------------------------------------------------
    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self.model).__name__}.forward: {e}") from None
        kw: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{type(self.model).__name__}.forward takes *{name}; fx-fastcache needs named inputs")
            elif kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(value)
            else:
                kw[name] = value
        ts = self.spec.timestep_arg
        if ts and ts in kw and isinstance(kw[ts], (int, float)) and not isinstance(kw[ts], bool):
            stream = kw.get(self.spec.stream_arg)
            device = stream.device if isinstance(stream, torch.Tensor) else self.device
            kw[ts] = torch.tensor([float(kw[ts])], device=device)
        return kw

    def _check_inputs(self, kw: dict[str, Any]) -> None:
        x = kw.get(self.spec.stream_arg)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != self.dtype:
            raise TypeError(f"input {self.spec.stream_arg!r} has dtype {x.dtype} but the model's parameters are "
                            f"{self.dtype}; cast it with .to({self.dtype}) or the model with .to({x.dtype})")
        if isinstance(x, torch.Tensor) and x.device != self.device:
            raise ValueError(f"input {self.spec.stream_arg!r} is on {x.device} but the model is on {self.device}; "
                             f"move one of them")

    def _key(self, kw: dict[str, Any]) -> tuple:
        leaves, spec = pytree.tree_flatten(kw)
        return (str(spec), tuple(_describe(v) for v in leaves))

    def _check_generation(self, key: tuple, kw: dict[str, Any]) -> None:
        """A signature change is only legal at the start of a new generation."""
        prev = self._entries.get(self._last_key) if self._last_key is not None else None
        if prev is None or key == self._last_key:
            return
        if _tensor_shapes(prev.key[1]) == _tensor_shapes(key[1]):
            return  # only non-tensor arguments or dtypes changed: not a shape change
        clock = prev.clock
        if float(clock.step) < 0:  # previous graph idle (reset or never ran)
            return
        ts = self.spec.timestep_arg
        t = kw.get(ts) if ts else None
        if isinstance(t, torch.Tensor):
            t_new = float(t.reshape(-1)[0])
            t_prev = float(clock.t_last)
            if t_new >= t_prev:
                return  # the timestep did not go down: not a continuation of that generation
        shape_prev = prev.key[1]
        raise ValueError(
            f"input shapes changed in the middle of a generation (step {int(clock.step)}): the previous call had "
            f"{_shapes(shape_prev)}, this call has {_shapes(key[1])}; batch size and token count must stay fixed "
            f"within a generation. Call fastcache.reset(model) before starting a new generation with other shapes."
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._dispatch_mode is not None:
            return self._dispatcher(self)(*args, **kwargs)
        kw = self._bind(args, kwargs)
        self._check_inputs(kw)
        self._check_parallel_setup()
        key = self._key(kw)
        self._check_generation(key, kw)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(key, kw)
        self._last_key = key
        with torch.no_grad():
            if self._recorder is not None:
                return entry.gm(**kw)
            return entry.run(**kw)

    # -- context parallelism ---------------------------------------------------------------
    def process_group(self) -> Any:
        """The group every decision is summed over: ``optimize(process_group=)``, else the group of
        the model's diffusers context parallelism, else ``None`` (one device)."""
        return self._process_group if self._process_group is not None else process_group_of(self.model)

    def _check_parallel_setup(self) -> None:
        """Parallelism enabled (or changed) after a capture: the graphs hold neither the split nor the
        collectives, so they are dropped and the next call re-captures (a host ``getattr``, no sync)."""
        if self._entries and parallel_signature(self.model) != self._parallel_sig:
            logger.warning("fx-fastcache: %s's parallel config changed since the graphs were captured "
                           "(enable_parallelism after the first call); re-capturing", type(self.model).__name__)
            self.drop_graphs()

    # -- capture --------------------------------------------------------------------------
    def capture(self, *args: Any, **kwargs: Any) -> CapturedGraph:
        """Capture (export + rewrite + compile) for these example inputs without running them."""
        kw = self._bind(args, kwargs)
        self._check_inputs(kw)
        self._check_parallel_setup()
        key = self._key(kw)
        return self._entries.get(key) or self._capture(key, kw)

    def _capture(self, key: tuple, kw: dict[str, Any]) -> CapturedGraph:
        cfg = self.fastcache_config
        group = self.process_group()
        _check_parallel(cfg, group)
        logger.info("fx-fastcache: capturing %s (%d blocks) for %s", type(self.model).__name__,
                    len(block_modules(self.model, self.spec)), _shapes(key[1]))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), marked(self.model, self.spec):
                ep = torch.export.export(self.model, (), kwargs=kw, strict=False)
        finally:
            self.model.train(was_training)
        gm = ep.module()
        ctx = PassContext(model=self.model, spec=self.spec, config=cfg, policy=POLICIES[cfg.policy](cfg),
                          store=self.store, backend=self.backend, process_group=group)
        results = run_pipeline(gm, ctx, record=self.record_passes)
        for name, sub in gm.named_children():  # the passes create clock/guard buffers on the CPU
            if name.startswith("fastcache_"):
                sub.to(self.device)
        if self.backend == "inductor":
            run = torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False)
        else:
            run = gm
        entry = CapturedGraph(key, gm, run, ctx, results)
        self._entries[key] = entry
        self._parallel_sig = parallel_signature(self.model)
        self.graphs[f"g{len(self.graphs)}"] = gm
        self._sync_entry(entry)
        if FALLBACKS[cfg.fallback].fitted and not self.store.calibrated and not self._warned_uncalibrated:
            logger.warning("fx-fastcache: fallback %r is uncalibrated (%s); run `with fastcache.calibrate(model): ...` "
                           "on a few generations to fit it and improve quality", cfg.fallback,
                           "plain residual reuse" if cfg.fallback == "residual_linear" else "identity map")
            self._warned_uncalibrated = True
        return entry

    def _sync_entry(self, entry: CapturedGraph) -> None:
        clock = entry.clock
        clock.force.fill_(1.0 if self._force_compute else 0.0)
        for d in entry.deciders():
            if hasattr(d, "refresh"):
                d.refresh(self.fastcache_config.significance_level)
        for g in entry.guards:
            g._recorder = self._recorder

    # -- runtime controls -----------------------------------------------------------------
    def entries(self) -> list[CapturedGraph]:
        return list(self._entries.values())

    def reset(self) -> None:
        for e in self._entries.values():
            e.clock.reset()
            for g in e.guards:
                g.reset()
            if e.step_decider is not None:
                e.step_decider.reset()
        self._last_key = None
        for d in self.__dict__.get("_dispatchers", {}).values():
            d.reset_host()  # a schedule's host step counter cannot see a new generation by itself

    def configure(self, **changes: Any) -> None:
        """Change config fields; run-time fields update buffers, others force a re-capture."""
        new = self.fastcache_config.replace(**changes)
        if self._dispatch_mode is not None and "policy" in changes:
            from .step_dispatch import dispatch_decide_mode

            dispatch_decide_mode(new)  # step dispatch is on: the new policy must decide per step
        structural = [k for k in changes if k not in RUNTIME_FIELDS]
        _check_parallel(new, self.process_group())  # routing/merging under context parallelism: raise now
        self.fastcache_config = new
        if structural:
            logger.info("fx-fastcache: %s changed; graphs will be re-captured", structural)
            self.drop_graphs()
            return
        for e in self._entries.values():
            c = e.clock
            c.threshold.fill_(new.cache_ratio_threshold)
            c.warmup.fill_(float(new.warmup_steps))
            c.enabled.fill_(1.0 if new.enable_block_approx else 0.0)
            c.max_skip.fill_(float(new.max_skip_steps))
            self._sync_entry(e)

    def set_force_compute(self, force: bool) -> None:
        self._force_compute = force
        for e in self._entries.values():
            e.clock.force.fill_(1.0 if force else 0.0)

    def set_recorder(self, recorder: Any) -> None:
        self._recorder = recorder
        for e in self._entries.values():
            for g in e.guards:
                g._recorder = recorder

    def refresh_deciders(self) -> None:
        for e in self._entries.values():
            self._sync_entry(e)


def _check_parallel(cfg: FastCacheConfig, group: Any) -> None:
    """Token routing and merging re-run a block on a per-rank subset of its tokens: not with context parallelism."""
    on = [k for k in ("enable_spatial_approx", "enable_token_merge") if getattr(cfg, k)]
    if group is None or not on or (on == ["enable_token_merge"] and cfg.merge_ratio >= 1.0):  # ratio 1: no merge
        return
    raise ValueError(
        f"{' and '.join(k + '=True' for k in on)}: not supported with context parallelism. Token routing/merging "
        f"re-runs each block on a subset of the tokens chosen per rank, but the block's attention exchanges tokens "
        f"between ranks, which needs every rank to hold an equal share of one full sequence. Set "
        f"{', '.join(k + '=False' for k in on)}, or run without context parallelism.")


def _tensor_shapes(described: tuple) -> list:
    return [d[1] for d in described if d[0] == "T"]


def _shapes(described: tuple) -> str:
    shapes = [d[1] for d in described if d[0] == "T"]
    return "tensors " + ", ".join(str(tuple(s)) for s in shapes)
