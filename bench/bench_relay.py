"""Relay figures (issue 6): proxied vs direct against the same upstream, in the same run.

    .venv/bin/python bench/bench_relay.py [--sessions 40] [--big-mib 64] [--concurrent 100]

- session median: a whole client session (connect, STARTTLS, AUTH, one
  10 KiB message, QUIT) straight to the upstream vs through `sendooway -b`
  with smarthostCache off and on; rounds interleave direct/off/on so drift
  hits all three alike. Also: the median of each step, the CPU each
  process spent per session (client, sendooway, sendooway-auth with its
  workers, upstream), and a pipelining client's session (MAIL, RCPT and
  DATA in one write).
- one big message (64 MiB): time direct vs proxied, and the peak RSS
  (VmHWM) of the serving `sendooway` process.
- N concurrent sessions through the proxy (cache on): how many succeed.

The upstream is aiosmtpd (tests/upstream.py) in its own process, STARTTLS +
AUTH required; the clients are smtplib (the big message is streamed with
sendall after DATA, so the client's own cost is the same both ways). Run as
root: it builds a throw-away fake world (users, PAM, certificates) and
re-executes itself inside it, as the tests and the demo do.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

FLAG = "SENDOOWAY_BENCH_WORLD"
BIN = os.path.dirname(sys.executable)
UP_USER, UP_PW = "bench-up", "Bench-Up-Pw-88"
SENDER, RCPT = "alice@bench.example", "rcpt@example.net"


# ------------------------------------------------------------ processes


UPSTREAM_CODE = r"""
import sys, time, logging, warnings
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("ignore")
logging.getLogger("mail.log").setLevel(logging.ERROR)
from tests.fakeworld import World
from tests.upstream import FakeUpstream

class Discarding(FakeUpstream):
    async def handle_DATA(self, server, session, envelope):
        n = len(envelope.original_content or b"")
        envelope.original_content = envelope.content = None
        return "250 2.0.0 accepted %d octets" % n

up = Discarding(World.load(sys.argv[2]), tls="starttls", accounts={sys.argv[3]: sys.argv[4]}, pipelining=True,
                data_size_limit=0).start()
print(up.port, flush=True)
sys.stdin.read()
up.stop()
"""


# A TCP relay that delays every byte by half the round-trip time each way:
# the "internet" between the smarthost and everyone who talks to it.
DELAY_CODE = r"""
import asyncio, sys
listen_port, target_port, one_way = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 2000

async def pump(reader, writer):
    loop = asyncio.get_running_loop()
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            loop.call_later(one_way, writer.write, data)
        await asyncio.sleep(one_way)
    except ConnectionError:
        pass
    finally:
        await asyncio.sleep(one_way)
        writer.close()

