"""scripts/vllm_server.py without vllm: its checks before anything starts (one line, exit status 2), the command it
builds, and its wait for the server it started, against a stand-in "python" that serves /health and /v1/models.

The stand-in servers listen on 127.0.0.1, on a free port of 8950-8999; every process started is stopped."""

from __future__ import annotations

import http.server
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "vllm_server.py"

#: a stand-in for vLLM's api_server: `-m vllm.entrypoints.openai.api_server --host H --port P --served-model-name N`
FAKE_SERVER = r'''
import http.server, json, os, sys
argv = sys.argv[1:]
opt = lambda name: argv[argv.index(name) + 1]
mode = os.environ.get("FAKE_MODE", "ok")
if mode == "exit":
    sys.exit(7)
name = opt("--served-model-name") if mode == "ok" else "some-other-model"

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/health": b"", "/v1/models": json.dumps({"data": [{"id": name}]}).encode()}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")
    def log_message(self, *a):
        pass

host = opt("--host")
cls = http.server.HTTPServer
if ":" in host:
    import socket
    cls = type("S6", (http.server.HTTPServer,), {"address_family": socket.AF_INET6})
cls((host, int(opt("--port"))), H).serve_forever()
'''


def fake_python(tmp_path: Path, *, probe_rc: int = 0) -> Path:
    """An executable that answers the script's vllm probe (``-c ...``) with ``probe_rc`` and runs the stand-in
    server for anything else."""
    server = tmp_path / "fake_server.py"
    server.write_text(FAKE_SERVER)
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exit {probe_rc}; fi\n'
                  f'exec {shlex.quote(sys.executable)} {shlex.quote(str(server))} "$@"\n')
    py.chmod(0o755)
    return py


