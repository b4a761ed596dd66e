"""Failure delay and backoff per user and per client address (sans-IO: the
caller passes the clock).

Each failed login is answered after `base * 2**n` seconds (capped), where n
is the number of recent failures already counted for that user *or* that
client address, whichever is larger. Users are counted by the case-folded
name, IPv6 clients by their /64. Counts fade after `window` seconds
without a failure and a success clears that user's and address's counts.
The other connections never wait: the delay is an await on the failing
connection only.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import stat
import time
from collections import OrderedDict

from sendooway_shared.protocol import MAX_FAILURE_DELAY
from sendooway_shared.types import client_key

log = logging.getLogger("sendooway-auth")


class Penalty:
    """The counts, kept in this process (the daemon serves every session)."""

    def __init__(self, base: float = 1.0, cap: float = MAX_FAILURE_DELAY, window: float = 900.0,
                 max_keys: int = 10000) -> None:
        self.base = base
        self.cap = cap
        self.window = window
        self.max_keys = max_keys
        self._counts: OrderedDict[str, tuple[int, float]] = OrderedDict()
        # the counts of real accounts apart: made-up names (free to make up)
        # never push them out of the table
        self._accounts: OrderedDict[str, tuple[int, float]] = OrderedDict()

    # storage: overridden by SharedPenalty
    def _load(self, key: str) -> tuple[int, float] | None:
        found = self._accounts.get(key)
        return found if found is not None else self._counts.get(key)

    def _save(self, key: str, count: int, last: float, account: bool = False) -> None:
        table = self._accounts if account or key in self._accounts else self._counts
        table[key] = (count, last)
        table.move_to_end(key)
        while len(table) > self.max_keys:
            table.popitem(last=False)

    def _drop(self, key: str) -> None:
        self._accounts.pop(key, None)
        self._counts.pop(key, None)

    # How long PAM takes to refuse a wrong password (a running average): an
    # unknown name's refusal is held back as long, so timing tells nothing.
    _pam_no: float | None = None

    def pam_refusal(self) -> float | None:
        return self._pam_no

    def note_pam_refusal(self, took: float) -> None:
        """A slower refusal counts at once (a fifth of the way up), a faster
        one only slowly (2 % of the gap): pam_faillock refuses a locked
        account at once, and three wrong guesses lock one; such refusals
        must not wear the padding down and bring the timing oracle back."""
        old = self.pam_refusal()
        if old is None:
            new = took
        elif took >= old:
            new = 0.8 * old + 0.2 * took
        else:
            new = old - 0.02 * (old - took)
        self._store_pam_refusal(new)

    def _store_pam_refusal(self, seconds: float) -> None:
        self._pam_no = seconds

    def _delay(self, n: int) -> float:
        return min(self.cap, self.base * (2 ** min(max(n, 0), 30))) if self.base > 0 else 0.0

    def _get(self, key: str, now: float) -> int:
        entry = self._entry(key, now)
        return entry[0] if entry is not None else 0

    def _entry(self, key: str, now: float) -> tuple[int, float] | None:
        """(count, time of the last failure) while the count lasts; a time
        in the future (the clock was stepped back) is stored as now."""
        entry = self._load(key)
        if entry is None:
            return None
        count, last = entry
        if last > now:
            last = now
            self._restamp(key, count, now)
        elif now - last > self.window:
            self._drop(key)
            return None
        return count, last

    def _restamp(self, key: str, count: int, now: float) -> None:
        self._save(key, count, now)  # (stays in the table it is in)

    def failure(self, user: str, client: str, now: float, account: bool = True) -> float:
        """Count one failure; return how long to hold back its answer.
        `account`: the name is a real account (False: an unknown name)."""
        user, client = user_key(user), client_key(client)
        keys = [f"u:{user}"] + ([f"c:{client}", f"uc:{user} {client}"] if client else [])
        counts = [self._get(k, now) for k in keys]
        for k, c in zip(keys, counts):
            self._save(k, c + 1, now, account=account and k.startswith("u:"))
        return self._delay(max(counts[:2]))

    def client_failures(self, client: str, now: float) -> int:
        """Recent failures counted for this address (its IPv6 /64)."""
        return self._get(f"c:{client_key(client)}", now) if client else 0

    def hold(self, user: str, client: str, now: float) -> float:
        """How long a login for `user` from `client` must wait before it is
        decided: until the delay of the last failure counted for either has
        run out (0 for a client that waited for that refusal). The caller
        asks again once the wait is over (holding the login's turn, so that
        logins side by side are decided one after the other, each meeting
        the backoff the one before it earned). A `last` in the future (the
        clock was stepped back) counts as now, so no one is locked out."""
        user, client = user_key(user), client_key(client)
        wait = 0.0
        for key in [f"u:{user}"] + ([f"c:{client}"] if client else []):
            entry = self._entry(key, now)
            if entry is not None and entry[0] > 0:
                count, last = entry
                wait = max(wait, last + self._delay(count - 1) - now)
        return min(wait, self.cap)

    def success(self, user: str, client: str, now: float | None = None) -> None:
        """A right password clears the user's count, and takes that user's
        own failures off the address's count — not the others': logging in
        to one's own account between guesses at other accounts must not
        reset the address's record."""
        user, client = user_key(user), client_key(client)
        self._drop(f"u:{user}")
        if not client:
            return
        now = time.monotonic() if now is None else now
        own = self._get(f"uc:{user} {client}", now)
        self._drop(f"uc:{user} {client}")
        entry = self._load(f"c:{client}")
        left = (self._get(f"c:{client}", now) - own) if entry is not None else 0
        if left > 0:
            self._save(f"c:{client}", left, entry[1])  # (its age is kept: it fades as before)
        else:
            self._drop(f"c:{client}")

    def count(self, user: str, client: str, now: float) -> int:
        user, client = user_key(user), client_key(client)
        return max(self._get(f"u:{user}", now), self._get(f"c:{client}", now) if client else 0)


