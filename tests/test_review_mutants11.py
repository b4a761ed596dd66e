"""Mutation review of the frontend's per-address limit (_limits.py), its
MAIL/RCPT path and EHLO name syntax (_address.py), the authenticator's
per-connection driver (sendooway_auth/_connection.py) and authBackend =
LDAP (sendooway_auth/_ldap.py): each test here fails on a hand-made mutant
that the rest of the suite let live, and passes on the real code."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil

import pytest

from sendooway_shared.smtp_syntax import (
    PathError, host_a_label, is_ehlo_name, parse_params, parse_path, split_path_argument,
)
from sendooway_front._limits import AddressLimit
from sendooway_shared.protocol import AuthOk, AuthRequest, Error, NoRoute
from sendooway_shared.types import Secret
from tests.auth_helpers import all_passwords, checked_daemons, closed_after, login, raw_frame, route


def _root_only():
    if os.geteuid() != 0:
        pytest.skip("the authenticator runs as root")


def _path(text: str, *, null: bool = False, postmaster: bool = False, utf8: bool = False) -> str:
    return parse_path(text, allow_null=null, allow_postmaster=postmaster, utf8=utf8)


# ------------------------------------------------------------ maxSessionsPerAddress


def _in_loop(fn):
    """Run `fn` in an event loop, as the frontend does (the refusal's Tally
    needs one)."""
    async def body():
        return fn()
    return asyncio.run(body())


def test_the_limit_admits_exactly_limit_sessions_and_frees_a_slot_on_leave(caplog):
    _in_loop(lambda: _admits_limit(caplog))


def _admits_limit(caplog):
    """Two sessions of 192.0.2.5 with maxSessionsPerAddress = 2, the third
    refused (and said in the log); one leaving lets one more in; when all
    left nothing of the address is kept."""
    limits = AddressLimit(2)
    caplog.set_level(logging.WARNING, logger="sendooway")
    first, k1 = limits.enter("192.0.2.5")
    second, k2 = limits.enter("::ffff:192.0.2.5")  # the same client, mapped
    assert first and second and k1 == k2 == "192.0.2.5"
    assert limits.enter("192.0.2.5") == (False, None)
    assert "maxSessionsPerAddress (2) reached, the latest by 192.0.2.5" in caplog.text
    assert limits.enter("192.0.2.6")[0], "another address is not held back"
    limits.leave(k1)
    assert limits.enter("192.0.2.5") == (True, "192.0.2.5")
    assert limits.enter("192.0.2.5") == (False, None)
    for _ in range(2):
        limits.leave("192.0.2.5")
    limits.leave("192.0.2.6")
    assert limits.open == {}


def test_a_limit_of_one_is_one_session_and_zero_is_no_limit():
    _in_loop(_one_and_zero)


def _one_and_zero():
    one = AddressLimit(1)
    assert one.enter("2001:db8::1")[0]
    assert one.enter("2001:db8::2") == (False, None)  # the same /64
    unlimited = AddressLimit(0)
    assert all(unlimited.enter("192.0.2.9") == (True, None) for _ in range(5))
    assert unlimited.open == {}


def test_uncounted_clients_leave_without_error():
    """Loopback and non-IP clients (a UNIX socket, stdio) are not counted,
    and their session's end (leave(None)) is no error."""
    limits = AddressLimit(1)
    for client in ("127.0.0.1", "::1", "unix", ""):
        ok, key = limits.enter(client)
        assert ok and key is None
        limits.leave(key)
    assert limits.open == {}


# ------------------------------------------------------------ MAIL FROM / RCPT TO paths


def test_the_keyword_needs_its_colon():
    with pytest.raises(PathError, match="missing FROM:"):
        split_path_argument("FROM <alice@example.org>", "FROM")
    with pytest.raises(PathError, match="missing TO:"):
        split_path_argument("TOO:<alice@example.org>", "TO")
    assert split_path_argument("to:<a@example.org>", "TO") == ("<a@example.org>", "")


def test_spaces_after_the_colon_are_tolerated_a_tab_is_not():
    # (two spaces got 501 before the Postfix differential review)
    assert split_path_argument("FROM: <a@example.org>", "FROM") == ("<a@example.org>", "")
    assert split_path_argument("FROM:   <a@example.org> SIZE=1", "FROM") == ("<a@example.org>", "SIZE=1")
    with pytest.raises(PathError, match="angle brackets"):
        split_path_argument("FROM: \t<a@example.org>", "FROM")
    with pytest.raises(PathError, match="angle brackets"):
        split_path_argument("FROM:  a@example.org", "FROM")


