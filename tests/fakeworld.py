"""A fake world for tests, the demo and benchmarks.

- users and groups through nss_wrapper (passwd/group files, homes owned by
  the users);
- PAM through pam_wrapper + pam_matrix for service `sendooway` (python-pam
  loads libpam by name, so LD_LIBRARY_PATH points at a folder whose
  libpam.so.0 is libpam_wrapper.so);
- certificates from trustme (a CA, a server certificate for localhost,
  127.0.0.1 and ::1).

`World.create(root)` builds it; `world.env()` is the environment a process
needs to live in it. The test suite re-executes pytest once inside the world
(see conftest.py), so in-process code sees the fake users too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")


# The start of a skip reason for what a machine is, not what setup failed to
# install: CI (which fails every other skip) lets these pass (conftest.py).
MACHINE_SKIP = "not on this machine: "

def _find_lib(name: str) -> str:
    for d in LIBDIRS:
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{name} not found (apt-get install libpam-wrapper libnss-wrapper)")


def _find_pam_module(name: str) -> str:
    for d in LIBDIRS:
        p = os.path.join(d, "pam_wrapper", name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"pam_wrapper/{name} not found (apt-get install libpam-wrapper)")


@dataclass
class User:
    name: str
    uid: int
    gid: int
    password: str
    home: str
    groups: list[str] = field(default_factory=list)


# Passwords are distinctive so a leak test can grep every log for them.
DEFAULT_USERS = (
    ("alice", 40001, "alice-Pw-7f3kQ", ["mailusers"]),
    ("bob", 40002, "bob-Pw-c91Xz", ["mailusers"]),
    ("carol", 40003, "carol-Pw-Ee42u", []),
    ("dave", 40004, "dave-Pw-0pLm8", ["staff2"]),
)
GROUPS = {"mailusers": 41001, "staff2": 41002}


@dataclass
class World:
    root: str
    users: dict[str, User]
    passwd: str
    group: str
    pam_dir: str
    pam_lib_dir: str
    passdb: str
    ca_file: str
    cert_file: str
    key_file: str
    upstream_cert_file: str
    upstream_key_file: str

    # ------------------------------------------------------------ building

    @classmethod
    def create(cls, root: str | os.PathLike) -> "World":
        root = str(root)
        os.makedirs(root, exist_ok=True)
        os.chmod(root, 0o755)
        homes = os.path.join(root, "home")
        os.makedirs(homes, exist_ok=True)
        os.chmod(homes, 0o755)
        users = {}
        for name, uid, pw, groups in DEFAULT_USERS:
            users[name] = User(name, uid, uid, pw, os.path.join(homes, name), list(groups))
        world = cls(
            root=root, users=users,
            passwd=os.path.join(root, "passwd"), group=os.path.join(root, "group"),
            pam_dir=os.path.join(root, "pam.d"), pam_lib_dir=os.path.join(root, "pamlib"),
            passdb=os.path.join(root, "passdb"),
            ca_file=os.path.join(root, "ca.pem"), cert_file=os.path.join(root, "server.crt"),
            key_file=os.path.join(root, "server.key"),
            upstream_cert_file=os.path.join(root, "upstream.crt"),
            upstream_key_file=os.path.join(root, "upstream.key"),
        )
        world._write_nss()
        world._write_pam()
        world._write_certs()
        for u in users.values():
            os.makedirs(u.home, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(u.home, u.uid, u.gid)
            os.chmod(u.home, 0o700)
        with open(os.path.join(root, "world.json"), "w") as f:
            json.dump(asdict(world), f)
        return world

    @classmethod
    def load(cls, root: str) -> "World":
        with open(os.path.join(root, "world.json")) as f:
            data = json.load(f)
        data["users"] = {k: User(**v) for k, v in data["users"].items()}
        return cls(**data)

    def _write_nss(self) -> None:
        lines = [
            "root:x:0:0:root:/root:/bin/sh",
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
        ]
        for u in self.users.values():
            lines.append(f"{u.name}:x:{u.uid}:{u.gid}:{u.name}:{u.home}:/bin/sh")
        Path(self.passwd).write_text("\n".join(lines) + "\n")
        glines = ["root:x:0:", "nogroup:x:65534:"]
        for u in self.users.values():
            glines.append(f"{u.name}:x:{u.gid}:")
        for g, gid in GROUPS.items():
            members = ",".join(u.name for u in self.users.values() if g in u.groups)
            glines.append(f"{g}:x:{gid}:{members}")
        Path(self.group).write_text("\n".join(glines) + "\n")
        os.chmod(self.passwd, 0o644)
        os.chmod(self.group, 0o644)

    def _write_pam(self) -> None:
        os.makedirs(self.pam_dir, exist_ok=True)
        os.makedirs(self.pam_lib_dir, exist_ok=True)
        link = os.path.join(self.pam_lib_dir, "libpam.so.0")
        if not os.path.lexists(link):
            os.symlink(_find_lib("libpam_wrapper.so"), link)
        Path(self.passdb).write_text(
            "".join(f"{u.name}:{u.password}:sendooway\n" for u in self.users.values())
        )
        os.chmod(self.passdb, 0o600)
        matrix = _find_pam_module("pam_matrix.so")
        service = (
            f"auth required {matrix} passdb={self.passdb}\n"
            f"account required {matrix} passdb={self.passdb}\n"
        )
        Path(self.pam_dir, "sendooway").write_text(service)

    def _write_certs(self) -> None:
        import trustme

        ca = trustme.CA()
        ca.cert_pem.write_to_path(self.ca_file)
        for cert_file, key_file in ((self.cert_file, self.key_file),
                                    (self.upstream_cert_file, self.upstream_key_file)):
            leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
            leaf.private_key_pem.write_to_path(key_file)
            # chain: leaf then CA, as servers usually present it
            with open(cert_file, "wb") as f:
                for blob in leaf.cert_chain_pems:
                    f.write(blob.bytes())
            os.chmod(key_file, 0o600)
            os.chmod(cert_file, 0o644)

    # ------------------------------------------------------------ using

    def env(self, base: dict | None = None) -> dict[str, str]:
        """Environment for a process that lives in this world."""
        env = dict(os.environ if base is None else base)
        preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "nss_wrapper" not in p]
        env["LD_PRELOAD"] = ":".join([_find_lib("libnss_wrapper.so"), *preload])
        env["NSS_WRAPPER_PASSWD"] = self.passwd
        env["NSS_WRAPPER_GROUP"] = self.group
        libpath = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and p != self.pam_lib_dir]
        env["LD_LIBRARY_PATH"] = ":".join([self.pam_lib_dir, *libpath])
        env["PAM_WRAPPER"] = "1"
        env["PAM_WRAPPER_SERVICE_DIR"] = self.pam_dir
        env.pop("PAM_WRAPPER_DEBUGLEVEL", None)  # level >= 3 prints passwords
        env["SENDOOWAY_TEST_WORLD"] = self.root
        # tests/worldsite/sitecustomize.py: pam_wrapper's start-up one process at a time
        site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worldsite")
        pypath = [p for p in env.get("PYTHONPATH", "").split(":") if p and p != site]
        env["PYTHONPATH"] = ":".join([site, *pypath])
        return env

    def write_user_file(self, user: str, relpath: str, text: str | bytes, mode: int = 0o600) -> str:
        """Write ~user/relpath owned by the user, with `mode`."""
        u = self.users[user]
        path = os.path.join(u.home, relpath)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        if os.geteuid() == 0:
            d = parent
            while d.startswith(u.home) and d != u.home:
                os.chown(d, u.uid, u.gid)
                d = os.path.dirname(d)
        data = text.encode() if isinstance(text, str) else text
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        if os.geteuid() == 0:
            os.chown(path, u.uid, u.gid)
        return path

    def clear_home(self, user: str) -> None:
        """Remove everything in ~user (between tests)."""
        home = self.users[user].home
        for entry in os.listdir(home):
            p = os.path.join(home, entry)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)

    def ssl_context(self):
        """A client-side ssl.SSLContext trusting the world's CA."""
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca_file)
        return ctx


