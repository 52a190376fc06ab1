"""``fx-fastcache diff MODEL``: what the FX passes changed, per block and per pass."""
from __future__ import annotations

import argparse
import sys

import fx_fastcache as fastcache
from fx_fastcache.cli.common import (
    MODEL_HELP,
    CLIError,
    check_model_name,
    positive_int,
    quiet_library_warnings,
    resolve_model,
)
from fx_fastcache.inspect_graph import (
    build_report,
    format_html,
    format_pass,
    format_text,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model",
                   help=MODEL_HELP)
    p.add_argument("--format", choices=("text", "html"), default="text", help="text report (default) or HTML page")
    p.add_argument("--out", default=None, help="write the report here (default: stdout for text, "
                                                 "fx-fastcache-diff-MODEL.html for html)")
    p.add_argument("--pass", dest="pass_name", default=None, help="show the graph before and after this pass")
    p.add_argument("--full", action="store_true", help="with --pass: the whole graph code, not a unified diff")
    p.add_argument("--policy", default=None, help="policy to rewrite with (default: the config's)")
    p.add_argument("--fallback", default=None, help="fallback to rewrite with (default: the config's)")
    p.add_argument("--batch", type=positive_int, default=2, help="batch of the example call (default 2)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    overrides = {k: v for k, v in (("policy", args.policy), ("fallback", args.fallback)) if v is not None}
    fastcache.FastCacheConfig(**overrides)  # unknown policy/fallback names fail before the model loads
    check_model_name(args.model, option="model")
    if args.full and args.pass_name is None:
        raise CLIError("--full needs --pass NAME (it prints that pass's whole graph before and after)")
    with quiet_library_warnings():
        resolved = resolve_model(args.model)
        report = build_report(resolved.model, resolved.make_inputs(1000.0, args.batch), name=resolved.name,
                              **overrides)
    if args.pass_name is not None:
        text = format_pass(report, args.pass_name, full=args.full)  # ValueError lists the passes: exit 2
    elif args.format == "html":
        text = format_html(report)
    else:
        text = format_text(report)
    out = args.out
    if out is None and args.format == "html" and args.pass_name is None:
        out = f"fx-fastcache-diff-{Path(resolved.name).name}.html"
    if out is None:
        sys.stdout.write(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    return 0
