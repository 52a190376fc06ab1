"""guard_blocks: rewrite every block region into a guarded ``torch.cond``.

For each block::

    pred  = fastcache_guard_i("decide", *DecideArgs(step, new_gen, ok, threshold, t, max_skip, signal, step_pred))
    outs  = cond(pred, fallback_branch_i, block_branch_i, [region inputs..., t, fallback state...])
    fastcache_guard_i("update", *UpdateArgs(pred, new_gen, t, stream_inputs, outs))

(the calls are built by :mod:`fx_fastcache.graph_protocol`, which every reader of them uses too).

``block_branch_i`` is the region copied verbatim; ``fallback_branch_i`` calls the fallback's
pure ``approx`` per stream.  Both return contiguous outputs (inductor requires equal strides).
State updates happen *after* the cond, never inside a branch.  A clock call at the top turns
the timestep into a step counter; a step policy's decider runs once, before block 0 (or after
it, for First-Block-Cache), and every guard reads its verdict.  The HOP
``torch.ops.higher_order.cond`` is used directly (the public ``torch.cond`` would wrap each
eager call in a dynamo compile).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fx_fastcache import graph_protocol as gp
from fx_fastcache.fallbacks import FALLBACKS, StreamInfo
from fx_fastcache.graph_protocol import (
    COND,
    DecideArgs,
    UpdateArgs,
    contiguous_copy,
    is_contiguous,
)
from fx_fastcache.graph_protocol import val as _val
from fx_fastcache.runtime import BlockGuard, Clock

from .context import BlockRegion, PassContext, finish


def _region_io(blk: BlockRegion) -> tuple[list[fx.Node], list[fx.Node]]:
    members = set(blk.nodes)
    inputs: list[fx.Node] = []
    seen: set[fx.Node] = set()
    for n in blk.nodes:
        for a in n.all_input_nodes:
            if a not in members and a not in seen:
                seen.add(a)
                inputs.append(a)
    for _, name, _ in blk.outputs:  # the fallback needs every stream input, even if the
        src = blk.stream_inputs[name]  # remaining block reads it only through hoisted nodes
        if src not in seen:
            seen.add(src)
            inputs.append(src)
    escaping = [n for n in blk.nodes if any(u not in members for u in n.users)]
    outs = [n for _, _, n in blk.outputs]
    extra = [n.name for n in escaping if n not in outs]
    if extra:
        raise RuntimeError(f"block {blk.name}: nodes {extra} are used outside the block but are not block outputs; "
                           f"if the block returns a second stream (as SD3's blocks return encoder_hidden_states), "
                           f"declare it: optimize(model, blocks=fx_fastcache.BlockListSpec(path, stream_inputs=("
                           f"'hidden_states', 'encoder_hidden_states'), outputs=(...one stream name or None per "
                           f"returned tensor...)))")
    return inputs, outs


def _externalize_getitems(blk: BlockRegion) -> None:
    """cond operands must be tensors: a tuple/list produced outside the block (Flux's rotary
    ``(cos, sin)``, a hoisted ``chunk``) is unpacked before the block instead of inside it."""
    members = set(blk.nodes)
    first = blk.nodes[0]
    moved = []
    for n in blk.nodes:
        if n.op == "call_function" and n.target is operator.getitem:
            src = n.args[0]
            if isinstance(src, fx.Node) and src not in members and not isinstance(_val(src), torch.Tensor):
                moved.append(n)
    for n in moved:
        if n is not first:
            first.prepend(n)
    if moved:
        blk.nodes = [n for n in blk.nodes if n not in set(moved)]


def _register(gm: fx.GraphModule, name: str, mod: torch.nn.Module) -> str:
    gm.add_submodule(name, mod)
    return name


def _block_branch(gm: fx.GraphModule, blk: BlockRegion, inputs: list[fx.Node], outs: list[fx.Node],
                  n_extra: int) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        p = g.placeholder(f"in_{i}_{n.name}")
        p.meta = dict(n.meta)
        env[n] = p
    for j in range(n_extra):
        g.placeholder(f"state_{j}")
    for n in blk.nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    results = []
    for o in outs:
        r = env[o]
        if o in inputs or not is_contiguous(o):
            r = contiguous_copy(g, r)
        results.append(r)
    g.output(tuple(results))
    # what the block reads by get_attr (the bodies of higher-order ops such as autocast regions) moves with it
    attrs = {n.target: gm.get_submodule(n.target) for n in blk.nodes if n.op == "get_attr"}  # (find_blocks)
    return fx.GraphModule(attrs or torch.nn.Module(), g)


def _fallback_branch(fallback, inputs: list[fx.Node], blk: BlockRegion, n_state: list[int]) -> fx.GraphModule:
    g = fx.Graph()
    ph = [g.placeholder(f"in_{i}_{n.name}") for i, n in enumerate(inputs)]
    t = g.placeholder("t")
    state = [g.placeholder(f"state_{j}") for j in range(sum(n_state))]
    results = []
    offset = 0
    for k, (_, name, _) in enumerate(blk.outputs):
        x = ph[inputs.index(blk.stream_inputs[name])]
        st = state[offset:offset + n_state[k]]
        offset += n_state[k]
        results.append(g.call_function(fallback.approx, (x, t, *st)))
    g.output(tuple(results))
    return fx.GraphModule(torch.nn.Module(), g)


def _stream_infos(blk: BlockRegion) -> list[StreamInfo]:
    infos = []
    for _, name, out in blk.outputs:
        vi, vo = _val(blk.stream_inputs[name]), _val(out)
        infos.append(StreamInfo(name, tuple(vi.shape), tuple(vo.shape), vo.dtype, vo.device))
    return infos


def guard_blocks(gm: fx.GraphModule, ctx: PassContext) -> None:
    cfg, policy = ctx.config, ctx.policy
    g = gm.graph
    first = ctx.blocks[0]
    top = first.hoisted[0] if first.hoisted else first.nodes[0]

    sv = _val(ctx.stream_input) if ctx.stream_input is not None else None
    clock = Clock(cfg.cache_ratio_threshold, cfg.warmup_steps, cfg.enable_block_approx, cfg.max_skip_steps,
                  stream_shape=tuple(sv.shape) if isinstance(sv, torch.Tensor) else None,
                  stream_dtype=sv.dtype if isinstance(sv, torch.Tensor) else None,
                  timestep_rises=ctx.spec.timestep_rises)
    ctx.clock = _register(gm, gp.CLOCK, clock)
    with g.inserting_before(top):
        step, new_gen, ok, thr, t, max_skip = gp.emit_clock(
            g, ctx.timestep, ctx.stream_input if clock.watches_input else None)

    step_pred = None
    step_decider = None
    if policy.scope == "step":
        if policy.anchor == "before_block0":
            probe = first.probe
            step_decider = policy.make_step_decider(tuple(_val(probe).shape), _val(probe).device, _val(probe).dtype,
                                                   ctx.store, group=ctx.process_group)
            ctx.step_decider = _register(gm, gp.STEP_DECIDER, step_decider)
            with g.inserting_before(first.nodes[0]):
                step_pred = g.call_module(ctx.step_decider, (step, new_gen, ok, thr, t, probe))
        else:
            step_decider = None  # built after block 0, from its residual

    fallback_cls = FALLBACKS[cfg.fallback]
    for pos, blk in enumerate(ctx.blocks):
        _externalize_getitems(blk)
        inputs, outs = _region_io(blk)
        streams = _stream_infos(blk)
        device = streams[0].device
        fallback = fallback_cls(blk.name, streams, ctx.store)
        decider = None
        if policy.scope == "block":
            sig_shape = tuple(_val(blk.probe).shape) if blk.probe is not None else None
            decider = policy.make_block_decider(blk.index, blk.block_names[0], sig_shape, device, streams[0].dtype,
                                                ctx.store, group=ctx.process_group)
        guard = BlockGuard(blk.index, blk.name, fallback, decider, never_skip=policy.never_skip(blk.index))
        guard.blocks = tuple(blk.block_names)  # a span's blocks (passes/group_spans.py); statistics count each
        gname = _register(gm, gp.guard_name(blk.index), guard)
        ctx.guards.append(gname)
        n_state = [len(fallback.state_names(k)) for k in range(len(streams))]
        full = _register(gm, gp.block_branch_name(blk.index), _block_branch(gm, blk, inputs, outs, 1 + sum(n_state)))
        cheap = _register(gm, gp.fallback_branch_name(blk.index), _fallback_branch(fallback, inputs, blk, n_state))

        anchor = blk.nodes[0]
        with g.inserting_before(anchor):
            operands = []
            for n in inputs:
                if n.op != "get_attr" and isinstance(_val(n), torch.Tensor) and not is_contiguous(n):
                    n = contiguous_copy(g, n)
                operands.append(n)
            operands.append(t)
            for k in range(len(streams)):
                for sname in fallback.state_names(k):
                    operands.append(g.get_attr(f"{gname}.fallback.{sname}"))
            signal = blk.probe if decider is not None else None
            pred = gp.emit_decide(g, gname, DecideArgs(step, new_gen, ok, thr, t, max_skip, signal, step_pred))
            # a block that writes into its own input (``x += f(x); return x``) leaves it overwritten after the
            # cond: the update (the fallback's residual, output - input) reads a copy taken before it
            # (it read the output twice: a residual of 0, every forecast returned the input)
            written = gp.written_bases(gm, blk.nodes)
            stream_ins = [blk.stream_inputs[name] for _, name, _ in blk.outputs]
            stream_ins = [contiguous_copy(g, x) if gp.view_base(x) in written else x for x in stream_ins]
            cond = g.call_function(COND, (pred, g.get_attr(cheap), g.get_attr(full), operands))
            results = []
            for j, o in enumerate(outs):
                r = g.call_function(operator.getitem, (cond, j))
                r.meta["val"] = _val(o)
                results.append(r)
            update = gp.emit_update(g, gname, UpdateArgs(pred, new_gen, t, tuple(stream_ins), tuple(results)))
        members = set(blk.nodes)
        for o, r in zip(outs, results):
            o.replace_all_uses_with(r, delete_user_cb=lambda u: u not in members and u is not update)
            for later in ctx.blocks[pos + 1:]:  # later regions read this output as their stream input (a span's
                # index is its first block's, not its position among the regions)
                later.stream_inputs = {k: (r if v is o else v) for k, v in later.stream_inputs.items()}
                if later.probe is o:
                    later.probe = r
        for n in reversed(blk.nodes):
            g.erase_node(n)

        if policy.scope == "step" and policy.anchor == "after_block0" and blk.index == 0:
            hid = ctx.spec.stream_arg if ctx.spec.stream_arg in [s.name for s in streams] else streams[0].name
            k = [s.name for s in streams].index(hid)
            with g.inserting_before(update.next):  # inserting_after would reverse the new nodes' order
                resid = g.call_function(torch.sub, (results[k], stream_ins[k]))
                step_decider = policy.make_step_decider(streams[k].out_shape, device, streams[k].dtype, ctx.store,
                                                        group=ctx.process_group)
                ctx.step_decider = _register(gm, gp.STEP_DECIDER, step_decider)
                step_pred = g.call_module(ctx.step_decider, (step, new_gen, ok, thr, t, resid))
        ctx.note("guard_blocks", f"{blk.name}: {len(blk.nodes)} nodes → cond({len(operands)} operands, "
                                 f"{len(streams)} stream(s), fallback={cfg.fallback})")
    finish(gm)
