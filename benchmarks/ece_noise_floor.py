"""How low can a 15-bin ECE measured on a finite test split be? A simulation on the shared TRAIN files.

    python benchmarks/ece_noise_floor.py [DATA_DIR] [--out results/calibration] [--reps 100] [--n-train 1000,3000]

Issue 3 asks for a calibrated ECE <= 0.02 on test. ECE measured on n questions is itself a noisy
estimate: even a confidence that is *perfectly* calibrated (it is the true probability of being right)
scores an ECE above zero, because every bin's accuracy is a binomial draw. This script measures that
floor, and what the calibrators reach when fit on a train file of the shared data's size, with nothing
from any test file:

1. For each ``*_train.jsonl`` of ``cascade_outputs/`` and its first-tier model, a smooth "true" curve
   P(correct | raw confidence) is fit on the whole train file (Platt's logistic curve in the logit of
   the confidence; ``--truth quadratic`` adds a squared term).
2. ``--reps`` times: draw a train sample (the file's size) and a test sample of each ``--n-test`` size,
   with raw confidences resampled from the file and correctness drawn from the true curve; fit each
   calibrator on the train sample (and the one ``cascade replay`` reports, chosen by held-out ECE on
   train folds); measure the 15-bin ECE on the test sample.
3. ``--n-train`` repeats step 2 with larger train samples: how many train questions the target would need.
4. ``oracle`` is the true curve itself, measured the same way: the floor no calibrator can beat on
   average. ``constant`` predicts the train accuracy for every question (calibrated in the large, but
   useless for a cascade: it cannot rank answers).

There is no shift between train and test here (both are drawn from the same curve), so these are
lower bounds for real splits, where the first tier's accuracy also moves (``replay --json`` reports
that gap as ``ece_floor_mean_gap``). Writes ``ece_noise_floor.json``, ``ece_noise_floor.md`` and
``ece_noise_floor.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks._common import (check_out, int_at_least, machine_facts, progress_bar, shared_data_dir,  # noqa: E402
                                write_json, write_text)
from calibration import metrics  # noqa: E402
from calibration.calibrators import _newton_logistic, make_calibrator, score_to_logit, sigmoid  # noqa: E402
from calibration.data import load_cascade_outputs  # noqa: E402
from calibration.replay import ReplayConfig  # noqa: E402
from calibration.selection import select_calibrator  # noqa: E402
from cascade.errors import DataError  # noqa: E402

TARGET = 0.02
N_TEST = (300, 517, 1000, 2000, 5000)
N_TRAIN_SWEEP = (1000, 3000)
FITTED = ("temperature", "platt", "isotonic", "histogram:5", "histogram:10")
SELECTED = "selected"  # the calibrator `cascade replay` reports: held-out ECE on train folds
FIELDS = ("oracle", *FITTED, SELECTED, "constant")


def true_curve(score: np.ndarray, correct: np.ndarray, kind: str = "platt"):
    """A smooth P(correct | score) fit on all of ``score``/``correct`` (logistic in the logit, or its square too)."""
    z = score_to_logit(score)
    mu, sd = float(z.mean()), float(z.std()) or 1.0

    def design(s: np.ndarray) -> np.ndarray:
        zc = (score_to_logit(s) - mu) / sd
        cols = [zc, np.ones_like(zc)] if kind == "platt" else [zc, zc ** 2, np.ones_like(zc)]
        return np.column_stack(cols)

    w = _newton_logistic(design(score), correct, l2=1e-2)
    return lambda s: sigmoid(design(np.asarray(s, dtype=np.float64)) @ w)


def simulate(score: np.ndarray, correct: np.ndarray, reps: int, n_test: tuple[int, ...], kind: str,
             seed: int, n_train: int | None = None, advance=lambda: None) -> dict[str, dict[int, list[float]]]:
    """ECE per field and test size over ``reps`` draws (see the module docstring); the train sample has
    ``n_train`` questions (default: as many as the file)."""
    truth = true_curve(score, correct, kind)
    cfg = ReplayConfig()
    rng = np.random.default_rng(seed)
    n_train, n_max = n_train or score.size, max(n_test)
    out: dict[str, dict[int, list[float]]] = {f: {n: [] for n in n_test} for f in FIELDS}
    for _ in range(reps):
        s_tr = rng.choice(score, n_train)
        y_tr = (rng.random(n_train) < truth(s_tr)).astype(float)
        s_te = rng.choice(score, n_max)
        p_true = truth(s_te)
        y_te = (rng.random(n_max) < p_true).astype(float)
        preds = {"oracle": p_true, "constant": np.full(n_max, y_tr.mean())}
        for m in FITTED:
            preds[m] = make_calibrator(m, "raw_conf_logprob").fit(s_tr, y_tr).predict(s_te)
        sel = select_calibrator(s_tr, y_tr, cfg.report_methods, cfg.report_criterion, cfg.folds, cfg.seed,
                                feature="raw_conf_logprob", repeats=3)
        preds[SELECTED] = sel.calibrator.predict(s_te)
        for n in n_test:  # the first n of an iid sample are an iid sample of size n
            for f, p in preds.items():
                out[f][n].append(metrics.ece(p[:n], y_te[:n]))
        advance()
    return out


def _stats(ece: dict[str, dict[int, list[float]]]) -> dict[str, dict[str, dict[str, float]]]:
    return {f: {str(n): {"mean": float(np.mean(v)), "p10": float(np.percentile(v, 10)),
                         "p90": float(np.percentile(v, 90)),
                         "share_within_target": float(np.mean(np.asarray(v) <= TARGET))}
                for n, v in by_n.items()} for f, by_n in ece.items()}


def _mean_over_files(rows: list[dict], fields: tuple[str, ...], n_test: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """field -> n_test (as text) -> the mean over ``rows`` (one per file) of their mean ECE."""
    return {f: {str(n): float(np.mean([r["ece"][f][str(n)]["mean"] for r in rows])) for n in n_test} for f in fields}


def _sweep_means(sweep_rows: list[dict], n_test: tuple[int, ...]) -> dict[str, dict[str, dict[str, float]]]:
    """n_train -> field -> n_test -> mean ECE over the files."""
    return {str(n_train): _mean_over_files([r for r in sweep_rows if r["n_train"] == n_train], (SELECTED, "platt"),
                                           n_test)
            for n_train in sorted({r["n_train"] for r in sweep_rows})}


def _sweep_markdown(sweep: dict, n_test: tuple[int, ...]) -> str:
    if not sweep:
        return ""
    lines = ["", "With more train questions (mean over the files; the reported calibrator, then Platt):", "",
             "| train questions | " + " | ".join(f"n test={n}" for n in n_test) + " |",
             "|---|" + "---|" * len(n_test)]
    for n_train, by_field in sweep.items():
        lines.append(f"| {n_train} | " + " | ".join(
            f"{by_field[SELECTED][str(n)]:.3f} / {by_field['platt'][str(n)]:.3f}" for n in n_test) + " |")
    return "\n".join(lines) + "\n"


def _markdown(rows: list[dict], mean: dict[str, dict[str, float]], n_test: tuple[int, ...], reps: int,
              kind: str) -> str:
    lines = [f"# 15-bin ECE on a finite test split: the noise floor ({reps} draws per file, truth: {kind})", "",
             "Mean ECE of the *perfectly calibrated* confidence (oracle) and of calibrators fit on a train "
             "sample of the file's size, by test size; in brackets the share of draws at or under the 0.02 "
             "target. No train/test shift is simulated: real splits can only be worse.", ""]
    ref = 1000 if 1000 in n_test else max(n_test)
    head = "| train file | first tier | n train | " + " | ".join(f"oracle n={n}" for n in n_test) + \
        " | " + " | ".join(f"{f} n={ref}" for f in FIELDS[1:]) + " |"
    lines += [head, "|" + "---|" * (3 + len(n_test) + len(FIELDS) - 1)]
    for r in rows:
        o = r["ece"]["oracle"]
        cells = [f"{o[str(n)]['mean']:.3f} ({o[str(n)]['share_within_target']:.0%})" for n in n_test]
        fitted = [f"{r['ece'][f][str(ref)]['mean']:.3f} ({r['ece'][f][str(ref)]['share_within_target']:.0%})"
                  for f in FIELDS[1:]]
        lines.append(f"| {r['file']} | {r['first_tier']} | {r['n_train']} | " + " | ".join(cells + fitted) + " |")
    lines.append("| **mean** | | | " + " | ".join(f"{mean['oracle'][str(n)]:.3f}" for n in n_test) + " | "
                 + " | ".join(f"{mean[f][str(ref)]:.3f}" for f in FIELDS[1:]) + " |")
    return "\n".join(lines) + "\n"


def _plot(path: Path, rows: list[dict], mean: dict[str, dict[str, float]], n_test: tuple[int, ...]) -> None:
    from calibration.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in rows:
        ax.plot(n_test, [r["ece"]["oracle"][str(n)]["mean"] for n in n_test], color="0.6", lw=0.8)
    for f, style in (("oracle", "k-"), (SELECTED, "C1--"), ("platt", "C0:")):
        ax.plot(n_test, [mean[f][str(n)] for n in n_test], style, lw=2, label=f"{f} (mean of {len(rows)} files)")
    ax.axhline(TARGET, color="C3", lw=1, label=f"target {TARGET}")
    ax.set_xscale("log")
    ax.set_xlabel("test questions")
    ax.set_ylabel("15-bin ECE measured on test")
    ax.set_title("ECE of a perfectly calibrated confidence (grey: each train file) vs fitted calibrators")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="?", help="folder holding cascade_outputs/ (default $CASCADE_SHARED_DATA, "
                    "else ../shared/data beside the repository)")
    ap.add_argument("--out", default=str(REPO / "results" / "calibration"))
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--n-test", default=",".join(map(str, N_TEST)), help="comma-separated test sizes")
    ap.add_argument("--truth", choices=("platt", "quadratic"), default="platt")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--files", default="", help="comma-separated train file names (default: every *_train.jsonl)")
    ap.add_argument("--n-train", default=",".join(map(str, N_TRAIN_SWEEP)),
                    help="comma-separated larger train sizes for the sweep (what the target would need); '' for none")
    args = ap.parse_args(argv)
    try:
        n_test = tuple(sorted({int(x) for x in args.n_test.split(",") if x.strip()}))
        sweep = tuple(sorted({int(x) for x in args.n_train.split(",") if x.strip()}))
    except ValueError:
        ap.error(f"--n-test and --n-train must be comma-separated integers, got {args.n_test!r}, {args.n_train!r}")
    if not n_test or min(n_test + sweep) < 10 or args.reps < 1:
        ap.error("--n-test and --n-train sizes must be at least 10, --reps at least 1")
    check_out(ap, args.out, directory=True)  # before the simulation, not after it
    folder = shared_data_dir(args.data) / "cascade_outputs"
    if not folder.is_dir():
        print(f"ece_noise_floor: error: {folder}: no such directory", file=sys.stderr)
        return 2
    paths = sorted(folder.glob("*_train.jsonl"))
    if args.files:
        wanted = {f.strip() for f in args.files.split(",") if f.strip()}
        missing = sorted(wanted - {p.name for p in paths})
        if missing:
            print(f"ece_noise_floor: error: --files: {', '.join(missing)}: no such *_train.jsonl file in {folder}",
                  file=sys.stderr)
            return 2
        paths = [p for p in paths if p.name in wanted]
    if not paths:
        print(f"ece_noise_floor: error: no *_train.jsonl files in {folder}", file=sys.stderr)
        return 2
    loaded = []
    for p in paths:  # all of them before any simulation: a malformed file fails at once
        try:
            loaded.append((p, load_cascade_outputs(p)))
        except DataError as exc:  # one line naming the file and line (the loader's message does)
            print(f"ece_noise_floor: error: {exc}", file=sys.stderr)
            return 2
    out = Path(args.out)
    t0 = time.perf_counter()
    rows, sweep_rows = [], []
    with progress_bar("simulating", len(paths) * args.reps * (1 + len(sweep))) as advance:
        for i, (p, data) in enumerate(loaded):
            first = data.tier(data.models[0])
            ok = np.isfinite(first.logprob)
            score, correct = first.logprob[ok], first.correct[ok]
            ece = simulate(score, correct, args.reps, n_test, args.truth, args.seed + i, advance=advance)
            rows.append({"file": p.name, "first_tier": first.name, "n_train": int(score.size),
                         "accuracy_train": float(correct.mean()), "ece": _stats(ece)})
            for n_train in sweep:
                ece = simulate(score, correct, args.reps, n_test, args.truth, args.seed + i, n_train, advance)
                sweep_rows.append({"file": p.name, "n_train": n_train, "ece": _stats(ece)})
    summary = _mean_over_files(rows, FIELDS, n_test)
    report = {"benchmark": "ece_noise_floor", "target": TARGET, "reps": args.reps, "truth": args.truth,
              "n_test": list(n_test), "bins": metrics.N_BINS, "seconds": round(time.perf_counter() - t0, 1),
              "mean_over_files": summary, "files": rows, "train_size_sweep": _sweep_means(sweep_rows, n_test),
              "train_size_sweep_files": sweep_rows, "machine": machine_facts()}
    write_json(out / "ece_noise_floor.json", report)
    text = _markdown(rows, summary, n_test, args.reps, args.truth) + _sweep_markdown(report["train_size_sweep"], n_test)
    write_text(out / "ece_noise_floor.md", text)
    _plot(out / "ece_noise_floor.png", rows, summary, n_test)
    print(text)
    print(f"wrote {out}/ece_noise_floor.{{json,md,png}} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
