"""find_blocks: locate every transformer block's region and label its streams.

Regions come from ``nn_module_stack`` (the nodes executed inside the block module's call; the
block path must match exactly, so DiT's later read of ``transformer_blocks[0].norm1`` outside
block 0 is not part of it).  Stream roles come from the ``fastcache::mark`` tags placed at
capture.  The pass only analyses; it changes no node.
"""
from __future__ import annotations

import collections
import logging
import operator

import torch.fx as fx
import torch.nn as nn

from fx_fastcache.families import block_modules
from fx_fastcache.markers import MARK

from .context import BlockRegion, PassContext, finish, stack_paths

logger = logging.getLogger(__name__)


def _trim_hook_nodes(region: list[fx.Node], index: int) -> list[fx.Node]:
    """Drop what a diffusers hook ran at the block's boundary from its region.

    Why: hooks run inside the block module's call, so their nodes carry the block's
    ``nn_module_stack`` (Wan's context-parallel plan splits the sequence in ``blocks.0``'s
    pre-forward hook).  The markers sit inside the hook chain (``markers.marked``), so nodes
    before the block's first input marker or after its last output marker belong to a hook:
    they stay in the graph, outside the region, and run whether the block is computed or not.
    """
    ins = [i for i, n in enumerate(region)
           if n.target is MARK and str(n.args[1]).startswith((f"in:{index}:", f"arg:{index}:"))]
    outs = [i for i, n in enumerate(region) if n.target is MARK and str(n.args[1]).startswith(f"out:{index}:")]
    lo = ins[0] if ins else 0
    hi = outs[-1] + 1 if outs else len(region)
    return region[lo:hi]


