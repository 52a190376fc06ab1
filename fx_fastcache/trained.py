"""Small *trained* reference diffusion transformers (MNIST) and their sampler.

Random-weight transformers have no real denoising dynamics, so the quality of a cached or
approximated run measured on them means little. This module loads the small diffusers
transformers trained for this project on 5,000 MNIST digits (rectified-flow objective,
``v = eps - x0``) and samples them exactly like the reference training script does:

* ``"dit-mnist"``: ``DiTTransformer2DModel``, class-conditional, vendored in
  ``fx_fastcache/assets/dit-mnist``.
* ``"pixart-mnist"``: ``PixArtTransformer2DModel`` conditioned through a class -> 4 "caption"
  tokens table (``conditioning.safetensors``), vendored in ``fx_fastcache/assets/pixart-mnist``.
* ``"sd3-mnist"``: ``SD3Transformer2DModel`` (caption tokens and a pooled vector per class),
  ``"flux-mnist"``: ``FluxTransformer2DModel`` (the same conditioning; the image packed into 4 x 4
  pixel tokens) and ``"wan-mnist"``: ``WanTransformer3DModel`` (caption tokens; the image is a video
  of one frame), all three trained in this repository by ``benchmarks/train_mnist_family.py``.

All five ship with the package (package data); other checkpoints trained the same way load from a
folder path, or by name from ``$FX_FASTCACHE_MODELS/<name>`` (see :func:`resolve_model_dir`).

Typical use::

    tm = load_trained("dit-mnist")
    images = sample(tm, classes=[0, 1, 2], seeds=[0, 1, 2], steps=20)
    save_grid(images, "digits.png", nrow=3)

:func:`sample` accepts ``model=``, a drop-in replacement for ``tm.model`` (for example an
optimized / cached wrapper of it) that is called with exactly the same keyword arguments
(:meth:`TrainedModel.call_kwargs`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "NULL_CLASS",
    "NUM_CLASSES",
    "TrainedModel",
    "load_trained",
    "resolve_model_dir",
    "sample",
    "save_grid",
]

NUM_CLASSES = 10
#: Class label of the unconditional ("null") branch of classifier-free guidance.
NULL_CLASS = NUM_CLASSES
#: Environment variable naming a folder of extra model folders (``$FX_FASTCACHE_MODELS/<name>/config.json``).
MODELS_ENV = "FX_FASTCACHE_MODELS"

_ASSETS_DIR = Path(__file__).resolve().parent / "assets"
_VENDORED = {"dit-mnist": _ASSETS_DIR / "dit-mnist", "pixart-mnist": _ASSETS_DIR / "pixart-mnist",
             "sd3-mnist": _ASSETS_DIR / "sd3-mnist", "flux-mnist": _ASSETS_DIR / "flux-mnist",
             "wan-mnist": _ASSETS_DIR / "wan-mnist"}
_KINDS = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3",
          "FluxTransformer2DModel": "flux", "WanTransformer3DModel": "wan"}
#: Names of the trained models shipped in the package (``load_trained(name)``).
SHIPPED = tuple(_VENDORED)
_CAPTIONED = ("pixart", "sd3", "flux", "wan")  # kinds conditioned through the caption-token table
_POOLED = ("sd3", "flux")  # kinds that also take a pooled vector per class
#: Image side of the MNIST reference models (28 x 28 digits padded to 32 x 32).
IMAGE_SIZE = 32

Kind = Literal["dit", "pixart", "sd3", "flux", "wan"]


def resolve_model_dir(name_or_path: str) -> Path:
    """Return the diffusers model folder for a known model name or a path.

    * ``"dit-mnist"``, ``"pixart-mnist"``, ``"sd3-mnist"``, ``"flux-mnist"``, ``"wan-mnist"``: the folders vendored in the package
      (``fx_fastcache/assets/<name>``).
    * a path to a diffusers model folder (it must contain ``config.json``).
    * another name: ``$FX_FASTCACHE_MODELS/<name>`` when that environment variable is set.

    No other place is searched (in particular no machine path): data comes from the package,
    the argument or the environment variable.

    Raises:
        FileNotFoundError: the model was not found; the message names the value, what was
            looked at and how to fix it.
    """
    name = str(name_or_path)
    if name in _VENDORED:
        folder = _VENDORED[name]
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"vendored model {name!r} is missing: no config.json in {folder} "
                "(the package installation is incomplete; reinstall fx-fastcache)"
            )
        return folder
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return folder
    env = os.environ.get(MODELS_ENV)
    looked = [str(folder)]
    if env and not folder.is_absolute():
        candidate = Path(env).expanduser() / name
        if (candidate / "config.json").is_file():
            logger.debug("resolved %s -> %s via $%s", name, candidate, MODELS_ENV)
            return candidate
        looked.append(str(candidate))
    known = ", ".join(_VENDORED)
    what = "a folder without config.json" if folder.is_dir() else "no such folder"
    raise FileNotFoundError(
        f"model {name!r} not found: it is not a shipped model ({known}) and {' nor '.join(looked)} is not "
        f"a diffusers model folder ({what}). Pass a shipped name, the path of a folder containing config.json, "
        f"or set {MODELS_ENV} to a folder that contains {name}/."
    )


@dataclass
class TrainedModel:
    """A loaded reference transformer and what is needed to call it.

    Attributes:
        name: the name or path it was loaded from.
        kind: ``"dit"`` (class labels), ``"pixart"`` (caption tokens from ``conditioning``),
            ``"sd3"`` (caption tokens and a pooled vector per class) or ``"flux"`` (the same
            conditioning; the image is packed into ``p x p`` pixel tokens, ``p² = in_channels``) or ``"wan"``
            (caption tokens, as PixArt; the image is a video of one frame, (B, C, 1, H, W)).
        model: the diffusers transformer, in eval mode, with ``requires_grad`` False.
        pooled: for ``"sd3"`` and ``"flux"``, the class -> pooled-embedding table (``pooled.weight``).
        conditioning: for ``"pixart"``, ``"sd3"``, ``"flux"`` and ``"wan"``, the class -> caption-tokens table
            (``conditioning.safetensors`` ``txt.weight``, shape (11, tokens * caption_dim)),
            on the model's device and dtype; ``None`` for ``"dit"``.
        path: the model folder.
    """

    name: str
    kind: Kind
    model: torch.nn.Module
    conditioning: torch.Tensor | None = None
    path: Path | None = None
    pooled: torch.Tensor | None = None

    @property
    def config(self) -> Any:
        """The diffusers config of :attr:`model`."""
        return self.model.config  # type: ignore[attr-defined]

    @property
    def patch(self) -> int:
        """Pixels per token side that :meth:`call_kwargs` packs (``"flux"``); 1 for the others."""
        if self.kind != "flux":
            return 1
        p = int(round(int(self.config.in_channels) ** 0.5))
        if p * p != int(self.config.in_channels):
            raise ValueError(
                f"{self.name}: flux model with in_channels={self.config.in_channels}, not p² single-channel "
                "pixels; the MNIST flux models pack a 1-channel image into p x p patches"
            )
        return p

    @property
    def in_channels(self) -> int:
        """Channels of the image the sampler denoises (for ``"flux"``: before packing)."""
        return 1 if self.kind == "flux" else int(self.config.in_channels)

    @property
    def sample_size(self) -> int:
        """Height (= width) of the image the sampler denoises."""
        return IMAGE_SIZE if self.kind in ("flux", "wan") else int(self.config.sample_size)

    def unpack_output(self, out: torch.Tensor) -> torch.Tensor:
        """The model output as an image (B, C, H, W): unpacks ``"flux"`` tokens, drops ``"wan"``'s frame axis,
        else ``out``."""
        if self.kind == "wan":
            return out.squeeze(2)
        if self.kind != "flux":
            return out
        p, b = self.patch, out.shape[0]
        side = int(round(out.shape[1] ** 0.5))  # tokens per row, as call_kwargs packed them
        return out.view(b, side, side, 1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 1, side * p, side * p)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model parameters."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the model parameters."""
        return next(self.model.parameters()).device

    def call_kwargs(
        self, x: torch.Tensor, sigma: float | torch.Tensor, y: torch.Tensor
    ) -> dict[str, Any]:
        """Keyword arguments that call :attr:`model` on latents ``x`` at noise level ``sigma``.

        Args:
            x: latents (B, C, H, W).
            sigma: noise level in [0, 1]; a scalar or a tensor of shape () or (B,).
            y: class labels (B,) long, 0-9, or :data:`NULL_CLASS` (10) for unconditional.

        Returns:
            ``dict`` for ``model(**kwargs)[0]``: ``timestep`` is ``sigma * 1000`` as a float
            tensor of shape (B,); DiT gets ``class_labels``, PixArt gets
            ``encoder_hidden_states`` looked up in :attr:`conditioning` and
            ``added_cond_kwargs={"resolution": None, "aspect_ratio": None}``; SD3 gets
            ``encoder_hidden_states`` and ``pooled_projections`` looked up in :attr:`conditioning`
            and :attr:`pooled`; Flux gets the same plus the image packed into ``p x p`` pixel
            tokens, ``img_ids``/``txt_ids`` and ``timestep`` = ``sigma`` (Flux scales it by
            1000 itself); Wan gets ``encoder_hidden_states`` as PixArt and the image as one frame,
            (B, C, 1, H, W); unpack Flux's and Wan's outputs with :meth:`unpack_output`.
        """
        b = x.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if s.ndim == 0:
            s = s.expand(b)
        timestep = s.to(torch.float32) * 1000
        y = y.to(device=x.device, dtype=torch.long)
        if self.kind == "dit":
            return {
                "hidden_states": x,
                "timestep": timestep,
                "class_labels": y,
                "return_dict": False,
            }
        if self.kind not in _CAPTIONED:
            raise ValueError(f"unknown model kind {self.kind!r}")
        # caption tokens per class from the conditioning table (SD3/Flux also take the pooled embedding)
        if self.conditioning is None or (self.kind in _POOLED and self.pooled is None):
            raise ValueError(f"{self.name}: {self.kind} model has no conditioning table")
        dim_key = {"pixart": "caption_channels", "wan": "text_dim"}.get(self.kind, "joint_attention_dim")
        dim = int(getattr(self.config, dim_key))
        txt = self.conditioning.to(device=x.device, dtype=x.dtype)[y].view(b, -1, dim)
        kwargs: dict[str, Any] = {
            "hidden_states": x,
            "encoder_hidden_states": txt,
            "timestep": timestep,
            "return_dict": False,
        }
        if self.kind == "pixart":
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
            return kwargs
        if self.kind == "wan":
            kwargs["hidden_states"] = x.unsqueeze(2)
            return kwargs
        kwargs["pooled_projections"] = self.pooled.to(device=x.device, dtype=x.dtype)[y]
        if self.kind == "flux":
            p = self.patch
            side = x.shape[-1] // p
            kwargs["hidden_states"] = (
                x.view(b, 1, side, p, side, p).permute(0, 2, 4, 1, 3, 5).reshape(b, side * side, p * p)
            )
            kwargs["timestep"] = s.to(x.dtype)
            ids = torch.zeros(side, side, 3, device=x.device, dtype=x.dtype)
            ids[..., 1] = torch.arange(side, device=x.device, dtype=x.dtype)[:, None]
            ids[..., 2] = torch.arange(side, device=x.device, dtype=x.dtype)[None, :]
            kwargs["img_ids"] = ids.view(side * side, 3)
            kwargs["txt_ids"] = torch.zeros(txt.shape[1], 3, device=x.device, dtype=x.dtype)
        return kwargs


