"""The SAE interface of the KME (ETSI GS QKD 014 §5) on aiohttp: HTTP ↔ :class:`KmeService` translation.

ETSI 014 defines only 200, 400, 401 and 503, each with a JSON ``Error`` body. aiohttp's own answers (404 for
an unknown path, 405 for a wrong method, 413 for a large body) are therefore rewritten to 400 here, and an
unexpected exception becomes a generic 503 with the traceback logged, never shown.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from qkdtls.etsi014.models import BadRequest, KeyIDs, KeyRequest, parse_key_id
from qkdtls.kme.auth import IdentityMap, peer_certificate
from qkdtls.kme.errors import BadRequestError, KmeError, UnauthorizedError
from qkdtls.kme.metrics import CONTENT_TYPE, KmeMetrics
from qkdtls.kme.openapi import OPENAPI_PATH, openapi_bytes
from qkdtls.kme.service import KmeService

log = logging.getLogger("qkdtls.kme.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MSG_UNAUTHORIZED = "the client certificate does not identify a registered SAE"
MSG_ADMIN_ONLY = "this route is for administrators of this KME"
MSG_INTERNAL = "internal error of the KME; the request can be retried"


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(doc, separators=(",", ":")).encode(), status=status, content_type="application/json"
    )


def error_response(status: int, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    doc: dict[str, Any] = {"message": message}
    if details:
        doc["details"] = details
    return json_response(doc, status)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON, None when empty; :class:`BadRequestError` for anything malformed."""
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestError("request body must be UTF-8 encoded JSON") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        # ValueError also covers integers beyond Python's digit limit; RecursionError very deep nesting.
        raise BadRequestError("request body is not valid JSON") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    doc = parse_json_body(raw)
    if not isinstance(doc, dict):
        raise BadRequestError(f"{what} must be a JSON object")
    return doc


def single_query(request: web.Request, allowed: frozenset[str]) -> dict[str, str]:
    """Query parameters as a plain dict; repeated or unexpected names are a bad request."""
    query = request.query
    out: dict[str, str] = {}
    for name in query:
        if name not in allowed:
            raise BadRequestError(f"unexpected query parameter {name[:64]!r}")
        values = query.getall(name)
        if len(values) != 1:
            raise BadRequestError(f"query parameter {name} given more than once")
        out[name] = values[0]
    return out


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


def _http_exception_message(exc: web.HTTPException, request: web.Request) -> str:
    if exc.status == 404:
        return f"no such route: {request.path[:200]}"
    if exc.status == 405:
        return f"method {request.method[:16]} is not allowed on {request.path[:200]}"
    if exc.status == 413:
        return "request body too large"
    return exc.reason or "bad request"


ETSI_STATUSES = frozenset({400, 401, 503})


