"""Model resolution shared by the CLI subcommands (``--model NAME``).

NAME is a shipped trained model (``dit-mnist``, ``pixart-mnist``), a tiny random-weight family
model (``tiny-dit``, ``tiny-pixart``, ``tiny-sd3``, ``tiny-flux``, ``tiny-custom``, the video
``tiny-cogvideox``, ``tiny-ltx-video``, ``tiny-wan``, ``tiny-hunyuan-video``) or the path
of a diffusers model folder (a DiT or PixArt checkpoint trained like the MNIST models).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

TRAINED = ("dit-mnist", "pixart-mnist")


@dataclass
class ResolvedModel:
    name: str
    model: nn.Module
    #: (timestep in [0, 1000], batch) -> keyword inputs of one call
    make_inputs: Callable[[float, int], dict]
    trained: object | None = None  # fx_fastcache.trained.TrainedModel for trained models


def resolve_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ResolvedModel:
    from fx_fastcache.zoo import TINY, make_tiny

    if name in TINY:
        tm = make_tiny(name)
        p = next(tm.model.parameters())
        if p.dtype != dtype or str(p.device) != str(torch.device(device)):
            tm.model.to(device=device, dtype=dtype)

        def inputs(t: float, batch: int = 2, _f=tm.make_inputs) -> dict:
            kw = _f(t, batch)
            return {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                        else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

        return ResolvedModel(name, tm.model, inputs)
    from fx_fastcache.trained import load_trained

    tr = load_trained(name, dtype=dtype, device=device)

    def trained_inputs(t: float, batch: int = 2) -> dict:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, tr.in_channels, tr.sample_size, tr.sample_size, generator=g).to(device, dtype)
        y = torch.arange(batch, device=device) % 10
        return tr.call_kwargs(x, torch.tensor(t / 1000.0), y)

    return ResolvedModel(tr.name, tr.model, trained_inputs, tr)
