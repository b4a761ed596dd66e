"""Frontend figures: memory of idle sessions and sessions/s for
connect + EHLO + QUIT on `sendooway -b`, next to an aiosmtpd server doing the
same on the same machine in the same run (the ratio is what to compare).

    .venv/bin/python bench/bench_front.py [--seconds 3] [--idle 200] [--concurrency 16]

Run as root (the frontend drops to nobody, like in production). It builds a
throw-away fake world (tests/fakeworld.py) for the authenticator daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.fakeworld import World, free_port  # noqa: E402

BIN = os.path.dirname(sys.executable)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line or line[3:4] != b"-":
            return line


async def one_session(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    import socket as _s

    sock.setsockopt(_s.IPPROTO_TCP, _s.TCP_NODELAY, 1)
    greeting = await read_reply(reader)
    assert greeting.startswith(b"220"), greeting
    writer.write(b"EHLO bench.test\r\n")
    assert (await read_reply(reader)).startswith(b"250")
    writer.write(b"QUIT\r\n")
    assert (await read_reply(reader)).startswith(b"221")
    writer.close()
    await writer.wait_closed()


async def rate(port: int, seconds: float, concurrency: int) -> float:
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            await one_session(port)
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - t0)


async def idle_memory(port: int, pid: int, count: int) -> tuple[int, int, float]:
    await asyncio.sleep(0.3)
    before = rss_kib(pid)
    conns = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(b"EHLO idle.test\r\n")
        await read_reply(reader)
        conns.append((reader, writer))
    await asyncio.sleep(0.5)
    after = rss_kib(pid)
    for _r, w in conns:
        w.close()
    return before, after, (after - before) / count


def data_core_cpu(line: bytes, total: int = 8 * 1024 * 1024) -> float:
    """CPU seconds the sans-IO session core spends on `total` octets of
    message made of `line` (in 256 KiB reads), best of three."""
    from sendooway_front._events import NEED_DATA
    from sendooway_front._session import Session, SessionSettings

    best = float("inf")
    for _ in range(3):
        s = Session(SessionSettings(hostname="x", size_limit=0))
        s._begin_data()  # straight into DATA: only the message path is timed
        block = line * (256 * 1024 // len(line))
        start = time.process_time()
        sent = 0
        while sent < total:
            s.receive_data(block)
            sent += len(block)
            while s.next_event() is not NEED_DATA:
                pass
        best = min(best, time.process_time() - start)
    return best


def stdio_session_rss(conf: str, env: dict) -> int:
    """RSS of `sendooway` serving one idle session on stdin/stdout (inetd)."""
    import socket

    ours, theirs = socket.socketpair()
    p = subprocess.Popen([os.path.join(BIN, "sendooway"), "-c", conf, "-l", "/dev/null"],
                         stdin=theirs, stdout=theirs, env=env, stderr=subprocess.DEVNULL)
    theirs.close()
    try:
        ours.settimeout(15)
        ours.recv(512)  # the greeting: the process is fully up
        ours.sendall(b"EHLO idle.test\r\n")
        ours.recv(4096)
        time.sleep(0.3)
        return rss_kib(p.pid)
    finally:
        ours.close()
        p.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--idle", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_front: run as root (the frontend drops to nobody)", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="sendooway-bench-")
    os.chmod(tmp, 0o755)
    world = World.create(os.path.join(tmp, "world"))
    env = world.env()
    conf = os.path.join(tmp, "sendooway.conf")
    with open(conf, "w") as f:
        f.write(f"authSocket = {tmp}/run/auth.sock\nlocalname = bench.test\n")
    procs = []
    try:
        auth = subprocess.Popen([os.path.join(BIN, "sendooway-auth"), "-c", conf, "-l",
                                 os.path.join(tmp, "auth.log")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(auth)
        for _ in range(200):
            if os.path.exists(f"{tmp}/run/auth.sock"):
                break
            time.sleep(0.05)
        port = free_port()
        front = subprocess.Popen([os.path.join(BIN, "sendooway"), "-c", conf, "-l",
                                  os.path.join(tmp, "front.log"), "-b", f"127.0.0.1:{port}"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(front)
        asyncio.run(wait_port(port))
        base_rss = rss_kib(front.pid)
        before, after, per = asyncio.run(idle_memory(port, front.pid, args.idle))
        print(f"frontend process RSS at rest:       {base_rss / 1024:.1f} MiB")
        print(f"{args.idle} idle sessions (after EHLO): +{(after - before) / 1024:.1f} MiB"
              f" = {per:.0f} KiB per idle session")
        time.sleep(0.5)
        asyncio.run(one_session(port))  # warm
        front_seq = asyncio.run(rate(port, args.seconds, 1))
        front_par = asyncio.run(rate(port, args.seconds, args.concurrency))
        sport = free_port()
        ctl = subprocess.Popen([os.path.join(BIN, "aiosmtpd"), "-n", "-l", f"127.0.0.1:{sport}",
                                "-c", "aiosmtpd.handlers.Sink"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        procs.append(ctl)
        asyncio.run(wait_port(sport))
        asyncio.run(one_session(sport))
        direct_seq = asyncio.run(rate(sport, args.seconds, 1))
        direct_par = asyncio.run(rate(sport, args.seconds, args.concurrency))
        print(f"one stdio (inetd) session process:  {stdio_session_rss(conf, env) / 1024:.1f} MiB RSS")
        print("connect+EHLO+QUIT sessions/s      sendooway -b   aiosmtpd   ratio")
        print(f"  one client at a time             {front_seq:11.0f} {direct_seq:10.0f}   {front_seq / direct_seq:5.2f}")
        print(f"  {args.concurrency:2d} clients in parallel          {front_par:11.0f} {direct_par:10.0f}   {front_par / direct_par:5.2f}")
        print("(sendooway also opens a link to sendooway-auth and says hello per session)")
        plain, dotted = data_core_cpu(b"ab\r\n"), data_core_cpu(b"..\r\n")
        print(f"session core, 8 MiB of 4-octet lines: {plain:.3f} s CPU; of dot-stuffed"
              f" '..' lines: {dotted:.3f} s ({dotted / plain:.2f}x)")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
