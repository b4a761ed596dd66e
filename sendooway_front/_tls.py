"""TLS contexts for both sides of the proxy (pyOpenSSL).

The handshake itself runs over memory BIOs in _stream.Stream, so the same
code serves a TCP socket, a pipe pair under inetd or anything else that moves
bytes. Here: building contexts (TLS 1.2+, forward-secret AEAD ciphers only),
and checking a server's certificate chain and name on the client side.

Client contexts always ask OpenSSL to verify the chain; with `verify=False`
(a route's noCertCheck) the failures are collected instead of aborting the
handshake, so the caller can log them.

Upstream TLS sessions are resumed (tickets, RFC 8446 2.2; session IDs or
tickets with TLS 1.2): a connection to the same server name and port through
the same client context (same CA file, same verify setting) offers the
session of the last one. The resumed handshake skips the certificate
exchange and the signatures, so it costs both ends less CPU; the server
certificate was checked when the session was made, and the name check runs
again on every connection all the same. A session made under noCertCheck
lives in the noCertCheck context's entries only, so it can never let a
verifying connection skip its check.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ipaddress
import os
import ssl
import stat
import time

from OpenSSL import SSL
# Imported now, not at first use: the frontend drops privileges after start-up
# and the install tree may be unreadable to the frontend user by then.
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address

from sendooway_shared.smtp_syntax import host_a_label

try:
    from OpenSSL._util import ffi as _ffi, lib as _lib  # X509_verify_cert_error_string
except ImportError:  # pragma: no cover - private API moved
    _ffi = _lib = None

# TLS 1.2 suites: ECDHE/DHE key exchange with AES-GCM or ChaCha20 only.
# TLS 1.3 suites are OpenSSL's defaults (all of them are modern).
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)

# RFC 7919's ffdhe2048 (`openssl genpkey -genparam -algorithm DH -pkeyopt
# group:ffdhe2048`): the server's group for DHE with TLS 1.2 clients that
# name no finite-field group of their own (see _set_dh_group).
FFDHE2048 = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
# Server side: no TLS 1.2 session tickets (RFC 5077). Their key would be made
# once per context and never change in a long-running `sendooway -b`, and a
# TLS 1.2 ticket carries the master secret: whoever got that key later could
# read every recorded TLS 1.2 session since start (RFC 9325 3.4). No
# resumption on the server side, then (see server_context).
_SERVER_OPTIONS = SSL.OP_NO_TICKET


class TLSError(Exception):
    """A TLS failure; str() is a short reason fit for a log line."""


class TLSConfigError(TLSError):
    """A certificate or key that cannot be used (missing, unreadable, mismatched);
    `keyword` is the config keyword that names the file at fault."""

    def __init__(self, message: str, keyword: str = "sslCert") -> None:
        super().__init__(message)
        self.keyword = keyword


class TLSHandshakeError(TLSError):
    """The peer and we could not agree on a TLS session."""


class TLSVerifyError(TLSHandshakeError):
    """The server's certificate chain or name did not check out."""


def _base_context(method: int) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_OPTIONS)
    ctx.set_cipher_list(CIPHERS.encode())
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return ctx


def _describe_openssl(exc: BaseException) -> str:
    """A readable one-liner from an OpenSSL.SSL.Error (its args are lists of tuples)."""
    try:
        parts = []
        for item in exc.args[0]:
            if isinstance(item, tuple) and len(item) == 3:
                parts.append(str(item[2]))
            else:
                parts.append(str(item))
        if parts:
            return ", ".join(parts)
    except (IndexError, TypeError):
        pass
    return str(exc) or type(exc).__name__


