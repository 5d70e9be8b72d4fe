"""The inter-KME interface: the master KME tells the slave KME which blocks form which keys.

Server side: ``POST /kme/v1/reservations`` on its own listener with mutual TLS (client certificate required).
The caller's certificate is mapped to a peer KME ID; a certificate that is not a configured peer's gets 401,
so one KME cannot reserve blocks of a link it is not part of.

Client side: :class:`HttpPeerGateway`, one kept-alive aiohttp session per peer with a bounded total timeout.
Outcomes the master KME must tell apart (docs/design.md, key lifecycle):

- 200: the peer committed the reservation;
- 409 (``BlocksTakenError``): the peer's copies of the blocks are used already → :class:`PeerRejected`
  (burn them);
- anything else (network error, timeout, 4xx, 5xx) → :class:`PeerUnavailable` (release the blocks).
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web

from qkdtls.kme.auth import IdentityMap, client_context, peer_certificate
from qkdtls.kme.config import Peer
from qkdtls.kme.errors import BadRequestError, PeerRejected, PeerUnavailable, UnauthorizedError
from qkdtls.kme.metrics import KmeMetrics
from qkdtls.kme.reservation import Reservation
from qkdtls.kme.routes import error_middleware, json_response, parse_json_body
from qkdtls.kme.service import KmeService

log = logging.getLogger("qkdtls.kme.peers")

RESERVATIONS_PATH = "/kme/v1/reservations"
STATUS_BLOCKS_NOT_FREE = 409
INTER_KME_STATUSES = frozenset({400, 401, STATUS_BLOCKS_NOT_FREE, 503})
MSG_NOT_A_PEER = "the client certificate does not identify a peer KME of this KME"


class InterKmeApi:
    """Callee side of the inter-KME interface."""

    def __init__(
        self,
        service: KmeService,
        peers: IdentityMap[int],
        metrics: KmeMetrics | None = None,
        *,
        max_body_bytes: int = 4 << 20,
    ) -> None:
        self.service = service
        self.peers = peers
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    def app(self) -> web.Application:
        # A reservation of max_key_per_request keys of max_key_size bits lists a few thousand block numbers.
        middleware = error_middleware(self.metrics, INTER_KME_STATUSES)
        app = web.Application(middlewares=[middleware], client_max_size=self.max_body_bytes)
        app.router.add_post(RESERVATIONS_PATH, self.reserve)
        return app

    async def reserve(self, request: web.Request) -> web.Response:
        caller = self.peers.lookup(peer_certificate(request))
        if caller is None:
            raise UnauthorizedError(MSG_NOT_A_PEER)
        reservation = Reservation.from_json(parse_json_body(await request.read()))
        # The service refuses blocks that are not free with BlocksTakenError (409, STATUS_BLOCKS_NOT_FREE).
        await self.service.accept_reservation(caller, reservation)
        if self.metrics is not None:
            self.metrics.reservations_accepted.inc(len(reservation.keys))
        return json_response({"message": "reserved", "keys": len(reservation.keys)})


class HttpPeerGateway:
    """Caller side: a :class:`qkdtls.kme.service.PeerGateway` over HTTPS with kept-alive connections."""

    def __init__(self, peers: Sequence[Peer], *, connections_per_peer: int = 64) -> None:
        self._peers = {p.kme_id: p for p in peers}
        self._sessions: dict[int, aiohttp.ClientSession] = {}
        self._contexts: dict[int, ssl.SSLContext] = {}
        self._limit = connections_per_peer
        self._closed = False

    def _session(self, peer: Peer) -> aiohttp.ClientSession:
        session = self._sessions.get(peer.kme_id)
        if session is None or session.closed:
            if peer.kme_id not in self._contexts:
                self._contexts[peer.kme_id] = client_context(peer.client_cert, peer.client_key, peer.ca)
            connector = aiohttp.TCPConnector(
                ssl=self._contexts[peer.kme_id],
                limit=self._limit,
                keepalive_timeout=30.0,
                enable_cleanup_closed=False,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=peer.timeout, connect=peer.timeout),
                skip_auto_headers=("User-Agent",),
            )
            self._sessions[peer.kme_id] = session
        return session

    async def reserve(self, peer_kme_id: int, reservation: Reservation) -> None:
        if self._closed:
            raise PeerUnavailable("the KME is shutting down")
        peer = self._peers.get(peer_kme_id)
        if peer is None:
            raise PeerUnavailable(f"no inter-KME route to KME {peer_kme_id}")
        body = json.dumps(reservation.to_json(), separators=(",", ":")).encode()
        kwargs: dict[str, Any] = {"headers": {"Content-Type": "application/json"}}
        if peer.server_name:
            kwargs["server_hostname"] = peer.server_name
        try:
            async with self._session(peer).post(
                peer.url + RESERVATIONS_PATH, data=body, **kwargs
            ) as response:
                status = response.status
                answer = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            log.warning(
                "peer KME unreachable",
                extra={"event": "peer.unavailable", "peer_KME_ID": peer_kme_id, "error": type(exc).__name__},
            )
            raise PeerUnavailable(f"KME {peer_kme_id} unreachable: {type(exc).__name__}") from None
        if status == 200:
            return
        message = _message(answer)
        if status == STATUS_BLOCKS_NOT_FREE:
            raise PeerRejected(f"KME {peer_kme_id}: {message}")
        log.warning(
            "peer KME refused",
            extra={
                "event": "peer.refused",
                "peer_KME_ID": peer_kme_id,
                "status": status,
                "peer_message": message,
            },
        )
        raise PeerUnavailable(f"KME {peer_kme_id} answered {status}: {message}")

    async def close(self) -> None:
        self._closed = True
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()


def _message(body: bytes) -> str:
    try:
        doc = parse_json_body(body)
    except BadRequestError:
        return "(no JSON body)"
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return doc["message"][:200]
    return "(no message)"
