"""SAE-side client of an ETSI GS QKD 014 KME: kept-alive mutual-TLS HTTPS, bounded timeouts, typed errors.

Hand-written on ``http.client`` + ``ssl`` because every TLS-QKD handshake waits on one KME request: a
kept-alive connection answers in ~0.3 ms where a new mutual-TLS connection costs ~3 ms, and the reference
client lost 42 ms per request to Nagle's algorithm meeting delayed ACKs (``http.client`` sets TCP_NODELAY; a
test checks it). A socket timeout bounds each ``recv`` only, so a peer dripping one byte at a time could
stretch a request indefinitely; a watchdog thread therefore shuts down any socket whose request outlives its
deadline, which makes ``timeout`` a hard bound on every call.

Key bytes never reach a log line, an exception message or a ``repr``; bodies of successful answers are never
quoted in errors (they carry keys).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import http.client
import json
import logging
import math
import os
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qkdtls.etsi014.models import (
    BadRequest,
    Key,
    KeyContainer,
    KeyIDs,
    KeyRequest,
    SaeInfo,
    Status,
    parse_key_id,
)

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024  # no ETSI 014 answer comes near this; refusing more keeps memory bounded
_I64 = (-(2**63), 2**63 - 1)
_DECIMAL = re.compile(r"-?[0-9]{1,19}")
_ERROR_TEXT_LIMIT = 300
_REFILL_BACKOFF = (0.2, 5.0)  # seconds: first and longest pause after a failed prefetch refill
T = TypeVar("T")


# --- errors -------------------------------------------------------------------------------------------------


class KmeClientError(Exception):
    """Base of every error of this client; the message says what to check and never contains key bytes."""


class KmeUnavailable(KmeClientError):
    """The KME could not be reached or did not answer in time (refused, reset, timeout, HTTP 503/5xx)."""


class KmeRefused(KmeClientError):
    """The KME refused the request (HTTP 4xx); ``status`` and ``message`` come from its ETSI Error body."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"KME refused the request (HTTP {status}): {message}{_hint(status)}")
        self.status = status
        self.message = message
        self.details = details


class KmeProtocolError(KmeClientError):
    """The KME answered something that is not ETSI 014 (not HTTP, not JSON, wrong fields, wrong KME ID)."""


class KmeTlsError(KmeClientError):
    """The TLS handshake with the KME failed: its certificate is not trusted, or it refused ours."""


def _hint(status: int) -> str:
    if status == 401:
        return " (is this SAE's certificate registered in the KME configuration?)"
    if status == 404:
        return " (is the KME URL right?)"
    return ""


# --- settings -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KmeClientSettings:
    url: str  # "https://127.0.0.1:8443" (the KME's SAE interface)
    certfile: Path  # the SAE's client certificate
    keyfile: Path
    cafile: Path  # CA that issued the KME server certificate
    timeout: float = 5.0  # bound for every request (connect + read), seconds
    pool_size: int = 4  # kept-alive connections
    prefetch: int = 0  # keys kept ready per target SAE (0 = off)
    expected_kme_id: int | None = None  # if set, the KME must say this KME_ID (ETSI 014 §5.1)
    # Prefetched keys older than this are dropped unused: the slave KME forgets a reservation after its
    # reservation_ttl (600 s by default), and a key the slave cannot collect would fail the handshake.
    prefetch_max_age: float = 300.0

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")
        if self.pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if self.prefetch < 0:
            raise ValueError("prefetch must be 0 (off) or positive")


# --- watchdog -----------------------------------------------------------------------------------------------


