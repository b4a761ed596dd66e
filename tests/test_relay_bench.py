"""Smoke test: bench/bench_relay.py runs end to end (tiny sizes) and reports
every figure. The real figures are measured on demand, not here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")
def test_bench_relay_smoke():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NSS_WRAPPER", "PAM_WRAPPER", "SENDOOWAY_"))
           and k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_relay.py"),
                        "--sessions", "2", "--big-mib", "1", "--big-runs", "1", "--concurrent", "4"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for needle in ("proxied, cache off", "proxied, cache on", "ratio", "peak RSS", "4/4 succeeded",
                   "CPU per session", "pipelining client"):
        assert needle in r.stdout