def server_context(cert_file: str, key_file: str) -> SSL.Context:
    """A server context with the certificate chain and key loaded now (as root,
    before the privilege drop). Raises TLSConfigError naming the file."""
    for what, path, keyword in (("certificate", cert_file, "sslCert"), ("key", key_file, "sslKey")):
        if not path:
            raise TLSConfigError(f"no TLS {what} file configured ({keyword})", keyword)
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise TLSConfigError(f"{path}: cannot read TLS {what}: {e.strerror or e}", keyword) from None
    ctx = _base_context(SSL.TLS_SERVER_METHOD)
    ctx.set_options(_SERVER_OPTIONS)
    # and no server-side session cache either: with tickets off, every TLS
    # 1.3 handshake would leave two sessions in it for two hours (some 24 MiB
    # when full, filled without a login); clients do full handshakes
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    try:
        ctx.use_certificate_chain_file(os.fsencode(cert_file))
    except SSL.Error as e:
        raise TLSConfigError(f"{cert_file}: not a usable PEM certificate chain ({_describe_openssl(e)})",
                             "sslCert") from None
    try:
        ctx.use_privatekey_file(os.fsencode(key_file))
    except SSL.Error as e:
        reason = _describe_openssl(e)
        if "mismatch" in reason:
            raise TLSConfigError(f"{key_file}: the key does not match the certificate in {cert_file}",
                                 "sslKey") from None
        raise TLSConfigError(f"{key_file}: not a usable PEM private key ({reason})", "sslKey") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"{key_file}: the key does not match the certificate in {cert_file}",
                             "sslKey") from None
    _set_dh_group(ctx)
    ctx.set_session_id(b"sendooway")
    return ctx


def _set_dh_group(ctx: SSL.Context) -> None:
    """Give the DHE-RSA suites their group (FFDHE2048). Without one
    OpenSSL never chose them: a TLS 1.2 client offering DHE and no ECDHE
    got "no shared cipher" (an outside review). A client that names RFC
    7919 groups gets one it names all the same. pyOpenSSL's load_tmp_dh
    reads a file: the group is handed to it from a memfd, as CA files are
    (_load_pem). Should that fail (no /proc, no memory), the context keeps
    ECDHE only, as before: the DHE suites stay unused, nothing else."""
    try:
        fd = os.memfd_create("sendooway-dh", os.MFD_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, FFDHE2048)  # (under a page: one write)
        ctx.load_tmp_dh(os.fsencode(f"/proc/self/fd/{fd}"))
    except (OSError, SSL.Error):
        pass
    finally:
        os.close(fd)


def _record_verify(conn: SSL.Connection, cert, errnum: int, depth: int, ok: int) -> bool:
    """OpenSSL's per-certificate verify callback: remember every failure on the
    connection; refuse only when the context says the chain must verify."""
    state = conn.get_app_data()
    if isinstance(state, _VerifyState):
        state.checked = True  # a full handshake (a resumed one shows no certificates)
    if not ok:
        if isinstance(state, _VerifyState):
            subject = ""
            try:
                subject = cert.to_cryptography().subject.rfc4514_string()
            except Exception:  # a certificate without a readable subject
                subject = ""
            reason = _verify_reason(errnum)
            state.errors.append(f"depth {depth}{' ' + subject if subject else ''}: {reason}")
            return not state.verify
        return False
    return True


def _verify_reason(errnum: int) -> str:
    try:
        return _ffi.string(_lib.X509_verify_cert_error_string(errnum)).decode("ascii", "replace")
    except Exception:  # pragma: no cover - private API moved
        return f"verify error {errnum}"


class _VerifyState:
    """Attached to each client connection: what verification found, and
    the session cache entry it may resume."""

    __slots__ = ("verify", "errors", "checked", "key", "offered", "resumed")

    def __init__(self, verify: bool) -> None:
        self.verify = verify
        self.errors: list[str] = []
        self.checked = False   # the verify callback ran: a full handshake
        self.key: tuple | None = None
        self.offered: tuple | None = None  # (session, chain errors) offered for resumption
        self.resumed = False


