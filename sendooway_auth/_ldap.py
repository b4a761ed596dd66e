"""authBackend = LDAP: the original's built-in LDAP login, with ldap3.

A login binds to `ldapUri` as `ldapAuthDN` with %u replaced by the login
name (escaped as an RDN value, RFC 4514: a name cannot change the DN's
shape) and the password (the bytes typed: no SASLprep), then reads that
entry's `uid`, `uidNumber`, `gidNumber` and `homeDirectory`: the account
served, whose files are read as that uid and gid, whether or not NSS
knows it (as the original did).
`ldapSSLca` is the CA file that ldaps:// certificates are checked
against (the system's CAs without it); the server's name is checked too.
Several URIs (separated by blanks, as OpenLDAP's ldap_initialize takes
them) are tried in order while a server cannot be reached.

Runs in the PAM worker threads (it blocks). All tries of a login share
one budget (a little under the authenticator's wait), split among the
URIs still to try: a watchdog shuts a try's socket at the end of its
share, and each connect and read is bounded by CONNECT_LIMIT and
READ_LIMIT too: a URI that hangs or trickles leaves time for the next, and
is named in the log even when the next one answers. Referrals are not
followed (the password would go to whatever host they name). What the
directory refuses is a failed login, and so is an entry that does not
name one account plainly; what keeps it from answering (a referral, an
answer it cannot read) is a temporary failure (454), never a wrong
password.
"""

from __future__ import annotations

import logging
import posixpath
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from sendooway_shared.config import Config
from sendooway_shared.log import field, printable
from sendooway_shared.types import Secret

from ._users import UserInfo

log = logging.getLogger("sendooway-auth")

ATTRIBUTES = ("uid", "uidNumber", "gidNumber", "homeDirectory")
# Seconds a directory may take to accept a connection and to answer, at
# most (`timeout` if lower): a login holds one of the PAM worker threads
# while it waits, and `timeout` (300 s by default) for a directory that
# went silent would leave every thread stuck and every login waiting.
CONNECT_LIMIT = 5
READ_LIMIT = 10
# PATH_MAX less its NUL: a longer homeDirectory names no directory
MAX_HOME = 4095
INVALID_CREDENTIALS = 49
# bind results that say "no" to this account rather than "cannot answer":
# inappropriateAuthentication, insufficientAccessRights, unwillingToPerform
# (a disabled account, a password policy lock), constraintViolation
REFUSALS = frozenset({19, 48, 50, 53})


def plain_name(name: str) -> bool:
    """A login name as the directory stores it: printable ASCII without
    blanks. Anything else (which the directory might fold onto a real name)
    is refused before the bind."""
    return name.isascii() and name.isprintable() and " " not in name


def user_dn(template: str, name: str) -> str:
    from ldap3.utils.dn import escape_rdn

    return template.replace("%u", escape_rdn(name))


def budget(cfg: Config) -> float:
    """Seconds all of a login's tries may take together: a little less than
    the authenticator waits for it (min(timeout, 60 s)), so that a later URI
    is still tried when an earlier one hung, and the reason is logged."""
    return max(1.0, min(float(cfg.timeout), 60.0) - 2.0)


def _server(uri: str, cfg: Config, connect: int):
    from ldap3 import NONE, Server, Tls

    parts = urlsplit(uri)
    secure = parts.scheme.lower() == "ldaps"
    tls = None
    if secure:
        tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=cfg.ldapSSLca or None,
                  version=ssl.PROTOCOL_TLS_CLIENT)
    host = parts.hostname or ""
    return Server(host, port=parts.port or (636 if secure else 389), use_ssl=secure, tls=tls,
                  get_info=NONE, connect_timeout=connect)


