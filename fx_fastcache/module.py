"""``FastCacheModule``: the drop-in wrapper that ``optimize`` returns and ``enable_fastcache`` installs.

It captures lazily at the first call with the real inputs (like ``torch.compile``), one graph
per input signature (shapes, dtypes, devices and non-tensor values), runs the pass pipeline
on it and, for ``backend="inductor"``, compiles it with ``fullgraph=True``.  Everything that
depends on tensor values happens inside those graphs; the Python side only picks the graph.

Cache contexts (diffusers' ``CacheMixin.cache_context``): a pipeline running classifier-free
guidance as two calls per step (Flux true-CFG, Wan) names them ``"cond"`` / ``"uncond"``.  Each
name gets its own run-time state (clock, cached residuals, decider state) on the *same* captured
graph: :mod:`fx_fastcache.context_state` swaps the state into the graph's buffers in place when
the context changes, so one export and one compile serve every context.
"""
from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import numbers
import operator
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from fx_fastcache.passes import PassContext, PassResult, run_pipeline
from fx_fastcache.passes.find_blocks import BlocksNotCalled

from . import graph_protocol as gp
from .auto_mode import AUTO, UNSET, resolve_execution
from .config import RUNTIME_FIELDS, FastCacheConfig
from .context_state import ContextStates, restart_state
from .fallbacks import FALLBACKS
from .families import FamilySpec, block_modules, capture_preparation, compute_dtype, resolve_family
from .layerwise_casting import cast_in_graph
from .markers import marked
from .model_watch import ModelWatch, active_attention_backend, attention_processor
from .policies import POLICIES
from .runtime.clock import repeat_message
from .runtime.distributed import as_process_group, parallel_signature, process_group_of
from .runtime.generation import noise_level, scalar_timestep, starts_generation_host
from .runtime.store import CalibrationStore
from .step_dispatch import COMPILE_MODES, StepDispatch, dispatch_decide_mode

logger = logging.getLogger(__name__)

BACKENDS = ("inductor", "eager")
#: torch.export and the pass pipeline touch process-wide state (dynamo, fake tensor modes, the
#: marker patches of the model): captures run one at a time, whatever module they belong to.
_CAPTURE_LOCK = threading.RLock()
#: Calls after which a graph checks once whether every call started a new generation.
GENERATION_CHECK_CALLS = 4
#: Captured graphs of one model at which a warning says that each input signature captures another.
GRAPHS_WARNING = 8
#: The context of calls made outside any ``cache_context`` when the first call was too.
DEFAULT_CONTEXT = "default"
#: The contexts that the calls of one step take in turn under :meth:`FastCacheModule.set_branch_turns`
#: (every diffusers pipeline calls cond first); a third call of a step takes ``"branch2"``, and so on.
BRANCH_TURNS = ("cond", "uncond")


def _branch_name(turn: int) -> str:
    return BRANCH_TURNS[turn] if turn < len(BRANCH_TURNS) else f"branch{turn}"


def _identity(v: Any) -> tuple | None:
    """A tensor argument's identity for the in-turn rule: the object (held weakly, so a freed tensor whose
    address is reused never matches) and its version counter (an in-place write makes it another input)."""
    if not isinstance(v, torch.Tensor):
        return None
    return weakref.ref(v), None if v.is_inference() else v._version  # inference tensors keep no version


def _same_identity(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and a[0]() is not None and a[0]() is b[0]() and a[1] == b[1]


def _same_step(now: tuple, before: tuple) -> bool:
    """Whether a call with stream/timestep identities ``now`` belongs to the step of the call ``before``:
    one of them is the same tensor, unchanged.  (An inference tensor keeps no version counter: latents
    updated in place under ``torch.inference_mode`` look like one long step, which
    :data:`MAX_TURNS` catches.)"""
    return any(_same_identity(a, b) for a, b in zip(now, before))


#: More calls than this in one step (by :func:`_same_step`) mean the identities cannot tell steps apart.
MAX_TURNS = 4


@dataclass
class CapturedGraph:
    key: tuple
    gm: torch.fx.GraphModule
    run: Any
    ctx: PassContext
    passes: list[PassResult]

    @property
    def clock(self):
        return getattr(self.gm, gp.CLOCK)

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


@dataclass
class KeptGraphs:
    """The graphs captured at one placement of the model (its set of (device, dtype)), kept while the model
    is elsewhere, with what belongs to them (:meth:`FastCacheModule._apply`)."""

    entries: dict[tuple, CapturedGraph]
    graphs: nn.ModuleDict
    watch: ModelWatch | None
    parallel_sig: int | None
    dispatch_mode: str | None
    dispatchers: dict[str, Any]


class PreparedCall(NamedTuple):
    """A call's keyword inputs (bound to the model's signature) and the captured graph that runs them."""

    kw: dict[str, Any]
    entry: CapturedGraph


def _describe(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), str(v.dtype), str(v.device))
    return ("V", repr(v))


class _Uncached(Exception):
    """Raised by :meth:`FastCacheModule.prepare_call` for a call whose inputs skip blocks; caught by ``forward``."""

    def __init__(self, key: tuple) -> None:
        super().__init__(key)
        self.key = key


