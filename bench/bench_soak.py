"""Soak: do long-running daemons leak? N mixed sessions against real daemons.

    .venv/bin/python bench/bench_soak.py [--sessions 3000] [--clients 8] [--tables] [--keep]

Starts an upstream (aiosmtpd, STARTTLS + AUTH, listening on every loopback
address), `sendooway-auth` (with its fork server and reader workers) and
three `sendooway -b` (smarthostCache on, off, and one behind a trusted PROXY
protocol balancer), then runs N sessions of mixed kinds from a few client
threads: whole sessions (many users, more than the worker table's cap, each
routed to its own upstream name), wrong passwords from many client addresses
(PROXY headers), unrouted senders (550), RCPT 550, DATA 554, the upstream
down (451), clients that vanish mid-DATA, right after connecting or
mid-TLS-handshake, failed TLS handshakes, clients idling into `timeout`,
and a SIGHUP to the authenticator every few hundred sessions.

It snapshots every process (descriptors, RSS, threads; the reader workers
summed) after a warm-up, after half of the sessions and at the end, and
prints the growth of each half: a leak grows in both halves alike, a
cache or table filling up grows in the first only. Also zombies, the
pam_wrapper temp dirs and the logs' most frequent lines. --tables runs
the daemons under tests/soak_hook.py and prints every container of the
product whose size changed (with SENDOOWAY_SOAK_TRACEMALLOC=1 in the
environment, also the Python allocations that grew, per process, in the
world's soak/tables/ with --keep). Exit status 1 when descriptors or
threads still grew in the second half, or a zombie is left. Run as root: it builds a
throw-away fake world (users, PAM, certificates) and re-executes itself
inside it, as the other benchmarks do.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import random
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.bench_relay import free_port, wait_port  # noqa: E402
from tests.front_util import ClaimingSMTP, login_plain  # noqa: E402

FLAG = "SENDOOWAY_SOAK_WORLD"
BIN = os.path.dirname(sys.executable)
UP_USER, UP_PW = "soak-up", "Soak-Up-Pw-31"
EXTRA_USERS = 72  # more than the authenticator's worker table holds (64)
TIMEOUT = 3  # the daemons' `timeout`: idle clients meet it

UPSTREAM_CODE = r"""
import sys, logging, warnings
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("ignore")
logging.getLogger("mail.log").setLevel(logging.CRITICAL)
from tests.fakeworld import World
from tests.upstream import FakeUpstream

class Soak(FakeUpstream):
    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or b""
        envelope.original_content = envelope.content = None
        if b"X-Soak-Fail: yes" in raw:
            return "554 5.6.0 refused by the soak upstream"
        return "250 2.0.0 accepted %d octets" % len(raw)

up = Soak(World.load(sys.argv[2]), tls="starttls", accounts={sys.argv[3]: sys.argv[4]},
          host="0.0.0.0", reject_rcpt={"refused@example.net"}, data_size_limit=0).start()
