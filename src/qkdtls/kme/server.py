"""One KME process: the SAE and inter-KME listeners, the key-folder ingestor and the reservation sweeper.

:class:`KmeServer` is usable in-process (tests bind port 0 and read the bound ports back) and by
``qkdtls kme serve``, which runs it until SIGTERM/SIGINT and then shuts down cleanly: listeners stop
accepting, in-flight requests finish (bounded), background tasks are cancelled, the store is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import ssl
from pathlib import Path

from qkdtls import serving
from qkdtls.http11.server import HttpServer, ServerLimits
from qkdtls.http11.server import Router as HttpRouter
from qkdtls.kme.auth import IdentityMap, server_context
from qkdtls.kme.config import ConnectionCaps, KmeConfig
from qkdtls.kme.ingest import Ingestor, LinkFolder
from qkdtls.kme.listener_metrics import ListenerStats
from qkdtls.kme.metrics import KmeMetrics
from qkdtls.kme.peers import INTER_KME_STATUSES, HttpPeerGateway, InterKmeApi
from qkdtls.kme.routes import ETSI_STATUSES, SaeApi, error_response, exception_response, response_observer
from qkdtls.kme.routing import LinkStateDb, Router
from qkdtls.kme.routing.exchange import LinkStateExchange, store_stock
from qkdtls.kme.routing.metrics import RoutingStats
from qkdtls.kme.service import KmeService
from qkdtls.kme.store import KeyStore, open_store

log = logging.getLogger("qkdtls.kme.server")

SHUTDOWN_TIMEOUT = 5.0


class KmeServer:
    def __init__(self, config: KmeConfig) -> None:
        self.config = config
        self.service: KmeService | None = None
        self.metrics = KmeMetrics(config.kme_id) if config.metrics else None
        self._gateway: HttpPeerGateway | None = None
        self.router: Router | None = None
        self._exchange: LinkStateExchange | None = None
        self._servers: dict[str, HttpServer] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._store: KeyStore | None = None
        if self.metrics is not None:
            self.metrics.registry.register(ListenerStats(self._servers))

    @property
    def sae_port(self) -> int:
        return self._servers["sae"].port

    @property
    def inter_kme_port(self) -> int | None:
        server = self._servers.get("inter_kme")
        return server.port if server is not None else None

    async def start(self) -> None:
        cfg = self.config
        try:
            await self._start(cfg)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, cfg: KmeConfig) -> None:
        self._store = open_store(cfg.store_url)
        self._gateway = HttpPeerGateway(cfg.peers) if cfg.peers else None
        linked = [p.kme_id for p in cfg.peers] + ([cfg.kme_id] if cfg.local_link else [])
        self.router = self._router(cfg)
        self.service = KmeService(
            cfg.service, self._store, cfg.sae_entries(), self._gateway, linked, router=self.router
        )

        folders = [LinkFolder(p.kme_id, p.folder, p.delete_after_import) for p in cfg.peers]
        if cfg.local_link is not None:
            folders.append(LinkFolder(cfg.kme_id, cfg.local_link.folder, cfg.local_link.delete_after_import))
        ingestor = Ingestor(self._store, cfg.kme_id, folders, cfg.service.block_size, rate=cfg.ingest_rate)
        # Import what is already there before answering SAEs, so a fresh KME does not report an empty stock.
        imported = await ingestor.scan(startup=True)
        log.info("key folders imported", extra={"event": "ingest.startup", "bytes": imported})

        sae_cas = cfg.sae_interface.listen.client_ca
        saes = IdentityMap([(s.identity, s.sae_id) for s in cfg.saes if s.identity is not None], sae_cas)
        admins = IdentityMap([(a.identity, a.name) for a in cfg.admins], sae_cas)
        sae_api = SaeApi(
            cfg.kme_id,
            self.service,
            saes,
            admins,
            self.metrics,
            max_body_bytes=cfg.sae_interface.max_body_bytes,
        )
        listen = cfg.sae_interface.listen
        await self._listen(
            "sae",
            sae_api.router(),
            listen.host,
            listen.port,
            server_context(listen.cert, listen.key, listen.client_ca, require_client_cert=False),
            cfg.sae_interface.handshake_timeout,
            sae_api.max_body_bytes,
            cfg.sae_interface.caps,
        )
        if cfg.inter_kme is not None:
            peers = IdentityMap([(p.identity, p.kme_id) for p in cfg.peers], cfg.inter_kme.listen.client_ca)
            inter_api = InterKmeApi(self.service, peers, self.metrics)
            inter_router = inter_api.router()
            if self.router is not None:
                self._exchange = self._link_state(cfg, self.router, peers)
                self._exchange.register(inter_router)
                await self._exchange.start()
            listen = cfg.inter_kme.listen
            await self._listen(
                "inter_kme",
                inter_router,
                listen.host,
                listen.port,
                server_context(listen.cert, listen.key, listen.client_ca, require_client_cert=True),
                cfg.inter_kme.handshake_timeout,
                inter_api.max_body_bytes,
                cfg.inter_kme.caps,
                INTER_KME_STATUSES,
            )

        if self.metrics is not None and self.router is not None:
            self.metrics.registry.register(RoutingStats(self.router, self._exchange))
        self._tasks.append(asyncio.create_task(self._run_ingestor(ingestor), name="kme-ingest"))
        self._tasks.append(asyncio.create_task(self._sweep(), name="kme-sweeper"))
        log.info(
            "KME started",
            extra={
                "event": "kme.started",
                "KME_ID": cfg.kme_id,
                "nickname": cfg.nickname,
                "sae_port": self.sae_port,
                "inter_kme_port": self.inter_kme_port,
            },
        )

    def _router(self, cfg: KmeConfig) -> Router | None:
        """The network view the service routes with; None for a KME without peers (local pairs only)."""
        if not cfg.peers:
            return None
        neighbours = [p.kme_id for p in cfg.peers]
        network = cfg.network
        db = LinkStateDb(cfg.kme_id, neighbours, network.timers) if network.enabled else None
        static = {s.sae_id: s.kme_id for s in cfg.saes}
        return Router(cfg.kme_id, neighbours, settings=network, saes=static, db=db)

    def _link_state(self, cfg: KmeConfig, router: Router, peers: IdentityMap[int]) -> LinkStateExchange:
        """The exchange feeding the router's database; with ``[network] enabled = false`` it only answers
        peers' adverts with 503."""
        assert self.service is not None and self._store is not None
        neighbours = sorted(router.neighbours)
        db = router.db if router.db is not None else LinkStateDb(cfg.kme_id, neighbours, cfg.network.timers)
        stock = store_stock(self._store, cfg.kme_id, neighbours, self.service.direction_of)
        own_saes = [s.sae_id for s in cfg.saes if s.kme_id == cfg.kme_id]
        return LinkStateExchange(
            db, cfg.peers, peers, stock, own_saes, name=cfg.nickname, enabled=router.db is not None
        )

    async def _listen(
        self,
        name: str,
        router: HttpRouter,
        host: str,
        port: int,
        ctx: ssl.SSLContext,
        handshake_timeout: float,
        max_body_bytes: int,
        caps: ConnectionCaps,
        statuses: frozenset[int] = ETSI_STATUSES,
    ) -> None:
        limits = ServerLimits(
            max_body_bytes=max_body_bytes,
            max_connections=caps.max_connections,
            max_unauthenticated=caps.max_unauthenticated,
            max_unauthenticated_per_address=caps.max_unauthenticated_per_address,
            unauthenticated_timeout=caps.unauthenticated_timeout,
            # Both listeners identify callers by their client certificate: without one, nobody is known.
            require_client_certificate=True,
        )
        server = HttpServer(
            router,
            error_response=error_response,
            exception_response=exception_response(statuses),
            observer=response_observer(self.metrics, logging.getLogger(f"qkdtls.kme.access.{name}")),
            limits=limits,
        )
        await server.start(host, port, ssl_context=ctx, handshake_timeout=handshake_timeout)
        self._servers[name] = server

    async def _run_ingestor(self, ingestor: Ingestor) -> None:
        try:
            await ingestor.run(self.config.ingest_interval)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("key folder ingestor stopped", extra={"event": "ingest.failed"})

    async def _sweep(self) -> None:
        assert self.service is not None
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                expired = await self.service.expire_reservations()
            except Exception:
                log.exception("reservation sweep failed", extra={"event": "sweep.failed"})
                continue
            if expired:
                if self.metrics is not None:
                    self.metrics.keys_expired.inc(expired)
                log.info("reservations expired", extra={"event": "key.expired", "count": expired})

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._exchange is not None:
            await self._exchange.close()
            self._exchange = None
        servers, self._servers = list(self._servers.values()), {}
        for server in reversed(servers):
            with contextlib.suppress(Exception):
                await server.close(SHUTDOWN_TIMEOUT)
        if self._gateway is not None:
            await self._gateway.close()
            self._gateway = None
        if self.service is not None:
            try:
                await self.service.close()
            except Exception:
                log.exception("closing the key service failed", extra={"event": "kme.close_failed"})
            self.service = None
        elif self._store is not None:  # start failed before the service took ownership of the store
            with contextlib.suppress(Exception):
                await self._store.close()
        self._store = None


def run(config: KmeConfig, *, ready_file: Path | None = None, event_loop: str = "auto") -> None:
    """Run :func:`serve` on a new event loop: uvloop when installed (``auto``) or asked for, else asyncio."""
    serving.run(serve(config, ready_file=ready_file), event_loop)


async def serve(config: KmeConfig, *, ready_file: Path | None = None) -> None:
    """Run a KME until SIGTERM or SIGINT."""
    server = KmeServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # Everything built at start-up (modules, config, TLS contexts, routes) lives as long as the process:
    # moved out of the collector's reach, full collections no longer walk it on every request burst.
    gc.collect()
    gc.freeze()
    try:
        if ready_file is not None:
            _write_ready(ready_file, server)
        await stop.wait()
        log.info("KME stopping", extra={"event": "kme.stopping", "KME_ID": config.kme_id})
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _write_ready(path: Path, server: KmeServer) -> None:
    """Tell a supervisor (the testbed) the bound ports; written atomically so it never reads half a file."""
    doc = {
        "pid": os.getpid(),
        "kme_id": server.config.kme_id,
        "sae_port": server.sae_port,
        "inter_kme_port": server.inter_kme_port,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)
