"""The SAE interface of the KME (ETSI GS QKD 014 §5): HTTP ↔ :class:`KmeService` translation.

ETSI 014 defines only 200, 400, 401 and 503, each with a JSON ``Error`` body. The HTTP server
(:mod:`qkdtls.http11.server`) answers malformed HTTP, unknown paths, wrong methods and large bodies with 400
in that format; :func:`exception_response` turns the service's errors into their statuses, and an
unexpected exception into a generic 503 with the traceback logged, never shown.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from qkdtls.etsi014.models import BadRequest, KeyIDs, KeyRequest, parse_key_id
from qkdtls.http11.server import ExceptionResponder, Handler, Request, Response, ResponseObserver, Router
from qkdtls.kme.admin_map import NetworkAdmin, links_json
from qkdtls.kme.auth import IdentityMap, peer_certificate
from qkdtls.kme.errors import BadRequestError, KmeError, UnauthorizedError
from qkdtls.kme.metrics import CONTENT_TYPE, KmeMetrics
from qkdtls.kme.openapi import OPENAPI_PATH, openapi_bytes
from qkdtls.kme.service import KmeService

log = logging.getLogger("qkdtls.kme.api")

MSG_UNAUTHORIZED = "the client certificate does not identify a registered SAE"
MSG_ADMIN_ONLY = "this route is for administrators of this KME"
MSG_INTERNAL = "internal error of the KME; the request can be retried"

dumps = json.JSONEncoder(separators=(",", ":")).encode


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(status, dumps(doc).encode())


def error_response(status: int, message: str, details: list[dict[str, Any]] | None = None) -> Response:
    doc: dict[str, Any] = {"message": message}
    if details:
        doc["details"] = details
    return json_response(doc, status)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads with an option builds a new decoder on every call.
_decode = json.JSONDecoder(parse_constant=_reject_constant).decode


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON, None when empty; :class:`BadRequestError` for anything malformed."""
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestError("request body must be UTF-8 encoded JSON") from None
    try:
        return _decode(text)
    except (ValueError, RecursionError):
        # ValueError also covers integers beyond Python's digit limit; RecursionError very deep nesting.
        raise BadRequestError("request body is not valid JSON") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    doc = parse_json_body(raw)
    if not isinstance(doc, dict):
        raise BadRequestError(f"{what} must be a JSON object")
    return doc


