"""Classic TLS connections handed to OpenSSL (Python ``ssl``) after our server read their ClientHello.

The QKD server reads the first flight itself to decide whether the peer offers QKD. When it does not (or the
policy falls back), the bytes already read are written first into an ``ssl.SSLObject`` over ``MemoryBIO``s and
OpenSSL completes a standard TLS handshake on the same connection. Pumping the BIOs ourselves (instead of
``wrap_socket`` or asyncio's TLS transport) is deliberate:

* the outgoing BIO is flushed on ``SSLError`` too, so OpenSSL's fatal alerts reach the peer (Python 3.11's
  asyncio TLS transport drops them, CPython gh-98078);
* bytes are consumed into the BIO rather than peeked, so a partial ClientHello never leaves a readable fd
  that spins an event loop;
* ``unwrap()`` on close sends close_notify.

:class:`ClassicSession` is sans-I/O; the ``*_blocking`` and ``*_async`` functions are the thin pumps for a
socket and for asyncio streams. Every pump takes a deadline.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

from qkdtls.tls.events import ConnectionInfo

_READ_CHUNK = 65536


class HandOffTimeout(TimeoutError):
    """The classic peer did not make progress before the deadline."""


class ClassicSession:
    """A server-side TLS connection run by OpenSSL, fed with bytes already read by the QKD server."""

    def __init__(self, context: ssl.SSLContext, initial_data: bytes = b"") -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshake_done = False
        self._closed = False
        if initial_data:
            self._incoming.write(initial_data)

    def __repr__(self) -> str:
        return f"ClassicSession(handshake_done={self._handshake_done}, closed={self._closed})"

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._ssl

    @property
    def handshake_done(self) -> bool:
        return self._handshake_done

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` is EOF."""
        if data:
            self._incoming.write(data)
        elif not self._incoming.eof:
            self._incoming.write_eof()

    def data_to_send(self) -> bytes:
        return self._outgoing.read()

    def handshake(self) -> bool:
        """Advance the handshake: True once complete, False if more input is needed.

        Raises ``ssl.SSLError`` on failure; the fatal alert OpenSSL produced is then in :meth:`data_to_send`.
        """
        if self._handshake_done:
            return True
        try:
            self._ssl.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            if self._incoming.eof:
                raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF during the classic handshake") from None
            return False
        self._handshake_done = True
        return True

    def read(self) -> bytes | None:
        """Decrypted bytes; ``b""`` at the end of the stream (close_notify or EOF); None: need input."""
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._ssl.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                if self._incoming.eof and not chunks:
                    return b""
                return b"".join(chunks) if chunks else None
            except ssl.SSLZeroReturnError:
                self._closed = True
                return b"".join(chunks)
            except ssl.SSLEOFError:
                # A peer that drops TCP without close_notify: end of stream (possible truncation).
                self._closed = True
                return b"".join(chunks)
            if not chunk:
                self._closed = True
                return b"".join(chunks)
            chunks.append(chunk)

    def send_data(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._ssl.write(view)
            view = view[written:]

    def close(self) -> None:
        """Queue close_notify (``unwrap``); a peer's close_notify is not waited for."""
        if self._closed and not self._handshake_done:
            return
        try:
            self._ssl.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # our close_notify is queued; the peer's answer is optional (RFC 8446 §6.1)
        except (ssl.SSLError, ValueError):
            pass  # already shut down or failed: nothing more to send
        self._closed = True

    def info(self, server_name: str | None = None) -> ConnectionInfo:
        """``server_name`` is the SNI the QKD server already parsed (OpenSSL does not expose it here)."""
        cipher = self._ssl.cipher()
        return ConnectionInfo(
            mode="classic",
            profile=None,
            key_id=None,
            peer_sae_id=None,
            cipher=cipher[0] if cipher else "",
            group=None,
            version=self._ssl.version() or "",
            alpn=self._ssl.selected_alpn_protocol(),
            server_name=server_name,
            peer_certificate=self._ssl.getpeercert(binary_form=True),
        )


# ----------------------------------------------------------------------------------------------------
# Blocking pumps (a connected socket)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise HandOffTimeout("classic TLS peer too slow")
    return left


def _flush_blocking(sock: socket.socket, session: ClassicSession) -> None:
    out = session.data_to_send()
    if out:
        sock.sendall(out)


def _recv_blocking(sock: socket.socket, session: ClassicSession, deadline: float) -> None:
    sock.settimeout(_remaining(deadline))
    try:
        data = sock.recv(_READ_CHUNK)
    except TimeoutError:
        raise HandOffTimeout("classic TLS peer too slow") from None
    session.receive_data(data)


def handshake_blocking(sock: socket.socket, session: ClassicSession, timeout: float) -> None:
    """Complete the classic handshake; on failure the alert is sent before ``ssl.SSLError`` propagates."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done = session.handshake()
        except ssl.SSLError:
            _flush_blocking(sock, session)
            raise
        _flush_blocking(sock, session)
        if done:
            return
        _recv_blocking(sock, session, deadline)


def recv_blocking(sock: socket.socket, session: ClassicSession, timeout: float) -> bytes:
    """Next application bytes; ``b""`` at the end of the stream."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = session.read()
        except ssl.SSLError:
            _flush_blocking(sock, session)
            raise
        _flush_blocking(sock, session)  # e.g. KeyUpdate answers
        if data is not None:
            return data
        _recv_blocking(sock, session, deadline)


def sendall_blocking(sock: socket.socket, session: ClassicSession, data: bytes) -> None:
    session.send_data(data)
    _flush_blocking(sock, session)


def close_blocking(sock: socket.socket, session: ClassicSession) -> None:
    """Send close_notify; never raises for a peer that is already gone."""
    session.close()
    try:
        _flush_blocking(sock, session)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------
# asyncio pumps (StreamReader/StreamWriter over plain TCP)


async def _flush_async(writer: asyncio.StreamWriter, session: ClassicSession) -> None:
    out = session.data_to_send()
    if out:
        writer.write(out)
        await writer.drain()


async def _recv_async(reader: asyncio.StreamReader, session: ClassicSession, deadline: float) -> None:
    try:
        data = await asyncio.wait_for(reader.read(_READ_CHUNK), _remaining(deadline))
    except TimeoutError:
        raise HandOffTimeout("classic TLS peer too slow") from None
    session.receive_data(data)


async def handshake_async(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: ClassicSession, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done = session.handshake()
        except ssl.SSLError:
            await _flush_async(writer, session)
            raise
        await _flush_async(writer, session)
        if done:
            return
        await _recv_async(reader, session, deadline)


async def recv_async(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: ClassicSession, timeout: float
) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = session.read()
        except ssl.SSLError:
            await _flush_async(writer, session)
            raise
        await _flush_async(writer, session)
        if data is not None:
            return data
        await _recv_async(reader, session, deadline)


async def send_async(writer: asyncio.StreamWriter, session: ClassicSession, data: bytes) -> None:
    session.send_data(data)
    await _flush_async(writer, session)


async def close_async(writer: asyncio.StreamWriter, session: ClassicSession) -> None:
    session.close()
    try:
        await _flush_async(writer, session)
    except (OSError, ConnectionError):
        pass
