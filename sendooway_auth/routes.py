"""A user's routes: which files to read, what they say, which route serves a sender.

The lookup is written once as a generator (`plan`) that yields the paths it
needs read as the user and receives the reads; `lookup_sync` (for --check)
and the daemon's async driver only move the reads in. Order: the
`userInclude` file, then the mappings (the user's first, then the global
ones, DESIGN.md's defaults when neither has any).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field, replace
from typing import Callable, Generator

from sendooway_shared.config import (
    ConfigError, Config, Mapping, MappingKind, UserConfig, effective_mappings, expand_path,
    parse_user_config,
)

from ._accounts import Account, ParseResult, choose
from ._reader import MAX_FILES, MAX_PATH, FileRead, ReadRequest
from ._users import UserInfo
from .fetchmail import parse_fetchmailrc
from .getmail import parse_getmailrc

MAX_INCLUDE_ERRORS = 50


@dataclass
class UserRoutes:
    """Everything one lookup found, for the daemon and for --check."""

    user: UserInfo
    files: list[tuple[str, FileRead]] = field(default_factory=list)  # (role, read)
    mappings: tuple[Mapping, ...] = ()
    accounts: list[Account] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ca_file: str = ""

    @property
    def incomplete(self) -> bool:
        """Some file could not be read for an internal reason (reader died or
        timed out): a missing route may be a temporary failure."""
        return any(read.status == "failed" for _, read in self.files)

    def route_for(self, sender: str) -> Account | None:
        return choose(self.accounts, sender)


Plan = Generator[tuple[str, ...], list[FileRead], UserRoutes]


def plan(cfg: Config, user: UserInfo) -> Plan:
    found = UserRoutes(user)
    user_cfg: UserConfig | None = None
    if cfg.userInclude:
        path = expand_path(cfg.userInclude, user.name, user.home)
        (read,) = yield (path,)
        found.files.append(("userInclude", read))
        text = _text(read, found)
        if text is not None:
            user_cfg = _parse_include(text, path, found)
            if user_cfg.smarthostMapping and any(
                m.direct is not None and m.direct.route.password for m in user_cfg.smarthostMapping
            ):
                _check_mode(read, user, found)
    found.ca_file = user_cfg.sslCA if user_cfg and user_cfg.sslCA is not None else cfg.sslCA
    found.mappings = tuple(m.expand(user.name, user.home) for m in effective_mappings(cfg, user_cfg))
    wanted = list(dict.fromkeys(m.path for m in found.mappings if m.kind is not MappingKind.DIRECT))
    for path in wanted[MAX_FILES:]:
        found.errors.append(f"{path}: skipped: more than {MAX_FILES} files to read")
    paths = tuple(p for p in wanted[:MAX_FILES] if len(p) <= MAX_PATH)
    for path in wanted[:MAX_FILES]:
        if len(path) > MAX_PATH:
            found.errors.append(f"{path[:200]}...: skipped: path longer than {MAX_PATH}")
    reads = (yield paths) if paths else []
    by_path = dict(zip(paths, reads))
    for path in paths:
        kind = next(m.kind for m in found.mappings if m.path == path)
        found.files.append((kind.value, by_path[path]))
    own = len(user_cfg.smarthostMapping) if user_cfg else 0
    parsed: dict[str, ParseResult] = {}
    for index, m in enumerate(found.mappings):
        tier = 0 if index < own else 1
        if m.kind is MappingKind.DIRECT:
            assert m.direct is not None
            found.accounts.append(Account((m.direct.address,), m.direct.route, tier))
            continue
        if m.path not in by_path:
            continue  # skipped above (too many files, path too long)
        if m.path not in parsed:
            read = by_path[m.path]
            text = _text(read, found)
            result = ParseResult()
            if text is not None:
                parser = parse_fetchmailrc if m.kind is MappingKind.FETCHMAIL else parse_getmailrc
                result = parser(text, m.path)
                found.errors.extend(result.errors)
                found.warnings.extend(result.warnings)
                if result.holds_password:
                    _check_mode(read, user, found)
            parsed[m.path] = result
        found.accounts.extend(replace(a, tier=tier) for a in parsed[m.path].accounts)
    if found.ca_file:
        found.accounts = [replace(a, route=replace(a.route, ca_file=found.ca_file))
                          for a in found.accounts]
    return found


def lookup_sync(cfg: Config, user: UserInfo, read: Callable[[ReadRequest], list[FileRead]]
                ) -> UserRoutes:
    """Run the plan with a blocking reader (e.g. _reader.read_direct)."""
    gen = plan(cfg, user)
    try:
        paths = next(gen)
        while True:
            paths = gen.send(read(ReadRequest(user.uid, user.gid, user.groups, paths, user.home)))
    except StopIteration as done:
        return done.value


async def lookup_async(cfg: Config, user: UserInfo, read) -> UserRoutes:
    """Run the plan with an async reader (the daemon's fork server)."""
    gen = plan(cfg, user)
    try:
        paths = next(gen)
        while True:
            paths = gen.send(await read(ReadRequest(user.uid, user.gid, user.groups, paths,
                                                    user.home)))
    except StopIteration as done:
        return done.value


# ------------------------------------------------------------ helpers


def _text(read: FileRead, found: UserRoutes) -> str | None:
    """The file's text, or None (an error recorded; a missing file is normal)."""
    if read.status == "missing":
        return None
    if not read.ok:
        found.errors.append(f"{read.path}: {read.status}" + (f" ({read.detail})" if read.detail else ""))
        return None
    if b"\0" in read.data:
        line = read.data[: read.data.index(b"\0")].count(b"\n") + 1
        found.errors.append(f"{read.path}:{line}: contains NUL bytes (not a text file)")
        return None
    try:
        return read.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = read.data[: exc.start].count(b"\n") + 1
        found.errors.append(f"{read.path}:{line}: not valid UTF-8 (not a text file?)")
        return None


def _parse_include(text: str, path: str, found: UserRoutes) -> UserConfig:
    """Parse ~/.sendoowayrc, skipping (and reporting) each bad line."""
    lines = text.splitlines()
    for _ in range(MAX_INCLUDE_ERRORS):
        try:
            return parse_user_config("\n".join(lines), path)
        except ConfigError as exc:
            found.errors.append(str(exc))
            if not exc.line or exc.line > len(lines):
                return UserConfig(filename=path)
            lines[exc.line - 1] = ""
    found.errors.append(f"{path}: more than {MAX_INCLUDE_ERRORS} errors, file ignored")
    return UserConfig(filename=path)


def _check_mode(read: FileRead, user: UserInfo, found: UserRoutes) -> None:
    mode = read.mode & 0o7777
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        found.warnings.append(
            f"{read.path}: unsafe mode {mode:04o}: holds passwords and is readable by"
            " group or others (chmod 600)")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        found.warnings.append(
            f"{read.path}: unsafe mode {mode:04o}: writable by group or others")
    if read.owner not in (-1, user.uid):
        found.warnings.append(f"{read.path}: owned by uid {read.owner}, not by {user.name}")
