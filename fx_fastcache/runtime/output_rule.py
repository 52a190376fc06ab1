"""Fitted output rule: a planned generation's output at every step, as a fitted linear rule of the computed steps.

Why it exists: with a plan fixed, the model never reads a skipped step's latent; only the latents at the computed
steps and the final one matter.  A linear cache rule reaches them as

    x_{j'} = x_j + Σ_{k=j}^{j'−1} Δσ_k · u_n,     u_n = a_n · v_k + Σ_i c_{n,i} V_{n−i} + G_n · x_j

(interval ``n`` runs from computed step ``j`` to the next computed step ``j'``; ``V``: the model's outputs at the
last :data:`HISTORY` computed steps, ``x_j`` the latent at the last one, ``v_k`` the output the graph would return
without the rule).  Its numbers, fitted end to end through the sampler on calibration generations
(:func:`fx_fastcache.fit_output_rule`), raised the mean of 70 %-replaced generations by 1.8–2.6 dB on the five trained
models where the forecast, noise-forecast and drift rules stop (docs/BENCHMARKS.md, "Thirty-first session").

The table has one row ``[a, c_0 … c_{HISTORY−1}, G]`` per step (the calibration store's :data:`TABLE_KEY`, installed
per fraction by the planned policy).  The identity row ``[1, 0, …, 0]`` returns the graph's output unchanged, so an
unfitted fraction, a step past the table and a fraction where the fit lost keep the library's rules; a fitted row
has ``a = 0`` and the output depends only on the computed steps.  Everything is elementwise on the model's first
output and its latent input, row by row: with batched classifier-free guidance both rows share the latent and the
coefficients, so the guided velocity gets the same rule (it is linear).  State: :data:`HISTORY` outputs and one
latent per cache context; decisions, counts and the blocks' state are untouched.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .state_ops import Flag, assign, keep_or, negate, shift

#: Calibration store key of the installed table (``[steps, 2 + HISTORY]`` float32, shared by every graph).
TABLE_KEY = "output_rule.table"
#: Computed outputs each step's rule combines.
HISTORY = 3
#: Columns of a table row: ``a``, the ``HISTORY`` coefficients, ``G``.
COLUMNS = 2 + HISTORY
#: Rows of the installed table: every graph holds the same tensor, written in place whatever step count the plans
#: are for (steps past a plan's have identity rows).
TABLE_ROWS = 1024


def identity_rows(steps: int = TABLE_ROWS, device: torch.device | str = "cpu") -> torch.Tensor:
    """A table that leaves every step's output as the graph made it."""
    table = torch.zeros(steps, COLUMNS, dtype=torch.float32, device=device)
    table[:, 0] = 1.0
    return table


class OutputRule(nn.Module):
    _is_impure = True  # mutates its buffers: never dead-code-eliminated

    _persistent_state = ("table",)  # the store's tensor: not per-context state, kept by reset

    def __init__(self, shape: tuple[int, ...], device: torch.device, table: torch.Tensor) -> None:
        """``shape``: the model output's (= its latent input's) shape; ``table``: the store's :data:`TABLE_KEY`."""
        super().__init__()
        if table.ndim != 2 or table.shape[1] != COLUMNS:
            raise ValueError(f"OutputRule: the table has shape {tuple(table.shape)}, expected [steps, {COLUMNS}]")
        self.register_buffer("table", table)
        for i in range(HISTORY):  # the outputs of the last computed steps, newest first
            self.register_buffer(f"h{i}", torch.zeros(shape, dtype=torch.float32, device=device))
        self.register_buffer("x_c", torch.zeros(shape, dtype=torch.float32, device=device))

    def forward(self, skipped: Flag, new_gen: torch.Tensor, step: torch.Tensor, x: torch.Tensor,
                raw: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The output at step ``step`` (the clock's): ``raw`` is the model's output before the other output stages,
        ``v`` the graph's output (after them), ``x`` the latents."""
        n = self.table.shape[0]
        inside = (step >= 0) & (step < n)
        row = self.table.index_select(0, step.clamp(0, n - 1).long().reshape(1))[0]  # (a tensor index: no sync)
        row = torch.where(inside, row, torch.ones_like(row) * (torch.arange(COLUMNS, device=row.device) == 0))
        computed = negate(skipped)
        rf, xf = raw.float(), x.float()
        # the history at this step: a new generation drops the previous one's; a computed step joins it
        hist = [torch.where(new_gen, torch.zeros_like(h), h) for h in (getattr(self, f"h{i}") for i in range(HISTORY))]
        now = [keep_or(computed, rf, hist[0])] + [keep_or(computed, hist[i - 1], hist[i]) for i in range(1, HISTORY)]
        x_c = keep_or(computed, xf, torch.where(new_gen, torch.zeros_like(self.x_c), self.x_c))
        out = row[0] * v.float() + row[HISTORY + 1] * x_c
        for i in range(HISTORY):
            out = out + row[1 + i] * now[i]
        for i in range(HISTORY - 1, 0, -1):
            shift(getattr(self, f"h{i}"), computed, hist[i - 1])
        assign(self.h0, computed, rf)
        assign(self.x_c, computed, xf)
        return out.to(v.dtype)

    def reset(self) -> None:
        for name, b in self.named_buffers():
            if name not in self._persistent_state:
                b.zero_()
