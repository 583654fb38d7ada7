"""Bad input on the command line: every malformed input, unknown name, bad config or unwritable output is one
line on stderr (``cascade: error: ...``), exit status 2, no traceback, and nothing damaged.

The commands run as real processes (``python -m cascade.cli``) on real files under ``tmp_path``; none of these
cases loads a model (each error is raised before any model would load).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cascade(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    full_env.pop("CASCADE_CONFIG", None) if "CASCADE_CONFIG" not in (env or {}) else None
    return subprocess.run([sys.executable, "-m", "cascade.cli", *argv], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=timeout)


def cli(capsys, *argv: str) -> subprocess.CompletedProcess:  # noqa: ANN001
    """The same command in this process (``cascade.cli.main``; quicker): an exception the command line does
    not turn into a message would fail the test here as it would print a traceback there."""
    from cascade.cli import main

    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse
        rc = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), rc, out.out, out.err)


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
    # torch starts the threads when the model loads: a million ran out of threads, one past a C long was a
    # ValueError with its traceback, both only once a request had come
    ("    options: {threads: 1000000}", "tiers.small.options.threads: must be a whole number from 1 to 1024, "
                                        "got 1000000"),
    ("    options: {threads: 100000000000000000000}", "tiers.small.options.threads: must be a whole number from 1"),
    ("    options: {device: gpu}", "tiers.small.options.device: must be cpu, cuda, cuda:N or auto, got 'gpu'"),
    ("    options: {device: 'cuda:99'}", "tiers.small.options.device: 'cuda:99' asked for, but torch sees"),
    ("    options: {cudnn_attention: 'no'}", "tiers.small.options.cudnn_attention: must be a boolean (true or false, unquoted), got str 'no'"),
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


@pytest.mark.parametrize("where", ["policy", "shadow", "tier outside the route"])
def test_a_config_refused_for_a_part_outside_the_asked_route_leaves_the_ledger_untouched(tmp_path, capsys, where):
    """A per-policy or shadow calibrator, or a tier the question's route does not use, that cannot be built: one
    line, and no ledger created (or migrated: a ledger shared with older servers must not move under them)."""
    bad = "{artifact: /nonexistent/cal.json}"
    text = write_config(tmp_path).read_text()
    if where == "policy":
        text = text.replace("  cascade: {chain: [small, large]}", f"  cascade: {{chain: [small, large], "
                            f"calibrators: {{small: {bad}}}}}")
    elif where == "shadow":
        text += f"shadows:\n  s1: {{of: cascade, calibrators: {{small: {bad}}}}}\n"
    else:
        text = text.replace("  cascade: {chain: [small, large]}", "  cascade: {chain: [small]}")
        text = text.replace("    max_tokens: 10\n", f"    max_tokens: 10\n    calibrator: {bad}\n")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    one_error(cli(capsys, "ask", "--config", str(cfg), "hi"), "/nonexistent/cal.json")
    assert not (tmp_path / "ledger.sqlite").exists()


@pytest.mark.parametrize("ledger", ["dir", "notdb"])
def test_serve_refuses_a_ledger_that_is_a_directory_or_not_sqlite(tmp_path, ledger):
    target = tmp_path
    if ledger == "notdb":
        target = tmp_path / "notdb.sqlite"
        target.write_text("this is not a database\n" * 100)
    r = cascade("serve", "--config", str(write_config(tmp_path)), "--port", str(free_port()), "--ledger", str(target))
    one_error(r, "cannot open ledger")


@pytest.mark.parametrize("under", ["afile", "afile/sub"])
def test_a_ledger_under_a_file_names_the_file_that_is_not_a_directory(tmp_path, under, capsys):
    """mkdir said "File exists" of the file, as if the directory were there."""
    (tmp_path / "afile").write_text("not a directory\n")
    target = tmp_path / under / "ledger.sqlite"
    line = one_error(cli(capsys, "ask", "--config", str(write_config(tmp_path)), "--ledger", str(target), "hi"),
                     f"cannot open ledger {target}: ", f"not a directory: '{tmp_path / 'afile'}'")
    assert "File exists" not in line
    assert (tmp_path / "afile").read_text() == "not a directory\n"


def test_serve_says_in_one_line_that_the_port_is_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cascade("serve", "--config", str(write_config(tmp_path)), "--port", str(port))
    one_error(r, f"cannot bind 127.0.0.1:{port}: address already in use")
    assert not (tmp_path / "ledger.sqlite").exists()  # refused before anything was opened


def test_keys_hash_reads_a_key_as_the_server_does(capsys):
    """The server strips a bearer token's surrounding spaces: a key pasted as an argument with them gets the
    digest the server will compute (it used to keep them, a digest that never authenticates), as stdin's."""
    from serving.auth import hash_key

    r = cli(capsys, "keys", "hash", "  sk-test-key \t")
    assert r.returncode == 0 and r.stdout.strip() == hash_key("sk-test-key")
    # a short hand-written key is hashed, with a warning: its unsalted digest in a leaked config gives it away
    assert r.stderr.strip().startswith("cascade: warning: a key of 11 characters can be found from its SHA-256")
    long_key = "sk-" + "x7Q2" * 6
    r = cli(capsys, "keys", "hash", long_key)
    assert r.returncode == 0 and r.stdout.strip() == hash_key(long_key) and r.stderr == ""
    for key, warned in (("k" * 23, True), ("k" * 24, False)):  # the warning's edge: 24 characters are enough
        r = cli(capsys, "keys", "hash", key)
        assert r.returncode == 0 and r.stdout.strip() == hashlib.sha256(key.encode()).hexdigest()
        assert r.stderr.startswith("cascade: warning: a key of 23 characters") if warned else r.stderr == ""
    one_error(cli(capsys, "keys", "hash", "   "), "no key given")


def test_a_flag_wins_over_a_bad_environment_variable_it_overrides(tmp_path):
    """File < environment < flags: a variable whose flag is given is not read, so a bad value in it no longer
    refuses the command line that overrides it (here the run gets as far as binding the flag's port)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cascade("serve", "--config", str(write_config(tmp_path)), "--port", str(port), "--ledger",
                    str(tmp_path / "flag.sqlite"), env={"CASCADE_PORT": "abc", "CASCADE_LEDGER_PATH": " "})
    one_error(r, f"cannot bind 127.0.0.1:{port}: address already in use")
    r = cascade("serve", "--config", str(write_config(tmp_path)), env={"CASCADE_PORT": "abc"})
    one_error(r, "CASCADE_PORT")  # not overridden: still refused, naming it


# --- config files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("yaml_text", "needle"), [
    ("server: {port: &x [*x]}\n", "an alias refers to a collection that holds it (a value without end) at line 1"),
    ("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef", strict=True)),
     "its aliases expand to more than 100,000 values"),
    ('ledger: {path: "/tmp/a\\0b.sqlite"}\n', "ledger.path: must not contain a NUL character"),
    ('server: {host: "  "}\n', "server.host: must not be empty"),
    ("server: {max_tokens_limit: 1" + "0" * 5000 + "}\n",
     "an integer too long to read (more than 4300 digits) at line 1, column 28"),
    ("server: {port: 8000}\n---\nledger: {path: x.sqlite}\n",
     "expected a single document in the stream, but found another document at line 2"),
])
def test_aliases_without_end_and_nul_characters_are_one_line(tmp_path, capsys, yaml_text, needle):
    """A self-referencing YAML alias was a RecursionError traceback, aliases of aliases an exponential walk, a NUL
    in a path the OS's traceback; a blank host failed at bind without naming server.host."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    one_error(cli(capsys, "ask", "--config", str(cfg), "hi"), needle)
    one_error(cli(capsys, "ask", "--config", str(write_config(tmp_path)), "--ledger", "/tmp/a\0b.sqlite", "hi"),
              "ledger.path: the path contains a NUL character")


