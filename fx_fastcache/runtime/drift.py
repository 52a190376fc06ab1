"""Drift correction: at a computed step, take back the latent drift of the forecast steps before it.

Why it exists: a forecast step hands the sampler an extrapolated velocity ``v_f(k)``; its error
stays in the latents.  The next computed step ``c'`` knows the true velocity at both ends of the
forecast run (``c`` and ``c'``), and interpolating between them is far more accurate than the
extrapolation was.  For the flow-matching Euler sampler (``x_{k+1} = x_k + (σ_{k+1} − σ_k) v_k``,
the model's timestep proportional to σ) this module adds to the output of ``c'`` what moves the
next latent by the difference:

    v'(c') = v(c') + σ_{c'+1} / Δσ_{c'} · D,    D = Σ_k Δσ_k / σ_{k+1} · (v_i(k) − v_f(k)),
    v_i(k) = v(c) + (t_k − t_c) / (t_{c'} − t_c) · (v(c') + β D − v(c)).

The factor ``σ_{c'+1} / σ_{k+1}`` is how much of a drift made at step ``k`` is still in the latent
at ``c' + 1``: in rectified flow an error of ``x`` that the model reads as noise shrinks in
proportion to σ; without it the correction over-shoots after long forecast runs
(docs/BENCHMARKS.md, "Tenth session").

The interpolation's end ``v(c')`` was computed on the drifted latent.  Read by the same argument
(the drift ``−σ_{c'} D`` taken for noise), the velocity at the corrected latent is ``v(c') + D``;
ending the interpolation there makes ``D`` the solution of a linear equation, ``D = D_0 / (1 − β U)``
with ``D_0`` the sum interpolated to ``v(c')``, ``U = Σ_k Δσ_k / σ_{k+1} · (t_k − t_c) / (t_{c'} − t_c)``
(≤ 0 on a falling schedule) and ``β = 1``.  Measured, that helps after long forecast runs and costs
after short ones, and more damping (``β`` up to 8) helps the longest runs more
(docs/BENCHMARKS.md, "Fourteenth session").  So ``β`` is the store tensor :data:`DAMPING_KEY`: 0
(the plain interpolation) until ``search_plan`` fits it per budget on calibration generations.
``Δσ_{c'}`` is not known before the next call, so the step is taken as equal to the previous one
(exact for uniform schedules).

Everything is elementwise on the model's first output (each of its tensors, with its own state, when it
is a list: Z-Image returns one per sample), so it costs two output-sized tensors of
work per step and three of state; decisions, counts and the blocks' state are untouched.  It
needs one decision per step (a step policy, ``planned`` or ``schedule``): the step counts as
computed when the last guarded block computed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .state_ops import Flag, assign, keep_or, negate


#: Calibration store key of the installed damping ``β`` (a 0-d float tensor shared by every graph).
DAMPING_KEY = "drift.damping"


def _name(state: str, output: int) -> str:
    """The buffer of ``state`` for the output tensor ``output`` (the first keeps the plain name)."""
    return state if output == 0 else f"{state}_{output}"


def _safe(den: torch.Tensor) -> torch.Tensor:
    return torch.where(den != 0, den, torch.ones_like(den))


class DriftCorrection(nn.Module):
    _is_impure = True  # mutates its buffers: never dead-code-eliminated

    _persistent_state = ("damping",)  # the store's tensor: not per-context state, kept by reset

    def __init__(self, shape: tuple[int, ...] | Sequence[tuple[int, ...]], device: torch.device,
                 damping: torch.Tensor) -> None:
        """``shape``: the model output's shape, or one shape per tensor of an output that is a list
        (Z-Image returns one tensor per sample, each corrected with its own state)."""
        super().__init__()
        shapes = [tuple(shape)] if all(isinstance(d, int) for d in shape) else [tuple(s) for s in shape]
        self.outputs = len(shapes)
        self.register_buffer("damping", damping)
        for i, one in enumerate(shapes):
            for name in ("v_c", "v_last", "acc"):
                self.register_buffer(_name(name, i), torch.zeros(one, dtype=torch.float32, device=device))
        for name in ("t_c", "t_last", "w_sum", "u_sum", "last_skipped"):
            self.register_buffer(name, torch.tensor(0.0, device=device))

    def forward(self, skipped: Flag, new_gen: torch.Tensor, t: torch.Tensor, *vs: torch.Tensor):
        """The corrected output (a tuple of them for several output tensors)."""
        zero = torch.zeros_like(self.w_sum)
        # fold the previous step into the sums if it was forecast (its Δσ is known only now)
        w = torch.where((self.last_skipped > 0) & ~new_gen & (t != 0), (t - self.t_last) / _safe(t), zero)
        w_sum = torch.where(new_gen, zero, self.w_sum + w)
        u_sum = torch.where(new_gen, zero, self.u_sum + w * (self.t_last - self.t_c))
        # the correction, used only if this step computed (w_sum ≠ 0: forecast steps since the last
        # computed one of this generation; a step is forecast only after one computed)
        dt = t - self.t_last  # Δσ of this step, taken equal to the previous one
        gap = t - self.t_c
        valid = (w_sum != 0) & (dt != 0) & (gap != 0)
        gain = torch.where(valid, (t + dt) / _safe(dt), zero)
        u = u_sum / _safe(gap)
        computed = negate(skipped)
        outs = []
        for i, v in enumerate(vs):
            v_c, v_last, acc_i = (getattr(self, _name(n, i)) for n in ("v_c", "v_last", "acc"))
            vf = v.float()
            acc = torch.where(new_gen, torch.zeros_like(acc_i), acc_i + w * v_last)
            corrected = vf + gain * (v_c * w_sum + (vf - v_c) * u - acc) / _safe(1 - self.damping * u)
            outs.append(keep_or(skipped, v, corrected.to(v.dtype)))
            assign(v_c, computed, vf)
            acc_i.copy_(keep_or(computed, torch.zeros_like(acc), acc))
            v_last.copy_(vf)
        assign(self.t_c, computed, t)
        self.w_sum.copy_(keep_or(computed, zero, w_sum))
        self.u_sum.copy_(keep_or(computed, zero, u_sum))
        self.t_last.copy_(t)
        self.last_skipped.copy_(keep_or(skipped, torch.ones_like(zero), zero))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def reset(self) -> None:
        for name, b in self.named_buffers():
            if name not in self._persistent_state:
                b.zero_()
