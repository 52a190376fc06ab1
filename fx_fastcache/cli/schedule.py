"""``fx-fastcache schedule --model NAME --out S.json``: record a steps x blocks skip schedule."""
from __future__ import annotations

import argparse

import fx_fastcache as fastcache
from fx_fastcache.calibration import read_calibration_file
from fx_fastcache.cli.common import (
    MODEL_HELP,
    CLIError,
    check_model_name,
    non_negative_float,
    non_negative_int,
    positive_int,
    quiet_library_warnings,
    resolve_model,
    show_progress,
)
from fx_fastcache.export.schedule import record_for_model
from fx_fastcache.policies import POLICIES
from fx_fastcache.policies.schedule import MAX_STEPS


def _steps(text: str) -> int:
    """argparse type: 1 <= steps <= the schedule policy's table length (what export-onnx accepts)."""

    v = positive_int(text)
    if v > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"{v} steps do not fit a schedule table (at most {MAX_STEPS} steps); "
                                         f"pass --steps {MAX_STEPS} or fewer")
    return v


#: How to get a schedule file of a table a model replays (a planned model's plan): there is nothing to record.
SAVE_TABLE_HINT = ("to save the table a model replays (the plan of a calibrated policy='planned' model) as a "
                   "schedule file, call fx_fastcache.export.installed_schedule(opt, steps=N).save(PATH) in Python")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=MODEL_HELP)
    p.add_argument("--out", required=True, help="schedule JSON to write")
    p.add_argument("--steps", type=_steps, default=20, help="sampling steps per generation (default 20, at most 1024)")
    p.add_argument("--generations", type=positive_int, default=2, help="recorded generations; a block is skipped at a step where at least half of them skipped it")
    p.add_argument("--batch", type=positive_int, default=4,
                   help="images per generation (trained models sample with CFG)")
    p.add_argument("--policy", default="step_forecast", help="deciding policy to record (default step_forecast)")
    p.add_argument("--fallback", default="forecast", help="fallback the schedule is replayed with (default forecast)")
    p.add_argument("--threshold", type=non_negative_float, default=None,
                   help="cache_ratio_threshold (default: the config's)")
    p.add_argument("--max-skip", type=non_negative_int, default=None,
                   help="max_skip_steps while recording (0 = no cap)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="warmup_steps while recording")
    p.add_argument("--calibration", default=None, help="calibration file to load before recording")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on a terminal)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.policy in POLICIES and POLICIES[args.policy].host_decidable:
        deciding = sorted(k for k, v in POLICIES.items() if not v.host_decidable)
        raise CLIError(f"--policy {args.policy} replays a table fixed before sampling, so there are no decisions "
                       f"to record; record with a deciding policy (--policy one of {', '.join(deciding)}); "
                       f"{SAVE_TABLE_HINT}")
    overrides = {"policy": args.policy, "fallback": args.fallback}
    for key, val in (("cache_ratio_threshold", args.threshold), ("max_skip_steps", args.max_skip),
                     ("warmup_steps", args.warmup)):
        if val is not None:
            overrides[key] = val
    config = fastcache.FastCacheConfig(**overrides)  # validates policy/fallback names before any loading
    check_model_name(args.model)
    if args.calibration is not None and not Path(args.calibration).is_file():
        raise CLIError(f"--calibration {args.calibration!r}: no such file; write one with "
                       f"fastcache.save_calibration(opt, PATH) after a `with fastcache.calibrate(opt):` run")
    if Path(args.out).is_dir():
        raise CLIError(f"--out {args.out!r} is a folder; pass a file name such as {str(Path(args.out) / 'S.json')!r}")
    with quiet_library_warnings():
        resolved = resolve_model(args.model)
        if args.calibration is not None:  # before load_calibration, whose advice (configure a policy) is for Python
            saved = read_calibration_file(args.calibration, resolved.model)[0].get("policy")
            if saved in POLICIES and POLICIES[saved].host_decidable:
                raise CLIError(f"--calibration {args.calibration!r} was calibrated with policy={saved!r}, which "
                               f"replays a table and decides nothing to record; pass a file calibrated with "
                               f"policy={args.policy!r} (--policy {args.policy}) or leave --calibration out; "
                               f"{SAVE_TABLE_HINT}")
        sched = record_for_model(resolved, steps=args.steps, generations=args.generations, batch=args.batch,
                                 config=config, calibration=args.calibration,
                                 progress=show_progress(args.no_progress))
    sched.save(args.out)
    print(f"{sched.model}: {sched.steps} steps x {len(sched.blocks)} blocks, "
          f"{100 * sched.skip_ratio:.1f}% of block evaluations skipped -> {args.out}")
    for i, row in enumerate(sched.table):
        print(f"  step {i:3d}  " + "".join("x" if v else "." for v in row))
    return 0
