"""Adversarial review of the authenticator/shared changes since f3e34e3
(fetchmail aliases, remarks and value-skipping; getmail sections; service
names; a user's own sslCA travelling with the route; SIGHUP reload;
backend_refusal; exposed_passwords). Each test failed against the code as
reviewed, for the reason its docstring gives; each is fixed."""

from __future__ import annotations

import os
import signal
import time

import pytest

from sendooway_auth import _users
from sendooway_auth._files import MAX_FILES
from sendooway_auth._reader import lookup_direct
from sendooway_auth.fetchmail import parse_fetchmailrc
from sendooway_shared.config import parse_config
from sendooway_shared.protocol import RouteOk
from tests.auth_helpers import (  # noqa: F401 - daemon is a fixture
    Daemon, daemon, login, route,
)

F = "/home/alice/.fetchmailrc"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


# ------------------------------------------------------------ ~/.fetchmailrc


def test_no_envelope_does_not_swallow_the_user_keyword():
    """fetchmail's `no envelope` (rcfile_y.y: `NO ENVELOPE`, a server option
    without a value) is followed, in a normal poll line, by `user`. The new
    _VALUE_WORDS rule makes `envelope` skip the next token whatever it is, so
    `user` is eaten, fetchmail's user is lost and the account is refused
    ("account has no upstream user"): every message of that address gets
    550. Before today's change (and in the original, which read
    keyword/value pairs: (no, envelope) (user, alice)) it worked.
    fetchmail.py parse_fetchmailrc, the `elif word in _VALUE_WORDS` branch."""
    text = (
        "poll pop.example.org proto pop3 no envelope\n"
        '  user "alice" pass "fm-Secret-7"\n'
        '#sendooway:server "smtp.example.org"\n'
        "#sendooway:tls\n"
        '#sendooway:address "alice@example.org"\n'
    )
    r = parse_fetchmailrc(text, F)
    assert r.errors == [], r.errors
    (a,) = r.accounts
    assert (a.route.user, a.route.password.reveal()) == ("alice", "fm-Secret-7")


def test_unquoted_directive_value_with_a_hash_is_not_cut_into_another_password():
    """`#sendooway:pass s3cr#et`: the new remark rule cuts the value at the
    `#`, so the upstream is sent the password "s3cr" — other credentials
    than the file says, silently (no error, no warning; --check shows a
    masked password). The original took an unquoted value up to the next
    blank (glue.c: `while (*end > ' ')`), and so did this parser before
    today: a `#` starts a remark only where a value would start.
    fetchmail.py _lex: `_split_comment(body[len(PREFIX):])`."""
    text = (
        'poll pop.example.org proto pop3 user "alice" pass "fm-Secret-7"\n'
        "#sendooway:server smtp.example.org\n"
        "#sendooway:user alice\n"
        "#sendooway:pass s3cr#et\n"
        "#sendooway:tls\n"
        "#sendooway:address alice@example.org\n"
    )
    r = parse_fetchmailrc(text, F)
    (a,) = r.accounts
    assert a.route.password.reveal() == "s3cr#et"


# ------------------------------------------------------------ a user's own sslCA


@root_only
def test_own_sslca_with_the_maximum_of_mapping_files_still_answers(clean_homes):
    """A lookup may read MAX_FILES (32) mapping files plus the userInclude,
    and from_wire accepts MAX_FILES + 1 file rows. The user's own sslCA is
    now one more row (routes.plan: `found.files.append(("sslCA", ...))`),
    so 32 mapping files + include + sslCA = 34 rows: from_wire refuses the
    whole answer ("bad list"), the lookup is `failed`, every message of the
    user gets a temporary failure forever and the worker is killed each
    time — exactly what _cap promises never happens ("whatever a user's
    files hold the answer passes from_wire"). --check shows only
    "lookup failed: reader child answered garbage"."""
    world = clean_homes
    world.write_user_file("alice", "certs/ca.pem", open(world.ca_file).read())
    rc = ["sslCA = certs/ca.pem",
          "smarthostMapping = direct:alice@example.org smtp.example.org 587 alice"
          " i-Secret-8 tls"]
    rc += [f"smarthostMapping = getmail:%h/.getmail/rc{i}" for i in range(MAX_FILES)]
    world.write_user_file("alice", ".sendoowayrc", "\n".join(rc) + "\n")
    cfg = parse_config("userInclude = %h/.sendoowayrc\n", "sendooway.conf")
    found = lookup_direct(cfg, _users.lookup("alice"))
    assert not found.incomplete, found.failure
    route = found.route_for("alice@example.org").route
    assert route.ca_pem == open(world.ca_file).read()


def _ca_bundle(limit: int = 8100) -> str:
    """Real CA certificates, as many as fit in `limit` octets (a bundle)."""
    import trustme
    out = ""
    while True:
        pem = trustme.CA().cert_pem.bytes().decode()
        if len(out) + len(pem) > limit:
            return out
        out += pem


