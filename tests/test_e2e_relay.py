"""Issue 6 end to end: real clients (smtplib, swaks, msmtp) through the real
`sendooway -b` and `sendooway-auth`, delivered through every route kind to
fake upstreams, which must receive exactly the envelope and the bytes sent
(plus our Received: line). Error paths as the client sees them."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import smtplib
import subprocess

import pytest

from tests.auth_helpers import Daemon
from tests.fakeworld import refused_port
from tests.front_util import Frontend, front_config, open_tmp
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")

UP_PW = {"fm": "fm-Up-Secret-41", "gm": "gm-Up-Secret-52", "wild": "wild-Up-Secret-63"}
RECEIVED = re.compile(
    rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby mx\.test \(sendooway\) with ESMTPSA id [^\s;]+\r\n"
    rb"\t\(authenticated user (\w+)\); \w{3}, \d+ \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n")


def _mk_body(tag: str) -> bytes:
    # Date and Message-ID present, so no client adds its own
    return (f"From: someone\r\nDate: Wed, 25 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{tag.replace(' ', '.')}@client.test>\r\nSubject: {tag}\r\n\r\nfirst line\r\n".encode()
            + b"..a dot-stuffed line\r\n" + b"\xc3\xa4 8-bit text\r\n" + b"y" * 998 + b"\r\nlast\r\n")


class World6:
    def __init__(self, world, tmp):
        self.world = world
        self.tmp = tmp
        self.ups: dict[str, FakeUpstream] = {}

    def up(self, name, **kw) -> FakeUpstream:
        u = FakeUpstream(self.world, **kw).start()
        self.ups[name] = u
        return u


@pytest.fixture(scope="module")
def w6(world):
    with open_tmp() as tmp:
        w = World6(world, tmp)
        fm = w.up("fetchmail", tls="starttls", accounts={"fm-user": UP_PW["fm"]}, host="127.0.0.1")
        gm = w.up("getmail", tls="tls", accounts={"gm-user": UP_PW["gm"]})
        plain = w.up("plain", tls="plain", reject_rcpt={"nobody@example.net"})
        wild = w.up("wild", tls="starttls", accounts={"wild-user": UP_PW["wild"]})
        star = w.up("star", tls="plain")
        glob = w.up("global", tls="plain")
        mine = w.up("carol-own", tls="plain")
        badauth = w.up("badauth", tls="starttls", accounts={"x": "not-what-the-route-says"})
        extra = (
            f"sslCA = {world.ca_file}\n"
            "userInclude = %h/.sendoowayrc\n"
            "smarthostMapping = fetchmail:%h/.fetchmailrc\n"
            "smarthostMapping = getmail:%h/.getmail/getmailrc\n"
            f"smarthostMapping = direct:*@plain.example 127.0.0.1 {plain.port} noAuth\n"
            f"smarthostMapping = direct:*@wild.example localhost {wild.port} wild-user {UP_PW['wild']} tls\n"
            f"smarthostMapping = direct:*@override.example 127.0.0.1 {glob.port} noAuth\n"
            f"smarthostMapping = direct:*@badauth.example localhost {badauth.port} x wrong-Up-Pw-7 tls\n"
            f"smarthostMapping = direct:* 127.0.0.1 {star.port} noAuth\n"
        )
        w.config = front_config(tmp, world, extra)
        world.clear_home("alice")
        world.clear_home("bob")
        world.clear_home("carol")
        world.write_user_file("alice", ".fetchmailrc", (
            'poll pop.example.org proto pop3 user "fm-user" password "%s"\n'
            '#sendooway:server "localhost"\n'
            '#sendooway:port %d\n'
            '#sendooway:tls\n'
            '#sendooway:address "alice@fetch.example"\n') % (UP_PW["fm"], fm.port))
        world.write_user_file("bob", ".getmail/getmailrc", (
            "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = pop.example.org\n"
            f"username = gm-user\npassword = {UP_PW['gm']}\n"
            f"[sender]\ntype = SimpleSMTPSSLSender\nserver = localhost\nport = {gm.port}\n"
            "address = bob@get.example\n"))
        world.write_user_file("carol", ".sendoowayrc",
                              f"smarthostMapping = direct:*@override.example 127.0.0.1 {mine.port} noAuth\n")
        w.daemon = Daemon(tmp, w.config).start()
        w.front = Frontend(w.config, os.path.join(str(tmp), "front.log")).start()
        try:
            yield w
        finally:
            w.front.stop()
            w.daemon.stop()
            for u in w.ups.values():
                u.stop()
            for name in ("alice", "bob", "carol"):
                world.clear_home(name)


@pytest.fixture(autouse=True)
def _clear(w6):
    for u in w6.ups.values():
        u.messages.clear()
    yield


def _smtplib_send(w6, user, sender, rcpts, body, mail_options=()):
    with w6.front.smtp() as s:
        s.starttls(context=w6.world.ssl_context())
        s.ehlo()
        s.login(user, w6.world.users[user].password)
        return s.sendmail(sender, rcpts, body, mail_options=list(mail_options))


def _check_delivery(up, sender, rcpts, body, user, login=None):
    assert len(up.messages) == 1, up.messages
    m = up.messages[0]
    assert m.mail_from == sender and m.rcpt_tos == rcpts
    match = RECEIVED.match(m.data)
    assert match, m.data[:300]
    assert match.group(1).decode() == user
    # the clients dot-stuff, the upstream un-stuffs: the message text arrives exactly
    assert m.data[match.end():] == body
    assert m.login == login


def test_fetchmail_starttls_auth_with_smtplib(w6):
    body = _mk_body("fetchmail")
    assert _smtplib_send(w6, "alice", "alice@fetch.example", ["r1@example.net", "r2@example.net"],
                         body, mail_options=["BODY=8BITMIME"]) == {}
    up = w6.ups["fetchmail"]
    _check_delivery(up, "alice@fetch.example", ["r1@example.net", "r2@example.net"], body, "alice",
                    login="fm-user")
    assert up.messages[0].tls and up.messages[0].helo == "mx.test"
    assert "BODY=8BITMIME" in up.messages[0].mail_options


def test_getmail_implicit_tls_with_swaks(w6, tmp_path):
    body = _mk_body("getmail swaks")
    path = tmp_path / "msg.eml"
    path.write_bytes(body[:-2])  # swaks ends the data with its own CRLF
    r = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{w6.front.port}", "--tls", "--helo", "client.test",
         "--auth", "PLAIN", "--auth-user", "bob", "--auth-password", w6.world.users["bob"].password,
         # (@FILE: the swaks of Debian 13 sends a bare path as the text)
         "--from", "bob@get.example", "--to", "x@example.net", "--data", f"@{path}",
         "--tls-verify", "--tls-ca-path", w6.world.ca_file],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 queued as FAKE" in r.stdout  # the upstream's own final reply, shown to the client
    _check_delivery(w6.ups["getmail"], "bob@get.example", ["x@example.net"], body, "bob", login="gm-user")


def test_direct_noauth_plain_and_one_refused_recipient(w6):
    body = _mk_body("plain")
    with w6.front.smtp() as s:
        s.starttls(context=w6.world.ssl_context())
        s.ehlo()
        s.login("dave", w6.world.users["dave"].password)
        refused = s.sendmail("dave@plain.example", ["ok@example.net", "nobody@example.net"], body)
    assert refused == {"nobody@example.net": (550, b"5.1.1 no such user here")}
    _check_delivery(w6.ups["plain"], "dave@plain.example", ["ok@example.net"], body, "dave")


def test_domain_wildcard_starttls_auth_and_star_with_msmtp(w6, tmp_path):
    if shutil.which("msmtp") is None:
        pytest.skip("msmtp not installed")
    body = _mk_body("msmtp")
    for sender, upname, login in (("dave@wild.example", "wild", "wild-user"),
                                  ("dave@anything.example", "star", None)):
        r = subprocess.run(
            ["msmtp", "--host=127.0.0.1", f"--port={w6.front.port}", "--tls=on", "--tls-starttls=on",
             f"--tls-trust-file={w6.world.ca_file}", "--auth=plain", "--user=dave",
             "--passwordeval=cat " + _secret_file(tmp_path, w6.world.users["dave"].password),
             "--domain=client.test", f"--from={sender}", "--", "rcpt@example.net"],
            input=body, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        _check_delivery(w6.ups[upname], sender, ["rcpt@example.net"], body, "dave", login=login)
        w6.ups[upname].messages.clear()


def _secret_file(tmp_path, secret):
    p = tmp_path / "pw"
    p.write_text(secret)
    return str(p)


def test_user_include_overrides_the_global_mapping(w6):
    body = _mk_body("override")
    assert _smtplib_send(w6, "carol", "carol@override.example", ["r@example.net"], body) == {}
    _check_delivery(w6.ups["carol-own"], "carol@override.example", ["r@example.net"], body, "carol")
    assert w6.ups["global"].messages == []
    # dave has no include: the global mapping serves him
    assert _smtplib_send(w6, "dave", "dave@override.example", ["r@example.net"], body) == {}
    _check_delivery(w6.ups["global"], "dave@override.example", ["r@example.net"], body, "dave")


def test_several_messages_and_routes_in_one_session(w6):
    with w6.front.smtp() as s:
        s.starttls(context=w6.world.ssl_context())
        s.ehlo()
        s.login("alice", w6.world.users["alice"].password)
        for n in range(3):
            assert s.sendmail("alice@fetch.example", ["a@example.net"], b"Subject: %d\r\n\r\nx\r\n" % n) == {}
        assert s.sendmail("alice@elsewhere.example", ["b@example.net"], b"Subject: star\r\n\r\ny\r\n") == {}
        assert s.sendmail("alice@fetch.example", ["c@example.net"], b"Subject: again\r\n\r\nz\r\n") == {}
    assert [m.rcpt_tos for m in w6.ups["fetchmail"].messages] == [["a@example.net"]] * 3 + [["c@example.net"]]
    assert [m.rcpt_tos for m in w6.ups["star"].messages] == [["b@example.net"]]


def test_upstream_auth_rejected_is_454_and_no_password_anywhere(w6):
    with w6.front.smtp() as s:
        s.starttls(context=w6.world.ssl_context())
        s.ehlo()
        s.login("dave", w6.world.users["dave"].password)
        code, text = s.mail("dave@badauth.example")
        assert code == 454 and text.startswith(b"4.7.0")
        code, _ = s.rset()
        assert code == 250
    logs = w6.front.log() + w6.daemon.log()
    assert "refused" in logs
    for secret in [*UP_PW.values(), "wrong-Up-Pw-7", *(u.password for u in w6.world.users.values())]:
        assert secret not in logs


def test_log_line_per_message(w6):
    assert _smtplib_send(w6, "alice", "alice@fetch.example", ["one@example.net"], b"Subject: log\r\n\r\nq\r\n") == {}
    lines = [ln for ln in w6.front.log().splitlines()
             if "message user=alice from=<alice@fetch.example>" in ln and "one" not in ln]
    assert lines, w6.front.log()[-2000:]
    last = lines[-1]
    assert "rcpts=1" in last and f"localhost:{w6.ups['fetchmail'].port}" in last
    assert ".fetchmailrc:" in last and "upstream=250 2.0.0 queued as FAKE" in last


def test_error_paths_through_the_frontend(world, tmp_path, upstream_factory):
    """Closed port → 451, wrong certificate → 454, no route → 550, upstream 5xx passed."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "x.crt", tmp_path / "x.key"
    with open(cert, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(key))
    wrongcert = upstream_factory(tls="starttls", accounts={"u": "p"}, cert_file=str(cert), key_file=str(key))
    strict = upstream_factory(tls="plain", reject_mail={"dave@strict.example"})
    with refused_port() as closed, open_tmp() as tmp:  # (held: no other test listens there)
        config = front_config(tmp, world, (
            f"sslCA = {world.ca_file}\n"
            f"smarthostMapping = direct:*@closed.example 127.0.0.1 {closed} noAuth\n"
            f"smarthostMapping = direct:*@cert.example localhost {wrongcert.port} u p tls\n"
            f"smarthostMapping = direct:*@strict.example 127.0.0.1 {strict.port} noAuth\n"))
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            with fe.smtp() as s:
                s.starttls(context=world.ssl_context())
                s.ehlo()
                s.login("dave", world.users["dave"].password)
                code, text = s.mail("dave@closed.example")
                assert code == 451 and text.startswith(b"4.4.1")
                code, text = s.mail("dave@cert.example")
                assert code == 454 and text.startswith(b"4.7.0")
                code, text = s.mail("dave@nowhere.example")
                assert code == 550 and text.startswith(b"5.7.1")
                code, text = s.mail("dave@strict.example")
                assert (code, text) == (550, b"5.7.1 sender refused by fake upstream")
                with pytest.raises(smtplib.SMTPSenderRefused):
                    s.sendmail("dave@closed.example", ["r@example.net"], b"x\r\n")
            log = fe.log()
            assert f"127.0.0.1:{closed}" in log and "certificate refused" in log
            assert wrongcert.logins == [] and wrongcert.failed_logins == []
        finally:
            fe.stop()
            daemon.stop()


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf-typed-by-hand"])
def test_inetd_stdio_mode_through_the_relay(world, upstream_factory, eol):
    """inetd/xinetd as root: one session on pipes, the frontend forks its own
    authenticator; the message crosses a plain channel, so ESMTPA. On pipes
    (a session by hand, the original's test scripts) LF-only lines work too
    and reach the upstream as CRLF."""
    from tests.front_util import FRONT, login_plain, stdio_session

    up = upstream_factory(tls="starttls", accounts={"u": "stdio-Up-Pw-1"})
    with open_tmp() as tmp:
        config = front_config(tmp, world, (
            f"sslCA = {world.ca_file}\n"
            f"smarthostMapping = direct:*@stdio.example localhost {up.port} u stdio-Up-Pw-1 tls\n"),
            tls=False)
        body = b"Subject: stdio\r\n\r\n..dotted\r\nend"
        script = (b"EHLO pipe.client\r\nAUTH PLAIN " + login_plain("bob", world.users["bob"].password).encode()
                  + b"\r\nMAIL FROM:<bob@stdio.example>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
                  + body + b"\r\n.\r\nRSET\r\nMAIL FROM:<bob@stdio.example>\r\nRCPT TO:<s@example.net>\r\n"
                  + b"RSET\r\nQUIT\r\n").replace(b"\r\n", eol)
        out, err, rc = stdio_session([FRONT, "-c", config, "-l", "&2",
                                      "--auth-socket", os.path.join(str(tmp), "none.sock")], script)
    assert rc == 0, err
    assert out.count(b"250 2.0.0 queued as FAKE1") == 1, out
    [m] = up.messages
    assert m.rcpt_tos == ["r@example.net"] and up.logins == ["u"]  # one login for both transactions
    assert re.match(rb"Received: from pipe\.client\r\n\tby mx\.test \(sendooway\) with ESMTPA ", m.data)
    assert m.data.endswith(b"\r\n\r\n.dotted\r\nend\r\n")
    assert b"stdio-Up-Pw-1" not in err and world.users["bob"].password.encode() not in err


