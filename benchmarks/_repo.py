"""Makes the working tree's pdepth importable for the benchmark scripts.

``python benchmarks/bench_*.py`` puts only benchmarks/ on sys.path; when pdepth is built in
place but not installed, importing this module first (before ``import pdepth``) adds the
repository root."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(1, REPO_ROOT)
