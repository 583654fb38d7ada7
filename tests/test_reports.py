"""`cascade report` on a ledger produced by real traffic (tests/ops_traffic.py), on SQLite and on a real
PostgreSQL server holding the same rows: every --by gives the same numbers, which match the ledger."""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from cascade.ledger import SCHEMA_VERSION
from cascade.reports import COST_COLUMNS, LATE_COLUMNS, REPORT_BY, TIER_COLUMNS, parse_since
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
    cached = t.rows("SELECT COALESCE(SUM(cached_prompt_tokens), 0) FROM attempts")[0][0]
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
        assert tot["cached_prompt_tokens"] == cached  # local tiers read no provider's prompt cache: 0
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
    assert list(rows[0]) == [*COST_COLUMNS, *TIER_COLUMNS, *LATE_COLUMNS]
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
    out = capsys.readouterr().out
    assert ("14 requests: 7 answered (2 streams cut after some tokens), 3 failed or refused, 4 cancelled by their "
            "client") in out
    assert "cached prompt" not in out  # no provider's prompt cache read: no such column, as before it had one


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


def test_csv_by_user_defuses_the_key_column_too(tmp_path, capsys):
    """``--by user``'s CSV has the key that named each end user as its second column: a caller's id (the Python
    API's ``api_key_id``) that a spreadsheet would run as a formula is defused there as in the group column,
    and a comma, quote or newline in either keeps the row whole."""
    import time

    from cascade.cli import main
    from cascade.ledger import Ledger
    from cascade.types import CascadeRecord

    db = tmp_path / "ledger.sqlite"
    ledger = Ledger(db).open_sync()
    keys = ["=HYPERLINK(1)", "+1+1", "-1+1", "@SUM(1)", 'a,"b"\nc']
    try:
        for i, key in enumerate(keys):
            ledger.record_sync(CascadeRecord(request_id=f"r{i}", policy="cascade", created_at=time.time(),
                                             cost_usd=0.001 * (i + 1), api_key_id=key, end_user="=1+2"))
        ledger.record_sync(CascadeRecord(request_id="r9", policy="cascade", created_at=time.time(), end_user="u"))
    finally:
        ledger.close_sync()
    assert main(["report", "--by", "user", "--csv", "--ledger", str(db)]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert all(len(r) == len(rows[0]) for r in rows) and len(rows) == 1 + len(keys) + 2
    assert sorted(r[1] for r in rows[1:-2]) == sorted(["'=HYPERLINK(1)", "'+1+1", "'-1+1", "'@SUM(1)", 'a,"b"\\nc'])
    assert {r[0] for r in rows[1:-2]} == {"'=1+2"}
    assert rows[-2][:2] == ["u", ""] and rows[-1][:2] == ["(all)", ""]  # no key, and the total's none


def test_plot_draws_clients_text_with_dollar_signs_as_written(tmp_path, capsys):
    """Matplotlib reads text between two "$" as TeX: an end user or tag such as "$\\foo{$" (no formula it
    knows) ended ``cascade report --plot`` in a traceback, nothing drawn; the labels are now drawn as written."""
    import time

    from cascade.cli import main
    from cascade.ledger import Ledger
    from cascade.types import CascadeRecord

    db = tmp_path / "ledger.sqlite"
    ledger = Ledger(db).open_sync()
    try:
        for i, text in enumerate(["$\\foo{$", "$x^2$", "plain"]):
            ledger.record_sync(CascadeRecord(request_id=f"r{i}", policy="cascade", created_at=time.time(),
                                             cost_usd=0.001, end_user=text, metadata={"team": text}))
    finally:
        ledger.close_sync()
    for by in ("user", "meta:team"):
        png = tmp_path / f"{by.replace(':', '-')}.png"
        assert main(["report", "--by", by, "--plot", str(png), "--ledger", str(db)]) == 0
        assert f"plot: {png}" in capsys.readouterr().out and png.read_bytes()[:4] == b"\x89PNG"


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


#: the CSV columns as they were before ``cached_prompt_tokens``: a contract read by scripts, never reordered
LEGACY_COLUMNS = ("group", "requests", "answered", "errors", "partial", "cancelled", "cache_hits", "escalated",
                  "escalation_rate", "spend_usd", "escalation_waste_usd", "waste_share", "baseline_usd",
                  "baseline_estimated", "cost_vs_baseline", "savings_usd", "savings_pct", "top1pct_cost_share",
                  "top10pct_cost_share", "prompt_tokens", "completion_tokens", "mean_latency_ms", "interrupted")
LEGACY_TIER_COLUMNS = ("attempts", "attempt_spend_usd", "attempt_waste_usd")


def ledger_target(db: str, tmp_path, request: pytest.FixtureRequest) -> str:
    """A fresh ledger of kind ``db``: a SQLite file under ``tmp_path``, or the suite's PostgreSQL server emptied."""
    if db == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    pg = request.getfixturevalue("postgres")
    pg.reset()
    return pg.url


def _cached_ledger(target: str, now: float) -> None:
    """Requests whose attempts read providers' prompt caches: (request, policy, key, end user, serving tier,
    age in days, [(attempt tier, prompt tokens, cached prompt tokens, error)])."""
    from cascade.ledger import Ledger
    from cascade.types import Attempt, CascadeRecord

    reqs = [
        ("r0", "cascade", "alice", "u1", "large", 0, [("small", 1000, 200, None), ("large", 1000, 800, None)]),
        ("r1", "cascade", "bob", "u1", "small", 0, [("small", 400, 300, None)]),
        # a provider's error (nothing cached), then its retry read 500 from the cache
        ("r2", "pinned", "alice", "u2", "large", 0,
         [("large", 700, 0, "ProviderServerError"), ("large", 700, 500, None)]),
        ("r3", "cascade", "bob", None, None, 0, []),  # a response-cache hit: no attempt, nothing read
        ("r4", "pinned", "bob", "u1", "large", 2, [("large", 5000, 4000, None)]),  # two days ago
        ("r5", "cascade", "alice", "u2", "small", 0, [("small", 90, 0, None)]),  # its count set NULL below
    ]
    ledger = Ledger(target).open_sync()
    try:
        for rid, policy, key, user, tier, age, atts in reqs:
            rec = CascadeRecord(request_id=rid, policy=policy, created_at=now - age * 86400, api_key_id=key,
                                end_user=user, tier=tier, cost_usd=0.001, cached_from=None if atts else "r1",
                                prompt_tokens=sum(a[1] for a in atts))
            rec.attempts = [Attempt(index=i, tier=t, model="m", backend="openai", prompt_tokens=p,
                                    cached_prompt_tokens=c, error_class=err, decision="error" if err else "final",
                                    kept=i == len(atts) - 1) for i, (t, p, c, err) in enumerate(atts)]
            ledger.record_sync(rec)
        # an attempt written before the ledger kept the count (schema version 6): NULL, counted 0
        ledger._require().cursor().execute(
            ledger.dialect.sql("UPDATE attempts SET cached_prompt_tokens = NULL WHERE request_id = ?"), ("r5",))
    finally:
        ledger.close_sync()
    ledger = Ledger(target).open_existing_sync()
    try:
        assert ledger.execute("SELECT cached_prompt_tokens FROM attempts WHERE request_id = 'r5'") == [(None,)]
    finally:
        ledger.close_sync()


async def test_a_programs_key_id_is_its_own_group_not_one_of_the_reports_labels(tmp_path, capsys, make_engine):
    """The Python API takes any api_key_id: a program's "(none)" was counted with the requests that had no key
    (one group of 2, no key said as the string "(none)" in --json) and its "(all)" was a second total row. The
    requests without a key are now their own group (null in --json, "(none)" in text), a program's id that
    reads like one of ours is quoted, as --by policy and --by user do."""
    from cascade.cli import main
    from cascade.types import GenerationRequest, Message
    from tests.fault_server import FaultServerThread
    from tests.hosted import plain

    with FaultServerThread() as fs:
        eng = await make_engine([plain("t", fs)])
        for key in (None, "(none)", "(all)"):
            await eng.run(GenerationRequest(messages=(Message("user", "hi"),), max_tokens=4), api_key_id=key)
    target = str(tmp_path / "ledger.sqlite")
    rep = run_json(capsys, "report", "--by", "key", "--json", "--ledger", target)
    assert {g["group"]: g["requests"] for g in rep["groups"]} == {None: 1, "(none)": 1, "(all)": 1}
    assert main(["report", "--by", "key", "--ledger", target]) == 0
    table = capsys.readouterr().out.split("\n\n")[1].splitlines()[2:]
    assert sorted(line.split()[:2] for line in table) == [['"(all)"', "1"], ['"(none)"', "1"], ["(all)", "3"],
                                                          ["(none)", "1"]]


def test_a_request_refused_before_it_named_a_model_is_in_the_policy_none(tmp_path, capsys):
    """A body that was no JSON has no model: its row's policy is empty. ``--by policy`` showed it as a group
    named "" where ``--by tier`` and ``--by key`` say "(none)"; now it says "(none)" too (null in JSON). A
    request refused for a model that is no policy is filed under the name its client sent: one named "(none)"
    was counted with the requests that named none, one named "(all)" was a second total row; a client's name
    is now its own group, quoted where it reads like one of ours."""
    import time

    from cascade.cli import main
    from cascade.ledger import Ledger
    from cascade.types import CascadeRecord

    target = str(tmp_path / "ledger.sqlite")
    ledger = Ledger(target).open_sync()
    try:
        ledger.record_sync(CascadeRecord(request_id="r0", policy="cascade", created_at=time.time(), cost_usd=0.001))
        for i, model in enumerate(("", "(none)", "(all)")):
            ledger.record_sync(CascadeRecord(request_id=f"r{i + 1}", policy=model, created_at=time.time(),
                                             status="error", error_class="InvalidRequestError"))
    finally:
        ledger.close_sync()
    rep = run_json(capsys, "report", "--by", "policy", "--json", "--ledger", target)
    assert {g["group"]: g["requests"] for g in rep["groups"]} == {"cascade": 1, None: 1, "(none)": 1, "(all)": 1}
    assert main(["report", "--by", "policy", "--ledger", target]) == 0
    table = capsys.readouterr().out.split("\n\n")[1].splitlines()[2:]
    assert sorted(line.split()[:2] for line in table) == [
        ['"(all)"', "1"], ['"(none)"', "1"], ["(all)", "4"], ["(none)", "1"], ["cascade", "1"]]
    assert main(["report", "--by", "policy", "--csv", "--ledger", target]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["group"] for r in rows if r["group"] == "(all)"] == ["(all)"] and rows[-1]["requests"] == "4"


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_report_sums_the_prompt_tokens_read_from_providers_prompt_caches(db, tmp_path, request, capsys):
    """``cached_prompt_tokens``: per group and in ``(all)``, the sum over the attempts of the group's requests
    (every attempt: a failed one's, an escalated one's; NULL from an older ledger and a cache hit's none count
    0), in --json, in --csv as the last column (no earlier one moves, with --by tier and --by user too), and
    in the table, on SQLite and PostgreSQL alike."""
    import time

    from cascade.cli import main

    target = ledger_target(db, tmp_path, request)
    _cached_ledger(target, time.time())

    def groups(by: str, *more: str) -> tuple[dict[Any, int], int]:
        rep = run_json(capsys, "report", "--by", by, "--json", "--ledger", target, *more)
        got = {((g["group"], g["key"]) if by == "user" else g["group"]): g["cached_prompt_tokens"]
               for g in rep["groups"]}
        return got, rep["total"]["cached_prompt_tokens"]

    assert groups("policy") == ({"cascade": 200 + 800 + 300, "pinned": 500 + 4000}, 5800)
    assert groups("key") == ({"alice": 1000 + 500, "bob": 300 + 4000}, 5800)
    # by the tier that served: its requests' attempts on every tier (r0's small one included), as spend counts
    assert groups("tier") == ({"large": 1000 + 500 + 4000, "small": 300, "(none)": 0}, 5800)
    assert groups("user") == ({("u1", "alice"): 1000, ("u1", "bob"): 4300, ("u2", "alice"): 500, (None, "bob"): 0},
                              5800)
    assert sorted(groups("day")[0].values()) == [1800, 4000]
    assert groups("policy", "--since", "24h") == ({"cascade": 1300, "pinned": 500}, 1800)

    assert main(["report", "--csv", "--ledger", target]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0]) == [*LEGACY_COLUMNS, "cached_prompt_tokens"]
    assert {r["group"]: r["cached_prompt_tokens"] for r in rows} == {"cascade": "1300", "pinned": "4500",
                                                                     "(all)": "5800"}
    assert main(["report", "--by", "tier", "--csv", "--since", "24h", "--ledger", target]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0]) == [*LEGACY_COLUMNS, *LEGACY_TIER_COLUMNS, "cached_prompt_tokens"]
    assert {r["group"]: r["cached_prompt_tokens"] for r in rows} == {"large": "1500", "small": "300", "(none)": "0",
                                                                     "(all)": "1800"}
    assert main(["report", "--by", "user", "--csv", "--ledger", target]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ",".join([LEGACY_COLUMNS[0], "key", *LEGACY_COLUMNS[1:], "cached_prompt_tokens"])
    assert [(r["group"], r["key"], r["cached_prompt_tokens"]) for r in csv.DictReader(io.StringIO(out))][-1] == (
        "(all)", "", "5800")

    assert main(["report", "--ledger", target]) == 0
    head, table, foot = capsys.readouterr().out.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["group", "requests", "spend"] and lines[0].endswith("cached prompt")
    assert {line.split()[0]: line.split()[-1] for line in lines[2:]} == {"cascade": "1,300", "pinned": "4,500",
                                                                         "(all)": "5,800"}
    assert "cached prompt: 5,800 of the 8,890 prompt tokens, read from the providers' prompt caches" in foot


def test_a_served_request_whose_upstream_read_its_prompt_cache_shows_in_the_report(tmp_path, capsys):
    """End to end: a real cascade server in front of a real OpenAI-protocol upstream that reports
    ``usage.prompt_tokens_details.cached_tokens``; the small tier's attempt and the large tier's answer each
    read part of the prompt from the cache, and `cascade report` sums both for the end user who sent it."""
    import httpx

    from cascade.cli import main
    from serving import create_app
    from tests.conftest import ServerThread, make_config
    from tests.fault_server import FaultServerThread

    def usage(cached: int) -> dict[str, Any]:
        return {"kind": "odd", "usage": {"prompt_tokens": 1000, "completion_tokens": 3, "total_tokens": 1003,
                                         "prompt_tokens_details": {"cached_tokens": cached}}}

    price = {"input_per_1m": 1.0, "output_per_1m": 2.0, "cached_input_per_1m": 0.25}
    with FaultServerThread() as up:
        tiers = [{"name": name, "backend": "openai", "model": "m", "threshold": threshold, "max_tokens": 4,
                  "price": price, "options": {"base_url": up.base_url}}
                 for name, threshold in (("small", 1.0), ("large", 0.0))]  # small always escalates
        cfg = make_config(tmp_path, tiers)
        with ServerThread(create_app(cfg)) as srv:
            for user, faults in (("alice", [usage(600), usage(800)]), ("bob", [])):
                up.faults(*faults)
                r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
                    "model": "cascade", "user": user, "messages": [{"role": "user", "content": "Hi"}]})
                assert r.status_code == 200, r.text
                assert r.json()["cascade"]["tier"] == "large"
    ledger = str(tmp_path / "ledger.sqlite")
    rep = run_json(capsys, "report", "--by", "user", "--json", "--ledger", ledger)
    assert {g["group"]: g["cached_prompt_tokens"] for g in rep["groups"]} == {"alice": 600 + 800, "bob": 0}
    assert rep["total"]["cached_prompt_tokens"] == 1400
    alice = next(g for g in rep["groups"] if g["group"] == "alice")
    # billed at the cached-input price: 400 + 200 prompt tokens at $1, 600 + 800 at $0.25, 6 completion at $2
    assert alice["spend_usd"] == pytest.approx((600 * 1.0 + 1400 * 0.25 + 6 * 2.0) / 1e6)
    assert main(["report", "--by", "tier", "--csv", "--ledger", ledger]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["group"], r["cached_prompt_tokens"]) for r in rows] == [("large", "1400"), ("small", "0"),
                                                                       ("(all)", "1400")]


