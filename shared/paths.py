"""Who may reach a path: the directories on the way to the authenticator's
socket, which frontendUser must be able to search (x) to connect to it."""

from __future__ import annotations

import os
import pwd
import stat


def closed_directory(path: str, user: str) -> tuple[str, os.stat_result] | None:
    """The first directory on the way to `path` that `user` may not search
    (by its owner, group and mode bits; root may search any), with its
    stat; None when there is none, or `user` is no account."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    if pw.pw_uid == 0:
        return None
    try:
        groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        groups = {pw.pw_gid}
    directory = os.path.dirname(os.path.abspath(path))
    chain = []
    while True:
        chain.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for d in reversed(chain):  # from / down
        try:
            st = os.stat(d)
        except OSError:
            return None  # (not there: connect says so)
        if st.st_uid == pw.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return d, st
    return None
