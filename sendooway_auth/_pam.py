"""PAM in a bounded pool of long-lived threads, never on the event loop.

The login is python-pam's library bindings driven by our own sequence
(pam_start, PAM_RHOST, pam_authenticate, pam_acct_mgmt, PAM_USER read
back, pam_end) and conversation: python-pam's `authenticate` cannot set
PAM_RHOST or read PAM_USER back, takes PAM_TTY and PAM_XDISPLAY from the
daemon's own $DISPLAY or terminal, answers only a first password prompt
and fails on a prompt that is not UTF-8 (a review). Threads live as long
as the pool: no fork per login (costly, and pam_wrapper in the tests has
only 62 temp dirs).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import queue
import threading
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

from pam.__internals import PamAuthenticator, PamConv, PamHandle, PamResponse, conv_func

from sendooway_shared.config import AuthBackend, Config, config_warnings
from sendooway_shared.types import Secret

# Linux-PAM items and message styles (security/_pam_types.h)
PAM_USER, PAM_RHOST = 2, 4
PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON, PAM_ERROR_MSG, PAM_TEXT_INFO = 1, 2, 3, 4
PAM_SUCCESS, PAM_BUF_ERR, PAM_CONV_ERR = 0, 5, 19
MAX_PAM_MESSAGES = 8  # kept for the log, 200 characters each

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
    if reason in ("pam-unavailable", "pam-timeout", "ldap-unavailable", "ldap-timeout"):
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


@dataclass
class PamLogin:
    """What PAM said of one login."""

    code: int                     # PAM_SUCCESS or the failing call's code
    user: str = ""                # PAM_USER afterwards (a module may map the name)
    messages: list[str] = field(default_factory=list)  # PAM_ERROR_MSG / PAM_TEXT_INFO


class _Pam:
    """python-pam's bindings of libpam (loaded once), and pam_get_item."""

    _lock = threading.Lock()
    _ready: "_Pam | None" = None

    @classmethod
    def get(cls) -> "_Pam":
        with cls._lock:
            if cls._ready is None:
                PamAuthenticator._ensure_libs()
                lib = cls()
                lib.b = PamAuthenticator
                get_item = ctypes.CDLL(ctypes.util.find_library("pam")).pam_get_item
                get_item.restype = ctypes.c_int
                get_item.argtypes = [PamHandle, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
                lib.get_item = get_item
                free = PamAuthenticator.libc.free
                free.restype = None
                free.argtypes = [ctypes.c_void_p]
                lib.free = free
                cls._ready = lib
            return cls._ready


def load_libpam() -> str:
    """Load libpam now, at start-up: python-pam finds it with
    ctypes.util.find_library, which runs `ldconfig -p` in a child process.
    Left to the first login, that login needed a process and descriptors
    to spare at that moment, and failed with a traceback without them (an
    exhaustion review). Returns why it cannot be loaded, or ""."""
    try:
        _Pam.get()
    except (OSError, AttributeError) as exc:  # (AttributeError: no pam_start where it looked)
        return str(exc) or type(exc).__name__
    return ""


def pam_login(service: str, user: str, password: str, rhost: str = "") -> PamLogin:
    """One login through PAM: authenticate and the account check. Blocking.
    Raises ValueError for a NUL in a name or the password."""
    for value in (service, user, password, rhost):
        if "\0" in value:
            raise ValueError("NUL in a PAM string")
    lib = _Pam.get()
    secret = password.encode("utf-8")
    name = user.encode("utf-8")
    result = PamLogin(code=PAM_SUCCESS, user=user)

    def converse(count, messages, p_response, _appdata):
        # called by a PAM module: nothing may escape (a traceback on stderr,
        # a bogus return code); every echo-off prompt gets the password,
        # every echo-on one the name (as the original did), wherever it is.
        # pam_conv(3): the responses are handed over (the module frees them)
        # only with PAM_SUCCESS; on an error nothing is, and ours are wiped
        # and freed here (the password copy must not linger in root's heap)
        block = None
        copies: list[tuple[int, int]] = []
        try:
            if count <= 0:
                return PAM_CONV_ERR
            block = lib.b.calloc(count, ctypes.sizeof(PamResponse))
            if not block:
                return PAM_BUF_ERR
            responses = ctypes.cast(block, ctypes.POINTER(PamResponse))
            for i in range(count):
                message = messages[i].contents
                if message.msg_style in (PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON):
                    answer = secret if message.msg_style == PAM_PROMPT_ECHO_OFF else name
                    copy = lib.b.calloc(len(answer) + 1, 1)
                    if not copy:
                        raise MemoryError
                    copies.append((copy, len(answer)))
                    ctypes.memmove(copy, answer, len(answer))
                    responses[i].resp = copy
                elif len(result.messages) < MAX_PAM_MESSAGES:
                    text = (message.msg or b"").decode("utf-8", "replace")
                    result.messages.append(text[:200])
                responses[i].resp_retcode = 0
            p_response[0] = responses
            block = None  # the module's now
            return PAM_SUCCESS
        except MemoryError:
            return PAM_BUF_ERR
        except Exception:  # noqa: BLE001 - never into C
            return PAM_CONV_ERR
        finally:
            if block is not None:
                for copy, size in copies:
                    ctypes.memset(copy, 0, size)
                    lib.free(copy)
                lib.free(block)

    callback = conv_func(converse)  # (kept alive until pam_end)
    conv = PamConv(callback, 0)
    handle = PamHandle()
    code = lib.b.pam_start(service.encode("utf-8"), name, ctypes.byref(conv),
                           ctypes.byref(handle))
    if code != PAM_SUCCESS:
        result.code = code
        return result
    try:
        if rhost:  # the SMTP client: pam_access, pam_faillock and fail2ban's pam jail see it
            host = ctypes.c_char_p(rhost.encode("utf-8"))
            code = lib.b.pam_set_item(handle, PAM_RHOST, ctypes.cast(host, ctypes.c_void_p))
        # PAM_TTY and PAM_XDISPLAY stay unset: this is no console login
        if code == PAM_SUCCESS:
            code = lib.b.pam_authenticate(handle, 0)
        if code == PAM_SUCCESS:
            code = lib.b.pam_acct_mgmt(handle, 0)
        if code == PAM_SUCCESS:
            item = ctypes.c_void_p()
            if lib.get_item(handle, PAM_USER, ctypes.byref(item)) == PAM_SUCCESS and item.value:
                result.user = ctypes.string_at(item.value).decode("utf-8", "replace")
        result.code = code
        return result
    finally:
        lib.b.pam_end(handle, code)


class PamPool:
    """Worker threads for everything that may block during a login: NSS
    lookups (which may be LDAP/SSSD) and PAM. One job per login."""

    def __init__(self, service: str, threads: int = 8) -> None:
        self.service = service
        self.threads = threads
        self._pool = _DaemonThreads(threads, "pam")

    def check_here(self, user: str, password: Secret, rhost: str = "") -> PamLogin:
        """authenticate + account check; call in a worker. Raises ValueError
        for characters PAM cannot take (a NUL)."""
        return pam_login(self.service, user, password.reveal(), rhost)

    async def run(self, fn, *args):
        """Run a blocking login job in a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)


# Where Linux-PAM looks for a service's file (the vendor directory only in
# builds that have one); with no /etc/pam.d it reads /etc/pam.conf instead.
PAM_DIRS = ("/etc/pam.d", "/usr/lib/pam.d")


def service_file_warning(service: str) -> str | None:
    """A warning when PAM has no file for `service`: Linux-PAM then uses its
    `other` service, silently — on Debian the common-* stack, elsewhere often
    pam_deny (every login refused, with nothing in our log to say why), and
    never the stack the admin meant (packaging/pam.d/sendooway). Linux-PAM
    lowercases the name and keeps only its part after the last '/' (a name
    given as /etc/pam.d/x is x: once skipped here, a missing x went
    unwarned); pam_wrapper (the tests) has a directory of its own."""
    name = service.lower().rpartition("/")[2]
    if os.environ.get("PAM_WRAPPER") == "1" and os.environ.get("PAM_WRAPPER_SERVICE_DIR"):
        dirs: tuple[str, ...] = (os.environ["PAM_WRAPPER_SERVICE_DIR"],)
    elif os.path.isdir(PAM_DIRS[0]):
        dirs = PAM_DIRS
    else:
        return None  # /etc/pam.conf: one file for all services, not ours to parse
    if not name or any(os.path.exists(os.path.join(d, name)) for d in dirs):
        return None
    return (f"PAM service {service} has no file {os.path.join(dirs[0], name)}: PAM uses its"
            f" 'other' service for it instead (install packaging/pam.d/sendooway as"
            f" {os.path.join(dirs[0], name)}, or set pamService to a service that exists)")


def auth_warnings(cfg: Config) -> list[str]:
    """config_warnings, and what only the authenticator can tell (at start,
    at a reload, in --check)."""
    found = config_warnings(cfg)
    if cfg.authBackend is AuthBackend.PAM:
        if (missing := service_file_warning(cfg.pamService)) is not None:
            found.append(missing)
    return found