def test_report_errors_are_one_line(tmp_path, capsys):
    from cascade.cli import main

    assert main(["report", "--since", "yesterday-ish", "--ledger", str(tmp_path / "x.sqlite")]) == 2
    assert "--since: cannot read 'yesterday-ish'" in capsys.readouterr().err
    # a few digits: not UNIX seconds (eight of them read as a compact ISO date), said so rather than "UNIX seconds"
    assert main(["report", "--since", "0", "--ledger", str(tmp_path / "x.sqlite")]) == 2
    assert "UNIX seconds of 9 digits or more" in capsys.readouterr().err
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


@pytest.mark.parametrize("tz", ["Asia/Kolkata", "America/Los_Angeles"])
def test_since_reads_a_date_without_a_zone_as_utc_whatever_the_servers_zone(tz, monkeypatch):
    """--since 2026-01-31 is 00:00 UTC, as the days of --by day and of the daily limits are: not the local
    midnight of the machine that runs the report (5.5 h later in Kolkata, 8 h earlier in Los Angeles)."""
    import time

    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        assert parse_since("2026-01-31") == 1769817600.0
        assert parse_since("2026-01-31T12:00") == 1769817600.0 + 12 * 3600
    finally:
        monkeypatch.undo()
        time.tzset()


#: what a ledger of schema version 2 lacks of the current one (the columns and tables added since)
_SINCE_2 = ("DROP INDEX IF EXISTS requests_end_user_created", "DROP TABLE shadow_attempts", "DROP TABLE inflight",
            "DROP TABLE instances", "ALTER TABLE requests DROP COLUMN cached_from",
            "ALTER TABLE requests DROP COLUMN end_user", "ALTER TABLE requests DROP COLUMN metadata",
            "ALTER TABLE attempts DROP COLUMN cached_prompt_tokens", "ALTER TABLE shadow_decisions DROP COLUMN sampled",
            "ALTER TABLE shadow_decisions DROP COLUMN sample_cost_usd",
            "UPDATE meta SET value = '2' WHERE key = 'schema_version'")


