"""The frontend ⇄ authenticator wire protocol.

A frame is a 4-byte big-endian length followed by one msgpack map of at most
MAX_FRAME bytes. Every message type has an exact key set and value types;
anything else raises ProtocolError. The codec is sans-IO (FrameDecoder takes
bytes and returns messages); the adapters at the bottom move bytes over an
asyncio stream or a blocking socket. See docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from dataclasses import dataclass
from typing import ClassVar

import msgpack

from .types import Route, Secret, TlsMode

VERSION = 2  # 2: route_ok carries ca_pem
MAX_FRAME = 16 * 1024
_HEADER = struct.Struct(">I")

# How long the authenticator may hold the answer to an auth request back
# once it has decided it, in seconds: a refusal that skipped PAM is padded
# to PAM's usual time (at most MAX_REFUSAL_PAD) and every refusal waits its
# failure delay (at most MAX_FAILURE_DELAY). The frontend waits `timeout`
# plus both for that answer: waiting `timeout` alone, it gave up on a grown
# delay (4 s, 8 s with a `timeout` of 4 or 10) and answered a wrong
# password 454 and 421, logged as an authenticator that does not answer.
MAX_REFUSAL_PAD = 10.0
MAX_FAILURE_DELAY = 15.0

# Upper bounds on string fields, in characters.
MAX_USER = 256
MAX_PASSWORD = 1024
MAX_ADDRESS = 512
MAX_TEXT = 1024


class ProtocolError(Exception):
    """The peer broke the protocol: the connection must be closed."""


@dataclass(frozen=True)
class Message:
    """Base of all messages; TYPE is the msgpack "type" value."""

    TYPE: ClassVar[str] = ""
    LIMITS: ClassVar[dict[str, int]] = {}


# ------------------------------------------------------- frontend → authenticator


@dataclass(frozen=True)
class Hello(Message):
    """First request on every connection. `session` and `client` are for logs
    and the per-address backoff only; the authenticator trusts nothing else in
    them."""

    TYPE: ClassVar[str] = "hello"
    LIMITS: ClassVar[dict[str, int]] = {"session": 64, "client": 128}
    version: int
    session: str
    client: str


@dataclass(frozen=True)
class AuthRequest(Message):
    TYPE: ClassVar[str] = "auth"
    LIMITS: ClassVar[dict[str, int]] = {"user": MAX_USER, "password": MAX_PASSWORD}
    user: str
    password: Secret


@dataclass(frozen=True)
class RouteRequest(Message):
    """Which upstream serves `sender` ("" for the null sender <>) for the
    user authenticated on this connection."""

    TYPE: ClassVar[str] = "route"
    LIMITS: ClassVar[dict[str, int]] = {"sender": MAX_ADDRESS}
    sender: str


# ------------------------------------------------------- authenticator → frontend


@dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    version: int


@dataclass(frozen=True)
class AuthOk(Message):
    """`user` is the account name as the authenticator knows it."""

    TYPE: ClassVar[str] = "auth_ok"
    LIMITS: ClassVar[dict[str, int]] = {"user": MAX_USER}
    user: str


@dataclass(frozen=True)
class AuthFail(Message):
    """Deliberately carries no reason: the frontend learns only "failed"."""

    TYPE: ClassVar[str] = "auth_fail"


@dataclass(frozen=True)
class RouteOk(Message):
    TYPE: ClassVar[str] = "route_ok"
    LIMITS: ClassVar[dict[str, int]] = {
        "server": 255, "tls": 16, "ca_file": 4096, "user": MAX_TEXT,
        "password": MAX_PASSWORD, "source": 4096, "ca_pem": 8192,
    }
    server: str
    port: int
    tls: str
    cert_check: bool
    ca_file: str
    user: str
    password: Secret
    auth: bool
    source: str
    ca_pem: str = ""

    def __post_init__(self) -> None:
        if self.tls not in {m.value for m in TlsMode}:
            raise ProtocolError(f"route_ok.tls: unknown mode {self.tls[:16]!r}")
        if not 1 <= self.port <= 65535:
            raise ProtocolError(f"route_ok.port: {self.port} outside 1..65535")
        if not self.server:
            raise ProtocolError("route_ok.server: empty")

    @classmethod
    def from_route(cls, route: Route) -> "RouteOk":
        return cls(route.server, route.port, route.tls.value, route.cert_check,
                   route.ca_file, route.user, route.password, route.auth, route.source,
                   route.ca_pem)

    def to_route(self) -> Route:
        return Route(self.server, self.port, TlsMode(self.tls), self.cert_check,
                     self.ca_file, self.user, self.password, self.auth, self.source,
                     self.ca_pem)


@dataclass(frozen=True)
class NoRoute(Message):
    TYPE: ClassVar[str] = "no_route"


@dataclass(frozen=True)
class Error(Message):
    """Sent before the authenticator closes a connection that broke the rules."""

    TYPE: ClassVar[str] = "error"
    LIMITS: ClassVar[dict[str, int]] = {"reason": MAX_TEXT}
    reason: str


REQUESTS: dict[str, type[Message]] = {m.TYPE: m for m in (Hello, AuthRequest, RouteRequest)}
REPLIES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Welcome, AuthOk, AuthFail, RouteOk, NoRoute, Error)
}

_FIELD_TYPES = {"str": str, "int": int, "bool": bool, "Secret": Secret}


def _field_specs(cls: type[Message]) -> dict[str, type]:
    return {f.name: _FIELD_TYPES[f.type] for f in dataclasses.fields(cls)}


_SPECS = {cls: _field_specs(cls) for cls in (*REQUESTS.values(), *REPLIES.values())}


def _check_value(cls: type[Message], key: str, kind: type, value: object) -> object:
    if kind is Secret:
        if not isinstance(value, str):
            raise ProtocolError(f"{cls.TYPE}.{key}: expected a string")
        wrapped = Secret(value)
        text = value
    elif kind is int:
        # bool is a subclass of int in Python: refuse it here.
        if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
            raise ProtocolError(f"{cls.TYPE}.{key}: expected an integer")
        return value
    elif kind is bool:
        if type(value) is not bool:
            raise ProtocolError(f"{cls.TYPE}.{key}: expected a boolean")
        return value
    else:
        if not isinstance(value, str):
            raise ProtocolError(f"{cls.TYPE}.{key}: expected a string")
        wrapped = text = value
    limit = cls.LIMITS.get(key, MAX_TEXT)
    if len(text) > limit:
        raise ProtocolError(f"{cls.TYPE}.{key}: longer than {limit} characters")
    if "\0" in text:
        raise ProtocolError(f"{cls.TYPE}.{key}: contains NUL")
    return wrapped


def from_map(obj: object, allowed: dict[str, type[Message]]) -> Message:
    """Validate one decoded msgpack object against the allowed message types."""
    if not isinstance(obj, dict):
        raise ProtocolError("a frame must hold one map")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in allowed:
        shown = kind if isinstance(kind, str) and len(kind) < 40 else "?"
        raise ProtocolError(f"unexpected message type {shown!r}")
    cls = allowed[kind]
    spec = _SPECS[cls]
    keys = set(obj) - {"type"}
    if keys != set(spec):
        missing = sorted(set(spec) - keys)
        extra = sorted(str(k)[:40] for k in keys - set(spec))
        raise ProtocolError(f"{kind}: missing keys {missing}, unexpected keys {extra}")
    values = {k: _check_value(cls, k, t, obj[k]) for k, t in spec.items()}
    return cls(**values)


def to_map(msg: Message) -> dict:
    out: dict[str, object] = {"type": msg.TYPE}
    for f in dataclasses.fields(msg):
        v = getattr(msg, f.name)
        out[f.name] = v.reveal() if isinstance(v, Secret) else v
    return out


def encode(msg: Message) -> bytes:
    """One frame for `msg`; a message that would break the rules is our bug."""
    allowed = REQUESTS if msg.TYPE in REQUESTS else REPLIES
    obj = to_map(msg)
    from_map(obj, allowed)  # raises ProtocolError: we never send what we would refuse
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"{msg.TYPE}: frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Sans-IO decoder: feed() bytes, get back the complete messages.

    After a ProtocolError the decoder is dead: the connection must close.
    A broken frame behind complete ones is held back: feed() returns those,
    and the next feed() (`held`: feed(b"") will do) raises its error, so
    that a reader acts on the messages before it whatever the reads' cuts.
    """

    def __init__(self, allowed: dict[str, type[Message]]) -> None:
        self._allowed = allowed
        self._buf = bytearray()
        self._dead = False
        self._held: ProtocolError | None = None

    @property
    def held(self) -> bool:
        """A broken frame waits behind the messages already returned."""
        return self._held is not None

    def feed(self, data: bytes) -> list[Message]:
        if self._held is not None:
            exc, self._held = self._held, None
            raise exc
        if self._dead:
            raise ProtocolError("connection already broke the protocol")
        self._buf += data
        out: list[Message] = []
        try:
            while len(self._buf) >= _HEADER.size:
                (length,) = _HEADER.unpack_from(self._buf)
                if length == 0 or length > MAX_FRAME:
                    raise ProtocolError(f"frame length {length} outside 1..{MAX_FRAME}")
                if len(self._buf) < _HEADER.size + length:
                    break
                body = bytes(self._buf[_HEADER.size:_HEADER.size + length])
                del self._buf[:_HEADER.size + length]
                out.append(from_map(_unpack(body), self._allowed))
        except ProtocolError as exc:
            self._dead = True
            self._buf.clear()
            if not out:
                raise
            self._held = exc
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)


