"""find_blocks: locate every transformer block's region and label its streams.

Regions come from ``nn_module_stack`` (the nodes executed inside the block module's call; the
block path must match exactly, so DiT's later read of ``transformer_blocks[0].norm1`` outside
block 0 is not part of it).  Stream roles come from the ``fastcache::mark`` tags placed at
capture.  The pass only analyses; it changes no node.
"""
from __future__ import annotations

import logging

import torch.fx as fx

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
    for index, ((path, _, bl), region) in enumerate(zip(listed, regions)):
        if not region:
            raise RuntimeError(f"block {path} does not appear in the captured graph: is it called in forward()?")
        region = _trim_hook_nodes(region, index)
        first, last = position[region[0]], position[region[-1]]
        members = set(region)
        strays = [n.name for n in nodes[first:last + 1] if n not in members and n.op == "call_function"]
        if strays:
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
                                   f"{name!r} of shape {tuple(shapes[1])}; list the block's outputs in the order it "
                                   f"returns them (BlockListSpec outputs={bl.outputs!r})")
            blk.outputs.append((k, name, m))
        if not blk.outputs:
            raise RuntimeError(f"block {path} has no live tensor output in the captured graph")
        ctx.blocks.append(blk)
    ctx.note("find_blocks", f"{len(ctx.blocks)} blocks, timestep input {'found' if ctx.timestep else 'absent'}")
    logger.debug("find_blocks: %s", [(b.name, len(b.nodes)) for b in ctx.blocks])
    finish(gm)
