"""Reports read from the ledger: where the money goes (``cascade report``) and what shadow policies would
have done (``cascade shadow report``).

Every query is plain SQL with ``?`` placeholders, run unchanged on SQLite and PostgreSQL (window
functions for the heavy tail, ``FLOOR`` for days). Aggregation happens in the database: a report over a
million requests moves a handful of rows to Python.
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cascade.errors import ConfigError, LedgerError
from cascade.ledger import HOLD_DAY_SLACK_S, INTERRUPTED, Ledger, _redact, spend_bucket, utc_day_start
from cascade.paths import expand_path

#: the groupings of ``cascade report --by``; also ``meta:KEY``, by the value of one of the requests' tags
REPORT_BY = ("tier", "policy", "key", "user", "day", "endpoint")

_GROUP_SQL = {
    "tier": "COALESCE(tier, '(none)')",
    # a request refused before its body named a model (not JSON, no model) has none: None, "(none)" as for tier;
    # one refused for a model that is no policy is filed under the client's text ("(none)" too, maybe)
    "policy": "NULLIF(policy, '')",
    # a program's own text too (the Python API's api_key_id): None, JSON null, for a request with no key, see _label
    "key": "api_key_id",
    # a client's own text (None, JSON null, when a request named none, see _label), and the key that sent it:
    # an end user is one of a key's users (as its daily spend limit counts them), two tenants' "user-1" are two
    "user": "end_user, api_key_id",
    "day": "FLOOR(created_at / 86400)",
    "endpoint": "endpoint",  # chat, completions, responses, cli (cascade.types.ENDPOINTS)
}
#: a tag name ``--by meta:KEY`` may group by: any metadata key (1-64 characters) but quotes, backslashes and
#: control characters (it goes into the SQL as a literal)
_META_KEY = re.compile(r"[^\"'\\\x00-\x1f\x7f]{1,64}")


def check_report_by(by: str) -> str:
    """``--by``'s value, checked (raises ``ConfigError`` naming the choices)."""
    if by in REPORT_BY:
        return by
    if by.startswith("meta:"):
        if _META_KEY.fullmatch(by[5:]):
            return by
        raise ConfigError(f"--by {by}: a metadata key of 1-64 characters, without quotes, backslashes or "
                          "control characters (meta:team)")
    raise ConfigError(f"--by: unknown grouping {by!r}; choose from {', '.join(REPORT_BY)} or meta:KEY")


def _group_sql(by: str, dialect: str) -> str:
    if not by.startswith("meta:"):
        return _GROUP_SQL[by]
    key = check_report_by(by)[5:]
    # a client's own text, like end_user: None when the request had no such tag, see _label
    if dialect == "sqlite":
        return f"json_extract(metadata, '$.\"{key}\"')"
    # the PostgreSQL dialect turns every "?" into a placeholder, a "?" in a literal too: the key's are written as
    # Unicode escapes (U&'...\003F'), which it leaves alone (a key has no backslash of its own)
    return "(CAST(metadata AS json) ->> U&'" + key.replace("?", "\\003F") + "')"

#: the columns of one cost-report row, in CSV order (``attempts``/``attempt_*`` only with --by tier)
COST_COLUMNS = ("group", "requests", "answered", "errors", "partial", "cancelled", "cache_hits", "escalated", "escalation_rate", "spend_usd",
                "escalation_waste_usd", "waste_share", "baseline_usd", "baseline_estimated", "cost_vs_baseline",
                "savings_usd", "savings_pct", "top1pct_cost_share", "top10pct_cost_share", "prompt_tokens",
                "completion_tokens", "mean_latency_ms", "interrupted")
