"""MAIL FROM / RCPT TO arguments: RFC 5321 paths and ESMTP parameters.

Pure functions on already-decoded command arguments; they raise
PathError/ParamError, which the frontend's session turns into catalogue
replies. Shared so that `sendooway-auth --check --sender` reads an address
as the frontend does, without running frontend code as root.
"""

from __future__ import annotations

import ipaddress
import re

import idna

MAX_PATH = 256       # RFC 5321 4.5.3.1.3, brackets included
# No limit of its own on the local part: 4.5.3.1.1's 64 octets is exceeded
# by real addresses (GitHub's reply+TOKEN@, mailing-list confirmations), and
# 4.5.3.1 asks for no limits where possible; the path limit bounds it.
MAX_DOMAIN = 255     # 4.5.3.1.2


class PathError(ValueError):
    """The address is not an RFC 5321 path."""


class NeedsUtf8(PathError):
    """The address holds non-ASCII characters but SMTPUTF8 was not given."""


class ParamError(ValueError):
    """A parameter is malformed, repeated or unknown."""


_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
# Dots anywhere, also doubled or last (`a..b@`, `abc.@`: old Japanese mobile
# addresses, which Postfix takes too); the upstream has the last word.
# (Not all dots.)
_DOT_STRING = re.compile(rf"[{_ATEXT}.]+\Z")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_SUBDOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_SUBDOMAIN}(?:\.{_SUBDOMAIN})*\Z")
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]\Z")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")


def split_path_argument(arg: str, keyword: str) -> tuple[str, str]:
    """Split 'FROM:<path> params' into ('<path>', 'params').

    `keyword` is FROM or TO (case-insensitive). Spaces after the colon are
    tolerated, as many clients send one and the original sendooway and
    Postfix take any number. Raises PathError.
    """
    head = arg[: len(keyword) + 1]
    if head.upper() != keyword + ":":
        raise PathError("missing " + keyword + ":")
    rest = arg[len(keyword) + 1:].lstrip(" ")
    if not rest.startswith("<"):
        raise PathError("path must be in angle brackets")
    end = _closing_bracket(rest)
    path, params = rest[: end + 1], rest[end + 1:]
    if params and not params.startswith(" "):
        raise PathError("junk after the path")
    return path, params.strip(" ")


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing the path that starts at text[0] ('<'),
    skipping quoted strings."""
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            return i
        i += 1
    raise PathError("unterminated path")


def parse_path(path: str, *, allow_null: bool, allow_postmaster: bool, utf8: bool) -> str:
    """The mailbox inside '<...>' ("" for '<>'), checked against RFC 5321
    (RFC 6531 with `utf8`). A source route (<@a,@b:user@dom>) is dropped."""
    if len(path.encode("utf-8")) > MAX_PATH:
        raise PathError("path longer than 256 octets")
    inner = path[1:-1]
    if inner == "":
        if allow_null:
            return ""
        raise PathError("null path not allowed here")
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise PathError("bad source route")
        for hop in inner[:colon].split(","):
            if not hop.startswith("@") or not _valid_domain(hop[1:], utf8):
                raise PathError("bad source route")
        inner = inner[colon + 1:]
    if allow_postmaster and inner.lower() == "postmaster":
        return inner
    at = inner.rfind("@")
    if at <= 0:
        raise PathError("mailbox needs local-part@domain")
    local, domain = inner[:at], inner[at + 1:]
    if not utf8 and not inner.isascii():
        raise NeedsUtf8("non-ASCII address")
    if not (_valid_local(local, utf8)):
        raise PathError("bad local part")
    if not (_valid_domain(domain, utf8) or _ADDRESS_LITERAL.match(domain)):
        raise PathError("bad domain")
    return inner


def _ascii_stand_in(text: str) -> str:
    """Non-ASCII letters count as atext/let-dig under SMTPUTF8 (RFC 6531)."""
    return "".join(c if c.isascii() else ("a" if c.isprintable() and not c.isspace() else "\0")
                   for c in text)


def _valid_local(local: str, utf8: bool) -> bool:
    text = _ascii_stand_in(local) if utf8 else local
    return bool((_DOT_STRING.match(text) and text.strip(".")) or _QUOTED.match(text))


def _valid_domain(domain: str, utf8: bool) -> bool:
    if not domain or len(domain.encode("utf-8")) > MAX_DOMAIN:
        return False
    text = _ascii_stand_in(domain) if utf8 else domain
    return bool(_DOMAIN.match(text))


def host_a_label(host: str) -> str:
    """The server name as DNS knows it: an internationalized one (`straße.test`)
    as its IDNA 2008 A-label (UTS #46, non-transitional: ß stays ß, so
    xn--strae-oqa.test, not Python's IDNA 2003 strasse.test, another host),
    the same rule the authenticator compares domains by. ASCII names and
    address literals are kept. Raises ValueError for a name that cannot be
    one (an empty label, a label over 63 octets)."""
    host = host.strip("[]")
    if host.isascii():
        if ":" in host:  # an IPv6 address
            return host
        labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
        if not all(0 < len(label) <= 63 for label in labels) or len(host) > MAX_DOMAIN:
            raise ValueError("empty or over-long label")
        return host
    try:
        return idna.encode(host, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise ValueError(str(exc)) from None


def is_ehlo_name(name: str) -> bool:
    """A Domain (LDH labels of at most 63 octets) or an address literal
    (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) as RFC 5321 4.1.2/4.1.3 write
    them: what may be sent upstream in EHLO (cloneEhlo) or shown in a
    Received: header. Windows computer names (`DESKTOP_4F2A`) are not."""
    if not name or len(name) > MAX_DOMAIN or not name.isascii():
        return False
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        if "%" in inner:  # ipaddress takes any text after % as a zone
            return False
        v6 = inner[:5].upper() == "IPV6:"
        try:
            address = ipaddress.ip_address(inner[5:] if v6 else inner)
        except ValueError:
            return False
        return address.version == (6 if v6 else 4)
    return bool(_DOMAIN.match(name)) and all(len(label) <= 63 for label in name.split("."))


def parse_params(text: str) -> dict[str, str | None]:
    """'SIZE=10 BODY=8BITMIME' → {'SIZE': '10', 'BODY': '8BITMIME'}.
    Keywords are upper-cased; a repeated keyword is an error."""
    out: dict[str, str | None] = {}
    for item in text.split(" ") if text else ():
        if not item:
            raise ParamError("empty parameter")
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.match(key):
            raise ParamError("bad parameter keyword")
        if eq and not _ESMTP_VALUE.match(value):
            raise ParamError("bad parameter value")
        key = key.upper()
        if key in out:
            raise ParamError("repeated parameter")
        out[key] = value if eq else None
    return out
