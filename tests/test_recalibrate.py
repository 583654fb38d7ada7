"""Recalibration from the ledger of real traffic (tests/ops_traffic.py), live reloads (POST /admin/reload on
the running server; SIGHUP to a `cascade serve` subprocess) without dropping requests, and drift alarms."""

from __future__ import annotations

import importlib.util

import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import REPO, TEST_MODEL, free_port, tier
from tests.ops_traffic import Traffic, ops_traffic, traffic  # noqa: F401 - fixture
from tests.pg import postgres  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def recalibrated(pytestconfig) -> dict[str, Any]:  # noqa: ANN001
    """`cascade recalibrate --from-ledger` once, activating version 1 of the small tier's calibrator."""
    import contextlib
    import io

    from cascade.cli import main

    t = ops_traffic(pytestconfig)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["recalibrate", "--from-ledger", "--config", str(t.config_path), "--tier", "small",
                   "--min-samples", "6", "--out", str(t.cal_dir), "--activate", "--json"])
    assert rc == 0, out.getvalue()
    return json.loads(out.getvalue())


def _confidence_check(ledger: Path, request_id: str, cal) -> tuple[float, float]:  # noqa: ANN001
    with sqlite3.connect(ledger) as c:
        feats, conf = c.execute("SELECT features, confidence FROM attempts WHERE request_id=? AND tier='small'",
                                (request_id,)).fetchone()
    return conf, cal.predict_one(json.loads(feats))


def test_recalibrate_from_feedback_and_agreement_writes_a_versioned_artifact(traffic, recalibrated):
    from calibration.calibrators import load_calibrator
    from cascade.config import load_config
    from cascade.engine import Engine

    rep = recalibrated
    lab = rep["labels"]
    # every request of the traffic has feedback: it labels the answers served and, where the small tier
    # escalated, its answer by the served one's (agreement labels only what no one judged: below)
    assert lab["feedback"] >= 1
    assert lab["right"] >= 2 and lab["wrong"] >= 2 and rep["n"] == lab["feedback"] + lab["agreement"]
    assert rep["n_fit"] + rep["n_heldout"] == rep["n"] and rep["n_heldout"] >= 2
    for k in ("ece", "brier", "nll"):
        assert 0 <= rep["heldout"]["old"][k] and 0 <= rep["heldout"]["new"][k]
    assert rep["ece_old"] == rep["heldout"]["old"]["ece"] and rep["ece_new"] == rep["heldout"]["new"]["ece"]
    art = Path(rep["artifact"])
    assert art == traffic.cal_dir / "small.v1.json" and rep["version"] == 1
    link = traffic.cal_dir / "small.json"
    assert link.is_symlink() and os.readlink(link) == "small.v1.json"
    # small.json was the first artifact, a file rather than a link: kept beside, never lost
    kept = traffic.cal_dir / "small.json.bak"
    assert rep["replaced_file_kept_as"] == str(kept) and not kept.is_symlink()
    assert load_calibrator(kept).params() == {"temperature": 1.0}
    cal = load_calibrator(art)
    fo = cal.fitted_on
    assert fo["source"] == "ledger" and fo["tier"] == "small" and fo["version"] == 1 and fo["n"] == rep["n"]
    assert fo["labels"]["feedback"] == lab["feedback"] and fo["previous"]["params"] == {"temperature": 1.0}
    assert set(cal.metrics["heldout"]) == {"old", "new"}
    # the engine loads it through the config, which names the `small.json` link
    async def engine_calibrator() -> dict:
        eng = await Engine.open(load_config(traffic.config_path, environ={}))
        try:
            return eng.tiers["small"].calibrator.to_dict()
        finally:
            await eng.close()

    import asyncio

    loaded = asyncio.run(engine_calibrator())
    assert loaded["params"] == cal.params() and loaded["fitted_on"]["version"] == 1
    # text output, and a second run makes version 2 without touching version 1
    from cascade.cli import main

    assert main(["recalibrate", "--from-ledger", "--config", str(traffic.config_path), "--min-samples", "6",
                 "--out", str(traffic.dir / "elsewhere")]) == 0
    assert (traffic.dir / "elsewhere" / "small.v2.json").exists() and art.exists()


def test_recalibrate_never_rewrites_a_version_in_place(traffic, recalibrated, capsys):
    """--out naming the artifact the tier serves (its link) or an existing version is refused: a reload would
    otherwise swap the serving calibrator without --activate, under a file name of another version."""
    from cascade.cli import main

    v1 = Path(recalibrated["artifact"])
    before = v1.read_bytes()
    base = ["recalibrate", "--from-ledger", "--config", str(traffic.config_path), "--min-samples", "6"]
    assert main([*base, "--out", str(traffic.cal_dir / "small.json")]) == 2
    err = capsys.readouterr().err
    assert "the calibrator tier 'small' serves now" in err and "never rewritten" in err, err
    assert main([*base, "--out", str(v1)]) == 2
    assert "the calibrator tier 'small' serves now" in capsys.readouterr().err
    other = traffic.dir / "versions" / "small.v7.json"  # a version not served, which a link elsewhere may name
    other.parent.mkdir(exist_ok=True)
    shutil.copy(v1, other)
    assert main([*base, "--out", str(other)]) == 2
    assert "that version exists already" in capsys.readouterr().err
    assert other.read_bytes() == before == v1.read_bytes()
    assert os.readlink(traffic.cal_dir / "small.json") == "small.v1.json"


def test_recalibrate_never_rewrites_a_policys_or_a_shadows_artifact(traffic, tmp_path, capsys):
    """--out naming the artifact a policy's or a shadow's own calibrator reads (or another tier's) was written
    over: only the tier's own was refused, so the next reload or restart swapped that route's calibrator unasked.
    Every artifact the config reads is refused, naming its key."""
    from calibration.calibrators import TemperatureScaling, save_calibrator
    from cascade.cli import main

    cfg = yaml.safe_load(traffic.config_path.read_text())
    uses = {"policy": tmp_path / "policy_small.json", "shadow": tmp_path / "shadow_small.json"}
    for f in uses.values():
        save_calibrator(TemperatureScaling("mean_logprob", 2.0), f)
    cfg["policies"]["cascade"]["calibrators"] = {"small": {"artifact": str(uses["policy"])}}
    cfg["shadows"]["hot"]["calibrators"] = {"small": {"artifact": str(uses["shadow"])}}
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = {k: f.read_bytes() for k, f in uses.items()}
    base = ["recalibrate", "--from-ledger", "--config", str(path), "--ledger", str(traffic.ledger),
            "--min-samples", "6"]
    assert main([*base, "--out", str(uses["policy"])]) == 2
    assert "the calibrator policies.cascade.calibrators.small reads" in capsys.readouterr().err
    assert main([*base, "--out", str(uses["shadow"])]) == 2
    assert "the calibrator shadows.hot.calibrators.small reads" in capsys.readouterr().err
    assert {k: f.read_bytes() for k, f in uses.items()} == before
    assert main([*base, "--out", str(tmp_path / "new.json")]) == 0  # a new file is written


