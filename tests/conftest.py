"""pytest set-up: the whole run lives inside one fake world.

On start, pytest re-executes itself once with the world's environment
(nss_wrapper in LD_PRELOAD, pam_wrapper's libpam first on LD_LIBRARY_PATH):
both must be in place when the process starts, and then in-process code and
every child process see the same fake users and PAM.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

from tests.fakeworld import MACHINE_SKIP

_ENV_FLAG = "SENDOOWAY_TEST_WORLD"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if os.environ.get(_ENV_FLAG):
        workerinput = getattr(config, "workerinput", None)
        if workerinput is not None:
            _enter_worker_world(workerinput["workerid"])
        return
    if os.environ.get("SENDOOWAY_NO_REEXEC"):
        return
    from tests.fakeworld import World

    root = tempfile.mkdtemp(prefix="sendooway-world-")
    World.create(root)
    env = World.load(root).env()
    env["SENDOOWAY_WORLD_OWNER"] = str(os.getpid())
    args = [sys.executable, "-m", "pytest", *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    # Re-exec inside the world; the world folder is removed by the child at exit.
    os.execve(sys.executable, args, env)


# The world this process made for itself (a pytest-xdist worker), removed
# by it at the end.
_own_world: list[str] = []


def _enter_worker_world(workerid: str) -> None:
    """A pytest-xdist worker gets a world of its own: the same users, uids
    and passwords, but its own homes, nss files, PAM services and
    certificates, so tests running side by side never write into each
    other's ~alice. nss_wrapper and pam_wrapper read their variables on
    first use, which in a worker is after this; checked, not assumed."""
    import pwd

    from tests.fakeworld import World

    root = tempfile.mkdtemp(prefix=f"sendooway-world-{workerid}-")
    _own_world.append(root)
    World.create(root)
    world = World.load(root)
    os.environ.update(world.env())
    home = pwd.getpwnam("alice").pw_dir
    if home != world.users["alice"].home:
        raise pytest.UsageError(
            f"worker {workerid}: nss_wrapper already answered from another world "
            f"(~alice is {home}, not {world.users['alice'].home})")


def pytest_unconfigure(config):
    for root in _own_world:
        shutil.rmtree(root, ignore_errors=True)
    root = os.environ.get(_ENV_FLAG)
    if root and os.environ.get("SENDOOWAY_WORLD_OWNER") and os.path.basename(root).startswith(
        "sendooway-world-"
    ):
        if not hasattr(config, "workerinput"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true, as root on a machine scripts/setup.sh prepared) every
    tool a test needs is there: a skip there means setup missed a package
    (swaks without Net::SSLeay, no logrotate, no PAM headers) and the test
    proves nothing, so it fails instead of passing quietly. Except a skip
    for what a machine is, not what setup installs (MACHINE_SKIP: a real
    Debian's journald owns /dev/log, so the UDP fallback cannot be seen)."""
    outcome = yield
    report = outcome.get_result()
    if (os.environ.get("CI") == "true" and report.skipped
            and not hasattr(report, "wasxfail") and MACHINE_SKIP not in str(report.longrepr)):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI: a skipped test is a failure (setup should provide what it needs): {reason}"


@pytest.fixture(autouse=True)
def _forget_refused_upstream_logins():
    """In-process relays share the process's memory of refused upstream
    logins (_pool.refused_logins): each test starts without one."""
    from sendooway_front import _pool

    _pool.refused_logins.clear()
    yield
    _pool.refused_logins.clear()


@pytest.fixture(autouse=True)
def _forget_served_addresses():
    """In-process servers and relays share the process's routing-loop
    tables (_loops): each test starts with none (a port an earlier test's
    server noted could be an upstream's now)."""
    from sendooway_front import _loops

    _loops.reset()
    yield
    _loops.reset()


@pytest.fixture(scope="session")
def world():
    from tests.fakeworld import World

    root = os.environ.get(_ENV_FLAG)
    if not root:
        pytest.skip("not running inside the fake world")
    return World.load(root)


@pytest.fixture
def clean_homes(world):
    """Empty every fake user's home before and after a test."""
    for name in world.users:
        world.clear_home(name)
    yield world
    for name in world.users:
        world.clear_home(name)


@pytest.fixture
def upstream_factory(world):
    """Start fake upstreams; all are stopped at the end of the test."""
    from tests.upstream import FakeUpstream

    started = []

    def make(**kwargs):
        up = FakeUpstream(world, **kwargs).start()
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()


@pytest.fixture
def tmp_config(tmp_path):
    """Write a sendooway.conf (mode 0644) and return its path."""

    def write(text: str, name: str = "sendooway.conf") -> str:
        p = tmp_path / name
        p.write_text(text)
        os.chmod(tmp_path, 0o755)
        os.chmod(p, 0o644)
        return str(p)

    return write
