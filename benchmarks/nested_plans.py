"""A lower fraction's plan grown from a higher fraction's (nested plans): does it keep the worst image that
``search_plan``'s independent search at the lower fraction loses?

Why it exists: ``search_plan`` searches each fraction on its own.  On sd3-mnist its 60 % plan
(``0,1,2,4,7,10,14,18``) gives 46.73 dB of mean and one evaluation image at 20.03 dB, while its 70 % plan
(``0,1,3,6,10,15``, fewer computed steps) keeps every evaluation image above 35 dB (docs/BENCHMARKS.md,
"Twenty-fifth session").  This grows the higher fraction's plan (``--base``) by ``--add`` computed steps,
each the one whose generation scores best on the calibration images (greedy; ``--add -1``: every pair of
steps added, best pair kept), fits the drift damping on the same images, and measures the result on the
evaluation images beside the plans given with ``--compare`` (same damping grid)::

    python benchmarks/nested_plans.py --model sd3-mnist --base 0,1,3,6,10,15 --compare 0,1,2,4,7,10,14,18

Every generation runs through the library (``policy="schedule"``, ``fallback="forecast"``,
``drift_correction="flow_euler"`` at damping β, ``noise_forecast="flow_euler"`` switched by ``--noise``).
``--cal-images 128`` scores the calibration on more images than the 16 the search uses, to see how rare
the images that break are.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Sequence

import torch

STEPS = 20


def parse_steps(text: str, steps: int = STEPS) -> list[int]:
    """``"0,1,3"`` -> ``[0, 1, 3]``: computed steps, each in ``[0, steps)``, step 0 among them."""
    try:
        out = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"{text!r}: give the computed steps as comma-separated integers, e.g. 0,1,3,6,10,15") from None
    if not out or out[0] != 0 or out[-1] >= steps:
        raise ValueError(f"{text!r}: computed steps must include 0 and lie in [0, {steps})")
    return out


def grow(base: Sequence[int], add: int, score: Callable[[list[int]], float], steps: int = STEPS) -> list[int]:
    """``base`` plus ``add`` computed steps, chosen greedily one at a time (``add >= 0``) or as the best pair
    (``add == -1``) by ``score(plan)`` (higher is better; the first on ties)."""
    plan = sorted(base)
    free = [s for s in range(steps) if s not in plan]
    if add == -1:
        return max((sorted(plan + list(pair)) for pair in itertools.combinations(free, 2)), key=score)
    for _ in range(add):
        plan = max((sorted(plan + [s]) for s in range(steps) if s not in plan), key=score)
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd3-mnist")
    p.add_argument("--base", required=True, help="the higher fraction's computed steps, e.g. 0,1,3,6,10,15")
    p.add_argument("--add", type=int, default=2, help="computed steps to add (-1: the best pair, every pair tried)")
    p.add_argument("--compare", nargs="*", default=[], help="other plans to measure (computed steps)")
    p.add_argument("--dampings", default="0,1,2,4,8", help="the drift damping grid, fitted on the calibration images")
    p.add_argument("--noise", choices=("on", "off"), default="on")
    p.add_argument("--cal-images", type=int, default=16)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    try:
        base = parse_steps(a.base)
        compare = [parse_steps(c) for c in a.compare]
        betas = [float(b) for b in a.dampings.split(",")]
    except ValueError as e:
        p.error(str(e))
    if a.add < -1 or len(base) + max(a.add, 2 if a.add == -1 else 0) > STEPS:
        p.error(f"--add {a.add}: give -1 (the best pair) or a count that fits in {STEPS} steps")
    torch.set_num_threads(a.threads)
    import fx_fastcache as fastcache
    from fx_fastcache.bench.metrics import psnr
    from fx_fastcache.policies.planned import set_damping, set_noise_forecast
    from fx_fastcache.trained import load_trained, sample

    tm = load_trained(a.model)
    opt = fastcache.optimize(tm.model, backend="eager", policy="schedule", warmup_steps=0,
                             drift_correction="flow_euler", noise_forecast="flow_euler")
    n_blocks = len(opt.block_names())
    set_noise_forecast(opt.store, 1.0 if a.noise == "on" else 0.0, opt.device)

    def images(seed0: int, n: int):
        return [i % 10 for i in range(n)], [seed0 + i for i in range(n)]

    cal, ev = images(0, a.cal_images), images(1000, a.images)
    refs = {"cal": sample(tm, *cal, steps=STEPS), "eval": sample(tm, *ev, steps=STEPS)}

    def run(plan: list[int], beta: float, which: str) -> torch.Tensor:
        """Per-image PSNR of ``plan`` at damping ``beta`` on the calibration (``"cal"``) or evaluation images."""
        skip = torch.ones(STEPS, dtype=torch.bool)
        skip[plan] = False
        fastcache.set_schedule(opt, skip.unsqueeze(1).expand(STEPS, n_blocks).contiguous())
        set_damping(opt.store, beta, opt.device)
        fastcache.reset(opt)
        return psnr(sample(tm, *(cal if which == "cal" else ev), steps=STEPS, model=opt), refs[which])

    t0 = time.perf_counter()
    grown = grow(base, a.add, lambda plan: float(run(plan, betas[0], "cal").mean()))
    for name, plan in [("nested", grown)] + [("compare", c) for c in compare]:
        fits = {b: run(plan, b, "cal") for b in betas}
        beta = max(betas, key=lambda b: float(fits[b].mean()))  # the first on ties
        q = run(plan, beta, "eval")
        print(json.dumps({"model": a.model, "kind": name, "plan": plan, "noise": a.noise, "damping": beta,
                          "cal_mean": round(float(fits[beta].mean()), 2),
                          "cal_worst": round(float(fits[beta].min()), 2),
                          "eval_mean": round(float(q.mean()), 2), "eval_worst": round(float(q.min()), 2),
                          "eval_worst_seeds": {ev[1][i]: round(float(q[i]), 2) for i in q.argsort()[:3].tolist()},
                          "s": round(time.perf_counter() - t0)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
