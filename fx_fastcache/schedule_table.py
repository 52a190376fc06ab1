"""Strict validation of a ``steps x blocks`` skip table (``set_schedule``, schedule files).

Why it exists: ``torch.as_tensor(table, dtype=torch.bool)`` and ``bool(v)`` turn any number,
``None`` or float into a boolean without a word (``0.3`` -> True, ``None`` -> False, ``2`` ->
True), so a hand-edited or generated table with the wrong values silently replayed another
schedule.  Here only booleans are accepted: Python ``bool``/``numpy.bool_`` entries, or a
tensor/array of dtype bool; anything else fails naming the row, the column, the value and
the fix.  A leaf module (torch only) so that the public API and the export package can both
call it.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_schedule_table"]

_FIX = "use true/false (JSON) or a torch.bool tensor; True = approximate that block at that step"


def _describe(v: Any) -> str:
    if v is None:
        return "null (None)"
    return f"{v!r} ({type(v).__name__})"


def _is_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return True
    try:
        import numpy as np

        return isinstance(v, np.bool_)
    except ImportError:  # pragma: no cover - numpy is a dependency
        return False


def check_schedule_table(table: Any, n_blocks: int | None = None, max_steps: int | None = None,
                         source: str = "schedule table") -> torch.Tensor:
    """Return ``table`` as a (steps, blocks) ``torch.bool`` tensor, or raise naming what is wrong.

    Args:
        table: a bool tensor / numpy array, or a list of rows, each a list of booleans.
        n_blocks: the number of blocks each row must have (None: not checked).
        max_steps: the most rows allowed (the schedule policy's ``MAX_STEPS``; None: not checked).
        source: how messages name the table (e.g. ``"schedule file 'S.json'"``).

    Raises:
        TypeError: the table is not a list of lists / a bool tensor, or an entry is not a boolean.
        ValueError: the table is empty, ragged, has the wrong number of blocks or too many steps.
    """
    if isinstance(table, torch.Tensor) or type(table).__module__ == "numpy":
        t = torch.as_tensor(table)
        if t.dtype != torch.bool:
            raise TypeError(f"{source} has dtype {t.dtype}; expected torch.bool. Numbers are not coerced: "
                            f"convert explicitly (e.g. table.bool() for nonzero = approximate, or table > 0.5)")
        if t.ndim != 2:
            raise ValueError(f"{source} has shape {tuple(t.shape)}; expected 2 dimensions (steps, blocks)")
    else:
        if not isinstance(table, (list, tuple)):
            raise TypeError(f"{source} is a {type(table).__name__}; expected a list of rows (one per step), "
                            f"each a list of booleans (one per block)")
        width = None
        for i, row in enumerate(table):
            if not isinstance(row, (list, tuple)):
                raise TypeError(f"{source}: row {i} is {_describe(row)}; expected a list of booleans "
                                f"(one per block); {_FIX}")
            for j, v in enumerate(row):
                if not _is_bool(v):
                    raise TypeError(f"{source}: row {i}, column {j} is {_describe(v)}; expected a boolean. "
                                    f"Numbers and nulls are not coerced: {_FIX}")
            if width is None:
                width = len(row)
            elif len(row) != width:
                raise ValueError(f"{source}: row {i} has {len(row)} entries but row 0 has {width}; every row "
                                 f"needs one entry per block")
        t = torch.tensor([[bool(v) for v in row] for row in table], dtype=torch.bool)
        if t.ndim == 1:  # [] or [[]]-like degenerate tables
            t = t.reshape(len(table), 0)
    steps, blocks = t.shape
    if steps == 0:
        raise ValueError(f"{source} is empty (0 steps); record at least one step")
    if n_blocks is not None and blocks != n_blocks:
        raise ValueError(f"{source} has {blocks} entries per row (shape {tuple(t.shape)}) but {n_blocks} "
                         f"blocks are expected (one entry per block)")
    if max_steps is not None and steps > max_steps:
        raise ValueError(f"{source} has {steps} steps; the schedule policy holds at most {max_steps} "
                         f"(steps past the table compute in full: trim it to {max_steps} rows)")
    return t
