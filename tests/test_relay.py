"""The relay driven directly (as the session driver does) against fake
upstreams: every route kind, the upstream's replies verbatim, and each error
path of issue 6 mapped to the right local 4xx."""

from __future__ import annotations

import asyncio

import pytest
import trustme

from sendooway_shared.config import Ext8BitMime, SmarthostAuth
from sendooway_shared.types import Secret, TlsMode
from sendooway_front._pool import UpstreamPool
from sendooway_front._relay import Relay
from sendooway_front._relay_api import MailParams
from tests.fakeworld import refused_port
from tests.upstream import body_after_received, capture_log, config, info, route_for, run, send

BODY = b"Subject: hi\r\n\r\nline one\r\n..dot-stuffed line\r\n\xc3\xa4 8bit"
# what the upstream stores: dot-stuffing undone, the last line gets its CRLF
STORED = b"Subject: hi\r\n\r\nline one\r\n.dot-stuffed line\r\n\xc3\xa4 8bit\r\n"
PW = "Up-Secret-93xQ"


def _deliver(up, cfg=None, route=None, rcpts=("rcpt@example.org",), session=None, params=None,
             data=BODY, chunk=65536):
    log, handler = capture_log()
    relay = Relay(cfg or config(), log)

    async def go():
        r = await send(relay, route or route_for(up), "alice@example.com", list(rcpts), data,
                       session=session, params=params, chunk=chunk)
        await relay.close()
        return r

    return run(go()), handler


@pytest.mark.parametrize("tls", ["starttls", "tls", "plain"])
def test_delivery_every_tls_mode(upstream_factory, tls):
    up = upstream_factory(tls=tls, accounts={"up-user": PW} if tls != "plain" else None)
    replies, log = _deliver(up)
    assert replies["mail"].code == 250
    assert [r.code for r in replies["rcpt"]] == [250]
    assert replies["data"].code == 354
    assert replies["end"].code == 250 and replies["end"].lines[0].startswith("2.0.0 queued as FAKE")
    [m] = up.messages
    assert m.mail_from == "alice@example.com" and m.rcpt_tos == ["rcpt@example.org"]
    assert body_after_received(m.data) == STORED
    assert m.data.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby relay.test (sendooway)"
                             b" with ESMTPSA id S1-1\r\n\t(authenticated user alice); ")
    assert m.helo == "relay.test"
    assert m.tls == (tls != "plain")
    assert m.login == ("up-user" if tls != "plain" else None)
    assert PW not in log.text
    [line] = [x for x in log.lines if "message user=" in x]
    # bytes: the message as sent, with the last line's CRLF (the session
    # core hands BODY out without it: it comes with the end marker)
    assert "user=alice from=<alice@example.com> rcpts=1 bytes=%d" % (len(BODY) + 2) in line
    assert f"route={up.host}:{up.port} (test.conf:1)" in line and "upstream=250 2.0.0 queued" in line


def test_ipv6_upstream_and_received_without_tls(upstream_factory):
    up = upstream_factory(tls="starttls", accounts={"u": PW}, host="::1")
    replies, _ = _deliver(up, session=info(tls=False, client_address="::1", client_ehlo="c6"))
    assert replies["end"].code == 250
    assert up.messages[0].data.startswith(b"Received: from c6 ([IPv6:::1])\r\n\tby relay.test (sendooway) with ESMTPA ")


@pytest.mark.parametrize("client, literal", [
    ("[fe80::1%eth0]:50000", b"[IPv6:fe80::1]"),
    ("fe80::1%2", b"[IPv6:fe80::1]"),
    ("[::ffff:192.0.2.7]:587", b"[192.0.2.7]"),
    ("192.0.2.7:587", b"[192.0.2.7]"),
])
def test_received_address_literal_has_no_zone(upstream_factory, client, literal):
    """RFC 5321 4.1.3: an IPv6 address literal has no room for a link-local
    zone; `fe80::1%eth0` used to go into the Received: header as it was."""
    up = upstream_factory(tls="plain")
    replies, _ = _deliver(up, session=info(tls=False, client_address=client, client_ehlo="c"))
    assert replies["end"].code == 250
    assert up.messages[0].data.startswith(b"Received: from c (" + literal + b")\r\n")


def test_no_received_field_when_disabled(upstream_factory):
    up = upstream_factory(tls="plain")
    replies, _ = _deliver(up, cfg=config(addReceivedField=False), chunk=7)
    assert up.messages[0].data == STORED


