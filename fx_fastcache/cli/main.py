"""``fx-fastcache`` entry point: a registry of subcommands, each in its own module.

Every subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is
imported only when used, so ``fx-fastcache diff`` does not import onnx, and so on.

Errors: a user error (a bad argument, a missing or malformed file, a model that does not
exist, a missing optional dependency) prints one line, ``fx-fastcache COMMAND: error: ...``,
and exits with status 2.  Anything else is a bug: one line naming the exception and exit
status 1.  ``--debug`` (before or after the subcommand) prints the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import traceback

from fx_fastcache.cli.common import CLIError
from fx_fastcache.export.tensorrt import TensorRTUnavailable

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fx_fastcache.cli.demo", "generate digits with and without FastCache on the embedded model"),
    "bench": ("fx_fastcache.cli.bench", "speed/quality sweep on a trained model: FastCache against TaylorSeer, "
              "MagCache, First-Block-Cache, TeaCache and cache-dit"),
    "diff": ("fx_fastcache.cli.diff", "show what the FX passes changed in a model's graph"),
    "schedule": ("fx_fastcache.cli.schedule", "record a steps x blocks skip schedule from calibration runs"),
    "export-onnx": ("fx_fastcache.cli.export_onnx", "export the rewritten model with a skip schedule to ONNX"),
    "export-trt": ("fx_fastcache.cli.export_trt", "build a TensorRT engine from an exported ONNX model"),
}

#: exit status of a user error (argparse uses 2 for bad arguments too)
USAGE_ERROR = 2
#: exit status of an unexpected exception (a bug)
INTERNAL_ERROR = 1


def one_line(text: object) -> str:
    """A message on one line: newlines (lists of places, reasons) become '; '."""
    parts = [re.sub(r"^[-*]\s+", "", p.strip()) for p in str(text).splitlines()]  # drop list bullets
    out = ""
    for p in (p for p in parts if p):
        out = p if not out else out + (" " if out.endswith(":") else "; ") + p
    return out


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line (plus a pointer to --help) instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")
        sys.exit(USAGE_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fx-fastcache", description="FastCache for Diffusion Transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # also accepted after the subcommand; SUPPRESS keeps a global --debug from being reset
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, print the full traceback")
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=module)
        p.set_defaults(_module=module)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [CLIError, ValueError, OSError, ImportError]
    try:
        types.append(TensorRTUnavailable)
    except ImportError:  # pragma: no cover - the export package is part of the install
        pass
    return tuple(types)


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # bad arguments (one line already printed, status 2) or --help (0)
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return USAGE_ERROR
    if getattr(args, "_missing", None):
        print(f"fx-fastcache: error: subcommand {args.command!r} is not available in this build "
              f"({args._missing} missing)", file=sys.stderr)
        return USAGE_ERROR
    prog = f"fx-fastcache {args.command}"
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # a subcommand's `raise SystemExit("message")`
        if isinstance(e.code, str):
            if args.debug:
                traceback.print_exc()
            print(f"{prog}: error: {one_line(e.code)}", file=sys.stderr)
            return USAGE_ERROR
        raise
    except _user_error_types() as e:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as e:  # a bug: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback "
              f"and report it)", file=sys.stderr)
        return INTERNAL_ERROR
