"""Forwards that ``torch.export`` can trace, put in place of a model's own for the capture only.

Why this exists: a few diffusers models decide their token layout from tensor values in Python, so
``torch.export`` cannot trace them at all.  HunyuanVideo 1.5 branches on ``torch.all(image_embeds == 0)``
and builds its text sequence per sample with boolean indexing (``text[text_mask]``), whose sizes depend
on the masks; HunyuanImage does the same with its ByT5 tokens.  The forward here computes the same values with tensor operations of fixed shape: the
branch becomes a ``torch.where``, and each token goes to a place counted with cumulative sums.  The
captured graph then takes any masks of the same shapes, and the model itself is left as it was.

Each forward mirrors the model's own line for line apart from those parts, for the diffusers release named
in :data:`MIRRORED`: :func:`check_mirrored` refuses a model whose forward's source differs from it, so a
change in diffusers is an error naming the fix, never a silently different computation.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from .hook_chain import own_forward_link, swapped

#: class name -> (sha256 of ``inspect.getsource(cls.forward)`` mirrored, diffusers version it came from)
MIRRORED: dict[str, tuple[str, str]] = {
    "HunyuanVideo15Transformer3DModel": (
        "6a119831862d5f463cc7b762d6321605401492c10a74f9cf8adf72dc1f9d343e", "0.42.1"),
    "HunyuanImageTransformer2DModel": (
        "213969c1fc1d92900a4346b78da0deabd22910bddb509de202dce67532693251", "0.42.1"),
}


def source_digest(cls: type) -> str:
    return hashlib.sha256(inspect.getsource(cls.forward).encode()).hexdigest()


def check_mirrored(model: nn.Module) -> None:
    """Raise if ``model``'s forward is not the source the traceable forward mirrors."""
    name = type(model).__name__
    digest, version = MIRRORED[name]
    if source_digest(type(model)) != digest:
        import diffusers

        raise NotImplementedError(
            f"fx-fastcache captures {name} with a traceable copy of its forward, written for diffusers {version}; "
            f"the forward of the installed diffusers {diffusers.__version__} differs from it, so the copy could "
            f"compute something else. Install diffusers=={version}, or run this model without FastCache")


def _reorder_text(parts: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the valid tokens of every part in order, then the padding of every part in order
    (padding zeroed where ``zero`` says so): HunyuanVideo 1.5's loop of ``torch.cat([image[image_mask],
    ...])``.  Each token's place is counted with cumulative sums and the tokens are scattered there (a
    stable sort would do the same, but ONNX has no stable sort)."""
    seq = torch.cat([torch.where(m.unsqueeze(-1), x, torch.zeros_like(x)) if zero else x for x, m, zero in parts],
                    dim=1)
    valid = torch.cat([m for _, m, _ in parts], dim=1)
    n_valid = valid.sum(dim=1, keepdim=True)
    place = torch.where(valid, valid.cumsum(dim=1) - 1, n_valid + (~valid).cumsum(dim=1) - 1)
    seq = torch.zeros_like(seq).scatter(1, place.unsqueeze(-1).expand(-1, -1, seq.shape[-1]), seq)
    return seq, torch.arange(valid.shape[1], device=valid.device) < n_valid


def hunyuan_video15_forward(
    self,
    hidden_states: torch.Tensor,
    timestep: torch.LongTensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor,
    timestep_r: torch.LongTensor | None = None,
    encoder_hidden_states_2: torch.Tensor | None = None,
    encoder_attention_mask_2: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    attention_kwargs: dict[str, Any] | None = None,
    return_dict: bool = True,
):
    """``HunyuanVideo15Transformer3DModel.forward`` (diffusers 0.42.1) with a traceable token layout."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    batch_size, num_channels, num_frames, height, width = hidden_states.shape
    p_t, p_h, p_w = self.config.patch_size_t, self.config.patch_size, self.config.patch_size
    post_patch_num_frames = num_frames // p_t
    post_patch_height = height // p_h
    post_patch_width = width // p_w

    image_rotary_emb = self.rope(hidden_states)
    temb = self.time_embed(timestep, timestep_r=timestep_r)
    hidden_states = self.x_embedder(hidden_states)

    encoder_hidden_states = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    encoder_hidden_states = encoder_hidden_states + self.cond_type_embed(
        torch.zeros_like(encoder_hidden_states[:, :, 0], dtype=torch.long))

    encoder_hidden_states_2 = self.context_embedder_2(encoder_hidden_states_2)
    encoder_hidden_states_2 = encoder_hidden_states_2 + self.cond_type_embed(
        torch.ones_like(encoder_hidden_states_2[:, :, 0], dtype=torch.long))

    encoder_hidden_states_3 = self.image_embedder(image_embeds)
    is_t2v = torch.all(image_embeds == 0)  # the model's `if is_t2v:` as a select
    encoder_hidden_states_3 = torch.where(is_t2v, encoder_hidden_states_3 * 0.0, encoder_hidden_states_3)
    encoder_attention_mask_3 = torch.where(
        is_t2v,
        torch.zeros((batch_size, encoder_hidden_states_3.shape[1]), dtype=encoder_attention_mask.dtype,
                    device=encoder_attention_mask.device),
        torch.ones((batch_size, encoder_hidden_states_3.shape[1]), dtype=encoder_attention_mask.dtype,
                   device=encoder_attention_mask.device))
    encoder_hidden_states_3 = encoder_hidden_states_3 + self.cond_type_embed(
        2 * torch.ones_like(encoder_hidden_states_3[:, :, 0], dtype=torch.long))

    # [valid image, valid byt5, valid mllm, invalid image, invalid byt5 (zeroed), invalid mllm (zeroed)]
    encoder_hidden_states, encoder_attention_mask = _reorder_text([
        (encoder_hidden_states_3, encoder_attention_mask_3.bool(), False),
        (encoder_hidden_states_2, encoder_attention_mask_2.bool(), True),
        (encoder_hidden_states, encoder_attention_mask.bool(), True),
    ])

    for block in self.transformer_blocks:
        hidden_states, encoder_hidden_states = block(
            hidden_states, encoder_hidden_states, temb, encoder_attention_mask, image_rotary_emb)

    hidden_states = self.norm_out(hidden_states, temb)
    hidden_states = self.proj_out(hidden_states)
    hidden_states = hidden_states.reshape(
        batch_size, post_patch_num_frames, post_patch_height, post_patch_width, -1, p_t, p_h, p_w)
    hidden_states = hidden_states.permute(0, 4, 1, 5, 2, 6, 3, 7)
    hidden_states = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
    if not return_dict:
        return (hidden_states,)
    return Transformer2DModelOutput(sample=hidden_states)


