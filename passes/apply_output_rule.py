"""apply_output_rule: route the model's first output through the fitted output rule (opt-in).

Why it exists: with ``FastCacheConfig(output_rule="fitted")`` a planned generation's output at every step can be a
linear rule of the computed steps' outputs and latent, fitted end to end by :func:`fx_fastcache.fit_output_rule`
(:mod:`fx_fastcache.runtime.output_rule`).  The pass inserts one call before the graph's output::

    v3 = fastcache_output_rule(pred, new_gen, step, x, v, v2)   # pred: the last guard's cond predicate,
                                                                # v: the model's output, v2: after the other stages

and returns ``v3`` in place of ``v2``.  It runs after ``forecast_noise`` and ``correct_drift``: they keep their state
from the model's own output ``v``, and the rule's identity rows (every fraction it was not fitted for, or where it
lost) return theirs.  Its table is the calibration store's tensor
(:data:`~fx_fastcache.runtime.output_rule.TABLE_KEY`, shared by every captured graph; the planned policy installs the
configured fraction's), so fitting needs no re-capture.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fx_fastcache import graph_protocol as gp
from fx_fastcache.runtime.output_rule import COLUMNS, TABLE_KEY, TABLE_ROWS, OutputRule, identity_rows

from .context import PassContext, finish

#: The model-output argument of each earlier output stage's call.
_STAGE_INPUT = {gp.NOISE: 4, gp.DRIFT: 3}


def _model_output(v: fx.Node) -> fx.Node:
    """The model's own output under the output stages that ``v`` went through."""
    while v.op == "call_module" and v.target in _STAGE_INPUT:
        v = v.args[_STAGE_INPUT[v.target]]
    return v


def _step(g: fx.Graph) -> fx.Node:
    for n in g.nodes:
        if gp.tick_field(n) == "step":
            return n
    raise RuntimeError("apply_output_rule: the clock's step is not in the graph; run guard_blocks first")


def apply_output_rule(gm: fx.GraphModule, ctx: PassContext) -> None:
    if ctx.config.output_rule == "none":
        return
    name = type(ctx.model).__name__
    x = ctx.stream_input
    g = gm.graph
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(out.args[0])
    v = leaves[0] if leaves else None
    if gp.first_output_leaves(gm) != 1 or not (
            isinstance(x, fx.Node) and gp.is_tensor(x) and isinstance(v, fx.Node) and gp.is_tensor(v)):
        raise ValueError(f"output_rule={ctx.config.output_rule!r}: {name}'s latents or its first output is not one "
                         f"tensor (a list of per-sample tensors?); the output rule needs both; use output_rule='none'")
    raw = _model_output(v)
    xs, vs = tuple(gp.val(x).shape), tuple(gp.val(v).shape)
    if xs != vs or not gp.val(v).is_floating_point():
        raise ValueError(f"output_rule={ctx.config.output_rule!r}: {name}'s first output {vs} does not have its "
                         f"latents' shape {xs} (a learned variance, or packed differently?); the output rule combines "
                         f"the two; use output_rule='none'")
    args = gp.update_args(gp.find_update(g, ctx.guards[-1]))
    dev = gp.val(v).device
    table = ctx.store.get(TABLE_KEY, (TABLE_ROWS, COLUMNS), lambda: identity_rows(TABLE_ROWS, dev))
    mod = OutputRule(vs, dev, table)
    gm.add_submodule(gp.RULE, mod)
    with g.inserting_before(out):
        call = g.call_module(gp.RULE, (args.pred, args.new_gen, _step(g), x, raw, v))
    call.meta["val"] = gp.val(v)
    out.replace_input_with(v, call)
    ctx.note("apply_output_rule", f"{v.name} → {call.name} (output {vs}, model output {raw.name}, latents {x.name}, "
                                  f"decided by {ctx.guards[-1]})")
    finish(gm)
