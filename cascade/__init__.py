"""cascade-engine: a confidence-escalation cascade for LLM serving.

Importing this package has no side effects and imports neither torch nor vllm: backends load lazily
when a tier that uses them is started. ``Engine``, ``Budget``, ``load_config`` and ``parse_config`` are
imported on first use (``cascade.Engine``), so that ``import cascade`` stays light.
"""

from typing import TYPE_CHECKING

from cascade.errors import CascadeError
from cascade.types import (
    Attempt,
    CascadeRecord,
    Decision,
    Feedback,
    GenerationRequest,
    GenerationResult,
    Message,
    TokenLogprob,
    TopLogprob,
    Usage,
)

if TYPE_CHECKING:  # what type checkers see of the names loaded on first use (below); nothing runs here
    from cascade.budget import Budget
    from cascade.config import load_config, parse_config
    from cascade.engine import Engine

__version__ = "0.1.0"

_LAZY = {"Engine": "cascade.engine", "Budget": "cascade.budget", "load_config": "cascade.config",
         "parse_config": "cascade.config"}


def __getattr__(name: str):  # noqa: ANN202 - PEP 562: the engine's modules load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cascade' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy names too (an editor's completion, dir(cascade))
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Budget",
    "CascadeError",
    "Engine",
    "load_config",
    "parse_config",
    "Attempt",
    "CascadeRecord",
    "Decision",
    "Feedback",
    "GenerationRequest",
    "GenerationResult",
    "Message",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "__version__",
]
