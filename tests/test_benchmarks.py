"""The prepared device check runs end to end on the CPU (a small shape, no demo), so that it
works the day a GPU is lent; its figures here are not GPU figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.embedded
@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(embedded_cache):
    env = {**os.environ, "LATENTAUDIT_CACHE": str(embedded_cache)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--shape",
                        "small", "--n", "2", "--new-tokens", "4", "--no-demo"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    for needle in ("1. PGD", "speed-up", "2. generation", "ratio", "3. memory",
                   "batch for a configured 32: 32", "4. projected", "total", "gpu_check:"):
        assert needle in out, out
