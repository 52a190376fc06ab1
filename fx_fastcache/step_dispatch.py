"""Step-level dispatch: learn each step's skip pattern once, replay a graph specialised for it.

Why this exists: on CUDA, inductor lowers every ``torch.cond`` to ``if pred.item():`` (a
device-to-host sync per guarded block, no CPU/GPU overlap), and CUDA graphs are skipped for
graphs that contain ``cond``.  But a schedule or a step-level policy fixes the pattern of the
whole step at once, so :class:`StepDispatch`

1. takes the rewritten graph of a :class:`~fx_fastcache.module.FastCacheModule`,
2. for each distinct skip pattern (a tuple of bools, one per block) builds a *specialised*
   copy in which every ``cond`` is replaced by a direct call of the chosen branch (the block or
   the fallback) and the guard's predicate by a constant, so the graph has no ``cond`` at all,
3. compiles each copy with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) and, per
   call, picks the copy for the current step:

   * ``decide="host"`` (``policy="schedule"``): from a host-side step counter and the table, no
     sync at all.  The host mirrors the guard's static conditions (warm-up, enable/force
     switches, "computed at least once since the generation began", ``max_skip_steps``), so a
     dispatched run computes exactly what the in-graph schedule policy computes.  The host
     counter cannot see a new generation without reading the timestep (a sync); past the
     table's last skipping step, where every step computes anyway, it reads the graph's clock
     once per call and starts the table again when a new generation began.  A generation
     stopped before that still needs :meth:`StepDispatch.reset` before the next one
     (``enable_fastcache`` resets at every pipeline call).  A generation that starts again in the
     middle (its shapes changed: ``opt.restarts()``), or a new one with other shapes
     (``opt.host_resets()`` counts both), starts the host counter again; after a restart, until the
     next reset, every call reads its timestep and the clock (two host reads) to see the next
     generation begin before it picks its pattern, as the restarted one may end before its table
     does.  The table is read again whenever a new one is installed (``calibrate``,
     ``configure(target_fraction=...)``, ``search_plan``).
   * ``decide="device"`` (``step_forecast``, ``teacache``, ``first_block_cache``, ``schedule``):
     the graph is split at its decisions (:mod:`fx_fastcache.decision_split`); a compiled
     prefix decides in the graph, the host reads the decisions with one sync per step, and the
     suffix copy for that pattern runs.  New generations are detected in the graph, as without
     dispatch.

The copies share the original graph's submodules (clock, guards, fallback state buffers), so
cached residuals, statistics and calibration tensors are the same objects whichever copy runs,
and ``fastcache.get_cache_statistics(dispatch.opt)`` keeps working.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from . import graph_protocol as gp
from .decision_split import guard_index, guard_spans, resolve_conds, split_at_decisions
from .fallbacks import FALLBACKS
from .policies import POLICIES
from .quiet import quiet_deepcopy
from .runtime.clock import repeat_message
from .runtime.generation import starts_generation_host
from .runtime.pin import unpin

logger = logging.getLogger(__name__)

__all__ = ["StepDispatch", "specialise", "dispatch_decide_mode", "COMPILE_MODES", "DECIDE_MODES"]

COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "eager")
HISTORY_STEPS = 4096


def specialise(gm: fx.GraphModule, pattern: tuple[bool, ...]) -> fx.GraphModule:
    """A copy of the rewritten graph with every ``cond`` resolved by ``pattern[block]``.

    The copy shares ``gm``'s submodules and buffers (state), it only has a different graph.
    """
    graph = quiet_deepcopy(gm.graph)  # keeps the pytree codegen (keyword / nested inputs) of ep.module()
    unpin(graph)  # no cond left to compile: layout pins would only cost copies
    preds = [n.args[0] for n in gp.conds(graph)]
    if not preds:
        raise RuntimeError("the graph has no guarded blocks (torch.cond); nothing to specialise")
    choose = {}
    spans = guard_spans(gm)
    for pred in preds:
        i = guard_index(pred)
        members = spans.get(i, (i,))
        if members[-1] >= len(pattern):
            raise ValueError(f"skip pattern has {len(pattern)} entries but the graph guards block {members[-1]}")
        if len({bool(pattern[j]) for j in members}) > 1:  # one cond guards the whole span
            raise ValueError(f"skip pattern {tuple(pattern)} splits the guarded span of blocks "
                             f"{members[0]}..{members[-1]}; "
                             f"install the table before the graph is captured (fastcache.set_schedule re-captures) "
                             f"or optimize with span='block'")
        choose[pred] = bool(pattern[i])
    resolve_conds(graph, choose)
    new = fx.GraphModule(gm, graph)
    for attr in ("_in_spec", "_out_spec", "range_constraints", "equality_constraints"):
        if hasattr(gm, attr) and not hasattr(new, attr):
            setattr(new, attr, getattr(gm, attr))
    new.graph.lint()
    new.recompile()
    return new


DECIDE_MODES = ("auto", "host", "device")


def dispatch_decide_mode(config: Any, decide: str = "auto") -> str:
    """Where :class:`StepDispatch` reads each step's pattern for this config (``"host"`` or ``"device"``).

    ``"host"``: a table-driven policy's table, mirrored on the host (no sync at all).
    ``"device"``: the step-level policies' in-graph decision, read once per step (one sync).
    Raises ``ValueError`` for per-block policies, which decide inside the step.
    """
    if decide not in DECIDE_MODES:
        raise ValueError(f"decide={decide!r} is not supported; choose one of {DECIDE_MODES}")
    policy = config.policy
    cls = POLICIES[policy]
    if decide == "auto":
        decide = "host" if cls.host_decidable else "device"
    if decide == "host" and not cls.host_decidable:
        table_policies = sorted(k for k, v in POLICIES.items() if v.host_decidable)
        raise ValueError(f"decide='host' needs a policy whose decisions are known in advance ({table_policies}); "
                         f"this model uses policy={policy!r}: use decide='device' (one sync per step) or one of those")
    if decide == "device" and not cls.decides_per_step():
        step_policies = sorted(k for k, v in POLICIES.items() if v.decides_per_step())
        raise ValueError(f"step dispatch needs one decision per step, but policy={policy!r} decides each block "
                         f"from that block's input inside the step; use one of {step_policies}, "
                         f"or keep the in-graph guards (no step dispatch)")
    return decide


class StepDispatch(nn.Module):
    """Per-step dispatch to specialised, optionally CUDA-graphed, copies of ``opt``'s graph.

    Two ways to learn the step's skip pattern (``decide``):

    * ``"host"`` (``policy="schedule"``): from the table, on the host; no device sync at all.
    * ``"device"`` (step-level policies: ``step_forecast``, ``teacache``, ``first_block_cache``,
      and ``schedule``): the graph is split at its decisions
      (:mod:`fx_fastcache.decision_split`); a compiled *prefix* computes them, the host reads
      them in one sync, and the *suffix* specialised for that pattern runs.
    * ``"auto"``: ``"host"`` for schedules, ``"device"`` otherwise.

    Args:
        opt: a model from ``fastcache.optimize(model, ...)`` (any backend; the copies are
            compiled here according to ``compile_mode``).
        table: ``steps × blocks`` bool skip table (True = approximate), schedule policy only.
            ``None`` reads the table installed with ``fastcache.set_schedule(opt, table)``.
        compile_mode: ``"reduce-overhead"`` (inductor + CUDA graphs), ``"default"``,
            ``"max-autotune"`` or ``"eager"`` (no compile; for CPU tests).
        clone_outputs: copy outputs out of the CUDA-graph pool (a later replay overwrites them).
        decide: ``"auto"``, ``"host"`` or ``"device"`` (above).
        reset_state: start a new generation (reset ``opt``'s in-graph state); ``False`` for a
            dispatcher that joins a running one (another cache context of the same graph).
    """

    def __init__(self, opt: Any, table: torch.Tensor | None = None,
                 compile_mode: str = "reduce-overhead", clone_outputs: bool | None = None,
                 decide: str = "auto", reset_state: bool = True) -> None:
        super().__init__()
        if not callable(getattr(opt, "prepare_call", None)):  # duck-typed: this layer does not import module.py
            raise TypeError(f"StepDispatch expects the module returned by fastcache.optimize(), "
                            f"got {type(opt).__name__}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={compile_mode!r} is not supported; choose one of {COMPILE_MODES}")
        self.decide = dispatch_decide_mode(opt.fastcache_config, decide)
        self.opt = opt
        self.compile_mode = compile_mode
        self.clone_outputs = (compile_mode == "reduce-overhead") if clone_outputs is None else clone_outputs
        self.block_names = opt.block_names()
        self._table: list[tuple[bool, ...]] = []
        self._variants: dict[tuple, Any] = {}
        self._splits: dict[tuple, Any] = {}
        #: Skip pattern of the latest steps since the last reset (host tuples; for inspection and
        #: tests).  Bounded: with device decisions a long-running caller may never reset.
        self.history: deque[tuple[bool, ...]] = deque(maxlen=HISTORY_STEPS)
        #: no ``table=`` given: re-read the installed table at every reset (a plan may change it)
        self._follow_installed = False
        #: ``opt.restarts()`` and ``opt.host_resets()`` last seen: a generation the host counter cannot see
        #: by itself began (the counter starts again); after a restart in the middle of one, every call checks
        #: on the host whether it starts a generation, until the next reset, as the restarted generation may
        #: end before the table does
        self._restarts_seen, self._resets_seen = self._opt_counts()
        self._watch_clock = False
        if self.decide == "host":
            self.set_table(table)
        elif table is not None:
            self.set_table(table)
        if reset_state:
            self.reset()
        else:  # joining a running generation: keep the graph's state
            self.reset_host()

    # -- schedule ---------------------------------------------------------------------------
    def set_table(self, table: torch.Tensor | None) -> None:
        """Install a new ``steps × blocks`` table (specialised copies are kept and reused)."""
        if self.decide == "device":  # the graph reads it: install it there
            if not POLICIES[self.opt.fastcache_config.policy].host_decidable:
                raise ValueError(f"a skip table needs policy='schedule'; this model uses "
                                 f"policy={self.opt.fastcache_config.policy!r}")
            if table is not None:
                self.opt.install_schedule(table)
            return
        n = len(self.block_names)
        self._follow_installed = table is None
        if table is None:
            self._table_version = self.opt.store.table_version
            table = self.opt.installed_schedule()
            if table is None:
                raise ValueError("no schedule installed: pass table=... or call fastcache.set_schedule(opt, table) "
                                 "first")
        table = torch.as_tensor(table, dtype=torch.bool).cpu()
        if table.ndim != 2 or table.shape[1] != n:
            raise ValueError(f"schedule table has shape {tuple(table.shape)}; expected (steps, {n} blocks)")
        self._table = [tuple(bool(v) for v in row) for row in table.tolist()]

    @property
    def patterns(self) -> list[tuple[bool, ...]]:
        """The distinct patterns of the host table (``decide="host"``), or those seen so far
        (``decide="device"``)."""
        if self.decide == "host":
            return list(dict.fromkeys(self._table))
        return list(dict.fromkeys(self.history))

    @property
    def compiled_patterns(self) -> list[tuple[bool, ...]]:
        """The skip patterns that have a compiled copy (built on first use or by :meth:`warmup`)."""
        return list(dict.fromkeys(pattern for _, pattern in self._variants))

    def reset(self) -> None:
        """Start a new generation (host step counter and the in-graph state)."""
        self.reset_host()
        self.opt.reset()

    def reset_host(self) -> None:
        """Reset only the host-side step counter and its mirrors of the guards' counters; a dispatcher
        that follows the installed table (no ``table=`` given) re-reads it when it changed, so a plan
        fitted by calibration since (``policy="planned"``) applies from the next generation."""
        if self.decide == "host" and self._follow_installed and self._table_version != self.opt.store.table_version:
            self.set_table(None)  # one read per block: not at every generation (a pipeline resets at every call)
        self.step = 0
        self._n = [0] * len(self.block_names)
        self._consecutive = [0] * len(self.block_names)
        self.history.clear()
        self._watch_clock = False

    def _opt_counts(self) -> tuple[int, int]:
        """``opt.restarts()`` and ``opt.host_resets()`` of the live cache context."""
        return self.opt.restarts(), self.opt.host_resets()

    def pattern_for_step(self, step: int) -> tuple[bool, ...]:
        """The host mirror of ``BlockGuard.decide`` for the schedule policy."""
        cfg = self.opt.fastcache_config
        n = len(self.block_names)
        if step >= len(self._table) or not cfg.enable_block_approx or self.opt.force_compute \
                or step < cfg.warmup_steps:
            return (False,) * n
        min_computed = FALLBACKS[cfg.fallback].min_computed
        row = self._table[step]
        out = []
        for i in range(n):
            ok = row[i] and self._n[i] >= min_computed
            ok = ok and (cfg.max_skip_steps <= 0 or self._consecutive[i] < cfg.max_skip_steps)
            out.append(bool(ok))
        return tuple(out)

    # -- compiled pieces --------------------------------------------------------------------
    def _compile(self, gm: fx.GraphModule) -> Any:
        if self.compile_mode == "eager":
            return gm
        return torch.compile(gm, mode=self.compile_mode, fullgraph=True, dynamic=False)

    def _variant(self, entry: Any, pattern: tuple[bool, ...]) -> Any:
        key = (entry.key, pattern)
        got = self._variants.get(key)
        fn = got[1] if got is not None and got[0] is entry.gm else None  # re-captured graph: rebuild
        if fn is None:
            if self.decide == "host":
                gm = specialise(entry.gm, pattern)
            else:
                gm = self._split(entry)[0].suffix(pattern)
            fn = self._compile(gm)
            self._variants[key] = (entry.gm, fn)
            logger.info("fx-fastcache: step dispatch variant %d (%d/%d blocks approximated, %s, decide=%s)",
                        len(self._variants), sum(pattern), len(pattern), self.compile_mode, self.decide)
        return fn

    def _split(self, entry: Any) -> tuple[Any, Any]:
        """(``DecisionSplit``, compiled prefix) of a captured graph, built once."""
        got = self._splits.get(entry.key)
        if got is None or got[0] is not entry.gm:
            split = split_at_decisions(entry.gm, self.opt.fastcache_config.policy)
            got = (entry.gm, split, self._compile(split.prefix))
            self._splits[entry.key] = got
            logger.info("fx-fastcache: step dispatch split the graph: %d decided blocks, %d values cross the cut",
                        len(split.decided_blocks), len(split.prefix.graph.find_nodes(op="output")[0].args[0]) - 1)
        return got[1], got[2]

    def graph_modules(self) -> list[fx.GraphModule]:
        """The graph modules built from the captured graphs (split prefixes, specialised copies): they hold the
        captured graph's tensors themselves (``fx.GraphModule(root, graph)`` copies the references)."""
        return ([split.prefix for _, split, _ in self._splits.values()]
                + [getattr(fn, "_orig_mod", fn) for _, fn in self._variants.values()])  # (torch.compile's wrapper)

    def warmup(self, *args: Any, **kwargs: Any) -> None:
        """Capture and compile every pattern of the table for these inputs (runs each once, then resets)."""
        kw, entry = self.opt.prepare_call(args, kwargs)
        if self.decide == "device":
            split, prefix = self._split(entry)
            flat = split.flatten(kw)
            for p in {split.pattern([v] * len(split.decided_blocks)) for v in (False, True)}:
                with torch.no_grad():
                    self.reset()
                    _, *live = prefix(*flat)
                    self._variant(entry, p)(*flat, *live)
        else:
            for p in [(False,) * len(self.block_names)] + self.patterns:
                with torch.no_grad():
                    self._variant(entry, p)(**kw)
        self.reset()

    # -- calls ------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kw, entry = self.opt.prepare_call(args, kwargs)  # as without dispatch
        restarts, resets = self._opt_counts()
        if resets != self._resets_seen:  # a generation the host cannot see began at this call
            self.reset_host()
            self._watch_clock = restarts != self._restarts_seen  # restarted in the middle: may end early
            self._restarts_seen, self._resets_seen = restarts, resets
        elif self._watch_clock and self.step > 0 and self._new_generation(entry, kw):
            self.reset_host()  # the restarted generation ended before its table did: this call starts the next
        with torch.no_grad():
            if self.decide == "host":
                if self._follow_installed and self._table_version != self.opt.store.table_version:
                    self.set_table(None)  # a plan fitted or changed since (the in-graph guards read it at once too)
                pattern = self.pattern_for_step(self.step)
                out = self._variant(entry, pattern)(**kw)
                if self.step == 1 and float(entry.clock.repeats) > 0:  # one read per generation, at its 2nd call
                    raise RuntimeError(repeat_message("the schedule dispatched on the host, which cannot see the "
                                                      "repeat, gave the second branch the first one's cache; call "
                                                      "fastcache.reset(model) after fixing the calls"))
                if self.step > 0 and self.step >= len(self._table) and self._started_generation(entry):
                    self.reset_host()  # this call was step 0 of the next generation; counted below
            else:
                split, prefix = self._split(entry)
                flat = split.flatten(kw)
                decisions, *live = prefix(*flat)
                pattern = split.pattern(decisions.tolist())  # the step's one device-to-host read
                out = split.unflatten(self._variant(entry, pattern)(*flat, *live))
        if self.decide == "host":  # the host mirror of the guards' counters (pattern_for_step)
            for i, skip in enumerate(pattern):
                self._n[i] += 0 if skip else 1
                self._consecutive[i] = self._consecutive[i] + 1 if skip else 0
        self.history.append(pattern)
        self.step += 1
        if self.clone_outputs:
            out = pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), out)
        return out

    def _new_generation(self, entry: Any, kw: dict[str, Any]) -> bool:
        """Whether this call starts a generation, read before it runs (two host reads: the call's timestep,
        and the graph's step and last timestep together).  Only after a restart, until the next reset: a
        generation restarted in the middle may end before the table does, and the host's pattern for the
        next one's first calls must not come from the count of the one before."""
        t = self.opt.call_timestep(kw)
        if t is None:
            return False
        step, t_last = torch.stack([entry.clock.step, entry.clock.t_last]).tolist()
        return step < 0 or starts_generation_host(t, t_last)

    @staticmethod
    def _started_generation(entry: Any) -> bool:
        """Whether the call just run started a new generation, read from the graph's clock.

        Why: the host counts steps and cannot see a generation end.  Past the table's last
        skipping step every step computes whatever the host believes, so there the clock's step
        (one 0-d device read per such call) tells a new generation from the same one running on,
        and a caller that does not reset between generations gets its plan again, not a silent
        run of computed steps.  A generation abandoned before its table ends still needs a reset.
        """
        return float(entry.clock.step) == 0.0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            opt = self.__dict__["_modules"].get("opt")
            if opt is None:
                raise
            return getattr(opt, name)
