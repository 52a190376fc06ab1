"""Per-block guard: turns the policy's verdict into the ``torch.cond`` predicate and keeps the
fallback's state and the statistics up to date after the block ran (or was approximated).

Called twice per block from the graph: ``guard("decide", *DecideArgs)`` before the ``cond`` and
``guard("update", *UpdateArgs)`` after it (built and read only by :mod:`fx_fastcache.graph_protocol`).  One module per block keeps the graph readable in the
diff tool (``fastcache_guard_3``) and keeps every buffer owned by exactly one module.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..graph_protocol import DECIDE, UPDATE
from .state_ops import as_count, keep_or, negate


class BlockGuard(nn.Module):
    _is_impure = True  # mutates its buffers: never dead-code-eliminated

    def __init__(self, index: int, name: str, fallback: nn.Module, decider: nn.Module | None,
                 never_skip: bool = False) -> None:
        super().__init__()
        self.index = index
        self.block_name = name
        #: Names of the blocks this guard covers: ``(name,)``, or every block of a guarded span.
        self.blocks: tuple[str, ...] = (name,)
        self.fallback = fallback
        self.decider = decider
        self.register_buffer("never_skip", torch.tensor(1.0 if never_skip else 0.0))
        self.register_buffer("consecutive", torch.tensor(0.0))
        self.register_buffer("skipped", torch.tensor(0.0))
        self.register_buffer("evaluations", torch.tensor(0.0))
        self.router: nn.Module | None = None  # token routing state, set by passes/route_tokens.py
        self._recorder: Any = None

    def forward(self, op: str, *args: Any):
        if op == DECIDE:
            return self.decide(*args)
        if op == UPDATE:
            return self.update(*args)
        raise ValueError(f"BlockGuard op {op!r}; expected {DECIDE!r} or {UPDATE!r}")

    def decide(self, step, new_gen, ok, threshold, t, max_skip, signal, step_pred):
        n = torch.where(new_gen, torch.zeros_like(self.fallback.n), self.fallback.n)
        consecutive = torch.where(new_gen, torch.zeros_like(self.consecutive), self.consecutive)
        ok = ok & (n >= self.fallback.min_computed) & (self.never_skip <= 0)
        ok = ok & ((max_skip <= 0) | (consecutive < max_skip))
        if self.decider is not None:
            pred = self.decider(step, new_gen, ok, threshold, t, signal)
        elif step_pred is None:  # blocks before a step policy's anchor (First-Block-Cache's block 0) compute
            pred = torch.zeros_like(ok)
        else:
            pred = step_pred & ok
        return pred

    def update(self, pred, new_gen, t, n_streams: int, *ins_outs):
        """``pred`` is the cond's predicate, or a plain ``bool`` in a step-dispatch copy
        (``step_dispatch.specialise``): then the fallback's state update is a straight copy (or
        nothing) instead of a full-tensor select."""
        ins, outs = ins_outs[:n_streams], ins_outs[n_streams:]
        self.fallback.update(negate(pred), new_gen, t, ins, outs)
        consecutive = torch.where(new_gen, torch.zeros_like(self.consecutive), self.consecutive)
        self.consecutive.copy_(keep_or(pred, consecutive + 1, torch.zeros_like(consecutive)))
        self.skipped.add_(as_count(pred, self.skipped.dtype))
        self.evaluations.add_(1.0)
        if self._recorder is not None:
            self._recorder.record(self, new_gen, t, ins, outs)
        return pred

    def reset(self) -> None:
        self.consecutive.zero_()
        self.skipped.zero_()
        self.evaluations.zero_()
        self.fallback.reset()
        if self.router is not None:
            self.router.reset()
        if self.decider is not None:
            self.decider.reset()
