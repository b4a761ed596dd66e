"""Review: the server side of sendooway's TLS and SMTP with real clients on
TLS stacks other than OpenSSL and Python's ssl, and OpenSSL's s_client at
the edges (tests/test_review_realclients.py, clients2 and clients3 cover
smtplib, swaks, curl, msmtp, s-nail, neomutt, git send-email, Postfix,
Exim, sendEmail, Net::SMTP, Ruby, PHPMailer, Mailutils and aiosmtplib).

The world is tests/mta_util.client_world (a real `sendooway -b` for
STARTTLS, a real `sendooway -b -s` for implicit TLS, a real
sendooway-auth, an aiosmtpd upstream refusing some senders and recipients;
`addReceivedField = yes`). Its certificate is an ECDSA P-256 leaf issued
straight by the world's CA. A second pair of frontends (`chain`) serves an
RSA leaf issued by an intermediate CA, sslCert holding the leaf and then
the intermediate (as sendooway.conf(5) says), and the clients trust only
the root: Go and Java fetch no intermediates, so they validate only what
the server sends.

Clients, each from Debian bookworm (scripts/setup.sh):

- Java 17 JSSE via Jakarta Mail 2.0 (a tiny sender compiled once with
  javac, cached by content under .venv/review-build): starttls.required
  and ssl.enable, checkserveridentity on, the world's CA in an in-memory
  PKCS12 truststore; AUTH PLAIN and LOGIN;
- Go 1.19 net/smtp with crypto/tls (standard library only, built offline,
  cached the same way): StartTLS and tls.Dial, smtp.PlainAuth;
- nodemailer 6.8 on Node (its TLS is the system's OpenSSL 3.0, its SMTP
  client its own): requireTLS and secure, PLAIN and LOGIN, a pooled
  connection;
- gnutls-cli 3.7 (--starttls-proto=smtp and implicit TLS; TLS 1.2 with
  chosen groups) and NSS 3.87's tstclnt (implicit TLS only: it has no
  STARTTLS) for the handshake and the EHLO behind it;
- openssl s_client for TLS 1.0/1.1, CBC-only and DHE-only TLS 1.2 clients,
  P-384-only and ffdhe-only key shares, a HelloRetryRequest, the chain the
  server sends, implicit TLS spoken to the STARTTLS port and plaintext
  spoken to the implicit-TLS port.

Defect found (fixed in sendooway_front/_tls.py, docs/decisions/relay.md):
the DHE-RSA suites of the TLS 1.2 list were never chosen for a client that
names no RFC 7919 group (most DHE clients: the groups extension then lists
only curves), because the server context had no Diffie-Hellman group: a
TLS 1.2 client offering DHE and no ECDHE suite failed with "no shared
cipher" against an RSA certificate.

Log lines made clearer (sendooway_front/_driver.py, docs/decisions/
frontend.md): plain SMTP on the -s port was logged as "wrong version
number" or "timed out (no answer within Ns)" alone, and now says the
client spoke plaintext or sent nothing; and -s logs the TLS version and
cipher of each handshake, as STARTTLS does (it logged none).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trustme

from .front_util import Frontend, front_config
from .mta_util import (
    CLEAN_ENV, LATER_RCPT, REFUSED_RCPT, REFUSED_SENDER, logins, message_body, split_ours, tool, wait_upstream,
)
from .mta_util import clean_client_world, cw  # noqa: F401  (this module's fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the frontend drops to nobody: needs root")

BUILD = Path(__file__).resolve().parents[1] / ".venv" / "review-build"
JAKARTA = "/usr/share/java/jakarta-mail.jar:/usr/share/java/jakarta-activation.jar"


def _out(r: subprocess.CompletedProcess) -> str:
    return r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")


def _parallel(*argvs: list[str], env: dict | None = None, stdin: bytes = b"",
              timeout: float = 30) -> list[subprocess.CompletedProcess]:
    """Run the client processes at once (JVM and Node start-ups overlap)."""
    procs = [subprocess.Popen(a, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(CLEAN_ENV, **(env or {}))) for a in argvs]
    done = []
    for a, p in zip(argvs, procs):
        out, err = p.communicate(stdin, timeout=timeout)
        done.append(subprocess.CompletedProcess(a, p.returncode, out, err))
    return done


def _built(kind: str, source: str, build) -> Path:
    """A directory holding `source` built by `build(dir)`, made once per
    content (and compiler) under .venv/review-build."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    final = BUILD / f"{kind}-{digest}"
    if (final / ".done").exists():
        return final
    work = BUILD / f"{kind}-{digest}.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build(work)
    (work / ".done").touch()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(work, final)
    return final


def _starts(cw) -> tuple[int, int]:
    return len(cw.front.log()), len(cw.front_s.log())


def _check_messages(cw, want: list[tuple[str, list[str]]], body: bytes, user_of: dict[str, str],
                    options: list[str] | None) -> None:
    """The upstream got exactly these envelopes (in any order: clients ran
    at once), each with our Received: and then exactly `body`."""
    msgs = wait_upstream(cw, len(want))
    time.sleep(0.1)
    assert sorted((m.mail_from, m.rcpt_tos) for m in cw.up.messages) == sorted(want)
    for m in msgs:
        assert split_ours(m, user_of[m.mail_from]) == body
        if options is not None:
            assert m.mail_options == options, m.mail_options


