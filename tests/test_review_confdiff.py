"""Differential review of sendooway.conf and of reload (SIGHUP).

An independent reference parser, written from sendooway.conf(5) and
DESIGN.md (and, where they are silent, the original C sendooway's
options.c: options_checkLine), is compared with shared/config.py on
generated configs (hypothesis, derandomized): every keyword in random
case, blanks (tabs, no-break spaces) around key, '=' and value, glued and
spaced comments, duplicates, good and bad values (negative, huge, Unicode
digits, empty, 5000 characters), unknown keywords, lines without '=',
control characters, and whole-file trouble (BOM, two BOMs, CRLF and
CR-only line ends, NUL, Latin-1 in a comment or a value, a 200 000
character line, a file over 1 MiB); then configs of good lines only, and
junk from an alphabet of the grammar's pieces; then users' includes
(only smarthostMapping and sslCA, a bad line reported and skipped, the
stricter address rule). 1600 generated cases a run (600 + 300 + 400 +
300; 8000 more by hand while reviewing found nothing more). Both must
take the same configs with the same values and warnings (a '#' glued to
a mapping's word, a validUser list), or refuse at the same line with an
error that starts FILE:LINE (FILE alone for the file as a whole) and
fits a log line. `sendooway -c`, the `sendooway-auth` daemon's start and
`--check` on 27 hostile files (a directory, a FIFO, /dev/zero, a
missing file among them): exit 2, one line naming file:line, no
traceback; an inetd session on such a file gets 421 4.3.0 and the log
the file:line. Reload under load, with the real daemons (PAM through
pam_wrapper, the reader fork server) and aiosmtpd upstreams: sessions
in flight across SIGHUP, hostile files at reload, bursts of SIGHUPs
(descriptors and processes counted), a storm of reloads under four
clients, a hang-up of a root `sendooway -b`'s process group.

FOUND (each test failed first; the commit after it fixes the product)
- A NUL byte's error named the file alone (DESIGN.md: every error names
  file:line; the users' files named it): now its line.
- A control character other than tab inside a line was taken into the
  value: a stray ESC or DEL in userInclude or a mapping named a file
  nobody has (silently missing), a CR-only file read two lines as one
  value. The original refused them ("unexpected character"): now an
  error at file:line (the line not shown); at a line's ends they stay
  blanks (CRLF, \r\r\n). A choice: docs/decisions/foundation.md.
- `localname = fe80::1%eth0` became the literal `[IPv6:fe80::1%eth0]`,
  which the same keyword refuses in brackets, and went into EHLO: refused.
- A bad boolean, enumeration, validUser or proxyProtocol value was shown
  whole in the error: a 100 000-character `reload failed` line. Now 80.
- A SIGHUP to the process group of a root `sendooway -b` (its terminal
  closed, `kill -HUP -PGID`) reloaded its private authenticator alone:
  logins and routes switched to the new file while the frontend logged
  that nothing changed, against sendooway(1). It now ignores SIGHUP
  (internal --private), as the frontend does.
Seen and left alone: two leading BOMs are both skipped (read_text and
decode_config_text each skip one); a Kelvin sign K counts as k in a
keyword or flag (Python's lower(); the original, ASCII only, refused it);
Unicode blanks around keys and values are blanks (str.strip()); an
over-large file is refused before a NUL in it is looked for; `sendooway
-b` logs a line per SIGHUP, however many come.

MUTANTS (planted one at a time, this file run; all killed by the file as
it is; C14 and C22 survived a first version, which led to the good-lines
generator, and C06 a later draw, which led to drawing the keywords where
every line counts more often)
Parser: C01 a comment starts only at ' #'; C02 rpartition('=') (a value
with '='); C03 the top of each range refused; C04 case-sensitive
booleans; C05 validUser last-wins; C06 proxyProtocol last-wins; C07 no
BOM skipped; C08 the NUL error without its line; C09 control characters
taken; C10 a bare zone taken; C11 2 MiB allowed; C12 a 107-octet
authSocket refused; C13 noAuth ignored with user and pass; C14 '_' around
a keyword ignored; C15 timeout allowed in an include; C16 an include's
`*@*.x` kept; C17 splitlines() (line numbers, CR); C18 a non-UTF-8 value
decoded with U+FFFD; C19 a tab allowed in validUser; C20 the STARTTLS and
TLS default ports swapped; C21 an empty validUser skipped; C22 the
comment-cut warning only for the keyword's own spelling; C23 the first
of a repeated keyword kept; C24 values shown whole.
Command lines: X01 exit 1 for a bad config; X02 the message without
file:line; R13 an inetd start failure logged without file:line.
Reload: R01 `reload failed` without file:line; R02 workers not retired
(old routes); R03 logins keep the old config; R04 the daemon's memfd left
open (a descriptor a reload); R05 the fork server's left open; R06
SIGHUP stops `sendooway -b`; R07 the config opened blocking (a FIFO
hangs the daemon); R08 a broken file replaced by the defaults; R09
workers not reaped (zombies); R10 the fork server not taking the new
config; R11 the private authenticator started without --private; R12
--private still dying on SIGHUP; R14 busy workers killed at a reload
(temporary failures under the storm).
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.auth_helpers import (
    Daemon, all_passwords, checked_daemons, children, fork_server, login, route, workers,
)
from tests.front_util import (
    Frontend, front_config, login_plain, open_tmp, socket_client_session, wait_port,
)
from sendooway_shared.config import (
    ConfigError, NotUtf8, decode_config_text, load_config, parse_user_config,
)

# ---------------------------------------------------------------- the reference
# Written from sendooway.conf(5) and DESIGN.md (and, where they are silent,
# the original's options.c: options_checkLine), not from shared/config.py.

BOM = b"\xef\xbb\xbf"
MIB = 1 << 20
DEFAULTS = dict(
    localname="", timeout=300, cloneEhlo=False, addReceivedField=True, sslCA="", sslCert="",
    sslKey="", mailerEncryption="allowed", ext8BitMime="force", extMessageSize=0,
    smarthostPlain="ifAdvertised", smarthostLogin="ifAdvertised",
    smarthostCramMD5="ifAdvertised", authBackend="PAM", ldapUri="", ldapSSLca="",
    ldapAuthDN="", validUser=(), smarthostMapping=(), userInclude="",
    authSocket="/run/sendooway/auth.sock", frontendUser="nobody", pamService="sendooway",
    maxAuthFailures=3, smarthostCache=30, maxSessionsPerAddress=50, proxyProtocol=(),
)
SERVICES = {"smtp": 25, "submission": 587, "smtps": 465}  # /etc/services, as getaddrinfo knows them
FLAGS = {"tls": "tls", "ssl": "ssl", "nocertcheck": "noCertCheck", "noauth": "noAuth"}


class Bad(Exception):
    """The reference refuses: `line` (None: the file as a whole)."""

    def __init__(self, line: int | None, why: str) -> None:
        super().__init__(why)
        self.line = line


def _ascii_lower(s: str) -> str | None:
    return s.lower() if s.isascii() else None


def _num(lo: int, hi: int):
    def parse(v: str) -> int:
        if not re.fullmatch(r"[0-9]+", v) or not lo <= int(v) <= hi:
            raise ValueError(v)
        return int(v)
    return parse


def _one_of(*choices: str):
    def parse(v: str) -> str:
        for c in choices:
            if v.isascii() and v.lower() == c.lower():
                return c
        raise ValueError(v)
    return parse


def _bool(v: str) -> bool:
    return {"yes": True, "no": False}[_ascii_lower(v) or "?"] if _ascii_lower(v) in (
        "yes", "no") else _raise(v)


def _raise(v):
    raise ValueError(v)


def _size(v: str):
    if _ascii_lower(v) == "disable":
        return None
    if not re.fullmatch(r"[0-9]{1,18}", v):  # sendooway.conf(5): at most 18 digits
        raise ValueError(v)
    return int(v)


def _required(v: str) -> str:
    return v if v else _raise(v)


def _socket(v: str) -> str:
    if not v or len(v.encode()) > 107:
        raise ValueError(v)
    return v


def _valid_user(v: str) -> str:
    if not v or v == "%" or re.search(r"\s", v):
        raise ValueError(v)
    return v


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _localname(v: str) -> str:
    """sendooway.conf(5): a host name in ASCII (letters, digits, - and _ in
    labels of at most 63) or an address literal; a bare address is taken
    as its literal, a trailing dot dropped."""
    if not v:
        return v
    if v.startswith("[") and v.endswith("]"):
        inner = v[1:-1]
        if "%" in inner:  # a zone (fe80::1%eth0): RFC 5321 has no place for it
            raise ValueError(v)
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])  # raises ValueError; a zone too
            return v
        ipaddress.IPv4Address(inner)
        return v
    try:
        a = ipaddress.ip_address(v)
    except ValueError:
        pass
    else:
        if "%" in v:
            raise ValueError(v)
        return f"[{a}]" if a.version == 4 else f"[IPv6:{a}]"
    name = v[:-1] if v.endswith(".") and len(v) > 1 else v
    if len(name) > 253 or not all(_LABEL.fullmatch(lab) for lab in name.split(".")):
        raise ValueError(v)
    return name


def _networks(v: str) -> tuple:
    out = []
    for tok in re.split(r"[\s,]+", v):
        if not tok:
            continue
        if "%" in tok:
            raise ValueError(tok)
        net = ipaddress.ip_network(tok)  # strict: host bits set is an error
        if net.prefixlen == 0:
            raise ValueError(tok)
        out.append(net)
    return tuple(out)


def _port(tok: str) -> int:
    if re.fullmatch(r"[0-9]+", tok):
        if 1 <= int(tok) <= 65535:
            return int(tok)
        raise ValueError(tok)
    if tok in SERVICES:
        return SERVICES[tok]
    raise ValueError(tok)


def _is_port(tok: str) -> bool:
    try:
        _port(tok)
        return True
    except ValueError:
        return False


def _server(s: str) -> str:
    bare = s[1:-1] if s.startswith("[") and s.endswith("]") else s
    try:
        ipaddress.ip_address(bare)
        return s
    except ValueError:
        pass
    if ":" in bare:
        raise ValueError("server:port")
    name = bare[:-1] if bare.endswith(".") else bare
    if len(bare) > 253 or not all(0 < len(lab) <= 63 for lab in name.split(".")):
        raise ValueError("label")
    return s


def _direct(rest: str) -> tuple:
    """direct:address server [port] user pass [flags]; with noAuth, user
    and pass left out. -> (address, server, port, mode, user, pass, check, auth)"""
    toks = rest.split()
    flags: set[str] = set()
    if len(toks) >= 3 and all(f.lower() in FLAGS for f in toks[-1].split(",")):
        flags = {FLAGS[f.lower()] for f in toks[-1].split(",")}
        toks = toks[:-1]
    if len(toks) < 2 or len(toks) > 5:
        raise ValueError("fields")
    address, server, more = toks[0], toks[1], toks[2:]
    no_auth = "noAuth" in flags
    port = None
    if len(more) in (1, 3):
        if len(more) == 1 and not no_auth:
            raise ValueError("fields")
        port, more = _port(more[0]), more[1:]
    if len(more) == 2:
        user, pw = more
    elif not more and no_auth:
        user, pw = "", ""
    else:
        raise ValueError("fields")
    if address != "*":
        local, at, domain = address.rpartition("@")
        if not (at and local and domain):
            raise ValueError("address")
    _server(server)
    if {"tls", "ssl"} <= flags:
        raise ValueError("tls and ssl")
    mode = "implicit" if "ssl" in flags else "starttls" if "tls" in flags else "plain"
    port = port or {"implicit": 465, "starttls": 587, "plain": 25}[mode]
    return ("direct", address, server, port, mode, user, pw, "noCertCheck" not in flags,
            not no_auth)


def _mapping(v: str) -> tuple:
    kind, colon, rest = v.partition(":")
    kind = _ascii_lower(kind)
    if not colon or kind not in ("fetchmail", "getmail", "direct") or not rest.strip():
        raise ValueError(v)
    return _direct(rest) if kind == "direct" else (kind, rest.strip())


def _string(v: str) -> str:
    return v


REF_KEYWORDS = {
    "localname": _localname, "timeout": _num(1, 86400), "cloneEhlo": _bool,
    "addReceivedField": _bool, "sslCA": _string, "sslCert": _string, "sslKey": _string,
    "mailerEncryption": _one_of("allowed", "required", "forbidden"),
    "ext8BitMime": _one_of("force", "ignore", "disable"), "extMessageSize": _size,
    "smarthostPlain": _one_of("ifAdvertised", "alwaysTry", "never"),
    "smarthostLogin": _one_of("ifAdvertised", "alwaysTry", "never"),
    "smarthostCramMD5": _one_of("ifAdvertised", "alwaysTry", "never"),
    "authBackend": _one_of("PAM", "none", "LDAP"), "ldapUri": _string, "ldapSSLca": _string,
    "ldapAuthDN": _string, "validUser": _valid_user, "smarthostMapping": _mapping,
    "userInclude": _string, "authSocket": _socket, "frontendUser": _required,
    "pamService": _required, "maxAuthFailures": _num(1, 1000), "smarthostCache": _num(0, 86400),
    "maxSessionsPerAddress": _num(0, 100000), "proxyProtocol": _networks,
}
REPEATED = {"validUser", "smarthostMapping"}


def _control(text: str) -> bool:
    """A control character other than tab: the original's options_checkLine
    refused every one outside a comment ("unexpected character")."""
    return any(unicodedata.category(c) == "Cc" and c != "\t" for c in text)


def ref_parse(data: bytes) -> dict:
    """The reference: field name -> value, or Bad."""
    if data.startswith(BOM):
        data = data[3:]
    if len(data) > MIB:
        raise Bad(None, "too large")
    if data.startswith(BOM):  # a second one is skipped too (read_text and
        data = data[3:]  # decode_config_text each skip one; harmless, left)
    if False:
        raise Bad(None, "too large")
    raw_lines = data.split(b"\n")
    for n, raw in enumerate(raw_lines, 1):  # the file as a whole first: text, no NUL
        if b"\0" in raw:
            raise Bad(n, "NUL")
    texts = []
    for n, raw in enumerate(raw_lines, 1):
        try:
            texts.append(raw.partition(b"#")[0].decode("utf-8"))
        except UnicodeDecodeError:
            raise Bad(n, "not UTF-8") from None
    values: dict = {}
    for n, text in enumerate(texts, 1):
        line = text.strip()  # blanks, and the CR of a CRLF line end
        if not line:
            continue
        if _control(line):
            raise Bad(n, "control character")
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise Bad(n, "no keyword = value")
        # (case-insensitive as Python's lower() has it: the Kelvin sign K
        # is a k there, which the original, ASCII only, refused; harmless)
        name = next((k for k in REF_KEYWORDS if k.lower() == key.lower()), None)
        if name is None:
            raise Bad(n, "unknown keyword")
        if name in REPEATED and not value:
            raise Bad(n, "empty")
        try:
            parsed = REF_KEYWORDS[name](value)
        except (ValueError, KeyError):
            raise Bad(n, f"bad value for {name}") from None
        if (name == "smarthostMapping" and b"#" in raw_lines[n - 1]
                and not text[-1:].isspace()):
            # sendooway.conf(5): a '#' right after a word of a mapping is warned about
            values["comment_cuts"] = values.get("comment_cuts", ()) + (n,)
        if name == "validUser" and ("," in value or ":" in value):
            # a list on one line names nobody: warned about at its file:line
            values["valid_user_lists"] = values.get("valid_user_lists", ()) + (n,)
        if name in REPEATED:
            values[name] = values.get(name, ()) + (parsed,)
        elif name == "proxyProtocol":
            values[name] = values.get(name, ()) + parsed
        else:
            values[name] = parsed
    return values


def real_view(cfg) -> dict:
    """The real Config in the reference's terms."""
    out = {"comment_cuts": cfg.comment_cuts, "valid_user_lists": cfg.valid_user_lists}
    for name in DEFAULTS:
        v = getattr(cfg, name)
        if name == "smarthostMapping":
            v = tuple(_mapping_view(m) for m in v)
        elif hasattr(v, "value"):  # an enum
            v = v.value
        out[name] = v
    return out


