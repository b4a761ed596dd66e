"""Tests written from a mutation-testing review of the product code changed
since 43488a4: socket activation (the frontend's activated_sockets and
socket_activated, the authenticator's activated_socket: the checks of
what systemd passes, close-on-exec, Accept=yes on fd 3 with its 421 and
linger, -b with LISTEN_FDS), the trust of the authSocket listener
(only_root), socket path lengths (socket_path_fits, --socket,
--auth-socket, the private authenticator's TMPDIR), closed_directory and
its messages, the daemon's Tally of refused peers, the SIGHUP handler of
serve_listening, IDNA capitals in _address, relative mapping and include
paths (from_home), --check --sender reading the address as MAIL FROM
does, the null sender logged as <>, and a user's include skipping its
lines that are not UTF-8. Each test pins behaviour that a small change
to that code left unnoticed by the suite, and names the mutants it kills.
Real parts: both programs started as systemd starts them (crafted
LISTEN_PID/LISTEN_FDS, socketpairs and TCP connections on fd 3), a
squatter process running as nobody, sendooway-auth --check on users'
files under nss_wrapper (one account with a relative home), real
directories with owners, groups and modes.

71 mutants of the code as it was, one at a time, each against the test
files that exercise it (test_review_activation, test_review_outsider,
test_third_review, test_front_authlink, test_review_outside_front,
test_deploy_front, test_deploy_auth, test_auth_daemon, test_auth_routes,
test_auth_cli, test_review_checkdiff, test_review_addresses, test_config,
test_review_coverage, test_compat_original2, test_auth_faults,
test_review_mutants11/18/19, test_front_e2e, test_front_second_review):
31 killed, 40 survived. This file kills 29 of them; 11 are equivalent.

MUTANTS ("killed" means by the suite before this file)
authenticator (_server, _service, _address, check, cli, routes):
  killed: A01 no capital lower-casing; A02 low.upper() == c dropped (the
  Kelvin sign made a k); B02 fd 3 left inheritable; B03 the last of
  several sockets left inheritable; B05 strangers never noted; B06 the
  Tally not closed at the stop; B07 the closed-directory test inverted;
  B08 `or exc` dropped (": None"); C01/C02 the null sender through
  field(); D01 allow_null=False; D02 utf8=False; D05 the angle brackets
  always added; E01 --socket unchecked; F03 the skipped lines not
  reported; X2 no bad_lines list (the whole include refused).
  Killed only here: B04 every socket not listening taken for a
  connection (a bound socket not yet listening refused); D03
  allow_postmaster=True (`--sender Postmaster` got the `*` route, MAIL
  FROM:<Postmaster> gets 553); D04 the refusal followed by the `*` route
  (two "route for" lines); F01 userInclude without from_home; F02 and F04
  the include's cap of bad lines: `>=`, and the file used although
  "ignored".
frontend (_server, cli, _authlink):
  killed: G01 frontendUser trusted with any backend; H02 isascii()
  dropped (int('²')); H04 a closed fd skipped (a huge LISTEN_FDS looped);
  H06 UDP taken; H08 an unconnected socket taken; H12 the is_closed()
  test dropped (SIGHUP after loop.close() killed); I01 LISTEN_FDS alone
  decides one_session; I03 the 421 written to fd 1; I06 -b with
  LISTEN_FDS allowed; I07 only_root inverted; I11 the closed directory
  never named; I12 --auth-socket unchecked.
  Killed only here: G02/I10 only_root not passed to the session's own
  connection (a squatter of nobody's got alice's password under
  SENDOOWAY_PRIVATE_AUTH=no); G04 `>=` and G05 7 random characters in
  the private directory's length test (a TMPDIR that fits exactly
  skipped, one an octet too long used); H01 LISTEN_FDS=0 taken for
  activation (xinetd's `wait = yes` socket no longer refused); H03 no
  limit of 9 digits (a traceback for 5000); H05 no S_ISSOCK test (a file
  as fd 3: traceback); H07 AF_UNIX not served; H09 a second connection,
  H10 a connection among listeners, taken; I04 _linger on fd 0 for an
  fd-3 client (a pipelining client read a reset after the 421); I05
  stderr taken for the client when only stdin and stderr are /dev/null;
  I08 root_only probed without only_root and I09 the "it gets no logins"
  warning dropped (a squatter reported as a socket mode problem); X1
  the two `whom` texts swapped.
shared/config.py:
  killed: J01 Mapping.expand without from_home; J05 bad_lines ignored
  (the whole include refused again); X3 from_home's join arguments
  swapped.
  Killed only here: J02 from_home joining a relative home (the file not
  found from within that home); J03 `>=` in socket_path_fits (107
  octets, which bind() takes, refused); J04 a skipped line removed
  instead of emptied (every later file:line one less).
shared/paths.py closed_directory:
  Killed only here: K01 the supplementary groups ignored; K02 the chain
  walked from the socket up (the deeper directory named); K03 the
  owner's bits never read; K05 the socket itself taken for a directory;
  K06 root not exempt.
Equivalent: A03 len(low) == 1 dropped: U+0130 is the only character
  whose lower case is longer than one, and it does not capitalize back to
  itself, so the third test refuses it anyway. B01 `continue` for `break`
  after the first descriptor not open: systemd passes consecutive fds,
  and marking a later stray one close-on-exec changes nothing seen. G03
  the private authenticator's connector without only_root: its socket is
  in a new directory of root's (0711) that no other uid can bind in. G06
  TRUST_WORDS missing from "cannot tell who listens": SO_PEERCRED does not
  fail on a connected UNIX stream socket. H11 the frontend's activated
  sockets left inheritable and H14 refuse() not closing what it took: the
  frontend starts its only children with close_fds=True, and exits right
  after a refusal. H13 another process's LISTEN_* left in the
  environment: every reader (sendooway-auth too) ignores them unless
  LISTEN_PID is its own pid. I02 `not _listening(3)` dropped: only with
  Accept=no, on a start-up failure, the message also goes to -l's log
  and the 421 to a listening socket fails quietly; nothing a client or
  admin loses. K04 `continue` for `return None` on a directory that is
  not there: every directory below it is missing too. X4 getuid() for
  geteuid(): after the drop both are frontendUser's; in the start-up probe
  (acting_as: euid only) the real uid is root's, trusted anyway. X5
  _hangup() called in the signal handler itself rather than on the loop:
  Python runs the handler in the main thread between bytecodes and the
  logging lock is re-entrant; no difference a test can see.

One product defect, found through H01 (fixed, pinned by
test_listen_fds_zero_...[00]): socket_activated compared LISTEN_FDS with
the string "0", so LISTEN_FDS=00 with our LISTEN_PID (a zero count to
sd_listen_fds, which reads a number) made the frontend take itself for
socket-activated although activated_sockets found nothing: the refusal of
a listening socket on stdin (xinetd `wait = yes`) was skipped, as with
H01's mutant for "0". Every other survivor killed here was a gap in the
tests, the product right. Seen and left: _activated_connection (cli.py)
compares LISTEN_FDS with "1" as a string too ("01": a start-up failure
on fd 3 is not answered with 421); systemd writes plain decimal."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from sendooway_shared.cli import EXIT_CONFIG
from tests.fakeworld import become
from tests.front_util import FRONT, NOBODY, front_config, login_plain
from tests.test_review_activation import _activated, _finish, welcome_and_listen

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts the programs as root")

AUTH = [sys.executable, "-m", "sendooway_auth.cli"]


def _open_base() -> str:
    """A new directory under /tmp that every user may search (tmp_path is
    root's alone)."""
    base = tempfile.mkdtemp(prefix="sendooway-rv-m20-")
    os.chmod(base, 0o755)
    return base


# ------------------------------------------------------------ a squatter at authSocket


class _Squatter:
    """A process running as nobody that listens at `path`, greets like the
    authenticator and records what its connections send, until `heard`."""

    def __init__(self, path: str) -> None:
        self.r, w = os.pipe()
        ready_r, ready_w = os.pipe()
        stop_r, self.stop_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self.r)
                os.close(ready_r)
                os.close(self.stop_w)
                become(type("U", (), {"uid": NOBODY, "gid": NOBODY})())
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(path)
                os.chmod(path, 0o777)
                s.listen(8)
                os.write(ready_w, b"R")
                got = b""
                while s in select.select([s, stop_r], [], [], 60)[0]:  # until told
                    conn, _ = s.accept()
                    got += welcome_and_listen(conn)
                os.write(w, got)
            finally:
                os._exit(0)
        os.close(w)
        os.close(ready_w)
        os.close(stop_r)
        assert os.read(ready_r, 1) == b"R"
        os.close(ready_r)

    def heard(self) -> bytes:
        os.close(self.stop_w)
        got = b""
        while chunk := os.read(self.r, 65536):
            got += chunk
        os.close(self.r)
        os.waitpid(self.pid, 0)
        return got


