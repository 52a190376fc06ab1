"""The reduced-token branch that ``route_tokens`` and ``merge_tokens`` give every computed block.

Not a pass: the machinery both passes share.  A computed block's branch ``fastcache_block_i``
has the token count ``N`` baked into its reshapes, so it cannot run on fewer tokens; instead the
block *module* (called with the arguments the model used, recorded at capture by
``markers.CALLS``) is exported again for the reduced token count.  Which graph input of the block
is gathered how (:func:`argument_roles`) follows from the argument's shape: the token stream,
per-token inputs, per-position tables (rotary), joint attention masks, or passed whole.
The guarded cond becomes::

    active, idx = fastcache_guard_i.router("select", step, new_gen, force, warmup, x)
    outs = cond(pred, fallback_i, compute_i, [operands..., active, idx, resid, block args...])
        compute_i = cond(active, reduced_i, block_i)     # reduced_i: gather → [merge] → block → [unpool] → scatter
    fastcache_guard_i.router("update", pred, new_gen, active, idx, x, outs[hidden])
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fx_fastcache import graph_protocol as gp
from fx_fastcache.families import block_modules
from fx_fastcache.graph_protocol import CLONE, COND, is_contiguous
from fx_fastcache.graph_protocol import val as _val
from fx_fastcache.layerwise_casting import cast_in_graph
from fx_fastcache.markers import CALLS
from fx_fastcache.runtime.merging import merge_tokens as merge_fn
from fx_fastcache.runtime.merging import stage_sizes, unpool
from fx_fastcache.runtime.routing import (
    RoutedCall,
    TokenRouter,
    attention_context_fn,
    gather_joint_mask,
    gather_table,
    gather_tokens,
    scatter_tokens,
)

from .context import PassContext, finish

logger = logging.getLogger(__name__)


#: Keys/values of the routed tokens' self-attention: ``"all"`` tokens where the block family
#: allows it (DiT, PixArt; measured +7 to +9 dB PSNR on dit-mnist, docs/ROUTING.md), else the
#: routed ones; ``"routed"`` forces routed-only attention (for measurements).
KV_CONTEXT = "all"


@dataclass(frozen=True)
class MergeSpec:
    """Token merging inside the reduced branch: stage sizes, kNN count, temporal weight λ."""

    sizes: list[int]
    k_nn: int
    lam: float


def routing_capacity(motion_threshold: float, n: int) -> int:
    """``k = ceil((1 - motion_threshold) · N)`` tokens routed through the block, in [1, N]."""
    return max(1, min(n, math.ceil((1.0 - motion_threshold) * n - 1e-9)))


def _example(v: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if v.dtype.is_floating_point:
        return torch.randn(shape, dtype=v.dtype, device=v.device)
    return torch.zeros(shape, dtype=v.dtype, device=v.device)


def add_placeholders(sub: fx.GraphModule, names: list[str]) -> None:
    """Append unused placeholders (a cond's branches must all take the same operands)."""
    g = sub.graph
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    for name in names:
        with g.inserting_after(last):
            last = g.placeholder(name)
    sub.recompile()


def _inline(g: fx.Graph, sub: fx.GraphModule, args: list[fx.Node]) -> list[fx.Node]:
    """Copy ``sub``'s graph into ``g`` (its attributes under ``block.``), returning its outputs.

    Inlined rather than called: the exported module's pytree calling convention is Python
    code that dynamo would have to run inside the cond branch."""
    env: dict[fx.Node, Any] = {}
    it = iter(args)
    result: list[fx.Node] = []
    for n in sub.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(it)
        elif n.op == "get_attr":
            env[n] = g.get_attr(f"block.{n.target}")
            env[n].meta = dict(n.meta)
        elif n.op == "call_module":
            if str(n.target).startswith("_guards"):
                continue  # export's input-shape guards: the shapes are static here
            env[n] = g.call_module(f"block.{n.target}", *fx.node.map_arg((n.args, n.kwargs), lambda a: env[a]))
        elif n.op == "output":
            out = n.args[0]
            result = list(out) if isinstance(out, (tuple, list)) else [out]
            result = [env[o] for o in result]
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    return result


def _routed_branch(routed: torch.nn.Module, n_ops: int, pos: dict[str, int], arg_pos: list[int], roles: list[str],
                   out_names: list[str], stream: str, text_len: int, merge: MergeSpec | None,
                   n_img: int = 0) -> fx.GraphModule:
    """Operands: the compute branch's (``pos`` names active/idx/resid, ``arg_pos`` the block args)."""
    g = fx.Graph()
    ph = [g.placeholder(f"op_{i}") for i in range(n_ops)]
    idx, resid = ph[pos["idx"]], ph[pos["resid"]]
    args = [ph[p] for p in arg_pos]
    x = args[roles.index("x")]
    xg = merged = assign = None
    call_args = []
    for a, role in zip(args, roles):
        if role == "x":
            xg = g.call_function(gather_tokens, (a, idx))
            if merge is not None:  # spatial-temporal merging of the routed tokens
                prev = g.call_function(gather_tokens, (ph[pos["x_ref"]], idx))
                mt = g.call_function(merge_fn, (xg, prev, merge.sizes, merge.k_nn, merge.lam))
                merged = g.call_function(operator.getitem, (mt, 0))
                assign = g.call_function(operator.getitem, (mt, 1))
                call_args.append(merged)
            else:
                call_args.append(xg)
        elif role == "per_sample":
            call_args.append(g.call_function(gather_tokens, (a, idx)))
        elif role == "joint_mask":
            call_args.append(g.call_function(gather_joint_mask, (a, idx, n_img)))
        elif role.startswith("table:"):  # "table:<rows kept whole>"
            call_args.append(g.call_function(gather_table, (a, idx, int(role.split(":")[1]))))
        else:
            call_args.append(a)
    outs = _inline(g, routed, call_args)
    results = []
    for j, name in enumerate(out_names):
        o = outs[j]
        if name == stream:
            if merge is not None:
                o = g.call_function(unpool, (xg, merged, o, assign))
            base = g.call_function(torch.add, (x, resid))
            results.append(g.call_function(scatter_tokens, (base, idx, o)))
        else:
            results.append(g.call_function(CLONE, (o,), {"memory_format": torch.contiguous_format}))
    g.output(tuple(results))
    root = torch.nn.Module()
    root.block = routed
    return fx.GraphModule(root, g)


def _compute_branch(full: fx.GraphModule, routed: fx.GraphModule, n_ops: int, active_pos: int,
                    n_out: int) -> fx.GraphModule:
    g = fx.Graph()
    ph = [g.placeholder(f"op_{i}") for i in range(n_ops)]
    c = g.call_function(COND, (ph[active_pos], g.get_attr("routed"), g.get_attr("full"), list(ph)))
    g.output(tuple(g.call_function(operator.getitem, (c, j)) for j in range(n_out)))
    root = torch.nn.Module()
    root.routed = routed
    root.full = full
    return fx.GraphModule(root, g)


#: Block arguments that carry text (cross-attention) tokens in the families' blocks: passed whole
#: whatever their length (PixArt-Σ at 240×320 px has 300 image tokens, its text 300 too).
TEXT_ARGS = frozenset({"encoder_hidden_states", "encoder_hidden_states_image", "encoder_attention_mask"})


def argument_role(node: fx.Node, v: torch.Tensor, name: str, kind: str, tag: str, x: fx.Node, blk: Any, b: int,
                  n: int, k: int, m: int, text_len: int, path: str, joint_mask_order: str | None,
                  model_name: str) -> tuple[str, tuple[int, ...]]:
    """How a block argument follows the routed tokens, and its shape in the reduced call.

    Roles: ``"x"`` (the token stream: gathered, then merged to ``m`` tokens), ``"pass"`` (text
    streams and everything else: whole), ``"table:<rows kept>"`` (a per-position table shared by
    the batch: Flux's text + image rotary rows, HunyuanVideo's image rows), ``"per_sample"``
    (a ``(B or 1, N, ...)`` per-token input) and ``"joint_mask"`` (a mask over image + text tokens).
    """
    shape = tuple(v.shape)
    if node is x:
        return "x", (b, m) + shape[2:]
    if name in blk.stream_inputs or name in TEXT_ARGS:
        return "pass", shape  # text/encoder tokens: never dropped (by name: a text as long as the image fits the rules below)
    if v.ndim == 2 and shape[0] == text_len + n and kind == "tensors":  # Flux: text + image rows
        return f"table:{text_len}", (text_len + k,) + shape[1:]
    if v.ndim == 2 and shape[0] == n and kind == "tensors":  # HunyuanVideo: image rows only
        return "table:0", (k,) + shape[1:]
    if v.ndim >= 3 and shape[0] in (b, 1) and shape[1] == n:  # (B or 1, N, ...) per-token input
        return "per_sample", (b, k) + shape[2:]
    if text_len and v.ndim >= 2 and shape[-1] == n + text_len and shape[0] in (b, 1):
        if joint_mask_order != "image_first":  # a mask over the joint sequence
            raise ValueError(f"enable_token_routing: block {path} takes {tag!r} of shape {shape}, a mask "
                             f"over its {n} image + {text_len} text tokens, and the token order of that "
                             f"sequence is not known for {model_name}; token routing "
                             f"cannot place it. Disable enable_token_routing for this model")
        return "joint_mask", (b,) + shape[1:-1] + (k + text_len,)
    return "pass", shape


def reduce_blocks(gm: fx.GraphModule, ctx: PassContext, route: bool, merge: bool, pass_name: str) -> None:
    """Give every block's computed branch a reduced-token variant (routing and/or merging)."""
    cfg = ctx.config
    g = gm.graph
    stream = ctx.spec.stream_arg
    found: dict[str, fx.Node] = ctx.extras.get("block_args", {})
    mods = block_modules(ctx.model, ctx.spec)
    live = set(g.nodes)
    for blk in ctx.blocks:
        path, block, bl_spec = mods[blk.index]
        call = CALLS.get(block)
        if call is None:
            raise RuntimeError(f"route_tokens: no recorded call of block {path}; was it captured with markers?")
        bstream = stream
        if stream not in blk.stream_inputs and ctx.spec.name.startswith("custom:") and len(blk.stream_inputs) == 1:
            bstream = next(iter(blk.stream_inputs))  # a model of no family: its own argument may be named otherwise
        if bstream not in blk.stream_inputs:
            raise ValueError(f"enable_token_routing: block {path} has no {stream!r} stream to route "
                             f"(streams {sorted(blk.stream_inputs)}); disable token routing for this model")
        x = blk.stream_inputs[bstream]
        xv = _val(x)
        if xv is None or xv.ndim != 3:
            raise ValueError(f"enable_token_routing: block {path}'s {bstream!r} is not a (batch, tokens, dim) "
                             f"tensor ({None if xv is None else tuple(xv.shape)}); token routing needs one")
        b, n, _ = xv.shape
        k = routing_capacity(cfg.motion_threshold, n) if route else n
        mspec = None
        m = k
        if merge:
            sizes = stage_sizes(k, cfg.merge_ratio, cfg.num_stages)
            mspec = MergeSpec(sizes, cfg.token_merge_k, float(cfg.token_merge_lambda))
            m = sizes[-1]
        text_len = 0
        for name, node in blk.stream_inputs.items():
            if name != bstream and _val(node) is not None and _val(node).ndim == 3:
                text_len += _val(node).shape[1]
        # every tensor argument of the block call: its graph node and its role
        nodes: list[fx.Node] = []
        roles: list[str] = []
        examples: list[torch.Tensor] = []
        for name, kind, value in call:
            if kind == "value":
                continue
            tags = [value] if kind == "tensor" else list(value)
            for tag in tags:
                if tag.startswith("in:"):
                    node = blk.stream_inputs[tag.split(":", 2)[2]]
                else:
                    node = found.get(tag)
                if node is None or node not in live:
                    raise RuntimeError(f"route_tokens: block {path} argument {tag!r} has no live producer node")
                v = _val(node)
                if v is None and node.op == "get_attr":
                    v = gm.get_parameter(node.target) if "." in node.target else getattr(gm, node.target)
                if not isinstance(v, torch.Tensor):
                    raise RuntimeError(f"route_tokens: block {path} argument {tag!r} has no tensor metadata")
                role, shape = argument_role(node, v, name, kind, tag, x, blk, b, n, k, m, text_len, path,
                                            bl_spec.joint_mask_order, type(ctx.model).__name__)
                nodes.append(node)
                roles.append(role)
                examples.append(_example(v, shape))
        context_fn = attention_context_fn(block) if KV_CONTEXT == "all" else None
        if context_fn is not None:  # the full token stream, for every token's keys/values
            nodes.append(x)
            roles.append("full")
            examples.append(_example(xv, tuple(xv.shape)))
        shared = any(r.startswith("table:") for r in roles)
        if mspec is not None and (shared or "per_sample" in roles or "joint_mask" in roles):
            raise ValueError(f"enable_token_merge: block {path} takes a per-token input besides its tokens (roles "
                             f"{roles}, e.g. Flux's rotary table); merging cannot pool it. Use "
                             f"enable_token_routing without enable_token_merge for this model")
        out_index = [kk for kk, _, _ in blk.outputs]
        out_names = [name for _, name, _ in blk.outputs]
        was_training = block.training
        block.eval()
        try:
            with torch.no_grad(), cast_in_graph(block):  # diffusers' layerwise casting: casts in the graph too
                ep = torch.export.export(RoutedCall(block, call, out_index, context_fn), tuple(examples),
                                        strict=False)
        finally:
            block.train(was_training)
        routed_block = ep.module()

        gname = ctx.guards[blk.index]
        guard = gm.get_submodule(gname)
        router = TokenRouter(tuple(xv.shape), k, xv.dtype, xv.device, shared=shared)
        guard.router = router  # the guard owns the block's state: reset() and statistics find it there
        cond = gp.find_cond(g, gname)
        update = gp.find_update(g, gname)
        pred = cond.args[0]
        decide = gp.decide_args(pred)
        step, new_gen = decide.step, decide.new_gen
        operands = list(cond.args[3])
        n_outer = len(operands)
        full = getattr(gm, cond.args[2].target)
        fallback = getattr(gm, cond.args[1].target)
        # operands: the outer ones, then active, idx, resid and the block args not already there
        # (a tensor passed twice would alias itself inside the cond)
        extra_nodes: list[fx.Node] = []
        arg_pos: list[int] = []
        copies = {o.args[0]: o for o in operands if isinstance(o, fx.Node) and o.target is CLONE}
        for node in nodes:
            if node in operands:
                arg_pos.append(operands.index(node))
            elif node in copies:  # guard_blocks passed a contiguous copy of it
                arg_pos.append(operands.index(copies[node]))
            else:
                if node not in extra_nodes:
                    extra_nodes.append(node)
                arg_pos.append(n_outer + 4 + extra_nodes.index(node))
        pos = {"active": n_outer, "idx": n_outer + 1, "resid": n_outer + 2, "x_ref": n_outer + 3}
        extra_names = ["active", "idx", "resid", "x_ref"] + [f"arg_{j}" for j in range(len(extra_nodes))]
        n_ops = n_outer + len(extra_names)
        add_placeholders(full, extra_names)
        add_placeholders(fallback, extra_names)
        routed = _routed_branch(routed_block, n_ops, pos, arg_pos, roles, out_names, bstream, text_len, mspec, n)
        compute = _compute_branch(full, routed, n_ops, n_outer, len(out_names))
        cname = gp.compute_branch_name(blk.index)
        gm.add_submodule(cname, compute)
        with g.inserting_before(cond):
            force = g.get_attr(f"{ctx.clock}.force")
            warmup = g.get_attr(f"{ctx.clock}.warmup")
            active, idx = gp.emit_router_select(g, gname, step, new_gen, force, warmup, x)
            resid = g.get_attr(f"{gname}.router.resid")
            x_ref = g.get_attr(f"{gname}.router.x_ref")
            new_false = g.get_attr(cname)
            # an argument may be a view of an operand (DiT's ``timestep`` vs its ``unsqueeze``):
            # cond operands must not alias each other, so small arguments are passed as copies
            extra_ops = [n if n is x and is_contiguous(n) else g.call_function(CLONE, (n,), {"memory_format": torch.contiguous_format})
                         for n in extra_nodes]
        cond.args = (pred, cond.args[1], new_false, operands + [active, idx, resid, x_ref] + extra_ops)
        j = out_names.index(bstream)
        y = next(u for u in cond.users if u.op == "call_function" and u.target is operator.getitem
                 and u.args[1] == j)
        with g.inserting_after(update):
            gp.emit_router_update(g, gname, pred, new_gen, active, idx, x, y)
        ctx.note(pass_name, f"{path}: {k}/{n} tokens routed ({'batch-shared' if shared else 'per-sample'} indices, "
                            f"keys/values of {'all' if context_fn is not None else 'routed'} tokens)"
                            + (f", merged to {mspec.sizes}" if mspec is not None else ""))
    gp.drop_dead_nodes(gm)
    finish(gm)
