"""Identity marker ops that label a block's stream inputs and outputs in the exported graph.

Why: after ``torch.export`` a block is an anonymous run of ATen nodes; ``nn_module_stack``
tells which nodes belong to it but not which input is ``hidden_states`` and which output
continues it.  During capture each block's ``forward`` is wrapped so that its stream
arguments and return values pass through ``fastcache::mark(x, tag)``; the ``find_blocks``
pass reads the tags and ``strip_markers`` removes them, leaving the graph as exported.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from .families import FamilySpec, block_modules
from .hook_chain import own_forward_link, swapped


@torch.library.custom_op("fastcache::mark", mutates_args=())
def mark(x: torch.Tensor, tag: str) -> torch.Tensor:
    """Identity (a copy, as custom ops may not alias their inputs) carrying ``tag``."""
    return x.clone()


@mark.register_fake
def _(x: torch.Tensor, tag: str) -> torch.Tensor:
    return torch.empty_like(x)


MARK = torch.ops.fastcache.mark.default

#: The last captured call of every block: ``block -> [(arg name, kind, value)]`` with kind
#: ``"tensor"`` (value = its tag ``arg:{index}:{name}``), ``"tensors"`` (a tuple of tensors, value
#: = their tags) or ``"value"`` (the Python value).  Token routing re-exports a block with fewer
#: tokens and needs to call it exactly as the model did (``passes/route_tokens.py``).
CALLS: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, str, Any]]]" = weakref.WeakKeyDictionary()


def _call_as_given(orig: Any, bound: inspect.BoundArguments) -> Any:
    """``orig`` with ``bound``'s arguments, by keyword wherever the signature allows.

    Why not ``orig(*bound.args, **bound.kwargs)``: that passes arguments before the first missing one
    by position, and diffusers' ``@apply_lora_scale`` reads the LoRA scale from
    ``kwargs["joint_attention_kwargs"]`` (``attention_kwargs``) only, so a Flux call giving every
    argument got the scale 1.0 in the captured graph, silently."""
    params = bound.signature.parameters
    if any(p.kind is p.VAR_POSITIONAL and bound.arguments.get(n) for n, p in params.items()):
        return orig(*bound.args, **bound.kwargs)  # arguments after *args cannot be given by keyword
    args, kwargs = [], {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            kwargs[name] = value
    return orig(*args, **kwargs)


def _wrap_block(block: nn.Module, orig: Any, index: int, stream_inputs: tuple[str, ...],
                outputs: tuple[str | None, ...]):
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def forward(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        call: list[tuple[str, str, Any]] = []
        for name, v in list(bound.arguments.items()):
            if name in stream_inputs and isinstance(v, torch.Tensor):
                bound.arguments[name] = mark(v, f"in:{index}:{name}")
                call.append((name, "tensor", f"in:{index}:{name}"))
            elif isinstance(v, torch.Tensor):
                bound.arguments[name] = mark(v, f"arg:{index}:{name}")
                call.append((name, "tensor", f"arg:{index}:{name}"))
            elif isinstance(v, tuple) and v and all(isinstance(e, torch.Tensor) for e in v):
                tags = tuple(f"arg:{index}:{name}.{j}" for j in range(len(v)))
                bound.arguments[name] = tuple(mark(e, tag) for e, tag in zip(v, tags))
                call.append((name, "tensors", tags))
            else:
                call.append((name, "value", v))
        CALLS[block] = call
        out = _call_as_given(orig, bound)
        if isinstance(out, torch.Tensor):
            return mark(out, f"out:{index}:0")
        if isinstance(out, tuple):
            return tuple(mark(o, f"out:{index}:{k}") if isinstance(o, torch.Tensor) else o for k, o in enumerate(out))
        raise TypeError(f"block {index} ({type(block).__name__}) returned {type(out).__name__}; "
                        f"expected a tensor or a tuple of tensors")

    return forward


def _wrap_model(model: nn.Module, timestep_arg: str | None, stream_arg: str | None = None):
    orig = model.forward
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def forward(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        v = bound.arguments.get(timestep_arg) if timestep_arg else None
        if isinstance(v, torch.Tensor):
            bound.arguments[timestep_arg] = mark(v, "timestep")
        x = bound.arguments.get(stream_arg) if stream_arg else None
        if isinstance(x, torch.Tensor) and x.is_floating_point():  # the model's input (latents): the clock
            bound.arguments[stream_arg] = mark(x, "stream")      # compares it with the previous call's
        elif isinstance(x, list) and x and isinstance(x[0], torch.Tensor) and x[0].is_floating_point():
            bound.arguments[stream_arg] = [mark(x[0], "stream"), *x[1:]]  # latents as a list (Z-Image): the first
        return _call_as_given(orig, bound)

    return forward


@contextlib.contextmanager
def marked(model: nn.Module, spec: FamilySpec) -> Iterator[None]:
    """Within the context, blocks and the timestep argument emit marker ops.

    Why the care with hooks: diffusers installs its hooks (context parallelism's split/gather,
    offloading, casting) as the instance ``forward``.  Block markers go *inside* the hook chain
    (around the block's own forward), so what a hook adds at a block's boundary (Wan's sequence
    split in ``blocks.0``'s pre-forward hook) stays outside the marked region; the timestep
    marker goes *outside* the model's chain, so the clock reads the timestep every rank was
    given.  Whatever was there before is put back on exit, hooks included.
    """
    with contextlib.ExitStack() as stack:
        for index, (_, block, bl) in enumerate(block_modules(model, spec)):
            holder, attr = own_forward_link(block)
            stack.enter_context(swapped(holder, attr, _wrap_block(block, getattr(holder, attr), index,
                                                                  bl.stream_inputs, bl.outputs)))
        stack.enter_context(swapped(model, "forward", _wrap_model(model, spec.timestep_arg, spec.stream_arg)))
        yield