@contextlib.contextmanager
def _front_to(world, up, password: str, extra: str = ""):
    """`sendooway-auth` and `sendooway -b` routing every sender to the
    upstream `up` as its user "u" with STARTTLS; stopped (cleanly) after."""
    with open_tmp() as tmp:
        config = front_config(tmp, world, (
            f"sslCA = {world.ca_file}\n{extra}"
            f"smarthostMapping = direct:* localhost {up.port} u {password} tls\n"))
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            yield fe
        finally:
            assert fe.stop() == 0
            daemon.stop()


@contextlib.contextmanager
def _logged_in(fe, world, user: str = "alice"):
    """A client session through `fe`: STARTTLS, EHLO, AUTH as `user`."""
    with fe.smtp() as s:
        s.starttls(context=world.ssl_context())
        s.ehlo()
        s.login(user, world.users[user].password)
        yield s


def test_connection_cache_across_client_sessions_and_quit_on_sigterm(world, upstream_factory):
    """smarthostCache in the real `sendooway -b`: three client sessions, one
    upstream login; SIGTERM QUITs the kept connection."""
    import time

    up = upstream_factory(tls="starttls", accounts={"u": "cache-Up-Pw-2"})
    with _front_to(world, up, "cache-Up-Pw-2", "smarthostCache = 30\n") as fe:
        for n in range(3):
            with _logged_in(fe, world) as s:
                assert s.sendmail(f"alice{n}@example.org", ["r@example.net"], b"Subject: c\r\n\r\nx\r\n") == {}
        assert len(up.messages) == 3
        assert up.logins == ["u"] and up.quits == 0  # one login, the connection kept
    deadline = time.monotonic() + 5
    while up.quits == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert up.quits == 1


