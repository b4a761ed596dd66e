"""sendooway.conf parsing: every keyword, defaults, errors with file:line."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendooway_shared.config import (
    DEFAULT_MAPPINGS,
    AuthBackend,
    Config,
    ConfigError,
    Ext8BitMime,
    MailerEncryption,
    MappingKind,
    SmarthostAuth,
    effective_mappings,
    expand_path,
    load_config,
    parse_config,
    parse_direct,
    parse_user_config,
)
from sendooway_shared.types import TlsMode

# The example shipped with the original C sendooway (its keywords and values;
# comments shortened).
ORIGINAL_EXAMPLE = """\
###########################################################
# Every option is given by the following syntax:          #
# keyword = [value]                                       #
###########################################################

# Which host name should be send to remote systems?
localname =

# Read timeout for both client and server connections in seconds
timeout = 30

cloneEhlo = yes
addReceivedField = yes

sslCA   =
sslCert = /etc/ssl/certs/sendooway.crt
sslKey  = /etc/ssl/certs/sendooway.key

mailerEncryption = allowed
ext8BitMime = ignore
extMessageSize = 52428800

smarthostPlain   = ifAdvertised
smarthostLogin   = ifAdvertised
smarthostCramMD5 = alwaysTry

ValidUser = %users

smarthostMapping = fetchmail:%h/.fetchmailrc
smarthostMapping = getmail:%h/.getmail/getmailrc
smarthostMapping = direct:foobar@example.com smtp.example.com foo secret