# One message for every client: a lone "." line and a line starting with
# dots (the client must stuff them), 8-bit text, a 998-octet line.
BODY = message_body("tls clients", "home.example")
SENDERS = {"alice@home.example": "alice", "bob@home.example": "bob"}


# ------------------------------------------------------------------ Java: JSSE via Jakarta Mail

JAVA_SENDER = r"""
import com.sun.mail.smtp.*;
import jakarta.mail.*;
import jakarta.mail.internet.*;
import java.io.*;
import java.nio.file.*;
import java.security.KeyStore;
import java.security.cert.*;
import java.util.*;
import javax.net.ssl.*;

/** One SMTP session through Jakarta Mail and JSSE, a message per FROM RCPTS pair.
 *  Args: MODE(starttls|ssl) PORT CA-PEM USER PASS MECH MESSAGE-FILE FROM RCPTS [FROM RCPTS ...] */
public class Sender {
    public static void main(String[] a) throws Exception {
        KeyStore trust = KeyStore.getInstance("PKCS12");
        trust.load(null, null);
        try (InputStream in = new FileInputStream(a[2])) {
            int i = 0;
            for (Certificate c : CertificateFactory.getInstance("X.509").generateCertificates(in))
                trust.setCertificateEntry("ca" + i++, c);
        }
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(null, tmf.getTrustManagers(), null);
        SSLContext.setDefault(ctx);

        boolean ssl = a[0].equals("ssl");
        String proto = ssl ? "smtps" : "smtp", k = "mail." + proto + ".";
        Properties p = new Properties();
        p.put(k + "host", "localhost");
        p.put(k + "port", a[1]);
        p.put(k + "localhost", "client.test");
        p.put(k + "auth", "true");
        p.put(k + "auth.mechanisms", a[5]);
        p.put(k + "allow8bitmime", "true");
        p.put(k + "timeout", "20000");
        p.put(k + "connectiontimeout", "20000");
        p.put(k + "ssl.checkserveridentity", "true");
        p.put(ssl ? k + "ssl.enable" : k + "starttls.required", "true");
        Session session = Session.getInstance(p);
        byte[] raw = Files.readAllBytes(Paths.get(a[6]));
        SMTPTransport t = (SMTPTransport) session.getTransport(proto);
        try {
            t.connect(a[3], a[4]);
        } catch (AuthenticationFailedException e) {
            System.out.println("auth failed: " + t.getLastServerResponse());
            System.exit(3);
        } catch (MessagingException e) {
            System.out.println("connect failed: " + e + " / " + e.getNextException());
            System.exit(4);
        }
        for (int i = 7; i + 1 < a.length; i += 2) {
            SMTPMessage m = new SMTPMessage(session, new ByteArrayInputStream(raw));
            m.setEnvelopeFrom(a[i]);  // (the parsed headers stay as they are)
            String[] rs = a[i + 1].split(",");
            Address[] to = new Address[rs.length];
            for (int j = 0; j < rs.length; j++) to[j] = new InternetAddress(rs[j]);
            try {
                t.sendMessage(m, to);
                System.out.println("sent: " + t.getLastReturnCode());
            } catch (SendFailedException e) {
                Exception n = e;
                while (!(n instanceof SMTPAddressFailedException || n instanceof SMTPSenderFailedException)
                       && n instanceof MessagingException && ((MessagingException) n).getNextException() != null)
                    n = ((MessagingException) n).getNextException();
                int code = n instanceof SMTPAddressFailedException ? ((SMTPAddressFailedException) n).getReturnCode()
                         : n instanceof SMTPSenderFailedException ? ((SMTPSenderFailedException) n).getReturnCode()
                         : -1;
                System.out.println("refused: " + code + " " + n.getClass().getSimpleName());
            }
        }
        t.close();
    }
}
"""


@pytest.fixture(scope="module")
def java_sender() -> list[str]:
    javac, java = tool("javac"), tool("java")
    for jar in JAKARTA.split(":"):
        if not os.path.exists(jar):
            pytest.skip(f"{jar} is missing (scripts/setup.sh installs libjakarta-mail-java)")

    def build(d: Path) -> None:
        (d / "Sender.java").write_text(JAVA_SENDER)
        r = subprocess.run([javac, "-cp", JAKARTA, "-d", str(d), str(d / "Sender.java")],
                           capture_output=True, env=CLEAN_ENV, timeout=120)
        assert r.returncode == 0, _out(r)

    d = _built("java", JAVA_SENDER + JAKARTA, build)
    return [java, "-Xshare:auto", "-XX:TieredStopAtLevel=1", "-cp", f"{JAKARTA}:{d}", "Sender"]


