"""Paths given by the operator (a flag, a config key, an environment variable), ``~`` expanded.

``Path.expanduser`` raises a bare ``RuntimeError`` for ``~user`` when there is no such user (or no home
directory to be found), which reached the command line as a traceback; :func:`expand_path` says it in one
line, naming where the path came from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cascade.errors import ConfigError


#: the URLs a ledger opens (anything else is a SQLite file path)
LEDGER_URL_SCHEMES = ("postgresql://", "postgres://")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def ledger_url_problem(target: str) -> str | None:
    """Why a ledger target written as a URL cannot be opened, or None: only ``postgresql://`` URLs are URLs to
    it; any other (``sqlite:///x``, as SQLAlchemy names a SQLite file) was taken as a relative path and created
    the file ``./sqlite:/x``."""
    if _URL.match(target) and not target.startswith(LEDGER_URL_SCHEMES):
        return (f"{target.split('://', 1)[0]}:// is no ledger URL: give a SQLite file's path (without sqlite://) "
                "or a postgresql:// URL")
    return None


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
