"""`sendooway-auth --check USER [--sender ADDR]`: the admin's report.

Runs as root without the daemon; the user's files are still read in a child
that runs as the user. Passwords are never printed.
"""

from __future__ import annotations

import os
import sys

from sendooway_shared.cli import EXIT_NOT_WRITTEN, tell_not_written
from sendooway_shared.config import AuthBackend, Config
from sendooway_shared.protocol import ProtocolError
from sendooway_shared.smtp_syntax import PathError, parse_path
from sendooway_shared.types import Route

from . import _users
from ._connection import sendable
from ._logfmt import text
from ._pam import auth_warnings
from ._reader import lookup_direct
from .routes import MODE_LABELS, UserRoutes

EXIT_OK = 0
EXIT_NO_MAPPING = 1
EXIT_BAD_CONFIG = 2

MASK = "********"


def _route_line(route: Route, default_ca: str) -> str:
    """One route as the admin reads it; `default_ca` is the config's sslCA,
    which the frontend checks a route without a CA file of its own against
    (a global direct: route showed none while fetchmail routes showed it)."""
    if not route.auth:
        who = "no AUTH"
    else:
        who = f"user {route.user or '(none)'} password {MASK if route.password else '(empty)'}"
    check = "" if route.cert_check else " noCertCheck"
    ca_file = route.ca_file or default_ca
    ca = f" ca {ca_file}" if ca_file else ""
    return f"{route.where} {MODE_LABELS[route.tls]}{check}{ca} {who}"


class _OutputError(Exception):
    """Writing the report failed (its OSError is the cause): told apart from
    an OSError of the lookup itself, which is no output problem."""


class _Output:
    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except OSError as exc:
            raise _OutputError() from exc

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            raise _OutputError() from exc


def report_to_stdout(cfg: Config, name: str, sender: str | None) -> int:
    """The report on stdout. A reader that went away (`| head -1`) ends it
    quietly, another write error (a full disk) is one line on stderr: exit
    EXIT_NOT_WRITTEN either way, never a traceback."""
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        print("sendooway-auth: cannot write the report: stdout is closed", file=sys.stderr)
        return EXIT_NOT_WRITTEN
    try:
        out = _Output(sys.stdout)
        code = report(cfg, name, sender, out)
        out.flush()
        return code
    except _OutputError as failure:
        tell_not_written(sys.stdout, failure.__cause__, "sendooway-auth", "the report")
        return EXIT_NOT_WRITTEN