def hunyuan_image_forward(
    self,
    hidden_states: torch.Tensor,
    timestep: torch.LongTensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor,
    timestep_r: torch.LongTensor | None = None,
    encoder_hidden_states_2: torch.Tensor | None = None,
    encoder_attention_mask_2: torch.Tensor | None = None,
    guidance: torch.Tensor | None = None,
    attention_kwargs: dict[str, Any] | None = None,
    return_dict: bool = True,
):
    """``HunyuanImageTransformer2DModel.forward`` (diffusers 0.42.1) with a traceable token layout: with
    the ByT5 tokens, [valid ByT5, valid MLLM, padding ByT5, padding MLLM] per sample (nothing zeroed)."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    if hidden_states.ndim == 4:
        batch_size, channels, height, width = hidden_states.shape
        sizes = (height, width)
    elif hidden_states.ndim == 5:
        batch_size, channels, frame, height, width = hidden_states.shape
        sizes = (frame, height, width)
    else:
        raise ValueError(f"hidden_states must be a 4D or 5D tensor, got {hidden_states.shape}")
    post_patch_sizes = tuple(d // p for d, p in zip(sizes, self.config.patch_size))

    image_rotary_emb = self.rope(hidden_states)
    encoder_attention_mask = encoder_attention_mask.bool()
    temb = self.time_guidance_embed(timestep, guidance=guidance, timestep_r=timestep_r)
    hidden_states = self.x_embedder(hidden_states)
    encoder_hidden_states = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)

    if self.context_embedder_2 is not None and encoder_hidden_states_2 is not None:
        encoder_hidden_states_2 = self.context_embedder_2(encoder_hidden_states_2)
        encoder_hidden_states, encoder_attention_mask = _reorder_text([
            (encoder_hidden_states_2, encoder_attention_mask_2.bool(), False),
            (encoder_hidden_states, encoder_attention_mask, False),
        ])

    attention_mask = torch.nn.functional.pad(encoder_attention_mask, (hidden_states.shape[1], 0), value=True)
    attention_mask = attention_mask.unsqueeze(1).unsqueeze(2)
    for block in self.transformer_blocks:
        hidden_states, encoder_hidden_states = block(
            hidden_states, encoder_hidden_states, temb, attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb)
    for block in self.single_transformer_blocks:
        hidden_states, encoder_hidden_states = block(
            hidden_states, encoder_hidden_states, temb, attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb)

    hidden_states = self.norm_out(hidden_states, temb)
    hidden_states = self.proj_out(hidden_states)
    out_channels = self.config.out_channels
    hidden_states = hidden_states.reshape(
        *([batch_size] + list(post_patch_sizes) + [out_channels] + list(self.config.patch_size)))
    ndim = len(post_patch_sizes)
    permute_pattern = [0, ndim + 1]
    for i in range(ndim):
        permute_pattern.extend([i + 1, ndim + 2 + i])
    hidden_states = hidden_states.permute(*permute_pattern)
    hidden_states = hidden_states.reshape(*([batch_size, out_channels] + [
        post_patch * patch for post_patch, patch in zip(post_patch_sizes, self.config.patch_size)]))
    if not return_dict:
        return (hidden_states,)
    return Transformer2DModelOutput(sample=hidden_states)


#: class name -> the traceable forward
TRACEABLE_FORWARDS = {"HunyuanVideo15Transformer3DModel": hunyuan_video15_forward,
                      "HunyuanImageTransformer2DModel": hunyuan_image_forward}


@contextlib.contextmanager
def traceable_forward(model: nn.Module, kw: dict) -> Iterator[None]:
    """For the capture only (a family's ``prepare_capture``), the model's own forward is its traceable copy:
    the innermost link of a diffusers hook chain, so hooks on the model still run around it.  Whatever
    was there is put back after."""
    check_mirrored(model)
    holder, attr = own_forward_link(model)
    with swapped(holder, attr, types.MethodType(TRACEABLE_FORWARDS[type(model).__name__], model)):
        yield
