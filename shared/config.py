"""sendooway.conf: the global config and the users' includes (~/.sendoowayrc).

The language is the original C sendooway's: `keyword = value` lines, `#`
starts a comment, keywords and enumerated values are case-insensitive,
booleans are yes/no. Every error names file:line.
"""

from __future__ import annotations

import difflib
import enum
import functools
import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field, replace
from typing import Callable

from .types import DEFAULT_PORTS, Route, Secret, TlsMode, port_number

MAX_CONFIG_BYTES = 1 << 20


class ConfigError(Exception):
    """A config (or user include) that cannot be used; str() is file:line: what."""

    def __init__(self, filename: str, line: int | None, message: str) -> None:
        self.filename = filename
        self.line = line
        self.message = message
        where = f"{filename}:{line}" if line else filename
        super().__init__(f"{where}: {message}")


class MailerEncryption(str, enum.Enum):
    ALLOWED = "allowed"
    REQUIRED = "required"
    FORBIDDEN = "forbidden"


class Ext8BitMime(str, enum.Enum):
    FORCE = "force"
    DISABLE = "disable"
    IGNORE = "ignore"


class SmarthostAuth(str, enum.Enum):
    IF_ADVERTISED = "ifAdvertised"
    ALWAYS_TRY = "alwaysTry"
    NEVER = "never"


class AuthBackend(str, enum.Enum):
    PAM = "PAM"
    LDAP = "LDAP"
    NONE = "none"


class MappingKind(str, enum.Enum):
    FETCHMAIL = "fetchmail"
    GETMAIL = "getmail"
    DIRECT = "direct"


DIRECT_FLAGS = {"tls": "tls", "ssl": "ssl", "nocertcheck": "noCertCheck", "noauth": "noAuth"}


@dataclass(frozen=True)
class DirectRoute:
    """A `direct:` mapping, parsed: one address pattern and its route."""

    address: str
    route: Route


@dataclass(frozen=True)
class Mapping:
    """One smarthostMapping line. For fetchmail/getmail, `path` may hold %h/%u."""

    kind: MappingKind
    path: str = ""
    direct: DirectRoute | None = None
    filename: str = ""
    line: int = 0

    @property
    def source(self) -> str:
        return f"{self.filename}:{self.line}"

    def expand(self, user: str, home: str) -> "Mapping":
        """This mapping with %h and %u replaced for one user, and a relative
        path (`fetchmail:.fetchmailrc`) made absolute from the home it is
        read in: the file:line of its accounts and errors, in the logs and
        --check, then names the file (it said `.fetchmailrc:6`, whose?)."""
        if self.kind is MappingKind.DIRECT:
            return self
        return replace(self, path=from_home(expand_path(self.path, user, home), home))

    def __str__(self) -> str:
        if self.direct is not None:
            r = self.direct.route
            return f"direct:{self.direct.address} {r.describe()}"
        return f"{self.kind.value}:{self.path}"


DEFAULT_MAPPINGS = (
    Mapping(MappingKind.GETMAIL, "%h/.getmail/getmailrc", filename="(default)", line=0),
    Mapping(MappingKind.FETCHMAIL, "%h/.fetchmailrc", filename="(default)", line=0),
)


def from_home(path: str, home: str) -> str:
    """`path` as read from the home: a relative one joined to an absolute
    home (the reader works in the home, so the file is the same)."""
    return os.path.join(home, path) if os.path.isabs(home) else path


def expand_path(template: str, user: str, home: str) -> str:
    """Replace %h (home), %u (user) and %% in a path template."""
    out = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "%" and i + 1 < len(template):
            n = template[i + 1]
            if n == "h":
                out.append(home.rstrip("/") or "/")
                i += 2
                continue
            if n == "u":
                out.append(user)
                i += 2
                continue
            if n == "%":
                out.append("%")
                i += 2
                continue
        out.append(c)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Config:
    """The global configuration, with DESIGN.md's defaults."""

    localname: str = ""
    timeout: int = 300
    cloneEhlo: bool = False
    addReceivedField: bool = True
    sslCA: str = ""
    sslCert: str = ""
    sslKey: str = ""
    mailerEncryption: MailerEncryption = MailerEncryption.ALLOWED
    ext8BitMime: Ext8BitMime = Ext8BitMime.FORCE
    extMessageSize: int | None = 0  # None = "disable"; 0 = SIZE without a limit
    smarthostPlain: SmarthostAuth = SmarthostAuth.IF_ADVERTISED
    smarthostLogin: SmarthostAuth = SmarthostAuth.IF_ADVERTISED
    smarthostCramMD5: SmarthostAuth = SmarthostAuth.IF_ADVERTISED
    authBackend: AuthBackend = AuthBackend.PAM
    ldapUri: str = ""
    ldapSSLca: str = ""
    ldapAuthDN: str = ""
    validUser: tuple[str, ...] = ()
    smarthostMapping: tuple[Mapping, ...] = ()
    userInclude: str = ""
    authSocket: str = "/run/sendooway/auth.sock"
    frontendUser: str = "nobody"
    pamService: str = "sendooway"
    maxAuthFailures: int = 3
    smarthostCache: int = 30
    maxSessionsPerAddress: int = 50
    proxyProtocol: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    filename: str = ""
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)  # name → line
    # lines of smarthostMapping whose '#' comment is glued to a word (see comment_cuts)
    comment_cuts: tuple[int, ...] = field(default=(), compare=False, repr=False)
    # lines of validUser that name a list (`alice,bob`), see valid_user_list_warning
    valid_user_lists: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def where(self, name: str) -> str:
        """file:line of the line that set `name` (the file alone when a default)."""
        line = self.lines.get(name)
        return f"{self.filename or 'config'}:{line}" if line else (self.filename or "config")

    def describe_backend(self) -> str:
        """The backend that checks logins, as --check and the daemon's log
        name it."""
        if self.authBackend is AuthBackend.PAM:
            return f"PAM (service {self.pamService})"
        if self.authBackend is AuthBackend.LDAP:
            return (f"LDAP ({self.ldapUri or 'no ldapUri'}, bind as"
                    f" {self.ldapAuthDN or 'no ldapAuthDN'})")
        return self.authBackend.value

    def backend_refusal(self, authenticator_uid: int) -> str | None:
        """Why an authenticator running as `authenticator_uid` must not serve
        this authBackend (checked at start-up by the daemon, and by a root
        frontend that starts its own authenticator), or None."""
        if self.authBackend is AuthBackend.LDAP:
            problems = ldap_problems(self)
            if problems:
                return f"{self.where('authBackend')}: authBackend = LDAP: " + "; ".join(problems)
        if self.authBackend is AuthBackend.NONE and authenticator_uid == 0:
            return (f"{self.where('authBackend')}: authBackend = none logs in the account"
                    " sendooway-auth runs as without a password, and that is root here;"
                    " use authBackend = PAM (none is for a sendooway-auth run as one user)")
        return None