def test_parameters_come_back_without_their_leading_blanks():
    assert split_path_argument("FROM:<a@example.org>  SIZE=10 ", "FROM") == (
        "<a@example.org>", "SIZE=10")


def test_a_quoted_gt_does_not_close_the_path():
    assert split_path_argument('TO:<"a>b"@example.org> NOTIFY=NEVER', "TO") == (
        '<"a>b"@example.org>', "NOTIFY=NEVER")
    with pytest.raises(PathError, match="unterminated"):
        split_path_argument('TO:<"a\\"@example.org>', "TO")


def test_the_path_limit_counts_octets_not_characters():
    """256 octets: 250 characters of which some take two octets in UTF-8
    are over it."""
    local = "ä" * 60 + "a" * (256 - len("<@example.org>") - 120)
    assert len(f"<{local}@example.org>".encode()) == 256
    assert _path(f"<{local}@example.org>", utf8=True) == f"{local}@example.org"
    with pytest.raises(PathError, match="256"):
        _path(f"<ä{local[1:]}a@example.org>", utf8=True)


def test_null_and_postmaster_only_where_allowed():
    assert _path("<>", null=True) == ""
    with pytest.raises(PathError, match="null path"):
        _path("<>")
    assert _path("<Postmaster>", postmaster=True) == "Postmaster"
    with pytest.raises(PathError):
        _path("<postmaster>")


def test_a_source_route_needs_at_signs_and_domains():
    assert _path("<@relay.example,@b.example:alice@example.org>") == "alice@example.org"
    with pytest.raises(PathError, match="source route"):
        _path("<@relay.example,xrelay.example:alice@example.org>")
    with pytest.raises(PathError, match="source route"):
        _path("<@relay.example,@:alice@example.org>")


@pytest.mark.parametrize("path", [
    "<@example.org>", "<...@example.org>", "<a b@example.org>", "<alice@example.org.>",
    "<alice@exa_mple.org>", "<alice@_mx.example.org>", "<alice@-example.org>",
    "<alice@example-.org>",
    '<"a\\\x00"@example.org>', '<"a\\b\\"@example.org>', '<"a"b"@example.org>',
    "<alice@[1.2.3.4]]>", "<alice@[[1.2.3.4]>", "<alice@>", "<alice>",
    "<a\u2028b@example.org>",
])
def test_malformed_paths_are_refused(path):
    with pytest.raises(PathError):
        _path(path, utf8=True)


@pytest.mark.parametrize("path, mailbox", [
    ('<"a@b"@example.org>', '"a@b"@example.org'),
    ("<a.@example.org>", "a.@example.org"),
    ("<alice@[192.0.2.1]>", "alice@[192.0.2.1]"),
    ("<alice@[IPv6:2001:db8::1]>", "alice@[IPv6:2001:db8::1]"),
    ('<"a\\"b"@example.org>', '"a\\"b"@example.org'),
])
def test_well_formed_paths_are_taken(path, mailbox):
    assert _path(path) == mailbox


def test_a_non_ascii_address_under_smtputf8_is_taken():
    assert _path("<jörg@bücher.example>", utf8=True) == "jörg@bücher.example"


# ------------------------------------------------------------ ESMTP parameters


