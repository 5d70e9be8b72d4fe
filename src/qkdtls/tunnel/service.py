"""One tunnel service: its listener, its TLS-QKD context, and the set-up of each connection.

Client mode accepts plaintext TCP, asks its KME for a key (``QKDContext.prepare_offer``, in a worker
thread), then opens TCP to the remote tunnel and runs the TLS-QKD handshake; the plaintext connection is
not read until the TLS side is up. Server mode accepts TLS-QKD (the handshake with its own deadline), then
opens TCP to the local target; the TLS side is not read until the target answers. In both, the connection
counts against ``max_connections`` from its accept, so set-ups waiting for a KME are capped too.

A reload swaps the service's settings and context for new connections (the listening socket stays when its
address is unchanged); running connections keep the context they started with, which is closed once the last
of them ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from qkdtls.logs import LogLimiter
from qkdtls.net.aio import TLSProtocol
from qkdtls.net.context import PreparedOffer, QKDContext
from qkdtls.net.errors import (
    QKDConfigurationError,
    QKDError,
    QKDHandshakeTimeout,
    QKDKeyUnavailable,
    QKDPolicyError,
)
from qkdtls.serving import listening_socket
from qkdtls.tunnel.config import ServiceConfig, is_ip
from qkdtls.tunnel.relay import Relay

log = logging.getLogger("qkdtls.tunnel")
# Failed set-ups can be caused by strangers (server mode) or by a KME outage (client mode): rate-limited.
limited_log = LogLimiter(log, burst=10, interval=10.0)


def build_context(config: ServiceConfig) -> QKDContext:
    """The TLS-QKD context of a service (it owns its KME client: kept-alive connections, prefetch pool)."""
    kme = config.kme.client_settings(config.prefetch) if config.kme is not None else None
    common: dict[str, Any] = {
        "kme": kme,
        "qkd": config.qkd,
        "profiles": config.profiles,
        "alpn_protocols": config.alpn,
        "handshake_timeout": config.handshake_timeout,
        "allow_keys_without_holders": config.allow_keys_without_holders,
    }
    if config.mode == "client":
        context = QKDContext(
            "client",
            certfile=config.cert,
            keyfile=config.key,
            cafile=config.cafile,
            check_hostname=config.verify,
            sae_directory=config.sae_directory,
            prefetch=config.prefetch,
            rekey_after_bytes=config.rekey_after_bytes,
            rekey_after_seconds=config.rekey_after_seconds,
            announce_keys=config.announce_keys,
            **common,
        )
        context.verify = config.verify
        return context
    context = QKDContext(
        "server",
        certfile=config.cert,
        keyfile=config.key,
        cafile=config.cafile,
        accept_key_announcements=config.accept_key_announcements,
        allowed_peer_sae_ids=config.allowed_peer_sae_ids,
        max_kme_lookups=config.max_kme_lookups,
        max_kme_lookups_per_source=config.max_kme_lookups_per_source,
        used_key_memory=config.used_key_memory,
        **common,
    )
    context.check_server_access()
    return context


def announced_offer(context: QKDContext, config: ServiceConfig) -> PreparedOffer | None:
    """A key already announced to the remote tunnel, taken without leaving the event loop (memory only), or
    None: then ``prepare_offer`` runs in a worker thread (it may ask the KME). Taking the announced key
    atomically is what keeps the event loop from ever waiting for a KME here."""
    host, port = config.connect
    name = config.server_hostname or host
    target = context.resolve_target(name, port, config.target_sae_id, peer_ip=host if is_ip(host) else None)
    if target is None or context.keys.kme is None:
        return None
    offer = context.keys.announced.take(name, port, target)
    if offer is None:
        return None
    offer = dataclasses.replace(offer, profiles=context.profiles)
    return PreparedOffer(name, port, config.server_hostname, target, offer, resolved=True)


def _reason_of(exc: BaseException) -> str:
    if isinstance(exc, QKDHandshakeTimeout | TimeoutError):
        return "handshake_timeout"
    if isinstance(exc, QKDPolicyError):
        return "policy"
    if isinstance(exc, QKDKeyUnavailable | QKDConfigurationError):
        return "kme_unavailable"
    return "handshake_failed"


class _Generation:
    """A service's settings and context as of one (re)load; closed when unused and replaced."""

    def __init__(self, config: ServiceConfig, context: QKDContext) -> None:
        self.config = config
        self.context = context
        self.connections = 0
        self.retired = False

    def release(self) -> None:
        self.connections -= 1
        if self.retired and self.connections == 0:
            close_context(self.context)


