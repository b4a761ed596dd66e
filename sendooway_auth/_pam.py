"""PAM in a bounded pool of long-lived threads, never on the event loop.

python-pam's handle object is not thread-safe, so each worker thread keeps
its own `pam.pam()`. Threads live as long as the pool: no fork per login
(costly, and pam_wrapper in the tests has only 62 temp dirs).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

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


def reason_for(code: int) -> str:
    return _REASONS.get(code, f"pam-error-{code}")


class PamPool:
    def __init__(self, service: str, threads: int = 8) -> None:
        self.service = service
        self.threads = threads
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pam")

    def _check(self, user: str, password: str) -> tuple[bool, str]:
        handle = getattr(self._local, "pam", None)
        if handle is None:
            handle = self._local.pam = pam.pam()
        try:
            ok = handle.authenticate(user, password, service=self.service, resetcreds=False)
        except (ValueError, TypeError, UnicodeError):
            return False, "invalid-characters"
        return (True, "") if ok else (False, reason_for(handle.code))

    async def check(self, user: str, password: Secret) -> tuple[bool, str]:
        """(ok, reason): authenticate and account check for `user`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._check, user, password.reveal())

    def check_blocking(self, user: str, password: Secret) -> tuple[bool, str]:
        return self._pool.submit(self._check, user, password.reveal()).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
