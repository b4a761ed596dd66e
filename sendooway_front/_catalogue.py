"""Every reply the frontend itself gives, in one place.

Codes follow RFC 5321, enhanced status codes RFC 3463/2034 (and RFC 4954 for
AUTH). Handlers never build reply text of their own: they pick an entry
here, or a function of it for the few replies that carry a variable word
(the host name in the greeting and in EHLO). Replies after MAIL come from the
relay (the upstream's own) and are passed through unchanged.
"""

from __future__ import annotations

from ._reply import Reply


def _r(code: int, *lines: str) -> Reply:
    return Reply(code, lines)


# --- connection
GREETING_TEXT = "ESMTP sendooway ready"                       # 220 <host> ...
SERVICE_UNAVAILABLE = _r(421, "4.3.0 Service not available, closing connection")
AUTH_BACKEND_DOWN = _r(421, "4.3.0 Authentication service not available, closing connection")
TIMEOUT = _r(421, "4.4.2 Timeout waiting for input, closing connection")
NO_LOGIN_IN_TIME = _r(421, "4.4.2 No login in time, closing connection")
TOO_MANY_ERRORS = _r(421, "4.7.0 Too many errors, closing connection")
TOO_MANY_AUTH_FAILURES = _r(421, "4.7.0 Too many authentication failures, closing connection")
SHUTTING_DOWN = _r(421, "4.3.2 Server shutting down, closing connection")
TOO_MANY_SESSIONS = _r(421, "4.3.2 Too many connections, try again later")
ROUTE_LOOP = _r(421, "4.4.6 This connection comes from this server's own relay (routing loop)")
TOO_MANY_FROM_ADDRESS = _r(421, "4.7.0 Too many connections from your address, try again later")
NOT_SMTP = _r(421, "4.7.0 Not an SMTP command, closing connection")
TLS_ON_PLAIN_PORT = _r(421, "4.7.0 TLS handshake on a plaintext port (use STARTTLS), closing connection")
BYE = _r(221, "2.0.0 Bye")