class BlocksNotCalled(RuntimeError):
    """Some blocks do not run for this call's inputs (SD3's ``skip_layers``, which skip-layer guidance
    passes on an extra call per step): such a call cannot be guarded block by block."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"blocks {missing} do not run for this call's inputs")
        self.missing = missing


def _attach_submodules(gm: fx.GraphModule, region: list[fx.Node], nodes: list[fx.Node]) -> list[fx.Node]:
    """Put the ``get_attr`` nodes that only the region reads at its front, in the graph and in the list.

    Why: ``torch.export`` turns a ``with torch.amp.autocast(...)`` inside a block (Z-Image's rotary
    embedding) into a higher-order op whose body is a submodule read by a ``get_attr`` node.  That node
    carries no ``nn_module_stack``, so it was left outside the region, and the block's ``cond`` (inserted
    before the region) read it before its definition.  A submodule cannot be a ``cond`` operand either: it
    belongs inside the block branch.  A ``get_attr`` has no inputs, so moving it up is always valid."""
    members = set(region)
    attrs = [n for n in nodes if n.op == "get_attr" and isinstance(operator.attrgetter(n.target)(gm), nn.Module)
             and n.users and all(u in members for u in n.users)]
    for n in attrs:
        region[0].prepend(n)
    return attrs + region


def _shape(n: fx.Node) -> tuple | None:
    v = n.meta.get("val")
    return tuple(v.shape) if hasattr(v, "shape") else None


def _pairing_hint(list_path: str, index: int, tags: dict) -> str:
    """For an error on a block's streams: which tensor arguments each returned tensor matches in shape, as
    the ``BlockListSpec`` to pass (Qwen-Image's blocks return ``(encoder_hidden_states, hidden_states)``)."""
    args = {str(k).split(":", 2)[2]: n for k, n in tags.items()
            if str(k).startswith((f"in:{index}:", f"arg:{index}:")) and "." not in str(k).split(":", 2)[2]}
    outs = sorted((int(str(k).split(":")[2]), n) for k, n in tags.items() if str(k).startswith(f"out:{index}:"))
    matches = [[a for a, an in args.items() if _shape(an) is not None and _shape(an) == _shape(n)] for _, n in outs]
    if not outs or not any(matches):
        return ""
    if all(len(m) <= 1 for m in matches) and len({m[0] for m in matches if m}) == sum(1 for m in matches if m):
        by_index = {k: m for (k, _), m in zip(outs, matches)}  # (an output the model drops has no tag: None)
        names = tuple(by_index[k][0] if by_index.get(k) else None for k in range(max(by_index) + 1))
        streams = tuple(x for x in names if x)
        return (f"; by shape, pass optimize(model, blocks=fx_fastcache.BlockListSpec({list_path!r}, "
                f"stream_inputs={streams!r}, outputs={names!r})) (one entry per block list)")
    return "; by shape, the block's returned tensors match its arguments " + ", ".join(
        f"{k}: {m}" for (k, _), m in zip(outs, matches)) + ": name each output's stream in a fx_fastcache.BlockListSpec"


def find_blocks(gm: fx.GraphModule, ctx: PassContext) -> None:
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    marks = [n for n in nodes if n.op == "call_function" and n.target is MARK]
    tags = {n.args[1]: n for n in marks}
    ctx.timestep = tags.get("timestep")
    ctx.stream_input = tags.get("stream")
    ctx.blocks = []
    listed = block_modules(ctx.model, ctx.spec)
    regions = [[n for n in nodes if n.op == "call_function" and path in stack_paths(n)] for path, _, _ in listed]
    missing = [path for (path, _, _), region in zip(listed, regions) if not region]
    if missing and len(missing) < len(listed):
        raise BlocksNotCalled(missing)
    starts = [min((position[n] for n in region if n.op != "get_attr"), default=-1) for region in regions]
    late = next((i for i in range(1, len(starts)) if -1 < starts[i] < starts[i - 1]), None)
    if late is not None:
        raise RuntimeError(f"block {listed[late][0]} runs before {listed[late - 1][0]}: the model calls its blocks in "
                           f"another order than their list's, and FastCache guards, counts and schedules them in list "
                           f"order; call them in list order (store the list in the order forward runs it) or "
                           f"optimize a model that does")
    for index, ((path, _, bl), region) in enumerate(zip(listed, regions)):
        if not region:
            raise RuntimeError(f"block {path} does not appear in the captured graph: is it called in forward()?")
        region = _attach_submodules(gm, _trim_hook_nodes(region, index), nodes)
        placed = [position[n] for n in region if n.op != "get_attr"]  # (those were moved to the front)
        first, last = placed[0], placed[-1]
        members = set(region)
        strays = [n.name for n in nodes[first:last + 1] if n not in members and n.op == "call_function"]
        if strays:
            calls = max(collections.Counter(str(n.args[1]) for n in marks
                                            if str(n.args[1]).startswith((f"in:{index}:", f"out:{index}:"))).values())
            if calls > 1:
                raise RuntimeError(f"block {path} is called {calls} times in one forward (a loop over the block list "
                                   f"run more than once): FastCache guards each block once per call of the model; "
                                   f"list modules the model calls once each (e.g. wrap each pass over the list in a "
                                   f"module and pass a list of those as blocks=)")
            raise RuntimeError(f"block {path} is not contiguous in the captured graph (interleaved nodes {strays[:5]})")
        blk = BlockRegion(index=index, name=path, nodes=region)
        for name in bl.stream_inputs:
            m = tags.get(f"in:{index}:{name}")
            if m is not None:
                blk.stream_inputs[name] = m
        for k, name in enumerate(bl.outputs):
            m = tags.get(f"out:{index}:{k}")
            if m is None or not m.users or name is None:
                continue
            if name not in blk.stream_inputs:
                raise RuntimeError(f"block {path}: output {k} continues stream {name!r}, which is not a tensor input")
            shapes = [getattr(n.meta.get("val"), "shape", None) for n in (m, blk.stream_inputs[name])]
            if None not in shapes and tuple(shapes[0]) != tuple(shapes[1]):
                raise RuntimeError(f"block {path}: output {k} has shape {tuple(shapes[0])} but continues stream "
                                   f"{name!r} of shape {tuple(shapes[1])} (BlockListSpec outputs={bl.outputs!r}); "
                                   f"list the block's outputs in the order it returns them"
                                   f"{_pairing_hint(bl.path, index, tags)}")
            blk.outputs.append((k, name, m))
        if not blk.outputs:
            raise RuntimeError(f"block {path} has no live tensor output among those its BlockListSpec names "
                               f"(outputs={bl.outputs!r}){_pairing_hint(bl.path, index, tags)}")
        ctx.blocks.append(blk)
    ctx.note("find_blocks", f"{len(ctx.blocks)} blocks, timestep input {'found' if ctx.timestep else 'absent'}")
    logger.debug("find_blocks: %s", [(b.name, len(b.nodes)) for b in ctx.blocks])
    finish(gm)
