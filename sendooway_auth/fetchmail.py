"""~/.fetchmailrc: fetchmail's own account lines plus `#sendooway:` comments.

An account is closed by `#sendooway:address "A"`; the `#sendooway:` lines
before it (since the previous account) describe its upstream, and a missing
`#sendooway:user`/`#sendooway:pass` falls back to fetchmail's `user` and
`pass`/`password` given since then in the current `poll`/`skip`/`server`
block. Nothing is carried from one account into the next. Quoting and
escapes follow fetchmail: '...' or "..." with \\n \\t \\r \\b \\xHH \\ooo and
backslash-anything-else standing for itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sendooway_shared.types import DEFAULT_PORTS, Route, Secret, TlsMode, port_number

from ._accounts import Account, ParseResult, lines
from ._address import check_pattern

PREFIX = "sendooway:"
_SEPARATORS = ",;:"
_BLOCK_WORDS = {"poll", "skip", "server", "defaults"}
_USER_WORDS = {"user", "username"}
# fetchmail options whose value is one word that could be read as a keyword
# here (`auth password` is "log in with a password", not a password)
_VALUE_WORDS = {"auth", "authenticate", "proto", "protocol", "via", "port", "service",
                "timeout", "principal", "esmtpname", "esmtppassword", "interface",
                "monitor", "plugin", "plugout", "smtpaddress", "smtpname", "mda",
                "bsmtp", "preconnect", "postconnect", "limit", "warnings", "batchlimit",
                "fetchlimit", "fetchsizelimit", "fastuidl", "expunge", "properties",
                "sslcert", "sslkey", "sslproto", "sslcertfile", "sslcertpath",
                "sslfingerprint", "sslcommonname", "envelope", "qvirtual"}
_PASS_WORDS = {"pass", "password"}
_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}
_FLAGS = {"tls": "tls", "ssl": "ssl", "nocertcheck": "noCertCheck", "noauth": "noAuth"}
_STRINGS = {"server": "server", "user": "user", "pass": "pass", "password": "pass",
            "address": "address"}


class _Syntax(Exception):
    pass


@dataclass
class _Token:
    line: int
    text: str
    quoted: bool = False


@dataclass
class _Directive:
    line: int
    keyword: str
    values: list[str]
    error: str = ""


def _unescape(body: str) -> str:
    if "\\" not in body:
        return body
    out = []
    i = 0
    simple = {"n": "\n", "t": "\t", "r": "\r", "b": "\b"}
    while i < len(body):
        c = body[i]
        if c != "\\" or i + 1 == len(body):
            out.append(c)
            i += 1
            continue
        n = body[i + 1]
        if n in simple:
            out.append(simple[n])
            i += 2
        elif n in "xX" and i + 2 < len(body) and body[i + 2] in "0123456789abcdefABCDEF":
            j = i + 2
            while j < len(body) and j < i + 4 and body[j] in "0123456789abcdefABCDEF":
                j += 1
            out.append(chr(int(body[i + 2:j], 16)))
            i = j
        elif n in "01234567":
            j = i + 1
            while j < len(body) and j < i + 4 and body[j] in "01234567":
                j += 1
            out.append(chr(int(body[i + 1:j], 8) & 0xFF))
            i = j
        else:
            out.append(n)
            i += 2
    return "".join(out)


# The tokens of a line, left to right: separators (skipped), a "..." or
# '...' string (a backslash takes the next character with it), a bare word,
# or a quote that never closes (group 4: an error). Every position is one
# of these, so finditer skips nothing. \s is exactly str.isspace(); the
# possessive quantifiers keep no backtracking state (a 1 MiB unclosed quote
# would otherwise cost over 100 MiB to fail).
_TOKENS = re.compile(r"""[\s,;:]++|"((?:[^"\\]++|\\.)*+)"|'((?:[^'\\]++|\\.)*+)'"""
                     r"""|([^\s,;:"']++)|(["'])""", re.S)
_BARE, _UNCLOSED = 3, 4


def _words(text: str, line: int) -> list[_Token]:
    """Split one line's worth of text (no comments) into tokens."""
    tokens: list[_Token] = []
    for m in _TOKENS.finditer(text):
        group = m.lastindex
        if group is None:
            continue
        if group == _UNCLOSED:
            raise _Syntax("unbalanced quote")
        if group == _BARE:
            tokens.append(_Token(line, m[group]))
        else:
            tokens.append(_Token(line, _unescape(m[group]), True))
    return tokens


