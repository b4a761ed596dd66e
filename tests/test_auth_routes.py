"""Users' files read through the user-switching child, with real fake users."""

import os
import time

import pytest

from sendooway_auth import _users
from sendooway_auth._reader import MAX_FILE, ReadRequest, read_direct
from sendooway_auth.routes import lookup_sync
from sendooway_shared.config import parse_config
from sendooway_shared.types import TlsMode

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

FETCHMAILRC = """\
poll pop.example.org proto pop3 user "alice" password "fm-Secret-A1"
#sendooway:server "smtp.example.org"
#sendooway:tls
#sendooway:address "alice@example.org"
"""


def lookup(world, user, conf=""):
    cfg = parse_config(conf, "test.conf")
    return lookup_sync(cfg, _users.lookup(user), read_direct)


def test_owner_only_file_is_read_as_the_user(clean_homes):
    world = clean_homes
    path = world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC, mode=0o400)
    found = lookup(world, "alice")
    assert found.errors == [] and found.warnings == []
    (account,) = found.accounts
    assert account.route.server == "smtp.example.org" and account.route.tls is TlsMode.STARTTLS
    assert account.source == f"{path}:4"
    roles = {read.path: (role, read.status) for role, read in found.files}
    assert roles[path] == ("fetchmail", "ok")
    assert roles[os.path.join(world.users["alice"].home, ".getmail/getmailrc")][1] == "missing"


def test_reader_child_has_the_users_ids(clean_homes):
    world = clean_homes
    # a file only bob can read: root could, alice's child must not
    bob_file = world.write_user_file("bob", "secret.txt", "bob only\n", mode=0o600)
    alice = _users.lookup("alice")
    (read,) = read_direct(ReadRequest(alice.uid, alice.gid, alice.groups, (bob_file,)))
    assert read.status == "unreadable"  # bob's home is 0700 as well
    bob = _users.lookup("bob")
    (read,) = read_direct(ReadRequest(bob.uid, bob.gid, bob.groups, (bob_file,)))
    assert read.ok and read.data == b"bob only\n" and read.owner == bob.uid


def test_symlink_to_shadow_and_to_another_users_file_fail(clean_homes):
    world = clean_homes
    home = world.users["alice"].home
    bob_file = world.write_user_file("bob", ".fetchmailrc", FETCHMAILRC, mode=0o600)
    os.symlink("/etc/shadow", os.path.join(home, ".fetchmailrc"))
    os.makedirs(os.path.join(home, ".getmail"))
    os.chown(os.path.join(home, ".getmail"), world.users["alice"].uid, world.users["alice"].gid)
    os.symlink(bob_file, os.path.join(home, ".getmail", "getmailrc"))
    found = lookup(world, "alice")
    assert found.accounts == []
    text = "\n".join(found.errors)
    assert f"{home}/.fetchmailrc: unreadable (Permission denied)" in text
    assert f"{home}/.getmail/getmailrc: unreadable (Permission denied)" in text


def test_fifo_huge_and_binary_files_are_reported_quickly(clean_homes):
    world = clean_homes
    home = world.users["alice"].home
    u = world.users["alice"]
    fifo = os.path.join(home, ".fetchmailrc")
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, u.uid, u.gid)
    big = world.write_user_file("alice", "big.rc", b"#" * (MAX_FILE + 10))
    junk = world.write_user_file("alice", "junk.rc", bytes(range(256)) * 10)
    latin = world.write_user_file("alice", "latin.rc", b"user x\npass \xe9t\xe9\n")
    conf = (f"smarthostMapping = fetchmail:%h/.fetchmailrc\n"
            f"smarthostMapping = fetchmail:%h/big.rc\n"
            f"smarthostMapping = getmail:%h/junk.rc\n"
            f"smarthostMapping = fetchmail:%h/latin.rc\n")
    t = time.monotonic()
    found = lookup(world, "alice", conf)
    assert time.monotonic() - t < 3
    text = "\n".join(found.errors)
    assert f"{fifo}: not-regular (a FIFO)" in text
    assert f"{big}: too-large" in text
    assert f"{junk}:1: contains NUL bytes" in text
    assert f"{latin}:2: not valid UTF-8" in text
    assert found.accounts == []


def test_unsafe_mode_is_used_but_warned(clean_homes):
    world = clean_homes
    path = world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC, mode=0o644)
    found = lookup(world, "alice")
    assert len(found.accounts) == 1
    assert any(w.startswith(f"{path}: unsafe mode 0644") for w in found.warnings)
    assert "fm-Secret-A1" not in "\n".join(found.warnings)


