"""Noise forecast: a skipped step hands the sampler the velocity of a forecast *noise*, not a forecast velocity.

Why it exists: the ``forecast`` fallback extrapolates what the blocks add in the timestep, and the sampler
gets a velocity that does not look at the latent it is applied to.  A flow-matching velocity can be
written through the noise it predicts, ``ε = x + (1 − σ) v`` (``x = (1 − σ) x₀ + σ ε``, ``v = ε − x₀``).
Extrapolating ``ε`` linearly in σ through the last two computed steps and returning

    v(k) = (ε̂(k) − x_k) / (1 − σ_k),    ε̂(k) = ε(c) + (σ_k − σ_c) / (σ_c − σ_p) · (ε(c) − ε(p)),

makes a skipped step's velocity follow its latent (a DDIM-like step with a forecast noise).  Emulated on
the output of the trained models, it raised both the mean and the worst image on DiT, SD3 and Flux (+0.1 to
+2.4 dB of mean, +1.2 to +7.5 dB of worst image on fixed plans) and lowered PixArt's worst image
(docs/BENCHMARKS.md, "Twenty-fourth session: a skipped step that keeps the predicted noise"), so it is opt-in.

``σ`` is the model's timestep divided by its value at σ = 1 (1000 for SD3 and Wan, 1 for Flux, whose
pipeline divides by 1000; ``FamilySpec.timestep_per_sigma`` or ``FastCacheConfig.timestep_per_sigma``).
After one computed step ε is held; at σ = 1 the output is left as the fallback made it.  Everything is
elementwise on the model's first output and its latent input (each CFG row with its own latent), so it
costs two output-sized tensors of state and a few of work per step; decisions, counts and the blocks'
state are untouched.  A step counts as skipped when the last guarded block was (one decision per step).

Whether it applies is the store tensor :data:`ENABLED_KEY` (1 until ``search_plan`` chooses, per fraction,
between the plan searched with it and the one searched without it), so switching needs no re-capture.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .state_ops import Flag, assign, keep_or, negate, shift

#: Calibration store key of the installed switch (a 0-d float tensor shared by every graph: > 0 applies the
#: forecast, 0 leaves skipped steps to the fallback while the state keeps following the computed steps).
ENABLED_KEY = "noise_forecast.enabled"


def _safe(den: torch.Tensor) -> torch.Tensor:
    return torch.where(den != 0, den, torch.ones_like(den))


class NoiseForecast(nn.Module):
    _is_impure = True  # mutates its buffers: never dead-code-eliminated

    _persistent_state = ("enabled",)  # the store's tensor: not per-context state, kept by reset

    def __init__(self, shape: tuple[int, ...], device: torch.device, timestep_per_sigma: float,
                 enabled: torch.Tensor) -> None:
        """``shape``: the model output's (= its latent input's) shape; ``timestep_per_sigma``: the model's
        timestep at σ = 1; ``enabled``: the store's switch (:data:`ENABLED_KEY`)."""
        super().__init__()
        if not timestep_per_sigma > 0:
            raise ValueError(f"NoiseForecast: timestep_per_sigma={timestep_per_sigma!r} must be > 0")
        self.timestep_per_sigma = float(timestep_per_sigma)
        self.register_buffer("enabled", enabled)
        for name in ("eps_c", "eps_p"):  # ε of the last computed step and of the one before it
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32, device=device))
        for name in ("s_c", "s_p", "computed_steps"):
            self.register_buffer(name, torch.tensor(0.0, device=device))

    def slope(self, sig: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """``r`` of the forecast ``ε̂ = ε_c + r (ε_c − ε_p)`` at σ ``sig`` after ``count`` computed steps: ε linear in
        σ through the last two, or held (0) after a single one."""
        ok = (count >= 2) & (self.s_c != self.s_p)
        return torch.where(ok, (sig - self.s_c) / _safe(self.s_c - self.s_p), torch.zeros_like(self.s_c))

    def estimate(self, sig: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """ε̂ at σ ``sig`` after ``count`` computed steps (used only at a skipped step)."""
        return self.eps_c + self.slope(sig, count) * (self.eps_c - self.eps_p)

    def forward(self, skipped: Flag, new_gen: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """``v`` at a computed step; at a skipped one the velocity of the forecast noise at latent ``x``."""
        zero = torch.zeros_like(self.s_c)
        sig = t.float() / self.timestep_per_sigma
        count = torch.where(new_gen, zero, self.computed_steps)
        xf, vf = x.float(), v.float()
        eps_hat = self.estimate(sig, count)
        rest = 1 - sig
        valid = (count >= 1) & (rest > 0) & (self.enabled > 0)
        forecast = torch.where(valid, (eps_hat - xf) / _safe(rest), vf).to(v.dtype)
        out = keep_or(skipped, forecast, v)
        # a computed step joins the history
        computed = negate(skipped)
        shift(self.eps_p, computed, self.eps_c)
        assign(self.eps_c, computed, xf + rest * vf)
        shift(self.s_p, computed, self.s_c)
        assign(self.s_c, computed, sig)
        self.computed_steps.copy_(keep_or(computed, count + 1, count))
        return out

    def reset(self) -> None:
        for name, b in self.named_buffers():
            if name not in self._persistent_state:
                b.zero_()