def test_pipelining_client_through_the_cache_delivers_every_message(world, upstream_factory):
    """A client that sends MAIL, RCPT, DATA in one write (RFC 2920), twice
    per session and over two sessions: through the real frontend they go
    upstream as groups (with the RSET of the previous transaction, or the
    probe of the kept connection, in front), and every message arrives with
    exactly its envelope, one login a session: within it one connection
    carries both; each refused a recipient, so it is kept for no other
    session (docs/decisions/relay.md, "A connection that refused")."""
    up = upstream_factory(tls="starttls", accounts={"u": "pipe-Up-Pw-3"}, pipelining=True,
                          reject_rcpt={"nobody@example.net"})
    with _front_to(world, up, "pipe-Up-Pw-3", "smarthostCache = 30\n") as fe:
        for n in range(2):
            with _logged_in(fe, world) as s:
                for m in range(2):
                    s.send(f"MAIL FROM:<a{n}{m}@example.org>\r\nRCPT TO:<r{m}@example.net>\r\n"
                           "RCPT TO:<nobody@example.net>\r\nDATA\r\n")
                    got = [s.getreply() for _ in range(4)]
                    assert [c for c, _ in got] == [250, 250, 550, 354], got
                    s.send(b"Subject: p%d%d\r\n\r\nbody\r\n.\r\n" % (n, m))
                    assert s.getreply()[0] == 250
        envelopes = [(m.mail_from, m.rcpt_tos) for m in up.messages]
        assert envelopes == [(f"a{n}{m}@example.org", [f"r{m}@example.net"])
                             for n in range(2) for m in range(2)]
        assert all(msg.data.endswith(b"\r\n\r\nbody\r\n") for msg in up.messages)
        assert up.logins == ["u", "u"]