async def handle(cr, cw):
    try:
        ur, uw = await asyncio.open_connection("127.0.0.1", target_port)
    except OSError:
        cw.close()
        return
    for w in (cw, uw):
        import socket
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.gather(pump(cr, uw), pump(ur, cw))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = proc.stderr.read()[-2000:] if proc.stderr else ""
            raise RuntimeError(f"process exited with {proc.returncode}: {said}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and all its live descendants (the authenticator's
    fork server and the users' reader workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
        except (OSError, ValueError, IndexError):
            continue
        todo += children.get(p, [])
    return total


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------ clients


PHASES = ("connect+greeting", "STARTTLS+EHLO", "AUTH", "MAIL", "RCPT", "DATA+message", "QUIT")


def session(port: int, user: str, password: str, ctx, body: bytes, phases: list | None = None) -> float:
    """One whole client session; returns its wall time in seconds (and appends
    the time of each step in PHASES to `phases`)."""
    t = [time.perf_counter()]
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.bench", timeout=120) as s:
        t.append(time.perf_counter())
        s.starttls(context=ctx)
        s.ehlo()
        t.append(time.perf_counter())
        s.login(user, password)
        t.append(time.perf_counter())
        code, text = s.mail(SENDER)
        t.append(time.perf_counter())
        if code != 250:
            raise RuntimeError(f"MAIL: {code} {text!r}")
        code, text = s.rcpt(RCPT)
        t.append(time.perf_counter())
        if code != 250:
            raise RuntimeError(f"RCPT: {code} {text!r}")
        code, text = s.data(body)
        t.append(time.perf_counter())
        if code != 250:
            raise RuntimeError(f"DATA: {code} {text!r}")
    t.append(time.perf_counter())
    if phases is not None:
        phases.append([b - a for a, b in zip(t, t[1:])])
    return t[-1] - t[0]


def pipelined_session(port: int, user: str, password: str, ctx, body: bytes) -> float:
    """A whole session as a PIPELINING client (RFC 2920) sends it: MAIL,
    RCPT and DATA in one write, the message and QUIT in another."""
    t0 = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.bench", timeout=120) as s:
        s.starttls(context=ctx)
        s.ehlo()
        s.login(user, password)
        s.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n")
        got = [s.getreply()[0] for _ in range(3)]
        if got != [250, 250, 354]:
            raise RuntimeError(f"pipelined MAIL, RCPT, DATA: {got}")
        s.send(body + b"\r\n.\r\n")
        code, text = s.getreply()
        if code != 250:
            raise RuntimeError(f"pipelined message: {code} {text!r}")
    return time.perf_counter() - t0


def big_session(port: int, user: str, password: str, ctx, chunks: list[bytes]) -> float:
    """A session with one big message streamed after DATA (already CRLF, no dots)."""
    t0 = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.bench", timeout=300) as s:
        s.starttls(context=ctx)
        s.ehlo()
        s.login(user, password)
        code, _ = s.mail(SENDER)
        assert code == 250
        code, _ = s.rcpt(RCPT)
        assert code == 250
        code, text = s.docmd("DATA")
        assert code == 354, (code, text)
        for c in chunks:
            s.sock.sendall(c)
        s.sock.sendall(b".\r\n")
        code, text = s.getreply()
        if code != 250:
            raise RuntimeError(f"big message: {code} {text!r}")
    return time.perf_counter() - t0


def make_body(size: int) -> bytes:
    head = b"From: bench\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * ((size - len(head)) // len(line) + 1)


def big_chunks(mib: int) -> list[bytes]:
    line = b"y" * 998 + b"\r\n"
    chunk = line * 256  # 256000 octets
    n = (mib * 1024 * 1024) // len(chunk)
    return [b"Subject: big\r\n\r\n"] + [chunk] * n


# ------------------------------------------------------------ the run


def run(args) -> int:
    from tests.fakeworld import World

    world = World.load(os.environ[FLAG])
    ctx = world.ssl_context()
    work = os.path.join(world.root, "bench")
    os.makedirs(os.path.join(work, "run"), exist_ok=True)
    os.chmod(work, 0o755)
    alice_pw = world.users["alice"].password
    procs: list[subprocess.Popen] = []
    try:
        up = subprocess.Popen([sys.executable, "-c", UPSTREAM_CODE, ROOT, world.root, UP_USER, UP_PW],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(up)
        up_port = int(up.stdout.readline())
        if args.rtt_ms:
            real_port, up_port = up_port, free_port()
            delay = subprocess.Popen([sys.executable, "-c", DELAY_CODE, str(up_port), str(real_port),
                                      str(args.rtt_ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(delay)
            delay.stdout.readline()
            print(f"(the upstream is {args.rtt_ms} ms round trip away from both the client and sendooway)")
        world.write_user_file("alice", ".fetchmailrc", (
            f'poll pop.example.org proto imap user "{UP_USER}" password "{UP_PW}"\n'
            f'#sendooway:server "localhost"\n#sendooway:port {up_port}\n#sendooway:tls\n'
            f'#sendooway:address "*@bench.example"\n'))
        sock_path = f"{work}/run/auth.sock"

        def config(name: str, cache: int) -> str:
            path = os.path.join(work, name)
            with open(path, "w") as f:
                f.write(f"localname = mx.bench\nauthSocket = {sock_path}\nsslCert = {world.cert_file}\n"
                        f"sslKey = {world.key_file}\nsslCA = {world.ca_file}\ntimeout = 300\n"
                        f"smarthostCache = {cache}\n")
            os.chmod(path, 0o644)
            return path

        conf_off, conf_on = config("off.conf", 0), config("on.conf", 30)
        auth_cmd = [os.path.join(BIN, "sendooway-auth")]
        if args.profile_auth:
            auth_cmd = [sys.executable, "-m", "cProfile", "-o", args.profile_auth, "-m", "sendooway_auth.cli"]
        auth = subprocess.Popen([*auth_cmd, "-c", conf_off, "-l",
                                 os.path.join(work, "auth.log"), "--socket", sock_path],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(auth)
        deadline = time.monotonic() + 15
        while not os.path.exists(sock_path):
            if time.monotonic() > deadline or auth.poll() is not None:
                raise RuntimeError("sendooway-auth did not start")
            time.sleep(0.05)

        def frontend(conf: str, tag: str) -> tuple[subprocess.Popen, int]:
            port = free_port()
            cmd = [os.path.join(BIN, "sendooway")]
            if args.profile_front and tag == args.profile_kind:
                cmd = [sys.executable, "-m", "cProfile", "-o", args.profile_front, "-m", "sendooway_front.cli"]
            p = subprocess.Popen([*cmd, "-c", conf, "-l",
                                  os.path.join(work, f"front-{tag}.log"), "-b", f"127.0.0.1:{port}"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
            procs.append(p)
            wait_port(port, p)
            return p, port

        f_off, p_off = frontend(conf_off, "off")
        f_on, p_on = frontend(conf_on, "on")
        if args.hold:
            return hold(args.hold, world, up_port, p_off, p_on, alice_pw)

        body = make_body(10 * 1024)
        phases: dict[str, list] = {"direct": [], "proxied, cache off": [], "proxied, cache on": []}
        kinds = {
            "direct": lambda: session(up_port, UP_USER, UP_PW, ctx, body, phases["direct"]),
            "proxied, cache off": lambda: session(p_off, "alice", alice_pw, ctx, body,
                                                  phases["proxied, cache off"]),
            "proxied, cache on": lambda: session(p_on, "alice", alice_pw, ctx, body,
                                                 phases["proxied, cache on"]),
        }
        for fn in kinds.values():  # warm-up
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {k: [] for k in kinds}
        serving = {"direct": None, "proxied, cache off": f_off.pid, "proxied, cache on": f_on.pid}
        cpu: dict[str, list[float]] = {k: [0.0] * 4 for k in kinds}  # client, sendooway, auth, upstream
        for _ in range(args.sessions):
            for k, fn in kinds.items():
                others = (cpu_seconds(serving[k]) if serving[k] else 0.0,
                          tree_cpu_seconds(auth.pid), cpu_seconds(up.pid))
                client = time.process_time()  # (read last before, first after: only the session)
                times[k].append(fn())
                client = time.process_time() - client
                after = (cpu_seconds(serving[k]) if serving[k] else 0.0,
                         tree_cpu_seconds(auth.pid), cpu_seconds(up.pid))
                before = (0.0, *others)
                after = (client, *after)
                cpu[k] = [c + (b - a) for c, a, b in zip(cpu[k], before, after)]
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"== one whole session (STARTTLS, AUTH, 10 KiB message), median of {args.sessions}")
        for k, v in med.items():
            q = statistics.quantiles(times[k], n=10)
            print(f"  {k:22s} {v * 1000:7.2f} ms   (p10 {q[0] * 1000:.2f}, p90 {q[-1] * 1000:.2f})"
                  + ("" if k == "direct" else f"   ratio {v / med['direct']:.2f}x direct"))
        print("  step medians in ms (" + ", ".join(PHASES) + "):")
        for k, rows in phases.items():
            rows = rows[3:]  # without the warm-up
            cols = [statistics.median(c) * 1000 for c in zip(*rows)]
            print(f"    {k:20s} " + " ".join(f"{c:6.2f}" for c in cols))
        print("  CPU per session in ms (client, sendooway, sendooway-auth with its workers,"
              " upstream; kernel ticks, so coarse):")
        for k, c in cpu.items():
            print(f"    {k:20s} " + " ".join(f"{x * 1000 / args.sessions:6.2f}" for x in c)
                  + f"   sum {sum(c) * 1000 / args.sessions:5.2f}")
        # A pipelining client: MAIL, RCPT and DATA in one write. Proxied, they go
        # upstream as one group too, so the proxy adds no upstream round trip.
        piped = {"direct": [], "proxied, cache on": []}
        for _ in range(args.sessions):
            piped["direct"].append(pipelined_session(up_port, UP_USER, UP_PW, ctx, body))
            piped["proxied, cache on"].append(pipelined_session(p_on, "alice", alice_pw, ctx, body))
        pmed = {k: statistics.median(v) for k, v in piped.items()}
        print(f"  pipelining client (MAIL, RCPT, DATA in one write), median of {args.sessions}:")
        for k, v in pmed.items():
            print(f"    {k:20s} {v * 1000:7.2f} ms" + ("" if k == "direct" else
                  f"   ratio {v / pmed['direct']:.2f}x direct"))
        # The authenticator's share of MAIL: a sender without a route is answered
        # 550 right after the lookup, no upstream involved.
        lookups = []
        while len(lookups) < args.sessions:
            # a refused MAIL and an RSET are junk commands: 100 are free
            # per session, so a new session every 40 rounds
            with smtplib.SMTP("127.0.0.1", p_on, local_hostname="client.bench", timeout=60) as s:
                s.starttls(context=ctx)
                s.ehlo()
                s.login("alice", alice_pw)
                for _ in range(min(40, args.sessions - len(lookups))):
                    t0 = time.perf_counter()
                    code, _ = s.mail("nobody@unrouted.example")
                    lookups.append(time.perf_counter() - t0)
                    assert code == 550, code
                    s.rset()
        print(f"  MAIL of a sender without a route (route lookup only, 550): "
              f"{statistics.median(lookups) * 1000:.2f} ms median")
        hwm_small = vm_hwm_kib(f_off.pid)

        chunks = big_chunks(args.big_mib)
        size = sum(map(len, chunks))
        big = {"direct": [], "proxied": []}
        front_cpu = []
        for _ in range(args.big_runs):
            big["direct"].append(big_session(up_port, UP_USER, UP_PW, ctx, chunks))
            c0 = cpu_seconds(f_off.pid)
            big["proxied"].append(big_session(p_off, "alice", alice_pw, ctx, chunks))
            front_cpu.append(cpu_seconds(f_off.pid) - c0)
        bd, bp = statistics.median(big["direct"]), statistics.median(big["proxied"])
        hwm_big = vm_hwm_kib(f_off.pid)
        print(f"== one {size / 2**20:.0f} MiB message, median of {args.big_runs}")
        print(f"  direct                 {bd:7.2f} s   ({size / bd / 2**20:.0f} MiB/s)")
        print(f"  proxied                {bp:7.2f} s   ({size / bp / 2**20:.0f} MiB/s)   ratio {bp / bd:.2f}x direct")
        print(f"  sendooway CPU per big message: {statistics.median(front_cpu):.2f} s"
              f" ({os.cpu_count()} CPUs shared by client, sendooway and upstream)")
        print(f"  sendooway peak RSS (VmHWM): {hwm_small / 1024:.1f} MiB after the small sessions,"
              f" {hwm_big / 1024:.1f} MiB after the big messages")

        n = args.concurrent
        results = {}
        for label, port, user, pw in (("direct", up_port, UP_USER, UP_PW),
                                      ("proxied, cache on", p_on, "alice", alice_pw)):
            t0 = time.perf_counter()
            ok = 0
            errors = []
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                futs = [pool.submit(session, port, user, pw, ctx, body) for _ in range(n)]
                for f in futs:
                    try:
                        f.result()
                        ok += 1
                    except Exception as e:  # counted and shown
                        errors.append(f"{type(e).__name__}: {e}")
            results[label] = (ok, time.perf_counter() - t0, errors)
        print(f"== {n} concurrent sessions (10 KiB message each)")
        for label, (ok, wall, errors) in results.items():
            print(f"  {label:22s} {ok}/{n} succeeded in {wall:.2f} s"
                  + (f"; first error: {errors[0]}" if errors else ""))
        print(f"  sendooway (cache on) peak RSS: {vm_hwm_kib(f_on.pid) / 1024:.1f} MiB")

        print("== summary (targets from issue 6)")
        summary = [
            ("cache off / direct", med["proxied, cache off"] / med["direct"], 2.0),
            ("cache on / direct", med["proxied, cache on"] / med["direct"], 1.2),
            (f"{args.big_mib} MiB proxied / direct", bp / bd, 1.3),
        ]
        for what, ratio, target in summary:
            print(f"  {what:28s} {ratio:5.2f}x  (target <= {target}x)")
        print(f"  {'peak RSS of sendooway':28s} {hwm_big / 1024:5.1f} MiB (target <= 64 MiB)")
        print(f"  {'concurrent, proxied':28s} {results['proxied, cache on'][0]}/{n}")
        return 0 if results["proxied, cache on"][0] == n else 1
    finally:
        for p in reversed(procs):
            if p.stdin is not None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            stop(p)


def hold(path: str, world, up_port: int, p_off: int, p_on: int, alice_pw: str) -> int:
    """--hold: leave everything running for bench/relay_sessions.py (whole-
    process timing from outside) until stdin ends or SIGTERM."""
    import json
    targets = {
        "direct": [up_port, UP_USER, UP_PW],
        "off": [p_off, "alice", alice_pw],
        "on": [p_on, "alice", alice_pw],
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"ca_file": world.ca_file, "targets": targets}, f)
    os.replace(tmp, path)
    print(f"holding: {path} names the ports; stop with SIGTERM or Ctrl-C", flush=True)
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        signal.sigwait(stops)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=40, help="sessions per kind for the medians")
    ap.add_argument("--big-mib", type=int, default=64, help="size of the big message")
    ap.add_argument("--big-runs", type=int, default=3, help="big messages per kind")
    ap.add_argument("--concurrent", type=int, default=100, help="concurrent sessions")
    ap.add_argument("--rtt-ms", type=float, default=0,
                    help="put the upstream this many ms of round trip away (a delaying TCP relay)")
    ap.add_argument("--hold", metavar="FILE",
                    help="start the upstream, sendooway-auth and both frontends, write their ports"
                         " to FILE and wait (for bench/relay_sessions.py), instead of measuring")
    ap.add_argument("--profile-front", metavar="FILE",
                    help="run the cache-off frontend under cProfile, stats to FILE (writable by nobody)")
    ap.add_argument("--profile-kind", choices=("off", "on"), default="off",
                    help="the frontend --profile-front profiles: cache off (the default) or on")
    ap.add_argument("--profile-auth", metavar="FILE",
                    help="run sendooway-auth under cProfile (its main process), stats to FILE")
    args = ap.parse_args()
    if os.environ.get(FLAG):
        return run(args)
    from tests.fakeworld import World

    root = tempfile.mkdtemp(prefix="sendooway-bench-")
    try:
        World.create(root)
        env = World.load(root).env()
        env[FLAG] = root
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env)

        def forward(signum, _frame):
            child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        return child.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