class _Watchdog:
    """Shuts down the socket of any request that passes its deadline, waking the blocked reader.

    One per process, shared by all clients: its thread sleeps until the earliest armed deadline. Arming wakes
    the thread only when the new deadline is earlier than its planned wake-up: with requests of equal timeout
    that is about once per timeout, not once per request (a thread switch on every KME request's path).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[_Connection, float] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = math.inf  # when the thread next looks at the deadlines on its own

    def arm(self, conn: _Connection) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kme-client-watchdog", daemon=True)
                self._thread.start()
            conn.fired = False
            self._armed[conn] = conn.deadline
            if conn.deadline < self._wake_at:
                self._wake_at = conn.deadline
                self._cond.notify()

    def disarm(self, conn: _Connection) -> bool:
        """Stop watching ``conn``; True if the watchdog already shut it down."""
        with self._cond:
            self._armed.pop(conn, None)
            return conn.fired

    def _reset_after_fork(self) -> None:
        # The child of a fork has no watchdog thread and inherits a lock possibly held by it: start afresh.
        self._cond = threading.Condition()
        self._armed = {}
        self._thread = None
        self._wake_at = math.inf

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for conn, deadline in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[conn]
                        conn.fired = True
                        conn.abort()
                self._wake_at = min(self._armed.values(), default=math.inf)
                self._cond.wait(None if self._wake_at == math.inf else max(0.0, self._wake_at - now))


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG._reset_after_fork)


# --- connections --------------------------------------------------------------------------------------------


class _Connection(http.client.HTTPSConnection):
    """One kept-alive HTTPS connection; ``connect`` arms the watchdog before the TLS handshake."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, watchdog: _Watchdog) -> None:
        super().__init__(host, port, context=context)
        self._watchdog = watchdog
        self._context_ref = context
        # A second descriptor of the same socket: shutdown() through it wakes a reader blocked in another
        # thread without touching the SSL object that thread is using.
        self._wake: socket.socket | None = None
        self.deadline = 0.0
        self.fired = False
        self.opened = 0

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP connect (bounded by self.timeout) + TCP_NODELAY
        assert self.sock is not None
        self._wake = self.sock.dup()
        self.opened += 1
        self._watchdog.arm(self)
        self.sock = self._context_ref.wrap_socket(self.sock, server_hostname=self.host)

    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        # http.client writes the head and a bytes body with two send() calls: two TLS records, two wake-ups
        # of the KME for one request. Every body here is small bytes: send it with the head.
        if isinstance(message_body, bytes) and not encode_chunked:
            self._buffer.extend((b"", message_body))  # type: ignore[attr-defined]
            message = b"\r\n".join(self._buffer)  # type: ignore[attr-defined]
            del self._buffer[:]  # type: ignore[attr-defined]
            self.send(message)
            return
        super()._send_output(message_body, encode_chunked)  # type: ignore[misc]

    def abort(self) -> None:
        if self._wake is not None:
            try:
                self._wake.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer

    def close(self) -> None:
        super().close()
        if self._wake is not None:
            self._wake.close()
            self._wake = None

    def idle_and_alive(self) -> bool:
        """False if the server closed this idle connection (EOF or stray bytes are readable)."""
        if self.sock is None:
            return False
        # poll, not select: select() cannot watch descriptors numbered 1024 or above.
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        try:
            return not poller.poll(0)
        except OSError:
            return False


class _StaleConnection(Exception):
    """A kept-alive connection turned out closed before the request got any answer: retry once."""


