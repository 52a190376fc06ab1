"""What starts a new generation: the one rule, in the graph and on the host.

Why it exists: every cached tensor belongs to one generation (one sampling loop).  Samplers walk
the timestep *down*, so a call starts a new generation when

1. nothing ran since the state was created or reset (``fastcache.reset``, a pipeline call), or
2. its timestep is above the previous call's (a new sampling loop started from the top), or
3. its timestep is not finite (NaN or inf: no forecast in ``t`` can hold across it).

The clock applies the rule in the graph (:func:`starts_generation`); the ONNX runner and the
shape-change check of :class:`~fx_fastcache.module.FastCacheModule` apply the same rule to host
floats (:func:`starts_generation_host`).  Calibration reads the graph's own flag.
"""
from __future__ import annotations

import math

import torch


def starts_generation(t: torch.Tensor, t_last: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """In-graph rule: ``t`` is this call's scalar timestep, ``t_last`` the previous call's (−inf after
    a reset) and ``step`` the previous call's step (< 0 after a reset).  A 0-d bool tensor."""
    return (t > t_last) | (step < 0) | ~torch.isfinite(t)


def starts_generation_host(t: float | None, t_last: float | None) -> bool:
    """The same rule on host floats (``t_last`` ``None``: nothing ran since the last reset)."""
    if t_last is None:
        return True
    if t is None:
        return False
    return not math.isfinite(t) or t > t_last