@pytest.mark.parametrize("received", [False, True])
@pytest.mark.parametrize("empty, stored", [(True, b""), (False, b"\r\n")])
def test_empty_message_and_one_empty_line(upstream_factory, received, empty, stored):
    """DATA then "." at once: the upstream gets no line at all (or just the
    Received: header); DATA, an empty line, ".": exactly that empty line."""
    up = upstream_factory(tls="plain")
    log, _handler = capture_log()
    relay = Relay(config(addReceivedField=received), log)

    async def go():
        assert (await relay.mail(info(), route_for(up), "a@example.com", MailParams())).code == 250
        assert (await relay.rcpt("r@example.org")).code == 250
        assert (await relay.data_start()).code == 354
        reply = await relay.data_end(empty=empty)
        await relay.close()
        return reply

    assert run(go()).code == 250
    [m] = up.messages
    assert (body_after_received(m.data) if received else m.data) == stored


def test_one_of_two_recipients_refused_verbatim(upstream_factory):
    up = upstream_factory(tls="starttls", accounts={"u": PW}, reject_rcpt={"bad@example.org"},
                          temp_fail_rcpt={"later@example.org"})
    replies, log = _deliver(up, rcpts=("bad@example.org", "good@example.org", "later@example.org"))
    assert [str(r) for r in replies["rcpt"]] == [
        "550 5.1.1 no such user here", "250 2.1.5 OK", "451 4.3.0 try again later"]
    assert replies["end"].code == 250
    assert up.messages[0].rcpt_tos == ["good@example.org"]
    assert "rcpts=1 " in log.text


def test_upstream_5xx_to_mail_and_data_passed_as_5xx(upstream_factory):
    up = upstream_factory(tls="plain", reject_mail={"alice@example.com"})
    replies, log = _deliver(up)
    assert str(replies["mail"]) == "550 5.7.1 sender refused by fake upstream"
    assert "MAIL refused: 550" in log.text
    up2 = upstream_factory(tls="plain", fail_data="content rejected")
    replies, _ = _deliver(up2)
    assert str(replies["end"]) == "554 5.6.0 content rejected"
    assert up2.messages == []


def test_closed_port_is_451_with_detail_in_log():
    from sendooway_shared.types import Route

    log, handler = capture_log()
    with refused_port() as port:  # (held, not listening: no other test listens there)
        route = Route("localhost", port, TlsMode.STARTTLS, user="u", password=Secret(PW), source="f:2")
        reply = run(Relay(config(), log).mail(info(), route, "a@b.c", MailParams()))
    assert reply.code == 451 and reply.lines[0].startswith("4.4.1")
    assert f"127.0.0.1:{port}" in handler.text and "refused" in handler.text.lower()
    assert PW not in handler.text


def _foreign_cert(tmp_path, name="localhost"):
    ca = trustme.CA()
    leaf = ca.issue_cert(name)
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    with open(cert, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(key))
    ca_file = tmp_path / f"{name}-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return str(cert), str(key), str(ca_file)


@pytest.mark.parametrize("tls", ["starttls", "tls"])
def test_wrong_certificate_is_454_and_nothing_sent(upstream_factory, tmp_path, tls):
    cert, key, _ = _foreign_cert(tmp_path)  # signed by a CA the route does not trust
    up = upstream_factory(tls=tls, accounts={"u": PW}, cert_file=cert, key_file=key)
    replies, log = _deliver(up)
    assert replies["mail"].code == 454 and replies["mail"].lines[0].startswith("4.7.0")
    assert "certificate refused" in log.text
    assert up.logins == [] and up.failed_logins == [] and up.messages == []
    # the same with noCertCheck: delivered, the problem logged
    replies, log = _deliver(up, route=route_for(up, cert_check=False))
    assert replies["end"].code == 250
    assert "certificate problems ignored (noCertCheck)" in log.text


def test_wrong_host_name_refused(upstream_factory, tmp_path):
    cert, key, ca = _foreign_cert(tmp_path, "mail.example")
    up = upstream_factory(tls="tls", accounts={"u": PW}, cert_file=cert, key_file=key)
    replies, log = _deliver(up, route=route_for(up, ca_file=ca))
    assert replies["mail"].code == 454
    assert "does not match 127.0.0.1" in log.text
    # the global sslCA is used when the route names none
    replies, log = _deliver(up, cfg=config(sslCA=ca), route=route_for(up, ca_file="", cert_check=False))
    assert replies["end"].code == 250


