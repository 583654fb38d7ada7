"""`cascade calibrate` and `cascade replay`: offline calibration runs on per-question cascade outputs.

    cascade calibrate --data FILE.jsonl --model NAME [--method temperature|platt|isotonic|histogram]
                      --out ARTIFACT.json [--plot PNG]
    cascade replay --train TRAIN.jsonl --test TEST.jsonl --chain M1,M2[,M3...]
                   [--max-quality-drop 0.005] [--json]

Plugged into ``cascade.cli`` through ``add_cli(subparsers)``. Errors are ``CascadeError``s (DataError for
data, ConfigError for options), which the top-level CLI prints as one line with exit status 2; this
module's own ``main`` does the same when used alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from calibration.features import RAW_SCORE, SCORES, score_source
from calibration.output import check_output_dir, check_output_path, dumps, write_text
from cascade.cli import non_negative_int
from cascade.errors import ConfigError, DataError
from cascade.paths import expand_path

CALIBRATE_METHODS = ("temperature", "platt", "isotonic", "histogram", "auto")
DEFAULT_MAX_QUALITY_DROP = 0.005
#: the most ECE bins of ``cascade calibrate --bins``: far more than any data file fills
MAX_BINS = 1000


# --- progress --------------------------------------------------------------------------------------


@contextmanager
def _progress(enabled: bool = True):
    """A rich progress bar on stderr (only on a terminal); yields a callback (what, done, total)."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # pragma: no cover - rich is a core dependency
        yield lambda what, done, total: None
        return
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda what, done, total: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        task = prog.add_task("starting", total=1)

        def update(what: str, done: int, total: int) -> None:
            prog.update(task, description=what, completed=done, total=total)

        yield update


