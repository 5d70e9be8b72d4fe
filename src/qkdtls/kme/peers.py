"""The inter-KME interface: the master KME tells the slave KME which blocks form which keys.

Server side: ``POST /kme/v1/reservations`` on its own listener with mutual TLS (client certificate required).
The caller's certificate is mapped to a peer KME ID; a certificate that is not a configured peer's gets 401,
so one KME cannot reserve blocks of a link it is not part of. The body is one reservation
(``Reservation.to_json()``), answered by the HTTP status, or a batch ``{"reservations": [...]}``, answered
200 with one ``{"status", "message"}`` per reservation in order.

Client side: :class:`HttpPeerGateway`, a pool of kept-alive mutual-TLS connections per peer
(:class:`qkdtls.http11.client.HttpClient`) with a bounded total timeout.
Reservations made while another is on the wire are sent together as one batch: under load one request
(and one commit at the peer) carries many keys, without delaying a lone request. Outcomes the master KME
must tell apart (docs/design.md, key lifecycle):

- 200: the peer committed the reservation;
- 409 (``BlocksTakenError``): the peer's copies of the blocks are used already → :class:`PeerRejected`
  (burn them);
- 429 (``UncollectedQuotaError``): the master SAE has too many keys not collected at the peer →
  :class:`PeerQuotaExceeded` (release the blocks; the master SAE gets 503 with the peer's message);
- anything else (network error, timeout, 4xx, 5xx) → :class:`PeerUnavailable` (release the blocks).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qkdtls.http11.client import HttpClient, HttpClientError
from qkdtls.http11.server import Request, Response, Router
from qkdtls.kme.auth import IdentityMap, client_context, peer_certificate
from qkdtls.kme.config import Peer
from qkdtls.kme.errors import (
    BadRequestError,
    KmeError,
    PeerQuotaExceeded,
    PeerRejected,
    PeerUnavailable,
    UnauthorizedError,
)
from qkdtls.kme.metrics import KmeMetrics
from qkdtls.kme.relay.messages import RELAY_PATH, TAG_HEADER
from qkdtls.kme.relay.node import HopReply
from qkdtls.kme.reservation import Reservation
from qkdtls.kme.routes import MSG_INTERNAL, dumps, json_response, parse_json_body
from qkdtls.kme.service import KmeService

log = logging.getLogger("qkdtls.kme.peers")

RESERVATIONS_PATH = "/kme/v1/reservations"
STATUS_BLOCKS_NOT_FREE = 409
STATUS_QUOTA = 429  # the reservation's master SAE has too many keys not collected at the callee
INTER_KME_STATUSES = frozenset({400, 401, STATUS_BLOCKS_NOT_FREE, STATUS_QUOTA, 503})
MSG_NOT_A_PEER = "the client certificate does not identify a peer KME of this KME"
# A batch stays far below the callee's body limit (4 MiB) and bounds the work of one request.
MAX_BATCH = 64
MAX_BATCH_BYTES = 1 << 20
# Batches on the wire at once per peer; later reservations queue for the next free sender.
MAX_IN_FLIGHT = 4
# Relay hop messages on the wire at once per peer (a neighbour forwards for several origins).
MAX_RELAY_CONNECTIONS = 8
_TAG_HEADER = TAG_HEADER.lower().encode("latin-1")


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

    def router(self) -> Router:
        router = Router()
        router.add("POST", RESERVATIONS_PATH, self.reserve)
        router.add("POST", RELAY_PATH, self.relay)
        return router

    async def relay(self, request: Request) -> Response:
        """A relay hop message (kme/relay): 200 with the per-item results and the answer's one-time tag, or
        the status of the whole message (400 malformed or not authentic, 409 blocks not free, 503)."""
        caller = self.peers.lookup(peer_certificate(request))
        if caller is None:
            raise UnauthorizedError(MSG_NOT_A_PEER)
        tag = next((v.decode("latin-1") for k, v in request.raw_headers if k.lower() == _TAG_HEADER), None)
        reply = await self.service.accept_relay(caller, request.body, tag)
        headers = (
            ((TAG_HEADER, base64.b64encode(reply.tag).decode("ascii")),) if reply.tag is not None else ()
        )
        return Response(reply.status, reply.body, headers=headers)

    async def reserve(self, request: Request) -> Response:
        caller = self.peers.lookup(peer_certificate(request))
        if caller is None:
            raise UnauthorizedError(MSG_NOT_A_PEER)
        doc = parse_json_body(request.body)
        if isinstance(doc, dict) and "reservations" in doc:
            return await self._reserve_batch(caller, doc["reservations"])
        reservation = Reservation.from_json(doc)
        # The service refuses blocks that are not free with BlocksTakenError (409, STATUS_BLOCKS_NOT_FREE).
        await self.service.accept_reservation(caller, reservation)
        self._count(reservation)
        return json_response({"message": "reserved", "keys": len(reservation.keys)})

    async def _reserve_batch(self, caller: int, items: Any) -> Response:
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
            raise BadRequestError(f"reservations must be an array of 1 to {MAX_BATCH} reservations")
        parsed: list[Reservation | KmeError] = []
        for item in items:
            try:
                parsed.append(Reservation.from_json(item))
            except KmeError as exc:
                parsed.append(exc)
        # Concurrent calls let the store commit the whole batch in one transaction.
        accepted = [r for r in parsed if isinstance(r, Reservation)]
        outcomes = iter(
            await asyncio.gather(
                *(self.service.accept_reservation(caller, r) for r in accepted), return_exceptions=True
            )
        )
        results = []
        for entry in parsed:
            outcome: BaseException | None = entry if isinstance(entry, KmeError) else next(outcomes)
            results.append(self._result(entry, outcome))
        return json_response({"results": results})

    def _result(self, entry: Reservation | KmeError, outcome: BaseException | None) -> dict[str, Any]:
        if outcome is None:
            assert isinstance(entry, Reservation)
            self._count(entry)
            return {"status": 200, "message": "reserved"}
        if isinstance(outcome, KmeError):
            status = outcome.status if outcome.status in INTER_KME_STATUSES else 503
            return {"status": status, "message": outcome.message}
        log.error("reservation failed", exc_info=outcome, extra={"event": "reservation.failed"})
        return {"status": 503, "message": MSG_INTERNAL}

    def _count(self, reservation: Reservation) -> None:
        if self.metrics is not None:
            self.metrics.reservations_accepted.inc(len(reservation.keys))


@dataclass
class _PeerQueue:
    waiting: list[tuple[bytes, asyncio.Future[None]]] = field(default_factory=list)
    senders: int = 0


class HttpPeerGateway:
    """Caller side: a :class:`qkdtls.kme.service.PeerGateway` over HTTPS with kept-alive connections."""

    def __init__(self, peers: Sequence[Peer]) -> None:
        self._peers = {p.kme_id: p for p in peers}
        self._clients: dict[int, tuple[HttpClient, str]] = {}
        self._relay_clients: dict[int, tuple[HttpClient, str]] = {}
        self._queues: dict[int, _PeerQueue] = {}
        self._senders: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _client(self, peer: Peer, *, relay: bool = False) -> tuple[HttpClient, str]:
        """The peer's connection pool and the reservations (or relay) path (its URL may carry a prefix: a
        proxy). Relay messages have their own pool: a slow relay never delays a reservation."""
        clients = self._relay_clients if relay else self._clients
        known = clients.get(peer.kme_id)
        if known is None:
            url = urllib.parse.urlsplit(peer.url)
            client = HttpClient(
                url.hostname or "",
                url.port or 443,
                ssl=client_context(peer.client_cert, peer.client_key, peer.ca),
                server_hostname=peer.server_name,
                max_connections=MAX_RELAY_CONNECTIONS if relay else MAX_IN_FLIGHT,
                timeout=peer.timeout,
                default_headers={"Content-Type": "application/json"},
            )
            path = url.path.rstrip("/") + (RELAY_PATH if relay else RESERVATIONS_PATH)
            known = clients[peer.kme_id] = (client, path)
        return known

    async def relay(self, peer_kme_id: int, body: bytes, tag: bytes, timeout: float) -> HopReply:
        """Send one relay hop message (kme/relay/node.py RelayTransport); PeerUnavailable on network errors
        and timeouts, else the peer's status, body and answer tag."""
        if self._closed:
            raise PeerUnavailable("the KME is shutting down")
        peer = self._peers.get(peer_kme_id)
        if peer is None:
            raise PeerUnavailable(f"no inter-KME route to KME {peer_kme_id}")
        headers = {TAG_HEADER: base64.b64encode(tag).decode("ascii")}
        try:
            client, path = self._client(peer, relay=True)
            response = await client.request("POST", path, body, headers, timeout=max(timeout, 0.001))
        except (HttpClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            log.warning(
                "peer KME unreachable",
                extra={"event": "peer.unavailable", "peer_KME_ID": peer_kme_id, "error": type(exc).__name__},
            )
            raise PeerUnavailable(f"KME {peer_kme_id} unreachable: {type(exc).__name__}") from None
        answer_tag: bytes | None = None
        text = response.headers.get(TAG_HEADER.lower())
        if text is not None:
            try:
                answer_tag = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                answer_tag = None
        return HopReply(response.status, response.body, answer_tag)

    async def reserve(self, peer_kme_id: int, reservation: Reservation) -> None:
        if self._closed:
            raise PeerUnavailable("the KME is shutting down")
        peer = self._peers.get(peer_kme_id)
        if peer is None:
            raise PeerUnavailable(f"no inter-KME route to KME {peer_kme_id}")
        body = dumps(reservation.to_json()).encode()
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()  # once: it costs a getpid() system call
        future: asyncio.Future[None] = loop.create_future()
        queue = self._queues.setdefault(peer_kme_id, _PeerQueue())
        queue.waiting.append((body, future))
        if queue.senders < MAX_IN_FLIGHT:
            queue.senders += 1
            task = loop.create_task(self._send(peer, queue), name=f"kme-peer-{peer_kme_id}")
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)
        # Cancelling the caller cancels the future; a reservation not yet sent is then dropped.
        await future

    async def _send(self, peer: Peer, queue: _PeerQueue) -> None:
        try:
            await asyncio.sleep(0)  # let the reservations of this loop iteration join the batch
            while queue.waiting:
                batch: list[tuple[bytes, asyncio.Future[None]]] = []
                size = 0
                while queue.waiting and len(batch) < MAX_BATCH:
                    body, future = queue.waiting[0]
                    if batch and size + len(body) > MAX_BATCH_BYTES:
                        break
                    del queue.waiting[0]
                    if not future.done():
                        batch.append((body, future))
                        size += len(body)
                if not batch:
                    continue
                try:
                    outcomes = await self._post(peer, [body for body, _ in batch])
                except PeerUnavailable as exc:
                    outcomes = [PeerUnavailable(str(exc)) for _ in batch]
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if outcome is None:
                        future.set_result(None)
                    else:
                        future.set_exception(outcome)
        finally:
            queue.senders -= 1

    async def _post(self, peer: Peer, bodies: list[bytes]) -> list[Exception | None]:
        data = b'{"reservations":[' + b",".join(bodies) + b"]}"
        try:
            client, path = self._client(peer)
            response = await client.request("POST", path, data)
            status, answer = response.status, response.body
        except (HttpClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            log.warning(
                "peer KME unreachable",
                extra={"event": "peer.unavailable", "peer_KME_ID": peer.kme_id, "error": type(exc).__name__},
            )
            raise PeerUnavailable(f"KME {peer.kme_id} unreachable: {type(exc).__name__}") from None
        if status != 200:
            message = _message(answer)
            log.warning(
                "peer KME refused the batch",
                extra={
                    "event": "peer.refused",
                    "peer_KME_ID": peer.kme_id,
                    "status": status,
                    "reason": message,
                },
            )
            raise PeerUnavailable(f"KME {peer.kme_id} answered {status}: {message}")
        return _outcomes(peer.kme_id, answer, len(bodies))

    async def close(self) -> None:
        self._closed = True
        for task in list(self._senders):
            task.cancel()
        for queue in self._queues.values():
            for _, future in queue.waiting:
                if not future.done():
                    future.set_exception(PeerUnavailable("the KME is shutting down"))
            queue.waiting.clear()
        clients = [*self._clients.values(), *self._relay_clients.values()]
        self._clients, self._relay_clients = {}, {}
        for client, _ in clients:
            await client.close()


def _outcomes(peer_kme_id: int, answer: bytes, count: int) -> list[Exception | None]:
    """Per-reservation outcomes of a batch answer; a malformed answer fails the whole batch."""
    try:
        doc = parse_json_body(answer)
    except BadRequestError:
        doc = None
    results = doc.get("results") if isinstance(doc, dict) else None
    if (
        not isinstance(results, list)
        or len(results) != count
        or not all(isinstance(r, dict) for r in results)
    ):
        raise PeerUnavailable(f"KME {peer_kme_id} sent a malformed batch answer")
    outcomes: list[Exception | None] = []
    for result in results:
        status = result.get("status")
        message = str(result.get("message", ""))[:200]
        if status == 200:
            outcomes.append(None)
        elif status == STATUS_BLOCKS_NOT_FREE:
            outcomes.append(PeerRejected(f"KME {peer_kme_id}: {message}"))
        elif status == STATUS_QUOTA:
            outcomes.append(PeerQuotaExceeded(message))
        else:
            log.warning(
                "peer KME refused a reservation",
                extra={
                    "event": "peer.refused",
                    "peer_KME_ID": peer_kme_id,
                    "status": status,
                    "reason": message,
                },
            )
            outcomes.append(PeerUnavailable(f"KME {peer_kme_id} answered {status}: {message}"))
    return outcomes


def _message(body: bytes) -> str:
    try:
        doc = parse_json_body(body)
    except BadRequestError:
        return "(no JSON body)"
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return doc["message"][:200]
    return "(no message)"