def test_java_jakarta_mail_starttls_and_smtps(cw, tmp_path, java_sender):
    """Jakarta Mail over JSSE. Port 587: EHLO client.test, STARTTLS (TLS
    1.3, the server's name checked against the certificate), EHLO, AUTH
    PLAIN with an initial response, MAIL FROM without BODY= (allow8bitmime
    adds BODY=8BITMIME only when it turns a quoted-printable or base64 part
    into 8bit: the 8-bit text here goes as it is), every RCPT, DATA with the message it parsed written back unchanged
    (dot-stuffed, CRLF), four messages on one connection: one to two
    recipients, one to a recipient the upstream refuses (550: Jakarta Mail
    sends RSET and reports SMTPAddressFailedException with the code), one
    from a sender it refuses (550 at MAIL: SMTPSenderFailedException), one
    to a recipient it defers (451). Port 465 (TLS at connect): AUTH LOGIN
    without initial response, one message. A wrong password: 535 and
    AuthenticationFailedException."""
    msg = tmp_path / "msg"
    msg.write_bytes(BODY)
    start, start_s = _starts(cw)
    ca = cw.world.ca_file
    r587, r465, wrong = _parallel(
        [*java_sender, "starttls", str(cw.front.port), ca, "alice", cw.pw("alice"), "PLAIN", str(msg),
         "alice@home.example", "r@example.net,s@example.net", "alice@home.example", REFUSED_RCPT,
         REFUSED_SENDER, "r@example.net", "alice@home.example", LATER_RCPT],
        [*java_sender, "ssl", str(cw.front_s.port), ca, "bob", cw.pw("bob"), "LOGIN", str(msg),
         "bob@home.example", "t@example.net"],
        [*java_sender, "ssl", str(cw.front_s.port), ca, "carol", "not-" + cw.pw("carol"), "LOGIN", str(msg),
         "carol@home.example", "t@example.net"])
    assert r587.returncode == 0 and r587.stdout.decode().splitlines() == [
        "sent: 250", "refused: 550 SMTPAddressFailedException", "refused: 550 SMTPSenderFailedException",
        "refused: 451 SMTPAddressFailedException"], _out(r587)
    assert r465.returncode == 0 and r465.stdout.decode() == "sent: 250\n", _out(r465)
    assert wrong.returncode == 3 and wrong.stdout.decode().startswith("auth failed: 535 5.7.8"), _out(wrong)
    _check_messages(cw, [("alice@home.example", ["r@example.net", "s@example.net"]),
                         ("bob@home.example", ["t@example.net"])], BODY, SENDERS, [])
    assert logins(cw.front, start) == ["PLAIN"]
    assert logins(cw.front_s, start_s) == ["LOGIN"]
    assert "STARTTLS: TLSv1.3 " in cw.front.log()[start:]
    # -s logs the version too (it logged none before this review)
    text = cw.front_s.log()[start_s:]
    bob = re.search(r" (\w+) client=\S+ user=bob: login: mechanism=LOGIN", text).group(1)
    assert re.search(rf" {bob} client=\S+: TLS: TLSv1\.3 TLS_AES_\w+\n", text), text
    assert "login failed: user='carol' mechanism=LOGIN" in cw.front_s.log()[start_s:]


# ------------------------------------------------------------------ Go: crypto/tls and net/smtp

GO_SENDER = r"""
// One SMTP session with net/smtp over crypto/tls, a message per FROM RCPTS pair.
// Args: MODE(starttls|ssl) PORT CA-PEM USER PASS MESSAGE-FILE FROM RCPTS [FROM RCPTS ...]
package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/smtp"
	"net/textproto"
	"os"
	"strings"
)

func code(err error) string {
	var te *textproto.Error
	if errors.As(err, &te) {
		return fmt.Sprint(te.Code)
	}
	return "error " + err.Error()
}

func main() {
	a := os.Args[1:]
	pem, err := os.ReadFile(a[2])
	if err != nil {
		panic(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	conf := &tls.Config{ServerName: "localhost", RootCAs: pool}
	addr := net.JoinHostPort("localhost", a[1])
	var c *smtp.Client
	if a[0] == "ssl" {
		conn, err := tls.Dial("tcp", addr, conf)
		if err != nil {
			fmt.Println("tls failed:", err)
			os.Exit(4)
		}
		if c, err = smtp.NewClient(conn, "localhost"); err != nil {
			panic(err)
		}
	} else if c, err = smtp.Dial(addr); err != nil {
		panic(err)
	}
	if err := c.Hello("client.test"); err != nil {
		panic(err)
	}
	if a[0] != "ssl" {
		if err := c.StartTLS(conf); err != nil {
			fmt.Println("tls failed:", err)
			os.Exit(4)
		}
	}
	state, _ := c.TLSConnectionState()
	fmt.Printf("tls: %x %d certificates\n", state.Version, len(state.PeerCertificates))
	if err := c.Auth(smtp.PlainAuth("", a[3], a[4], "localhost")); err != nil {
		fmt.Println("auth failed:", code(err))
		os.Exit(3)
	}
	body, err := os.ReadFile(a[5])
	if err != nil {
		panic(err)
	}
	for i := 6; i+1 < len(a); i += 2 {
		if err := c.Mail(a[i]); err != nil {
			fmt.Println("mail refused:", code(err))
			c.Reset()
			continue
		}
		ok := 0
		for _, r := range strings.Split(a[i+1], ",") {
			if err := c.Rcpt(r); err != nil {
				fmt.Println("rcpt refused:", code(err), r)
			} else {
				ok++
			}
		}
		if ok == 0 {
			c.Reset()
			continue
		}
		w, err := c.Data()
		if err != nil {
			fmt.Println("data refused:", code(err))
			continue
		}
		w.Write(body)
		if err := w.Close(); err != nil {
			fmt.Println("message refused:", code(err))
		} else {
			fmt.Println("sent")
		}
	}
	if err := c.Quit(); err != nil {
		panic(err)
	}
}
"""


