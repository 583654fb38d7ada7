"""Shared helpers of the benchmark scripts: paths, machine facts, JSON output, progress bars."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
ENV_DATA = "CASCADE_SHARED_DATA"


def shared_data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The shared data folder: ``path``, else ``$CASCADE_SHARED_DATA``, else ``../shared/data``."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env).expanduser()
    return (REPO.parent / "shared" / "data").resolve()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma") if f in flags)
    except OSError:
        pass
    return []


def _mem_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def git_commit() -> dict[str, Any]:
    """The checked-out commit and whether the tree had local changes (read-only git calls)."""
    out: dict[str, Any] = {"commit": None, "dirty": None}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                       timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        out["dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _version(mod: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(mod)
    except metadata.PackageNotFoundError:
        return None


def machine_facts(models: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    """What a figure was measured on: cores, CPU, memory, versions, models, date, commit, load."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    facts = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "memory_gb": _mem_gb(),
        "load_average_1_5_15": load,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("cascade-engine", "torch", "transformers", "numpy", "fastapi",
                                              "uvicorn", "httpx", "netcal", "matplotlib")},
        "git": git_commit(),
        "models": list(models),
        "argv": sys.argv,
    }
    facts.update(extra)
    return facts


def to_jsonable(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars and arrays become Python values."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(p)
    return p


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then ``os.replace``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return p


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``minimum`` (else an argparse error naming it)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{n}: must be at least {minimum}")
        return n

    return parse


def check_out(ap: argparse.ArgumentParser, path: str, *, directory: bool = False, flag: str = "--out") -> None:
    """An output of a benchmark, checked before the run (which may take minutes): ``ap.error`` (one line,
    exit 2) when ``path`` cannot be written, as a file or, with ``directory``, as a folder of results."""
    from cascade.cli import check_output_file
    from cascade.errors import ConfigError

    try:
        if directory:
            if not path.strip():  # Path("") is the current folder: the results would land wherever it is
                raise ConfigError(f"{flag}: empty path")
            p = Path(path).expanduser()
            if p.exists() and not p.is_dir():
                raise ConfigError(f"{flag} {path}: not a directory")
            check_output_file(p / ".write-check", flag)
        else:
            check_output_file(path, flag)
    except ConfigError as exc:
        ap.error(exc.message.replace(str(Path(path).expanduser() / ".write-check"), str(path)))


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def replot(ap: argparse.ArgumentParser, plot: Callable[[dict[str, Any], Path], "Path | None"], src: Path,
           png: Path, flag: str = "--plot") -> "Path | None":
    """``plot`` of a results JSON given on the command line (``--plot JSON``): ``ap.error`` (one line, exit 2)
    when it is missing, not JSON, or not a results file with ``rows`` that this benchmark can draw."""
    if not src.is_file():
        ap.error(f"{flag} {src}: no such file")
    try:
        result = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        ap.error(f"{flag} {src}: cannot read it: {getattr(exc, 'strerror', None) or exc}")
    except ValueError as exc:
        ap.error(f"{flag} {src}: not valid JSON ({exc})")
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        ap.error(f"{flag} {src}: not a results file of this benchmark (a JSON object with a list of rows)")
    check_out(ap, str(png), flag="the PNG")
    try:
        return plot(result, png)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        ap.error(f"{flag} {src}: a malformed results file ({type(exc).__name__}: {exc})")


def rel(path: str | os.PathLike[str]) -> str:
    """A path relative to the repository when it is inside it (for reports), else as given."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        try:
            return "../" + str(p.relative_to(REPO.parent))
        except ValueError:
            return str(p)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr (transient); yields ``advance(n=1, description=None)``."""
    try:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
    except ImportError:  # pragma: no cover - rich is a core dependency
        yield lambda n=1, description=None: None
        return
    if not enabled:
        yield lambda n=1, description=None: None
        return
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=not console.is_terminal) as prog:
        task = prog.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            if description:
                prog.update(task, description=description)
            prog.advance(task, n)

        yield advance


def stop_processes(procs: Sequence[subprocess.Popen], sig: int = signal.SIGTERM, grace_s: float = 30.0) -> None:
    """Signal each process still running (all first, so that they stop together), wait up to ``grace_s`` for
    each, and kill one that outlives it."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def finish_throughput_plot(plt: Any, fig: Any, axes: Any, title: str, machine: dict[str, Any], png: Path,
                           xlabel: str = "concurrent requests") -> Path:
    """The two panels of a throughput benchmark (tokens/s; p50 and p99 latency) against concurrency, titled
    with where they were measured (the GPUs, else the CPU), saved as ``png``."""
    for ax, name, ylabel in ((axes[0], "throughput", "generated tokens/s"),
                             (axes[1], "latency per request (o p50, x p99)", "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    where = (", ".join(machine.get("gpus") or [])
             or f"CPU {machine.get('cpu_model')} ({machine.get('cores_usable')} cores)")
    fig.suptitle(f"{title} - {where}", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