# Failures that on a reused connection mean the server had closed it while idle.
_STALE = (
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
    http.client.RemoteDisconnected,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


# --- the client ---------------------------------------------------------------------------------------------


class KmeClient:
    """Blocking, thread-safe ETSI 014 client for one SAE talking to its KME."""

    def __init__(self, settings: KmeClientSettings) -> None:
        self.settings = settings
        parts = urllib.parse.urlsplit(settings.url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"KME url must be https://HOST[:PORT], got {settings.url!r}")
        self._host = parts.hostname
        self._port = parts.port or 443
        self._base = parts.path.rstrip("/")
        self._origin = f"https://{parts.netloc}"
        self._context = self._make_context(settings)
        self._watchdog = _WATCHDOG
        self._slots = threading.BoundedSemaphore(settings.pool_size)
        self._idle: list[_Connection] = []
        self._all: list[_Connection] = []
        self._lock = threading.Lock()
        self._info: SaeInfo | None = None
        self._requests = 0
        self._closed = False
        self._prefetcher = _Prefetcher(self) if settings.prefetch > 0 else None

    @staticmethod
    def _make_context(settings: KmeClientSettings) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=str(settings.cafile))
            context.load_cert_chain(str(settings.certfile), str(settings.keyfile))
        except (OSError, ssl.SSLError) as exc:
            raise KmeClientError(
                f"cannot load the SAE credentials (certfile={settings.certfile}, keyfile={settings.keyfile}, "
                f"cafile={settings.cafile}): {exc}"
            ) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    # -- ETSI 014 operations ---------------------------------------------------------------------------------

    def sae_info(self) -> SaeInfo:
        """Who the KME says this SAE is (``GET /api/v1/sae/info/me``); cached after the first call."""
        with self._lock:
            if self._info is not None:
                return self._info
        doc = self._call("GET", "/api/v1/sae/info/me")
        info = _decode(SaeInfo.from_json, doc, "SAE info")
        expected = self.settings.expected_kme_id
        if expected is not None and expected != info.KME_ID:
            raise KmeProtocolError(
                f"{self._origin} says it is KME {info.KME_ID}, but this SAE expects KME {expected}: "
                "check the KME url"
            )
        with self._lock:
            self._info = info
        return info

    def status(self, slave_sae_id: int | str) -> Status:
        self._confirm_kme()
        doc = self._call("GET", f"/api/v1/keys/{_sae_id(slave_sae_id)}/status")
        status = _decode(Status.from_json, doc, "Status")
        expected = self.settings.expected_kme_id
        if expected is not None and status.source_KME_ID != str(expected):
            raise KmeProtocolError(
                f"status names source KME {status.source_KME_ID}, but this SAE expects KME {expected}"
            )
        return status

    def enc_keys(
        self,
        slave_sae_id: int | str,
        number: int | None = None,
        size: int | None = None,
        additional_slave_sae_ids: Sequence[int | str] = (),
        *,
        method: str = "POST",
    ) -> KeyContainer:
        """New keys for this SAE (master) and ``slave_sae_id``; ``size`` in bits."""
        self._confirm_kme()
        path = f"/api/v1/keys/{_sae_id(slave_sae_id)}/enc_keys"
        request = KeyRequest(
            number=number,
            size=size,
            additional_slave_SAE_IDs=tuple(_sae_id(s) for s in additional_slave_sae_ids),
        )
        if method == "POST":
            doc = self._call("POST", path, request.to_json())
        elif method == "GET":
            if additional_slave_sae_ids:
                raise ValueError("additional slave SAE IDs need POST (ETSI 014 §5.2)")
            query = {k: str(v) for k, v in (("number", number), ("size", size)) if v is not None}
            doc = self._call("GET", path + ("?" + urllib.parse.urlencode(query) if query else ""))
        else:
            raise ValueError(f"method must be GET or POST, got {method!r}")
        return _decode(KeyContainer.from_json, doc, "Key container")

    def dec_keys(
        self, master_sae_id: int | str, key_ids: Sequence[str], *, method: str = "POST"
    ) -> KeyContainer:
        """The keys ``key_ids`` that master SAE ``master_sae_id`` obtained for this SAE (slave)."""
        self._confirm_kme()
        ids = tuple(parse_key_id(k) for k in key_ids)
        if not ids:
            raise ValueError("dec_keys needs at least one key ID")
        path = f"/api/v1/keys/{_sae_id(master_sae_id)}/dec_keys"
        if method == "POST":
            doc = self._call("POST", path, KeyIDs(ids).to_json())
        elif method == "GET":
            if len(ids) != 1:
                raise ValueError("GET dec_keys takes exactly one key ID (ETSI 014 §5.3); use POST")
            doc = self._call("GET", f"{path}?{urllib.parse.urlencode({'key_ID': ids[0]})}")
        else:
            raise ValueError(f"method must be GET or POST, got {method!r}")
        container = _decode(KeyContainer.from_json, doc, "Key container")
        if sorted(k.key_ID for k in container.keys) != sorted(ids):
            raise KmeProtocolError("the KME answered dec_keys with other keys than those asked for")
        return container

    def get_key(self, slave_sae_id: int | str, size: int | None = None) -> Key:
        """One key for ``slave_sae_id``: from the prefetch pool when enabled, else one ``enc_keys`` call."""
        target = _sae_id(slave_sae_id)
        if self._prefetcher is not None:
            key = self._prefetcher.take(target, size)
            if key is not None:
                return key
        container = self.enc_keys(target, number=1, size=size)
        if not container.keys:
            raise KmeProtocolError("the KME answered enc_keys with no key")
        return container.keys[0]

    def admin_links(self) -> list[dict[str, Any]]:
        """The KME's QKD links with stock and entropy (``GET /api/v1/admin/links``; needs an admin cert)."""
        doc = self._call("GET", "/api/v1/admin/links")
        links = doc.get("links") if isinstance(doc, dict) else None
        if not isinstance(links, list) or not all(isinstance(link, dict) for link in links):
            raise KmeProtocolError("admin/links answer lacks a links array of objects")
        return links

    # -- lifecycle -------------------------------------------------------------------------------------------

    def prefetch_available(self, slave_sae_id: int | str, size: int | None = None) -> int:
        """Keys ready in the prefetch pool for ``slave_sae_id`` (0 when prefetch is off)."""
        if self._prefetcher is None:
            return 0
        return self._prefetcher.available(_sae_id(slave_sae_id), size)

    @property
    def connections_opened(self) -> int:
        """TCP connections opened so far (kept-alive reuse keeps this low)."""
        with self._lock:
            return sum(conn.opened for conn in self._all)

    @property
    def requests_sent(self) -> int:
        with self._lock:
            return self._requests

    def close(self) -> None:
        """Stop prefetching (unused prefetched keys are dropped) and close every connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._prefetcher is not None:
            self._prefetcher.close()
        with self._lock:
            conns, self._idle = list(self._all), []
        for conn in conns:
            conn.close()

    def __enter__(self) -> KmeClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KmeClient(url={self.settings.url!r}, certfile={str(self.settings.certfile)!r})"

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _confirm_kme(self) -> None:
        if self.settings.expected_kme_id is not None:
            self.sae_info()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; returns the decoded JSON of a 200 answer or raises a :class:`KmeClientError`."""
        deadline = time.monotonic() + self.settings.timeout
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        url = self._base + path
        conn = self._checkout(deadline)
        started = time.perf_counter()
        try:
            try:
                status, data = self._exchange(conn, method, url, payload, headers, deadline)
            except _StaleConnection:
                conn.close()  # closed by the server while idle: one fresh connection, same deadline
                status, data = self._exchange(conn, method, url, payload, headers, deadline)
        finally:
            self._checkin(conn)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "KME request",
                extra={
                    "event": "kme_client.request",
                    "method": method,
                    "path": path.split("?")[0],
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 3),
                },
            )
        return self._interpret(status, data)

    def _checkout(self, deadline: float) -> _Connection:
        if self._closed:
            raise KmeClientError("this KME client is closed")
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise KmeUnavailable(
                f"all {self.settings.pool_size} connections to {self._origin} stayed busy for "
                f"{self.settings.timeout} s; raise pool_size or timeout"
            )
        with self._lock:
            self._requests += 1
            if self._idle:
                conn = self._idle.pop()  # most recently used first: the warmest connection
                if conn.sock is not None and not conn.idle_and_alive():
                    conn.close()  # the server closed it while idle: reconnect instead of failing once
                return conn
            conn = _Connection(self._host, self._port, self._context, self._watchdog)
            self._all.append(conn)
            return conn

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if self._closed:
                conn.close()
            else:
                self._idle.append(conn)
        self._slots.release()

    def _exchange(
        self,
        conn: _Connection,
        method: str,
        url: str,
        payload: bytes | None,
        headers: dict[str, str],
        deadline: float,
    ) -> tuple[int, bytes]:
        reused = conn.sock is not None
        answered = False
        conn.deadline = deadline
        conn.fired = False
        try:
            if reused:
                self._watchdog.arm(conn)
            else:
                conn.timeout = _remaining(deadline)
                conn.connect()
            _set_timeout(conn, deadline)
            conn.request(method, url, body=payload, headers=headers)
            _set_timeout(conn, deadline)
            response = conn.getresponse()
            answered = True
            data = _read_body(conn, response, deadline)
            if self._watchdog.disarm(conn):
                raise TimeoutError  # a body cut short by the watchdog can look complete (EOF-delimited)
            if response.will_close:
                conn.close()
            return response.status, data
        except BaseException as exc:
            fired = self._watchdog.disarm(conn)
            conn.close()
            if fired or isinstance(exc, TimeoutError):
                raise KmeUnavailable(
                    f"{self._origin} did not answer within {self.settings.timeout} s"
                ) from None
            if reused and not answered and isinstance(exc, _STALE):
                raise _StaleConnection() from None
            raise self._translate(exc, fresh=not reused) from None
        finally:
            self._watchdog.disarm(conn)

    def _translate(self, exc: BaseException, *, fresh: bool) -> BaseException:
        where = self._origin
        if isinstance(exc, ssl.SSLCertVerificationError):
            return KmeTlsError(
                f"the certificate of {where} did not verify ({exc.verify_message}); check cafile and the "
                "host name in the url"
            )
        if isinstance(exc, ssl.SSLError):
            return KmeTlsError(
                f"TLS with {where} failed ({exc.reason or exc}); check that the KME trusts the CA of this "
                "SAE's certificate"
            )
        if isinstance(exc, ConnectionRefusedError):
            return KmeUnavailable(f"{where} refused the connection; is the KME running at this url?")
        if isinstance(exc, (ConnectionError, http.client.RemoteDisconnected)):
            # Under TLS 1.3 a server that refuses the client certificate does so after the client finished
            # its handshake, and often just closes: say so when it happens on a new connection.
            hint = "; does the KME trust the CA of this SAE's certificate?" if fresh else ""
            return KmeUnavailable(f"{where} closed the connection without an answer{hint}")
        if isinstance(exc, http.client.IncompleteRead):
            return KmeUnavailable(f"{where} closed the connection in the middle of an answer")
        if isinstance(exc, http.client.HTTPException):
            return KmeProtocolError(f"{where} did not answer with valid HTTP ({type(exc).__name__})")
        if isinstance(exc, KmeClientError):
            return exc
        if isinstance(exc, OSError):
            return KmeUnavailable(f"cannot reach {where}: {exc.strerror or exc}")
        return exc

    def _interpret(self, status: int, data: bytes) -> Any:
        if status == 200:
            try:
                return json.loads(data)
            except ValueError:
                raise KmeProtocolError(
                    f"{self._origin} answered HTTP 200 with a body that is not JSON"
                ) from None
        message, details = _error_body(data)
        if status == 503 or 500 <= status <= 599:
            raise KmeUnavailable(
                f"{self._origin} is unavailable (HTTP {status}): {message or 'no Error body'}; retry later"
            )
        if 400 <= status <= 499:
            raise KmeRefused(status, message or f"HTTP {status} without an ETSI Error body", details)
        raise KmeProtocolError(f"{self._origin} answered HTTP {status}, which ETSI 014 does not use")