def login(cfg: Config, name: str, password: Secret) -> tuple[UserInfo | None, str]:
    """(the account, "") or (None, reason); "ldap-unavailable" (no directory
    answered) is a temporary failure, the other reasons refusals."""
    secret = password.reveal()
    if not secret or not name:  # an empty password is an anonymous bind: never a login
        return None, "empty-password"
    if not plain_name(name):
        # the directory matches loosely (spaces around it, a tab, full-width
        # letters): each such spelling of a real name would bind as it with
        # a backoff count and a login queue of its own (a review)
        return None, "unknown-user"
    try:
        # the bytes as typed, as libldap (the original) and PAM send them:
        # ldap3 would SASLprep a str (NFKC: "ｗide" bound as "wide", and a
        # tab a 454 "no directory answered")
        raw = secret.encode("utf-8")
    except UnicodeError:
        return None, "invalid-characters"
    dn = user_dn(cfg.ldapAuthDN, name)
    trouble = ""
    uris = cfg.ldapUri.split()
    deadline = time.monotonic() + budget(cfg)
    for n, uri in enumerate(uris):
        if trouble:  # the one before did not answer: said even if this one does
            log.warning("ldap: %s", trouble)
        share = max(1, int((deadline - time.monotonic()) / (len(uris) - n)))
        done, outcome = _try(cfg, uri, share, dn, name, raw, secret)
        if done:
            return outcome
        trouble = outcome
    log.error("ldap: user=%s no directory answered: %s", field(name), trouble)
    return None, "ldap-unavailable"


def _try(cfg: Config, uri: str, share: int, dn: str, name: str, raw: bytes, secret: str):
    """(True, the login's result) when this directory answered, or (False,
    why it did not) to try the next URI. Takes `share` seconds at most, all
    of it: a watchdog shuts the connection at the end of its share (each
    read is bounded, but a directory that trickles its answer, a byte at a
    time, held the worker thread for ever — a review)."""
    from ldap3 import BASE, SIMPLE, Connection
    from ldap3.core.exceptions import LDAPException

    conn = None
    cut = threading.Event()
    late = f"{uri}: timed out: no complete answer within {share} s"  # (once the watchdog cut)

    def watchdog() -> None:
        cut.set()
        sock = getattr(conn, "socket", None)
        if sock is not None:
            try:  # the plain socket's: an SSL one's would drop its state under the reader
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
    timer = threading.Timer(share, watchdog)
    timer.daemon = True
    try:
        # auto_referrals off: ldap3 follows a referral to any host it names,
        # binding there with the DN and password (ldap:// in clear even from
        # ldaps://), and that host's entry became the account (a review)
        conn = Connection(_server(uri, cfg, min(share, CONNECT_LIMIT)), user=dn,
                          password=raw, authentication=SIMPLE, read_only=True,
                          raise_exceptions=False, auto_referrals=False,
                          receive_timeout=min(share, READ_LIMIT))
        timer.start()
        if not conn.bind():
            code = (conn.result or {}).get("result")
            if cut.is_set():
                return False, late
            if code == INVALID_CREDENTIALS:
                return True, (None, "wrong-password")
            if code in REFUSALS:
                log.info("ldap: user=%s refused by %s: %s", field(name), printable(uri),
                         _answer(conn.result, secret))
                return True, (None, "ldap-refused")
            return False, f"{uri}: bind answered {_answer(conn.result, secret)}"
        found = conn.search(dn, "(objectClass=*)", search_scope=BASE,
                            attributes=list(ATTRIBUTES))
        entries = [r for r in conn.response or () if r.get("type") == "searchResEntry"]
        if cut.is_set():
            return False, late
        # (ldap3's search says True for any entry, whatever the result
        # after it: an entry followed by an error was served)
        if not found or not entries or (conn.result or {}).get("result") != 0:
            return False, (f"{uri}: the entry {printable(dn)} could not be read after the bind"
                           f" ({_answer(conn.result, secret)})")
        if len(entries) > 1:  # a base search: one entry at most
            return False, f"{uri}: answered {len(entries)} entries for {printable(dn)}"
        return True, _account(entries[0].get("attributes", {}), dn, name)
    except (LDAPException, OSError, ssl.SSLError) as exc:
        if cut.is_set():
            return False, late
        return False, f"{uri}: {_describe(exc, secret)}"
    except Exception as exc:  # noqa: BLE001 - ldap3's decoder fails anyhow on a malformed answer
        # (a bind answer with a referral: KeyError; it was an internal error)
        return False, f"{uri}: an answer that could not be read ({type(exc).__name__})"
    finally:
        timer.cancel()
        if conn is not None:
            try:
                conn.unbind()
            except Exception:  # noqa: BLE001 - closing a connection that broke
                pass


