"""The demo (`bash scripts/demo.sh`): one real message through sendooway.

It builds a throw-away fake world (users via nss_wrapper, PAM via
pam_wrapper, certificates via trustme), starts a local upstream smarthost
(STARTTLS + AUTH), the authenticator `sendooway-auth` and the frontend
`sendooway -b` on loopback, gives the fake user alice a ~/.fetchmailrc that
names the upstream, and sends a message as alice with swaks (msmtp or
smtplib when swaks is missing). It prints the client's transcript, the
upstream's reply and what the upstream received, cleans up and exits 0 when
the upstream accepted exactly the message sent, non-zero otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

FLAG = "SENDOOWAY_DEMO_WORLD"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
UPSTREAM_USER, UPSTREAM_PASSWORD = "alice@upstream", "Upstream-Demo-Pw-5k"
SENDER, RECIPIENT = "alice@example.org", "friend@example.net"
MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: friend@example.net\r\n"
           b"Date: Wed, 25 Nov 2026 12:00:00 +0000\r\nMessage-ID: <demo-1@example.org>\r\n"
           b"Subject: hello through sendooway\r\n\r\n"
           b"One password for the client, the upstream's own for the upstream.\r\n"
           b".a line starting with a dot survives dot-stuffing\r\n")


def say(text: str = "") -> None:
    print(text, flush=True)


def reexec_in_world() -> int:
    """nss_wrapper and pam_wrapper must be in the environment at process start."""
    sys.path.insert(0, REPO)
    from tests.fakeworld import World

    root = tempfile.mkdtemp(prefix="sendooway-demo-")
    try:
        World.create(root)
        env = World.load(root).env()
        env[FLAG] = root
        r = subprocess.run([sys.executable, "-m", "bench.demo", *sys.argv[1:]], cwd=REPO, env=env)
        return r.returncode
    finally:
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout}s")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def show_file(title: str, path: str, lines: int = 12) -> None:
    try:
        with open(path) as f:
            text = f.read().splitlines()[-lines:]
    except OSError:
        return
    say(f"--- {title} (last {lines} lines)")
    for line in text:
        say("    " + line)


def _mask_auth(transcript: str) -> str:
    """The AUTH PLAIN token is the password in base64: never print it."""
    out = []
    for line in transcript.splitlines():
        head, sep, _token = line.partition("AUTH PLAIN ")
        out.append(head + sep + "********" if sep and ">" in head else line)
    return "\n".join(out)


def send_with_client(world, port: int, workdir: str) -> tuple[bool, str]:
    """Send MESSAGE as alice; returns (client said OK, transcript)."""
    password = world.users["alice"].password
    msg_path = os.path.join(workdir, "message.eml")
    if shutil.which("swaks"):
        with open(msg_path, "wb") as f:
            f.write(MESSAGE[:-2])  # swaks ends the data with its own CRLF
        argv = ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--tls-verify",
                "--tls-ca-path", world.ca_file, "--helo", "laptop.example",
                "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", password,
                "--from", SENDER, "--to", RECIPIENT, "--data", "@" + msg_path]
        shown = " ".join("'********'" if a == password else a for a in argv)
        say(f"$ {shown}")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        transcript = _mask_auth((r.stdout + r.stderr).replace(password, "********"))
        return r.returncode == 0, transcript
    if shutil.which("msmtp"):
        pwfile = os.path.join(workdir, "pw")
        with open(pwfile, "w") as f:
            f.write(password)
        os.chmod(pwfile, 0o600)
        argv = ["msmtp", "-v", "--host=127.0.0.1", f"--port={port}", "--tls=on", "--tls-starttls=on",
                f"--tls-trust-file={world.ca_file}", "--auth=plain", "--user=alice",
                f"--passwordeval=cat {pwfile}", "--domain=laptop.example", f"--from={SENDER}",
                "--", RECIPIENT]
        say("$ " + " ".join(argv))
        r = subprocess.run(argv, input=MESSAGE, capture_output=True, timeout=60)
        transcript = (r.stdout + r.stderr).decode("utf-8", "replace").replace(password, "********")
        return r.returncode == 0, transcript
    import smtplib

    say("(neither swaks nor msmtp found: using Python's smtplib)")
    with smtplib.SMTP("127.0.0.1", port, local_hostname="laptop.example", timeout=30) as s:
        s.starttls(context=world.ssl_context())
        s.ehlo()
        s.login("alice", password)
        s.mail(SENDER)
        s.rcpt(RECIPIENT)
        code, text = s.data(MESSAGE)
    return code == 250, f"smtplib: DATA answered {code} {text.decode()}"


def demo() -> int:
    import warnings

    import logging

    warnings.simplefilter("ignore")  # aiosmtpd's deprecation chatter
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    sys.path.insert(0, REPO)
    from tests.fakeworld import World
    from tests.upstream import FakeUpstream

    world = World.load(os.environ[FLAG])
    work = os.path.join(world.root, "demo")
    os.makedirs(os.path.join(work, "run"), exist_ok=True)
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen] = []
    upstream = None
    ok = False
    try:
        say("== sendooway demo: one message from a mail client, through sendooway, to alice's smarthost")
        if os.geteuid() != 0:
            say("note: not root: the frontend cannot drop to 'nobody' and the authenticator cannot"
                " read users' files as them; run as root for the real thing")
        upstream = FakeUpstream(world, tls="starttls", accounts={UPSTREAM_USER: UPSTREAM_PASSWORD}).start()
        say(f"upstream smarthost: 127.0.0.1:{upstream.port} (aiosmtpd, STARTTLS required, AUTH required)")
        rc = world.write_user_file("alice", ".fetchmailrc", (
            f'poll pop.example.org proto imap user "{UPSTREAM_USER}" password "{UPSTREAM_PASSWORD}"\n'
            f'#sendooway:server "127.0.0.1"\n#sendooway:port {upstream.port}\n#sendooway:tls\n'
            f'#sendooway:address "*@example.org"\n'))
        say(f"alice's {rc}: fetchmail's own lines plus #sendooway: lines naming that smarthost")
        config = os.path.join(work, "sendooway.conf")
        with open(config, "w") as f:
            f.write(f"localname = mx.demo\nauthSocket = {work}/run/auth.sock\n"
                    f"sslCert = {world.cert_file}\nsslKey = {world.key_file}\nsslCA = {world.ca_file}\n"
                    "timeout = 30\n")
        os.chmod(config, 0o644)
        auth_log, front_log = os.path.join(work, "auth.log"), os.path.join(work, "front.log")
        auth = subprocess.Popen([os.path.join(BIN, "sendooway-auth"), "-c", config, "-l", auth_log,
                                 "--socket", f"{work}/run/auth.sock"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(auth)
        wait_for(lambda: os.path.exists(f"{work}/run/auth.sock"), "sendooway-auth", proc=auth)
        say(f"sendooway-auth: listening on {work}/run/auth.sock (PAM service sendooway, pam_wrapper)")
        port = free_port()
        front = subprocess.Popen([os.path.join(BIN, "sendooway"), "-c", config, "-l", front_log,
                                  "-b", f"127.0.0.1:{port}"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(front)
        wait_for(lambda: port_open(port), "sendooway -b", proc=front)
        say(f"sendooway -b 127.0.0.1:{port}: STARTTLS with the world's certificate, AUTH PLAIN/LOGIN")
        say()
        client_ok, transcript = send_with_client(world, port, work)
        say(transcript.rstrip())
        say()
        say("== what the upstream received")
        time.sleep(0.1)
        if not upstream.messages:
            say("nothing")
        for m in upstream.messages:
            say(f"login:     {m.login}  (over TLS: {m.tls}, EHLO name: {m.helo})")
            say(f"MAIL FROM: <{m.mail_from}> {' '.join(m.mail_options)}")
            say(f"RCPT TO:   {', '.join('<%s>' % r for r in m.rcpt_tos)}")
            say("data:")
            for line in m.data.decode("utf-8", "replace").split("\r\n"):
                say("    | " + line)
        delivered = (len(upstream.messages) == 1 and upstream.messages[0].mail_from == SENDER
                     and upstream.messages[0].rcpt_tos == [RECIPIENT]
                     and upstream.messages[0].data.endswith(MESSAGE)
                     and upstream.messages[0].data.startswith(b"Received: ")
                     and upstream.messages[0].login == UPSTREAM_USER)
        final = [ln for ln in transcript.splitlines() if "queued as" in ln]
        say()
        say("== the upstream's reply, as the client saw it: "
            + (final[-1].strip() if final else "(not found in the transcript)"))
        show_file("sendooway log", front_log, 8)
        show_file("sendooway-auth log", auth_log, 4)
        logs = ""
        for p in (front_log, auth_log):
            try:
                logs += open(p).read()
            except OSError:
                pass
        leaked = [pw for pw in (UPSTREAM_PASSWORD, world.users["alice"].password) if pw in logs]
        ok = client_ok and delivered and not leaked
        say()
        if leaked:
            say("FAILED: a password appears in a log")
        say("demo: OK — the upstream accepted exactly the message sent (plus sendooway's Received: line)"
            if ok else "demo: FAILED")
    except Exception as e:  # report, clean up, exit non-zero
        say(f"demo: FAILED: {type(e).__name__}: {e}")
        for p in procs:
            if p.poll() is not None and p.stderr is not None:
                say(p.stderr.read().decode("utf-8", "replace")[-2000:])
        ok = False
    finally:
        for p in reversed(procs):
            stop(p)
            if p.stderr is not None:
                p.stderr.close()
        if upstream is not None:
            upstream.stop()
    return 0 if ok else 1


def main() -> int:
    if os.environ.get(FLAG):
        return demo()
    return reexec_in_world()


if __name__ == "__main__":
    sys.exit(main())
