"""What starts a new generation: the one rule, in the graph and on the host.

Why it exists: every cached tensor belongs to one generation (one sampling loop), and a cache
carried into the wrong generation gives a silently wrong image.  A call starts a new generation when

1. nothing ran since the state was created or reset (``fastcache.reset``, each pipeline call), or
2. its timestep is above the previous call's (samplers walk the timestep down, so a new loop
   starts from the top), or
3. its timestep is not finite (NaN or inf: no forecast in ``t`` can hold across it), or
4. the model's input jumped: ``‖x − x_prev‖ > max(‖x‖, ‖x_prev‖)`` over the whole input, i.e.
   the two inputs are nearly unrelated (cosine below ``min/(2·max)`` of their norms, at most 0.5).
   A sampler moves its latents by ``Δσ · v`` per step: consecutive inputs stay aligned (cosine
   0.91 on the trained MNIST DiT even with 4 steps, ≥ 0.99 on tiny SD3/Flux/Wan pipelines, and
   0.91 on a random-weight PixArt whose latents grow 5× per step), while fresh noise against a
   partly denoised latent has a cosine near 0 and differs by 1.2–1.4× the larger norm.  This is
   what catches a generation aborted mid-way and followed by one starting at a *lower* timestep
   (img2img, a shorter schedule), which the timestep alone would take for a continuation.

Within a generation, a *repeated call* (:func:`repeated_call`: the previous call's timestep and the very
same input again, as classifier-free guidance run as two calls per step does) approximates nothing
until the next generation (:mod:`fx_fastcache.runtime.clock` says why).

Every rule reads the call's timestep through :func:`scalar_timestep` (of :func:`noise_level`: ``1 − t``
for a family whose timestep rises, Z-Image's).  The clock applies the rules
in the graph (:func:`starts_generation`, :func:`input_jumped`, :func:`repeated_call`); the ONNX runner
applies them on the host (:func:`starts_generation_host`, :func:`input_jumped_host`,
:func:`repeated_call_host`, on the input the graph's clock watches); the shape-change check of
:class:`~fx_fastcache.module.FastCacheModule` applies rules 1–3 to host floats; calibration reads
the graph's flag.
"""
from __future__ import annotations

import math
from typing import Any

import torch

#: Rule 4's bound on ``‖x − x_prev‖ / max(‖x‖, ‖x_prev‖)`` between two calls of one generation.
INPUT_JUMP = 1.0


def scalar_timestep(t: torch.Tensor) -> torch.Tensor:
    """The call's one timestep: the largest entry of the model's timestep input, as float32.

    Why the largest: batched CFG repeats one value per sample, but image-to-video pipelines pass
    one timestep per token (Wan 2.2 i2v with ``expand_timesteps``, LTX i2v) with the conditioning
    frame's tokens at 0, so the first entry is 0 at every step and the generation rules and the
    forecast in ``t`` would see a constant timestep.  NaN propagates (rule 3)."""
    return t.reshape(-1).amax().to(torch.float32)


def noise_level(t: torch.Tensor, rises: bool) -> torch.Tensor:
    """The timestep as the rules read it: ``t`` itself, or ``1 − t`` where the model's timestep runs up
    from 0 (noise) to 1 (data) (``FamilySpec.timestep_rises``: Z-Image passes ``1 − σ``).  Then a
    generation's timesteps fall as every other family's, and the drift correction gets σ."""
    return 1.0 - t if rises else t


def starts_generation(t: torch.Tensor, t_last: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Rules 1–3 in the graph: ``t`` is this call's scalar timestep, ``t_last`` the previous call's
    (−inf after a reset) and ``step`` the previous call's step (< 0 after a reset)."""
    return (t > t_last) | (step < 0) | ~torch.isfinite(t)


def input_jumped(x: torch.Tensor, x_last: torch.Tensor) -> torch.Tensor:
    """Rule 4 in the graph: a 0-d bool, ``‖x − x_last‖ > INPUT_JUMP · max(‖x‖, ‖x_last‖)`` (float32)."""
    xf, lf = x.float(), x_last.float()
    return (xf - lf).norm() > INPUT_JUMP * torch.maximum(xf.norm(), lf.norm())


def starts_generation_host(t: float | None, t_last: float | None) -> bool:
    """Rules 1–3 on host floats (``t_last`` ``None``: nothing ran since the last reset)."""
    if t_last is None:
        return True
    if t is None:
        return False
    return not math.isfinite(t) or t > t_last


def input_jumped_host(x: Any, x_last: Any | None) -> bool:
    """Rule 4 on the host: ``x`` and ``x_last`` are arrays (numpy or tensors; ``x_last`` ``None``: no
    previous call).  It runs :func:`input_jumped` itself, so the runner and the graph compute the
    same float32 norms and agree at the bound."""
    if x_last is None:
        return False
    return bool(input_jumped(torch.as_tensor(x), torch.as_tensor(x_last)))


def repeated_call(t: torch.Tensor | None, t_last: torch.Tensor, x: torch.Tensor | None,
            x_last: torch.Tensor | None) -> torch.Tensor:
    """In the graph, a 0-d bool: this call repeats the previous one (the caller excludes a new
    generation).  Same timestep (``t`` ``None``: the model has none, so the input alone decides) and
    an input exactly equal to the previous one (``x`` ``None``: no watched input, the timestep alone)."""
    if t is not None:
        same = t == t_last
    else:
        same = torch.full((), x is not None, dtype=torch.bool, device=t_last.device)
    if x is not None:
        same = same & (x == x_last).all()
    return same


def repeated_call_host(t: float | None, t_last: float | None, x: Any | None, x_last: Any | None) -> bool:
    """:func:`repeated_call` on the host (arrays as in :func:`input_jumped_host`; ``t_last`` / ``x_last``
    ``None``: no previous call).  It runs :func:`repeated_call` itself, so the runner and the graph agree."""
    if (t is not None and t_last is None) or (x is not None and x_last is None):
        return False
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731 - the clock's timestep dtype
    xs = (torch.as_tensor(x), torch.as_tensor(x_last)) if x is not None else (None, None)
    return bool(repeated_call(None if t is None else f32(t), f32(0.0 if t_last is None else t_last), *xs))