def test_an_empty_since_and_a_check_across_keys_say_what_they_mean(tmp_path, capsys):
    """``--since ""`` (an unset variable in a script) is refused rather than read as all time; an error of a
    check across keys names its keys itself, without a "(top level)" in front."""
    for cmd in (["report"], ["shadow", "report"]):
        one_error(cli(capsys, *cmd, "--ledger", str(_cascade_ledger(tmp_path / "l.sqlite")), "--since", " "),
                  "--since: empty; leave it out for all time")
    line = one_error(cli(capsys, "ask", "--config", str(write_config(tmp_path, chain="[small, big]")), "hi"),
                     "policies.cascade.chain", "'big'")
    assert "(top level)" not in line


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    png = tmp_path / "some.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    one_error(cascade("ask", "hi", "--config", str(png)), f"cannot read config file {png}: not UTF-8 text")
    one_error(cascade("report", env={"CASCADE_CONFIG": str(png)}), "not UTF-8 text")


def test_an_environment_override_error_names_the_variable_not_the_file(tmp_path):
    cfg = write_config(tmp_path)
    line = one_error(cascade("ask", "hi", "--config", str(cfg), env={"CASCADE_PORT": "abc"}), "CASCADE_PORT")
    assert str(cfg) not in line
    one_error(cascade("ask", "hi", "--config", str(cfg), env={"CASCADE_LEDGER_PATH": " "}),
              "environment variable CASCADE_LEDGER_PATH (ledger.path): must not be empty")


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
    ("", "shadows: {s: {of: cascade, calibrators: {small: {artifact: /nonexistent/cal.json}}}}", "[small, large]",
     "shadows.s.calibrators.small: "),
    ("", 'auth: {required: "false"}', "[small, large]", "auth.required: must be true or false (unquoted), not the "
     "string 'false'"),
    ("", 'user_tiers: {" ": {}}', "[small, large]", "a user tier name must not be empty"),
    ("", 'shadows: {"": {of: cascade, chain: [large]}}', "[small, large]", "a shadow name must not be empty"),
])
def test_config_values_refused_at_load(tmp_path, small, extra, chain, needle, capsys):
    text = write_config(tmp_path, extra=extra, chain=chain).read_text()
    if small:
        if "price:" in small:
            text = text.replace("    price: {input_per_1m: 0.10, output_per_1m: 0.20}\n", small + "\n", 1)
        else:
            text = text.replace("    max_tokens: 8\n", "    max_tokens: 8\n" + small + "\n", 1)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    one_error(cli(capsys, "ask", "hi", "--config", str(cfg)), needle)


def test_an_openai_tier_needs_a_url(tmp_path, capsys):
    cfg = write_config(tmp_path, large="    options: {base_url: not a url}").read_text()
    cfg = cfg.replace("backend: transformers\n    model: smollm2-135m\n    price: {input_per_1m: 2.00",
                      "backend: openai\n    model: gpt-x\n    price: {input_per_1m: 2.00")
    p = tmp_path / "bad.yaml"
    p.write_text(cfg)
    one_error(cli(capsys, "ask", "hi", "--config", str(p)), "tiers.large.options.base_url", "http://")


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
    ({"method": ["platt"], "params": {"a": 1.0, "b": 0.0}}, "unknown calibrator method ['platt']"),
    # an integer beyond a float's range, and JSON nested past Python's recursion limit (both were tracebacks)
    ('{"method": "temperature", "params": {"temperature": 1' + "0" * 400 + '}}', "params.temperature must be a "
     "finite number, got 1000000000000000000000000000000000000..."),
    ('{"method": "isotonic", "params": {"knots_x": [0, 1' + "0" * 400 + '], "knots_y": [0.1, 0.9]}}',
     "params.knots_x must hold finite numbers"),
    ("[" * 100_000 + "]" * 100_000, "is nested too deeply to be one"),
])
def test_bad_calibrator_artifacts_are_one_line(tmp_path, artifact, needle, capsys):
    if artifact == "DIR":
        path = tmp_path
    else:
        path = tmp_path / "cal.json"
        path.write_text(artifact if isinstance(artifact, str) else json.dumps(artifact))
    cfg = write_config(tmp_path, small=f"    calibrator: {{artifact: {path}}}")
    one_error(cli(capsys, "ask", "hi", "--config", str(cfg)), "tiers.small.calibrator", needle)


# --- output files: checked before the work, one line when they cannot be written ----------------------------


def data_file(tmp_path: Path, *, n: int = 40, outcome: bool | None = None, name: str = "d.jsonl",
              first_logprob: float | None = None) -> Path:
    """A small per-question outputs file: models m1 (cheap) and m2 (strong); m1 right on every other question
    (or always ``outcome``)."""
    lines = []
    for i in range(n):
        right = (i % 2 == 0) if outcome is None else outcome
        lp = -0.1 - (0.0 if right else 1.5) - 0.01 * i
        if first_logprob is not None and i == n - 1:
            lp = first_logprob
        models = {"m1": {"answer": "A", "correct": right, "raw_conf_logprob": lp, "cost_usd": 1e-6},
                  "m2": {"answer": "A", "correct": i % 5 != 0, "raw_conf_logprob": -0.2, "cost_usd": 1e-4}}
        lines.append(json.dumps({"dataset": "t", "split": "train", "chain": "c", "idx": i,
                                 "user_prompt": f"q{i}", "models": models}))
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("out, needle", [
    ("/proc/x.json", "--out /proc/x.json: cannot write"),
    ("DIR", "is a directory"),
    ("FILE/x.json", "is not a directory"),
    ("", "--out: empty path"),
])
def test_calibrate_refuses_an_unwritable_out_before_the_work(tmp_path, out, needle, capsys):
    data = data_file(tmp_path)
    if out == "DIR":
        out = str(tmp_path)
    elif out.startswith("FILE"):
        out = str(data) + out[4:]
    one_error(cli(capsys, "calibrate", "--data", str(data), "--model", "m1", "--out", out), needle)


@pytest.mark.parametrize("plot, needle", [
    ("x.xyz", "unsupported image format .xyz"),
    ("noext", "no image suffix"),
    ("DIR", "is a directory"),
    ("/proc/x.png", "cannot write"),
])
def test_calibrate_refuses_a_bad_plot_path_before_writing_anything(tmp_path, plot, needle, capsys):
    data = data_file(tmp_path)
    plot = str(tmp_path) if plot == "DIR" else (plot if plot.startswith("/") else str(tmp_path / plot))
    art = tmp_path / "a.json"
    one_error(cli(capsys, "calibrate", "--data", str(data), "--model", "m1", "--out", str(art), "--plot", plot), needle)
    assert not art.exists()  # refused before the artifact was written


def test_calibrate_never_overwrites_its_data(tmp_path, capsys):
    data = data_file(tmp_path)
    before = data.read_bytes()
    one_error(cli(capsys, "calibrate", "--data", str(data), "--model", "m1", "--out", str(data)), "is the --data file")
    assert data.read_bytes() == before