@pytest.fixture(scope="module")
def go_sender() -> list[str]:
    go = tool("go")

    def build(d: Path) -> None:
        (d / "sender.go").write_text(GO_SENDER)
        env = dict(CLEAN_ENV, GOCACHE=str(d / "cache"), GOPATH=str(d / "gopath"), GO111MODULE="off",
                   GOPROXY="off", GOFLAGS="", CGO_ENABLED="0")
        r = subprocess.run([go, "build", "-o", str(d / "sender"), str(d / "sender.go")],
                           capture_output=True, env=env, timeout=180, cwd=str(d))
        assert r.returncode == 0, _out(r)
        shutil.rmtree(d / "cache", ignore_errors=True)

    version = subprocess.run([go, "version"], capture_output=True, env=CLEAN_ENV).stdout.decode()
    return [str(_built("go", GO_SENDER + version, build) / "sender")]


def test_go_net_smtp_starttls_and_tls_dial(cw, tmp_path, go_sender):
    """Go's net/smtp on crypto/tls (no OpenSSL anywhere). Port 587: EHLO
    client.test, STARTTLS (TLS 1.3, chain and name checked by crypto/tls),
    EHLO again, AUTH PLAIN with an initial response (smtp.PlainAuth, which
    insists on TLS), MAIL FROM with BODY=8BITMIME (net/smtp adds it when
    8BITMIME is offered), one RCPT each (a 550 reaches the program as a
    textproto.Error with the code, the 451 too), DATA through textproto's
    dot-writer, QUIT. Port 465: tls.Dial, then the same. A wrong password:
    535."""
    msg = tmp_path / "msg"
    msg.write_bytes(BODY)
    start, start_s = _starts(cw)
    ca = cw.world.ca_file
    r587, r465, wrong = _parallel(
        [*go_sender, "starttls", str(cw.front.port), ca, "alice", cw.pw("alice"), str(msg),
         "alice@home.example", f"r@example.net,{REFUSED_RCPT},s@example.net", REFUSED_SENDER, "r@example.net",
         "alice@home.example", LATER_RCPT],
        [*go_sender, "ssl", str(cw.front_s.port), ca, "bob", cw.pw("bob"), str(msg), "bob@home.example",
         "t@example.net"],
        [*go_sender, "ssl", str(cw.front_s.port), ca, "carol", "not-" + cw.pw("carol"), str(msg),
         "carol@home.example", "t@example.net"])
    assert r587.returncode == 0 and r587.stdout.decode().splitlines() == [
        "tls: 304 1 certificates", f"rcpt refused: 550 {REFUSED_RCPT}", "sent", "mail refused: 550",
        f"rcpt refused: 451 {LATER_RCPT}"], _out(r587)
    assert r465.returncode == 0 and r465.stdout.decode().splitlines() == ["tls: 304 1 certificates", "sent"], \
        _out(r465)
    assert wrong.returncode == 3 and wrong.stdout.decode().splitlines()[-1] == "auth failed: 535", _out(wrong)
    _check_messages(cw, [("alice@home.example", ["r@example.net", "s@example.net"]),
                         ("bob@home.example", ["t@example.net"])], BODY, SENDERS, ["BODY=8BITMIME"])
    assert logins(cw.front, start) == ["PLAIN"]
    assert logins(cw.front_s, start_s) == ["PLAIN"]
    assert "login failed: user='carol' mechanism=PLAIN" in cw.front_s.log()[start_s:]


# ------------------------------------------------------------------ Node: nodemailer

NODE_SENDER = r"""
// nodemailer: one pooled connection, a message per FROM RCPTS pair.
// Args: MODE(starttls|ssl) PORT CA-PEM USER PASS MECH MESSAGE-FILE FROM RCPTS [FROM RCPTS ...]
const fs = require("fs");
const nodemailer = require("nodemailer");
const [mode, port, ca, user, pass, method, file, ...jobs] = process.argv.slice(2);
const transport = nodemailer.createTransport({
  host: "127.0.0.1", port: Number(port), secure: mode === "ssl", requireTLS: mode !== "ssl",
  name: "client.test", auth: { user, pass, method }, tls: { ca: [fs.readFileSync(ca)] },
  pool: true, maxConnections: 1, connectionTimeout: 20000, socketTimeout: 20000,
});
const raw = fs.readFileSync(file);
(async () => {
  for (let i = 0; i + 1 < jobs.length; i += 2) {
    try {
      const info = await transport.sendMail({ envelope: { from: jobs[i], to: jobs[i + 1].split(",") }, raw });
      console.log("sent: " + info.response.slice(0, 3) + " rejected=" + info.rejected.join(","));
    } catch (e) {
      console.log("refused: " + (e.responseCode || e.code) + " " + (e.command || ""));
    }
  }
  transport.close();
})();
"""


@pytest.fixture(scope="module")
def node_sender(tmp_path_factory) -> list[str]:
    node = tool("node")
    if not os.path.exists("/usr/share/nodejs/nodemailer/package.json"):
        pytest.skip("nodemailer is not installed (scripts/setup.sh installs node-nodemailer)")
    script = tmp_path_factory.mktemp("node") / "sender.js"
    script.write_text(NODE_SENDER)
    return [node, str(script)]


