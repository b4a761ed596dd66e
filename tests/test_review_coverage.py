"""Coverage-guided review: product code that no test executed.

Reviewed: sendooway_front, sendooway_auth and sendooway_shared, measured
over the whole suite with coverage.py (line + branch) in every process the
suite starts: pytest's workers, the daemons (`sendooway`, `sendooway-auth`,
also under nss_wrapper/pam_wrapper and after the drop to nobody), and the
authenticator's forked fork server and reader workers.

Figures (statements + branches, coverage.py's combined percentage, the
whole suite with pytest-xdist as scripts/test.sh runs it): before this
review 94.5% overall (sendooway_auth 93.2%, sendooway_front 94.9%,
sendooway_shared 96.5%; lines alone 95.1%); after it 95.6% (95.0%, 95.3%,
98.1%; lines 96.1%), with the dead code it removed (AuthLink.hello,
Stream.sockname and .writelines, the blocking CA-file branch of
cached_client_context) no longer counted.

What this file tests (each was run by no test before): a user's file that
breaks the rules in ways the parsers name but no test fed them (fetchmail
directives with the wrong number of values or a bad flag value, getmail
keys holding octets that are not UTF-8, a ~/.sendoowayrc with octets that
are not UTF-8 or more errors than are reported, a mapping path too long,
an account with more addresses than the cap); the root side's check of a
reader child's answer (a child runs as the user: its answer is not
trusted) and of an empty or NUL user name; config errors (ldapUri forms, a
config that cannot be read, a `direct:` mapping too short, a line with no
keyword); `sendooway-auth`'s refusals of contradictory options, of a log it
cannot open, of a socket directory it cannot make, and its start under
systemd with a file as fd 3 or two sockets; a frontendUser that does not
exist and an abstract NOTIFY_SOCKET; `--check` with authBackend = none and
with LDAP for an unknown name; the PAM service-file warning outside
pam_wrapper; the frontend's TLS key of another type than its certificate,
a -b name that does not resolve, mailerEncryption = required with no
certificate, and a descriptor from systemd that is not a socket (a defect,
fixed: see that test); the session core's PAUSED / closed contract and a
driver's misuse of fail_message; a RCPT with a UTF-8 address without
SMTPUTF8; a client that hangs up inside a refused DATA; an upstream that
refuses AUTH LOGIN outright; an upstream name lookup that never answers;
the redaction of secrets in str() and repr().

Left uncovered on purpose: OS failures that cannot be provoked without
fault injection (ENOMEM from calloc in the PAM conversation, prctl or
setresuid not taking effect, fstat/listdir/unlink/getgrouplist failing,
memfd_create missing, a peer gone while we refuse it); bug guards that
raise on our own misuse (a session paused with no event, the fork server's
wire between daemon and fork server); LDAP bind refusals other than a
wrong password and an entry unreadable after the bind (the slapd of
tests/ldap_world.py would need other ACLs). Not recorded by coverage.py
though run by the suite: lines after os.fork() in the same frame, reader
workers that end by a signal, and processes started with an environment
of their own (systemd-socket-activate -E, xinetd, the systemd-nspawn
container), e.g. the frontend serving a listening socket from systemd
(test_deploy_front's Accept=no test).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time

import msgpack
import pytest
import trustme

from sendooway_auth import check as auth_check
from sendooway_auth import cli as auth_cli
from sendooway_auth import _ldap, _pam, _users
from sendooway_auth._reader import lookup_direct
from sendooway_auth.fetchmail import parse_fetchmailrc
from sendooway_auth.getmail import parse_getmailrc
from sendooway_auth.routes import UserRoutes, WireError, from_wire, to_wire
from sendooway_front._pool import PoolKey
from sendooway_front._reply import Reply
from sendooway_shared.cli import EXIT_CONFIG
from sendooway_shared.config import (
    ConfigError, SmarthostAuth, ldap_problems, parse_config, read_text,
)
from sendooway_shared.protocol import REPLIES, AuthOk, BlockingChannel
from sendooway_shared.types import Secret, TlsMode
from tests.auth_helpers import login
from tests.front_harness import Harness, plain
from tests.front_util import FRONT, open_tmp, stdio_session
from tests.fakeworld import free_port
from tests.upstream import capture_log, config, route_for, run, send

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="switching users needs root")
SECRET = "Cov-Secret-7Qz"
R_TEMP = Reply(451, ("4.3.0 test",))


# ------------------------------------------------------------ fetchmailrc directives

FM_HEAD = 'poll pop.example.org proto pop3 user "u" password "p"\n#sendooway:server "smtp.example.org"\n'


@pytest.mark.parametrize("line,message", [
    ("#sendooway:tls maybe", "#sendooway:tls takes no value or one of yes/no/true/false/on/off/1/0"),
    ("#sendooway:port 587 25", "#sendooway:port must be a number from 1 to 65535 or a service name"),
    ('#sendooway:server "a.example" "b.example"', "#sendooway:server needs exactly one value"),
    (f'#sendooway:pass "{SECRET}" "again"', "#sendooway:pass needs exactly one value"),
])
def test_fetchmail_directive_with_a_wrong_value_count_is_an_error_at_its_line(line, message):
    text = FM_HEAD + line + '\n#sendooway:address "u@example.org"\n'
    result = parse_fetchmailrc(text, "rc")
    assert result.errors == [f"rc:3: {message}"]
    assert result.accounts == []
    assert SECRET not in "".join(result.errors)


def test_fetchmail_address_with_two_values_is_refused():
    result = parse_fetchmailrc(FM_HEAD + '#sendooway:address "a@example.org" "b@example.org"\n', "rc")
    assert result.errors == ["rc:3: #sendooway:address needs exactly one address"]
    assert result.accounts == []


# ------------------------------------------------------------ getmail rc: octets that are not UTF-8

GM_BASE = ("[retriever]\nserver = pop.example.org\nusername = u\npassword = p\n"
           "[sender]\naddress = u@example.org\n")


@pytest.mark.parametrize("key,value", [
    ("type", "SimpleSMTP\udcffSender"),
    ("port", "58\udcff7"),
    ("no_certificate_check", "tru\udcffe"),
    ("username", "u\udcff"),
])
def test_getmail_used_value_that_is_not_utf8_is_named_with_its_line(key, value):
    """Octets that are not UTF-8 come to the parser as surrogates (routes._text)."""
    text = GM_BASE + ("" if key == "type" else "type = SimpleSMTPSender\n") + f"{key} = {value}\n"
    line = text.count("\n")
    result = parse_getmailrc(text, "g.rc")
    assert result.errors == [f"g.rc:{line}: [sender] {key}: not valid UTF-8 (only comment lines"
                             " may hold other octets)"]
    assert result.accounts == []


# ------------------------------------------------------------ a reader child's answer is checked

def _alice() -> _users.UserInfo:
    return _users.UserInfo("alice", 40001, 40001, "/home/alice", (40001,))


def _good_wire() -> dict:
    return msgpack.unpackb(to_wire(UserRoutes(_alice())), raw=False)


@pytest.mark.parametrize("damage", [
    lambda o: o.update(ca_file=7),                              # not a string
    lambda o: o.update(errors="not a list"),                    # not a list
    lambda o: o.update(warnings=["w"] * 1000),                  # a list too long
    lambda o: o.update(accounts=[[["a@x"], "smtp.x", 25, "plain", "yes", "", "u", "p", True,
                                  "rc:1", 0]]),                 # cert_check not a boolean
    lambda o: o.update(accounts=[[["a@x"], "smtp.x", 25, "plain", True, "", "u", "p", True,
                                  "rc:1", 0, "extra"]]),        # a row too long
    lambda o: o.update(files=[["fetchmail", "/p", "ok", "", 0o600, 40001]]),  # a row too short
])
def test_a_reader_childs_answer_that_breaks_the_format_is_refused(damage):
    obj = _good_wire()
    assert from_wire(msgpack.packb(obj, use_bin_type=True), _alice()).accounts == []
    damage(obj)
    with pytest.raises(WireError):
        from_wire(msgpack.packb(obj, use_bin_type=True), _alice())


def test_a_reader_childs_answer_too_long_is_refused_before_decoding():
    with pytest.raises(WireError, match="answer too long"):
        from_wire(b"\x00" * ((8 << 20) + 1), _alice())


# ------------------------------------------------------------ ~/.sendoowayrc read as the user

@needs_root
def test_sendoowayrc_not_utf8_outside_a_comment_is_an_error_and_gives_no_route(clean_homes):
    world = clean_homes
    path = world.write_user_file(
        "alice", ".sendoowayrc",
        b"# caf\xe9 in a comment is fine\n"
        b"smarthostMapping = direct:alice@example.org smtp.example.org 587 alice p\xe9ss tls\n")
    cfg = parse_config("userInclude = %h/.sendoowayrc\n", "test.conf")
    found = lookup_direct(cfg, _users.lookup("alice"))
    assert f"{path}:2: not valid UTF-8 (outside a comment), line skipped" in found.errors
    assert not any(a.route.server == "smtp.example.org" for a in found.accounts)


@needs_root
def test_sendoowayrc_with_too_many_errors_is_ignored_whole(clean_homes):
    world = clean_homes
    bad = "".join(f"smarthostMaping{i} = x\n" for i in range(60))
    good = "smarthostMapping = direct:alice@example.org smtp.example.org 587 alice pw tls\n"
    path = world.write_user_file("alice", ".sendoowayrc", good + bad)
    cfg = parse_config("userInclude = %h/.sendoowayrc\n", "test.conf")
    found = lookup_direct(cfg, _users.lookup("alice"))
    assert f"{path}: more than 50 errors, file ignored" in found.errors
    assert len(found.errors) == 51
    assert found.accounts == []  # the good line of an ignored file does not count


# ------------------------------------------------------------ the config

@pytest.mark.parametrize("uri,problem", [
    ("ldap://[::1", "not an LDAP URI"),
    ("ldap://dir.example:99999", "not an LDAP URI"),
    ("ldap:///", "no server name"),
    ("ldap://dir.example/dc=example", "only a server and port may be given"),
    ("ldap://dir.example:0", "port 0"),
])
def test_bad_ldap_uri_keeps_the_ldap_backend_from_starting(uri, problem):
    cfg = parse_config(f"authBackend = LDAP\nldapUri = {uri}\nldapAuthDN = uid=%u,dc=example\n",
                       "s.conf")
    assert ldap_problems(cfg) == [f"s.conf:2: {uri}: {problem}"]
    refusal = cfg.backend_refusal(0)
    assert refusal is not None and f"{uri}: {problem}" in refusal


def test_config_that_cannot_be_read_and_keyword_missing():
    with pytest.raises(ConfigError, match=r"^/proc/self/mem: cannot read: "):
        read_text("/proc/self/mem")
    with pytest.raises(ConfigError, match=r"s\.conf:2: missing keyword before '='"):
        parse_config("timeout = 30\n= 5\n", "s.conf")
    with pytest.raises(ConfigError, match=r"s\.conf:1: smarthostMapping: direct mapping needs"
                                          r" ADDRESS SERVER \[PORT\] USER PASS \[FLAGS\]$"):
        parse_config("smarthostMapping = direct:a@example.org\n", "s.conf")


# ------------------------------------------------------------ sendooway-auth's command line

@pytest.mark.parametrize("args,message", [
    (["--check", "alice", "--socket", "/tmp/x.sock"], "--check cannot be combined with --fd or --socket"),
    (["--fd", "3", "--socket", "/tmp/x.sock"], "--fd and --socket exclude each other"),
    (["--socket", ""], "--socket needs a path"),
    (["--fd", "3", "--exit-with-parent"], "--exit-with-parent is for the daemon"),
    (["--failure-delay", "61"], "--failure-delay must be from 0 to 60 seconds"),
    (["--failure-delay", "-1"], "--failure-delay must be from 0 to 60 seconds"),
    (["--pam-threads", "0"], "--pam-threads must be from 1 to 256"),
    (["--pam-threads", "257"], "--pam-threads must be from 1 to 256"),
])
def test_auth_cli_refuses_contradictory_options(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        auth_cli.main(["-c", "/dev/null", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_auth_daemon_with_a_log_it_cannot_open_says_so_and_exits_with_config_error(tmp_path):
    r = subprocess.run([os.path.join(os.path.dirname(FRONT), "sendooway-auth"), "-c", "/dev/null",
                        "-l", str(tmp_path / "no" / "such" / "auth.log"),
                        "--socket", str(tmp_path / "auth.sock")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == EXIT_CONFIG
    assert f"sendooway-auth: cannot open log {tmp_path}/no/such/auth.log: No such file" in r.stderr
    assert not (tmp_path / "auth.sock").exists()


# ------------------------------------------------------------ --check

@needs_root
def test_check_with_backend_none_notes_that_only_the_process_user_logs_in(clean_homes):
    cfg = parse_config("authBackend = none\n", "test.conf")
    out = io.StringIO()
    auth_check.report(cfg, "alice", None, out)
    # root refuses authBackend = none: that is said, and then no note
    assert "authBackend = none logs in the account" in out.getvalue()
    assert "note: authBackend = none accepts only" not in out.getvalue()


def test_check_with_backend_none_for_another_user_says_who_is_accepted(monkeypatch):
    """As a non-root sendooway-auth would run it (backend_refusal passes)."""
    cfg = parse_config("authBackend = none\n", "test.conf")
    monkeypatch.setattr(os, "geteuid", lambda: 40001)
    out = io.StringIO()
    auth_check.report(cfg, "bob", None, out)
    text = out.getvalue()
    assert f"note: authBackend = none accepts only {_users.process_user()}" in text
    assert "result: not checked: only root may read bob's files" in text


def test_check_with_ldap_for_an_unknown_name_explains_nss_only():
    cfg = parse_config("authBackend = LDAP\nldapUri = ldap://dir.example\n"
                       "ldapAuthDN = uid=%u,dc=example\n", "test.conf")
    out = io.StringIO()
    code = auth_check.report(cfg, "no-such-user-here", None, out)
    text = out.getvalue()
    assert "account: no-such-user-here does not exist" in text
    assert "--check knows NSS accounts only" in text
    assert code != 0


# ------------------------------------------------------------ small pure pieces

def test_pam_error_reason_with_a_garbled_code_is_not_temporary():
    assert _pam.is_temporary("pam-error-x") is False
    assert _pam.is_temporary("pam-unavailable") is True


@pytest.mark.parametrize("uid,gid", [("40001x", "40001"), ("40001", None), ("40001", ["x"])])
def test_ldap_entry_with_ids_that_are_not_numbers_is_refused(uid, gid):
    attrs = {"uid": ["alice"], "uidNumber": [uid], "gidNumber": gid if isinstance(gid, list) else [gid],
             "homeDirectory": ["/home/alice"]}
    account, why = _ldap._account(attrs, "uid=alice,dc=example", "alice")
    assert account is None and why == "ldap-entry-incomplete"


def test_secrets_are_redacted_in_str_and_repr():
    s = Secret(SECRET)
    assert SECRET not in str(s) and SECRET not in repr(s) and SECRET not in f"{s}"
    key = PoolKey("smtp.example.org", 587, TlsMode.STARTTLS, True, "", True, "u", s, "relay.test")
    assert SECRET not in repr(key) and "smtp.example.org:587" in repr(key)
    cfg = parse_config(f"smarthostMapping = direct:a@example.org smtp.example.org 587 u {SECRET}\n",
                       "s.conf")
    (mapping,) = cfg.smarthostMapping
    assert SECRET not in str(mapping) and str(mapping).startswith("direct:a@example.org ")


# ------------------------------------------------------------ the SMTP session (sans-IO)

def _logged_in() -> Harness:
    h = Harness()
    h.feed(b"EHLO client.test\r\n")
    assert h.feed(f"AUTH PLAIN {plain('alice', 'alice-secret')}\r\n".encode()).startswith(b"235 ")
    return h


@pytest.mark.parametrize("bytewise", [False, True])
def test_rcpt_with_a_utf8_address_without_smtputf8_gets_553(bytewise):
    h = _logged_in()
    assert h.feed(b"MAIL FROM:<alice@example.org>\r\n", bytewise).startswith(b"250 ")
    reply = h.feed("RCPT TO:<j\u00f6rg@example.org>\r\n".encode(), bytewise)
    assert reply == b"553 5.6.7 Non-ASCII address needs SMTPUTF8\r\n"
    assert h.feed(b"RCPT TO:<r@example.org>\r\n", bytewise).startswith(b"250 ")
    rcpts = [e.recipient for e in h.events if type(e).__name__ == "RcptRequested"]
    assert rcpts == ["r@example.org"]  # the refused one never reached the relay


def test_client_hanging_up_inside_a_refused_message_closes_the_session_quietly():
    h = _logged_in()
    h.feed(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n")
    h.feed(b"Subject: x\r\nbare\nLF\r\nmore")  # a bare LF: the message is refused
    assert h.aborted == 1
    assert h.eof() == b""  # no reply to a client that is gone
    assert h.closed is not None and h.closed.reason == "client closed the connection during DATA"
    assert h.messages == []


# ------------------------------------------------------------ the upstream

def test_upstream_refusing_auth_login_outright_is_passed_on_and_no_password_sent(upstream_factory):
    """smarthostLogin = alwaysTry towards an upstream that offers PLAIN only
    (PLAIN and CRAM-MD5 turned off here): its 504 to AUTH LOGIN ends the
    login; neither the user name nor the password is sent."""
    up = upstream_factory(tls="starttls", accounts={"u": SECRET}, auth_mechanisms=("PLAIN",))
    cfg = config(smarthostPlain=SmarthostAuth.NEVER, smarthostCramMD5=SmarthostAuth.NEVER,
                 smarthostLogin=SmarthostAuth.ALWAYS_TRY)
    log, handler = capture_log()
    from sendooway_front._relay import Relay

    relay = Relay(cfg, log)

    async def go():
        replies = await send(relay, route_for(up), "alice@example.com", ["r@example.org"], b"x\r\n")
        await relay.close()
        return replies

    replies = run(go())
    # every refused upstream login is the same temporary 454 to the client
    assert replies["mail"].code == 454 and "rcpt" not in replies
    assert "AUTH as 'u' refused: LOGIN: 504" in handler.text
    assert up.logins == [] and up.failed_logins == [] and up.messages == []
    assert SECRET not in handler.text


# ------------------------------------------------------------ the frontend's own TLS key

def test_frontend_with_an_ec_key_for_an_rsa_certificate_refuses_to_start():
    """OpenSSL takes a key of another type than the certificate without a
    word (it goes to another slot); only the final check_privatekey sees
    it (a key of the same type that does not match is refused earlier)."""
    rsa = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert("mx.test", key_type=trustme.KeyType.RSA)
    ec = trustme.CA(key_type=trustme.KeyType.ECDSA).issue_cert("mx.test",
                                                              key_type=trustme.KeyType.ECDSA)
    with open_tmp() as tmp:
        cert, key = tmp / "rsa.pem", tmp / "ec.key"
        cert.write_bytes(rsa.cert_chain_pems[0].bytes())
        key.write_bytes(ec.private_key_pem.bytes())
        conf = tmp / "sendooway.conf"
        conf.write_text(f"sslCert = {cert}\nsslKey = {key}\nauthSocket = {tmp}/auth.sock\n")
        log = tmp / "front.log"
        port = free_port("127.0.0.1")
        r = subprocess.run([FRONT, "-c", str(conf), "-l", str(log), "-b", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == EXIT_CONFIG
        assert f"{conf}:2: {key}: the key does not match the certificate in {cert}" in log.read_text()


# ------------------------------------------------------------ the authenticator daemon's start

AUTH = [sys.executable, "-m", "sendooway_auth.cli"]


def _wait_ready(notify: socket.socket, proc: subprocess.Popen, timeout: float = 20) -> str:
    notify.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return notify.recv(256).decode()
        except socket.timeout:
            if proc.poll() is not None:
                break
    out, err = proc.communicate(timeout=5) if proc.poll() is not None else (b"", b"")
    raise AssertionError(f"not ready: {err!r}")


def test_auth_daemon_with_a_missing_frontend_user_and_an_abstract_notify_socket(tmp_path, tmp_config,
                                                                               world):
    """frontendUser names no account: the daemon says only root may connect
    and keeps its socket root's, 0600. NOTIFY_SOCKET=@name (an abstract
    socket, as some service managers pass it) gets READY=1."""
    conf = tmp_config("frontendUser = no-such-frontend-user\n")
    sock_path, log = tmp_path / "run" / "auth.sock", tmp_path / "auth.log"
    name = f"sendooway-cov-{os.getpid()}-{time.monotonic_ns()}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("\0" + name)
    proc = subprocess.Popen([*AUTH, "-c", conf, "-l", str(log), "--socket", str(sock_path),
                             "--failure-delay", "0"], env=dict(os.environ, NOTIFY_SOCKET="@" + name),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert "READY=1" in _wait_ready(notify, proc)
        st = os.stat(sock_path)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock_path))
        ch = BlockingChannel(s, REPLIES, timeout=15)
        assert login(ch, "bob", world.users["bob"].password) == AuthOk("bob")
        ch.close()
    finally:
        notify.close()
        proc.terminate()
        assert proc.wait(15) == 0
    assert ("frontendUser no-such-frontend-user does not exist: only root may connect"
            in log.read_text())


def _activated(tmp_path, conf: str, fds: list[int], count: str) -> subprocess.Popen:
    """sendooway-auth started as systemd starts it: `fds` become 3, 4, ...
    and LISTEN_PID is its own pid (the shell's, which then execs)."""
    script = f'export LISTEN_PID=$$ LISTEN_FDS={count}; exec "$@"'

    def place():
        for i, fd in enumerate(fds):
            os.dup2(fd, 3 + i)

    return subprocess.Popen(["sh", "-c", script, "sh", *AUTH, "-c", conf, "-l",
                             str(tmp_path / "act.log"), "--socket", str(tmp_path / "own" / "x.sock")],
                            preexec_fn=place, pass_fds=[3 + i for i in range(len(fds))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_socket_activation_with_a_file_as_fd_3_is_a_clear_startup_error(tmp_path, tmp_config):
    with open(tmp_path / "plain-file", "w") as f:
        proc = _activated(tmp_path, tmp_config(""), [f.fileno()], "1")
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_CONFIG
    assert "the descriptor systemd passed (fd 3) is not a socket" in err
    assert "Traceback" not in err
    assert not (tmp_path / "own").exists()


def test_socket_activation_with_two_sockets_serves_the_first_and_says_so(tmp_path, tmp_config, world):
    listeners = []
    for name in ("first.sock", "second.sock"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / name))
        s.listen(4)
        listeners.append(s)
    proc = _activated(tmp_path, tmp_config(""), [s.fileno() for s in listeners], "2")
    for s in listeners:
        s.close()
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(tmp_path / "first.sock"))
        ch = BlockingChannel(c, REPLIES, timeout=15)
        assert login(ch, "bob", world.users["bob"].password) == AuthOk("bob")
        ch.close()
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    assert "systemd passed 2 sockets; using the first" in (tmp_path / "act.log").read_text()
    assert not (tmp_path / "own").exists()


def test_auth_socket_in_a_directory_that_cannot_be_made_is_a_startup_error(tmp_path, tmp_config):
    r = subprocess.run([*AUTH, "-c", tmp_config(""), "-l", str(tmp_path / "a.log"),
                        "--socket", "/proc/sendooway-no-such/auth.sock"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == EXIT_CONFIG
    assert "sendooway-auth: cannot create /proc/sendooway-no-such: " in r.stderr


def test_frontend_given_a_file_instead_of_a_socket_by_systemd_says_no_usable_socket(tmp_path,
                                                                                   tmp_config):
    """Regression: a unit passing fd 3 that is not a socket made the
    frontend stop with a bare "Socket operation on non-socket" (exit 1); the
    message written for that case, "systemd passed no usable socket", was
    never reached."""
    conf = tmp_config("localname = mx.test\n")
    with open(tmp_path / "plain-file", "w") as f:
        script = 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@"'
        r = subprocess.run(["sh", "-c", script, "sh", FRONT, "-c", conf, "-l", "&2"],
                           preexec_fn=lambda: os.dup2(f.fileno(), 3), pass_fds=[3],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert "cannot start: systemd passed no usable socket" in r.stderr
    assert "non-socket" not in r.stderr and "Traceback" not in r.stderr


def test_mailer_encryption_required_without_a_certificate_warns_and_refuses_auth(tmp_path):
    with open_tmp() as tmp:
        conf = tmp / "sendooway.conf"
        conf.write_text(f"localname = mx.test\nmailerEncryption = required\n"
                        f"authSocket = {tmp}/none.sock\n")
        log = tmp / "front.log"
        out, _err, code = stdio_session([FRONT, "-c", str(conf), "-l", str(log)],
                                        b"EHLO c\r\nAUTH PLAIN " + plain("alice", SECRET).encode()
                                        + b"\r\nQUIT\r\n")
        assert code == 0
        assert b"\r\n538 5.7.11 " in out and b"STARTTLS" not in out
        assert ("mailerEncryption = required but no sslCert/sslKey and no -S: no client can log in"
                in log.read_text())
        assert SECRET not in log.read_text()


def test_upstream_name_lookup_that_hangs_is_a_temporary_failure(upstream_factory, monkeypatch):
    """A resolver that does not answer: the lookup is bounded by `timeout`
    and the client gets a temporary failure, not a hang."""
    real = socket.getaddrinfo

    def slow(host, *a, **kw):
        if host == "slow-dns.example" and not kw.get("flags", 0) & socket.AI_NUMERICHOST:
            time.sleep(2.5)
        return real(host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    up = upstream_factory(tls="plain")
    log, handler = capture_log()
    from sendooway_front._relay import Relay

    relay = Relay(config(timeout=1), log)

    async def go():
        replies = await send(relay, route_for(up, server="slow-dns.example"), "alice@example.com",
                             ["r@example.org"], b"x\r\n")
        await relay.close()
        return replies

    started = time.monotonic()
    replies = run(go())
    assert str(replies["mail"]) == "451 4.4.1 Upstream server unreachable, try again later"
    assert "rcpt" not in replies
    assert "slow-dns.example: name lookup timed out" in handler.text
    assert time.monotonic() - started < 10
    assert up.messages == []


# ------------------------------------------------------------ the session core's contract (sans-IO)

def test_session_core_answers_paused_while_a_reply_is_due_and_closed_for_ever_after():
    from sendooway_front._events import PAUSED, AuthRequested, ConnectionClosed
    from sendooway_front._session import LocalProtocolError, Session, SessionSettings

    s = Session(SessionSettings("mx.test", tls_available=False))
    s.start()
    s.receive_data(b"EHLO c\r\nAUTH PLAIN " + plain("alice", "pw").encode() + b"\r\n")
    events = []
    while not isinstance(ev := s.next_event(), AuthRequested):
        events.append(ev)
    assert s.next_event() is PAUSED and s.next_event() is PAUSED  # the answer is due first
    with pytest.raises(LocalProtocolError, match="fail_message in state"):
        s.fail_message(R_TEMP, "no DATA here")  # the driver's bug, said loudly
    s.auth_result("alice")
    s.receive_data(b"QUIT\r\n")
    while not isinstance(ev := s.next_event(), ConnectionClosed):
        pass
    assert s.next_event() is ev and s.next_event() is ev  # closed stays closed


# ------------------------------------------------------------ the authenticator's own checks

def test_account_lookup_refuses_an_empty_name_and_a_nul():
    """The authenticator re-checks what a (possibly compromised) frontend sends."""
    assert _users.lookup("") is None
    assert _users.lookup("alice\0root") is None
    assert _users.lookup("root") is not None


def _plan_with(files: dict[str, bytes], conf: str):
    from sendooway_auth._files import FileRead
    from sendooway_auth.routes import run_plan

    def read(paths):
        return [FileRead(p, "ok", "", 0o100600, 40001, len(files[p]), files[p]) if p in files
                else FileRead(p, "missing") for p in paths]

    return run_plan(parse_config(conf, "test.conf"), _alice(), read)


def test_a_mapping_path_too_long_is_skipped_with_an_error():
    from sendooway_auth._files import MAX_PATH

    long_path = "/home/alice/" + "d/" * (MAX_PATH // 2) + "rc"
    found = _plan_with({}, f"smarthostMapping = fetchmail:{long_path}\n")
    assert f"{long_path[:200]}...: skipped: path longer than {MAX_PATH}" in found.errors
    assert all(read.path != long_path for _role, read in found.files)


def test_an_account_with_more_than_the_address_limit_keeps_the_first_ones():
    from sendooway_auth.routes import MAX_ADDRESSES

    rc = ("[retriever]\nserver = pop.example.org\nusername = u\npassword = p\n[sender]\n"
          "type = SimpleSMTPSender\n"
          + "".join(f"address = a{i}@example.org\n" for i in range(MAX_ADDRESSES + 5)))
    found = _plan_with({"/home/alice/g.rc": rc.encode()}, "smarthostMapping = getmail:%h/g.rc\n")
    (account,) = found.accounts
    assert len(account.addresses) == MAX_ADDRESSES and account.addresses[0] == "a0@example.org"
    assert any(f"more than {MAX_ADDRESSES} addresses: the rest are ignored" in e for e in found.errors)


def test_pam_service_without_a_file_is_warned_about_outside_pam_wrapper(monkeypatch):
    monkeypatch.delenv("PAM_WRAPPER", raising=False)
    if not os.path.isdir("/etc/pam.d"):
        pytest.skip("no /etc/pam.d on this machine")
    warning = _pam.service_file_warning("sendooway-cov-no-such-service")
    assert warning is not None and "/etc/pam.d/sendooway-cov-no-such-service" in warning
    assert _pam.service_file_warning("other") is None


def test_frontend_bound_to_a_name_that_does_not_resolve_says_so(tmp_path, tmp_config):
    conf = tmp_config("localname = mx.test\n")
    r = subprocess.run([FRONT, "-c", conf, "-l", "&2", "-b", "no-such-host.invalid:2525"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_CONFIG
    assert "-b no-such-host.invalid:2525: " in r.stderr and "Traceback" not in r.stderr


def test_a_client_field_that_is_not_an_address_counts_as_itself():
    """The frontend's `client` (untrusted) keys the backoff: a value with a
    colon that is no IPv6 address is kept whole, never widened to a /64."""
    from sendooway_shared.types import Route, client_key

    assert client_key("not:an:address") == "not:an:address"
    assert client_key("2001:db8::7") == "2001:db8::/64"
    route = Route("mail:example", 25, TlsMode.PLAIN, True, "", "", Secret(""), False, "s:1")
    assert route.where == "mail:example:25"