class _ClientSettings:
    __slots__ = ("verify", "ca_file")

    def __init__(self, verify: bool, ca_file: str) -> None:
        self.verify = verify
        self.ca_file = ca_file


def ca_identity(ca_file: str, ca_pem: str = "") -> str:
    """What a client context trusts, as a key: certificates passed in (a
    user's own sslCA, read by the authenticator) by their digest, else the
    CA file's path ("" = the system store)."""
    return "pem:" + hashlib.sha256(ca_pem.encode()).hexdigest() if ca_pem else ca_file


MAX_CA_FILE = 1 << 20   # octets: as the users' files (Debian's whole bundle is ~220 KiB)
MAX_CA_CERTS = 1000     # certificates in one CA file (Debian's bundle has ~140)


def _load_pem(ctx: SSL.Context, data: bytes, where: str) -> None:
    """Trust the certificates of PEM `data` in `ctx`, read by OpenSSL's own
    loader (as load_verify_locations reads a file: CERTIFICATE and TRUSTED
    CERTIFICATE blocks with their trust settings, CRLs; one linear pass)
    from a memfd, so the bytes checked and read once are the ones loaded.
    Raises TLSConfigError naming `where`."""
    if data.count(b"-----BEGIN ") > MAX_CA_CERTS:
        raise TLSConfigError(f"{where}: cannot load CA certificates: more than {MAX_CA_CERTS}"
                             " certificates")
    try:
        fd = os.memfd_create("sendooway-ca", os.MFD_CLOEXEC)
    except OSError as e:
        raise TLSConfigError(f"{where}: cannot load CA certificates: {e.strerror or e}") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        name = f"/proc/self/fd/{fd}"
        if not os.path.exists(name):
            raise TLSConfigError(f"{where}: cannot load CA certificates: /proc is not"
                                 " mounted (needed to hand them to OpenSSL)")
        ctx.load_verify_locations(os.fsencode(name))
    except SSL.Error as e:
        raise TLSConfigError(f"{where}: cannot load CA certificates ({_describe_openssl(e)})") from None
    except OSError as e:
        raise TLSConfigError(f"{where}: cannot load CA certificates: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _open_ca(ca_file: str) -> tuple[int, os.stat_result]:
    """The CA file, open. A route's sslCA may name a path a user chose, so
    it is opened with O_NONBLOCK (a FIFO there must not block the event
    loop that serves every session; open never waits) and must be a
    regular file of at most MAX_CA_FILE octets. Raises TLSConfigError."""
    try:
        fd = os.open(ca_file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise TLSConfigError(f"{ca_file}: cannot read CA certificates: {e.strerror or e}") from None
    st = os.fstat(fd)
    why = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
           f"larger than {MAX_CA_FILE >> 20} MiB" if st.st_size > MAX_CA_FILE else "")
    if why:
        os.close(fd)
        raise TLSConfigError(f"{ca_file}: cannot read CA certificates: {why}")
    return fd, st


def _read_ca(fd: int, ca_file: str) -> bytes:
    try:
        data = os.read(fd, MAX_CA_FILE + 1)
    except OSError as e:
        raise TLSConfigError(f"{ca_file}: cannot read CA certificates: {e.strerror or e}") from None
    if len(data) > MAX_CA_FILE:  # (it grew since fstat)
        raise TLSConfigError(f"{ca_file}: cannot read CA certificates: larger than"
                             f" {MAX_CA_FILE >> 20} MiB")
    return data


def read_ca_file(ca_file: str) -> bytes:
    """The CA file's bytes (see _open_ca). Raises TLSConfigError."""
    fd, _st = _open_ca(ca_file)
    try:
        return _read_ca(fd, ca_file)
    finally:
        os.close(fd)


def client_context(ca_file: str = "", verify: bool = True, ca_pem: str = "") -> SSL.Context:
    """A client context trusting `ca_pem` (PEM certificates), else `ca_file`
    (a PEM file), else the system store. `verify=False` (noCertCheck):
    failures are reported, not fatal."""
    ctx = _base_context(SSL.TLS_CLIENT_METHOD)
    if ca_file and not ca_pem:
        ca_pem = _pem_text(read_ca_file(ca_file))
    if ca_pem:
        _load_pem(ctx, ca_pem.encode("latin-1", "replace"), ca_file or "sslCA")
    else:
        ctx.set_default_verify_paths()
        if verify and not _system_store_loaded(ctx):
            raise TLSConfigError("cannot read the system's CA certificates"
                                 f" ({ssl.get_default_verify_paths().cafile}) now", "sslCA")
    ctx.set_verify(SSL.VERIFY_PEER, _record_verify)
    ctx.set_app_data(_ClientSettings(verify, ca_identity(ca_file, ca_pem)))
    return ctx


def _system_store_loaded(ctx: SSL.Context) -> bool:
    """False when the system's CA file exists but nothing came of it:
    set_default_verify_paths() says nothing of a file it could not open
    (out of descriptors), and a context kept for SYSTEM_STORE_TTL would
    then refuse every upstream's certificate that long."""
    if _lib is None or not hasattr(_lib, "X509_STORE_get0_objects"):
        return True  # (cannot tell: as before)
    if not ssl.get_default_verify_paths().cafile:  # (None: no such file; a directory only)
        return True
    try:
        objects = _lib.X509_STORE_get0_objects(ctx.get_cert_store()._store)
    except AttributeError:  # (a pyOpenSSL whose X509Store keeps it elsewhere: cannot tell)
        return True
    return _lib.sk_X509_OBJECT_num(objects) > 0


def _pem_text(data: bytes) -> str:
    return data.decode("latin-1")  # every octet kept: OpenSSL reads the bytes again


# Client contexts are reused: loading the system store costs ~4 ms, a CA file
# ~0.15 ms, on every upstream connection otherwise. A CA file's entry is
# renewed when the file changes; the system store's after SYSTEM_STORE_TTL.
# CA files: their contexts together hold at most CA_CACHE_BUDGET octets of
# PEM (a 1 MiB file of distinct certificates is ~11 MB of OpenSSL objects:
# one user naming many must not pin the memory of everyone's frontend).
SYSTEM_STORE_TTL = 300.0
_MAX_CACHED = 64
CA_CACHE_BUDGET = 2 << 20
_client_contexts: dict[tuple, tuple[float, SSL.Context]] = {}
_file_contexts: collections.OrderedDict[tuple, tuple[SSL.Context, int]] = collections.OrderedDict()
_failed_files: collections.OrderedDict[tuple, str] = collections.OrderedDict()


# The config's sslCA, read at start (preload_ca_file), before the privilege
# drop: its bytes by path, and (path, verify) -> its client context, made
# from them once (the noCertCheck one at first use: a big bundle costs some
# MB of OpenSSL objects per context).
_preloaded_data: dict[str, bytes] = {}
_preloaded: dict[tuple[str, bool], SSL.Context] = {}


def preload_ca_file(ca_file: str) -> None:
    """Read and load the config's sslCA now, while the frontend may still
    read what root may, as sslCert and sslKey are: frontendUser often may
    not (a 0600 file, a 0700 directory), and a missing or broken file then
    passed the start and failed every TLS route at MAIL with 454 (an
    outside review). Every route whose CA file is this path then uses these
    certificates for the rest of the run, file unread. Raises
    TLSConfigError naming the file."""
    data = read_ca_file(ca_file)
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"{ca_file}: cannot load CA certificates: no certificate in it"
                             " (PEM, -----BEGIN CERTIFICATE-----)")
    _preloaded[(ca_file, True)] = client_context(ca_file, True, _pem_text(data))  # checks it
    _preloaded_data[ca_file] = data
    pin_ca_file(ca_file)


