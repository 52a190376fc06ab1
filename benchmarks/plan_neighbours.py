"""Per image: a plan, the plan with one more computed step, and the plan with one fewer.

Why it exists: at 70 % replaced the worst image misses its target on every model (docs/BENCHMARKS.md,
"Fifteenth session").  A rule that spends a step more on the hard images would need to know which step
helps which image; this prints, for every image, what adding or removing each step does, through the
library (``policy="planned"``, ``fallback="forecast"``, warm-up 2, calibrated on seeds 0–3, the
drift correction at damping ``--damping``; ``--drift none`` for none), on the benchmark's 16 evaluation
images against the uncached images::

    python benchmarks/plan_neighbours.py --model flux-mnist --plan 0,1,3,7,11,16 --damping 8
"""
from __future__ import annotations

import argparse

import torch

import fx_fastcache as fastcache
from fx_fastcache.policies import planned
from fx_fastcache.trained import load_trained, sample

STEPS = 20
WARMUP = 2  # steps 0 and 1 always compute


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-mnist")
    p.add_argument("--plan", required=True, help="computed steps, comma-separated, including 0 and 1")
    p.add_argument("--drift", default="flow_euler", choices=["flow_euler", "none"])
    p.add_argument("--damping", type=float, default=0.0, help="the drift correction's damping β")
    p.add_argument("--eval-seed", type=int, default=1000)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    try:
        base = sorted({int(s) for s in a.plan.split(",")})
    except ValueError:
        p.error(f"--plan {a.plan!r}: give computed steps as integers, e.g. 0,1,3,7,11,16")
    if base[0] < 0 or base[-1] >= STEPS or base[:WARMUP] != list(range(WARMUP)):
        p.error(f"--plan {a.plan!r}: steps must lie in 0..{STEPS - 1} and include the warm-up steps "
                f"{', '.join(map(str, range(WARMUP)))}")
    if a.images < 1:
        p.error(f"--images {a.images}: must be >= 1")
    torch.set_num_threads(a.threads)
    tm = load_trained(a.model)
    seeds = list(range(a.eval_seed, a.eval_seed + a.images))
    classes = [i % 10 for i in range(len(seeds))]
    opt = fastcache.optimize(tm.model, backend="eager", policy="planned", fallback="forecast", warmup_steps=WARMUP,
                             drift_correction=a.drift, target_fraction=0.7)
    with fastcache.calibrate(opt):
        sample(tm, [0, 1, 2, 3], [0, 1, 2, 3], steps=STEPS, model=opt)

    def row(steps: list[int]) -> torch.Tensor:
        r = torch.zeros(STEPS, dtype=torch.bool)
        r[steps] = True
        return r

    plans = {"plan": base}
    plans.update({f"+{k}": sorted(base + [k]) for k in range(WARMUP, STEPS) if k not in base})
    plans.update({f"-{k}": [s for s in base if s != k] for k in base[WARMUP:]})
    res = {}
    with planned.holding_plan(opt, lambda: sample(tm, classes, seeds, steps=STEPS, model=opt)) as run:
        ref = run(torch.ones(STEPS, dtype=torch.bool))
        if a.drift != "none":
            planned.set_damping(opt.store, a.damping, opt.device)
        for name, steps in plans.items():
            res[name] = planned.sample_psnr(run(row(steps)), ref, 2.0)
    order = res["plan"].argsort().tolist()
    print(f"{a.model}, plan {base}, drift {a.drift}" + (f" β {a.damping:g}" if a.drift != "none" else "")
          + "; PSNR dB per image, images ordered by the plan's PSNR")
    print("plan     mean (worst) | " + " ".join(f"{seeds[i]:>5}" for i in order))
    for name, q in res.items():
        print(f"{name:6} {q.mean():6.2f} ({q.min():5.2f}) | " + " ".join(f"{q[i]:5.1f}" for i in order), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