@pytest.mark.parametrize("argv, needle", [
    (["--folds", "0"], "--folds must be at least 2"),
    (["--folds", "100000"], "--folds 100000 is more than the 40 questions"),
    (["--bins", "1"], "--bins must be from 2 to 1000, got 1"),
    (["--bins", "1000000000000"], "--bins must be from 2 to 1000, got 1000000000000"),  # was a MemoryError
])
def test_calibrate_checks_folds(tmp_path, argv, needle, capsys):
    data = data_file(tmp_path)
    one_error(cli(capsys, "calibrate", "--data", str(data), "--model", "m1", "--out", str(tmp_path / "a.json"), *argv),
              needle)


@pytest.mark.parametrize("outcome, word", [(True, "all correct"), (False, "all wrong")])
def test_calibrate_refuses_a_single_outcome(tmp_path, outcome, word, capsys):
    data = data_file(tmp_path, outcome=outcome)
    art = tmp_path / "a.json"
    one_error(cli(capsys, "calibrate", "--data", str(data), "--model", "m1", "--out", str(art)),
              f"only one outcome ({word}) for m1 in {data}: cannot calibrate")
    assert not art.exists()
    one_error(cli(capsys, "replay", "--train", str(data), "--test", str(data), "--chain", "m1,m2", "--no-guard"),
              f"only one outcome ({word}) for m1 in the training split")


def test_a_training_file_of_one_question_says_so(tmp_path, capsys):
    """One question is too few before it is one outcome: replay says that, as calibrate does (it said "only one
    outcome (all correct)", true but not the first thing wrong)."""
    one = data_file(tmp_path, n=1, name="one.jsonl")
    one_error(cli(capsys, "replay", "--train", str(one), "--test", str(data_file(tmp_path)), "--chain", "m1,m2"),
              f"the training split of {one}: 1 question(s); calibration needs at least 2")
    one_error(cli(capsys, "calibrate", "--data", str(one), "--model", "m1", "--out", str(tmp_path / "a.json")),
              f"{one}: 1 question(s); calibration needs at least 2")


def test_a_log_probability_above_zero_is_refused_with_its_line(tmp_path, capsys):
    data = data_file(tmp_path, first_logprob=5.0)
    one_error(cli(capsys, "calibrate", "--data", str(data), "--model", "m1", "--out", str(tmp_path / "a.json")),
              f"{data}:40: model 'm1': raw_conf_logprob must be a log-probability (<= 0), got 5.0")
    ok = data_file(tmp_path, first_logprob=5e-7, name="noise.jsonl")  # float noise above 0: read as 0
    r = cli(capsys, "calibrate", "--data", str(ok), "--model", "m1", "--out", str(tmp_path / "a.json"), "--json")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("field, value, needle", [
    ("cost_usd", "1" + "0" * 400, "cost_usd is not finite (inf)"),  # beyond a float: was an OverflowError
    ("cost_usd", "1" + "0" * 5000, "cost_usd is not finite (inf)"),  # past Python's 4300 digits: a ValueError
    ("tokens", '{"in": 1' + "0" * 400 + ', "out": 1}', "tokens.in is not finite (inf)"),
    ("raw_conf_logprob", "1" + "0" * 400, "raw_conf_logprob is not finite (inf)"),
])
def test_an_integer_beyond_any_float_in_a_data_file_is_refused_with_its_line(tmp_path, field, value, needle, capsys):
    data = data_file(tmp_path)
    lines = data.read_text().splitlines()
    row = json.loads(lines[6])
    row["models"]["m1"][field] = "VALUE"
    lines[6] = json.dumps(row).replace('"VALUE"', value)
    data.write_text("\n".join(lines) + "\n")
    one_error(cli(capsys, "calibrate", "--data", str(data), "--model", "m1", "--out", str(tmp_path / "a.json")),
              f"{data}:7: model 'm1': {needle}")
    assert not (tmp_path / "a.json").exists()
    one_error(cli(capsys, "replay", "--train", str(data), "--test", str(data), "--chain", "m1,m2", "--no-guard"),
              f"{data}:7: model 'm1': {needle}")
    # a latency (optional) beyond a float is read too, not a traceback
    ok = tmp_path / "lat.jsonl"
    ok.write_text(data_file(tmp_path, name="ok.jsonl").read_text().replace(
        '"cost_usd": 1e-06}', '"cost_usd": 1e-06, "latency_ms": 1' + "0" * 400 + "}"))
    r = cli(capsys, "calibrate", "--data", str(ok), "--model", "m1", "--out", str(tmp_path / "b.json"), "--json")
    assert r.returncode == 0, r.stderr


def test_costs_that_sum_past_a_float_are_refused_with_their_line(tmp_path, capsys):
    """Each cost finite, their sum not: replay's sums overflowed (numpy RuntimeWarnings on stderr) and it
    reported a 'direct' verdict with every cost ratio null, exit status 0."""
    data = data_file(tmp_path)
    lines = data.read_text().splitlines()
    for i in (3, 4):
        row = json.loads(lines[i])
        row["models"]["m2"]["cost_usd"] = 1e308
        lines[i] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")
    needle = f"{data}:5: model 'm2': cost_usd 1e+308 takes the file's costs past what a float holds"
    one_error(cli(capsys, "replay", "--train", str(data), "--test", str(data), "--chain", "m1,m2", "--no-guard"),
              needle)
    one_error(cli(capsys, "calibrate", "--data", str(data), "--model", "m1", "--out", str(tmp_path / "a.json")),
              needle)


@pytest.mark.parametrize("score", [None, float("-inf")])
def test_calibrate_refuses_a_model_without_a_confidence_on_any_line(tmp_path, capsys, score):
    """A model whose raw_conf_logprob is null on every line was fit anyway (a warning, then an artifact that
    gives every answer the base rate, ranking none): there is nothing to calibrate, and a tier loading it would
    never escalate by confidence. The same for -Infinity on every line, which the error named as null or NaN."""
    data = data_file(tmp_path)
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    for row in lines:
        row["models"]["m1"]["raw_conf_logprob"] = score
    data.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "a.json"
    one_error(cli(capsys, "calibrate", "--data", str(data), "--model", "m1", "--out", str(out)),
              f"{data}: model 'm1' has no raw_conf_logprob on any of its {len(lines)} questions (null, NaN or -inf")
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["calibrate", "--data", "d.jsonl", "--model", "m1", "--out", "a.json", "--seed", "-1"],
    ["replay", "--train", "d.jsonl", "--test", "d.jsonl", "--chain", "m1,m2", "--split-seed", "-1"],
    ["replay", "--train", "d.jsonl", "--test", "d.jsonl", "--chain", "m1,m2", "--seed", "-1"],
    ["recalibrate", "--from-ledger", "--seed", "-1"],
])
def test_negative_seeds_are_refused_when_the_arguments_are_parsed(argv, capsys):
    r = cli(capsys, *argv)  # refused before any file is read
    one_error(r, f"argument {argv[-2]}: must be >= 0, got -1", f"(see: cascade {argv[0]} --help)")


