"""Shared set-up for the unit tests."""

from __future__ import annotations

import sys
from pathlib import Path

# Import the working tree's app package. The venv's editable-install finder was generated
# before app/__init__.py existed and would otherwise resolve "app" as a namespace package,
# hiding create_app (reinstalling with `pip install -e .` also fixes it).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