def _mapping_view(m) -> tuple:
    if m.direct is None:
        return (m.kind.value, m.path)
    r = m.direct.route
    return ("direct", m.direct.address, r.server, r.port,
            {"plain": "plain", "starttls": "starttls"}.get(r.tls.value, "implicit"),
            r.user, r.password.reveal(), r.cert_check, r.auth)


# ---------------------------------------------------------------- generated configs

KEY_CASES = st.sampled_from([str, str.lower, str.upper, lambda k: k.swapcase()])
BLANKS = st.sampled_from(["", " ", "  ", "\t", " \t ", "\u00a0"])
GOOD = {
    "localname": ["", "mx.example.org", "mx.example.org.", "[192.0.2.1]", "[IPv6:2001:db8::1]",
                  "192.0.2.7", "2001:db8::7", "a_b.example", "xn--bcher-kva.example"],
    "timeout": ["1", "30", "300", "0300", "86400"],
    "cloneEhlo": ["yes", "no", "YES", "No"], "addReceivedField": ["yes", "no", "Yes"],
    "sslCA": ["", "/etc/ssl/ca.pem", "%h/ca.pem", "/p a t h/with blanks.pem"],
    "sslCert": ["", "/etc/ssl/c.pem"], "sslKey": ["", "/etc/ssl/k.pem"],
    "mailerEncryption": ["allowed", "REQUIRED", "Forbidden"],
    "ext8BitMime": ["force", "ignore", "DISABLE"],
    "extMessageSize": ["disable", "0", "10240000", "999999999999999999", "Disable"],
    "smarthostPlain": ["ifAdvertised", "alwaystry", "NEVER"],
    "smarthostLogin": ["ifadvertised", "alwaysTry"], "smarthostCramMD5": ["never", "IfAdvertised"],
    "authBackend": ["PAM", "pam", "none", "ldap"], "ldapUri": ["", "ldaps://ldap.example"],
    "ldapSSLca": ["", "/etc/ca"], "ldapAuthDN": ["", "uid=%u,ou=people,dc=ex,dc=org"],
    "validUser": ["alice", "%mailusers", "bob", "alice,bob", "ali:ce", "Bücher"],
    "smarthostMapping": [
        "fetchmail:%h/.fetchmailrc", "getmail:%h/.getmail/getmailrc", "FETCHMAIL:.fetchmailrc",
        "direct:* smtp.example.org alice s3cret", "direct:*@ex.org smtp.example.org 587 u p tls",
        "direct:a@ex.org 192.0.2.1 submission u p ssl,noCertCheck",
        "direct:* [2001:db8::1] 25 noAuth", "direct:* 2001:db8::1 noauth",
        "direct:* smtp.example.org 587 u tls", "direct:*@*.ex.org relay.example 25 NOAUTH,tls",
        "Direct:x@y s.example u p=w=x TLS", "direct:* s.example smtp u p", "direct:* s.example u pä",
        "direct:* s.example. u p",
    ],
    "userInclude": ["", "%h/.sendoowayrc", "~/.sendoowayrc"],
    "authSocket": ["/run/s/auth.sock", "/tmp/" + "x" * 102],
    "frontendUser": ["nobody", "sendooway"], "pamService": ["sendooway", "other"],
    "maxAuthFailures": ["1", "3", "1000"], "smarthostCache": ["0", "30", "86400"],
    "maxSessionsPerAddress": ["0", "50", "100000"],
    "proxyProtocol": ["", "10.0.0.5", "10.0.0.0/8, 192.0.2.7", "2001:db8::/32 ::1", ",10.1.2.3,"],
}
BAD = {
    "localname": ["mx example", "mx:25", "[192.0.2.1", "[2001:db8::1]", "[IPv6:192.0.2.1]",
                  "-mx.example", "mx..example", "bücher.example", "a" * 64 + ".example",
                  "fe80::1%eth0", "[IPv6:fe80::1%eth0]"],
    "timeout": ["0", "-1", "86401", "+30", "30s", "3 0", "1e3", "0x10", "", "９", "²",
                "9" * 40, "99999999999999999999999999999"],
    "cloneEhlo": ["true", "1", "", "yes please", "y"], "addReceivedField": ["on", "off", ""],
    "mailerEncryption": ["", "require", "tls"], "ext8BitMime": ["", "yes"],
    "extMessageSize": ["-1", "", "10M", "9" * 19, "1.5"],
    "smarthostPlain": ["", "always"], "smarthostLogin": ["maybe"], "smarthostCramMD5": ["0"],
    "authBackend": ["", "shadow", "PAM LDAP"],
    "validUser": ["", "%", "alice bob", "alice\tbob"],
    "smarthostMapping": [
        "", "direct:", "fetchmail:", "getmail:  ", "sendmail:/x", "direct:* smtp.example.org",
        "direct:* smtp.example.org:587 u p", "direct:* s.example 99999 u p",
        "direct:* s.example 0 u p", "direct:* s.example 587 u p tls,ssl",
        "direct:* s.example 587 u p tls extra", "direct:* s.example 587 u p tlx",
        "direct:* s.example u p tls,bogus", "direct:alice s.example u p", "direct:@x s.example u p",
        "direct:* a..b u p", "direct:* s.example tls", "direct:* s.example 587 noauth extra",
        "direct:* s.example 1 2 3 4 5",
    ],
    "authSocket": ["", "/tmp/" + "x" * 103], "frontendUser": [""], "pamService": [""],
    "maxAuthFailures": ["0", "1001", "-3"], "smarthostCache": ["86401", "-0", "x"],
    "maxSessionsPerAddress": ["100001", "-1"],
    "proxyProtocol": ["0.0.0.0/0", "::/0", "mail.example.org", "10.0.0.1/8", "fe80::1%eth0",
                      "10.0.0.0/33", "10.0.0.0/8;10.1.0.0/16"],
}
CANON = {k.lower(): k for k in DEFAULTS}


