"""`cascade report` on a ledger produced by real traffic (tests/ops_traffic.py), on SQLite and on a real
PostgreSQL server holding the same rows: every --by gives the same numbers, which match the ledger."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import pytest

from cascade.reports import COST_COLUMNS, REPORT_BY, TIER_COLUMNS, parse_since
from tests.ops_traffic import traffic  # noqa: F401 - fixture
from tests.pg import postgres  # noqa: F401 - fixture

TABLES = ("requests", "attempts", "feedback", "shadow_decisions", "shadow_attempts")


def copy_ledger(src: str, dst: str) -> None:
    """Every row of one ledger into another (SQLite -> PostgreSQL here), through the Ledger's own SQL."""
    from cascade.ledger import Ledger

    s, d = Ledger(src).open_sync(), Ledger(dst).open_sync()
    try:
        for table in TABLES:
            rows = s.execute_dicts(f"SELECT * FROM {table}")
            if not rows:
                continue
            cols = list(rows[0])
            sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            d._require().cursor().executemany(d.dialect.sql(sql), [tuple(r[c] for c in cols) for r in rows])
    finally:
        s.close_sync()
        d.close_sync()


def run_json(capsys, *argv: str) -> dict[str, Any]:
    from cascade.cli import main

    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in ("ledger", "generated_at", "plot"):
                same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def pg_copy(request, tmp_path_factory):
    """The traffic ledger copied into a fresh PostgreSQL database (skips where no server can start)."""
    from tests.ops_traffic import ops_traffic

    pg = request.getfixturevalue("postgres")
    pg.reset()
    t = ops_traffic(request.config)
    copy_ledger(str(t.ledger), pg.url)
    return pg.url


