"""Paths the tests share: the repository root, and `../shared` (data and
models that tests use when present, skipping cleanly when not)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