def test_parameters_keywords_values_and_repeats():
    assert parse_params("size=10 BODY=8BITMIME SMTPUTF8") == {
        "SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}
    for bad in ("SIZE=", "-X=1", "SIZE=1 size=2", "SIZE=1  BODY=7BIT", "X=a\x7f"):
        with pytest.raises(Exception) as info:
            parse_params(bad)
        assert type(info.value).__name__ == "ParamError", bad


# ------------------------------------------------------------ server names and EHLO names


def test_a_server_name_with_a_trailing_dot_or_an_ipv6_literal_is_kept():
    assert host_a_label("smtp.example.org.") == "smtp.example.org."
    assert host_a_label("[2001:db8::1]") == "2001:db8::1"
    assert host_a_label("2001:db8::1") == "2001:db8::1"
    for bad in ("smtp..example.org", ".example.org", "a." * 127 + "bc"):
        with pytest.raises(ValueError):
            host_a_label(bad)


@pytest.mark.parametrize("name, ok", [
    ("[fe80::1%eth0]", False), ("[IPv6:fe80::1%eth0]", False), ("[ipv6:2001:db8::1]", True),
    ("[192.0.2.1%x]", False), ("DESKTOP_4F2A", False), ("_DESKTOP", False),
    ("mail-.example.org", False),
    ("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 63, True),
    ("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "e", False),
    ("[]", False), ("", False), ("bücher.example", False),
])
def test_ehlo_names(name, ok):
    assert is_ehlo_name(name) is ok


# ------------------------------------------------------------ authBackend = LDAP


NORA_UID = 40310
NORA_PW = "Nora-Ldap-Pw-6"


@pytest.fixture(scope="module")
def directory(tmp_path_factory, world):
    """A real slapd holding accounts the authenticator must refuse (their
    files would be read as root or as nobody in particular) and ones to take
    (nora with a home of her own in the fake world)."""
    from tests.ldap_world import Person, Slapd, have_slapd

    if not have_slapd():
        pytest.skip("slapd is not installed (scripts/setup.sh)")
    _root_only()
    home = os.path.join(os.path.dirname(world.users["alice"].home), "nora-m11")
    os.makedirs(home, exist_ok=True)
    os.chown(home, NORA_UID, NORA_UID)
    server = Slapd(str(tmp_path_factory.mktemp("slapd11")), [
        Person("nora", NORA_PW, NORA_UID, NORA_UID, home),
        Person("mira", "Mira-Ldap-Pw-5", 40301, 40302, "/home/x/../mira/"),
        Person("gidzero", "Gz-Ldap-Pw-5", 40303, 0, "/home/gidzero"),
        Person("uidzero", "Uz-Ldap-Pw-5", 0, 40309, "/root"),
        Person("uidtop", "Ut-Ldap-Pw-5", 2**32 - 1, 40304, "/home/uidtop"),
        Person("gidtop", "Gt-Ldap-Pw-5", 40305, 2**32 - 1, "/home/gidtop"),
        Person("below", "Bt-Ldap-Pw-5", 2**32 - 2, 2**32 - 2, "/home/below"),
        Person("relhome", "Rh-Ldap-Pw-5", 40306, 40306, "home/relhome"),
        Person("sl/ash", "Sl-Ldap-Pw-5", 40307, 40307, "/home/slash"),
    ])
    yield server
    server.stop()
    shutil.rmtree(home, ignore_errors=True)


def _ldap_login(directory, name, password, uri=None):
    from sendooway_auth._ldap import login
    from sendooway_shared.config import parse_config
    from tests.ldap_world import AUTH_DN

    cfg = parse_config(f"authBackend = LDAP\nldapUri = {uri or directory.uri()}\n"
                       f"ldapSSLca = {directory.ca_file}\nldapAuthDN = {AUTH_DN}\n"
                       "timeout = 5\n", "sendooway.conf")
    return login(cfg, name, Secret(password))


def test_a_directory_account_is_served_with_its_home_normalised_and_its_group(directory):
    user, reason = _ldap_login(directory, "mira", "Mira-Ldap-Pw-5")
    assert reason == "" and user is not None
    assert (user.name, user.uid, user.gid, user.home) == ("mira", 40301, 40302, "/home/mira")
    assert tuple(user.groups) == (40302,)


@pytest.mark.parametrize("name, password, reason", [
    ("gidzero", "Gz-Ldap-Pw-5", "ldap-root-account"),
    ("uidzero", "Uz-Ldap-Pw-5", "ldap-root-account"),
    ("uidtop", "Ut-Ldap-Pw-5", "ldap-root-account"),
    ("gidtop", "Gt-Ldap-Pw-5", "ldap-root-account"),
    ("relhome", "Rh-Ldap-Pw-5", "ldap-entry-incomplete"),
    ("sl/ash", "Sl-Ldap-Pw-5", "ldap-entry-incomplete"),
])
def test_entries_that_cannot_be_served_safely_are_refused(directory, caplog, name, password,
                                                          reason):
    """uid 0 (files read as root) even with another group, gid 0 (with
    root's group), uid/gid 4294967295 (the
    "no id" of setresuid: nothing would change), a relative home, a user
    name holding a '/': refused, and why is in the log."""
    caplog.set_level(logging.INFO, logger="sendooway-auth")
    assert _ldap_login(directory, name, password) == (None, reason)
    assert "ldap: user=" in caplog.text and password not in caplog.text


def test_the_highest_usable_ids_are_served(directory):
    user, reason = _ldap_login(directory, "below", "Bt-Ldap-Pw-5")
    assert reason == "" and (user.uid, user.gid) == (2**32 - 2, 2**32 - 2)


def test_an_upper_case_ldaps_scheme_is_still_tls(directory):
    """`LDAPS://` is ldaps: (URI schemes are case-insensitive), not a
    cleartext bind sent to the TLS port."""
    uri = directory.uri().replace("ldaps://", "LDAPS://")
    user, reason = _ldap_login(directory, "mira", "Mira-Ldap-Pw-5", uri=uri)
    assert reason == "" and user.uid == 40301


def test_an_empty_name_is_never_a_bind(directory):
    assert _ldap_login(directory, "", "Mira-Ldap-Pw-5") == (None, "empty-password")


# ------------------------------------------------------------ one authenticator connection


@pytest.fixture
def auth_daemon(tmp_path, tmp_config, clean_homes):
    """start(conf) -> a started sendooway-auth; at the end each is stopped
    and its log checked for passwords (nora's LDAP one too) and internal
    errors."""
    yield from checked_daemons(tmp_path, tmp_config,
                               all_passwords(clean_homes) + ["wrong-Pw-zz", NORA_PW])


def test_a_silent_connection_is_told_why_it_is_closed(auth_daemon):
    """Before closing a connection that sent no hello within `timeout`, the
    authenticator says so in an error (a frontend stuck before its hello
    logs why its link went away)."""
    _root_only()
    d = auth_daemon("timeout = 1\n")
    ch = d.connect(timeout=15)
    reply = ch.receive()
    assert isinstance(reply, Error) and reply.reason == "closed: no hello within 1s", reply
    assert closed_after(ch)


def test_the_client_named_in_hello_is_the_one_logged(auth_daemon, world):
    """The failed login's log line names the client the frontend gave in
    hello (and the backoff counts it), not an empty one."""
    _root_only()
    d = auth_daemon()
    ch = d.connect()
    reply = login(ch, "alice", "wrong-Pw-zz", client="192.0.2.77", session="s-77")
    assert reply.TYPE == "auth_fail"
    log = d.wait_log("auth failed: user=alice")
    assert "client=192.0.2.77 " in log and "session=s-77" in log, log[-800:]


def test_too_many_failures_is_logged_once_at_the_last_failure(auth_daemon, world):
    _root_only()
    d = auth_daemon("maxAuthFailures = 2\n")
    ch = d.connect()
    assert login(ch, "alice", "wrong-Pw-zz").TYPE == "auth_fail"
    d.wait_log("auth failed: user=alice")
    assert "too-many-failures" not in d.log()
    assert ch.request(AuthRequest("alice", Secret("wrong-Pw-zz"))).TYPE == "auth_fail"
    assert closed_after(ch)
    log = d.wait_log("reason=too-many-failures")
    assert log.count("too-many-failures") == 1, log[-1500:]
    assert "auth closed: user=alice client=192.0.2.7 reason=too-many-failures failures=2" in log


def test_a_quote_sent_by_the_peer_cannot_end_the_logged_reason(auth_daemon):
    """The reason is logged in double quotes: a quote coming from the peer
    (here in a message type) is replaced, so the line still parses."""
    _root_only()
    d = auth_daemon()
    ch = d.connect()
    ch.sock.sendall(raw_frame({"type": 'x" forged="1'}))
    reply = ch.receive()
    assert isinstance(reply, Error)
    log = d.wait_log("connection closed:")
    line = next(line for line in log.splitlines() if "connection closed:" in line)
    assert line.endswith("reason=\"protocol error: unexpected message type 'x? forged=?1'\""), line


def test_a_login_name_the_directory_folds_routes_for_the_account_it_names(auth_daemon,
                                                                          directory):
    """`NORA` binds as uid=nora (the directory compares names without case)
    and is the account `nora`: the connection's routes are for that
    account, answered, not an internal error."""
    from tests.ldap_world import AUTH_DN

    d = auth_daemon(f"authBackend = LDAP\nldapUri = {directory.uri()}\n"
               f"ldapSSLca = {directory.ca_file}\nldapAuthDN = {AUTH_DN}\n")
    ch = d.connect()
    reply = login(ch, "NORA", NORA_PW)
    assert isinstance(reply, AuthOk) and reply.user == "nora", reply
    assert isinstance(route(ch, "nora@example.org"), NoRoute)
    assert "route: " in d.wait_log("route: ")


def _rest_of(ch) -> list:
    """Every frame the authenticator still sends before it closes."""
    from sendooway_shared.protocol import REPLIES, FrameDecoder

    ch.sock.settimeout(10)
    data = b""
    while chunk := ch.sock.recv(65536):
        data += chunk
    return FrameDecoder(REPLIES).feed(data)


def test_an_unsupported_version_gets_an_error_and_nothing_else(auth_daemon):
    """hello of another version: an error naming both versions, then the
    connection closes; no welcome follows the error."""
    from sendooway_shared.protocol import VERSION, Hello

    _root_only()
    d = auth_daemon()
    ch = d.connect()
    ch.send(Hello(VERSION + 1, "s-v", "192.0.2.7"))
    frames = _rest_of(ch)
    assert [type(f) for f in frames] == [Error], frames
    assert f"unsupported protocol version {VERSION + 1}" in frames[0].reason


def test_a_route_whose_ca_certificates_do_not_fit_is_sent_without_them(caplog):
    """A user's sslCA bundle over the frame's room: the route still goes
    out (the frontend opens ca_file itself), with a warning; a route too
    big for other reasons is refused, without that warning."""
    from sendooway_auth._connection import sendable
    from sendooway_shared.protocol import ProtocolError
    from sendooway_shared.types import Route, TlsMode

    caplog.set_level(logging.WARNING, logger="sendooway-auth")
    big_ca = Route("smtp.example.org", 587, TlsMode.STARTTLS, ca_file="/home/alice/ca.pem",
                   user="a", password=Secret("Ca-pw-11"), source="/home/alice/.sendoowayrc:3",
                   ca_pem="-----BEGIN CERTIFICATE-----\n" + "A" * 9000)
    reply = sendable(big_ca)
    assert reply.ca_pem == "" and reply.server == "smtp.example.org" and reply.port == 587
    assert "its sslCA certificates are left out" in caplog.text
    assert "Ca-pw-11" not in caplog.text
    caplog.clear()
    too_long = Route("smtp.example.org", 587, TlsMode.STARTTLS, source="x" * 5000)
    with pytest.raises(ProtocolError):
        sendable(too_long)
    assert "left out" not in caplog.text


def test_an_internationalized_server_name_keeps_its_sharp_s():
    """IDNA 2008 (non-transitional): straße.test is xn--strae-oqa.test, not
    strasse.test (another host, which would get the SNI and the check)."""
    assert host_a_label("straße.test") == "xn--strae-oqa.test"
    assert host_a_label("BÜCHER.example") == "xn--bcher-kva.example"
    with pytest.raises(ValueError):
        host_a_label("bü..example")


@pytest.mark.parametrize("name", ["#nora", "nora+uid=nora", 'nora"', "nora;x", "nora,cn=x"])
def test_dn_syntax_in_a_login_name_is_a_refusal_not_an_outage(directory, caplog, name):
    """A name holding DN syntax is escaped into the RDN value (RFC 4514):
    no such entry, a refused login; unescaped it made a DN the directory
    or ldap3 rejects, which came out as "no directory answered" (454 to
    the client, an error line for the admin) at the client's will."""
    caplog.set_level(logging.INFO, logger="sendooway-auth")
    assert _ldap_login(directory, name, NORA_PW) == (None, "wrong-password")
    assert "no directory answered" not in caplog.text


def test_an_empty_password_is_never_a_bind(directory):
    """A simple bind with a DN and no password is an unauthenticated bind
    (RFC 4513 5.1.2): refused before the directory is asked."""
    assert _ldap_login(directory, "nora", "") == (None, "empty-password")


def test_a_directory_certificate_from_another_ca_is_named_as_such(directory, tmp_path, caplog):
    """ldapSSLca not the directory's CA: a temporary failure, and the log
    tells the admin it is the trust (ldapSSLca), not the name or a
    network fault."""
    import trustme

    from sendooway_auth._ldap import login
    from sendooway_shared.config import parse_config
    from tests.ldap_world import AUTH_DN

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    cfg = parse_config(f"authBackend = LDAP\nldapUri = {directory.uri()}\nldapSSLca = {other}\n"
                       f"ldapAuthDN = {AUTH_DN}\ntimeout = 5\n", "sendooway.conf")
    caplog.set_level(logging.INFO, logger="sendooway-auth")
    assert login(cfg, "nora", Secret(NORA_PW)) == (None, "ldap-unavailable")
    assert "the server's certificate is not trusted (ldapSSLca)" in caplog.text, caplog.text
    assert NORA_PW not in caplog.text