def test_auth_rejected_is_454_one_attempt_no_password_logged(upstream_factory):
    up = upstream_factory(tls="starttls", accounts={"u": "right"})
    replies, log = _deliver(up, route=route_for(up, user="u", password=PW))
    assert replies["mail"].code == 454 and "Login" in replies["mail"].lines[0]
    assert up.failed_logins == ["u"]  # not retried with every mechanism
    assert "AUTH as 'u' refused" in log.text and PW not in log.text


def test_starttls_route_never_falls_back_to_plain(upstream_factory):
    up = upstream_factory(tls="plain", accounts={"u": PW}, require_tls=False)
    replies, log = _deliver(up, route=route_for(up, tls=TlsMode.STARTTLS))
    assert replies["mail"].code == 454 and "STARTTLS" in replies["mail"].lines[0]
    assert up.logins == [] and up.failed_logins == [] and up.mechanisms_used == []


@pytest.mark.parametrize("offered,cfg_kw,expected", [
    (("CRAM-MD5", "PLAIN", "LOGIN"), {}, "CRAM-MD5"),
    (("PLAIN", "LOGIN"), {}, "PLAIN"),
    (("LOGIN",), {}, "LOGIN"),
    (("CRAM-MD5", "PLAIN", "LOGIN"), {"smarthostCramMD5": SmarthostAuth.NEVER}, "PLAIN"),
    (("CRAM-MD5", "PLAIN", "LOGIN"), {"smarthostCramMD5": SmarthostAuth.NEVER,
                                      "smarthostPlain": SmarthostAuth.NEVER}, "LOGIN"),
    # alwaysTry: PLAIN sent although only LOGIN is advertised (aiosmtpd refuses it: 504, then LOGIN)
    (("LOGIN",), {"smarthostPlain": SmarthostAuth.ALWAYS_TRY}, "LOGIN"),
])
def test_auth_mechanism_order_and_tristates(upstream_factory, offered, cfg_kw, expected):
    up = upstream_factory(tls="starttls", accounts={"u": PW}, auth_mechanisms=offered)
    replies, log = _deliver(up, cfg=config(**cfg_kw))
    assert replies["end"].code == 250, log.text
    assert up.mechanisms_used == [expected] and up.logins == ["u"]
    assert PW not in log.text


def test_no_auth_route_skips_auth(upstream_factory):
    up = upstream_factory(tls="starttls", accounts=None)
    replies, _ = _deliver(up, route=route_for(up, auth=False, user="x", password=PW))
    assert replies["end"].code == 250 and up.messages[0].login is None


def test_all_mechanisms_never_sends_without_auth(upstream_factory):
    up = upstream_factory(tls="starttls", accounts={"u": PW})
    never = SmarthostAuth.NEVER
    replies, log = _deliver(up, cfg=config(smarthostCramMD5=never, smarthostPlain=never, smarthostLogin=never))
    assert replies["mail"].code == 530  # the upstream's own refusal, passed on
    assert "no usable AUTH mechanism" in log.text


def test_mail_parameters_size_and_body(upstream_factory):
    up = upstream_factory(tls="plain")
    _deliver(up, params=MailParams(size=1234, body_8bitmime=True))
    # SIZE= counts our Received: header too (RFC 1870 4: the size the
    # upstream gets); it used to be the client's figure
    m = up.messages[0]
    header = len(m.data) - len(body_after_received(m.data))
    assert 100 < header < 300
    assert m.mail_options == [f"SIZE={1234 + header}", "BODY=8BITMIME"]
    up.messages.clear()
    # ignore, too, tells an upstream that offers 8BITMIME (the original's
    # meaning: ignore only a missing 8BITMIME); it used to leave BODY= out
    _deliver(up, cfg=config(ext8BitMime=Ext8BitMime.IGNORE, addReceivedField=False),
             params=MailParams(size=10, body_8bitmime=True))
    assert up.messages[0].mail_options == ["SIZE=10", "BODY=8BITMIME"]