def run_script(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def one_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(("vllm_server: error: ", "vllm_server.py: error: ")), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def load_script():
    spec = importlib.util.spec_from_file_location("vllm_server_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepared_dir(tmp_path: Path) -> Path:
    """A directory the script takes as a local model (it does not look inside)."""
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    return d


def free_port() -> int:
    """A port of 8950-8999 that is free on 127.0.0.1 now."""
    for port in range(8950, 9000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 8950-8999")


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"data": [{"id": "other"}]}' if self.path == "/v1/models" else b"")

    def log_message(self, *a):  # noqa: ANN002
        pass


@pytest.fixture
def other_server():
    """Another HTTP server that answers /health 200, on a port the OS picked."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Health)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


# --- one-line errors before anything starts -----------------------------------------------------------------


@pytest.mark.parametrize("argv, needles", [
    (["~no-such-user-of-cascade/m", "--print-command"], ["cannot expand", "no such user"]),
    (["MODEL", "--host", "nosuchhost.invalid", "--print-command"], ["--host 'nosuchhost.invalid'", "resolve"]),
    (["MODEL", "--host", "nosuchhost.invalid"], ["--host 'nosuchhost.invalid'"]),
    (["MODEL", "--python", "/nonexistent/python", "--port", "8961"], ["--python /nonexistent/python", "cannot run"]),
    (["MODEL", "--python", "FAKE", "--port", "8962", "--log-file", "/nonexistent/dir/log"],
     ["--log-file /nonexistent/dir/log", "cannot open"]),
    (["MODEL", "--port", "70000"], ["--port 70000"]),
    (["not a model!", "--print-command"], ["neither a catalog id", "hub name"]),
    (["org/name/extra", "--print-command"], ["neither a catalog id"]),
    (["x.gguf", "--print-command"], ["neither a catalog id"]),
    (["MODEL", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["MODEL", "--port", "eighty"], ["--port", "invalid int value"]),
])
def test_bad_arguments_are_one_line(tmp_path, argv, needles):
    subst = {"MODEL": str(prepared_dir(tmp_path)), "FAKE": str(fake_python(tmp_path))}
    one_line(run_script(*[subst.get(a, a) for a in argv]), *needles)


def test_an_unprepared_catalog_id_names_the_cache_to_prepare_into(tmp_path):
    line = one_line(run_script("smollm2-135m", "--cache-dir", str(tmp_path), "--print-command"))
    assert f"cascade models prepare smollm2-135m --cache-dir {tmp_path}" in line


def test_a_python_without_vllm_is_named_before_anything_starts(tmp_path):
    py = fake_python(tmp_path, probe_rc=3)
    one_line(run_script(str(prepared_dir(tmp_path)), "--python", str(py), "--port", "8963"),
             f"vllm is not installed for {py}", "--python .venv-vllm/bin/python")


def test_a_port_in_use_is_refused(tmp_path, other_server):
    r = run_script(str(prepared_dir(tmp_path)), "--python", str(fake_python(tmp_path)), "--port", str(other_server))
    one_line(r, f"--port {other_server}", "not free")
    assert r.stdout == ""  # the other server's URL is not printed as ours


# --- the command -----------------------------------------------------------------------------------------


def test_print_command_is_shell_quoted_with_the_environment_it_sets(tmp_path):
    model = tmp_path / "a model dir"
    model.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "HF_HUB", "TRANSFORMERS_OFF"))}
    r = subprocess.run([sys.executable, str(SCRIPT), str(model), "--device", "cpu", "--port", "8964",
                        "--print-command", "--", "--max-num-seqs", "8"],
                       capture_output=True, text=True, cwd=REPO, env=env, check=True)
    words = shlex.split(r.stdout)
    assigned = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-") and w.split("=")[0].isupper())
    assert assigned["VLLM_CPU_KVCACHE_SPACE"] == "2" and assigned["HF_HUB_OFFLINE"] == "1"
    cmd = words[len(assigned):]
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == str(model)  # one word, though it holds a space
    assert cmd[cmd.index("--port") + 1] == "8964" and cmd[-2:] == ["--max-num-seqs", "8"]
    # vLLM's sampling defaults, not the model's generation_config.json (greedy answers stay the argmax)
    assert cmd[cmd.index("--generation-config") + 1] == "vllm"
    r = subprocess.run([sys.executable, str(SCRIPT), str(model), "--device", "cpu", "--print-command", "--",
                        "--generation-config", "auto"], capture_output=True, text=True, cwd=REPO, env=env, check=True)
    assert shlex.split(r.stdout).count("--generation-config") == 1 and r.stdout.rstrip().endswith("auto")
    # a variable the environment already sets is not repeated
    r = subprocess.run([sys.executable, str(SCRIPT), str(model), "--device", "cpu", "--print-command"],
                       capture_output=True, text=True, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, check=True)
    assert "HF_HUB_OFFLINE" not in r.stdout
    # a hub name on a GPU host is left free to download: no offline mode forced on it
    r = subprocess.run([sys.executable, str(SCRIPT), "Qwen/Qwen2.5-1.5B-Instruct", "--device", "gpu",
                        "--print-command"], capture_output=True, text=True, cwd=REPO, env=env, check=True)
    assert "OFFLINE" not in r.stdout and "--model Qwen/Qwen2.5-1.5B-Instruct" in r.stdout, r.stdout


def test_ipv6_host_url_has_brackets(tmp_path):
    vs = load_script()
    assert vs.base_url("::1", 8100) == "http://[::1]:8100"
    assert vs.base_url("127.0.0.1", 8100) == "http://127.0.0.1:8100"
    r = run_script(str(prepared_dir(tmp_path)), "--host", "::1", "--port", "8965", "--print-command")
    if r.returncode == 2 and "resolve" in r.stderr:
        pytest.skip("no IPv6 here")
    assert r.returncode == 0 and "--host ::1 --port 8965" in r.stdout, r.stderr


def test_a_hub_name_and_a_directory_are_taken(tmp_path):
    vs = load_script()
    assert vs.resolve_model("Qwen/Qwen2.5-1.5B-Instruct", None) == "Qwen/Qwen2.5-1.5B-Instruct"
    d = prepared_dir(tmp_path)
    assert vs.resolve_model(str(d), None) == str(d)


# --- waiting for the server it started ------------------------------------------------------------------------


def test_an_exited_child_is_a_failure_even_when_the_port_answers(other_server):
    vs = load_script()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(RuntimeError, match="exited with status 0"):
        vs.wait_healthy(f"http://127.0.0.1:{other_server}", proc, 10, served_name="m")


def test_a_server_that_serves_another_model_is_not_ours(other_server):
    vs = load_script()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(RuntimeError, match="serves \\['other'\\], not 'm'"):
            vs.wait_healthy(f"http://127.0.0.1:{other_server}", proc, 10, served_name="m")
    finally:
        proc.kill()
        proc.wait()


def _start(tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(prepared_dir(tmp_path)), "--python",
                             str(fake_python(tmp_path)), "--health-timeout", "30", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})


def test_serves_prints_the_url_once_healthy_and_stops_on_sigterm(tmp_path):
    port = free_port()
    proc = _start(tmp_path, "--port", str(port), "--served-model-name", "tiny")
    try:
        line = proc.stdout.readline().strip()
        assert line == f"http://127.0.0.1:{port}/v1", proc.stderr.read() if not line else line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.stdout.read() == ""  # the URL is the only stdout line


@pytest.mark.parametrize("mode, needle", [("exit", "exited with status 7"), ("wrong-name", "another server")])
def test_a_server_that_fails_or_is_not_ours_is_an_error(tmp_path, mode, needle):
    proc = _start(tmp_path, "--port", str(free_port()), env={"FAKE_MODE": mode})
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and out == "", (proc.returncode, out, err)
    assert needle in err and "Traceback" not in err
