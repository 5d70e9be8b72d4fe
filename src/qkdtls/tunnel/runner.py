"""The tunnel process: its services, the metrics listener, reload (SIGHUP) and shutdown (SIGTERM).

- **Reload** reads the configuration again. If it is invalid, nothing changes (an ERROR line names the bad
  field). Otherwise: services no longer listed stop listening; new ones start; a changed service gets a new
  context for new connections, keeping its listening socket when ``accept`` is unchanged (no connection is
  refused meanwhile) and binding the new address otherwise. Established connections are never touched:
  they finish with the settings they started with.
- **Shutdown** stops listening at once, lets running connections finish for ``grace_period`` seconds, then
  closes the rest (TLS: close_notify; reason ``shutdown``) and exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qkdtls import serving
from qkdtls.http11.server import HttpServer, Request, Response, Router
from qkdtls.tunnel.config import ConfigError, ServiceConfig, TunnelConfig
from qkdtls.tunnel.metrics import CONTENT_TYPE, TunnelMetrics
from qkdtls.tunnel.relay import Relay
from qkdtls.tunnel.service import Service, build_context, close_context, limited_log

log = logging.getLogger("qkdtls.tunnel")
# KME requests run in worker threads (never on the event loop): enough of them that set-ups waiting for a
# slow KME do not queue behind each other, and handshakes of other services still get one.
KME_WORKERS = 64
# After the grace period: how long closing connections get to send close_notify before they are aborted.
CLOSE_WAIT = 3.0


class Tunnel:
    """All services of one configuration, on the running event loop."""

    def __init__(self, config: TunnelConfig, loader: Callable[[], TunnelConfig] | None = None) -> None:
        self.config = config
        self._loader = loader
        self.services: dict[str, Service] = {}
        self._retired: list[Service] = []  # removed by a reload; their connections still run
        self.metrics = TunnelMetrics(self._open_relays)
        self._metrics_server: HttpServer | None = None
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()

    def _open_relays(self) -> Iterator[tuple[str, list[Relay]]]:
        for service in [*self.services.values(), *self._retired]:
            yield service.name, list(service.relays)

    # -- start -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(KME_WORKERS, thread_name_prefix="tunnel-kme")
        )
        try:
            for service_config in self.config.services:
                await self._start_service(service_config)
            if self.config.metrics is not None:
                await self._start_metrics(*self.config.metrics)
        except BaseException:
            await self._close_all(0.0)
            raise

    async def _start_service(self, config: ServiceConfig) -> Service:
        context = await asyncio.to_thread(build_context, config)
        service = Service(config, context, self._record, self._refused)
        try:
            await service.start()
        except BaseException:
            close_context(context)
            raise
        self.services[config.name] = service
        host, port = service.address or config.accept
        log.info(
            f"service {config.name} ({config.mode}) listening on {host}:{port}, connecting to "
            f"{config.connect[0]}:{config.connect[1]}, qkd={config.qkd}",
            extra={"event": "tunnel.listening", "service": config.name, "address": f"{host}:{port}"},
        )
        return service

    async def _start_metrics(self, host: str, port: int) -> None:
        router = Router()

        async def metrics(request: Request) -> Response:
            return Response(200, self.metrics.render(), CONTENT_TYPE)

        router.add("GET", "/metrics", metrics)
        server = HttpServer(
            router, error_response=lambda status, message: Response(status, message.encode(), "text/plain")
        )
        await server.start(host, port)
        self._metrics_server = server
        log.info(
            f"metrics on http://{host}:{server.port}/metrics",
            extra={"event": "tunnel.metrics", "address": f"{host}:{server.port}"},
        )

    def ports(self) -> dict[str, Any]:
        """What a ready file holds: the bound port of each service and of the metrics listener."""
        out: dict[str, Any] = {"services": {n: s.address[1] for n, s in self.services.items() if s.address}}
        if self._metrics_server is not None:
            out["metrics"] = self._metrics_server.port
        return out

    # -- connections -----------------------------------------------------------------------------------------

    def _record(self, relay: Relay, config: ServiceConfig) -> None:
        self.metrics.record(relay)
        if self._retired:
            self._retired = [s for s in self._retired if s.relays]
        message = f"connection {relay.peer} -> {relay.target} {relay.reason}"
        if relay.established:
            if log.isEnabledFor(logging.INFO):
                log.info(message, extra=relay.record())
        else:
            # Connections that never got through: strangers can cause any number of them.
            limited_log(logging.WARNING, message, relay.record())

    def _refused(self, service: str) -> None:
        self.metrics.refused[service] += 1

    # -- reload ----------------------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Apply the configuration file again; False (and nothing changed) when it is invalid."""
        if self._loader is None:
            return False
        async with self._reload_lock:
            try:
                new = await asyncio.to_thread(self._loader)
            except ConfigError as exc:
                self.metrics.reloads["failed"] += 1
                log.error(
                    f"reload refused, configuration unchanged: {exc}",
                    extra={"event": "tunnel.reload_failed", "reason": str(exc)},
                )
                return False
            try:
                await self._apply(new)
            except Exception as exc:
                self.metrics.reloads["failed"] += 1
                log.error(
                    f"reload failed part way: {exc}",
                    extra={"event": "tunnel.reload_failed", "reason": str(exc)},
                )
                return False
            self.metrics.reloads["ok"] += 1
            log.info(
                "configuration reloaded",
                extra={"event": "tunnel.reloaded", "services": sorted(self.services)},
            )
            return True

    async def _apply(self, new: TunnelConfig) -> None:
        wanted = {s.name: s for s in new.services}
        for name in [n for n in self.services if n not in wanted]:
            self._retire(self.services.pop(name))
        for name, config in wanted.items():
            service = self.services.get(name)
            if service is None:
                await self._start_service(config)
                continue
            if service.config == config:
                continue
            if service.config.accept == config.accept:
                context = await asyncio.to_thread(build_context, config)
                service.replace(config, context)
                continue
            self._retire(self.services.pop(name))
            await self._start_service(config)
        self.config = TunnelConfig(
            path=self.config.path,
            services=new.services,
            grace_period=new.grace_period,
            metrics=self.config.metrics,
        )

    def _retire(self, service: Service) -> None:
        service.stop_listening()
        service.close()
        if service.relays:
            self._retired.append(service)

    # -- shutdown --------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, ready: Callable[[Tunnel], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT (then shut down); SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        await self.start()
        # What start-up built (modules, contexts, certificates) lives as long as the process: out of the
        # collector's reach, the collections that connection churn triggers no longer walk it.
        gc.collect()
        gc.freeze()
        reloads: set[asyncio.Task[bool]] = set()

        def hup() -> None:
            task = asyncio.ensure_future(self.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, hup)
        try:
            if ready is not None:
                ready(self)
            await self._stopping.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._close_all(self.config.grace_period)

    async def _close_all(self, grace: float) -> None:
        services = [*self.services.values(), *self._retired]
        for service in services:
            service.stop_listening()
        running = sum(len(s.relays) for s in services)
        if running:
            log.info(
                f"shutting down: {running} connections may finish within {grace:g} s",
                extra={"event": "tunnel.draining", "connections": running, "grace_period": grace},
            )
        deadline = time.monotonic() + grace
        while any(s.relays for s in services) and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        for service in services:
            service.cancel_setups()
            for relay in list(service.relays):
                relay.finish("shutdown", f"still open after the grace period of {grace:g} s")
        deadline = time.monotonic() + CLOSE_WAIT
        while any(s.relays for s in services) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for service in services:
            for relay in list(service.relays):
                for side in relay.sides:
                    side.abort()
            service.close()
        if self._metrics_server is not None:
            await self._metrics_server.close(timeout=1.0)
            self._metrics_server = None
        self.services.clear()
        self._retired.clear()


def write_ready_file(path: Path, tunnel: Tunnel) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(tunnel.ports()))
    tmp.replace(path)


def run(
    config: TunnelConfig,
    *,
    loader: Callable[[], TunnelConfig] | None = None,
    ready_file: Path | None = None,
    event_loop: str = "auto",
) -> None:
    """Run a tunnel until SIGTERM/SIGINT (the ``qkdtls tunnel`` command)."""

    def ready(tunnel: Tunnel) -> None:
        if ready_file is not None:
            write_ready_file(ready_file, tunnel)

    async def main() -> None:
        await Tunnel(config, loader).run(ready)

    with contextlib.suppress(KeyboardInterrupt):
        serving.run(main(), event_loop)
