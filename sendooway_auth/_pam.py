"""PAM in a bounded pool of long-lived threads, never on the event loop.

python-pam's handle object is not thread-safe, so each worker thread keeps
its own `pam.pam()`. Threads live as long as the pool: no fork per login
(costly, and pam_wrapper in the tests has only 62 temp dirs).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Executor, Future

import pam

from sendooway_shared.types import Secret

# Linux-PAM return codes (security/_pam_types.h) and what the log calls them.
_REASONS = {
    6: "permission-denied",      # PAM_PERM_DENIED
    7: "wrong-password",         # PAM_AUTH_ERR
    9: "pam-unavailable",        # PAM_AUTHINFO_UNAVAIL
    10: "unknown-user",          # PAM_USER_UNKNOWN
    11: "too-many-tries",        # PAM_MAXTRIES
    12: "password-expired",      # PAM_NEW_AUTHTOK_REQD
    13: "account-expired",       # PAM_ACCT_EXPIRED
}


# Codes that say the server side is broken, not the login: the answer is a
# temporary failure (SMTP 454), not counted against the user or address.
# PAM_OPEN_ERR, PAM_SYMBOL_ERR, PAM_SERVICE_ERR, PAM_SYSTEM_ERR, PAM_BUF_ERR,
# PAM_AUTHINFO_UNAVAIL, PAM_ABORT, PAM_MODULE_UNKNOWN.
TEMPORARY_CODES = frozenset({1, 2, 3, 4, 5, 9, 26, 28})


def reason_for(code: int) -> str:
    return _REASONS.get(code, f"pam-error-{code}")


def is_temporary(reason: str) -> bool:
    """Does this failure reason mean "try again later" rather than "no"?"""
    if reason in ("pam-unavailable", "pam-timeout"):
        return True
    if reason.startswith("pam-error-"):
        try:
            return int(reason[len("pam-error-"):]) in TEMPORARY_CODES
        except ValueError:
            return False
    return False


class _DaemonThreads(Executor):
    """A fixed set of long-lived *daemon* threads. ThreadPoolExecutor's
    threads are joined at interpreter exit, so one PAM call stuck in a dead
    LDAP server would keep the authenticator from ever exiting; these are
    not waited for, and the process still exits normally (atexit handlers,
    library destructors)."""

    def __init__(self, count: int, prefix: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{prefix}-{i}", daemon=True)
                         for i in range(count)]
        for t in self._threads:
            t.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for t in self._threads:
                t.join()


class PamPool:
    """Worker threads for everything that may block during a login: NSS
    lookups (which may be LDAP/SSSD) and PAM. One job per login."""

    def __init__(self, service: str, threads: int = 8) -> None:
        self.service = service
        self.threads = threads
        self._local = threading.local()
        self._pool = _DaemonThreads(threads, "pam")

    def check_here(self, user: str, password: Secret) -> tuple[bool, str]:
        """(ok, reason) for authenticate + account check; call in a worker."""
        handle = getattr(self._local, "pam", None)
        if handle is None:
            handle = self._local.pam = pam.pam()
        try:
            ok = handle.authenticate(user, password.reveal(), service=self.service,
                                     resetcreds=False)
        except (ValueError, TypeError, UnicodeError):
            return False, "invalid-characters"
        return (True, "") if ok else (False, reason_for(handle.code))

    async def run(self, fn, *args):
        """Run a blocking login job in a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)
