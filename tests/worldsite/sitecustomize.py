"""Imported at start-up by every Python process of the fake world
(fakeworld.World.env puts this folder on PYTHONPATH): pam_wrapper's
start-up, made one process at a time.

pam_wrapper (1.1.4) sets itself up in its constructor, when libpam.so.0
(its stand-in) is loaded: it looks for a free /tmp/pam.X (lstat, ENOENT),
then mkdir()s it, copies the PAM services there, and its destructor removes
that folder at exit. Two processes starting at the same moment both see
the same name free and share one folder (mkdir's EEXIST is only logged:
"Failed to create pam_wrapper config dir: /tmp/pam.B - File exists"); the
first to exit removes it, and every later pam_start of the other fails
with PAM_ABORT (26): the authenticator answers "temporary failure" and the
frontend 454, though nothing is wrong with it. Short-lived processes that
load libpam (a `sendooway-auth --fd` per session, the tools) start all the
time beside the daemons of two other xdist workers, so a test now and then
saw its login refused with 454 (test_hardening_front::
test_authenticator_killed_during_sessions in CI). A scratch run of 200
short and long processes side by side showed it: a long one's later
pam_start returned 26 after a "File exists".

Here the load of libpam (ctypes.CDLL, as python-pam and sendooway_auth do
it) holds an flock on one lock file for all worlds on the machine, so
that no two processes pick their folder at the same time. Without the
lock file (not creatable, not openable) or after 10 s of waiting, the
load goes on unlocked, as before."""

from __future__ import annotations

import os


def _install() -> None:
    import ctypes
    import fcntl
    import time

    lock_path = "/tmp/.sendooway-tests-pam-wrapper.lock"
    plain_init = ctypes.CDLL.__init__

    def _open_lock() -> int | None:
        for flags in (os.O_RDONLY, os.O_RDONLY | os.O_CREAT | os.O_EXCL):
            try:
                return os.open(lock_path, flags | os.O_CLOEXEC, 0o644)
            except OSError:
                continue
        try:
            return os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)  # made by another meanwhile
        except OSError:
            return None

    def locked_init(self, name, *args, **kwargs):
        base = os.path.basename(name) if isinstance(name, str) else ""
        if not base.startswith("libpam.so"):
            return plain_init(self, name, *args, **kwargs)
        fd = _open_lock()
        try:
            if fd is not None:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.005)
            return plain_init(self, name, *args, **kwargs)
        finally:
            if fd is not None:
                os.close(fd)  # (releases the lock)

    ctypes.CDLL.__init__ = locked_init


if os.environ.get("PAM_WRAPPER") == "1":
    try:
        _install()
    except Exception:  # noqa: BLE001 - never stop a process of the world from starting
        pass


def _chain() -> None:
    """The sitecustomize this one hides (Debian's apport hook), if any."""
    import importlib.util
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == here:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_chained_sitecustomize", candidate)
            if spec and spec.loader:
                try:
                    spec.loader.exec_module(importlib.util.module_from_spec(spec))
                except Exception:  # noqa: BLE001
                    pass
            return


_chain()