def test_reports_read_an_older_ledger_as_it_is_and_never_migrate_it(traffic, tmp_path, capsys):
    """Servers of an older version may still be writing to their ledger: a command that only reads it (the
    reports) must not migrate it under them (their inserts would no longer fit its tables, or they would refuse
    to start on it). It is read as it is, and says what a migrated copy of it says."""
    import shutil
    import sqlite3

    from cascade.ledger import Ledger

    old, migrated = tmp_path / "old.sqlite", tmp_path / "migrated.sqlite"
    with sqlite3.connect(traffic.ledger) as src, sqlite3.connect(old) as dst:  # (its -wal file's rows too)
        src.backup(dst)
    src.close()
    dst.close()
    with sqlite3.connect(old) as db:
        for sql in _SINCE_2:
            db.execute(sql)
    db.close()

    def schema(path) -> tuple:
        with sqlite3.connect(path) as db:
            return (db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone(),
                    db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall())

    before = schema(old)
    shutil.copy(old, migrated)
    Ledger(migrated).open_sync().close_sync()  # as a server of this version migrates it
    assert schema(migrated)[0] == (str(SCHEMA_VERSION),)
    for by in (*REPORT_BY, "meta:team"):
        got = run_json(capsys, "report", "--by", by, "--json", "--ledger", str(old))
        same(got, run_json(capsys, "report", "--by", by, "--json", "--ledger", str(migrated)))
        assert got["total"]["requests"] == traffic.rows("SELECT COUNT(*) FROM requests")[0][0]
    shadows = run_json(capsys, "shadow", "report", "--json", "--ledger", str(old))
    same(shadows, run_json(capsys, "shadow", "report", "--json", "--ledger", str(migrated)))
    assert schema(old) == before  # not migrated: no column, table, index or version changed


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_report_is_one_snapshot_while_servers_write(db, tmp_path, request):
    """A report read while servers write adds up: its reads (the requests, then their attempts with --by tier)
    see the same rows, so every request's attempts are counted with it. Read one statement at a time, a request
    committed between them had its attempts' spend counted and not its own (on PostgreSQL about a third of
    these reports, on SQLite a few)."""
    import threading
    import time
    import uuid

    from cascade.ledger import Ledger
    from cascade.reports import cost_report
    from cascade.types import Attempt, CascadeRecord

    target = ledger_target(db, tmp_path, request)

    def rec() -> CascadeRecord:
        tried = [Attempt(index=0, tier="small", model="s", backend="b", cost_usd=0.001, decision="escalate"),
                 Attempt(index=1, tier="large", model="l", backend="b", cost_usd=0.002, decision="final", kept=True)]
        return CascadeRecord(request_id=uuid.uuid4().hex, policy="cascade", created_at=time.time(), attempts=tried,
                             tier="large", model="l", escalated=True, cost_usd=0.003, escalation_waste_usd=0.001)

    writer = Ledger(target).open_sync()
    writer._write([(rec(), []) for _ in range(2000)])  # (scans that take a while: commits land between them)
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            writer.record_sync(rec())

    thread = threading.Thread(target=write)
    thread.start()
    reader = Ledger(target).open_existing_sync()
    try:
        seen = []
        for _ in range(60):
            total = cost_report(reader, "tier")["total"]
            seen.append((total["requests"], round(total["spend_usd"], 6), round(total["attempt_spend_usd"], 6),
                         total["attempts"]))
    finally:
        stop.set()
        thread.join()
        reader.close_sync()
        writer.close_sync()
    assert seen[-1][0] > seen[0][0]  # (the writes went on throughout)
    assert [s for s in seen if s[1] != s[2] or s[3] != 2 * s[0]] == []