# --- prefetch -----------------------------------------------------------------------------------------------


class _Prefetcher:
    """Keeps up to ``prefetch`` keys ready per (target SAE, size); a background thread refills in batches.

    A pool is refilled once it is down to half its depth, and then up to full: a refill after every key taken
    would put a KME request (and the KME-to-KME reservation behind it) on the machine during nearly every
    handshake, while batches of half the depth cost one request per ``prefetch / 2`` handshakes.
    """

    def __init__(self, client: KmeClient) -> None:
        self._client = client
        self._depth = client.settings.prefetch
        self._max_age = client.settings.prefetch_max_age
        self._cond = threading.Condition()
        self._pools: dict[tuple[str, int | None], collections.deque[tuple[float, Key]]] = {}
        self._batch: dict[tuple[str, int | None], int] = {}
        self._retry_at: dict[tuple[str, int | None], float] = {}
        self._low = self._depth // 2  # refill at or below this many keys ...
        self._filling: set[tuple[str, int | None]] = set()  # ... until full again
        self._backoff: dict[tuple[str, int | None], float] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kme-client-prefetch", daemon=True)
        self._thread.start()

    def take(self, target: str, size: int | None) -> Key | None:
        pool_id = (target, size)
        with self._cond:
            pool = self._pools.setdefault(pool_id, collections.deque())
            oldest_allowed = time.monotonic() - self._max_age
            while pool and pool[0][0] < oldest_allowed:
                pool.popleft()
            key = pool.popleft()[1] if pool else None
            if len(pool) <= self._low:
                self._cond.notify()  # only then: waking the refill thread on every take costs the caller
            return key

    def available(self, target: str, size: int | None = None) -> int:
        with self._cond:
            return len(self._pools.get((target, size), ()))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._pools.clear()
            self._cond.notify()
        self._thread.join(timeout=self._client.settings.timeout + 1.0)

    def _next_job(self) -> tuple[tuple[str, int | None], int] | None:
        """Under the lock: a pool that needs keys and may be retried now, with how many to ask for."""
        now = time.monotonic()
        for pool_id, pool in self._pools.items():
            if len(pool) <= self._low:
                self._filling.add(pool_id)
            missing = self._depth - len(pool)
            if missing <= 0:
                self._filling.discard(pool_id)
            elif pool_id in self._filling and self._retry_at.get(pool_id, 0.0) <= now:
                return pool_id, min(missing, self._batch.get(pool_id, self._depth))
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._closed:
                    job = self._next_job()
                    if job is not None:
                        break
                    retry = [t for t in self._retry_at.values() if t > time.monotonic()]
                    self._cond.wait(min(retry) - time.monotonic() if retry else None)
                if self._closed or job is None:
                    return
            (target, size), number = job
            try:
                self._refill(target, size, number)
            except Exception as exc:  # a failed refill must not end prefetching: callers fall back meanwhile
                with self._cond:
                    previous = self._backoff.get((target, size), _REFILL_BACKOFF[0] / 2)
                    pause = min(previous * 2, _REFILL_BACKOFF[1])
                    self._backoff[(target, size)] = pause
                    self._retry_at[(target, size)] = time.monotonic() + pause
                log.warning(
                    "prefetch refill failed",
                    extra={"event": "kme_client.prefetch_failed", "slave_SAE_ID": target, "error": str(exc)},
                )

    def _refill(self, target: str, size: int | None, number: int) -> None:
        pool_id = (target, size)
        if pool_id not in self._batch:
            # One status call teaches the KME's batch limit, so refills never ask for more than it allows.
            limit = self._client.status(target).max_key_per_request
            with self._cond:
                self._batch[pool_id] = max(1, min(limit, self._depth))
            number = min(number, self._batch[pool_id])
        container = self._client.enc_keys(target, number=number, size=size)
        now = time.monotonic()
        with self._cond:
            self._backoff.pop(pool_id, None)
            self._retry_at.pop(pool_id, None)
            if self._closed:
                return
            pool = self._pools.setdefault(pool_id, collections.deque())
            pool.extend((now, key) for key in container.keys)


