"""Which modules of a model are its transformer blocks, and how their inputs map to outputs.

Dispatch is by registry (class name → :class:`FamilySpec`) so no family needs an if/elif
branch elsewhere.  A block list is described by its attribute path, the block-forward
arguments that carry token *streams* (hidden states that the block updates residually) and,
for each returned value, which input stream it continues (``None`` for values that are not
streams).  Residual fallbacks pair each output with its input through this table, never by
shape (Flux's text and image token counts can be equal).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .layerwise_casting import compute_dtype_of_hooks
from .traceable_forwards import traceable_forward

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockListSpec:
    """One ``nn.ModuleList`` of blocks inside the model.

    ``stream_inputs`` name the block arguments that carry token streams (the fallback approximates
    them), ``outputs`` name, per returned tensor, the stream it updates (``None``: not a stream).
    Pass one as ``optimize(model, blocks=BlockListSpec("blocks", ("hidden_states",
    "encoder_hidden_states"), ("encoder_hidden_states", "hidden_states")))`` for a model whose blocks
    return two streams (SD3's, Flux's and Qwen-Image's return ``(encoder_hidden_states, hidden_states)``);
    a plain ``blocks="path"`` takes the block's first argument and first output as its one stream.
    """

    path: str
    stream_inputs: tuple[str, ...] = ("hidden_states",)
    outputs: tuple[str | None, ...] = ("hidden_states",)
    #: Token order of the joint (image + text) sequence that attention masks of the blocks cover:
    #: ``"image_first"`` (HunyuanVideo) lets token routing gather such a mask; ``None``: the
    #: blocks take no joint mask (routing refuses one it cannot place).
    joint_mask_order: str | None = None


@dataclass(frozen=True)
class FamilySpec:
    """A model family: its block lists (in execution order) and its timestep argument."""

    name: str
    block_lists: tuple[BlockListSpec, ...]
    timestep_arg: str | None = "timestep"
    stream_arg: str = "hidden_states"
    #: ``(model, call kwargs) -> context manager`` entered around ``torch.export`` (see
    #: :func:`capture_preparation`); ``None``: nothing to prepare.
    prepare_capture: Callable[[nn.Module, dict], Any] | None = None
    #: The timestep argument runs *up*, from 0 (noise) to 1 (data): it is ``1 − σ`` (Z-Image). Every
    #: rule then reads ``1 − t`` (:func:`~fx_fastcache.runtime.generation.noise_level`), which falls
    #: like other families' timesteps and is σ itself for the drift correction.
    timestep_rises: bool = False
    #: The timestep the model gets at σ = 1 (``noise_forecast`` reads σ as the timestep over it): 1000
    #: where the pipeline passes σ·1000, 1 where it passes σ; ``None``: not known for the family.
    timestep_per_sigma: float | None = None


@contextlib.contextmanager
def _cogvideox_sincos_for_call(model: nn.Module, kw: dict) -> Iterator[None]:
    """CogVideoX-2b (sin-cos position embeddings) rebuilds its embedding inside ``forward`` for a
    size other than the config's ``sample_*``, through ``tensor.data[...].copy_``, which
    ``torch.export`` cannot trace (every other resolution or frame count failed).  For the capture
    only, the embedding module is given this call's size and its embedding, computed here, so the
    traced forward reads a buffer; the graph keeps that tensor, the model is restored after."""
    pe = getattr(model, "patch_embed", None)
    x = kw.get("hidden_states")
    if pe is None or not getattr(pe, "use_positional_embeddings", False) or \
            getattr(pe, "use_learned_positional_embeddings", False) or getattr(x, "ndim", 0) != 5:
        yield
        return
    frames, height, width = (x.shape[1] - 1) * pe.temporal_compression_ratio + 1, x.shape[-2], x.shape[-1]
    saved = (pe.sample_height, pe.sample_width, pe.sample_frames, pe.pos_embedding)
    if saved[:3] == (height, width, frames):
        yield
        return
    pe.sample_height, pe.sample_width, pe.sample_frames = height, width, frames
    pe.pos_embedding = pe._get_positional_embeddings(height, width, frames, device=x.device).to(saved[3].dtype)
    try:
        yield
    finally:
        pe.sample_height, pe.sample_width, pe.sample_frames, pe.pos_embedding = saved


@contextlib.contextmanager
def _z_image_rope_table(model: nn.Module, kw: dict) -> Iterator[None]:
    """Z-Image's ``RopeEmbedder`` (no module: a plain object) builds its rotary table at its first call and
    keeps it in an attribute.  A first call inside ``torch.export`` kept a table of fake tensors there: the
    next capture failed ("a fake tensor in the exported program constant's list") and so did the model
    itself.  The table is built here, for real, before the trace reads it, and moved to the call's device
    (it is no module's buffer: ``model.to()`` leaves it where it was, and the embedder moves it at its call,
    which inside the trace made fake tensors again)."""
    rope = getattr(model, "rope_embedder", None)
    if rope is not None and hasattr(rope, "freqs_cis"):
        x = kw.get("x")
        x = x[0] if isinstance(x, list) and x else x
        device = x.device if isinstance(x, torch.Tensor) else None
        if rope.freqs_cis is None:
            rope.freqs_cis = rope.precompute_freqs_cis(rope.axes_dims, rope.axes_lens, theta=rope.theta)
        if device is not None:
            rope.freqs_cis = [f.to(device) for f in rope.freqs_cis]
    yield


def compute_dtype(model: nn.Module, modules: list[nn.Module] | None = None) -> torch.dtype | None:
    """The dtype a model computes in, read as diffusers' ``ModelMixin.dtype`` reads it: a layerwise casting
    hook's compute dtype (its weights are stored in another), else its first floating parameter outside the modules
    diffusers keeps in float32 (``_keep_in_fp32_modules``: Wan loaded in bfloat16 keeps its
    ``scale_shift_table``, its first parameter, time embedder and norms in float32), else its first
    floating buffer, else a kept one's; ``None`` for a model without parameters or buffers.  ``modules``: the
    model's modules, if the caller keeps their list (``model.modules()`` is walked otherwise)."""
    if (hooked := compute_dtype_of_hooks(model.modules() if modules is None else modules)) is not None:
        return hooked
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    kept = None
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if not any(m in name for m in keep):
            return p.dtype
        kept = kept or p.dtype
    buffer = next((b.dtype for b in model.buffers() if b.is_floating_point()), None)
    return buffer or kept or next((t.dtype for t in (*model.parameters(), *model.buffers())), None)


def capture_preparation(spec: FamilySpec, model: nn.Module, kw: dict) -> Any:
    """The context manager a family needs around ``torch.export`` for this call (else a no-op)."""
    return spec.prepare_capture(model, kw) if spec.prepare_capture is not None else contextlib.nullcontext()


_JOINT = ("encoder_hidden_states", "hidden_states")
_PAIR = ("hidden_states", "encoder_hidden_states")
_VIDEO_AUDIO = ("hidden_states", "audio_hidden_states")

FAMILIES: dict[str, FamilySpec] = {
    "DiTTransformer2DModel": FamilySpec("dit", (BlockListSpec("transformer_blocks"),), timestep_per_sigma=1000),
    "PixArtTransformer2DModel": FamilySpec("pixart", (BlockListSpec("transformer_blocks"),), timestep_per_sigma=1000),
    "SD3Transformer2DModel": FamilySpec("sd3", (BlockListSpec("transformer_blocks", _JOINT, _JOINT),),
                                        timestep_per_sigma=1000),
    "FluxTransformer2DModel": FamilySpec(
        "flux",
        (BlockListSpec("transformer_blocks", _JOINT, _JOINT),
         BlockListSpec("single_transformer_blocks", _JOINT, _JOINT)),
        timestep_per_sigma=1),
    # video DiTs: the same block contract, tokens over (frames × height × width)
    "CogVideoXTransformer3DModel": FamilySpec(
        "cogvideox", (BlockListSpec("transformer_blocks", _JOINT, ("hidden_states", "encoder_hidden_states")),),
        prepare_capture=_cogvideox_sincos_for_call),
    "LTXVideoTransformer3DModel": FamilySpec("ltx-video", (BlockListSpec("transformer_blocks"),),
                                             timestep_per_sigma=1000),
    "WanTransformer3DModel": FamilySpec("wan", (BlockListSpec("blocks"),), timestep_per_sigma=1000),
    # joint blocks that return (encoder_hidden_states, hidden_states) as SD3's; Chroma and FLUX.2 then run
    # single blocks on the concatenated sequence, one stream (Flux's single blocks still take two)
    "QwenImageTransformer2DModel": FamilySpec("qwenimage", (BlockListSpec("transformer_blocks", _JOINT, _JOINT),),
                                              timestep_per_sigma=1),
    "ChromaTransformer2DModel": FamilySpec(
        "chroma", (BlockListSpec("transformer_blocks", _JOINT, _JOINT), BlockListSpec("single_transformer_blocks")),
        timestep_per_sigma=1),
    "Flux2Transformer2DModel": FamilySpec(
        "flux2", (BlockListSpec("transformer_blocks", _JOINT, _JOINT), BlockListSpec("single_transformer_blocks")),
        timestep_per_sigma=1),
    # Wan VACE: Wan's blocks; its vace_blocks compute the control hints added between them, every step
    "WanVACETransformer3DModel": FamilySpec("wan-vace", (BlockListSpec("blocks"),), timestep_per_sigma=1000),
    # Z-Image: its main ``layers`` (the noise and caption refiners before them run every step); the latents
    # come as a list of tensors, and its ``t`` is 1 − σ
    "ZImageTransformer2DModel": FamilySpec("z-image", (BlockListSpec("layers", ("x",), ("x",)),), timestep_arg="t",
                                           stream_arg="x", prepare_capture=_z_image_rope_table, timestep_rises=True),
    # FLUX.3: text blocks, image blocks (``mode_blocks["image_cond"]``, for image conditioning, left to compute:
    # a text-to-image call does not run them), then single blocks on the joint sequence
    "Flux3Transformer2DModel": FamilySpec("flux3", (
        BlockListSpec("txt_mode_blocks"), BlockListSpec("mode_blocks.image"),
        BlockListSpec("single_transformer_blocks", _PAIR, _JOINT))),
    # LTX-2: each block carries the video and the audio tokens and returns both
    "LTX2VideoTransformer3DModel": FamilySpec("ltx2", (
        BlockListSpec("transformer_blocks", _VIDEO_AUDIO, _VIDEO_AUDIO),),
        timestep_per_sigma=1000),
    # Wan Animate: Wan's blocks; the face adapter's blocks between them run every step
    "WanAnimateTransformer3DModel": FamilySpec("wan-animate", (BlockListSpec("blocks"),)),
    "Kandinsky5Transformer3DModel": FamilySpec("kandinsky5", (
        BlockListSpec("text_transformer_blocks", ("x",), ("x",)),
        BlockListSpec("visual_transformer_blocks", ("visual_embed",), ("visual_embed",))),
        timestep_per_sigma=1000),
    "Kandinsky6Transformer3DModel": FamilySpec("kandinsky6", (
        BlockListSpec("video_text_transformer_blocks", ("x",), ("x",)),
        BlockListSpec("audio_text_transformer_blocks", ("x",), ("x",)),
        BlockListSpec("visual_transformer_blocks", ("vis", "aud"), ("vis", "aud")))),
    # Flux's layout
    "LongCatImageTransformer2DModel": FamilySpec("longcat-image", (
        BlockListSpec("transformer_blocks", _PAIR, _JOINT), BlockListSpec("single_transformer_blocks", _PAIR, _JOINT)),
        timestep_per_sigma=1),
    "OvisImageTransformer2DModel": FamilySpec("ovis-image", (
        BlockListSpec("transformer_blocks", _PAIR, _JOINT), BlockListSpec("single_transformer_blocks", _PAIR, _JOINT)),
        timestep_per_sigma=1),
    "CogView3PlusTransformer2DModel": FamilySpec("cogview3plus", (BlockListSpec("transformer_blocks", _PAIR, _PAIR),)),
    # HunyuanVideo 1.5: one list of joint blocks; its forward orders the text tokens by their masks in Python,
    # so the capture traces a copy that does it with tensor operations (fx_fastcache/traceable_forwards.py)
    "HunyuanVideo15Transformer3DModel": FamilySpec(
        "hunyuan-video15", (BlockListSpec("transformer_blocks", _PAIR, _PAIR),), prepare_capture=traceable_forward,
        timestep_per_sigma=1000),
    # HunyuanImage (2.1): joint then single blocks; with ByT5 tokens its forward orders them by their masks as 1.5 does
    "HunyuanImageTransformer2DModel": FamilySpec(
        "hunyuan-image", (BlockListSpec("transformer_blocks", _PAIR, _PAIR),
                          BlockListSpec("single_transformer_blocks", _PAIR, _PAIR)), prepare_capture=traceable_forward,
        timestep_per_sigma=1000),
    "HunyuanVideoTransformer3DModel": FamilySpec(
        "hunyuan-video",
        (BlockListSpec("transformer_blocks", _JOINT, ("hidden_states", "encoder_hidden_states"), "image_first"),
         BlockListSpec("single_transformer_blocks", _JOINT, ("hidden_states", "encoder_hidden_states"),
                       "image_first")), timestep_per_sigma=1000),
}


def _get_path(model: nn.Module, path: str) -> nn.Module:
    mod: nn.Module = model
    for part in path.split("."):
        if not hasattr(mod, part):
            raise ValueError(
                f"blocks={path!r}: {type(mod).__name__} has no attribute {part!r}; "
                f"its children are {[n for n, _ in mod.named_children()]}"
            )
        mod = getattr(mod, part)
    return mod


def _first_arg(module: nn.Module) -> str:
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        raise ValueError(f"block {type(module).__name__}.forward takes no named positional argument to use as its "
                         f"stream (FastCache reads a block's streams by argument name): give it one, e.g. "
                         f"forward(self, hidden_states, *args, **kwargs)")
    return params[0].name


#: Argument names taken as the timestep of a model that is no registered family, first match wins
#: (the ONNX runner reads its exported input by the same list).  Not ``t`` / ``time``: flow-matching
#: research code often runs those *up* (0 → 1), which the generation rule reads as a new generation
#: at every call.
TIMESTEP_ARGS = ("timestep", "timesteps", "sigma", "sigmas", "noise_level")


def timestep_arg(names) -> str | None:
    """The first of ``names`` (argument or input names) that :data:`TIMESTEP_ARGS` takes as the timestep."""
    return next((n for n in TIMESTEP_ARGS if n in names), None)


def _generic_spec(model: nn.Module, paths: list[str | BlockListSpec]) -> FamilySpec:
    lists = []
    for item in paths:
        path = item.path if isinstance(item, BlockListSpec) else item
        if not isinstance(path, str):
            raise TypeError(f"blocks entries are attribute paths (str) or fx_fastcache.BlockListSpec, got {item!r}")
        ml = _get_path(model, path)
        if not isinstance(ml, nn.ModuleList) or len(ml) == 0:
            raise ValueError(f"blocks={path!r} is a {type(ml).__name__} of length "
                             f"{len(ml) if hasattr(ml, '__len__') else '?'}; expected a non-empty nn.ModuleList")
        if isinstance(item, BlockListSpec):
            params = {n: p for n, p in inspect.signature(ml[0].forward).parameters.items()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}  # a stream is a named argument
            unknown = [n for n in item.stream_inputs if n not in params]
            if unknown or not set(item.outputs) - {None} <= set(item.stream_inputs):
                raise ValueError(f"{item!r}: stream_inputs must be arguments of {type(ml[0]).__name__}.forward "
                                 f"{list(params)} and outputs must name stream_inputs (or None)")
            lists.append(item)
        else:
            arg = _first_arg(ml[0])
            lists.append(BlockListSpec(path, (arg,), (arg,)))
        for i, block in enumerate(ml):  # one stream name per list: a block of another class must take it too
            names = inspect.signature(block.forward).parameters
            missing = [n for n in lists[-1].stream_inputs if n not in names]
            if missing and not any(p.kind is p.VAR_KEYWORD for p in names.values()):
                raise ValueError(f"blocks={path!r}: {path}.{i} ({type(block).__name__}) takes no argument "
                                 f"{missing[0]!r}, the stream of {path}.0 ({type(ml[0]).__name__}); a block list's "
                                 f"blocks must name their streams alike: give them the same argument names (or a "
                                 f"wrapper that does)")
    sig = inspect.signature(model.forward).parameters
    timestep = timestep_arg(sig)
    if timestep is None:
        logger.warning("fx-fastcache: %s.forward has no timestep argument (none of %s): calls are counted as steps, "
                       "the forecast extrapolates in that count, and a new generation is seen only after "
                       "fastcache.reset(model) or when the input jumps; name the model's timestep argument "
                       "'timestep' (e.g. in a wrapper module) to fix this", type(model).__name__, list(TIMESTEP_ARGS))
    stream = next(iter(sig)) if sig else "x"
    return FamilySpec(f"custom:{type(model).__name__}", tuple(lists), timestep, stream)


def resolve_family(model: nn.Module, blocks: Any = None) -> FamilySpec:
    """The :class:`FamilySpec` for ``model``.

    ``blocks`` (attribute path(s) of ``nn.ModuleList``\\ s, or :class:`BlockListSpec`\\ s that also
    name the blocks' streams) overrides discovery for models that are not a registered diffusers family.
    """
    if blocks is not None:
        one = isinstance(blocks, (str, BlockListSpec))
        return _generic_spec(model, [blocks] if one else list(blocks))
    spec = FAMILIES.get(type(model).__name__)
    if spec is not None:
        return spec
    lists = [name for name, child in model.named_children() if isinstance(child, nn.ModuleList) and len(child) > 0]
    if len(lists) == 1:
        logger.info("%s: using the ModuleList %r as its transformer blocks", type(model).__name__, lists[0])
        return _generic_spec(model, lists)
    found = "none" if not lists else f"several: {lists}"
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__}: it is not one of the supported "
        f"families {sorted(FAMILIES)} and its direct children contain {found} non-empty nn.ModuleList; "
        f"point the optimizer at them with optimize(model, blocks='attr.path') or blocks=['list_a', 'list_b'] "
        f"(a pipeline's: pipe.transformer = fastcache.optimize(pipe.transformer, blocks=...), then "
        f"fastcache.enable_fastcache(pipe) adopts it)"
    )


def block_modules(model: nn.Module, spec: FamilySpec) -> list[tuple[str, nn.Module, BlockListSpec]]:
    """All blocks in execution order as ``(qualified path, module, list spec)``."""
    out = []
    for bl in spec.block_lists:
        ml = _get_path(model, bl.path)
        for i, block in enumerate(ml):
            out.append((f"{bl.path}.{i}", block, bl))
    return out