def test_recalibrate_refuses_too_few_labels(traffic, capsys):
    from cascade.cli import main

    assert main(["recalibrate", "--from-ledger", "--config", str(traffic.config_path), "--min-samples", "5000"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"only \d+ labelled answers of tier 'small' .*from feedback.*--min-samples is 5000", err), err
    assert main(["recalibrate", "--config", str(traffic.config_path)]) == 2
    assert "--from-ledger" in capsys.readouterr().err


def test_drift_alarm_flips_on_the_forced_band(traffic: Traffic):
    """(Before the reload below: a reload that changes a calibrator starts the drift windows afresh.)"""
    with httpx.Client(base_url=traffic.url, timeout=60) as c:
        metrics = c.get("/metrics").text
    assert re.search(r'^cascade_drift_alarm\{signal="escalation_rate"\} 1\.0$', metrics, re.M), metrics
    assert re.search(r'^cascade_drift_alarm\{signal="ece"\} 1\.0$', metrics, re.M)
    assert re.search(r'^cascade_drift_value\{signal="escalation_rate"\} [0-9.]+$', metrics, re.M)
    flags = [r[0] for r in traffic.rows("SELECT escalated FROM requests WHERE policy = 'cascade' AND status = 'ok' "
                                        "ORDER BY created_at")]
    expected = _transitions(flags, 3, 0.0, 0.1)
    on_lines = [m for m in traffic.drift_log if m.startswith("drift alarm on: escalation rate")]
    assert expected >= 1 and len(on_lines) == expected, (flags, traffic.drift_log)
    assert len([m for m in traffic.drift_log if m.startswith("drift alarm on: ECE")]) == 1


def test_admin_reload_swaps_the_calibrator_without_dropping_requests(traffic, recalibrated):
    from calibration.calibrators import load_calibrator

    new = load_calibrator(recalibrated["artifact"])
    with httpx.Client(base_url=traffic.url, timeout=300) as c:
        r = c.post("/admin/reload", headers=traffic.headers("free-1"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
        assert c.post("/admin/reload").status_code == 401
        body = {"model": "cascade", "messages": [{"role": "user", "content": "Name a colour."}]}
        done: dict[str, Any] = {}
        th = threading.Thread(target=lambda: done.update(
            r=c.post("/v1/chat/completions", json=body, headers=traffic.headers("paid-1"))))
        th.start()  # a request in flight while the calibrators are swapped
        time.sleep(0.05)
        rel = c.post("/admin/reload", headers=traffic.headers("ops-1"))
        th.join()
        assert rel.status_code == 200, rel.text
        assert done["r"].status_code == 200
        small = rel.json()["tiers"]["small"]
        assert small["version"] == 1 and small["method"] == new.method
        assert rel.json()["source"] == str(traffic.config_path) and rel.json()["not_applied"] == []
        assert rel.json()["decisions_changed"] is True
        metrics = c.get("/metrics").text  # the drift windows start afresh: they judge the new calibrator
        assert re.search(r'^cascade_drift_alarm\{signal="ece"\} 0\.0$', metrics, re.M), metrics
        assert re.search(r'^cascade_drift_value\{signal="ece"\} NaN$', metrics, re.M)
        after = c.post("/v1/chat/completions", json=body, headers=traffic.headers("paid-1")).json()
    conf, expect = _confidence_check(traffic.ledger, after["cascade"]["request_id"], new)
    assert conf == pytest.approx(expect)


def test_sighup_reloads_a_cascade_serve_process(tmp_path, recalibrated):
    from calibration.calibrators import TemperatureScaling, load_calibrator, save_calibrator
    from cascade.recalibrate import activate

    cal_dir = tmp_path / "cal"
    save_calibrator(TemperatureScaling("mean_logprob", 1.0), cal_dir / "small.json")
    port = free_port()
    cfg = {"server": {"port": port, "log_level": "info"}, "ledger": {"path": str(tmp_path / "l.sqlite")},
           "tiers": [tier("small", max_tokens=4, calibrator={"artifact": str(cal_dir / "small.json")},
                          options={"threads": 1})],
           "policies": {"one": {"chain": ["small"]}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    log = (tmp_path / "serve.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", "--config", str(tmp_path / "c.yaml")],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    body = {"messages": [{"role": "user", "content": "What is the capital of Italy?"}]}
    try:
        with httpx.Client(base_url=url, timeout=300) as c:
            deadline = time.monotonic() + 240
            # a SIGHUP while the server starts (its models loading) is ignored, not fatal (it was: exit 129)
            while "cascade-engine: serving policies" not in (tmp_path / "serve.log").read_text():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGHUP)
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if c.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "cascade serve did not become ready"
                time.sleep(0.2)
            first = c.post("/v1/chat/completions", json=body).json()["cascade"]
            conf, expect = _confidence_check(tmp_path / "l.sqlite", first["request_id"], TemperatureScaling())
            assert conf == pytest.approx(expect)
            shutil.copy(recalibrated["artifact"], cal_dir / "small.v1.json")
            activate(cal_dir / "small.v1.json", "small")
            done: dict[str, Any] = {}
            th = threading.Thread(target=lambda: done.update(r=c.post("/v1/chat/completions", json=body)))
            # (the first SIGHUP may have reloaded, had it come after the server's handler was in place: counted)
            reloads = (tmp_path / "serve.log").read_text().count("SIGHUP reload done")
            th.start()
            time.sleep(0.05)
            proc.send_signal(signal.SIGHUP)  # while a request is in flight
            th.join()
            assert done["r"].status_code == 200
            deadline = time.monotonic() + 60
            while (tmp_path / "serve.log").read_text().count("SIGHUP reload done") == reloads:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.1)
            third = c.post("/v1/chat/completions", json=body).json()["cascade"]
        new = load_calibrator(cal_dir / "small.v1.json")
        conf, expect = _confidence_check(tmp_path / "l.sqlite", third["request_id"], new)
        assert conf == pytest.approx(expect)
        _, old = _confidence_check(tmp_path / "l.sqlite", third["request_id"], TemperatureScaling())
        assert conf != pytest.approx(old)
        assert "reloaded calibrators from" in (tmp_path / "serve.log").read_text()
        # a SIGHUP during the shutdown (a logrotate hook) is ignored: the reload handler is gone by then, and
        # SIGHUP's default would end the process before its engine closed
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while "Waiting for application shutdown" not in (tmp_path / "serve.log").read_text():
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.01)
        proc.send_signal(signal.SIGHUP)
        proc.wait(timeout=60)
        assert proc.returncode != -signal.SIGHUP, (tmp_path / "serve.log").read_text()
        assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
        log.close()


_SIGHUP_CYCLES = r"""
import asyncio, logging, signal, sys
from cascade.recalibrate import install_sighup

logging.getLogger("cascade.recalibrate").setLevel(logging.CRITICAL)  # the spam's reloads fail (no engine)


async def main():
    loop = asyncio.get_running_loop()
    enough = loop.run_in_executor(None, sys.stdin.readline)  # the test's word: its storm has overlapped enough
    cycles = 0
    while cycles < int(sys.argv[2]) or not enough.done():
        remove = install_sighup(0, None)  # an engine of 0: its reload fails at once, on the loop
        await asyncio.sleep(0.0005)
        remove()  # what the server's shutdown does: SIGHUPs from here on are ignored
        await asyncio.sleep(0.0005)
        cycles += 1
    print("cycled", flush=True)
    # the loop's close removes the ignoring handler too (SIGHUP's default again until run_server ignores it):
    # the test stops its storm first
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as cascade serve does before its server starts
print("ready", flush=True)

if sys.argv[1] == "uvloop":
    import uvloop
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
else:
    runner = asyncio.Runner()
with runner:
    runner.run(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_sighup_storm_during_the_handlers_removal_never_ends_the_process(loop: str):
    """The shutdown's removal of the reload handler left SIGHUP's default (end the process) in place for a
    moment; a SIGHUP in it ended a `cascade serve` in CI before its engine closed (exit -1 in
    test_sighup_reloads_a_cascade_serve_process). Here SIGHUPs arrive every few tenths of a ms while the handler is
    installed and removed 2000 times, and on until 500 have been sent (however busy the machine), on the loops
    cascade serve runs (uvloop where installed, else asyncio)."""
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed")
    proc = subprocess.Popen([sys.executable, "-c", _SIGHUP_CYCLES, loop, "2000"], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    said = {"ready": threading.Event(), "cycled": threading.Event()}

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() in said:
                said[line.strip()].set()

    threading.Thread(target=read, daemon=True).start()
    sent = 0
    try:
        deadline = time.monotonic() + 120
        # its imports done, SIGHUP ignored as in cascade serve (a bounded wait: a blocking read could not be)
        assert said["ready"].wait(120) and lines[0] == "ready", (lines, proc.poll())
        while not said["cycled"].is_set() and proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGHUP)
            sent += 1
            if sent == 500:  # the cycles may end once they are done (and the storm ran through some of them)
                proc.stdin.write("enough\n")
                proc.stdin.flush()
            time.sleep(0.0002)
        alive = proc.poll()
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
            proc.wait()
    assert alive is None and proc.returncode == 0, (alive, proc.returncode, err[-2000:])
    assert lines == ["ready", "cycled"] and sent >= 500, (lines, sent)


# --- drift -----------------------------------------------------------------------------------------


def _transitions(flags: list[int], window: int, lo: float, hi: float) -> int:
    """Times the rolling escalation rate went out of [lo, hi] (judged once the window is full)."""
    on, count = False, 0
    for i in range(window, len(flags) + 1):
        rate = sum(flags[i - window:i]) / window
        out = not lo <= rate <= hi
        count += out and not on
        on = out
    return count


def test_drift_monitor_logs_once_per_transition(caplog):
    from prometheus_client import generate_latest

    from cascade.config import DriftConfig
    from cascade.drift import DriftMonitor
    from cascade.types import CascadeRecord

    mon = DriftMonitor(DriftConfig(window=4, escalation_rate=(0.0, 0.5)))

    def feed(escalated: bool) -> None:
        mon.observe(CascadeRecord(request_id="r", policy="p", created_at=0.0, tier="t", escalated=escalated,
                                  confidence=0.5))

    with caplog.at_level("INFO", logger="cascade.drift"):
        for e in [1, 1, 1, 0]:  # rate 0.75 once the window fills
            feed(bool(e))
        for e in [1, 1]:       # still out of band: no new line
            feed(bool(e))
        for e in [0, 0, 0, 0]:  # back in band
            feed(bool(e))
    lines = [r.getMessage() for r in caplog.records if r.name == "cascade.drift"]
    assert [ln.split(":")[0] for ln in lines] == ["drift alarm on", "drift alarm off"]
    assert 'cascade_drift_alarm{signal="escalation_rate"} 0.0' in generate_latest(mon.registry).decode()


def test_drift_ece_counts_each_request_once_with_its_latest_label():
    from cascade.config import DriftConfig
    from cascade.drift import DriftMonitor
    from cascade.types import CascadeRecord

    mon = DriftMonitor(DriftConfig(window=10, max_ece=0.5, min_labels=1))
    for i in range(3):
        mon.observe(CascadeRecord(request_id=f"r{i}", policy="p", created_at=0.0, tier="t", confidence=0.9))
    for _ in range(5):  # one user voting again and again is one label
        mon.observe_feedback("r0", 1)
    assert mon.state()["labelled"] == 1 and mon.values["ece"] == pytest.approx(0.1)
    mon.observe_feedback("r0", -1)  # a changed mind replaces the label
    assert mon.state()["labelled"] == 1 and mon.values["ece"] == pytest.approx(0.9)
    mon.observe_feedback("r1", 1)
    mon.observe_feedback("r0", 0)  # withdrawn
    assert mon.state()["labelled"] == 1 and mon.values["ece"] == pytest.approx(0.1)
    # a cache hit of r1's answer is labelled on its own, with r1's confidence: its 0 withdraws only its own
    mon.observe_feedback("h1", -1, answered_by="r1")
    assert mon.state()["labelled"] == 2 and mon.values["ece"] == pytest.approx(0.4)
    mon.observe_feedback("h1", 0, answered_by="r1")
    assert mon.state()["labelled"] == 1 and mon.values["ece"] == pytest.approx(0.1)


def test_drift_ece_alarm_ends_and_its_value_clears_when_labels_are_withdrawn():
    from prometheus_client import generate_latest

    from cascade.config import DriftConfig
    from cascade.drift import DriftMonitor
    from cascade.types import CascadeRecord

    mon = DriftMonitor(DriftConfig(window=10, max_ece=0.5, min_labels=2))
    for i in range(2):
        mon.observe(CascadeRecord(request_id=f"r{i}", policy="p", created_at=0.0, tier="t", confidence=0.9))
        mon.observe_feedback(f"r{i}", -1)
    assert mon.alarms["ece"] and mon.values["ece"] == pytest.approx(0.9)
    mon.observe_feedback("r0", 0)  # one label left: fewer than min_labels, no longer judged
    assert not mon.alarms["ece"] and mon.values["ece"] == pytest.approx(0.9)
    mon.observe_feedback("r1", 0)
    assert mon.values["ece"] is None
    assert 'cascade_drift_value{signal="ece"} NaN' in generate_latest(mon.registry).decode()
    # after a reset (a reload changed what decides), a request that started before it is left out
    mon.reset("reloaded")
    mon.observe(CascadeRecord(request_id="old", policy="p", created_at=mon._since - 1, tier="t", confidence=0.9))
    mon.observe(CascadeRecord(request_id="new", policy="p", created_at=mon._since + 1, tier="t", confidence=0.9))
    assert mon.state()["requests"] == 1 and mon._confidence.keys() == {"new"}


def test_drift_counts_feedback_on_answers_another_replica_served(tmp_path, serve_app, postgres):
    """Two replicas on one PostgreSQL ledger (as behind a load balancer): a thumbs-down posted to B on an
    answer A served is a label of B's rolling ECE, with the confidence the ledger holds for it, as on A. Before,
    B knew confidences of its own answers only, and dropped the label unseen: with N replicas each judged
    about 1/N of the labels. A pinned tier's answer (never observed) labels nothing there either."""
    from cascade.config import parse_config
    from tests.fault_server import FaultServerThread
    from tests.hosted import plain

    postgres.reset()
    body = {"model": "cascade", "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 4}

    def ece(url: str) -> str:
        return re.search(r'^cascade_drift_value\{signal="ece"\} (\S+)$', httpx.get(f"{url}/metrics").text,
                         re.M).group(1)

    with FaultServerThread(logprob=-0.05) as up:
        cfg = parse_config({"ledger": {"path": postgres.url}, "tiers": [plain("remote", up)],
                            "policies": {"cascade": {"chain": ["remote"]}},
                            "drift": {"window": 4, "max_ece": 0.2, "min_labels": 2}}, source="<test>", environ={})
        a, b = serve_app(cfg), serve_app(cfg)
        pinned = httpx.post(f"{a.url}/v1/chat/completions", json={**body, "model": "remote"}, timeout=30).json()
        httpx.post(f"{b.url}/v1/feedback", json={"request_id": pinned["id"], "score": -1}).raise_for_status()
        assert ece(b.url) == "NaN"
        ids = [httpx.post(f"{a.url}/v1/chat/completions", json=body, timeout=30).json()["id"] for _ in range(2)]
        for rid in ids:
            httpx.post(f"{b.url}/v1/feedback", json={"request_id": rid, "score": -1}).raise_for_status()
        on_b = ece(b.url)
        for rid in ids:
            httpx.post(f"{a.url}/v1/feedback", json={"request_id": rid, "score": -1}).raise_for_status()
        on_a = ece(a.url)
    assert on_a != "NaN" and float(on_a) > 0.9
    assert on_b == on_a


def test_drift_forgets_a_request_whose_row_was_made_cancelled():
    """A request counted answered whose row was made ``cancelled`` (its client left an answer in hand) leaves
    the windows, also when the correction is heard before the request is."""
    from cascade.config import DriftConfig
    from cascade.drift import DriftMonitor
    from cascade.types import CascadeRecord

    mon = DriftMonitor(DriftConfig(window=4, escalation_rate=(0.0, 0.5), max_cost_ratio=1.0))

    def feed(rid: str, escalated: bool) -> None:
        mon.observe(CascadeRecord(request_id=rid, policy="p", created_at=0.0, tier="t", escalated=escalated,
                                  cost_usd=1.5 if escalated else 0.2, baseline_cost_usd=1.0))

    for i, e in enumerate([0, 0, 1, 1]):
        feed(f"r{i}", bool(e))
    assert mon.alarms["escalation_rate"] is False and mon.values["escalation_rate"] == 0.5
    mon.forget("r0")
    assert mon.state()["requests"] == 3 and mon.values["escalation_rate"] == pytest.approx(2 / 3)
    assert mon.values["cost_ratio"] == pytest.approx(3.2 / 3)
    mon.forget("r4")  # heard before its request: not counted when it comes
    feed("r4", True)
    assert mon.state()["requests"] == 3
    feed("r5", False)
    assert mon.state()["requests"] == 4 and mon.values["escalation_rate"] == 0.5


def test_drift_judges_a_full_window_of_the_policies_answers_and_the_latest_labels():
    """Known answers at the edges: the escalation rate is judged only once the window is full, and a pinned
    tier's answers never enter it; a window that cost exactly what the last tier alone would have is no alarm
    (above it is); the ECE counts the latest ``window`` labels (the oldest go); feedback another replica
    passes on an answer served before this monitor started labels nothing (that process's monitor saw it)."""
    from cascade.config import DriftConfig
    from cascade.drift import DriftMonitor
    from cascade.types import CascadeRecord

    mon = DriftMonitor(DriftConfig(window=4, escalation_rate=(0.0, 0.5), max_cost_ratio=1.0))

    def feed(rid: str, escalated: bool, policy: str = "p") -> None:
        mon.observe(CascadeRecord(request_id=rid, policy=policy, created_at=time.time(), tier="t",
                                  escalated=escalated, cost_usd=1.0, baseline_cost_usd=1.0))

    feed("pinned", True, policy="t")  # a pinned tier (its policy is the tier): never escalates, never counted
    assert mon.state()["requests"] == 0
    for i in range(3):
        feed(f"r{i}", True)
    assert mon.values["escalation_rate"] == 1.0 and not mon.alarms["escalation_rate"]  # 3 of a window of 4
    feed("r3", True)
    assert mon.alarms["escalation_rate"]
    assert mon.values["cost_ratio"] == 1.0 and not mon.alarms["cost_ratio"]  # 4.0 / 4.0: not more
    mon.observe(CascadeRecord(request_id="r4", policy="p", created_at=time.time(), tier="t", cost_usd=1.5,
                              baseline_cost_usd=1.0))
    assert mon.values["cost_ratio"] == pytest.approx(4.5 / 4) and mon.alarms["cost_ratio"]

    mon = DriftMonitor(DriftConfig(window=2, max_ece=0.5, min_labels=1))
    for i, score in enumerate([-1, 1, 1]):
        mon.observe(CascadeRecord(request_id=f"r{i}", policy="p", created_at=time.time(), tier="t", confidence=0.9))
        mon.observe_feedback(f"r{i}", score)
    # r1 and r2, both right at 0.9 (r0's wrong label has left the window of 2): |0.9 - 1|
    assert list(mon._labelled) == ["r1", "r2"] and mon.values["ece"] == pytest.approx(0.1)
    mon.observe_feedback("elsewhere", -1, served=(0.9, mon._started - 60))  # served before this monitor
    assert list(mon._labelled) == ["r1", "r2"]
    mon.observe_feedback("elsewhere", -1, served=(0.9, mon._started + 1))
    assert list(mon._labelled) == ["r2", "elsewhere"] and mon.values["ece"] == pytest.approx(0.4)


async def test_a_reload_says_which_changes_need_a_restart(tmp_path):
    """A reload swaps thresholds and calibrators; a changed price, max_tokens or server limit needs a restart
    and is listed under not_applied (it was silently ignored: requests went on at the old price)."""
    from cascade.engine import Engine
    from cascade.recalibrate import reload_engine

    def cfg(price: float, max_tokens: int, threshold: float, body: int) -> dict[str, Any]:
        return {"server": {"max_body_bytes": body}, "ledger": {"path": str(tmp_path / "l.sqlite")},
                "tiers": [{"name": "r", "backend": "openai", "model": "m", "threshold": threshold,
                           "max_tokens": max_tokens, "price": {"input_per_1m": price, "output_per_1m": 1.0},
                           "options": {"base_url": "http://127.0.0.1:9/v1"}},
                          {"name": "s", "backend": "openai", "model": "m2", "options": {"base_url": "http://127.0.0.1:9/v1"}}],
                "policies": {"p": {"chain": ["r", "s"]}}}

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg(0.1, 8, 0.5, 4096)))
    from cascade.config import load_config

    engine = await Engine.open(load_config(path, environ={}), preload=False)
    try:
        path.write_text(yaml.safe_dump(cfg(0.1, 8, 0.7, 4096)))
        assert reload_engine(engine, str(path))["not_applied"] == []  # a threshold: applied
        assert engine.tiers["r"].config.threshold == 0.7
        path.write_text(yaml.safe_dump(cfg(50.0, 2, 0.7, 8192)))
        out = reload_engine(engine, str(path))
        assert out["not_applied"] == ["tier 'r': max_tokens, price", "section 'server': max_body_bytes"]
        assert engine.tiers["r"].config.price.input_per_1m == 0.1  # still the running one, and said so
    finally:
        await engine.close()


async def test_a_reload_warns_of_a_file_that_would_not_start_a_server(tmp_path):
    """A change that needs a restart is listed under not_applied; when the file could not start a server at all
    (a misspelt option, checked only as the backends are built), the reload says so now, not the next restart."""
    from cascade.config import load_config
    from cascade.engine import Engine
    from cascade.recalibrate import reload_engine

    def cfg(options: dict[str, Any], price: bool = True) -> dict[str, Any]:
        tier = {"name": "r", "backend": "openai", "model": "m", "options": options}
        if price:
            tier["price"] = {"input_per_1m": 0.1, "output_per_1m": 1.0}
        return {"ledger": {"path": str(tmp_path / "l.sqlite")}, "tiers": [tier], "policies": {"p": {"chain": ["r"]}}}

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg({"base_url": "http://127.0.0.1:9/v1"})))
    engine = await Engine.open(load_config(path, environ={}), preload=False)
    try:
        path.write_text(yaml.safe_dump(cfg({"base_ur": "http://127.0.0.1:9/v1"})))
        out = reload_engine(engine, str(path))
        assert out["not_applied"][0].startswith("tier 'r': options")
        assert out["warnings"] == ["this file would not start a server: tier 'r': unknown openai option(s) "
                                   "['base_ur']; known: base_url, api_key, api_key_env, endpoint, extra_body, "
                                   "logprobs, reasoning, stream_usage"]
        path.write_text(yaml.safe_dump(cfg({"base_url": "http://127.0.0.1:9/v1"}, price=False)))
        out = reload_engine(engine, str(path))
        assert out["not_applied"] == ["tier 'r': price"]
        assert [w.split(":")[0] for w in out["warnings"]] == ["tier 'r' calls a hosted API and has no price"]
        if importlib.util.find_spec("vllm") is None:  # a backend this host cannot load: said, the rest applied
            new = cfg({"base_url": "http://127.0.0.1:9/v1"})
            new["tiers"][0]["threshold"] = 0.25
            new["tiers"].append({"name": "v", "backend": "vllm", "model": "m", "price": {"input_per_1m": 1.0}})
            path.write_text(yaml.safe_dump(new))
            out = reload_engine(engine, str(path))
            assert out["not_applied"] == ["new tier 'v'"]
            assert out["warnings"][0].startswith("this file would not start a server: backend 'vllm' cannot be")
            assert engine.tiers["r"].config.threshold == 0.25
    finally:
        await engine.close()


