"""What the calibration commands write: strict JSON, and output paths checked before the work.

* :func:`dumps` is the one ``json.dumps`` of every report and artifact: a non-finite number (a NaN score of a
  selection with too little data, an undefined ratio) becomes ``null``, numpy scalars become Python ones, and
  ``allow_nan=False`` makes a NaN that slipped past the sanitiser an error instead of a ``NaN`` token that
  strict JSON readers refuse.
* :func:`check_output_path` and :func:`check_output_dir` check an output before any fitting, naming the
  option: a directory that cannot be created (``/proc/nope/x.json``) fails at once, not after the fit.
* :func:`write_file` writes a file (atomically where it is a regular file); :func:`write_text` names the option
  when it fails.

Numpy only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cascade.errors import ConfigError
from cascade.paths import expand_path


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite number replaced by None, recursively through dicts, lists and tuples;
    numpy scalars and arrays become Python numbers and lists."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON of ``obj`` (non-finite numbers as null; never a NaN or Infinity token)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def _probe_dirs(d: Path, flag: str, text: str) -> None:
    """Create the missing directories up to ``d`` and remove them again: a directory that cannot be made
    (under ``/proc``, a read-only mount) is refused now, naming ``flag``, rather than after the work."""
    missing = []
    q = d
    while not q.exists() and q != q.parent:
        missing.append(q)
        q = q.parent
    if not missing:
        return
    try:
        d.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {text}: cannot create the directory {d}: {exc.strerror or exc}") from None
    finally:
        for m in missing:  # deepest first; only what this probe created (a failed mkdir left none of it)
            try:
                m.rmdir()
            except OSError:
                pass


def check_output_path(path: str | os.PathLike[str], flag: str) -> Path:
    """An output file, checked before any work: ``cascade.cli.check_output_file`` (not empty, not a directory,
    writable), and the directories it needs can be created. ConfigError naming ``flag`` otherwise."""
    from cascade.cli import check_output_file

    p = check_output_file(path, flag)
    _probe_dirs(p.parent, flag, os.fspath(path))
    return p


def check_output_dir(path: str | os.PathLike[str], flag: str) -> Path:
    """An output directory, checked before any work: not empty, not a file, and a file can be created in it
    (or it can be created). ConfigError naming ``flag`` otherwise."""
    text = os.fspath(path)
    if not text.strip():
        raise ConfigError(f"{flag}: empty path (give a directory)")
    d = expand_path(text, flag)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{flag} {text}: not a directory")
    if not d.exists():
        _probe_dirs(d, flag, text)
        return d
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {text}: cannot write into it: {exc.strerror or exc}") from None
    return d


def write_file(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` (its directories created): atomically through a temporary file for a regular
    file (a server reloading an artifact never reads half of one), directly for a device or a pipe
    (``/dev/null``, ``/dev/stdout``: written, never replaced). OSError on failure, with no temporary file left
    behind."""
    p = expand_path(path, "output file")
    tmp = p.with_name(p.name + ".tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists() and not p.is_file():
            with open(p, "w") as f:
                f.write(text)
            return p
        tmp.write_text(text)
        tmp.replace(p)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return p


def write_text(path: str | os.PathLike[str], text: str, flag: str) -> Path:
    """:func:`write_file`, a failure a ConfigError naming ``flag`` and the path."""
    try:
        return write_file(path, text)
    except OSError as exc:
        raise ConfigError(f"{flag} {os.fspath(path)}: cannot write: {exc.strerror or exc}") from None


__all__ = ["check_output_dir", "check_output_path", "dumps", "finite_or_none", "write_file", "write_text"]
