"""group_spans: merge consecutive block regions that always share their decision into one span.

Why this exists: with one ``torch.cond`` per block, every block keeps its own fallback state
(``forecast``: ``r_c``/``r_p`` per stream, each one activation), so the cache state grows with
depth: ``2 × blocks + 2`` activations for the default config.  But a step-level policy decides
every block of a step at once, so runs of consecutive blocks are skipped together, and for the
``residual`` and ``forecast`` fallbacks skipping a run block by block gives the same output as
applying the fallback once to the run's input with the run's total residual (both are linear
in the residuals, and every block of the run shares ``t_c``/``t_p``).  This pass therefore
replaces the per-block regions in ``ctx.blocks`` by *span* regions; ``guard_blocks`` then turns
each span into one ``cond`` (block branch = every block of the span, cheap branch = the
fallback once, on the span's input) with its state at the span boundary, one set per stream.

Which blocks share a span (``FastCacheConfig.span``):

* ``"block"``: one span per block (the per-block behaviour; kept for comparison).
* ``"auto"``: the policy's :meth:`~fx_fastcache.policies.base.Policy.span_groups` (step-level
  policies: the blocks after their anchor; a schedule: consecutive blocks whose table columns
  are equal; ``chi2``: one per block), except that these force one span per block:

  - fitted per-block fallbacks (``residual_linear``, ``linear``): their maps are fitted per
    block on that block's input/output; the composition of per-block affine maps is not what a
    single fit of the run would give, and calibration files are keyed per block;
  - token routing / merging (``enable_token_routing``, ``enable_token_merge``): the computed
    branch is re-exported from *one* block module for fewer tokens (``passes/route_tokens.py``),
    and its static/dynamic token split is decided per block.

A proposed span is also cut wherever the graph does not allow one ``cond``: a node between two
blocks that reads an earlier block of the span (Flux/HunyuanVideo: anything but block nodes
between the two block lists), a block whose stream input is not the previous block's output of
that stream, a value of a non-final block that is read after the span, or an in-place write between
two blocks to a tensor the span reads (or a read of one it writes).  Nodes between two blocks that do not
read the span are moved in front of it.

Each span region lists its blocks in ``members``; statistics stay per block (every block of a
skipped span counts as approximated).  SD3's last block returns no text stream: a span ending
there has only the image stream as output, and the text stream is internal to the span.
"""
from __future__ import annotations

import logging

import torch.fx as fx

from fx_fastcache import graph_protocol as gp
from fx_fastcache.fallbacks import FALLBACKS

from .context import BlockRegion, PassContext, finish

logger = logging.getLogger(__name__)

SPAN_MODES = ("auto", "block")


def forced_block_reason(config) -> str | None:
    """Why ``span="auto"`` must use one span per block for ``config`` (``None``: it need not)."""
    if FALLBACKS[config.fallback].fitted:
        return f"fallback={config.fallback!r} is fitted per block"
    if config.enable_token_routing:
        return "token routing (enable_token_routing) runs per block"
    if config.enable_token_merge:
        return "token merging (enable_token_merge) runs per block"
    return None


def proposed_groups(ctx: PassContext) -> list[list[int]]:
    """Block index groups the config and policy ask for (before the graph checks)."""
    n = len(ctx.blocks)
    mode = getattr(ctx.config, "span", "auto")
    if mode == "block" or forced_block_reason(ctx.config) is not None:
        return [[i] for i in range(n)]
    names = [b.name for b in ctx.blocks]
    groups = ctx.policy.span_groups(names, ctx.store)
    flat = [i for grp in groups for i in grp]
    if flat != list(range(n)) or any(not grp for grp in groups):
        raise RuntimeError(f"policy {ctx.policy.name!r} returned span groups {groups} that do not cover blocks "
                           f"0..{n - 1} in order")
    return groups


def _between(nodes: list[fx.Node], pos: dict[fx.Node, int], a: BlockRegion, b: BlockRegion) -> list[fx.Node]:
    """Graph nodes strictly between the end of ``a`` and the start of ``b`` (hoisted probe included)."""
    start = pos[a.nodes[-1]] + 1
    end = pos[(b.hoisted[0] if b.hoisted else b.nodes[0])]
    return [n for n in nodes[start:end] if n.op not in ("placeholder", "output", "get_attr")]


