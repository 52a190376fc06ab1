"""``fx-fastcache export-onnx --model NAME --schedule S.json --out M.onnx``."""
from __future__ import annotations

import argparse

from fx_fastcache.cli.common import (
    CLIError,
    check_model_name,
    positive_int,
    quiet_library_warnings,
    resolve_model,
    show_progress,
    stage_bar,
)
from fx_fastcache.export.onnx import MIN_OPSET, export_onnx
from fx_fastcache.export.runner import OnnxRunner
from fx_fastcache.export.schedule import Schedule, optimize_with_schedule


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="dit-mnist, pixart-mnist, sd3-mnist, flux-mnist, a tiny-* model (tiny-dit, tiny-pixart, ...) or a diffusers folder")
    p.add_argument("--schedule", required=True, help="schedule JSON from `fx-fastcache schedule`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="batch of one model call (default: 4 for trained models = 2 images with CFG, 2 for tiny ones)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18, default 18)")
    p.add_argument("--verify", action="store_true",
                   help="run the schedule's steps with onnxruntime and PyTorch and print the max abs difference")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on a terminal)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    # everything a user can get wrong is checked before the 2-minute export starts
    if args.opset < MIN_OPSET:
        raise CLIError(f"--opset {args.opset}: the export needs opset >= {MIN_OPSET}; pass --opset {MIN_OPSET}")
    check_model_name(args.model)
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {args.out!r} is a folder; pass a file name such as {str(out / 'model.onnx')!r}")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
        if args.verify:
            import onnxruntime  # noqa: F401
    except ImportError as e:
        raise CLIError(f"export-onnx needs the optional package {e.name!r}: pip install 'fx-fastcache[onnx]'") from None

    import torch

    schedule = Schedule.load(args.schedule)
    stages = ["loading the model", "exporting to ONNX (torch.export + onnx, minutes on a CPU)"]
    if args.verify:
        stages.append(f"verifying {schedule.steps} steps with onnxruntime")
    with stage_bar(stages, show_progress(args.no_progress)) as advance, quiet_library_warnings():
        advance(stages[0])
        resolved = resolve_model(args.model)
        batch = args.batch or (4 if resolved.trained is not None else 2)
        example = resolved.make_inputs(1000.0, batch)
        advance(stages[1])
        ex = export_onnx(resolved.model, schedule, example, args.out, opset=args.opset)
        worst = None
        if args.verify:
            advance(stages[2])

            opt = optimize_with_schedule(resolved.model, schedule)
            runner = OnnxRunner(ex.path)
            worst = 0.0
            with torch.no_grad():  # inference only: grad mode would make the optimized model warn
                for t in torch.linspace(1000.0, 0.0, schedule.steps + 1)[:-1].tolist():
                    kw = resolved.make_inputs(t, batch)
                    worst = max(worst, float((opt(**kw)[0] - runner(**kw)[0]).abs().max()))
    size = ex.path.stat().st_size / 2**20
    print(f"wrote {ex.path} ({size:.1f} MiB): opset {ex.opset}, {ex.n_if} blocks as If, "
          f"{len(ex.spec.state)} state tensors in/out, inputs {ex.spec.inputs} + skip[{len(ex.spec.blocks)}]")
    if worst is not None:
        print(f"verify: {schedule.steps} steps, max |onnxruntime - PyTorch| = {worst:.3g}")
    return 0
