"""A precomputed skip schedule: ``table[step, block]`` (True = approximate).

Decisions come from the table instead of a statistic, which makes runs deterministic and
export possible.  Steps past the table's end compute in full.  Set the table with
``fastcache.set_schedule(model, table)``.
"""
from __future__ import annotations

import torch

from .base import Decider, Policy

MAX_STEPS = 1024


class ScheduleDecider(Decider):
    def __init__(self, block: str, device, store) -> None:
        super().__init__()
        self.register_buffer("column", store.get(f"{block}.schedule", (MAX_STEPS,),
                                                 lambda: torch.zeros(MAX_STEPS, dtype=torch.bool, device=device)))
        self._persistent_state = ("column",)

    def forward(self, step, new_gen, ok, threshold, t, signal):
        # index_select, not column[idx]: dynamo (torch 2.11) turns a 0-d tensor index into a
        # data-dependent int and fails under fullgraph compile
        idx = step.clamp(0, MAX_STEPS - 1).to(torch.long).reshape(1)
        return ok & self.column.index_select(0, idx).reshape(())


class SchedulePolicy(Policy):
    name = "schedule"
    scope = "block"
    signal = None

    def make_block_decider(self, index, block, signal_shape, device, dtype, store):
        return ScheduleDecider(block, device, store)

    def span_groups(self, block_names, store):
        """Consecutive blocks whose table columns are equal, read from the table installed at
        capture; no table yet: one span per block.  ``fastcache.set_schedule`` re-captures when
        a new table splits a span of an existing graph (``span_conflicts``)."""
        cols = [store.tensors.get(f"{name}.schedule") for name in block_names]
        if not block_names or any(c is None for c in cols):
            return [[i] for i in range(len(block_names))]
        groups = [[0]]
        for i in range(1, len(cols)):
            if torch.equal(cols[i], cols[groups[-1][0]]):
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups
