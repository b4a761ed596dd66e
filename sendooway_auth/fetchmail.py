"""~/.fetchmailrc: fetchmail's own account lines plus `#sendooway:` comments.

An account is closed by `#sendooway:address "A"`; the `#sendooway:` lines
before it (since the previous account) describe its upstream, and a missing
`#sendooway:user`/`#sendooway:pass` falls back to fetchmail's `user` and
`pass`/`password` given since then in the current `poll`/`skip`/`server`
block. Nothing is carried from one account into the next. Quoting and
escapes follow fetchmail's lexer: '...' or "..." (no escape for the quote
itself) with \\n \\t \\r \\b \\xHH \\0oo \\nnn and backslash-anything-else
standing for itself; a word that runs on past a closing quote is one word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sendooway_shared.types import DEFAULT_PORTS, Route, Secret, TlsMode, port_number

from ._accounts import Account, ParseResult, field_problem
from ._address import check_pattern

PREFIX = "sendooway:"
_SEPARATORS = ",;:"
_BLOCK_WORDS = {"poll", "skip", "server", "defaults"}
_USER_WORDS = {"user", "username"}
# fetchmail options whose value is one word that could be read as a keyword
# here (`auth password` is "log in with a password", not a password)
_VALUE_WORDS = {"auth", "authenticate", "preauth", "preauthenticate", "proto", "protocol", "via", "port", "service",
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
_KNOWN = frozenset(_FLAGS) | frozenset(_STRINGS) | {"port"}


class _Syntax(Exception):
    pass


@dataclass
class _Token:
    line: int
    text: str
    quoted: bool = False
    error: str = ""  # why the value cannot be used (not UTF-8): said where it is used
    equals: str = ""  # a bare word with fetchmail's `=` in it: "in", or "end" (`a=`)


@dataclass
class _Directive:
    line: int
    keyword: str
    values: list[str]
    error: str = ""


_SIMPLE_ESCAPES = {"n": 10, "t": 9, "r": 13, "b": 8}


def _unescape(body: str, fetchmail: bool = True) -> str:
    """fetchmail's backslash escapes (fetchmail(1), its lexer's escapes()):
    \\n \\t \\r \\b; \\xhh hex (two digits at most); \\0oo octal (the 0 and two
    more at most); \\nnn decimal, starting 1-9 (three digits at most: \\233 is
    \\xE9); a backslash before anything else keeps that character. Each escape
    is one byte, as fetchmail sends it: `caf\\xc3\\xa9` is "café". An escape
    that makes the octet 0 (\\0, \\x00, \\x with no hex digit, \\256) ends
    the value there, and a backslash at its very end is dropped: fetchmail
    keeps C strings, and logs in with what comes before. Raises
    _Syntax when the bytes are not UTF-8 (they could not be sent as written).
    `fetchmail=False`: a #sendooway: value, read as the original read it:
    \\ooo is octal (three digits at most), \\8 and \\9 the digit."""
    if "\\" not in body:
        if not _is_text(body):
            raise _Syntax("not valid UTF-8")
        return body
    out = bytearray()
    i = 0
    size = len(body)

    def digits(start: int, allowed: str, most: int) -> int:
        j = start
        while j < size and j < start + most and body[j] in allowed:
            j += 1
        return j

    while i < size:
        c = body[i]
        if c != "\\" or i + 1 == size:
            if c == "\\" and fetchmail:
                break  # a backslash at the end: fetchmail drops it
            out += c.encode("utf-8", "surrogateescape")  # (octets not UTF-8 stay octets)
            i += 1
            continue
        n = body[i + 1]
        octet = -1
        if n == "\n" and fetchmail:
            i += 2  # a backslash before a line end joins the lines
        elif n in _SIMPLE_ESCAPES:
            octet = _SIMPLE_ESCAPES[n]
            i += 2
        elif n in "xX" and ((j := digits(i + 2, "0123456789abcdefABCDEF", 2)) > i + 2
                            or fetchmail):
            octet = int(body[i + 2:j] or "0", 16)
            i = j
        elif n == "0" or (n in "1234567" and not fetchmail):
            j = digits(i + 1, "01234567", 3)
            octet = int(body[i + 1:j], 8) & 0xFF
            i = j
        elif n in "123456789" and fetchmail:
            j = digits(i + 1, "0123456789", 3)
            octet = int(body[i + 1:j]) & 0xFF
            i = j
        else:
            out += n.encode("utf-8", "surrogateescape")
            i += 2
        if octet == 0 and fetchmail:
            break  # the end of fetchmail's C string: what follows is never sent
        if octet >= 0:
            out.append(octet)
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise _Syntax("not valid UTF-8 (after its backslash escapes): sendooway cannot"
                      " send such a value") from None


def _is_text(value: str) -> bool:
    """No octet that was not UTF-8 (the file is read with surrogateescape:
    a remark may hold Latin-1, as fetchmail reads bytes; a value may not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# fetchmail's own lines, token by token over the whole text (as its lexer,
# rcfile_l.l, reads them): separators (skipped), a "..." or '...' string
# (up to the next such quote: a backslash does not escape it; it may run
# over line ends, but not into a line that starts with a remark, so a
# forgotten closing quote does not swallow the #sendooway: lines below it),
# a remark (a `#` where a token starts; group 3), a bare word (a quote or
# `#` inside it is part of it), or a quote that never closes (group 5).
# The separators are fetchmail's own: space, tab, CR, LF and , ; : (a
# no-break space is part of a word, as fetchmail reads it); the possessive
# quantifiers keep no backtracking state (a 1 MiB unclosed quote would
# otherwise cost over 100 MiB to fail). fetchmail's lexer takes the longest
# match: where its bare word (_FM_WORD: up to a blank, , ; : or =) runs on
# past the closing quote, the whole is one bare word, quotes and all
# (`"abc"def`, `'it''s'`, `"a\"b"`); and a quote that closes nowhere in the
# rest of the file starts a bare word (`'abc`).
# A backslash before a line end, where a token would start, joins the lines
# (it is no word: `pass \\<LF>secret` is secret).
_TOKENS = re.compile(r"(?:[ \t\r\n,;:]|\\\n)++"
                     r'|"((?:[^"\\\n]++|\\\n|\\|\n(?![ \t\r]*+#))*+)"'
                     r"|'((?:[^'\\\n]++|\\\n|\\|\n(?![ \t\r]*+#))*+)'"
                     r"""|#([^\n]*+)|([^ \t\r\n,;:"'#][^ \t\r\n,;:]*+)|(["'])""", re.S)
_QUOTED_1, _QUOTED_2, _REMARK, _BARE, _UNCLOSED = 1, 2, 3, 4, 5
_FM_WORD = re.compile(r"[^=;:, \t\r\n]++")
_WORD = re.compile(r"[^ \t\r\n,;:]++")  # sendooway's bare word (`=` in it: `pass abc=def`)
# A #sendooway: value: a quoted string, or one word up to the next blank, as
# the original read it (`#sendooway:pass My;Pass-77` is one value; no
# escapes in a bare word).
_VALUES = re.compile(r"""\s++|"((?:[^"\\]++|\\.)*+)"|'((?:[^'\\]++|\\.)*+)'"""
                     r"""|([^\s"'][^\s]*+)|(["'])""", re.S)


def _ends_in_backslash(body: str) -> bool:
    """The body of a quoted string ends in an odd run of backslashes."""
    return (len(body) - len(body.rstrip("\\"))) % 2 == 1


def _directive_words(text: str) -> list[str]:
    words = []
    for m in _VALUES.finditer(text):
        group = m.lastindex
        if group is None:
            continue
        if group == 4:
            raise _Syntax("unbalanced quote")
        words.append(m[group] if group == 3 else _unescape(m[group], fetchmail=False))
    return words


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
        elif c == "#" and (i == 0 or after_quote or text[i - 1] in " \t\r\n"
                           or text[i - 1] in _SEPARATORS):
            return i
        after_quote = False
        i += 1
    return -1


def _cut_remark(text: str) -> str:
    """`text` up to its remark (see _remark_at)."""
    at = _remark_at(text)
    return text if at < 0 else text[:at]


def _lex(text: str) -> list[_Token | _Directive]:
    """Tokens of the fetchmail lines and the #sendooway: directives, in order;
    a line that cannot be split becomes a directive carrying the error (and
    the rest of that line is skipped)."""
    text = text.replace("\r\n", "\n")
    items: list[_Token | _Directive] = []
    line = 1
    pos = 0
    size = len(text)
    match = _TOKENS.match
    while pos < size:
        m = match(text, pos)
        assert m is not None  # every position starts one of the alternatives
        group = m.lastindex
        if group in (_QUOTED_1, _QUOTED_2, _UNCLOSED):
            word = _FM_WORD.match(text, pos)
            if (word is not None and word.end() > m.end()) and (
                    group != _UNCLOSED or text.find(text[pos], pos + 1) < 0):
                m, group = _WORD.match(text, pos), _BARE  # fetchmail's longest match
        if group == _UNCLOSED:
            items.append(_Directive(line, "", [], "unbalanced quote"))
            end = text.find("\n", pos)
            pos = size if end < 0 else end
            continue
        pos = m.end()
        if group in (_QUOTED_1, _QUOTED_2) and _ends_in_backslash(m[group]):
            # fetchmail ends the string at that quote and drops the backslash
            # (`"abc\"` is abc): surely a quote meant to be escaped, and cut
            items.append(_Token(line, "", True, "a backslash before the closing quote"
                                " (fetchmail does not read it as an escape; write"
                                " \\x22 for \" and \\x27 for ')"))
        elif group in (_BARE, _QUOTED_1, _QUOTED_2):
            try:
                if group == _BARE:
                    raw = m[0]
                    items.append(_Token(line, _unescape(raw), equals="" if "=" not in raw
                                        else "end" if raw.endswith("=") else "in"))
                else:
                    items.append(_Token(line, _unescape(m[group]), True))
            except _Syntax as exc:
                # an error only where sendooway uses the value (user, pass):
                # an mda command's Latin-1 path is fetchmail's business
                items.append(_Token(line, "", group != _BARE, str(exc)))
        elif group == _REMARK:
            if not _is_text(m[group]):
                if m[group][:len(PREFIX)].lower() == PREFIX:
                    items.append(_Directive(line, "", [], "not valid UTF-8"))
                line += m[0].count("\n")
                continue  # (an ordinary remark: fetchmail ignores its bytes too)
            items.extend(_directives(line, m[group]))
        line += m[0].count("\n")
    return items


def _directives(line: int, comment: str) -> list[_Directive]:
    """The directives of one remark: none (an ordinary remark), one, or more
    when a `#sendooway:` follows another on its line (`#sendooway:server
    "a.org" #sendooway:port 2525`), which the original read as two; the
    second was taken for a remark and silently lost (an outside review)."""
    found: list[_Directive] = []
    while len(found) < 16:
        directive = _directive(line, comment)
        if directive is None:
            break
        if found and directive.keyword not in _KNOWN:
            # a remark after a directive that only looks like one
            # (`#sendooway: the work server`): prose, as it always was
            break
        found.append(directive)
        body = comment.strip()[len(PREFIX):]
        at = _remark_at(body)
        if at < 0:
            break
        comment = body[at + 1:]
    return found


def _directive(line: int, comment: str) -> _Directive | None:
    """A `#sendooway:` remark as a directive (None: an ordinary remark)."""
    # right after the `#`, as the original read it: `# sendooway: ...` is
    # prose, or a directive its user turned off (a review: it was obeyed)
    if not comment[:len(PREFIX)].lower() == PREFIX:
        return None
    body = comment.strip()
    # a remark after the directive (`#sendooway:tls  # STARTTLS`) is not a
    # value: a `#` starting a word, outside quotes (`pass s3cr#et` keeps it)
    rest = _cut_remark(body[len(PREFIX):])
    keyword, _, values = rest.partition(" ")
    if "\t" in keyword:
        keyword, _, more = keyword.partition("\t")
        values = more + " " + values
    keyword = keyword.strip().lower()
    try:
        return _Directive(line, keyword, _directive_words(values))
    except _Syntax as exc:
        return _Directive(line, keyword, [], str(exc))


@dataclass
class _Pending:
    """The account being described, between two #sendooway:address lines."""

    first_line: int = 0
    values: dict[str, str] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    fm_user: str | None = None
    fm_pass: str | None = None
    lines: dict[str, int] = field(default_factory=dict)  # where each value was given


def parse_fetchmailrc(text: str, filename: str, login: str = "") -> ParseResult:
    """All accounts in one fetchmailrc; each broken account is skipped with
    an error naming file:line. `login`: the user's login name, fetchmail's
    own default for a poll that gives a password but no `user`."""
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
    # a `defaults` block's user and password are every later poll's until
    # that poll names its own (fetchmail's defaults, --configdump shows them)
    in_defaults = False
    default_user: str | None = None
    default_pass: str | None = None
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
                    _close(_alias(previous), item, filename, result, login)
                closed = previous
                continue
            if not acc.first_line:
                acc.first_line = item.line
            if item.keyword == "address":
                _close(acc, item, filename, result, login)
                closed, acc = acc, _Pending()
            else:
                _apply(acc, item, err)
            continue
        previous_word, word = word, item.text.lower() if not item.quoted else ""
        if word in _BLOCK_WORDS:
            in_defaults = word == "defaults"
            if in_defaults:
                default_user = default_pass = None
                acc.fm_user = acc.fm_pass = None
            else:
                acc.fm_user, acc.fm_pass = default_user, default_pass
            if word != "defaults" and i < len(items) and isinstance(items[i], _Token):
                i += 1  # the host name
        elif word in _VALUE_WORDS and not (word == "envelope" and previous_word == "no"):
            if i < len(items) and isinstance(items[i], _Token):
                i += 1  # its value, whatever word it is (`no envelope` has none)
        elif word in ("is", "to", "=") and i < len(items) and isinstance(items[i], _Token):
            # fetchmail reads the word after `is`, `to` or `=` as a name,
            # whatever word it is (`is user here`: the local user "user").
            # `is REMOTE there` among the user's options, wherever it stands,
            # with or without a `user` word before it (fetchmail's
            # user_option): the name fetchmail logs in with
            if items[i].equals:
                # `is LOCAL=OTHER`, `is LOCAL= OTHER`: a mapping of local
                # names to fetchmail (its `=` is a token of its own)
                i += 2 if items[i].equals == "end" else 1
            elif word != "=" and _plain_word(items, there := _skip_noise(items, i + 1)) == "there":
                if items[i].error:
                    err(items[i].line, f"'is ... there': {items[i].error}")
                else:
                    acc.fm_user = items[i].text
                    if in_defaults:
                        default_user = acc.fm_user
                i = there + 1
            else:
                i += 1
        elif word in _USER_WORDS or word in _PASS_WORDS:
            if not (i < len(items) and isinstance(items[i], _Token)):
                err(item.line, f"'{word}' needs a value")
                continue
            value = items[i]
            i += 1
            if word in _USER_WORDS and (after := _local_names_end(items, i)) >= 0:
                # `user NAME... here`: local names (fetchmail's mapping_list
                # HERE); the remote name stays unset: the defaults', else the
                # login name (`is REMOTE there` may still follow)
                i = after
                acc.fm_user = None if in_defaults else default_user
                acc.fm_pass = None if in_defaults else default_pass
            elif value.error:
                err(value.line, f"'{word}': {value.error}")
            elif word in _USER_WORDS:
                # a new user: its own password follows, or the defaults'
                # (fetchmail fills each field from the defaults alone)
                acc.fm_user, acc.fm_pass = value.text, None if in_defaults else default_pass
            else:
                acc.fm_pass = value.text
            if in_defaults:
                default_user, default_pass = acc.fm_user, acc.fm_pass
    if acc.values or acc.flags or acc.errors:
        line = acc.first_line or 0
        result.errors.extend(acc.errors)
        result.warnings.append(
            f"{filename}:{line}: #sendooway: lines after the last #sendooway:address are"
            " ignored (an account ends with #sendooway:address)")
    return result


def _plain_word(items: list, i: int) -> str:
    item = items[i] if i < len(items) else None
    return item.text.lower() if isinstance(item, _Token) and not item.quoted else ""


# fetchmail's keywords (rcfile_l.l), which end a list of local names; the
# noise words (with, and, has, wants, options) are skipped by its lexer
_FM_KEYWORDS = frozenset("""
    set logfile idfile pidfile daemon syslog invisible showdots postmaster bouncemail
    spambounce softbounce warnings tracepolls defaults server poll skip via aka local
    localdomains proto protocol service port interval preauth preauthenticate auth
    authenticate timeout idletimeout envelope qvirtual principal esmtpname esmtppassword
    bad-header accept reject user username pass password folder folders smtp smtphost
    fetchdomains smtpaddress smtpname antispam mda bsmtp lmtp pre preconnect post
    postconnect interface monitor plugin plugout batchlimit fetchlimit fetchsizelimit
    fastuidl expunge properties is here there to no keep flush limitflush fetchall rewrite
    forcecr stripcr pass8 pass8bits dropstatus dropdelivered mimedec mimedecode idle
    forceidle dns uidl ssl sslkey sslcert sslproto sslcertck sslcertfile sslcertpath
    sslcommonname sslfingerprint checkalias limit auto pop2 sdps pop3 imap apop rpop etrn
    odmr kpop""".split())
_NOISE = frozenset({"with", "and", "has", "wants", "options"})


def _skip_noise(items: list, i: int) -> int:
    """The first item from i on that is not one of fetchmail's noise words
    (its lexer drops them where it expects a keyword: `is R and there`)."""
    while _plain_word(items, i) in _NOISE:
        i += 1
    return i


def _local_names_end(items: list, i: int) -> int:
    """After `user NAME` (items[i] is what follows): where the user's options
    go on when NAME, with any more names after it, is followed by `here`
    (fetchmail's `user mapping_list here`: local names, not the one it
    logs in with); -1 when NAME is the remote name."""
    j = i
    while j < min(len(items), i + 64):
        item = items[j]
        word = _plain_word(items, j)
        if word == "here":
            return j + 1
        if not isinstance(item, _Token) or word in _FM_KEYWORDS:
            return -1
        # after fetchmail's `=` (`local=other`, `local =`) comes a name,
        # whatever word it is
        j += 2 if item.equals == "end" else 1
    return -1


def _alias(acc: _Pending) -> _Pending:
    """The account `acc` described, afresh, for one more of its addresses."""
    return _Pending(acc.first_line, dict(acc.values), dict(acc.flags), [], acc.fm_user,
                    acc.fm_pass, dict(acc.lines))


def _apply(acc: _Pending, d: _Directive, err) -> None:
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
                raise ValueError
            acc.values["port"] = str(port_number(d.values[0]))
        except ValueError:
            # never the value: a password typed into the wrong line
            err(d.line, "#sendooway:port must be a number from 1 to 65535 or a service name")
        return
    if key in _STRINGS:
        name = _STRINGS[key]
        if len(d.values) != 1:
            err(d.line, f"#sendooway:{key} needs exactly one value")  # never the value itself
        else:
            acc.values[name] = d.values[0]
            acc.lines[name] = d.line
        return
    # its leading letters only: a mistyped "pass=SECRET" must not be shown
    m = re.match(r"[a-z0-9_]{1,40}", key)
    shown = (m.group(0) if m else "") + ("..." if not m or len(m.group(0)) < len(key) else "")
    err(d.line, f"unknown keyword '#sendooway:{shown}'")


def _close(acc: _Pending, d: _Directive, filename: str, result: ParseResult,
           login: str = "") -> None:
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
    # fetchmail logs in as the login name when its poll gives no user; an
    # empty `user ""` is an empty name to it (an error here, not the login)
    fm_user = acc.fm_user if acc.fm_user is not None else (
        login if acc.fm_pass is not None else "")
    user = acc.values.get("user", fm_user)
    password = acc.values.get("pass", acc.fm_pass)
    if auth and not user:
        err(d.line, "account has no upstream user (#sendooway:user or fetchmail's user)")
    if auth and password is None:
        err(d.line, "account has no upstream password (#sendooway:pass or fetchmail's pass)")
    # (a missing server is said once above, not again as an empty host name)
    # (at the line that gave the value at fault, when a #sendooway: line did)
    if server and (problem := field_problem(server, "")) is not None:
        err(acc.lines.get("server", d.line), problem)
    elif server and (problem := field_problem(server, user)) is not None:
        err(acc.lines.get("user", d.line), problem)
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
