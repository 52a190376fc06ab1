"""Tiny diffusers pipelines assembled offline from config (random weights, no hub downloads).

Used by the pipeline tests and by the ``--tiny`` mode of ``examples/``.  Each builder returns a
:class:`TinyPipeline`: the pipeline plus the keyword arguments of one small call (few steps,
short prompts, a seeded generator) so that ``tp.pipe(**tp.call_kwargs())`` runs in about a
second on CPU.  Tokenizers are word-level ``tokenizers`` models built in memory (one serves
every CLIP and T5 slot); text encoders are 2-layer CLIP/T5 models from config.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .quiet import library_noise_silenced
from .zoo import tiny_wan

logger = logging.getLogger(__name__)

WORDS = ("a photo of an astronaut riding horse cat dog on the moon red blue green small large "
         "painting drawing blurry ugly low quality digit zero one two three four five six seven eight nine").split()


@dataclass
class TinyPipeline:
    """A tiny pipeline and the keyword arguments of one short, deterministic call."""

    name: str
    pipe: Any
    kwargs: dict[str, Any] = field(default_factory=dict)

    def call_kwargs(self, seed: int = 0, **overrides: Any) -> dict[str, Any]:
        """Fresh kwargs for one call (a new seeded generator each time)."""
        kw = dict(self.kwargs)
        kw["generator"] = torch.Generator().manual_seed(seed)
        kw.update(overrides)
        return kw


def tiny_tokenizer(max_length: int = 77):
    """A word-level fast tokenizer built in memory (no files, no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "</s>", "<s>"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>", model_max_length=max_length)


def _clip(hidden: int = 32, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden, bos_token_id=3,
                         eos_token_id=2, pad_token_id=0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=1000, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8)
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int = 4, flow: bool = False, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra: dict[str, Any] = {}
    if flow:  # SD3/Flux-style: no quant convs, shifted latents
        extra = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=latent_channels,
                         layers_per_block=1, **extra).eval()


def tiny_dit_pipeline(seed: int = 0, layers: int = 2) -> TinyPipeline:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    with torch.no_grad():  # a random DiT's noise prediction, unrelated to its input, makes DDIM's first
        tr.proj_out_2.weight.mul_(0.1)  # step replace the latent wholesale (cosine 0.1), which the
        tr.proj_out_2.bias.mul_(0.1)  # new-generation rule reads as fresh noise; small predictions keep
        # the latents as continuous as a trained model's (fx_fastcache/runtime/generation.py, rule 4)
    pipe = DiTPipeline(transformer=tr, vae=_vae(4, seed=seed), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return TinyPipeline("dit", pipe, dict(class_labels=[1, 7], num_inference_steps=6, guidance_scale=4.0,
                                          output_type="np"))


def tiny_pixart_pipeline(seed: int = 0, layers: int = 2) -> TinyPipeline:
    """PixArt-Σ (``PixArtSigmaPipeline``) with a random 2-block transformer and T5."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(seed)
    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=layers, sample_size=8, patch_size=2, cross_attention_dim=16,
                                  caption_channels=32, norm_type="ada_norm_single", attention_bias=True,
                                  activation_fn="gelu-approximate", norm_elementwise_affine=False, norm_eps=1e-6,
                                  use_additional_conditions=False).eval()
    pipe = PixArtSigmaPipeline(tokenizer=tiny_tokenizer(), text_encoder=_t5(32, seed), vae=_vae(4, seed=seed),
                               transformer=tr, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return TinyPipeline("pixart", pipe, dict(prompt="a photo of an astronaut riding a horse",
                                             negative_prompt="blurry", num_inference_steps=6,
                                             guidance_scale=4.5, use_resolution_binning=False,
                                             clean_caption=False, max_sequence_length=16, output_type="np"))


def tiny_sd3_pipeline(seed: int = 0, layers: int = 2) -> TinyPipeline:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    # joint_attention_dim must hold the two CLIP hidden states side by side (32 + 32); T5 is left out
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                               pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16).eval()
    tok = tiny_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_vae(4, flow=True, seed=seed),
                                    text_encoder=_clip(32, projection=True, seed=seed), tokenizer=tok,
                                    text_encoder_2=_clip(32, projection=True, seed=seed + 1), tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return TinyPipeline("sd3", pipe, dict(prompt="a photo of a cat on the moon", negative_prompt="blurry",
                                          num_inference_steps=6, guidance_scale=5.0, max_sequence_length=16,
                                          output_type="np"))


def tiny_flux_pipeline(seed: int = 0, layers: int = 1, single_layers: int = 2) -> TinyPipeline:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                pooled_projection_dim=32, axes_dims_rope=(2, 2, 4)).eval()
    tok = tiny_tokenizer()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4, flow=True, seed=seed),
                        text_encoder=_clip(32, seed=seed), tokenizer=tok, text_encoder_2=_t5(32, seed),
                        tokenizer_2=tiny_tokenizer(16), transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return TinyPipeline("flux", pipe, dict(prompt="a photo of a dog", num_inference_steps=6, guidance_scale=3.5,
                                           height=8, width=8, max_sequence_length=16, output_type="np"))


def tiny_wan_pipeline(seed: int = 0, layers: int = 2, experts: int = 1) -> TinyPipeline:
    """Wan 2.1 text-to-video: CFG as two transformer calls per step in ``cache_context("cond")`` /
    ``("uncond")``; a 3-D VAE (8× spatial, 4× temporal) and a UMT5 encoder from config.  ``experts=2``:
    Wan 2.2 A14B's layout, ``transformer_2`` runs the steps below ``boundary_ratio=0.5``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tr = tiny_wan(seed=seed, layers=layers).model
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    te = UMT5EncoderModel(UMT5Config(vocab_size=1000, d_model=16, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                                     relative_attention_num_buckets=8)).eval()
    if experts not in (1, 2):
        raise ValueError(f"experts={experts!r}: Wan pipelines have 1 or 2 transformers")
    two = dict(transformer_2=tiny_wan(seed=seed + 1, layers=layers).model, boundary_ratio=0.5) if experts == 2 else {}
    pipe = WanPipeline(tokenizer=tiny_tokenizer(16), text_encoder=te, transformer=tr, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **two)
    pipe.set_progress_bar_config(disable=True)
    return TinyPipeline("wan", pipe, dict(prompt="a cat on the moon", negative_prompt="blurry", height=64, width=64,
                                          num_frames=5, num_inference_steps=6, guidance_scale=5.0,
                                          max_sequence_length=16, output_type="np"))


#: one name per family, as in ``examples/<name>.py`` and the CLI's ``tiny-<name>`` models
TINY_PIPELINES: dict[str, Callable[..., TinyPipeline]] = {
    "dit": tiny_dit_pipeline,
    "pixart": tiny_pixart_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "wan": tiny_wan_pipeline,
}


#: former names, still accepted
ALIASES = {"pixart-sigma": "pixart"}
tiny_pixart_sigma_pipeline = tiny_pixart_pipeline


def make_tiny_pipeline(name: str, **kwargs: Any) -> TinyPipeline:
    """Build the tiny pipeline ``name`` (one of :data:`TINY_PIPELINES`)."""

    name = ALIASES.get(name, name)
    if name not in TINY_PIPELINES:
        raise ValueError(f"unknown tiny pipeline {name!r}; choose one of {sorted(TINY_PIPELINES)}")
    with library_noise_silenced():  # transformers' torchvision notices on importing the pipeline classes
        return TINY_PIPELINES[name](**kwargs)