def _num(x: Any, nd: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _print_table(title: str, rows: Sequence[tuple[str, Any, Any]], headers: tuple[str, str, str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        for r in rows:
            print("  ", *r)
        return
    t = Table(title=title)
    for h in headers:
        t.add_column(h)
    for r in rows:
        t.add_row(*[_num(v) for v in r])
    Console().print(t)


# --- calibrate -------------------------------------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from calibration import metrics
    from calibration.calibrators import make_calibrator, save_calibrator
    from calibration.data import check_both_outcomes, load_cascade_outputs
    from calibration.selection import cross_val_predict, select_calibrator

    if args.method not in CALIBRATE_METHODS:
        raise ConfigError(f"unknown --method {args.method!r}; known: {', '.join(CALIBRATE_METHODS)}")
    if not 2 <= args.bins <= MAX_BINS:  # (each bin is arrays and a bar of the plot: 10**10 of them were a MemoryError)
        raise ConfigError(f"--bins must be from 2 to {MAX_BINS}, got {args.bins}")
    if args.folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {args.folds}")
    if args.use_netcal and args.method != "temperature":
        raise ConfigError(f"--use-netcal fits temperature scaling: it needs --method temperature, not {args.method}")
    if args.use_netcal:
        from calibration.calibrators import NETCAL_MISSING
        from cascade.backends import missing_modules

        if missing_modules("netcal"):
            raise ConfigError(f"--use-netcal needs netcal, {NETCAL_MISSING}; without --use-netcal the same "
                              "one-parameter fit runs on numpy")
    if args.criterion is not None and args.method != "auto":
        raise ConfigError(f"--criterion chooses the method of --method auto; with --method {args.method} it would "
                          "do nothing")
    # the outputs, checked before the work (and never the data file itself)
    out_path = check_output_path(args.out, "--out")
    if _same_file(args.out, args.data):
        raise ConfigError(f"--out {args.out} is the --data file: it would be overwritten; write the artifact "
                          "elsewhere")
    if args.plot is not None:  # "" is refused, not ignored
        from calibration.plots import check_plot_path

        check_plot_path(args.plot)
        if _same_file(args.plot, args.data) or _same_file(args.plot, args.out):
            raise ConfigError(f"--plot {args.plot} is the --data or --out file")
    with _progress(True) as progress:  # on stderr: --json output on stdout stays one JSON object
        progress("loading data", 0, 3)
        feature = args.feature
        data = load_cascade_outputs(args.data).with_score(feature, [args.model.strip()])
        tier = data.tier(args.model.strip())
        lp, y = tier.logprob, tier.correct
        if len(y) < 2:
            raise DataError(f"{data.path}: {len(y)} question(s); calibration needs at least 2")
        check_both_outcomes(y, tier.name, str(data.path))
        if not np.isfinite(lp).any():  # every answer unscored: a fit would learn the base rate, ranking nothing
            raise DataError(f"{data.path}: model {tier.name!r} has no {feature} on any of its {len(y)} questions "
                            "(null, NaN or -inf on every line): nothing to calibrate")
        if args.folds > len(y) and (args.method == "auto" or len(y) >= 10):  # (held-out scores need 10)
            raise ConfigError(f"--folds {args.folds} is more than the {len(y)} questions of {data.path}")
        progress("fitting", 1, 3)
        selection = None
        try:
            if args.method == "auto":
                selection = select_calibrator(lp, y, criterion=args.criterion or "nll", k=args.folds,
                                              seed=args.seed, feature=feature)
                cal = selection.calibrator
            elif args.method == "temperature" and args.use_netcal:
                cal = make_calibrator("temperature", feature).fit(lp, y, use_netcal=True)
            else:
                cal = make_calibrator(args.method, feature).fit(lp, y)
        except ValueError as exc:
            raise DataError(f"{data.path}: cannot fit {args.method} calibration for {tier.name}: {exc}") from exc
        progress("scoring", 2, 3)
        raw_p = np.exp(lp)
        cal_p = cal.predict(lp)
        raw = metrics.summary(raw_p, y, args.bins)
        fitted = metrics.summary(cal_p, y, args.bins)
        heldout = None
        if len(y) >= 10 and 0 < y.mean() < 1:
            oof = cross_val_predict(cal.method, lp, y, k=args.folds, seed=args.seed, feature=feature)
            heldout = metrics.summary(oof, y, args.bins)
        cal.fitted_on = {
            "data": str(Path(data.path).resolve()), "model": tier.name, "n": int(len(y)),
            "dataset": data.dataset, "chain": data.chain, "split": data.split,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "feature_source": score_source(feature),
        }
        cal.metrics = {"raw": raw, "calibrated_in_sample": fitted}
        if heldout is not None:
            cal.metrics["calibrated_heldout_cv"] = heldout
        if selection is not None:
            cal.metrics["selection"] = selection.to_dict()
        plot = None
        if args.plot:  # drawn first: a plot that fails leaves no artifact behind
            from calibration.plots import reliability_diagram

            plot = reliability_diagram(args.plot, {"raw": (raw_p, y), f"{cal.method}": (cal_p, y)},
                                       title=f"{tier.name} on {data.label} (n={len(y)})", n_bins=args.bins)
        try:
            out = save_calibrator(cal, out_path)
        except OSError as exc:
            raise ConfigError(f"--out {args.out}: cannot write: {exc.strerror or exc}") from None
        progress("done", 3, 3)
    report = {"data": data.path, "model": tier.name, "n": int(len(y)), "feature": feature, "method": cal.method,
              "params": cal.params(), "raw": raw, "calibrated": fitted, "calibrated_heldout_cv": heldout,
              "artifact": str(out), "plot": str(plot) if plot else None,
              "warnings": data.confidence_warnings([tier.name]) + cal.fit_warnings()}
    if selection is not None:
        report["selection"] = selection.to_dict()
    for warning in report["warnings"]:
        print(f"cascade: warning: {warning}", file=sys.stderr)
    if args.json:
        print(dumps(report, indent=2))
        return 0
    rows = [(k, raw[k], fitted[k]) for k in ("ece", "ece_equal_mass", "mce", "brier", "nll", "auroc")]
    if heldout is not None:
        rows.append(("ece (held-out CV)", raw["ece"], heldout["ece"]))
    brief = {"temperature": lambda c: f"T={c.temperature:.3f}", "platt": lambda c: f"a={c.a:.3f} b={c.b:.3f}"}
    desc = brief.get(cal.method, lambda c: "")(cal)
    _print_table(f"{tier.name} on {data.label}: {cal.method} {desc}", rows, ("metric", "raw", "calibrated"))
    print(f"artifact: {out}")
    if plot:
        print(f"plot: {plot}")
    return 0


# --- replay ----------------------------------------------------------------------------------------


def _same_file(a: str, b: str) -> bool:
    try:
        return expand_path(a, "path").resolve() == expand_path(b, "path").resolve()
    except (OSError, ConfigError):  # a path that cannot be expanded is refused where it is read or written
        return a == b


def _chain_order_warnings(train: Any, chain: Sequence[str]) -> list[str]:
    """A warning when the chain does not run from cheap to expensive on TRAIN: every ratio of the report is
    against the last tier's cost, and savings against a last tier that is the cheapest mean nothing. (Middle
    tiers are not held to an order: neighbours at one price differ by a few tokens, and the policy may skip
    any of them.)"""
    first, last = float(train.tier(chain[0]).cost.mean()), float(train.tier(chain[-1]).cost.mean())
    if last > first:
        return []
    return [f"the last tier {chain[-1]!r} costs no more than the first {chain[0]!r} on TRAIN (mean ${last:.3g} "
            f"against ${first:.3g} a question): savings_captured is undefined and the cost ratios compare against "
            "the cheaper model; give --chain from the cheapest model to the strongest"]


def cmd_replay(args: argparse.Namespace) -> int:
    import numpy as np

    from calibration.data import load_cascade_outputs, split_data
    from calibration.replay import ReplayConfig, check_inputs, replay

    chain = [c.strip() for c in (args.chain or "").split(",") if c.strip()]
    if len(chain) < 2:
        raise ConfigError(f"--chain needs at least two models, cheapest first (M1,M2[,M3...]), got {args.chain!r}: "
                          "a cascade escalates from one to the next")
    if len(set(chain)) != len(chain):
        raise ConfigError(f"--chain names a model twice: {','.join(chain)}")
    if args.max_quality_drop is not None and not (0 <= args.max_quality_drop <= 1):
        raise ConfigError(f"--max-quality-drop must be in [0, 1] (a fraction: 0.005 = half a point), "
                          f"got {args.max_quality_drop}")
    drop_given = args.max_quality_drop is not None
    if args.max_quality_drop is None:
        args.max_quality_drop = DEFAULT_MAX_QUALITY_DROP
    cfg = ReplayConfig(max_quality_drop=args.max_quality_drop, confidence=args.confidence, method=args.method,
                       features=not args.no_features, subchains=not args.no_subchains, seed=args.seed,
                       cv_guard=not args.no_guard,
                       objective="budget" if args.cost_budget is not None else "quality",
                       cost_budget=args.cost_budget)
    cfg.validate()
    exporting = args.export_policy is not None  # an empty DIR is refused, not taken for "no export"
    if exporting and not args.no_features:
        from calibration.export import NEEDS_OWN_CONFIDENCE

        raise ConfigError(NEEDS_OWN_CONFIDENCE)
    if args.policy_name is not None and not exporting:
        raise ConfigError("--policy-name names the policy that --export-policy writes; give --export-policy DIR too")
    if exporting:
        from calibration.export import check_policy_name

        args.policy_name = check_policy_name("replayed" if args.policy_name is None else args.policy_name, chain)
    # the outputs, checked before the work (an option given as "" is refused, not ignored)
    if args.out is not None:
        check_output_path(args.out, "--out")
    if args.plot is not None:
        from calibration.plots import check_plot_path

        check_plot_path(args.plot)
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path and any(_same_file(path, f) for f in (args.train, args.test)):
            raise ConfigError(f"{flag} {path} is the --train or --test file: it would be overwritten")
    if args.out and args.plot and _same_file(args.out, args.plot):
        raise ConfigError(f"--plot {args.plot} is the --out file: the report would overwrite the plot")
    if exporting:
        check_output_dir(args.export_policy, "--export-policy")
    if args.test_fraction is not None and not _same_file(args.train, args.test):
        raise ConfigError("--test-fraction splits one file into train and test parts: give that file as both --train "
                          "and --test (or leave --test-fraction out to fit on --train and measure on --test)")
    with _progress(True) as progress:
        progress("loading data", 0, 1)
        train = load_cascade_outputs(args.train).with_score(args.feature, chain)
        split_info = None
        data_warnings = train.confidence_warnings(chain)
        if _same_file(args.train, args.test):
            frac = 0.5 if args.test_fraction is None else args.test_fraction
            source = train
            train, test = split_data(source, frac, args.split_seed)
            split_info = {"source": source.path, "test_fraction": frac, "seed": args.split_seed,
                          "note": "train and test are disjoint parts of one file, split by a fixed seed"}
        else:
            test = load_cascade_outputs(args.test).with_score(args.feature, chain)
            data_warnings += test.confidence_warnings(chain)
        for d, what in ((train, "training"), (test, "test")):
            if len(d) == 0:
                raise DataError(f"{d.path}: the {what} split is empty")
        chain = train.check_models(chain)
        test.check_models(chain)
        overlap = check_inputs(train, test, chain, split=split_info is not None)
        warnings = overlap + _chain_order_warnings(train, chain) + data_warnings
        try:
            report, policy = replay(train, test, chain, cfg, progress)
        except ValueError as exc:
            raise DataError(f"replay failed on {args.train}: {exc}") from exc
    if split_info:
        report["split"] = split_info
    report["cost_budget"] = args.cost_budget
    report["score_feature"] = args.feature
    report["warnings"] = warnings
    # the writes, the plot first: a plot that fails leaves no exported policy and no report behind
    if args.plot:
        from calibration.plots import reliability_diagram

        first = test.tier(chain[0])
        cal = policy.report_calibrator
        reliability_diagram(args.plot, {"raw": (np.exp(first.logprob), first.correct),
                                        report["calibration_method"]: (cal.predict(first.logprob), first.correct)},
                            title=f"{chain[0]} on {test.label} (test, n={len(test)})")
        report["plot"] = str(args.plot)
    if exporting:
        from calibration.export import export_policy

        report["exported"] = export_policy(policy, args.export_policy, name=args.policy_name,
                                           feature=args.feature, train_path=train.path, n_train=len(train))
    if args.out:
        write_text(args.out, dumps(report, indent=2) + "\n", "--out")
    # notes and warnings once everything is written: a run that fails says one line, its error
    if args.cost_budget is not None and drop_given:
        print("cascade: note: with --cost-budget the policy maximises quality under the budget; "
              "--max-quality-drop only tunes the anchor column (the single threshold tuned on TEST)", file=sys.stderr)
    for w in warnings:
        print(f"cascade: warning: {w}", file=sys.stderr)
    if args.json:
        print(dumps(report))
        return 0
    rows = [
        ("ECE first tier (test)", report["ece_raw"], report["ece_calibrated"]),
        ("calibration method", "raw", report["calibration_method"]),
        ("temperature", "", report["temperature"]),
    ]
    _print_table(f"calibration of {chain[0]}", rows, ("", "raw", "calibrated"))
    a = report["anchor_in_sample"]
    rows2 = [
        ("verdict", report["verdict"], "direct" if not a["saves"] else "cascade"),
        ("policy chain", " -> ".join(report["policy_chain"]), f"{chain[0]} -> {chain[-1]}"),
        ("test quality", report["test_quality"], a["quality"]),
        ("last tier quality", report["strong_quality"], report["strong_quality"]),
        ("cost ratio", report["cost_ratio"], a["cost_ratio"]),
        ("oracle cost ratio", report["oracle_cost_ratio"], report["oracle_cost_ratio"]),
        ("savings captured", report["savings_captured"], a["savings_captured"]),
        ("escalation rate", report["escalation_rate"], None),
        ("escalation waste ratio", report["escalation_waste_ratio"], None),
    ]
    _print_table(f"replay of {test.label} (fit on {train.label}, n={len(train)})", rows2,
                 ("", "policy (fit on train)", "anchor (tuned on test)"))
    thr = ", ".join(f"{m}: {'-' if t is None else f'{t:.3f}'}" for m, t in report["thresholds_by_model"].items())
    print(f"thresholds: {thr}")
    if report["verdict"] == "direct":
        print(f"direct: {report['reason']}")
    if "exported" in report:
        print(f"policy {report['exported']['name']!r} written to {report['exported']['policy']}")
    return 0


# --- wiring ----------------------------------------------------------------------------------------


def add_cli(subparsers: Any) -> None:
    """Add ``calibrate`` and ``replay`` to the ``cascade`` command line."""
    p = subparsers.add_parser("calibrate", help="fit one tier's confidence calibrator on a data file",
                              description="Fit one model's calibrator on per-question outputs (JSONL), print "
                                          "raw and calibrated ECE/Brier/AUROC, write the artifact and a "
                                          "reliability diagram.")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="per-question cascade outputs")
    p.add_argument("--model", required=True, metavar="NAME", help="the model (tier) to calibrate")
    p.add_argument("--method", default="temperature", choices=CALIBRATE_METHODS,
                   help="calibration method (default temperature; auto: lowest held-out NLL on folds)")
    p.add_argument("--out", required=True, metavar="ARTIFACT.json", help="where to write the calibrator artifact")
    p.add_argument("--plot", metavar="PNG", help="write a reliability diagram with confidence histogram")
    p.add_argument("--feature", default=RAW_SCORE, choices=SCORES,
                   help=f"score to calibrate: the stored {RAW_SCORE} (default), or an engine feature from the "
                        "lines' features (live runs); an artifact on an engine feature serves a tier as it is")
    p.add_argument("--use-netcal", action="store_true",
                   help="fit temperature scaling with netcal (--method temperature only)")
    p.add_argument("--criterion", default=None, choices=("nll", "ece", "brier"),
                   help="selection criterion of --method auto (default nll; an error with another method)")
    p.add_argument("--folds", type=int, default=5, help="folds for held-out scores (default 5; 2 to the questions)")
    p.add_argument("--bins", type=int, default=15, help=f"ECE bins (default 15; 2 to {MAX_BINS})")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the folds (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_calibrate)

    r = subparsers.add_parser("replay", help="fit calibrators and thresholds on TRAIN, replay TEST through a chain",
                              description="Fit calibrators and thresholds on TRAIN only, then replay every TEST "
                                          "question through the chain with the stored answers, correctness "
                                          "and costs.")
    r.add_argument("--train", required=True, metavar="TRAIN.jsonl")
    r.add_argument("--test", required=True, metavar="TEST.jsonl",
                   help="test file; pass the TRAIN file again to split it (see --test-fraction)")
    r.add_argument("--chain", required=True, metavar="M1,M2[,M3...]", help="models from cheapest to strongest")
    r.add_argument("--max-quality-drop", type=float, default=None,
                   help=f"allowed quality drop vs the last tier alone, as a fraction (default "
                        f"{DEFAULT_MAX_QUALITY_DROP}; not used with --cost-budget)")
    r.add_argument("--cost-budget", type=float, default=None, metavar="USD",
                   help="instead: maximise quality under this mean cost per request")
    r.add_argument("--confidence", type=float, default=0.9,
                   help="one-sided confidence of the quality lower bound (default 0.9)")
    r.add_argument("--method", default="auto", choices=("auto", "temperature", "platt", "isotonic", "histogram"),
                   help="calibration method of every tier (default auto: held-out NLL on TRAIN folds)")
    r.add_argument("--no-features", action="store_true", help="use each tier's own confidence only")
    r.add_argument("--no-subchains", action="store_true", help="consult every tier of the chain")
    r.add_argument("--no-guard", action="store_true",
                   help="skip the cross-validated guard (faster; the in-sample margin only)")
    r.add_argument("--test-fraction", type=float, default=None,
                   help="the test part's share when one file is given as both --train and --test, which is then "
                        "split into disjoint parts by --split-seed (default 0.5)")
    r.add_argument("--split-seed", type=non_negative_int, default=0, help="seed of that split (default 0)")
    r.add_argument("--seed", type=non_negative_int, default=0, help="seed of the folds and the bootstrap")
    r.add_argument("--plot", metavar="PNG", help="reliability diagram of the first tier on TEST")
    r.add_argument("--out", metavar="REPORT.json", help="also write the JSON report here")
    r.add_argument("--feature", default=RAW_SCORE, choices=SCORES,
                   help=f"every tier's score: the stored {RAW_SCORE} (default), or an engine feature from the "
                        "lines' features (live runs)")
    r.add_argument("--export-policy", metavar="DIR",
                   help="write the fitted policy as the engine loads it: one calibrator artifact per consulted "
                        "tier and DIR/policy.yaml (policies.<name>: chain, thresholds, calibrators); needs "
                        "--no-features")
    r.add_argument("--policy-name", default=None,
                   help="the policy's name in policy.yaml (default replayed; with --export-policy only)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_replay)


def build_parser() -> argparse.ArgumentParser:
    from cascade.cli import OneLineParser

    parser = OneLineParser(prog="cascade", description="cascade-engine calibration commands")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run calibrate/replay without the rest of the ``cascade`` CLI (same error handling)."""
    from cascade.cli import run_cli

    return run_cli(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
