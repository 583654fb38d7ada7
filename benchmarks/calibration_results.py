"""Replay every dataset/chain of the shared cascade outputs and write the calibration results table.

    python benchmarks/calibration_results.py [DATA_DIR] [--out results/calibration] [--seeds 5]

DATA_DIR defaults to ``$CASCADE_SHARED_DATA``, else ``../shared/data`` relative to the repository root (the
folder holding ``cascade_outputs/``). For every dataset and chain:

* where a test split exists (medmcqa, truthfulqa) the policy is fit on ``*_train.jsonl`` and replayed on
  ``*_test.jsonl`` ("test split");
* where only a train file exists (mmlu, gsm8k, triviaqa) the file is split by a fixed seed into disjoint
  train/test halves ("internal split, seed 0"; the mean over ``--seeds`` seeds is reported too).

Each is run for the full chain and for the two-tier chain first -> last. Next to every figure stands the
*in-sample anchor*: the best single raw-logprob threshold (first -> last tier) tuned on the test part
itself, the yardstick of issue 3. Nothing is tuned on a test part: fitting sees only the train part.

Writes ``results.json``, ``results.md`` and reliability PNGs of the first tier on each test part.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks._common import check_out, shared_data_dir  # noqa: E402
from calibration.data import load_cascade_outputs, split_data  # noqa: E402
from calibration.replay import ReplayConfig, check_inputs, replay  # noqa: E402
from cascade.errors import CascadeError, DataError  # noqa: E402

#: what to do about a ``*_test.jsonl`` that holds most of its ``*_train.jsonl`` (``cascade replay``'s hint names options
#: this script does not have)
_OVERLAP_HINT = ("the data directory's test file must hold other questions than its train file (remove it to "
                 "measure on internal splits of the train file instead)")
DATASETS = ("mmlu", "medmcqa", "triviaqa", "truthfulqa", "gsm8k")
CHAINS = ("llama", "qwen_oai")


def _holds(rep: dict, tol: float = 0.005) -> bool:
    return rep["test_quality"] >= rep["strong_quality"] - rep["max_quality_drop"] - tol - 1e-12


def _beats(rep: dict) -> str:
    """Whether the policy beat the in-sample anchor: only a policy that holds can (savings bought with quality
    beyond the allowed drop are no win); by savings captured, or by cost ratio where the oracle saves nothing
    (captured is undefined when escalating exactly when wrong costs as much as the last tier alone)."""
    a = rep["anchor_in_sample"]
    if not a["saves"]:
        return "yes (direct)" if rep["verdict"] == "direct" else "n/a (anchor saves nothing; we cascade)"
    if not _holds(rep):
        return "no (does not hold)"
    if rep["savings_captured"] is None or a["savings_captured"] is None:
        return "yes (by cost)" if rep["cost_ratio"] < a["cost_ratio"] else "no"
    return "yes" if rep["savings_captured"] > a["savings_captured"] else "no"


def _mean(values: list) -> float | None:
    """Mean of the defined values (None where a seed had none, e.g. savings captured of a useless oracle)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _row(rep: dict, kind: str, label: str) -> dict:
    a = rep["anchor_in_sample"]
    return {
        "dataset": rep["dataset"], "chain_name": rep["chain_name"], "chain": kind, "evaluation": label,
        "n_train": rep["n_train"], "n_test": rep["n_test"], "first_tier": rep["first_tier"],
        "last_tier": rep["chain"][-1], "ece_raw": rep["ece_raw"], "ece_calibrated": rep["ece_calibrated"],
        "ece_floor_mean_gap": rep["ece_floor_mean_gap"], "accuracy_first_train": rep["accuracy_first_train"],
        "accuracy_first_test": rep["accuracy_first_test"],
        "calibration_method": rep["calibration_method"], "temperature": rep["temperature"],
        "verdict": rep["verdict"], "policy_chain": rep["policy_chain"], "thresholds": rep["thresholds"],
        "test_quality": rep["test_quality"], "strong_quality": rep["strong_quality"],
        "quality_diff": rep["quality_diff"], "cost_ratio": rep["cost_ratio"],
        "oracle_cost_ratio": rep["oracle_cost_ratio"], "savings_captured": rep["savings_captured"],
        "escalation_rate": rep["escalation_rate"], "escalation_waste_ratio": rep["escalation_waste_ratio"],
        "anchor_saves": a["saves"], "anchor_cost_ratio": a["cost_ratio"],
        "anchor_savings_captured": a["savings_captured"], "anchor_quality": a["quality"],
        "holds": _holds(rep), "beats_anchor": _beats(rep),
        "expected_from_train": rep["expected_from_train"],
    }


