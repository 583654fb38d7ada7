#!/usr/bin/env python3
"""Prepare local models: ``python scripts/prepare_models.py [IDS...] [--cache-dir D] [--all] [--force]``.

A thin wrapper over ``cascade.models`` (the same code as ``cascade models prepare``), usable before the
package is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascade.models import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