def test_user_include_mappings_first_and_sslca_override(clean_homes):
    world = clean_homes
    inc = world.write_user_file("alice", ".sendoowayrc", (
        "sslCA = /home/alice/my-ca.pem\n"
        "smarthostMapping = direct:*@example.org own.example.org 587 me inc-Secret-9 tls\n"
        "localname = nope\n"                       # not allowed: skipped, reported
        "smarthostMapping = getmail:%h/gm.rc\n"
    ))
    world.write_user_file("alice", "gm.rc", (
        "[sender]\ntype = SimpleSMTPSSLSender\nserver = gm.example.net\nusername = g\n"
        "password = gm-Secret-3\naddress = *@example.net\n"
    ))
    conf = ("userInclude = %h/.sendoowayrc\nsslCA = /etc/ssl/global.pem\n"
            "smarthostMapping = direct:* global.example.com 25 u g-Secret-5\n"
            "smarthostMapping = direct:*@example.org global-org.example.com 25 u g-Secret-6\n")
    found = lookup(world, "alice", conf)
    assert found.errors == [f"{inc}:3: 'localname' is not allowed in a user include"
                            " (only sslCA, smarthostMapping)"]
    assert [a.route.server for a in found.accounts] == [
        "own.example.org", "gm.example.net", "global.example.com", "global-org.example.com"]
    assert all(a.route.ca_file == "/home/alice/my-ca.pem" for a in found.accounts)
    assert found.route_for("x@example.org").route.server == "own.example.org"  # user's first
    assert found.route_for("x@example.net").route.server == "gm.example.net"
    assert found.route_for("x@elsewhere.com").route.server == "global.example.com"
    assert [a.tier for a in found.accounts] == [0, 0, 1, 1]
    assert found.route_for("x@example.org").source == f"{inc}:2"


def test_global_sslca_and_defaults_when_no_mapping(clean_homes):
    world = clean_homes
    world.write_user_file("bob", ".getmail/getmailrc", (
        "[retriever]\nserver = pop.b.org\nusername = bob\npassword = b-Secret\n"
        "[sender]\ntype = SimpleSMTPTLSSender\naddress = bob@b.org\n"
    ))
    found = lookup(world, "bob", "sslCA = /etc/ssl/global.pem\n")
    (a,) = found.accounts
    assert a.route.server == "pop.b.org" and a.route.ca_file == "/etc/ssl/global.pem"
    assert [m.filename for m in found.mappings] == ["(default)", "(default)"]


def test_valid_user_by_name_and_group():
    cfg = parse_config("validUser = %mailusers\nvalidUser = Dave\n", "t.conf")
    assert _users.valid_user(cfg, _users.lookup("alice"))[0]      # supplementary group
    assert _users.valid_user(cfg, _users.lookup("dave"))[0]       # by name
    assert not _users.valid_user(cfg, _users.lookup("carol"))[0]  # neither
    cfg = parse_config("validUser = %alice\n", "t.conf")           # primary group
    assert _users.valid_user(cfg, _users.lookup("alice"))[0]
    assert not _users.valid_user(cfg, _users.lookup("bob"))[0]
    assert _users.valid_user(parse_config("", "t"), _users.lookup("carol"))[0]


def test_a_stuck_reader_times_out_as_failed(clean_homes):
    import asyncio
    import signal
    from sendooway_auth._reader import ForkServer

    world = clean_homes
    path = world.write_user_file("alice", ".fetchmailrc", FETCHMAILRC)
    alice = _users.lookup("alice")
    req = ReadRequest(alice.uid, alice.gid, alice.groups, (path,))
    fs = ForkServer().start()
    try:
        (read,) = asyncio.run(fs.read(req))
        assert read.ok and b"smtp.example.org" in read.data
        os.kill(fs.pid, signal.SIGSTOP)  # as if the read hung (a dead NFS server)
        t = time.monotonic()
        (read,) = asyncio.run(fs.read(req, timeout=0.5))
        assert 0.4 < time.monotonic() - t < 2
        assert read.status == "failed" and "timed out" in read.detail
        os.kill(fs.pid, signal.SIGCONT)
    finally:
        fs.stop()


def test_relative_paths_are_from_home_and_file_count_is_bounded(clean_homes):
    world = clean_homes
    world.write_user_file("alice", "mail/fm.rc", FETCHMAILRC)
    many = "".join(f"smarthostMapping = getmail:%h/g{i}.rc\n" for i in range(40))
    world.write_user_file("alice", ".sendoowayrc",
                          "smarthostMapping = fetchmail:mail/fm.rc\n" + many
                          + "smarthostMapping = fetchmail:bad\x01path\n")
    found = lookup(world, "alice", "userInclude = %h/.sendoowayrc\n")
    assert found.route_for("alice@example.org").route.server == "smtp.example.org"
    assert sum("skipped: more than 32 files" in e for e in found.errors) == 42 - 32
    assert not found.incomplete