# --- generic
OK = _r(250, "2.0.0 OK")
HELP = _r(214, "2.0.0 Commands: EHLO HELO AUTH STARTTLS MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
VRFY = _r(252, "2.5.0 Cannot VRFY user, but will try to deliver the message")
LINE_TOO_LONG = _r(500, "5.5.2 Line too long")  # (5.5.6 is AUTH's own, RFC 4954)
BARE_LF = _r(500, "5.5.2 Bare LF in command line (use CRLF)")
BARE_CR = _r(500, "5.5.2 Bare CR in command line")
NUL_IN_LINE = _r(500, "5.5.2 NUL in command line")
NOT_UTF8 = _r(500, "5.5.2 Command line is not valid UTF-8")
UNKNOWN_COMMAND = _r(502, "5.5.1 Command not implemented")
EMPTY_LINE = _r(500, "5.5.2 Syntax error: empty line")
EXPN_REFUSED = _r(502, "5.5.1 EXPN not available")
SYNTAX_NO_ARGS = _r(501, "5.5.4 Syntax error: no arguments allowed")
SYNTAX_NEEDS_ARG = _r(501, "5.5.4 Syntax error: argument required")
SYNTAX_DOMAIN = _r(501, "5.5.4 Syntax error: EHLO/HELO needs a name")

# --- sequence
NEED_AUTH = _r(530, "5.7.0 Authentication required")
NEED_MAIL = _r(503, "5.5.1 Need MAIL before RCPT")
NEED_MAIL_DATA = _r(503, "5.5.1 Need MAIL before DATA")
NO_RECIPIENTS = _r(554, "5.5.1 No valid recipients")
NESTED_MAIL = _r(503, "5.5.1 Nested MAIL command")
AUTH_TWICE = _r(503, "5.5.1 Already authenticated")
AUTH_IN_TRANSACTION = _r(503, "5.5.1 AUTH not permitted during a mail transaction")

# --- STARTTLS
READY_FOR_TLS = _r(220, "2.0.0 Ready to start TLS")
TLS_NOT_AVAILABLE = _r(454, "4.7.0 TLS not available")
TLS_ALREADY = _r(503, "5.5.1 TLS already active")
TLS_PIPELINED = _r(503, "5.5.1 STARTTLS must be the last command of a pipelined group")

# --- AUTH
AUTH_OK = _r(235, "2.7.0 Authentication successful")
AUTH_FAILED = _r(535, "5.7.8 Authentication credentials invalid")
AUTH_TEMPFAIL = _r(454, "4.7.0 Temporary authentication failure")
AUTH_CANCELLED = _r(501, "5.7.0 Authentication cancelled")
AUTH_BAD_BASE64 = _r(501, "5.5.2 Cannot decode base64 response")
AUTH_BAD_PLAIN = _r(501, "5.5.2 Malformed PLAIN response: expected authzid NUL user NUL password")
AUTH_BAD_MECH = _r(504, "5.5.4 Unrecognized authentication mechanism")
AUTH_NEEDS_TLS = _r(538, "5.7.11 Encryption required for requested authentication mechanism")
AUTH_LINE_TOO_LONG = _r(500, "5.5.6 Authentication exchange line too long")
CHALLENGE_EMPTY = _r(334, "")
CHALLENGE_USERNAME = _r(334, "VXNlcm5hbWU6")   # base64("Username:")
CHALLENGE_PASSWORD = _r(334, "UGFzc3dvcmQ6")   # base64("Password:")

# --- MAIL / RCPT
SYNTAX_MAIL = _r(501, "5.5.4 Syntax: MAIL FROM:<address> [parameters]")
SYNTAX_RCPT = _r(501, "5.5.4 Syntax: RCPT TO:<address> [parameters]")
BAD_SENDER = _r(553, "5.1.7 Invalid sender address syntax")
BAD_RECIPIENT = _r(553, "5.1.3 Invalid recipient address syntax")
UTF8_NEEDS_SMTPUTF8 = _r(553, "5.6.7 Non-ASCII address needs SMTPUTF8")
BAD_PARAMETER = _r(555, "5.5.4 Unsupported MAIL/RCPT parameter")
BAD_PARAMETER_VALUE = _r(501, "5.5.4 Malformed MAIL parameter value")
MESSAGE_TOO_BIG_DECLARED = _r(552, "5.3.4 Message size exceeds fixed maximum message size")
TOO_MANY_RECIPIENTS = _r(452, "4.5.3 Too many recipients")
NO_ROUTE = _r(550, "5.7.1 Sender address not allowed for this user")
ROUTE_TEMPFAIL = _r(451, "4.3.0 Cannot look up the route for this sender, try again later")

# --- DATA
START_DATA = _r(354, "End data with <CR><LF>.<CR><LF>")
BARE_LF_IN_DATA = _r(550, "5.6.0 Message refused: bare CR or LF in message (use CRLF)")
BARE_LF_IN_DATA_CLOSING = _r(421, "4.6.0 Bare CR or LF ended the message ambiguously, closing connection")
DATA_LINE_TOO_LONG = _r(550, "5.6.0 Message refused: line longer than 1000 octets")
NUL_IN_DATA = _r(550, "5.6.0 Message refused: NUL character in message")
MESSAGE_TOO_BIG = _r(552, "5.3.4 Message size exceeds fixed maximum message size")
RELAY_FAILED = _r(451, "4.3.0 Relay failed, message not delivered")


def greeting(hostname: str) -> Reply:
    return Reply(220, (f"{hostname} {GREETING_TEXT}",))


def _hello(hostname: str, client_name: str) -> str:
    """The first line: the client's name echoed only when it is one word of
    printable ASCII no longer than a domain may be (a name with spaces or
    other octets is taken, not shown; a reply line stays within 512 octets)."""
    line = f"{hostname} Hello {client_name}"
    if (len(client_name) <= 255 and client_name.isascii() and client_name.isprintable()
            and " " not in client_name and len(line) <= 512 - len("250-\r\n")):
        return line
    return f"{hostname} Hello"


def ehlo(hostname: str, client_name: str, keywords: tuple[str, ...]) -> Reply:
    """The multi-line EHLO reply: greeting line, then one keyword a line."""
    return Reply(250, (_hello(hostname, client_name), *keywords))


def helo(hostname: str, client_name: str) -> Reply:
    return Reply(250, (_hello(hostname, client_name),))
