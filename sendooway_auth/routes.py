"""A user's routes: which files to read, what they say, which route serves a sender.

`plan` is written once as a generator that yields the paths it needs read and
receives the reads; `run_plan` drives it with a reader. It runs inside the
reader child (as the user, see _reader), so a hostile file is parsed with
the user's rights and the user's CPU time, never in the root process; the
result crosses back as data (`to_wire`/`from_wire`, checked like protocol
input). Order: the `userInclude` file, then the mappings (the user's first,
then the global ones, DESIGN.md's defaults when neither has any).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from dataclasses import dataclass, field, replace
from typing import Callable, Generator

import msgpack

from sendooway_shared.config import (
    MAX_USER_ERRORS, ConfigError, Config, MappingKind, UserConfig, comment_cut_warning,
    decode_config_text, effective_mappings, expand_path, from_home, parse_user_config,
    shell_path_warnings,
)
from sendooway_shared.protocol import RouteOk
from sendooway_shared.types import Route, Secret, TlsMode

from ._accounts import Account, ParseResult, choose
from ._files import MAX_FILES, MAX_PATH, FileRead
from ._users import UserInfo
from .fetchmail import parse_fetchmailrc
from .getmail import parse_getmailrc

MAX_INCLUDE_ERRORS = MAX_USER_ERRORS  # parse_user_config stops after one more
MAX_ACCOUNTS = 1000
MAX_MESSAGES = 100  # errors, and warnings, reported per lookup
MAX_WIRE = 8 << 20
# How --check names a TlsMode: in the files `tls` means STARTTLS, so the
# implicit TLS of `ssl` and SimpleSMTPSSLSender must not be shown as "tls"
MODE_LABELS = {TlsMode.PLAIN: "plain", TlsMode.STARTTLS: "starttls",
               TlsMode.TLS: "implicit-tls"}
NO_SENDER = "no [sender] section (for getmail alone): no account from it"
NO_DIRECTIVES = ("no #sendooway: lines (for fetchmail alone; '# sendooway:' with a blank is a"
                 " remark): no account from it")


@dataclass
class UserRoutes:
    """Everything one lookup found, for the daemon and for --check.

    `failure` is set when the lookup itself broke (reader died or timed
    out): then a missing route is a temporary failure, not a "no"."""

    user: UserInfo
    files: list[tuple[str, FileRead]] = field(default_factory=list)  # (role, read)
    mappings: list[tuple[str, str]] = field(default_factory=list)  # (where, what), for --check
    accounts: list[Account] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ca_file: str = ""
    ca_pem: str = ""  # the user's own sslCA file, read as the user
    failure: str = ""

    @property
    def incomplete(self) -> bool:
        return bool(self.failure)

    def route_for(self, sender: str) -> Account | None:
        account = choose(self.accounts, sender)
        if account is not None and self.ca_pem and account.route.ca_file == self.ca_file:
            account = replace(account, route=replace(account.route, ca_pem=self.ca_pem))
        return account


Plan = Generator[tuple[str, ...], list[FileRead], UserRoutes]


def plan(cfg: Config, user: UserInfo) -> Plan:
    """The lookup: yields the paths to read, receives their FileReads."""
    found = UserRoutes(user)
    user_cfg: UserConfig | None = None
    if cfg.userInclude:
        # a relative path counts from the home, where it is read: named in full
        path = from_home(expand_path(cfg.userInclude, user.name, user.home), user.home)
        (read,) = yield (path,)
        found.files.append(("userInclude", read))
        text = _text(read, found, config_grammar=True)
        if text is not None:
            user_cfg = _parse_include(text, path, found)
            if user_cfg.smarthostMapping or user_cfg.sslCA is not None:
                _check_mode(read, user, found, holds_password=any(
                    m.direct is not None and m.direct.route.password
                    for m in user_cfg.smarthostMapping))
    found.ca_file = user_cfg.sslCA if user_cfg and user_cfg.sslCA is not None else cfg.sslCA
    own_ca = ""
    if user_cfg and user_cfg.sslCA:
        # %h and %u as in mapping paths; a relative path counts from the home
        # (the original read it after chdir(home)). It is read here, as the
        # user, and its certificates travel with the route: the frontend
        # (nobody) could not open a file in a 0700 home.
        own_ca = found.ca_file = os.path.join(user.home,
                                              expand_path(user_cfg.sslCA, user.name, user.home))
        if len(own_ca) > MAX_CA_PATH:
            found.errors.append(f"{user_cfg.filename}: sslCA: path longer than {MAX_CA_PATH}"
                                " characters once expanded: the system store is used")
            own_ca = found.ca_file = ""
    mappings = tuple(m.expand(user.name, user.home) for m in effective_mappings(cfg, user_cfg))
    found.mappings = [("default" if m.filename == "(default)" else m.source,
                       f"direct:{m.direct.address} {m.direct.route.where}"
                       f" {MODE_LABELS[m.direct.route.tls]}" if m.direct
                       else f"{m.kind.value}:{m.path}") for m in mappings]
    wanted = list(dict.fromkeys(m.path for m in mappings if m.kind is not MappingKind.DIRECT))
    for path in wanted[MAX_FILES:]:
        found.errors.append(f"{path}: skipped: more than {MAX_FILES} files to read")
    paths = tuple(p for p in wanted[:MAX_FILES] if len(p) <= MAX_PATH)
    for path in wanted[:MAX_FILES]:
        if len(path) > MAX_PATH:
            found.errors.append(f"{path[:200]}...: skipped: path longer than {MAX_PATH}")
    to_read = paths + ((own_ca,) if own_ca and own_ca not in paths else ())
    reads = (yield to_read) if to_read else []
    by_path = dict(zip(to_read, reads))
    if own_ca:
        found.files.append(("sslCA", by_path[own_ca]))
        _take_ca(by_path[own_ca], found)
        if found.ca_pem:  # (a CA anyone may add to vouches for their server)
            _check_mode(by_path[own_ca], user, found, holds_password=False)
    for path in paths:
        kind = next(m.kind for m in mappings if m.path == path)
        found.files.append((kind.value, by_path[path]))
    own = len(user_cfg.smarthostMapping) if user_cfg else 0
    parsed: dict[str, ParseResult] = {}
    fetch_only: dict[str, str] = {}  # files only getmail or fetchmail use: why, for --check
    admins = {m.source for m in mappings[own:] if m.kind is MappingKind.DIRECT}
    for index, m in enumerate(mappings):
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
                if m.kind is MappingKind.FETCHMAIL:
                    result = parse_fetchmailrc(text, m.path, login=user.name)
                else:
                    result = parse_getmailrc(text, m.path)
                if not (result.accounts or result.errors or result.warnings):
                    fetch_only[m.path] = (NO_DIRECTIVES if m.kind is MappingKind.FETCHMAIL
                                          else NO_SENDER)
                found.errors.extend(result.errors)
                found.warnings.extend(result.warnings)
                if result.accounts:
                    _check_mode(read, user, found, result.holds_password)
            parsed[m.path] = result
        found.accounts.extend(replace(a, tier=tier) for a in parsed[m.path].accounts)
    # Such a file is no error (getmail or fetchmail only fetches with it,
    # and the daemon's log would say so on every message), but --check says
    # why no account comes from it: a `[sendr]` or `# sendooway:server`
    # typo looks the same (the fetchmail half: an outside review).
    found.files = [(role, replace(read, detail=fetch_only[read.path])
                    if role in (MappingKind.FETCHMAIL.value, MappingKind.GETMAIL.value)
                    and read.path in fetch_only else read)
                   for role, read in found.files]
    if found.ca_file:
        # The user's sslCA serves the user's routes, but a global direct:
        # mapping's password is the admin's: it goes only to a server the
        # admin's trust (the global sslCA) vouches for, never to one a
        # user's own CA could make up (a local-user review).
        found.accounts = [a if a.tier and a.route.source in admins else
                          replace(a, route=replace(a.route, ca_file=found.ca_file))
                          for a in found.accounts]
    return found


def run_plan(cfg: Config, user: UserInfo,
             read_paths: Callable[[tuple[str, ...]], list[FileRead]],
             first_warnings: tuple[str, ...] = ()) -> UserRoutes:
    """Run the lookup with a blocking reader of paths. `first_warnings`
    (the reader's own, e.g. a home it cannot enter) go before the lookup's
    and are held to the same bounds."""
    gen = plan(cfg, user)
    try:
        paths = next(gen)
        while True:
            paths = gen.send(read_paths(paths))
    except StopIteration as done:
        found = done.value
    found.warnings[:0] = first_warnings
    _cap(found)
    return found


MAX_MAPPINGS = 1000    # mapping lines reported per lookup
MAX_ADDRESSES = 1000   # address patterns per account
MAX_TEXT = 2000        # characters of one message or mapping line reported


def _cap(found: UserRoutes) -> None:
    """Bound what a lookup hands back, so that whatever a user's files hold
    the answer passes from_wire (a refusal there would be a temporary
    failure with no file:line for the user)."""
    if len(found.accounts) > MAX_ACCOUNTS:
        found.errors.append(f"more than {MAX_ACCOUNTS} accounts: the rest are ignored")
        del found.accounts[MAX_ACCOUNTS:]
    for i, account in enumerate(found.accounts):
        if len(account.addresses) > MAX_ADDRESSES:
            found.errors.append(f"{account.source}: more than {MAX_ADDRESSES} addresses:"
                                " the rest are ignored")
            found.accounts[i] = dataclasses.replace(account,
                                                    addresses=account.addresses[:MAX_ADDRESSES])
    if len(found.mappings) > MAX_MAPPINGS:
        extra = len(found.mappings) - MAX_MAPPINGS
        del found.mappings[MAX_MAPPINGS:]
        found.mappings.append(("...", f"and {extra} more mappings"))
    found.mappings[:] = [(cut_text(a), cut_text(b)) for a, b in found.mappings]
    for name in ("errors", "warnings"):
        items = getattr(found, name)
        if len(items) > MAX_MESSAGES:
            extra = len(items) - MAX_MESSAGES
            del items[MAX_MESSAGES:]
            items.append(f"... and {extra} more")
        items[:] = [cut_text(m) for m in items]


def cut_text(text: str) -> str:
    """One message or mapping line as a lookup reports it."""
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."


MAX_CUT = MAX_TEXT + len("...")  # the longest text cut_text leaves


# ------------------------------------------------------------ across the pipe


def to_wire(found: UserRoutes) -> bytes:
    """The lookup's result without file contents (the reader child sends it)."""
    return msgpack.packb({
        "files": [[role, r.path, r.status, r.detail, r.mode, r.owner, r.size]
                  for role, r in found.files],
        "mappings": [list(m) for m in found.mappings],
        "accounts": [[list(a.addresses), a.route.server, a.route.port, a.route.tls.value,
                      a.route.cert_check, a.route.ca_file, a.route.user,
                      a.route.password.reveal(), a.route.auth, a.route.source, a.tier]
                     for a in found.accounts],
        "errors": found.errors, "warnings": found.warnings, "ca_file": found.ca_file,
        "ca_pem": found.ca_pem,
    }, use_bin_type=True)


class WireError(Exception):
    pass


def _str(v, limit: int = 8192) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise WireError("bad string")
    return v


def _int(v, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise WireError("bad integer")
    return v


def _bool(v) -> bool:
    if type(v) is not bool:
        raise WireError("bad boolean")
    return v


def _list(v, limit: int) -> list:
    if not isinstance(v, list) or len(v) > limit:
        raise WireError("bad list")
    return v


def from_wire(data: bytes, user: UserInfo, max_accounts: int = MAX_ACCOUNTS) -> UserRoutes:
    """Check and rebuild what a reader child sent; raises WireError. The
    bounds are what the reader sends at most (_cap): a lookup for one
    sender gets one account (`max_accounts` = 1), whose patterns the
    daemon matches again on its event loop."""
    try:
        return _from_wire(data, user, max_accounts)
    except (ValueError, TypeError) as exc:  # e.g. a row with too few fields
        raise WireError(f"bad answer ({type(exc).__name__})") from None


_WIRE_KEYS = frozenset({"files", "mappings", "accounts", "errors", "warnings", "ca_file",
                        "ca_pem"})


def _from_wire(data: bytes, user: UserInfo, max_accounts: int) -> UserRoutes:
    if len(data) > MAX_WIRE:
        raise WireError("answer too long")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0,
                              max_array_len=MAX_MAPPINGS + 1,  # (the longest list _cap leaves)
                              max_map_len=len(_WIRE_KEYS))  # (the one map: the answer)
    except Exception:  # noqa: BLE001 - any decoding problem is the same problem
        raise WireError("undecodable answer") from None
    if not isinstance(obj, dict) or set(obj) != _WIRE_KEYS:
        raise WireError("bad answer")
    found = UserRoutes(user, ca_file=_str(obj["ca_file"]), ca_pem=_str(obj["ca_pem"], MAX_CA_PEM))
    for row in _list(obj["files"], MAX_FILES + 2):  # + the include and the own sslCA
        role, path, status, detail, mode, owner, size = _list(row, 7)
        found.files.append((_str(role), FileRead(_str(path), _str(status), _str(detail),
                                                 _int(mode, 0, 0o177777), _int(owner, -1, 2**32),
                                                 _int(size, 0, 2**32))))
    for row in _list(obj["mappings"], MAX_MAPPINGS + 1):
        where, what = _list(row, 2)
        found.mappings.append((_str(where, MAX_CUT), _str(what, MAX_CUT)))
    for row in _list(obj["accounts"], max_accounts):
        addresses, server, port, tls, cert_check, ca_file, up_user, password, auth, source, tier \
            = _list(row, 11)
        try:
            mode = TlsMode(_str(tls))
        except ValueError:
            raise WireError("bad TLS mode") from None
        route = Route(_str(server), _int(port, 1, 65535), mode, _bool(cert_check), _str(ca_file),
                      _str(up_user), Secret(_str(password)), _bool(auth), _str(source))
        patterns = tuple(_str(a) for a in _list(addresses, MAX_ADDRESSES))
        found.accounts.append(Account(patterns, route, _int(tier, 0, 1)))
    found.errors = [_str(e, MAX_CUT) for e in _list(obj["errors"], MAX_MESSAGES + 1)]
    found.warnings = [_str(w, MAX_CUT) for w in _list(obj["warnings"], MAX_MESSAGES + 1)]
    return found


# ------------------------------------------------------------ helpers


MAX_CA_PEM = RouteOk.LIMITS["ca_pem"]  # a user's own sslCA passed with a route
MAX_CA_PATH = RouteOk.LIMITS["ca_file"]  # its path, which travels too
_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----[ \t]*\r?\n[A-Za-z0-9+/= \t\r\n]*?"
                        rb"-----END CERTIFICATE-----")