def _preloaded_context(ca_file: str, verify: bool) -> SSL.Context | None:
    """The context for the config's sslCA read at start, or None when
    `ca_file` is not that file (or nothing was read at start)."""
    ctx = _preloaded.get((ca_file, verify))
    if ctx is None and ca_file in _preloaded_data:
        ctx = _preloaded[(ca_file, verify)] = client_context(
            ca_file, verify, _pem_text(_preloaded_data[ca_file]))
    return ctx


def cached_client_context(ca_file: str = "", verify: bool = True, ca_pem: str = "") -> SSL.Context:
    """client_context(ca_file, verify, ca_pem) for a CA given as PEM text (a
    route's own sslCA, from the authenticator; `ca_file` only names it) or
    for the system store, made once and reused while valid. A CA file is
    client_context_for's: read and parsed off the event loop."""
    if ca_file and not ca_pem:
        raise ValueError("a CA file is loaded by client_context_for")
    now = time.monotonic()
    key: tuple = (ca_identity(ca_file, ca_pem), verify) if ca_pem else ("", verify)
    hit = _client_contexts.get(key)
    if hit is not None and (ca_pem or now - hit[0] < SYSTEM_STORE_TTL):
        return hit[1]
    ctx = client_context(ca_file, verify, ca_pem)
    _remember_context(key, now, ctx)
    return ctx


