"""Shared state of one run of the pass pipeline, and the per-block regions it works on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fx_fastcache import graph_protocol as gp


@dataclass
class BlockRegion:
    """One transformer block's run of nodes in the captured graph.

    ``stream_inputs`` maps a stream name (block argument) to the node feeding it;
    ``outputs`` lists ``(output index, stream name, node)`` for every live block output.
    ``probe`` is the block's modulated input (input of its first linear layer on the hidden
    states), or ``None`` if not needed/found.
    """

    index: int
    name: str
    nodes: list[fx.Node]
    stream_inputs: dict[str, fx.Node] = field(default_factory=dict)
    outputs: list[tuple[int, str, fx.Node]] = field(default_factory=list)
    probe: fx.Node | None = None
    hoisted: list[fx.Node] = field(default_factory=list)
    #: ``(index, name)`` of the blocks inside this region: just this block, or every block of a
    #: guarded span (``passes/group_spans.py``).  Empty until ``group_spans`` ran.
    members: list[tuple[int, str]] = field(default_factory=list)

    @property
    def block_names(self) -> list[str]:
        return [name for _, name in self.members] or [self.name]


@dataclass
class PassContext:
    model: nn.Module
    spec: Any  # FamilySpec
    config: Any  # FastCacheConfig
    policy: Any  # Policy instance
    store: Any  # CalibrationStore
    blocks: list[BlockRegion] = field(default_factory=list)
    timestep: fx.Node | None = None
    #: The model's stream input (its latents), read by the clock's new-generation rule.
    stream_input: fx.Node | None = None
    guards: list[str] = field(default_factory=list)
    step_decider: str | None = None
    clock: str | None = None
    notes: dict[str, list[str]] = field(default_factory=dict)
    #: Analysis results later passes read (``"block_args"``: tag → node, from ``find_block_args``).
    extras: dict[str, Any] = field(default_factory=dict)
    #: What will run the graph (``"inductor"`` or ``"eager"``); backend-specific passes read it.
    backend: str = "eager"
    #: Process group the tokens are split over (context parallelism), ``None`` on one device;
    #: deciders sum their statistic over it (``runtime/distributed.py``).
    process_group: Any = None

    def note(self, pass_name: str, text: str) -> None:
        self.notes.setdefault(pass_name, []).append(text)


@dataclass
class PassResult:
    name: str
    nodes_before: int
    nodes_after: int
    added: list[str]
    removed: list[str]
    code_before: str
    code_after: str


def stack_paths(node: fx.Node) -> list[str]:
    return [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]


def latents_and_first_output(gm: fx.GraphModule, ctx: PassContext, field: str,
                             need: str) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``(output node, latents, first output)`` for an output stage that combines the model's first output with its
    latents (``field``: its config field; ``need``: what it needs the output to be); refused, naming both, when the
    output is not one tensor of the latents' shape."""
    value, name = getattr(ctx.config, field), type(ctx.model).__name__
    x = ctx.stream_input
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(out.args[0])
    v = leaves[0] if leaves else None
    if gp.first_output_leaves(gm) != 1 or not (
            isinstance(x, fx.Node) and gp.is_tensor(x) and isinstance(v, fx.Node) and gp.is_tensor(v)):
        raise ValueError(f"{field}={value!r}: {name}'s latents or its first output is not one tensor (a list of "
                         f"per-sample tensors?); it needs both; use {field}='none'")
    xs, vs = tuple(gp.val(x).shape), tuple(gp.val(v).shape)
    if xs != vs or not gp.val(v).is_floating_point():
        raise ValueError(f"{field}={value!r}: {name}'s first output {vs} is not {need} of its latents' shape {xs} (a "
                         f"learned variance, or packed differently?); use {field}='none'")
    return out, x, v


def finish(gm: fx.GraphModule) -> None:
    """Every pass leaves the graph linted.  It does not regenerate the module's code: no pass runs the module
    or reads its code, and a recompile after each pass cost 5-15 % of a capture; :func:`passes.run_pipeline`
    recompiles once, after the last pass (and around each pass when it records the code)."""
    gm.graph.lint()
