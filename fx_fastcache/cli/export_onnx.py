"""``fx-fastcache export-onnx --model NAME --schedule S.json --out M.onnx``."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="dit-mnist, pixart-mnist, tiny-dit/-pixart/-sd3/-flux or a diffusers folder")
    p.add_argument("--schedule", required=True, help="schedule JSON from `fx-fastcache schedule`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--batch", type=int, default=None,
                   help="batch of one model call (default: 4 for trained models = 2 images with CFG, 2 for tiny ones)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18, default 18)")
    p.add_argument("--verify", action="store_true",
                   help="run the schedule's steps with onnxruntime and PyTorch and print the max abs difference")


def run(args: argparse.Namespace) -> int:
    import torch

    from fx_fastcache.cli.common import resolve_model
    from fx_fastcache.export.onnx import export_onnx
    from fx_fastcache.export.schedule import Schedule

    schedule = Schedule.load(args.schedule)
    resolved = resolve_model(args.model)
    batch = args.batch or (4 if resolved.trained is not None else 2)
    if batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {batch}")
    example = resolved.make_inputs(1000.0, batch)
    ex = export_onnx(resolved.model, schedule, example, args.out, opset=args.opset)
    size = ex.path.stat().st_size / 2**20
    print(f"wrote {ex.path} ({size:.1f} MiB): opset {ex.opset}, {ex.n_if} blocks as If, "
          f"{len(ex.spec.state)} state tensors in/out, inputs {ex.spec.inputs} + skip[{len(ex.spec.blocks)}]")
    if args.verify:
        from fx_fastcache.export.runner import OnnxRunner
        from fx_fastcache.export.schedule import optimize_with_schedule

        opt = optimize_with_schedule(resolved.model, schedule)
        runner = OnnxRunner(ex.path)
        worst = 0.0
        for t in torch.linspace(1000.0, 0.0, schedule.steps + 1)[:-1].tolist():
            kw = resolved.make_inputs(t, batch)
            worst = max(worst, float((opt(**kw)[0] - runner(**kw)[0]).abs().max()))
        print(f"verify: {schedule.steps} steps, max |onnxruntime - PyTorch| = {worst:.3g}")
    return 0
