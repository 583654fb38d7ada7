"""Bad input on the command line: every malformed input, unknown name, bad config or unwritable output is one
line on stderr (``cascade: error: ...``), exit status 2, no traceback, and nothing damaged.

The commands run as real processes (``python -m cascade.cli``) on real files under ``tmp_path``; none of these
cases loads a model (each error is raised before any model would load).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cascade(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    full_env.pop("CASCADE_CONFIG", None) if "CASCADE_CONFIG" not in (env or {}) else None
    return subprocess.run([sys.executable, "-m", "cascade.cli", *argv], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=timeout)


def one_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with exit status 2 and exactly one line ``cascade: error: ...`` holding each needle."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("cascade: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def write_config(tmp_path: Path, *, name: str = "c.yaml", small: str = "", large: str = "", extra: str = "",
                 chain: str = "[small, large]") -> Path:
    """A two-tier config (transformers, the small catalog model) with YAML added to a tier or the top level."""
    text = f"""\
ledger: {{path: {tmp_path / 'ledger.sqlite'}}}
tiers:
  - name: small
    backend: transformers
    model: smollm2-135m
    price: {{input_per_1m: 0.10, output_per_1m: 0.20}}
    max_tokens: 8
{small}
  - name: large
    backend: transformers
    model: smollm2-135m
    price: {{input_per_1m: 2.00, output_per_1m: 6.00}}
    max_tokens: 10
{large}
policies:
  cascade: {{chain: {chain}}}
{extra}
"""
    p = tmp_path / name
    p.write_text(text)
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- serve: a config the engine refuses, an address it cannot bind -----------------------------------------


@pytest.mark.parametrize("small, needle", [
    ("    model: no-such-model", "no-such-model"),
    ("    calibrator: {artifact: /nonexistent/cal.json}", "tiers.small.calibrator"),
    ("    options: {max_batch_size: x}", "tiers.small.options.max_batch_size"),
    ("    options: {threads: -2}", "tiers.small.options.threads"),
])
def test_serve_refuses_a_config_the_engine_refuses_in_one_line_before_the_banner(tmp_path, small, needle):
    text = write_config(tmp_path).read_text().replace("    model: smollm2-135m\n", "    model: smollm2-135m\n", 1)
    if small.strip().startswith("model:"):
        text = text.replace("    model: smollm2-135m\n", small + "\n", 1)
    else:
        text = text.replace("    max_tokens: 8\n", "    max_tokens: 8\n" + small + "\n", 1)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    r = cascade("serve", "--config", str(cfg), "--port", str(free_port()))
    one_error(r, needle)
    assert "serving policies" not in r.stderr


@pytest.mark.parametrize("ledger", ["dir", "notdb"])
def test_serve_refuses_a_ledger_that_is_a_directory_or_not_sqlite(tmp_path, ledger):
    target = tmp_path
    if ledger == "notdb":
        target = tmp_path / "notdb.sqlite"
        target.write_text("this is not a database\n" * 100)
    r = cascade("serve", "--config", str(write_config(tmp_path)), "--port", str(free_port()), "--ledger", str(target))
    one_error(r, "cannot open ledger")


def test_serve_says_in_one_line_that_the_port_is_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cascade("serve", "--config", str(write_config(tmp_path)), "--port", str(port))
    one_error(r, f"cannot bind 127.0.0.1:{port}: address already in use")
    assert not (tmp_path / "ledger.sqlite").exists()  # refused before anything was opened


# --- config files ----------------------------------------------------------------------------------------


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    png = tmp_path / "some.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    one_error(cascade("ask", "hi", "--config", str(png)), f"cannot read config file {png}: not UTF-8 text")
    one_error(cascade("report", env={"CASCADE_CONFIG": str(png)}), "not UTF-8 text")


def test_an_environment_override_error_names_the_variable_not_the_file(tmp_path):
    cfg = write_config(tmp_path)
    line = one_error(cascade("ask", "hi", "--config", str(cfg), env={"CASCADE_PORT": "abc"}), "CASCADE_PORT")
    assert str(cfg) not in line


@pytest.mark.parametrize("small, extra, chain, needle", [
    ("    threshold: .nan", "", "[small, large]", "tiers.0.threshold: must be a finite number"),
    ("    price: {input_per_1m: .inf}", "", "[small, large]", "must be a finite number"),
    ("", "user_tiers: {free: {cost_budget_usd: .inf}}", "[small, large]", "must be a finite number"),
    ("", "", "[small, small, large]", "policies.cascade.chain: tier(s) ['small'] appear more than once"),
    ("", "shadows: {s: {of: cascade, chain: [large, large]}}", "[small, large]", "shadows.s.chain"),
    ("    calibrator: {method: temperature, params: {temprature: 2}}", "", "[small, large]",
     "unknown parameter(s) ['temprature']"),
    ("    calibrator: {method: platt}", "", "[small, large]", "missing parameter(s) ['a', 'b']"),
    ("    calibrator: {artifact: x.json, method: platt}", "", "[small, large]", "with artifact, leave out method"),
])
def test_config_values_refused_at_load(tmp_path, small, extra, chain, needle):
    text = write_config(tmp_path, extra=extra, chain=chain).read_text()
    if small:
        if "price:" in small:
            text = text.replace("    price: {input_per_1m: 0.10, output_per_1m: 0.20}\n", small + "\n", 1)
        else:
            text = text.replace("    max_tokens: 8\n", "    max_tokens: 8\n" + small + "\n", 1)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    one_error(cascade("ask", "hi", "--config", str(cfg)), needle)


def test_an_openai_tier_needs_a_url(tmp_path):
    cfg = write_config(tmp_path, large="    options: {base_url: not a url}").read_text()
    cfg = cfg.replace("backend: transformers\n    model: smollm2-135m\n    price: {input_per_1m: 2.00",
                      "backend: openai\n    model: gpt-x\n    price: {input_per_1m: 2.00")
    p = tmp_path / "bad.yaml"
    p.write_text(cfg)
    one_error(cascade("ask", "hi", "--config", str(p)), "tiers.large.options.base_url", "http://")


# --- calibrator artifacts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("artifact, needle", [
    ("DIR", "Is a directory"),
    ({"format": "cascade-engine/calibrator", "version": 1, "method": "temperature", "params": [1]},
     "params must be a mapping"),
    ({"method": "temperature", "params": {"temprature": 2.0}}, "unknown parameter(s) ['temprature']"),
    ({"method": "histogram", "params": {"edges": [0.0], "probs": [0.2, 1.5]}}, "within [0, 1]"),
    ({"method": "isotonic", "params": {"knots_x": [0.0, 1.0], "knots_y": [-0.1, 0.5]}}, "within [0, 1]"),
    ({"method": "platt", "params": {"a": "x", "b": 0}}, "params.a must be a finite number"),
    ({"method": "temperature", "version": "1", "params": {"temperature": 1.0}}, "version must be a whole number"),
])
def test_bad_calibrator_artifacts_are_one_line(tmp_path, artifact, needle):
    if artifact == "DIR":
        path = tmp_path
    else:
        path = tmp_path / "cal.json"
        path.write_text(json.dumps(artifact))
    cfg = write_config(tmp_path, small=f"    calibrator: {{artifact: {path}}}")
    one_error(cascade("ask", "hi", "--config", str(cfg)), "tiers.small.calibrator", needle)
