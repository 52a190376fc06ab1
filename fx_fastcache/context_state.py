"""Per-cache-context state for one shared graph: swap state, not graphs.

Why this exists: a diffusers pipeline with classifier-free guidance as two transformer calls
per step (Flux true-CFG, Wan) runs them in ``cache_context("cond")`` / ``("uncond")``; each
context needs its own clock, cached residuals and decider state, but not its own graph.  One
captured (exported, rewritten, compiled) graph per input signature serves every context; this
module keeps the run-time state of the contexts that are not running in *banks* and swaps it
into the graph's buffers, in place, when the context changes.  The buffers keep their identity
and address, so a compiled graph or a CUDA graph replays without recompiling.

Memory: the live context's state is in the graph's buffers and each other context holds one
bank, so ``contexts × state`` as with one module per context, plus one tensor of scratch during
a swap.  What is swapped: every buffer of the clock, the guards (their fallbacks, deciders and
token routers) and the step decider, except

* run-time knobs shared by all contexts (clock threshold / warm-up / enable / force /
  max-skip, ``never_skip``, a decider's ``_persistent_state``: calibrated scales, tables);
* calibration tensors of the model's store (shared by identity);
* statistics counters (guard ``skipped`` / ``evaluations``, the clock's call and repeat counts, the token
  routers' counts): they keep counting over every context, as ``get_cache_statistics``
  reports the sum.  (The clock's call count is also the step source of models *without* a
  timestep input; diffusers pipelines always pass one.)

A context seen for the first time starts from the fresh state (what ``reset`` gives).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from . import graph_protocol as gp

logger = logging.getLogger(__name__)

__all__ = ["ContextStates", "restart_state", "swappable_buffers"]

#: Buffer names that are not per-context state (knobs and statistics, see the module docstring).
SHARED = frozenset({"threshold", "warmup", "enabled", "force", "max_skip", "calls", "repeats", "never_skip", "skipped",
                    "evaluations", "static_tokens", "total_tokens", "routed_calls"})


def swappable_buffers(gm: torch.nn.Module, store: Any) -> list[tuple[str, torch.Tensor]]:
    """``(qualified name, buffer)`` of every per-context state tensor of a rewritten graph.  Only the
    FastCache children are walked, not the model's module tree the graph also holds (every context
    switch calls this: walking the whole graph cost 0.5 ms per call on a Wan-sized tree)."""
    constants = {id(t) for t in store.tensors.values()}
    out = []
    states = [(name, child) for name, child in gm.named_children() if gp.is_state_module(name)]
    for mname, mod in ((q, m) for name, child in states for q, m in child.named_modules(prefix=name)):
        keep = set(getattr(mod, "_persistent_state", ()))
        for bname, buf in mod.named_buffers(recurse=False):
            if bname in SHARED or bname in keep or id(buf) in constants:
                continue
            out.append((f"{mname}.{bname}", buf))
    return out


def _fresh_(name: str, buf: torch.Tensor) -> None:
    """The value ``reset`` gives (the clock's ``t_last``/``step`` are not zero)."""
    if name == f"{gp.CLOCK}.t_last":
        buf.fill_(float("-inf"))
    elif name == f"{gp.CLOCK}.step":
        buf.fill_(-1.0)
    else:
        buf.zero_()


def restart_state(gm: torch.nn.Module, store: Any) -> None:
    """Give the live context's state in ``gm`` the values ``reset`` gives (its next call starts a new
    generation), leaving knobs, statistics and calibration as they are."""
    for q, t in swappable_buffers(gm, store):
        _fresh_(q, t)


class ContextStates:
    """Which context's state is live in the graphs, and the banks of the others."""

    def __init__(self) -> None:
        self.live: str | None = None
        self.banks: dict[str, dict[tuple, dict[str, torch.Tensor]]] = {}
        self.swaps = 0

    def clear(self) -> None:
        """Forget the other contexts' state (they start fresh when they run next)."""
        self.banks.clear()

    def activate(self, name: str, entries: list, store: Any) -> None:
        """Make ``name``'s state live in every captured graph (``entries``), banking the current one."""
        if self.live is None:
            self.live = name
        if name == self.live:
            return
        incoming = self.banks.pop(name, {})
        outgoing = self.banks.setdefault(self.live, {})
        with torch.no_grad():
            for e in entries:
                bufs = swappable_buffers(e.gm, store)
                bank = incoming.pop(e.key, None)
                if bank is None:  # first run of this context on this graph: fresh state
                    saved = {q: t.clone() for q, t in bufs}
                    for q, t in bufs:
                        _fresh_(q, t)
                else:  # exchange contents in place: the graph's buffers keep their address
                    for q, t in bufs:
                        other = bank[q]
                        tmp = t.clone()
                        t.copy_(other)
                        other.copy_(tmp)
                    saved = bank
                outgoing[e.key] = saved
        self.live = name
        self.swaps += 1

    def state(self, name: str, entries: list, store: Any) -> dict[tuple, dict[str, torch.Tensor]]:
        """The state tensors of context ``name`` per graph key (live buffers or its bank)."""
        if name == self.live:
            return {e.key: dict(swappable_buffers(e.gm, store)) for e in entries}
        return dict(self.banks.get(name, {}))

    def nbytes(self) -> int:
        """Bytes held in banks (the live state is in the graphs' buffers)."""
        return sum(t.numel() * t.element_size() for b in self.banks.values() for d in b.values() for t in d.values())
