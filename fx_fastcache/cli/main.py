"""``fx-fastcache`` entry point: a registry of subcommands, each in its own module.

Every subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is
imported only when used, so ``fx-fastcache diff`` does not import onnx, and so on.
"""
from __future__ import annotations

import argparse
import importlib
import logging

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fx_fastcache.cli.demo", "generate digits with and without FastCache on the embedded model"),
    "bench": ("fx_fastcache.cli.bench", "speed/quality sweep: FastCache vs First-Block-Cache vs TeaCache"),
    "diff": ("fx_fastcache.cli.diff", "show what the FX passes changed in a model's graph"),
    "schedule": ("fx_fastcache.cli.schedule", "record a steps x blocks skip schedule from calibration runs"),
    "export-onnx": ("fx_fastcache.cli.export_onnx", "export the rewritten model with a skip schedule to ONNX"),
    "export-trt": ("fx_fastcache.cli.export_trt", "build a TensorRT engine from an exported ONNX model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fx-fastcache", description="FastCache for Diffusion Transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=module)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        parser.error(f"subcommand {args.command!r} is not available in this build ({args._missing} missing)")
    return int(importlib.import_module(args._module).run(args) or 0)
