"""Motion-aware token routing: the run-time pieces that ``passes/route_tokens.py`` inserts.

Why it exists: inside a block that *is* computed, most image tokens barely change between
steps.  A :class:`TokenRouter` (one per block, owned by the block's guard) scores every token by
its motion ``S_i = ||x_i - x_ref,i||²`` (block input now vs. at the token's last computation),
picks a *fixed* number ``k`` of the most salient tokens per sample with ``torch.topk`` (static
shapes: inductor compiles once) and, after the block ran, keeps the state: the reference input
of the routed tokens and the block residual of every token.  Static tokens take the cached
residual ``y = x + R``.  All decisions are tensors inside the graph (no ``.item()``).

:class:`RoutedCall` is the block module re-exported for ``k`` tokens: it calls the original
diffusers block with exactly the arguments the model used (recorded by ``markers.CALLS``), the
image-token stream replaced by the gathered tokens.  Text/encoder tokens are never dropped.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from ..graph_protocol import SELECT, UPDATE
from .state_ops import assign, assign_residual

logger = logging.getLogger(__name__)


def _batch_of(x: torch.Tensor, b: int) -> torch.Tensor:
    """``x`` with batch ``b``: a batch-shared ``(1, ...)`` tensor is expanded (a view)."""
    return x.expand(b, *x.shape[1:]) if x.shape[0] == 1 and b != 1 else x


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, j]]`` for ``x`` (B, N, ...) and ``idx`` (B, k) → (B, k, ...).

    ``x`` may also be a per-token table shared by the batch, ``(1, N, ...)`` (Wan's and
    HunyuanVideo's rotary tables): every sample then gets its own rows of it.
    """
    x = _batch_of(x, idx.shape[0])
    index = idx.reshape(*idx.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


def scatter_tokens(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``base`` with rows ``idx`` (per sample) replaced by ``src`` (out of place, contiguous)."""
    return base.scatter(1, idx.unsqueeze(-1).expand(-1, -1, base.shape[-1]), src).contiguous()


def gather_joint_mask(mask: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """An attention mask over the joint sequence ``[image tokens (n), text tokens]`` (last dim),
    ``(B or 1, ..., n + L)``: the routed image positions of each sample, then every text position."""
    b, k = idx.shape
    mask = _batch_of(mask, b)
    img, rest = mask[..., :n], mask[..., n:]
    index = idx.reshape(b, *([1] * (img.ndim - 2)), k).expand(*img.shape[:-1], k)
    return torch.cat([torch.gather(img, -1, index), rest], dim=-1)


def gather_table(table: torch.Tensor, idx: torch.Tensor, offset: int) -> torch.Tensor:
    """A per-position table shared by the batch (Flux rotary ``(L + N, d)``): keep the first
    ``offset`` rows (text tokens) and gather the image rows with sample 0's indices (routing
    uses batch-shared indices whenever such a table exists)."""
    return torch.cat([table[:offset], table[offset:].index_select(0, idx[0])], dim=0)


class TokenRouter(nn.Module):
    """State and statistics of one block's token routing.

    Buffers: ``x_ref`` (block input of each token at its last computation), ``resid`` (block
    residual of each token), ``have`` (a reference exists in this generation), counters
    ``static_tokens`` / ``total_tokens`` (tokens of computed blocks that took the cached
    residual / all tokens of computed blocks) and ``routed_calls`` (computations that routed).
    """

    _is_impure = True  # mutates its buffers: never dead-code-eliminated

    def __init__(self, shape: tuple[int, ...], k: int, dtype: torch.dtype, device: torch.device,
                 shared: bool = False) -> None:
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"token routing needs a (batch, tokens, dim) stream, got shape {shape}")
        b, n, _ = shape
        if not 1 <= k <= n:
            raise ValueError(f"routing capacity k={k} must be in [1, {n}] tokens")
        self.k = k
        self.n_tokens = n
        self.shared = shared
        self.register_buffer("x_ref", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("resid", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("have", torch.tensor(0.0, device=device))
        self.register_buffer("static_tokens", torch.tensor(0.0, device=device))
        self.register_buffer("total_tokens", torch.tensor(0.0, device=device))
        self.register_buffer("routed_calls", torch.tensor(0.0, device=device))

    def forward(self, op: str, *args: Any):
        if op == SELECT:
            return self.select(*args)
        if op == UPDATE:
            return self.update(*args)
        raise ValueError(f"TokenRouter op {op!r}; expected {SELECT!r} or {UPDATE!r}")

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """``||x_i - x_ref,i||²`` per sample and token, (B, N) in float32."""
        return (x.float() - self.x_ref.float()).pow(2).sum(-1)

    def select(self, step: torch.Tensor, new_gen: torch.Tensor, force: torch.Tensor, warmup: torch.Tensor,
               x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(active, idx)``: route this step (a reference exists, past warm-up, not forced) and
        the sorted indices (B, k) of the ``k`` most salient tokens of every sample."""
        have = torch.where(new_gen, torch.zeros_like(self.have), self.have)
        active = (have > 0) & (force <= 0) & (step >= warmup)
        s = self.saliency(x)
        if self.shared:
            s = s.sum(0, keepdim=True)
        idx = torch.topk(s, self.k, dim=1, sorted=False).indices
        idx = torch.sort(idx, dim=1).values  # token order preserved: k == N is the identity
        if self.shared:
            idx = idx.expand(x.shape[0], -1)
        return active, idx.contiguous()

    def update(self, pred: torch.Tensor, new_gen: torch.Tensor, active: torch.Tensor, idx: torch.Tensor,
               x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """After the block's cond: a computed block refreshes the residual of every token and the
        reference input of the tokens it computed (all of them when not routing)."""
        computed = ~pred
        routed_ref = scatter_tokens(self.x_ref, idx, gather_tokens(x, idx))
        new_ref = torch.where(active, routed_ref, x)
        assign(self.x_ref, computed, new_ref)
        assign_residual(self.resid, computed, y, x)
        have = torch.where(new_gen, torch.zeros_like(self.have), self.have)
        self.have.copy_(torch.where(computed, torch.ones_like(have), have))
        tokens = float(x.shape[0] * self.n_tokens)
        static = float(x.shape[0] * (self.n_tokens - self.k))
        c = computed.to(self.total_tokens.dtype)
        self.total_tokens.add_(c * tokens)
        self.static_tokens.add_(c * active.to(c.dtype) * static)
        self.routed_calls.add_(c * active.to(c.dtype))
        return pred

    def reset(self) -> None:
        self.x_ref.zero_()
        self.resid.zero_()
        self.have.zero_()
        self.static_tokens.zero_()
        self.total_tokens.zero_()
        self.routed_calls.zero_()


def _dit_context(block: nn.Module, kwargs: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    return block.norm1(x, kwargs.get("timestep"), kwargs.get("class_labels"), hidden_dtype=x.dtype)[0]


def _pixart_context(block: nn.Module, kwargs: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    t = kwargs["timestep"]
    shift, scale = (block.scale_shift_table[None] + t.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)[:2]
    return (block.norm1(x) * (1 + scale) + shift).squeeze(1)


def attention_context_fn(block: nn.Module):
    """For blocks whose self-attention input is computable for *all* tokens outside the block
    (diffusers ``BasicTransformerBlock`` with adaLN-Zero (DiT) or adaLN-single (PixArt)), a
    function ``(block, kwargs, x_full) -> normalised, modulated x_full``: routed tokens then use
    every token's keys/values.  ``None`` otherwise (joint SD3/Flux blocks: routed tokens attend
    to routed + text tokens)."""
    if type(block).__name__ != "BasicTransformerBlock" or getattr(block, "pos_embed", None) is not None \
            or getattr(block, "only_cross_attention", False):
        return None
    norm_type = getattr(block, "norm_type", None)
    if norm_type == "ada_norm_zero":
        return _dit_context
    if norm_type == "ada_norm_single":
        return _pixart_context
    return None


def call_with_context(block: nn.Module, kwargs: dict[str, Any], context: torch.Tensor | None):
    """``block(**kwargs)``, its ``attn1`` reading keys/values from ``context`` when given."""
    if context is None:
        return block(**kwargs)
    attn = block.attn1
    orig = attn.forward

    def forward(hidden_states, encoder_hidden_states=None, **kw):
        return orig(hidden_states, encoder_hidden_states=context, **kw)

    attn.forward = forward
    try:
        return block(**kwargs)
    finally:
        del attn.forward


class RoutedCall(nn.Module):
    """Calls ``block`` as the model did, from flat tensors (the order of ``call``'s tensor
    entries, then the full token stream when ``context_fn`` is set), returning the outputs
    ``out_index`` (block return positions) as a tuple."""

    def __init__(self, block: nn.Module, call: list[tuple[str, str, Any]], out_index: list[int],
                 context_fn=None) -> None:
        super().__init__()
        self.block = block
        self.call = call
        self.out_index = out_index
        self.context_fn = context_fn

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs: dict[str, Any] = {}
        pos = 0
        for name, kind, value in self.call:
            if kind == "tensor":
                kwargs[name] = tensors[pos]
                pos += 1
            elif kind == "tensors":
                kwargs[name] = tuple(tensors[pos:pos + len(value)])
                pos += len(value)
            else:
                kwargs[name] = value
        context = self.context_fn(self.block, kwargs, tensors[pos]) if self.context_fn is not None else None
        out = call_with_context(self.block, kwargs, context)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return tuple(out[i] for i in self.out_index)


def spatial_counts(guards: list[nn.Module]) -> tuple[float, float]:
    """``(static tokens, tokens)`` of computed blocks over the routers of ``guards`` (host sync:
    statistics only)."""
    static = total = 0.0
    for g in guards:
        r = g.router
        if isinstance(r, TokenRouter):
            static += float(r.static_tokens)
            total += float(r.total_tokens)
    return static, total
