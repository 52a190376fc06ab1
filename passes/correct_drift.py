"""correct_drift: route the model's first output through the drift correction (opt-in).

Why it exists: with ``FastCacheConfig(drift_correction="flow_euler")`` the output of a computed
step also takes back the latent drift that the forecast steps before it left
(:mod:`fx_fastcache.runtime.drift`).  The pass inserts one call before the graph's output::

    v2 = fastcache_drift(pred, new_gen, t, v)     # pred: the last guard's cond predicate

and returns ``v2`` in place of ``v`` (for a first output that is a list, as Z-Image's per-sample
tensors, every tensor of it, each with its own state).  Nothing else in the graph changes.  The module's damping is
the calibration store's tensor (:data:`~fx_fastcache.runtime.drift.DAMPING_KEY`, shared by every
captured graph; ``search_plan`` fits it), so fitting it needs no re-capture.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fx_fastcache import graph_protocol as gp
from fx_fastcache.runtime.drift import DAMPING_KEY, DriftCorrection

from .context import PassContext, finish


def correct_drift(gm: fx.GraphModule, ctx: PassContext) -> None:
    if ctx.config.drift_correction == "none":
        return
    if ctx.timestep is None:
        raise ValueError(f"drift_correction={ctx.config.drift_correction!r}: {type(ctx.model).__name__} has no "
                         f"timestep input, and the correction needs the timestep (proportional to the noise level); "
                         f"use drift_correction='none'")
    g = gm.graph
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(out.args[0])
    vs = [a for a in leaves[:gp.first_output_leaves(gm)] if isinstance(a, fx.Node) and gp.is_tensor(a) and
          gp.val(a).is_floating_point()]
    if not vs:  # the first output holds no floating tensor: the first floating tensor the model returns
        vs = [a for a in leaves if isinstance(a, fx.Node) and gp.is_tensor(a) and gp.val(a).is_floating_point()][:1]
    if not vs:
        raise ValueError(f"drift_correction: {type(ctx.model).__name__} returns no floating tensor to correct; "
                         f"use drift_correction='none'")
    args = gp.update_args(gp.find_update(g, ctx.guards[-1]))
    dev = gp.val(vs[0]).device
    damping = ctx.store.get(DAMPING_KEY, (), lambda: torch.zeros((), dtype=torch.float32, device=dev))
    mod = DriftCorrection([tuple(gp.val(v).shape) for v in vs], dev, damping)
    gm.add_submodule(gp.DRIFT, mod)
    with g.inserting_before(out):
        call = g.call_module(gp.DRIFT, (args.pred, args.new_gen, args.t, *vs))
        news = [call] if len(vs) == 1 else [g.call_function(operator.getitem, (call, i)) for i in range(len(vs))]
    call.meta["val"] = gp.val(vs[0]) if len(vs) == 1 else tuple(gp.val(v) for v in vs)
    for v, v2 in zip(vs, news):
        v2.meta["val"] = gp.val(v)
        out.replace_input_with(v, v2)
    ctx.note("correct_drift", f"{', '.join(v.name for v in vs)} → {', '.join(v.name for v in news)} (output "
                              f"{', '.join(str(tuple(gp.val(v).shape)) for v in vs)}, decided by {ctx.guards[-1]})")
    finish(gm)
