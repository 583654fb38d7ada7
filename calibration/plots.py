"""Reliability diagrams with confidence histograms, written as PNG (or PDF, SVG, ...) with matplotlib's Agg backend.

matplotlib is imported inside the function (it is an optional extra), never at module import. Only formats
matplotlib writes on its own are offered (png, pdf, svg, ...; not pgf, which needs a LaTeX installation), a
plot is written through a temporary file (a failure leaves no half-written plot), and a failure while
writing is one ConfigError naming the path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration import metrics
from cascade.errors import ConfigError
from cascade.paths import expand_path


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display). matplotlib is an optional extra:
    without it, a ConfigError that names the extra, which the CLIs print as one line."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is an optional extra
        raise ConfigError("plots need matplotlib, which is not installed (pip install matplotlib, or the "
                          "calibration extra after torch==2.13.0: pip install 'cascade-engine[calibration]')") from exc
    return plt


#: formats matplotlib lists but cannot write without an external program: pgf runs LaTeX (xelatex by default)
NEEDS_EXTERNAL_TOOLS = frozenset({"pgf"})


def plot_formats() -> list[str]:
    """The file suffixes matplotlib writes without external programs (png, pdf, svg, eps, ...), without the dot."""
    pyplot()  # the extra's message when matplotlib is missing
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(set(FigureCanvasBase.get_supported_filetypes()) - NEEDS_EXTERNAL_TOOLS)


def check_plot_path(path: str | Path, flag: str = "--plot") -> Path:
    """A plot's output path, checked before any work: a file name (not a directory) with a suffix matplotlib
    writes without external programs, whose directory can be written or created. ConfigError (one line naming
    ``flag``) otherwise."""
    from calibration.output import check_output_path

    text = str(path)
    p = expand_path(text, flag)  # an empty path is refused here
    if p.is_dir():
        raise ConfigError(f"{flag} {text}: is a directory (give a file name such as {p / 'plot.png'})")
    formats = plot_formats()
    suffix = p.suffix.lower().lstrip(".")
    if suffix not in formats:
        said = f"unsupported image format .{suffix}" if suffix else "the file name has no image suffix"
        if suffix in NEEDS_EXTERNAL_TOOLS:
            said += " (it needs LaTeX)"
        raise ConfigError(f"{flag} {text}: {said}; supported: {', '.join('.' + f for f in formats)}")
    return check_output_path(text, flag)


def save_figure(fig: Any, path: str | Path, flag: str = "--plot") -> Path:
    """Write ``fig`` to ``path`` in the format its suffix names, through a temporary file in the same folder
    (nothing half-written is left when drawing fails), and close it. A failure (a format that needs a missing
    program, a full disk) is a ConfigError naming ``flag`` and the path."""
    plt = pyplot()
    p = expand_path(path, flag)
    fmt = p.suffix.lower().lstrip(".") or None
    tmp = p.with_name(f".{p.name}.tmp")
    # the PostScript backend notes on stderr that it draws the translucent grid and bars opaque: harmless
    ps_log = logging.getLogger("matplotlib.backends.backend_ps")
    level = ps_log.level
    ps_log.setLevel(logging.ERROR)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format=fmt, dpi=110)
        os.replace(tmp, p)
    except (OSError, RuntimeError, ValueError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
        raise ConfigError(f"{flag} {path}: cannot write the plot: {why}") from exc
    finally:
        ps_log.setLevel(level)
        plt.close(fig)
    return p


def reliability_diagram(path: str | Path, curves: Mapping[str, tuple[Any, Any]], title: str = "",
                        n_bins: int = metrics.N_BINS) -> Path:
    """Write a reliability diagram (top) and confidence histogram (bottom) for one or more curves.

    ``curves`` maps a label (e.g. "raw", "calibrated") to (confidences, correct). Returns the path.
    """
    plt = pyplot()
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5.5, 7.0), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1.3]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / n_bins
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple"]
    for k, (label, (conf, correct)) in enumerate(curves.items()):
        c = colors[k % len(colors)]
        conf = np.clip(np.asarray(conf, dtype=float), 0, 1)
        correct = np.asarray(correct, dtype=float)
        b = metrics.reliability_bins(conf, correct, n_bins)
        filled = b["count"] > 0
        e = metrics.ece(conf, correct, n_bins)
        ax.plot(b["confidence"][filled], b["accuracy"][filled], marker="o", color=c, lw=1.5,
                label=f"{label} (ECE {e:.3f})")
        off = (k - (len(curves) - 1) / 2) * width / max(len(curves), 1)
        hx.bar(centers + off, b["count"] / max(conf.size, 1), width=width / max(len(curves), 1), color=c,
               alpha=0.7, label=label)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or "reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hx.set_xlabel("confidence")
    hx.set_ylabel("share of answers")
    hx.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def cost_quality_plot(path: str | Path, points: Sequence[dict[str, Any]], title: str = "") -> Path:
    """A small scatter of (cost ratio, quality) operating points, each a dict with label/cost_ratio/quality."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for pt in points:
        ax.scatter(pt["cost_ratio"], pt["quality"], s=40)
        ax.annotate(pt["label"], (pt["cost_ratio"], pt["quality"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("cost / last tier alone")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