def key_path(directory: str, key: str) -> str:
    """A key's file in `directory` (a count, or a turn): named by its hash,
    so a user name or an address never makes a path."""
    return os.path.join(directory, hashlib.sha256(key.encode()).hexdigest()[:40])


class KeyLocks:
    """Turns that span processes: the socketpair mode's one-session
    authenticators each decide a login only while holding an flock(2) on
    one file per key (user name, client address) in a private directory, so
    that logins side by side in many processes are still decided one at a
    time per key, each meeting the backoff the one before it earned (without
    this, N sessions at once read the same count and all went to PAM). A
    holder removes its file before it lets go; one who locked a file that
    is no longer the one at its path tries again. Never blocks: the caller
    polls, so a wait is bounded by its own deadline."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, key: str) -> str:
        return key_path(self.directory, key)

    def _try_one(self, path: str) -> int | None:
        for _ in range(8):  # (each miss is a holder that let go just now)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return None
                raise
            try:
                mine, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            except OSError:
                os.close(fd)  # (never a lock kept by a descriptor no one holds)
                raise
            if there is not None and (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                return fd
            os.close(fd)  # removed (and maybe made anew) after we opened it
        return None

    def try_take(self, keys: list[str]) -> list[tuple[str, int]] | None:
        """All of `keys` locked (for `release`), or None when one is held
        elsewhere (nothing is kept then). OSError: the store is unusable."""
        held: list[tuple[str, int]] = []
        try:
            for key in sorted(set(keys)):
                path = self._path(key)
                fd = self._try_one(path)
                if fd is None:
                    self.release(held)
                    return None
                held.append((path, fd))
        except OSError:
            self.release(held)
            raise
        return held

    @staticmethod
    def release(held: list[tuple[str, int]]) -> None:
        for path, fd in held:
            try:
                os.unlink(path)  # (still locked: no one can have taken it meanwhile)
            except OSError:
                pass
            os.close(fd)


def _write_replace(path: str, text: str) -> None:
    """`path` holds `text` afterwards, or (OSError) is as it was: written to
    PATH.PID and renamed, and that file removed again when the write failed
    (a full /run: ENOSPC), not left to pile up per process."""
    tmp = f"{path}.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _private_directory(directory: str) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{directory}: not a private directory of ours")


class SharedPenalty(Penalty):
    """The counts in a root-only directory, one small file per key, so that
    the one-session authenticators of the socketpair mode (one process per
    SMTP session) share them; `locks` (in its subdirectory "turns") make
    their logins take turns per key as the daemon's do, so each count is
    read and written by one decision at a time. Bounded in number of files."""

    TURNS = "turns"

    def __init__(self, directory: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.directory = directory
        self.locks: KeyLocks | None = KeyLocks(os.path.join(directory, self.TURNS))

    @classmethod
    def open(cls, directory: str, **kwargs) -> "SharedPenalty":
        """The store in `directory` (created 0700), or OSError. A turns
        directory that cannot serve costs the turns across processes only
        (a warning), not the shared counts."""
        _private_directory(directory)
        store = cls(directory, **kwargs)
        try:
            _private_directory(os.path.join(directory, cls.TURNS))
        except OSError as exc:
            log.warning("login turns kept per session only: %s: %s",
                        os.path.join(directory, cls.TURNS), exc.strerror or exc)
            store.locks = None
        return store

    def _path(self, key: str) -> str:
        return key_path(self.directory, key)

    # The files hold wall-clock times (they may outlive a boot, and the
    # caller's clock is monotonic, which starts again at each boot): turned
    # to and from the caller's clock with the offset between the two now.
    @staticmethod
    def _offset() -> float:
        return time.time() - time.monotonic()

    def _load(self, key: str) -> tuple[int, float] | None:
        try:
            with open(self._path(key), "rb") as f:
                count, last = f.read(64).split()
            return int(count), float(last) - self._offset()
        except (OSError, ValueError):
            return None

    def _save(self, key: str, count: int, last: float, account: bool = False) -> None:
        path = self._path(key)
        try:
            # a real account's count is always kept (there are only so many
            # accounts); made-up names and addresses may fill the store
            if not account and not os.path.exists(path) and self._full(last):
                return
            _write_replace(path, f"{count} {last + self._offset():.3f}\n")
        except OSError:
            pass  # a delay store that cannot be written only weakens the delay

    def _restamp(self, key: str, count: int, now: float) -> None:
        self._save(key, count, now, account=True)  # (it exists: never refused as full)

    def _drop(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except OSError:
            pass

    # the figure in a file of its own (a name no key's hash can have), so
    # that the next session's authenticator pads from its first login
    _PAM_FILE = "pam-refusal"

    def pam_refusal(self) -> float | None:
        try:
            with open(os.path.join(self.directory, self._PAM_FILE), "rb") as f:
                seconds = float(f.read(32))
        except (OSError, ValueError):
            return None
        return seconds if 0.0 <= seconds < 3600.0 else None

    def _store_pam_refusal(self, seconds: float) -> None:
        try:
            _write_replace(os.path.join(self.directory, self._PAM_FILE), f"{seconds:.3f}\n")
        except OSError:
            pass  # (only weakens the padding)

    def _full(self, now: float) -> bool:
        """Too many files? Expired ones are removed first."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return True
        names = [n for n in names if not n.startswith((self._PAM_FILE, self.TURNS))]  # not counts
        if len(names) < self.max_keys:
            return False
        wall = time.time()  # (file ages: `now` is the caller's clock, maybe monotonic)
        for name in names:
            p = os.path.join(self.directory, name)
            try:
                if wall - os.stat(p).st_mtime > self.window:
                    os.unlink(p)
            except OSError:
                pass
        left = [n for n in os.listdir(self.directory)
                if not n.startswith((self._PAM_FILE, self.TURNS))]
        return len(left) >= self.max_keys


def client_host(client: str) -> str:
    """The address part of "ip", "ip:port" or "[v6]:port", normalised (IPv4
    mapped into IPv6 shown as IPv4, a link-local zone such as %eth0 left
    out: fail2ban bans the address, and cannot match one with a zone); ""
    when it is not an IP address (then it is not used as a backoff key)."""
    text = client.strip()
    candidates = [text]
    if text.startswith("[") and "]" in text:
        candidates.append(text[1:text.index("]")])
    if text.count(":") == 1:
        candidates.append(text.split(":", 1)[0])
    for c in candidates:
        try:
            address = ipaddress.ip_address(c)
        except ValueError:
            continue
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:192.0.2.7 is 192.0.2.7
        return str(mapped or address).split("%", 1)[0]
    return ""


def user_key(name: str) -> str:
    """The user's backoff key: the name case-folded, so that "ALICE" and
    "Alice" count against alice wherever NSS matches names without regard
    to case (LDAP, sssd's default) and PAM lets them in as her."""
    return name.casefold()