def _map_once(pairs: list) -> dict:
    """A map whose keys are all different: msgpack lets a key come twice and
    keeps the last, so {type: hello, ..., type: route} was read as a route;
    a frame means exactly the keys it lists, once each."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key appears twice in a map")
    return result


def _unpack(body: bytes) -> object:
    try:
        return msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_FRAME, max_bin_len=0,
            max_array_len=64, max_map_len=32, max_ext_len=0,
            object_pairs_hook=_map_once,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, msgpack.UnpackException, RecursionError) as exc:
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}") from None


# ---------------------------------------------------------------- adapters


class BlockingChannel:
    """Request/reply over a connected blocking socket (e.g. --check, tests)."""

    def __init__(self, sock: socket.socket, allowed: dict[str, type[Message]] = REPLIES,
                 timeout: float | None = None) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self._decoder = FrameDecoder(allowed)
        self._queue: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sock.sendall(encode(msg))

    def receive(self) -> Message:
        while not self._queue:
            if self._decoder.held:
                self._decoder.feed(b"")  # raises
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("peer closed the connection")
            self._queue.extend(self._decoder.feed(data))
        return self._queue.pop(0)

    def request(self, msg: Message) -> Message:
        self.send(msg)
        return self.receive()

    def close(self) -> None:
        self.sock.close()


class AsyncChannel:
    """Request/reply over an asyncio stream pair."""

    def __init__(self, reader, writer, allowed: dict[str, type[Message]] = REPLIES) -> None:
        self.reader = reader
        self.writer = writer
        self._decoder = FrameDecoder(allowed)
        self._queue: list[Message] = []

    async def send(self, msg: Message) -> None:
        self.writer.write(encode(msg))
        await self.writer.drain()

    async def receive(self) -> Message:
        while not self._queue:
            if self._decoder.held:
                self._decoder.feed(b"")  # raises
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("peer closed the connection")
            self._queue.extend(self._decoder.feed(data))
        return self._queue.pop(0)

    async def request(self, msg: Message) -> Message:
        await self.send(msg)
        return await self.receive()

    def close(self) -> None:
        self.writer.close()