_loads: dict[tuple, asyncio.Future] = {}
_loader = None  # one thread of its own: loads never hold up getaddrinfo in the default executor


async def client_context_for(ca_file: str = "", verify: bool = True,
                             ca_pem: str = "") -> SSL.Context:
    """cached_client_context for the event loop. A CA file not in the cache
    is read here (bounded, non-blocking) and parsed in a thread of its own,
    one load per file version at a time, shared by whoever waits for it;
    a file whose content failed to load is not tried again until it
    changes. The file may be one a user named (a route's sslCA): parsing
    it on the loop that serves every session, for each of that user's
    MAILs, stalled everyone (reviews)."""
    if ca_pem or not ca_file:  # a few KiB from the authenticator, or the system store
        return cached_client_context(ca_file, verify, ca_pem)
    if (ctx := _preloaded_context(ca_file, verify)) is not None:  # the config's, read at start
        return ctx
    fd, st = _open_ca(ca_file)  # an error here is retried next time: not the content's
    try:
        key = _file_key(ca_file, verify, st)
        ctx = _known_file(key)
        if ctx is not None:
            return ctx
        loading = _loads.get(key)
        if loading is not None and loading.get_loop() is not asyncio.get_running_loop():
            loading = None  # left by an event loop that ended before its load did
        data = _read_ca(fd, ca_file) if loading is None else b""
    finally:
        os.close(fd)
    if loading is None:
        global _loader
        if _loader is None:
            import concurrent.futures

            _loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ca-load")
        loop = asyncio.get_running_loop()
        try:
            loading = _loads[key] = loop.run_in_executor(_loader, _parse_file, ca_file, verify,
                                                         data)
        except RuntimeError as exc:  # no thread could start (RLIMIT_NPROC): tried next time
            raise TLSConfigError(f"{ca_file}: cannot load CA certificates now ({exc})",
                                 "sslCA") from None
        loading.add_done_callback(lambda f: _loaded(key, data, f))
    return await asyncio.shield(loading)


def _parse_file(ca_file: str, verify: bool, data: bytes) -> SSL.Context:
    return client_context(ca_file, verify, _pem_text(data))


def _loaded(key: tuple, data: bytes, future: asyncio.Future) -> None:
    """On the loop: a finished load goes into the cache (or its content
    error into the failures)."""
    if _loads.get(key) is future:
        del _loads[key]
    if future.cancelled():
        return
    exc = future.exception()
    if isinstance(exc, TLSConfigError):
        _remember_failure(key, exc)
    elif exc is None:
        _remember_file(key, future.result(), len(data))