@pytest.mark.parametrize("argv, needle", [
    (["calibrate", "--data", "d.jsonl", "--model", "m1", "--out", "a.json", "--method", "foo"],
     "argument --method: invalid choice: 'foo'"),
    (["replay", "--train", "d.jsonl", "--test", "d.jsonl", "--chain", "m1,m2", "--max-quality-drop", "abc"],
     "argument --max-quality-drop: invalid float value: 'abc'"),
    (["report", "--by"], "argument --by: expected one argument"),
    (["nosuch"], "argument COMMAND: invalid choice: 'nosuch'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_a_bad_option_is_one_line_too_not_a_usage_block(argv, needle, capsys):
    one_error(cli(capsys, *argv), needle, "--help)")


@pytest.mark.parametrize("question", ["", "  \n"])
def test_ask_refuses_an_empty_question_before_loading_a_model(question, capsys):
    one_error(cli(capsys, "ask", question), "the question is empty")


def test_replay_refuses_a_chain_of_one_a_split_of_two_files_and_a_free_last_tier(tmp_path, capsys):
    data, other = data_file(tmp_path), data_file(tmp_path, name="other.jsonl")
    one_error(cli(capsys, "replay", "--train", str(data), "--test", str(data), "--chain", "m1"),
              "--chain needs at least two models")
    # --test-fraction splits one file: TRAIN is not silently dropped for a split of TEST
    one_error(cli(capsys, "replay", "--train", str(data), "--test", str(other), "--chain", "m1,m2",
                  "--test-fraction", "0.5"), "--test-fraction splits one file")
    free = tmp_path / "free.jsonl"  # a last tier that costs nothing: no cost ratio against it
    free.write_text(data.read_text().replace('"cost_usd": 0.0001', '"cost_usd": 0'))
    for train, test in ((data, free), (free, data)):
        one_error(cli(capsys, "replay", "--train", str(train), "--test", str(test), "--chain", "m1,m2", "--json"),
                  f"{free}: the last tier 'm2' costs $0 on every question")


def test_bad_token_counts_and_log_probability_features_are_refused_with_their_line(tmp_path, capsys):
    data = data_file(tmp_path)
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    for i, row in enumerate(lines):
        row["models"]["m1"]["tokens"] = {"in": 12, "out": 1}
        row["models"]["m1"]["features"] = {"mean_logprob": row["models"]["m1"]["raw_conf_logprob"], "n_tokens": 1}
    for where, value, needle in (("tokens", "abc", "tokens.in must be a number, got 'abc'"),
                                 ("tokens", -3, "tokens.in is negative"),
                                 ("features", float("nan"), "features.mean_logprob must be a log-probability"),
                                 ("features", float("inf"), "features.mean_logprob must be a log-probability"),
                                 ("features", 5.0, "features.mean_logprob must be a log-probability")):
        rows = json.loads(json.dumps(lines))
        rows[3]["models"]["m1"][where]["in" if where == "tokens" else "mean_logprob"] = value
        bad = tmp_path / "bad.jsonl"
        bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        one_error(cli(capsys, "calibrate", "--data", str(bad), "--model", "m1", "--feature", "mean_logprob",
                      "--out", str(tmp_path / "a.json")), f"{bad}:4: model 'm1': {needle}")
    rows = json.loads(json.dumps(lines))
    rows[3]["models"]["m1"]["features"]["mean_logprob"] = float("-inf")  # a token of probability 0: allowed
    ok = tmp_path / "ok.jsonl"
    ok.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = cli(capsys, "calibrate", "--data", str(ok), "--model", "m1", "--feature", "mean_logprob", "--out",
            str(tmp_path / "a.json"), "--json")
    assert r.returncode == 0, r.stderr


def test_replay_outputs_and_budget(tmp_path, capsys):
    data = data_file(tmp_path)
    base = ["replay", "--train", str(data), "--test", str(data), "--chain", "m1,m2", "--no-guard"]
    one_error(cli(capsys, *base, "--out", "/proc/x.json"), "--out /proc/x.json: cannot write")
    one_error(cli(capsys, *base, "--plot", str(tmp_path / "x.xyz")), "unsupported image format .xyz")
    one_error(cli(capsys, *base, "--out", str(data)), "is the --train or --test file")
    one_error(cli(capsys, *base, "--cost-budget", "inf"), "--cost-budget must be a positive, finite USD amount")
    r = cli(capsys, *base, "--cost-budget", "0.0001", "--max-quality-drop", "0.01", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "--max-quality-drop only tunes the anchor" in r.stderr
    rep = json.loads(r.stdout)
    assert rep["cost_budget"] == 0.0001 and rep["objective"] == "budget"
    r = cli(capsys, *base, "--json")
    assert r.returncode == 0 and r.stderr == "" and json.loads(r.stdout)["cost_budget"] is None


# --- ledgers: read-only commands never create or migrate anything in a database that is not a ledger --------


def _cascade_ledger(path: Path) -> Path:
    from cascade.ledger import Ledger

    Ledger(path).open_sync().close_sync()
    return path


@pytest.mark.parametrize("kind", ["empty", "other", "notdb"])
@pytest.mark.parametrize("command", [["report"], ["shadow", "report"]])
def test_reports_refuse_a_database_that_is_not_a_ledger_and_leave_it_as_it_was(tmp_path, kind, command, capsys):
    db = tmp_path / "x.sqlite"
    if kind == "empty":
        db.write_bytes(b"")
    elif kind == "other":
        with sqlite3.connect(db) as c:
            c.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        c.close()
    else:
        db.write_text("not a database\n" * 50)
    before = db.read_bytes()
    line = one_error(cli(capsys, *command, "--ledger", str(db)))
    assert ("is not a cascade ledger" in line) if kind != "notdb" else ("file is not a database" in line)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.sqlite"]


def test_report_reads_a_ledger_and_checks_since_and_plot_first(tmp_path, capsys):
    ledger = _cascade_ledger(tmp_path / "l.sqlite")
    r = cli(capsys, "report", "--ledger", str(ledger), "--json")
    assert r.returncode == 0, r.stderr
    one_error(cli(capsys, "report", "--ledger", str(ledger), "--since", "99999999999999999999"), "out of range")
    one_error(cli(capsys, "report", "--ledger", str(ledger), "--plot", str(tmp_path / "p.xyz")), "unsupported image format")
    one_error(cli(capsys, "report", "--ledger", str(ledger), "--plot", str(tmp_path)), "is a directory")


def test_report_into_a_closed_pipe_ends_quietly(tmp_path):
    ledger = _cascade_ledger(tmp_path / "l.sqlite")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "cascade.cli", "report", "--ledger", str(ledger), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    p.stdout.close()  # the reader is gone before the report is printed (as `| head -0`)
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    p.stderr.close()
    assert "Traceback" not in err and err == "", err


@pytest.mark.parametrize("out, needle", [("/proc/x.json", "cannot write"), ("FILE", "not a directory")])
def test_recalibrate_checks_out_before_the_work(tmp_path, out, needle, capsys):
    ledger = _cascade_ledger(tmp_path / "l.sqlite")
    cfg = write_config(tmp_path)
    if out == "FILE":
        out = str(cfg)
    one_error(cli(capsys, "recalibrate", "--from-ledger", "--config", str(cfg), "--ledger", str(ledger), "--out", out),
              needle)


def test_models_prepare_with_a_cache_that_is_a_file(tmp_path):
    f = tmp_path / "cache"
    f.write_text("x")
    one_error(cascade("models", "prepare", "smollm2-135m", env={"CASCADE_MODEL_CACHE": str(f)}),
              f"model cache {f} is not a directory")
    one_error(cascade("models", "list", "--cache-dir", str(f)), f"model cache {f} is not a directory")
    one_error(cascade("models", "verify", "--cache-dir", str(f)), f"model cache {f} is not a directory")


@pytest.mark.parametrize("key_id", ["", "a: b", "x" * 65, "has space"])
def test_keys_create_refuses_an_id_the_config_could_not_hold(key_id, capsys):
    one_error(cli(capsys, "keys", "create", "--id", key_id, "--user-tier", "free"), "--id")


def test_keys_create_prints_a_line_the_config_reads_back(capsys):
    import yaml

    r = cli(capsys, "keys", "create", "--id", "ops-1.a_b", "--user-tier", "free: tier")
    assert r.returncode == 0, r.stderr
    entry = yaml.safe_load(r.stdout.strip())[0]
    assert entry["id"] == "ops-1.a_b" and entry["user_tier"] == "free: tier" and len(entry["sha256"]) == 64


@pytest.mark.parametrize("content", [None, "{not json", '{"model_type": "llama"}'])
def test_serve_refuses_a_model_directory_that_holds_no_model(tmp_path, content):
    model = tmp_path / "model"
    model.mkdir()
    if content is not None:
        (model / "config.json").write_text(content)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(write_config(tmp_path).read_text().replace("model: smollm2-135m", f"model: {model}", 1))
    r = cascade("serve", "--config", str(cfg), "--port", str(free_port()))
    want = {None: "no config.json", "{not json": "cannot read"}.get(content, "has a config.json but no weights")
    one_error(r, "tier 'small'", want)  # before the banner: a weightless directory was a traceback, exit 3


def test_serve_says_in_one_line_why_a_model_failed_to_load_at_startup(tmp_path):
    """A model directory that passes the checks before the banner but will not load (here: no tokenizer.json)
    fails in the server's startup: its ConfigError is the one line logged, not starlette's whole traceback
    (exit status 3, as uvicorn's for an app that failed to start). This case loads the tokenizer."""
    from cascade.models import resolve_model_path

    model = tmp_path / "model"
    model.mkdir()
    for f in resolve_model_path("smollm2-135m").iterdir():
        if f.name != "tokenizer.json":
            (model / f.name).symlink_to(f)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(write_config(tmp_path).read_text().replace("model: smollm2-135m", f"model: {model}", 1))
    r = cascade("serve", "--config", str(cfg), "--port", str(free_port()))
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 2 and errors[1].endswith("Application startup failed. Exiting."), r.stderr
    assert errors[0].startswith(f"ERROR:    ConfigError: tier 'small': cannot load model from {model}: "), r.stderr


def test_an_empty_policy_name_is_refused(tmp_path, capsys):
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("  cascade: {chain: [small, large]}\n",
                                           "  cascade: {chain: [small, large]}\n  '': {chain: [large]}\n"))
    one_error(cli(capsys, "ask", "hi", "--config", str(cfg)), "a policy name must not be empty")


# --- paths under the home directory of a user that does not exist ------------------------------------------

NO_USER = "~no-such-user-of-cascade"


@pytest.mark.parametrize("argv, needle", [
    (["report", "--ledger", "LEDGER", "--plot", f"{NO_USER}/x.png"], "--plot"),
    (["models", "list", "--cache-dir", f"{NO_USER}/m"], "--cache-dir"),
    (["models", "prepare", "smollm2-135m", "--cache-dir", f"{NO_USER}/m"], "--cache-dir"),
    (["recalibrate", "--from-ledger", "--config", "CONFIG", "--ledger", "LEDGER", "--out", f"{NO_USER}/o"], "--out"),
    (["recalibrate", "--from-ledger", "--config", "CONFIG", "--ledger", "LEDGER", "--out", f"{NO_USER}/o.json"],
     "--out"),
    (["calibrate", "--data", "DATA", "--model", "m1", "--out", f"{NO_USER}/a.json"], "--out"),
    (["calibrate", "--data", f"{NO_USER}/d.jsonl", "--model", "m1", "--out", "OUT"], "data file"),
    (["calibrate", "--data", "DATA", "--model", "m1", "--out", "OUT", "--plot", f"{NO_USER}/p.png"], "--plot"),
    (["replay", "--train", "DATA", "--test", "DATA", "--chain", "m1,m2", "--no-features",
      "--export-policy", f"{NO_USER}/p"],
     "--export-policy"),
])
def test_a_path_under_the_home_of_no_such_user_is_one_line(tmp_path, argv, needle, capsys):
    subst = {"LEDGER": str(_cascade_ledger(tmp_path / "l.sqlite")), "CONFIG": str(write_config(tmp_path)),
             "DATA": str(data_file(tmp_path)), "OUT": str(tmp_path / "a.json")}
    argv = [subst.get(a, a) for a in argv]
    path = next(a for a in argv if a.startswith(NO_USER))
    one_error(cli(capsys, *argv), f"{needle}: cannot expand {path!r}: no such user")
    assert not (tmp_path / "a.json").exists()


def test_a_model_cache_under_the_home_of_no_such_user_is_one_line(tmp_path):
    env = {"CASCADE_MODEL_CACHE": f"{NO_USER}/m"}
    for argv in (["models", "list"], ["models", "prepare", "smollm2-135m"]):
        one_error(cascade(*argv, env=env), f"$CASCADE_MODEL_CACHE: cannot expand '{NO_USER}/m': no such user")


def test_a_model_path_under_the_home_of_no_such_user_is_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(write_config(tmp_path).read_text().replace("model: smollm2-135m", f"model: {NO_USER}/m", 1))
    one_error(cascade("serve", "--config", str(cfg), "--port", str(free_port())),
              f"cannot expand '{NO_USER}/m': no such user")


# --- --since at the edges of the calendar ------------------------------------------------------------------


@pytest.mark.parametrize("since", ["0001-01-01T00:00+01:00", "9999-12-31T23:59:59-01:00"])
@pytest.mark.parametrize("command", [["report"], ["shadow", "report"], ["recalibrate", "--from-ledger"]])
def test_since_past_the_edge_of_the_calendar_in_utc_is_one_line(tmp_path, since, command, capsys):
    ledger = _cascade_ledger(tmp_path / "l.sqlite")
    one_error(cli(capsys, *command, "--ledger", str(ledger), "--config", str(write_config(tmp_path)),
                  "--since", since), f"--since: {since!r} is out of range")
    r = cli(capsys, "report", "--ledger", str(ledger), "--since", since.replace("+01:00", "Z").replace("-01:00", "Z"))
    assert r.returncode == 0, r.stderr  # the edges themselves are dates


# --- arguments and standard input that are not UTF-8 -------------------------------------------------------


@pytest.mark.parametrize("argv, name", [
    (["ask", "--config", "CONFIG", "\udcff hi"], "argument question"),
    (["ask", "--config", "CONFIG", "hi", "--system", "\udcff"], "argument --system"),
    (["ask", "--config", "CONFIG", "hi", "--model", "\udcff"], "argument --model"),
    (["report", "--ledger", "LEDGER", "--by", "meta:\udcff"], "argument --by"),
    (["keys", "hash", "\udcff"], "argument key"),
    (["keys", "create", "--id", "k", "--user-tier", "fr\udcffee"], "argument --user-tier"),
    (["calibrate", "--data", "\udcff.jsonl", "--model", "m1", "--out", "a.json"], "argument --data"),
])
def test_an_argument_that_is_not_utf8_is_refused_naming_it(tmp_path, argv, name, capsys):
    subst = {"LEDGER": str(_cascade_ledger(tmp_path / "l.sqlite")), "CONFIG": str(write_config(tmp_path))}
    r = cli(capsys, *[subst.get(a, a) for a in argv])
    one_error(r, f"{name}: not valid UTF-8 text")
    assert r.stdout == ""
    assert not (tmp_path / "ledger.sqlite").exists()  # refused before the engine opened its ledger


def test_bytes_that_are_not_utf8_on_the_command_line_or_standard_input_are_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("CASCADE_CONFIG", None)
    cfg = write_config(tmp_path)
    for argv, name in (([b"ask", b"--config", os.fsencode(cfg), b"\xff hi"], "argument question"),
                       ([b"ask", b"--config", os.fsencode(cfg), b"hi", b"--model", b"\xff"], "argument --model"),
                       ([b"keys", b"hash", b"\xff"], "argument key")):
        r = subprocess.run([sys.executable, "-m", "cascade.cli", *argv], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=120)
        one_error(r, f"{name}: not valid UTF-8 text")
    assert not (tmp_path / "ledger.sqlite").exists()
    # stdin decoded with surrogates (a UTF-8 locale's default) or strictly (PYTHONIOENCODING=utf-8:strict)
    for io_env in ({}, {"PYTHONIOENCODING": "utf-8:strict"}):
        r = subprocess.run([sys.executable, "-m", "cascade.cli", "keys", "hash"], input=b"\xff\n",
                           capture_output=True, env={**env, **io_env}, cwd=REPO, timeout=120)
        r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())
        one_error(r, "standard input: not valid UTF-8 text")
        assert r.stdout == ""


# --- keys create: values YAML would read as something else -------------------------------------------------


@pytest.mark.parametrize("value", ["123", "true", "yes", "on", "null", "1.5", "0x1F", "1_000", "-1", ".inf"])
def test_keys_create_quotes_what_yaml_would_not_read_back_as_the_same_string(tmp_path, value, capsys):
    import yaml

    from cascade.config import load_config

    r = cli(capsys, "keys", "create", "--id", value, "--user-tier", value)
    assert r.returncode == 0, r.stderr
    entry = yaml.safe_load(r.stdout.strip())[0]
    assert entry["id"] == value and entry["user_tier"] == value
    cfg = write_config(tmp_path, extra=f"user_tiers: {{{json.dumps(value)}: {{}}}}\nauth:\n  keys:\n{r.stdout}")
    keys = load_config(str(cfg), environ={}).auth.keys
    assert [(k.id, k.user_tier) for k in keys] == [(value, value)]


# --- empty paths, counts below 1, port 0 and --max-tokens above the server's limit ---------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["report", "--ledger", ""], "--ledger: empty path"),
    (["shadow", "report", "--ledger", ""], "--ledger: empty path"),
    (["recalibrate", "--from-ledger", "--config", "CONFIG", "--ledger", ""], "--ledger: empty path"),
    (["ask", "hi", "--config", "CONFIG", "--ledger", ""], "--ledger: empty path"),
    (["report", "--ledger", "LEDGER", "--plot", ""], "--plot: empty path"),
    (["report", "--ledger", "LEDGER", "--config", ""], "config file: empty path"),
    (["shadow", "report", "--ledger", "LEDGER", "--config", ""], "config file: empty path"),
    (["recalibrate", "--from-ledger", "--ledger", "LEDGER", "--config", ""], "config file: empty path"),
    (["models", "list", "--cache-dir", ""], "--cache-dir: empty path"),
    (["models", "prepare", "smollm2-135m", "--cache-dir", ""], "--cache-dir: empty path"),
    (["shadow", "report", "--ledger", "LEDGER", "--min-group", "-1"], "--min-group must be at least 1"),
    (["shadow", "report", "--ledger", "LEDGER", "--top", "0"], "--top must be at least 1"),
])
def test_an_empty_path_is_refused_not_ignored(tmp_path, argv, needle, capsys):
    subst = {"LEDGER": str(_cascade_ledger(tmp_path / "l.sqlite")), "CONFIG": str(write_config(tmp_path))}
    r = cli(capsys, *[subst.get(a, a) for a in argv])
    one_error(r, needle)
    assert r.stdout == ""
    assert not (tmp_path / "ledger.sqlite").exists()  # the config's ledger was not used instead


