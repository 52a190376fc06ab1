"""Step-level dispatch: decide on the host once per step, replay a graph specialised for that step.

Why this exists: on CUDA, inductor lowers every ``torch.cond`` to ``if pred.item():`` (a
device-to-host sync per guarded block, no CPU/GPU overlap), and CUDA graphs are skipped for
graphs that contain ``cond``.  For a *fixed schedule* nothing needs the device to decide: the
skip pattern of every step is known on the host.  :class:`StepDispatch` therefore

1. takes the rewritten graph of a :class:`~fx_fastcache.module.FastCacheModule` (``policy="schedule"``),
2. for each distinct skip pattern (a tuple of bools, one per block) builds a *specialised*
   copy in which every ``cond`` is replaced by a direct call of the chosen branch (the block or
   the fallback) and the guard's predicate by a constant, so the graph has no ``cond`` at all,
3. compiles each copy with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) and, per
   call, picks the copy for the current step from a host-side step counter: no sync at all.

The copies share the original graph's submodules (clock, guards, fallback state buffers), so
cached residuals, statistics and calibration tensors are the same objects whichever copy runs,
and ``fastcache.get_cache_statistics(dispatch.opt)`` keeps working.  The host mirrors the
guard's static conditions (warm-up, enable/force switches, "computed at least once since the
generation began", ``max_skip_steps``), so a dispatched run computes exactly what the in-graph
schedule policy computes.

The host step counter cannot see a new generation without reading the timestep (a sync), so
call :meth:`StepDispatch.reset` before each generation (``enable_fastcache(pipe,
step_dispatch=True)`` does it at every pipeline call).
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .module import CapturedGraph, FastCacheModule

logger = logging.getLogger(__name__)

__all__ = ["StepDispatch", "specialise", "COMPILE_MODES"]

COND = torch.ops.higher_order.cond
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "eager")


def _guard_index(node: fx.Node) -> int:
    if node.op != "call_module" or not str(node.target).startswith("fastcache_guard_"):
        raise RuntimeError(f"cond predicate {node.name} is not a guard call; cannot specialise this graph")
    return int(str(node.target).rsplit("_", 1)[1])


def specialise(gm: fx.GraphModule, pattern: tuple[bool, ...]) -> fx.GraphModule:
    """A copy of the rewritten graph with every ``cond`` resolved by ``pattern[block]``.

    The copy shares ``gm``'s submodules and buffers (state), it only has a different graph.
    """
    graph = copy.deepcopy(gm.graph)  # keeps the pytree codegen (keyword / nested inputs) of ep.module()
    conds = [n for n in graph.nodes if n.op == "call_function" and n.target is COND]
    if not conds:
        raise RuntimeError("the graph has no guarded blocks (torch.cond); nothing to specialise")
    for cond in conds:
        pred, cheap, full, operands = cond.args
        i = _guard_index(pred)
        if i >= len(pattern):
            raise ValueError(f"skip pattern has {len(pattern)} entries but the graph guards block {i}")
        skip = bool(pattern[i])
        branch = cheap if skip else full
        val = next((o.meta.get("val") for o in operands if isinstance(o, fx.Node)
                    and isinstance(o.meta.get("val"), torch.Tensor)), None)
        device = val.device if val is not None else torch.device("cpu")
        with graph.inserting_before(cond):
            call = graph.call_module(branch.target, tuple(operands))
            const = graph.call_function(torch.full, ((), skip), {"dtype": torch.bool, "device": device})
        cond.replace_all_uses_with(call)
        for user in list(pred.users):  # the guard's "update" reads the predicate
            user.replace_input_with(pred, const)
        graph.erase_node(cond)
        for n in (cheap, full):
            if n.op == "get_attr" and not n.users:
                graph.erase_node(n)
        if not pred.users:  # the "decide" call only reads state: drop it
            graph.erase_node(pred)
    new = fx.GraphModule(gm, graph)
    for attr in ("_in_spec", "_out_spec", "range_constraints", "equality_constraints"):
        if hasattr(gm, attr) and not hasattr(new, attr):
            setattr(new, attr, getattr(gm, attr))
    new.graph.lint()
    new.recompile()
    return new


class StepDispatch(nn.Module):
    """Per-step host dispatch to specialised, optionally CUDA-graphed, copies of ``opt``'s graph.

    Args:
        opt: a model from ``fastcache.optimize(model, policy="schedule", ...)`` (any backend;
            the specialised copies are compiled here according to ``compile_mode``).
        table: ``steps × blocks`` bool skip table (True = approximate).  ``None`` reads the table
            installed with ``fastcache.set_schedule(opt, table)`` (one device read, here).
        compile_mode: ``"reduce-overhead"`` (inductor + CUDA graphs), ``"default"``,
            ``"max-autotune"`` or ``"eager"`` (no compile; for CPU tests).
        clone_outputs: copy outputs out of the CUDA-graph pool (a later replay overwrites them).
    """

    def __init__(self, opt: FastCacheModule, table: torch.Tensor | None = None,
                 compile_mode: str = "reduce-overhead", clone_outputs: bool | None = None) -> None:
        super().__init__()
        if not isinstance(opt, FastCacheModule):
            raise TypeError(f"StepDispatch expects the module returned by fastcache.optimize(), "
                            f"got {type(opt).__name__}")
        if opt.fastcache_config.policy != "schedule":
            raise ValueError(f"StepDispatch needs policy='schedule' (decisions known on the host); this model uses "
                             f"policy={opt.fastcache_config.policy!r}: optimize(model, policy='schedule') and "
                             f"set a table")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={compile_mode!r} is not supported; choose one of {COMPILE_MODES}")
        self.opt = opt
        self.compile_mode = compile_mode
        self.clone_outputs = (compile_mode == "reduce-overhead") if clone_outputs is None else clone_outputs
        from .api import _blocks

        self.block_names = [name for name, _, _ in _blocks(opt)]
        self._table: list[tuple[bool, ...]] = []
        self._variants: dict[tuple, Any] = {}
        self.set_table(table)
        self.reset()

    # -- schedule ---------------------------------------------------------------------------
    def set_table(self, table: torch.Tensor | None) -> None:
        """Install a new ``steps × blocks`` table (specialised copies are kept and reused)."""
        n = len(self.block_names)
        if table is None:
            cols = [self.opt.store.tensors.get(f"{name}.schedule") for name in self.block_names]
            if any(c is None for c in cols):
                raise ValueError("no schedule installed: pass table=... or call fastcache.set_schedule(opt, table) "
                                 "first")
            table = torch.stack([c.detach().cpu() for c in cols], dim=1)
            nz = table.any(dim=1).nonzero()
            table = table[: int(nz.max()) + 1] if len(nz) else table[:1]
        table = torch.as_tensor(table, dtype=torch.bool).cpu()
        if table.ndim != 2 or table.shape[1] != n:
            raise ValueError(f"schedule table has shape {tuple(table.shape)}; expected (steps, {n} blocks)")
        self._table = [tuple(bool(v) for v in row) for row in table.tolist()]

    @property
    def patterns(self) -> list[tuple[bool, ...]]:
        return list(dict.fromkeys(self._table))

    def reset(self) -> None:
        """Start a new generation (host step counter and the in-graph state)."""
        self.reset_host()
        self.opt.reset()

    def reset_host(self) -> None:
        """Reset only the host-side step counter and its mirrors of the guards' counters."""
        self.step = 0
        self._n = [0] * len(self.block_names)
        self._consecutive = [0] * len(self.block_names)

    def pattern_for_step(self, step: int) -> tuple[bool, ...]:
        """The host mirror of ``BlockGuard.decide`` for the schedule policy."""
        cfg = self.opt.fastcache_config
        n = len(self.block_names)
        if step >= len(self._table) or not cfg.enable_block_approx or self.opt._force_compute \
                or step < cfg.warmup_steps:
            return (False,) * n
        from .fallbacks import FALLBACKS

        min_computed = FALLBACKS[cfg.fallback].min_computed
        row = self._table[step]
        out = []
        for i in range(n):
            ok = row[i] and self._n[i] >= min_computed
            ok = ok and (cfg.max_skip_steps <= 0 or self._consecutive[i] < cfg.max_skip_steps)
            out.append(bool(ok))
        return tuple(out)

    # -- calls ------------------------------------------------------------------------------
    def _variant(self, entry: CapturedGraph, pattern: tuple[bool, ...]) -> Any:
        key = (entry.key, pattern)
        got = self._variants.get(key)
        fn = got[1] if got is not None and got[0] is entry.gm else None  # re-captured graph: rebuild
        if fn is None:
            gm = specialise(entry.gm, pattern)
            if self.compile_mode == "eager":
                fn = gm
            else:
                fn = torch.compile(gm, mode=self.compile_mode, fullgraph=True, dynamic=False)
            self._variants[key] = (entry.gm, fn)
            logger.info("fx-fastcache: step dispatch variant %d (%d/%d blocks approximated, %s)", len(self._variants),
                        sum(pattern), len(pattern), self.compile_mode)
        return fn

    def warmup(self, *args: Any, **kwargs: Any) -> None:
        """Capture and compile every pattern of the table for these inputs (runs each once, then resets)."""
        kw = self.opt._bind(args, kwargs)
        entry = self.opt.capture(**kw)
        for p in [(False,) * len(self.block_names)] + self.patterns:
            with torch.no_grad():
                self._variant(entry, p)(**kw)
        self.reset()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        opt = self.opt
        kw = opt._bind(args, kwargs)
        opt._check_inputs(kw)
        key = opt._key(kw)
        entry = opt._entries.get(key) or opt.capture(**kw)
        opt._last_key = key
        pattern = self.pattern_for_step(self.step)
        fn = self._variant(entry, pattern)
        with torch.no_grad():
            out = fn(**kw)
        for i, skip in enumerate(pattern):
            self._n[i] += 0 if skip else 1
            self._consecutive[i] = self._consecutive[i] + 1 if skip else 0
        self.step += 1
        if self.clone_outputs:
            out = pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), out)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            opt = self.__dict__["_modules"].get("opt")
            if opt is None:
                raise
            return getattr(opt, name)
