"""``fx-fastcache schedule --model NAME --out S.json``: record a steps x blocks skip schedule."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="dit-mnist, pixart-mnist, tiny-dit/-pixart/-sd3/-flux or a diffusers folder")
    p.add_argument("--out", required=True, help="schedule JSON to write")
    p.add_argument("--steps", type=int, default=20, help="sampling steps per generation (default 20)")
    p.add_argument("--generations", type=int, default=2, help="recorded generations, merged by majority vote")
    p.add_argument("--batch", type=int, default=4, help="images per generation (trained models sample with CFG)")
    p.add_argument("--policy", default="step_forecast", help="deciding policy to record (default step_forecast)")
    p.add_argument("--fallback", default="forecast", help="fallback the schedule is replayed with (default forecast)")
    p.add_argument("--threshold", type=float, default=None, help="cache_ratio_threshold (default: the config's)")
    p.add_argument("--max-skip", type=int, default=None, help="max_skip_steps while recording (0 = no cap)")
    p.add_argument("--warmup", type=int, default=None, help="warmup_steps while recording")
    p.add_argument("--calibration", default=None, help="calibration file to load before recording")


def run(args: argparse.Namespace) -> int:
    import fx_fastcache as fastcache
    from fx_fastcache.cli.common import resolve_model
    from fx_fastcache.export.schedule import record_for_model

    if args.steps < 1 or args.generations < 1 or args.batch < 1:
        raise SystemExit("--steps, --generations and --batch must be >= 1")
    if args.policy == "schedule":
        raise SystemExit("--policy schedule replays a schedule; record with a deciding policy (step_forecast, chi2, ...)")
    overrides = {"policy": args.policy, "fallback": args.fallback}
    for key, val in (("cache_ratio_threshold", args.threshold), ("max_skip_steps", args.max_skip),
                     ("warmup_steps", args.warmup)):
        if val is not None:
            overrides[key] = val
    resolved = resolve_model(args.model)
    sched = record_for_model(resolved, steps=args.steps, generations=args.generations, batch=args.batch,
                             config=fastcache.FastCacheConfig(**overrides), calibration=args.calibration)
    sched.save(args.out)
    print(f"{sched.model}: {sched.steps} steps x {len(sched.blocks)} blocks, "
          f"{100 * sched.skip_ratio:.1f}% of block evaluations skipped -> {args.out}")
    for i, row in enumerate(sched.table):
        print(f"  step {i:3d}  " + "".join("x" if v else "." for v in row))
    return 0
