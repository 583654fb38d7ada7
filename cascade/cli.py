"""The `cascade` command line.

Each area contributes its own sub-commands through an ``add_cli(subparsers)`` function; this module only
assembles them, and turns any ``CascadeError`` into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from cascade.errors import CascadeError, ConfigError
from cascade.paths import expand_path
from cascade.types import is_utf8


class OneLineParser(argparse.ArgumentParser):
    """argparse with every command's error in one line, as the commands' own errors are (``cascade: error:
    ...``, exit status 2), and where to read the usage, instead of the usage block. Sub-command parsers are
    of the same class. ``command``: the name the line starts with (a script's own, e.g. ``vllm_server.py``)."""

    def __init__(self, *args: Any, command: str = "cascade", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.command = command

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._args_seen = list(sys.argv[1:] if args is None else args)  # a sub-command parser gets its own part
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith(("argument SUBCOMMAND: invalid choice", "argument COMMAND: invalid choice")) and \
                any(a.startswith("-") for a in getattr(self, "_args_seen", ())):
            # `cascade shadow --ledger X`: argparse reads the option's value as the subcommand
            choices = [c for a in self._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]
            word = "SUBCOMMAND" if message.startswith("argument SUB") else "COMMAND"
            example = f"{self.prog} {choices[0] if len(choices) == 1 else word} [options]"
            message += f"; the {word.lower()} comes before its options, as in `{example}`"
        self.exit(2, f"{self.command}: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from cascade import __version__

    parser = OneLineParser(prog="cascade", description="Confidence-escalation cascade for LLM serving.")
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


def non_negative_int(text: str) -> int:
    """argparse ``type`` of a seed or a count: an integer >= 0 (numpy refuses negative seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: the path(s) it names and what went wrong."""
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:
        where = os.fsdecode(exc.filename)
        if exc.filename2 is not None:
            where += f" -> {os.fsdecode(exc.filename2)}"
        return f"{where}: {what}"
    return what


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """An output file a command will write, checked before any work: a ConfigError (one line naming ``flag``)
    when it is empty, a directory, under something that is not a directory, or cannot be written. Missing
    parent directories are allowed (the writer creates them) when the nearest existing one is writable.
    Returns the path, ``~`` expanded."""
    text = os.fspath(path)
    if not text.strip():
        raise ConfigError(f"{flag}: empty path")
    p = expand_path(text, flag)
    if p.is_dir():
        raise ConfigError(f"{flag} {text}: is a directory (give a file name)")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link: the writer could not create it
            raise ConfigError(f"{flag} {text}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {text}: {parent} is not a directory")
    if parent == p.parent:
        existed = p.exists()
        try:  # append mode: an existing file is left as it is; a new one is removed again
            with open(p, "a"):
                pass
        except OSError as exc:
            raise ConfigError(f"{flag} {text}: cannot write: {exc.strerror or exc}") from None
        if not existed:
            p.unlink(missing_ok=True)
    elif not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {text}: cannot create directories under {parent}: permission denied")
    return p


def check_text(text: str, what: str) -> str:
    """``text`` as is when it is Unicode text; a ConfigError naming ``what`` when it holds bytes that are not
    UTF-8. Python decodes such bytes (in an argument, or on standard input) as lone surrogates, which every
    later encode refuses: a prompt sent to a tokenizer, a row written to the ledger, a key hashed."""
    if not is_utf8(text):
        raise ConfigError(f"{what}: not valid UTF-8 text")
    return text


def _argument_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each argument's destination and the name a message gives it (its long option, or a positional's
    name), through every sub-command's parser."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for dest, name in _argument_names(sub).items():
                    names.setdefault(dest, name)
        elif action.dest not in names:
            names[action.dest] = max(action.option_strings, key=len) if action.option_strings else (
                action.metavar if isinstance(action.metavar, str) else action.dest)
    return names


def check_arguments_text(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any command runs, an argument that is not valid UTF-8 (see ``check_text``), naming it:
    checked here once, rather than failing as a traceback wherever a command first encodes it."""
    for dest, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not is_utf8(item):
                raise ConfigError(f"argument {_argument_names(parser).get(dest, dest)}: not valid UTF-8 text")


def _quiet_broken_pipe() -> int:
    """stdout's reader went away (``cascade report | head -1``): stop quietly, as other command-line tools do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # pragma: no cover - stdout without a descriptor
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the broken pipe


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """Run one command of a command line: a ``CascadeError`` becomes one line ``PROG: error: ...`` on stderr
    and exit status 2, as does an ``OSError`` (a file that cannot be read or written: the message names the
    path); Ctrl-C exit status 130; a closed stdout (a pipe into ``head``) ends quietly. Every entry point
    (``cascade``, the calibration commands on their own, ``scripts/prepare_models.py``) goes through here."""
    try:
        rc = int(command() or 0)
        sys.stdout.flush()  # a broken pipe shows here rather than at exit, as a traceback
        return rc
    except CascadeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OSError as exc:
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its command: its arguments checked as text first, its errors one line."""
    args = parser.parse_args(argv)

    def command() -> int | None:
        check_arguments_text(parser, args)
        return args.func(args)

    return run_command("cascade", command)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