@root_only
def test_own_sslca_within_its_limit_never_turns_the_route_into_a_permanent_550(
        daemon, world):
    """Every field is within its own limit — ca_pem ≤ 8192 (routes.MAX_CA_PEM,
    RouteOk.LIMITS), ca_file and source ≤ 4096, user and password ≤ 1024 —
    but together they exceed the 16 KiB frame: encode() raises, and
    _connection turns that into `no_route` ("route unusable" in the log),
    which the frontend answers 550 5.7.1: a permanent bounce for a
    configuration the docs accept. --check reports the route as fine (it
    never encodes it), so the admin cannot see why. The sslCA's own checks
    (_take_ca) look at its size alone."""
    home = world.users["alice"].home
    deep = "/".join(["d" * 200] * 18)  # a deep (but legal) directory, ~3.6 KiB
    bundle = _ca_bundle()
    world.write_user_file("alice", f"{deep}/ca.pem", bundle)
    world.write_user_file("alice", f"{deep}/getmailrc", (
        "[sender]\n"
        "type = SimpleSMTPTLSSender\n"
        "server = smtp.example.org\n"
        f"username = {'u' * 900}\n"
        f"password = {'p' * 900}\n"
        "address = alice@example.org\n"))
    world.write_user_file("alice", ".sendoowayrc", (
        f"sslCA = {deep}/ca.pem\n"
        f"smarthostMapping = getmail:%h/{deep}/getmailrc\n"))
    d = daemon("userInclude = %h/.sendoowayrc\n")
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password).TYPE == "auth_ok"
    answer = route(ch, "alice@example.org")
    ch.close()
    assert "route unusable" not in d.log(), d.log()[-600:]
    assert isinstance(answer, RouteOk), answer
    # 16 KiB cannot hold it all: the certificates are left out (the frontend
    # opens ca_file itself, or fails TLS: 454, temporary), never a 550
    assert answer.ca_pem == "" and answer.ca_file == os.path.join(home, deep, "ca.pem")
    assert "its sslCA certificates are left out" in d.log()
    # and --check says so
    import io

    from sendooway_auth.check import report
    from sendooway_shared.config import parse_config
    out = io.StringIO()
    report(parse_config("userInclude = %h/.sendoowayrc\n", "c"), "alice", "alice@example.org", out)
    assert "too big to send with its sslCA certificates" in out.getvalue(), out.getvalue()
    assert "p" * 900 not in out.getvalue() and bundle not in out.getvalue()


@root_only
def test_a_long_expanded_sslca_is_the_users_error_not_a_temporary_failure(clean_homes):
    """`sslCA` in ~/.sendoowayrc is now %h/%u-expanded and joined to the home
    (routes.plan) with no bound on the result, and then sent as ca_file in
    the answer; from_wire accepts 8192 characters. A value of ~900
    characters with %h in it grows past that: the whole answer is refused
    ("bad string"), so every message of the user gets a temporary failure
    forever and the user's direct mapping, which is fine, is never used;
    the user's error has no file:line (_cap's promise again). The path
    cannot even be opened (over PATH_MAX): it should be reported like an
    over-long mapping path ("skipped: path longer than 4096")."""
    world = clean_homes
    world.write_user_file("alice", ".sendoowayrc", (
        "sslCA = " + "%h/" * 300 + "ca.pem\n"
        "smarthostMapping = direct:alice@example.org smtp.example.org 587 alice"
        " i-Secret-8 tls\n"))
    cfg = parse_config("userInclude = %h/.sendoowayrc\n", "sendooway.conf")
    found = lookup_direct(cfg, _users.lookup("alice"))
    assert not found.incomplete, found.failure
    assert any("sslCA" in e for e in found.errors), found.errors


@root_only
def test_only_the_certificates_of_the_own_sslca_travel_to_the_frontend(clean_homes):
    """docs/protocol.md: `ca_pem` "holds the certificates of the user's own
    sslCA file". routes._take_ca sends the whole file verbatim once it
    contains one BEGIN CERTIFICATE line: with a combined PEM (certificate +
    private key, a common bundle) the user's private key leaves a 0600 file
    in a 0700 home for the network-facing frontend (nobody), which never
    needs it and could never read it before; any other text of any file the
    user names goes along too (up to 8 KiB)."""
    import trustme
    world = clean_homes
    ca = trustme.CA()
    leaf = ca.issue_cert("client.example.org")
    bundle = ca.cert_pem.bytes().decode() + leaf.private_key_pem.bytes().decode()
    world.write_user_file("alice", "certs/bundle.pem", bundle)
    world.write_user_file("alice", ".sendoowayrc", (
        "sslCA = certs/bundle.pem\n"
        "smarthostMapping = direct:alice@example.org smtp.example.org 587 alice"
        " i-Secret-8 tls\n"))
    cfg = parse_config("userInclude = %h/.sendoowayrc\n", "sendooway.conf")
    found = lookup_direct(cfg, _users.lookup("alice"))
    route = found.route_for("alice@example.org").route
    assert "BEGIN CERTIFICATE" in route.ca_pem
    assert ("PRIVATE KEY" in route.ca_pem) is False, "the private key goes to the frontend"