async def test_a_reload_keeps_the_calibration_of_a_tier_whose_model_changes_and_names_every_unapplied_setting(
        tmp_path):
    """A tier switched to another model with the new model's threshold and calibrator: the model needs a
    restart, so they wait for it too (they judged the old model's answers). A port or ledger path changed in
    the file is listed (it was silently skipped), unless `cascade serve --port/--ledger` gave it."""
    import argparse

    from cascade.commands import _with_cli_overrides
    from cascade.config import load_config
    from cascade.engine import Engine
    from cascade.recalibrate import reload_engine

    remote = {"backend": "openai", "options": {"base_url": "http://127.0.0.1:9/v1"}}

    def write(model: str, threshold: float, port: int, ledger: str) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({
            "server": {"port": port}, "ledger": {"path": str(tmp_path / ledger)},
            "tiers": [{"name": "r", "model": model, "threshold": threshold, **remote},
                      {"name": "s", "model": "big", **remote}],
            "policies": {"p": {"chain": ["r", "s"], "thresholds": {"r": threshold}}}}))
        return str(path)

    engine = await Engine.open(load_config(write("m", 0.5, 8000, "l.sqlite"), environ={}))
    try:
        out = reload_engine(engine, write("m2", 0.9, 8001, "other.sqlite"))
        assert out["not_applied"] == [
            "tier 'r': model (so its threshold and calibrators, here and in policies, are kept too)",
            "section 'server': port", "section 'ledger': path"]
        assert engine.tiers["r"].config.threshold == 0.5 and engine.resolve("p").thresholds[0] == 0.5
        out = reload_engine(engine, write("m", 0.9, 8000, "l.sqlite"))  # back to the running model: applied
        assert out["not_applied"] == [] and engine.resolve("p").thresholds[0] == 0.9
    finally:
        await engine.close()
    given = argparse.Namespace(host=None, port=8100, ledger=str(tmp_path / "cli.sqlite"))
    engine = await Engine.open(_with_cli_overrides(load_config(write("m", 0.5, 8000, "l.sqlite"), environ={}), given))
    try:  # what the command line gave stays: the file's change to it is no change to this server
        assert reload_engine(engine, write("m", 0.5, 8001, "other.sqlite"))["not_applied"] == []
    finally:
        await engine.close()