def ldap_problems(cfg: Config) -> list[str]:
    """What keeps authBackend = LDAP from working (each with its file:line)."""
    problems = []
    if not cfg.ldapUri.strip():
        problems.append(f"{cfg.where('ldapUri')}: ldapUri is not set")
    else:
        problems += [f"{cfg.where('ldapUri')}: {p}" for p in _ldap_uri_problems(cfg.ldapUri)]
    if "%u" not in cfg.ldapAuthDN:
        problems.append(f"{cfg.where('ldapAuthDN')}: ldapAuthDN must name the user's entry"
                        " with %u (uid=%u,ou=people,dc=example,dc=org)")
    if cfg.ldapSSLca:
        import ssl

        try:
            ssl.create_default_context(cafile=cfg.ldapSSLca)
        except (OSError, ssl.SSLError, ValueError) as exc:
            why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
            problems.append(f"{cfg.where('ldapSSLca')}: {cfg.ldapSSLca}: cannot load CA"
                            f" certificates ({why})")
    return problems


def _split_uri(uri: str):
    """urlsplit's parts of an ldapUri item, or None when it is no URI (a
    bad port shows only when .port is read)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
        _ = parts.port
    except ValueError:
        return None
    return parts


def _ldap_uri_problems(value: str) -> list[str]:
    problems = []
    for uri in value.split():
        parts = _split_uri(uri)
        if parts is None:
            problems.append(f"{uri}: not an LDAP URI")
            continue
        if parts.scheme.lower() not in ("ldap", "ldaps"):
            problems.append(f"{uri}: only ldap:// and ldaps:// are supported")
        elif not parts.hostname:
            problems.append(f"{uri}: no server name")
        elif parts.path not in ("", "/") or parts.query or parts.fragment:
            problems.append(f"{uri}: only a server and port may be given")
        elif parts.port == 0:
            problems.append(f"{uri}: port 0")
    return problems


def _ldap_cleartext(cfg: Config) -> str | None:
    """A warning for ldap:// URIs to another host: the users' passwords
    cross the network in clear there."""
    if cfg.authBackend is not AuthBackend.LDAP:
        return None
    clear = []
    for uri in cfg.ldapUri.split():
        parts = _split_uri(uri)
        if (parts is not None and parts.scheme.lower() == "ldap"
                and (parts.hostname or "").lower() not in ("localhost", "127.0.0.1", "::1")):
            clear.append(uri)
    if not clear:
        return None
    return (f"{cfg.where('ldapUri')}: {' '.join(clear)}: the users' passwords go to the"
            " directory in clear; use ldaps://")


def config_warnings(cfg: Config) -> list[str]:
    """What is worth a warning in the global config (at start, at a reload,
    in --check)."""
    found = [comment_cut_warning(cfg.filename, n) for n in cfg.comment_cuts]
    found.extend(valid_user_list_warning(cfg.filename, n) for n in cfg.valid_user_lists)
    if (warning := shell_path_warning(cfg.where("userInclude"), cfg.userInclude)) is not None:
        found.append(warning)
    found.extend(shell_path_warnings(cfg.smarthostMapping))
    if (clear := _ldap_cleartext(cfg)) is not None:
        found.append(clear)
    if (writable := writable_config(cfg)) is not None:
        found.append(writable)
    if (exposed := exposed_passwords(cfg)) is not None:
        found.append(exposed)
    found.extend(direct_pattern_warnings(cfg))
    found.extend(direct_port_user_warnings(cfg))
    return found


def writable_config(cfg: Config) -> str | None:
    """A warning when someone besides root (and the account reading it) may
    change the global config: its authBackend, ldapUri, pamService and
    mappings decide who logs in as whom and where everyone's mail and
    upstream passwords go, in a daemon that runs as root. A warning, not an
    error, as Postfix's `postfix check` does: the original loaded such a
    file (its man page only asked for root and no write access to others)."""
    if not cfg.filename:
        return None
    try:
        st = os.stat(cfg.filename)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None  # /dev/null: every default
    who = []
    # (a group-writable file of group root: only root's group, as root's own)
    if st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != 0):
        who.append(f"writable by group or others (mode {st.st_mode & 0o7777:04o})")
    if st.st_uid not in (0, os.geteuid()):
        who.append(f"owned by uid {st.st_uid}, not root")
    if not who:
        return None
    return (f"{cfg.filename} is {' and '.join(who)}: whoever can change it decides who may"
            " log in (authBackend, ldapUri, pamService) and where mail and the upstream"
            " passwords go; make it root's, mode 0644 or stricter (chmod go-w)")


def exposed_passwords(cfg: Config) -> str | None:
    """A warning when the global config holds upstream passwords (direct:
    mappings) and every local user may read it; None otherwise."""
    if not cfg.filename or not any(m.direct is not None and m.direct.route.password
                                   for m in cfg.smarthostMapping):
        return None
    try:
        mode = os.stat(cfg.filename).st_mode
    except OSError:
        return None
    if not mode & 0o004:
        return None
    return (f"{cfg.filename} holds upstream passwords (direct: mappings) and every local user"
            f" can read it (mode {mode & 0o7777:04o}): give it mode 0640 and a group only"
            " root and the frontend's user are in, or move the mappings into the users' own"
            " files")


@dataclass(frozen=True)
class UserConfig:
    """What a user's include (~/.sendoowayrc) may set."""

    smarthostMapping: tuple[Mapping, ...] = ()
    sslCA: str | None = None
    filename: str = ""
    comment_cuts: tuple[int, ...] = ()