def _file_key(ca_file: str, verify: bool, st: os.stat_result) -> tuple:
    """One version of a CA file (a change of its content changes ctime)."""
    return (ca_file, verify, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _known_file(key: tuple) -> SSL.Context | None:
    """The cached context for this file version, or None; raises the
    TLSConfigError of a version whose content failed before."""
    hit = _file_contexts.get(key)
    if hit is not None:
        _file_contexts.move_to_end(key)
        return hit[0]
    failed = _failed_files.get(key)
    if failed is not None:
        raise TLSConfigError(failed)
    return None


def _remember_failure(key: tuple, exc: TLSConfigError) -> None:
    """A file version whose content cannot be loaded: not tried again."""
    _failed_files[key] = str(exc)
    while len(_failed_files) > _MAX_CACHED:
        _failed_files.popitem(last=False)


_pinned_file = ""  # the admin's sslCA: never evicted by the files users name


def pin_ca_file(ca_file: str) -> None:
    """Keep `ca_file` (the config's sslCA) out of the budget: a user naming
    large CA files used to evict it, and every session of the global
    routes paid its reparse (~8 ms for a 1 MiB bundle)."""
    global _pinned_file
    _pinned_file = ca_file


def _remember_file(key: tuple, ctx: SSL.Context, size: int) -> None:
    for old in [k for k in _file_contexts if k[:2] == key[:2]]:  # older versions of the file
        del _file_contexts[old]
    _file_contexts[key] = (ctx, size)
    users = [k for k in _file_contexts if k[0] != _pinned_file]  # oldest first
    held = sum(_file_contexts[k][1] for k in users)
    for k in users[:-1]:  # the newest stays, whatever its size
        if held <= CA_CACHE_BUDGET and len(users) <= _MAX_CACHED:
            break
        held -= _file_contexts.pop(k)[1]
        users.remove(k)


def _remember_context(key: tuple, now: float, ctx: SSL.Context) -> None:
    while len(_client_contexts) >= _MAX_CACHED:
        del _client_contexts[next(iter(_client_contexts))]
    _client_contexts[key] = (now, ctx)


def context_verifies(ctx: SSL.Context) -> bool:
    settings = ctx.get_app_data()
    return bool(settings.verify) if isinstance(settings, _ClientSettings) else True


# Upstream sessions kept for resumption: (CA file, verify, server name, port)
# -> (the context it was made with, the session or None when resuming broke
# that server's handshake, the chain problems tolerated: noCertCheck). A
# session is offered only through the very context it was made with; the key
# does not hold contexts, so a context replaced (CA file changed, system
# store renewed) is not kept alive by its sessions.
MAX_SESSIONS = 256
_sessions: collections.OrderedDict[tuple, tuple[SSL.Context, SSL.Session | None, tuple[str, ...]]] = \
    collections.OrderedDict()


def client_connection(ctx: SSL.Context, server_hostname: str,
                      resume: tuple | None = None) -> SSL.Connection:
    """A memory-BIO client connection with SNI set (not for IP addresses,
    RFC 6066). `resume`: (server name, port) whose last session, made with
    this same context, is offered for resumption (see remember_session)."""
    conn = SSL.Connection(ctx, None)
    state = _VerifyState(context_verifies(ctx))
    conn.set_app_data(state)
    if server_hostname and not is_ip_address(server_hostname):
        try:
            sni = host_a_label(server_hostname).rstrip(".").encode("ascii")
        except ValueError:  # (the connect refuses such a name first)
            sni = None
        if sni:
            conn.set_tlsext_host_name(sni)
    if resume is not None:
        settings = ctx.get_app_data()
        state.key = (getattr(settings, "ca_file", None), state.verify, *resume)
        hit = _sessions.get(state.key)
        if hit is not None and hit[0] is ctx and hit[1] is not None:
            try:
                conn.set_session(hit[1])
                state.offered = hit
            except SSL.Error:  # not usable any more: a full handshake
                _sessions.pop(state.key, None)
    conn.set_connect_state()
    return conn


def remember_session(conn: SSL.Connection) -> None:
    """Keep the connection's session for the next connection to the same
    server (call it once a reply came over TLS: TLS 1.3 tickets arrive
    after the handshake)."""
    state = conn.get_app_data()
    if not isinstance(state, _VerifyState) or state.key is None:
        return
    if state.verify and state.errors:  # (cannot happen: the handshake failed)
        return
    ctx = conn.get_context()
    old = _sessions.get(state.key)
    if old is not None and old[1] is None and old[0] is ctx:
        return  # resuming broke this server's handshake once: not again
    try:
        session = conn.get_session()
    except SSL.Error:
        return
    if session is None:
        return
    _store(state.key, (ctx, session, tuple(state.errors)))


def _store(key: tuple, entry: tuple) -> None:
    _sessions[key] = entry
    _sessions.move_to_end(key)
    while len(_sessions) > MAX_SESSIONS:
        _sessions.popitem(last=False)


def resumption_failed(conn: SSL.Connection) -> bool:
    """A handshake failed: if it offered a kept session (and never got to the
    certificates), that server is not offered one again (some servers break
    on resumption). True when it was such a handshake.

    A full handshake to a server so marked that fails as well (the retry
    without resumption, or a later connection) clears the mark: the server,
    or the path to it, was down, and resumption was not to blame. (A server
    cut for a moment, its resumed handshake and the retry cut short, was
    never offered a session again while the context lived: for the config's
    sslCA, until the frontend's restart.)"""
    state = conn.get_app_data()
    if not isinstance(state, _VerifyState) or state.key is None:
        return False
    if state.offered is None:
        old = _sessions.get(state.key)
        if old is not None and old[1] is None and old[0] is conn.get_context():
            del _sessions[state.key]
        return False
    if state.checked:
        return False
    _store(state.key, (conn.get_context(), None, ()))
    return True


def forget_sessions() -> None:
    _sessions.clear()


def server_connection(ctx: SSL.Context) -> SSL.Connection:
    conn = SSL.Connection(ctx, None)
    conn.set_accept_state()
    return conn


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def check_server(conn: SSL.Connection, server_hostname: str, check_hostname: bool) -> list[str]:
    """After the handshake: the chain errors and the name check.

    Raises TLSVerifyError when the context verifies and something failed;
    otherwise returns the problems found (for the log)."""
    state = conn.get_app_data()
    if isinstance(state, _VerifyState) and state.offered is not None and not state.checked:
        # resumed: no certificates were exchanged; the chain problems are
        # those found when the session was made (noCertCheck only)
        state.resumed = True
        state.errors = list(state.offered[2])
    verify = state.verify if isinstance(state, _VerifyState) else True
    problems = list(state.errors) if isinstance(state, _VerifyState) else []
    if conn.get_peer_certificate() is None:
        problems.append("the server sent no certificate")
    elif check_hostname and server_hostname:
        name = server_hostname.strip("[]").rstrip(".")
        try:
            if is_ip_address(name):
                verify_ip_address(conn, name)
            else:
                # the A-label the lookup and SNI used (service_identity's own
                # IDNA 2008 refuses a capital in a U-label: Mail.Bücher.test)
                verify_hostname(conn, host_a_label(name).rstrip("."))
        except VerificationError as e:
            problems.append(f"certificate does not match {name}: {_describe_mismatch(e)}")
        except Exception as e:  # service_identity's other refusals (e.g. no SAN at all)
            problems.append(f"certificate does not match {name}: {e}")
    if problems and verify:
        raise TLSVerifyError("; ".join(problems))
    return problems


def _describe_mismatch(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if errors:
        return ", ".join(type(x).__name__ for x in errors)
    return str(e)