def test_smtputf8_passed_on_when_offered(upstream_factory):
    up = upstream_factory(tls="plain")  # aiosmtpd offers SMTPUTF8
    replies, _ = _deliver(up, params=MailParams(smtputf8=True))
    assert replies["end"].code == 250 and up.messages[0].mail_options == ["SMTPUTF8"]


def test_clone_ehlo(upstream_factory):
    up = upstream_factory(tls="plain")
    _deliver(up, cfg=config(cloneEhlo=True), session=info(client_ehlo="laptop.example"))
    assert up.messages[0].helo == "laptop.example"
    up.messages.clear()
    _deliver(up, cfg=config(cloneEhlo=True), session=info(client_ehlo="bad name\x01"))
    assert up.messages[0].helo == "relay.test"


def test_same_route_reuses_connection_other_route_reopens(upstream_factory):
    a = upstream_factory(tls="starttls", accounts={"u": PW})
    b = upstream_factory(tls="tls", accounts={"v": PW})
    log, _ = capture_log()
    relay = Relay(config(), log)

    async def go():
        for up in (a, a, b, a):
            r = await send(relay, route_for(up), "s@x.y", ["r@x.y"], b"m")
            assert r["end"].code == 250
        # a transaction left open by a new MAIL is reset upstream first
        assert (await relay.mail(info(), route_for(a), "s@x.y", MailParams())).code == 250
        assert (await relay.rcpt("r@x.y")).code == 250
        r = await send(relay, route_for(a), "s2@x.y", ["r2@x.y"], b"n")
        assert r["end"].code == 250
        await relay.close()

    run(go())
    assert a.logins == ["u", "u"] and b.logins == ["v"]
    assert [m.mail_from for m in a.messages] == ["s@x.y", "s@x.y", "s@x.y", "s2@x.y"]
    assert a.messages[-1].rcpt_tos == ["r2@x.y"]


def test_a_quoted_sender_cannot_add_fields_to_the_message_log_line(upstream_factory):
    """A quoted local part may hold spaces and `=`: written as it is, a
    user's sender forged `upstream=`/`route=` fields in its message line
    (address review). It is escaped as the authenticator's fields are."""
    up = upstream_factory(tls="plain")
    log, handler = capture_log()
    relay = Relay(config(), log)
    forged = '"x> rcpts=9 upstream=250 ok"@x.y'

    async def go():
        assert (await send(relay, route_for(up), forged, ["r@x.y"], b"m"))["end"].code == 250
        await relay.close()

    run(go())
    assert up.messages[0].mail_from == forged  # the upstream gets it as sent
    [line] = [x for x in handler.lines if ": message user=" in x]
    assert " rcpts=9" not in line and line.count(" upstream=") == 1, line
    assert "from=<\\x22x\\x3e\\x20rcpts\\x3d9" in line, line


def test_each_message_of_a_session_has_its_own_received_id(upstream_factory):
    """RFC 5321 4.4: the `id` names the message; two messages of one
    session used to share the session id. The message log line names the
    same id, so an admin finds the line from a Received: header."""
    up = upstream_factory(tls="starttls", accounts={"u": PW})
    log, handler = capture_log()
    relay = Relay(config(), log)

    async def go():
        for _ in range(2):
            assert (await send(relay, route_for(up), "s@x.y", ["r@x.y"], b"m"))["end"].code == 250
        await relay.close()

    run(go())
    ids = [m.data.split(b" id ", 1)[1].split(b"\r\n", 1)[0] for m in up.messages]
    assert ids == [b"S1-1", b"S1-2"]
    lines = [x for x in handler.lines if ": message user=" in x]
    assert [ln.split(" id=", 1)[1].split(" ", 1)[0] for ln in lines] == ["S1-1", "S1-2"]


def test_data_abort_sends_no_final_dot(upstream_factory):
    up = upstream_factory(tls="plain")
    log, handler = capture_log()
    relay = Relay(config(), log)

    async def go():
        await relay.mail(info(), route_for(up), "s@x.y", MailParams())
        await relay.rcpt("r@x.y")
        assert (await relay.data_start()).code == 354
        await relay.data_chunk(b"half a message\r\n")
        await relay.data_abort()
        await asyncio.sleep(0.2)
        # the session goes on: a next message works on a fresh connection
        r = await send(relay, route_for(up), "s2@x.y", ["r@x.y"], b"whole")
        await relay.close()
        return r

    r = run(go())
    assert r["end"].code == 250
    assert [m.mail_from for m in up.messages] == ["s2@x.y"]
    assert "aborted, no final dot sent" in handler.text