# ---------------------------------------------------------------- values


def _string(value: str) -> str:
    return value


def _path_or_empty(value: str) -> str:
    return value


def _shown(value: str, limit: int = 80) -> str:
    """What an error shows of a value: its repr, cut at `limit` characters
    (a pasted blob must not make a 100 000-character log line)."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def _digits(value: str) -> bool:
    """ASCII digits, few enough for any limit here (`²` is isdigit() but no
    number, and 5000 digits make int() complain about Python internals)."""
    return value.isascii() and value.isdigit() and len(value) <= 18


def _number(lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not _digits(value):
            raise ValueError(f"expected a number from {lo} to {hi}, got {value[:40]!r}")
        n = int(value)
        if not lo <= n <= hi:
            raise ValueError(f"expected a number from {lo} to {hi}, got {n}")
        return n

    return parse


def _boolean(value: str) -> bool:
    v = value.lower()
    if v == "yes":
        return True
    if v == "no":
        return False
    raise ValueError(f"expected yes or no, got {_shown(value)}")


def _enum(kind: type[enum.Enum]) -> Callable[[str], enum.Enum]:
    by_name = {m.value.lower(): m for m in kind}

    def parse(value: str):
        try:
            return by_name[value.lower()]
        except KeyError:
            choices = " | ".join(m.value for m in kind)
            raise ValueError(f"expected {choices}, got {_shown(value)}") from None

    return parse


def _message_size(value: str) -> int | None:
    if value.lower() == "disable":
        return None
    if not _digits(value):
        raise ValueError(f"expected disable, 0 or a size in bytes (at most 18 digits),"
                         f" got {value[:40]!r}")
    return int(value)


def _valid_user(value: str) -> str:
    if not value or value == "%" or any(c.isspace() for c in value):
        raise ValueError(f"expected a user name or %group, got {_shown(value)}")
    return value


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("a value is required")
    return value


_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def _localname(value: str) -> str:
    """A host name (RFC 1123 labels; `_` too, as Postfix takes it) or an
    address literal ([192.0.2.1], [IPv6:2001:db8::1]); empty means this
    host's name. It goes into the greeting, the EHLO sent upstream and
    Received:, where a name with blanks split the line (an outside review)."""
    if not value:
        return value
    shown = repr(value[:80])
    if value.startswith("["):
        inner = value[1:-1] if value.endswith("]") else ""
        bare = inner[5:] if inner[:5].lower() == "ipv6:" else inner
        try:
            if "%" in bare:  # a zone (fe80::1%eth0): ip_address takes it, RFC 5321 has no place for it
                raise ValueError
            address = ipaddress.ip_address(bare)
        except ValueError:
            raise ValueError(f"expected a host name or an address literal such as"
                             f" [192.0.2.1] or [IPv6:2001:db8::1], got {shown}") from None
        if address.version == 6 and bare == inner:
            raise ValueError(f"write an IPv6 address literal as [IPv6:{bare}], got {shown}")
        if address.version == 4 and bare != inner:
            raise ValueError(f"write an IPv4 address literal as [{bare}], got {shown}")
        return value
    if not value.isascii():
        raise ValueError(f"expected a host name in ASCII: write an internationalised name"
                         f" as its A-labels (xn--...), got {shown}")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:  # a bare address is no EHLO name (RFC 5321 4.1.3): its literal is,
        if "%" in value:  # a zone: no literal holds one (refused above in brackets)
            raise ValueError(f"expected a host name or an address without a zone"
                             f" (%...), got {shown}")
        # and an original's config that said `localname = 192.0.2.1` must
        # keep working (DESIGN.md): taken as that literal
        return f"[{value}]" if address.version == 4 else f"[IPv6:{address}]"
    if value.endswith(".") and len(value) > 1:
        value = value[:-1]  # the root's dot of a fully qualified name: not sent
    labels = value.split(".")
    if len(value) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"expected a host name (letters, digits and '-' in dot-separated"
                         f" labels of at most 63) or an address literal such as [192.0.2.1],"
                         f" got {shown}")
    return value


MAX_SOCKET_PATH = 107  # octets a UNIX socket address holds on Linux (sun_path, NUL ended)


def socket_path_fits(value: str) -> str:
    """`value` when a UNIX socket address can hold it, else ValueError (also
    for --socket and --auth-socket: a socket that cannot be, said at once)."""
    if len(os.fsencode(value)) > MAX_SOCKET_PATH:
        raise ValueError(f"path too long for a UNIX socket ({len(os.fsencode(value))} octets,"
                         f" at most {MAX_SOCKET_PATH})")
    return value


def _socket_path(value: str) -> str:
    _non_empty(value)
    return socket_path_fits(value)


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses and CIDR networks, separated by spaces and/or commas."""
    return tuple(_network(token) for token in re.split(r"[\s,]+", value) if token)