_BLANKS = re.compile(rb"[ \t]+(?=\r?\n)|\r")


def _take_ca(read: FileRead, found: UserRoutes) -> None:
    """The user's own sslCA file's certificates into found.ca_pem, or an error
    (the route then names the path, which the frontend may not be able to read)."""
    where = f"sslCA {read.path}"
    if not read.ok:
        found.errors.append(f"{where}: {read.status}" + (f" ({read.detail})" if read.detail else ""))
        return
    # only the certificates travel: no remark, no private key kept beside them
    blocks = [_BLANKS.sub(b"", m.group()) for m in _PEM_BLOCK.finditer(read.data)]
    if not blocks:
        found.errors.append(f"{where}: no PEM certificate in it")
        return
    pem = (b"\n".join(blocks) + b"\n").decode("ascii")
    if len(pem) > MAX_CA_PEM:
        found.errors.append(f"{where}: {len(pem)} octets of certificates, more than the"
                            f" {MAX_CA_PEM} that can go with a route: keep only the"
                            " certificates your upstream needs")
        return
    found.ca_pem = pem


def _text(read: FileRead, found: UserRoutes, config_grammar: bool = False) -> str | None:
    """The file's text, or None (an error recorded; a missing file is normal).
    `config_grammar` (a .sendoowayrc): a comment may hold other bytes than
    UTF-8 (see decode_config_text). Otherwise (fetchmail, getmail rc) octets
    that are not UTF-8 are kept as surrogates, for the parser to allow them
    where the programs do (remarks, values sendooway does not use) and to
    name the line of a value it uses that holds them."""
    if read.status == "missing":
        return None
    if not read.ok:
        found.errors.append(f"{read.path}: {read.status}" + (f" ({read.detail})" if read.detail else ""))
        return None
    if b"\0" in read.data:
        line = read.data[: read.data.index(b"\0")].count(b"\n") + 1
        found.errors.append(f"{read.path}:{line}: contains NUL bytes (not a text file)")
        return None
    if not config_grammar:
        return read.data.decode("utf-8", "surrogateescape")
    # each such line skipped, as any other bad line of the include: one
    # Latin-1 "*@b\xfccher.example" used to cost the user every mapping
    bad: list[int] = []
    text = decode_config_text(read.data, bad)
    if len(bad) > MAX_INCLUDE_ERRORS:
        found.errors.append(f"{read.path}: more than {MAX_INCLUDE_ERRORS} lines not valid UTF-8"
                            " (outside a comment), file ignored")
        return None
    found.errors.extend(f"{read.path}:{n}: not valid UTF-8 (outside a comment), line skipped"
                        for n in bad)
    return text