def _hand_ledger(target: str, t0: float) -> None:
    """Six requests of known figures over two UTC days (t0 and t0 + 1 day, 00:00 UTC): tiers small then large."""
    from cascade.ledger import INTERRUPTED, Ledger
    from cascade.types import Attempt, CascadeRecord

    t1 = t0 + 86400

    def att(i: int, tier: str, cost: float, kept: bool = False) -> Attempt:
        return Attempt(index=i, tier=tier, model=tier, backend="openai", cost_usd=cost, kept=kept,
                       decision="final" if kept else "escalate")

    recs = [  # (id, created_at, status, tier, escalated, cost, waste, baseline, estimated, latency, attempts, extra)
        ("a", t0 + 60, "ok", "large", True, 0.005, 0.001, 0.004, False, 100.0,
         [att(0, "small", 0.001), att(1, "large", 0.004, True)], {}),
        ("b", t0 + 120, "ok", "small", False, 0.002, 0.0, 0.008, True, 200.0, [att(0, "small", 0.002, True)], {}),
        # in flight when its server died, its large answer streaming, recorded from the journal (escalated, but no
        # answer: not counted as an escalation), made exactly at 00:00 UTC of the second day
        ("c", t1, "error", None, True, 0.003, 0.003, 0.008, True, 400.0, [att(0, "small", 0.003)],
         {"error_class": INTERRUPTED}),
        # a cache hit (b's answer and its estimated baseline), and one whose client left before it went out:
        # cancelled, no answer, no hit
        ("d", t1 + 30, "ok", "small", False, 0.0, 0.0, 0.008, True, 10.0, [], {"cached_from": "b"}),
        ("e", t1 + 40, "cancelled", None, False, 0.0, 0.0, 0.008, True, 50.0, [], {"cached_from": "b"}),
        ("f", t1 + 50, "error", None, False, 0.0, 0.0, 0.0, False, 0.0, [], {"error_class": "InvalidRequestError"}),
    ]
    ledger = Ledger(target).open_sync()
    try:
        for rid, at, status, tier, esc, cost, waste, base, est, lat, atts, extra in recs:
            ledger.record_sync(CascadeRecord(
                request_id=rid, policy="cascade", created_at=at, status=status, tier=tier, escalated=esc,
                cost_usd=cost, escalation_waste_usd=waste, baseline_cost_usd=base, baseline_estimated=est,
                latency_ms=lat, attempts=atts, **extra))
    finally:
        ledger.close_sync()


