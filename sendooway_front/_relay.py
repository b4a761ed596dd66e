"""The live relay: one client session's transactions, sent on to the upstream.

`Relay` is the RelayBackend the session driver calls. Every reply it returns
after MAIL is the upstream's (a 421 becomes 451: the client's session with us
goes on), except local 4xx replies when the upstream cannot be used. It never
answers 250 unless the upstream did.

Connections: a new MAIL for the same route reuses the logged-in upstream
(after RSET); another route releases it (to the cache, or QUIT) and opens
the right one. At the end of the client session the connection goes to the
smarthostCache pool, when enabled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import ipaddress
import logging
import re
import time
from contextlib import nullcontext

from sendooway_shared.config import Config, default_localname
from sendooway_shared.log import field, printable
from sendooway_shared.smtp_syntax import is_ehlo_name
from sendooway_shared.types import Route

from . import _pool
from ._pool import PROBE_TIMEOUT, PoolKey, UpstreamPool
from ._relay_api import MailParams, SessionInfo
from ._reply import Reply
from ._tls import TLSError, ca_identity, pin_ca_file
from ._upstream import (
    BAD_UPSTREAM, DROPPED, LOGIN_REFUSED_LATELY, TIMED_OUT, ReplyError, UpstreamClient, UpstreamError,
    open_upstream,
)

NO_TRANSACTION = Reply(503, ("5.5.1 No mail transaction in progress",))
MAIL_OK, RCPT_OK = "1.0", "1.5"  # RFC 3463 details for an upstream 2xx without its own


def _transport_failure(exc: BaseException) -> Reply:
    if isinstance(exc, TimeoutError):
        return TIMED_OUT
    if isinstance(exc, ReplyError):
        return BAD_UPSTREAM
    return DROPPED


def _busy(e: UpstreamError) -> bool:
    """The upstream refused the connection at its greeting, for now (4xx)."""
    return e.greeting is not None and 400 <= e.greeting.code < 500


class Relay:
    """A RelayBackend for one client session."""

    def __init__(self, config: Config, log: logging.Logger, pool: UpstreamPool | None = None) -> None:
        self.config = config
        self.log = log
        self.pool = pool
        self.localname = default_localname(config)
        pin_ca_file(config.sslCA)
        self._client: UpstreamClient | None = None
        self._key: PoolKey | None = None
        self._info: SessionInfo | None = None
        self._route: Route | None = None
        self._in_tx = False          # upstream has an open transaction (MAIL accepted)
        # the upstream refused a MAIL since its last RSET: it may keep some of
        # it (Postfix keeps a refused SIZE=), so an RSET goes before the next
        self._mail_refused = False
        self._broken: Reply | None = None  # the transaction's upstream is gone: this reply until reset
        self._sender = ""
        self._rcpts = 0
        self._bytes = 0
        self._transactions = 0       # MAILs of this session: SID.N names the message
        self._in_data = False
        self._held = b""             # message bytes not yet sent upstream (one chunk at most)
        self._held_header = False    # _held is only the Received: header so far
        self._data_reply: Reply | None = None  # DATA's reply, read with a pipelined group
        self.messages = 0            # messages the upstream accepted (tests, benchmarks)

    # ------------------------------------------------------------ helpers

    def _ehlo_name(self, info: SessionInfo) -> str:
        if self.config.cloneEhlo and is_ehlo_name(info.client_ehlo or ""):
            return info.client_ehlo
        return self.localname

    def _sid(self) -> str:
        return self._info.session_id if self._info else "-"

    def _message_id(self) -> str:
        """The session id and the transaction's number in the session: the
        Received: header's `id` and the message log line's `id=`."""
        return f"{self._sid()}-{self._transactions}"  # an RFC 5322 atom: no "."

    def _drop(self) -> None:
        """Forget the upstream connection at once (no QUIT, no final dot)."""
        if self._client is not None:
            self._client.abort()
        self._client = None
        self._key = None
        self._in_tx = self._mail_refused = False
        self._in_data = False
        self._data_reply = None

    def _needs_rset(self) -> bool:
        """A transaction is open upstream, or a refused MAIL may linger there."""
        return self._in_tx or self._mail_refused

    def _spoke_unasked(self) -> bool:
        return self._client is not None and self._client.spoke_unasked()

    def _idle_too_long(self) -> bool:
        client = self._client
        return client is not None and time.monotonic() - client.reader.last_reply > _pool.KEPT_IDLE

    def _waiting_for_message(self) -> bool:
        """The upstream said 354 and waits for a message (no RSET possible)."""
        return self._in_data or (self._data_reply is not None and self._data_reply.code == 354)

    async def _release(self) -> None:
        """Out of any transaction: keep the connection in the pool or QUIT it."""
        if self._waiting_for_message():
            self._drop()
            return
        self._data_reply = None
        client, key = self._client, self._key
        self._client = None
        self._key = None
        if client is None:
            return
        if self._needs_rset():
            try:
                reply = await client.command("RSET")
            except (OSError, TimeoutError, ReplyError, TLSError):
                client.abort()
                self._in_tx = self._mail_refused = False
                return
            self._in_tx = self._mail_refused = False
            if reply.code != 250:
                await client.quit()
                return
        if self.pool is not None and key is not None:
            await self.pool.release(key, client)
        else:
            await client.quit()

    def _log_message(self, outcome: str) -> None:
        route = self._route
        # escaped: the source is a file name a user chose (the server too)
        where = printable(f"{route.where} ({route.source or '-'})") if route else "-"
        self.log.info("%s: message %s rcpts=%d bytes=%d id=%s route=%s upstream=%s",
                      self._sid(), self._parties(), self._rcpts,
                      self._bytes, self._message_id(), where, outcome)

    def _log_refused(self, address: str, recipient: str, reply: Reply) -> None:
        """A recipient the upstream refused: the message line counts only
        those accepted, and a transaction whose every RCPT was refused has
        no message line at all."""
        self.log.info("%s: recipient refused: %s to=<%s> id=%s upstream %s: %s",
                      self._sid(), self._parties(), field(recipient, 320),
                      self._message_id(), address, reply)

    def _parties(self) -> str:
        """`user=U from=<S>` of the transaction's log lines."""
        user = self._info.user if self._info else "-"
        return f"user={user} from=<{field(self._sender, 320) if self._sender else ''}>"

    def _fail_transport(self, exc: BaseException, doing: str) -> Reply:
        reply = _transport_failure(exc)
        where = self._client.address if self._client else "-"
        self.log.warning("%s: upstream %s: %s failed: %s", self._sid(), where, doing,
                         type(exc).__name__ + (f": {exc}" if str(exc) else ""))
        self._drop()
        self._broken = reply
        return reply

    def _upstream_reply(self, reply: Reply, success: str = "0.0",
                        intermediate_ok: bool = False) -> Reply:
        """The upstream's reply for the client; a 421 (the upstream is leaving)
        becomes 451 with the same text, and the connection is dropped. A 3xx
        where none belongs (MAIL, RCPT, the final dot) is nonsense: 451.
        A reply without an enhanced status code gets one (`success`: the
        detail of a 2xx, see Reply.with_enhanced): we advertise them."""
        reply = reply.with_enhanced(success)
        if 300 <= reply.code < 400 and not intermediate_ok:
            self.log.warning("%s: upstream %s: unexpected %s", self._sid(),
                             self._client.address if self._client else "-", reply)
            self._drop()
            self._broken = BAD_UPSTREAM
            return BAD_UPSTREAM
        if reply.code == 421:
            self.log.warning("%s: upstream %s closing: %s", self._sid(),
                             self._client.address if self._client else "-", reply)
            self._drop()
            self._broken = Reply(451, reply.lines)
            return self._broken
        if reply.code >= 400 and self._client is not None:
            # a refusal may be the connection's state: postscreen's test
            # engine answers every RCPT 450 for as long as the connection
            # lasts; Postfix counts errors per connection until a message
            # is accepted and then slows every reply down (and ends at 421)
            self._client.refused = True
        return reply

    async def _connect(self, info: SessionInfo, route: Route, key: PoolKey,
                       kept: bool = True) -> tuple[UpstreamClient, bool]:
        """An upstream for `key`: kept in the pool (not yet probed; only when
        `kept`) or new and logged in. Returns (client, from_pool)."""
        if kept and self.pool is not None and self.pool.enabled:
            client = self.pool.acquire(key)
            if client is not None:
                return client, True
        try:
            client = await self._open(info, route, key)
        except UpstreamError as e:
            # a server that limits the connections per client host (Exim's
            # smtp_accept_max_per_host, Postfix's anvil) counts the ones we
            # keep idle: give them back and try again (GIVE_BACK_PAUSES)
            if (not _busy(e) or self.pool is None
                    or not (kept_there := await self.pool.give_back(route.server))):
                raise
            self.log.info("%s: upstream %s refused a connection (%s) while %d idle ones to it were kept:"
                          " those closed, connecting again", info.session_id, route.where, e.greeting, kept_there)
            # the server counts a connection until it has reaped the process
            # that served it, a moment after its 221: a few short pauses
            last = e
            for pause in _pool.GIVE_BACK_PAUSES:
                await asyncio.sleep(pause)
                try:
                    return await self._open(info, route, key), False
                except UpstreamError as again:
                    if not _busy(again):
                        raise
                    last = again
            raise last  # still busy after the last pause: that refusal is the answer
        return client, False

    async def _open(self, info: SessionInfo, route: Route, key: PoolKey) -> UpstreamClient:
        """A new upstream connection, logged in; not even tried while the
        upstream refused these very credentials lately (_pool.refused_logins)."""
        refused = _pool.refused_logins
        now = asyncio.get_running_loop().time()
        # the credentials, whatever EHLO name (cloneEhlo) the client gave
        credentials = dataclasses.replace(key, ehlo_name="")
        if (lately := refused.get(credentials, now)) is not None:
            left, detail = lately
            raise UpstreamError(LOGIN_REFUSED_LATELY,
                                f"{detail} {refused.ttl - left:.0f} s ago; not tried again with the same"
                                f" password for {left:.0f} s")
        try:
            client = await open_upstream(route, self.config, key.ehlo_name, self.log,
                                         info.session_id, who=info.user)
        except UpstreamError as e:
            if e.login_refused:
                refused.note(credentials, asyncio.get_running_loop().time(), str(e))
            raise
        refused.forget(credentials)
        return client

    async def _probe_and_mail(self, client: UpstreamClient, group: list[str]) -> Reply | None:
        """RSET (is the kept connection alive and clean?) and MAIL (with the
        rest of its group), in one round trip when the upstream offers
        PIPELINING. Returns MAIL's reply; None: the probe failed. A connection
        that went silently dead (a NAT forgot it) costs PROBE_TIMEOUT, not
        the whole `timeout`."""
        pipelining = client.supports("PIPELINING")
        with client.stream.timeout_at_most(PROBE_TIMEOUT):
            if pipelining:
                await client.send_lines(["RSET", *group])
                probe = await client.read_reply()
            else:
                probe = await client.command("RSET")
        if probe.code != 250 or (not pipelining and client.reader.buffered):
            # (sent alone, RSET has one reply: more is a reply too many,
            # which the MAIL would read as its own)
            return None
        if pipelining:
            return await client.read_reply()
        return await client.command(group[0])

    # ------------------------------------------------------------ RelayBackend

    async def mail(self, info: SessionInfo, route: Route, sender: str, params: MailParams) -> Reply:
        return (await self.mail_group(info, route, sender, params, [], False))[0]

    async def mail_group(self, info: SessionInfo, route: Route, sender: str, params: MailParams,
                         recipients: list[str], data: bool) -> list[Reply]:
        """MAIL, the RCPTs the client pipelined behind it and maybe its DATA:
        one group upstream when it offers PIPELINING (RFC 2920), so a
        pipelining client costs one round trip upstream, as it would
        directly. Returns MAIL's reply and one per RCPT; DATA's reply is kept
        for data_start (the client's DATA comes in its turn)."""
        mail_reply = await self._mail(info, route, sender, params, recipients, data)
        if isinstance(mail_reply, list):
            return mail_reply
        return [mail_reply, *(await self.rcpts(recipients) if recipients else [])]

    async def _mail(self, info: SessionInfo, route: Route, sender: str, params: MailParams,
                    recipients: list[str], data: bool) -> Reply | list[Reply]:
        """MAIL's reply; or, when the group went upstream in one piece, the
        replies for MAIL and each RCPT."""
        self._info = info
        self._broken = None
        key = PoolKey.of(route, ca_identity(route.ca_file or self.config.sslCA, route.ca_pem),
                         self._ehlo_name(info))
        rset_first = False  # the RSET ending the last transaction goes with this MAIL
        if self._client is not None and self._spoke_unasked():
            # a reply nobody asked for (one reply too many to the last dot, a
            # 421) would be read as the next command's: never reuse it
            self.log.info("%s: upstream %s spoke between two messages; connection dropped",
                          info.session_id, self._client.address)
            self._drop()
        if self._client is not None and (self._key != key or self._client.messages >= _pool.MAX_MESSAGES):
            # another route; or enough messages on this connection (the pool QUITs it)
            await self._release()
        elif self._client is not None and self._needs_rset():
            if not self._waiting_for_message() and self._client.supports("PIPELINING"):
                rset_first = True
            else:
                await self.reset()
        elif self._client is not None and self._idle_too_long():
            # the session's own connection idled (a client between messages):
            # probe it like a kept one, so a link that died silently costs
            # PROBE_TIMEOUT, not `timeout`; with PIPELINING in the same round trip
            rset_first = True
        self._route = route
        self._sender = sender
        self._rcpts = 0
        self._bytes = 0
        self._transactions += 1
        self._data_reply = None
        if params.size is not None and self.config.addReceivedField:
            # SIZE= is the size the upstream will get (RFC 1870 4): with our
            # Received: header, so an upstream's limit refuses at MAIL, not
            # after the whole message went
            params = dataclasses.replace(params, size=params.size + len(self.received_header(info)))
        for attempt in range(2):
            from_pool = False
            fresh = self._client is None
            if fresh:
                try:
                    # the retry after a stale kept connection connects afresh:
                    # the others kept for the key went stale the same way
                    self._client, from_pool = await self._connect(info, route, key, kept=attempt == 0)
                except UpstreamError as e:
                    # escaped: the error may quote a path a user chose (sslCA)
                    self.log.warning("%s: upstream %s for <%s>: %s", info.session_id,
                                     printable(route.where), field(sender, 320) if sender else "",
                                     printable(str(e)))
                    self._log_message(f"not reached ({e.reply.code})")
                    return e.reply
                self._key = key
                fresh = not from_pool
            command = self._client.mail_command(sender, params, self.config)
            if isinstance(command, Reply):
                self._log_message(f"MAIL refused here: {command}")
                if rset_first:
                    await self.reset()
                elif from_pool:  # unprobed: back to the pool, which probes it next time
                    await self._release()
                return command
            self._in_tx = self._mail_refused = False  # (any RSET needed goes first, below)
            group = [command]
            grouped = bool(recipients) and self._client.supports("PIPELINING")
            if grouped:
                group += [f"RCPT TO:<{r}>" for r in recipients] + (["DATA"] if data else [])
            try:
                if from_pool or rset_first:
                    rset_first = False
                    reply = await self._probe_and_mail(self._client, group)
                    if reply is None:
                        raise ConnectionResetError("RSET probe refused")
                else:
                    await self._client.send_lines(group)
                    reply = await self._client.read_reply()
            except (OSError, TimeoutError, ReplyError, TLSError) as e:
                if not fresh and attempt == 0:
                    # a kept connection died in between: connect afresh, once
                    self.log.info("%s: upstream %s: kept connection went stale (%s), reconnecting",
                                  info.session_id, self._client.address, type(e).__name__)
                    self._drop()
                    continue
                reply = self._fail_transport(e, "MAIL")
                self._log_message(f"not delivered ({reply.code})")
                return reply
            if reply.code == 421 and not fresh and attempt == 0:
                # the kept connection timed out on the upstream's side meanwhile
                self.log.info("%s: upstream %s: kept connection closing (%s), reconnecting",
                              info.session_id, self._client.address, reply)
                self._drop()
                continue
            reply = self._upstream_reply(reply, MAIL_OK)
            if reply.is_positive:
                self._in_tx = True
            else:
                self._mail_refused = self._client is not None
                self._log_message(f"MAIL refused: {reply}")
            if grouped:
                replies = [reply, *(await self._group_replies(recipients, data))]
                if self._overtalked("the group"):
                    self._log_message(f"not delivered ({BAD_UPSTREAM.code})")
                    return [BAD_UPSTREAM] * len(replies)
                return replies
            if self._overtalked("MAIL"):
                if reply.is_positive:  # (a refusal has its line already)
                    self._log_message(f"not delivered ({BAD_UPSTREAM.code})")
                return BAD_UPSTREAM
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def _overtalked(self, what: str) -> bool:
        """More reply text arrived than was asked for: every later reply
        would be read one step late (a 250 taken for the next command's),
        so the connection is left and `what` answered 451 4.5.0."""
        client = self._client
        if client is None or not client.reader.buffered:
            return False
        self.log.warning("%s: upstream %s sent more than its replies to %s; connection dropped",
                         self._sid(), client.address, what)
        self._drop()
        return True

    async def _closing_behind(self, what: str) -> bool:
        """More reply text came behind the reply to `what`. A 421 and
        nothing after it is the server closing (RFC 5321 3.8: it may say so
        unasked): one that accepted a message and then shuts down sends its
        250 and the 421 at once, as sendooway's own stop does to its
        clients. Then the reply before it stands: True. Anything else is
        nonsense (_overtalked): False. The connection is dropped either way."""
        client = self._client
        assert client is not None
        closing = await client.unasked_reply()
        self._drop()
        if closing is not None and closing.code == 421 and not client.reader.buffered:
            self.log.warning("%s: upstream %s closing after its reply to %s: %s", self._sid(),
                             client.address, what, closing)
            return True
        self.log.warning("%s: upstream %s sent more than its replies to %s; connection dropped",
                         self._sid(), client.address, what)
        return False

    async def _refused_behind_354(self) -> Reply | None:
        """More than the 354 came: a refusal right behind it (smtp-sink -A
        0 answers so, before any byte of the message) is DATA's answer, its
        class kept, as when it comes during the message; anything else is
        nonsense. Either way the connection is dropped and the answer kept
        in _broken. None: nothing more came."""
        if self._client is None or not self._client.reader.buffered:
            return None
        self._broken = await self._unasked_reply() or BAD_UPSTREAM
        return self._broken

    async def _group_replies(self, recipients: list[str], data: bool) -> list[Reply]:
        """The replies to the RCPTs (and DATA) sent in one group behind MAIL,
        whose reply has been read. Behind a refused MAIL no RCPT is accepted,
        whatever the upstream says; DATA's reply is kept for data_start, or,
        when nothing can follow it (no recipient, or a 354 nobody will use),
        the connection is left."""
        replies: list[Reply] = []
        careless = False  # the upstream accepted something behind a refused MAIL
        rcpts = len(recipients)
        try:
            for recipient in recipients:
                if self._client is None:  # dropped (421, nonsense): the rest is lost with it
                    replies.append(self._broken or DROPPED)
                    continue
                address = self._client.address
                reply = await self._client.read_reply()
                if self._in_tx:
                    reply = self._upstream_reply(reply, RCPT_OK)
                    if reply.is_positive:
                        self._rcpts += 1
                    else:
                        self._log_refused(address, recipient, reply)
                elif reply.code == 421:
                    reply = self._upstream_reply(reply)
                elif reply.code < 400:
                    careless = True
                    reply = NO_TRANSACTION
                else:
                    reply = reply.with_enhanced(RCPT_OK)  # a refusal: passed on, with a code
                replies.append(reply)
            if data and self._client is not None:
                reply = await self._client.read_reply()
                claimed = self._in_tx and self._rcpts > 0  # the client's DATA will ask for it
                if reply.code == 354 and claimed:
                    self._data_reply = reply
                    if await self._refused_behind_354() is not None:
                        self._data_reply = None  # (data_start answers with _broken)
                elif reply.code < 400:
                    # a 354 nobody will use (no recipient: the session answers
                    # the client's DATA itself), or nonsense: leave the connection
                    self._drop()
                    if claimed:
                        self.log.warning("%s: upstream answered DATA with %s", self._sid(), reply)
                        self._broken = BAD_UPSTREAM
                elif claimed:
                    self._data_reply = self._upstream_reply(reply)
                elif reply.code == 421:
                    self._upstream_reply(reply)  # the connection is gone
            if careless and self._client is not None:
                # whatever it kept of that RCPT must not join a later transaction
                self.log.warning("%s: upstream %s accepted commands behind a refused MAIL;"
                                 " connection dropped", self._sid(), self._client.address)
                self._drop()
        except (OSError, TimeoutError, ReplyError, TLSError) as e:
            failure = self._fail_transport(e, "RCPT")
            replies += [failure] * (rcpts - len(replies))
        return replies

    async def rcpt(self, recipient: str) -> Reply:
        if self._broken is not None:
            return self._broken
        if self._client is None or not self._in_tx or self._data_reply is not None:
            return NO_TRANSACTION
        address = self._client.address
        try:
            reply = await self._client.command(f"RCPT TO:<{recipient}>")
        except (OSError, TimeoutError, ReplyError, TLSError) as e:
            return self._fail_transport(e, "RCPT")
        reply = self._upstream_reply(reply, RCPT_OK)
        if self._overtalked("RCPT"):
            self._broken = BAD_UPSTREAM
            return BAD_UPSTREAM
        if reply.is_positive:
            self._rcpts += 1
        else:
            self._log_refused(address, recipient, reply)
        return reply

    async def rcpts(self, recipients: list[str]) -> list[Reply]:
        client = self._client
        if (len(recipients) < 2 or self._broken is not None or client is None
                or not self._in_tx or self._data_reply is not None
                or not client.supports("PIPELINING")):
            return [await self.rcpt(r) for r in recipients]
        replies: list[Reply] = []
        try:
            await client.send_lines([f"RCPT TO:<{r}>" for r in recipients])
            for recipient in recipients:
                if self._broken is not None:  # a 421 in the group: the rest is lost with it
                    replies.append(self._broken)
                    continue
                reply = self._upstream_reply(await client.read_reply(), RCPT_OK)
                if reply.is_positive:
                    self._rcpts += 1
                else:
                    self._log_refused(client.address, recipient, reply)
                replies.append(reply)
        except (OSError, TimeoutError, ReplyError, TLSError) as e:
            failure = self._fail_transport(e, "RCPT")
            replies += [failure] * (len(recipients) - len(replies))
        if self._overtalked("the RCPTs"):  # which reply was whose is unknown
            self._broken = BAD_UPSTREAM
            return [BAD_UPSTREAM] * len(recipients)
        return replies

    async def data_start(self) -> Reply:
        pending, self._data_reply = self._data_reply, None
        if self._broken is not None:  # e.g. DATA of a pipelined group answered 421
            self._log_message(f"not delivered ({self._broken.code})")
            return self._broken
        if self._client is None or not self._in_tx:
            return NO_TRANSACTION
        if pending is not None:  # DATA went upstream with the client's pipelined group
            reply = pending
        else:
            try:
                reply = await self._client.command("DATA")
            except (OSError, TimeoutError, ReplyError, TLSError) as e:
                reply = self._fail_transport(e, "DATA")
                self._log_message(f"not delivered ({reply.code})")
                return reply
            reply = self._upstream_reply(reply, intermediate_ok=True)
        if reply.code != 354:
            if reply.code < 400:
                # Another 3xx would make the client start sending, a 2xx is
                # nonsense before any message: refuse it ourselves.
                self.log.warning("%s: upstream answered DATA with %s", self._sid(), reply)
                self._drop()
                self._broken = BAD_UPSTREAM
                self._log_message(f"not delivered ({BAD_UPSTREAM.code})")
                return BAD_UPSTREAM
            self._log_message(f"DATA refused: {reply}")
            return reply
        if (refused := await self._refused_behind_354()) is not None:
            self._log_message(f"not delivered ({refused})")
            return refused
        self._in_data = True
        # One piece is held back until the next comes (or the end), so the
        # header goes with the first chunk and the last chunk with the final
        # dot: fewer TLS records and sends; a small message leaves in one
        # write. Never more than one chunk waits, so the upstream keeps
        # getting data as the client sends it.
        self._held = b""
        self._held_header = False
        if self.config.addReceivedField and self._info is not None:
            self._held = self.received_header(self._info)
            self._held_header = True
        return reply

    async def data_chunk(self, chunk: bytes) -> None:
        if self._broken is not None or self._client is None or not self._in_data:
            return  # the failure is answered at data_end
        self._bytes += len(chunk)
        if self._held_header:  # the Received: header goes with the first chunk
            self._held += chunk
            self._held_header = False
            return
        held, self._held = self._held, chunk
        if not held:
            return
        try:
            await self._client.stream.write(held)
        except (OSError, TimeoutError, TLSError) as e:
            await self._fail_during_data(e)

    async def _fail_during_data(self, exc: BaseException) -> None:
        """Writing the message failed. An upstream that refused it early and
        closed (552 too big) has its reply read already: that reply (a 5xx
        stays a 5xx) is the answer at the end of the data; else 451."""
        client = self._client
        early = None
        # after a write that timed out, only a reply already there is looked for
        if client is not None and (not isinstance(exc, TimeoutError) or self._spoke_unasked()):
            try:
                with client.stream.timeout_at_most(2.0):
                    early = await client.read_reply()
            except (OSError, TimeoutError, ReplyError, TLSError):
                early = None
        if early is None or early.code < 400:
            self._fail_transport(exc, "DATA")
            return
        self._broken = self._early_refusal(client, early)

    def _early_refusal(self, client: UpstreamClient, early: Reply) -> Reply:
        """The upstream refused the message before its end (4xx/5xx): that
        reply is the answer (a 5xx stays a 5xx; 421 becomes 451), and the
        connection is dropped without the final dot."""
        self.log.warning("%s: upstream %s refused the message during DATA: %s", self._sid(),
                         client.address, early)
        self._drop()
        return (Reply(451, early.lines) if early.code == 421 else early).with_enhanced("0.0")

    async def _unasked_reply(self) -> Reply | None:
        """The upstream said something while the message was being sent,
        before its final dot: an early refusal (4xx/5xx, the answer) or
        nonsense (a 250 now would be taken for the dot's: 451 4.5.0); either
        way the connection is dropped without the dot. None: it was no reply
        (TLS housekeeping such as a late session ticket), carry on."""
        client = self._client
        assert client is not None
        try:
            with client.stream.timeout_at_most(1.0):
                early = await client.read_reply()
        except TimeoutError:
            if not client.reader.buffered:
                return None
            early = None  # half a reply: nonsense
        except (OSError, ReplyError, TLSError) as e:
            return self._fail_transport(e, "DATA")
        if early is not None and early.code >= 400:
            return self._early_refusal(client, early)
        self._drop()
        self.log.warning("%s: upstream %s replied during the message (%s); connection dropped"
                         " without the final dot", self._sid(), client.address, early or "part of a reply")
        return BAD_UPSTREAM

    async def data_end(self, empty: bool = False) -> Reply:
        if self._broken is not None:
            reply, self._broken = self._broken, None
            self._log_message(f"not delivered ({reply})")
            return reply
        if self._client is None or not self._in_data:
            return NO_TRANSACTION
        if self._spoke_unasked():
            unasked = await self._unasked_reply()
            if unasked is not None:
                self._broken = None
                self._log_message(f"not delivered ({unasked})")
                return unasked
        held, self._held = self._held, b""
        # The client's last line lost its CRLF to the end marker; a message
        # without a single line ends right after the 354 (or after the
        # header, which ends in CRLF): "." alone, not an empty line and ".".
        end = b".\r\n" if empty and not self._bytes else b"\r\n.\r\n"
        if end != b".\r\n":
            self._bytes += 2  # the last line's CRLF, which came with the end marker
        try:
            await self._client.stream.write(held + end)
        except (OSError, TimeoutError, TLSError) as e:
            await self._fail_during_data(e)  # an early refusal is the answer
            reply, self._broken = self._broken or DROPPED, None
            self._log_message(f"not delivered ({reply})" if reply.code >= 500
                              else f"unknown, connection lost ({reply.code})")
            return reply
        try:
            reply = await self._client.read_reply()
        except (OSError, TimeoutError, ReplyError, TLSError) as e:
            reply = self._fail_transport(e, "end of DATA")
            self._broken = None
            self._log_message(f"unknown, connection lost ({reply.code})")
            return reply
        self._in_data = False
        self._in_tx = False
        if self._client.reader.buffered and not await self._closing_behind("the end of the message"):
            # which reply answered the dot is not known: never pass a 250 then
            reply = BAD_UPSTREAM
        reply = self._upstream_reply(reply)
        self._broken = None
        if reply.code == 250:
            self.messages += 1
            if self._client is not None:  # (gone when the upstream said 421 behind its reply)
                self._client.messages += 1
        self._log_message(str(reply))
        return reply

    async def data_abort(self, reason: str = "", complete: bool = False) -> None:
        if self._in_data or self._broken is not None:
            if complete:
                self._bytes += 2  # the last line's CRLF, as data_end counts it
            self._log_message(f"aborted ({reason}), no final dot sent" if reason
                              else "aborted, no final dot sent")
        self._drop()
        self._broken = None

    async def reset(self) -> None:
        self._broken = None
        if self._client is None or not self._needs_rset():
            return
        if self._waiting_for_message():  # cannot leave DATA without the dot: drop it
            self._drop()
            return
        self._data_reply = None
        client = self._client
        try:
            with (client.stream.timeout_at_most(PROBE_TIMEOUT) if self._idle_too_long()
                  else nullcontext()):
                reply = await client.command("RSET")
        except (OSError, TimeoutError, ReplyError, TLSError) as e:
            self._fail_transport(e, "RSET")
            self._broken = None
            return
        self._in_tx = self._mail_refused = False
        if reply.code != 250:
            self._drop()

    def abort(self) -> None:
        self._drop()

    async def close(self) -> None:
        """The session ends: keep or QUIT its connection (_release cuts one
        that still waits for a message, so no half-written one gets its dot)."""
        await self._release()

    # ------------------------------------------------------------ Received:

    def received_header(self, info: SessionInfo) -> bytes:
        """RFC 5321 4.4 trace line; RFC 3848 ESMTPSA/ESMTPA for AUTH (+TLS)."""
        ip = _client_ip(info.client_address)
        helo = info.client_ehlo if is_ehlo_name(info.client_ehlo or "") else "unknown"
        tcp_info = ""
        if ip is not None:
            tcp_info = f" ([IPv6:{ip}])" if ip.version == 6 else f" ([{ip}])"
        protocol = "ESMTPSA" if info.tls else "ESMTPA"
        user = re.sub(r"[^A-Za-z0-9._@+\-]", "?", info.user)
        date = email.utils.formatdate(localtime=True)
        text = (f"Received: from {helo}{tcp_info}\r\n"
                f"\tby {self.localname} (sendooway) with {protocol} id {self._message_id()}\r\n"
                f"\t(authenticated user {user}); {date}\r\n")
        return text.encode("ascii", "replace")


# "192.0.2.7:4242", the usual client address: neither an IPv4 nor an IPv6
# address as a whole (a port after an IPv4 address is neither), so the
# loop below would find its IPv4 part second, after two failed parses
_IPV4_AND_PORT = re.compile(r"([0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}):[0-9]+")


def _client_ip(address: str):
    if not address:
        return None
    plain = _IPV4_AND_PORT.fullmatch(address)
    if plain is not None:
        try:
            return ipaddress.IPv4Address(plain.group(1))
        except ValueError:
            pass  # (an octet over 255, a leading zero: the long way says what)
    for candidate in (address, address.rsplit(":", 1)[0]):
        try:
            # without a link-local zone (fe80::1%eth0): RFC 5321's IPv6
            # address literal has no place for one
            ip = ipaddress.ip_address(candidate.strip("[]").split("%", 1)[0])
        except ValueError:
            continue
        return getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:192.0.2.7 is 192.0.2.7
    return None
