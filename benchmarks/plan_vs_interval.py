"""Does the planned policy's dynamic program beat a fixed interval, and can calibration images tell?

Why it exists: on the held-out flux-mnist (ninth session) diffusers' TaylorSeer, a fixed-interval
schedule, ties our best mean, and our ``forecast`` replayed on its schedules gives its images.  This
calibrates ``policy="planned"`` (``fallback="forecast"``) on seeds 0-3 (classes 0-3), reads the plan
it installs at each fraction, and runs that plan and TaylorSeer's interval schedule of the same
fraction through ``policy="schedule"`` on three seed sets: a selection set (seeds 0-15, what a choice
made in calibration would see), the benchmark's evaluation images (1000-1015) and 32 unseen seeds
(100-131).  One JSON line per model, fraction and plan (mean (worst) PSNR dB against the uncached
images of the same seeds)::

    python benchmarks/plan_vs_interval.py flux-mnist sd3-mnist dit-mnist pixart-mnist

Also, with ``--default``: the one-line default (every config default) uncalibrated and after
``calibrate``, on the evaluation images: the fraction it replaces and its PSNR.
"""
from __future__ import annotations

import argparse
import json

import torch

#: TaylorSeer's computed steps at ``disable_cache_before_step`` b and ``cache_interval`` i
#: (55 %: b 3, i 3; 60 %: b 2, i 3; 65 %: b 3, i 4), one letter per step (F computes).
INTERVAL = {0.55: "FFFSFSSFSSFSSFSSFSSF", 0.6: "FFSFSSFSSFSSFSSFSSFS", 0.65: "FFFSFSSSFSSSFSSSFSSS"}
SETS = {"select": list(range(16)), "eval": list(range(1000, 1016)), "unseen": list(range(100, 132))}


def planned_plans(fastcache, tm, sample, steps: int = 20) -> dict[float, str]:
    """The computed steps ``planned`` installs at each fraction (``opt.installed_schedule()``)."""
    opt = fastcache.optimize(tm.model, backend="eager", policy="planned", fallback="forecast")
    with fastcache.calibrate(opt):
        sample(tm, [0, 1, 2, 3], [0, 1, 2, 3], model=opt, steps=steps)
    plans = {}
    for f in INTERVAL:
        fastcache.configure(opt, target_fraction=f)
        table = opt.installed_schedule()  # trimmed after its last skipping step
        plans[f] = "".join("S" if row.any() else "F" for row in table).ljust(steps, "F")
    return plans


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="trained model names or folders (dit-mnist, flux-mnist, ...)")
    p.add_argument("--default", action="store_true", help="measure the one-line default instead")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import fx_fastcache as fastcache
    from fx_fastcache.bench.metrics import psnr
    from fx_fastcache.trained import load_trained, sample

    def score(tm, model, seeds, ref) -> str:
        q = psnr(sample(tm, [i % 10 for i in range(len(seeds))], seeds, model=model), ref)
        return f"{q.mean():.2f} ({q.min():.2f})"

    for name in a.models:
        tm = load_trained(name)
        if a.default:
            seeds = SETS["eval"]
            ref = sample(tm, [i % 10 for i in range(16)], seeds)
            opt = fastcache.optimize(tm.model)  # every default
            row = {"model": name, "uncalibrated": score(tm, opt, seeds, ref),
                   "uncalibrated_replaced": round(fastcache.get_cache_statistics(opt)["block_approx_ratio"], 3)}
            with fastcache.calibrate(opt):
                sample(tm, [0, 1, 2, 3], [0, 1, 2, 3], model=opt)
            fastcache.reset(opt)
            row["calibrated"] = score(tm, opt, seeds, ref)
            row["calibrated_replaced"] = round(fastcache.get_cache_statistics(opt)["block_approx_ratio"], 3)
            print(json.dumps(row), flush=True)
            continue
        plans = planned_plans(fastcache, tm, sample)
        refs = {k: sample(tm, [i % 10 for i in range(len(s))], s) for k, s in SETS.items()}
        sch = fastcache.optimize(tm.model, backend="eager", policy="schedule", fallback="forecast", warmup_steps=0)
        n_blocks = len(sch.block_names())
        for f, dp in plans.items():
            for label, plan in (("planned", dp), ("interval", INTERVAL[f])):
                fastcache.set_schedule(sch, torch.tensor([[c == "S"] * n_blocks for c in plan]))
                row = {"model": name, "replaced": f, "plan": label, "steps": plan}
                for k, seeds in SETS.items():
                    fastcache.reset(sch)
                    row[k] = score(tm, sch, seeds, refs[k])
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