def test_a_refused_reload_is_a_422_and_keeps_the_running_config(tmp_path, caplog):
    from cascade.config import load_config
    from serving import create_app
    from tests.conftest import ServerThread

    good = {"ledger": {"path": str(tmp_path / "l.sqlite")},
            "tiers": [{"name": "r", "backend": "openai", "model": "m", "threshold": 0.5,
                       "options": {"base_url": "http://127.0.0.1:9/v1"}}],
            "policies": {"p": {"chain": ["r"]}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(good))
    with ServerThread(create_app(load_config(path, environ={}), config_path=str(path))) as srv, \
            caplog.at_level("ERROR", logger="cascade.serving"):
        for bad in ("tiers: [", yaml.safe_dump({**good, "tiers": [{**good["tiers"][0], "threshold": 1.5}]})):
            path.write_text(bad)
            r = httpx.post(srv.url + "/admin/reload")
            assert r.status_code == 422 and r.json()["error"]["code"] == "reload_refused", r.text
            assert "the previous configuration stays in use" in r.json()["error"]["message"]
        assert sum("reload refused" in m for m in caplog.messages) == 2
        path.write_text(yaml.safe_dump({**good, "tiers": [{**good["tiers"][0], "threshold": 0.25}]}))
        r = httpx.post(srv.url + "/admin/reload")
        assert r.status_code == 200 and r.json()["tiers"]["r"]["changed"] is True


def test_a_reload_onto_a_link_to_a_missing_version_names_the_version(tmp_path, serve_app, caplog):
    """A rollback that points the tier's link at a version that is gone (a typo in `ln -sfn small.v9.json`) was
    refused as "artifact not found: .../small.json", a file `ls` shows there; the refusal now names the link's
    target. The running calibrator stays, and a good link reloads."""
    from calibration.calibrators import TemperatureScaling, save_calibrator
    from cascade.config import load_config

    cal = tmp_path / "calibrators"
    save_calibrator(TemperatureScaling("mean_logprob", 2.0), cal / "small.v1.json")
    (cal / "small.json").symlink_to("small.v1.json")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"ledger": {"path": str(tmp_path / "l.sqlite")}, "tiers": [
        {"name": "small", "backend": "openai", "model": "m", "threshold": 0.5, "calibrator": {"artifact": str(
            cal / "small.json")}, "options": {"base_url": "http://127.0.0.1:9/v1"}}],
        "policies": {"p": {"chain": ["small"]}}}))
    srv = serve_app(load_config(path, environ={}), config_path=str(path))
    (cal / "small.json").unlink()
    (cal / "small.json").symlink_to("small.v9.json")
    with caplog.at_level("ERROR", logger="cascade.serving"):
        r = httpx.post(srv.url + "/admin/reload")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"] == (
        "reload refused, the previous configuration stays in use: tiers.small.calibrator: calibrator artifact not "
        f"found: {cal / 'small.json'} is a link to small.v9.json, which is not there")
    assert any("is a link to small.v9.json" in m for m in caplog.messages)
    (cal / "small.json").unlink()
    (cal / "small.json").symlink_to("small.v1.json")
    r = httpx.post(srv.url + "/admin/reload")
    assert r.status_code == 200 and r.json()["tiers"]["small"]["changed"] is False, r.text


def test_an_open_server_refuses_a_reload_a_browser_sends_from_another_site(tmp_path, serve_app):
    """With no keys nothing else stops a web page from reloading the config through its visitor's browser (an
    HTML form's POST, a no-cors fetch: no preflight); browsers name the site, curl and scripts do not."""
    from cascade.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"ledger": {"path": str(tmp_path / "l.sqlite")}, "policies": {"p": {"chain": ["r"]}},
                                    "tiers": [{"name": "r", "backend": "openai", "model": "m",
                                               "options": {"base_url": "http://127.0.0.1:9/v1"}}]}))
    srv = serve_app(load_config(path, environ={}), config_path=str(path))
    form = {"content-type": "application/x-www-form-urlencoded"}
    for headers in ({**form, "origin": "https://evil.example", "sec-fetch-site": "cross-site"},
                    {**form, "origin": "null"}, {"sec-fetch-site": "same-site"}):
        r = httpx.post(srv.url + "/admin/reload", headers=headers, content=b"x=1")
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_request", (headers, r.text)
    for headers in ({}, {"origin": srv.url, "sec-fetch-site": "same-origin"}):  # curl; the server's own /docs page
        assert httpx.post(srv.url + "/admin/reload", headers=headers).status_code == 200


async def test_a_removed_tier_and_one_awaiting_a_restart_keep_their_calibrators_as_they_run(tmp_path):
    """A tier removed from the file runs on until the restart: its artifact, removed with it, is not re-read
    (the reload was refused until a restart). A tier whose model changes keeps the calibrator it runs with,
    even when the artifact file now holds the new model's."""
    from calibration.calibrators import TemperatureScaling, save_calibrator
    from cascade.config import load_config
    from cascade.engine import Engine
    from cascade.recalibrate import reload_engine

    remote = {"backend": "openai", "options": {"base_url": "http://127.0.0.1:9/v1"}}
    save_calibrator(TemperatureScaling("mean_logprob", 1.5), tmp_path / "gone.json")
    save_calibrator(TemperatureScaling("mean_logprob", 2.0), tmp_path / "r.json")

    def write(tiers: list[dict[str, Any]]) -> str:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({
            "ledger": {"path": str(tmp_path / "l.sqlite")}, "tiers": tiers,
            "policies": {"p": {"chain": [t["name"] for t in tiers]}}}))
        return str(tmp_path / "c.yaml")

    gone = {"name": "gone", "model": "g", "calibrator": {"artifact": "gone.json"}, **remote}
    r = {"name": "r", "model": "m", "calibrator": {"artifact": "r.json"}, **remote}
    engine = await Engine.open(load_config(write([gone, r]), environ={}))
    try:
        (tmp_path / "gone.json").unlink()
        save_calibrator(TemperatureScaling("mean_logprob", 9.0), tmp_path / "r.json")  # the new model's
        out = reload_engine(engine, write([{**r, "model": "m2"}]))
        assert out["not_applied"][:2] == [
            "tier 'gone' was removed",
            "tier 'r': model (so its threshold and calibrators, here and in policies, are kept too)"]
        assert engine.tiers["gone"].calibrator.temperature == 1.5
        assert engine.tiers["r"].calibrator.temperature == 2.0
    finally:
        await engine.close()


async def test_a_removed_policy_and_one_awaiting_a_restart_keep_their_calibrators_as_they_run(tmp_path):
    """A policy removed from the file, or whose chain changed, runs on as it is until the restart, its own
    calibrators as loaded: its artifact, removed with it, is not re-read (the whole reload was refused, a
    leaked key's revocation with it, until a restart)."""
    from calibration.calibrators import TemperatureScaling, save_calibrator
    from cascade.config import load_config
    from cascade.engine import Engine
    from cascade.recalibrate import reload_engine

    remote = {"backend": "openai", "options": {"base_url": "http://127.0.0.1:9/v1"}}
    for name, temperature in (("task", 1.5), ("other", 2.5)):
        save_calibrator(TemperatureScaling("mean_logprob", temperature), tmp_path / f"{name}.json")

    def write(policies: dict[str, Any], threshold: float) -> str:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({
            "ledger": {"path": str(tmp_path / "l.sqlite")}, "policies": policies,
            "tiers": [{"name": "r", "model": "m", "threshold": threshold, **remote},
                      {"name": "s", "model": "n", **remote}]}))
        return str(tmp_path / "c.yaml")

    own = {"calibrators": {"r": {"artifact": "task.json"}}}
    engine = await Engine.open(load_config(write({"p": {"chain": ["r", "s"]}, "task": {"chain": ["r", "s"], **own},
                                                  "other": {"chain": ["r", "s"], "calibrators": {
                                                      "r": {"artifact": "other.json"}}}}, 0.5), environ={}))
    try:
        (tmp_path / "task.json").unlink()
        (tmp_path / "other.json").unlink()
        out = reload_engine(engine, write({"p": {"chain": ["r", "s"]}, "other": {"chain": ["s"]}}, 0.25))
        assert out["not_applied"] == ["policy 'other' changed its chain", "policy 'task' was removed"]
        assert engine.tiers["r"].config.threshold == 0.25  # the rest of the file is applied
        assert engine.policy_calibrators["task"]["r"].temperature == 1.5
        assert engine.policy_calibrators["other"]["r"].temperature == 2.5
        assert engine.resolve("task").calibrators[0].temperature == 1.5
    finally:
        await engine.close()