@pytest.mark.parametrize("argv, env", [
    (["report", "--ledger", "sqlite:///x.sqlite"], {}),
    (["shadow", "report", "--ledger", "sqlite:///x.sqlite"], {}),
    (["ledger", "prune", "--older-than-days", "30", "--ledger", "sqlite:///x.sqlite"], {}),
    (["ask", "hi", "--config", "CONFIG", "--ledger", "sqlite:///x.sqlite"], {}),
    (["ask", "hi", "--config", "CONFIG"], {"CASCADE_LEDGER_PATH": "sqlite:///x.sqlite"}),
    (["ask", "hi", "--config", "URLCONFIG"], {}),
])
def test_a_ledger_url_of_another_scheme_than_postgresql_is_refused(tmp_path, monkeypatch, argv, env, capsys):
    """``sqlite:///x.sqlite`` (as SQLAlchemy names a SQLite file) was taken as a relative path: the commands
    created the file ./sqlite:/x.sqlite, a ledger no one would look for."""
    monkeypatch.chdir(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    url_config = tmp_path / "url.yaml"
    url_config.write_text(write_config(tmp_path).read_text().replace(f"{{path: {tmp_path / 'ledger.sqlite'}}}",
                                                                     "{path: 'sqlite:///x.sqlite'}"))
    subst = {"CONFIG": str(write_config(tmp_path)), "URLCONFIG": str(url_config)}
    r = cli(capsys, *[subst.get(a, a) for a in argv])
    one_error(r, "sqlite:// is no ledger URL: give a SQLite file's path (without sqlite://) or a postgresql:// URL")
    assert not (tmp_path / "sqlite:").exists() and not (tmp_path / "ledger.sqlite").exists()


@pytest.mark.parametrize("argv, env, needle", [
    (["--ledger", ""], {}, "--ledger: empty path"),
    (["--port", "0"], {}, "--port: 0 would listen on a random port"),
    ([], {"CASCADE_PORT": "0"}, "environment variable CASCADE_PORT (server.port): 0 would listen on a random port"),
])
def test_serve_refuses_an_empty_ledger_and_port_0_before_the_banner(tmp_path, argv, env, needle):
    argv = argv if "--port" in argv or env else [*argv, "--port", str(free_port())]
    r = cascade("serve", "--config", str(write_config(tmp_path)), *argv, env=env, timeout=60)
    one_error(r, needle)
    assert "serving policies" not in r.stderr
    assert not (tmp_path / "ledger.sqlite").exists()


def test_ask_applies_the_servers_max_tokens_limit(tmp_path, capsys):
    cfg = write_config(tmp_path, extra="server: {max_tokens_limit: 16}")
    one_error(cli(capsys, "ask", "hi", "--config", str(cfg), "--max-tokens", "17"),
              "--max-tokens: 17 is above this server's limit of 16")
    one_error(cli(capsys, "ask", "hi", "--config", str(cfg), "--max-tokens", "99999999999"),
              "--max-tokens: 99999999999 is above this server's limit of 16")
    assert not (tmp_path / "ledger.sqlite").exists()  # refused before the engine opened its ledger


# --- config shapes a validator did not expect, config files that are not files, unpriced hosted tiers --------


def _openai_large(tmp_path: Path, options: str, *, price: bool = True) -> Path:
    """The two-tier config, its large tier an openai one with ``options`` (and its price, or none)."""
    cfg = write_config(tmp_path).read_text().replace(
        "backend: transformers\n    model: smollm2-135m\n    price: {input_per_1m: 2.00, output_per_1m: 6.00}\n",
        "backend: openai\n    model: gpt-x\n" + ("    price: {input_per_1m: 2.00, output_per_1m: 6.00}\n" if price
                                                   else "") + f"    options: {options}\n")
    p = tmp_path / "openai.yaml"
    p.write_text(cfg)
    return p


@pytest.mark.parametrize("providers, needle", [
    ("{p1: {backend: openai, model: m}}", "tiers.1.providers: Input should be a valid list"),
    ("5", "tiers.1.providers: Input should be a valid list"),
])
def test_providers_that_are_not_a_list_are_one_line(tmp_path, providers, needle, capsys):
    cfg = write_config(tmp_path).read_text().replace(
        "backend: transformers\n    model: smollm2-135m\n    price: {input_per_1m: 2.00",
        f"providers: {providers}\n    price: {{input_per_1m: 2.00")
    p = tmp_path / "bad.yaml"
    p.write_text(cfg)
    one_error(cli(capsys, "ask", "hi", "--config", str(p)), needle)


@pytest.mark.parametrize("extra_body, needle", [
    ('"x"', "tiers.large.options.extra_body must be a mapping"),
    ("{logprobs: false, top_k: 5}", "options.extra_body sets ['logprobs'], which the cascade sets itself"),
])
def test_an_extra_body_the_calls_could_not_use_is_refused_before_anything_is_created(tmp_path, extra_body, needle):
    """Accepted, it failed every call (blamed on the upstream, opening its breaker) or took the first tier's
    logprobs away; now `serve` refuses it in one line, and leaves no new ledger behind."""
    p = _openai_large(tmp_path, f'{{base_url: "http://127.0.0.1:9/v1", extra_body: {extra_body}}}')
    ledger = tmp_path / "new" / "ledger.sqlite"
    one_error(cascade("serve", "--config", str(p), "--port", str(free_port()), "--ledger", str(ledger)),
              needle.replace("tiers.large.options", "tier 'large': options"))
    assert not ledger.parent.exists()


def test_a_config_file_that_is_not_a_regular_file_is_never_read(tmp_path, capsys):
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)  # read, it would wait for a writer for ever
    one_error(cli(capsys, "ask", "hi", "--config", str(fifo)), "is not a regular file")
    one_error(cli(capsys, "ask", "hi", "--config", "/dev/zero"), "/dev/zero is not a regular file")
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(17 * 1024 * 1024)
    one_error(cli(capsys, "ask", "hi", "--config", str(big)), "more than a config holds")