def _network(token: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if "%" in token:  # no zone index: ip_network would take it
        raise ValueError(f"expected IP addresses or networks (CIDR), got {_shown(token)}")
    try:
        net = ipaddress.ip_network(token)
    except ValueError:
        try:
            loose = ipaddress.ip_network(token, strict=False)
        except ValueError:
            raise ValueError(f"expected IP addresses or networks (CIDR), got {_shown(token)}") from None
        raise ValueError(f"{_shown(token)} has host bits set: write {loose}") from None
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        # ::ffff:a.b.c.d/96+ is an IPv4 network (peers are matched as IPv4)
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    if net.prefixlen == 0:
        raise ValueError(f"{_shown(token)} would trust every address: list the balancers")
    return net


_KEYWORDS: dict[str, tuple[str, Callable[[str], object], bool]] = {
    # lower-cased keyword: (field name, value parser, allowed in a user include)
    "localname": ("localname", _localname, False),
    "timeout": ("timeout", _number(1, 86400), False),
    "cloneehlo": ("cloneEhlo", _boolean, False),
    "addreceivedfield": ("addReceivedField", _boolean, False),
    "sslca": ("sslCA", _path_or_empty, True),
    "sslcert": ("sslCert", _path_or_empty, False),
    "sslkey": ("sslKey", _path_or_empty, False),
    "mailerencryption": ("mailerEncryption", _enum(MailerEncryption), False),
    "ext8bitmime": ("ext8BitMime", _enum(Ext8BitMime), False),
    "extmessagesize": ("extMessageSize", _message_size, False),
    "smarthostplain": ("smarthostPlain", _enum(SmarthostAuth), False),
    "smarthostlogin": ("smarthostLogin", _enum(SmarthostAuth), False),
    "smarthostcrammd5": ("smarthostCramMD5", _enum(SmarthostAuth), False),
    "authbackend": ("authBackend", _enum(AuthBackend), False),
    "ldapuri": ("ldapUri", _string, False),
    "ldapsslca": ("ldapSSLca", _string, False),
    "ldapauthdn": ("ldapAuthDN", _string, False),
    "validuser": ("validUser", _valid_user, False),
    "smarthostmapping": ("smarthostMapping", None, True),  # type: ignore[dict-item]
    "userinclude": ("userInclude", _string, False),
    "authsocket": ("authSocket", _socket_path, False),
    "frontenduser": ("frontendUser", _non_empty, False),
    "pamservice": ("pamService", _non_empty, False),
    "maxauthfailures": ("maxAuthFailures", _number(1, 1000), False),
    "smarthostcache": ("smarthostCache", _number(0, 86400), False),
    "maxsessionsperaddress": ("maxSessionsPerAddress", _number(0, 100000), False),
    "proxyprotocol": ("proxyProtocol", _networks, False),
}

KEYWORD_NAMES = tuple(spec[0] for spec in _KEYWORDS.values())
USER_KEYWORD_NAMES = tuple(spec[0] for spec in _KEYWORDS.values() if spec[2])
_REPEATABLE = {"validUser", "smarthostMapping"}
_EXTENDING = {"proxyProtocol"}  # a list on each line; every line adds to it


# ---------------------------------------------------------------- mappings


def parse_direct(value: str) -> DirectRoute:
    """Parse the part after `direct:`.

    Forms: ADDRESS SERVER [PORT] USER PASS [FLAGS] and, with the noAuth flag,
    ADDRESS SERVER [PORT] FLAGS; PORT is a number or a service name. FLAGS is a comma-separated list of tls, ssl,
    noCertCheck, noAuth. The original's `ADDRESS SERVER USER PASS` (no port)
    keeps working. Raises ValueError with a message that never holds PASS.
    """
    tokens = value.split()
    flags: set[str] = set()
    # Where the last field can only be the flags (six fields, or five with no
    # port), a list holding a known flag and an unknown one is the flags,
    # mistyped: it used to be read as a field too many, or as the port
    if (len(tokens) == 6 or (len(tokens) == 5 and not _is_port(tokens[2]))) and (
            not _is_flag_list(tokens[-1])
            and any(f.lower() in DIRECT_FLAGS for f in tokens[-1].split(","))):  # (never shown: had it been a password after all)
        raise ValueError("the flags hold one sendooway does not know (flags: tls, ssl,"
                         " noCertCheck, noAuth, comma-separated, no blanks)")
    if len(tokens) >= 3 and _is_flag_list(tokens[-1]):
        flags = {DIRECT_FLAGS[f.lower()] for f in tokens[-1].split(",") if f}
        tokens = tokens[:-1]
    if len(tokens) < 2:
        raise ValueError("direct mapping needs ADDRESS SERVER [PORT] USER PASS [FLAGS]")
    address, server, rest = tokens[0], tokens[1], tokens[2:]
    port: int | None = None
    no_auth = "noAuth" in flags
    if len(rest) == 3 or (len(rest) == 1 and (no_auth or rest[0].isdigit())):
        try:  # a number or a service name (`submission`), as the original's getaddrinfo()
            port = port_number(rest[0])
        except ValueError:  # (the value is not shown: a misplaced field may be a password)
            raise ValueError("the port must be a number from 1 to 65535 or a service name"
                             " such as submission") from None
        rest = rest[1:]
    if len(rest) == 2:
        user, password = rest
    elif not rest and no_auth:
        user, password = "", ""
    elif len(tokens) == 6 and not flags:
        # the full form's count, its last field no flag at all (`secure`,
        # `[tls]`): "6 fields given" would blame the count (value not shown)
        raise ValueError("the sixth field must be the flags (tls, ssl, noCertCheck, noAuth,"
                         " comma-separated, no blanks)")
    else:
        raise ValueError(
            "direct mapping needs ADDRESS SERVER [PORT] USER PASS [FLAGS]"
            f" ({len(tokens) + (1 if flags else 0)} fields given)"
        )
    _check_address_pattern(address)
    _check_server(server)
    if "tls" in flags and "ssl" in flags:
        raise ValueError("tls and ssl exclude each other")
    mode = TlsMode.TLS if "ssl" in flags else TlsMode.STARTTLS if "tls" in flags else TlsMode.PLAIN
    route = Route(
        server=server,
        port=port if port is not None else DEFAULT_PORTS[mode],
        tls=mode,
        cert_check="noCertCheck" not in flags,
        user=user,
        password=Secret(password),
        auth=not no_auth,
    )
    return DirectRoute(address, route)


def _check_server(server: str) -> None:
    problem = server_problem(server)
    if problem is not None:
        raise ValueError(f"server {server[:80]!r}: {problem}")


def server_problem(server: str) -> str | None:
    """Why `server` cannot name an upstream (None: it can): a host name or
    an IP address (an IPv6 one bracketed or not). The port is a field of
    its own: `smtp.example.org:587` would be looked up as a name (and, in a
    direct: mapping, the next field taken for the port or the user)."""
    bare = server[1:-1] if server.startswith("[") and server.endswith("]") else server
    try:
        ipaddress.ip_address(bare)
        return None
    except ValueError:
        pass
    if bare[:5].upper() == "IPV6:":
        return "write an IPv6 address without the IPv6: prefix"
    if ":" in bare:
        return "the port goes in a field of its own, not SERVER:PORT"
    labels = bare[:-1].split(".") if bare.endswith(".") else bare.split(".")
    if not all(0 < len(label) <= 63 for label in labels) or len(bare) > 253:
        return "not a valid host name (an empty or over-long label)"
    return None


def _is_port(token: str) -> bool:
    try:
        port_number(token)
    except ValueError:
        return False
    return True


def _is_flag_list(token: str) -> bool:
    items = [f for f in token.split(",")]
    return bool(items) and all(f.lower() in DIRECT_FLAGS for f in items)


def _check_address_pattern(address: str) -> None:
    # Only the form here: the original C sendooway loaded a global config
    # with `*@*.example.org` in it, so that stays loadable (with a warning,
    # direct_pattern_warnings); a user's include gets the whole rule
    if (problem := _pattern_form_problem(address)) is not None:
        raise ValueError(problem)


def _pattern_form_problem(pattern: str) -> str | None:
    """Why `pattern` has not the form user@domain, *@domain or *; None when it has."""
    if pattern == "*":
        return None
    local, at, domain = pattern.rpartition("@")
    if not at or not local or not domain:
        # the value is never repeated in an address error: a line that is no
        # address may well be a password (`#sendooway:address SECRET`, or a
        # getmail `password=...` line indented below `address`)
        return "address must be user@domain, *@domain or *"
    return None


_PATTERN_BAD_CHAR = re.compile(r"[\s\x00-\x1f\x7f]")
# RFC 5321's specials: no sender holds one outside a quoted local part or
# an address literal, so `<alice@x.org>` (as a header writes it),
# `a@x.org,b@x.org` or `mailto:a@x.org` never matched (an outside review)
_PATTERN_SPECIALS = re.compile(r'[<>()\[\]\\,;:@"]')


def address_pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a sender pattern (user@domain, *@domain or *)
    that matches as written; None when it is. The one rule for every file
    that names senders (fetchmail, getmail, direct: mappings)."""
    if pattern == "*":
        return None
    if _PATTERN_BAD_CHAR.search(pattern):
        return "address contains white space or control characters"
    if (problem := _pattern_form_problem(pattern)) is not None:
        return problem
    local, _at, domain = pattern.rpartition("@")
    quoted = len(local) >= 2 and local[0] == local[-1] == '"'
    literal = domain.startswith("[") and domain.endswith("]")
    if (not quoted and _PATTERN_SPECIALS.search(local)) or (
            not literal and _PATTERN_SPECIALS.search(domain)):
        return ("address must be one bare address (no angle brackets, names or lists:"
                " one address a line)")
    if "*" in domain or ("*" in local and local != "*"):
        return "'*' may only stand for a whole local part"
    return None


def direct_pattern_warnings(cfg: Config) -> list[str]:
    """The global config's direct: mappings whose address is no pattern
    (`*@*.example.org`): kept, as the original kept them, but they match
    only a sender spelled exactly so, so a warning says what the admin
    meant does not happen (a user's include gets an error instead)."""
    return [f"{m.source}: smarthostMapping: {problem}: the mapping is kept, but it matches"
            " only a sender address spelled exactly so (wildcards: *@domain or *)"
            for m in cfg.smarthostMapping
            if m.direct is not None
            and (problem := address_pattern_problem(m.direct.address)) is not None]


# the submission ports an admin writes: a user name that is one of them is
# most likely a port, with USER or PASS left out
_PORT_LIKE_USERS = frozenset({"25", "465", "587", "2525"})


def direct_port_user_warnings(cfg: Config) -> list[str]:
    """The global config's direct: mappings whose upstream user name is a
    submission port: `direct:* smtp.example.org 587 user` (the password left
    out) is the original's port-less form, user "587" and password "user",
    and fails only at the upstream's AUTH. A warning names the user field,
    never the password."""
    return [f"{m.source}: smarthostMapping: upstream user {m.direct.route.user!r} looks like a"
            " port: the form with a port is ADDRESS SERVER PORT USER PASS [FLAGS] (is USER or"
            " PASS missing?)"
            for m in cfg.smarthostMapping
            if m.direct is not None and m.direct.route.auth
            and m.direct.route.user in _PORT_LIKE_USERS]


def _parse_mapping(value: str, filename: str, line: int) -> Mapping:
    kind, colon, rest = value.partition(":")
    try:
        mk = MappingKind(kind.strip().lower())
    except ValueError:
        # only its first word: a line without its kind may hold a password further on
        first = kind.split()[0][:40] if kind.split() else ""
        more = "..." if len(kind.split()) > 1 or len(first) == 40 else ""
        raise ValueError(
            f"mapping must start with fetchmail:, getmail: or direct:, got {first + more!r}"
        ) from None
    if not colon or not rest.strip():
        raise ValueError(f"{mk.value}: needs a value")
    if mk is MappingKind.DIRECT:
        direct = parse_direct(rest)
        route = replace(direct.route, source=f"{filename}:{line}")
        return Mapping(mk, direct=DirectRoute(direct.address, route), filename=filename, line=line)
    return Mapping(mk, path=rest.strip(), filename=filename, line=line)


# ---------------------------------------------------------------- files


def _lines(text: str):
    # Lines end at LF only (an optional CR before it is dropped by strip()):
    # str.splitlines() would also break at FF, VT, U+0085, U+2028..., so
    # error line numbers would not be the ones an editor shows.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            yield number, line


def comment_cuts(text: str) -> tuple[int, ...]:
    """Lines of smarthostMapping where a '#' right after a word starts the
    comment: as in the original, '#' starts a comment anywhere, so
    `... user pa#ss tls` maps with password `pa` and without `tls`. Almost
    surely a password with a '#': worth a warning (an error would break
    configs the original took)."""
    found = []
    for number, raw in enumerate(text.split("\n"), start=1):
        cut = raw.find("#")
        if cut > 0 and not raw[cut - 1].isspace() and not raw.lstrip().startswith("#"):
            if raw.partition("=")[0].strip().lower() == "smarthostmapping":
                found.append(number)
    return tuple(found)


def shell_path_warning(where: str, path: str) -> str | None:
    """A path written as for a shell: no shell reads it, so `~/.fetchmailrc`
    is HOME/~/.fetchmailrc, and `getmailrc-*`, `$HOME/.fetchmailrc` and
    `"%h/.fetchmailrc"` name files with a `*`, a `$` or quotes, all
    missing, and a missing file is no error: the include or the mapping
    did nothing without a word (an outside review). A warning, not an
    error: the original took such paths too. None for any other path."""
    if path.startswith("~"):
        why = ("starts with '~', which is not expanded (it names a directory '~' in the"
               " user's home, a file that is then silently missing): write %h for the"
               " user's home")
    elif "*" in path or "?" in path:
        why = ("holds '*' or '?', which match nothing here (no wildcards: a file of that very"
               " name is looked for, and silently missing): one mapping a file")
    elif "$" in path:
        why = ("holds '$', which is not expanded (no variables: a file of that very name is"
               " looked for, and silently missing): write %h for the home, %u for the user")
    elif path.startswith(('"', "'")):
        why = ("starts with a quote, which is part of the path here (nothing is quoted in"
               " this file: a file of that very name is looked for, and silently missing):"
               " write the path without quotes")
    else:
        return None
    return f"{where}: {path[:80]!r} {why}"


def shell_path_warnings(mappings: tuple[Mapping, ...]) -> list[str]:
    """shell_path_warning for each fetchmail:/getmail: mapping that has one."""
    return [w for m in mappings if m.kind is not MappingKind.DIRECT
            and (w := shell_path_warning(m.source, m.path)) is not None]


def valid_user_list_warning(filename: str, number: int) -> str:
    """`validUser = alice,bob`: no user or group is named with ',' or ':'
    (passwd and group separate fields and members with them), so the line
    lets nobody in, where the admin meant two. A warning, not an error: the
    original loaded such a line (it did nothing there either), and a
    migrated server must still start (as for direct_pattern_warnings)."""
    return (f"{filename}:{number}: validUser: no user or group is named with ',' or ':', so"
            " this line lets nobody in: write one user or %group a line (validUser may"
            " be repeated)")


def comment_cut_warning(filename: str, number: int) -> str:
    return (f"{filename}:{number}: the '#' right after a word starts a comment, so this"
            " mapping ends there (a password cannot hold '#'; the fields after it are"
            " not read): put a blank before a comment")


# C0 controls but tab, DEL and C1: the original refused each outside a
# comment ("unexpected character"); at a line's ends strip() takes them as
# blanks (the CR of CRLF, \r\r\n), inside they made a value nobody meant
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _split(line: str, filename: str, number: int) -> tuple[str, str]:
    if (bad := _CONTROL.search(line)) is not None:
        code = ord(bad.group())
        hint = (": a carriage return inside a line (CR-only line ends? save the file with"
                " LF or CRLF)" if code == 0x0D else "")
        raise ConfigError(filename, number, f"control character U+{code:04X} in the line"
                          f" (only tab is allowed; the line is not shown){hint}")
    key, eq, value = line.partition("=")
    key = key.strip()
    if not eq:
        # never the rest of the line, nor a word that is no keyword: it may
        # be a password (the second half of a wrapped direct: mapping)
        word = _shown_key(key)
        known = word.rstrip(".").lower() in _KEYWORDS
        raise ConfigError(filename, number, "expected 'keyword = value'"
                          + (f", got {word!r}" if known else " (the line is not shown)"))
    if not key:
        raise ConfigError(filename, number, "missing keyword before '='")
    return key, value.strip()


def _lookup(key: str, filename: str, number: int, allowed: tuple[str, ...]):
    spec = _KEYWORDS.get(key.lower())
    if spec is None:
        hint = difflib.get_close_matches(key.lower(), [k.lower() for k in allowed], n=1, cutoff=0.7)
        if not hint:
            # not shown unless it is a near miss of a keyword: the line may be
            # the rest of a wrapped direct: mapping whose password holds '='
            # (`...  alice` then `  c2VjcmV0= tls`: the key is the password)
            raise ConfigError(filename, number, "unknown keyword (the line is not shown)")
        suggestion = f" (did you mean '{next(k for k in allowed if k.lower() == hint[0])}'?)"
        raise ConfigError(filename, number, f"unknown keyword '{_shown_key(key)}'{suggestion}")
    return spec


def _shown_key(key: str) -> str:
    """What an error may show of a keyword: its leading letters, digits and
    '_' (at most 40); the rest of a garbled line may be a password."""
    m = re.match(r"[A-Za-z0-9_]{1,40}", key.strip())
    shown = m.group(0) if m else ""
    return shown + ("..." if len(key.strip()) > len(shown) else "")


def _parse_value(name: str, parser, value: str, filename: str, number: int):
    try:
        if name == "smarthostMapping":
            return _parse_mapping(value, filename, number)
        return parser(value)
    except ValueError as exc:
        raise ConfigError(filename, number, f"{name}: {exc}") from None


def parse_config(text: str, filename: str = "sendooway.conf") -> Config:
    """Parse the global config language; raises ConfigError."""
    values: dict[str, object] = {}
    lists: dict[str, list] = {"validUser": [], "smarthostMapping": []}
    lines: dict[str, int] = {}
    valid_user_lists = []
    for number, line in _lines(text):
        key, value = _split(line, filename, number)
        name, parser, _user_ok = _lookup(key, filename, number, KEYWORD_NAMES)
        lines[name] = number
        if name == "validUser" and ("," in value or ":" in value):
            valid_user_lists.append(number)
        if name in _REPEATABLE:
            if value == "":
                raise ConfigError(filename, number, f"{name}: a value is required")
            lists[name].append(_parse_value(name, parser, value, filename, number))
        elif name in _EXTENDING:
            values[name] = values.get(name, ()) + _parse_value(name, parser, value, filename, number)
        else:
            values[name] = _parse_value(name, parser, value, filename, number)
    values["validUser"] = tuple(lists["validUser"])
    values["smarthostMapping"] = tuple(lists["smarthostMapping"])
    return Config(filename=filename, lines=lines, comment_cuts=comment_cuts(text),
                  valid_user_lists=tuple(valid_user_lists),
                  **values)  # type: ignore[arg-type]


MAX_USER_ERRORS = 50  # errors that make a user include be ignored whole (routes.py)


def parse_user_config(text: str, filename: str,
                      errors: list[ConfigError] | None = None) -> UserConfig:
    """Parse a user include; only smarthostMapping and sslCA are allowed.
    With `errors`, a bad line is recorded there and skipped (one pass);
    without, the first one raises."""
    mappings: list[Mapping] = []
    ssl_ca: str | None = None
    for number, line in _lines(text):
        try:
            one = _user_line(line, filename, number)
        except ConfigError as exc:
            if errors is None:
                raise
            errors.append(exc)
            if len(errors) > MAX_USER_ERRORS:
                break  # a file of junk: enough is known (it is ignored whole)
            continue
        if isinstance(one, Mapping):
            mappings.append(one)
        else:
            ssl_ca = one
    return UserConfig(tuple(mappings), ssl_ca, filename, comment_cuts(text))


def _user_line(line: str, filename: str, number: int):
    """One line of a user include: a Mapping, or the sslCA value."""
    key, value = _split(line, filename, number)
    name, parser, user_ok = _lookup(key, filename, number, USER_KEYWORD_NAMES)
    if not user_ok:
        raise ConfigError(
            filename, number,
            f"'{name}' is not allowed in a user include"
            f" (only {', '.join(USER_KEYWORD_NAMES)})",
        )
    if name == "smarthostMapping" and value == "":
        raise ConfigError(filename, number, f"{name}: a value is required")
    one = _parse_value(name, parser, value, filename, number)
    if isinstance(one, Mapping) and one.direct is not None:
        # a user's file is held to the rule of the user's fetchmail and
        # getmail files: a bad line is reported and skipped, not kept
        if (problem := address_pattern_problem(one.direct.address)) is not None:
            raise ConfigError(filename, number, f"{name}: {problem}")
    return one


_BOM = b"\xef\xbb\xbf"


def read_text(path: str) -> str:
    """Read a config file with a size bound; errors become ConfigError."""
    try:
        # O_NONBLOCK: a FIFO at the path must not hang us (in the daemon,
        # a reload runs on the event loop that serves every login)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):  # /dev/null is a device
            raise ConfigError(path, None, "not a regular file (a FIFO, socket or directory"
                                          " cannot be a config)")
        with os.fdopen(fd, "rb") as f:  # still non-blocking: a tty must not hang us either
            fd = -1
            data = f.read(MAX_CONFIG_BYTES + len(_BOM) + 1)
        if data is None:
            raise ConfigError(path, None, "cannot read: a device with nothing to read")
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if data.startswith(_BOM):
        data = data[len(_BOM):]  # a UTF-8 byte order mark (Notepad): the text after it counts
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, None, f"larger than {MAX_CONFIG_BYTES} bytes")
    if b"\0" in data:  # (its line, as the users' files name it: routes._text)
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise ConfigError(path, line, "contains NUL bytes (not a text file)")
    try:
        return decode_config_text(data)
    except NotUtf8 as exc:
        raise ConfigError(path, exc.line, "not valid UTF-8 (outside a comment)") from None


class NotUtf8(ValueError):
    def __init__(self, line: int) -> None:
        super().__init__(f"line {line}: not valid UTF-8")
        self.line = line


def decode_config_text(data: bytes, bad_lines: list[int] | None = None) -> str:
    """The text of a file in the config grammar (sendooway.conf, a user's
    .sendoowayrc): UTF-8, but a comment may hold other bytes (the original
    read bytes, and its configs were written in Latin-1 too: "# Größe"),
    which become U+FFFD. The grammar drops everything from '#' on, even
    in a password (that byte cannot be part of a UTF-8 sequence), so no
    value changes. A leading byte order mark is skipped. Raises NotUtf8
    naming the first line whose text before its '#' is not UTF-8; with
    `bad_lines` (a user's include, whose bad lines are skipped one by one)
    such a line becomes empty and its number is added there instead."""
    if data.startswith(_BOM):
        data = data[len(_BOM):]  # a UTF-8 byte order mark (Notepad): the text after it counts
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        text, hash_, comment = raw.partition(b"#")
        try:
            lines.append(text.decode("utf-8") + hash_.decode() + comment.decode("utf-8", "replace"))
        except UnicodeDecodeError:
            if bad_lines is None:
                raise NotUtf8(number) from None
            bad_lines.append(number)
            lines.append("")
    return "\n".join(lines)


def load_config(path: str) -> Config:
    """Read and parse the global config. `/dev/null` gives all defaults."""
    return parse_config(read_text(path), path)


def effective_mappings(global_cfg: Config, user_cfg: UserConfig | None) -> tuple[Mapping, ...]:
    """User mappings first, then global ones; the defaults when neither has any."""
    own = user_cfg.smarthostMapping if user_cfg else ()
    combined = tuple(own) + tuple(global_cfg.smarthostMapping)
    return combined or DEFAULT_MAPPINGS


def default_localname(cfg: Config) -> str:
    """localname, or this host's name when it is empty."""
    return cfg.localname or host_name()


@functools.lru_cache(maxsize=1)
def host_name() -> str:
    """This host's name as `hostname -f` finds it: gethostname(), or its
    canonical name when that is a fuller one. Not socket.getfqdn(): it takes
    the first name of the host's address in /etc/hosts, `localhost` on many
    machines (127.0.0.1 localhost ... vm), which upstreams refuse in EHLO.
    Looked up once (a name lookup per session would block the loop)."""
    import socket

    name = socket.gethostname() or os.uname().nodename
    if "." not in name:
        try:
            canonical = socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)[0][3]
        except (OSError, IndexError, UnicodeError):
            canonical = ""
        if "." in canonical and not canonical.lower().startswith("localhost"):
            name = canonical
    return name
