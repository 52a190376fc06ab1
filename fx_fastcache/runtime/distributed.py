"""Global decisions under context parallelism: the statistic's sums, summed over the ranks.

Why this exists: with diffusers' context parallelism (``model.enable_parallelism``) every rank
holds a slice of the tokens, so a statistic computed on the local tokens differs per rank.
Ranks that disagree about a skip diverge in the collectives inside the block (one rank runs the
block's all-to-all, the other does not) and hang.  Every policy's statistic is a ratio of sums
over tokens (squared norms, absolute sums), so each decider computes its local sums, sums them
over the process group with **one** functional all-reduce inside the graph (no host sync, no
graph break; inductor and ``torch.export`` see ``_c10d_functional.all_reduce`` + ``wait_tensor``)
and takes the ratio: every rank then holds the single-process statistic and takes the same
decision.  Without a group the helpers compute exactly what they computed before (no collective
in the graph).

:func:`process_group_of` finds the group of a model with diffusers' context parallelism enabled;
:func:`parallel_signature` is the cheap host check that notices parallelism enabled after a
capture.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def all_reduce_sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``x`` summed over ``group`` (a functional all-reduce, waited on); ``x`` itself if no group."""
    if group is None:
        return x
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


def _sq(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).square().sum(dim=1)


def norm_ratio(num: torch.Tensor, den: torch.Tensor, group: Any) -> torch.Tensor:
    """Per sample (dim 0) ``‖num‖_F / ‖den‖_F`` in float32, over the tokens of every rank."""
    if group is None:
        return num.float().flatten(1).norm(dim=1) / den.float().flatten(1).norm(dim=1).clamp_min(1e-12)
    s = all_reduce_sum(torch.stack([_sq(num), _sq(den)]), group)
    return s[0].sqrt() / s[1].sqrt().clamp_min(1e-12)


def _global_means(parts: list[torch.Tensor], count: torch.Tensor, group: Any) -> torch.Tensor:
    """``parts`` (local sums) divided by the global element count, in one all-reduce."""
    s = all_reduce_sum(torch.stack([*parts, count]), group)
    return s[:-1] / s[-1]


def mean_abs_ratio(num: torch.Tensor, den: torch.Tensor, group: Any) -> torch.Tensor:
    """Per sample ``mean|num| / mean|den|`` (same shapes), over the tokens of every rank."""
    if group is None:
        return num.float().flatten(1).abs().mean(dim=1) / den.float().flatten(1).abs().mean(dim=1).clamp_min(1e-12)
    a, b = num.float().flatten(1).abs(), den.float().flatten(1).abs()
    m = _global_means([a.sum(dim=1), b.sum(dim=1)], torch.full_like(a[:, 0], a.shape[1]), group)
    return m[0] / m[1].clamp_min(1e-12)


def total_mean_abs_ratio(num: torch.Tensor, den: torch.Tensor, group: Any) -> torch.Tensor:
    """``mean|num| / mean|den|`` over the whole tensor (all samples), over every rank; a 0-d tensor."""
    if group is None:
        return num.float().abs().mean() / den.float().abs().mean().clamp_min(1e-12)
    a, b = num.float().abs(), den.float().abs()
    m = _global_means([a.sum(), b.sum()], torch.tensor(float(a.numel()), device=a.device), group)
    return m[0] / m[1].clamp_min(1e-12)


# -- the model's process group --------------------------------------------------------------------

def as_process_group(group: Any) -> Any:
    """A user's ``process_group=`` as a ``ProcessGroup`` (a 1-D ``DeviceMesh`` gives its group)."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group= needs torch.distributed: call torch.distributed.init_process_group() "
                           "first (torchrun sets up rank and world size)")
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"process_group= got a {group.ndim}-D DeviceMesh; pass the 1-D mesh (or its group) the "
                             f"tokens are split over, e.g. mesh['cp'] or mesh['ring', 'ulysses']._flatten()")
        return group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group= must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, got "
                        f"{type(group).__name__}; e.g. torch.distributed.new_group(ranks) or dist.group.WORLD")
    return group


def process_group_of(model: nn.Module) -> Any:
    """The process group over which ``model``'s tokens are split, or ``None``.

    diffusers' context parallelism splits the sequence over the flattened ``("ring", "ulysses")``
    mesh (``ContextParallelConfig._flattened_mesh``), so that is the group the sums run over.
    Tensor parallelism alone keeps every token on every rank: no group is needed.
    """
    pc = getattr(model, "_parallel_config", None)  # set by diffusers' enable_parallelism
    cp = getattr(pc, "context_parallel_config", None)
    if cp is None:
        return None
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None:
        raise RuntimeError(f"{type(model).__name__} has a context-parallel config without a device mesh; enable "
                           f"parallelism with model.enable_parallelism(config=ContextParallelConfig(...)) after "
                           f"torch.distributed.init_process_group()")
    if mesh.size() <= 1:
        return None
    return mesh.get_group()


def parallel_signature(model: nn.Module) -> int | None:
    """A cheap host-side token of the model's parallel set-up (``id`` of diffusers' config or ``None``).

    diffusers refuses to enable parallelism twice, so the config object changes exactly when
    parallelism is enabled (or a model is swapped in): comparing this token at every call tells
    whether the graphs were captured for the current set-up.
    """
    pc = getattr(model, "_parallel_config", None)
    return None if pc is None else id(pc)