def _answer(result, secret: str) -> str:
    """A directory's answer for the log: its code, and its message without
    the password (a directory may quote what it refused)."""
    result = result or {}
    text = f"{result.get('result')} {result.get('description', '')}".strip()
    message = str(result.get("message") or "")
    if message:
        text += ": " + message
    referrals = result.get("referrals")
    if referrals:
        text += " (referral to " + " ".join(str(r) for r in referrals) + ")"
    return printable(text.replace(secret, "<password>"), 300)


def _describe(exc: BaseException, secret: str = "") -> str:
    """A connection failure in a few words (ldap3 puts the whole peer
    certificate into a name mismatch's text)."""
    text = str(exc) or type(exc).__name__
    if "doesn't match any name" in text or "match_hostname" in text:
        return "the server's certificate is not for this name"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "the server's certificate is not trusted (ldapSSLca)"
    return printable(text.replace(secret, "<password>") if secret else text, 300)


def _values(attrs: dict, key: str) -> list:
    value = attrs.get(key)
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if v not in (None, "", b"")]


def _number(value) -> int | None:
    """RFC 4517's INTEGER, non-negative: ASCII digits only (int() takes
    "٤٠٣٠٣", "4_0303", " 40303", "+40303": none is a uid to NSS)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        # (int() refuses more than 4300 digits: a 454 "could not be read";
        # any number of 20 digits is out of range already)
        return int(value) if len(value) <= 20 else 2**64
    return None


def _account(attrs: dict, dn: str, name: str) -> tuple[UserInfo | None, str]:
    """The entry's account, refused when it is incomplete, ambiguous (two
    values where one account is meant: which one a directory sends first is
    not defined) or would read the files as root."""
    found = {k: _values(attrs, k) for k in ATTRIBUTES}
    missing = [k for k in ATTRIBUTES if not found[k]]
    if missing:
        log.error("ldap: user=%s entry %s lacks %s: check ldapAuthDN and the entry",
                  field(name), printable(dn), ", ".join(missing))
        return None, "ldap-entry-incomplete"
    uids = found["uid"]
    if len(uids) > 1:
        # the value bound as (uid=%u), or none: another value first
        # (an alias) renamed the account, for validUser and %u (a review)
        uids = sorted((u for u in uids if isinstance(u, str) and u.lower() == name.lower()),
                      key=lambda u: u != name) or uids
    several = [k for k in ATTRIBUTES if len(uids if k == "uid" else found[k]) > 1]
    if several:
        log.error("ldap: user=%s entry %s has several values of %s: which account is"
                  " meant is not known", field(name), printable(dn), ", ".join(several))
        return None, "ldap-entry-incomplete"
    uid_name, home = uids[0], found["homeDirectory"][0]
    uid, gid = (_number(found[k][0]) for k in ("uidNumber", "gidNumber"))
    if uid is None or gid is None:
        log.error("ldap: user=%s entry %s: uidNumber/gidNumber are not numbers",
                  field(name), printable(dn))
        return None, "ldap-entry-incomplete"
    if uid <= 0 or gid <= 0 or uid >= 2**32 - 1 or gid >= 2**32 - 1:
        log.error("ldap: user=%s entry %s: uidNumber %d gidNumber %d refused (root or"
                  " out of range: the user's files are read as that account)",
                  field(name), printable(dn), uid, gid)
        return None, "ldap-root-account"
    # text (ldap3 gives bytes what is not UTF-8: str() made "b'le\\xffna'"
    # an account), a name that is one path component, a home that is a path
    if (not isinstance(uid_name, str) or not isinstance(home, str)
            or not uid_name.isprintable() or "/" in uid_name or uid_name in (".", "..")
            or not posixpath.isabs(home) or "\0" in home
            or len(home.encode("utf-8", "surrogateescape")) > MAX_HOME):
        log.error("ldap: user=%s entry %s: unusable uid or homeDirectory", field(name),
                  printable(dn))
        return None, "ldap-entry-incomplete"
    return UserInfo(uid_name, uid, gid, posixpath.normpath(home), (gid,)), ""
