"""getmail rc files: the `[sender]` section names the upstream.

    [retriever]
    type = SimplePOP3SSLRetriever
    server = pop.example.org
    username = alice
    password = secret

    [sender]
    # or SimpleSMTPSender (port 25), SimpleSMTPSSLSender (465)
    type = SimpleSMTPTLSSender
    # server, port, username, password: default the retriever's, the type's;
    # an empty username means no AUTH (an empty [retriever] one is an error)
    server = smtp.example.org
    port = 587
    # at least one; more on the lines below it, indented (or after commas)
    address = alice@example.org
        alice.smith@example.org
    no_certificate_check = false

(No remark after a value: ConfigParser, and getmail with it, would read it
as part of the value.) A file is one account: any error skips the whole
file (with file:line). A file without a [sender] section is one getmail
alone uses (to fetch mail): it gives no account and no error. Unknown
[sender] keys are warned about and ignored; a repeated key other than
`address` counts with its first value (both as in the original). A user
name or password getmail would take from elsewhere (password_command, the
keyring or terminal, ~/.netrc with use_netrc, an OAuth token or Kerberos
ticket with use_xoauth2 or use_kerberos) is an error: give it in [sender].

The text comes decoded with surrogateescape: comment lines, and values
sendooway does not use (a Maildir path), may hold octets that are not
UTF-8 (a Latin-1 "# für Büro"); a value it uses is an error at its line.
"""

from __future__ import annotations

import difflib
import re

from sendooway_shared.types import DEFAULT_PORTS, Route, Secret, TlsMode, port_number

from ._accounts import Account, ParseResult, field_problem
from ._address import check_pattern

SENDER_TYPES = {
    "simplesmtpsender": TlsMode.PLAIN,
    "simplesmtptlssender": TlsMode.STARTTLS,
    "simplesmtpsslsender": TlsMode.TLS,
}
_SENDER_KEYS = {"type", "server", "port", "username", "password", "address",
                "no_certificate_check"}
_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def _lines(text: str) -> list[str]:
    """Lines as getmail reads them: its file is opened in text mode, whose
    universal newlines end a line at LF, CRLF or a lone CR (a CR inside a
    password line made sendooway send "ab\\r  cd" where getmail sent
    "ab\\ncd"); no other character ends one."""
    out = re.split(r"\r\n|\r|\n", text)
    if out and out[-1] == "":
        out.pop()
    return out


class _IniError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def _read_ini(text: str, headers: dict[str, int] | None = None,
              pieces: dict[int, list[int]] | None = None
              ) -> dict[str, dict[str, list[tuple[int, str]]]]:
    """Sections → lower-cased keys → [(line, value)...], in file order;
    `headers` gets each section header's line, `pieces` the line of each
    line of a value (by the key's line: comment lines are left out of it).
    ConfigParser's syntax: `key = value` or `key: value`, `#`/`;` comment
    lines, continuation lines (indented deeper than their key: keys indented
    alike are keys, as Python 3's configparser, which getmail6 uses, reads
    them)."""
    sections: dict[str, dict[str, list[tuple[int, list[str]]]]] = {}
    current: dict[str, list[tuple[int, list[str]]]] | None = None
    last: list[str] | None = None  # the pieces of the value being read
    last_lines: list[int] = []     # their lines
    blanks: list[int] = []         # blank lines since, kept if the value goes on
    indent = 0  # of its key
    for number, raw in enumerate(_lines(text), start=1):
        stripped = raw.strip()
        if not stripped:
            blanks.append(number)  # configparser: a value may go on after one
            continue
        if stripped[0] in "#;":
            continue
        depth = len(raw) - len(raw.lstrip())
        if last is not None and depth > indent:
            for blank in blanks:
                last.append("")
                last_lines.append(blank)
            blanks = []
            last.append(stripped)  # joined once at the end: linear in the file
            last_lines.append(number)
            continue
        blanks = []
        close = stripped.rfind("]") if stripped.startswith("[") else -1
        if close >= 2:
            # ConfigParser's rule: the name runs to the last ']' of the line,
            # whatever follows it (`[sender]  # for sendooway`) is ignored;
            # blanks inside are kept (`[ retriever]` is a section getmail
            # never reads: its values were taken). Without a name and a ']'
            # the line is a key (`[note = x`), as getmail reads it
            name = stripped[1:close]
            current = sections.setdefault(name, {})
            if headers is not None:
                headers.setdefault(name, number)
            last = None
            blanks = []
            continue
        if stripped.startswith("[") and "=" not in stripped and ":" not in stripped:
            raise _IniError(number, "malformed section header (not an INI file?)")
        if current is None:
            raise _IniError(number, "text before the first [section] (not an INI file?)")
        cut = min((p for p in (raw.find("="), raw.find(":")) if p >= 0), default=-1)
        if cut <= 0 or not raw[:cut].strip():
            raise _IniError(number, "expected 'key = value' (not an INI file?)")
        key = raw[:cut].strip().lower()
        last = [raw[cut + 1:].strip()]
        last_lines = [number]
        if pieces is not None:
            pieces[number] = last_lines
        indent = depth
        current.setdefault(key, []).append((number, last))
    return {name: {key: [(line, "\n".join(pieces)) for line, pieces in values]
                   for key, values in section.items()}
            for name, section in sections.items()}


