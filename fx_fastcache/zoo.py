"""Tiny random-weight models of every supported family, with matching example inputs.

Used by the tests, the CLI (``--model tiny-dit`` ...) and the graph-diff tool.  Each entry
builds the model from a config (no downloads) and produces keyword arguments for one call
at a given timestep, so a sampling loop is ``for t in timesteps: model(**inputs(t))``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class TinyModel:
    name: str
    model: nn.Module
    make_inputs: Callable[[float, int], dict]  # (timestep, batch) -> kwargs
    output_index: int = 0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_dit(seed: int = 0, layers: int = 2) -> TinyModel:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                              num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.full((batch,), float(t)),
                    class_labels=torch.arange(batch) % 10, return_dict=False)

    return TinyModel("tiny-dit", m, inputs)


def tiny_pixart(seed: int = 0, layers: int = 2) -> TinyModel:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=layers, sample_size=8, patch_size=2, cross_attention_dim=16,
                                 caption_channels=16, norm_type="ada_norm_single",
                                 use_additional_conditions=False).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, 3, 16, generator=g),
                    timestep=torch.full((batch,), float(t)),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)

    return TinyModel("tiny-pixart", m, inputs)


def tiny_sd3(seed: int = 0, layers: int = 2) -> TinyModel:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                    pooled_projections=torch.randn(batch, 16, generator=g),
                    timestep=torch.full((batch,), float(t)), return_dict=False)

    return TinyModel("tiny-sd3", m, inputs)


def tiny_flux(seed: int = 0, layers: int = 1, single_layers: int = 2) -> TinyModel:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=layers, num_single_layers=single_layers,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                               pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        img_ids = torch.zeros(16, 3)
        img_ids[:, 1] = torch.arange(16) // 4
        img_ids[:, 2] = torch.arange(16) % 4
        return dict(hidden_states=torch.randn(batch, 16, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    pooled_projections=torch.randn(batch, 16, generator=g),
                    timestep=torch.full((batch,), float(t) / 1000.0), img_ids=img_ids, txt_ids=torch.zeros(4, 3),
                    guidance=None, return_dict=False)

    return TinyModel("tiny-flux", m, inputs)


def tiny_cogvideox(seed: int = 0, layers: int = 2) -> TinyModel:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                    num_layers=layers, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                                    text_embed_dim=16, time_embed_dim=16, max_text_seq_length=4).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 2, 4, 8, 8, generator=g),  # (B, frames, C, H, W)
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    timestep=torch.full((batch,), int(t), dtype=torch.long), return_dict=False)

    return TinyModel("tiny-cogvideox", m, inputs)


def tiny_ltx_video(seed: int = 0, layers: int = 2) -> TinyModel:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                   attention_head_dim=8, cross_attention_dim=16, num_layers=layers,
                                   caption_channels=16).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 2 * 4 * 4, 8, generator=g),  # packed (frames·H·W) tokens
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    timestep=torch.full((batch,), float(t)), encoder_attention_mask=torch.ones(batch, 4),
                    num_frames=2, height=4, width=4, return_dict=False)

    return TinyModel("tiny-ltx-video", m, inputs)


def tiny_wan(seed: int = 0, layers: int = 2) -> TinyModel:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                              out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                              rope_max_seq_len=32).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g),  # (B, C, frames, H, W)
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    timestep=torch.full((batch,), float(t)), return_dict=False)

    return TinyModel("tiny-wan", m, inputs)


def tiny_hunyuan_video(seed: int = 0, layers: int = 1, single_layers: int = 2) -> TinyModel:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       num_layers=layers, num_single_layers=single_layers, num_refiner_layers=1,
                                       patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                       rope_axes_dim=(2, 2, 4)).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g),  # (B, C, frames, H, W)
                    timestep=torch.full((batch,), float(t)),
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    encoder_attention_mask=torch.ones(batch, 4), pooled_projections=torch.randn(batch, 8, generator=g),
                    guidance=torch.full((batch,), 6000.0), return_dict=False)

    return TinyModel("tiny-hunyuan-video", m, inputs)


def tiny_hunyuan_video15(seed: int = 0, layers: int = 2, task: str = "t2v", in_channels: int = 4) -> TinyModel:
    """HunyuanVideo 1.5: text tokens of two encoders and an image embedding, padded differently per sample
    (its forward orders them by their masks); ``task="i2v"``: a non-zero image embedding.  Its pipeline
    passes the latents, the conditioning latents and a mask: ``in_channels=9`` for 4 latent channels."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    m = HunyuanVideo15Transformer3DModel(in_channels=in_channels, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=layers, num_refiner_layers=1, text_embed_dim=16,
                                         text_embed_2_dim=12, image_embed_dim=8, rope_axes_dim=(2, 2, 4),
                                         target_size=64, task_type=task).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, in_channels, 2, 4, 4, generator=g),  # (B, C, frames, H, W)
                    timestep=torch.full((batch,), float(t)),
                    encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                    encoder_attention_mask=(torch.arange(5) < 3 + torch.arange(batch).view(-1, 1) % 2).long(),
                    encoder_hidden_states_2=torch.randn(batch, 3, 12, generator=g),
                    encoder_attention_mask_2=(torch.arange(3) < 1 + torch.arange(batch).view(-1, 1) % 3).long(),
                    image_embeds=torch.randn(batch, 2, 8, generator=g) if task == "i2v" else torch.zeros(batch, 2, 8),
                    return_dict=False)

    return TinyModel("tiny-hunyuan-video15", m, inputs)