class FastCacheModule(nn.Module):
    """The optimized model: same forward signature and outputs as the original."""

    def __init__(self, model: nn.Module, config: FastCacheConfig, backend: str = "inductor",
                 blocks: Any = None, process_group: Any = None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; choose one of {BACKENDS}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"optimize() expects a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, FastCacheModule):
            raise ValueError("this model is already optimized by fx-fastcache; pass the original model")
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # (it named its blocks as not found)
            raise TypeError(f"this {type(model._orig_mod).__name__} is wrapped by torch.compile; FastCache captures "
                            f"the model itself and compiles its graphs (backend='inductor'): pass model._orig_mod "
                            f"(a pipeline's: pipe.transformer = pipe.transformer._orig_mod, then enable_fastcache)")
        self.model = model
        self.spec: FamilySpec = resolve_family(model, blocks)
        self.fastcache_config = config
        self.backend = backend
        self.store = CalibrationStore()
        self.graphs = nn.ModuleDict()
        self._entries: dict[tuple, CapturedGraph] = {}
        self._signature = inspect.signature(model.forward)
        self._last_key: tuple | None = None
        #: per cache context: the graph key of its latest call (a shape change is a context's own), how many
        #: times its generation restarted in the middle, and how many generations a host step counter
        #: could not see began (restarts, and new generations with other shapes): step dispatch follows
        self._last_keys: dict[str | None, tuple] = {}
        self._restarts: dict[str | None, int] = {}
        self._host_resets: dict[str | None, int] = {}
        self._recorder: Any = None
        self._force_compute = False
        self._warned_uncalibrated = False
        self._grad_checked = self._warned_no_grad = False
        self._warned_repeat = self._warned_every_call = False  # _check_generations warns once each
        #: graphs captured at other placements (frozenset of (device, dtype)), kept across moves (_apply)
        self._kept: dict[frozenset, KeptGraphs] = {}
        self._watch: ModelWatch | None = None  # the module tree the graphs were captured from
        # input signatures whose calls skip blocks (-> the blocks they skip): they run the model itself, and
        # how many ran since the last reset (the statistics count their blocks as computed)
        self._uncached: dict[tuple, tuple[str, ...]] = {}
        self._uncached_calls: dict[tuple, int] = {}
        self._captured_all_blocks = False  # a capture ran every block (so one that skips some is a special call)
        self._warned_changed = False
        self._warned_shape_change = False  # _check_generation warns once, then logs at INFO
        self._call_lock = threading.RLock()  # one call at a time: the cache state is one generation's
        self._calls: dict[tuple, int] = {}  # host-side call count per graph (for the one-time generation check)
        self.record_passes = False
        # step dispatch (fx_fastcache.step_dispatch): compile mode, None = in-graph guards; one
        # StepDispatch per state (pipelines: per cache context), a plain dict (not submodules)
        self._dispatch_mode: str | None = None
        self._dispatchers: dict[str, Any] = {}
        # cache contexts: the one running (None: outside any), the one fixed by the first call, and
        # the state banks of the others (plain attributes, not submodules)
        self._active: str | None = None
        self._primary_context: str | None = None
        self._states = ContextStates()
        # inside the call of a pipeline whose transformer calls name no cache_context (pipelines.py): the
        # calls of one step (same input tensor) take "cond", "uncond", ... in turn; the previous call's
        # turn and its (stream, timestep) identities
        self._branch_turns = False
        self._turn = 0
        self._turn_inputs: tuple = (None, None)
        self._turns_given_up = False  # (_next_turn) the rest of the pipeline call runs the model uncached
        self._last_call_uncached = False
        self._pipeline_calls = 0  # > 0 while an enabled pipeline's __call__ runs (pipelines.py)
        #: the timestep tensors of a pipeline call's model calls, kept by reference (no read per step) while
        #: pipelines.py checks the call's schedule against the calibrated one; None: not recording
        self._seen_timesteps: list[torch.Tensor] | None = None
        self._installed_in_pipeline = False  # set by enable_fastcache
        self._warned_outside_pipeline = False
        # execution="auto": decided again when the device or the policy changes; None: a fixed choice,
        # else the dispatch_compile= given with it (None: the rule's)
        self._auto_execution: tuple[str | None] | None = None
        if not any(True for _ in model.parameters()):
            raise ValueError(f"{type(model).__name__} has no parameters; nothing to optimize")
        # context parallelism (docs/MULTI_DEVICE.md): the group the deciders sum over, given by the
        # user or read from the model's diffusers parallel config at every capture
        self._process_group = as_process_group(process_group)
        self._parallel_sig: int | None = None  # parallel_signature(model) when the graphs were captured
        _check_parallel(config, self.process_group())
        self._submodules = list(model.modules())  # scanned for diffusers hooks at every call (60 µs for Flux)
        _diffusers_hooks(model, self._submodules)  # refuses foreign hooks now
        self._checked = False  # forward ran _check_model_unchanged for this call
        #: fit_output_rule's stand-in for the graphs while it fits (fx_fastcache.policies.rule_fit), else None
        self._emulator: Any = None

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
        """The model's compute dtype (:func:`~fx_fastcache.families.compute_dtype`: diffusers' reading)."""
        return compute_dtype(self.model, self._submodules)  # (checked at every call: the kept list is cheaper)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _placement(self) -> set[tuple[torch.device, torch.dtype]]:
        return {(t.device, t.dtype) for t in (*self.model.parameters(), *self.model.buffers())}

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ``.half()`` ...: the captured graphs hold device and dtype, so they run only
        where they were captured.  They are kept per placement of the model and used again when it comes back.

        Why kept: model CPU offload moves the transformer to the GPU at every pipeline call and back after it;
        dropping the graphs made every call export (and compile) again.  A ``.to()`` to where the model already
        is changes nothing (accelerate's hooks call it at every forward).  What makes keeping safe: the graphs,
        step dispatch's split and specialised copies, and compiled code hold the tensors they share with the model
        by identity.  Parameters keep theirs in torch's move; the calibration store's tensors are moved in place
        here; the model's buffers become new tensors, which every kept graph module takes in place of the old
        (:func:`_follow_moved_buffers`).  A graph's own state moves to the CPU while the model is elsewhere (the
        GPU memory offloading frees stays free) and back when it returns, and starts a new generation.  Where
        that cannot hold (parameters replaced under ``torch.__future__``, a view or subclass tensor that cannot
        move in place) or the model spans devices, the graphs are dropped as before (re-captured at the next
        call)."""
        before = self._placement()
        # what the graphs share with the model (the modules they were captured from), before the move
        tracked = self._submodules if self._entries or self._kept else []
        params = _parameters_of(tracked)
        buffers = [(m, k, b) for m in tracked for k, b in m._buffers.items() if b is not None]
        graphs, self._modules["graphs"] = self._modules["graphs"], nn.ModuleDict()  # the move must not convert them
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules["graphs"] = graphs
        after = self._placement()
        if after == before:
            return self
        why_not = ("the model spans devices" if len({d for d, _ in before}) != 1 or len({d for d, _ in after}) != 1
                   else None if _same_objects(params, _parameters_of(tracked)) else
                   "a parameter changed identity in the move (torch.__future__'s overwrite or swap of parameters)")
        taken = self._take_graphs()
        # the model's buffers are new tensors now: the graphs kept (captured from the old ones) take them
        renewed = {id(old): (old, m._buffers[k]) for m, k, old in buffers
                   if m._buffers.get(k) is not None and m._buffers[k] is not old}
        for kept in (*([] if taken is None else [taken]), *self._kept.values()):
            _follow_moved_buffers(kept, renewed)
        for k, v in list(self.store.tensors.items()):
            moved = fn(v)
            if moved.dtype != v.dtype and not self.follows_model_dtype(k):
                moved = v.to(moved.device)  # a policy's float32 fit (scales, polynomials, plans) stays float32
            if moved is not v and not _move_in_place(v, moved):  # every graph registers these objects
                self.store.tensors[k] = moved
                why_not = why_not or "a calibration tensor changed identity in the move"
        if why_not is None and taken is not None and not self._move_graph_state(taken, torch.device("cpu")):
            why_not = "a state tensor of its graphs could not move in place"
        if why_not is not None:
            if taken is not None or self._kept:
                logger.info("fx-fastcache: the model moved; its graphs are dropped (re-captured at the next call): %s",
                            why_not)
            self._kept.clear()
        elif taken is not None:
            self._kept[frozenset(before)] = taken
        restored = self._kept.pop(frozenset(after), None)
        if restored is not None and not self._move_graph_state(restored, self.device):
            logger.info("fx-fastcache: the graphs kept for this placement are dropped (re-captured at the next "
                        "call): a state tensor of them could not move in place")
            restored = None
        if restored is not None:
            self._entries.update(restored.entries)
            self.graphs = restored.graphs
            self._watch, self._parallel_sig = restored.watch, restored.parallel_sig
        self._decide_auto_execution()  # e.g. pipe.to("cuda") after enable_fastcache
        if restored is not None:
            if restored.dispatch_mode == self._dispatch_mode:
                self._dispatchers = restored.dispatchers
            for e in self._entries.values():  # knobs configured while away, then a new generation
                self._install_runtime_fields(e)
            self._reset_entries()
            if POLICIES[self.fastcache_config.policy].host_decidable:
                self._recapture_split_spans()  # a schedule installed while away may split a kept span
        return self

    def _take_graphs(self) -> KeptGraphs | None:
        """The current graphs and what belongs to them, leaving none (:meth:`_forget_graphs`)."""
        kept = None
        if self._entries:
            kept = KeptGraphs(dict(self._entries), self.graphs, self._watch, self._parallel_sig, self._dispatch_mode,
                              dict(self._dispatchers))
        self._forget_graphs()
        return kept

    def _move_graph_state(self, kept: KeptGraphs, device: torch.device) -> bool:
        """Move the graphs' own buffers (state, knobs) to ``device`` in place, dtype unchanged; the model's
        buffers and the calibration store's tensors, which the graphs share, stay where the model put them.
        ``False`` if one could not move in place."""
        shared = {id(t) for t in self.store.tensors.values()} | {id(b) for b in self.model.buffers()}
        return all(_move_in_place(b, b.to(device)) for gm in kept.graphs.values() for m in gm.modules()
                   for b in m._buffers.values() if b is not None and id(b) not in shared and b.device != device)

    def follows_model_dtype(self, key: str) -> bool:
        """Whether the calibration tensor ``key`` is kept in the model's dtype: a fitted fallback's weights
        (``<block>.<stream>.residual_linear.A``), which multiply the activations.  Everything a policy
        fits (TeaCache's polynomial, scales, error tables, plans) is float32 whatever the model's dtype:
        rounded to bfloat16, TeaCache's coefficients (about 5e4) moved its polynomial by up to 17 %."""
        fallback = self.fastcache_config.fallback
        return FALLBACKS[fallback].fitted and key.rsplit(".", 2)[-2:-1] == [fallback]

    # -- copies, pickling and state dicts: the captured graphs are a cache, not state -----------
    def __getstate__(self) -> dict[str, Any]:
        """Pickle/deepcopy without the captured graphs (compiled code cannot be copied); the copy
        re-captures at its first call and starts with empty cache state."""
        state = dict(self.__dict__)
        state["_modules"] = {k: (nn.ModuleDict() if k == "graphs" else v) for k, v in self._modules.items()}
        state["_entries"] = {}
        state["_dispatchers"] = {}
        state["_calls"] = {}
        state["_last_key"] = None
        state["_last_keys"] = {}
        state["_recorder"] = None
        state["_process_group"] = None  # a process group belongs to its process; the copy reads the model's
        state.update(_states=ContextStates(), _active=None, _primary_context=None)  # no banked contexts either
        state["_watch"] = None
        state["_kept"] = {}
        state.update(_uncached={}, _uncached_calls={}, _captured_all_blocks=False, _turn_inputs=(None, None),
                     _turns_given_up=False)
        state.pop("_call_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._call_lock = threading.RLock()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped model's state dict (same keys as the original model's; no captured graphs or
        cache state), so it loads into the original model and ``save_pretrained`` works."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load into the wrapped model; the captured graphs are dropped (the next call re-captures).
        Calibration fitted on the old weights no longer matches them: calibrate again."""
        result = self.model.load_state_dict(state_dict, strict=strict, assign=assign)
        self.drop_graphs()
        if self.store.calibrated:
            logger.warning("fx-fastcache: new weights loaded; the calibration was fitted on the old ones, "
                           "calibrate again (fastcache.calibrate)")
        return result

    def drop_graphs(self) -> None:
        """Forget every captured graph, those kept for other placements too (the next call re-captures)."""
        self._forget_graphs()
        self.__dict__.get("_kept", {}).clear()

    def _forget_graphs(self) -> None:
        """Forget the graphs of the current placement and what belongs to them."""
        self._entries.clear()
        self.__dict__.get("_calls", {}).clear()
        self.graphs = nn.ModuleDict()
        self._last_key = None
        self._last_keys.clear()
        self.__dict__.get("_dispatchers", {}).clear()
        self._states.clear()
        self._watch = None

    # -- step dispatch --------------------------------------------------------------------
    def set_execution(self, execution: str = AUTO, dispatch_compile: str | None = None,
                      step_dispatch: Any = UNSET) -> None:
        """Install ``optimize``'s ``execution=`` / ``dispatch_compile=`` (or the former ``step_dispatch=``).

        Why ``"auto"`` is kept rather than resolved once: the fast mode depends on the device and the
        policy (:mod:`fx_fastcache.auto_mode`), and both change after ``optimize`` in ordinary use
        (``enable_fastcache(pipe)`` then ``pipe.to("cuda")``; ``configure(policy=...)``), which left a
        CUDA model on the in-graph guards, or a per-block policy refused.  So it is decided again then.
        """
        mode = resolve_execution(self.model, self.fastcache_config, execution, dispatch_compile, step_dispatch)
        self.set_step_dispatch(mode)
        auto = execution == AUTO if step_dispatch is UNSET else step_dispatch == AUTO
        self._auto_execution = (dispatch_compile,) if auto else None

    def _decide_auto_execution(self) -> None:
        auto = self.__dict__.get("_auto_execution")
        if auto is not None:
            mode = resolve_execution(self.model, self.fastcache_config, AUTO, *auto)
            if mode != self._dispatch_mode:
                self._dispatch_mode = mode
                self._dispatchers.clear()

    def set_step_dispatch(self, compile_mode: str | None) -> None:
        """Run calls through :class:`~fx_fastcache.step_dispatch.StepDispatch` (``None``: in-graph guards).

        ``compile_mode`` is ``"reduce-overhead"`` (CUDA graphs; the fast choice on GPU),
        ``"default"``, ``"max-autotune"`` or ``"eager"``.  Schedules are dispatched from the host;
        step-level policies read their decision once per step; per-block policies raise.
        """
        if compile_mode is not None:
            dispatch_decide_mode(self.fastcache_config)  # per-block policies cannot dispatch per step
            if compile_mode not in COMPILE_MODES:
                raise ValueError(f"step_dispatch={compile_mode!r} is not supported; choose one of {COMPILE_MODES}")
        self._dispatch_mode = compile_mode
        self._dispatchers.clear()
        self._auto_execution = None  # an explicit choice (set_execution marks "auto" again)

    @property
    def dispatch_compile(self) -> str | None:
        """The compile mode of step dispatch, or ``None`` when the in-graph guards run (``execution``)."""
        return self._dispatch_mode

    def _dispatcher(self, context: str) -> StepDispatch:
        """The StepDispatch of cache context ``context`` (its host step counters), built once; the
        contexts share the compiled variants."""
        d = self._dispatchers.get(context)
        if d is None:  # a schedule table is read from the store (fastcache.set_schedule)
            other = next(iter(self._dispatchers.values()), None)
            # not reset_state: the first one's reset (a new generation) ran before the call took its context
            # (_forward_checked), and a later context joins mid-generation, keeping the shared graph's state
            d = StepDispatch(self, compile_mode=self._dispatch_mode, reset_state=False)
            if other is not None:
                d._variants, d._splits = other._variants, other._splits
            self._dispatchers[context] = d
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
        if isinstance(x, list) and x:  # latents as a list of per-sample tensors (Z-Image)
            x = x[0]
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != self.dtype:
            raise TypeError(f"input {self.spec.stream_arg!r} has dtype {x.dtype} but the model computes in "
                            f"{self.dtype}; cast it with .to({self.dtype}) or the model with .to({x.dtype})")
        if isinstance(x, torch.Tensor) and x.device != self.device:
            raise ValueError(f"input {self.spec.stream_arg!r} is on {x.device} but the model is on {self.device}; "
                             f"move one of them")

    def _key(self, kw: dict[str, Any]) -> tuple:
        leaves, spec = pytree.tree_flatten(kw)
        return (str(spec), tuple(_describe(v) for v in leaves))

    def _check_generation(self, key: tuple, kw: dict[str, Any]) -> None:
        """A shape change in the middle of a generation (batch 2 → 1 where a pipeline stops classifier-free
        guidance after some steps: Z-Image's ``cfg_truncation``) starts a new generation in
        the live cache context: the new shapes' graph has no cache of this generation, and one it kept
        from earlier steps would forecast across the steps it missed."""
        last = self._last_keys.get(self._states.live)
        prev = self._entries.get(last) if last is not None else None
        if prev is None or key == last:
            return
        if _tensor_shapes(prev.key[1]) == _tensor_shapes(key[1]):
            return  # only non-tensor arguments or dtypes changed: not a shape change
        step, t_last = torch.stack([prev.clock.step, prev.clock.t_last]).tolist()  # one read
        if step < 0:  # previous graph idle (reset or never ran)
            return
        t_new = self.call_timestep(kw)
        if t_new is not None and t_new == t_last:
            return  # the same step: CFG as two calls whose shapes differ
        if t_new is not None and starts_generation_host(t_new, t_last):
            # a new generation with other shapes: the graphs see it by themselves, a host step counter
            # (a schedule dispatched on the host) cannot
            self._host_resets[self._states.live] = self.host_resets() + 1
            return
        if self._recorder is not None:
            raise ValueError(
                f"input shapes changed in the middle of a calibration generation (step {int(step)}): the "
                f"previous call had {_shapes(prev.key[1])}, this call has {_shapes(key[1])}. Calibrate on "
                f"generations of one shape (a pipeline without cfg_truncation); the calibration then serves "
                f"generations that change shape")
        log = logger.info if self._warned_shape_change else logger.warning
        self._warned_shape_change = True
        log("fx-fastcache: input shapes changed in the middle of a generation (step %d; %s, then %s), as a pipeline "
            "that stops classifier-free guidance after some steps does (cfg_truncation): calls with the new "
            "shapes start a new generation (warm-up steps compute)", int(step), _shapes(prev.key[1]),
            _shapes(key[1]))
        self._restart_generation()

    def _restart_generation(self) -> None:
        """The live cache context starts a new generation at this call: its state in every graph fresh
        (statistics, knobs and calibration kept); a step dispatcher's host counter follows (the counts)."""
        with torch.no_grad():
            for e in self._entries.values():
                restart_state(e.gm, self.store)
        self._restarts[self._states.live] = self.restarts() + 1
        self._host_resets[self._states.live] = self.host_resets() + 1

    def host_resets(self) -> int:
        """How many calls of the live cache context started a generation that a step dispatcher's host
        counter cannot see by itself (a restart, or a new generation with other shapes): it starts again."""
        return self._host_resets.get(self._states.live, 0)

    def restarts(self) -> int:
        """How many times the live cache context's generation started again in the middle (its shapes
        changed): a step dispatcher's host step counter (:class:`StepDispatch`, built here or by the user)
        starts again then, and ``record_schedule`` goes on counting the generation's steps."""
        return self._restarts.get(self._states.live, 0)

    def schedule_of(self, timesteps: list[torch.Tensor]) -> list[float]:
        """The steps' timesteps (as the clock reads them) of model calls given ``timesteps``, one read;
        consecutive calls at one timestep (classifier-free guidance as two calls) count once."""
        if not timesteps:
            return []
        dev = timesteps[0].device
        ts = torch.stack([self._clock_timestep(t.detach()).to(dev) for t in timesteps]).tolist()
        return [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]

    def _clock_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """A timestep input as the clock reads it (0-d float32, on its device)."""
        return scalar_timestep(noise_level(t, self.spec.timestep_rises))

    def call_timestep(self, kw: dict[str, Any]) -> float | None:
        """The call's timestep as the generation rules read it (a host read; ``None`` without one)."""
        t = kw.get(self.spec.timestep_arg) if self.spec.timestep_arg else None
        return float(self._clock_timestep(t)) if isinstance(t, torch.Tensor) else None

    def prepare_call(self, args: tuple, kwargs: dict[str, Any]) -> PreparedCall:
        """Bind and check a call's inputs and pick (or capture) its graph: the preamble of every call,
        with or without step dispatch.  A shape change inside a generation starts a new one here."""
        kw = self._bind(args, kwargs)
        self._check_inputs(kw)
        self._check_grad(kw)
        if not self._checked:  # (a StepDispatch called directly, not through forward)
            self._check_model_unchanged()
        key = self._key(kw)
        if key in self._uncached:
            raise _Uncached(key)
        self._check_generation(key, kw)
        entry = self._entries.get(key)
        if entry is None:
            # inference_mode(False): buffers the capture creates must not be inference tensors, or a
            # later call outside inference mode could not update them in place
            with _CAPTURE_LOCK, torch.inference_mode(False):  # a concurrent first call may have captured it
                try:
                    entry = self._entries.get(key) or self._capture(key, kw)
                except BlocksNotCalled as e:
                    given = ", ".join(f"{k}={v!r}" for k, v in kw.items() if not isinstance(v, torch.Tensor) and
                                      v is not None and not isinstance(v, (bool, dict)))
                    if not self._captured_all_blocks:  # no call ran every block: the block list is wrong
                        raise RuntimeError(
                            f"blocks {e.missing} do not run in {type(self.model).__name__}.forward for this call "
                            f"({given or 'its inputs'}): FastCache guards blocks that every step runs. Point "
                            f"optimize(blocks=...) at those, remove what skips them (diffusers' apply_layer_skip), "
                            f"or call once with inputs that run every block first (then calls that skip blocks, "
                            f"like SD3's skip_layers, run uncached)") from None
                    self._uncached[key] = tuple(e.missing)
                    logger.warning("fx-fastcache: blocks %s do not run for a call with %s (as SD3's skip_layers for "
                                   "skip-layer guidance); calls with these inputs run the model itself, uncached",
                                   e.missing, given or "these inputs")
                    raise _Uncached(key) from None
        self._last_key = self._last_keys[self._states.live] = key
        n = self._calls.get(key, 0) + 1
        self._calls[key] = n
        if n == GENERATION_CHECK_CALLS + 1:
            self._check_generations(entry, n - 1)
        return PreparedCall(kw, entry)

    def _check_generations(self, entry: CapturedGraph, calls: int) -> None:
        """At a graph's fifth call since the last reset (host reads): warn (once per model) if every
        call so far started a new generation, or if a call repeated the previous one's timestep and
        input (:mod:`fx_fastcache.runtime.clock`): in both cases nothing is approximated.  (A schedule
        dispatched on the host raises on a repeat instead: :class:`StepDispatch` checks each generation.)"""
        if (self._warned_repeat and self._warned_every_call) or not self.fastcache_config.enable_block_approx:
            return  # both said: no more reads; or nothing is to be approximated anyway
        repeats, generations, n = torch.stack([entry.clock.repeats, entry.clock.generations,
                                               entry.clock.calls]).tolist()  # one read
        if repeats > 0:
            if not self._warned_repeat:
                self._warned_repeat = True
                logger.warning(repeat_message("nothing is approximated after such a call until the next generation"))
        elif generations >= calls and n >= calls and not self._warned_every_call:
            self._warned_every_call = True
            logger.warning(
                "fx-fastcache: each of the first %d calls started a new generation, so no block can be "
                "approximated. A generation is a run of calls whose timestep goes down and whose input "
                "changes by less than its own norm per call (fx_fastcache.runtime.generation). Check that the "
                "timesteps decrease, are finite, and that classifier-free guidance is one batched call per step "
                "(or uses cache_context per branch).", calls)

    # -- context parallelism ---------------------------------------------------------------
    def process_group(self) -> Any:
        """The group every decision is summed over: ``optimize(process_group=)``, else the group of
        the model's diffusers context parallelism, else ``None`` (one device)."""
        return self._process_group if self._process_group is not None else process_group_of(self.model)

    def _check_grad(self, kw: dict[str, Any]) -> None:
        """The optimized model is inference-only: inputs that require grad are refused; a call with
        grad mode on (and parameters that require grad) warns once that its output has no gradient."""
        if not torch.is_grad_enabled():
            return
        needs = [k for k, v in pytree.tree_flatten_with_path(kw)[0] if isinstance(v, torch.Tensor) and v.requires_grad]
        if needs:
            names = ", ".join(f"{p[0].key}{pytree.keystr(p[1:])}" for p in needs)  # e.g. added_cond_kwargs['x']
            raise RuntimeError(f"inputs {names} require grad, but fx-fastcache is inference-only (its graph "
                               f"skips blocks and updates caches in place): call the original model to train, "
                               f"or detach the inputs / call under torch.no_grad()")
        if self._grad_checked or self._warned_no_grad:
            return
        self._grad_checked = True  # once per reset, not per call: the scan walks every parameter (1 ms on a Flux)
        if any(p.requires_grad for p in self.model.parameters()):
            self._warned_no_grad = True
            logger.warning("fx-fastcache: called with gradients enabled; the optimized model is inference-only "
                           "and its outputs carry no gradient (call it under torch.no_grad() or "
                           "torch.inference_mode() to silence this)")

    def last_entry(self) -> CapturedGraph | None:
        """The graph that ran the latest call (``None`` before the first call or after a reset)."""
        return self._entries.get(self._last_key) if self._last_key is not None else None

    def dispatching(self) -> bool:
        """Whether calls run through step dispatch now.  Not inside ``calibrate`` (every block
        computes): the recorder's host-side bookkeeping runs in Python in the rewritten graph, which
        a compiled dispatch copy cannot hold, and a dispatcher first built there (a pipeline's second
        cache context) would reset the state of the generation being recorded."""
        return self._dispatch_mode is not None and not self._force_compute

    # torch.compile(opt) / opt.compile(): dynamo traced into the capture (torch.export and the passes) and
    # failed ("Cannot access data pointer of Tensor"); the graphs are compiled by optimize(backend="inductor")
    # already, so dynamo leaves the call to them
    @torch._dynamo.disable(recursive=True)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._call_lock:  # calls from several threads, context swaps included, run one after another
            if self._emulator is not None:  # fit_output_rule's generations: the model itself, with gradients
                return self._emulator(*args, **kwargs)
            self._check_model_unchanged()  # before a dispatcher runs: a re-capture resets its host step
            if self._installed_in_pipeline and not self._pipeline_calls and not self._warned_outside_pipeline:
                self._warned_outside_pipeline = True
                logger.warning("fx-fastcache: this transformer, installed by enable_fastcache, is called outside its "
                               "pipeline's call, where nothing resets its cache state per generation (a pipeline made "
                               "with from_pipe shares it): call fastcache.enable_fastcache on that pipeline too, or "
                               "fastcache.reset(model) before each generation")
            self._checked = True
            if self._seen_timesteps is not None and self.spec.timestep_arg:
                t = kwargs.get(self.spec.timestep_arg)
                if isinstance(t, torch.Tensor):
                    self._seen_timesteps.append(t)
            try:
                return self._forward_checked(*args, **kwargs)
            finally:
                self._checked = False

    def _forward_checked(self, *args: Any, **kwargs: Any) -> Any:
        """A call after the model check: its cache context, then step dispatch or the captured graph."""
        self._last_call_uncached = False
        if self._uncached:  # a call that skips blocks (SD3's skip-layer guidance) takes no cache context
            key = self._key(self._bind(args, kwargs))
            if key in self._uncached:
                return self._run_uncached(key, args, kwargs)
        if self.dispatching() and not self._dispatchers:
            # the first StepDispatch starts a new generation: reset before this call takes its cache context
            # and turn (the reset after it forgot the turn: step 0's uncond call took "cond", a repeat)
            self.reset()
        name = self._context_name(args, kwargs)
        if self._turns_given_up:
            return self._run_uncached(None, args, kwargs)
        if self._states.live is not None and name != self._states.live:
            logger.debug("fx-fastcache: cache context %r -> %r", self._states.live, name)
        self._states.activate(name, self.entries(), self.store)
        # calibration records the primary context only: the recorder keeps per-block histories
        # across steps, which interleaved cond/uncond calls would corrupt
        muted = self._recorder if name != self._primary_context else None
        if muted is not None:
            self.set_recorder(None)
        try:
            if self.dispatching():
                return self._dispatcher(name)(*args, **kwargs)
            kw, entry = self.prepare_call(args, kwargs)
            with torch.no_grad():
                if self._recorder is not None or self._dispatch_mode is not None:
                    return entry.gm(**kw)  # recording, or calibrating a dispatched model: uncompiled
                return entry.run(**kw)
        except _Uncached as e:
            return self._run_uncached(e.key, args, kwargs)
        finally:
            if muted is not None:
                self.set_recorder(muted)

    def _check_model_unchanged(self) -> None:
        """The model changed since its graphs were captured (:mod:`fx_fastcache.model_watch`: a submodule,
        parameter, buffer, attention processor, forward hook, LoRA state; or diffusers hooks): drop them,
        re-capture.  Refuses diffusers hooks that cannot run under a graph (:data:`FOREIGN_HOOKS`)."""
        hooks = _diffusers_hooks(self.model, self._submodules)
        if self._watch is None or not self._entries:
            return
        why = self._watch.changed()
        if parallel_signature(self.model) != self._parallel_sig:  # the graphs hold neither split nor collectives
            why = "its parallel config changed (enable_parallelism after the first call)"  # (not its hooks)
        if why is None and hooks != self._watch.hooks:
            why = "diffusers hooks were added or removed (apply_layer_skip, a guider's or offloading hooks)"
        if why is None:
            return
        log = logger.info if self._warned_changed else logger.warning  # warn once: each change re-captures
        self._warned_changed = True
        log("fx-fastcache: the model changed since its graphs were captured (%s); re-capturing at this call "
            "(export%s)%s", why,
            "" if self.backend == "eager" else " and compile",
            "; the calibration was fitted on the model before the change" if self.store.calibrated else "")
        self.drop_graphs()
        self._uncached.clear()  # the blocks a call skips may differ now
        self._captured_all_blocks = False
        self._submodules = list(self.model.modules())  # the foreign-hook scan's list

    # -- cache contexts -------------------------------------------------------------------
    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """diffusers' ``CacheMixin.cache_context``: calls inside use the state of context ``name``."""
        prev = self._active
        self._active = str(name)
        try:
            yield
        finally:
            self._active = prev

    def _run_uncached(self, key: tuple | None, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The model itself, uncached: a call that skips blocks (``key``: its signature), or every call after
        the turns gave up (``key`` ``None``)."""
        self._uncached_calls[key] = self._uncached_calls.get(key, 0) + 1
        self._last_call_uncached = True
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def _context_name(self, args: tuple, kwargs: dict[str, Any]) -> str:
        """The running context.  The first call fixes the primary context: its context, or
        :data:`DEFAULT_CONTEXT` if it ran outside any; later calls outside any context use it (so a
        loop running one branch outside a context and the other inside one keeps two states)."""
        name = self._active
        if name is None and self._branch_turns:
            turn = self._next_turn(args, kwargs)
            name = None if turn is None else _branch_name(turn)
        if self._primary_context is None:
            self._primary_context = DEFAULT_CONTEXT if name is None else name
        return self._primary_context if name is None else name

    def _next_turn(self, args: tuple, kwargs: dict[str, Any]) -> int | None:
        """Which call of its step this one is: a call given the very tensor object (unchanged since) that the
        previous call got as its stream or its timestep belongs to the same step, any other starts a step.

        Why by identity: pipelines that run CFG as two calls per step without naming cache contexts decide
        CFG in their own ways (Flux img2img's ``true_cfg_scale`` and a negative prompt, Wan video-to-video's
        and Chroma's ``guidance_scale > 1``, Lumina2's only for the first steps), but all of them pass one
        step's latents (or its timestep tensor) to both calls, and a new step gets new ones.  Values could
        tell the same, but reading them on the host would sync the device at every call."""
        if self._turns_given_up:
            return None
        stream = kwargs.get(self.spec.stream_arg, args[0] if args else None)
        timestep = kwargs.get(self.spec.timestep_arg) if self.spec.timestep_arg else None
        now = (_identity(stream), _identity(timestep))
        self._turn = self._turn + 1 if _same_step(now, self._turn_inputs) else 0
        self._turn_inputs = now
        if self._turn >= MAX_TURNS:
            # the same latents across steps: updated in place, under torch.inference_mode (no version
            # counter).  The rest of this pipeline call runs the model itself: sharing one state would rely on
            # the clock's repeat rule, which a schedule dispatched on the host does not run
            self._turns_given_up = True
            logger.warning("fx-fastcache: %d calls in a row got the same latents (or timestep) tensor, as a pipeline "
                           "updating its latents in place under torch.inference_mode does; its CFG calls cannot be "
                           "told apart, so the rest of this pipeline call runs the model uncached (run it under "
                           "torch.no_grad(), where an in-place update is seen)", MAX_TURNS + 1)
            return None
        return self._turn

    @property
    def last_call_uncached(self) -> bool:
        """Whether the last call ran the model itself (it skipped blocks, or the turns gave up), no graph."""
        return self._last_call_uncached

    @property
    def active_context(self) -> str | None:
        """The cache context whose state is in the graphs: the last call's (``None`` before any call)."""
        return self._states.live

    def set_branch_turns(self, on: bool) -> None:
        """Calls outside any cache context take the contexts of :data:`BRANCH_TURNS` in turn, one per call
        of a step (:meth:`_next_turn`): the calls of a pipeline that runs CFG as two calls per step without
        ``cache_context`` (Flux img2img, inpaint, Kontext; Wan video-to-video; Chroma)."""
        self._branch_turns, self._turn, self._turn_inputs, self._turns_given_up = on, 0, (None, None), False

    def contexts(self) -> dict[str, dict[tuple, dict[str, torch.Tensor]]]:
        """Per cache context: its state tensors per captured graph (the live ones or its bank)."""
        names = dict.fromkeys([*([] if self._primary_context is None else [self._primary_context]),
                               *self._states.banks])
        if self._states.live is not None:
            names[self._states.live] = None
        return {n: self._states.state(n, self.entries(), self.store) for n in names}

    # -- capture --------------------------------------------------------------------------
    def capture(self, *args: Any, **kwargs: Any) -> CapturedGraph:
        """Capture (export + rewrite + compile) for these example inputs without running them."""
        with self._call_lock:
            self._check_model_unchanged()  # (export_onnx and inspect_graph capture through here)
        kw = self._bind(args, kwargs)
        self._check_inputs(kw)
        key = self._key(kw)
        with _CAPTURE_LOCK, torch.inference_mode(False):
            return self._entries.get(key) or self._capture(key, kw)

    def _capture(self, key: tuple, kw: dict[str, Any]) -> CapturedGraph:
        cfg = self.fastcache_config
        group = self.process_group()
        _check_parallel(cfg, group)
        logger.info("fx-fastcache: capturing %s (%d blocks) for %s", type(self.model).__name__,
                    len(block_modules(self.model, self.spec)), _shapes(key[1]))
        self._submodules = list(self.model.modules())
        _check_capturable(self.model, self._submodules)
        _check_traceable_arguments(self.model, kw)
        was_training = self.model.training
        self.model.eval()
        try:
            # (the preparation first: a family's traceable forward goes in before the markers wrap the forward)
            with torch.no_grad(), capture_preparation(self.spec, self.model, kw), marked(self.model, self.spec), \
                    cast_in_graph(self.model):
                ep = torch.export.export(self.model, (), kwargs=kw, strict=False)
        except Exception as e:
            # torch's or the model's own error, raised deep in the trace: the same error (its type kept:
            # the model's own input checks raise ValueError), with a note on what failed and what to do
            hint = (f"fx-fastcache: raised while torch.export traced {type(self.model).__name__}.forward for a call "
                    f"with {_shapes(key[1])}. If the model runs this call without FastCache, its forward does "
                    f"something torch.export cannot trace (non-strict): Python that reads tensor values (.item(), "
                    f".numpy(), a set or an if on them), or an output that is no tensor, number or container of "
                    f"them (a cache object). Check with torch.export.export(model, (), kwargs=..., strict=False) "
                    f"alone; patch that part of the model, or run it without FastCache")
            if hasattr(e, "add_note"):
                e.add_note(hint)
            else:  # Python 3.10
                logger.error("%s", hint)
            raise
        finally:
            self.model.train(was_training)
        gm = ep.module()
        ctx = PassContext(model=self.model, spec=self.spec, config=cfg, policy=POLICIES[cfg.policy](cfg),
                          store=self.store, backend=self.backend, process_group=group)
        results = run_pipeline(gm, ctx, record=self.record_passes)
        for name, sub in gm.named_children():  # the passes create clock/guard buffers on the CPU
            if gp.is_fastcache_module(name):
                sub.to(self.device)
        if self.backend == "inductor":
            run = torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False)
        else:
            run = gm
        entry = CapturedGraph(key, gm, run, ctx, results)
        self._entries[key] = entry
        if len(self._entries) == GRAPHS_WARNING:
            logger.warning("fx-fastcache: %d graphs captured for %s, one per input signature (shapes, dtypes, "
                           "devices, non-tensor arguments); each took an export%s and keeps its own cache state "
                           "until opt.drop_graphs(). Keep the inputs' shapes (resolution, frames, batch) fixed "
                           "where you can", GRAPHS_WARNING, type(self.model).__name__,
                           "" if self.backend == "eager" else " and a compile")
        self._watch = ModelWatch(self.model, _diffusers_hooks(self.model, self._submodules))
        self._captured_all_blocks = True
        self._parallel_sig = parallel_signature(self.model)
        self.graphs[f"g{len(self.graphs)}"] = gm
        self._sync_entry(entry)
        fallback = FALLBACKS[cfg.fallback]
        if fallback.fitted and not self.store.calibrated and not self._warned_uncalibrated and self._recorder is None:
            logger.warning("fx-fastcache: fallback %r is uncalibrated (%s); run `with fastcache.calibrate(model): ...` "
                           "on a few generations to fit it and improve quality", cfg.fallback, fallback.uncalibrated)
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

    def graphs_elsewhere(self) -> int:
        """How many graphs are kept for the model's other placements (:meth:`_apply`); their state is on the CPU."""
        return sum(len(k.entries) for k in self._kept.values())

    def reset(self) -> None:
        self._reset_entries()
        # the next call fixes the primary context again (calibrate records the first one called in it)
        self._primary_context = None
        # (the turns belong to the pipeline call, set by set_branch_turns: a reset inside it, as the first
        # StepDispatch's or one after a re-capture between a step's two calls, keeps them)
        self.__dict__.get("_uncached_calls", {}).clear()

    def _reset_entries(self) -> None:
        """A new generation in every captured graph, its host-side counters and the contexts' banks."""
        for e in self._entries.values():
            e.clock.reset()
            for g in e.guards:
                g.reset()
            if e.step_decider is not None:
                e.step_decider.reset()
            for output_stage in gp.OUTPUT_STAGES:
                mod = getattr(e.gm, output_stage, None)
                if mod is not None:
                    mod.reset()
        self._last_key = None
        self._last_keys.clear()
        self._grad_checked = False  # parameters may have been made trainable since (a LoRA to train)
        self.__dict__.get("_calls", {}).clear()  # _check_generations looks again in the next generation
        for d in self.__dict__.get("_dispatchers", {}).values():
            d.reset_host()  # a schedule's host step counter cannot see a new generation by itself
        self._states.clear()  # every context starts fresh at its next call

    def check_configure(self, **changes: Any) -> FastCacheConfig:
        """The config :meth:`configure` would install, or the error it would raise (nothing changes)."""
        new = self.fastcache_config.replace(**changes)
        if self._dispatch_mode is not None and "policy" in changes and self._auto_execution is None:
            dispatch_decide_mode(new)  # step dispatch chosen explicitly: the new policy must decide per step
        _check_parallel(new, self.process_group())  # routing/merging under context parallelism: raise now
        conflict = calibration_conflict(self.store.meta, new) if self.store.calibrated else None
        if conflict is not None:
            changed = ", ".join(f"{k}={v!r}" for k, v in changes.items())
            raise ValueError(f"configure({changed}): this model's calibration {conflict}: optimize the model with "
                             f"{changed} and calibrate it (or load a calibration file fitted for it)")
        return new

    def configure(self, **changes: Any) -> None:
        """Change config fields; run-time fields update buffers, others force a re-capture."""
        new = self.check_configure(**changes)
        structural = [k for k in changes if k not in RUNTIME_FIELDS]
        self.fastcache_config = new
        self._decide_auto_execution()  # "auto" and a new policy or token routing: maybe another mode
        if structural:
            logger.info("fx-fastcache: %s changed; graphs will be re-captured", structural)
            self.drop_graphs()
            return
        POLICIES[new.policy].configure_store(self.store, new, self.device)
        for e in self._entries.values():
            self._install_runtime_fields(e)

    def _install_runtime_fields(self, entry: CapturedGraph) -> None:
        """The config's run-time fields into the graph's clock, and the module's switches (:meth:`_sync_entry`)."""
        cfg, c = self.fastcache_config, entry.clock
        c.threshold.fill_(cfg.cache_ratio_threshold)
        c.warmup.fill_(float(cfg.warmup_steps))
        c.enabled.fill_(1.0 if cfg.enable_block_approx else 0.0)
        c.max_skip.fill_(float(cfg.max_skip_steps))
        self._sync_entry(entry)

    # -- blocks and schedules -------------------------------------------------------------
    def uncached_calls(self) -> list[tuple[tuple[str, ...], int]]:
        """Since the last reset, per input signature whose calls skip blocks (they run the model itself,
        uncached): the blocks they skip and how many such calls ran; and ``((), n)`` for the calls after the
        turns gave up (:meth:`_next_turn`)."""
        return [(() if k is None else self._uncached[k], n) for k, n in self._uncached_calls.items()
                if k is None or k in self._uncached]

    def block_names(self) -> list[str]:
        """The guarded blocks' module paths, in execution order."""
        return [name for name, _, _ in block_modules(self.model, self.spec)]

    def install_schedule(self, table: Any) -> None:
        """Install a ``steps × blocks`` bool skip table (see ``fastcache.set_schedule``)."""
        policy = POLICIES[self.fastcache_config.policy]
        if not policy.host_decidable:
            tables = sorted(k for k, v in POLICIES.items() if v.host_decidable)
            raise ValueError(f"set_schedule needs a policy that replays a table ({tables}), this model uses "
                             f"policy={policy.name!r}; optimize(model, policy='schedule') or "
                             f"fastcache.configure(model, policy='schedule')")
        policy.install_table(self.store, self.block_names(), table, self.device)
        self._recapture_split_spans()

    def _recapture_split_spans(self) -> None:
        """Guarded spans (``passes/group_spans.py``) of a schedule follow the table installed at
        capture; a new table whose columns differ inside a captured span drops the graphs, so the
        next call re-captures with spans that fit it."""
        table = self.installed_schedule()
        for e in self.entries():
            for g in e.guards:
                cols = table[:, g.index:g.index + len(g.blocks)] if table is not None else None
                if len(g.blocks) > 1 and cols is not None and not bool((cols == cols[:, :1]).all()):
                    logger.info("fx-fastcache: the new schedule splits the guarded span %s; graphs will be "
                                "re-captured", g.block_name)
                    self.drop_graphs()
                    return

    def installed_schedule(self) -> torch.Tensor | None:
        """The installed table, trimmed after its last skipping step (``None``: none installed)."""
        return POLICIES[self.fastcache_config.policy].read_table(self.store, self.block_names())

    @property
    def force_compute(self) -> bool:
        """Inside ``fastcache.calibrate``: every block computes."""
        return self._force_compute

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


def calibration_conflict(fitted_for: dict[str, Any], cfg: FastCacheConfig) -> str | None:
    """Why a calibration fitted for ``fitted_for`` (its ``fallback`` and ``policy``; absent: unknown)
    cannot serve ``cfg``, or ``None``: a fitted fallback or a calibrated policy needs its own fit, and a
    plan is made for its fallback's forecast.  One rule for loading a file and for ``configure``."""
    for name, registry, needs in (("fallback", FALLBACKS, "fitted"), ("policy", POLICIES, "needs_calibration")):
        saved, mine = fitted_for.get(name), getattr(cfg, name)
        if saved not in (None, mine) and getattr(registry[mine], needs):
            return f"was fitted for {name}={saved!r}; {name}={mine!r} needs its own fit"
    planned_for = fitted_for.get("fallback")
    if POLICIES[cfg.policy].plans_for_fallback and planned_for not in (None, cfg.fallback):
        return (f"planned policy={cfg.policy!r} for fallback={planned_for!r}, whose forecast the plan replays; "
                f"fallback={cfg.fallback!r} needs its own plan")
    return None


#: diffusers hooks that cannot run under a captured graph (prefixes of their registry names).
#: Caches (First-Block-Cache, MagCache, TaylorSeer, FasterCache, PAB, SeaCache, text KV): their
#: decisions read tensor values across calls, so torch.export would freeze the first call's
#: decision (or fail on it, and leave fake tensors in the hook's state), and two caches would
#: approximate the same blocks twice.  (Layerwise casting is traced with its casts in the graph:
#: :mod:`fx_fastcache.layerwise_casting`.)
FOREIGN_HOOKS = {
    "cache": ("fbc_", "mag_cache", "taylorseer", "faster_cache", "pyramid_attention_broadcast", "sea_cache",
              "text_kv_cache"),
    "offloading": ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker"),
}


def _parameters_of(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m._parameters.values() if p is not None]


def _same_objects(before: list, after: list) -> bool:
    return len(before) == len(after) and all(map(operator.is_, before, after))


def _follow_moved_buffers(kept: KeptGraphs, moved: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``Module._apply`` puts new tensors in the model's buffer slots: every graph module of ``kept`` (the
    captured graphs, their branches, step dispatch's split and specialised copies) and its model watch take the
    new ones where they held the old.  (Moving the old objects in place instead failed: a buffer that is a view
    keeps its base's dtype under ``.data =``, and torch.export's weak references forbid swapping it.)"""
    if not moved:
        return
    modules = {id(m): m for gm in kept.graphs.values() for m in gm.modules()}
    for d in kept.dispatchers.values():
        modules.update((id(m), m) for gm in d.graph_modules() for m in gm.modules())
    for m in modules.values():
        for k, b in m._buffers.items():
            hit = moved.get(id(b)) if b is not None else None
            if hit is not None and hit[0] is b:
                m._buffers[k] = hit[1]
    if kept.watch is not None:
        kept.watch.follow_moved(moved)


def _move_in_place(old: torch.Tensor, new: torch.Tensor) -> bool:
    """``old`` takes ``new``'s data (another device or dtype), keeping its identity; ``False`` if it cannot
    (a view, whose base would keep its dtype; a tensor subclass)."""
    if old._base is not None:
        return False
    try:
        with torch.no_grad():
            old.data = new
    except (RuntimeError, TypeError):
        return False
    return True


def _diffusers_hooks(model: nn.Module, modules: list[nn.Module]) -> tuple:
    """The diffusers hooks on ``modules`` (its submodules, listed once: walking ``model.modules()`` per call
    was 9x slower on a Flux-sized tree, 0.6 against 0.07 ms) as ``((module index, hook names), ...)``,
    compared with the capture's to notice hooks added since (``apply_layer_skip``, a guider's hooks);
    refuses those of :data:`FOREIGN_HOOKS`, naming them and the fix."""
    registries = [m.__dict__.get("_diffusers_hook") for m in modules]
    if not any(registries):
        return ()
    # (an empty registry does not count: CacheMixin's is_cache_enabled, read through the wrapper, makes one)
    found = tuple((i, tuple(r.hooks)) for i, r in enumerate(registries) if r is not None and getattr(r, "hooks", None))
    if not found:
        return found
    names = {name for _, hooks in found for name in hooks}
    refused = {kind: sorted(n for n in names if n.startswith(prefixes)) for kind, prefixes in FOREIGN_HOOKS.items()}
    if refused["cache"]:
        raise ValueError(f"{type(model).__name__} carries diffusers cache hooks {refused['cache']}: two caches cannot "
                         f"run together (and torch.export would freeze that cache's first decision); remove it "
                         f"first (model.disable_cache(), or build the model without apply_*_cache)")
    if refused["offloading"]:
        raise ValueError(f"{type(model).__name__} carries diffusers group offloading hooks, which move weights between "
                         f"devices inside forward, where torch.export cannot trace them; keep the transformer on the "
                         f"GPU, or offload whole models with pipe.enable_model_cpu_offload() called after "
                         f"fastcache.enable_fastcache(pipe) (the graphs captured on the GPU are kept while the "
                         f"transformer is offloaded); model.disable_group_offload() removes the hooks")
    return found


_TRACEABLE = (torch.Tensor, numbers.Number, str, type(None), torch.dtype, torch.device, enum.Enum)


def _check_traceable_arguments(model: nn.Module, kw: dict[str, Any]) -> None:
    """Arguments torch.export takes: tensors, numbers, strings and containers of them.  An object (FLUX.2
    Klein's ``kv_cache=Flux2KVCache``) failed inside the export with "Unsupported input type"."""
    for name, value in kw.items():
        odd = next((leaf for leaf in pytree.tree_leaves(value) if not isinstance(leaf, _TRACEABLE)), None)
        if odd is not None:
            raise TypeError(f"{type(model).__name__}.forward argument {name!r} holds a {type(odd).__name__}, which "
                            f"torch.export cannot take as an input (tensors, numbers, strings and lists, tuples or "
                            f"dicts of them); FastCache cannot capture such calls: run them without it")


def _check_capturable(model: nn.Module, modules: list[nn.Module]) -> None:
    """What torch.export cannot trace, or FastCache's graph cannot run, refused before the capture with the fix
    (each failed inside the trace with a raw error: "Couldn't swap Linear.weight", a functorch vmap error)."""
    hooked = [m for m in modules if "_hf_hook" in m.__dict__]
    if hooked:
        raise ValueError(f"{type(model).__name__} carries accelerate hooks ({type(hooked[0]._hf_hook).__name__}: "
                         f"enable_model_cpu_offload or enable_sequential_cpu_offload called before FastCache, or "
                         f"from_pretrained(device_map=...)), which move weights inside forward, where torch.export "
                         f"cannot trace them; call pipe.enable_model_cpu_offload() after fastcache.enable_fastcache"
                         f"(pipe) (its hook then wraps the optimized module), or pipe.remove_all_hooks() first")
    cp = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    uneven = [k for k in ("ulysses_anything", "ring_anything") if getattr(cp, k, False)]
    if uneven:  # (torch.export failed: "Could not guard on data-dependent expression Eq(u0 + u1, 0)")
        raise ValueError(f"{type(model).__name__}'s context parallelism has {uneven[0]}=True, whose split sizes are "
                         f"exchanged at run time, which torch.export cannot trace; enable parallelism without it "
                         f"(sequence lengths divisible by the degree), or run the model without FastCache")
    for m in modules:
        processor = attention_processor(m)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        backend = getattr(processor, "_attention_backend", None) or active_attention_backend()
        if getattr(backend, "value", backend) == "flex":
            raise ValueError(f"{type(model).__name__} uses diffusers' 'flex' attention backend, whose flex_attention "
                             f"does not run inside FastCache's torch.cond branches (a functorch vmap error); set "
                             f"another one first (model.set_attention_backend('native'), or 'flash', 'sage', ...)")


def _check_parallel(cfg: FastCacheConfig, group: Any) -> None:
    """Token routing and merging re-run a block on a per-rank subset of its tokens: not with context parallelism."""
    on = [k for k in ("enable_token_routing", "enable_token_merge") if getattr(cfg, k)]
    if group is None or not on:
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