def _is_text(value: str) -> bool:
    """No octet that was not UTF-8 (they are surrogates here): such a value
    could not be sent, nor compared with a sender, as written."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _one(section: dict[str, list[tuple[int, str]]], key: str) -> tuple[int, str] | None:
    """A key's value; when repeated, the first one counts (as in the original)."""
    values = section.get(key)
    return values[0] if values else None


def parse_getmailrc(text: str, filename: str) -> ParseResult:
    """The one account a getmail rc file describes, or an error."""
    result = ParseResult()
    try:
        headers: dict[str, int] = {}
        pieces: dict[int, list[int]] = {}
        sections = _read_ini(text, headers, pieces)
    except _IniError as exc:
        result.errors.append(f"{filename}:{exc.line}: {exc}")
        return result
    # [sender] is read by sendooway alone: its name is matched without case
    # (as the original did); getmail's own sections keep ConfigParser's rule
    named = [name for name in sections if name.strip().lower() == "sender"]
    if not named:
        return result  # getmail's own file, for fetching only: nothing to send with
    if len(named) > 1:
        result.errors.append(f"{filename}: more than one [sender] section"
                             f" ({', '.join('[' + n[:20] + ']' for n in named)})")
        return result
    sender = sections[named[0]]
    retriever = sections.get("retriever", {})
    header_line = headers.get(named[0], 1)

    def fail(line: int | None, message: str, section: str = "sender") -> ParseResult:
        result.errors.append(f"{filename}:{line or header_line}: [{section}] {message}")
        return result

    def not_text(key: str, given: tuple[int, str] | None) -> ParseResult | None:
        """The error when a value sendooway uses is not UTF-8, at the line
        of the piece that is not (the value may run over lines)."""
        if given is None or _is_text(given[1]):
            return None
        where = "sender" if given in sender.get(key, ()) else "retriever"
        rows = pieces.get(given[0], [given[0]])
        line = next((n for n, piece in zip(rows, given[1].split("\n")) if not _is_text(piece)),
                    given[0])
        result.errors.append(f"{filename}:{line}: [{where}] {key}: not valid UTF-8 (only"
                             " comment lines may hold other octets)")
        return result

    for key, values in sender.items():
        if key not in _SENDER_KEYS:
            # its first word only: `password s3cr=t` (the `=` forgotten after
            # the key) makes "password s3cr" the key
            shown = "".join(c for c in key.split()[0][:40] if c.isprintable())
            # and only a near miss of a key (`adress`): a line of its own
            # may be the password (`password =` and below it `c2VjcmV0=`)
            said = (f"'{shown}'" if difflib.get_close_matches(shown, _SENDER_KEYS, n=1, cutoff=0.7)
                    else "(the line is not shown)")
            result.warnings.append(f"{filename}:{values[0][0]}: [sender] unknown key {said}"
                                   " ignored")
    kind = _one(sender, "type")
    if kind is None:
        return fail(None, "type is required (SimpleSMTPSender, SimpleSMTPTLSSender"
                          " or SimpleSMTPSSLSender)")
    if (failed := not_text("type", kind)) is not None:
        return failed
    mode = SENDER_TYPES.get(kind[1].lower())
    if mode is None:
        # its first line only, cut short: a line indented below `type` by
        # mistake continues it, and may be the password
        return fail(kind[0], f"unknown type {kind[1].split(chr(10))[0][:40]!r} (SimpleSMTPSender,"
                             " SimpleSMTPTLSSender or SimpleSMTPSSLSender)")
    server = _one(sender, "server") or _one(retriever, "server")
    if (failed := not_text("server", server)) is not None:
        return failed
    if server is None or not server[1]:
        return fail(None, "no server (neither [sender] nor [retriever] names one)")
    port = DEFAULT_PORTS[mode]
    if (given := _one(sender, "port")) is not None:
        if (failed := not_text("port", given)) is not None:
            return failed
        try:
            port = port_number(given[1])
        except ValueError:
            # not the value: a password typed into the wrong line
            return fail(given[0], "port must be a number from 1 to 65535 or a service name")
    cert_check = True
    if (given := _one(sender, "no_certificate_check")) is not None:
        if (failed := not_text("no_certificate_check", given)) is not None:
            return failed
        v = given[1].lower()
        if v not in _TRUE | _FALSE:
            return fail(given[0], "no_certificate_check must be true or false")
        cert_check = v in _FALSE
    username = _one(sender, "username") or _one(retriever, "username")
    if username is None:
        return fail(None, "no username (neither [sender] nor [retriever];"
                          " an empty [sender] username means no AUTH)")
    if (failed := not_text("username", username)) is not None:
        return failed
    if username[1] == "" and "username" not in sender:
        # getmail logs in with the empty name; only the user's own empty
        # [sender] username says "no AUTH" (as fetchmail's `user ""` is no user)
        return fail(username[0], "no username: the [retriever] one is empty (getmail logs in"
                                 " with an empty name); give one in [sender] (an empty"
                                 " [sender] username means no AUTH)")
    auth = username[1] != ""
    password = _one(sender, "password") or _one(retriever, "password")
    if auth and (failed := not_text("password", password)) is not None:
        return failed
    # getmail's use_netrc ([options], or [DEFAULT], which it reads the
    # options with) logs in with ~/.netrc's name and password over the
    # [retriever] ones: sendooway does not read that file. It asks
    # has_option('options', ...): without an [options] section, never
    for where in ("options", "DEFAULT") if "options" in sections else ():
        netrc = _one(sections.get(where, {}), "use_netrc")
        if netrc is None:
            continue
        if netrc[1].lower() in _TRUE and (
                "username" not in sender or auth and "password" not in sender):
            return fail(netrc[0], "use_netrc: getmail logs in with ~/.netrc's user name and"
                                  " password, which sendooway does not read: give username and"
                                  " password in [sender]", where)
        break
    # an IMAP retriever's OAuth or Kerberos login: getmail sends a token
    # (password_command, keyring, prompt) or a ticket, never this password
    for flag in ("use_xoauth2", "use_kerberos"):
        given = _one(retriever, flag)
        if (auth and given is not None and given[1].lower() in _TRUE and password is not None
                and "password" not in sender):
            return fail(given[0], f"{flag}: getmail does not log in with the [retriever]"
                                  " password then: give the password in [sender]", "retriever")
    if auth and password is None:
        return fail(None, "no password (neither [sender] nor [retriever] has one;"
                          " password_command is not supported)")
    if (problem := field_problem(server[1], username[1])) is not None:
        return fail(server[0], problem)
    # one address per line of a value, or several after one another: the
    # form getmail6 can read too (its strict parser stops at a repeated
    # key, and getmail with it); a repeated key is taken as well
    addresses = [(pieces.get(line, [])[k] if k < len(pieces.get(line, [])) else line, one.strip())
                 for line, value in sender.get("address", [])
                 for k, piece in enumerate(value.split("\n"))
                 for one in piece.split(",") if one.strip()]
    if not addresses:
        return fail(None, "at least one 'address' is required")
    for line, address in addresses:
        if not _is_text(address):
            return fail(line, "address: not valid UTF-8 (only comment lines may hold other"
                              " octets)")
        try:
            check_pattern(address)
        except ValueError as exc:
            return fail(line, f"address: {exc}")
    route = Route(
        server=server[1], port=port, tls=mode, cert_check=cert_check,
        user=username[1] if auth else "",
        password=Secret(password[1] if auth and password else ""),
        auth=auth, source=f"{filename}:{addresses[0][0]}",
    )
    result.accounts.append(Account(tuple(a for _, a in addresses), route))
    return result
