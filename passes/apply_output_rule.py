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

import torch.fx as fx

from fx_fastcache import graph_protocol as gp
from fx_fastcache.runtime.output_rule import COLUMNS, TABLE_KEY, TABLE_ROWS, OutputRule, identity_rows

from .context import PassContext, finish, latents_and_first_output

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
    out, x, v = latents_and_first_output(gm, ctx, "output_rule", "a tensor")
    g = gm.graph
    raw = _model_output(v)
    vs = tuple(gp.val(v).shape)
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