def test_cr_lf_split_across_chunks_is_fine(upstream_factory):
    up = upstream_factory(tls="plain")
    data = b"a\r\nb\r\nc" * 50
    replies, _ = _deliver(up, data=data, chunk=1)
    assert replies["end"].code == 250
    assert body_after_received(up.messages[0].data) == data + b"\r\n"


def test_connection_cache_across_sessions(upstream_factory):
    up = upstream_factory(tls="starttls", accounts={"u": PW, "w": "other-pw"})

    async def go():
        log, _ = capture_log()
        pool = UpstreamPool(30, log)
        for n in range(3):
            relay = Relay(config(smarthostCache=30), log, pool)
            r = await send(relay, route_for(up), f"s{n}@x.y", ["r@x.y"], b"m")
            assert r["end"].code == 250
            await relay.close()
        assert pool.idle_count() == 1 and pool.hits == 2
        # another upstream identity never gets that connection
        relay = Relay(config(smarthostCache=30), log, pool)
        r = await send(relay, route_for(up, user="w", password="other-pw"), "s@x.y", ["r@x.y"], b"m")
        assert r["end"].code == 250
        await relay.close()
        # the same user with another password neither
        relay = Relay(config(smarthostCache=30), log, pool)
        r = await send(relay, route_for(up, user="u", password="wrong"), "s@x.y", ["r@x.y"], b"m")
        assert r["mail"].code == 454
        await relay.close()
        assert pool.idle_count() == 2
        await pool.close_all()
        assert pool.idle_count() == 0

    run(go())
    assert up.logins == ["u", "w"] and up.failed_logins == ["u"]
    assert len(up.messages) == 4


def test_cache_reconnects_when_the_kept_connection_went_stale(upstream_factory):
    up = upstream_factory(tls="starttls", accounts={"u": PW})

    async def go():
        log, handler = capture_log()
        pool = UpstreamPool(30, log)
        relay = Relay(config(smarthostCache=30), log, pool)
        assert (await send(relay, route_for(up), "a@x.y", ["r@x.y"], b"m"))["end"].code == 250
        await relay.close()
        up.stop()   # the upstream restarts: the kept connection is dead
        await asyncio.sleep(0.1)
        up.start()
        relay = Relay(config(smarthostCache=30), log, pool)
        assert (await send(relay, route_for(up), "b@x.y", ["r@x.y"], b"m"))["end"].code == 250
        await relay.close()
        assert "went stale" in handler.text and "reconnecting" in handler.text
        await pool.close_all()

    run(go())
    assert [m.mail_from for m in up.messages] == ["a@x.y", "b@x.y"]


def test_cache_expires_and_caps(upstream_factory):
    up = upstream_factory(tls="plain")

    async def go():
        log, _ = capture_log()
        pool = UpstreamPool(0.3, log, max_idle=2, max_per_key=2)
        relays = [Relay(config(smarthostCache=1), log, pool) for _ in range(4)]
        for n, relay in enumerate(relays):  # four connections open at once
            await relay.mail(info(), route_for(up), f"s{n}@x.y", MailParams())
        for relay in relays:
            await relay.close()
        assert pool.idle_count() == 2
        await asyncio.sleep(0.6)
        assert pool.idle_count() == 0
        await pool.close_all()

    run(go())


def test_cache_off_quits(upstream_factory):
    up = upstream_factory(tls="plain")

    async def go():
        log, _ = capture_log()
        pool = UpstreamPool(0, log)
        relay = Relay(config(smarthostCache=0), log, pool)
        await send(relay, route_for(up), "a@x.y", ["r@x.y"], b"m")
        await relay.close()
        assert pool.idle_count() == 0

    run(go())


def test_kept_connection_probe_pipelined_with_mail(upstream_factory):
    """With PIPELINING, the RSET probe and MAIL go in one round trip; a
    refused probe means a fresh connection, transparently."""
    up = upstream_factory(tls="starttls", accounts={"u": PW}, pipelining=True)

    async def go():
        log, handler = capture_log()
        pool = UpstreamPool(30, log)
        for n in range(3):
            relay = Relay(config(smarthostCache=30), log, pool)
            r = await send(relay, route_for(up), f"s{n}@x.y", ["r@x.y"], b"m")
            assert r["end"].code == 250
            await relay.close()
        assert pool.hits == 2 and "stale" not in handler.text
        await pool.close_all()

    run(go())
    assert up.logins == ["u"] and len(up.messages) == 3