async def test_running_shadows_a_reload_cannot_replace_keep_their_calibrators_as_they_run(tmp_path):
    """The file's new shadows name a tier the server runs only after a restart: the running shadows stay, their
    own calibrators as loaded; an artifact removed with one of them is not re-read (the whole reload was
    refused, the rest of the file with it)."""
    from calibration.calibrators import TemperatureScaling, save_calibrator
    from cascade.config import load_config
    from cascade.engine import Engine
    from cascade.recalibrate import reload_engine

    remote = {"backend": "openai", "options": {"base_url": "http://127.0.0.1:9/v1"}}
    save_calibrator(TemperatureScaling("mean_logprob", 1.5), tmp_path / "old.json")

    def write(tiers: list[str], shadows: dict[str, Any], threshold: float) -> str:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({
            "ledger": {"path": str(tmp_path / "l.sqlite")}, "policies": {"p": {"chain": ["r", "s"]}},
            "tiers": [{"name": n, "model": n, "threshold": threshold, **remote} for n in tiers], "shadows": shadows}))
        return str(tmp_path / "c.yaml")

    engine = await Engine.open(load_config(write(["r", "s"], {"old": {"of": "p", "calibrators": {
        "r": {"artifact": "old.json"}}}}, 0.5), environ={}))
    try:
        (tmp_path / "old.json").unlink()
        out = reload_engine(engine, write(["r", "s", "x"], {"new": {"of": "p", "chain": ["x"]}}, 0.25))
        assert out["not_applied"] == ["new tier 'x'", "shadows (they name tiers, policies or user tiers this server "
                                                      "does not run)"]
        assert out["shadows"] == ["old"] and engine.tiers["r"].config.threshold == 0.25
        assert engine.shadows.by_name["old"].calibrators["r"].temperature == 1.5
        assert engine.shadows.by_name["old"].thresholds == (0.25, 0.25)  # judged with the thresholds now in force
    finally:
        await engine.close()


def test_a_reload_revokes_a_key_and_changes_a_user_tiers_limits_at_once(tmp_path):
    """Keys and user tiers are read at each request: a reload applies them (a leaked key revoked without a
    restart), but never one that would open a keyed server to anyone or strand a key without its user tier."""
    from cascade.config import load_config
    from serving import create_app
    from serving.auth import hash_key
    from tests.conftest import ServerThread
    from tests.fault_server import FaultServerThread

    ops, leaked = "sk-ops-0123456789abcdef", "sk-leaked-0123456789abcdef"
    path = tmp_path / "c.yaml"

    def write(keys: list[tuple[str, str, str]], app_tier: dict[str, Any]) -> None:
        path.write_text(yaml.safe_dump({
            "ledger": {"path": str(tmp_path / "l.sqlite")},
            "tiers": [{"name": "r", "backend": "openai", "model": "m", "options": {"base_url": upstream.base_url}}],
            "policies": {"p": {"chain": ["r"]}},
            "user_tiers": {"ops": {"admin": True}, "app": app_tier},
            "auth": {"keys": [{"id": i, "sha256": hash_key(k), "user_tier": t} for i, k, t in keys]}}))

    def ask(key: str) -> int:
        return httpx.post(srv.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                          json={"model": "p", "messages": [{"role": "user", "content": "hi"}]}).status_code

    def reload() -> dict[str, Any]:
        r = httpx.post(srv.url + "/admin/reload", headers={"authorization": f"Bearer {ops}"})
        assert r.status_code == 200, r.text
        return r.json()

    with FaultServerThread() as upstream:
        write([("ops", ops, "ops"), ("leaked", leaked, "app")], {})
        with ServerThread(create_app(load_config(path, environ={}), config_path=str(path))) as srv:
            assert ask(leaked) == 200
            write([("ops", ops, "ops")], {"requests_per_minute": 1})
            assert reload()["not_applied"] == []
            assert ask(leaked) == 401 and ask(ops) == 200  # revoked at once
            write([("ops", ops, "ops"), ("leaked", leaked, "app")], {"requests_per_minute": 1})
            reload()
            assert ask(leaked) == 200 and ask(leaked) == 429  # the new limit holds
            write([], {})
            assert reload()["not_applied"] == [
                "section 'auth' (without keys the server would be open to anyone: restart for that, or set "
                "auth.required)"]
            assert ask("sk-anyone-0123456789abcdef") == 401 and ask(ops) == 200
            # the last admin key moved to a user tier without admin: applied (as a leaked one must be), and said
            write([("ops", ops, "app")], {})
            out = reload()
            assert out["not_applied"] == [] and out["warnings"] == [
                "no key may call POST /admin/reload any more (no user tier with admin: true has a key); "
                "SIGHUP still reloads"]
            assert httpx.post(srv.url + "/admin/reload", headers={"authorization": f"Bearer {ops}"}).status_code == 403


async def test_keys_added_to_an_open_server_without_an_admin_are_applied_and_warned_of(tmp_path):
    from cascade.config import load_config
    from cascade.engine import Engine
    from cascade.recalibrate import reload_engine
    from serving.auth import hash_key

    def cfg(admin: bool | None) -> dict[str, Any]:
        keys = [] if admin is None else [{"id": "k", "sha256": hash_key("sk-k-0123456789abcdef"), "user_tier": "u"}]
        return {"ledger": {"path": str(tmp_path / "l.sqlite")},
                "tiers": [{"name": "r", "backend": "openai", "model": "m",
                           "options": {"base_url": "http://127.0.0.1:9/v1"}}],
                "policies": {"p": {"chain": ["r"]}}, "user_tiers": {"u": {"admin": bool(admin)}},
                "auth": {"keys": keys}}

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg(None)))          # open: anyone may reload
    engine = await Engine.open(load_config(path, environ={}), preload=False)
    try:
        path.write_text(yaml.safe_dump(cfg(True)))
        assert reload_engine(engine, str(path))["warnings"] == []   # the new key may reload
        path.write_text(yaml.safe_dump(cfg(False)))
        out = reload_engine(engine, str(path))
        assert out["not_applied"] == [] and out["warnings"][0].startswith("no key may call POST /admin/reload")
        assert not engine.config.user_tiers["u"].admin
    finally:
        await engine.close()


async def test_a_reload_never_leaves_a_shadow_naming_a_user_tier_the_server_lacks(tmp_path):
    """Shadows and user tiers are applied apart, each only when it can be: a new shadow for a user tier that is
    held back stays out, and a user tier the running shadows need stays in (with the keys that need it gone)."""
    from cascade.config import load_config
    from cascade.engine import Engine
    from cascade.recalibrate import reload_engine
    from serving.auth import hash_key

    up = {"backend": "openai", "options": {"base_url": "http://127.0.0.1:9/v1"},
          "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}}

    def cfg(user_tiers: dict[str, Any], shadows: dict[str, Any], keys: list[tuple[str, str]]) -> dict[str, Any]:
        return {"ledger": {"path": str(tmp_path / "l.sqlite")},
                # t3 is new to the running server: a tier added needs a restart, so anything naming it waits too
                "tiers": [{"name": "r", "model": "m", **up}, {"name": "s", "model": "m2", **up},
                          {"name": "t3", "model": "m3", **up}],
                "policies": {"p": {"chain": ["r", "s"]}}, "user_tiers": user_tiers, "shadows": shadows,
                "auth": {"keys": [{"id": i, "sha256": hash_key(f"sk-{i}-0123456789abcdef"), "user_tier": t}
                                  for i, t in keys]}}

    path = tmp_path / "c.yaml"
    running = cfg({"beta": {}, "free": {}}, {"strict": {"of": "p", "thresholds": {"r": 0.9}, "user_tiers": ["beta"]}},
                  [("a", "free")])
    running["tiers"].pop()
    path.write_text(yaml.safe_dump(running))
    engine = await Engine.open(load_config(path, environ={}), preload=False)
    try:
        # a new user tier held back (it allows t3), and a new shadow evaluated on its requests
        path.write_text(yaml.safe_dump(cfg({"beta": {}, "free": {}, "gamma": {"allowed_models": ["t3"]}},
                                           {"g": {"of": "p", "user_tiers": ["gamma"]}}, [("a", "free")])))
        out = reload_engine(engine, str(path))
        assert "shadows (they name tiers, policies or user tiers this server does not run)" in out["not_applied"]
        assert set(engine.config.shadows) == {"strict"} and set(engine.config.user_tiers) == {"beta", "free"}
        # beta removed, while the new shadows cannot apply (their chain needs t3): the running shadow keeps beta,
        # and the new keys, which need the new user tier delta, wait with it
        path.write_text(yaml.safe_dump(cfg({"free": {}, "delta": {}}, {"x": {"of": "p", "chain": ["r", "t3"]}},
                                           [("a", "free"), ("b", "delta")])))
        out = reload_engine(engine, str(path))
        assert out["not_applied"][-3:] == [
            "shadows (they name tiers, policies or user tiers this server does not run)",
            "section 'user_tiers' (the running shadows need 'beta')",
            "section 'auth' (its keys need the user tiers held back)"]
        assert set(engine.config.user_tiers) == {"beta", "free"} and [k.id for k in engine.config.auth.keys] == ["a"]
        assert set(engine.config.shadows) == {"strict"}
        assert out["warnings"] == []
    finally:
        await engine.close()


async def test_a_reload_applies_no_shadow_whose_tiers_its_running_chain_lacks(tmp_path):
    """A file that gives a policy a new chain (applied only at the next restart) and a shadow of it tuning a tier
    of that chain: the shadow walks the running chain, which lacks the tier. A calibrator for a tier new to the
    server failed the reload with a bare KeyError (an internal error, the file's other changes lost with it),
    and a threshold was applied and ignored, the shadow judged as its live policy while the reload said it was
    in. Now such shadows wait for the restart, said under not_applied, and the rest of the file applies."""
    from cascade.config import load_config
    from cascade.engine import Engine
    from cascade.recalibrate import reload_engine

    up = {"backend": "openai", "model": "m", "options": {"base_url": "http://127.0.0.1:9/v1"},
          "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}}

    def cfg(tiers: list[str], chain: list[str], shadows: dict[str, Any], threshold: float = 0.5) -> dict[str, Any]:
        return {"ledger": {"path": str(tmp_path / "l.sqlite")},
                "tiers": [{"name": t, **up, "threshold": threshold} for t in tiers],
                "policies": {"p": {"chain": chain}}, "shadows": shadows}

    held = "shadows (they name tiers, policies or user tiers this server does not run)"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg(["r", "s", "m"], ["r", "s"], {})))
    engine = await Engine.open(load_config(path, environ={}), preload=False)
    try:
        cal = {"method": "temperature", "params": {"temperature": 2.0}}
        for new, shadow in (("t3", {"calibrators": {"t3": cal}}),  # t3: new to the server
                            ("m", {"thresholds": {"m": 0.3}}),     # m: runs here, not in p's running chain
                            ("m", {"calibrators": {"m": cal}})):
            tiers = ["r", "s", "m"] + ([new] if new == "t3" else [])
            path.write_text(yaml.safe_dump(cfg(tiers, ["r", new, "s"], {"x": {"of": "p", **shadow}}, threshold=0.6)))
            out = reload_engine(engine, str(path))
            assert "policy 'p' changed its chain" in out["not_applied"] and held in out["not_applied"]
            assert out["shadows"] == [] and not engine.shadows.policies
            assert engine.tiers["r"].config.threshold == 0.6  # the rest of the file applied
        # with the policy's chain as the server runs it, the same shadow applies
        path.write_text(yaml.safe_dump(cfg(["r", "s", "m"], ["r", "s"], {"x": {"of": "p", "thresholds": {"s": 0.3}}})))
        out = reload_engine(engine, str(path))
        assert held not in out["not_applied"] and out["shadows"] == ["x"]
        assert [(p.chain, p.thresholds) for p in engine.shadows.policies] == [(("r", "s"), (0.5, 0.3))]
    finally:
        await engine.close()


