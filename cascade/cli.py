"""The `cascade` command line.

Each area contributes its own sub-commands through an ``add_cli(subparsers)`` function; this module only
assembles them, and turns any ``CascadeError`` into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

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


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """Run one command of a command line: a ``CascadeError`` becomes one line ``PROG: error: ...`` on stderr
    and exit status 2, Ctrl-C exit status 130. Every entry point (``cascade``, the calibration commands on
    their own, ``scripts/prepare_models.py``) goes through here."""
    try:
        return int(command() or 0)
    except CascadeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("cascade", lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
