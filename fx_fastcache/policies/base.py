"""Who decides that a block may be approximated: the policy strategy interface.

A policy decides either once per step (``scope = "step"``: one decider module runs at an
anchor point and every block's guard reads its verdict) or per block (``scope = "block"``:
one decider per block).  Deciders are ``nn.Module``\\ s called inside the graph as
``decider(step, new_gen, ok, threshold, t, signal) -> pred`` where ``ok`` already folds in
warm-up, enable switch, forced compute and the fallback's readiness; ``pred`` is a 0-d bool
tensor (True = approximate).  A decider updates its own reference state with ``torch.where``
on ``pred``.  ``signal`` is what the policy looks at:

* ``"probe"``: the block's *modulated input* (the input of its first linear layer that reads
  the hidden states, e.g. ``attn1.to_q``), which sees the timestep through adaLN;
* ``"residual0"``: block 0's residual (output − input), available after block 0 ran;
* ``None``: nothing (precomputed schedules).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Policy:
    name: str = ""
    scope: str = "block"  # "block" | "step"
    signal: str | None = "probe"
    #: Where a step policy decides: "before_block0" or "after_block0".
    anchor: str = "before_block0"

    def __init__(self, config) -> None:
        self.config = config

    def make_step_decider(self, signal_shape: tuple[int, ...], device, dtype, store) -> nn.Module | None:
        return None

    def make_block_decider(self, index: int, block: str, signal_shape: tuple[int, ...] | None, device, dtype,
                           store) -> nn.Module | None:
        return None

    def never_skip(self, index: int) -> bool:
        return False

    def span_groups(self, block_names: list[str], store) -> list[list[int]]:
        """Runs of consecutive blocks that always share this policy's decision (``span="auto"``,
        ``passes/group_spans.py``).  A step-level policy: one span of the blocks after its anchor
        (First-Block-Cache's block 0 alone, as it always computes); a per-block policy: one per block."""
        n = len(block_names)
        if self.scope == "step":
            lead = 1 if self.anchor == "after_block0" else 0
            return [[i] for i in range(min(lead, n))] + ([list(range(lead, n))] if n > lead else [])
        return [[i] for i in range(n)]


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each sample (dim 0) in float32."""
    return x.float().flatten(1).norm(dim=1)


def per_sample_mean_abs(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).abs().mean(dim=1)


class Decider(nn.Module):
    _is_impure = True  # mutates its buffers: never dead-code-eliminated

    def computed_count(self, new_gen: torch.Tensor) -> torch.Tensor:
        """Full computations seen in this generation (the ``n`` buffer, zero on a new one)."""
        return torch.where(new_gen, torch.zeros_like(self.n), self.n)

    def count_computed(self, n: torch.Tensor, pred: torch.Tensor) -> None:
        """``n ← n + 1`` if this step was computed (``pred`` False)."""
        self.n.copy_(n + (~pred).to(n.dtype))

    def reset(self) -> None:
        for name, buf in self.named_buffers(recurse=False):
            if name in getattr(self, "_persistent_state", ()):
                continue
            buf.zero_()
