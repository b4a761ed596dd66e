"""Accounts as the system knows them, and the validUser rule."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from sendooway_shared.config import Config


@dataclass(frozen=True)
class UserInfo:
    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]  # primary and supplementary gids

    def group_names(self) -> list[str]:
        names = []
        for gid in self.groups:
            try:
                names.append(grp.getgrgid(gid).gr_name)
            except KeyError:
                names.append(str(gid))
        return names


def lookup(name: str) -> UserInfo | None:
    """The account `name`, or None when it does not exist."""
    if not name or "\0" in name:
        return None
    try:
        pw = pwd.getpwnam(name)
    except (KeyError, UnicodeEncodeError, ValueError):
        return None
    try:
        groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        groups = (pw.pw_gid,)
    if pw.pw_gid not in groups:
        groups = (pw.pw_gid, *groups)
    return UserInfo(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, groups)


def valid_user(cfg: Config, user: UserInfo) -> tuple[bool, str]:
    """(allowed, why) under the validUser lines: with none, everyone is."""
    if not cfg.validUser:
        return True, "no validUser lines: every account may log in"
    for entry in cfg.validUser:
        if entry.startswith("%"):
            try:
                gid = grp.getgrnam(entry[1:]).gr_gid
            except KeyError:
                continue
            if gid in user.groups:
                return True, f"member of group {entry[1:]} (validUser {entry})"
        elif entry.lower() == user.name.lower():  # the original compared without case
            return True, "named in validUser"
    return False, "not named in validUser and in none of its groups"


def process_user() -> str:
    """The name of the account this process runs as (authBackend = none)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
