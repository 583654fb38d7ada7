"""The Makefile's set-up, run for real with make in a scratch folder (-f the repository's Makefile): its stamps
must say what is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(cwd), "-f", str(REPO / "Makefile"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_a_pip_install_that_fails_leaves_no_stamp(tmp_path):
    # A real venv that sees this interpreter's packages (torch, cascade, ...) through a .pth file, so the
    # Makefile's import checks pass; pip, without an index, cannot get the project's build dependencies.
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = next(env_dir.glob("lib/python*/site-packages"))
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n" + str(REPO) + "\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}
    r = make(tmp_path, "setup", f"VENV={env_dir}", f"PYTHON={sys.executable}", env=env)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "setuptools" in r.stdout + r.stderr  # pip's own words on what it could not get
    assert not (tmp_path / ".stamps" / "venv").exists()


@pytest.mark.parametrize("broken", ["removed", "python deleted", "python of a Python that is gone"])
def test_a_stamp_beside_a_venv_whose_python_does_not_run_is_set_up_again(tmp_path, broken):
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / ".stamps").mkdir()
    (tmp_path / ".stamps" / "venv").touch()  # newer than pyproject.toml: set up, as far as the stamp says
    env_dir = tmp_path / "venv"
    if broken != "removed":
        venv.create(env_dir, with_pip=False)
        (env_dir / "bin" / "python").unlink()
        if broken != "python deleted":
            (env_dir / "bin" / "python").symlink_to(tmp_path / "uninstalled" / "python3")
    r = make(tmp_path, "-n", "setup", f"VENV={env_dir}", "PYTHON=python3")
    assert r.returncode == 0, r.stderr
    assert f"python3 -m venv --clear {env_dir}" in r.stdout
    assert "pip install" in r.stdout


def _python_below_3_11() -> str | None:
    pyenv = Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser()
    for name in ("python3.10", "python3.9", "python3.8"):
        for path in [shutil.which(name), *map(str, pyenv.glob(f"versions/{name[6:]}.*/bin/python3"))]:
            if path and subprocess.run([path, "-c", ""], capture_output=True).returncode == 0:
                return path
    return None


@pytest.mark.skipif(_python_below_3_11() is None, reason="no Python below 3.11 here to make the venv with")
def test_a_venv_made_by_a_python_the_project_does_not_take_is_set_up_again(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / ".stamps").mkdir()
    env_dir = tmp_path / "venv"
    subprocess.run([_python_below_3_11(), "-m", "venv", "--without-pip", str(env_dir)], check=True)
    (tmp_path / ".stamps" / "venv").touch()
    r = make(tmp_path, "-n", "setup", f"VENV={env_dir}", "PYTHON=python3")
    assert r.returncode == 0, r.stderr
    assert f"python3 -m venv --clear {env_dir}" in r.stdout


def test_make_help_lists_every_target_the_readme_and_docs_name():
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    named = set(re.findall(r"`make ([a-z][a-z-]*)", text))
    assert {"serve", "test", "test-vllm"} <= named
    r = subprocess.run(["make", "-s", "-C", str(REPO), "help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    listed = set(re.findall(r"\bmake ([a-z][a-z-]*)", r.stdout))
    assert named <= listed, f"not in make help: {sorted(named - listed)}"