# --- asyncio ------------------------------------------------------------------------------------------------


class AsyncKmeClient:
    """The same operations as coroutines; each runs the blocking client in the loop's default executor."""

    def __init__(self, settings: KmeClientSettings) -> None:
        self.sync = KmeClient(settings)

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

    async def sae_info(self) -> SaeInfo:
        return await self._run(self.sync.sae_info)

    async def status(self, slave_sae_id: int | str) -> Status:
        return await self._run(self.sync.status, slave_sae_id)

    async def enc_keys(
        self,
        slave_sae_id: int | str,
        number: int | None = None,
        size: int | None = None,
        additional_slave_sae_ids: Sequence[int | str] = (),
        *,
        method: str = "POST",
    ) -> KeyContainer:
        return await self._run(
            self.sync.enc_keys, slave_sae_id, number, size, additional_slave_sae_ids, method=method
        )

    async def dec_keys(
        self, master_sae_id: int | str, key_ids: Sequence[str], *, method: str = "POST"
    ) -> KeyContainer:
        return await self._run(self.sync.dec_keys, master_sae_id, key_ids, method=method)

    async def get_key(self, slave_sae_id: int | str, size: int | None = None) -> Key:
        return await self._run(self.sync.get_key, slave_sae_id, size)

    async def admin_links(self) -> list[dict[str, Any]]:
        return await self._run(self.sync.admin_links)

    async def close(self) -> None:
        await self._run(self.sync.close)

    async def __aenter__(self) -> AsyncKmeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


