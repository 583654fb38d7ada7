"""`import cascade` (and the serving and calibration packages) must not import torch or vllm."""

import json
import subprocess
import sys


def test_import_pulls_in_no_torch_or_vllm():
    code = (
        "import sys, json, cascade, cascade.engine, cascade.config, cascade.backends, cascade.cli, "
        "cascade.commands, cascade.models, serving, calibration; "
        "print(json.dumps(sorted(m for m in ('torch', 'vllm', 'transformers', 'netcal', 'matplotlib') "
        "if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_unknown_backend_is_a_config_error():
    from cascade.backends import backend_class
    from cascade.errors import ConfigError

    try:
        backend_class("nope")
    except ConfigError as exc:
        assert "nope" in str(exc) and "transformers" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected ConfigError")


def test_the_packages_ship_their_type_hints():
    """PEP 561: without a ``py.typed`` in the package (and in its wheel), a type checker of a program that embeds
    the engine ignores our hints; ``cascade.Engine`` and the other names loaded on first use are imported for type
    checkers under TYPE_CHECKING, which runs nothing."""
    import importlib.resources
    import tomllib
    from pathlib import Path

    import cascade

    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    package_data = data["tool"]["setuptools"]["package-data"]
    for pkg in ("cascade", "calibration", "serving"):
        assert importlib.resources.files(pkg).joinpath("py.typed").is_file(), pkg
        assert "py.typed" in package_data[pkg], pkg
    assert set(cascade._LAZY) <= set(cascade.__all__)
