"""correct_drift: route the model's first output through the drift correction (opt-in).

Why it exists: with ``FastCacheConfig(drift_correction="flow_euler")`` the output of a computed
step also takes back the latent drift that the forecast steps before it left
(:mod:`fx_fastcache.runtime.drift`).  The pass inserts one call before the graph's output::

    v2 = fastcache_drift(pred, new_gen, t, v)     # pred: the last guard's cond predicate

and returns ``v2`` in place of ``v``.  Nothing else in the graph changes.  The module's damping is
the calibration store's tensor (:data:`~fx_fastcache.runtime.drift.DAMPING_KEY`, shared by every
captured graph; ``search_plan`` fits it), so fitting it needs no re-capture.
"""
from __future__ import annotations

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
    leaves = [a for a in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)]
    v = next((a for a in leaves if gp.is_tensor(a) and gp.val(a).is_floating_point()), None)
    if v is None:
        raise ValueError(f"drift_correction: {type(ctx.model).__name__} returns no floating tensor to correct; "
                         f"use drift_correction='none'")
    args = gp.update_args(gp.find_update(g, ctx.guards[-1]))
    dev = gp.val(v).device
    damping = ctx.store.get(DAMPING_KEY, (), lambda: torch.zeros((), dtype=torch.float32, device=dev))
    mod = DriftCorrection(tuple(gp.val(v).shape), dev, damping)
    gm.add_submodule(gp.DRIFT, mod)
    with g.inserting_before(out):
        v2 = g.call_module(gp.DRIFT, (args.pred, args.new_gen, args.t, v))
    v2.meta["val"] = gp.val(v)
    out.replace_input_with(v, v2)
    ctx.note("correct_drift", f"{v.name} → {v2.name} (output {tuple(gp.val(v).shape)}, decided by {ctx.guards[-1]})")
    finish(gm)
