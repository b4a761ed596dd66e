"""N whole client sessions (STARTTLS, AUTH, one 10 KiB message) against a
target that `bench/bench_relay.py --hold FILE` keeps running: `direct` (the
upstream itself), `off` or `on` (sendooway with smarthostCache off or on).

    .venv/bin/python bench/bench_relay.py --hold /tmp/relay.json &
    .venv/bin/python bench/relay_sessions.py /tmp/relay.json on 200

Made to be timed as a whole process from outside (e.g. /usr/bin/time, or a
harness that alternates two commands and reports the ratio pair by pair):
the proxied and the direct command differ only in the target, so their
ratio is the proxy's cost. The interpreter's start-up (~0.1 s) is in both
and pulls the ratio towards 1: use enough sessions to make it small.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_relay import make_body, session  # noqa: E402


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[2] not in ("direct", "off", "on"):
        print(__doc__, file=sys.stderr)
        return 2
    path, kind, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            print(f"relay_sessions: {path} does not exist (is bench_relay.py --hold running?)",
                  file=sys.stderr)
            return 2
        time.sleep(0.1)
    with open(path) as f:
        setup = json.load(f)
    port, user, password = setup["targets"][kind]
    ctx = ssl.create_default_context(cafile=setup["ca_file"])
    body = make_body(10 * 1024)
    for _ in range(count):
        session(port, user, password, ctx, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
