"""The step clock: one call at the top of every captured graph.

Why it exists: every decision depends on *where in the generation* a call is.  The clock turns
the model's timestep input into a step counter that resets by itself when a new generation
starts (:mod:`fx_fastcache.runtime.generation` holds the rule), and it holds the run-time knobs
(threshold, warm-up, enable, force-compute) as tensors so that changing them never recompiles.

It also refuses to approximate after a *repeated call*: a call at the previous call's timestep with
the very same input (exactly equal; without a watched input, the timestep alone; without a
timestep, the input alone).  That is what classifier-free guidance run as two calls per step looks
like (cond, then uncond, on the same latents): the second call's conditioning differs where the
statistic cannot see it (PixArt's and Wan's block-0 input depend on the timestep only), and one
cache state would hand it the first call's residual, i.e. drop the guidance.  So from the first repeat until the next generation every
call computes (counted in ``repeats``, which the module turns into one warning); each branch needs
its own state: a batched call, or ``opt.cache_context(name)`` per branch.  Samplers that evaluate a
timestep twice on *different* latents (Heun) are not repeats.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..graph_protocol import Tick
from .generation import input_jumped, noise_level, repeated_call, scalar_timestep, starts_generation


def repeat_message(consequence: str) -> str:
    """What a repeated call means and how to fix it (the module warns, step dispatch and calibrate raise)."""
    return ("fx-fastcache: a call repeated the previous call's timestep and input, as classifier-free guidance run as "
            "two calls per step (cond, then uncond) does; one cache state cannot serve both branches, so "
            f"{consequence}. Batch the branches into one call, run each in opt.cache_context('cond') / "
            "opt.cache_context('uncond') (one state each), or use fastcache.enable_fastcache(pipe) for a diffusers "
            "pipeline.")


class Clock(nn.Module):
    _is_impure = True  # mutates its buffers: never dead-code-eliminated

    def __init__(self, threshold: float, warmup_steps: int, enabled: bool, max_skip_steps: int,
                 stream_shape: tuple[int, ...] | None = None, stream_dtype: torch.dtype | None = None,
                 timestep_rises: bool = False) -> None:
        super().__init__()
        #: The model's timestep runs up (``FamilySpec.timestep_rises``): the clock reads ``1 − t``.
        self.timestep_rises = timestep_rises
        self.register_buffer("t_last", torch.tensor(float("-inf")))
        self.register_buffer("step", torch.tensor(-1.0))
        self.register_buffer("calls", torch.tensor(0.0))
        self.register_buffer("generations", torch.tensor(0.0))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("warmup", torch.tensor(float(warmup_steps)))
        self.register_buffer("enabled", torch.tensor(1.0 if enabled else 0.0))
        self.register_buffer("force", torch.tensor(0.0))
        self.register_buffer("max_skip", torch.tensor(float(max_skip_steps)))
        #: 1 from a repeated call (see the module docstring) to the next generation; ``repeats`` counts them.
        self.register_buffer("repeated", torch.tensor(0.0))
        self.register_buffer("repeats", torch.tensor(0.0))
        #: The model's input at the previous call (``None``: the model has no floating stream input).
        self.watches_input = stream_shape is not None
        if self.watches_input:
            self.register_buffer("x_last", torch.zeros(stream_shape, dtype=stream_dtype))

    def forward(self, t: torch.Tensor | None, x: torch.Tensor | None = None):
        """Returns a :class:`~fx_fastcache.graph_protocol.Tick` of 0-d tensors.

        ``ok`` is the step-level permission to approximate (enabled, not forced, past warm-up);
        ``t_eff`` is the scalar timestep (``1 − t`` where it rises; the negated call count for models
        without one).
        """
        if t is None:
            t_eff = -self.calls
        else:
            # a fresh tensor, not a view of the input: cond operands must not alias each other
            t_eff = scalar_timestep(noise_level(t, self.timestep_rises)) * 1.0
        new_gen = starts_generation(t_eff, self.t_last, self.step)
        # t_eff without a timestep counts calls down: never the same, so only the input can repeat
        same = repeated_call(t_eff if t is not None else None, self.t_last, x, self.x_last if x is not None else None)
        if x is not None:
            new_gen = new_gen | input_jumped(x, self.x_last)
            self.x_last.copy_(x)
        repeat = (same & ~new_gen).to(self.repeats.dtype)
        repeated = torch.maximum(torch.where(new_gen, torch.zeros_like(self.repeated), self.repeated), repeat)
        self.repeated.copy_(repeated)
        self.repeats.add_(repeat)
        step = torch.where(new_gen, torch.zeros_like(self.step), self.step + 1)
        self.step.copy_(step)
        self.t_last.copy_(t_eff)
        self.calls.add_(1.0)
        self.generations.add_(new_gen.to(self.generations.dtype))
        ok = (self.enabled > 0) & (self.force <= 0) & (step >= self.warmup) & (repeated <= 0)
        return Tick(step, new_gen, ok, self.threshold * 1.0, t_eff, self.max_skip * 1.0)

    def reset(self) -> None:
        self.t_last.fill_(float("-inf"))
        self.step.fill_(-1.0)
        self.calls.zero_()
        self.generations.zero_()
        self.repeated.zero_()
        self.repeats.zero_()
        if self.watches_input:
            self.x_last.zero_()
