"""CPU wall-clock speedup of FastCache per generation, measured side by side in one process.

For each backend (eager, inductor) the uncached model and the FastCache model generate the same
images (trained DiT, batched CFG); runs are interleaved and the best of ``--repeats`` is kept.
``--backends dispatch`` runs the step-level policy through :class:`StepDispatch` (the decision
read once per step, then a copy compiled for that step's pattern) against ``torch.compile`` of
the original: on CPU it answers whether leaving the in-graph ``cond`` pays.  Prints the fraction of block evaluations replaced, the speedup and the ideal speedup
1 / (1 - fraction) so their ratio can be read directly.

    python benchmarks/cpu_speedup.py --model dit-mnist --images 8 --thresholds 0.07 0.09

``--policy planned --fractions 0.45 0.7`` times the planned steps instead (calibrated on seeds 0–3,
``drift_correction="flow_euler"``, swept over ``target_fraction``): whole steps skip, so the speedup
should approach the ideal at every fraction.
"""
from __future__ import annotations

import argparse
import time

import torch

import fx_fastcache as fastcache
from fx_fastcache.bench.metrics import psnr
from fx_fastcache.step_dispatch import StepDispatch
from fx_fastcache.trained import load_trained, sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dit-mnist")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.07, 0.09])
    ap.add_argument("--backends", nargs="+", default=["eager", "inductor"], choices=["eager", "inductor", "dispatch"],
                    help="dispatch: StepDispatch(decide='device', compile_mode='default') against torch.compile")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--policy", default="step_forecast", choices=["step_forecast", "planned"])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.45, 0.55, 0.6, 0.65, 0.7],
                    help="target_fraction values of --policy planned (--thresholds: step_forecast)")
    args = ap.parse_args()
    if args.policy == "planned" and not all(0 < f < 1 for f in args.fractions):
        ap.error(f"--fractions {args.fractions}: each must be in (0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tm = load_trained(args.model)
    classes = [i % 10 for i in range(args.images)]
    seeds = list(range(2000, 2000 + args.images))
    print(f"model {args.model}, {args.images} images, {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    knob = "target_fraction" if args.policy == "planned" else "cache_ratio_threshold"
    values = args.fractions if args.policy == "planned" else args.thresholds
    print(f"| backend | {knob} | replaced | PSNR mean (worst) | uncached s/gen | FastCache s/gen | speedup | ideal | speedup/ideal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend in args.backends:
        base = tm.model if backend == "eager" else torch.compile(tm.model, fullgraph=False)
        kw = {"policy": "planned", "drift_correction": "flow_euler"} if args.policy == "planned" else {}
        opt = fastcache.optimize(tm.model, backend="eager" if backend == "dispatch" else backend, **kw)
        if args.policy == "planned":
            with fastcache.calibrate(opt):
                sample(tm, [0, 1, 2, 3], [0, 1, 2, 3], steps=args.steps, model=opt)
        call = StepDispatch(opt, compile_mode="default") if backend == "dispatch" else opt

        def run(model):
            return sample(tm, classes, seeds, steps=args.steps, model=model)

        ref = run(base)  # warm-up / compile
        run(call)
        for thr in values:
            fastcache.configure(opt, **{knob: thr})
            t_base, t_opt = float("inf"), float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run(base)
                t_base = min(t_base, time.perf_counter() - t0)
                if backend == "dispatch":
                    call.reset()  # the dispatcher's host counter and the graph's state
                else:
                    fastcache.reset(opt)
                t0 = time.perf_counter()
                out = run(call)
                t_opt = min(t_opt, time.perf_counter() - t0)
            frac = fastcache.get_cache_statistics(opt)["block_approx_ratio"]
            p = psnr(out, ref)
            speed, ideal = t_base / t_opt, 1.0 / (1.0 - frac)
            print(f"| {backend} | {thr} | {frac:.1%} | {p.mean():.2f} ({p.min():.2f}) | {t_base:.2f} | {t_opt:.2f} | "
                  f"{speed:.2f}x | {ideal:.2f}x | {speed / ideal:.2f} |", flush=True)


if __name__ == "__main__":
    main()
