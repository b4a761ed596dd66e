"""An outside review of the frontend's start-up: an authenticator socket
root may reach but frontendUser may not, the global sslCA read only after
the privilege drop, xinetd `wait = yes`, a localname that is no host name,
and what sendooway.conf(5) and deployment.md said about them."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

import pytest

from sendooway_shared.config import KEYWORD_NAMES, ConfigError, parse_config

from .auth_helpers import Daemon
from .deploy_util import REPO, man_section
from .front_util import FRONT, Frontend, front_config, login_plain, open_tmp, stdio_session

UNROUTED = "alice@unrouted.example"


@pytest.fixture
def tmp_path():
    """A temp dir the frontend user can traverse (pytest's own are 0700)."""
    with open_tmp() as d:
        yield d


def _login_script(world, sender: str = UNROUTED, extra: str = "") -> bytes:
    auth = login_plain("alice", world.users["alice"].password)
    return (f"EHLO client.test\r\nAUTH PLAIN {auth}\r\nMAIL FROM:<{sender}>\r\n{extra}"
            "QUIT\r\n").encode()


# ------------------------------------------------------------ 1. the daemon's socket


def test_a_socket_only_root_can_reach_gets_a_private_authenticator_and_an_error(world, tmp_path):
    """The daemon's socket made root 0644 (systemd-socket-activate, or one
    owned by another frontendUser): the frontend, still root at start, could
    connect and so started no authenticator of its own; every session then
    connected as nobody, got EACCES and greeted the client with 421. Now the
    probe asks as frontendUser, says what is wrong, and mail keeps flowing
    through a private authenticator."""
    config = front_config(tmp_path, world)
    daemon = Daemon(tmp_path, config).start()
    try:
        # as the daemon made it (owned by frontendUser, 0600): it serves the session
        out, err, rc = stdio_session([FRONT, "-c", config, "-l", "&2"], _login_script(world))
        assert b"235 2.7.0" in out and b"550 5.7.1" in out, (out, err)
        assert b"started socketpair" not in err and b"lets root connect" not in err, err

        os.chown(daemon.socket_path, 0, 0)
        os.chmod(daemon.socket_path, 0o644)
        out, err, rc = stdio_session([FRONT, "-c", config, "-l", "&2"], _login_script(world))
        assert rc == 0, err
        assert out.startswith(b"220 "), (out, err)
        assert b"235 2.7.0" in out and b"550 5.7.1" in out, (out, err)
        text = err.decode()
        assert "started socketpair to sendooway-auth" in text, text
        error = next(line for line in text.splitlines() if daemon.socket_path in line
                     and "lets root connect but not frontendUser" in line)
        assert "root:root" in error and "0644" in error and "nobody" in error, error
        assert world.users["alice"].password not in text

        # -b: the same check, and a private daemon serves every session
        fe = Frontend(config, str(tmp_path / "front.log")).start()
        try:
            with fe.smtp() as s:
                s.starttls(context=world.ssl_context())
                s.ehlo()
                s.login("alice", world.users["alice"].password)
                assert s.mail(UNROUTED)[0] == 550
            log = fe.log()
            assert daemon.socket_path in log and "0644" in log and "nobody" in log, log
        finally:
            fe.stop()
    finally:
        daemon.stop()


def test_without_a_private_authenticator_the_error_is_logged_at_start(world, tmp_path):
    """SENDOOWAY_PRIVATE_AUTH=no (the shipped systemd unit): no authenticator
    may be started, so sessions get 421, but the start says why."""
    config = front_config(tmp_path, world)
    daemon = Daemon(tmp_path, config).start()
    try:
        os.chown(daemon.socket_path, 0, 0)
        os.chmod(daemon.socket_path, 0o600)
        env = dict(os.environ, SENDOOWAY_PRIVATE_AUTH="no")
        out, err, rc = stdio_session([FRONT, "-c", config, "-l", "&2"], _login_script(world),
                                     env=env)
        assert out.startswith(b"421 "), (out, err)
        text = err.decode()
        assert any("lets root connect" in line and daemon.socket_path in line and "0600" in line
                   and "nobody" in line for line in text.splitlines()), text
    finally:
        daemon.stop()


# ------------------------------------------------------------ 2. the global sslCA


def _front_with(tmp_path, world, extra: str) -> subprocess.CompletedProcess:
    config = front_config(tmp_path, world, extra)
    return subprocess.run([FRONT, "-c", config, "-l", "&2", "--auth-socket",
                           str(tmp_path / "none.sock")], input=b"QUIT\r\n",
                          capture_output=True, timeout=60)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read CA certificates: No such file or directory"),
    (b"", "no certificate"),
    (b"not a certificate\n", "cannot load CA certificates"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
     "cannot load CA certificates"),
])
def test_a_bad_global_sslca_is_a_startup_error(world, tmp_path, content, message):
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_bytes(content)
    r = _front_with(tmp_path, world, f"sslCA = {ca}\n")
    err = r.stderr.decode()
    assert r.returncode == 2, (r.stdout, err)
    assert r.stdout == b""  # not even a greeting
    assert message in err and str(ca) in err, err
    assert re.search(r"sendooway\.conf:\d+: sslCA ", err), err  # file:line, as a bad sslCert
    assert "Traceback" not in err


def test_a_root_only_global_sslca_serves_tls_routes_after_the_drop(world, tmp_path,
                                                                   upstream_factory):
    """Read before the drop, as sslCert and sslKey are: a 0600 root file
    works (it gave every TLS route 454 at MAIL)."""
    up = upstream_factory(tls="starttls", accounts={"u": "p"})
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    ca = private / "ca.pem"
    shutil.copy(world.ca_file, ca)
    os.chmod(ca, 0o600)
    config = front_config(tmp_path, world, f"sslCA = {ca}\naddReceivedField = no\n"
                          f"smarthostMapping = direct:*@example.org 127.0.0.1 {up.port} u p tls\n")
    body = "Subject: ca\r\n\r\nthrough a root-only CA file\r\n.\r\n"
    script = _login_script(world, "alice@example.org",
                           f"RCPT TO:<bob@example.net>\r\nDATA\r\n{body}")
    out, err, rc = stdio_session([FRONT, "-c", config, "-l", "&2", "--auth-socket",
                                  str(tmp_path / "none.sock")], script)
    assert rc == 0, err
    codes = [int(line[:3]) for line in out.split(b"\r\n") if line[3:4] == b" "]
    assert 454 not in codes and b"cannot read CA" not in err, (out, err)
    assert codes == [220, 250, 235, 250, 250, 354, 250, 221], (out, err)
    assert len(up.messages) == 1 and b"through a root-only CA file" in up.messages[0].data


def test_the_preloaded_sslca_serves_both_verify_modes_without_the_file(world, tmp_path,
                                                                       monkeypatch):
    """The bytes read at start are all the sessions need: noCertCheck routes
    of the global CA too, once the file is gone (or unreadable)."""
    import asyncio

    from sendooway_front import _tls

    def for_file(path, verify):
        return asyncio.run(_tls.client_context_for(path, verify))

    monkeypatch.setattr(_tls, "_preloaded", {})
    monkeypatch.setattr(_tls, "_preloaded_data", {})
    monkeypatch.setattr(_tls, "_pinned_file", "")
    ca = tmp_path / "ca.pem"
    shutil.copy(world.ca_file, ca)
    _tls.preload_ca_file(str(ca))
    os.unlink(ca)
    strict = for_file(str(ca), True)
    lax = for_file(str(ca), False)
    assert _tls.context_verifies(strict) and not _tls.context_verifies(lax)
    assert for_file(str(ca), False) is lax
    with pytest.raises(_tls.TLSConfigError):  # another path is read as before
        for_file(str(tmp_path / "other.pem"), True)


# ------------------------------------------------------------ 3. xinetd wait = yes


def _listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(5)
    return s


def test_a_listening_socket_on_stdin_is_a_clear_startup_error(world, tmp_path):
    """xinetd `wait = yes` hands over the listening socket: it was taken for
    a session (after forking a root authenticator), failed with "Transport
    endpoint is not connected", and xinetd started it again at once."""
    config = front_config(tmp_path, world)
    with _listener() as lsock:
        r = subprocess.run([FRONT, "-c", config, "-l", "&2", "--auth-socket",
                            str(tmp_path / "none.sock")], stdin=lsock.fileno(),
                           capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "stdin is a listening socket" in err and "wait = no" in err, err
    assert "socketpair" not in err and "Traceback" not in err, err


def test_a_listening_socket_as_xinetd_gives_it_is_logged(world, tmp_path):
    """As xinetd does it: the socket is fd 0, 1 and 2; the reason goes to the log."""
    config = front_config(tmp_path, world)
    log = tmp_path / "front.log"
    with _listener() as lsock:
        fd = lsock.fileno()
        r = subprocess.run([FRONT, "-c", config, "-l", str(log), "--auth-socket",
                            str(tmp_path / "none.sock")], stdin=fd, stdout=fd, stderr=fd,
                           timeout=60)
    text = log.read_text()
    assert r.returncode == 2, text
    assert "stdin is a listening socket" in text and "wait = no" in text, text
    assert "started" not in text and "Traceback" not in text, text


# ------------------------------------------------------------ 4. localname


@pytest.mark.parametrize("value", [
    "", "mx.example.org", "localhost", "mail-1.example", "MX.Example.ORG", "smtp_1.lan.example",
    "[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:::1]",
])
def test_localname_takes_a_host_name_or_an_address_literal(value):
    assert parse_config(f"localname = {value}\n", "s.conf").localname == value


@pytest.mark.parametrize("value, hint", [
    ("bad name with spaces", "host name"),
    ("mx..example", "host name"),
    ("-mx.example", "host name"),
    ("mx.example:25", "host name"),
    ("x" * 64 + ".example", "host name"),
    ("[not an address]", "address literal"),
    ("[2001:db8::1]", "[IPv6:2001:db8::1]"),
    ("bücher.example", "xn--"),
])
def test_a_localname_that_is_no_host_name_is_an_error_naming_the_line(value, hint):
    """(A bare address and a trailing dot are not errors: see below.)"""
    with pytest.raises(ConfigError) as info:
        parse_config(f"timeout = 30\nlocalname = {value}\n", "s.conf")
    text = str(info.value)
    assert text.startswith("s.conf:2: localname: "), text
    assert hint in text, text


@pytest.mark.parametrize("value, taken", [
    ("192.0.2.1", "[192.0.2.1]"),
    ("2001:db8::1", "[IPv6:2001:db8::1]"),
    ("mx.example.", "mx.example"),
])
def test_an_originals_bare_address_or_trailing_dot_is_taken_in_its_proper_form(value, taken):
    """An original's sendooway.conf took any localname; a bare address and a
    fully qualified name with its root dot are common and meant well: they
    keep working, as the address literal and the name an EHLO wants (a
    review of the validation: they had become start-up errors)."""
    assert parse_config(f"localname = {value}\n", "s.conf").localname == taken


def test_the_frontend_refuses_to_start_with_a_bad_localname(world, tmp_path):
    r = _front_with(tmp_path, world, "localname = bad name with spaces\n")
    assert r.returncode == 2 and r.stdout == b""
    assert re.search(r"sendooway\.conf:\d+: localname: ", r.stderr.decode()), r.stderr


# ------------------------------------------------------------ 5. documentation


def test_the_man_page_says_which_keywords_need_a_value():
    """`authSocket =`, `frontendUser =`, `pamService =` are errors; the page
    said every string keyword may be left empty."""
    required = []
    for name in KEYWORD_NAMES:
        try:
            parse_config(f"{name} =\n", "s.conf")
        except ConfigError:
            required.append(name)
    description = re.sub(r"\s+", " ", man_section("sendooway.conf.5", "DESCRIPTION"))
    m = re.search(r"String keywords may be left empty(.*?)\. ", description)
    assert m, description
    for name in ("authSocket", "frontendUser", "pamService"):
        assert name in required
        assert name in m.group(1), m.group(0)


def test_the_man_page_says_relative_mapping_paths_count_from_the_home():
    mappings = re.sub(r"\s+", " ", man_section("sendooway.conf.5", "MAPPINGS"))
    assert "relative" in mappings and "home" in mappings.split("relative", 1)[1][:200], mappings
    assert ".fetchmailrc" in mappings


def test_the_man_page_says_the_global_sslca_is_read_at_start():
    keywords = re.sub(r"\s+", " ", man_section("sendooway.conf.5", "KEYWORDS"))
    sslca = keywords.split('.BR sslCA " = ', 1)[1].split(".TP", 1)[0]
    assert "before the privilege drop" in sslca, sslca


def test_deployment_lists_every_new_keyword():
    text = (REPO / "docs" / "deployment.md").read_text()
    section = text.split("## 5.", 1)[1].split("\n## ", 1)[0]
    same, new = section.split("\nNew:", 1)
    original = set(re.findall(r"`(\w+)`", same.split("What is different", 1)[0]))
    for name in KEYWORD_NAMES:
        if name not in original:
            assert f"`{name}`" in new, f"{name} is not listed as new in deployment.md section 5"