def tiny_hunyuan_image(seed: int = 0, layers: int = 1, single_layers: int = 1) -> TinyModel:
    """HunyuanImage with its ByT5 tokens (padded differently per sample: its forward orders them by their masks)."""
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(seed)
    m = HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       num_layers=layers, num_single_layers=single_layers, num_refiner_layers=1,
                                       text_embed_dim=16, text_embed_2_dim=12, rope_axes_dim=(4, 4)).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 4, 4, 4, generator=g), timestep=torch.full((batch,), float(t)),
                    encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                    encoder_attention_mask=(torch.arange(5) < 3 + torch.arange(batch).view(-1, 1) % 2).long(),
                    encoder_hidden_states_2=torch.randn(batch, 3, 12, generator=g),
                    encoder_attention_mask_2=(torch.arange(3) < 1 + torch.arange(batch).view(-1, 1) % 3).long(),
                    return_dict=False)

    return TinyModel("tiny-hunyuan-image", m, inputs)


def _image_ids(h: int, w: int, axes: int = 3) -> torch.Tensor:
    ids = torch.zeros(h * w, axes)
    ids[:, 1], ids[:, 2] = torch.arange(h * w) // w, torch.arange(h * w) % w
    return ids


def tiny_qwenimage(seed: int = 0, layers: int = 2) -> TinyModel:
    """Qwen-Image: one list of joint blocks returning ``(encoder_hidden_states, hidden_states)``."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=layers,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                    axes_dims_rope=(2, 2, 4)).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 16, 16, generator=g),  # packed 2×2 patches of a 8×8 latent
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    encoder_hidden_states_mask=torch.ones(batch, 4, dtype=torch.long),
                    timestep=torch.full((batch,), float(t) / 1000.0), img_shapes=[[(1, 4, 4)]] * batch,
                    return_dict=False)

    return TinyModel("tiny-qwenimage", m, inputs)


def _flux_like(cls_name: str, name: str, seed: int, layers: int, single_layers: int, **config) -> TinyModel:
    import diffusers

    torch.manual_seed(seed)
    m = getattr(diffusers, cls_name)(patch_size=1, in_channels=8, num_layers=layers, num_single_layers=single_layers,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                     **config).eval()
    axes = 4 if cls_name.startswith("Flux2") else 3

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 16, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    timestep=torch.full((batch,), float(t) / 1000.0), img_ids=_image_ids(4, 4, axes),
                    txt_ids=torch.zeros(4, axes), return_dict=False)

    return TinyModel(name, m, inputs)


def tiny_chroma(seed: int = 0, layers: int = 1, single_layers: int = 2) -> TinyModel:
    """Chroma: Flux's layout (joint blocks, then single blocks on the concatenated sequence)."""
    return _flux_like("ChromaTransformer2DModel", "tiny-chroma", seed, layers, single_layers,
                      axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
                      approximator_layers=1)


def tiny_flux2(seed: int = 0, layers: int = 1, single_layers: int = 2) -> TinyModel:
    """FLUX.2: joint blocks, then single blocks on the concatenated sequence."""
    return _flux_like("Flux2Transformer2DModel", "tiny-flux2", seed, layers, single_layers,
                      timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)


def tiny_wan_vace(seed: int = 0, layers: int = 3) -> TinyModel:
    """Wan VACE: Wan's blocks, with control hints added after some of them (``vace_blocks`` compute them)."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(seed)
    m = WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                  rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=4).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    control_hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g),
                    control_hidden_states_scale=torch.ones(2), timestep=torch.full((batch,), float(t)),
                    return_dict=False)

    return TinyModel("tiny-wan-vace", m, inputs)


def tiny_z_image(seed: int = 0, layers: int = 2) -> TinyModel:
    """Z-Image: latents and captions as lists of per-sample tensors, a timestep ``t = 1 − σ`` that rises,
    a noise and a caption refiner before the main ``layers``; the output is a list too."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    m = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=layers,
                                 n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[2, 2, 4],
                                 axes_lens=[64, 32, 32]).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(x=list(torch.randn(batch, 4, 1, 8, 8, generator=g).unbind(0)),  # (C, frames, H, W) each
                    t=torch.full((batch,), 1.0 - float(t) / 1000.0),
                    cap_feats=list(torch.randn(batch, 4, 16, generator=g).unbind(0)), return_dict=False)

    return TinyModel("tiny-z-image", m, inputs)