def _f(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _short(m: str) -> str:
    return (m.replace("llama3.", "l").replace("qwen2.5-", "q").replace("-instruct", "").replace("-coder", "c")
            .replace("gpt-4o-mini", "4o-mini"))


def markdown(rows: list[dict], seed_means: list[dict], meta: dict) -> str:
    out = [
        "# Calibration and threshold selection: results",
        "",
        f"Produced by `benchmarks/calibration_results.py` on {meta['date']} "
        f"(max quality drop {meta['max_quality_drop']}, one-sided confidence {meta['confidence']}, "
        f"{meta['seconds']:.0f} s). Fit on train only; every figure is measured on the test part.",
        "",
        "* **ECE** of the first tier on the test part, 15 equal-width bins: raw `exp(raw_conf_logprob)` vs our "
        "calibrator (method chosen by held-out ECE on train folds).",
        "* **cost** = policy cost / last tier alone; **oracle** = escalate exactly when the first tier is wrong, "
        "paying both; **captured** = (1 - cost) / (1 - oracle). Above 1 is possible when the policy also uses "
        "middle tiers (cheaper than the two-tier oracle) or accepts answers within the allowed drop.",
        "* **anchor** = the best single raw-logprob threshold first -> last tier, *tuned on the test part itself* "
        "(in-sample, no margin): the yardstick to beat out of sample. `direct` = it saves nothing.",
        "* **ECE floor** = |mean calibrated confidence - accuracy| of the first tier on the test part: ECE can "
        "never be below it. It is the part of the miscalibration that comes from the first tier's accuracy "
        "moving between train and test (shown as train -> test accuracy) while its confidence does not.",
        "* **holds** = test quality >= last tier quality - allowed drop - 0.5 point.",
        "* **beats anchor** = holds and captures more than the anchor (compares cost where the oracle saves "
        "nothing and captured is undefined).",
        "",
        "| dataset | chain | evaluation | n train/test | ECE raw | ECE cal (method) | ECE floor (accuracy train -> test) "
        "| verdict | policy chain "
        "| quality (last tier) | cost | oracle | captured | anchor captured (cost) | beats anchor | holds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        anchor = f"{_f(r['anchor_savings_captured'])} ({_f(r['anchor_cost_ratio'])})" if r["anchor_saves"] \
            else "direct (1.000)"
        out.append(
            f"| {r['dataset']} | {r['chain_name']} {r['chain']} | {r['evaluation']} | {r['n_train']}/{r['n_test']} "
            f"| {_f(r['ece_raw'])} | {_f(r['ece_calibrated'])} ({r['calibration_method']}) "
            f"| {_f(r['ece_floor_mean_gap'])} ({_f(r['accuracy_first_train'])} -> {_f(r['accuracy_first_test'])}) "
            f"| {r['verdict']} "
            f"| {' > '.join(_short(m) for m in r['policy_chain'])} "
            f"| {_f(r['test_quality'])} ({_f(r['strong_quality'])}) | {_f(r['cost_ratio'])} "
            f"| {_f(r['oracle_cost_ratio'])} | {_f(r['savings_captured'])} | {anchor} | {r['beats_anchor']} "
            f"| {_f(r['holds'])} |")
    if seed_means:
        out += [
            "",
            f"## Internal splits: mean over seeds 0..{meta['seeds'] - 1}",
            "",
            "Train-only datasets, split 50/50 by each seed (train part ~150 questions, so thresholds are "
            "chosen on half the data the test-split rows have).",
            "",
            "| dataset | chain | ECE raw | ECE cal | ECE floor | cost | captured | anchor captured | beats anchor "
            "| holds | verdicts (cascade/direct) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in seed_means:
            out.append(
                f"| {r['dataset']} | {r['chain_name']} {r['chain']} | {_f(r['ece_raw'])} | {_f(r['ece_calibrated'])} "
                f"| {_f(r['ece_floor_mean_gap'])} "
                f"| {_f(r['cost_ratio'])} | {_f(r['savings_captured'])} | {_f(r['anchor_savings_captured'])} "
                f"| {r['beats_anchor']} | {r['holds']} | {r['verdicts']} |")
    out += ["", "Reliability diagrams (first tier, test part): `reliability_<dataset>_<chain>.png`.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", nargs="?", default=None,
                    help="folder holding cascade_outputs/ (default $CASCADE_SHARED_DATA, else ../shared/data "
                         "from the repo root)")
    ap.add_argument("--out", default=str(REPO / "results" / "calibration"))
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the internal splits for the mean table")
    ap.add_argument("--max-quality-drop", type=float, default=0.005)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be at least 1 (the train-only datasets are measured on internal splits)")
    check_out(ap, args.out, directory=True)  # before the replays, not after them

    src = shared_data_dir(args.data_dir)
    outputs = src / "cascade_outputs" if (src / "cascade_outputs").is_dir() else src
    if not outputs.is_dir():
        print(f"calibration_results: data folder not found: {outputs}", file=sys.stderr)
        return 2
    try:
        cfg = ReplayConfig(max_quality_drop=args.max_quality_drop, confidence=args.confidence)
        return _run(args, outputs, cfg)
    except CascadeError as exc:  # a malformed file, a bad setting: one line, and the results there are kept
        print(f"calibration_results: error: {exc.message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, outputs: Path, cfg: ReplayConfig) -> int:
    out_dir = Path(args.out)
    warnings.filterwarnings("ignore", category=RuntimeWarning)

    try:
        from rich.progress import Progress
    except ImportError:  # pragma: no cover
        Progress = None  # type: ignore

    jobs = []
    for ds in DATASETS:
        for ch in CHAINS:
            train_p, test_p = outputs / f"{ds}_{ch}_train.jsonl", outputs / f"{ds}_{ch}_test.jsonl"
            if not train_p.exists():
                continue
            jobs.append((ds, ch, train_p, test_p if test_p.exists() else None))
    if not jobs:  # a wrong folder: said, and no empty table written over the real one
        names = ", ".join(f"{d}_{c}_train.jsonl" for d in DATASETS[:1] for c in CHAINS)
        raise DataError(f"no <dataset>_<chain>_train.jsonl files (e.g. {names}) in {outputs}")
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    rows: list[dict] = []
    notes: list[str] = []  # warnings: a few questions of a test file also in its train file
    per_seed: dict[tuple, list[dict]] = {}
    total = sum((1 if t else args.seeds) * 2 for _, _, _, t in jobs)
    prog = Progress(transient=True) if Progress else None
    task = prog.add_task("replaying", total=total) if prog else None
    if prog:
        prog.start()
    try:
        for ds, ch, train_p, test_p in jobs:
            full = load_cascade_outputs(train_p)
            if len(full.models) < 2:
                raise DataError(f"{train_p}: one model ({full.models[0]}): a cascade needs at least two")
            chains = {"full": list(full.models), "2-tier": [full.models[0], full.models[-1]]}
            if test_p is not None:
                splits = [("test split", full, load_cascade_outputs(test_p), None)]
            else:
                splits = []
                for seed in range(args.seeds):
                    tr, te = split_data(full, 0.5, seed)
                    splits.append((f"internal split, seed {seed}", tr, te, seed))
            for label, tr, te, seed in splits:
                for kind, chain in chains.items():
                    # what `cascade replay` refuses (a TEST file that holds TRAIN's questions, a free last tier)
                    for w in check_inputs(tr, te, chain, split=seed is not None, hint=_OVERLAP_HINT):
                        if w not in notes:
                            notes.append(w)
                    rep, policy = replay(tr, te, chain, cfg)
                    row = _row(rep, kind, label)
                    if seed in (None, 0):
                        rows.append(row)
                        if kind == "full" and not args.no_plots:
                            from calibration.plots import reliability_diagram

                            first = te.tier(chain[0])
                            reliability_diagram(
                                out_dir / f"reliability_{ds}_{ch}.png",
                                {"raw": (np.exp(first.logprob), first.correct),
                                 rep["calibration_method"]: (policy.report_calibrator.predict(first.logprob),
                                                             first.correct)},
                                title=f"{chain[0]}, {ds} ({label}, n={len(te)})")
                    if seed is not None:
                        per_seed.setdefault((ds, ch, kind), []).append(row)
                    if prog:
                        prog.update(task, advance=1, description=f"{ds}/{ch} {kind} {label}")
    finally:
        if prog:
            prog.stop()

    seed_means = []
    for (ds, ch, kind), rs in per_seed.items():
        n = len(rs)
        beats = sum(r["beats_anchor"].startswith("yes") for r in rs)
        seed_means.append({
            "dataset": ds, "chain_name": ch, "chain": kind, "seeds": n,
            **{k: _mean([r[k] for r in rs]) for k in
               ("ece_raw", "ece_calibrated", "ece_floor_mean_gap", "cost_ratio", "savings_captured", "anchor_savings_captured",
                "quality_diff")},
            "beats_anchor": f"{beats}/{n}", "holds": f"{sum(r['holds'] for r in rs)}/{n}",
            "verdicts": f"{sum(r['verdict'] == 'cascade' for r in rs)}/{sum(r['verdict'] == 'direct' for r in rs)}",
        })
    seconds = time.time() - t0
    from benchmarks._common import machine_facts, write_json

    meta = {"date": time.strftime("%Y-%m-%d"), "data_dir": str(outputs), "max_quality_drop": args.max_quality_drop,
            "confidence": args.confidence, "seeds": args.seeds, "seconds": round(seconds, 1),
            "machine": machine_facts(), "warnings": notes}
    write_json(out_dir / "results.json", {"meta": meta, "rows": rows, "internal_split_means": seed_means})
    md = out_dir / "results.md"
    tmp = md.with_suffix(".md.tmp")  # whole or not at all, as write_json
    tmp.write_text(markdown(rows, seed_means, meta))
    tmp.replace(md)
    print(markdown(rows, seed_means, meta))
    for w in notes:
        print(f"calibration_results: warning: {w}", file=sys.stderr)
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'results.md'} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