def test_pipelining_client_whose_sender_the_upstream_refuses(world, upstream_factory):
    """MAIL, RCPT, DATA in one write, the upstream refuses the sender: the
    client gets the upstream's 550, then 503 for the RCPT and for DATA (no
    transaction), nothing is delivered, and the next transaction in the
    same session goes through."""
    up = upstream_factory(tls="starttls", accounts={"u": "pipe-Up-Pw-4"}, pipelining=True,
                          reject_mail={"refused@example.org"})
    with _front_to(world, up, "pipe-Up-Pw-4") as fe:
        with _logged_in(fe, world) as s:
            s.send("MAIL FROM:<refused@example.org>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
            got = [s.getreply() for _ in range(3)]
            assert [c for c, _ in got] == [550, 503, 503], got
            assert got[0][1] == b"5.7.1 sender refused by fake upstream"
            s.send("MAIL FROM:<ok@example.org>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
            assert [s.getreply()[0] for _ in range(3)] == [250, 250, 354]
            s.send(b"Subject: after\r\n\r\nbody\r\n.\r\n")
            assert s.getreply()[0] == 250
        assert [(m.mail_from, m.rcpt_tos) for m in up.messages] == [
            ("ok@example.org", ["r@example.net"])]


def _threaded_raw_upstream(script):
    """A plain SMTP upstream in a thread, answering per `script(conn)`; returns its port."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=script, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _drop_after_354(conn):
    f = conn.makefile("rb")
    conn.sendall(b"220 raw ESMTP\r\n")
    try:
        while True:
            line = f.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-raw\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go\r\n")
                f.read(100)          # some of the message, then the connection breaks
                conn.shutdown(2)
                conn.close()
                return
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")
    except OSError:
        pass


def test_upstream_drop_mid_data_and_client_vanishing_mid_data(world, upstream_factory):
    """Upstream breaks during DATA → 451 to the client, the session goes on;
    the client vanishing mid-DATA → the upstream never gets the final dot."""
    import socket
    import ssl
    import time

    srv, raw_port = _threaded_raw_upstream(_drop_after_354)
    good = upstream_factory(tls="plain")
    with open_tmp() as tmp:
        config = front_config(tmp, world, (
            f"smarthostMapping = direct:*@drop.example 127.0.0.1 {raw_port} noAuth\n"
            f"smarthostMapping = direct:*@good.example 127.0.0.1 {good.port} noAuth\n"))
        daemon = Daemon(tmp, config).start()
        fe = Frontend(config, os.path.join(str(tmp), "front.log")).start()
        try:
            with fe.smtp() as s:
                s.starttls(context=world.ssl_context())
                s.ehlo()
                s.login("dave", world.users["dave"].password)
                with pytest.raises(smtplib.SMTPDataError) as exc:
                    s.sendmail("dave@drop.example", ["r@example.net"], b"Subject: x\r\n\r\n" + b"q" * 900 + b"\r\n" * 300)
                assert exc.value.smtp_code == 451
                assert s.sendmail("dave@good.example", ["r@example.net"], b"Subject: ok\r\n\r\nfine\r\n") == {}
            assert len(good.messages) == 1

            # a client that vanishes in the middle of a message
            raw = socket.create_connection(("127.0.0.1", fe.port))
            tls = None
            f = raw.makefile("rb")
            f.readline()
            raw.sendall(b"EHLO c\r\n")
            while f.readline()[3:4] == b"-":
                pass
            raw.sendall(b"STARTTLS\r\n")
            f.readline()
            tls = world.ssl_context().wrap_socket(raw, server_hostname="localhost")
            f = tls.makefile("rb")
            from tests.front_util import login_plain
            for cmd in (b"EHLO c", b"AUTH PLAIN " + login_plain("dave", world.users["dave"].password).encode(),
                        b"MAIL FROM:<dave@good.example>", b"RCPT TO:<r@example.net>", b"DATA"):
                tls.sendall(cmd + b"\r\n")
                line = f.readline()
                while line[3:4] == b"-":
                    line = f.readline()
                assert line[:1] in (b"2", b"3"), line
            tls.sendall(b"Subject: half\r\n\r\nthis message is never finished\r\n")
            time.sleep(0.3)
            tls.shutdown(socket.SHUT_RDWR)  # gone at once (close() waits for the makefile's reference)
            f.close()
            tls.close()
            deadline = time.monotonic() + 5
            while "aborted, no final dot sent" not in fe.log() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "aborted, no final dot sent" in fe.log(), fe.log()[-3000:]
            time.sleep(0.3)
            assert len(good.messages) == 1  # nothing half-written was delivered
        finally:
            fe.stop()
            daemon.stop()
            srv.close()


def test_swaks_pipelining_several_recipients(w6, tmp_path):
    """swaks --pipeline sends MAIL, the RCPTs and DATA in one group: every
    reply comes back in its place, the upstream gets every recipient, and
    the refused one is refused with the upstream's own words."""
    body = _mk_body("pipelined")
    path = tmp_path / "msg.eml"
    path.write_bytes(body[:-2])
    rcpts = ["p1@example.net", "nobody@example.net", "p2@example.net", "p3@example.net"]
    r = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{w6.front.port}", "--tls", "--helo", "client.test",
         "--pipeline", "--auth", "PLAIN", "--auth-user", "dave",
         "--auth-password", w6.world.users["dave"].password, "--from", "dave@plain.example",
         # (@FILE: the swaks of Debian 13 sends a bare path as the text)
         "--to", ",".join(rcpts), "--data", f"@{path}",
         "--tls-verify", "--tls-ca-path", w6.world.ca_file],
        capture_output=True, text=True, timeout=60)
    out = r.stdout
    assert "<** 550 5.1.1 no such user here" in out or "<~* 550 5.1.1 no such user here" in out, out
    replies = [line for line in out.splitlines() if "5.1.1" in line or "2.1.5" in line]
    assert len(replies) == 4 and "550" in replies[1], replies
    assert "250 2.0.0 queued as FAKE" in out, out
    up = w6.ups["plain"]
    assert len(up.messages) == 1
    assert up.messages[0].rcpt_tos == ["p1@example.net", "p2@example.net", "p3@example.net"]
