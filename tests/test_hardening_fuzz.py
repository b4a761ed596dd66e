"""Issue 8: the coverage-guided fuzz targets of tools/fuzz (atheris) run
for a bounded time each — the SMTP session core's command-line parser, the
fetchmailrc parser, the getmail rc parser and the authenticator's frame
decoder; any crash, uncaught exception or broken invariant fails the test
(the crashing input is in the output).

The four run side by side, FUZZ_SECONDS each (default 30, which keeps
the whole suite well under its 15 minutes; it was 60; set
SENDOOWAY_FUZZ_SECONDS to change it, e.g. 600 by hand)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("atheris", reason="atheris is in the `test` extra")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "tools", "fuzz")
FUZZ_SECONDS = int(os.environ.get("SENDOOWAY_FUZZ_SECONDS", "30"))
TARGETS = {"session": "smtp.dict", "fetchmail": "fetchmail.dict", "getmail": "getmail.dict",
           "frames": "frames.dict"}


@pytest.fixture(scope="module")
def fuzz_runs():
    """Start every target at once; yield {name: (process, output file, work dir)}."""
    runs = {}
    for name, dictionary in TARGETS.items():
        work = tempfile.mkdtemp(prefix=f"sendooway-fuzz-{name}-")
        corpus = os.path.join(work, "corpus")
        shutil.copytree(os.path.join(FUZZ, "corpus", name), corpus)
        out = open(os.path.join(work, "output.txt"), "w+b")
        proc = subprocess.Popen(
            [sys.executable, os.path.join(FUZZ, f"fuzz_{name}.py"),
             f"-max_total_time={FUZZ_SECONDS}", "-timeout=10", "-rss_limit_mb=1024",
             f"-dict={os.path.join(FUZZ, dictionary)}", f"-artifact_prefix={work}/", corpus],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work)
        runs[name] = (proc, out, work)
    yield runs
    for proc, out, work in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(FUZZ_SECONDS + 90)
@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_target_finds_nothing(fuzz_runs, name):
    proc, out, work = fuzz_runs[name]
    try:
        rc = proc.wait(FUZZ_SECONDS + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "killed after the time limit"
    out.seek(0)
    text = out.read().decode("utf-8", "replace")
    tail = text[-6000:]
    crashes = [f for f in os.listdir(work) if f.startswith(("crash-", "timeout-", "oom-", "leak-"))]
    assert rc == 0 and not crashes, f"fuzz_{name}: rc={rc}, artifacts={crashes}\n{tail}"
    runs = [line for line in text.splitlines() if line.startswith("Done ")]
    assert runs, tail  # "Done N runs in S second(s)"
    assert int(runs[-1].split()[1]) > 1000, runs[-1]