def test_node_nodemailer_starttls_and_secure(cw, tmp_path, node_sender):
    """nodemailer (Node 20, whose TLS is the system's OpenSSL: the SMTP
    client is nodemailer's own). requireTLS on 587: EHLO client.test,
    STARTTLS, EHLO, AUTH PLAIN with an initial response, MAIL FROM without
    parameters (a raw message is not looked into for 8-bit octets), every
    RCPT, the raw message as given, dot-stuffed. One refused
    recipient of three is reported in `rejected` and the message goes to
    the others; a refused sender (550 at MAIL) and a deferred recipient
    (451) are errors with their codes. secure on 465: AUTH LOGIN. A wrong
    password: 535."""
    msg = tmp_path / "msg"
    msg.write_bytes(BODY)
    start, start_s = _starts(cw)
    ca = cw.world.ca_file
    env = {"NODE_PATH": "/usr/share/nodejs"}
    r587, r465, wrong = _parallel(
        [*node_sender, "starttls", str(cw.front.port), ca, "alice", cw.pw("alice"), "PLAIN", str(msg),
         "alice@home.example", f"r@example.net,{REFUSED_RCPT},s@example.net", REFUSED_SENDER, "r@example.net",
         "alice@home.example", LATER_RCPT],
        [*node_sender, "ssl", str(cw.front_s.port), ca, "bob", cw.pw("bob"), "LOGIN", str(msg),
         "bob@home.example", "t@example.net"],
        [*node_sender, "ssl", str(cw.front_s.port), ca, "carol", "not-" + cw.pw("carol"), "LOGIN", str(msg),
         "carol@home.example", "t@example.net"], env=env)
    assert r587.returncode == 0 and r587.stdout.decode().splitlines() == [
        f"sent: 250 rejected={REFUSED_RCPT}", "refused: 550 MAIL FROM", "refused: 451 RCPT TO"], _out(r587)
    assert r465.returncode == 0 and r465.stdout.decode().splitlines() == ["sent: 250 rejected="], _out(r465)
    assert wrong.stdout.decode().splitlines() == ["refused: 535 AUTH LOGIN"], _out(wrong)
    _check_messages(cw, [("alice@home.example", ["r@example.net", "s@example.net"]),
                         ("bob@home.example", ["t@example.net"])], BODY, SENDERS, [])
    assert set(logins(cw.front, start)) == {"PLAIN"}
    assert logins(cw.front_s, start_s) == ["LOGIN"]
    assert "login failed: user='carol' mechanism=LOGIN" in cw.front_s.log()[start_s:]


# ------------------------------------------------------------------ handshakes: chain, GnuTLS, NSS, OpenSSL

class Chain:
    """What the `chain` fixture yields: .ca (the root, PEM file), .front
    (STARTTLS) and .front_s (-s) serving leaf + intermediate."""