def _parse_include(text: str, path: str, found: UserRoutes) -> UserConfig:
    """Parse ~/.sendoowayrc, skipping (and reporting) each bad line, in one pass."""
    errors: list[ConfigError] = []
    parsed = parse_user_config(text, path, errors)
    found.errors.extend(str(e) for e in errors[:MAX_INCLUDE_ERRORS])
    if len(errors) > MAX_INCLUDE_ERRORS:
        found.errors.append(f"{path}: more than {MAX_INCLUDE_ERRORS} errors, file ignored")
        return UserConfig(filename=path)
    found.warnings.extend(comment_cut_warning(path, n) for n in parsed.comment_cuts)
    found.warnings.extend(shell_path_warnings(parsed.smarthostMapping))
    return parsed


def _check_mode(read: FileRead, user: UserInfo, found: UserRoutes,
                holds_password: bool) -> None:
    """Warnings for a file that gives routes: readable by others when it
    holds passwords; writable by others or owned by someone else whatever
    it holds, since whoever may change it may send the user's mail (and,
    by its server or sslCA, the upstream password) where they like (an
    outside review: a writable ~/.sendoowayrc without passwords was not
    warned about)."""
    mode = read.mode & 0o7777
    if holds_password and mode & (stat.S_IRGRP | stat.S_IROTH):
        found.warnings.append(
            f"{read.path}: unsafe mode {mode:04o}: holds passwords and is readable by"
            " group or others (chmod 600)")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        found.warnings.append(
            f"{read.path}: unsafe mode {mode:04o}: writable by group or others")
    if read.owner not in (-1, user.uid):
        found.warnings.append(f"{read.path}: owned by uid {read.owner}, not by {user.name}")