def error_middleware(
    metrics: KmeMetrics | None, statuses: frozenset[int] = ETSI_STATUSES
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Every error answer has one of ``statuses`` and a JSON body; latency is recorded per route."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except KmeError as exc:
            status = exc.status if exc.status in statuses else 503
            response = error_response(status, exc.message, exc.details)
        except BadRequest as exc:
            response = error_response(400, exc.message, exc.details)
        except web.HTTPException as exc:
            status = 503 if exc.status >= 500 else 400 if exc.status != 401 else 401
            response = error_response(status, _http_exception_message(exc, request))
        except Exception:
            log.exception("unexpected error", extra={"event": "http.error", "route": _route_name(request)})
            response = error_response(503, MSG_INTERNAL)
        if metrics is not None:
            metrics.observe(
                _route_name(request), request.method, response.status, time.perf_counter() - started
            )
        return response

    return middleware


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp answers malformed HTTP itself (bad request line, oversized header, bad Content-Length) in
    text/plain, before any route runs; ETSI 014 clients expect a JSON Error body on every answer."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs, and raises if a response already started
        if status >= 500:
            reply = error_response(503, MSG_INTERNAL)
        else:
            reply = error_response(400, "malformed HTTP request")
        reply.force_close()
        return reply


class AccessLogger(AbstractAccessLogger):
    """One structured record per request (no bodies: they may carry keys)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status,
            extra={
                "event": "http.request",
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "seconds": round(time, 6),
                "remote": request.remote,
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


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

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[error_middleware(self.metrics)], client_max_size=self.max_body_bytes
        )
        r = app.router
        r.add_get("/api/v1/keys/{slave}/status", self.status, allow_head=False)
        r.add_get("/api/v1/keys/{slave}/enc_keys", self.enc_keys_get, allow_head=False)
        r.add_post("/api/v1/keys/{slave}/enc_keys", self.enc_keys_post)
        r.add_get("/api/v1/keys/{master}/dec_keys", self.dec_keys_get, allow_head=False)
        r.add_post("/api/v1/keys/{master}/dec_keys", self.dec_keys_post)
        r.add_get("/api/v1/sae/info/me", self.sae_info, allow_head=False)
        r.add_get("/api/v1/admin/links", self.admin_links, allow_head=False)
        r.add_get(OPENAPI_PATH, self.openapi, allow_head=False)
        r.add_get("/metrics", self.metrics_page, allow_head=False)
        return app

    def _caller(self, request: web.Request) -> int:
        sae = self.saes.lookup(peer_certificate(request))
        if sae is None:
            raise UnauthorizedError(MSG_UNAUTHORIZED)
        return sae

    def _admin(self, request: web.Request) -> str:
        admin = self.admins.lookup(peer_certificate(request))
        if admin is None:
            raise UnauthorizedError(MSG_ADMIN_ONLY)
        return admin

    async def status(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        single_query(request, frozenset())
        status = await self.service.status(caller, request.match_info["slave"])
        return json_response(status.to_json())

    async def enc_keys_get(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        key_request = KeyRequest.from_query(single_query(request, frozenset({"number", "size"})))
        return await self._enc_keys(request, caller, key_request)

    async def enc_keys_post(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        single_query(request, frozenset())
        raw = await request.read()
        # No body means "all defaults" (ETSI 014 allows an empty request); a body must be a JSON object.
        key_request = (
            KeyRequest() if not raw.strip() else KeyRequest.from_json(_json_object(raw, "Key request"))
        )
        return await self._enc_keys(request, caller, key_request)

    async def _enc_keys(self, request: web.Request, caller: int, key_request: KeyRequest) -> web.Response:
        slave = request.match_info["slave"]
        container = await self.service.enc_keys(caller, slave, key_request)
        if self.metrics is not None:
            self.metrics.keys_delivered.inc(len(container.keys))
        return json_response(container.to_json())

    async def dec_keys_get(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        query = single_query(request, frozenset({"key_ID"}))
        if "key_ID" not in query:
            raise BadRequestError(
                "GET dec_keys needs exactly one key_ID query parameter; use POST for several"
            )
        return await self._dec_keys(request, caller, (parse_key_id(query["key_ID"]),))

    async def dec_keys_post(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        single_query(request, frozenset())
        doc = parse_json_body(await request.read())
        if doc is None:
            raise BadRequestError("POST dec_keys needs a Key IDs body")
        return await self._dec_keys(request, caller, KeyIDs.from_json(doc).key_IDs)

    async def _dec_keys(self, request: web.Request, caller: int, key_ids: tuple[str, ...]) -> web.Response:
        master = request.match_info["master"]
        container = await self.service.dec_keys(caller, master, key_ids)
        if self.metrics is not None:
            self.metrics.keys_collected.inc(len(container.keys))
        return json_response(container.to_json())

    async def sae_info(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        return json_response(self.service.sae_info(caller).to_json())

    async def admin_links(self, request: web.Request) -> web.Response:
        self._admin(request)
        reports = await self.service.link_reports()
        links = [
            {
                "peer_KME_ID": rep.peer_kme_id,
                "stock_blocks": {str(d): n for d, n in sorted(rep.direction_blocks.items())},
                "stock_bytes": rep.stock_bytes,
                "reserved_keys": rep.reserved_keys,
                "entropy_bits_per_byte": rep.entropy_bits_per_byte,
                "imported_bytes": rep.imported_bytes,
            }
            for rep in reports
        ]
        return json_response({"KME_ID": self.kme_id, "links": links})

    async def metrics_page(self, request: web.Request) -> web.Response:
        self._admin(request)
        if self.metrics is None:
            raise BadRequestError("metrics are disabled in this KME's configuration")
        self.metrics.update_links(await self.service.link_reports())
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=openapi_bytes(), content_type="application/yaml")
