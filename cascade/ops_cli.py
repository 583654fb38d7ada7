"""Operations commands: ``cascade report``, ``cascade shadow report``, ``cascade recalibrate`` and ``cascade ledger
prune``.

    cascade report [--by tier|policy|key|user|day|endpoint|meta:KEY] [--since 7d] [--json|--csv] [--plot PNG] [--config F] [--ledger L]
    cascade shadow report [--since 24h] [--json] [--top N] [--config F] [--ledger L]
    cascade recalibrate --from-ledger [--tier T] [--since 30d] [--min-samples N] [--method M] [--out ARTIFACT]
                        [--activate] [--json] [--config F] [--ledger L]
    cascade ledger prune (--before YYYY-MM-DD | --older-than-days N) [--dry-run] [--json] [--config F] [--ledger L]

``--ledger`` takes a SQLite path or a ``postgresql://`` URL and overrides the config's ``ledger.path``.
Plugged into ``cascade.cli`` through ``add_cli(subparsers)``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from cascade.cli import non_negative_int
from cascade.config import Config, config_file, load_config
from cascade.errors import ConfigError
from cascade.ledger import Ledger, _redact, utc_day_start
from cascade.paths import expand_path, ledger_url_problem


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def _open_ledger(args: argparse.Namespace, cfg: Config | None = None) -> Ledger:
    """The ledger a read-only command reads: it must exist and be a cascade ledger (nothing is created)."""
    target = getattr(args, "ledger", None)
    if target is not None and not target.strip():  # not the config's ledger, silently
        raise ConfigError("--ledger: empty path")
    if target and (why := ledger_url_problem(target)):
        raise ConfigError(f"--ledger: {why}")
    target = target or (cfg or _config(args)).ledger_target()
    return Ledger(target).open_existing_sync()


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return _clean(obj.item())
    return obj


def _print_json(obj: Any) -> None:
    print(json.dumps(_clean(obj), indent=2, allow_nan=False))


# --- cascade report --------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from cascade.reports import (
        check_report_by,
        cost_report,
        cost_report_csv,
        cost_report_plot,
        cost_report_text,
        parse_since,
    )

    check_report_by(args.by)
    if args.json and args.csv:
        raise ConfigError("--json and --csv: choose one")
    if args.plot is not None:  # an empty one is refused, not skipped
        from calibration.plots import check_plot_path

        check_plot_path(args.plot)
    since = parse_since(args.since)
    cfg = _config(args) if args.config is not None else None  # one named on the command line is checked too
    ledger = _open_ledger(args, cfg)
    try:
        rep = cost_report(ledger, args.by, since)
    finally:
        ledger.close_sync()
    if args.plot is not None:
        rep["plot"] = str(cost_report_plot(rep, args.plot))
    if args.json:
        _print_json(rep)
    elif args.csv:
        sys.stdout.write(cost_report_csv(rep))
    else:
        print(cost_report_text(rep))
        if args.plot:
            print(f"plot: {rep['plot']}")
    return 0


# --- cascade shadow report -------------------------------------------------------------------------


def cmd_shadow_report(args: argparse.Namespace) -> int:
    from cascade.reports import parse_since, shadow_report, shadow_report_text

    if args.top < 1:
        raise ConfigError("--top must be at least 1")
    if args.min_group < 1:
        raise ConfigError("--min-group must be at least 1")
    since = parse_since(args.since)
    cfg = None  # the config (--config, else $CASCADE_CONFIG) adds each shadow's description, rate and budget
    if config_file(args.config) is not None or not args.ledger:
        cfg = _config(args)
    ledger = _open_ledger(args, cfg)
    try:
        rep = shadow_report(ledger, since, top=args.top, min_group=args.min_group,
                            shadows=dict(cfg.shadows) if cfg is not None else None)
    finally:
        ledger.close_sync()
    if args.json:
        _print_json(rep)
    else:
        print(shadow_report_text(rep))
    return 0


# --- cascade recalibrate ---------------------------------------------------------------------------


def cmd_recalibrate(args: argparse.Namespace) -> int:
    from cascade.recalibrate import recalibrate, recalibrate_text
    from cascade.reports import parse_since

    if not args.from_ledger:
        raise ConfigError("recalibrate: pass --from-ledger (the ledger is the only source of labels so far; "
                          "for a labelled JSONL file use `cascade calibrate`)")
    cfg = _config(args)
    since = parse_since(args.since)
    sources = [s.strip() for s in args.labels.split(",") if s.strip()]
    # beside the config file read (--config, else $CASCADE_CONFIG, as load_config reads it): where its relative
    # artifact paths point; the embedded default has no file, so the current directory
    read = config_file(args.config)
    config_dir = expand_path(read, "--config").resolve().parent if read is not None else Path.cwd()
    default_dir = config_dir / "calibrators"
    ledger = _open_ledger(args, cfg)
    try:
        rep = recalibrate(cfg, ledger, tier=args.tier, since=since, min_samples=args.min_samples, method=args.method,
                          feature=args.feature, sources=sources, holdout=args.holdout, seed=args.seed,
                          out=args.out, default_dir=default_dir, do_activate=args.activate,
                          allow_extrapolation=args.allow_extrapolation)
    finally:
        ledger.close_sync()
    rep["ledger"] = _redact(ledger.target)
    if args.json:
        _print_json(rep)
    else:
        print(recalibrate_text(rep))
    return 0


# --- cascade ledger prune --------------------------------------------------------------------------


def _day(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).date().isoformat()


def prune_cut(before: str | None, older_than_days: int | None, now: float | None = None) -> tuple[float, str]:
    """The cut of ``cascade ledger prune`` as UNIX time (00:00 UTC of a day) and the flag that gave it, for
    messages; a ConfigError for a date that is none, or a cut in the future or within the last 2 UTC days."""
    today = utc_day_start(now)
    if before is not None:
        try:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", before):
                raise ValueError
            cut = dt.datetime.strptime(before, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp()
        except ValueError:
            raise ConfigError(f"--before {before}: not a date (YYYY-MM-DD: requests created before 00:00 UTC of "
                              "that day are deleted)") from None
        flag = f"--before {before}"
    else:
        assert older_than_days is not None
        try:
            cut = today - older_than_days * 86400.0
            flag = f"--older-than-days {older_than_days} (before {_day(cut)})"
        except (OverflowError, ValueError, OSError):  # a day before year 1 or after 9999, or none a float holds
            raise ConfigError(f"--older-than-days {older_than_days}: out of range (dates run from year 1 to 9999)"
                              ) from None
    if cut > today:
        raise ConfigError(f"{flag}: in the future (today is {_day(today)}, UTC)")
    if cut > today - 86400:
        raise ConfigError(f"{flag}: within the last 2 UTC days ({_day(today - 86400)} and {_day(today)}), whose rows "
                          f"the daily spend limits and shadow budgets read; the latest cut is --before "
                          f"{_day(today - 86400)} (--older-than-days 1)")
    return cut, flag


def cmd_ledger_prune(args: argparse.Namespace) -> int:
    cut, _ = prune_cut(args.before, args.older_than_days)
    cfg = _config(args) if args.config is not None else None  # one named on the command line is checked too
    ledger = _open_ledger(args, cfg)
    try:
        rows = ledger.prune_sync(cut, dry_run=args.dry_run)
    finally:
        ledger.close_sync()
    rep = {"ledger": _redact(ledger.target), "before": _day(cut), "before_unix": cut, "dry_run": args.dry_run,
           "rows": rows}
    if args.json:
        _print_json(rep)
        return 0
    print(f"{'would delete' if args.dry_run else 'deleted'} from ledger {rep['ledger']}: the requests created "
          f"before {rep['before']} 00:00 UTC and the rows referencing them, and the daily spend totals of the days "
          "before it")
    width = max(map(len, rows))
    for table, n in rows.items():
        print(f"  {table:<{width}}  {n}")
    if not args.dry_run and any(rows.values()) and ledger.dialect.name == "sqlite":
        print("(SQLite reuses the freed pages for new rows; the file shrinks only with VACUUM, which takes the "
              "write lock for its whole run: run it while no server writes)")
    return 0


# --- wiring ----------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config YAML (default: $CASCADE_CONFIG or the embedded CPU default)")
    p.add_argument("--ledger", help="ledger: a SQLite path or a postgresql:// URL (default: the config's)")
    p.add_argument("--since", help="only requests since: an ISO date/time (UTC unless it says), 24h, 7d, 30m, 2w")


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="spend, escalation, waste, savings and heavy tail from the ledger")
    p.add_argument("--by", default="policy", metavar="tier|policy|key|user|day|endpoint|meta:KEY",
                   help="group requests by the tier that served them, policy, API key, end user (the requests' "
                        "`user`), UTC day, or the value of one of their `metadata` tags (default: policy)")
    _common(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the report as JSON")
    fmt.add_argument("--csv", action="store_true", help="print the report as CSV (one row per group, then the total)")
    p.add_argument("--plot", metavar="PNG", help="also write a bar chart of spend vs the last-tier-alone baseline")
    p.set_defaults(func=cmd_report)

    s = sub.add_parser("shadow", help="shadow policies: what another policy would have done with live traffic")
    ssub = s.add_subparsers(dest="shadow_command", metavar="SUBCOMMAND")
    ssub.required = True
    p = ssub.add_parser("report", help="divergence, predicted cost and escalation deltas, quality signals, "
                                       "most divergent request groups")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--top", type=int, default=10, help="most divergent request groups to list per shadow (10)")
    p.add_argument("--min-group", type=int, default=1,
                   help="leave out groups with fewer known shadow decisions than this (1)")
    p.set_defaults(func=cmd_shadow_report)

    p = sub.add_parser("recalibrate", help="refit a tier's calibrator from feedback and agreement in the ledger")
    p.add_argument("--from-ledger", action="store_true", help="labels from the ledger (required)")
    _common(p)
    p.add_argument("--tier", help="tier to recalibrate (default: the first tier of the default policy)")
    p.add_argument("--min-samples", type=int, default=50, help="refuse with fewer labelled answers (50)")
    p.add_argument("--method", help="temperature, platt, isotonic, histogram or auto (default: the current method)")
    p.add_argument("--feature", help="confidence feature (default: the current calibrator's)")
    p.add_argument("--labels", default="feedback,agreement",
                   help="label sources, comma-separated: feedback, agreement (default: both; feedback wins)")
    p.add_argument("--holdout", type=float, default=0.3, help="fraction held out to compare old and new ECE (0.3)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the held-out split (0)")
    p.add_argument("--out", metavar="ARTIFACT",
                   help="a .json file, or a directory receiving <tier>.v<N>.json (default: the directory of the "
                        "artifact the config names for the tier, else calibrators/ next to the config, else in "
                        "the current directory)")
    p.add_argument("--activate", action="store_true",
                   help="also point <dir>/<tier>.json at the new version (a config naming that file picks it up "
                        "on POST /admin/reload or SIGHUP)")
    p.add_argument("--allow-extrapolation", action="store_true",
                   help="activate even when the labels cover too little of the tier's answers (more than 10%% of "
                        "its scores outside their range: e.g. only agreement labels, which exist only for answers "
                        "the tier escalated)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_recalibrate)

    s = sub.add_parser("ledger", help="ledger maintenance")
    lsub = s.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")
    lsub.required = True
    p = lsub.add_parser("prune", help="delete the requests created before a day, with their attempts, feedback "
                                      "and shadow rows, in short transactions (servers may go on writing)")
    p.add_argument("--config", help="config YAML (default: $CASCADE_CONFIG or the embedded CPU default)")
    p.add_argument("--ledger", help="ledger: a SQLite path or a postgresql:// URL (default: the config's)")
    cut = p.add_mutually_exclusive_group(required=True)
    cut.add_argument("--before", metavar="YYYY-MM-DD",
                     help="delete the requests created before 00:00 UTC of this day (yesterday at the latest)")
    cut.add_argument("--older-than-days", type=int, metavar="N",
                     help="the same with the day N days before today, UTC (1 at least: today and yesterday stay)")
    p.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(func=cmd_ledger_prune)
