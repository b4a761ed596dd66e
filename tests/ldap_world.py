"""A real OpenLDAP slapd on loopback for the authBackend = LDAP tests: its
own config and database in a temporary directory, ldap:// and ldaps://
(certificate for "localhost" only, from its own trustme CA), people under
ou=people,dc=example,dc=test. Started as root, stopped at the end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from tests.fakeworld import free_port

SUFFIX = "dc=example,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
AUTH_DN = f"uid=%u,{PEOPLE}"
SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"


@dataclass
class Person:
    uid: str
    password: str
    uid_number: int | None
    gid_number: int | None
    home: str | None


def _ldif(people: list[Person]) -> str:
    out = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
           "dc: example\no: Example\n",
           f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n"]
    for p in people:
        entry = [f"dn: uid={p.uid},{PEOPLE}", "objectClass: inetOrgPerson", f"uid: {p.uid}",
                 f"cn: {p.uid}", f"sn: {p.uid}", f"userPassword: {p.password}"]
        if p.uid_number is not None:
            entry += ["objectClass: posixAccount", f"uidNumber: {p.uid_number}",
                      f"gidNumber: {p.gid_number}", f"homeDirectory: {p.home}"]
        out.append("\n".join(entry) + "\n")
    return "\n".join(out)


class Slapd:
    def __init__(self, directory: str, people: list[Person], *,
                 schemas: tuple[str, ...] = ("core", "cosine", "nis", "inetorgperson"),
                 extra_schema: str = "", extra_ldif: str = "", extra_conf: str = "",
                 check_schema: bool = True) -> None:
        """`extra_schema` (slapd.conf schema lines), `extra_ldif` (entries
        added after the people), `extra_conf` (lines before `database`) and
        `check_schema=False` (slapadd -s: values are stored unchecked) let a
        test build a directory that the standard schema would refuse."""
        import trustme

        self.dir = directory
        os.makedirs(os.path.join(directory, "db"), exist_ok=True)
        ca = trustme.CA()
        self.ca_file = os.path.join(directory, "ldap-ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        leaf = ca.issue_cert("localhost")
        self.cert, self.key = (os.path.join(directory, n) for n in ("ldap.crt", "ldap.key"))
        leaf.private_key_pem.write_to_path(self.key)
        with open(self.cert, "wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        os.chmod(self.key, 0o600)
        self.port, self.tls_port = free_port(), free_port()
        self.conf = os.path.join(directory, "slapd.conf")
        schema = "/etc/ldap/schema"
        with open(self.conf, "w") as f:
            f.write("".join(f"include {schema}/{s}.schema\n" for s in schemas))
            f.write(extra_schema)
            f.write(f"modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
                    f"pidfile {directory}/slapd.pid\n"
                    f"TLSCertificateFile {self.cert}\nTLSCertificateKeyFile {self.key}\n"
                    f"{extra_conf}"
                    f"database mdb\nmaxsize 10485760\nsuffix \"{SUFFIX}\"\n"
                    f"rootdn \"cn=admin,{SUFFIX}\"\nrootpw admin-Secret-9\n"
                    f"directory {directory}/db\n"
                    "access to attrs=userPassword by anonymous auth by self read by * none\n"
                    "access to * by self read by users read by * none\n")
        ldif = os.path.join(directory, "people.ldif")
        with open(ldif, "w") as f:
            f.write(_ldif(people) + ("\n" + extra_ldif if extra_ldif else ""))
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        r = subprocess.run([SLAPADD, *(() if check_schema else ("-s",)), "-f", self.conf,
                            "-l", ldif], capture_output=True,
                           env=env, timeout=60)
        if r.returncode:
            raise RuntimeError(f"slapadd failed: {r.stderr.decode(errors='replace')}")
        self.proc = subprocess.Popen(
            [SLAPD, "-f", self.conf, "-d", "0",
             "-h", f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tls_port}/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited: {self.proc.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("slapd did not start listening")

    def uri(self, host: str = "localhost", tls: bool = True) -> str:
        return f"ldaps://{host}:{self.tls_port}" if tls else f"ldap://{host}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(os.path.join(self.dir, "db"), ignore_errors=True)


def have_slapd() -> bool:
    return os.access(SLAPD, os.X_OK) and os.access(SLAPADD, os.X_OK)