@st.composite
def assignment(draw, good: bool = True) -> str:
    pool = GOOD if good else BAD
    # the keywords where every line counts, more often: their duplicates matter
    name = draw(st.sampled_from(sorted(pool) + ["validUser", "smarthostMapping",
                                                "proxyProtocol"] * 3))
    value = draw(st.sampled_from(pool[name]))
    key = draw(KEY_CASES)(name)
    comment = draw(st.sampled_from(["", " # note", "\t#note", "# a = b", " #"]))
    return f"{draw(BLANKS)}{key}{draw(BLANKS)}={draw(BLANKS)}{value}{draw(BLANKS)}{comment}"


HOSTILE_LINES = [
    "", "   ", "\t", "# comment", "#timeout = 0", "   # indented comment",
    "timeout", "timeout 30", "timeout: 30", "= 30", " = ", "==", "timeout == 30",
    "smarthostMaping = fetchmail:x", "sslca_file = /x", "bogus = 1", "ssl CA = /x",
    "c2VjcmV0= tls", "keyword", "timeout = 30 # = 40", "timeout = 30#40",
    "ssl\u212aey = /k.pem",  # a Kelvin sign: lower() makes it 'k'
    "localname = mx.example\u200b", "sslCA = /a\x1b[2J", "userInclude = %h/.rc\x7f",
    "pamService = send\x0cooway", "timeout = 30\x0b", "\x0c", "validUser = ali\x01ce",
    "sslCert = /c.pem\rsslKey = /k.pem", "timeout = 30\r", "timeout\t=\t30",
    "validUser = \u00a0alice\u00a0", "\ufeffvalidUser = alice", "userInclude = " + "y" * 5000,
    "ldapAuthDN = uid=%u,ou=x=y", "timeout = ３０",
    "smarthostMapping = direct:* s.example u pa#ss tls", "smarthostMapping = getmail:x\t#y",
    "SmartHostMapping=fetchmail:%h/x#y", "validUser = ali:ce # b,c", "timeout_ = 30",
    "_sslCA = /x", "cloneEhlo = " + "y" * 5000, "authBackend = " + "P" * 5000,
    "validUser = a " + "b" * 5000, "proxyProtocol = 10.0.0.1 " + "1" * 5000,
    "proxyProtocol = 10.0.0.1/8" + "0" * 5000,
]