def single_query(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    """Query parameters as a plain dict; repeated or unexpected names are a bad request."""
    out: dict[str, str] = {}
    for name, value in request.query():
        if name not in allowed:
            raise BadRequestError(f"unexpected query parameter {name[:64]!r}")
        if name in out:
            raise BadRequestError(f"query parameter {name} given more than once")
        out[name] = value
    return out


ETSI_STATUSES = frozenset({400, 401, 503})


def exception_response(statuses: frozenset[int] = ETSI_STATUSES) -> ExceptionResponder:
    """What a handler raised, as an answer with one of ``statuses`` and a JSON body."""

    def respond(request: Request, exc: Exception) -> Response:
        if isinstance(exc, KmeError):
            return error_response(exc.status if exc.status in statuses else 503, exc.message, exc.details)
        if isinstance(exc, BadRequest):
            return error_response(400, exc.message, exc.details)
        log.error("unexpected error", exc_info=exc, extra={"event": "http.error", "route": request.route})
        return error_response(503, MSG_INTERNAL)

    return respond


def response_observer(metrics: KmeMetrics | None, access_log: logging.Logger) -> ResponseObserver:
    """Per answer: latency and status into the metrics, one structured access record (no bodies: keys)."""

    def observe(request: Request | None, status: int, seconds: float) -> None:
        route = request.route if request is not None else "unparsed"
        method = request.method if request is not None else "-"
        if metrics is not None:
            metrics.observe(route, method, status, seconds)
        if access_log.isEnabledFor(logging.INFO):
            path = request.path if request is not None else "-"
            access_log.info(
                "%s %s %s",
                method,
                path,
                status,
                extra={
                    "event": "http.request",
                    "method": method,
                    "path": path,
                    "status": status,
                    "seconds": round(seconds, 6),
                    "remote": request.remote if request is not None else None,
                },
            )

    return observe


class SaeApi:
    """Handlers of the SAE interface; the caller is identified by its client certificate."""

    def __init__(
        self,
        kme_id: int,
        service: KmeService,
        saes: IdentityMap[int],
        admins: IdentityMap[str],
        metrics: KmeMetrics | None = None,
        *,
        max_body_bytes: int = 65536,
    ) -> None:
        self.kme_id = kme_id
        self.service = service
        self.saes = saes
        self.admins = admins
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    def router(self) -> Router:
        r = Router()
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/api/v1/keys/{slave}/status", self.status),
            ("GET", "/api/v1/keys/{slave}/enc_keys", self.enc_keys_get),
            ("POST", "/api/v1/keys/{slave}/enc_keys", self.enc_keys_post),
            ("GET", "/api/v1/keys/{master}/dec_keys", self.dec_keys_get),
            ("POST", "/api/v1/keys/{master}/dec_keys", self.dec_keys_post),
            ("GET", "/api/v1/sae/info/me", self.sae_info),
            ("GET", "/api/v1/admin/links", self.admin_links),
            *NetworkAdmin(self.kme_id, self.service, self._admin).routes(),
            ("GET", OPENAPI_PATH, self.openapi),
            ("GET", "/metrics", self.metrics_page),
        ]
        for method, pattern, handler in routes:
            r.add(method, pattern, handler)
        return r

    def _caller(self, request: Request) -> int:
        sae = self.saes.lookup(peer_certificate(request))
        if sae is None:
            raise UnauthorizedError(MSG_UNAUTHORIZED)
        return sae

    def _admin(self, request: Request) -> str:
        admin = self.admins.lookup(peer_certificate(request))
        if admin is None:
            raise UnauthorizedError(MSG_ADMIN_ONLY)
        return admin

    async def status(self, request: Request) -> Response:
        caller = self._caller(request)
        single_query(request, frozenset())
        status = await self.service.status(caller, request.params["slave"])
        return json_response(status.to_json())

    async def enc_keys_get(self, request: Request) -> Response:
        caller = self._caller(request)
        key_request = KeyRequest.from_query(single_query(request, frozenset({"number", "size"})))
        return await self._enc_keys(request, caller, key_request)

    async def enc_keys_post(self, request: Request) -> Response:
        caller = self._caller(request)
        single_query(request, frozenset())
        raw = request.body
        # No body means "all defaults" (ETSI 014 allows an empty request); a body must be a JSON object.
        key_request = (
            KeyRequest() if not raw.strip() else KeyRequest.from_json(_json_object(raw, "Key request"))
        )
        return await self._enc_keys(request, caller, key_request)

    async def _enc_keys(self, request: Request, caller: int, key_request: KeyRequest) -> Response:
        slave = request.params["slave"]
        container = await self.service.enc_keys(caller, slave, key_request)
        if self.metrics is not None:
            self.metrics.keys_delivered.inc(len(container.keys))
        return json_response(container.to_json())

    async def dec_keys_get(self, request: Request) -> Response:
        caller = self._caller(request)
        query = single_query(request, frozenset({"key_ID"}))
        if "key_ID" not in query:
            raise BadRequestError(
                "GET dec_keys needs exactly one key_ID query parameter; use POST for several"
            )
        return await self._dec_keys(request, caller, (parse_key_id(query["key_ID"]),))

    async def dec_keys_post(self, request: Request) -> Response:
        caller = self._caller(request)
        single_query(request, frozenset())
        doc = parse_json_body(request.body)
        if doc is None:
            raise BadRequestError("POST dec_keys needs a Key IDs body")
        return await self._dec_keys(request, caller, KeyIDs.from_json(doc).key_IDs)

    async def _dec_keys(self, request: Request, caller: int, key_ids: tuple[str, ...]) -> Response:
        master = request.params["master"]
        container = await self.service.dec_keys(caller, master, key_ids)
        if self.metrics is not None:
            self.metrics.keys_collected.inc(len(container.keys))
        return json_response(container.to_json())

    async def sae_info(self, request: Request) -> Response:
        caller = self._caller(request)
        return json_response(self.service.sae_info(caller).to_json())

    async def admin_links(self, request: Request) -> Response:
        self._admin(request)
        links = links_json(await self.service.link_reports())
        return json_response({"KME_ID": self.kme_id, "links": links})

    async def metrics_page(self, request: Request) -> Response:
        self._admin(request)
        if self.metrics is None:
            raise BadRequestError("metrics are disabled in this KME's configuration")
        self.metrics.update_links(await self.service.link_reports())
        self.metrics.update_policy(self.service.refusals, await self.service.uncollected_by_master())
        self.metrics.watch_relay(self.service.relay.stats)
        return Response(200, self.metrics.render(), CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return Response(200, openapi_bytes(), "application/yaml")