@root_only
def test_own_sslca_with_a_non_ascii_remark_is_used(clean_homes):
    """CA files copied out of Mozilla-derived bundles (certifi's cacert.pem,
    ca-certificates) keep their remark lines, some in UTF-8 ("# Issuer:
    CN=NetLock Arany (Class Gold) Főtanúsítvány"). OpenSSL, which read the
    file before (the frontend, and the original), ignores text outside the
    PEM blocks. routes._take_ca decodes the whole file as ASCII, so such a
    file is refused with a misleading "no PEM certificate in it", no
    ca_pem is sent, and the frontend (nobody) is left to open a path in a
    0700 home: every TLS message of the user fails."""
    world = clean_homes
    remark = "# Issuer: CN=NetLock Arany (Class Gold) F\u0151tan\u00fas\u00edtv\u00e1ny\n"
    world.write_user_file("alice", "certs/ca.pem", remark + open(world.ca_file).read())
    world.write_user_file("alice", ".sendoowayrc", (
        "sslCA = certs/ca.pem\n"
        "smarthostMapping = direct:alice@example.org smtp.example.org 587 alice"
        " i-Secret-8 tls\n"))
    cfg = parse_config("userInclude = %h/.sendoowayrc\n", "sendooway.conf")
    found = lookup_direct(cfg, _users.lookup("alice"))
    assert found.errors == [], found.errors
    route = found.route_for("alice@example.org").route
    assert open(world.ca_file).read() in route.ca_pem


# ------------------------------------------------------------ SIGHUP


def _hup(d: Daemon, reloads: int, timeout: float = 5.0) -> str:
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        log = d.log()
        if log.count("reloaded ") + log.count("reload failed") >= reloads:
            return log
        assert d.proc.poll() is None, f"SIGHUP ended the daemon ({d.proc.returncode}):\n{log}"
        assert time.monotonic() < deadline, f"no reload logged:\n{log}"
        time.sleep(0.02)


@root_only
def test_reload_error_for_a_mapping_without_its_kind_does_not_log_the_password(daemon):
    """An admin adds a direct mapping and forgets the `direct:` prefix, then
    sends SIGHUP. The new reload path logs the ConfigError text
    (`reload failed, old config kept: ...`, _server.Runtime.reload), and
    _parse_mapping's message quotes everything before the first colon —
    here the whole line, upstream password included ("got 'alice@... alice
    Rl-Secret-9 tls'"). parse_direct takes care never to show PASS; this
    message does not. (The same text goes to stderr at start-up and, for a
    line in ~/.sendoowayrc, to the `user file error` log and --check.)"""
    d = daemon("validUser = alice\n")
    with open(d.config_path, "w") as f:
        f.write("validUser = alice\n"
                "smarthostMapping = alice@example.org smtp.example.org 587 alice"
                " Rl-Secret-9 tls\n")
    log = _hup(d, 1)
    assert "reload failed, old config kept" in log
    assert "Rl-Secret-9" not in log, log[-400:]


@root_only
def test_a_sighup_while_stopping_does_not_kill_the_daemon(daemon, world):
    """SIGHUP is handled only while the event loop runs: asyncio.run() removes
    its handlers when it returns (SIGHUP back to SIG_DFL), and run_daemon then
    still closes the workers (up to 1 s), the PAM pool and the fork server,
    removes the socket and logs `stopped`. A SIGHUP in that window (a
    logrotate postrotate or `systemctl reload` meeting a stop) kills the
    daemon with status 129, no `stopped` line, its socket left behind —
    the very failure bb3ca96 set out to remove. _server.run_daemon."""
    world.write_user_file("alice", ".fetchmailrc", "poll x\n")
    d = daemon("validUser = alice\n")
    ch = d.connect()
    assert login(ch, "alice", world.users["alice"].password).TYPE == "auth_ok"
    route(ch, "alice@example.org")  # a worker exists: closing it is part of the stop
    d.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while d.proc.poll() is None and time.monotonic() < deadline:
        try:
            d.proc.send_signal(signal.SIGHUP)  # reloads until the stop; must never kill
        except ProcessLookupError:
            break
        time.sleep(0.001)
    assert d.proc.wait(10) == 0, f"status {d.proc.returncode}; log:\n{d.log()[-500:]}"
    assert not os.path.exists(d.socket_path)
    assert "stopped" in d.log()