def _remark_at(text: str) -> int:
    """Where a remark starts in `text` (-1: none): a `#` outside quotes where
    a token would begin — at the start, after a blank or separator, or right
    after a closing quote — as fetchmail's own lexer and the original read
    it. Inside a word (`pass s3cr#et`) it is part of the word."""
    quote = ""
    after_quote = False
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
                after_quote = True
                i += 1
                continue
        elif c in "\"'":
            quote = c
        elif c == "#" and (i == 0 or after_quote or text[i - 1].isspace()
                           or text[i - 1] in _SEPARATORS):
            return i
        after_quote = False
        i += 1
    return -1


def _split_comment(raw: str) -> tuple[str, str | None]:
    """Code part and comment part (None when there is none) of one line."""
    at = _remark_at(raw)
    return (raw, None) if at < 0 else (raw[:at], raw[at + 1:])


def _cut_remark(text: str) -> str:
    """`text` up to its remark (see _remark_at)."""
    at = _remark_at(text)
    return text if at < 0 else text[:at]


def _lex(text: str) -> list[_Token | _Directive]:
    """Tokens of the fetchmail lines and the #sendooway: directives, in order;
    a line that cannot be split becomes a directive carrying the error."""
    items: list[_Token | _Directive] = []
    for number, raw in enumerate(lines(text), start=1):
        code, comment = _split_comment(raw)
        try:
            items.extend(_words(code, number))
        except _Syntax as exc:
            items.append(_Directive(number, "", [], str(exc)))
        if comment is None:
            continue
        body = comment.strip()
        if not body.lower().startswith(PREFIX):
            continue
        # a remark after the directive (`#sendooway:tls  # STARTTLS`) is not a
        # value: a `#` starting a word, outside quotes (`pass s3cr#et` keeps it)
        rest = _cut_remark(body[len(PREFIX):])
        keyword, _, values = rest.partition(" ")
        if "\t" in keyword:
            keyword, _, more = keyword.partition("\t")
            values = more + " " + values
        try:
            words = [t.text for t in _words(values, number)]
            items.append(_Directive(number, keyword.strip().lower(), words))
        except _Syntax as exc:
            items.append(_Directive(number, keyword.strip().lower(), [], str(exc)))
    return items


@dataclass
class _Pending:
    """The account being described, between two #sendooway:address lines."""

    first_line: int = 0
    values: dict[str, str] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    fm_user: str | None = None
    fm_pass: str | None = None


def parse_fetchmailrc(text: str, filename: str) -> ParseResult:
    """All accounts in one fetchmailrc; each broken account is skipped with
    an error naming file:line."""
    result = ParseResult()
    items = _lex(text)
    acc = _Pending()
    i = 0

    def err(line: int, message: str) -> None:
        acc.errors.append(f"{filename}:{line}: {message}")
        if not acc.first_line:
            acc.first_line = line

    closed: _Pending | None = None  # the account the item before closed, if one did
    word = ""  # the last fetchmail word read
    while i < len(items):
        item = items[i]
        i += 1
        previous, closed = closed, None
        if isinstance(item, _Directive):
            if item.error:
                err(item.line, f"#sendooway:{item.keyword}: {item.error}" if item.keyword
                    else item.error)
                if item.keyword == "address":  # it still ends this (broken) account
                    result.errors.extend(acc.errors)
                    acc = _Pending()
                continue
            if item.keyword == "address" and previous is not None:
                # straight after another address: one more address of that account
                if previous.errors:
                    result.errors.append(f"{filename}:{item.line}: #sendooway:address adds"
                                         " to the account above, which has errors")
                else:
                    _close(_alias(previous), item, filename, result)
                closed = previous
                continue
            if not acc.first_line:
                acc.first_line = item.line
            if item.keyword == "address":
                _close(acc, item, filename, result)
                closed, acc = acc, _Pending()
            else:
                _directive(acc, item, err)
            continue
        previous_word, word = word, item.text.lower() if not item.quoted else ""
        if word in _BLOCK_WORDS:
            acc.fm_user = acc.fm_pass = None
            if word != "defaults" and i < len(items) and isinstance(items[i], _Token):
                i += 1  # the host name
        elif word in _VALUE_WORDS and not (word == "envelope" and previous_word == "no"):
            if i < len(items) and isinstance(items[i], _Token):
                i += 1  # its value, whatever word it is (`no envelope` has none)
        elif word in _USER_WORDS or word in _PASS_WORDS:
            if i < len(items) and isinstance(items[i], _Token):
                value = items[i].text
                i += 1
                if word in _USER_WORDS:
                    acc.fm_user, acc.fm_pass = value, None
                else:
                    acc.fm_pass = value
            else:
                err(item.line, f"'{word}' needs a value")
    if acc.values or acc.flags or acc.errors:
        line = acc.first_line or 0
        result.errors.extend(acc.errors)
        result.warnings.append(
            f"{filename}:{line}: #sendooway: lines after the last #sendooway:address are"
            " ignored (an account ends with #sendooway:address)")
    return result


