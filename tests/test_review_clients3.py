"""Review: more real mail software as the client of sendooway, beyond
tests/test_review_realclients.py (swaks, msmtp, curl, smtplib) and
tests/test_review_clients2.py (Postfix, Exim, s-nail, neomutt, git
send-email).

The same world as there (tests/mta_util.client_world): a real `sendooway
-b` (STARTTLS port) and `sendooway -b -s` (implicit-TLS port) next to a
real `sendooway-auth` daemon, relaying to an aiosmtpd upstream that refuses
some recipients with 550 and 451 and a sender with 550, and `addReceivedField
= yes`, so the upstream gets our Received: and then the client's bytes.
Clients (all from Debian bookworm, installed by scripts/setup.sh, except
aiosmtplib from the test extras):

- sendEmail 1.56 (Perl): STARTTLS only (it has no implicit-TLS mode, so the
  -s port is not tried), AUTH LOGIN;
- a Net::SMTP script (Perl core libnet 3.14 with IO::Socket::SSL and
  Authen::SASL): starttls() and SSL => 1, PLAIN and LOGIN, BODY=8BITMIME
  and SIZE, several messages a session;
- Ruby's net/smtp 0.3.1 (a bundled gem of ruby3.1): enable_starttls and
  enable_tls, PLAIN and LOGIN, 4xx and 5xx told apart;
- PHPMailer 6.6 (php-cli): SMTPSecure tls and ssl, SMTPKeepAlive;
- GNU Mailutils 3.15 `mail` with an smtp:// and smtps:// mailer URL
  (GnuTLS, GNU SASL), headless;
- curl's SMTP edges not covered before: --mail-auth, several --mail-rcpt of
  which one is refused (with and without --mail-rcpt-allowfails), --crlf,
  and a file with bare LFs uploaded as it is;
- aiosmtplib (asyncio): in the project's test extras rather than a
  throwaway venv, so CI has it; pure Python, no dependencies, kept up, and a
  client implementation of its own (LOGIN with the user name as an initial
  response, lower-case `size=`, BODY=8BITMIME), not smtplib again.

Each checks the upstream's envelope and bytes, the AUTH mechanism the
frontend logged, that the upstream's 5xx reaches the client as a failure it
reports (and a 4xx as temporary where the client tells them apart), that a
wrong password is refused, and that no log holds a traceback or a password.
What each client does on the wire is in the docstrings.

No defect of sendooway was found with these clients.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import subprocess
from email.message import EmailMessage

import pytest

from .mta_util import (
    CLEAN_ENV, LATER_RCPT, OUR_RECEIVED, REFUSED_RCPT, REFUSED_SENDER, logins, split_ours, tool, wait_upstream,
)
from .mta_util import clean_client_world, cw  # noqa: F401  (this module's fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")

# A body as a program hands it over: LF line ends, a lone dot line, lines
# starting with dots, no final newline.
BODY = b"first line\n.\n..two dots\n.three\nlast line without newline"
# ... and as every client that dot-stuffs and ends lines with CRLF delivers it
BODY_CRLF = b"first line\r\n.\r\n..two dots\r\n.three\r\nlast line without newline\r\n"


def _starts(cw) -> tuple[int, int]:
    return len(cw.front.log()), len(cw.front_s.log())


def _run(argv: list[str], env: dict | None = None, body: bytes = b"",
         executable: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=body, env=dict(CLEAN_ENV, **(env or {})), capture_output=True,
                          timeout=60, executable=executable)


def _out(r: subprocess.CompletedProcess) -> str:
    return r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")


# ------------------------------------------------------------------ sendEmail

def _sendemail(cw, tmp_path, user: str, password: str, sender: str, rcpts: list[str],
               subject: str) -> subprocess.CompletedProcess:
    (tmp_path / "body.txt").write_bytes(BODY)
    return _run([tool("sendemail"), "-f", sender, "-t", *rcpts, "-u", subject,
                 "-o", f"message-file={tmp_path / 'body.txt'}", "-s", f"127.0.0.1:{cw.front.port}",
                 "-xu", user, "-xp", password, "-o", "tls=yes", "-o", "fqdn=client.test", "-v"],
                # IO::Socket::SSL's default CA store is OpenSSL's: SSL_CERT_FILE
                env={"SSL_CERT_FILE": cw.world.ca_file})


def test_sendemail_starttls_login_refusals_and_wrong_password(cw, tmp_path):
    """sendEmail: EHLO, STARTTLS (certificate checked), EHLO, AUTH LOGIN
    without an initial response, MAIL without parameters, one RCPT at a
    time, a MIME message with CRLF line ends, QUIT. It dot-stuffs only a
    lone "." line, not a line that starts with a dot: ".three" arrives as
    "three" and "..two dots" as ".two dots" in the upstream's store
    (sendEmail's loss, every SMTP server takes the first dot away), which
    shows that sendooway passes the dot-stuffing on as the client sent it.
    The upstream's 550 to MAIL or RCPT and its 451 to RCPT end sendEmail
    with an error (it does not tell them apart), a wrong password too."""
    start, _ = _starts(cw)
    r = _sendemail(cw, tmp_path, "alice", cw.pw("alice"), "alice@home.example",
                   ["r@example.net", "s@example.net"], "sendemail starttls")
    assert r.returncode == 0 and "Email was sent successfully" in _out(r), _out(r)
    [m] = wait_upstream(cw, 1)
    assert (m.mail_from, m.rcpt_tos, m.mail_options) == ("alice@home.example", ["r@example.net", "s@example.net"], [])
    head, _, text = split_ours(m, "alice").partition(b"\r\n\r\n")
    assert b"\r\nSubject: sendemail starttls\r\nDate: " in head and b"\r\nX-Mailer: sendEmail-1.56\r\n" in head
    part = re.search(rb"Content-Transfer-Encoding: 7bit\r\n\r\n(.*?)\r\n\r\n------MIME delimiter", text, re.S)
    assert part and part.group(1) == b"first line\r\n.\r\n.two dots\r\nthree\r\nlast line without newline", text
    assert logins(cw.front, start) == ["LOGIN"]
    for sender, rcpt, reply in ((REFUSED_SENDER, "r@example.net", "550 5.7.1 sender refused"),
                                ("alice@home.example", REFUSED_RCPT, "550 5.1.1 no such user here"),
                                ("alice@home.example", LATER_RCPT, "451 4.3.0 try again later")):
        r = _sendemail(cw, tmp_path, "alice", cw.pw("alice"), sender, [rcpt], "refused")
        assert r.returncode == 1 and reply in _out(r), _out(r)
    r = _sendemail(cw, tmp_path, "carol", f"not-{cw.pw('carol')}", "carol@home.example", ["r@example.net"],
                   "wrong password")
    assert r.returncode == 1 and "SMTP-AUTH: Authentication to 127.0.0.1" in _out(r), _out(r)
    assert "login failed: user='carol' mechanism=LOGIN" in cw.front.log()[start:]
    assert len(cw.up.messages) == 1


# ------------------------------------------------------------------ Perl Net::SMTP

NET_SMTP = r"""
use strict; use warnings;
use Net::SMTP; use Authen::SASL;
my ($mode, $port, $ca, $user, $pass, $mech, $file, @rest) = @ARGV;
my $body = do { local $/; open(my $fh, "<:raw", $file) or die "$file: $!"; <$fh> };
my $smtp = Net::SMTP->new("localhost", Port => $port, Hello => "client.test", Timeout => 20, Debug => 1,
                          ($mode eq "ssl" ? (SSL => 1, SSL_ca_file => $ca) : ())) or die "connect: $@\n";
if ($mode eq "starttls") { $smtp->starttls(SSL_ca_file => $ca) or die "starttls: " . $smtp->message; }
my $sasl = Authen::SASL->new(mechanism => $mech, callback => {user => $user, pass => $pass, authname => $user});
unless ($smtp->auth($sasl)) { print "auth failed: ", $smtp->code, "\n"; exit 3; }
while (my ($from, $rcpts) = splice(@rest, 0, 2)) {
    unless ($smtp->mail($from, Bits => 8, Size => length($body))) {
        print "mail refused: ", $smtp->code, "\n"; $smtp->reset; next;
    }
    my $ok = 0;
    for my $r (split /,/, $rcpts) {
        if ($smtp->to($r)) { $ok++ } else { print "rcpt refused: ", $smtp->code, " $r\n" }
    }
    unless ($ok) { $smtp->reset; next; }
    $smtp->data or die "data: " . $smtp->message;
    $smtp->datasend($body);
    if ($smtp->dataend) { print "sent: ", $smtp->code, "\n" } else { print "data refused: ", $smtp->code, "\n" }
}
$smtp->quit or die "quit: " . $smtp->message;
"""


def _script(cw, tmp_path, interpreter: str, source: str, mode: str, port: int, user: str, password: str,
            mech: str, *envelopes: str, body: bytes = BODY, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the client scripts here: SCRIPT MODE PORT CA USER PASS MECH
    MESSAGE-FILE FROM RCPTS [FROM RCPTS ...] (RCPTS comma-separated)."""
    script, msg = tmp_path / f"client.{interpreter}", tmp_path / f"{interpreter}.msg"
    script.write_text(source)
    msg.write_bytes(body)
    return _run([tool(interpreter), str(script), mode, str(port), cw.world.ca_file, user, password, mech, str(msg),
                 *envelopes], env=env)


def _net_smtp(cw, tmp_path, *args, **kw) -> subprocess.CompletedProcess:
    return _script(cw, tmp_path, "perl", NET_SMTP, *args, **kw)


def test_perl_net_smtp_starttls_and_ssl_several_messages(cw, tmp_path):
    """Net::SMTP: starttls() then AUTH PLAIN with an initial response that
    names the user as authorization identity too (Authen::SASL's authname);
    `SSL => 1` then AUTH LOGIN without one. MAIL with BODY=8BITMIME and
    SIZE (Bits/Size), one RCPT at a time without pipelining; datasend()
    turns LF into CRLF, doubles leading dots and adds the missing final
    newline, so the upstream stores the body exactly; three messages in one
    session, the second with a refused recipient dropped (the 550 code
    reaches the script), a refused sender (550 at MAIL, then RSET), a 451
    told apart by its code, QUIT."""
    start, start_s = _starts(cw)
    body = BODY + b"\n\xc3\xa4 8-bit"
    r = _net_smtp(cw, tmp_path, "starttls", cw.front.port, "alice", cw.pw("alice"), "PLAIN",
                  "alice@home.example", "r@example.net,s@example.net",
                  "alice@home.example", f"t@example.net,{REFUSED_RCPT}",
                  REFUSED_SENDER, "r@example.net",
                  "alice@home.example", LATER_RCPT,
                  "alice@home.example", "u@example.net", body=body)
    assert r.returncode == 0, _out(r)
    assert r.stdout.decode().splitlines() == [
        "sent: 250", f"rcpt refused: 550 {REFUSED_RCPT}", "sent: 250", "mail refused: 550",
        f"rcpt refused: 451 {LATER_RCPT}", "sent: 250"], _out(r)
    assert ">>> AUTH PLAIN YWxpY2UAYWxpY2UA" in _out(r)  # base64("alice\0alice\0...")
    assert re.search(r">>> MAIL FROM:<alice@home.example> SIZE=\d+ BODY=8BITMIME\r?\n", _out(r)), _out(r)
    r = _net_smtp(cw, tmp_path, "ssl", cw.front_s.port, "bob", cw.pw("bob"), "LOGIN",
                  "bob@home.example", "r@example.net")
    assert r.returncode == 0 and r.stdout.decode() == "sent: 250\n", _out(r)
    msgs = wait_upstream(cw, 4)
    assert [(m.mail_from, m.rcpt_tos) for m in msgs] == [
        ("alice@home.example", ["r@example.net", "s@example.net"]), ("alice@home.example", ["t@example.net"]),
        ("alice@home.example", ["u@example.net"]), ("bob@home.example", ["r@example.net"])]
    for m, user, want in ((msgs[0], "alice", body), (msgs[1], "alice", body), (msgs[2], "alice", body),
                          (msgs[3], "bob", BODY)):
        assert split_ours(m, user) == want.replace(b"\n", b"\r\n") + b"\r\n"
    # the client's SIZE, grown by our Received:, and its BODY go upstream
    size, bits = msgs[0].mail_options
    assert bits == "BODY=8BITMIME" and int(size.removeprefix("SIZE=")) > len(body), msgs[0].mail_options
    # one session on each port
    assert cw.front.log()[start:].count(": connect") == 1
    assert logins(cw.front, start) == ["PLAIN"] and logins(cw.front_s, start_s) == ["LOGIN"]
    r = _net_smtp(cw, tmp_path, "starttls", cw.front.port, "carol", "wrong", "PLAIN",
                  "carol@home.example", "r@example.net")
    assert r.returncode == 3 and r.stdout.decode() == "auth failed: 535\n", _out(r)
    assert len(cw.up.messages) == 4


# ------------------------------------------------------------------ Ruby net/smtp

RUBY_SMTP = r"""
require "net/smtp"
require "openssl"
mode, port, ca, user, pass, mech, file, *rest = ARGV
body = File.binread(file)
ctx = OpenSSL::SSL::SSLContext.new
ctx.set_params(ca_file: ca)  # VERIFY_PEER and the host name
smtp = Net::SMTP.new("localhost", port.to_i)
smtp.debug_output = $stderr
smtp.read_timeout = 20
mode == "tls" ? smtp.enable_tls(ctx) : smtp.enable_starttls(ctx)
begin
  smtp.start("client.test", user, pass, mech.downcase.to_sym) do |s|
    rest.each_slice(2) do |from, rcpts|
      begin
        puts "sent: #{s.send_message(body, from, *rcpts.split(',')).string.strip}"
      rescue Net::SMTPServerBusy => e
        puts "temporary: #{e.message.strip}"
        s.rset unless ENV["NO_RSET"]
      rescue Net::SMTPFatalError => e
        puts "permanent: #{e.message.strip}"
        s.rset unless ENV["NO_RSET"]
      rescue Net::SMTPSyntaxError => e
        puts "syntax: #{e.message.strip}"
      end
    end
  end
rescue Net::SMTPAuthenticationError => e
  puts "auth failed: #{e.message.strip}"
  exit 3
end
"""


def _ruby(cw, tmp_path, *args, **kw) -> subprocess.CompletedProcess:
    return _script(cw, tmp_path, "ruby", RUBY_SMTP, *args, **kw)


def test_ruby_net_smtp_starttls_and_tls_temporary_and_permanent(cw, tmp_path):
    """Ruby net/smtp: enable_starttls with AUTH PLAIN (initial response,
    no authorization identity), enable_tls with AUTH LOGIN (none); no
    pipelining, no MAIL parameters; it converts LF to CRLF, dot-stuffs and
    ends the last line. A 451 raises Net::SMTPServerBusy, a 550
    Net::SMTPFatalError: sendooway keeps the upstream's class. (Without the
    script's `rset` after an error, net/smtp 0.3.1 sends the next MAIL into
    the open transaction and gets 503 "Nested MAIL command", as from
    Postfix.) A wrong password raises Net::SMTPAuthenticationError."""
    start, start_s = _starts(cw)
    r = _ruby(cw, tmp_path, "starttls", cw.front.port, "alice", cw.pw("alice"), "PLAIN",
              "alice@home.example", "r@example.net,s@example.net",
              "alice@home.example", f"t@example.net,{LATER_RCPT}",
              "alice@home.example", f"{REFUSED_RCPT},t@example.net",
              REFUSED_SENDER, "r@example.net",
              "alice@home.example", "u@example.net")
    assert r.returncode == 0, _out(r)
    lines = r.stdout.decode().splitlines()
    assert lines[0].startswith("sent: 250 2.0.0 queued as FAKE") and lines[4].startswith("sent: 250 "), lines
    assert lines[1:4] == ["temporary: 451 4.3.0 try again later", "permanent: 550 5.1.1 no such user here",
                          "permanent: 550 5.7.1 sender refused by fake upstream"], lines
    assert '<- "AUTH PLAIN AGFsaWNlAGFs' in _out(r)  # base64("\0alice\0...")
    r = _ruby(cw, tmp_path, "tls", cw.front_s.port, "bob", cw.pw("bob"), "LOGIN",
              "bob@home.example", "r@example.net")
    assert r.returncode == 0 and r.stdout.decode().startswith("sent: 250 "), _out(r)
    assert '<- "AUTH LOGIN\\r\\n"' in _out(r)
    msgs = wait_upstream(cw, 3)
    assert [(m.mail_from, m.rcpt_tos, m.mail_options) for m in msgs] == [
        ("alice@home.example", ["r@example.net", "s@example.net"], []),
        ("alice@home.example", ["u@example.net"], []), ("bob@home.example", ["r@example.net"], [])]
    for m, user in zip(msgs, ("alice", "alice", "bob")):
        assert split_ours(m, user) == BODY_CRLF
    assert logins(cw.front, start) == ["PLAIN"] and logins(cw.front_s, start_s) == ["LOGIN"]
    r = _ruby(cw, tmp_path, "tls", cw.front_s.port, "carol", "wrong", "LOGIN", "carol@home.example",
              "r@example.net")
    assert r.returncode == 3 and r.stdout.decode() == "auth failed: 535 5.7.8 Authentication credentials invalid\n"
    # net/smtp itself sends no RSET after a refusal: its next MAIL is nested
    r = _ruby(cw, tmp_path, "starttls", cw.front.port, "alice", cw.pw("alice"), "PLAIN",
              "alice@home.example", LATER_RCPT, "alice@home.example", "r@example.net", env={"NO_RSET": "1"})
    assert r.stdout.decode().splitlines() == ["temporary: 451 4.3.0 try again later",
                                              "syntax: 503 5.5.1 Nested MAIL command"], _out(r)
    assert len(cw.up.messages) == 3


# ------------------------------------------------------------------ PHPMailer

PHPMAILER = r"""<?php
// secure port ca user pass mech file from1 rcpts1 [from2 rcpts2 ...]
require "/usr/share/php/libphp-phpmailer/autoload.php";
use PHPMailer\PHPMailer\PHPMailer;
use PHPMailer\PHPMailer\SMTP;
use PHPMailer\PHPMailer\Exception;
$a = array_slice($argv, 1);
[$secure, $port, $ca, $user, $pass, $mech, $file] = array_splice($a, 0, 7);
$m = new PHPMailer(true);
$m->isSMTP();
$m->SMTPDebug = SMTP::DEBUG_SERVER;
$m->Debugoutput = function ($s, $level) { fwrite(STDERR, rtrim($s) . "\n"); };
$m->Host = "localhost"; $m->Port = (int)$port; $m->Helo = "client.test"; $m->Hostname = "client.test";
$m->SMTPSecure = $secure; $m->SMTPAutoTLS = false; $m->SMTPAuth = true; $m->AuthType = $mech;
$m->Username = $user; $m->Password = $pass; $m->SMTPKeepAlive = true; $m->XMailer = " ";
$m->SMTPOptions = ["ssl" => ["cafile" => $ca, "verify_peer" => true, "verify_peer_name" => true]];
$status = 0; $n = 0;
foreach (array_chunk($a, 2) as [$from, $rcpts]) {
    $n++;
    $m->clearAddresses();
    $m->setFrom($from); $m->Sender = $from;
    foreach (explode(",", $rcpts) as $r) { $m->addAddress($r); }
    $m->Subject = "phpmailer $secure $n"; $m->MessageID = "<php$n@client.test>";
    $m->MessageDate = "Wed, 25 Nov 2026 12:00:00 +0000"; $m->Body = file_get_contents($file);
    try { $m->send(); echo "sent $n\n"; }
    catch (Exception $e) { echo "failed $n: " . $e->getMessage() . "\n"; $status = 2; }
}
$m->smtpClose();
exit($status);
"""


def _phpmailer(cw, tmp_path, *args, **kw) -> subprocess.CompletedProcess:
    return _script(cw, tmp_path, "php", PHPMAILER, *args, **kw)


def _php_message(secure: str, n: int, sender: str, rcpts: str) -> bytes:
    return (f"Date: Wed, 25 Nov 2026 12:00:00 +0000\r\nTo: {rcpts.replace(',', ', ')}\r\nFrom: {sender}\r\n"
            f"Subject: phpmailer {secure} {n}\r\nMessage-ID: <php{n}@client.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=iso-8859-1\r\n\r\n").encode() + BODY_CRLF + b"\r\n"


def test_phpmailer_tls_and_ssl_keepalive(cw, tmp_path):
    """PHPMailer: SMTPSecure "tls" (STARTTLS) with AUTH PLAIN sent without
    an initial response (334 with an empty challenge, then the response),
    SMTPSecure "ssl" (implicit TLS) with AUTH LOGIN; SMTPKeepAlive: several
    messages in one session, RSET after each. No MAIL parameters, no
    pipelining; it dot-stuffs and ends the body with an empty line. A
    refused recipient (550 or 451) leaves the others delivered but the
    send() fails naming the address and the upstream's text (PHPMailer does
    not tell 4xx from 5xx); a refused sender fails the send(); the session
    goes on. A wrong password: "Could not authenticate"."""
    start, start_s = _starts(cw)
    r = _phpmailer(cw, tmp_path, "tls", cw.front.port, "alice", cw.pw("alice"), "PLAIN",
                   "alice@home.example", "r@example.net,s@example.net")
    assert r.returncode == 0 and r.stdout.decode() == "sent 1\n", _out(r)
    assert re.search(r"CLIENT -> SERVER: AUTH PLAIN\nSERVER -> CLIENT: 334 ?\n", _out(r)), _out(r)
    envelopes = [("bob@home.example", "r@example.net"), ("bob@home.example", f"s@example.net,{REFUSED_RCPT}"),
                 ("bob@home.example", f"t@example.net,{LATER_RCPT}"), (REFUSED_SENDER, "r@example.net"),
                 ("bob@home.example", "u@example.net")]
    r = _phpmailer(cw, tmp_path, "ssl", cw.front_s.port, "bob", cw.pw("bob"), "LOGIN",
                   *[x for e in envelopes for x in e])
    assert r.returncode == 2, _out(r)
    out = r.stdout.decode()
    assert [line for line in out.splitlines() if line.startswith(("sent", "failed"))] == [
        "sent 1", f"failed 2: SMTP Error: The following recipients failed: {REFUSED_RCPT}: no such user here",
        f"failed 3: SMTP Error: The following recipients failed: {LATER_RCPT}: try again later",
        f"failed 4: The following From address failed: {REFUSED_SENDER} : MAIL FROM command failed,"
        "sender refused by fake upstream", "sent 5"], out
    assert "SMTP code: 550 Additional SMTP info: 5.7.1" in out
    msgs = wait_upstream(cw, 5)
    want = [("alice@home.example", ["r@example.net", "s@example.net"], "tls", 1, "r@example.net,s@example.net"),
            ("bob@home.example", ["r@example.net"], "ssl", 1, "r@example.net"),
            ("bob@home.example", ["s@example.net"], "ssl", 2, f"s@example.net,{REFUSED_RCPT}"),
            ("bob@home.example", ["t@example.net"], "ssl", 3, f"t@example.net,{LATER_RCPT}"),
            ("bob@home.example", ["u@example.net"], "ssl", 5, "u@example.net")]
    for m, (sender, rcpts, secure, n, to) in zip(msgs, want):
        assert (m.mail_from, m.rcpt_tos, m.mail_options) == (sender, rcpts, [])
        assert split_ours(m, sender.split("@")[0]) == _php_message(secure, n, sender, to)
    assert logins(cw.front, start) == ["PLAIN"] and logins(cw.front_s, start_s) == ["LOGIN"]
    assert cw.front_s.log()[start_s:].count(": connect") == 1
    r = _phpmailer(cw, tmp_path, "tls", cw.front.port, "carol", "wrong", "LOGIN",
                   "carol@home.example", "r@example.net")
    assert r.returncode == 2 and "failed 1: SMTP Error: Could not authenticate." in r.stdout.decode(), _out(r)
    assert "535 5.7.8" in _out(r)
    assert len(cw.up.messages) == 5


# ------------------------------------------------------------------ GNU Mailutils

def _mail(cw, tmp_path, url: str, sender: str, rcpts: list[str], subject: str) -> subprocess.CompletedProcess:
    # mail.mailutils, not `mail` (the mailx alternative may be another
    # program), called `mail` (its messages start with that name)
    return _run(["mail", "--no-config", "-E", f"set sendmail={url}", "-r", sender, "-s", subject,
                 "--debug-level=mailer.prot", *rcpts], env={"HOME": str(tmp_path)}, body=BODY,
                executable=tool("mail.mailutils"))


def test_mailutils_mail_smtp_and_smtps(cw, tmp_path):
    """GNU Mailutils `mail` with a mailer URL: smtp:// does STARTTLS by
    itself (offered), EHLO with the host name, then AUTH by GNU SASL:
    LOGIN by default, `;auth=PLAIN` without an initial response; smtps://
    to the -s port. After AUTH it sends EHLO again (RFC 4954 allows it;
    sendooway no longer lists AUTH then), MAIL with SIZE. It dot-stuffs and
    ends the last line. A 550 to MAIL and a 451 to RCPT: RSET, QUIT, exit
    1 and dead.letter; a wrong password: exit 1. (Seen, not sendooway's
    matter: Mailutils 3.15 checks no server certificate, it has no CA
    setting for its TLS client; and with one recipient refused and one
    accepted it sends to the one and exits 0 without a word.)"""
    start, start_s = _starts(cw)
    pw = cw.pw("alice")
    # (it is given no CA, and the frontend's certificate is the test CA's:
    # it checks none)
    r = _mail(cw, tmp_path, f"smtp://alice:{pw}@localhost:{cw.front.port}", "alice@home.example",
              ["r@example.net", "s@example.net"], "mailutils smtp")
    assert r.returncode == 0, _out(r)
    assert "mail: C: STARTTLS" in _out(r) and "mail: C: AUTH LOGIN\n" in _out(r)
    r = _mail(cw, tmp_path, f"smtp://alice:{pw}@localhost:{cw.front.port};auth=PLAIN", "alice@home.example",
              ["t@example.net"], "mailutils plain")
    assert r.returncode == 0, _out(r)
    assert "mail: C: AUTH PLAIN\nmail: S: 334 \n" in _out(r), _out(r)
    r = _mail(cw, tmp_path, f"smtps://bob:{cw.pw('bob')}@localhost:{cw.front_s.port}", "bob@home.example",
              ["r@example.net"], "mailutils smtps")
    assert r.returncode == 0, _out(r)
    assert "STARTTLS" not in _out(r)
    msgs = wait_upstream(cw, 3)
    assert [(m.mail_from, m.rcpt_tos) for m in msgs] == [
        ("alice@home.example", ["r@example.net", "s@example.net"]), ("alice@home.example", ["t@example.net"]),
        ("bob@home.example", ["r@example.net"])]
    # its EHLO name is the host's (our Received: says "from unknown" if that is no domain)
    ehlo = re.search(r"mail: C: EHLO (\S+)\n", _out(r)).group(1).encode()
    for m, user, subject in zip(msgs, ("alice", "alice", "bob"), ("smtp", "plain", "smtps")):
        assert len(m.mail_options) == 1 and m.mail_options[0].startswith("SIZE="), m.mail_options
        assert OUR_RECEIVED.match(m.data).group("helo") in (ehlo, b"unknown"), m.data[:200]
        head, _, text = split_ours(m, user, helo=None).partition(b"\r\n\r\n")
        assert head.startswith(f"Subject: mailutils {subject}\r\nTo: ".encode()), head
        assert b"\r\nUser-Agent: mail (GNU Mailutils 3." in head
        assert text == BODY_CRLF
    assert logins(cw.front, start) == ["LOGIN", "PLAIN"] and logins(cw.front_s, start_s) == ["LOGIN"]
    for sender, rcpt, reply in ((REFUSED_SENDER, "r@example.net", "S: 550 5.7.1 sender refused"),
                                ("alice@home.example", LATER_RCPT, "S: 451 4.3.0 try again later")):
        r = _mail(cw, tmp_path, f"smtp://alice:{pw}@localhost:{cw.front.port}", sender, [rcpt], "refused")
        assert r.returncode == 1 and reply in _out(r) and "mail: C: RSET" in _out(r), _out(r)
        assert "cannot send message: Operation rejected by remote party" in _out(r)
    assert (tmp_path / "dead.letter").exists()
    r = _mail(cw, tmp_path, f"smtp://carol:wrong@localhost:{cw.front.port}", "carol@home.example",
              ["r@example.net"], "wrong password")
    assert r.returncode == 1 and "S: 535 5.7.8" in _out(r), _out(r)
    assert len(cw.up.messages) == 3
    # one recipient refused, one accepted: sent to the one, exit 0, no word
    r = _mail(cw, tmp_path, f"smtp://alice:{pw}@localhost:{cw.front.port}", "alice@home.example",
              [REFUSED_RCPT, "w@example.net"], "one refused")
    assert r.returncode == 0 and "S: 550 5.1.1 no such user here" in _out(r), _out(r)
    assert [m.rcpt_tos for m in wait_upstream(cw, 4)][3:] == [["w@example.net"]]


# ------------------------------------------------------------------ curl's edges

def _curl(cw, port: int, scheme: str, user: str, password: str, sender: str, rcpts: list[str], upload,
          *extra: str) -> subprocess.CompletedProcess:
    # the URL's path is curl's EHLO name; without one it would append the
    # upload's file name and EHLO with that
    return _run([tool("curl"), "-sS", "-v", "--url", f"{scheme}://localhost:{port}/client.test",
                 *(["--ssl-reqd"] if scheme == "smtp" else []), "--cacert", cw.world.ca_file,
                 "--user", f"{user}:{password}", "--mail-from", sender,
                 *[a for r in rcpts for a in ("--mail-rcpt", r)], "-T", str(upload), *extra])


def test_curl_mail_auth_refused_rcpt_and_crlf(cw, tmp_path):
    """curl: --mail-auth puts AUTH=<...> on MAIL (taken, not passed on:
    the upstream login is another identity); MAIL carries SIZE of the file.
    Several --mail-rcpt of which the upstream refuses one: curl QUITs in
    the middle of the transaction (exit 55, nothing is delivered, not even
    to the accepted one); with --mail-rcpt-allowfails it goes on to DATA
    for the others. A 451 is exit 55 too (curl does not tell it from a
    5xx). --crlf turns the LF file into CRLF lines before curl's own
    dot-stuffing: the upstream stores the file exactly."""
    start, start_s = _starts(cw)
    pw = cw.pw("alice")
    ok = tmp_path / "crlf.eml"
    ok.write_bytes(b"Subject: curl\r\n\r\n.leading dot\r\nhi\r\n")
    r = _curl(cw, cw.front.port, "smtp", "alice", pw, "alice@home.example", ["r@example.net"], ok,
              "--mail-auth", "alice@home.example")
    assert r.returncode == 0, _out(r)
    size = len(ok.read_bytes())
    assert f"> MAIL FROM:<alice@home.example> AUTH=<alice@home.example> SIZE={size}\r\n" in _out(r), _out(r)
    r = _curl(cw, cw.front.port, "smtp", "alice", pw, "alice@home.example", ["s@example.net", REFUSED_RCPT], ok)
    assert r.returncode == 55 and "curl: (55) RCPT failed: 550" in _out(r), _out(r)
    # (-v puts TLS record notes between the lines; curl 7.88 of Debian 12
    # QUITs after the refusal, 8.14 of Debian 13 closes without a QUIT)
    assert re.search(r"< 550 5\.1\.1 no such user here\r\n(?:[{}*][^\n]*\n)*"
                     r"(?:> QUIT\r\n(?:[{}*][^\n]*\n)*< 221 |\* shutting down connection #0\n)",
                     _out(r)), _out(r)
    assert "> DATA" not in _out(r), _out(r)
    r = _curl(cw, cw.front_s.port, "smtps", "alice", pw, "alice@home.example",
              ["t@example.net", REFUSED_RCPT, "u@example.net"], ok, "--mail-rcpt-allowfails")
    assert r.returncode == 0, _out(r)
    r = _curl(cw, cw.front.port, "smtp", "alice", pw, "alice@home.example", [LATER_RCPT], ok)
    assert r.returncode == 55 and "curl: (55) RCPT failed: 451" in _out(r), _out(r)
    lf = tmp_path / "lf.eml"
    lf.write_bytes(b"Subject: lf\n\n" + BODY)
    r = _curl(cw, cw.front_s.port, "smtps", "alice", pw, "alice@home.example", ["v@example.net"], lf, "--crlf")
    assert r.returncode == 0, _out(r)
    msgs = wait_upstream(cw, 3)
    assert [(m.mail_from, m.rcpt_tos) for m in msgs] == [
        ("alice@home.example", ["r@example.net"]), ("alice@home.example", ["t@example.net", "u@example.net"]),
        ("alice@home.example", ["v@example.net"])]
    # SIZE: the client's, grown by our Received:; AUTH= stays here
    assert [o[:5] for m in msgs for o in m.mail_options] == ["SIZE="] * 3
    assert int(msgs[0].mail_options[0][5:]) == size + len(msgs[0].data) - len(split_ours(msgs[0], "alice"))
    assert split_ours(msgs[0], "alice") == ok.read_bytes() == split_ours(msgs[1], "alice")
    assert split_ours(msgs[2], "alice") == b"Subject: lf\r\n\r\n" + BODY_CRLF
    assert logins(cw.front, start) == ["PLAIN"] * 3 and logins(cw.front_s, start_s) == ["PLAIN"] * 2
    r = _curl(cw, cw.front.port, "smtp", "carol", "wrong", "carol@home.example", ["r@example.net"], ok)
    assert r.returncode == 67 and "< 535 5.7.8" in _out(r), _out(r)
    assert len(cw.up.messages) == 3


def test_curl_file_with_bare_lf_is_refused_never_smuggled(cw, tmp_path):
    """curl uploads a file as it is unless told --crlf: bare LFs go on the
    wire, and curl's dot-stuffing looks only at CRLF-ended lines, so an
    "\\n.\\n" line stays a lone dot. sendooway refuses the message (nothing
    reaches the upstream's final dot): a file whose bare-LF lines end
    without such a dot line gets 550 5.6.0 and the session goes on; one
    with a lone-dot line, after which the rest could be commands, gets 421
    4.6.0 and the close, and what followed it (here a crafted MAIL/RCPT/DATA
    "message") is never read as commands. curl reports both (exit 8)."""
    pw = cw.pw("alice")
    plain = tmp_path / "lf-plain.eml"
    plain.write_bytes(b"Subject: lf\n\nfirst line\nlast line")
    r = _curl(cw, cw.front.port, "smtp", "alice", pw, "alice@home.example", ["r@example.net"], plain)
    assert r.returncode == 8 and "< 550 5.6.0 Message refused: bare CR or LF in message" in _out(r), _out(r)
    smuggle = tmp_path / "lf-smuggle.eml"
    smuggle.write_bytes(b"Subject: lf\n\nfirst line\n.\nMAIL FROM:<alice@home.example>\n"
                        b"RCPT TO:<smuggled@example.net>\nDATA\nSubject: smuggled\n\nsmuggled\n")
    for port, scheme in ((cw.front.port, "smtp"), (cw.front_s.port, "smtps")):
        r = _curl(cw, port, scheme, "alice", pw, "alice@home.example", ["r@example.net"], smuggle)
        assert r.returncode == 8 and "< 421 4.6.0 " in _out(r), _out(r)
    assert "closed: " in cw.front.log() and cw.up.messages == []
    # the frontends still serve
    ok = tmp_path / "ok.eml"
    ok.write_bytes(b"Subject: ok\r\n\r\nok\r\n")
    r = _curl(cw, cw.front.port, "smtp", "alice", pw, "alice@home.example", ["r@example.net"], ok)
    assert r.returncode == 0, _out(r)
    [m] = wait_upstream(cw, 1)
    assert m.rcpt_tos == ["r@example.net"] and split_ours(m, "alice") == ok.read_bytes()


# ------------------------------------------------------------------ aiosmtplib

def test_aiosmtplib_starttls_and_tls(cw):
    """aiosmtplib (asyncio): start_tls=True with AUTH PLAIN (initial
    response), use_tls=True with AUTH LOGIN whose initial response is the
    user name (then one 334 for the password); sendmail() sends a
    lower-case `size=` (passed upstream as SIZE=), send_message() of an
    8-bit message BODY=8BITMIME; no pipelining. A refused recipient among
    accepted ones comes back in sendmail()'s result, all refused raises
    SMTPRecipientsRefused with the upstream's code (4xx or 5xx), a refused
    sender SMTPSenderRefused (550), a wrong password
    SMTPAuthenticationError (535), CRAM-MD5 (not offered) 504."""
    import aiosmtplib

    start, start_s = _starts(cw)
    ctx = ssl.create_default_context(cafile=cw.world.ca_file)
    raw = b"Subject: aio\r\n\r\nfirst line\r\n.\r\n..two\r\nlast"
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "bob@home.example", "r@example.net", "aio 8bit"
    msg.set_content("\u00e4 8-bit\n.\n", cte="8bit")

    async def session(port: int, user: str, mechanism: str, **tls) -> list:
        results = []
        smtp = aiosmtplib.SMTP(hostname="localhost", port=port, tls_context=ctx, local_hostname="client.test",
                               timeout=20, **tls)
        async with smtp:
            await getattr(smtp, f"auth_{mechanism}")(user, cw.pw(user))
            results.append(await smtp.sendmail(f"{user}@home.example", ["r@example.net", REFUSED_RCPT], raw))
            for sender, rcpts in ((f"{user}@home.example", [LATER_RCPT, REFUSED_RCPT]),
                                  (REFUSED_SENDER, ["r@example.net"])):
                try:
                    await smtp.sendmail(sender, rcpts, raw)
                except aiosmtplib.SMTPRecipientsRefused as e:
                    results.append(sorted((x.code, x.recipient) for x in e.recipients))
                except aiosmtplib.SMTPSenderRefused as e:
                    results.append((e.code, e.sender))
            if user == "bob":
                results.append(await smtp.send_message(msg))
        return results

    async def refused() -> list:
        out = []
        for mechanism, password in (("plain", "wrong"), ("crammd5", "x")):
            async with aiosmtplib.SMTP(hostname="localhost", port=cw.front.port, tls_context=ctx,
                                       local_hostname="client.test", start_tls=True, timeout=20) as smtp:
                try:
                    await getattr(smtp, f"auth_{mechanism}")("carol", password)
                except aiosmtplib.SMTPAuthenticationError as e:
                    out.append(e.code)
        return out

    a = asyncio.run(session(cw.front.port, "alice", "plain", start_tls=True))
    b = asyncio.run(session(cw.front_s.port, "bob", "login", use_tls=True))
    for res in (a, b):
        assert res[0][0] == {REFUSED_RCPT: (550, "5.1.1 no such user here")} and res[0][1].startswith("2.0.0 ")
        assert res[1] == [(451, LATER_RCPT), (550, REFUSED_RCPT)] and res[2] == (550, REFUSED_SENDER)
    assert b[3][0] == {} and b[3][1].startswith("2.0.0 queued as FAKE")
    assert asyncio.run(refused()) == [535, 504]
    msgs = wait_upstream(cw, 3)
    assert [(m.mail_from, m.rcpt_tos) for m in msgs] == [("alice@home.example", ["r@example.net"]),
                                                         ("bob@home.example", ["r@example.net"]),
                                                         ("bob@home.example", ["r@example.net"])]
    assert split_ours(msgs[0], "alice") == split_ours(msgs[1], "bob") == raw + b"\r\n"
    assert [o[:5] for o in msgs[0].mail_options] == ["SIZE="]
    assert msgs[2].mail_options[0].startswith("SIZE=") and msgs[2].mail_options[1:] == ["BODY=8BITMIME"]
    assert split_ours(msgs[2], "bob").endswith(b"\r\n\r\n\xc3\xa4 8-bit\r\n.\r\n")
    assert logins(cw.front, start) == ["PLAIN"] and logins(cw.front_s, start_s) == ["LOGIN"]
    assert "login failed: user='carol' mechanism=PLAIN" in cw.front.log()[start:]


# ------------------------------------------------------------------ a refusal after the final dot

def test_upstream_refusing_the_message_after_the_dot_reaches_every_client(cw, tmp_path):
    """The upstream's 554 to the final dot (after MAIL, RCPT and DATA were
    accepted) is what each client hears: never a 250. Each reports it as a
    failure: sendEmail exits 1, Net::SMTP's dataend() is false with 554,
    Ruby raises Net::SMTPFatalError, PHPMailer "data not accepted", Mailutils
    exits 1, curl exits with an error, aiosmtplib raises SMTPDataError."""
    import aiosmtplib

    pw = cw.pw("alice")
    reply = "554 5.6.0 content refused"
    cw.up.fail_data = "content refused"
    try:
        r = _sendemail(cw, tmp_path, "alice", pw, "alice@home.example", ["r@example.net"], "refused data")
        assert r.returncode == 1 and reply in _out(r), _out(r)
        r = _net_smtp(cw, tmp_path, "ssl", cw.front_s.port, "alice", pw, "PLAIN", "alice@home.example",
                      "r@example.net")
        assert r.stdout.decode() == "data refused: 554\n", _out(r)
        r = _ruby(cw, tmp_path, "starttls", cw.front.port, "alice", pw, "LOGIN", "alice@home.example",
                  "r@example.net")
        assert r.stdout.decode() == f"permanent: {reply}\n", _out(r)
        r = _phpmailer(cw, tmp_path, "ssl", cw.front_s.port, "alice", pw, "PLAIN", "alice@home.example",
                       "r@example.net")
        assert r.returncode == 2 and "failed 1: SMTP Error: data not accepted." in r.stdout.decode(), _out(r)
        r = _mail(cw, tmp_path, f"smtp://alice:{pw}@localhost:{cw.front.port}", "alice@home.example",
                  ["r@example.net"], "refused data")
        assert r.returncode == 1 and f"S: {reply}" in _out(r), _out(r)
        ok = tmp_path / "ok.eml"
        ok.write_bytes(b"Subject: ok\r\n\r\nok\r\n")
        r = _curl(cw, cw.front.port, "smtp", "alice", pw, "alice@home.example", ["r@example.net"], ok)
        assert r.returncode != 0 and f"< {reply}" in _out(r), _out(r)

        async def aio() -> int:
            async with aiosmtplib.SMTP(hostname="localhost", port=cw.front_s.port, use_tls=True, timeout=20,
                                       tls_context=ssl.create_default_context(cafile=cw.world.ca_file),
                                       local_hostname="client.test", username="alice", password=pw) as smtp:
                try:
                    await smtp.sendmail("alice@home.example", ["r@example.net"], b"Subject: x\r\n\r\nx\r\n")
                except aiosmtplib.SMTPDataError as e:
                    return e.code
            return 0

        assert asyncio.run(aio()) == 554
    finally:
        cw.up.fail_data = None
    assert cw.up.messages == []
    # each logged with the upstream's word
    assert cw.front.log().count(f"upstream={reply}\n") == 4 and cw.front_s.log().count(f"upstream={reply}\n") == 3