def test_client_rset_ends_the_upstream_transaction_and_keeps_the_login(upstream_factory):
    up = upstream_factory(tls="starttls", accounts={"u": PW})

    async def go():
        log, _ = capture_log()
        relay = Relay(config(), log)
        assert (await relay.mail(info(), route_for(up), "a@x.y", MailParams())).code == 250
        assert (await relay.rcpt("dropped@x.y")).code == 250
        await relay.reset()
        assert (await relay.rcpt("late@x.y")).code == 503  # no transaction any more
        r = await send(relay, route_for(up), "b@x.y", ["kept@x.y"], b"m")
        assert r["end"].code == 250
        await relay.close()

    run(go())
    assert up.logins == ["u"]
    assert [(m.mail_from, m.rcpt_tos) for m in up.messages] == [("b@x.y", ["kept@x.y"])]


# ---- MAIL, RCPTs and DATA as one group (a pipelining client costs one round trip)


async def _group_upstream(seen: dict, pipelining: bool = True, mail: bytes = b"250 2.1.0 ok",
                          careless: bool = False):
    """A plain upstream that records each group of commands it got before
    answering (after MAIL it waits up to 0.3 s for more lines, up to DATA).
    `careless`: after a refused MAIL it still says 250 to RCPT and 354 to DATA."""

    async def handle(r, w):
        w.write(b"220 up.test ESMTP\r\n")
        mail_ok = False
        accepted: list[bytes] = []
        while line := await r.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                w.write(b"250-up.test\r\n250 PIPELINING\r\n" if pipelining else b"250 up.test\r\n")
            elif verb in (b"MAIL", b"RSET", b"RCPT", b"DATA"):
                group = [line]
                try:
                    while verb != b"DATA" and (group[-1][:4].upper() != b"DATA"):
                        group.append(await asyncio.wait_for(r.readline(), 0.3))
                except asyncio.TimeoutError:
                    pass
                seen.setdefault("groups", []).append([x[:4].decode().upper() for x in group])
                for x in group:
                    v = x[:4].upper()
                    if v == b"RSET":
                        mail_ok, accepted = False, []
                        w.write(b"250 2.0.0 reset\r\n")
                    elif v == b"MAIL":
                        mail_ok = mail.startswith(b"2")
                        accepted = []
                        w.write(mail + b"\r\n")
                    elif v == b"RCPT":
                        if not mail_ok and not careless:
                            w.write(b"503 5.5.1 need MAIL\r\n")
                        elif b"nobody" in x:
                            w.write(b"550 5.1.1 <nobody> unknown\r\n")
                        else:
                            accepted.append(x)
                            w.write(b"250 2.1.5 ok\r\n")
                    elif v == b"DATA":
                        if (mail_ok and accepted) or careless:
                            w.write(b"354 go ahead\r\n")
                            await w.drain()
                            body = b""
                            while (part := await r.readline()) not in (b".\r\n", b""):
                                body += part
                            if not part:  # the connection ended without the dot: nothing
                                break
                            if mail_ok and accepted:
                                seen.setdefault("messages", []).append((len(accepted), body))
                            w.write(b"250 2.0.0 queued\r\n")
                        else:
                            w.write(b"554 5.5.1 no valid recipients\r\n")
            elif verb == b"QUIT":
                w.write(b"221 bye\r\n")
                await w.drain()
                break
            else:
                w.write(b"250 ok\r\n")
            await w.drain()
        seen["closed"] = seen.get("closed", 0) + 1
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _plain_route(port):
    from sendooway_shared.types import Route
    return Route(server="127.0.0.1", port=port, tls=TlsMode.PLAIN, ca_file="", user="",
                 password=Secret(""), auth=False, source="test.conf:1")


