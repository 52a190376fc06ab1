"""``fx-fastcache`` command line (subcommands are added by their modules)."""
from __future__ import annotations

import sys

from .main import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main(sys.argv[1:] if argv is None else argv)
