"""Reliability diagrams with confidence histograms, written as PNG with matplotlib's Agg backend.

matplotlib is imported inside the function (it is an optional extra), never at module import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration import metrics
from cascade.errors import ConfigError


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display). matplotlib is an optional extra:
    without it, a ConfigError that names the extra, which the CLIs print as one line."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is an optional extra
        raise ConfigError("plots need matplotlib (pip install 'cascade-engine[calibration]')") from exc
    return plt


def plot_formats() -> list[str]:
    """The file suffixes matplotlib writes (png, pdf, svg, ...), without the dot."""
    pyplot()  # the extra's message when matplotlib is missing
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def check_plot_path(path: str | Path, flag: str = "--plot") -> Path:
    """A plot's output path, checked before any work: a file name (not a directory) with a suffix matplotlib
    writes, whose directory can be written. ConfigError (one line naming ``flag``) otherwise."""
    from cascade.cli import check_output_file

    text = str(path)
    p = Path(text).expanduser()
    if text.strip() and p.is_dir():
        raise ConfigError(f"{flag} {text}: is a directory (give a file name such as {p / 'plot.png'})")
    formats = plot_formats()
    suffix = p.suffix.lower().lstrip(".")
    if text.strip() and suffix not in formats:
        said = f"unsupported image format .{suffix}" if suffix else "the file name has no image suffix"
        raise ConfigError(f"{flag} {text}: {said}; supported: {', '.join('.' + f for f in formats)}")
    return check_output_file(text, flag)


def reliability_diagram(path: str | Path, curves: Mapping[str, tuple[Any, Any]], title: str = "",
                        n_bins: int = metrics.N_BINS) -> Path:
    """Write a reliability diagram (top) and confidence histogram (bottom) for one or more curves.

    ``curves`` maps a label (e.g. "raw", "calibrated") to (confidences, correct). Returns the path.
    """
    plt = pyplot()
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
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
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def cost_quality_plot(path: str | Path, points: Sequence[dict[str, Any]], title: str = "") -> Path:
    """A small scatter of (cost ratio, quality) operating points, each a dict with label/cost_ratio/quality."""
    plt = pyplot()
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
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
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
