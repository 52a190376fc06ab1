"""Drift correction on other noise schedules: does ``drift_correction="flow_euler"`` still help when the
Euler steps are not uniform in sigma?

Why it exists: the correction takes the next step as long as the previous one, and its gains were
measured on the benchmark's uniform 20-step schedule (docs/BENCHMARKS.md, "Tenth session"), while SD3
and Flux pipelines use a shifted one, ``sigma = s u / (1 + (s - 1) u)`` with ``u`` uniform.  This runs
fixed plans (one letter per step, ``F`` computed, ``S`` forecast) through the library
(``policy="schedule"``, ``fallback="forecast"``) with and without the correction on a shifted schedule
(``fx_fastcache.trained.sample``'s ``sigmas``),
16 evaluation images (seeds 1000–1015) against the uncached images on the same schedule::

    python benchmarks/drift_schedules.py --model sd3-mnist --shift 3 --plans FFFSFSFSFSFSFSFSFSFS FFSFSSFSSFSSFSSFSSFS

``--dampings 0 1 4`` runs the correction at each damping β (``fx_fastcache.runtime.drift``); ``--noise`` runs each
row with ``noise_forecast="flow_euler"`` too (σ from the family's timestep scale, so the forecast sees the shifted σ);
``--eval-seed 100 --images 32`` measures on other seeds (e.g. seeds never used for calibration or tuning).
"""
from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd3-mnist")
    p.add_argument("--shift", type=float, default=3.0, help="schedule shift (1 = the benchmark's uniform schedule)")
    p.add_argument("--plans", nargs="+", required=True, help="one letter (F or S) per step, 20 steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dampings", type=float, nargs="+", default=[0.0],
                   help="the correction's damping β (search_plan fits it for planned models; 0: undamped)")
    p.add_argument("--noise", action="store_true", help="each row with noise_forecast='flow_euler' too")
    p.add_argument("--eval-seed", type=int, default=1000, help="first image seed (default 1000, the benchmark's)")
    p.add_argument("--images", type=int, default=16)
    a = p.parse_args(argv)
    if a.images < 1:
        p.error(f"--images {a.images}: must be >= 1")
    steps = 20
    for plan in a.plans:
        if len(plan) != steps or set(plan) - {"F", "S"}:
            p.error(f"plan {plan!r}: give one letter, F or S, per step ({steps})")
    if a.shift <= 0:
        p.error(f"--shift {a.shift}: must be > 0")
    torch.set_num_threads(a.threads)
    import fx_fastcache as fastcache
    from fx_fastcache.bench.metrics import psnr
    from fx_fastcache.policies.planned import set_damping
    from fx_fastcache.trained import load_trained, sample, shifted_sigmas

    tm = load_trained(a.model)
    classes, seeds = [i % 10 for i in range(a.images)], [a.eval_seed + i for i in range(a.images)]
    sigmas = shifted_sigmas(steps, a.shift)
    ref = sample(tm, classes, seeds, steps=steps, sigmas=sigmas)
    noises = ("none", "flow_euler") if a.noise else ("none",)
    models = {(dc, nf): fastcache.optimize(tm.model, backend="eager", policy="schedule", warmup_steps=0,
                                           drift_correction=dc, noise_forecast=nf)
              for dc in ("none", "flow_euler") for nf in noises}
    runs = [("none", None)] + [("flow_euler", d) for d in a.dampings]
    for plan in a.plans:
        for (dc, damping), nf in ((r, nf) for nf in noises for r in runs):
            opt = models[dc, nf]
            if damping is not None:
                set_damping(opt.store, damping, opt.device)
            table = torch.tensor([m == "S" for m in plan]).unsqueeze(1).expand(steps, len(opt.block_names()))
            fastcache.set_schedule(opt, table.contiguous())
            fastcache.reset(opt)
            q = psnr(sample(tm, classes, seeds, steps=steps, model=opt, sigmas=sigmas), ref)
            print(json.dumps({"model": a.model, "seeds": f"{seeds[0]}-{seeds[-1]}", "shift": a.shift, "plan": plan, "drift_correction": dc,
                              "noise_forecast": nf,
                              "damping": damping, "replaced": plan.count("S") / steps,
                              "psnr_mean": round(float(q.mean()), 2), "psnr_worst": round(float(q.min()), 2)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