@pytest.fixture(scope="module")
def chain(cw):
    """A second STARTTLS and -s frontend on the same daemon: an RSA leaf
    for localhost issued by an intermediate CA, sslCert = the leaf then
    the intermediate; `timeout = 5` (the handshake of a client that sends
    nothing ends that soon)."""
    root = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = root.create_child_ca(key_type=trustme.KeyType.RSA).issue_cert(
        "localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    ch = Chain()
    ch.ca, cert, key = str(cw.tmp / "chain-ca.pem"), str(cw.tmp / "chain.pem"), str(cw.tmp / "chain.key")
    root.cert_pem.write_to_path(ch.ca)
    with open(cert, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(key)
    os.chmod(key, 0o600)
    os.chmod(cert, 0o644)
    conf = front_config(cw.tmp, cw.world, f"sslCert = {cert}\nsslKey = {key}\naddReceivedField = yes\n",
                        tls=False, name="front-chain.conf", timeout=5)
    ch.front = Frontend(conf, str(cw.tmp / "chain.log")).start()
    ch.front_s = Frontend(conf, str(cw.tmp / "chain-s.log"), args=["-s"]).start()
    try:
        yield ch
    finally:
        ch.front.stop()
        ch.front_s.stop()
        logs = ch.front.log() + ch.front_s.log()
        assert "Traceback" not in logs
        for u in cw.world.users.values():
            assert u.password not in logs


def _s_client(port: int, ca: str, *args: str, starttls: bool = True, say: bytes = b"EHLO client.test\nQUIT\n"):
    """openssl s_client, lines ending in CRLF (-crlf), not stopping at the
    end of its input (-ign_eof): it ends when the server closes."""
    argv = [tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-CAfile", ca, "-verify_return_error", "-crlf", "-ign_eof", *(["-starttls", "smtp"] if starttls else []),
            *args]
    t0 = time.monotonic()
    r = subprocess.run(argv, input=say, capture_output=True, env=CLEAN_ENV, timeout=20)
    r.elapsed = time.monotonic() - t0
    return r


def _temp_key(out: str) -> str:
    """The key exchange s_client reports: "Server Temp Key: ..." until
    OpenSSL 3.4 (Debian 12), "Peer Temp Key: ..." from 3.5 (Debian 13)."""
    m = re.search(r"^(?:Server|Peer) Temp Key: (.*)$", out, re.M)
    return m.group(1) if m else ""


def _gnutls(port: int, ca: str, *args: str, starttls: bool = True):
    argv = [tool("gnutls-cli"), "--x509cafile", ca, "-p", str(port), *args,
            *(["--starttls-proto=smtp"] if starttls else []), "localhost"]
    return subprocess.run(argv, input=b"EHLO client.test\r\nQUIT\r\n", capture_output=True, env=CLEAN_ENV,
                          timeout=20)


def _ehlo_after_tls(out: str) -> None:
    """The session went on over TLS: EHLO offers AUTH, no STARTTLS, QUIT."""
    assert "250-AUTH PLAIN LOGIN" in out and "STARTTLS" not in out.partition("250-AUTH")[2], out
    assert "221 2.0.0" in out, out


def _wait_log(fe: Frontend, since: int, needle: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while needle not in fe.log()[since:] and time.monotonic() < deadline:
        time.sleep(0.02)
    text = fe.log()[since:]
    assert needle in text, text
    return text


def test_gnutls_cli_starttls_and_implicit_tls(cw, chain):
    """gnutls-cli (GnuTLS 3.7): --starttls-proto=smtp reads the 220, says
    EHLO and STARTTLS itself, then the handshake (TLS 1.3 X25519, the chain
    and the name localhost checked); the EHLO after it offers AUTH and no
    STARTTLS. On the -s port the handshake comes first. Against the chain
    frontend it validates leaf + intermediate with only the root."""
    for port, ca, starttls in ((cw.front.port, cw.world.ca_file, True), (cw.front_s.port, cw.world.ca_file, False),
                               (chain.front.port, chain.ca, True), (chain.front_s.port, chain.ca, False)):
        r = _gnutls(port, ca, starttls=starttls)
        out = _out(r)
        assert r.returncode == 0 and "- Status: The certificate is trusted." in out, out
        assert "(TLS1.3-X.509)-(ECDHE-X25519)" in out, out
        _ehlo_after_tls(out)
        if ca == chain.ca:
            assert "- Got a certificate list of 2 certificates." in out, out
    # TLS 1.2 with P-384 only (the RSA leaf: in TLS 1.2 the groups a client
    # names also bound the curve of an ECDSA certificate, the world's P-256)
    r = _gnutls(chain.front_s.port, chain.ca, "--priority",
                "NORMAL:-VERS-ALL:+VERS-TLS1.2:-GROUP-ALL:+GROUP-SECP384R1", starttls=False)
    assert r.returncode == 0 and "(TLS1.2-X.509)-(ECDHE-SECP384R1)-(RSA" in _out(r), _out(r)
    _ehlo_after_tls(_out(r))


def test_gnutls_cli_tls12_ffdhe_only_gets_dhe_with_an_rsa_certificate(cw, chain):
    """A TLS 1.2 client that offers only the RFC 7919 finite-field groups
    (no curve, so no ECDHE) against an RSA certificate: the DHE-RSA suites
    of _tls.CIPHERS are its only way in, on the group it names (OpenSSL 3
    takes a named group without the server's own: this worked before the
    fix of the next test too)."""
    start = len(chain.front_s.log())
    r = _gnutls(chain.front_s.port, chain.ca, "--priority",
                "NORMAL:-VERS-ALL:+VERS-TLS1.2:-GROUP-ALL:+GROUP-FFDHE2048:+GROUP-FFDHE3072", starttls=False)
    out = _out(r)
    assert r.returncode == 0 and "(TLS1.2-X.509)-(DHE-FFDHE2048)-(RSA" in out, out
    _ehlo_after_tls(out)
    assert "handshake failed" not in chain.front_s.log()[start:]


def test_openssl_dhe_only_tls12_client(cw, chain):
    """openssl s_client offering TLS 1.2 with DHE-RSA-AES128-GCM-SHA256 and
    nothing else (as some embedded clients do): a DHE key exchange on a
    2048-bit group, over STARTTLS and -s. It names no finite-field group
    (its groups extension lists curves only), so the server must bring
    its own: before the fix it had none, and the client got alert 40 and
    the log `TLS handshake failed: no shared cipher`."""
    for port, starttls in ((chain.front.port, True), (chain.front_s.port, False)):
        r = _s_client(port, chain.ca, "-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256", starttls=starttls)
        out = _out(r)
        assert r.returncode == 0 and _temp_key(out) == "DH, 2048 bits", out
        assert "Cipher is DHE-RSA-AES128-GCM-SHA256" in out, out
        _ehlo_after_tls(out)


def test_go_and_java_validate_the_intermediate_the_server_sends(cw, chain, tmp_path, go_sender, java_sender):
    """Go's crypto/tls and Java's JSSE fetch no missing intermediate (no
    AIA chasing; trustme's certificates name none anyway): trusting only the
    root, they get through because sslCert's intermediate goes out after
    the leaf. Go over tls.Dial to the chain's -s port, Jakarta Mail with
    STARTTLS and checkserveridentity to its STARTTLS port; each sends a
    message. openssl s_client -showcerts sees both certificates too."""
    msg = tmp_path / "msg"
    msg.write_bytes(BODY)
    start, start_s = len(chain.front.log()), len(chain.front_s.log())
    go, java = _parallel(
        [*go_sender, "ssl", str(chain.front_s.port), chain.ca, "alice", cw.pw("alice"), str(msg),
         "alice@home.example", "r@example.net"],
        [*java_sender, "starttls", str(chain.front.port), chain.ca, "bob", cw.pw("bob"), "PLAIN", str(msg),
         "bob@home.example", "t@example.net"])
    assert go.returncode == 0 and go.stdout.decode().splitlines() == ["tls: 304 2 certificates", "sent"], _out(go)
    assert java.returncode == 0 and java.stdout.decode().splitlines() == ["sent: 250"], _out(java)
    _check_messages(cw, [("alice@home.example", ["r@example.net"]), ("bob@home.example", ["t@example.net"])],
                    BODY, SENDERS, None)
    assert logins(chain.front_s, start_s) == ["PLAIN"] and logins(chain.front, start) == ["PLAIN"]
    r = _s_client(chain.front_s.port, chain.ca, "-showcerts", starttls=False)
    assert r.returncode == 0 and "Verify return code: 0 (ok)" in _out(r), _out(r)
    assert len(re.findall(r"^ ?\d s:", r.stdout.decode(), re.M)) == 2, _out(r)


def _nss_db(tmp_path, ca: str) -> str:
    db = tmp_path / "nssdb"
    db.mkdir(parents=True)
    certutil = tool("certutil")
    for argv in (["-N", "--empty-password"], ["-A", "-n", "ca", "-t", "C,,", "-i", ca]):
        r = subprocess.run([certutil, "-d", f"sql:{db}", *argv], capture_output=True, env=CLEAN_ENV, timeout=20)
        assert r.returncode == 0, _out(r)
    return f"sql:{db}"


def _tstclnt(db: str, port: int, req: Path, *args: str):
    return subprocess.run([tool("tstclnt"), "-h", "localhost", "-p", str(port), "-4", "-d", db, "-A", str(req),
                           "-v", *args], stdin=subprocess.DEVNULL, capture_output=True, env=CLEAN_ENV, timeout=20)


def _nss_out(r: subprocess.CompletedProcess) -> str:
    return "\n".join(line for line in _out(r).splitlines() if "PR_Poll" not in line)


def test_nss_tstclnt_implicit_tls(cw, chain, tmp_path):
    """NSS's tstclnt (implicit TLS only: it has no STARTTLS), certificates
    verified against an NSS database holding only the root: TLS 1.3 on
    the world's -s port; the chain's -s port with leaf and intermediate;
    TLS 1.3 and TLS 1.2 with only finite-field groups required (-I FF2048
    -H: ffdhe2048, and DHE-RSA under TLS 1.2). TLS 1.0-1.1 only: the
    server's protocol_version alert, and `TLS handshake failed:
    unsupported protocol` in its log."""
    req = tmp_path / "req"
    req.write_bytes(b"EHLO client.test\r\nQUIT\r\n")
    world_db, chain_db = _nss_db(tmp_path / "w", cw.world.ca_file), _nss_db(tmp_path / "c", chain.ca)
    for db, port, args, want in (
            (world_db, cw.front_s.port, ["-V", "tls1.2:tls1.3"], "SSL version 3.4 using 256-bit AES-GCM"),
            (chain_db, chain.front_s.port, ["-V", "tls1.2:tls1.3"], "SSL version 3.4 using"),
            (chain_db, chain.front_s.port, ["-V", "tls1.3:tls1.3", "-I", "FF2048", "-H"], "SSL version 3.4 using"),
            (chain_db, chain.front_s.port, ["-V", "tls1.2:tls1.2", "-I", "FF2048", "-H"], "SSL version 3.3 using")):
        r = _tstclnt(db, port, req, *args)
        out = _nss_out(r)
        assert r.returncode == 0 and want in out, (args, out)
        assert "220 mx.test ESMTP" in out, out
        _ehlo_after_tls(out)
    start = len(cw.front_s.log())
    r = _tstclnt(world_db, cw.front_s.port, req, "-V", "tls1.0:tls1.1")
    assert r.returncode != 0 and "SSL_ERROR_PROTOCOL_VERSION_ALERT" in _nss_out(r), _nss_out(r)
    _wait_log(cw.front_s, start, "TLS handshake failed: unsupported protocol")


def test_openssl_tls10_and_tls11_clients_fail_cleanly(cw):
    """A client that speaks TLS 1.0 or 1.1 at most (old Outlook, Android 4):
    over STARTTLS and on the -s port the server answers protocol_version
    (alert 70) at once and closes; its log says `STARTTLS handshake
    failed: unsupported protocol` / `TLS handshake failed: unsupported
    protocol`, and nothing hangs."""
    start, start_s = _starts(cw)
    for version in ("-tls1", "-tls1_1"):
        for port, starttls in ((cw.front.port, True), (cw.front_s.port, False)):
            r = _s_client(port, cw.world.ca_file, version, "-cipher", "DEFAULT:@SECLEVEL=0", starttls=starttls)
            assert r.returncode != 0 and "alert protocol version" in _out(r), _out(r)
            assert r.elapsed < 5, r.elapsed
    text = _wait_log(cw.front, start, "STARTTLS handshake failed: unsupported protocol")
    assert text.count("STARTTLS handshake failed: unsupported protocol") == 2, text
    text = _wait_log(cw.front_s, start_s, "TLS handshake failed: unsupported protocol")
    assert text.count("TLS handshake failed: unsupported protocol") == 2, text


def test_openssl_cbc_only_tls12_client_is_refused(cw, chain):
    """TLS 1.2 with CBC suites only (ECDHE and static RSA): no shared
    cipher, alert 40 (handshake_failure), a log line saying so."""
    for fe, ca in ((cw.front_s, cw.world.ca_file), (chain.front_s, chain.ca)):
        start = len(fe.log())
        r = _s_client(fe.port, ca, "-tls1_2", "-cipher",
                      "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA:AES128-SHA",
                      starttls=False)
        assert r.returncode != 0 and "alert handshake failure" in _out(r), _out(r)
        _wait_log(fe, start, "TLS handshake failed: no shared cipher")


def test_openssl_key_share_groups_and_hello_retry_request(cw):
    """TLS 1.3 key shares: P-384 only and ffdhe2048 only are taken as they
    are; a client whose one key share is ffdhe2048 (or P-384) while it
    also lists X25519 gets a HelloRetryRequest for X25519 (the server's
    preference) and a second ClientHello; the session then goes on (EHLO
    over TLS, QUIT), over STARTTLS and on -s."""
    for groups, temp, retry in (("P-384", "ECDH, secp384r1, 384 bits", False),
                                ("ffdhe2048", "DH, 2048 bits", False),
                                ("ffdhe2048:X25519", "X25519, 253 bits", True),
                                ("P-384:X25519", "X25519, 253 bits", True)):
        for port, starttls in ((cw.front.port, True), (cw.front_s.port, False)):
            r = _s_client(port, cw.world.ca_file, "-tls1_3", "-groups", groups, "-msg", starttls=starttls)
            out = _out(r)
            assert r.returncode == 0 and _temp_key(out) == temp, (groups, out)
            assert out.count(", ClientHello") == (2 if retry else 1), (groups, out)
            _ehlo_after_tls(out)


def test_implicit_tls_client_on_the_starttls_port(cw, tmp_path, go_sender, java_sender):
    """A client set to implicit TLS on the STARTTLS port (a common
    misconfiguration): its ClientHello meets our 220 greeting. Go's
    tls.Dial says "first record does not look like a TLS handshake",
    Jakarta Mail's smtps "Unsupported or unrecognized SSL message", openssl s_client
    "wrong version number" — each at once; the server refuses the
    ClientHello as a command line (421, `refused: TLS handshake on a
    plaintext port` in its log) instead of answering 500s to binary."""
    msg = tmp_path / "msg"
    msg.write_bytes(BODY)
    start = len(cw.front.log())
    t0 = time.monotonic()
    go, java = _parallel(
        [*go_sender, "ssl", str(cw.front.port), cw.world.ca_file, "alice", cw.pw("alice"), str(msg),
         "alice@home.example", "r@example.net"],
        [*java_sender, "ssl", str(cw.front.port), cw.world.ca_file, "bob", cw.pw("bob"), "PLAIN", str(msg),
         "bob@home.example", "t@example.net"])
    assert time.monotonic() - t0 < 10
    assert go.returncode == 4 and "first record does not look like a TLS handshake" in _out(go), _out(go)
    assert java.returncode == 4 and "unrecognized SSL message" in _out(java), _out(java)
    r = _s_client(cw.front.port, cw.world.ca_file, starttls=False)
    assert r.returncode != 0 and "wrong version number" in _out(r) and r.elapsed < 5, _out(r)
    deadline = time.monotonic() + 5
    while cw.front.log()[start:].count("refused: TLS handshake on a plaintext port") < 3 \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cw.front.log()[start:].count("closed: refused: TLS handshake on a plaintext port") == 3, \
        cw.front.log()[start:]
    assert not cw.up.messages


def test_plaintext_client_on_the_implicit_tls_port(cw, chain, tmp_path, go_sender):
    """The reverse: plain SMTP spoken to the -s port. A client that sends
    EHLO without waiting for a greeting is cut at once; OpenSSL's reason
    is only "wrong version number", so the log line adds that the client
    spoke plaintext and what (before the fix: the reason alone). A client
    that waits for the greeting, as every SMTP client does (Go's smtp.Dial
    here, set for STARTTLS), waits while the server waits for a
    ClientHello: `timeout` (5 s here) ends the session, and the log line
    says the client sent nothing (before: "timed out (no answer within
    5s)" alone). Go reports the EOF."""
    start = len(chain.front_s.log())
    with socket.create_connection(("127.0.0.1", chain.front_s.port), timeout=10) as s:
        s.sendall(b"EHLO client.test\r\n")
        t0 = time.monotonic()
        while s.recv(4096):
            pass
        assert time.monotonic() - t0 < 3
    _wait_log(chain.front_s, start, "TLS handshake failed: wrong version number; the client spoke plaintext"
                                    " ('EHLO'): set for STARTTLS or plain SMTP on this implicit-TLS port?\n")
    msg = tmp_path / "msg"
    msg.write_bytes(BODY)
    start = len(chain.front_s.log())
    t0 = time.monotonic()
    [go] = _parallel([*go_sender, "starttls", str(chain.front_s.port), chain.ca, "alice", cw.pw("alice"),
                      str(msg), "alice@home.example", "r@example.net"])
    assert 4.5 < time.monotonic() - t0 < 10 and go.returncode != 0 and "EOF" in _out(go), _out(go)
    _wait_log(chain.front_s, start, "TLS handshake failed: timed out (no answer within 5s); the client sent"
                                    " nothing: one waiting for a greeting (set for STARTTLS or plain SMTP on"
                                    " this implicit-TLS port?)\n")
    assert not cw.up.messages