def test_report_figures_are_the_known_answers_of_a_hand_made_ledger(tmp_path, capsys):
    """Every figure of the report against what the rows say, worked by hand: the escalation rate over the
    answers a tier gave (a cache hit decided nothing; a hit whose client left is no hit), waste and savings as
    shares of what they are shares of, latency over every request, each estimated baseline and interrupted
    request counted, --by tier's attempts (a tier that served little may still have cost most), the day a
    request is filed under, and --since taking a request made at its very instant."""
    from cascade.ledger import utc_day_start

    t0 = utc_day_start() - 2 * 86400
    day0, day1 = (datetime.fromtimestamp(t, UTC).date().isoformat() for t in (t0, t0 + 86400))
    target = str(tmp_path / "ledger.sqlite")
    _hand_ledger(target, t0)
    tot = run_json(capsys, "report", "--json", "--ledger", target)["total"]
    want = {"requests": 6, "answered": 3, "errors": 2, "partial": 0, "cancelled": 1, "cache_hits": 1, "escalated": 1,
            "escalation_rate": 0.5, "spend_usd": 0.010, "escalation_waste_usd": 0.004, "waste_share": 0.4,
            "baseline_usd": 0.036, "baseline_estimated": 4, "cost_vs_baseline": 0.010 / 0.036,
            "savings_usd": 0.026, "savings_pct": 100 * 0.026 / 0.036, "top1pct_cost_share": 0.5,
            "top10pct_cost_share": 0.5, "mean_latency_ms": 760 / 6, "interrupted": 1}
    assert {k: tot[k] for k in want} == pytest.approx(want)
    by_tier = run_json(capsys, "report", "--by", "tier", "--json", "--ledger", target)
    # small served 0.002 but its attempts cost 0.006 (0.004 of it thrown away): ranked by both, after large's 0.009
    assert [(g["group"], g["requests"], g["attempts"]) for g in by_tier["groups"]] == [
        ("large", 1, 1), ("small", 2, 3), ("(none)", 3, 0)]
    assert [g["attempt_spend_usd"] for g in by_tier["groups"]] == pytest.approx([0.004, 0.006, 0.0])
    assert [g["attempt_waste_usd"] for g in by_tier["groups"]] == pytest.approx([0.0, 0.004, 0.0])
    assert (by_tier["total"]["attempts"], by_tier["total"]["attempt_spend_usd"],
            by_tier["total"]["attempt_waste_usd"]) == pytest.approx((4, 0.010, 0.004))
    by_day = run_json(capsys, "report", "--by", "day", "--json", "--ledger", target)["groups"]
    assert [(g["group"], g["requests"]) for g in by_day] == [(day0, 2), (day1, 4)]
    # from 00:00 UTC of the second day: the request made at that instant is in, with its attempt
    since = run_json(capsys, "report", "--by", "tier", "--json", "--since", day1, "--ledger", target)
    assert since["total"]["requests"] == 4 and since["total"]["interrupted"] == 1
    assert {g["group"]: (g["attempts"], g["attempt_waste_usd"]) for g in since["groups"]} == {
        "small": (1, pytest.approx(0.003)), "(none)": (0, 0.0)}


