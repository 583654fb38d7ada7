"""cascade-engine: a confidence-escalation cascade for LLM serving.

Importing this package has no side effects and imports neither torch nor vllm: backends load lazily
when a tier that uses them is started.
"""

from cascade.errors import CascadeError
from cascade.types import (
    Attempt,
    CascadeRecord,
    Decision,
    GenerationRequest,
    GenerationResult,
    Message,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "CascadeError",
    "Attempt",
    "CascadeRecord",
    "Decision",
    "GenerationRequest",
    "GenerationResult",
    "Message",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "__version__",
]
