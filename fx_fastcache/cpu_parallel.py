"""CPU-only workarounds that let diffusers' context parallelism run on CPU with gloo.

For tests, CI and the ``--tiny`` examples only: on GPUs none of this is needed, and nothing
in fx-fastcache calls it by itself.  :func:`patch_diffusers_for_cpu` makes two process-wide
changes (diffusers 0.42.1, torch 2.13):

* ``torch.accelerator.device_count`` returns 1 when no accelerator is present: diffusers'
  ``enable_parallelism`` computes ``rank % torch.accelerator.device_count()``, which divides by
  zero on a CPU-only machine.
* Ring attention needs each partial attention's log-sum-exp, and diffusers' native attention
  op refuses ``return_lse=True``.  A replacement op asks the CPU flash-attention kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``, which returns ``(out, lse)``) when
  the LSE is requested and defers to diffusers' op otherwise.  Attention masks are not
  supported on that path (QwenImage's ring attention would need them).
"""
from __future__ import annotations

import functools
from typing import Any

import torch


def patch_diffusers_for_cpu() -> None:
    """Apply both CPU workarounds (idempotent); call before ``model.enable_parallelism``."""
    if not torch.accelerator.is_available() and torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    from diffusers.models import attention_dispatch as ad

    if getattr(ad._native_attention_forward_op, "_fastcache_cpu_lse", False):
        return
    original = ad._native_attention_forward_op

    @functools.wraps(original)
    def forward_op(ctx: Any, query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                   _save_ctx: bool = True, _parallel_config: Any = None):
        if not return_lse or query.device.type != "cpu":
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                            _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        if attn_mask is not None or enable_gqa:
            raise ValueError("the CPU ring-attention shim (fx_fastcache.cpu_parallel) supports neither attention "
                             "masks nor grouped-query attention; use ulysses_degree instead of ring_degree")
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # (B, S, H, D) -> (B, H, S, D)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                              scale=scale)
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # (B, S, H, D), (B, S, H)

    forward_op._fastcache_cpu_lse = True
    ad._native_attention_forward_op = forward_op