def _alias(acc: _Pending) -> _Pending:
    """The account `acc` described, afresh, for one more of its addresses."""
    return _Pending(acc.first_line, dict(acc.values), dict(acc.flags), [], acc.fm_user,
                    acc.fm_pass)


def _directive(acc: _Pending, d: _Directive, err) -> None:
    key = d.keyword
    if key in _FLAGS:
        name = _FLAGS[key]
        if not d.values:
            acc.flags[name] = True
        elif len(d.values) == 1 and d.values[0].lower() in _TRUE | _FALSE:
            acc.flags[name] = d.values[0].lower() in _TRUE
        else:
            err(d.line, f"#sendooway:{name} takes no value or one of yes/no/true/false/on/off/1/0")
        return
    if key == "port":
        try:
            if len(d.values) != 1:
                raise ValueError("needs a number from 1 to 65535 or a service name")
            acc.values["port"] = str(port_number(d.values[0]))
        except ValueError as exc:
            err(d.line, f"#sendooway:port {exc}".replace("port port", "port"))
        return
    if key in _STRINGS:
        name = _STRINGS[key]
        if len(d.values) != 1:
            err(d.line, f"#sendooway:{key} needs exactly one value")  # never the value itself
        else:
            acc.values[name] = d.values[0]
        return
    # its leading letters only: a mistyped "pass=SECRET" must not be shown
    m = re.match(r"[a-z0-9_]{1,40}", key)
    shown = (m.group(0) if m else "") + ("..." if not m or len(m.group(0)) < len(key) else "")
    err(d.line, f"unknown keyword '#sendooway:{shown}'")


def _close(acc: _Pending, d: _Directive, filename: str, result: ParseResult) -> None:
    def err(line: int, message: str) -> None:
        acc.errors.append(f"{filename}:{line}: {message}")

    if len(d.values) != 1:
        err(d.line, "#sendooway:address needs exactly one address")
    else:
        try:
            check_pattern(d.values[0])
        except ValueError as exc:
            err(d.line, f"#sendooway:address: {exc}")
    server = acc.values.get("server", "")
    if not server:
        err(d.line, "account has no #sendooway:server")
    tls = acc.flags.get("tls", False)
    ssl = acc.flags.get("ssl", False)
    if tls and ssl:
        err(d.line, "#sendooway:tls and #sendooway:ssl exclude each other")
    auth = not acc.flags.get("noAuth", False)
    user = acc.values.get("user", acc.fm_user or "")
    password = acc.values.get("pass", acc.fm_pass)
    if auth and not user:
        err(d.line, "account has no upstream user (#sendooway:user or fetchmail's user)")
    if auth and password is None:
        err(d.line, "account has no upstream password (#sendooway:pass or fetchmail's pass)")
    if acc.errors:
        result.errors.extend(acc.errors)
        return
    mode = TlsMode.TLS if ssl else TlsMode.STARTTLS if tls else TlsMode.PLAIN
    port = int(acc.values["port"]) if "port" in acc.values else DEFAULT_PORTS[mode]
    route = Route(
        server=server, port=port, tls=mode,
        cert_check=not acc.flags.get("noCertCheck", False),
        user=user if auth else "", password=Secret((password or "") if auth else ""),
        auth=auth, source=f"{filename}:{d.line}",
    )
    result.accounts.append(Account((d.values[0],), route))