def _write_clash(writes_of: dict[fx.Node, set[fx.Node]], members: set[fx.Node],
                 between: list[fx.Node]) -> fx.Node | None:
    """A node of ``between`` that may not move in front of the span's blocks: it writes in place to a tensor
    they read or write (``temb.mul_(0.5)`` after block 0 would reach block 0's reads; also inside a
    ``torch.autocast`` region), or reads one they write.  An in-place write has no users, so the data edges do
    not see it; views count as their base tensor."""
    def bases(nodes):
        return {gp.view_base(a) for n in nodes for a in (n, *n.all_input_nodes)}
    if not between:
        return None
    span_writes = set().union(*(writes_of[n] for n in members))
    span_reads = bases(members) if any(writes_of[n] for n in between) else set()
    for n in between:
        if writes_of[n] & (span_reads | span_writes) or (span_writes and bases([n]) & span_writes):
            return n
    return None


def _can_extend(writes_of: dict[fx.Node, set[fx.Node]], span: list[BlockRegion], nxt: BlockRegion,
                between: list[fx.Node]) -> str | None:
    """Why ``nxt`` cannot join ``span`` (``None``: it can)."""
    members = {n for b in span for n in b.nodes}
    reads_span = set(members)
    for n in between:  # in graph order: a node reading the span (or such a node) must stay between
        if any(a in reads_span for a in n.all_input_nodes):
            return f"node {n.name} between {span[-1].name} and {nxt.name} reads the span"
    if clash := _write_clash(writes_of, members | {n for b in span for n in b.hoisted}, between):
        return f"node {clash.name} between {span[-1].name} and {nxt.name} writes in place to a tensor the span " \
               f"reads, or reads one it writes"
    if nxt.hoisted:
        return f"{nxt.name} has a hoisted probe"
    last = span[-1]
    outs = {name: node for _, name, node in last.outputs}
    for name, src in nxt.stream_inputs.items():
        if outs.get(name) is not src:
            return f"{nxt.name}'s stream {name!r} is not {last.name}'s output"
    ok_readers = set(members) | set(nxt.nodes)
    for b in span:
        for n in b.nodes:
            if any(u not in ok_readers for u in n.users):
                return f"{b.name}'s node {n.name} is read outside the span"
    return None


def _merge(span: list[BlockRegion]) -> BlockRegion:
    first, last = span[0], span[-1]
    name = first.name if len(span) == 1 else f"{first.name}..{last.name}"
    region = BlockRegion(index=first.index, name=name, nodes=[n for b in span for n in b.nodes],
                         stream_inputs={k: v for k, v in first.stream_inputs.items()
                                        if any(k == s for _, s, _ in last.outputs)},
                         outputs=list(last.outputs), probe=first.probe, hoisted=list(first.hoisted))
    region.members = [(b.index, b.name) for b in span]
    return region


def group_spans(gm: fx.GraphModule, ctx: PassContext) -> None:
    blocks = list(ctx.blocks)
    ctx.extras["block_regions"] = blocks
    groups = proposed_groups(ctx)
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    writes_of = {n: gp.written_bases(gm, [n]) for n in nodes}  # what each node writes in place (_write_clash)
    spans: list[list[BlockRegion]] = []
    for grp in groups:
        cur = [blocks[grp[0]]]
        for i in grp[1:]:
            nxt = blocks[i]
            between = _between(nodes, pos, cur[-1], nxt)
            why = _can_extend(writes_of, cur, nxt, between)
            if why is None:
                start = cur[0].hoisted[0] if cur[0].hoisted else cur[0].nodes[0]
                for n in between:  # independent of the span: compute them before it, with the submodules
                    for a in n.all_input_nodes:  # they call by get_attr (an autocast region's body), if after it
                        if a.op == "get_attr" and pos[a] > pos[start]:
                            start.prepend(a)
                    start.prepend(n)
                cur.append(nxt)
            else:
                ctx.note("group_spans", f"span cut before {nxt.name}: {why}")
                spans.append(cur)
                cur = [nxt]
        spans.append(cur)
    ctx.blocks = [sp[0] if len(sp) == 1 else _merge(sp) for sp in spans]
    for region, sp in zip(ctx.blocks, spans):
        if not region.members:
            region.members = [(b.index, b.name) for b in sp]
    ctx.extras["spans"] = [[i for i, _ in r.members] for r in ctx.blocks]
    why = forced_block_reason(ctx.config)
    mode = getattr(ctx.config, "span", "auto")
    ctx.note("group_spans", f"span={mode!r}: {len(blocks)} blocks → {len(ctx.blocks)} span(s) "
                            f"{[len(s) for s in spans]}" + (f" (per block: {why})" if why and mode == "auto" else ""))
    logger.debug("group_spans: %s", ctx.extras["spans"])
    finish(gm)