def load_trained(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> TrainedModel:
    """Load a reference transformer (``"dit-mnist"``, ``"pixart-mnist"``, ``"sd3-mnist"``, ``"flux-mnist"``, ``"wan-mnist"`` or a folder path).

    The kind is read from ``_class_name`` in the folder's ``config.json``
    (``DiTTransformer2DModel`` -> ``"dit"``, ``PixArtTransformer2DModel`` -> ``"pixart"``,
    ``SD3Transformer2DModel`` -> ``"sd3"``, ``FluxTransformer2DModel`` -> ``"flux"``, ``WanTransformer3DModel`` -> ``"wan"``).
    Weights are stored in fp16 and cast to ``dtype``.
    """
    folder = resolve_model_dir(name_or_path)
    config_path = folder / "config.json"
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); restore the model folder's config.json") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a {type(config).__name__}, not a JSON object with '_class_name'; "
                         f"restore the model folder's config.json")
    class_name = config.get("_class_name")
    kind = _KINDS.get(class_name)
    if kind is None:
        raise ValueError(
            f"{folder}: unsupported transformer class {class_name!r} "
            f"(supported: {', '.join(sorted(_KINDS))})"
        )
    import diffusers

    cls = getattr(diffusers, class_name)
    # without `accelerate`, diffusers would warn and fall back to this anyway
    low_mem = importlib.util.find_spec("accelerate") is not None
    model = cls.from_pretrained(str(folder), torch_dtype=dtype, low_cpu_mem_usage=low_mem)
    model = model.to(device).eval()
    model.requires_grad_(False)
    conditioning = pooled = None
    if kind in _CAPTIONED:
        from safetensors.torch import load_file

        table = folder / "conditioning.safetensors"
        if not table.is_file():
            raise FileNotFoundError(f"{folder}: {kind} model without conditioning.safetensors")
        tables = load_file(str(table))
        conditioning = tables["txt.weight"].to(device=device, dtype=dtype)
        if kind in _POOLED:
            pooled = tables["pooled.weight"].to(device=device, dtype=dtype)
    logger.info("loaded %s (%s) from %s as %s on %s", name_or_path, kind, folder, dtype, device)
    return TrainedModel(
        name=str(name_or_path), kind=kind, model=model, conditioning=conditioning, path=folder, pooled=pooled
    )