def _group_session(seen, script, **upstream):
    log, _handler = capture_log()

    async def go():
        server = await _group_upstream(seen, **upstream)
        try:
            relay = Relay(config(addReceivedField=False), log)
            return await script(relay, _plain_route(server.sockets[0].getsockname()[1]))
        finally:
            server.close()
            await server.wait_closed()

    return run(go())


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("behind_mail", [True, False])
def test_pipelined_commands_go_upstream_as_one_group_when_offered(pipelining, behind_mail):
    """MAIL with the RCPTs and DATA behind it, or RCPTs a client pipelined
    after its MAIL was answered: one group each when the upstream offers
    PIPELINING, one by one otherwise; the replies verbatim, in order."""
    seen: dict = {}
    rcpts = ["one@x.y", "nobody@x.y", "two@x.y"]

    async def script(relay, route):
        if behind_mail:
            replies = await relay.mail_group(info(), route, "a@example.com", MailParams(),
                                             rcpts, True)
        else:
            replies = [await relay.mail(info(), route, "a@example.com", MailParams()),
                       *await relay.rcpts(rcpts)]
        data = await relay.data_start()
        await relay.data_chunk(b"Subject: x\r\n\r\nhi")
        end = await relay.data_end()
        await relay.close()
        return replies, data, end

    replies, data, end = _group_session(seen, script, pipelining=pipelining)
    assert [r.code for r in replies] == [250, 250, 550, 250]
    assert replies[2].lines == ("5.1.1 <nobody> unknown",)
    assert data.code == 354 and data.lines == ("go ahead",) and end.code == 250
    if not pipelining:
        assert seen["groups"] == [["MAIL"], ["RCPT"], ["RCPT"], ["RCPT"], ["DATA"]]
    elif behind_mail:
        assert seen["groups"] == [["MAIL", "RCPT", "RCPT", "RCPT", "DATA"]]
    else:
        assert seen["groups"] == [["MAIL"], ["RCPT", "RCPT", "RCPT"], ["DATA"]]
    assert seen["messages"] == [(2, b"Subject: x\r\n\r\nhi\r\n")]


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("client_rset", [True, False])
def test_an_rset_goes_upstream_after_a_refused_mail(pipelining, client_rset):
    """An upstream may keep part of a MAIL it refused (Postfix keeps a refused
    SIZE= until RSET): the client's RSET, or else the next MAIL, sends one
    first, though no transaction was open (found with a real Postfix)."""
    seen: dict = {}

    async def script(relay, route):
        first = await relay.mail(info(), route, "a@example.com", MailParams(size=10**9))
        if client_rset:
            await relay.reset()
        second = await relay.mail(info(), route, "a@example.com", MailParams())
        await relay.close()
        return first, second

    first, second = _group_session(seen, script, pipelining=pipelining, mail=b"552 5.3.4 too big")
    assert first.code == second.code == 552
    flat = [verb for group in seen["groups"] for verb in group]
    one = flat.index("MAIL")
    two = flat.index("MAIL", one + 1)
    assert "RSET" in flat[one + 1:two], seen["groups"]
    if pipelining and not client_rset:  # it travels with the MAIL
        assert seen["groups"][1] == ["RSET", "MAIL"]


def test_a_group_behind_a_refused_mail_accepts_nothing_and_leaves_a_careless_upstream():
    """MAIL refused; the upstream still says 250 to the RCPTs and 354 to
    DATA: every RCPT is answered 503, and the connection (waiting for a
    message nobody will send) is left at once, never fed a message."""
    seen: dict = {}

    async def script(relay, route):
        replies = await relay.mail_group(info(), route, "a@example.com", MailParams(),
                                         ["one@x.y", "two@x.y"], True)
        gone = relay._client is None
        data = await relay.data_start()
        await relay.close()
        await asyncio.sleep(0.1)
        return replies, gone, data

    replies, gone, data = _group_session(seen, script, mail=b"550 5.7.1 not you", careless=True)
    assert [r.code for r in replies] == [550, 503, 503]
    assert replies[0].lines == ("5.7.1 not you",)
    assert gone and data.code == 503
    assert "messages" not in seen and seen["closed"] == 1


def test_data_refused_in_the_group_is_the_reply_to_the_clients_data():
    seen: dict = {}

    async def script(relay, route):
        replies = await relay.mail_group(info(), route, "a@example.com", MailParams(),
                                         ["nobody@x.y"], True)
        # no recipient: the session answers the client's DATA itself; the
        # upstream's 554 was read with the group and the connection stays usable
        again = await relay.mail_group(info(), route, "b@example.com", MailParams(),
                                       ["one@x.y"], True)
        data = await relay.data_start()
        await relay.data_chunk(b"x")
        end = await relay.data_end()
        await relay.close()
        return replies, again, data, end

    replies, again, data, end = _group_session(seen, script)
    assert [r.code for r in replies] == [250, 550]
    assert [r.code for r in again] == [250, 250] and data.code == 354 and end.code == 250
    assert seen["groups"][0] == ["MAIL", "RCPT", "DATA"]
    assert seen["groups"][1][0] == "RSET" and seen["groups"][1][-1] == "DATA"
    assert seen["messages"] == [(1, b"x\r\n")]