# --- helpers ------------------------------------------------------------------------------------------------


def _sae_id(value: int | str) -> str:
    """The decimal form of a signed 64-bit SAE ID, for URL paths and request bodies."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value):
        number = int(value)
    if number is None or not _I64[0] <= number <= _I64[1]:
        raise ValueError(f"an SAE ID is a signed 64-bit integer, got {value!r}")
    return str(number)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _set_timeout(conn: _Connection, deadline: float) -> None:
    if conn.sock is not None:
        conn.sock.settimeout(_remaining(deadline))


def _read_body(conn: _Connection, response: http.client.HTTPResponse, deadline: float) -> bytes:
    length = response.getheader("Content-Length")
    if length is not None and (not length.strip().isdigit() or int(length) > MAX_BODY):
        raise KmeProtocolError(f"the KME announced a body of {length[:20]!r} bytes (limit {MAX_BODY})")
    chunks: list[bytes] = []
    total = 0
    while True:
        _set_timeout(conn, deadline)
        chunk = response.read1(65536)
        if not chunk:
            if response.length:  # read1 reports a connection closed mid-body as a short read, not an error
                raise http.client.IncompleteRead(b"", response.length)
            # Marks the exchange complete so the connection can carry the next request (the socket stays).
            response.close()
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_BODY:
            raise KmeProtocolError(f"the KME sent a body longer than {MAX_BODY} bytes")
        chunks.append(chunk)


def _error_body(data: bytes) -> tuple[str, list[dict[str, Any]] | None]:
    """``message`` and ``details`` of an ETSI 014 Error body, or ``("", None)``."""
    try:
        doc = json.loads(data)
    except ValueError:
        return "", None
    if not isinstance(doc, dict) or not isinstance(doc.get("message"), str):
        return "", None
    details = doc.get("details")
    if not isinstance(details, list) or not all(isinstance(d, dict) for d in details):
        details = None
    return doc["message"][:_ERROR_TEXT_LIMIT], details


def _decode(parse: Callable[[Any], T], doc: Any, what: str) -> T:
    try:
        return parse(doc)
    except BadRequest as exc:
        raise KmeProtocolError(f"the KME's {what} answer is not ETSI 014: {exc.message}") from None