userInclude = %h/.sendoowayrc
"""


def test_defaults_from_dev_null():
    cfg = load_config("/dev/null")
    assert cfg == Config(filename="/dev/null")
    assert cfg.timeout == 300
    assert cfg.mailerEncryption is MailerEncryption.ALLOWED
    assert cfg.ext8BitMime is Ext8BitMime.FORCE
    assert cfg.extMessageSize == 0
    assert cfg.smarthostCramMD5 is SmarthostAuth.IF_ADVERTISED
    assert cfg.authBackend is AuthBackend.PAM
    assert cfg.authSocket == "/run/sendooway/auth.sock"
    assert cfg.frontendUser == "nobody"
    assert cfg.pamService == "sendooway"
    assert cfg.maxAuthFailures == 3
    assert cfg.smarthostCache == 30
    assert cfg.userInclude == ""
    assert cfg.validUser == ()
    assert effective_mappings(cfg, None) == DEFAULT_MAPPINGS


def test_original_example_parses():
    cfg = parse_config(ORIGINAL_EXAMPLE, "sendooway.conf")
    assert cfg.localname == ""
    assert cfg.timeout == 30
    assert cfg.cloneEhlo is True
    assert cfg.addReceivedField is True
    assert cfg.sslCA == ""
    assert cfg.sslCert == "/etc/ssl/certs/sendooway.crt"
    assert cfg.ext8BitMime is Ext8BitMime.IGNORE
    assert cfg.extMessageSize == 52428800
    assert cfg.smarthostCramMD5 is SmarthostAuth.ALWAYS_TRY
    assert cfg.validUser == ("%users",)
    kinds = [m.kind for m in cfg.smarthostMapping]
    assert kinds == [MappingKind.FETCHMAIL, MappingKind.GETMAIL, MappingKind.DIRECT]
    direct = cfg.smarthostMapping[2].direct
    assert direct.address == "foobar@example.com"
    assert direct.route.server == "smtp.example.com"
    assert direct.route.user == "foo"
    assert direct.route.password.reveal() == "secret"
    assert direct.route.source == "sendooway.conf:31"
    assert cfg.userInclude == "%h/.sendoowayrc"


def test_keywords_and_values_case_insensitive():
    cfg = parse_config(
        "MAILERENCRYPTION = REQUIRED\ncloneehlo = YES\nsmarthostcrammd5 = NEVER\n"
        "authbackend = pam\next8bitmime = Disable\nextMessageSize = DISABLE\n",
        "c",
    )
    assert cfg.mailerEncryption is MailerEncryption.REQUIRED
    assert cfg.cloneEhlo is True
    assert cfg.smarthostCramMD5 is SmarthostAuth.NEVER
    assert cfg.authBackend is AuthBackend.PAM
    assert cfg.ext8BitMime is Ext8BitMime.DISABLE
    assert cfg.extMessageSize is None


def test_new_keywords():
    cfg = parse_config(
        "authSocket = /tmp/a.sock\nfrontendUser = mailproxy\npamService = smtp\n"
        "maxAuthFailures = 5\nsmarthostCache = 0\n",
        "c",
    )
    assert (cfg.authSocket, cfg.frontendUser, cfg.pamService) == ("/tmp/a.sock", "mailproxy", "smtp")
    assert (cfg.maxAuthFailures, cfg.smarthostCache) == (5, 0)


def test_proxy_protocol_networks():
    assert parse_config("", "c").proxyProtocol == ()
    assert parse_config("proxyProtocol =\n", "c").proxyProtocol == ()
    cfg = parse_config("proxyProtocol = 10.0.0.5, 10.0.1.0/28\t2001:DB8::/32,,\n"
                       "PROXYPROTOCOL = ::ffff:192.0.2.0/120\n", "c")
    assert [str(n) for n in cfg.proxyProtocol] == [
        "10.0.0.5/32", "10.0.1.0/28", "2001:db8::/32", "192.0.2.0/24"]  # every line adds


def test_every_validuser_line_counts():
    cfg = parse_config("validUser = alice\nvalidUser = %staff\n\nvalidUser = bob\n", "c")
    assert cfg.validUser == ("alice", "%staff", "bob")


def test_comments_and_blank_lines():
    cfg = parse_config("# only comments\n   \n\ttimeout = 12 # trailing\n", "c")
    assert cfg.timeout == 12


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("timeout = 30\nsmarthostMaping = x\n", 2, "did you mean 'smarthostMapping'"),
        ("frobnicate = 1\n", 1, "unknown keyword (the line is not shown)"),
        ("timeout = soon\n", 1, "timeout: expected a number"),
        ("timeout = 0\n", 1, "timeout"),
        ("cloneEhlo = maybe\n", 1, "expected yes or no"),
        ("mailerEncryption = sometimes\n", 1, "allowed | required | forbidden"),
        ("ext8BitMime = yes\n", 1, "force | disable | ignore"),
        ("smarthostPlain = always\n", 1, "ifAdvertised | alwaysTry | never"),
        ("authBackend = kerberos\n", 1, "PAM | LDAP | none"),
        ("extMessageSize = big\n", 1, "disable, 0 or a size"),
        ("\n\nno equals sign here\n", 3, "expected 'keyword = value'"),
        ("smarthostMapping = imap:/x\n", 1, "fetchmail:, getmail: or direct:"),
        ("smarthostMapping = direct:a@b.c host\n", 1, "direct mapping needs"),
        ("smarthostMapping = direct:nodomain host u p\n", 1, "address must be"),
        ("smarthostMapping =\n", 1, "a value is required"),
        ("maxAuthFailures = 0\n", 1, "maxAuthFailures"),
        ("validUser = two words\n", 1, "validUser"),
        ("timeout = 9\nproxyProtocl = 10.0.0.5\n", 2, "did you mean 'proxyProtocol'"),
        ("proxyProtocol = lb.example.org\n", 1, "proxyProtocol: expected IP addresses or networks"),
        ("proxyProtocol = 10.0.0.5 10.0.0.256\n", 1, "got '10.0.0.256'"),
        ("proxyProtocol = 10.0.0.5;10.0.0.6\n", 1, "got '10.0.0.5;10.0.0.6'"),
        ("proxyProtocol = fe80::1%eth0\n", 1, "got 'fe80::1%eth0'"),
        ("proxyProtocol = 10.0.0.0/33\n", 1, "got '10.0.0.0/33'"),
        ("proxyProtocol = 10.0.0.5/24\n", 1, "host bits set: write 10.0.0.0/24"),
        ("proxyProtocol = 0.0.0.0/0\n", 1, "would trust every address"),
        ("\nproxyProtocol = 2001:db8::1 ::/0\n", 2, "would trust every address"),
    ],
)
def test_errors_name_file_and_line(text, line, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/sendooway.conf")
    err = info.value
    assert err.line == line
    assert str(err).startswith(f"/etc/sendooway.conf:{line}: ")
    assert fragment in str(err)


def test_direct_error_never_shows_password():
    with pytest.raises(ConfigError) as info:
        parse_config("smarthostMapping = direct:x@y.z h 99999 u Sup3rS3cret\n", "c")
    assert "Sup3rS3cret" not in str(info.value)
    assert "port" in str(info.value)


def test_unreadable_and_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.conf"))
    assert "nope.conf" in str(info.value) and "cannot read" in str(info.value)
    binary = tmp_path / "bin.conf"
    binary.write_bytes(b"timeout = 3\n\x00\x01")
    with pytest.raises(ConfigError, match="NUL"):
        load_config(str(binary))
    latin = tmp_path / "latin.conf"
    latin.write_bytes(b"timeout = 3\nlocalname = caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(latin))
    assert info.value.line == 2


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}: not a regular file")


def test_fifo_is_not_a_config_and_does_not_hang(tmp_path):
    """A FIFO nobody writes to would block open() for ever (and in the
    daemon a reload runs on the event loop that serves every login)."""
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as info:
        load_config(str(fifo))
    assert str(info.value).startswith(f"{fifo}: not a regular file")


def test_a_utf8_byte_order_mark_is_skipped(tmp_path):
    conf = tmp_path / "bom.conf"
    conf.write_bytes(b"\xef\xbb\xbftimeout = 30\nlocalname = x.example\n")
    cfg = load_config(str(conf))
    assert cfg.timeout == 30 and cfg.localname == "x.example"
    conf.write_bytes(b"\xef\xbb\xbftimeout = 30\ntimout = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(conf))
    assert ":2: unknown keyword 'timout'" in str(info.value)  # lines counted as before


def test_an_original_config_with_latin1_comments_loads(tmp_path):
    """The original read bytes; its configs carry comments in Latin-1
    ("# Größe"). A comment's bytes no longer stop the service (they did:
    "not valid UTF-8"); a value that is not UTF-8 is still an error with
    its line, as the password it would be cannot be sent as it was written."""
    conf = tmp_path / "latin1.conf"
    conf.write_bytes("# Nachrichtengr\xf6\xdfe begrenzen\r\ntimeout = 30 # Sekunden f\xfcr".encode("latin-1")
                     + b"\r\nlocalname = x.example\r\n")
    cfg = load_config(str(conf))
    assert cfg.timeout == 30 and cfg.localname == "x.example"
    conf.write_bytes(b"timeout = 30\nlocalname = gr\xf6\xdfe.example # ok\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(conf))
    assert ":2: not valid UTF-8" in str(info.value)


def test_an_auth_socket_path_too_long_for_a_unix_socket_is_a_config_error(tmp_path):
    conf = tmp_path / "sock.conf"
    conf.write_text("authSocket = /run/" + "s" * 110 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(conf))
    assert ":1: " in str(info.value) and "too long for a UNIX socket" in str(info.value)


# ------------------------------------------------------------ direct mappings


@pytest.mark.parametrize(
    "value, server, port, mode, user, auth, check",
    [
        ("a@b.c smtp.b.c u p", "smtp.b.c", 25, TlsMode.PLAIN, "u", True, True),
        ("a@b.c smtp.b.c u p tls", "smtp.b.c", 587, TlsMode.STARTTLS, "u", True, True),
        ("a@b.c smtp.b.c u p ssl,noCertCheck", "smtp.b.c", 465, TlsMode.TLS, "u", True, False),
        ("a@b.c smtp.b.c 2525 u p", "smtp.b.c", 2525, TlsMode.PLAIN, "u", True, True),
        ("a@b.c smtp.b.c 2525 u p TLS", "smtp.b.c", 2525, TlsMode.STARTTLS, "u", True, True),
        ("*@b.c relay.b.c 25 noAuth", "relay.b.c", 25, TlsMode.PLAIN, "", False, True),
        ("* relay.b.c noauth,tls", "relay.b.c", 587, TlsMode.STARTTLS, "", False, True),
    ],
)
def test_direct_forms(value, server, port, mode, user, auth, check):
    d = parse_direct(value)
    r = d.route
    assert (r.server, r.port, r.tls, r.user, r.auth, r.cert_check) == (
        server, port, mode, user, auth, check)


def test_direct_password_is_secret():
    d = parse_direct("a@b.c h u hunter2")
    assert "hunter2" not in repr(d)
    assert d.route.password.reveal() == "hunter2"


@pytest.mark.parametrize("value, fragment", [
    ("a@b.c smtp.b.c:587 u p tls", "the port goes in a field of its own"),
    ("a@b.c [IPv6:2001:db8::1] u p", "without the IPv6: prefix"),
    ("a@b.c smtp..b.c 587 u p tls", "not a valid host name"),
    ("a@b.c .b.c 587 u p", "not a valid host name"),
])
def test_direct_server_that_cannot_be_one_is_refused(value, fragment):
    """`SERVER:PORT` was taken for a server name (and the next field for the
    port or the user); a name with an empty label failed only at connect."""
    with pytest.raises(ValueError, match=fragment):
        parse_direct(value)
    for fine in ("a@b.c [::1] 25 u p", "a@b.c ::1 25 u p", "a@b.c smtp.b.c. u p",
                 "a@b.c stra\u00dfe.test u p"):
        parse_direct(fine)


@pytest.mark.parametrize("value", [
    "a@b.c relay.lan 25 u s3cret tls,foo",   # six fields: the last are the flags
    "a@b.c relay.lan u s3cret TLS,nocert",    # five, no port: the same
])
def test_direct_unknown_flag_is_named_as_such_without_the_field(value):
    """An unknown flag beside a known one was "(6 fields given)" or "the
    port must be a number" (an outside review): now it says what is wrong,
    never showing the field (the password's neighbour)."""
    with pytest.raises(ValueError, match="flags hold one sendooway does not know") as caught:
        parse_direct(value)
    assert "foo" not in str(caught.value) and "nocert" not in str(caught.value)


@pytest.mark.parametrize("value", [
    "a@b.c relay.lan 25 u s3cret secure",     # a word that is no flag
    "a@b.c relay.lan 25 u s3cret [tls]",      # the man page's brackets copied
])
def test_direct_sixth_field_that_is_no_flag_is_blamed_not_the_count(value):
    """Six fields is the full form's count: a last field that is no flag at
    all was answered "(6 fields given)", as if the count were wrong."""
    with pytest.raises(ValueError, match="sixth field must be the flags") as caught:
        parse_direct(value)
    assert "fields given" not in str(caught.value)
    assert "secure" not in str(caught.value) and "tls]" not in str(caught.value)


def test_direct_password_with_a_comma_and_a_flag_word_is_still_a_password():
    """Where the last field is the password by its place (a port before the
    user), `p,tls` stays a password, as it was."""
    for value in ("a@b.c relay.lan 25 u p,tls", "a@b.c relay.lan submission u p,tls"):
        d = parse_direct(value)
        assert d.route.password.reveal() == "p,tls" and d.route.tls is TlsMode.PLAIN


def test_direct_tls_and_ssl_exclusive():
    with pytest.raises(ValueError, match="exclude"):
        parse_direct("a@b.c h u p tls,ssl")


# ------------------------------------------------------------ user includes


def test_user_include_allows_only_mappings_and_sslca():
    ucfg = parse_user_config(
        "sslCA = /home/a/ca.pem\nsmarthostMapping = direct:me@x.org smtp.x.org me pw tls\n",
        "/home/a/.sendoowayrc",
    )
    assert ucfg.sslCA == "/home/a/ca.pem"
    assert ucfg.smarthostMapping[0].source == "/home/a/.sendoowayrc:2"
    with pytest.raises(ConfigError) as info:
        parse_user_config("timeout = 5\n", "/home/a/.sendoowayrc")
    assert str(info.value).startswith("/home/a/.sendoowayrc:1: ")
    assert "not allowed in a user include" in str(info.value)
    with pytest.raises(ConfigError, match="did you mean 'smarthostMapping'"):
        parse_user_config("smarthostmappings = direct:a@b.c h u p\n", "rc")
    with pytest.raises(ConfigError, match="rc:2: 'proxyProtocol' is not allowed in a user include"):
        parse_user_config("sslCA = /x\nproxyProtocol = 10.0.0.5\n", "rc")


def test_user_mappings_come_first():
    cfg = parse_config("smarthostMapping = direct:*@x.org global.x.org g gp\n", "c")
    ucfg = parse_user_config("smarthostMapping = direct:me@x.org mine.x.org m mp\n", "rc")
    mappings = effective_mappings(cfg, ucfg)
    assert [m.direct.route.server for m in mappings] == ["mine.x.org", "global.x.org"]


def test_expand_h_and_u():
    assert expand_path("%h/.fetchmailrc", "alice", "/home/alice/") == "/home/alice/.fetchmailrc"
    assert expand_path("/etc/sendooway/%u.rc", "bob", "/home/bob") == "/etc/sendooway/bob.rc"
    assert expand_path("100%%/%x", "a", "/h") == "100%/%x"
    m = parse_config("smarthostMapping = getmail:%h/.getmail/%u.rc\n", "c").smarthostMapping[0]
    assert m.expand("carol", "/home/carol").path == "/home/carol/.getmail/carol.rc"
    assert m.path == "%h/.getmail/%u.rc"  # the template is kept


# ------------------------------------------------------------ random input

_config_line = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda k, v: f"{k} = {v}",
        st.sampled_from([
            "timeout", "cloneEhlo", "mailerEncryption", "smarthostMapping", "validUser",
            "extMessageSize", "userInclude", "smarthostCramMD5", "maxAuthFailures", "bogus",
        ]),
        st.text(max_size=60),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_config_line, max_size=8))