def become(user) -> None:
    """In a forked child of a root test: be `user` (a world user) for good."""
    os.setgroups([])
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _any_address_socket() -> socket.socket:
    """A TCP socket bound to a port the kernel picks free on every local
    address, IPv4 and IPv6 (the dual-stack wildcard), or on every IPv4
    address where there is no IPv6."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
    except OSError:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("0.0.0.0", 0))
    return s


def free_port_everywhere() -> int:
    """A port free on 127.0.0.1 and ::1 alike, for a listener that binds
    both: free_port("::1")'s pick may be in use on 127.0.0.1 already."""
    with _any_address_socket() as s:
        return s.getsockname()[1]


def bound_on_both(v4_host: str = "127.0.0.1", v6_host: str = "::1") -> tuple[socket.socket, socket.socket]:
    """Two TCP sockets bound to one port, on v4_host and on v6_host (IPv6
    only), not listening yet: a port free on one family may be held on the
    other by a parallel test, and then another port is tried."""
    for _ in range(20):
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.bind((v6_host, 0))
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            v4.bind((v4_host, v6.getsockname()[1]))
            return v4, v6
        except OSError:
            v4.close()
            v6.close()
    raise AssertionError(f"no port free on both {v4_host} and {v6_host}")


@contextlib.contextmanager
def refused_port():
    """A port where nothing listens on any local address for the block's
    duration: held bound, not listening, so a connect is refused (RST) and
    no parallel test can take it (a port merely closed can be bound and
    listened on by another xdist worker meanwhile)."""
    s = _any_address_socket()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()