def test_a_squatter_gets_no_password_where_no_private_authenticator_is_started(world, tmp_path):
    """Kills G02 (SocketConnector.connect asking trusted_peer without
    only_root) and I10 (main building the SocketConnector without
    only_root): under the shipped units (SENDOOWAY_PRIVATE_AUTH=no) a
    frontend that finds no trusted authenticator at start still connects
    to authSocket for every session, for the daemon to come. A process of
    nobody's (the default frontendUser, shared by other services) at that
    path, refused by the start-up probe, was trusted again by each
    session's own connection: it got alice's user name and password."""
    base = _open_base()
    shared = os.path.join(base, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    path = os.path.join(shared, "auth.sock")
    password = world.users["alice"].password
    try:
        squatter = _Squatter(path)
        try:
            config = front_config(tmp_path, world, f"authSocket = {path}\ntimeout = 5\n", tls=False)
            script = f"EHLO c.test\r\nAUTH PLAIN {login_plain('alice', password)}\r\nQUIT\r\n"
            res = subprocess.run([FRONT, "-c", config, "-l", str(tmp_path / "front.log")],
                                 input=script.encode(), capture_output=True, timeout=30,
                                 env=dict(os.environ, SENDOOWAY_PRIVATE_AUTH="no"))
        finally:
            stolen = squatter.heard()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert password.encode() not in stolen, "nobody's listener heard alice's password"
    assert b"alice" not in stolen
    # the session's link is refused at the greeting, as with no daemon
    assert res.stdout.startswith(b"421 4.3.0 Authentication service not available"), res.stdout
    assert b"\r\n235 " not in res.stdout


def test_a_squatter_at_the_start_is_named_as_one(world, tmp_path):
    """Kills I08 (root_only probed without only_root) and I09 (the
    "it gets no logins" warning dropped): a listener of nobody's at
    authSocket when a root frontend starts was logged as what it is, a
    listener not trusted with passwords, and not as "the authenticator's
    socket ... lets root connect but not frontendUser", the advice for a
    socket mode (chmod/chown changes nothing here: it is not the
    authenticator)."""
    base = _open_base()
    shared = os.path.join(base, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    path = os.path.join(shared, "auth.sock")
    try:
        squatter = _Squatter(path)
        try:
            config = front_config(tmp_path, world, f"authSocket = {path}\ntimeout = 5\n", tls=False)
            res = subprocess.run([FRONT, "-c", config, "-l", str(tmp_path / "front.log")],
                                 input=b"QUIT\r\n", capture_output=True, timeout=30)
        finally:
            squatter.heard()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert b"\r\n221 " in res.stdout, res.stdout
    log = (tmp_path / "front.log").read_text()
    assert (f"authSocket {path}: the process listening there runs as uid {NOBODY}, not root:"
            " not trusted with passwords; it gets no logins (with authBackend = ") in log, log
    assert "only a root authenticator does)" in log
    assert "lets root connect" not in log, log


# ------------------------------------------------------------ socket activation


@pytest.mark.parametrize("count", ["1" * 10, "1" * 5000])
def test_a_listen_fds_of_many_digits_is_no_number_of_sockets(world, tmp_path, count):
    """Kills H03 (the limit of 9 digits dropped): ten digits made a count
    of eleven hundred million descriptors ("fd 3 is not open" named the
    wrong fault), and 5000 digits, more than int() converts, a traceback.
    Both are "not a number of sockets", exit 2."""
    config = front_config(tmp_path, world, tls=False)
    proc = _activated([FRONT, "-c", config, "-l", "&2"], [], count)
    status, _out, err = _finish(proc)
    assert status == EXIT_CONFIG, err
    assert f"sendooway: LISTEN_FDS='{count[:20]}' is not a number of sockets" in err, err
    assert "Traceback" not in err


def test_an_accept_yes_connection_on_fd_3_with_stdin_and_stderr_null_is_served(world, tmp_path):
    """Kills I05 (stderr_is_client without `client_fd == 0`): systemd's
    Accept=yes with the connection as fd 3 alone, stdin and stderr both
    /dev/null (StandardInput=null, StandardError=null) and `-l &2`: stdin
    and stderr are the same file, but neither is the client, so `-l &2`
    is fine. The mutant took stderr for the client and refused `-l &2`
    with a 421 to the client."""
    config = front_config(tmp_path, world, tls=False)
    ours, theirs = socket.socketpair()
    with open(os.devnull, "w") as null:
        proc = _activated([FRONT, "-c", config, "-l", "&2"], [theirs.fileno()], "1",
                          stdin=null, stderr=null)
    theirs.close()
    try:
        ours.settimeout(30)
        greeting = ours.recv(4096)
        ours.sendall(b"QUIT\r\n")
        ours.recv(4096)
    finally:
        ours.close()
        status = proc.wait(30)
    assert greeting.startswith(b"220 "), greeting
    assert status == 0


def test_the_authenticator_serves_a_bound_socket_not_yet_listening(tmp_path, tmp_config):
    """Kills B04 (the getpeername test dropped: every socket not listening
    taken for Accept=yes's connection): a UNIX socket systemd passes
    before listen() (bound by a wrapper, as the comment in
    activated_socket has it) is listened on and served, not refused as a
    connection."""
    path = str(tmp_path / "auth.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    log = tmp_path / "auth.log"
    proc = _activated([*AUTH, "-c", tmp_config(""), "-l", str(log)], [s.fileno()], "1")
    s.close()
    try:
        deadline = time.monotonic() + 20
        while "started: listening on the socket from systemd" not in (
                log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(path)  # (refused while it was not listening)
        c.close()
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0, log.read_text()


# ------------------------------------------------------------ --check


@pytest.fixture
def checked(world, tmp_path):
    """Run `sendooway-auth --check USER [--sender S]` on a config reading
    ~/.sendoowayrc; the users' homes cleared after."""
    config = front_config(tmp_path, world, "userInclude = %h/.sendoowayrc\n", tls=False)

    def run(user: str, *sender: str) -> str:
        args = [*AUTH, "-c", config, "--check", user]
        if sender:
            args += ["--sender", sender[0]]
        res = subprocess.run(args, capture_output=True, text=True, timeout=60, env=world.env())
        assert "Traceback" not in res.stderr, res.stderr
        return res.stdout

    try:
        yield run
    finally:
        for name in ("alice", "bob"):
            world.clear_home(name)


STAR = "smarthostMapping = direct:* 127.0.0.1 2525 noAuth\n"


@pytest.mark.parametrize("sender", ["Postmaster", "<postmaster>", "Name <x@example.org>"])
def test_check_gives_one_line_and_no_route_to_what_mail_from_refuses(world, checked, sender):
    """Kills D03 (parse_path with allow_postmaster=True, as for RCPT TO) and
    D04 (the `return` after the refusal dropped): `MAIL FROM:<Postmaster>`
    gets 553 from the frontend (postmaster alone is a recipient, never a
    sender), so --check must not give it the `*` route; and a refused
    address gets its one "route for" line, not a refusal followed by the
    route of `*` (D04 printed both: which one holds?)."""
    world.write_user_file("alice", ".sendoowayrc", STAR, mode=0o644)
    out = checked("alice", sender)
    lines = [x for x in out.splitlines() if x.startswith("route for ")]
    assert len(lines) == 1, out
    assert "none: the frontend refuses this address at MAIL FROM" in lines[0], out


def test_a_users_include_of_exactly_the_error_cap_of_bad_lines_still_serves(world, checked):
    """Kills F02 (`>=` for `>` in routes._text): a .sendoowayrc with as many
    lines that are not UTF-8 as the include's error cap has each skipped
    at file:line and the rest served; only one more makes it ignored
    whole (the cap is "more than")."""
    from sendooway_auth.routes import MAX_INCLUDE_ERRORS

    bad = b"smarthostMapping = direct:*@b\xfccher.example 127.0.0.1 1 noAuth\n"
    path = world.write_user_file("alice", ".sendoowayrc", bad * MAX_INCLUDE_ERRORS + STAR.encode(),
                                 mode=0o644)
    out = checked("alice", "x@example.org")
    assert "route for x@example.org: 127.0.0.1:2525" in out, out
    assert f"{path}:{MAX_INCLUDE_ERRORS}: not valid UTF-8 (outside a comment), line skipped" in out
    assert "file ignored" not in out
    world.write_user_file("alice", ".sendoowayrc", bad * (MAX_INCLUDE_ERRORS + 1) + STAR.encode(),
                          mode=0o644)
    out = checked("alice", "x@example.org")
    assert (f"{path}: more than {MAX_INCLUDE_ERRORS} lines not valid UTF-8 (outside a comment),"
            " file ignored") in out, out
    assert "line skipped" not in out
    assert "route for x@example.org: none" in out, out


def test_lines_after_a_skipped_one_keep_their_numbers(world, checked):
    """Kills J04 (decode_config_text dropping a bad line instead of leaving
    it empty): every later line of the include moved up by one, so an
    error on line 3 was reported at line 2 (file:line must name the line
    the user has to fix)."""
    path = world.write_user_file("alice", ".sendoowayrc", (
        b"smarthostMapping = direct:*@b\xfccher.example 127.0.0.1 1 noAuth\n"
        + STAR.encode() + b"noSuchKeyword = 1\n"), mode=0o644)
    out = checked("alice")
    assert f"{path}:1: not valid UTF-8" in out, out
    assert f"{path}:2: direct:* 127.0.0.1:2525" in out, out
    assert f"{path}:3: unknown keyword" in out, out


# ------------------------------------------------------------ closed_directory


def _closed(world, path: str, user: str) -> str:
    """closed_directory(path, user) as the programs call it, in a process
    that sees the test world's users and groups (nss_wrapper): the
    directory it names, or "None"."""
    code = ("import sys\nfrom sendooway_shared.paths import closed_directory\n"
            "r = closed_directory(sys.argv[1], sys.argv[2])\nprint(r and r[0])")
    res = subprocess.run([sys.executable, "-c", code, path, user], capture_output=True,
                         text=True, timeout=30, env=world.env())
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.fixture
def base():
    b = _open_base()
    try:
        yield b
    finally:
        shutil.rmtree(b, ignore_errors=True)


def test_closed_directory_reads_owner_group_and_other_bits_as_the_kernel(world, base):
    """Kills K01 (only the primary group counted), K03 (the owner's bits
    never used) and K06 (root not exempt): a directory of alice's mode 0700
    is open to her; one of group mailusers mode 0710 to alice, a member by
    the group file only (her primary group is her own); a 0700 directory
    of carol's to root. Each mutant named an open directory as closed, and
    the daemon and the frontend then warned about a socket frontendUser
    reaches."""
    alice, carol = world.users["alice"], world.users["carol"]
    own = os.path.join(base, "own")
    os.mkdir(own, 0o700)
    os.chown(own, alice.uid, alice.gid)
    assert _closed(world, os.path.join(own, "auth.sock"), "alice") == "None"
    assert _closed(world, os.path.join(own, "auth.sock"), "carol") == own
    grp = os.path.join(base, "grp")
    os.mkdir(grp, 0o710)
    os.chown(grp, 0, 41001)  # mailusers (tests/fakeworld.py GROUPS)
    os.chmod(grp, 0o710)
    assert _closed(world, os.path.join(grp, "auth.sock"), "alice") == "None"
    assert _closed(world, os.path.join(grp, "auth.sock"), "carol") == grp
    os.chown(own, carol.uid, carol.gid)
    assert _closed(world, os.path.join(own, "auth.sock"), "root") == "None"


def test_closed_directory_names_the_first_closed_one_and_not_the_socket(world, base):
    """Kills K02 (the chain walked from the socket up: the deepest closed
    directory named, though the one above it is what keeps frontendUser
    out: chmod on the deeper one changes nothing) and K05 (the socket's own
    path taken for a directory: a socket of mode 0666, which nobody
    searches, was "closed")."""
    outer = os.path.join(base, "outer")
    inner = os.path.join(outer, "inner")
    os.makedirs(inner)
    os.chmod(inner, 0o700)
    os.chmod(outer, 0o700)
    assert _closed(world, os.path.join(inner, "auth.sock"), "carol") == outer
    os.chmod(outer, 0o755)
    assert _closed(world, os.path.join(inner, "auth.sock"), "carol") == inner
    os.chmod(inner, 0o755)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(inner, "auth.sock"))
    os.chmod(os.path.join(inner, "auth.sock"), 0o666)
    try:
        assert _closed(world, os.path.join(inner, "auth.sock"), "carol") == "None"
    finally:
        sock.close()


# ------------------------------------------------------------ the private socket's directory


@pytest.mark.parametrize("extra,under", [(0, True), (1, False)])
def test_a_tmpdir_whose_socket_path_fits_exactly_is_used(base, extra, under):
    """Kills G04 (`>=` for `>`) and G05 (the random part of mkdtemp's name
    counted as 7 characters): a TMPDIR with which the private
    authenticator's socket path is exactly 107 octets (what sun_path holds
    with its NUL) is used and the socket is bound there; one octet more and
    it is skipped for /run or /tmp. G04 skipped the fitting one; G05 took
    the one too long, where bind() then failed."""
    from sendooway_front._authlink import _private_directory

    fixed = len(os.sep + "sendooway-auth-" + "x" * 8 + os.sep + "auth.sock")
    tmp = base + os.sep + "t" * (107 - fixed - len(base) - 1 + extra)
    os.mkdir(tmp, 0o755)
    saved = tempfile.tempdir
    tempfile.tempdir = tmp
    try:
        directory = _private_directory(None)
    finally:
        tempfile.tempdir = saved
    try:
        assert directory.startswith(tmp + os.sep) is under, directory
        if under:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            path = os.path.join(directory, "auth.sock")
            assert len(os.fsencode(path)) == 107
            s.bind(path)
            s.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_relative_user_include_is_named_in_full(world, tmp_path):
    """Kills F01 (routes.plan reading userInclude without from_home): with
    `userInclude = .sendoowayrc` (sendooway.conf(5): a relative path is
    taken from the home) the errors of that file were named
    `.sendoowayrc:1` (whose?) in the log and in --check."""
    config = front_config(tmp_path, world, "userInclude = .sendoowayrc\n", tls=False)
    path = world.write_user_file("bob", ".sendoowayrc", "noSuchKeyword = 1\n" + STAR, mode=0o644)
    try:
        res = subprocess.run([*AUTH, "-c", config, "--check", "bob", "--sender", "b@example.org"],
                             capture_output=True, text=True, timeout=60, env=world.env())
    finally:
        world.clear_home("bob")
    assert f"{path}:1: " in res.stdout, res.stdout
    assert " .sendoowayrc:1" not in res.stdout
    assert "route for b@example.org: 127.0.0.1:2525" in res.stdout, res.stdout


def test_a_file_passed_as_fd_3_is_refused_without_a_traceback(world, tmp_path):
    """Kills H05 (the S_ISSOCK test dropped): a unit passing a file
    (OpenFile=, a FIFO of ListenFIFO=) as fd 3 made socket(fileno=3)
    raise "Not a socket": a traceback, exit 1. It is a start-up error
    naming the descriptor, exit 2."""
    config = front_config(tmp_path, world, tls=False)
    with open(tmp_path / "plain", "w") as f:
        proc = _activated([FRONT, "-c", config, "-l", "&2"], [f.fileno()], "1")
    status, _out, err = _finish(proc)
    assert status == EXIT_CONFIG, err
    assert "sendooway: systemd passed no usable socket: fd 3 is not a socket" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("zero", ["0", "00"])
def test_listen_fds_zero_for_this_process_leaves_the_inetd_checks_in_place(world, tmp_path, zero):
    """Kills H01 (socket_activated without its LISTEN_FDS != "0" test):
    LISTEN_FDS=0 passes nothing (sd_listen_fds(3)), even with LISTEN_PID
    our own, so the frontend is still an inetd service: xinetd's
    `wait = yes` (a listening socket on stdin) is refused at start. The
    mutant took the process for socket-activated, skipped that refusal,
    forked an authenticator and sat on the listening socket.
    DEFECT for "00" (the same for sd_listen_fds: a number, zero): the
    product compared the text with "0" and did just what the mutant did
    (the test stalled 30 s and the frontend was killed); now any spelling
    of zero is no activation."""
    config = front_config(tmp_path, world, tls=False)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    proc = _activated([FRONT, "-c", config, "-l", "&2"], [], zero, stdin=listener.fileno())
    listener.close()
    status, _out, err = _finish(proc)
    assert status == EXIT_CONFIG, (status, err)
    assert "stdin is a listening socket" in err
    assert "sendooway-auth" not in err


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def test_two_connections_or_a_connection_among_listeners_are_refused(world, tmp_path):
    """Kills H09 (a second connection taken in place of the first) and H10
    (a connection beside listening sockets accepted): Accept=yes passes one
    connection, Accept=no only listening sockets; anything else is a unit
    the frontend cannot serve whole (the mutants left one client waiting
    for a greeting that never came). Exit 2 naming the descriptor."""
    config = front_config(tmp_path, world, tls=False)
    a, a_peer = _pair()
    b, b_peer = _pair()
    proc = _activated([FRONT, "-c", config, "-l", "&2"], [a_peer.fileno(), b_peer.fileno()], "2")
    a_peer.close()
    b_peer.close()
    status, _out, err = _finish(proc)
    a.close()
    b.close()
    assert status == EXIT_CONFIG, (status, err)
    assert "systemd passed 2 descriptors: fd 4 is a second connection (Accept=yes passes one)" in err

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    c, c_peer = _pair()
    proc = _activated([FRONT, "-c", config, "-l", "&2"], [listener.fileno(), c_peer.fileno()], "2")
    listener.close()
    c_peer.close()
    status, _out, err = _finish(proc)
    c.close()
    assert status == EXIT_CONFIG, (status, err)
    assert "systemd passed 2 descriptors: fd 4 is a connection among listening sockets" in err


def test_a_unix_listening_socket_from_systemd_is_served(world, tmp_path):
    """Kills H07 (AF_UNIX left out of the families served): ListenStream=
    with a path (a local MTA submitting over a UNIX socket) is a stream
    socket like a TCP one; the mutant refused it at start."""
    config = front_config(tmp_path, world, tls=False)
    path = str(tmp_path / "smtp.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    log = tmp_path / "front.log"
    proc = _activated([FRONT, "-c", config, "-l", str(log)], [listener.fileno()], "1")
    listener.close()
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(30)
        c.connect(path)
        greeting = c.recv(4096)
        c.sendall(b"QUIT\r\n")
        c.recv(4096)
        c.close()
    finally:
        proc.terminate()
        status, err = proc.wait(30), proc.stderr.read()
    assert greeting.startswith(b"220 "), (greeting, err)
    assert status == 0, err


@pytest.mark.parametrize("count", ["1", "01"])
def test_a_start_up_failure_on_fd_3_lets_a_pipelining_client_read_the_421(tmp_path, count):
    """Kills I04 (_linger given fd 0 instead of the client's fd 3): with
    systemd's Accept=yes connection as fd 3 alone, a client that sent its
    EHLO at once (pipelining, or just fast) had it unread when the
    frontend exited after its 421: the kernel then resets the connection,
    and the client reads the reset instead of the 421. LISTEN_FDS=01 is 1
    as sd_listen_fds reads it (compared with the string "1", it got no
    421 at all: left alone by the review, fixed after it)."""
    bad = tmp_path / "bad.conf"
    bad.write_text("localname = mx.test\nnoSuchKeyword = 1\n")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    client = socket.create_connection(listener.getsockname(), timeout=30)
    conn, _ = listener.accept()
    listener.close()
    client.sendall(b"EHLO c.test\r\n" * 64)
    proc = _activated([FRONT, "-c", str(bad), "-l", "&2"], [conn.fileno()], count)
    conn.close()
    heard = b""
    try:
        while chunk := client.recv(4096):
            heard += chunk
    except ConnectionResetError:
        heard += b"<reset>"
    finally:
        client.close()
    status, _out, err = _finish(proc)
    assert status == EXIT_CONFIG, err
    assert heard == b"421 4.3.0 Service not available, closing connection\r\n", heard


def test_a_socket_path_of_exactly_107_octets_is_taken(tmp_path):
    """Kills J03 (`>=` for `>` in socket_path_fits): sun_path holds 108
    octets with its NUL, so a 107-octet authSocket (or --socket,
    --auth-socket) is a socket address that can be bound; only 108 is too
    long. The mutant refused the one that fits as "path too long"."""
    from sendooway_shared.config import load_config

    fits = str(tmp_path / "a")
    fits += "s" * (107 - len(fits))
    conf = tmp_path / "sock.conf"
    conf.write_text(f"authSocket = {fits}\n")
    assert load_config(str(conf)).authSocket == fits
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(fits)  # the kernel takes it
    s.close()
    conf.write_text(f"authSocket = {fits}s\n")
    with pytest.raises(Exception, match="too long for a UNIX socket"):
        load_config(str(conf))


def test_a_relative_home_keeps_relative_paths_relative(world, tmp_path):
    """Kills J02 (from_home joining whatever the home): an account whose
    passwd home is not absolute (a hand-edited line, `home/x`) is entered
    by the reader with chdir, relative to where it is (the daemon: /);
    its relative `.sendoowayrc` is then read in that home. Joined to the
    relative home, the path named home/x/home/x/.sendoowayrc, a file that
    is not there: the user's routes were lost."""
    home = os.path.join(world.root, "home", "relhome")
    os.mkdir(home, 0o755)
    os.chown(home, 40020, world.users["carol"].gid)
    passwd = tmp_path / "passwd"
    passwd.write_text(open(world.passwd).read()
                      + f"relhome:x:40020:{world.users['carol'].gid}::{home.lstrip('/')}:/bin/sh\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(passwd, 0o644)
    with open(os.path.join(home, ".sendoowayrc"), "w") as f:
        f.write(STAR)
    os.chown(os.path.join(home, ".sendoowayrc"), 40020, world.users["carol"].gid)
    config = front_config(tmp_path, world, "userInclude = .sendoowayrc\n", tls=False)
    try:
        res = subprocess.run([*AUTH, "-c", config, "--check", "relhome", "--sender", "r@example.org"],
                             capture_output=True, text=True, timeout=60, cwd="/",
                             env=dict(world.env(), NSS_WRAPPER_PASSWD=str(passwd)))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert "route for r@example.org: 127.0.0.1:2525" in res.stdout, res.stdout + res.stderr
