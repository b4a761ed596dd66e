"""Dropping root for good, before the first byte from a client is read."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import resource

PR_SET_DUMPABLE = 4


class PrivilegeError(Exception):
    """The drop failed or could be undone: the frontend must not serve."""


def drop_privileges(user: str) -> tuple[int, int]:
    """Become `user` (its uid and primary gid, no supplementary groups) and
    check that root cannot be regained. A process that is not root stays
    as it is. Returns (uid, gid) now in effect."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # passwords pass through here
    _not_dumpable()
    if os.geteuid() != 0 and os.getuid() != 0:
        return os.getuid(), os.getgid()
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"frontendUser {user!r} does not exist") from None
    if pw.pw_uid == 0:
        raise PrivilegeError(f"frontendUser {user!r} is root: refusing to serve as root")
    try:
        os.setgroups([])
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot become {user}: {exc.strerror}") from None
    if (os.getresuid() != (pw.pw_uid,) * 3 or os.getresgid() != (pw.pw_gid,) * 3
            or set(os.getgroups()) - {pw.pw_gid}):
        raise PrivilegeError(f"dropping to {user} did not take effect")
    for regain in (lambda: os.setuid(0), lambda: os.seteuid(0), lambda: os.setgid(0)):
        try:
            regain()
        except PermissionError:
            continue
        raise PrivilegeError("root could be regained after dropping privileges")
    return pw.pw_uid, pw.pw_gid


def _not_dumpable() -> None:
    """No core file and no ptrace/proc-mem access by other processes of the
    same user (e.g. another service running as nobody): the kernel does this
    by itself when root changes uid, not for a frontend started as nobody."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(err)}")


@contextlib.contextmanager
def acting_as(user: str):
    """Within the block, file and socket access is checked as `user` would
    be after drop_privileges (its uid and primary gid, no supplementary
    groups): the effective ids are switched and switched back. For a start
    as root only; otherwise (or with no such user, or root: the drop says
    so) nothing changes. A root frontend used to probe the authenticator's
    socket as root, found it, and then every session, as frontendUser,
    got EACCES (an outside review). Raises PrivilegeError when root cannot
    be taken back: the caller must not go on half-dropped."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        pw = None
    if pw is None or pw.pw_uid == 0 or os.geteuid() != 0:
        yield
        return
    groups, egid = os.getgroups(), os.getegid()
    try:
        os.setgroups([])
        os.setegid(pw.pw_gid)
        os.seteuid(pw.pw_uid)
    except OSError as exc:
        _back_to_root(groups, egid)
        raise PrivilegeError(f"cannot act as {user} for a moment: {exc.strerror}") from None
    try:
        yield
    finally:
        _back_to_root(groups, egid)


def _back_to_root(groups: list[int], egid: int) -> None:
    try:
        os.seteuid(0)  # first: the group ids may be set only as root
        os.setegid(egid)
        os.setgroups(groups)
    except OSError as exc:
        raise PrivilegeError(f"cannot become root again after a check: {exc.strerror}") from None