print(up.port, flush=True)
sys.stdin.read()
up.stop()
"""


# ------------------------------------------------------------ /proc


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def usage(pid: int) -> tuple[int, int, int] | None:
    """(open descriptors, RSS in KiB, threads) of a live process, else None."""
    try:
        st = status(pid)
        if st["State"].startswith("Z"):
            return None
        return (len(os.listdir(f"/proc/{pid}/fd")), int(st["VmRSS"].split()[0]), int(st["Threads"]))
    except (OSError, KeyError, ValueError):
        return None


def zombies_under(pid: int) -> int:
    n, todo = 0, [pid]
    while todo:
        p = todo.pop()
        for c in children(p):
            try:
                if status(c)["State"].startswith("Z"):
                    n += 1
            except (OSError, KeyError):
                continue
            todo.append(c)
    return n


def read_tables(pid: int) -> dict[str, int]:
    """The container sizes tests/soak_hook.py dumps on SIGUSR2."""
    import json
    path = os.path.join(TABLES_DIR[0], f"tables-{pid}.json")
    try:
        os.unlink(path)
    except OSError:
        pass
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


TABLES_DIR = [""]


def snapshot(procs: dict[str, int], auth_pid: int, tables: dict | None = None) -> dict[str, tuple]:
    """Per process (fds, RSS KiB, threads); the reader workers summed, with their count."""
    out = {}
    for name, pid in procs.items():
        out[name] = usage(pid) or (0, 0, 0)
    forks = children(auth_pid)
    fork_pid = forks[0] if forks else None
    out["fork server"] = (usage(fork_pid) if fork_pid else None) or (0, 0, 0)
    workers = [u for u in (usage(w) for w in children(fork_pid or 0)) if u]
    out["reader workers"] = tuple(map(sum, zip(*workers))) if workers else (0, 0, 0)
    out["(workers alive)"] = (len(workers),)
    out["(zombies)"] = (sum(zombies_under(pid) for pid in procs.values()),)
    if tables is not None:
        for name, pid in [*procs.items(), ("fork server", fork_pid)]:
            if name != "upstream" and pid:
                tables[name] = read_tables(pid)
    out["(/tmp/pam.X, anyone)"] = (len([e for e in os.listdir("/tmp") if e.startswith("pam.")]),)
    return out


# ------------------------------------------------------------ clients


class Kinds:
    """One method per kind of session; each returns what happened, for the tally."""

    def __init__(self, ports: dict, users: dict[str, str], ctx: ssl.SSLContext) -> None:
        self.ports, self.users, self.ctx = ports, users, ctx
        # (carol is the guessers' target: her own logins may meet "busy", by design)
        self.names = sorted(n for n in users if n != "carol")
        self.rng = random.Random(7)
        self.lock = threading.Lock()
        self.n = 0

    def _next(self) -> int:
        with self.lock:
            self.n += 1
            return self.n

    def _open(self, which: str = "on", client: str | None = None) -> smtplib.SMTP:
        port = self.ports[which]
        if client:
            s = ClaimingSMTP(client, "127.0.0.1", port, local_hostname="client.soak", timeout=30)
        else:
            s = smtplib.SMTP("127.0.0.1", port, local_hostname="client.soak", timeout=30)
        s.starttls(context=self.ctx)
        s.ehlo()
        return s

    def _login(self, which: str = "on") -> tuple[smtplib.SMTP, str]:
        user = self.names[self._next() % len(self.names)]
        s = self._open(which)
        s.login(user, self.users[user])
        return s, user

    def _whole(self, which: str) -> str:
        s, user = self._login(which)
        with s:
            code, _ = s.mail(f"{user}@soak.example")
            if code != 250:
                return f"MAIL {code}"
            s.rcpt("rcpt@example.net")
            code, _ = s.data(b"Subject: soak\r\n\r\nhello\r\n")
            return f"DATA {code}"

    def ok_cache_on(self) -> str:
        return self._whole("on")

    def ok_cache_off(self) -> str:
        return self._whole("off")

    def wrong_password(self) -> str:
        n = self._next()
        client = f"198.18.{n // 250 % 250}.{n % 250 + 1}"
        user = "carol" if n % 2 else f"ghost{n}"
        s = self._open("proxy", client)
        with s:
            try:
                s.login(user, "wrong-Pw-zz")
            except smtplib.SMTPAuthenticationError as e:
                return f"AUTH {e.smtp_code}"
            return "AUTH accepted?"

    def unrouted(self) -> str:
        s, _ = self._login()
        with s:
            return f"MAIL {s.mail('nobody@unrouted.example')[0]}"

    def rcpt_refused(self) -> str:
        s, user = self._login()
        with s:
            s.mail(f"{user}@soak.example")
            code = s.rcpt("refused@example.net")[0]
            s.rset()
            return f"RCPT {code}"

    def data_refused(self) -> str:
        s, user = self._login()
        with s:
            s.mail(f"{user}@soak.example")
            s.rcpt("rcpt@example.net")
            code, _ = s.data(b"Subject: soak\r\nX-Soak-Fail: yes\r\n\r\nno\r\n")
            return f"DATA {code}"

    def upstream_down(self) -> str:
        s = self._open("on")
        with s:
            s.login("alice", self.users["alice"])
            return f"MAIL {s.mail('alice@down.example')[0]}"

    def gone_mid_data(self) -> str:
        s, user = self._login(self.rng.choice(("on", "off")))
        s.mail(f"{user}@soak.example")
        s.rcpt("rcpt@example.net")
        code, _ = s.docmd("DATA")
        s.send(b"Subject: cut\r\n\r\n" + b"half a message\r\n" * 200)
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST
        s.close()
        return f"DATA {code}, then gone"

    def gone_at_once(self) -> str:
        with socket.create_connection(("127.0.0.1", self.ports[self.rng.choice(("on", "off"))])):
            pass
        return "gone"

    def gone_mid_tls(self) -> str:
        with socket.create_connection(("127.0.0.1", self.ports["on"])) as raw:
            raw.recv(512)
            raw.sendall(b"EHLO x\r\n")
            raw.recv(512)
            raw.sendall(b"STARTTLS\r\n")
            raw.recv(512)
            raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a ClientHello
        return "gone mid-handshake"

    def tls_failure(self) -> str:
        untrusting = ssl.create_default_context()  # without the world's CA: the client aborts
        s = smtplib.SMTP("127.0.0.1", self.ports["off"], local_hostname="client.soak", timeout=30)
        try:
            s.starttls(context=untrusting)
        except ssl.SSLError:
            return "handshake failed"
        finally:
            s.close()
        return "handshake passed?"

    def idle(self) -> str:
        with socket.create_connection(("127.0.0.1", self.ports["on"]), timeout=TIMEOUT + 30) as raw:
            raw.recv(512)
            raw.sendall(b"EHLO idle\r\n")
            time.sleep(0.05)
            raw.recv(4096)
            got = b""
            while True:  # until the server's timeout closes it
                chunk = raw.recv(512)
                if not chunk:
                    break
                got += chunk
        return "idle: " + got[:3].decode(errors="replace")

    def gone_during_auth(self) -> str:
        n = self._next()  # (from many addresses: the loopback one is every other kind's)
        s = self._open("proxy", f"198.19.{n // 250 % 250}.{n % 250 + 1}")
        s.send(f"AUTH PLAIN {login_plain(f'ghost{n}', 'wrong-Pw-zz')}\r\n")
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()  # while the authenticator holds the refusal back
        return "gone during AUTH"

    def gone_during_mail(self) -> str:
        s, user = self._login(self.rng.choice(("on", "off")))
        s.send(f"MAIL FROM:<{user}@soak.example>\r\nRCPT TO:<rcpt@example.net>\r\n")
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()  # while the route is looked up and the upstream is logged in to
        return "gone during MAIL"

    def idle_in_data(self) -> str:
        s, user = self._login("on")
        s.mail(f"{user}@soak.example")
        s.rcpt("rcpt@example.net")
        s.docmd("DATA")
        s.send(b"Subject: slow\r\n\r\nand then nothing")
        try:
            return f"idle in DATA: {s.getreply()[0]}"  # the server's timeout
        except smtplib.SMTPServerDisconnected:
            return "idle in DATA: closed"
        finally:
            s.close()

    def proxy_broken(self) -> str:
        with socket.create_connection(("127.0.0.1", self.ports["proxy"])) as raw:
            if self._next() % 2:
                raw.sendall(b"PROXY TCP4 198.51.100.")  # and gone mid-header
                return "gone mid PROXY header"
            raw.sendall(b"PROXY UNKNOWN-ish garbage\r\n")
            raw.settimeout(10)
            try:
                raw.recv(512)
            except OSError:
                pass
            return "bad PROXY header"

    def proxied_ok(self) -> str:
        n = self._next()
        s = self._open("proxy", f"203.0.113.{n % 200 + 1}")
        with s:
            s.login("alice", self.users["alice"])
            code, _ = s.mail("alice@soak.example")
            s.rcpt("rcpt@example.net")
            code, _ = s.data(b"Subject: soak\r\n\r\nproxied\r\n")
            return f"DATA {code}"


MIX = {  # kind: weight
    "ok_cache_on": 6, "ok_cache_off": 4, "proxied_ok": 1, "wrong_password": 3, "unrouted": 2,
    "rcpt_refused": 2, "data_refused": 2, "upstream_down": 2, "gone_mid_data": 2,
    "gone_at_once": 2, "gone_mid_tls": 2, "tls_failure": 2, "idle": 1,
    "gone_during_auth": 2, "gone_during_mail": 2, "idle_in_data": 1, "proxy_broken": 1,
}


# ------------------------------------------------------------ the run


def add_users(world, n: int) -> None:
    """More fake users than the worker table holds (nss_wrapper, pam_matrix)."""
    from tests.fakeworld import User

    for i in range(n):
        name = f"soak{i:03d}"
        world.users[name] = User(name, 42000 + i, 42000 + i, f"soak-Pw-{i:03d}x",
                                 os.path.join(world.root, "home", name))
    world._write_nss()
    world._write_pam()
    for u in world.users.values():
        os.makedirs(u.home, exist_ok=True)
        os.chown(u.home, u.uid, u.gid)
        os.chmod(u.home, 0o700)
    import dataclasses
    import json
    with open(os.path.join(world.root, "world.json"), "w") as f:
        json.dump(dataclasses.asdict(world), f)


def rc(user: str, server: str, port: int, address: str, extra: str = "") -> str:
    return (f'poll pop.example.org proto imap user "{UP_USER}" password "{UP_PW}"\n'
            f'#sendooway:server "{server}"\n#sendooway:port {port}\n#sendooway:tls\n{extra}'
            f'#sendooway:address "{address}"\n')


def run(args) -> int:
    from tests.fakeworld import World

    world = World.load(os.environ[FLAG])
    work = os.path.join(world.root, "soak")
    os.makedirs(os.path.join(work, "run"), exist_ok=True)
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen] = []
    tables_dir = os.path.join(work, "tables")
    os.makedirs(tables_dir, exist_ok=True)
    os.chmod(tables_dir, 0o777)
    try:
        up = subprocess.Popen([sys.executable, "-c", UPSTREAM_CODE, ROOT, world.root, UP_USER, UP_PW],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(up)
        up_port = int(up.stdout.readline())
        down_port = free_port()  # nothing listens there
        for i, name in enumerate(sorted(world.users)):
            if name == "alice":
                text = (rc(name, "localhost", up_port, "*@soak.example")
                        + rc(name, "localhost", down_port, "*@down.example"))
            else:  # each user's own upstream name: one pool key and TLS session each
                text = rc(name, f"127.0.{i // 200 + 1}.{i % 200 + 2}", up_port,
                          f"{name}@soak.example", "#sendooway:noCertCheck\n")
            world.write_user_file(name, ".fetchmailrc", text)
        sock_path = f"{work}/run/auth.sock"

        def config(name: str, extra: str) -> str:
            path = os.path.join(work, name)
            with open(path, "w") as f:
                f.write(f"localname = mx.soak\nauthSocket = {sock_path}\nsslCert = {world.cert_file}\n"
                        f"sslKey = {world.key_file}\nsslCA = {world.ca_file}\ntimeout = {TIMEOUT}\n"
                        + extra)
            os.chmod(path, 0o644)
            return path

        logs = {}
        auth_conf = config("auth.conf", "")
        logs["sendooway-auth"] = os.path.join(work, "auth.log")
        hook = [sys.executable, os.path.join(ROOT, "tests", "soak_hook.py"), tables_dir]
        auth = subprocess.Popen([*(hook + ["sendooway_auth.cli"] if args.tables
                                   else [os.path.join(BIN, "sendooway-auth")]), "-c", auth_conf, "-l",
                                 logs["sendooway-auth"], "--socket", sock_path,
                                 "--failure-delay", "0.05"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(auth)
        deadline = time.monotonic() + 15
        while not os.path.exists(sock_path):
            if time.monotonic() > deadline or auth.poll() is not None:
                raise RuntimeError("sendooway-auth did not start")
            time.sleep(0.05)
        ports, pids = {}, {"sendooway-auth": auth.pid, "upstream": up.pid}
        for tag, extra in (("on", "smarthostCache = 30\n"), ("off", "smarthostCache = 0\n"),
                           ("proxy", "smarthostCache = 30\nproxyProtocol = 127.0.0.1\n")):
            port = free_port()
            logs[f"sendooway {tag}"] = os.path.join(work, f"front-{tag}.log")
            p = subprocess.Popen([*(hook + ["sendooway_front.cli"] if args.tables
                                    else [os.path.join(BIN, "sendooway")]), "-c", config(f"{tag}.conf", extra),
                                  "-l", logs[f"sendooway {tag}"], "-b", f"127.0.0.1:{port}"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            procs.append(p)
            wait_port(port, p)
            ports[tag] = port
            pids[f"sendooway {tag}"] = p.pid

        kinds = Kinds(ports, {n: u.password for n, u in world.users.items()}, world.ssl_context())
        plan = [k for k, w in MIX.items() for _ in range(w)]
        rng = random.Random(1)
        outcomes: collections.Counter = collections.Counter()
        errors: collections.Counter = collections.Counter()
        first_error: dict[str, str] = {}

        def one(kind: str) -> None:
            try:
                outcomes[f"{kind}: {getattr(kinds, kind)()}"] += 1
            except Exception as e:  # counted and shown
                key = f"{kind}: {type(e).__name__}"
                errors[key] += 1
                first_error.setdefault(key, str(e)[:160])

        def batch(n: int, hup_every: int) -> None:
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                for i in range(n):
                    if hup_every and i and i % hup_every == 0:
                        auth.send_signal(signal.SIGHUP)
                    pool.submit(one, rng.choice(plan))

        def settle() -> None:
            time.sleep(TIMEOUT + 1.5)  # idle sessions and kept upstream connections end or stay

        t0 = time.monotonic()
        warm = max(len(plan) * 4, args.sessions // 5)
        batch(warm, 0)
        settle()
        TABLES_DIR[0] = tables_dir
        t0s, t1s, t2s = ({}, {}, {}) if args.tables else (None, None, None)
        s0 = snapshot(pids, auth.pid, t0s)
        half = args.sessions // 2
        batch(half, 250)
        settle()
        s1 = snapshot(pids, auth.pid, t1s)
        batch(args.sessions - half, 250)
        settle()
        s2 = snapshot(pids, auth.pid, t2s)
        wall = time.monotonic() - t0

        print(f"== {warm} warm-up sessions, then {half} + {args.sessions - half} measured"
              f" ({args.clients} clients at once, {wall:.0f} s)")
        print(f"  {'process':18s} {'at warm-up':>26s}   {'growth 1st half':>20s}   {'growth 2nd half':>20s}")
        print(f"  {'':18s} {'fds   RSS KiB  threads':>26s}   {'fds   RSS  thr':>20s}   {'fds   RSS  thr':>20s}")
        for name in s0:
            a, b, c = s0[name], s1[name], s2[name]
            d1 = [y - x for x, y in zip(a, b)]
            d2 = [y - x for x, y in zip(b, c)]
            fmt = (lambda v: " ".join(f"{x:>{w}}" for x, w in zip(v, (5, 9, 7)))) if len(a) == 3 else \
                  (lambda v: f"{v[0]:>5}")
            dfmt = (lambda v: " ".join(f"{x:>+{w}}" for x, w in zip(v, (5, 7, 4)))) if len(a) == 3 else \
                   (lambda v: f"{v[0]:>+5}")
            print(f"  {name:18s} {fmt(a):>26s}   {dfmt(d1):>20s}   {dfmt(d2):>20s}")
        if args.tables:
            print("== tables (containers of the product) that changed: warm-up, 1st half, 2nd half")
            for name in t0s:
                a, b, c = t0s[name], t1s.get(name, {}), t2s.get(name, {})
                for key in sorted(set(a) | set(b) | set(c)):
                    va, vb, vc = a.get(key, 0), b.get(key, 0), c.get(key, 0)
                    if len({va, vb, vc}) > 1 or key.startswith("("):
                        print(f"  {name:16s} {key:70s} {va:6d} {vb - va:+6d} {vc - vb:+6d}")
        print("== outcomes")
        for k, v in sorted(outcomes.items()):
            print(f"  {v:6d}  {k}")
        for k, v in sorted(errors.items()):
            print(f"  {v:6d}  {k}  (first: {first_error[k]})")
        print("== the logs' most frequent lines (numbers and addresses as #)")
        import re
        for name, path in logs.items():
            seen: collections.Counter = collections.Counter()
            try:
                with open(path, errors="replace") as f:
                    for line in f:
                        text = line.split("]: ", 1)[-1].strip()
                        seen[re.sub(r"[0-9a-f.:\[\]]{6,}|\d+", "#", text)[:100]] += 1
            except OSError:
                continue
            bad = [t for t in seen if "Traceback" in t or "internal error" in t]
            for text, n in seen.most_common(args.log_lines) + [(t, seen[t]) for t in bad]:
                print(f"  {name}: {n:5d}x {text}")
        leaky = [n for n in s0 if len(s0[n]) == 3 and n != "upstream"
                 and (s2[n][0] - s1[n][0] > 2 or s2[n][2] - s1[n][2] > 2)]
        if leaky:
            print("!! descriptors or threads still growing in the second half: " + ", ".join(leaky))
        return 1 if leaky or s2["(zombies)"][0] else 0
    finally:
        for p in reversed(procs):
            if p.stdin is not None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=3000, help="measured sessions (after a warm-up)")
    ap.add_argument("--clients", type=int, default=8, help="client threads at once")
    ap.add_argument("--log-lines", type=int, default=6, help="most frequent log lines shown per process")
    ap.add_argument("--tables", action="store_true",
                    help="run the daemons under tests/soak_hook.py and show their tables' sizes too")
    ap.add_argument("--keep", action="store_true", help="keep the world's directory (logs) afterwards")
    args = ap.parse_args()
    if os.environ.get(FLAG):
        return run(args)
    if os.geteuid() != 0:
        print("run as root (fake users, PAM, a frontend that drops to nobody)", file=sys.stderr)
        return 2
    from tests.fakeworld import World

    root = tempfile.mkdtemp(prefix="sendooway-soak-")
    try:
        world = World.create(root)
        add_users(world, EXTRA_USERS)
        env = World.load(root).env()
        env[FLAG] = root
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env)

        def forward(signum, _frame):
            child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        return child.wait()
    finally:
        if args.keep:
            print(f"(kept: {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
