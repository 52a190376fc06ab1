"""``fx-fastcache export-onnx --model NAME --schedule S.json --out M.onnx [--calibration C.safetensors]``."""
from __future__ import annotations

import argparse

import fx_fastcache as fastcache
from fx_fastcache.cli.common import (
    MODEL_HELP,
    CLIError,
    check_model_name,
    positive_int,
    quiet_library_warnings,
    resolve_model,
    show_progress,
    stage_bar,
)
from fx_fastcache.export.onnx import MAX_OPSET, MIN_OPSET, export_onnx
from fx_fastcache.export.runner import OnnxRunner
from fx_fastcache.export.schedule import Schedule, optimize_with_schedule, replay_config
from fx_fastcache.fallbacks import FALLBACKS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=MODEL_HELP)
    p.add_argument("--schedule", required=True, help="schedule JSON from `fx-fastcache schedule`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="batch of one model call (default: 4 for trained models = 2 images with CFG, 2 for tiny ones)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18 to 25, default 18)")
    p.add_argument("--calibration", default=None,
                   help="calibration file of a fitted fallback (residual_linear, linear): the one the schedule was "
                        "recorded with (`fx-fastcache schedule --calibration`); used by the export and --verify")
    p.add_argument("--verify", action="store_true",
                   help="run the schedule's steps with onnxruntime and PyTorch and print the max abs difference")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on a terminal)")


def _replay(model, schedule: Schedule, calibration: str | None, **overrides):
    """The PyTorch model replaying ``schedule`` with the fit in ``calibration`` (``None``: none)."""
    opt = optimize_with_schedule(model, schedule, **overrides)
    if calibration is not None:
        fastcache.load_calibration(opt, calibration)
        fastcache.set_schedule(opt, schedule.tensor())  # a table saved in the file is not the schedule's
    return opt


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    # everything a user can get wrong is checked before the 2-minute export starts
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise CLIError(f"--opset {args.opset}: the export supports opsets {MIN_OPSET} to {MAX_OPSET}; "
                       f"pass --opset {MIN_OPSET}")
    check_model_name(args.model)
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {args.out!r} is a folder; pass a file name such as {str(out / 'model.onnx')!r}")
    if args.calibration is not None and not Path(args.calibration).is_file():
        raise CLIError(f"--calibration {args.calibration!r}: no such file; pass the file the schedule was recorded "
                       f"with (`fx-fastcache schedule --calibration`), written by fastcache.save_calibration")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
        if args.verify:
            import onnxruntime  # noqa: F401
    except ImportError as e:
        raise CLIError(f"export-onnx needs the optional package {e.name!r}: pip install 'fx-fastcache[onnx]'") from None

    import torch

    schedule = Schedule.load(args.schedule)
    fallback = replay_config(schedule).fallback
    if FALLBACKS[fallback].fitted and args.calibration is None:  # exporting it unfitted would be silently wrong
        raise CLIError(f"--schedule {args.schedule!r} replays fallback={fallback!r}, which calibration fits; without "
                       f"its fit the export would replay {FALLBACKS[fallback].uncalibrated}. Pass the calibration "
                       f"the schedule was recorded with: --calibration C.safetensors")
    stages = ["loading the model", "exporting to ONNX (torch.export + onnx, minutes on a CPU)"]
    if args.verify:
        stages.append(f"verifying {schedule.steps} steps with onnxruntime")
    with stage_bar(stages, show_progress(args.no_progress)) as advance, quiet_library_warnings():
        advance(stages[0])
        resolved = resolve_model(args.model)
        batch = args.batch or (4 if resolved.trained is not None else 2)
        example = resolved.make_inputs(1000.0, batch)
        # one PyTorch replay, with the fit: the export carries it, and --verify compares with it
        opt = _replay(resolved.model, schedule, args.calibration, enable_token_routing=False, enable_token_merge=False)
        advance(stages[1])
        ex = export_onnx(opt, schedule, example, args.out, opset=args.opset)
        worst = None
        if args.verify:
            advance(stages[2])
            fastcache.reset(opt)
            runner = OnnxRunner(ex.path)
            worst = 0.0
            with torch.no_grad():  # inference only: grad mode would make the optimized model warn
                for t in torch.linspace(1000.0, 0.0, schedule.steps + 1)[:-1].tolist():
                    kw = resolved.make_inputs(t, batch)
                    worst = max(worst, float((opt(**kw)[0] - runner(**kw)[0]).abs().max()))
    size = ex.path.stat().st_size / 2**20
    print(f"wrote {ex.path} ({size:.1f} MiB): opset {ex.opset}, {len(ex.spec.blocks)} blocks in {ex.n_if} If "
          f"(guarded spans), "
          f"{len(ex.spec.state)} state tensors in/out, inputs {ex.spec.inputs} + skip[{len(ex.spec.blocks)}]")
    if worst is not None:
        print(f"verify: {schedule.steps} steps, max |onnxruntime - PyTorch| = {worst:.3g}")
    return 0
