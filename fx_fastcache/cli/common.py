"""What the CLI subcommands share: model resolution (``--model NAME``), argument types, user errors.

NAME is a shipped trained model (``dit-mnist``, ``pixart-mnist``, ``sd3-mnist``, ``flux-mnist``, ``wan-mnist``), a tiny random-weight family
model (``tiny-dit``, ``tiny-pixart``, ``tiny-sd3``, ``tiny-flux``, ``tiny-custom``, the video
``tiny-cogvideox``, ``tiny-ltx-video``, ``tiny-wan``, ``tiny-hunyuan-video``) or the path
of a diffusers model folder (a DiT or PixArt checkpoint trained like the MNIST models).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fx_fastcache.quiet import library_noise_silenced
from fx_fastcache.trained import SHIPPED, load_trained
from fx_fastcache.zoo import TINY, make_tiny

TRAINED = SHIPPED
#: ``--model`` help of the commands that take any model.
MODEL_HELP = f"{', '.join(TRAINED)}, a tiny-* model (tiny-dit, tiny-pixart, ...) or a diffusers folder"


class CLIError(Exception):
    """A user error: ``fx-fastcache`` prints its message as one line and exits with status 2."""


def _int_at_least(lo: int):
    """argparse type: an integer >= ``lo`` (``--batch 0`` is an error, not "the default")."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def _finite_float(lo: float | None):
    """argparse type: a finite number (``nan`` and ``inf`` are refused), >= ``lo`` unless ``None``."""
    want = "a finite number" + ("" if lo is None else f" >= {lo:g}")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(v) or (lo is not None and v < lo):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v

    return parse


non_negative_float = _finite_float(0)
finite_float = _finite_float(None)


def model_names() -> list[str]:
    """Every model name ``--model`` accepts (besides a path): trained, then tiny ones."""

    return [*TRAINED, *TINY]


def check_model_name(name: str, option: str = "--model", allowed: tuple[str, ...] | None = None,
                     why_not: str = "this command does not take that model") -> None:
    """Raise :class:`CLIError` unless ``name`` is a known model name or a diffusers model folder.

    ``allowed`` restricts the known names (``bench`` takes trained models only; ``why_not`` says
    why); the message lists what exists and how to pass a folder.
    """
    names = list(allowed) if allowed is not None else model_names()
    if name in names:
        return
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return
    if folder.is_dir():
        what = f"{option} {name!r}: the folder has no config.json, so it is not a diffusers model folder"
    elif name in model_names():
        what = f"{option} {name!r}: {why_not}"
    else:
        what = f"{option} {name!r}: model not found"
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise CLIError(f"{what}{hint}; known models: {', '.join(names)}; or pass the path of a diffusers "
                   f"model folder (containing config.json)")


@dataclass
class ResolvedModel:
    name: str
    model: nn.Module
    #: (timestep in [0, 1000], batch) -> keyword inputs of one call
    make_inputs: Callable[[float, int], dict]
    trained: object | None = None  # fx_fastcache.trained.TrainedModel for trained models


def resolve_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ResolvedModel:
    """Load ``name`` (checked first with :func:`check_model_name`, so a typo fails at once)."""

    check_model_name(name)
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

    tr = load_trained(name, dtype=dtype, device=device)

    def trained_inputs(t: float, batch: int = 2) -> dict:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, tr.in_channels, tr.sample_size, tr.sample_size, generator=g).to(device, dtype)
        y = torch.arange(batch, device=device) % 10
        return tr.call_kwargs(x, torch.tensor(t / 1000.0), y)

    return ResolvedModel(tr.name, tr.model, trained_inputs, tr)


def show_progress(disabled: bool = False) -> bool:
    """Progress bars go to stderr, and only when it is a terminal (logs stay clean)."""
    return not disabled and sys.stderr.isatty()


@contextlib.contextmanager
def stage_bar(stages: list[str], enabled: bool) -> Iterator[Callable[[str], None]]:
    """A tqdm bar over named stages of a long command; ``advance(name)`` starts the next one."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(stages), disable=not enabled, file=sys.stderr, unit="stage",
               bar_format="{desc} [{n_fmt}/{total_fmt} stages, {elapsed}]")
    state = {"started": False}

    def advance(name: str) -> None:
        if state["started"]:
            bar.update(1)
        state["started"] = True
        bar.set_description_str(name)

    try:
        yield advance
        if state["started"]:
            bar.update(1)
    finally:
        bar.close()


def quiet_library_warnings():
    """Silence warnings a CLI user cannot act on, only around the calls that raise them
    (see :mod:`fx_fastcache.quiet`)."""

    return library_noise_silenced()
