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

    def make_block_decider(self, index, block, signal_shape, device, dtype, store, group=None):
        return ScheduleDecider(block, device, store)