def close_context(context: QKDContext) -> None:
    """Close a context off the event loop: its KME client waits (bounded) for a prefetch in flight."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        context.close()
        return
    loop.run_in_executor(None, context.close)


class _Refuse(asyncio.Protocol):
    """An accepted connection over the service's limit: closed at once (RST, nothing read)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


class Service:
    """A running service (one listener)."""

    def __init__(
        self,
        config: ServiceConfig,
        context: QKDContext,
        on_record: Callable[[Relay, ServiceConfig], None],
        on_refused: Callable[[str], None],
    ) -> None:
        self.name = config.name
        self._gen = _Generation(config, context)
        self._on_record = on_record
        self._on_refused = on_refused
        self.relays: set[Relay] = set()
        # Server side: connections accepted whose handshake is running, oldest first.
        self._handshaking: dict[Relay, TLSProtocol] = {}
        self.server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = False

    @property
    def config(self) -> ServiceConfig:
        return self._gen.config

    @property
    def context(self) -> QKDContext:
        return self._gen.context

    # -- listener --------------------------------------------------------------------------------------------

    async def start(self, backlog: int = 1024) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.config.accept
        sock = await listening_socket(host, port, backlog)
        self.address = sock.getsockname()[:2]
        self.server = await loop.create_server(self._accepted, sock=sock)

    def stop_listening(self) -> None:
        self._stopped = True  # connections the kernel still hands over are refused
        if self.server is not None:
            self.server.close()
            self.server = None

    def replace(self, config: ServiceConfig, context: QKDContext) -> None:
        """New settings for new connections (reload); running ones keep theirs."""
        old = self._gen
        self._gen = _Generation(config, context)
        self.retire(old)

    @staticmethod
    def retire(gen: _Generation) -> None:
        gen.retired = True
        if gen.connections == 0:
            close_context(gen.context)

    def close(self) -> None:
        """After the last connection: the context goes."""
        self.retire(self._gen)

    # -- connections -----------------------------------------------------------------------------------------

    def _accepted(self) -> asyncio.Protocol:
        gen = self._gen
        config = gen.config
        if len(self.relays) >= config.max_connections or self._stopped:
            self._on_refused(self.name)
            limited_log(
                logging.WARNING,
                "connection refused: service at its connection limit",
                {"event": "tunnel.refused", "service": self.name, "limit": config.max_connections},
            )
            return _Refuse()
        gen.connections += 1
        tls_index = 1 if config.mode == "client" else 0
        relay = Relay(
            service=self.name,
            peer="?",
            target=f"{config.connect[0]}:{config.connect[1]}",
            tls_index=tls_index,
            idle_timeout=config.idle_timeout,
            on_done=lambda r: self._done(r, gen),
        )
        self.relays.add(relay)
        if config.mode == "client":
            self._spawn(self._open_client(relay, gen))
            return relay.sides[0]
        return self._server_protocol(relay, gen)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _done(self, relay: Relay, gen: _Generation) -> None:
        self.relays.discard(relay)
        self._handshaking.pop(relay, None)
        gen.release()
        self._on_record(relay, gen.config)

    # client mode: plaintext accepted, TLS-QKD out

    async def _open_client(self, relay: Relay, gen: _Generation) -> None:
        config, context = gen.config, gen.context
        host, port = config.connect
        started = time.monotonic()
        try:
            proto = await self._connect_tls(relay, config, context)
        except (QKDError, TimeoutError) as exc:
            relay.fail(
                _reason_of(exc), str(exc) or f"no TLS-QKD connection within {config.handshake_timeout:g} s"
            )
            return
        except OSError as exc:
            relay.fail("connect_failed", f"{host}:{port}: {exc.strerror or exc}")
            return
        if proto is None:
            return
        relay.handshake_seconds = time.monotonic() - started
        relay.info = proto.session.info if proto.session is not None else None
        relay.tls = proto
        if relay.reason is not None:
            proto.app_transport.close()
            return
        proto.attach(relay.sides[1])

    @staticmethod
    async def _connect_tls(relay: Relay, config: ServiceConfig, context: QKDContext) -> TLSProtocol | None:
        """KME requests first, then TCP and the handshake, all within handshake_timeout. None: the local
        client left meanwhile (a key already taken is lost, as a failed one)."""
        loop = asyncio.get_running_loop()
        host, port = config.connect
        deadline = loop.time() + config.handshake_timeout
        async with asyncio.timeout_at(deadline):
            prepared = None
            if config.qkd != "off":
                prepared = announced_offer(context, config)
                if prepared is None:  # may ask the KME: a worker thread, never the event loop
                    prepared = await asyncio.to_thread(
                        context.prepare_offer,
                        host,
                        port,
                        server_hostname=config.server_hostname,
                        target_sae_id=config.target_sae_id,
                    )
            if relay.reason is not None:
                return None
            established: asyncio.Future[TLSProtocol] = loop.create_future()

            def factory() -> TLSProtocol:
                return TLSProtocol(
                    context,
                    server_side=False,
                    handshake_timeout=max(0.001, deadline - loop.time()),
                    on_established=lambda p: established.done() or established.set_result(p),
                    on_failed=lambda e: established.done() or established.set_exception(e),
                    server_hostname=config.server_hostname,
                    target_sae_id=config.target_sae_id,
                    prepared_offer=prepared,
                )

            raw, _ = await loop.create_connection(factory, host, port)
        try:
            # The protocol enforces the deadline itself; this bound only guards against a lost callback.
            async with asyncio.timeout_at(deadline + 1.0):
                return await established
        except BaseException:
            raw.abort()
            raise

    # server mode: TLS-QKD accepted, plaintext out

    def _server_protocol(self, relay: Relay, gen: _Generation) -> TLSProtocol:
        config = gen.config

        def established(proto: TLSProtocol) -> None:
            self._handshaking.pop(relay, None)
            relay.handshake_seconds = proto.handshake_seconds
            relay.tls = proto
            relay.info = proto.session.info if proto.session is not None else None
            proto.attach(relay.sides[0])
            self._spawn(self._open_target(relay, config))

        def failed(exc: BaseException) -> None:
            self._handshaking.pop(relay, None)
            relay.fail(_reason_of(exc), str(exc))

        proto = _PeerNamed(
            gen.context,
            relay,
            server_side=True,
            handshake_timeout=config.handshake_timeout,
            on_established=established,
            on_failed=failed,
        )
        # Until its handshake completes a connection is unauthenticated: past max_handshakes the oldest
        # such connection is closed to make room, so a flood of idle or slow handshakes displaces itself
        # (an honest handshake takes milliseconds and is rarely the oldest) instead of filling
        # max_connections until their deadlines.
        while len(self._handshaking) >= config.max_handshakes:
            oldest_relay, oldest = next(iter(self._handshaking.items()))
            del self._handshaking[oldest_relay]
            oldest_relay.fail("evicted", f"oldest of {config.max_handshakes} handshakes in progress")
            if oldest.raw is not None:
                oldest.raw.abort()
        self._handshaking[relay] = proto
        return proto

    async def _open_target(self, relay: Relay, config: ServiceConfig) -> None:
        loop = asyncio.get_running_loop()
        host, port = config.connect
        try:
            async with asyncio.timeout(config.connect_timeout):
                await loop.create_connection(lambda: relay.sides[1], host, port)
        except (OSError, TimeoutError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            relay.fail("connect_failed", f"{host}:{port}: {detail}")
            return
        if relay.reason is not None:
            relay.sides[1].abort()

    # -- shutdown --------------------------------------------------------------------------------------------

    def cancel_setups(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class _PeerNamed(TLSProtocol):
    """A server-mode TLS protocol that tells its relay the client's address and when TCP is gone."""

    def __init__(self, context: QKDContext, relay: Relay, **kwargs: Any) -> None:
        super().__init__(context, **kwargs)
        self._relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._relay.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        super().connection_made(transport)