def tiny_flux3(seed: int = 0, layers: int = 1, single_layers: int = 2) -> TinyModel:
    """FLUX.3: text blocks, then image blocks (``mode_blocks["image"]``), then single blocks on the joint sequence."""
    from diffusers import Flux3Transformer2DModel

    torch.manual_seed(seed)
    m = Flux3Transformer2DModel(in_channels=8, cond_in_channels=8, num_layers=layers, num_single_layers=single_layers,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                timestep_channels=16, axes_dims_rope=(2, 2, 2, 2)).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 16, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    timestep=torch.full((batch,), float(t) / 1000.0), img_ids=_image_ids(4, 4, 4),
                    txt_ids=torch.zeros(4, 4), return_dict=False)

    return TinyModel("tiny-flux3", m, inputs)


def tiny_ltx2(seed: int = 0, layers: int = 2) -> TinyModel:
    """LTX-2: audio-video blocks that carry and return two streams, the video and the audio tokens."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    m = LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12,
                                    cross_attention_dim=24, audio_in_channels=8, audio_out_channels=8,
                                    audio_num_attention_heads=2, audio_attention_head_dim=12,
                                    audio_cross_attention_dim=24, num_layers=layers, caption_channels=16).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 2 * 4 * 4, 8, generator=g),
                    audio_hidden_states=torch.randn(batch, 6, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    audio_encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    timestep=torch.full((batch,), float(t)), sigma=torch.full((batch,), float(t)),
                    encoder_attention_mask=torch.ones(batch, 4), audio_encoder_attention_mask=torch.ones(batch, 4),
                    num_frames=2, height=4, width=4, fps=24.0, audio_num_frames=6, return_dict=False)

    return TinyModel("tiny-ltx2", m, inputs)


def tiny_wan_animate(seed: int = 0, layers: int = 2) -> TinyModel:
    """Wan Animate: Wan's blocks, with face-adapter blocks between them (they run every step)."""
    from diffusers import WanAnimateTransformer3DModel

    torch.manual_seed(seed)
    m = WanAnimateTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12,
                                     latent_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                     num_layers=layers, image_dim=16, rope_max_seq_len=32,
                                     motion_encoder_channel_sizes={"8": 8, "4": 8}, motion_encoder_size=8,
                                     motion_style_dim=16, motion_dim=4, motion_encoder_dim=16,
                                     face_encoder_hidden_dim=8, face_encoder_num_heads=2,
                                     inject_face_latents_blocks=1, motion_encoder_batch_size=8).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 12, 2, 8, 8, generator=g), timestep=torch.full((batch,), float(t)),
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    encoder_hidden_states_image=torch.randn(batch, 3, 16, generator=g),
                    pose_hidden_states=torch.randn(batch, 4, 1, 8, 8, generator=g),  # latent frames − 1
                    face_pixel_values=torch.randn(batch, 3, 4, 8, 8, generator=g),
                    return_dict=False)

    return TinyModel("tiny-wan-animate", m, inputs)


def _randomise_zero_parameters(m: nn.Module) -> None:
    """Kandinsky zero-initialises its output layers, which makes every block an identity at init (a forecast
    test would then test nothing): give them random values."""
    with torch.no_grad():
        for p in m.parameters():
            if p.numel() and p.abs().max() == 0:
                p.normal_(0, 0.1)


def tiny_kandinsky5(seed: int = 0) -> TinyModel:
    """Kandinsky 5: text blocks (stream ``x``), then visual blocks (stream ``visual_embed``); channels last."""
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(seed)
    m = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=16, time_dim=16, out_visual_dim=4,
                                     patch_size=(1, 2, 2), model_dim=16, ff_dim=32, num_text_blocks=1,
                                     num_visual_blocks=2, axes_dims=(2, 2, 4)).eval()
    _randomise_zero_parameters(m)

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 2, 8, 8, 4, generator=g),
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g), timestep=torch.full((batch,), float(t)),
                    pooled_projections=torch.randn(batch, 16, generator=g),
                    visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)], text_rope_pos=torch.arange(4),
                    return_dict=False)

    return TinyModel("tiny-kandinsky5", m, inputs)