def test_a_request_dated_outside_the_calendar_is_a_day_of_its_own_not_a_traceback(tmp_path, capsys):
    """--by day names each request's UTC day; a request whose created_at is no date (after year 9999, before year
    1: written by a program through the Python API, or by a clock far off) stopped the report with a traceback.
    Its group is its UNIX day, in order with the others."""
    from cascade.ledger import Ledger
    from tests.test_ledger import record

    target = str(tmp_path / "ledger.sqlite")
    ledger = Ledger(target).open_sync()
    try:
        for i, t in enumerate((1e14, -1e14, 1_000_000.0)):
            rec = record(i)
            rec.created_at = t
            ledger.record_sync(rec)
    finally:
        ledger.close_sync()
    rep = run_json(capsys, "report", "--by", "day", "--json", "--ledger", target)
    assert [(g["group"], g["requests"]) for g in rep["groups"]] == [
        ("(UNIX day -1157407408)", 1), ("1970-01-12", 1), ("(UNIX day 1157407407)", 1)]
    assert rep["total"]["requests"] == 3


def test_the_heavy_tail_takes_only_its_share_of_a_cost_bucket(tmp_path, capsys):
    """The costliest 10% of 20 requests are 2: the one of $0.01 and one of the nineteen of $0.001 (one cost
    bucket), not the whole bucket."""
    import time

    from cascade.ledger import Ledger
    from cascade.types import CascadeRecord

    target = str(tmp_path / "ledger.sqlite")
    ledger = Ledger(target).open_sync()
    try:
        for i, cost in enumerate([0.01] + [0.001] * 19):
            ledger.record_sync(CascadeRecord(request_id=f"r{i}", policy="cascade", created_at=time.time(),
                                             cost_usd=cost))
    finally:
        ledger.close_sync()
    tot = run_json(capsys, "report", "--json", "--ledger", target)["total"]
    assert tot["top1pct_cost_share"] == pytest.approx(0.01 / 0.029)
    assert tot["top10pct_cost_share"] == pytest.approx(0.011 / 0.029)