def test_random_lines_give_config_or_config_error(lines):
    text = "\n".join(lines)
    try:
        cfg = parse_config(text, "fuzz.conf")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.conf")
    else:
        assert isinstance(cfg, Config)
    try:
        parse_user_config(text, "fuzz.rc")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.rc")


@pytest.mark.parametrize("line", ["timeout = \u00b2", "timeout = " + "9" * 5000,
                                  "extMessageSize = \u0663", "extMessageSize = " + "1" * 30])
def test_odd_numbers_get_a_plain_error(line, tmp_path):
    """`²` and U+0663 pass str.isdigit() but are no numbers, and 5000
    digits make int() talk about sys.set_int_max_str_digits(): each used to
    reach the admin as Python's own message."""
    conf = tmp_path / "n.conf"
    conf.write_text(line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(conf))
    msg = str(info.value)
    assert msg.startswith(f"{conf}:1: ") and "expected" in msg, msg
    assert "int" not in msg and len(msg) < 300, msg


def test_a_comment_glued_to_a_word_of_a_mapping_is_a_warning(tmp_path):
    """The original's rule stays ('#' starts a comment anywhere, so this
    mapping has password `pa` and no tls flag: plain SMTP), but it is no
    longer silent: a warning names the line, at start, at a reload and in
    --check. A comment after a blank, or on another keyword, is fine."""
    from sendooway_shared.config import config_warnings

    conf = tmp_path / "c.conf"
    conf.write_text("localname = mx.example # ours\n"
                    "smarthostMapping = direct:*@x.example s.x.example 587 u pa#ss-Word tls\n"
                    "smarthostMapping = direct:*@y.example s.y.example 587 u pw tls # y\n")
    os.chmod(conf, 0o600)
    cfg = load_config(str(conf))
    assert cfg.smarthostMapping[0].direct.route.password.reveal() == "pa"
    warnings = config_warnings(cfg)
    assert len(warnings) == 1 and warnings[0].startswith(f"{conf}:2: the '#' right after a word")
    assert "ss-Word" not in warnings[0]


def test_direct_user_that_looks_like_a_port_is_warned():
    """`direct:* smtp.example.org 587 name` (the password left out) is the
    original's port-less form: user "587", password "name". It fails only
    at the upstream's AUTH; the config warning says so, without the
    password field."""
    from sendooway_shared.config import config_warnings

    cfg = parse_config("smarthostMapping = direct:* smtp.example.org 587 someone\n"
                       "smarthostMapping = direct:a@example.org smtp.example.org 587 u1 p1\n"
                       "smarthostMapping = direct:b@example.org smtp.example.org 25 noAuth\n",
                       "c.conf")
    warned = [w for w in config_warnings(cfg) if "looks like a port" in w]
    assert len(warned) == 1, warned
    assert warned[0].startswith("c.conf:1: smarthostMapping: upstream user '587'")
    assert "someone" not in warned[0]