@pytest.mark.parametrize("then", ["rset", "close", "mail"])
def test_a_354_read_with_the_group_but_never_used_drops_the_connection(then):
    """DATA went with the group and the upstream said 354, but the client's
    DATA never came to it (RSET, a new MAIL, the end of the session): the
    upstream waits for a message, so the connection is dropped, not fed a
    RSET or MAIL as message text."""
    seen: dict = {}

    async def script(relay, route):
        await relay.mail_group(info(), route, "a@example.com", MailParams(), ["one@x.y"], True)
        if then == "rset":
            await relay.reset()
        elif then == "close":
            await relay.close()
        else:
            replies = await relay.mail_group(info(), route, "b@example.com", MailParams(), [], False)
            assert replies[0].code == 250
            await relay.close()
        await asyncio.sleep(0.1)

    _group_session(seen, script)
    assert "messages" not in seen
    assert seen["closed"] >= 1
    if then == "mail":  # the second MAIL went to a fresh connection
        assert seen["groups"][1] == ["MAIL"] and seen["closed"] == 2


# ---- TLS session resumption toward the upstream

@pytest.mark.parametrize("tls", ["starttls", "tls"])
def test_the_next_connection_to_an_upstream_resumes_its_tls_session(upstream_factory, tls):
    """Cache off: every message opens a new upstream connection; from the
    second on, the TLS session of the last one is resumed (no certificate
    exchange), and the name check and delivery are as before."""
    from sendooway_front import _tls
    _tls.forget_sessions()
    up = upstream_factory(tls=tls, accounts={"u": PW})
    for _ in range(3):
        replies, log = _deliver(up)
        assert replies["end"].code == 250
    assert up.tls_resumed == [False, True, True]
    assert len(up.messages) == 3 and up.logins == ["u"] * 3


def test_a_session_made_under_nocertcheck_never_spares_a_verifying_connection_its_check(
        upstream_factory, tmp_path):
    from sendooway_front import _tls
    _tls.forget_sessions()
    cert, key, _ = _foreign_cert(tmp_path)  # signed by a CA the route does not trust
    up = upstream_factory(tls="starttls", accounts={"u": PW}, cert_file=cert, key_file=key)
    for n in range(2):  # noCertCheck: delivered; resumed the second time, problems still logged
        replies, log = _deliver(up, route=route_for(up, cert_check=False))
        assert replies["end"].code == 250
        assert "certificate problems ignored (noCertCheck)" in log.text
    assert up.tls_resumed == [False, True]
    # the same server, verifying: refused, as if no session had ever been made
    replies, log = _deliver(up)
    assert replies["mail"].code == 454 and "certificate refused" in log.text
    assert len(up.messages) == 2 and up.tls_resumed == [False, True]


def test_the_name_is_checked_on_a_resumed_connection_too(upstream_factory, tmp_path):
    """A session is kept per server name and port; and a resumed connection
    is name-checked all the same (the certificate comes with the session)."""
    from sendooway_front import _stream, _tls
    _tls.forget_sessions()
    cert, key, ca = _foreign_cert(tmp_path, "mail.example")
    up = upstream_factory(tls="tls", accounts={"u": PW}, cert_file=cert, key_file=key)

    async def handshake(name, check):
        s = await _stream.open_tcp("127.0.0.1", up.port, 5)
        ctx = await _tls.client_context_for(ca, verify=True)
        try:
            await s.start_tls_client(ctx, name, check_hostname=check, resume=("mail.example", up.port))
            await s.read(100)  # the greeting: the tickets come before it
            s.remember_tls_session()
            return s.tls_resumed
        finally:
            await s.aclose()  # (a connection cut without close_notify spoils its session)

    assert run(handshake("mail.example", True)) is False
    assert run(handshake("mail.example", True)) is True
    with pytest.raises(_tls.TLSVerifyError, match="does not match other.example"):
        run(handshake("other.example", True))  # the session offered, the name still checked
