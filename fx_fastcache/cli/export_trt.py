"""``fx-fastcache export-trt --onnx M.onnx --out M.plan``: build a TensorRT engine.

Fails at once (before reading anything) when ``tensorrt`` or a CUDA device is missing.
"""
from __future__ import annotations

import argparse

from fx_fastcache.cli.common import CLIError
from fx_fastcache.export.tensorrt import ProfileRange, build_engine, require_tensorrt


def _range(text: str):
    parts = text.split(":")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:OPT:MAX, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected N or MIN:OPT:MAX, got {text!r}")
    try:
        return ProfileRange(*vals)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", required=True, help="ONNX file from `fx-fastcache export-onnx`")
    p.add_argument("--out", required=True, help="engine file to write (metadata goes to OUT.json)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="allow fp16 kernels")
    prec.add_argument("--bf16", action="store_true", help="allow bf16 kernels")
    p.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GiB (default 4)")
    p.add_argument("--batch", type=_range, default=None, help="profile for dynamic batch: N or MIN:OPT:MAX")
    p.add_argument("--tokens", type=_range, default=None, help="profile for dynamic tokens: N or MIN:OPT:MAX")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.workspace <= 0:
        raise CLIError(f"--workspace {args.workspace}: expected a positive number of GiB (default 4)")
    require_tensorrt()  # TensorRTUnavailable: one line naming what is missing, exit 2
    if not Path(args.onnx).is_file():
        raise CLIError(f"ONNX file {args.onnx!r} does not exist; write it with `fx-fastcache export-onnx`")
    out = build_engine(args.onnx, args.out, fp16=args.fp16, bf16=args.bf16, workspace_gib=args.workspace,
                       batch=args.batch, tokens=args.tokens)
    print(f"wrote {out} and {out}.json")
    return 0
