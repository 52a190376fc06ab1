"""forecast_noise: at a skipped step, route the model's first output through the noise forecast (opt-in).

Why it exists: with ``FastCacheConfig(noise_forecast="flow_euler")`` a skipped step hands the sampler the
velocity of a noise prediction extrapolated in σ, which follows the latent it is applied to, instead of
what the fallback made of the blocks (:mod:`fx_fastcache.runtime.noise_forecast`).  The pass inserts one
call before the graph's output::

    v2 = fastcache_noise(pred, new_gen, t, x, v)     # pred: the last guard's cond predicate, x: the latents

and returns ``v2`` in place of ``v``.  Its switch is the calibration store's tensor
(:data:`~fx_fastcache.runtime.noise_forecast.ENABLED_KEY`, shared by every captured graph; ``search_plan``
sets it per fraction).  It runs before ``correct_drift``, so the drift correction takes back
what these velocities leave in the latents, as it does for the fallback's.  Nothing else changes.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fx_fastcache import graph_protocol as gp
from fx_fastcache.runtime.noise_forecast import ENABLED_KEY, NoiseForecast

from .context import PassContext, finish, latents_and_first_output


def _timestep_per_sigma(ctx: PassContext) -> float:
    """The model's timestep at σ = 1: the config's, else the family's; refused when neither says."""
    if ctx.config.timestep_per_sigma > 0:
        return ctx.config.timestep_per_sigma
    known = getattr(ctx.spec, "timestep_per_sigma", None)
    if known is None:
        raise ValueError(f"noise_forecast={ctx.config.noise_forecast!r}: fx-fastcache does not know the timestep "
                         f"{type(ctx.model).__name__} gets at σ = 1 (family {ctx.spec.name!r}); pass it, e.g. "
                         f"FastCacheConfig(timestep_per_sigma=1000.0) when the pipeline passes σ·1000, or 1.0 when it "
                         f"passes σ")
    return known


def forecast_noise(gm: fx.GraphModule, ctx: PassContext) -> None:
    if ctx.config.noise_forecast == "none":
        return
    name = type(ctx.model).__name__
    if ctx.timestep is None:
        raise ValueError(f"noise_forecast={ctx.config.noise_forecast!r}: {name} has no timestep input, and the noise "
                         f"forecast needs σ; use noise_forecast='none'")
    out, x, v = latents_and_first_output(gm, ctx, "noise_forecast", "a velocity")
    g = gm.graph
    vs = tuple(gp.val(v).shape)
    args = gp.update_args(gp.find_update(g, ctx.guards[-1]))
    dev = gp.val(v).device
    enabled = ctx.store.get(ENABLED_KEY, (), lambda: torch.ones((), dtype=torch.float32, device=dev))
    mod = NoiseForecast(vs, dev, _timestep_per_sigma(ctx), enabled)
    gm.add_submodule(gp.NOISE, mod)
    with g.inserting_before(out):
        call = g.call_module(gp.NOISE, (args.pred, args.new_gen, args.t, x, v))
    call.meta["val"] = gp.val(v)
    out.replace_input_with(v, call)
    ctx.note("forecast_noise", f"{v.name} → {call.name} (output {vs}, latents {x.name}, σ = t / "
                               f"{mod.timestep_per_sigma:g}, decided by {ctx.guards[-1]})")
    finish(gm)