def test_recalibrate_writes_beside_the_configured_artifact_and_warns_when_the_link_is_not_read(traffic, tmp_path,
                                                                                               capsys):
    """Without --out the new version goes beside the artifact the config reads, so --activate's link is the
    one a reload uses; a link the config does not read is said, not left to a reload that changes nothing."""
    from calibration.calibrators import TemperatureScaling, save_calibrator
    from cascade.cli import main

    cfg = yaml.safe_load(traffic.config_path.read_text())
    cfg["tiers"][0]["calibrator"] = {"artifact": "cal/small.json"}  # relative to the config file
    save_calibrator(TemperatureScaling("mean_logprob", 1.0), tmp_path / "cal" / "small.json")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    args = ["recalibrate", "--from-ledger", "--config", str(tmp_path / "c.yaml"), "--tier", "small",
            "--min-samples", "6", "--activate", "--json"]
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["artifact"] == str(tmp_path / "cal" / "small.v1.json") and rep["warning"] is None
    assert rep["activated"] == str(tmp_path / "cal" / "small.json")
    assert main([*args, "--out", str(tmp_path / "elsewhere")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["activated"] == str(tmp_path / "elsewhere" / "small.json")
    assert "the config reads tier 'small'" in rep["warning"] and "cal/small.json" in rep["warning"]


def test_drift_alarm_when_the_cascade_costs_more_than_the_last_tier_alone(caplog):
    """The number to watch: once the window's spend is above its last-tier-alone baseline (escalations pay
    twice), the cost_ratio alarm goes on, once, and off when the traffic is cheap again."""
    from prometheus_client import generate_latest

    from cascade.config import DriftConfig
    from cascade.drift import DriftMonitor
    from cascade.types import CascadeRecord

    mon = DriftMonitor(DriftConfig(window=4, max_cost_ratio=1.0))
    # every signal has its series from the start, NaN until it has a value
    assert 'cascade_drift_value{signal="cost_ratio"} NaN' in generate_latest(mon.registry).decode()

    def feed(cost: float, baseline: float = 1.0) -> None:
        mon.observe(CascadeRecord(request_id="r", policy="p", created_at=0.0, tier="t", cost_usd=cost,
                                  baseline_cost_usd=baseline, escalated=cost > baseline))

    with caplog.at_level("INFO", logger="cascade.drift"):
        for c in [0.2, 1.3, 1.3, 1.3]:  # 4.1 / 4: the small tier's answers did not pay for the escalations
            feed(c)
        assert mon.alarms["cost_ratio"] and mon.values["cost_ratio"] == pytest.approx(1.025)
        feed(1.3)                       # still above: no new line
        for c in [0.2, 0.2, 0.2]:       # 1.9 / 4
            feed(c)
    lines = [r.getMessage() for r in caplog.records if r.name == "cascade.drift"]
    assert [ln.split(":")[0] for ln in lines] == ["drift alarm on", "drift alarm off"]
    assert "cost 1.02x what the last tier alone would have" in lines[0]
    text = generate_latest(mon.registry).decode()
    assert 'cascade_drift_alarm{signal="cost_ratio"} 0.0' in text
    assert 'cascade_drift_value{signal="cost_ratio"} 0.475' in text
    for _ in range(4):  # a last tier priced at 0: any spend before it is a cost the last tier alone avoids
        feed(0.2, baseline=0.0)
    assert mon.alarms["cost_ratio"] and mon.values["cost_ratio"] == float("inf")


# --- what the labels can and cannot say ------------------------------------------------------------------


def _synthetic_config(tmp_path: Path, policy_calibrator: float | None = None):
    """Tiers small (temperature 1 on mean_logprob, from an artifact) and large; policy cascade, with its own
    temperature for small when ``policy_calibrator`` is given."""
    from calibration.calibrators import TemperatureScaling, save_calibrator
    from cascade.config import parse_config

    art = save_calibrator(TemperatureScaling("mean_logprob", 1.0), tmp_path / "cal" / "small.json")
    policy: dict[str, Any] = {"chain": ["small", "large"]}
    if policy_calibrator is not None:
        own = save_calibrator(TemperatureScaling("mean_logprob", policy_calibrator), tmp_path / "cal" / "own.json")
        policy["calibrators"] = {"small": {"artifact": str(own)}}
    return parse_config({"ledger": {"path": str(tmp_path / "l.sqlite")},
                         "tiers": [tier("small", calibrator={"artifact": str(art)}), tier("large")],
                         "policies": {"cascade": policy}}, environ={})


def _synthetic_ledger(tmp_path: Path, n: int = 400):
    """A ledger where the small tier's confidence is exactly right (temperature 1 on mean_logprob) and the live
    threshold is 0.5: below it the small tier escalated and the large tier (always right) answered; above it
    the small answer was kept, with no feedback. Written through the ledger's own API."""
    import math
    import random
    import time

    from cascade.ledger import Ledger
    from cascade.types import Attempt, CascadeRecord

    cfg = _synthetic_config(tmp_path)
    ledger = Ledger(tmp_path / "l.sqlite").open_sync()
    rng, t0 = random.Random(1), time.time() - 3600
    kept_ids = []
    for i in range(n):
        p = rng.uniform(0.05, 0.95)
        text = "right" if rng.random() < p else f"wrong {i}"
        small = Attempt(index=0, tier="small", model=TEST_MODEL, backend="transformers", cost_usd=1e-6,
                        confidence=p, features={"mean_logprob": math.log(p)}, text=text)
        if p < 0.5:
            small.decision = "escalate"
            large = Attempt(index=1, tier="large", model=TEST_MODEL, backend="transformers", cost_usd=1e-5,
                            confidence=0.99, features={"mean_logprob": -0.01}, text="right", decision="final",
                            kept=True)
            attempts, served = [small, large], "large"
        else:
            small.decision, small.kept = "accept", True
            attempts, served = [small], "small"
            kept_ids.append((f"r{i}", text))
        ledger.record_sync(CascadeRecord(request_id=f"r{i}", policy="cascade", created_at=t0 + i, tier=served,
                                         escalated=served == "large", attempts=attempts,
                                         cost_usd=sum(a.cost_usd for a in attempts)))
    return cfg, ledger, kept_ids


def test_agreement_labels_alone_are_an_extrapolation_said_and_not_activated(tmp_path):
    """Agreement labels exist only where the tier escalated (below its threshold): a refit on them alone is
    warned of, and --activate refused, until the answers it keeps are labelled too (here by a sampled shadow
    that bought the large tier's answer on them)."""
    from cascade.errors import DataError
    from cascade.recalibrate import recalibrate
    from cascade.types import Attempt

    cfg, ledger, kept_ids = _synthetic_ledger(tmp_path)
    try:
        rep = recalibrate(cfg, ledger, tier="small", method="platt", out=str(tmp_path / "out"))
        cov = rep["coverage"]
        assert rep["labels"]["agreement"] == rep["n"] and cov["kept_labelled"] == 0
        assert cov["labelled_range"][1] < math.log(0.5) and cov["outside_share"] > 0.4
        assert any("extrapolated" in w for w in rep["fit_warnings"])
        with pytest.raises(DataError, match="--activate refused"):
            recalibrate(cfg, ledger, tier="small", method="platt", out=str(tmp_path / "out"), do_activate=True)
        assert not (tmp_path / "out" / "small.json").exists()
        # a sampled shadow's call of the large tier on the kept answers: agreement for them too
        for rid, _ in kept_ids:
            big = Attempt(index=0, tier="large", model="l", backend="transformers", cost_usd=1e-5, confidence=0.99,
                          features={"mean_logprob": -0.01}, text="right", decision="final", kept=True)
            ledger._shadow_sample_sync(rid, 0.0, {"shadow": "probe", "status": "known", "tier": "large",
                                                  "escalated": True, "cost_usd": 1e-5, "diverges": True,
                                                  "reason": "sampled", "sampled": True}, [big], [0.0])
        # only a stronger tier's answer labels: the large tier is after small in the chain; nothing is after large
        from cascade.recalibrate import labelled_answers

        assert not any(r["kept"] for r in labelled_answers(ledger, "small"))
        assert sum(r["kept"] for r in labelled_answers(ledger, "small", stronger=("large",))) == len(kept_ids)
        rep = recalibrate(cfg, ledger, tier="small", method="platt", out=str(tmp_path / "out"), do_activate=True)
    finally:
        ledger.close_sync()
    assert rep["coverage"]["kept_labelled"] == len(kept_ids) and rep["coverage"]["outside_share"] == 0
    assert not any("extrapolated" in w for w in rep["fit_warnings"]) and rep["activated"]
    # with the whole range labelled, the refit is close to the truth (p = exp(mean_logprob): a = 1, b = 0)
    assert rep["params"]["a"] == pytest.approx(1.0, abs=0.35)


def test_feedback_on_the_served_answer_labels_an_identical_earlier_one(tmp_path):
    """A thumbs-down on the large tier's answer is also one on the small tier's identical answer (agreement
    alone would call it right); a thumbs-up on a different served answer makes the small one wrong; a
    thumbs-down on a different one leaves it unlabelled."""
    from cascade.recalibrate import labelled_answers

    cfg, ledger, _ = _synthetic_ledger(tmp_path, n=60)
    try:
        esc = [r for r in labelled_answers(ledger, "small") if not r["kept"]]
        same = next(r["request_id"] for r in esc if r["label"] == 1)  # small said "right", as large did
        diff_up, diff_down = [r["request_id"] for r in esc if r["label"] == 0][:2]
        for rid, score in ((same, -1), (diff_up, 1), (diff_down, -1)):
            ledger._feedback_sync(rid, score, None)
        got = {r["request_id"]: (r["label"], r["source"]) for r in labelled_answers(ledger, "small")}
    finally:
        ledger.close_sync()
    assert got[same] == (0, "feedback") and got[diff_up] == (0, "feedback") and diff_down not in got


def test_recalibrate_since_fits_on_the_answers_of_requests_made_since_only(tmp_path):
    """--since: only the answers of requests created since then are labelled and fitted on (a refit after a
    prompt or model change must not learn from the traffic before it), and the coverage counts that window."""
    from cascade.recalibrate import labelled_answers, recalibrate

    cfg, ledger, _ = _synthetic_ledger(tmp_path)  # r<i> created at t0 + i, 400 requests
    try:
        since = ledger.execute("SELECT MIN(created_at) FROM requests")[0][0] + 200
        every = labelled_answers(ledger, "small")
        recent = labelled_answers(ledger, "small", since=since)
        rep = recalibrate(cfg, ledger, tier="small", method="platt", since=since, out=str(tmp_path / "out"))
    finally:
        ledger.close_sync()
    expected = {r["request_id"] for r in every if int(r["request_id"][1:]) >= 200}
    assert 50 < len(expected) < len(every) and {r["request_id"] for r in recent} == expected
    assert rep["n"] == len(expected) and rep["coverage"]["answers"] == 200


def test_the_held_out_slice_holds_both_outcomes_however_few_of_one_there_are():
    """The split is stratified: a class of 3 answers at a 10% holdout (0.3 of an answer) still gives the held-out
    slice one and the fit two, so the held-out ECE judges both outcomes; 10 of the other give 1 and 9."""
    from cascade.recalibrate import _split

    labels = np.array([0, 0, 0] + [1] * 10)
    train, test = _split(len(labels), 0.1, 0, labels)
    assert sorted(labels[test].tolist()) == [0, 1] and sorted(labels[train].tolist()) == [0, 0] + [1] * 9
    assert sorted([*train.tolist(), *test.tolist()]) == list(range(13))


def test_the_next_version_follows_the_highest_there_not_the_count(tmp_path):
    """Versions 1 and 5 in the directory (2 to 4 deleted): the next is 6, not 3 (their count plus one), a
    number once used that a link or a config may still name; nor is it below the version the tier serves."""
    from cascade.recalibrate import artifact_path

    for v in (1, 5):
        (tmp_path / f"small.v{v}.json").write_text("{}")
    (tmp_path / "large.v9.json").write_text("{}")  # another tier's versions count for it alone
    assert artifact_path(tmp_path, "small", default_dir=tmp_path / "unused") == (tmp_path / "small.v6.json", 6)
    assert artifact_path(tmp_path, "small", default_dir=tmp_path, previous_version=7)[1] == 8


def test_recalibrate_compares_with_the_calibrator_each_answer_was_served_by(tmp_path):
    """A policy with its own calibrator for the tier: the old column is that calibrator on its requests, and
    the report warns that the new version does not replace it."""
    from cascade.recalibrate import recalibrate

    cfg, ledger, _ = _synthetic_ledger(tmp_path)
    with_override = _synthetic_config(tmp_path, policy_calibrator=5.0)
    try:
        plain = recalibrate(cfg, ledger, tier="small", method="platt", out=str(tmp_path / "a"))
        over = recalibrate(with_override, ledger, tier="small", method="platt", out=str(tmp_path / "b"))
    finally:
        ledger.close_sync()
    assert plain["policies_with_own_calibrator"] == [] and over["policies_with_own_calibrator"] == ["cascade"]
    assert any("policies cascade use their own calibrator" in w for w in over["fit_warnings"])
    # the same held-out answers, judged by temperature 5 rather than 1: another old ECE, the same new one
    assert over["heldout"]["old"]["ece"] != pytest.approx(plain["heldout"]["old"]["ece"])
    assert over["heldout"]["new"]["ece"] == pytest.approx(plain["heldout"]["new"]["ece"])


def test_recalibrate_writes_beside_the_config_that_cascade_config_names(tmp_path, monkeypatch, capsys):
    """A config file named by $CASCADE_CONFIG (not --config) whose tier has no artifact: the new version goes to
    calibrators/ next to that file, as --out's help says and where the config's relative artifact paths point;
    it went to calibrators/ under the current directory."""
    from cascade.cli import main

    _, ledger, _ = _synthetic_ledger(tmp_path, n=200)
    ledger.close_sync()
    conf_dir, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    conf_dir.mkdir()
    elsewhere.mkdir()
    cfg = conf_dir / "cascade.yaml"
    cfg.write_text(yaml.safe_dump({"ledger": {"path": str(tmp_path / "l.sqlite")},
                                   "tiers": [tier("small"), tier("large")],
                                   "policies": {"cascade": {"chain": ["small", "large"]}}}))
    monkeypatch.setenv("CASCADE_CONFIG", str(cfg))
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["recalibrate", "--from-ledger", "--method", "platt", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert Path(rep["artifact"]) == conf_dir / "calibrators" / "small.v1.json"
    assert not (elsewhere / "calibrators").exists()


def test_labelled_answers_without_the_feature_are_not_said_to_be_missing_labels(tmp_path):
    """--feature naming a feature the answers do not record (a backend without top_logprobs records no
    mean_margin): the refusal said "only 0 labelled answers" of a ledger holding hundreds, and pointed at
    --min-samples; it now says how many are labelled but lack the feature."""
    from cascade.errors import DataError
    from cascade.recalibrate import labelled_answers, recalibrate

    cfg, ledger, _ = _synthetic_ledger(tmp_path, n=200)
    try:
        n = len(labelled_answers(ledger, "small"))
        with pytest.raises(DataError) as err:
            recalibrate(cfg, ledger, tier="small", feature="mean_margin", out=str(tmp_path / "out"))
    finally:
        ledger.close_sync()
    assert n > 50
    assert (f"only 0 labelled answers of tier 'small' that record the feature 'mean_margin' in the ledger "
            f"(0 from feedback, 0 from agreement with a stronger tier); {n} more do not") in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_feature_the_engine_would_not_serve_as_fitted_is_refused_before_anything_is_written(tmp_path):
    """--feature mean_margin on a tier with top_logprobs 1 was fitted, written and --activate'd: the engine
    refuses that artifact (a reload's 422; the next `cascade serve` would not start). A --feature other than the
    one the config sets beside the tier's artifact was too, and the engine served the fitted map on the config's
    feature. Both are refused now, in one line, with nothing written."""
    from calibration.calibrators import TemperatureScaling, save_calibrator
    from cascade.config import parse_config
    from cascade.errors import ConfigError, DataError
    from cascade.recalibrate import recalibrate

    _, ledger, _ = _synthetic_ledger(tmp_path, n=60)
    art = save_calibrator(TemperatureScaling("first_token_logprob", 1.0), tmp_path / "pin" / "small.json")

    def config(**small: Any):
        return parse_config({"ledger": {"path": str(tmp_path / "l.sqlite")},
                             "tiers": [tier("small", **small), tier("large")],
                             "policies": {"cascade": {"chain": ["small", "large"]}}}, environ={})

    try:
        with pytest.raises(ConfigError, match="^--feature: reads 'mean_margin'.*tier 'small' has top_logprobs 1"):
            recalibrate(config(top_logprobs=1), ledger, tier="small", feature="mean_margin",
                        out=str(tmp_path / "out"), do_activate=True)
        pinned = config(calibrator={"artifact": str(art), "feature": "first_token_logprob"})
        with pytest.raises(ConfigError, match="^--feature mean_logprob: tiers.small.calibrator sets feature: "
                                              "first_token_logprob beside its artifact"):
            recalibrate(pinned, ledger, tier="small", feature="mean_logprob", min_samples=10, do_activate=True)
        # the config's own feature passes the check (these answers do not record it: the usual refusal)
        with pytest.raises(DataError, match="that record the feature 'first_token_logprob'"):
            recalibrate(pinned, ledger, tier="small", min_samples=10, do_activate=True)
    finally:
        ledger.close_sync()
    assert not (tmp_path / "out").exists() and sorted(p.name for p in (tmp_path / "pin").iterdir()) == ["small.json"]


def test_a_version_that_is_no_number_in_an_artifact_numbers_the_next_as_after_none(tmp_path):
    """The engine serves an artifact whose fitted_on.version is no number (a hand-edited one: a date, say); the
    recalibration of its tier ended in a traceback (int('2026-12-01')), as did --out naming an existing file whose
    version is Infinity (an OverflowError) or that is JSON nested too deeply to read (a RecursionError). Such a
    version now counts as none."""
    from cascade.recalibrate import recalibrate

    cfg, ledger, _ = _synthetic_ledger(tmp_path, n=60)
    art = tmp_path / "cal" / "small.json"
    art.write_text(json.dumps({**json.loads(art.read_text()), "fitted_on": {"version": "2026-12-01"}}))
    (tmp_path / "x.json").write_text('{"fitted_on": {"version": Infinity}}')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    try:
        rep = recalibrate(cfg, ledger, tier="small", min_samples=10, out=str(tmp_path / "out"))
        again = recalibrate(cfg, ledger, tier="small", min_samples=10, out=str(tmp_path / "x.json"))
        deep = recalibrate(cfg, ledger, tier="small", min_samples=10, out=str(tmp_path / "deep.json"))
    finally:
        ledger.close_sync()
    assert deep["version"] == 1 and json.loads((tmp_path / "deep.json").read_text())["fitted_on"]["version"] == 1
    assert rep["old"]["version"] == 0 and rep["version"] == 1
    assert rep["artifact"] == str(tmp_path / "out" / "small.v1.json")
    assert again["version"] == 1 and json.loads((tmp_path / "x.json").read_text())["fitted_on"]["version"] == 1


def test_answers_without_tokens_are_left_out_of_the_fit_and_the_coverage(tmp_path):
    """An answer that came without token logprobs (a provider's bare answer) has no tokens: the engine escalates
    it whatever the calibrator says, and its features are the floor's (-30). Labelled by agreement, such answers
    were fitted on as "a score of -30 is right" (on a real ledger: a Platt slope turned negative) and widened the
    labelled range the coverage check reads. They are left out now: the fit is the one without them."""
    import time

    from calibration.features import extract_features
    from cascade.recalibrate import labelled_answers, recalibrate
    from cascade.types import Attempt, CascadeRecord

    cfg, ledger, _ = _synthetic_ledger(tmp_path, n=200)
    try:
        before = recalibrate(cfg, ledger, tier="small", method="platt", out=str(tmp_path / "out"))
        n = len(labelled_answers(ledger, "small"))
        for i in range(60):  # no tokens, escalated; the large tier gave the same text: agreement says right
            small = Attempt(index=0, tier="small", model=TEST_MODEL, backend="openai", cost_usd=1e-6,
                            confidence=0.0, features=extract_features((), top_k=5), text="right", decision="escalate")
            large = Attempt(index=1, tier="large", model=TEST_MODEL, backend="transformers", cost_usd=1e-5,
                            confidence=0.99, features={"mean_logprob": -0.01, "n_tokens": 1.0}, text="right",
                            decision="final", kept=True)
            ledger.record_sync(CascadeRecord(request_id=f"bare{i}", policy="cascade", created_at=time.time(),
                                             tier="large", escalated=True, attempts=[small, large], cost_usd=1.1e-5))
        assert len(labelled_answers(ledger, "small")) == n
        after = recalibrate(cfg, ledger, tier="small", method="platt", out=str(tmp_path / "out"))
    finally:
        ledger.close_sync()
    assert after["n"] == before["n"] and after["params"] == before["params"]
    assert after["coverage"]["labelled_range"] == before["coverage"]["labelled_range"]
    assert after["coverage"]["answers"] == before["coverage"]["answers"] == 200


def test_features_the_engine_never_writes_are_read_as_missing_not_a_traceback(tmp_path):
    """An attempt's features text that is no JSON object, or a feature that is no finite number (a row written by
    hand or by another program): the answer is read as one without features, or without that feature, as a row
    with none is. They were a traceback (JSONDecodeError, AttributeError on null or a list, TypeError, ValueError
    in float()), and a NaN a fit on NaN."""
    import time

    from cascade.recalibrate import labelled_answers, recalibrate
    from cascade.types import Attempt, CascadeRecord

    bad = ["not json", "null", "[]", '"x"', '{"mean_logprob": NaN}', '{"mean_logprob": Infinity}',
           '{"mean_logprob": null}', '{"mean_logprob": "x"}', '{"mean_logprob": true}', '{"mean_logprob": [1]}',
           '{"mean_logprob": 1' + "0" * 400 + "}", '{"mean_logprob": 1' + "0" * 5000 + "}", "[" * 100_000]
    cfg, ledger, _ = _synthetic_ledger(tmp_path, n=200)
    try:
        before = recalibrate(cfg, ledger, tier="small", method="platt", out=str(tmp_path / "out"))
        n = len(labelled_answers(ledger, "small"))
        for i in range(len(bad)):  # escalated; the large tier gave the same text: agreement says right
            small = Attempt(index=0, tier="small", model=TEST_MODEL, backend="transformers", cost_usd=1e-6,
                            confidence=0.1, features={"mean_logprob": -2.3}, text="right", decision="escalate")
            large = Attempt(index=1, tier="large", model=TEST_MODEL, backend="transformers", cost_usd=1e-5,
                            confidence=0.99, features={"mean_logprob": -0.01}, text="right", decision="final",
                            kept=True)
            ledger.record_sync(CascadeRecord(request_id=f"bad{i}", policy="cascade", created_at=time.time(),
                                             tier="large", escalated=True, attempts=[small, large], cost_usd=1.1e-5))
        with sqlite3.connect(tmp_path / "l.sqlite") as db:
            for i, text in enumerate(bad):
                db.execute("UPDATE attempts SET features = ? WHERE request_id = ? AND tier = 'small'",
                           (text, f"bad{i}"))
        assert len(labelled_answers(ledger, "small")) == n + 7  # the 7 JSON objects: labelled, without mean_logprob
        after = recalibrate(cfg, ledger, tier="small", method="platt", out=str(tmp_path / "out"))
    finally:
        ledger.close_sync()
    assert after["n"] == before["n"] and after["params"] == before["params"]
    assert after["coverage"]["answers"] == before["coverage"]["answers"] == 200


def test_answers_of_a_model_the_tier_no_longer_runs_are_left_out_of_the_fit(tmp_path):
    """A calibrator judges the answers of the model its tier runs (a reload keeps a tier's calibrator when its
    model changes: it was fit on the other model's answers). The ledger keeps the answers of the tier's model
    before a change; they were labelled and fitted on with the new model's, and the artifact said it was fitted
    on the new model. They are left out now, and said so."""
    import math
    import random

    from cascade.errors import DataError
    from cascade.recalibrate import recalibrate
    from cascade.types import Attempt, CascadeRecord

    cfg, ledger, _ = _synthetic_ledger(tmp_path)
    try:
        before = recalibrate(cfg, ledger, tier="small", method="platt", out=str(tmp_path / "a"))
        # the tier's earlier model: sure of itself and always wrong (the large tier disagreed every time)
        rng = random.Random(2)
        for i in range(300):
            p = rng.uniform(0.05, 0.45)
            small = Attempt(index=0, tier="small", model="old-model", backend="transformers", cost_usd=1e-6,
                            confidence=p, features={"mean_logprob": math.log(1 - p)}, text=f"old {i}",
                            decision="escalate")
            large = Attempt(index=1, tier="large", model=TEST_MODEL, backend="transformers", cost_usd=1e-5,
                            confidence=0.99, features={"mean_logprob": -0.01}, text="right", decision="final",
                            kept=True)
            ledger.record_sync(CascadeRecord(request_id=f"old{i}", policy="cascade", created_at=1e9 + i,
                                             tier="large", escalated=True, attempts=[small, large], cost_usd=1.1e-5))
        after = recalibrate(cfg, ledger, tier="small", method="platt", out=str(tmp_path / "b"))
        with pytest.raises(DataError) as err:
            recalibrate(cfg, ledger, tier="small", method="platt", min_samples=before["n"] + 1,
                        out=str(tmp_path / "c"))
    finally:
        ledger.close_sync()
    assert after["n"] == before["n"] and after["params"] == pytest.approx(before["params"])
    assert after["labels"]["other_model"] == 300 and before["labels"]["other_model"] == 0
    assert after["coverage"]["answers"] == before["coverage"]["answers"]
    assert any(f"300 labelled answers of tier 'small' are another model's than {TEST_MODEL!r}" in w
               for w in after["fit_warnings"])
    assert f"300 more are another model's than {TEST_MODEL!r}" in str(err.value)


def test_activating_over_a_file_says_where_it_was_kept_when_the_config_reads_another(tmp_path):
    """--activate in a directory whose <tier>.json is a regular file (copied aside as .bak) that the config does
    not read: the text said the config reads another file but not that this one was replaced and kept."""
    import shutil

    from cascade.recalibrate import recalibrate, recalibrate_text

    cfg, ledger, _ = _synthetic_ledger(tmp_path, n=200)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tmp_path / "cal" / "small.json", other / "small.json")
    try:
        rep = recalibrate(cfg, ledger, tier="small", method="platt", out=str(other), do_activate=True,
                          allow_extrapolation=True)
    finally:
        ledger.close_sync()
    assert rep["warning"] and rep["replaced_file_kept_as"] == str(other / "small.json.bak")
    text = recalibrate_text(rep)
    assert f"the file small.json was a file, not a link: kept as {other / 'small.json.bak'}" in text
    assert f"warning: {rep['warning']}" in text


@pytest.mark.parametrize("name", ["new.json", "new.JSON", "New.Json"])
def test_an_out_ending_in_json_in_any_case_is_the_artifact_file(tmp_path, name):
    """``--out X.JSON`` was taken as a directory's name (only a lower-case ``.json`` named the file)."""
    from cascade.recalibrate import recalibrate

    cfg, ledger, _ = _synthetic_ledger(tmp_path, n=200)
    try:
        rep = recalibrate(cfg, ledger, tier="small", method="platt", out=str(tmp_path / name),
                          allow_extrapolation=True)
    finally:
        ledger.close_sync()
    assert Path(rep["artifact"]) == tmp_path / name and (tmp_path / name).is_file(), rep["artifact"]
    assert json.loads((tmp_path / name).read_text())["method"] == "platt"


def test_a_reload_that_changes_only_a_policy_threshold_names_it_in_its_log_line(serve_app, tmp_path, caplog):
    """The reload's log line named only tiers whose calibrator or threshold changed: one that changed a policy's
    own threshold (decisions_changed, the cache cleared, the drift windows started afresh) read "no change"."""
    from cascade.config import load_config
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as up:
        path = tmp_path / "cascade.yaml"

        def write(threshold: float) -> None:
            remote = {"backend": "openai", "model": "m", "price": {"input_per_1m": 1, "output_per_1m": 2},
                      "options": {"base_url": up.base_url}}
            path.write_text(yaml.safe_dump({
                "ledger": {"path": str(tmp_path / "ledger.sqlite")},
                "tiers": [{"name": "a", **remote}, {"name": "b", **remote}],
                "policies": {"cascade": {"chain": ["a", "b"], "thresholds": {"a": threshold}}}}))

        write(0.5)
        srv = serve_app(load_config(path), config_path=str(path))
        with caplog.at_level("INFO", logger="cascade.recalibrate"):
            same = httpx.post(srv.url + "/admin/reload", timeout=30)
            write(0.9)
            changed = httpx.post(srv.url + "/admin/reload", timeout=30)
    assert same.json()["decisions_changed"] is False and changed.json()["decisions_changed"] is True
    lines = [m for m in caplog.messages if m.startswith("reloaded calibrators from")]
    assert len(lines) == 2 and lines[0].endswith(": no change"), lines
    assert lines[1].endswith(": policy 'cascade'"), lines


def test_a_reload_applies_a_policys_new_description_without_deciding_anew(serve_app, tmp_path):
    """A policy's description (what GET /v1/models shows of it) changed in the file was neither applied nor
    listed under not_applied: the reload said all was applied while the old text stayed. It is applied; it
    decides nothing, so the cache stays."""
    from cascade.config import load_config
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as up:
        path = tmp_path / "cascade.yaml"

        def write(description: str) -> None:
            remote = {"backend": "openai", "model": "m", "options": {"base_url": up.base_url}}
            path.write_text(yaml.safe_dump({
                "ledger": {"path": str(tmp_path / "ledger.sqlite")},
                "tiers": [{"name": "a", **remote}, {"name": "b", **remote}],
                "policies": {"cascade": {"chain": ["a", "b"], "description": description}}}))

        write("first words")
        srv = serve_app(load_config(path), config_path=str(path))
        write("second words")
        out = httpx.post(srv.url + "/admin/reload", timeout=30).json()
        models = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]
    assert out["not_applied"] == [] and out["decisions_changed"] is False, out
    assert [m["cascade"]["description"] for m in models if m["id"] == "cascade"] == ["second words"]
