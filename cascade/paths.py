"""Paths given by the operator (a flag, a config key, an environment variable), ``~`` expanded.

``Path.expanduser`` raises a bare ``RuntimeError`` for ``~user`` when there is no such user (or no home
directory to be found), which reached the command line as a traceback; :func:`expand_path` says it in one
line, naming where the path came from.
"""

from __future__ import annotations

import os
from pathlib import Path

from cascade.errors import ConfigError


def expand_path(text: str | os.PathLike[str], what: str) -> Path:
    """``text`` as a Path, ``~`` and ``~user`` expanded. ``what`` names where it came from (``--ledger``,
    ``ledger.path``, ``$CASCADE_MODEL_CACHE``). ConfigError when it is empty (an empty path would silently be
    the current directory) or names a user that does not exist."""
    raw = os.fspath(text)
    if not raw.strip():
        raise ConfigError(f"{what}: empty path")
    if "\x00" in raw:  # the OS refuses it (ValueError: embedded null byte)
        raise ConfigError(f"{what}: the path contains a NUL character")
    try:
        return Path(raw).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        raise ConfigError(f"{what}: cannot expand {raw!r}: no such user") from None
