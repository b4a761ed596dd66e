"""The mail client of tools/systemd-check (standard library only: it runs
under the container's /usr/bin/python3). Prints one line saying what
happened and exits 0 when the message was accepted.

    client.py send HOST PORT starttls|ssl USER PASSWORD FROM [SOURCE]
    client.py hold HOST PORT USER PASSWORD FROM SYSTEMCTL-ACTION UNIT

send: one message. hold: log in, have systemd ACTION the UNIT while the
session is open, then send; "smtp NNN" is an SMTP answer the client got
(a clean temporary failure is fine), "broken ..." a connection that stopped
speaking SMTP.
"""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import sys


def _ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False        # the snakeoil certificate of the container
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _connect(host: str, port: int, mode: str, source: str | None) -> smtplib.SMTP:
    src = (source, 0) if source else None
    if mode == "ssl":
        return smtplib.SMTP_SSL(host, port, timeout=60, context=_ctx(), source_address=src)
    s = smtplib.SMTP(host, port, timeout=60, source_address=src)
    s.starttls(context=_ctx())
    return s


def _login(s: smtplib.SMTP, user: str, password: str) -> None:
    """AUTH PLAIN only: smtplib's login() tries the next mechanism after a
    535, a second failed login that sendooway's backoff makes slow."""
    s.ehlo_or_helo_if_needed()
    s.user, s.password = user, password
    s.auth("PLAIN", s.auth_plain)


def _message(sender: str, subject: str) -> str:
    return f"From: <{sender}>\r\nTo: <bob@example.net>\r\nSubject: {subject}\r\n\r\nsystemd check\r\n"


def main() -> int:
    cmd = sys.argv[1]
    try:
        if cmd == "send":
            host, port, mode, user, password, sender = sys.argv[2:8]
            source = sys.argv[8] if len(sys.argv) > 8 else None
            s = _connect(host, int(port), mode, source)
            _login(s, user, password)
            s.sendmail(sender, ["bob@example.net"], _message(sender, f"port {port}"))
            s.quit()
        elif cmd == "hold":
            host, port, user, password, sender, action, unit = sys.argv[2:9]
            s = _connect(host, int(port), "starttls", None)
            _login(s, user, password)
            subprocess.run(["systemctl", action, unit], check=True)
            s.sendmail(sender, ["bob@example.net"], _message(sender, f"after {action} {unit}"))
            s.quit()
        else:
            print(f"unknown command {cmd}")
            return 2
    except smtplib.SMTPResponseException as e:
        print(f"smtp {e.smtp_code} {e.smtp_error.decode(errors='replace')}")
        return 1
    except smtplib.SMTPRecipientsRefused as e:
        print(f"smtp rcpt {e.recipients}")
        return 1
    except (OSError, smtplib.SMTPException) as e:
        print(f"broken {type(e).__name__}: {e}")
        return 1
    print("sent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
