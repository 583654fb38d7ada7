"""The `cascade` command line.

Each area contributes its own sub-commands through an ``add_cli(subparsers)`` function; this module only
assembles them, and turns any ``CascadeError`` into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cascade.errors import CascadeError


def build_parser() -> argparse.ArgumentParser:
    from cascade import __version__

    parser = argparse.ArgumentParser(
        prog="cascade", description="Confidence-escalation cascade for LLM serving."
    )
    parser.add_argument("--version", action="version", version=f"cascade-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from cascade import commands
    commands.add_cli(sub)
    from cascade import models
    models.add_cli(sub)
    from cascade import ops_cli
    ops_cli.add_cli(sub)
    try:
        from calibration import cli as calibration_cli
    except ImportError:  # pragma: no cover - calibration is part of the distribution
        calibration_cli = None
    if calibration_cli is not None:
        calibration_cli.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CascadeError as exc:
        print(f"cascade: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cascade: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