def test_serve_warns_of_a_hosted_tier_without_a_price(tmp_path):
    """A price left out is 0: budgets and spend limits would never count the tier's calls. Said at start."""
    port = free_port()
    p = _openai_large(tmp_path, '{base_url: "http://127.0.0.1:9/v1"}', price=False)
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", "--config", str(p), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        lines = []
        for line in proc.stdout:  # up to the banner
            lines.append(line)
            if "serving policies" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    out = "".join(lines)
    assert "tier 'large' calls a hosted API and has no price" in out, out
    assert str(tmp_path / "ledger.sqlite") in out  # the banner names the ledger's absolute path
    assert "tier 'small'" not in out  # a local tier priced (or not): no warning


def test_a_reload_reads_no_variable_whose_flag_the_server_was_given(tmp_path):
    """`serve --port` does not read $CASCADE_PORT (README): a bad value there started the server, then refused
    every POST /admin/reload (422, "invalid environment variable CASCADE_PORT"), as the reload read it; so for
    --host and $CASCADE_HOST, --ledger and $CASCADE_LEDGER_PATH."""
    import httpx

    port = free_port()
    p = write_config(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", "--config", str(p), "--port", str(port),
                             "--host", "127.0.0.1", "--ledger", str(tmp_path / "flag.sqlite")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                 "CASCADE_PORT": "not-a-port", "CASCADE_HOST": " ", "CASCADE_LEDGER_PATH": " "})
    try:
        for line in proc.stdout:  # up to the banner
            if "serving policies" in line:
                break
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
                time.sleep(0.2)
        p.write_text(p.read_text().replace("max_tokens: 8\n", "max_tokens: 8\n    threshold: 0.25\n", 1))
        r = httpx.post(url + "/admin/reload", timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["tiers"]["small"]["threshold"] == 0.25 and r.json()["tiers"]["small"]["changed"] is True
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize("options, needle", [
    ('{base_url: "http://127.0.0.1:9/v1", api_key: ""}', "options.api_key is empty"),
    # a key YAML reads as a number (all digits) was said to be empty
    ('{base_url: "http://127.0.0.1:9/v1", api_key: 12345}', "options.api_key must be a string, not int: quote"),
    ('{base_url: "http://127.0.0.1:9/v1", api_key: k, api_key_env: HOME}', "api_key and api_key_env are both set"),
    # a name that is no string was a TypeError from os.environ ("str expected, not list")
    ('{base_url: "http://127.0.0.1:9/v1", api_key_env: [HOME]}',
     "tiers.large.options.api_key_env: must be a non-empty string, got ['HOME']"),
])
def test_an_api_key_that_says_two_things_or_nothing_is_refused(tmp_path, options, needle, capsys):
    one_error(cli(capsys, "ask", "hi", "--config", str(_openai_large(tmp_path, options))), needle)


@pytest.mark.parametrize("timeout", ["abc", ".nan", "0", "-1", "[1]"])
def test_an_openai_timeout_option_that_is_no_positive_number_is_refused(tmp_path, timeout, capsys):
    """An openai tier's options.timeout_s (taken over the tier's own) went to the client unchecked: the config
    loaded, and every call failed (a string, NaN: "malformed response"; 0, -1: timed out at once)."""
    p = _openai_large(tmp_path, f'{{base_url: "http://127.0.0.1:9/v1", timeout_s: {timeout}}}')
    one_error(cli(capsys, "ask", "hi", "--model", "large", "--config", str(p)),
              "tiers.large.options.timeout_s: must be a number > 0, got")


@pytest.mark.parametrize("backend, options, needle", [
    ("openai", '{base_url: "http://127.0.0.1:9/v1", context_length: 64}', "tier 'large': unknown openai option(s) "
     "['context_length']: set from the tier itself"),
    ("openai", '{base_url: "http://127.0.0.1:9/v1", model: gpt-y, name: n}', "unknown openai option(s) ['model', "
     "'name']"),
    ("transformers", "{cache_dir: /tmp, threads: 1}", "tier 'small': unknown transformers option(s) ['cache_dir']"),
    ("transformers", "{model: smollm2-135m}", "tier 'small': unknown transformers option(s) ['model']"),
])
def test_an_option_naming_what_the_tier_itself_sets_is_refused_in_one_line(tmp_path, backend, options, needle,
                                                                          capsys):
    """The backends take a tier's model, name, context_length (and the cache) beside its options: an option of one
    of those names was a TypeError ("got multiple values for keyword argument"), a traceback."""
    p = _openai_large(tmp_path, options) if backend == "openai" else \
        write_config(tmp_path, small=f"    options: {options}")
    one_error(cli(capsys, "ask", "hi", "--config", str(p)), needle)


def test_a_blank_model_and_an_empty_host_are_refused(tmp_path, capsys):
    p = _openai_large(tmp_path, '{base_url: "http://127.0.0.1:9/v1"}')
    p.write_text(p.read_text().replace("model: gpt-x", 'model: "  "'))
    one_error(cli(capsys, "ask", "hi", "--config", str(p)), "tiers.1.model: must not be empty")
    one_error(cascade("serve", "--config", str(write_config(tmp_path)), "--host", ""), "--host: empty address")


# --- an install without the optional libraries (the base install serves hosted tiers only) -----------------

_BLOCKER = '''\
import sys

BLOCKED = {blocked!r}


class _Blocked:
    """Stands for an install without these packages: importing one (or find_spec) fails as if absent."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
'''


def without(tmp_path: Path, *modules: str) -> dict[str, str]:
    """The environment of a process in which these top-level modules cannot be imported (a sitecustomize that
    puts a refusing finder first on ``sys.meta_path``)."""
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=set(modules)))
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}