TIER_COLUMNS = ("attempts", "attempt_spend_usd", "attempt_waste_usd")
#: columns added since, last in every row (after ``TIER_COLUMNS`` too): no earlier column moves.
#: ``cached_prompt_tokens``: of ``prompt_tokens``, those the providers read from their prompt caches (the
#: attempts' own count, billed at a tier's ``cached_input_per_1m``)
LATE_COLUMNS = ("cached_prompt_tokens",)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str | None, *, now: float | None = None) -> float | None:
    """``--since``: an ISO date or time (UTC unless it says otherwise), a relative age (30m, 24h, 7d, 2w),
    or UNIX seconds. Returns UNIX seconds, or None for no lower bound."""
    if text is None:
        return None
    if not str(text).strip():  # an unset variable in a script ($WINDOW): not "all time" in silence
        raise ConfigError("--since: empty; leave it out for all time, or give an ISO date or time, a relative age "
                          "(30m, 24h, 7d, 2w) or UNIX seconds")
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", s, flags=re.IGNORECASE)
    if m:
        return _in_range((time.time() if now is None else now) - float(m.group(1)) * _UNITS[m.group(2).lower()], s)
    if re.fullmatch(r"\d{9,}(?:\.\d+)?", s):
        return _in_range(float(s), s)
    try:
        dt = datetime.fromisoformat(s.replace("z", "Z"))
    except ValueError:
        # (UNIX seconds of 8 digits or fewer read as a compact ISO date where they are one, 20260131: not taken)
        raise ConfigError(f"--since: cannot read {s!r}; use an ISO date or time (2026-01-31, 2026-01-31T12:00Z), "
                          "a relative age (30m, 24h, 7d, 2w) or UNIX seconds of 9 digits or more (1767225600)"
                          ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    # a date at the calendar's edge, in a time zone that moves it past the edge in UTC (0001-01-01T00:00+01:00)
    return _in_range(dt.timestamp(), s)


def _in_range(ts: float, text: str) -> float:
    """``--since`` as UNIX seconds, refused where it is no date (before year 1 or after 9999)."""
    try:
        datetime.fromtimestamp(ts, UTC)
    except (OverflowError, OSError, ValueError):
        raise ConfigError(f"--since: {text!r} is out of range (dates run from year 1 to 9999)") from None
    return ts


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _ensure_sql_functions(ledger: Ledger) -> None:
    """SQLite builds without the math functions lack FLOOR and LN: give them both (PostgreSQL has them)."""
    if ledger.dialect.name != "sqlite":
        return
    try:
        ledger.execute("SELECT FLOOR(1.5), LN(2.0)")
    except LedgerError:
        conn = ledger._require()
        conn.create_function("FLOOR", 1, lambda x: None if x is None else float(math.floor(x)), deterministic=True)
        conn.create_function("LN", 1, lambda x: None if x is None or x <= 0 else math.log(x), deterministic=True)


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def _where(since: float | None, col: str = "created_at") -> tuple[str, tuple]:
    return (f" WHERE {col} >= ?", (since,)) if since is not None else ("", ())


# --- cost report -----------------------------------------------------------------------------------


def _day_label(v: Any) -> str:
    try:
        return datetime.fromtimestamp(int(float(v)) * 86400, UTC).date().isoformat()
    except (OverflowError, ValueError, OSError):  # a created_at of no date (before year 1, after 9999): a row a
        return f"(UNIX day {float(v):.0f})"       # program wrote through the Python API, or a clock far off


#: cost buckets 1% wide on a log scale: the heavy tail is read from this histogram, exact except within
#: the one bucket where the top 1% (10%) ends, where costs are taken at the bucket's mean
_BUCKET_SQL_COST = "CASE WHEN cost_usd > 0 THEN FLOOR(LN(cost_usd) * 100) ELSE -1000000 END"


def _top_share(hist: dict[Any, list[float]], n: int, frac_den: int) -> float:
    """Cost of the costliest ceil(n / frac_den) requests, from a {bucket: [count, cost]} histogram."""
    k = -(-n // frac_den)
    top = 0.0
    for b in sorted(hist, key=float, reverse=True):
        cnt, cost = hist[b]
        if k <= 0:
            break
        take = min(cnt, k)
        top += cost * take / cnt
        k -= take
    return top


def cost_report_sql(by: str, since: float | None, dialect: str = "sqlite") -> str:
    """The report's one scan of the requests (``?``: the ``since`` bound, when there is one)."""
    g = _group_sql(by, dialect)
    where, _ = _where(since)
    return (f"SELECT {g}, {_BUCKET_SQL_COST}, COUNT(*), "
            "SUM(CASE WHEN status IN ('ok', 'partial') THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN status IN ('ok', 'partial') THEN escalated ELSE 0 END), "
            "SUM(CASE WHEN status = 'partial' THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN status = 'cancelled' THEN 1 ELSE 0 END), "
            # hits among the answered: one whose client left before any of it went out is cancelled, no answer
            "SUM(CASE WHEN cached_from IS NOT NULL AND status IN ('ok', 'partial') THEN 1 ELSE 0 END), "
            "SUM(cost_usd), SUM(escalation_waste_usd), SUM(baseline_cost_usd), SUM(baseline_estimated), "
            "SUM(prompt_tokens), SUM(completion_tokens), SUM(latency_ms), "
            f"SUM(CASE WHEN error_class = '{INTERRUPTED}' THEN 1 ELSE 0 END) "
            f"FROM requests{where} GROUP BY {g}, {_BUCKET_SQL_COST}")


def cached_tokens_sql(by: str, since: float | None, dialect: str = "sqlite") -> str:
    """Per group, the prompt tokens the providers read from their prompt caches: a count kept per attempt only
    (``attempts.cached_prompt_tokens``), so the window's requests joined with their attempts that read some
    (NULL, written before the ledger had the column, and 0 left out). The attempts' columns are renamed in a
    plain subquery, so that the group's columns (``tier``) can only be the requests'; both databases flatten it
    into the join (SQLite reads the requests in the window, then their attempts by primary key)."""
    g = _group_sql(by, dialect)
    where, _ = _where(since)
    return (f"SELECT {g}, SUM(c.cached_n) FROM requests JOIN (SELECT request_id AS cached_rid, "
            "cached_prompt_tokens AS cached_n FROM attempts WHERE cached_prompt_tokens > 0) c "
            f"ON c.cached_rid = request_id{where} GROUP BY {g}")


def cost_report(ledger: Ledger, by: str = "policy", since: float | None = None) -> dict[str, Any]:
    """Spend, requests, escalation rate and waste, cost against the last-tier-alone baseline, savings and
    the heavy tail, per group of requests (``by``: tier = the tier that served, policy, key, user = the end
    user the caller named, day, or ``meta:KEY`` = the value of the request's tag KEY), plus
    the total. With ``by="tier"`` each row also has the cost of every attempt made on that tier.

    One scan of the requests in the window, grouped by (group, cost bucket): the sums per group and the
    cost histogram behind the heavy tail come from the same rows. The prompt tokens read from providers'
    prompt caches, counted per attempt only, come from one join of those requests with their attempts.
    """
    check_report_by(by)
    _ensure_sql_functions(ledger)
    with ledger.snapshot():  # its three reads add up while servers write (a request's attempts with it)
        return _cost_report(ledger, by, since)


def _cost_report(ledger: Ledger, by: str, since: float | None) -> dict[str, Any]:
    params = (since,) if since is not None else ()
    rows = ledger.execute(cost_report_sql(by, since, ledger.dialect.name), params)
    fields = ("requests", "answered", "escalated", "partial", "cancelled", "cache_hits", "spend", "waste", "baseline", "baseline_estimated",
              "prompt_tokens", "completion_tokens", "latency_ms", "interrupted")
    sums_of = (*fields, "cached_prompt_tokens")  # the scan's sums, then the cached prompt tokens' own query
    sums: dict[Any, dict[str, float]] = {}
    hists: dict[Any, dict[Any, list[float]]] = {}
    total_hist: dict[Any, list[float]] = {}
    keyed = by == "user"  # (end user, key) pairs: the group's two columns
    for row in rows:
        grp, bucket, vals = ((row[0], row[1]), row[2], row[3:]) if keyed else (row[0], row[1], row[2:])
        acc = sums.setdefault(grp, dict.fromkeys(sums_of, 0))
        for f, v in zip(fields, vals, strict=True):
            acc[f] += v or 0
        cnt, cost = int(vals[0]), float(vals[fields.index("spend")] or 0.0)
        hists.setdefault(grp, {})[bucket] = [cnt, cost]
        t = total_hist.setdefault(bucket, [0, 0.0])
        t[0] += cnt
        t[1] += cost
    for row in ledger.execute(cached_tokens_sql(by, since, ledger.dialect.name), params):
        grp, n = ((row[0], row[1]), row[2]) if keyed else (row[0], row[1])
        sums.setdefault(grp, dict.fromkeys(sums_of, 0))["cached_prompt_tokens"] += n or 0
    attempts: dict[Any, tuple] = {}
    if by == "tier":
        if since is None:
            sql = ("SELECT tier, COUNT(*), SUM(cost_usd), SUM(CASE WHEN kept = 0 THEN cost_usd ELSE 0 END) "
                   "FROM attempts GROUP BY tier")
        else:
            # requests in the window first, then their attempts by primary key (CROSS JOIN keeps SQLite
            # from scanning every attempt instead; PostgreSQL plans it as any inner join)
            sql = ("SELECT a.tier, COUNT(*), SUM(a.cost_usd), SUM(CASE WHEN a.kept = 0 THEN a.cost_usd ELSE 0 END) "
                   "FROM requests r CROSS JOIN attempts a WHERE a.request_id = r.request_id AND r.created_at >= ? "
                   "GROUP BY a.tier")
        attempts = {r[0]: r[1:] for r in ledger.execute(sql, params)}

    def shape(label: Any, r: dict[str, float] | None, hist: dict[Any, list[float]] | None) -> dict[str, Any]:
        r = r or dict.fromkeys(sums_of, 0)
        n, answered, escalated = int(r["requests"]), int(r["answered"]), int(r["escalated"])
        cancelled, hits = int(r["cancelled"]), int(r["cache_hits"])
        spend, waste, base = float(r["spend"]), float(r["waste"]), float(r["baseline"])
        hist = hist or {}
        pair = {}  # --by user: the key of the group's end user (not on the total)
        if isinstance(label, tuple):
            label, pair = label[0], {"key": label[1]}
        out = {  # answered: ok and partial (a stream cut after tokens); errors: failed or refused; the
            # cancelled left before an answer (every request is one of answered, errors, cancelled)
            "group": label, **pair, "requests": n, "answered": answered, "errors": n - answered - cancelled,
            "partial": int(r["partial"]), "cancelled": cancelled, "cache_hits": hits, "escalated": escalated,
            # over the answers a tier gave: a cache hit decided nothing
            "escalation_rate": _div(escalated, answered - hits), "spend_usd": spend, "escalation_waste_usd": waste,
            "waste_share": _div(waste, spend), "baseline_usd": base,
            "baseline_estimated": int(r["baseline_estimated"]),
            "cost_vs_baseline": _div(spend, base), "savings_usd": base - spend,
            "savings_pct": None if not base else 100.0 * (base - spend) / base,
            "top1pct_cost_share": _div(_top_share(hist, n, 100), spend) if n else None,
            "top10pct_cost_share": _div(_top_share(hist, n, 10), spend) if n else None,
            "prompt_tokens": int(r["prompt_tokens"]), "completion_tokens": int(r["completion_tokens"]),
            "mean_latency_ms": _div(float(r["latency_ms"]), n),
            # of the errors: in flight when their server died, recorded from its journal (cascade/ledger.py)
            "interrupted": int(r["interrupted"]),
            # of prompt_tokens: read from the providers' prompt caches (the attempts' count)
            "cached_prompt_tokens": int(r["cached_prompt_tokens"]),
        }
        if by == "tier":
            a = attempts.get(label) or (0, 0.0, 0.0)
            out.update(attempts=int(a[0] or 0), attempt_spend_usd=float(a[1] or 0.0),
                       attempt_waste_usd=float(a[2] or 0.0))
        return out

    keys = set(sums) | set(attempts)
    if by == "day":
        groups = [shape(_day_label(k), sums.get(k), hists.get(k)) for k in sorted(keys, key=float)]
    else:
        groups = [shape(k, sums.get(k), hists.get(k)) for k in keys]
        # by what the group cost; with --by tier a tier that never served still cost its attempts
        groups.sort(key=lambda d: (-(d["spend_usd"] + d.get("attempt_spend_usd", 0.0)), str(d["group"]),
                                   str(d.get("key"))))
    total = dict.fromkeys(sums_of, 0)
    for acc in sums.values():
        for f in sums_of:
            total[f] += acc[f]
    tot = shape("(all)", total, total_hist)
    if by == "tier":
        tot.update(attempts=sum(d["attempts"] for d in groups),
                   attempt_spend_usd=sum(d["attempt_spend_usd"] for d in groups),
                   attempt_waste_usd=sum(d["attempt_waste_usd"] for d in groups))
    return {"report": "cost", "by": by, "since": _iso(since), "ledger": _redact(ledger.target),
            "generated_at": _iso(time.time()), "groups": groups, "total": tot}


def _client_text(by: str) -> bool:
    """Whether groups of ``by`` may be the clients' own text (end users, tags, the model a refused request
    named as its policy, the key id a program gave the Python API), not names of ours only."""
    return by in ("user", "policy", "key") or by.startswith("meta:")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _label(group: Any, *, client: bool = False, width: int | None = None) -> str:
    """A group as text or CSV shows it. Groups by end user or tag (``client``) are the clients' own text: no
    value is "(none)", a client's value that reads like one of ours ("(none)", "(all)") is quoted. Control
    characters (a terminal's escape sequences, newlines) are escaped, and ``width`` cuts a long one short."""
    if group is None:
        return "(none)"
    text = str(group)
    if client and text in ("(none)", "(all)"):
        text = f'"{text}"'
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def cost_report_csv(report: dict[str, Any]) -> str:
    cols = list(COST_COLUMNS) + (list(TIER_COLUMNS) if report["by"] == "tier" else []) + list(LATE_COLUMNS)
    if report["by"] == "user":
        cols.insert(1, "key")  # the key whose end user the group is
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    client = _client_text(report["by"])
    for row in [*report["groups"], report["total"]]:
        out = {k: ("" if row.get(k) is None else row.get(k)) for k in cols}
        out["group"] = _csv_text(_label(row["group"], client=client and row is not report["total"]))
        if row.get("key") is not None:  # --by user: the key that named the end user, a caller's id too
            out["key"] = _csv_text(_label(row["key"]))
        w.writerow(out)
    return buf.getvalue()


def _csv_text(label: str) -> str:
    """A label as a CSV cell: a spreadsheet runs a cell that starts with one of these as a formula, and a
    client's text must not run (a tab or CR first is already escaped by ``_label``)."""
    return "'" + label if label[:1] in ("=", "+", "-", "@") else label


def _money(x: float | None) -> str:
    if x is None:
        return "-"
    sign = "-" if x < 0 else ""
    return f"{sign}${abs(x):,.2f}" if abs(x) >= 100 else f"{sign}${abs(x):.6f}"


def wilson_lower(k: int, n: int, z: float = 1.96) -> float:
    """Lower end of the Wilson score interval of k/n: ranks small groups below large ones with the same rate."""
    if n <= 0:
        return 0.0
    p = k / n
    d = 1 + z * z / n
    return max(0.0, (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / d)


def _pct(x: float | None, scale: float = 100.0) -> str:
    return "-" if x is None else f"{x * scale:.1f}%"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def cost_report_text(report: dict[str, Any]) -> str:
    headers = ["group", "requests", "spend", "esc.rate", "waste", "last-tier-alone", "savings", "saved",
               "top1%", "top10%"]
    if report["by"] == "tier":
        headers += ["attempts", "tier spend"]
    # prompt tokens read from the providers' prompt caches: a column only where some were (local tiers read none)
    cached = bool(report["total"].get("cached_prompt_tokens"))
    if cached:
        headers.append("cached prompt")
    keyed = report["by"] == "user"
    if keyed:
        headers.insert(1, "key")
    client = _client_text(report["by"])

    def cells(d: dict[str, Any]) -> list[str]:
        c = [_label(d["group"], client=client and d is not report["total"], width=60)]
        if keyed:
            c.append("" if d is report["total"] else _label(d.get("key"), width=40))
        c += [f"{d['requests']:,}",
             _money(d["spend_usd"]), _pct(d["escalation_rate"]), _money(d["escalation_waste_usd"]), _money(d["baseline_usd"]), _money(d["savings_usd"]),
             _pct(d["savings_pct"], 1.0), _pct(d["top1pct_cost_share"]), _pct(d["top10pct_cost_share"])]
        if report["by"] == "tier":
            c += [f"{d['attempts']:,}", _money(d["attempt_spend_usd"])]
        if cached:
            c.append(f"{d['cached_prompt_tokens']:,}")
        return c

    rows = [cells(d) for d in report["groups"]] + [cells(report["total"])]
    right = [False] * (2 if keyed else 1) + [True] * (len(headers) - (2 if keyed else 1))
    title = (f"cost report by {report['by']}" + (f" since {report['since']}" if report["since"] else "")
             + f" ({report['ledger']})")
    t = report["total"]
    cut = (f" ({t['partial']:,} stream{'s' if t['partial'] != 1 else ''} cut after some tokens)"
           if t["partial"] else "")
    cut += f" ({t['cache_hits']:,} from the response cache)" if t["cache_hits"] else ""
    died = f" ({t['interrupted']:,} interrupted: their server stopped)" if t["interrupted"] else ""
    foot = (f"{t['requests']:,} requests: {t['answered']:,} answered{cut}, {t['errors']:,} failed or refused{died}, "
            f"{t['cancelled']:,} cancelled by their client; baseline estimated for {t['baseline_estimated']:,} "
            "(the last tier did not run); top1%/top10%: share of spend from the costliest 1%/10% of requests")
    if cached:
        foot += (f"; cached prompt: {t['cached_prompt_tokens']:,} of the {t['prompt_tokens']:,} prompt tokens, "
                 "read from the providers' prompt caches")
    return "\n".join([title, "", _table(headers, rows, right), "", foot])


#: at most this many bars in a report's plot (but by day): the costliest groups, then one for the others
PLOT_GROUPS = 25


def _others(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The plotted figures of several groups as one."""
    answered = sum(g["answered"] - g["cache_hits"] for g in groups)
    return {"group": f"({len(groups):,} others)", "baseline_usd": sum(g["baseline_usd"] for g in groups),
            "spend_usd": sum(g["spend_usd"] for g in groups),
            "escalation_waste_usd": sum(g["escalation_waste_usd"] for g in groups),
            "escalation_rate": _div(sum(g["escalated"] for g in groups), answered)}


def cost_report_plot(report: dict[str, Any], path: str | Path) -> Path:
    """Spend against the last-tier-alone baseline per group (bars), escalation rate (line)."""
    import numpy as np

    from calibration.plots import pyplot, save_figure

    plt = pyplot()

    p = expand_path(path, "--plot")
    p.parent.mkdir(parents=True, exist_ok=True)
    groups, others = report["groups"] or [report["total"]], None
    if len(groups) > PLOT_GROUPS and report["by"] != "day":  # the costliest, and the rest as one bar
        others = _others(groups[PLOT_GROUPS - 1:])
        groups = [*groups[: PLOT_GROUPS - 1], others]
    client = _client_text(report["by"])
    labels = [_label(g["group"], client=client and g is not others, width=24)
              + (f"\n(key {_label(g['key'], width=24)})" if "key" in g else "")
              for g in groups]
    x = np.arange(len(groups))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.35 * len(groups) + 4, 14.0)), 4.8))
    ax.bar(x - w / 2, [g["baseline_usd"] for g in groups], w, label="last tier alone", color="tab:gray", alpha=0.7)
    ax.bar(x + w / 2, [g["spend_usd"] for g in groups], w, label="cascade spend", color="tab:blue")
    ax.bar(x + w / 2, [g["escalation_waste_usd"] for g in groups], w, label="of which escalation waste",
           color="tab:red", alpha=0.8)
    ax.set_ylabel("USD")
    # the labels are the clients' text (end users, tags, a model name) and --by's tag: drawn as written, never
    # read as TeX between two "$" (which drew "$x^2$" as a formula and failed the plot on "$\foo{$")
    ax.set_xticks(x, labels, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center",
                  parse_math=False)
    ax2 = ax.twinx()
    rates = [np.nan if g["escalation_rate"] is None else 100 * g["escalation_rate"] for g in groups]
    # a line only joins days; between other groups it would suggest an order that is not there
    ax2.plot(x, rates, color="tab:orange", marker="D", ls="-" if report["by"] == "day" else "none",
             label="escalation rate (right axis)")
    ax2.set_ylabel("escalation rate (%)")
    ax2.set_ylim(0, 105)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.16 if len(groups) <= 4 else -0.28),
              ncol=2, fontsize=8, frameon=False)
    t = report["total"]
    saved = "-" if t["savings_pct"] is None else f"{t['savings_pct']:.1f}%"
    ax.set_title(f"spend by {report['by']}: {t['requests']:,} requests, saved {saved} vs the last tier alone",
                 fontsize=10, parse_math=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, p)


# --- shadow report ---------------------------------------------------------------------------------

_BUCKET_SQL = ("CASE WHEN r.n_attempts = 0 THEN '0' "
               "WHEN r.prompt_tokens / r.n_attempts < 32 THEN '<32' "
               "WHEN r.prompt_tokens / r.n_attempts < 128 THEN '32-127' "
               "WHEN r.prompt_tokens / r.n_attempts < 512 THEN '128-511' "
               "WHEN r.prompt_tokens / r.n_attempts < 2048 THEN '512-2047' ELSE '2048+' END")
_CHEAPER = "s.status = 'known' AND s.diverges = 1 AND s.cost_usd < r.cost_usd"


def shadow_report(ledger: Ledger, since: float | None = None, *, top: int = 10, min_group: int = 1,
                  shadows: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per shadow: divergence rate, predicted cost and escalation-rate deltas, quality signals of the
    served answer where the shadow would have kept a cheaper one, and the most divergent request groups.

    Cost and escalation deltas compare shadow and live on the requests where the shadow's outcome is
    known: from the live path's own outputs, or by sampling (the shadow ran the tiers the live path
    skipped; ``sampled`` shows those apart, with the shadow's spend on them and against its daily budget).
    ``unknown`` ones are counted apart with their reasons. Groups are (policy, user tier, endpoint,
    prompt-length bucket), ranked by the lower end of the 95% interval of their divergence rate.
    ``shadows`` (the config's, optional) adds each shadow's description, sample rate and budget.
    """
    with ledger.snapshot():  # its reads add up while servers write (a sample's spend, or its hold: not both)
        return _shadow_report(ledger, since, top, min_group, shadows)


def _shadow_report(ledger: Ledger, since: float | None, top: int, min_group: int,
                   shadows: dict[str, Any] | None) -> dict[str, Any]:
    where, params = _where(since, "s.created_at")
    and_ = f"{where} AND" if where else " WHERE"
    known, div = "s.status = 'known'", "s.status = 'known' AND s.diverges = 1"
    pricier = "s.status = 'known' AND s.diverges = 1 AND s.cost_usd > r.cost_usd"
    smp = "s.status = 'known' AND s.sampled = 1"
    # one scan: per (shadow, group) every sum the report needs; the per-shadow figures are their totals
    group_rows = ledger.execute(
        "SELECT s.shadow, r.policy, COALESCE(r.user_tier, '(none)'), r.endpoint, "
        f"{_BUCKET_SQL}, COUNT(*), "
        f"SUM(CASE WHEN {known} THEN 1 ELSE 0 END), SUM(CASE WHEN {div} THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN {known} THEN s.cost_usd ELSE 0 END), SUM(CASE WHEN {known} THEN r.cost_usd ELSE 0 END), "
        f"SUM(CASE WHEN {known} THEN s.escalated ELSE 0 END), SUM(CASE WHEN {known} THEN r.escalated ELSE 0 END), "
        f"SUM(CASE WHEN {_CHEAPER} THEN 1 ELSE 0 END), SUM(CASE WHEN {_CHEAPER} THEN r.cost_usd - s.cost_usd ELSE 0 END), "
        f"SUM(CASE WHEN {pricier} THEN 1 ELSE 0 END), SUM(CASE WHEN {pricier} THEN s.cost_usd - r.cost_usd ELSE 0 END), "
        f"SUM(CASE WHEN {smp} THEN 1 ELSE 0 END), SUM(CASE WHEN {smp} AND s.diverges = 1 THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN {smp} THEN s.cost_usd ELSE 0 END), SUM(CASE WHEN {smp} THEN r.cost_usd ELSE 0 END), "
        "SUM(CASE WHEN s.status <> 'known' AND s.sampled = 1 THEN 1 ELSE 0 END), "
        "SUM(COALESCE(s.sample_cost_usd, 0)), "
        # unknown outcomes that diverge or escalate for certain (they need a tier the live path did not run)
        "SUM(CASE WHEN s.status <> 'known' AND s.diverges = 1 THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN s.status <> 'known' AND s.escalated = 1 THEN 1 ELSE 0 END), SUM(r.escalated), "
        f"MIN(CASE WHEN {div} THEN s.request_id END), MAX(CASE WHEN {div} THEN s.request_id END) "
        f"FROM shadow_decisions s JOIN requests r ON r.request_id = s.request_id{where} "
        f"GROUP BY s.shadow, r.policy, COALESCE(r.user_tier, '(none)'), r.endpoint, {_BUCKET_SQL}", params)
    reasons: dict[str, list[dict[str, Any]]] = {}
    for name, reason, n in ledger.execute(
            f"SELECT s.shadow, s.reason, COUNT(*) FROM shadow_decisions s{and_} s.status = 'unknown' "
            "GROUP BY s.shadow, s.reason", params):
        reasons.setdefault(name, []).append({"reason": reason, "requests": int(n)})
    feedback: dict[tuple[str, str], dict[int, int]] = {}
    for name, score, n_cheaper, n_known in ledger.execute(
            f"SELECT s.shadow, f.score, SUM(CASE WHEN {_CHEAPER} THEN 1 ELSE 0 END), COUNT(*) "
            # feedback on a response-cache hit is about the answer its original served: it counts there
            "FROM feedback f JOIN requests fr ON fr.request_id = f.request_id "
            "JOIN shadow_decisions s ON s.request_id = COALESCE(fr.cached_from, f.request_id) "
            f"JOIN requests r ON r.request_id = s.request_id{and_} {known} "
            # a request's latest feedback is its label (a user who changes their mind replaces it), as everywhere
            "AND f.id = (SELECT MAX(g.id) FROM feedback g WHERE g.request_id = f.request_id) "
            "GROUP BY s.shadow, f.score", params):
        feedback.setdefault((name, "cheaper"), {})[int(score)] = int(n_cheaper or 0)
        feedback.setdefault((name, "known"), {})[int(score)] = int(n_known or 0)
    agreement: dict[tuple[str, str], tuple[int, int]] = {}
    same = "sa.answer_sig = ka.answer_sig"
    # the shadow's answer: a live attempt, or (sampled) one of the shadow's own calls, never both
    answers = ["attempts sa ON sa.request_id = s.request_id"]
    if any(row[16] for row in group_rows):  # some outcome was sampled (column 16: their count)
        answers.append("shadow_attempts sa ON sa.request_id = s.request_id AND sa.shadow = s.shadow")
    for shadow_answers in answers:
        for name, n_ch, ag_ch, n_div, ag_div in ledger.execute(
                f"SELECT s.shadow, SUM(CASE WHEN {_CHEAPER} THEN 1 ELSE 0 END), "
                f"SUM(CASE WHEN {_CHEAPER} AND {same} THEN 1 ELSE 0 END), COUNT(*), "
                f"SUM(CASE WHEN {same} THEN 1 ELSE 0 END) "
                f"FROM shadow_decisions s JOIN requests r ON r.request_id = s.request_id JOIN {shadow_answers} "
                "AND sa.tier = s.tier AND sa.error_class IS NULL AND sa.answer_sig IS NOT NULL "
                "JOIN attempts ka ON ka.request_id = s.request_id AND ka.kept = 1 AND ka.answer_sig IS NOT NULL"
                f"{and_} {div} GROUP BY s.shadow", params):
            for subset, n, ag in (("cheaper", n_ch, ag_ch), ("known", n_div, ag_div)):
                was = agreement.get((name, subset), (0, 0))
                agreement[(name, subset)] = (was[0] + int(n or 0), was[1] + int(ag or 0))
    today = utc_day_start()
    spend_today = {name: float(v or 0.0) for name, v in ledger.execute(
        "SELECT shadow, SUM(cost_usd) FROM shadow_attempts WHERE created_at >= ? GROUP BY shadow", (today,))}
    # today's reservations of samples not recorded yet (in flight, or whose write failed), by any process: the
    # budget's check counts them (cascade.ledger.daily_spend), so the budget left is what they leave
    held_today = {bucket: float(v or 0.0) for bucket, v in ledger.execute(
        "SELECT bucket, SUM(amount_usd) FROM spend_holds WHERE created_at >= ? GROUP BY bucket",
        (today - HOLD_DAY_SLACK_S,))}

    def fb_block(name: str, subset: str) -> dict[str, Any]:
        counts = {k: v for k, v in feedback.get((name, subset), {}).items() if v}
        n = sum(counts.values())
        return {"n": n, "up": counts.get(1, 0), "neutral": counts.get(0, 0), "down": counts.get(-1, 0),
                "mean_score": _div(sum(k * v for k, v in counts.items()), n)}

    def ag_block(name: str, subset: str) -> dict[str, Any]:
        n, agree = agreement.get((name, subset), (0, 0))
        return {"n": n, "agree": agree, "rate": _div(agree, n)}

    sums: dict[str, list[float]] = {}
    policies: dict[str, set[str]] = {}
    groups_of: dict[str, list[dict[str, Any]]] = {}
    for (name, policy, user_tier, endpoint, bucket, *vals, ex_min, ex_max) in group_rows:
        acc = sums.setdefault(name, [0.0] * len(vals))
        for i, v in enumerate(vals):
            acc[i] += v or 0
        policies.setdefault(name, set()).add(policy)
        n, gk, gd = int(vals[0]), int(vals[1] or 0), int(vals[2] or 0)
        if gk < min_group or gd == 0:
            continue
        groups_of.setdefault(name, []).append({
            "policy": policy, "user_tier": user_tier, "endpoint": endpoint, "prompt_tokens": bucket,
            "requests": n, "known": gk, "sampled": int(vals[11] or 0), "diverged": gd,
            "divergence_rate": _div(gd, gk),
            "divergence_rate_lower95": wilson_lower(gd, gk),
            "cost_delta_usd": float(vals[3] or 0.0) - float(vals[4] or 0.0),
            "example_request_ids": sorted({ex_min, ex_max} - {None})})
    cfg = shadows or {}
    out = []
    for name in sorted(sums):
        (n, known_n, div_n, sh_cost, live_cost, sh_esc_n, live_esc_n, cheaper_n, cheaper_saved, pricier_n,
         pricier_extra, smp_n, smp_div, smp_sh_cost, smp_live_cost, smp_failed, smp_spend, div_unk, esc_unk,
         live_esc_all) = sums[name]
        n, known_n, div_n, div_unk, esc_unk = int(n), int(known_n), int(div_n), int(div_unk), int(esc_unk)
        live_esc, sh_esc = _div(int(live_esc_n), known_n), _div(int(sh_esc_n), known_n)
        groups = sorted(groups_of.get(name, []), key=lambda d: (-d["divergence_rate_lower95"], -d["diverged"],
                                                                 d["policy"], d["user_tier"], d["endpoint"],
                                                                 d["prompt_tokens"]))[:top]
        sc = cfg.get(name)
        seen = policies.get(name, set())
        smp_n = int(smp_n)
        budget = getattr(sc, "sample_budget_usd", None) if sc is not None else None
        today_spend = spend_today.get(name, 0.0)
        today_held = held_today.get(spend_bucket(("shadow", name)), 0.0)
        out.append({
            "shadow": name, "of": getattr(sc, "of", None) or (next(iter(seen)) if len(seen) == 1 else None),
            "description": getattr(sc, "description", "") or "",
            "requests": n, "known": known_n, "unknown": n - known_n, "unknown_rate": _div(n - known_n, n),
            "unknown_reasons": sorted(reasons.get(name, []), key=lambda d: (-d["requests"], d["reason"])),
            "diverged": div_n, "divergence_rate": _div(div_n, known_n),
            # over every request: the unknown ones that diverge for certain count, the others may or may not
            "diverged_unknown": div_unk,
            "divergence_rate_all": [_div(div_n + div_unk, n), _div(div_n + n - known_n, n)],
            "live_escalation_rate_all": _div(int(live_esc_all), n),
            "shadow_escalation_rate_all": [_div(int(sh_esc_n) + esc_unk, n), _div(int(sh_esc_n) + n - known_n, n)],
            "live_cost_usd": live_cost, "shadow_cost_usd": sh_cost, "cost_delta_usd": sh_cost - live_cost,
            "cost_delta_pct": None if not live_cost else 100.0 * (sh_cost - live_cost) / live_cost,
            "live_escalation_rate": live_esc, "shadow_escalation_rate": sh_esc,
            "escalation_rate_delta": None if live_esc is None or sh_esc is None else sh_esc - live_esc,
            "cheaper": {"requests": int(cheaper_n), "saved_usd": float(cheaper_saved),
                        "feedback": fb_block(name, "cheaper"), "agreement": ag_block(name, "cheaper")},
            "pricier": {"requests": int(pricier_n), "extra_usd": float(pricier_extra)},
            "served_feedback_known": fb_block(name, "known"),
            "agreement_diverged": ag_block(name, "known"),
            "groups": groups,
            "sampled": {
                "requests": smp_n, "failed": int(smp_failed), "diverged": int(smp_div),
                "divergence_rate": _div(int(smp_div), smp_n), "live_cost_usd": float(smp_live_cost),
                "shadow_cost_usd": float(smp_sh_cost), "cost_delta_usd": float(smp_sh_cost - smp_live_cost),
                "spend_usd": float(smp_spend), "spend_today_usd": today_spend, "held_today_usd": today_held,
                "sample_rate": getattr(sc, "sample_rate", None) if sc is not None else None,
                "budget_usd": budget,
                "budget_left_today_usd": None if budget is None else max(budget - today_spend - today_held, 0.0),
            },
        })
    return {"report": "shadow", "since": _iso(since), "ledger": _redact(ledger.target),
            "generated_at": _iso(time.time()), "shadows": out}


def shadow_report_text(report: dict[str, Any]) -> str:
    lines = ["shadow report" + (f" since {report['since']}" if report["since"] else "") + f" ({report['ledger']})"]
    if not report["shadows"]:
        lines.append("\nno shadow decisions in the ledger (configure `shadows:` and serve some traffic)")
    for s in report["shadows"]:
        lines += ["", f"shadow {s['shadow']!r} of policy {s['of']!r}" + (f": {s['description']}" if s["description"] else "")]
        sm = s.get("sampled") or {}
        by_sampling = f" ({sm['requests']:,} by sampling)" if sm.get("requests") else ""
        lines.append(f"  requests {s['requests']:,}: known {s['known']:,}{by_sampling}, unknown {s['unknown']:,} "
                     f"({_pct(s['unknown_rate'])})")
        for r in s["unknown_reasons"][:3]:
            lines.append(f"    unknown: {r['requests']:,} x {r['reason']}")
        lines.append(f"  divergence rate  {_pct(s['divergence_rate'])} ({s['diverged']:,} of {s['known']:,} known)")
        if s["unknown"]:  # over every request, the unknown ones that diverge for certain included
            lo, hi = s["divergence_rate_all"]
            span = _pct(lo) if lo == hi else f"{_pct(lo)} to {_pct(hi)}"
            must = f"; {s['diverged_unknown']:,} unknown must diverge" if s["diverged_unknown"] else ""
            elo, ehi = s["shadow_escalation_rate_all"]
            espan = _pct(elo) if elo == ehi else f"{_pct(elo)} to {_pct(ehi)}"
            lines.append(f"    of all {s['requests']:,} requests: divergence {span}{must}; escalation rate live "
                         f"{_pct(s['live_escalation_rate_all'])}, shadow {espan}")
        lines.append(f"  cost (known)     live {_money(s['live_cost_usd'])}  shadow {_money(s['shadow_cost_usd'])}  "
                     f"delta {_money(s['cost_delta_usd'])}"
                     + ("" if s["cost_delta_pct"] is None else f" ({s['cost_delta_pct']:+.1f}%)"))
        esc_d = s["escalation_rate_delta"]
        lines.append(f"  escalation rate  live {_pct(s['live_escalation_rate'])}  shadow {_pct(s['shadow_escalation_rate'])}"
                     f"  delta {'-' if esc_d is None else f'{100 * esc_d:+.1f} pts'}")
        c = s["cheaper"]
        fb, ag = c["feedback"], c["agreement"]
        lines.append(f"  would keep a cheaper answer: {c['requests']:,} requests, saving {_money(c['saved_usd'])}")
        lines.append(f"    feedback on the answer served: {fb['up']} up / {fb['neutral']} neutral / {fb['down']} down"
                     + ("" if fb["mean_score"] is None else f" (mean {fb['mean_score']:+.2f})"))
        lines.append(f"    cheaper answer agrees with the one served: {ag['agree']}/{ag['n']}"
                     + ("" if ag["rate"] is None else f" ({_pct(ag['rate'])})"))
        p = s["pricier"]
        lines.append(f"  would pay more: {p['requests']:,} requests, {_money(p['extra_usd'])} extra")
        if any(sm.get(k) for k in ("requests", "failed", "spend_usd", "spend_today_usd", "held_today_usd",
                                   "sample_rate")):
            lines.append(f"  sampled          {sm['requests']:,} known by running tiers the live path skipped"
                         + (f", {sm['failed']:,} sample(s) without an outcome (failed or cancelled)"
                            if sm["failed"] else "")
                         + f"; diverged {sm['diverged']:,} ({_pct(sm['divergence_rate'])})")
            lines.append(f"    cost           live {_money(sm['live_cost_usd'])}  shadow {_money(sm['shadow_cost_usd'])}  "
                         f"delta {_money(sm['cost_delta_usd'])}")
            budget = "" if sm["budget_usd"] is None else f" of {_money(sm['budget_usd'])} budget"
            rate = "" if sm["sample_rate"] is None else f" (sample rate {_pct(sm['sample_rate'])})"
            held = (f" (and {_money(sm['held_today_usd'])} held by samples not yet recorded)"
                    if sm["held_today_usd"] else "")
            lines.append(f"  sample spend     {_money(sm['spend_usd'])} on these requests; today (UTC) "
                         f"{_money(sm['spend_today_usd'])}{held}{budget}{rate}")
        if s["groups"]:
            lines.append("  most divergent groups (policy / user tier / endpoint / prompt tokens):")
            rows = [[g["policy"], g["user_tier"], g["endpoint"], g["prompt_tokens"], f"{g['diverged']}/{g['known']}",
                     _pct(g["divergence_rate"]), _money(g["cost_delta_usd"]),
                     ",".join(g["example_request_ids"][:2])] for g in s["groups"]]
            tbl = _table(["policy", "user tier", "endpoint", "prompt", "diverged", "rate", "cost delta", "e.g."],
                         rows, [False, False, False, False, True, True, True, False])
            lines += ["    " + ln for ln in tbl.splitlines()]
    return "\n".join(lines)


__all__ = ["COST_COLUMNS", "LATE_COLUMNS", "REPORT_BY", "TIER_COLUMNS", "cost_report", "cost_report_csv",
           "cost_report_plot", "cost_report_text", "parse_since", "shadow_report", "shadow_report_text"]
