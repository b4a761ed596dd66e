"""The upstream smarthost of tools/systemd-check: tests/upstream.py's
FakeUpstream (aiosmtpd, STARTTLS and AUTH required) on a fixed loopback port,
with a CA and certificate made here by trustme. Each message it accepts is
appended to MESSAGES as one JSON line.

    python upstream.py DIR PORT USER PASSWORD

DIR receives ca.pem (to give the users as their sslCA), the server's
certificate and key, and messages.jsonl; "ready" is written to DIR/ready
once the port accepts connections.
"""

from __future__ import annotations

import json
import os
import sys
import time

import trustme

from tests.upstream import FakeUpstream


def main() -> None:
    d, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(os.path.join(d, "ca.pem"))
    os.chmod(os.path.join(d, "ca.pem"), 0o644)
    leaf.private_key_pem.write_to_path(os.path.join(d, "key.pem"))
    with open(os.path.join(d, "cert.pem"), "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    up = FakeUpstream(None, tls="starttls", accounts={user: password}, port=port,
                      cert_file=os.path.join(d, "cert.pem"), key_file=os.path.join(d, "key.pem"))
    up.start()
    with open(os.path.join(d, "ready"), "w") as f:
        f.write("ready\n")
    written = 0
    out = os.path.join(d, "messages.jsonl")
    while True:
        time.sleep(0.1)
        while written < len(up.messages):
            m = up.messages[written]
            with open(out, "a") as f:
                f.write(json.dumps({"from": m.mail_from, "to": m.rcpt_tos, "login": m.login,
                                    "tls": m.tls, "data": m.data.decode("utf-8", "replace")}) + "\n")
            written += 1


if __name__ == "__main__":
    main()
