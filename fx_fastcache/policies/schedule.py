"""A precomputed skip schedule: ``table[step, block]`` (True = approximate).

Decisions come from the table instead of a statistic, which makes runs deterministic and
export possible.  Steps past the table's end compute in full.  Set the table with
``fastcache.set_schedule(model, table)``.
"""
from __future__ import annotations

import torch

from ..schedule_table import check_schedule_table
from .base import Decider, Policy

MAX_STEPS = 1024


_SUFFIX = ".schedule"


def store_key(block: str) -> str:
    """The calibration store key of a block's schedule column (``MAX_STEPS`` bools)."""
    return f"{block}{_SUFFIX}"


def scheduled_blocks(store) -> list[str]:
    """The blocks that have a schedule column in ``store`` (the inverse of :func:`store_key`)."""
    return [k[: -len(_SUFFIX)] for k in store.tensors if k.endswith(_SUFFIX)]


def install_table(store, blocks: list[str], table: torch.Tensor, device: torch.device) -> None:
    """Write a ``steps × blocks`` bool table into ``store`` (in place: captured graphs read the same tensors)."""
    table = check_schedule_table(table, n_blocks=len(blocks), max_steps=MAX_STEPS)  # strict: no coercion to bool
    for j, name in enumerate(blocks):
        col = torch.zeros(MAX_STEPS, dtype=torch.bool, device=device)
        col[: table.shape[0]] = table[:, j].to(device)
        cur = store.tensors.get(store_key(name))
        if cur is None:
            store.tensors[store_key(name)] = col
        else:
            cur.copy_(col)
    store.table_version += 1


def trim_table(table: torch.Tensor) -> torch.Tensor:
    """``table`` without the rows after its last skipping step (at least one row)."""
    nz = table.any(dim=1).nonzero()
    return table[: int(nz.max()) + 1] if len(nz) else table[:1]


def read_table(store, blocks: list[str]) -> torch.Tensor | None:
    """The installed table, trimmed after its last skipping step (``None``: none installed)."""
    cols = [store.tensors.get(store_key(name)) for name in blocks]
    if any(c is None for c in cols):
        return None
    return trim_table(torch.stack([c.detach().cpu() for c in cols], dim=1))


class ScheduleDecider(Decider):
    def __init__(self, block: str, device, store) -> None:
        super().__init__()
        self.register_buffer("column", store.get(store_key(block), (MAX_STEPS,),
                                                 lambda: torch.zeros(MAX_STEPS, dtype=torch.bool, device=device)))
        self._persistent_state = ("column",)

    def forward(self, step, new_gen, ok, threshold, t, signal):
        # index_select, not column[idx]: dynamo (torch 2.11) turns a 0-d tensor index into a
        # data-dependent int and fails under fullgraph compile
        # steps past the table compute (as step dispatch's host mirror does), not the last row again
        idx = step.clamp(0, MAX_STEPS - 1).to(torch.long).reshape(1)
        return ok & (step < MAX_STEPS) & self.column.index_select(0, idx).reshape(())


class SchedulePolicy(Policy):
    name = "schedule"
    scope = "block"
    signal = None
    host_decidable = True
    exportable = True

    @staticmethod
    def install_table(store, blocks, table, device) -> None:
        install_table(store, blocks, table, device)

    @staticmethod
    def read_table(store, blocks):
        return read_table(store, blocks)

    def make_block_decider(self, index, block, signal_shape, device, dtype, store, group=None):
        return ScheduleDecider(block, device, store)

    def span_groups(self, block_names, store):
        """Consecutive blocks whose table columns are equal, read from the table installed at
        capture; no table yet: one span per block.  ``fastcache.set_schedule`` re-captures when
        a new table splits a span of an existing graph (``span_conflicts``)."""
        cols = [store.tensors.get(store_key(name)) for name in block_names]
        if not block_names or any(c is None for c in cols):
            return [[i] for i in range(len(block_names))]
        groups = [[0]]
        for i in range(1, len(cols)):
            if torch.equal(cols[i], cols[groups[-1][0]]):
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups
