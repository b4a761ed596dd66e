"""Differential review of `sendooway-auth --check USER --sender ADDR`
against the live path: an admin trusts --check to name the route a real
MAIL FROM of that logged-in user takes, or to say there is none (550).
Random but valid setups (a fixed seed; SENDOOWAY_CHECKDIFF_SEED picks
another) are written into the fake world: global direct: mappings
(exact, `*@domain`, `*`, noAuth, TLS flags) and named fetchmail and getmail
files, a user's .sendoowayrc with its own direct: lines and files,
fetchmail and getmail accounts, case-varied patterns and now and then a
bad line. For each setup and senders derived from it (matching, the
pattern's case changed, a subdomain, another local part, `<>`), three
views must agree: --check as a subprocess (its "route for" line parsed),
a real `sendooway-auth` daemon after a real PAM login (pam_wrapper) asked
by the frontend's protocol, and a model of DESIGN.md's rule (own mappings
before global ones, then exact, `*@domain`, `*`, then order) that names
the account by its server. --check never shows a password, and every
file error the daemon logs is in --check's report with file:line. A
second test adds the frontend: `sendooway -b`, its daemon and real
upstreams (one port each), where a sender --check routes must reach that
upstream and one it does not must get 550 at MAIL.
The random setups found no disagreement on the code as reviewed; a
probe of MAIL FROM spellings found one, a source route, which --check
did not drop as the frontend does (the last test, fixed). Nine bugs
planted in check.py, the reader, the daemon's reply, the choice, the
sslCA rule and address matching each failed the first test (the
live-only ones the second as well)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass

import idna
import pytest

from sendooway_auth.routes import MODE_LABELS
from sendooway_shared.types import TlsMode
from tests.auth_helpers import checked_daemons, login, route

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the readers switch users: needs root")

AUTH = [sys.executable, "-m", "sendooway_auth.cli"]
SEED = int(os.environ.get("SENDOOWAY_CHECKDIFF_SEED", "20261129"))
SETUPS_PER_DAEMON = 4
DOMAINS = ("ex.org", "Corp.Example", "mail.ex.org", "Bücher.example")
LOCALS = ("alice", "Bob.Smith", "info")
MODES = {"": ("plain", 25), "tls": ("starttls", 587), "ssl": ("implicit-tls", 465)}
ROUTE_LINE = re.compile(r"^route for (\S+): (\S+):(\d+) (\S+)( noCertCheck)?(?: ca (\S+))?"
                        r" (no AUTH|user (\S+) password (\S+)) \(from (\S+), address")


@dataclass
class Acct:
    """One account the setup writes: its patterns, tier and expected route."""

    patterns: tuple[str, ...]
    tier: int
    server: str
    port: int
    mode: str
    user: str  # "" = no AUTH
    password: str
    cert_check: bool = True
    global_direct: bool = False  # keeps the global sslCA whatever the user's says


class Gen:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.n = 0
        self.passwords: list[str] = []

    def pattern(self) -> str:
        r = self.rng.random()
        dom = self.rng.choice(DOMAINS)
        dom = self.vary(dom)
        if r < 0.15:
            return "*"
        if r < 0.5:
            return f"*@{dom}"
        return f"{self.vary(self.rng.choice(LOCALS))}@{dom}"

    def vary(self, s: str) -> str:
        # ASCII letters only: the product folds no other case (_address)
        return "".join(c.swapcase() if c.isascii() and self.rng.random() < 0.3 else c
                       for c in s)

    def account(self, tier: int, patterns: tuple[str, ...] | None = None) -> Acct:
        self.n += 1
        mode = self.rng.choice(list(MODES))
        port = self.rng.choice([MODES[mode][1], 2525 + self.n])
        pw = f"pw{self.n}-Sec-{self.rng.randrange(10**6):06d}"
        self.passwords.append(pw)
        noauth = self.rng.random() < 0.2
        return Acct(patterns or (self.pattern(),), tier, f"h{self.n}.route.test", port,
                    mode, "" if noauth else f"up{self.n}", "" if noauth else pw,
                    cert_check=self.rng.random() > 0.2)

    def direct(self, a: Acct) -> str:
        flags = [f for f in (a.mode, "noAuth" if not a.user else "") if f]
        if not a.cert_check:
            flags.append("noCertCheck")
        port = "" if a.port == MODES[a.mode][1] and self.rng.random() < 0.5 else f" {a.port}"
        who = "" if not a.user else f" {a.user} {a.password}"
        return (f"smarthostMapping = direct:{a.patterns[0]} {a.server}{port}{who}"
                f" {','.join(flags)}".rstrip() + "\n")

    def fetchmail(self, accounts: list[Acct]) -> str:
        out = ""
        for a in accounts:
            out += f'poll pop{a.server} proto pop3 user "{a.user or "x"}" password "{a.password or "x"}"\n'
            out += f'#sendooway:server "{a.server}"\n#sendooway:port {a.port}\n'
            if a.mode:
                out += f"#sendooway:{a.mode}\n"
            if not a.user:
                out += "#sendooway:noAuth\n"
            if not a.cert_check:
                out += "#sendooway:noCertCheck\n"
            out += f'#sendooway:address "{a.patterns[0]}"\n'
        return out

    def getmail(self, a: Acct) -> str:
        kind = {"": "SimpleSMTPSender", "tls": "SimpleSMTPTLSSender",
                "ssl": "SimpleSMTPSSLSender"}[a.mode]
        extra = "".join(f"\n    {p}" for p in a.patterns[1:])
        return (f"[retriever]\ntype = SimplePOP3Retriever\nserver = pop.{a.server}\n"
                f"username = fetch\npassword = {a.password or 'x'}\n\n"
                f"[sender]\ntype = {kind}\nserver = {a.server}\nport = {a.port}\n"
                f"username = {a.user}\npassword = {a.password}\n"
                f"no_certificate_check = {'false' if a.cert_check else 'true'}\n"
                f"address = {a.patterns[0]}{extra}\n")


def _norm(address: str) -> tuple[str, str]:
    local, _, dom = address.rpartition("@")
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = local[1:-1]
    dom = dom.lower()
    return local.lower(), dom if dom.isascii() else idna.encode(dom).decode()


def model(accounts: list[Acct], sender: str) -> Acct | None:
    """DESIGN.md's rule, written again: own before global, then exact,
    `*@domain`, `*`, then the first in order."""
    best = None
    for index, a in enumerate(accounts):
        for p in a.patterns:
            if p == "*":
                spec = 2
            elif not sender:
                continue
            elif p.startswith("*@"):
                if _norm(p)[1] != _norm(sender)[1]:
                    continue
                spec = 1
            elif _norm(p) != _norm(sender):
                continue
            else:
                spec = 0
            rank = (a.tier, spec, index)
            if best is None or rank < best[0]:
                best = (rank, a)
    return best[1] if best else None


def senders_for(gen: Gen, accounts: list[Acct]) -> list[str]:
    """Matching, case-changed, subdomain and near-miss senders, and <>."""
    out = {""}
    for a in accounts:
        for p in a.patterns:
            if p == "*":
                continue
            local, dom = p.split("@")
            local = "someone" if local == "*" else local
            out.add(gen.vary(f"{local}@{dom}"))
            if not dom.isascii():  # the A-label a client without SMTPUTF8 sends
                out.add(f"{local}@{idna.encode(dom.lower()).decode()}")
            if local[0] != "*" and gen.rng.random() < 0.3:
                out.add(f'"{local}"@{dom}')  # quoted: the same mailbox
            out.add(f"{local}@sub.{dom}")
            out.add(f"x{local}@{dom}")
    out.add("nobody@elsewhere.test")
    chosen = sorted(out)
    gen.rng.shuffle(chosen)
    return chosen[:6] if "" in chosen[:6] else ["", *chosen[:5]]


def global_setup(gen: Gen, variant: int, home_files: dict, ca_file: str
                 ) -> tuple[str, list[Acct]]:
    """A sendooway.conf and its global accounts (tier 1); the files its
    fetchmail and getmail mappings name go into home_files (rewritten
    for each user setup)."""
    conf = "validUser = alice\n"
    if variant != 2:
        conf += "userInclude = %h/.sendoowayrc\n"
    accounts: list[Acct] = []
    if variant == 0:
        return conf, accounts  # the user's mappings, else the defaults
    if variant == 1 or gen.rng.random() < 0.5:
        conf += f"sslCA = {ca_file}\n"
    for _ in range(gen.rng.randint(1, 3)):
        a = gen.account(1)
        a.global_direct = True
        conf += gen.direct(a)
        accounts.append(a)
    conf += "smarthostMapping = fetchmail:%h/global.fetchmailrc\n"
    conf += "smarthostMapping = getmail:%h/global.getmailrc\n"
    home_files["global"] = True
    return conf, accounts


def user_setup(gen: Gen, global_accounts: list[Acct], has_global_files: bool,
               include: bool) -> tuple[dict[str, str], list[Acct]]:
    """The user's files and the accounts, in order, they give."""
    files: dict[str, str] = {}
    own: list[Acct] = []
    rc = ""
    if include and gen.rng.random() < 0.7:
        for _ in range(gen.rng.randint(0, 3)):
            a = gen.account(0)
            rc += gen.direct(a)
            own.append(a)
        if gen.rng.random() < 0.5:
            fm = [gen.account(0) for _ in range(gen.rng.randint(1, 2))]
            files["own.fetchmailrc"] = gen.fetchmail(fm)
            rc += "smarthostMapping = fetchmail:%h/own.fetchmailrc\n"
            own.extend(fm)
        if gen.rng.random() < 0.4:
            gm = gen.account(0, (gen.pattern(), gen.pattern()))
            files["own.getmailrc"] = gen.getmail(gm)
            rc += "smarthostMapping = getmail:%h/own.getmailrc\n"
            own.append(gm)
        if gen.rng.random() < 0.3:  # a bad line: an error at its file:line, skipped
            rc += "smarthostMapping = direct:*@*.bad.example h0.test 25 noAuth\n"
        if gen.rng.random() < 0.3:  # the user's own CA, read as the user
            rc += "sslCA = own-ca.pem\n"
        files[".sendoowayrc"] = rc
    defaults = not own and not global_accounts and not has_global_files
    accounts = list(own)
    if has_global_files or defaults:
        fm_name, gm_name = ((".fetchmailrc", ".getmail/getmailrc") if defaults
                            else ("global.fetchmailrc", "global.getmailrc"))
        fm = [gen.account(1) for _ in range(gen.rng.randint(0, 2))]
        if fm:
            files[fm_name] = gen.fetchmail(fm)
            if gen.rng.random() < 0.3:  # a bad port: that account skipped, file:line
                files[fm_name] += ('poll pop.bad.test user "b" password "b"\n'
                                   '#sendooway:server "bad.test"\n#sendooway:port 99999\n'
                                   '#sendooway:address "bad@bad.test"\n')
        gm = gen.account(1, (gen.pattern(),)) if gen.rng.random() < 0.6 else None
        if gm is not None:
            files[gm_name] = gen.getmail(gm)
        # the defaults read getmail first, a global config lists fetchmail first
        group = ([gm] if gm else []) + fm if defaults else fm + ([gm] if gm else [])
        accounts.extend(global_accounts if not defaults else [])
        accounts.extend(group)
    return files, accounts


def run_checks(conf: str, senders: list[str]) -> list[str]:
    """--check for each sender, three subprocesses at a time; `<>` and
    every other sender written as pasted from a MAIL FROM, in brackets."""
    outs: list[str] = []
    for i in range(0, len(senders), 3):
        procs = [subprocess.Popen([*AUTH, "-c", conf, "--check", "alice", "--sender",
                                   f"<{s}>" if s == "" or (i + j) % 2 else s],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for j, s in enumerate(senders[i:i + 3])]
        outs.extend(p.communicate(timeout=60)[0] for p in procs)
    return outs


def parse_check(out: str, sender: str) -> tuple | None:
    lines = [line for line in out.splitlines() if line.startswith("route for ")]
    assert len(lines) == 1, out
    if ": none (" in lines[0]:
        return None
    m = ROUTE_LINE.match(lines[0])
    assert m, lines[0]
    shown, server, port, mode, no_check, ca, _, user, password, source = m.groups()
    assert shown == (sender or "<>"), lines[0]
    return server, int(port), mode, not no_check, ca or "", user or "", password, source


@pytest.fixture
def gen():
    return Gen(random.Random(SEED))


@pytest.fixture
def daemon(tmp_path, tmp_config, clean_homes, gen):
    """Daemons whose logs are checked, at the end, for every password the
    setups wrote (and for internal errors)."""
    yield from checked_daemons(tmp_path, tmp_config, gen.passwords)


def test_check_names_the_route_the_daemon_serves(world, clean_homes, daemon, gen):
    compared = nones = n_errors = n_setups = 0
    for variant in (0, 1, 2):
        marks: dict = {}
        conf_text, global_accounts = global_setup(gen, variant, marks, world.ca_file)
        d = daemon(conf_text)
        conf = d.config_path
        ch = d.connect()
        assert login(ch, "alice", world.users["alice"].password).TYPE == "auth_ok"
        for _ in range(SETUPS_PER_DAEMON):
            world.clear_home("alice")
            files, accounts = user_setup(gen, global_accounts, "global" in marks, variant != 2)
            for rel, body in files.items():
                world.write_user_file("alice", rel, body)
            global_ca = world.ca_file if "sslCA" in conf_text else ""
            ca_by_setup = global_ca
            if "sslCA" in files.get(".sendoowayrc", ""):
                with open(world.ca_file) as f:
                    ca_by_setup = world.write_user_file("alice", "own-ca.pem", f.read())
            senders = senders_for(gen, accounts)
            logged = len(d.log())
            checks = run_checks(conf, senders)
            for sender, out in zip(senders, checks):
                setup = f"seed {SEED} setup:\n{conf_text}{files}\nsender {sender!r}\n{out}"
                for pw in gen.passwords + [world.users["alice"].password]:
                    assert pw not in out, setup
                shown = parse_check(out, sender)
                live = route(ch, sender)
                expected = model(accounts, sender)
                if expected is None:
                    assert shown is None and live.TYPE == "no_route", (setup, live)
                    nones += 1
                    continue
                assert live.TYPE == "route_ok", (setup, live)
                want = (expected.server, expected.port, MODES[expected.mode][0],
                        expected.user)
                assert (live.server, live.port, MODE_LABELS[TlsMode(live.tls)],
                        live.user if live.auth else "") == want, (setup, live)
                if expected.user:
                    assert live.password.reveal() == expected.password, setup
                server, port, mode, cert_check, ca, user, password, source = shown
                assert (server, port, mode, user) == want, setup
                # --check names the CA file the frontend checks against: the
                # route's, or else its own sslCA (route.ca_file or config.sslCA)
                assert (cert_check, ca) == (live.cert_check, live.ca_file or global_ca), \
                    (setup, live)
                assert cert_check == expected.cert_check, setup
                # a global direct: route carries no file (the frontend's own
                # sslCA serves it), never the user's
                assert live.ca_file == ("" if expected.global_direct else ca_by_setup), setup
                assert ca == (global_ca if expected.global_direct else ca_by_setup), setup
                assert password == ("********" if expected.password else "(empty)") or not user
                assert source == live.source, (setup, live)
                compared += 1
            # every file error the daemon logged for this setup is in --check's report
            new_log = d.log()[logged:]
            errors = re.findall(r"user file error: user=alice (.*)", new_log)
            n_errors += len(errors)
            n_setups += 1
            for e in errors:
                assert re.search(r":\d+: ", e), e
                assert all(f"  {e}" in out for out in checks), (e, checks[0])
        ch.close()
    assert compared >= 20 and nones >= 5 and n_setups == 3 * SETUPS_PER_DAEMON, (compared, nones)


def test_check_names_the_upstream_a_real_frontend_uses(world, clean_homes, gen):
    """The third view: `sendooway -b` and its daemon, real upstreams (plain,
    no AUTH, one port each): a sender --check gives a route reaches that
    upstream, a sender it gives none gets 550 at MAIL."""
    from tests.front_util import front_config, front_with_daemon, open_tmp
    from tests.upstream import FakeUpstream

    ups = [FakeUpstream(world, tls="plain", require_tls=False).start() for _ in range(3)]
    by_where = {f"127.0.0.1:{u.port}": u for u in ups}
    patterns = lambda: tuple(gen.pattern() for _ in range(2))  # noqa: E731
    glob = [(patterns()[0], gen.rng.choice(ups)) for _ in range(2)]
    extra = "validUser = alice\nuserInclude = %h/.sendoowayrc\n" + "".join(
        f"smarthostMapping = direct:{p} 127.0.0.1 {u.port} noAuth\n" for p, u in glob)
    compared = 0
    with open_tmp() as tmp:
        conf = front_config(tmp, world, extra)
        with front_with_daemon(tmp, world, conf, *ups) as front:
            for _ in range(3):
                world.clear_home("alice")
                own = [(gen.pattern(), gen.rng.choice(ups)) for _ in range(gen.rng.randint(0, 2))]
                rc = "".join(f"smarthostMapping = direct:{p} 127.0.0.1 {u.port} noAuth\n"
                             for p, u in own[:1])
                if own[1:]:
                    (p, u), = own[1:]
                    world.write_user_file("alice", "fm.rc", (
                        f'poll pop.test user "a" password "b"\n#sendooway:server "127.0.0.1"\n'
                        f'#sendooway:port {u.port}\n#sendooway:noAuth\n#sendooway:address "{p}"\n'))
                    rc += "smarthostMapping = fetchmail:%h/fm.rc\n"
                world.write_user_file("alice", ".sendoowayrc", rc)
                accounts = [Acct((p,), t, "", 0, "", "", "") for t, pairs in ((0, own), (1, glob))
                            for p, _u in pairs]
                # (the frontend offers no SMTPUTF8: a client sends the A-label)
                senders = [s for s in senders_for(gen, accounts) if s.isascii()][:4]
                checks = run_checks(conf, senders)
                with front.smtp() as client:
                    client.starttls(context=world.ssl_context())
                    client.login("alice", world.users["alice"].password)
                    for sender, out in zip(senders, checks):
                        shown = parse_check(out, sender)
                        before = [len(u.messages) for u in ups]
                        code, reply = client.mail(sender)
                        if shown is None:
                            assert code == 550, (sender, out, reply)
                            client.rset()
                            continue
                        assert code == 250, (sender, out, reply)
                        assert client.rcpt("bob@example.net")[0] == 250
                        assert client.data(b"Subject: checkdiff\r\n\r\nhi\r\n")[0] == 250
                        got = [u for u, n in zip(ups, before) if len(u.messages) > n]
                        assert got == [by_where[f"{shown[0]}:{shown[1]}"]], (sender, out)
                        # (a needlessly quoted local part goes on unquoted; aiosmtpd
                        # records the null sender as "<>")
                        received = got[0].messages[-1].mail_from
                        assert _norm("" if received == "<>" else received) == _norm(sender)
                        compared += 1
    assert compared >= 3


def test_check_drops_a_source_route_as_the_frontend_does(world, clean_homes):
    """A MAIL FROM pasted with its source route (`<@relay.test:alice@ex.org>`,
    RFC 5321 4.1.2, which the frontend accepts and drops): --check matched
    `@relay.test:alice` as the local part, so it named the `*@ex.org`
    route (or none: "550") while the mail went by alice@ex.org's."""
    from tests.front_util import front_config, front_with_daemon, open_tmp
    from tests.upstream import FakeUpstream

    exact, domain = (FakeUpstream(world, tls="plain", require_tls=False).start()
                     for _ in range(2))
    extra = (f"validUser = alice\n"
             f"smarthostMapping = direct:alice@ex.org 127.0.0.1 {exact.port} noAuth\n"
             f"smarthostMapping = direct:*@ex.org 127.0.0.1 {domain.port} noAuth\n")
    senders = ["@relay.test:alice@ex.org", "@a.test,@b.test:Alice@ex.org"]
    with open_tmp() as tmp:
        conf = front_config(tmp, world, extra)
        with front_with_daemon(tmp, world, conf, exact, domain) as front:
            checks = run_checks(conf, senders)
            with front.smtp() as client:
                client.starttls(context=world.ssl_context())
                client.login("alice", world.users["alice"].password)
                for sender in senders:
                    assert client.mail(sender)[0] == 250
                    assert client.rcpt("bob@example.net")[0] == 250
                    assert client.data(b"Subject: checkdiff\r\n\r\nhi\r\n")[0] == 250
    assert len(exact.messages) == 2 and not domain.messages
    for out in checks:
        line = next(line for line in out.splitlines() if line.startswith("route for "))
        assert f"127.0.0.1:{exact.port} plain no AUTH" in line, line