def tiny_kandinsky6(seed: int = 0) -> TinyModel:
    """Kandinsky 6: video-text and audio-text blocks, then visual blocks carrying the video and audio streams."""
    from diffusers import Kandinsky6Transformer3DModel

    torch.manual_seed(seed)
    m = Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=16, time_dim=16,
                                     patch_size=(1, 2, 2), model_dim=16, ff_dim=32, num_text_blocks=1,
                                     num_visual_blocks=2, axes_dims=(2, 2, 4), in_audio_dim=4, out_audio_dim=4).eval()
    _randomise_zero_parameters(m)

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(hidden_states=torch.randn(batch, 2, 8, 8, 9, generator=g),  # (B, T, H, W, 2C + 1)
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                    pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), float(t)),
                    audio_hidden_states=torch.randn(batch, 6, 4, generator=g), return_dict=False)

    return TinyModel("tiny-kandinsky6", m, inputs)


def tiny_longcat_image(seed: int = 0, layers: int = 1, single_layers: int = 2) -> TinyModel:
    """LongCat-Image: Flux's layout."""
    return _flux_like("LongCatImageTransformer2DModel", "tiny-longcat-image", seed, layers, single_layers,
                      axes_dims_rope=(2, 2, 4), pooled_projection_dim=16)


def tiny_ovis_image(seed: int = 0, layers: int = 1, single_layers: int = 2) -> TinyModel:
    """Ovis-Image: Flux's layout."""
    return _flux_like("OvisImageTransformer2DModel", "tiny-ovis-image", seed, layers, single_layers,
                      axes_dims_rope=(2, 2, 4), out_channels=8)


def tiny_cogview3plus(seed: int = 0, layers: int = 2) -> TinyModel:
    """CogView3-Plus: joint blocks that return ``(hidden_states, encoder_hidden_states)``."""
    from diffusers import CogView3PlusTransformer2DModel

    torch.manual_seed(seed)
    m = CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8,
                                       num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=16,
                                       condition_dim=4, pos_embed_max_size=16, sample_size=8).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        size = torch.tensor([[64.0, 64.0]] * batch)
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, 4, 16, generator=g), timestep=torch.full((batch,), float(t)),
                    original_size=size, target_size=size, crop_coords=torch.zeros(batch, 2), return_dict=False)

    return TinyModel("tiny-cogview3plus", m, inputs)


class CustomBlock(nn.Module):
    """A minimal adaLN-style block: the timestep enters through a modulation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mod = nn.Linear(dim, 2 * dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mod(temb).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


class CustomDiT(nn.Module):
    """A user model that is no diffusers class: a ModuleList of blocks and a timestep."""

    def __init__(self, dim: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.proj_in = nn.Linear(4, dim)
        self.temb = nn.Linear(1, dim)
        self.blocks = nn.ModuleList([CustomBlock(dim) for _ in range(layers)])
        self.proj_out = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = torch.nn.functional.silu(self.temb(timestep.view(-1, 1) / 1000.0))
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(h)


def tiny_custom(seed: int = 0, layers: int = 3) -> TinyModel:
    torch.manual_seed(seed)
    m = CustomDiT(layers=layers).eval()

    def inputs(t: float, batch: int = 2) -> dict:
        g = _gen(seed + 1)
        return dict(x=torch.randn(batch, 10, 4, generator=g), timestep=torch.full((batch,), float(t)))

    return TinyModel("tiny-custom", m, inputs)


TINY: dict[str, Callable[..., TinyModel]] = {
    "tiny-dit": tiny_dit,
    "tiny-pixart": tiny_pixart,
    "tiny-sd3": tiny_sd3,
    "tiny-flux": tiny_flux,
    "tiny-custom": tiny_custom,
    "tiny-cogvideox": tiny_cogvideox,
    "tiny-ltx-video": tiny_ltx_video,
    "tiny-wan": tiny_wan,
    "tiny-hunyuan-video": tiny_hunyuan_video,
    # registered diffusers models beyond the eight families of the README
    "tiny-qwenimage": tiny_qwenimage,
    "tiny-chroma": tiny_chroma,
    "tiny-flux2": tiny_flux2,
    "tiny-wan-vace": tiny_wan_vace,
    "tiny-z-image": tiny_z_image,
    "tiny-flux3": tiny_flux3,
    "tiny-ltx2": tiny_ltx2,
    "tiny-wan-animate": tiny_wan_animate,
    "tiny-kandinsky5": tiny_kandinsky5,
    "tiny-kandinsky6": tiny_kandinsky6,
    "tiny-longcat-image": tiny_longcat_image,
    "tiny-ovis-image": tiny_ovis_image,
    "tiny-cogview3plus": tiny_cogview3plus,
    "tiny-hunyuan-video15": tiny_hunyuan_video15,
    "tiny-hunyuan-image": tiny_hunyuan_image,
}


def make_tiny(name: str, **kwargs) -> TinyModel:
    if name not in TINY:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY)}")
    return TINY[name](**kwargs)