def report(cfg: Config, name: str, sender: str | None, out) -> int:
    """Write the report for `name` to `out`; return the exit code."""
    # Every line is escaped: paths, names and messages come from users'
    # files and must not reach the admin's terminal as control sequences.
    w = lambda line="": print(text(line, limit=20000), file=out)  # noqa: E731
    w(f"sendooway-auth --check {name} (config {cfg.filename or '(defaults)'})")
    w(f"auth backend: {cfg.describe_backend()}")
    refusal = cfg.backend_refusal(os.geteuid())
    if refusal is not None:
        w(f"error: {refusal}")
        w("  (sendooway-auth will not start with this config; the report goes on)")
    for warning in auth_warnings(cfg):
        w(f"warning: {warning}")
    user = _users.lookup(name)
    if user is None:
        w(f"account: {name} does not exist")
        if cfg.authBackend is AuthBackend.LDAP:
            w("  (with authBackend = LDAP the account, its ids and home, come from the"
              " directory at login, which needs the password: --check knows NSS accounts only)")
        w("result: no usable mapping")
        return EXIT_NO_MAPPING if refusal is None else EXIT_BAD_CONFIG
    w(f"account: {user.name} uid={user.uid} gid={user.gid} home={user.home}"
      f" groups={','.join(user.group_names())}")
    if cfg.authBackend is AuthBackend.LDAP:
        w("  note: with authBackend = LDAP the daemon serves the directory entry's uidNumber,"
          " gidNumber and homeDirectory for this name, which may differ from this NSS account"
          " (and %group in validUser is decided by gidNumber alone); shown: the NSS account")
    allowed, why = _users.valid_user(cfg, user)
    w(f"valid user: {'yes' if allowed else 'no'} ({why})")
    if (refusal is None and cfg.authBackend is AuthBackend.NONE
            and user.name != _users.process_user()):
        w(f"note: authBackend = none accepts only {_users.process_user()}")
    if os.geteuid() != 0 and user.uid != os.geteuid():
        # the reader must become the user, which only root may: its failure
        # read as "reader child died" and "no files" (an outside review)
        w(f"result: not checked: only root may read {user.name}'s files"
          f" (run sendooway-auth --check {user.name} as root)")
        return EXIT_NO_MAPPING if refusal is None else EXIT_BAD_CONFIG
    found = lookup_direct(cfg, user)
    _files(found, w)
    _mappings(found, w, cfg.sslCA)
    if found.errors:
        w("errors:")
        for e in found.errors:
            w(f"  {e}")
    if found.warnings:
        w("warnings:")
        for e in found.warnings:
            w(f"  {e}")
    if sender is not None:
        _route_report(found, sender, cfg, w)
    if refusal is not None:
        w(f"result: {len(found.accounts)} account(s), but the config is refused (see error above)")
        return EXIT_BAD_CONFIG
    if not allowed:
        # the daemon refuses this user's login, so no route of theirs is
        # ever asked for: the accounts above are what the files say, unused
        unused = (f", so none of the {len(found.accounts)} account(s) above is used"
                  if found.accounts else "")
        w(f"result: no usable mapping: {user.name} is not a valid user{unused}")
        return EXIT_NO_MAPPING
    if not found.accounts:
        w("result: no usable mapping")
        return EXIT_NO_MAPPING
    w(f"result: {len(found.accounts)} usable account(s)")
    return EXIT_OK


def _route_report(found: UserRoutes, sender: str, cfg: Config, w) -> None:
    """The `route for` line of --sender. The address is read as the frontend
    reads a MAIL FROM path (with or without its angle brackets; a source
    route <@a,@b:user@dom> dropped; non-ASCII taken, as with SMTPUTF8), so
    one it refuses is never given the route of `*` (`from=<a@b>` or
    `Name <a@b>` pasted, `a@b.`)."""
    path = sender if len(sender) >= 2 and sender[0] == "<" and sender[-1] == ">" else f"<{sender}>"
    try:
        sender = parse_path(path, allow_null=True, allow_postmaster=False, utf8=True)
    except PathError as exc:
        w(f"route for {sender}: none: the frontend refuses this address at MAIL FROM"
          f" ({exc})")
        return
    shown = sender or "<>"
    account = found.route_for(sender)
    if account is None:
        w(f"route for {shown}: none (no address pattern of the {len(found.accounts)}"
          f" account(s) matches)")
        return
    w(f"route for {shown}: {_route_line(account.route, cfg.sslCA)} (from {account.source},"
      f" address {' '.join(account.addresses)})")
    try:
        if not sendable(account.route).ca_pem and account.route.ca_pem:
            w("  warning: too big to send with its sslCA certificates: the frontend"
              " has to open the sslCA file itself")
    except ProtocolError as exc:
        w(f"  error: the frontend cannot be told this route ({exc}): mail from"
          f" {shown} is refused")


def _files(found: UserRoutes, w) -> None:
    w("files:")
    if not found.files:
        w("  (none: only direct mappings)")
    for role, read in found.files:
        owner = ""
        if read.ok and read.owner != found.user.uid:
            owner = f", owner uid {read.owner}"
        w(f"  {read.path} [{role}]: {read.describe()}{owner}")


def _mappings(found: UserRoutes, w, default_ca: str) -> None:
    w("mappings (in order; user's first, then global):")
    for where, what in found.mappings:
        w(f"  {where}: {what}")
    w("accounts:")
    if not found.accounts:
        w("  (none)")
    for a in found.accounts:
        w(f"  {a.source}: {' '.join(a.addresses)} -> {_route_line(a.route, default_ca)}")