FINE_LINES = ["", "   ", "\t", "# comment", "#timeout = 0", "   # indented comment", "\x0c",
              "timeout = 30 # = 40", "timeout = 30#40", "timeout = 30\x0b", "timeout\t=\t30",
              "validUser = \u00a0alice\u00a0", "ldapAuthDN = uid=%u,ou=x=y",
              "smarthostMapping = direct:* s.example u pa#ss tls",
              "SmartHostMapping=fetchmail:%h/x#y", "validUser = ali:ce # b,c"]


@st.composite
def config_bytes(draw, bad: bool = True) -> bytes:
    """A config's bytes; with bad=False, its lines are all good ones (the
    file as a whole may still be in trouble)."""
    if bad:
        item = st.one_of(assignment(True), assignment(True), assignment(True),
                         assignment(False), st.sampled_from(HOSTILE_LINES))
    else:
        item = st.one_of(assignment(True), assignment(True), st.sampled_from(FINE_LINES))
    items = draw(st.lists(item, min_size=0, max_size=12))
    eol = draw(st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"]))
    data = eol.join(i.encode() for i in items)
    if items and draw(st.booleans()):
        data += eol
    trouble = draw(st.sampled_from(["none"] * 6 + ["bom", "nul", "latin1-comment", "latin1-value",
                                                   "huge", "long-line", "bom2"]))
    lines = data.split(b"\n")
    at = draw(st.integers(0, max(0, len(lines) - 1)))
    if trouble == "bom":
        data = BOM + data
    elif trouble == "bom2":
        data = BOM + BOM + data
    elif trouble == "nul":
        lines[at] += b"\0"
        data = b"\n".join(lines)
    elif trouble == "latin1-comment":
        lines[at] += b" # Gr\xf6\xdfe"
        data = b"\n".join(lines)
    elif trouble == "latin1-value":
        lines.insert(at, b"sslCA = /etc/Gr\xf6\xdfe.pem")
        data = b"\n".join(lines)
    elif trouble == "huge":
        data = b"# padding\n" * (MIB // 10) + data
    elif trouble == "long-line":
        lines.insert(at, b"sslCA = /" + b"p" * 200_000)
        data = b"\n".join(lines)
    return data


JUNK = st.lists(st.sampled_from(
    list("=#%:,@*[]./- \t\r\n\x00\x0b\x0c\x1b\u00a0\u212a\ufeff09aZ")
    + ["timeout", "validUser", "smarthostMapping", "direct:", "fetchmail:", "localname",
       "yes", "no", "proxyProtocol", "10.0.0.0/8", "noAuth", "tls", "587", "extMessageSize"]),
    max_size=60).map("".join)


def compare(data: bytes, path: str) -> str:
    """Parse `data` both ways; assert they agree. Returns 'ok' or 'error'."""
    with open(path, "wb") as f:
        f.write(data)
    try:
        expected = ref_parse(data)
    except Bad as bad:
        expected = bad
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert isinstance(expected, Bad), (
            f"the reference takes it, the parser says {exc}\n{data[:600]!r}")
        assert exc.filename == path and exc.line == expected.line, (
            f"reference: line {expected.line} ({expected}); parser: {exc}\n{data[:600]!r}")
        text = str(exc)
        where = f"{path}:{exc.line}: " if exc.line else f"{path}: "
        assert text.startswith(where) and len(text) > len(where) + 5, text
        # one line a log can hold: the value shown in part, as elsewhere
        assert len(text) < len(where) + 400 and "\n" not in text, (len(text), text[:300])
        return "error"
    assert not isinstance(expected, Bad), (
        f"the reference refuses line {expected.line} ({expected}), the parser takes it:"
        f"\n{data[:600]!r}")
    want = {**DEFAULTS, "comment_cuts": (), "valid_user_lists": (), **expected}
    got = real_view(cfg)
    assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    return "ok"


SEEN: dict[str, int] = {}
SETTINGS = settings(max_examples=600, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@SETTINGS
@given(data=config_bytes())
def test_generated_configs_parse_as_the_documentation_says(data, tmp_path_factory):
    path = str(tmp_path_factory.getbasetemp() / "confdiff.conf")
    kind = compare(data, path)
    SEEN[kind] = SEEN.get(kind, 0) + 1


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=config_bytes(bad=False))
def test_generated_good_configs_give_the_documented_values(data, tmp_path_factory):
    path = str(tmp_path_factory.getbasetemp() / "confgood.conf")
    compare(data, path)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(text=JUNK)
def test_junk_parses_as_the_documentation_says(text, tmp_path_factory):
    path = str(tmp_path_factory.getbasetemp() / "confjunk.conf")
    compare(text.encode(), path)


# ---------------------------------------------------------------- a user's include


def ref_include(data: bytes) -> tuple[list, object, list[int]]:
    """A .sendoowayrc as sendooway.conf(5) has it: the same syntax, only
    smarthostMapping and sslCA, a bad line reported (file:line) and
    skipped; a direct: address with any other '*' than a whole local part
    or address is an error there. -> (mappings, sslCA or None, error lines)"""
    if data.startswith(BOM):
        data = data[3:]
    mappings, ssl_ca, errors = [], None, []
    for n, raw in enumerate(data.split(b"\n"), 1):
        line = raw.partition(b"#")[0].decode("utf-8").strip()
        if not line:
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        name = {"smarthostmapping": "smarthostMapping", "sslca": "sslCA"}.get(key.lower())
        try:
            if _control(line) or not eq or name is None:
                raise ValueError(line)
            if name == "sslCA":
                ssl_ca = value
                continue
            m = _mapping(value)
            if m[0] == "direct" and m[1] != "*":
                local, _, domain = m[1].rpartition("@")
                if "*" in domain or ("*" in local and local != "*"):
                    raise ValueError(m[1])
            mappings.append(m)
        except ValueError:
            errors.append(n)
    return mappings, ssl_ca, errors


INCLUDE_LINES = st.one_of(
    st.sampled_from(HOSTILE_LINES),
    st.sampled_from(["smarthostMapping = direct:*@*.ex.org relay.example 25 noAuth",
                     "smarthostMapping = direct:a*@ex.org relay.example 25 noAuth",
                     "sslCA = %h/ca.pem", "SSLca =", "timeout = 30", "validUser = alice",
                     "userInclude = %h/x"]),
    st.builds(lambda k, v, c: f"{k} = {v}{c}",
              st.sampled_from(["smarthostMapping", "SMARTHOSTMAPPING", "sslCA"]),
              st.sampled_from(GOOD["smarthostMapping"] + BAD["smarthostMapping"]),
              st.sampled_from(["", " # x", "#x"])))


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(lines=st.lists(INCLUDE_LINES, max_size=10),
       eol=st.sampled_from(["\n", "\r\n"]), bom=st.booleans())
def test_generated_includes_parse_as_the_documentation_says(lines, eol, bom):
    data = (BOM if bom else b"") + eol.join(lines).encode()
    try:
        want = ref_include(data)
    except UnicodeDecodeError:
        with pytest.raises(NotUtf8):
            decode_config_text(data)
        return
    errors: list[ConfigError] = []
    got = parse_user_config(decode_config_text(data), "/home/u/.sendoowayrc", errors)
    assert [e.line for e in errors] == want[2], (errors, want[2], data)
    for e in errors:
        assert str(e).startswith(f"/home/u/.sendoowayrc:{e.line}: "), str(e)
    assert [_mapping_view(m) for m in got.smarthostMapping] == want[0], data
    assert got.sslCA == want[1], data


# ---------------------------------------------------------------- the findings, one by one


def test_a_nul_byte_is_an_error_naming_its_line(tmp_path):
    """DESIGN.md: every error names file:line; the users' files did
    (routes._text), sendooway.conf gave the file alone."""
    path = tmp_path / "nul.conf"
    path.write_bytes(b"timeout = 30\n# fine\nvalidUser = ali\0ce\nbogus\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    assert exc.value.line == 3 and str(exc.value).startswith(f"{path}:3: ")
    assert "NUL" in str(exc.value)


@pytest.mark.parametrize("value, code", [
    ("%h/.sendoowayrc\x7f", "007F"), ("/etc/ssl/c.pem\rsslKey = /etc/ssl/k.pem", "000D"),
    ("send\x0cooway", "000C"), ("ali\x01ce", "0001"), ("%h/.r\x85c", "0085"),
])
def test_a_control_character_inside_a_line_is_an_error_naming_the_line(tmp_path, value, code):
    """The original refused any control character but tab outside a
    comment ("unexpected character"); taken silently, it made a file
    name nobody has (userInclude, a mapping: silently missing), a PAM
    service that does not exist, or, with CR-only line ends, one value of
    two lines. At the line's ends they are blanks (a CRLF file, \\r\\r\\n)."""
    key = "validUser" if code == "0001" else "pamService" if code == "000C" else \
        "sslCert" if code == "000D" else "userInclude"
    path = tmp_path / "ctl.conf"
    path.write_bytes(f"timeout = 30\r\n{key} = {value}\r\r\n".encode())
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    text = str(exc.value)
    assert exc.value.line == 2 and text.startswith(f"{path}:2: "), text
    assert f"U+{code}" in text and value.split("\r")[0] not in text
    path.write_bytes(b"timeout = 30\x0b\r\r\n\x0c\n\tvalidUser\t=\talice\x1f\r\n")
    cfg = load_config(str(path))  # blanks at the ends still are blanks
    assert cfg.timeout == 30 and cfg.validUser == ("alice",)


def test_a_bare_ipv6_localname_with_a_zone_is_refused_as_its_literal_is(tmp_path):
    """sendooway.conf(5): a bare address is taken as its literal; the
    literal with a zone ([IPv6:fe80::1%eth0]) is refused (RFC 5321 has no
    zone), but the bare form became exactly that literal, sent in EHLO."""
    path = tmp_path / "zone.conf"
    path.write_text("localname = fe80::1%eth0\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    assert exc.value.line == 1 and "localname" in str(exc.value)
    path.write_text("localname = fe80::1\n")
    assert load_config(str(path)).localname == "[IPv6:fe80::1]"


@pytest.mark.parametrize("line", [
    "cloneEhlo = " + "y" * 100_000, "mailerEncryption = " + "r" * 100_000,
    "validUser = alice " + "b" * 100_000, "proxyProtocol = 10.0.0.1 " + "1" * 100_000,
    "proxyProtocol = 10.0.0.1/8" + "0" * 100_000,
])
def test_an_error_shows_a_long_value_in_part_only(tmp_path, line):
    """Errors for numbers, localname, servers and keywords show at most 40
    or 80 characters of what was written; booleans, enumerations,
    validUser and proxyProtocol showed all of it: a pasted blob made a
    100 000-character `reload failed` line (syslog and journald cut or
    split such lines) and start-up message."""
    path = tmp_path / "long.conf"
    path.write_text(f"timeout = 30\n{line}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    assert exc.value.line == 2 and len(str(exc.value)) < len(str(path)) + 300, len(str(exc.value))


# ---------------------------------------------------------------- the command lines

CLI_BAD = [
    b"timeout = -5\n", b"timeout = 99999999999999999999999999999999999999\n",
    b"\xef\xbb\xbf\xef\xbb\xbf\xef\xbb\xbfvalidUser = alice\n",
    b"validUser = alice\r\nbogusKeyword = 1\r\n", b"# ok\n\nvalidUser\n",
    b"sslCA = /x\n" + b"timeout = 30\n" * 3 + b"timeout = 3\x000\n",
    b"# Gr\xf6\xdfe\nsslCA = /etc/Gr\xf6\xdfe.pem\n",
    b"localname = mx.example\n" + b"# pad\n" * 20 + b"smarthostMapping = direct:* h:25 u p\n",
    b"timeout = 30\rlocalname = mx\r",  # CR-only line ends
    b"a" * 300_000 + b"\n", b"=\n", b"cloneEhlo = true\n", b"extMessageSize = 10M\n",
    b"maxSessionsPerAddress = 100001\n", b"proxyProtocol = 0.0.0.0/0\n",
    b"authSocket =\n", b"frontendUser = \t\n", b"smarthostMapping =\n",
    b"\xef\xbb\xbfmailerEncryption = require\n", b"# x\n" * (MIB // 4 + 1),
    b"userInclude = %h/.sendoowayrc\x1b\n", b"localname = fe80::1%eth0\n",
    b"timeout = \xd9\xa3\xd9\xa0\n",  # Arabic-Indic digits: isdigit(), no number here
]


def test_both_programs_refuse_each_bad_config_with_file_line_and_exit_2(tmp_path, world):
    """`sendooway -c FILE` and `sendooway-auth -c FILE` (the daemon's start)
    on hostile configs: exit 2 (sendooway(1), sendooway-auth(8)), one line
    on stderr `PROGRAM: FILE:LINE: what`, the line the reference blames,
    never a traceback; good but odd ones (BOM, CRLF, tabs, Latin-1 in a
    comment) pass `sendooway-auth --check`. A directory, a FIFO (no hang), a
    missing file and /dev/zero (a device, as /dev/null is) likewise; --check
    on a bad config exits 2 too."""
    bindir = os.path.dirname(sys.executable)
    procs, paths = [], []
    for n, data in enumerate(CLI_BAD):
        path = str(tmp_path / f"bad{n}.conf")
        with open(path, "wb") as f:
            f.write(data)
        with pytest.raises(Bad) as bad:
            ref_parse(data)
        where = f"{path}:{bad.value.line}: " if bad.value.line else f"{path}: "
        paths.append((path, where))
    os.mkdir(tmp_path / "a-directory")
    os.mkfifo(tmp_path / "a-fifo")
    for path in (str(tmp_path / "a-directory"), str(tmp_path / "a-fifo"),
                 str(tmp_path / "missing"), "/dev/zero"):
        paths.append((path, f"{path}: "))  # (/dev/zero: larger than 1 MiB)
    for path, where in paths:
        for argv in ([os.path.join(bindir, "sendooway"), "-c", path, "-l", "&2"],
                     [os.path.join(bindir, "sendooway-auth"), "-c", path,
                      "--socket", str(tmp_path / "no" / "auth.sock"), "-l", "&2"],
                     [os.path.join(bindir, "sendooway-auth"), "-c", path, "--check", "root"]):
            procs.append((argv, where, subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    good = [b"\xef\xbb\xbf\ttimeout\t=\t30\t\r\n# Gr\xf6\xdfe\r\nvalidUser = root\r\n",
            b"TIMEOUT=30#x\nvalidUser =root # \xff\xfe\n" + b"# pad\n" * 1000]
    for n, data in enumerate(good):
        path = str(tmp_path / f"good{n}.conf")
        with open(path, "wb") as f:
            f.write(data)
        procs.append(([os.path.join(bindir, "sendooway-auth"), "-c", path, "--check", "root"],
                      None, subprocess.Popen([os.path.join(bindir, "sendooway-auth"), "-c", path,
                                              "--check", "root"], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for argv, where, proc in procs:
        out, err = proc.communicate(timeout=60)
        text = err.decode("utf-8", "replace")
        assert "Traceback" not in text + out.decode("utf-8", "replace"), (argv, text)
        if where is None:
            assert proc.returncode in (0, 1), (argv, proc.returncode, text)
            assert "valid user: yes" in out.decode(), out.decode()
            continue
        program = os.path.basename(argv[0])
        assert proc.returncode == 2, (argv, proc.returncode, text)
        assert text.startswith(f"{program}: {where}") and text.count("\n") == 1, (argv, text)


# ---------------------------------------------------------------- reload under load


class Smtp:
    """A raw SMTP client: one command at a time, replies as (code, text)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.file.readline()
            assert line, f"connection closed after {lines}"
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def login(self, user: str, password: str) -> int:
        assert self.cmd("EHLO client.test")[0] == 250
        return self.cmd("AUTH PLAIN " + login_plain(user, password))[0]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _front_and_daemon(tmp, world, text: str):
    config = front_config(tmp, world, text, tls=False)
    auth = Daemon(tmp, config).start()
    front = Frontend(config, os.path.join(str(tmp), "front.log")).start()
    return config, auth, front


def _hup_daemon(d: Daemon, reloads: int) -> str:
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        log = d.log()
        if log.count("reloaded ") + log.count("reload failed") >= reloads:
            return log
        assert d.proc.poll() is None and time.monotonic() < deadline, log
        time.sleep(0.02)


def _write(path: str, data: bytes) -> None:
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _mapping_to(up) -> str:
    return f"smarthostMapping = direct:* 127.0.0.1 {up.port} noAuth\n"


def test_sessions_in_flight_finish_across_a_reload_of_both_programs(world, upstream_factory):
    """sendooway-auth(8), SIGHUP: every request after the reload uses the
    new file, on connections opened before too, and a login accepted stays
    accepted; sendooway(1): `-b` serves on with the configuration it read at
    start. So a message in DATA and a transaction opened before finish at
    the old upstream; a session logged in before gets the new route at its
    next MAIL (not the old upstream's connection kept by smarthostCache); a
    login after it obeys the new validUser; the greeting keeps the old
    localname."""
    a = upstream_factory(tls="plain", require_tls=False)
    b = upstream_factory(tls="plain", require_tls=False)
    alice, bob = world.users["alice"], world.users["bob"]
    with open_tmp() as tmp:
        config, d, fe = _front_and_daemon(
            tmp, world, "validUser = alice\nvalidUser = bob\n" + _mapping_to(a))
        try:
            in_data, opened, logged_in, not_yet = (Smtp(fe.port) for _ in range(4))
            for s in (in_data, opened, logged_in):
                assert s.login("alice", alice.password) == 235
            assert not_yet.cmd("EHLO client.test")[0] == 250
            for s in (in_data, opened):
                assert s.cmd("MAIL FROM:<alice@example.org>")[0] == 250
                assert s.cmd("RCPT TO:<carol@example.net>")[0] == 250
            assert in_data.cmd("DATA")[0] == 354
            in_data.sock.sendall(b"Subject: before\r\n\r\nfirst half\r\n")

            _write(config, (open(config).read().replace("mx.test", "other.test")
                            .replace("validUser = bob\n", "")
                            .replace(_mapping_to(a), _mapping_to(b))).encode())
            assert f"reloaded {config}" in _hup_daemon(d, 1)
            fe.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while "SIGHUP ignored" not in fe.log():
                assert fe.proc.poll() is None and time.monotonic() < deadline, fe.log()
                time.sleep(0.02)

            in_data.sock.sendall(b"second half\r\n.\r\n")
            assert in_data.reply()[0] == 250
            assert opened.cmd("DATA")[0] == 354
            assert opened.cmd("Subject: opened\r\n\r\nbody\r\n.")[0] == 250
            assert [m.data.count(b"second half") for m in a.messages] == [1, 0]
            assert not b.messages
            # logged in before the reload: still logged in, the new route
            assert logged_in.cmd("MAIL FROM:<alice@example.org>")[0] == 250
            assert logged_in.cmd("RCPT TO:<carol@example.net>")[0] == 250
            assert logged_in.cmd("DATA")[0] == 354
            assert logged_in.cmd("Subject: after\r\n\r\nbody\r\n.")[0] == 250
            assert len(b.messages) == 1 and len(a.messages) == 2
            # a login after it: bob is no longer a valid user
            assert not_yet.cmd("AUTH PLAIN " + login_plain("bob", bob.password))[0] == 535
            fresh = Smtp(fe.port)
            assert "mx.test" in fresh.greeting[1] and "other.test" not in fresh.greeting[1]
            assert fresh.login("alice", alice.password) == 235
            fresh.close()
            for s in (in_data, opened, logged_in, not_yet):
                s.close()
            assert d.proc.poll() is None and fe.proc.poll() is None
        finally:
            front_code, auth_code = fe.stop(), d.stop()
        assert (front_code, auth_code) == (0, 0)
        for log in (fe.log(), d.log()):
            assert "Traceback" not in log and "internal error" not in log
            for user in (alice, bob):
                assert user.password not in log


def _send_one(port: int, user, subject: str) -> None:
    s = Smtp(port)
    try:
        assert s.login(user.name, user.password) == 235
        assert s.cmd("MAIL FROM:<alice@example.org>")[0] == 250
        assert s.cmd("RCPT TO:<carol@example.net>")[0] == 250
        assert s.cmd("DATA")[0] == 354
        code, text = s.cmd(f"Subject: {subject}\r\n\r\nbody\r\n.")
        assert code == 250, text
        s.cmd("QUIT")
    finally:
        s.close()


def test_a_reload_to_a_hostile_config_keeps_the_old_one_and_names_file_and_line(
        world, upstream_factory):
    """Each broken file (NUL, Latin-1 in a value, a control character, two
    BOMs before an unknown keyword, a zone in localname, over 1 MiB, a
    directory, a FIFO, no file at all) is refused at SIGHUP with `reload
    failed, old config kept: FILE:LINE: ...` (FILE alone when the file as a
    whole is wrong), the line the reference blames; nothing of it is taken
    (its validUser and mapping would show), the daemon neither hangs nor
    dies, and a message in DATA since before the first reload goes through."""
    a = upstream_factory(tls="plain", require_tls=False)
    b = upstream_factory(tls="plain", require_tls=False)
    alice, bob = world.users["alice"], world.users["bob"]
    with open_tmp() as tmp:
        config, d, fe = _front_and_daemon(tmp, world, "validUser = alice\n" + _mapping_to(a))
        good = open(config, "rb").read()
        taken = good.replace(b"validUser = alice", b"validUser = bob").replace(
            _mapping_to(a).encode(), _mapping_to(b).encode())
        broken = [taken + b"timeout = 3\x000\n", taken + b"sslCA = /etc/Gr\xf6\xdfe.pem\n",
                  taken + b"userInclude = %h/.sendoowayrc\x1b\n",
                  BOM + BOM + b"\xef\xbb\xbfvalidUser = bob\n" + taken,
                  taken + b"localname = fe80::1%eth0\n", taken + b"# pad\n" * (MIB // 6 + 1)]
        try:
            flight = Smtp(fe.port)
            assert flight.login("alice", alice.password) == 235
            assert flight.cmd("MAIL FROM:<alice@example.org>")[0] == 250
            assert flight.cmd("RCPT TO:<carol@example.net>")[0] == 250
            assert flight.cmd("DATA")[0] == 354
            flight.sock.sendall(b"Subject: in flight\r\n\r\n")
            failures = 0
            for data in broken + ["directory", "fifo", "missing"]:
                os.unlink(config) if os.path.isfile(config) else None
                if data == "directory":
                    os.mkdir(config)
                    where = f"{config}: "
                elif data == "fifo":
                    os.rmdir(config)
                    os.mkfifo(config)
                    where = f"{config}: "
                elif data == "missing":
                    os.unlink(config)
                    where = f"{config}: cannot read"
                else:
                    _write(config, data)
                    with pytest.raises(Bad) as bad:
                        ref_parse(data)
                    line = bad.value.line
                    where = f"{config}:{line}: " if line else f"{config}: "
                failures += 1
                log = _hup_daemon(d, failures)
                last = [x for x in log.splitlines() if "reload failed" in x][-1]
                assert f"reload failed, old config kept: {where}" in last, (data[:80], last)
                assert "reloaded" not in log
                flight.sock.sendall(b"a line\r\n")
                # the old config serves: bob is no valid user, alice's mail goes to a
                s = Smtp(fe.port)
                assert s.login("bob", bob.password) == 535
                s.close()
            _send_one(fe.port, alice, "during")
            flight.sock.sendall(b".\r\n")
            assert flight.reply()[0] == 250
            assert sorted(m.data.count(b"a line") for m in a.messages) == [0, 9] and not b.messages
            _write(config, taken)  # fixed: taken
            assert f"reloaded {config}" in _hup_daemon(d, failures + 1)
            _send_one(fe.port, bob, "fixed")
            assert len(b.messages) == 1 and len(a.messages) == 2
            flight.close()
        finally:
            fe.stop()
            d.stop()
        log = d.log()
        assert "Traceback" not in log and "internal error" not in log
        assert "\x1b" not in log and "\x00" not in log


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _zombies(pid: int) -> list[int]:
    out = []
    for child in children(pid):
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    out.append(child)
        except (FileNotFoundError, ProcessLookupError):  # reaped between open and read
            pass
    return out


def _quiet_fds(d: Daemon, fe: Frontend) -> tuple[int, int, int]:
    """The descriptor counts of the daemon, its fork server and the
    frontend once they stayed the same for 0.3 s (a session's sockets are
    closed a little after its QUIT)."""
    last, since = None, time.monotonic()
    while True:
        now = (_fds(d.proc.pid), _fds(fork_server(d)), _fds(fe.proc.pid))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 0.3:
            return now
        time.sleep(0.05)


def _settled(d: Daemon) -> str:
    """The daemon's log once no reload line came for 0.3 s."""
    last, since = None, time.monotonic()
    while True:
        log = d.log()
        n = log.count("reloaded ") + log.count("reload failed")
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 0.3:
            return log
        time.sleep(0.05)


def test_fast_sighups_crash_nothing_and_leak_no_descriptors_or_processes(
        world, upstream_factory):
    """SIGHUPs in bursts (good and broken files in turn, sessions between)
    to `sendooway-auth` and `sendooway -b`: both serve on, and once quiet
    their descriptors (the daemon's, its reader fork server's, the
    frontend's) and processes (one reader worker, no zombie) are what they
    were before. Each reload hands the fork server a memfd: one left open
    per reload would grow it by one."""
    up = upstream_factory(tls="plain", require_tls=False)
    alice = world.users["alice"]
    with open_tmp() as tmp:
        config, d, fe = _front_and_daemon(
            tmp, world, "smarthostCache = 0\nvalidUser = alice\n" + _mapping_to(up))
        good = open(config, "rb").read()
        variants = [good, good.replace(b"smarthostCache = 0", b"smarthostCache = 0\nlocalname = y"),
                    good + b"timeout = -1\n", good + b"x\x00\n"]
        try:
            _send_one(fe.port, alice, "warm")
            workers(d, 1)
            base = _quiet_fds(d, fe)
            sent = 0
            for burst in range(12):
                _write(config, variants[burst % len(variants)])
                for _ in range(8):
                    d.proc.send_signal(signal.SIGHUP)
                    fe.proc.send_signal(signal.SIGHUP)
                    sent += 1
                if burst % 3 == 2:
                    _send_one(fe.port, alice, f"burst {burst}")
            _write(config, good)
            d.proc.send_signal(signal.SIGHUP)
            log = _settled(d)
            assert 1 <= log.count("reloaded ") + log.count("reload failed") <= sent + 1
            assert log.count("reload failed") >= 1
            _send_one(fe.port, alice, "after")
            assert d.proc.poll() is None and fe.proc.poll() is None
            assert list(workers(d, 1).values()) == [alice.uid]
            assert _quiet_fds(d, fe) == base
            assert not _zombies(d.proc.pid) and not _zombies(fork_server(d))
            assert len(up.messages) == 6
            assert fe.log().count("SIGHUP ignored") >= 1
        finally:
            fe.stop()
            d.stop()
        for log in (d.log(), fe.log()):
            assert "Traceback" not in log and "internal error" not in log


def test_inetd_sessions_on_a_hostile_config_get_421_and_the_log_names_file_and_line(world):
    """sendooway(1): started by inetd or xinetd (stdin, stdout and stderr the
    client's socket), a failure to start answers 421 4.3.0 and logs
    `cannot start:` with the reason; a client never sees the configuration.
    Each session reads the file anew, so each hostile file must do that."""
    with open_tmp() as tmp:
        cases = [b"validUser = alice\nsmarthostMapping = direct:* s 25 u Conf-Secret-1\x00\n",
                 b"smarthostMapping = direct:* s 25 u Conf\x1bSecret-2\n",
                 b"validUser = alice\r\n\r\nsslCA = /etc/Conf-Secret-3\xf6.pem\r\n",
                 BOM + b"Conf-Secret-4 = 1\n"]
        for n, data in enumerate(cases):
            path, log = os.path.join(str(tmp), f"c{n}.conf"), os.path.join(str(tmp), f"l{n}.log")
            _write(path, data)
            with pytest.raises(Bad) as bad:
                ref_parse(data)
            seen, code = socket_client_session(
                [os.path.join(os.path.dirname(sys.executable), "sendooway"), "-c", path,
                 "-l", log], b"EHLO client.test\r\n")
            assert seen.startswith(b"421 4.3.0") and seen.count(b"\r\n") == 1, seen
            assert b"Conf" not in seen and path.encode() not in seen, seen
            assert code == 2
            text = open(log).read()
            assert f"cannot start: {path}:{bad.value.line}: " in text, text
            assert "Secret" not in text and "Traceback" not in text, text


def test_a_hangup_of_a_listening_frontends_group_changes_nothing_of_its_config(
        world, upstream_factory):
    """sendooway(1): with -b, SIGHUP is logged and otherwise ignored, the
    server goes on with the configuration it read at start. A root
    `sendooway -b` with no daemon runs a private authenticator; a SIGHUP to
    the process group (the terminal it ran in closed, `kill -HUP -PGID`,
    `systemctl kill -s HUP` of the unit) reached it too, and it re-read the
    file: logins and routes switched to the new validUser and mappings
    while the frontend's log said `restart it to apply changes`, half a
    reload. Now the private one ignores SIGHUP, as `sendooway-auth --fd`
    does for a one-session frontend."""
    a = upstream_factory(tls="plain", require_tls=False)
    b = upstream_factory(tls="plain", require_tls=False)
    alice, bob = world.users["alice"], world.users["bob"]
    with open_tmp() as tmp:
        config = front_config(tmp, world, "validUser = alice\n" + _mapping_to(a), tls=False)
        fe = Frontend(config, os.path.join(str(tmp), "front.log"))
        fe.proc = subprocess.Popen(fe.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_port(fe.host, fe.port, fe.proc)
            deadline = time.monotonic() + 5
            while "no authenticator at" not in fe.log():  # the private one serves
                assert time.monotonic() < deadline, fe.log()
                time.sleep(0.02)
            flight = Smtp(fe.port)
            assert flight.login("alice", alice.password) == 235
            _write(config, open(config, "rb").read().replace(
                b"validUser = alice", b"validUser = bob").replace(
                _mapping_to(a).encode(), _mapping_to(b).encode()))
            for _ in range(3):
                os.killpg(fe.proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 5
            while fe.log().count("SIGHUP ignored") < 1:
                assert time.monotonic() < deadline, fe.log()
                time.sleep(0.02)
            time.sleep(0.3)  # (a reload, had there been one, is logged by now)
            assert fe.proc.poll() is None and len(children(fe.proc.pid)) == 1
            assert flight.cmd("MAIL FROM:<alice@example.org>")[0] == 250
            assert flight.cmd("RCPT TO:<carol@example.net>")[0] == 250
            assert flight.cmd("DATA")[0] == 354
            assert flight.cmd("Subject: s\r\n\r\nb\r\n.")[0] == 250
            flight.close()
            _send_one(fe.port, alice, "after")
            s = Smtp(fe.port)
            assert s.login("bob", bob.password) == 535
            s.close()
            assert len(a.messages) == 2 and not b.messages
            assert "reloaded" not in fe.log() and "reload failed" not in fe.log()
        finally:
            code = fe.stop()
        assert code == 0, fe.log()
        assert "Traceback" not in fe.log() and "internal error" not in fe.log()


@pytest.fixture
def auth_daemon(tmp_path, tmp_config, clean_homes):
    """start(conf) -> a started sendooway-auth; logs checked at the end."""
    yield from checked_daemons(tmp_path, tmp_config, all_passwords(clean_homes))


def test_route_answers_during_a_storm_of_reloads_are_whole_configs(auth_daemon, world):
    """sendooway-auth(8): a reload runs in one go, so a request sees the old
    or the new configuration whole; a lookup under way finishes with the
    old one. Four clients log in and ask routes without pause while the
    file flips between two configs (and a broken one) under SIGHUPs every
    20 ms: every login is taken, every answer is a route of one of the two
    configs, with its port and user as that config has them (never a mix,
    never a temporary failure from a worker killed under a lookup)."""
    import threading

    from sendooway_shared.protocol import AuthOk, RouteOk

    configs = {
        "one.example": "validUser = alice\nsmarthostMapping = direct:* one.example 2525 u1 p1\n",
        "two.example": "validUser = alice\nsmarthostMapping = direct:* two.example 587 u2 p2 tls\n",
    }
    expect = {"one.example": (2525, "u1"), "two.example": (587, "u2")}
    d = auth_daemon(configs["one.example"])
    password = world.users["alice"].password
    stop, seen, problems = threading.Event(), {}, []

    def client(n: int) -> None:
        while not stop.is_set():
            ch = d.connect()
            try:
                ok = login(ch, "alice", password, session=f"c{n}")
                if ok != AuthOk("alice"):
                    problems.append(ok)
                    continue
                for _ in range(5):
                    answer = route(ch, "alice@example.org")
                    if not isinstance(answer, RouteOk) or expect.get(answer.server) != (
                            answer.port, answer.user):
                        problems.append(answer)
                    else:
                        seen[answer.server] = seen.get(answer.server, 0) + 1
            finally:
                ch.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        texts = [configs["two.example"], configs["one.example"],
                 configs["two.example"] + "timeout = 0\n"]
        for i in range(60):
            _write(d.config_path, texts[i % 3].encode())
            d.proc.send_signal(signal.SIGHUP)
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    log = _settled(d)
    assert not problems, problems[:5]
    assert set(seen) == {"one.example", "two.example"} and sum(seen.values()) > 40, seen
    assert log.count("reload failed") >= 1 and log.count("reloaded ") >= 2
    assert d.proc.poll() is None


def test_private_is_an_internal_option_of_the_daemon_alone():
    """--private (the fix above) is not in -h, and with --fd or --check it
    is a usage error (exit 2), as --exit-with-parent is."""
    auth = os.path.join(os.path.dirname(sys.executable), "sendooway-auth")
    helptext = subprocess.run([auth, "-h"], capture_output=True, text=True, timeout=30)
    assert helptext.returncode == 0 and "--private" not in helptext.stdout
    for extra in (["--fd", "3"], ["--check", "root"]):
        res = subprocess.run([auth, "-c", "/dev/null", "--private", *extra],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and "--private is for the daemon" in res.stderr, res.stderr