def test_without_torch_serve_ask_and_prepare_say_what_to_install_before_creating_anything(tmp_path):
    env = without(tmp_path, "torch", "transformers")
    cfg = write_config(tmp_path)
    r = cascade("serve", "--config", str(cfg), "--port", str(free_port()), env=env)
    one_error(r, "tier 'small': the transformers backend needs torch and transformers, which are not installed",
              "install torch==2.13.0 first", "cascade-engine[local]")
    assert "serving policies" not in r.stderr
    assert not (tmp_path / "ledger.sqlite").exists()
    r = cascade("ask", "--config", str(cfg), "hi", env=env)
    one_error(r, "the transformers backend needs torch and transformers")
    assert not (tmp_path / "ledger.sqlite").exists()
    r = cascade("models", "prepare", "smollm2-135m", "--cache-dir", str(tmp_path / "cache"), env=env)
    one_error(r, "preparing smollm2-135m needs torch, transformers, not installed here",
              "install torch==2.13.0 first")
    assert not (tmp_path / "cache").exists()  # nothing downloaded that could not be converted


def test_without_netcal_use_netcal_is_one_line_and_the_numpy_fit_still_runs(tmp_path):
    env = without(tmp_path, "netcal")
    data = tmp_path / "d.jsonl"
    rows = [{"idx": i, "models": {"m": {"answer": "A", "raw_conf_logprob": -0.05 * (i % 20),
                                        "correct": i % 3 != 0, "cost_usd": 0.001}}} for i in range(60)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "a.json"
    r = cascade("calibrate", "--data", str(data), "--model", "m", "--out", str(out), "--use-netcal", env=env)
    one_error(r, "--use-netcal needs netcal, which is not installed", "install torch==2.13.0 first")
    assert not out.exists()
    r = cascade("calibrate", "--data", str(data), "--model", "m", "--out", str(out), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["method"] == "temperature"


def test_a_model_not_prepared_is_named_with_its_tier(tmp_path):
    cfg = write_config(tmp_path, extra=f"models: {{cache_dir: {tmp_path / 'empty-cache'}}}")
    r = cascade("ask", "--config", str(cfg), "hi")
    one_error(r, "tier 'small': model 'smollm2-135m' is not prepared under",
              f"cascade models prepare smollm2-135m --cache-dir {tmp_path / 'empty-cache'}")
    assert not (tmp_path / "ledger.sqlite").exists()


def test_ask_checks_only_the_tiers_its_question_may_call(tmp_path):
    # a hosted tier answers; the config's other tier names a model not prepared here (as on a base install)
    from tests.fault_server import FaultServerThread

    with FaultServerThread() as fs:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"""\
ledger: {{path: {tmp_path / 'ledger.sqlite'}}}
models: {{cache_dir: {tmp_path / 'empty-cache'}}}
tiers:
  - {{name: local, backend: transformers, model: smollm2-135m}}
  - name: hosted
    backend: openai
    model: m
    price: {{input_per_1m: 1, output_per_1m: 2}}
    options: {{base_url: "{fs.base_url}", api_key: x}}
policies:
  cascade: {{chain: [local, hosted]}}
""")
        r = cascade("ask", "--config", str(cfg), "--model", "hosted", "--json", "hi")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["tier"] == "hosted"
        one_error(cascade("ask", "--config", str(cfg), "hi"), "tier 'local': model 'smollm2-135m' is not prepared")


@pytest.mark.parametrize("argv, needle", [
    (["shadow", "--ledger", "x.sqlite", "report"],
     "invalid choice: 'x.sqlite' (choose from 'report'); the subcommand comes before its options, as in "
     "`cascade shadow report [options]`"),
    (["models", "--cache-dir", "dir", "list"], "the subcommand comes before its options, as in "
                                               "`cascade models SUBCOMMAND [options]`"),
    (["--config", "c.yaml", "ask", "hi"], "invalid choice: 'c.yaml' (choose from 'keys', "),
    (["--config", "c.yaml", "ask", "hi"], "the command comes before its options, as in `cascade COMMAND [options]`"),
])
def test_options_before_the_subcommand_are_explained(argv, needle, capsys):
    """argparse reads an option's value given before the (sub)command as the (sub)command: say so."""
    one_error(cli(capsys, *argv), needle)


def test_a_mistyped_subcommand_gets_no_option_order_hint(capsys):
    err = one_error(cli(capsys, "shadow", "rep"), "invalid choice: 'rep' (choose from 'report')")
    assert "comes before" not in err


def test_health_uptime_holds_when_the_wall_clock_steps_back(tmp_path):
    """GET /health's uptime_s was the wall clock's now less its start: an hour's step back (NTP correcting a VM's
    clock) made it -3600 s. It is counted on the monotonic clock, which no step moves."""
    import httpx

    from tests.conftest import clock_step

    step_env, jump = clock_step(tmp_path)
    p = tmp_path / "c.yaml"
    p.write_text(f"ledger: {{path: {tmp_path / 'ledger.sqlite'}}}\n"
                 "tiers: [{name: remote, backend: openai, model: m, options: {base_url: 'http://127.0.0.1:9/v1'}, "
                 "price: {input_per_1m: 1, output_per_1m: 2}}]\npolicies: {cascade: {chain: [remote]}}\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", "--config", str(p), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **step_env})
    try:
        url, deadline = f"http://127.0.0.1:{port}/health", time.monotonic() + 60
        while True:
            try:
                before = httpx.get(url, timeout=5).json()["uptime_s"]
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
                time.sleep(0.1)
        jump.write_text("-3600")
        after = httpx.get(url, timeout=5).json()["uptime_s"]
        assert before <= after < before + 30, (before, after)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_ask_takes_a_max_tokens_from_1_to_the_servers_limit(tmp_path, capsys):
    # within the bounds the question goes on, to the check of its tiers' models (none is prepared here)
    cfg = write_config(tmp_path, extra=f"server: {{max_tokens_limit: 16}}\nmodels: {{cache_dir: {tmp_path / 'none'}}}")
    for n in ("1", "16"):
        one_error(cli(capsys, "ask", "hi", "--config", str(cfg), "--max-tokens", n), "is not prepared under")
    one_error(cli(capsys, "ask", "hi", "--config", str(cfg), "--max-tokens", "0"), "--max-tokens must be >= 1")
    assert not (tmp_path / "ledger.sqlite").exists()


def test_serve_takes_port_65535_and_refuses_65536(tmp_path):
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the bind is refused without any port taken
    cfg = str(write_config(tmp_path))
    one_error(cascade("serve", "--config", cfg, "--host", "192.0.2.1", "--port", "65535"),
              "cannot bind 192.0.2.1:65535")
    one_error(cascade("serve", "--config", cfg, "--port", "65536"), "--port: 65536 is not a TCP port")
    assert not (tmp_path / "ledger.sqlite").exists()


def test_an_os_error_no_command_turned_into_a_message_is_still_one_line_and_exit_status_2(tmp_path, capsys):
    # every command's fallback (a file it did not check first): the line names the path, as a config error's would
    from cascade.cli import run_command

    missing = tmp_path / "missing.jsonl"
    assert run_command("cascade", lambda: open(missing)) == 2
    assert capsys.readouterr().err == f"cascade: error: {missing}: No such file or directory\n"
