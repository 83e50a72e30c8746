"""Run before any project module is imported (pytest loads this file first)."""

from __future__ import annotations

import os

# prometheus_client picks its multiprocess mode once, when imported: a developer's or CI's
# PROMETHEUS_MULTIPROC_DIR must be gone before then (the multiprocess tests set their own).
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