def test_report_every_by_same_numbers_on_sqlite_and_postgresql(traffic, pg_copy, capsys):
    t = traffic
    # what the report must say, straight from the rows
    n, spend, waste, base, escalated = t.rows(
        "SELECT COUNT(*), SUM(cost_usd), SUM(escalation_waste_usd), SUM(baseline_cost_usd), "
        "SUM(escalated) FROM requests")[0]
    costs = sorted((r[0] for r in t.rows("SELECT cost_usd FROM requests")), reverse=True)
    for by in (*REPORT_BY, "meta:team", "meta:team?"):  # a "?" in a key: not a placeholder on PostgreSQL
        lite = run_json(capsys, "report", "--by", by, "--json", "--ledger", str(t.ledger))
        pg = run_json(capsys, "report", "--by", by, "--json", "--ledger", pg_copy)
        same(lite, pg)
        tot = lite["total"]
        assert tot["requests"] == n and tot["escalated"] == escalated
        assert tot["spend_usd"] == pytest.approx(spend) and tot["escalation_waste_usd"] == pytest.approx(waste)
        assert tot["baseline_usd"] == pytest.approx(base) and tot["savings_usd"] == pytest.approx(base - spend)
        assert tot["escalation_rate"] == pytest.approx(escalated / n)
        # the heavy tail: ceil(n/100) and ceil(n/10) costliest requests (1%-wide cost buckets)
        assert tot["top1pct_cost_share"] == pytest.approx(sum(costs[:-(-n // 100)]) / spend, rel=0.01)
        assert tot["top10pct_cost_share"] == pytest.approx(sum(costs[:-(-n // 10)]) / spend, rel=0.01)
        assert sum(g["requests"] for g in lite["groups"]) == n
        assert sum(g["spend_usd"] for g in lite["groups"]) == pytest.approx(spend)
    # cost attribution: by the end user and by a tag the requests carried (and the rows say the same)
    # (an end user is one of its key's users: the same name sent by two keys is two groups)
    rows = t.rows("SELECT end_user, api_key_id, metadata, cost_usd FROM requests")
    for by, label in (("user", lambda u, k, m: (u, k)),
                      ("meta:team", lambda u, k, m: m and json.loads(m).get("team") or None)):
        want: dict[Any, list[float]] = {}
        for u, k, m, cost in rows:  # a request that named none: the group null (not a name a client could send)
            want.setdefault(label(u, k, m), []).append(cost)
        got = {(g["group"], g["key"]) if by == "user" else g["group"]: g
               for g in run_json(capsys, "report", "--by", by, "--json", "--ledger", str(t.ledger))["groups"]}
        assert set(got) == set(want) and len(want) >= 3, (by, set(got))
        if by == "user":  # the traffic has end users who came through both keys
            assert any(sum(u == name for u, _ in want) == 2 for name in ("user-0", "user-1", "user-2"))
        for k, costs in want.items():
            assert got[k]["requests"] == len(costs) and got[k]["spend_usd"] == pytest.approx(sum(costs))
    by_policy = {g["group"]: g for g in run_json(capsys, "report", "--by", "policy", "--json", "--ledger",
                                                   str(t.ledger))["groups"]}
    assert set(by_policy) == {"cascade", "large"}
    assert by_policy["large"]["savings_usd"] == pytest.approx(0.0)  # a pinned last tier is its own baseline
    by_tier = run_json(capsys, "report", "--by", "tier", "--json", "--ledger", str(t.ledger))
    attempt_spend = dict(t.rows("SELECT tier, SUM(cost_usd) FROM attempts GROUP BY tier"))
    assert {g["group"]: pytest.approx(g["attempt_spend_usd"]) for g in by_tier["groups"]} == attempt_spend
    by_key = {g["group"]: g["requests"] for g in run_json(capsys, "report", "--by", "key", "--json", "--ledger",
                                                             str(t.ledger))["groups"]}
    assert by_key == dict(t.rows("SELECT api_key_id, COUNT(*) FROM requests GROUP BY api_key_id"))
    by_endpoint = {g["group"]: g["requests"] for g in run_json(capsys, "report", "--by", "endpoint", "--json",
                                                                  "--ledger", str(t.ledger))["groups"]}
    assert by_endpoint == dict(t.rows("SELECT endpoint, COUNT(*) FROM requests GROUP BY endpoint"))
    assert set(by_endpoint) == {"chat", "completions"}
    # --since: relative and ISO, on both databases
    for ledger in (str(t.ledger), pg_copy):
        assert run_json(capsys, "report", "--json", "--since", "24h", "--ledger", ledger)["total"]["requests"] == n
        later = run_json(capsys, "report", "--json", "--by", "day", "--since", "2999-01-01", "--ledger", ledger)
        assert later["total"]["requests"] == 0 and later["groups"] == []


def test_shadow_report_same_on_sqlite_and_postgresql(traffic, pg_copy, capsys):
    """The shadow report, sampled shadows and their budgets included, gives the same numbers on both."""
    cfg = str(traffic.config_path)
    lite = run_json(capsys, "shadow", "report", "--json", "--config", cfg)
    pg = run_json(capsys, "shadow", "report", "--json", "--config", cfg, "--ledger", pg_copy)
    same(lite, pg)
    assert any(s["sampled"]["requests"] for s in lite["shadows"])
    assert any(s["sampled"]["spend_today_usd"] for s in lite["shadows"])


def test_report_csv_plot_and_text(traffic, capsys, tmp_path):
    from cascade.cli import main

    png = tmp_path / "spend.png"
    assert main(["report", "--by", "tier", "--csv", "--plot", str(png), "--ledger", str(traffic.ledger)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0]) == [*COST_COLUMNS, *TIER_COLUMNS]
    assert rows[-1]["group"] == "(all)"
    assert int(rows[-1]["requests"]) == traffic.rows("SELECT COUNT(*) FROM requests")[0][0]
    assert {r["group"] for r in rows[:-1]} >= {"small", "large"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main(["report", "--by", "day", "--config", str(traffic.config_path)]) == 0
    out = capsys.readouterr().out
    assert "cost report by day" in out and "last-tier-alone" in out and "(all)" in out


def test_report_counts_each_outcome(tmp_path, capsys):
    """Every request is answered (a stream cut after tokens among them), failed or refused, or cancelled by
    its client: the report counts each, and they add up to the requests."""
    import time

    from cascade.cli import main
    from cascade.ledger import Ledger
    from cascade.types import CascadeRecord

    db = tmp_path / "ledger.sqlite"
    ledger = Ledger(str(db)).open_sync()
    outcomes = {"ok": 5, "partial": 2, "error": 3, "cancelled": 4}
    try:
        for status, n in outcomes.items():
            for i in range(n):
                ledger.record_sync(CascadeRecord(request_id=f"{status}-{i}", policy="cascade", created_at=time.time(),
                                                 status=status, cost_usd=0.001, escalated=status == "ok" and i == 0))
    finally:
        ledger.close_sync()
    tot = run_json(capsys, "report", "--json", "--ledger", str(db))["total"]
    assert (tot["requests"], tot["answered"], tot["partial"], tot["errors"], tot["cancelled"]) == (14, 7, 2, 3, 4)
    assert tot["escalation_rate"] == pytest.approx(1 / 7)  # over answered requests
    assert main(["report", "--ledger", str(db)]) == 0
    assert ("14 requests: 7 answered (2 streams cut after some tokens), 3 failed or refused, 4 cancelled by their "
            "client") in capsys.readouterr().out


def test_end_users_are_shown_as_text_that_cannot_pass_for_ours_or_run(tmp_path, capsys):
    """``--by user`` groups are the clients' own text: a user named like our "(none)" or "(all)" rows is
    quoted and kept apart from requests that named none (null in JSON), control characters cannot reach the
    terminal, a long name is cut in the table, a spreadsheet formula is not one in the CSV; the plot shows
    the costliest groups and one bar for the rest."""
    import time

    from cascade.cli import main
    from cascade.ledger import Ledger
    from cascade.reports import PLOT_GROUPS
    from cascade.types import CascadeRecord

    db = tmp_path / "ledger.sqlite"
    ledger = Ledger(db).open_sync()
    users = [None, "(none)", "(all)", "\x1b[31mred\nline", "=HYPERLINK(1)", "x" * 200,
             *(f"u{i}" for i in range(PLOT_GROUPS + 5))]
    try:
        for i, user in enumerate(users):
            ledger.record_sync(CascadeRecord(request_id=f"r{i}", policy="cascade", created_at=time.time(),
                                             cost_usd=0.001 * (i + 1), end_user=user))
    finally:
        ledger.close_sync()
    groups = {g["group"]: g for g in run_json(capsys, "report", "--by", "user", "--json", "--ledger", str(db))["groups"]}
    assert set(groups) == set(users) and groups[None]["requests"] == 1 and groups["(none)"]["requests"] == 1
    assert main(["report", "--by", "user", "--ledger", str(db)]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\\x1b[31mred\\nline" in text and "x" * 200 not in text
    table = text.split("\n\n")[1].splitlines()
    assert sum(line.startswith('"(none)"') for line in table) == 1 and sum(line.startswith("(none)") for line in table) == 1
    assert sum(line.startswith('"(all)"') for line in table) == 1 and sum(line.startswith("(all)") for line in table) == 1
    assert main(["report", "--by", "user", "--csv", "--ledger", str(db)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert "'=HYPERLINK(1)" in [r["group"] for r in rows] and rows[-1]["group"] == "(all)"
    assert main(["report", "--by", "user", "--plot", str(tmp_path / "users.png"), "--ledger", str(db)]) == 0
    assert (tmp_path / "users.png").stat().st_size > 10_000


def test_attribution_by_tag_with_a_question_mark_and_by_end_user_of_each_key(tmp_path, request, capsys):
    """A tag whose key has a "?" groups the same on SQLite and PostgreSQL (where "?" is the placeholder the
    dialect rewrites); two keys' end users of the same name are two groups, each with its key, in every form."""
    import time

    from cascade.cli import main
    from cascade.ledger import Ledger
    from cascade.types import CascadeRecord

    recs = [("tenant-a", "user-1", 0.001, {"team?": "search"}), ("tenant-b", "user-1", 0.005, {"team?": "ads"}),
            ("tenant-b", "user-1", 0.002, {"team?": "ads"})]
    targets = [str(tmp_path / "ledger.sqlite")]
    pg = request.getfixturevalue("postgres")
    pg.reset()
    targets.append(pg.url)
    for target in targets:
        ledger = Ledger(target).open_sync()
        try:
            for i, (key, user, cost, meta) in enumerate(recs):
                ledger.record_sync(CascadeRecord(request_id=f"r{i}", policy="cascade", created_at=time.time(),
                                                 cost_usd=cost, api_key_id=key, end_user=user, metadata=meta))
        finally:
            ledger.close_sync()
    for target in targets:
        by_tag = run_json(capsys, "report", "--by", "meta:team?", "--json", "--ledger", target)["groups"]
        assert [(g["group"], g["requests"]) for g in by_tag] == [("ads", 2), ("search", 1)], target
        by_user = run_json(capsys, "report", "--by", "user", "--json", "--ledger", target)["groups"]
        assert [(g["group"], g["key"], g["requests"], round(g["spend_usd"], 6)) for g in by_user] == [
            ("user-1", "tenant-b", 2, 0.007), ("user-1", "tenant-a", 1, 0.001)], target
        assert "key" not in run_json(capsys, "report", "--by", "user", "--json", "--ledger", target)["total"]
    assert main(["report", "--by", "user", "--csv", "--ledger", targets[0]]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["group"], r["key"], r["requests"]) for r in rows] == [
        ("user-1", "tenant-b", "2"), ("user-1", "tenant-a", "1"), ("(all)", "", "3")]
    assert main(["report", "--by", "user", "--ledger", targets[0]]) == 0
    table = capsys.readouterr().out.split("\n\n")[1].splitlines()
    assert table[0].split()[:3] == ["group", "key", "requests"]
    assert [line.split()[:3] for line in table[2:4]] == [["user-1", "tenant-b", "2"], ["user-1", "tenant-a", "1"]]
    assert main(["report", "--by", "user", "--plot", str(tmp_path / "users.png"), "--ledger", targets[0]]) == 0
    assert (tmp_path / "users.png").stat().st_size > 10_000


def test_report_errors_are_one_line(tmp_path, capsys):
    from cascade.cli import main

    assert main(["report", "--since", "yesterday-ish", "--ledger", str(tmp_path / "x.sqlite")]) == 2
    assert "--since: cannot read 'yesterday-ish'" in capsys.readouterr().err
    assert main(["report", "--ledger", str(tmp_path / "missing.sqlite")]) == 2
    assert "no ledger at" in capsys.readouterr().err
    assert not (tmp_path / "missing.sqlite").exists()  # a report never creates an empty ledger
    assert main(["report", "--by", "team", "--ledger", str(tmp_path / "missing.sqlite")]) == 2
    assert "--by: unknown grouping 'team'; choose from tier, policy, key, user, day, endpoint or meta:KEY" in capsys.readouterr().err
    assert main(["report", "--by", "meta:te'am", "--ledger", str(tmp_path / "missing.sqlite")]) == 2
    assert "--by meta:te'am: a metadata key of 1-64 characters, without quotes" in capsys.readouterr().err


def test_parse_since():
    now = 1_800_000_000.0
    assert parse_since("24h", now=now) == now - 86400
    assert parse_since("7d", now=now) == now - 7 * 86400
    assert parse_since("30m", now=now) == now - 1800
    assert parse_since("2w", now=now) == now - 14 * 86400
    assert parse_since("2026-01-31") == 1769817600.0  # UTC midnight
    assert parse_since("2026-01-31T12:00:00+02:00") == 1769817600.0 + 10 * 3600
    assert parse_since("1769817600") == 1769817600.0
    assert parse_since(None) is None