def _initial_noise(
    seeds: Sequence[int], shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """One CPU generator per image, so an image depends only on its own seed."""
    noise = [
        torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s)))
        for s in seeds
    ]
    return torch.cat(noise).to(device=device, dtype=dtype)


def shifted_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The ``steps + 1`` noise levels of a shifted flow-matching schedule, ``σ = s·u / (1 + (s − 1)·u)`` with
    ``u = linspace(1, 0, steps + 1)``: the spacing SD3 and Flux pipelines sample with (their scheduler's
    ``shift``, 3.0 for SD3), which puts more steps at high noise.  ``shift=1`` is :func:`sample`'s uniform
    schedule."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: expected an integer >= 1")
    if not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift={shift!r}: expected a finite number > 0 (1 = the uniform schedule; SD3 "
                         f"pipelines use 3.0)")
    u = torch.linspace(1.0, 0.0, steps + 1)
    return shift * u / (1 + (shift - 1) * u)  # shift 1: u exactly


def guided_velocity(
    tm: TrainedModel,
    x: torch.Tensor,
    sigma: torch.Tensor,
    y: torch.Tensor,
    cfg: float = 2.0,
    model: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """The velocity :func:`sample` steps with at latents ``x`` (B, C, H, W) and noise level ``sigma`` (shape () or
    (B,)): one call of ``model`` (default ``tm.model``) on the batch doubled as ``[cond, uncond]`` (null class
    :data:`NULL_CLASS`), ``v_u + cfg * (v_c - v_u)`` of its first ``C`` output channels.  Differentiable (the
    benchmarks fit through it)."""
    fn = model if model is not None else tm.model
    c = tm.in_channels
    s = sigma.expand(len(y))
    out = tm.unpack_output(fn(**tm.call_kwargs(torch.cat([x, x]), torch.cat([s, s]),
                                               torch.cat([y, torch.full_like(y, NULL_CLASS)])))[0])
    if out.shape[1] != c:  # learned-sigma layouts: velocity is the first C channels
        out = out[:, :c]
    v_c, v_u = out.chunk(2)
    return v_u + cfg * (v_c - v_u)


@torch.no_grad()
def sample(
    tm: TrainedModel,
    classes: list[int] | torch.Tensor,
    seeds: list[int],
    steps: int = 20,
    cfg: float = 2.0,
    model: Callable[..., Any] | None = None,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
    desc: str | None = None,
    sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate digits with the reference Euler rectified-flow sampler.

    Euler from sigma = 1 to 0 on ``torch.linspace(1, 0, steps + 1)``; each step doubles the
    batch as ``[cond, uncond]`` (null class 10), ``v = v_u + cfg * (v_c - v_u)`` and
    ``x += (sigma_next - sigma) * v``; the result is clamped to [-1, 1]. This is the
    reference script's ``sample``/``velocity`` except for the initial noise, drawn per image
    from ``torch.Generator().manual_seed(seed)`` (shape (1, C, H, W), on the CPU) so that an
    image depends only on its own seed, not on the batch it is generated in.

    Args:
        tm: the loaded model (see :func:`load_trained`).
        classes: class label (0-9) of each image.
        seeds: seed of each image (same length as ``classes``).
        steps: number of Euler steps (model calls, each on a batch of 2B).
        cfg: classifier-free guidance scale.
        model: called instead of ``tm.model`` with the same keyword arguments
            (:meth:`TrainedModel.call_kwargs`); output index ``[0]`` is the velocity.
        progress: show a tqdm progress bar (stderr) over the steps.
        on_step: called with the step index ``i`` after step ``i`` is done.
        desc: label of the progress bar (default ``"sampling <name>"``).
        sigmas: the noise levels to step through, decreasing, ``steps + 1`` values (default
            ``torch.linspace(1, 0, steps + 1)``; e.g. a shifted schedule, :func:`shifted_sigmas`).

    Returns:
        Images (B, C, H, W) in [-1, 1], float32, on the model's device.
    """
    y = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(y):
        raise ValueError(f"got {len(y)} classes but {len(seeds)} seeds")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) > NULL_CLASS):
        raise ValueError(f"class labels must be in [0, {NULL_CLASS}], got {y.tolist()}")
    fn = model if model is not None else tm.model
    device, dtype = tm.device, tm.dtype
    c, hw = tm.in_channels, tm.sample_size
    y = y.to(device)
    x = _initial_noise(seeds, (c, hw, hw), device, dtype)
    if sigmas is None:
        sig = torch.linspace(1.0, 0.0, steps + 1, device=device)
    elif tuple(sigmas.shape) != (steps + 1,):
        raise ValueError(f"sigmas has shape {tuple(sigmas.shape)}; give steps + 1 = {steps + 1} noise levels")
    else:
        sig = sigmas.to(device=device, dtype=torch.float32)
    iterator: Any = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=steps, desc=desc or f"sampling {tm.name}", unit="step")
    for i in iterator:
        v = guided_velocity(tm, x, sig[i], y, cfg, fn)
        x = x + (sig[i + 1] - sig[i]) * v
        if on_step is not None:
            on_step(i)
    return x.clamp(-1, 1).float()


def save_grid(images: torch.Tensor, path: str | os.PathLike[str], nrow: int) -> None:
    """Save images (B, C, H, W) in [-1, 1] as a PNG grid with ``nrow`` images per row.

    Pixels are ``(x + 1) * 127.5`` truncated to uint8 (as the reference script does); an
    incomplete last row is filled with black. C must be 1 (grayscale) or 3 (RGB).
    """
    from PIL import Image

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1|3, H, W), got {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    b, c, h, w = images.shape
    rows = max(1, -(-b // nrow))
    cols = min(nrow, b) if b else 1
    x = images.detach().float().cpu()
    pad = torch.full((rows * cols - b, c, h, w), -1.0)
    x = torch.cat([x, pad]).view(rows, cols, c, h, w)
    x = x.permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    pix = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    img = Image.fromarray(pix[..., 0] if c == 1 else pix)  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
