"""KmeClient against a real aiohttp mutual-TLS server on loopback that serves scripted ETSI 014 answers.

The scripted server makes the client's edge cases reproducible (error bodies, garbage, slow or dripping
answers, closed kept-alive connections); tests/etsi014/test_client_kme.py runs it against real KMEs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import ssl
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from qkdtls import pki
from qkdtls.etsi014.client import (
    MAX_BODY,
    AsyncKmeClient,
    KmeClient,
    KmeClientError,
    KmeClientSettings,
    KmeProtocolError,
    KmeRefused,
    KmeTlsError,
    KmeUnavailable,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SAE, PEER_SAE, KME_ID = 1001, 2001, 1


def _key_doc(key_id: str | None = None, size: int = 32) -> dict[str, str]:
    return {"key_ID": key_id or str(uuid.uuid4()), "key": base64.b64encode(os.urandom(size)).decode()}


class ScriptedKme:
    """An aiohttp mTLS server in its own thread and event loop; ``handlers`` can be replaced per test."""

    def __init__(self, zone: pki.Zone, *, keepalive_timeout: float = 75.0) -> None:
        self.zone = zone
        self.keepalive_timeout = keepalive_timeout
        self.requests: list[tuple[str, str, bytes]] = []
        self.client_ports: list[int] = []
        self.handlers: dict[tuple[str, str], Handler] = {}
        self.max_key_per_request = 5
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def count(self, fragment: str) -> int:
        return sum(fragment in path for _, path, _ in self.requests)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.zone.ca))
        ctx.load_cert_chain(self.zone.kme_server.cert, self.zone.kme_server.key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(
            app, keepalive_timeout=self.keepalive_timeout, access_log=None, shutdown_timeout=0.1
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.method, request.path_qs, body))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer and peer[1] not in self.client_ports:
            self.client_ports.append(peer[1])
        handler = self.handlers.get((request.method, request.path))
        if handler is not None:
            return await handler(request)
        return await self._default(request, body)

    async def _default(self, request: web.Request, body: bytes) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        if request.path == "/api/v1/sae/info/me":
            return web.json_response({"SAE_ID": SAE, "KME_ID": KME_ID})
        if len(parts) == 5 and parts[:3] == ["api", "v1", "keys"]:
            other, action = parts[3], parts[4]
            if action == "status":
                return web.json_response(self._status(other))
            if action == "enc_keys":
                doc = json.loads(body) if body else dict(request.query)
                number = int(doc.get("number", 1))
                size = int(doc.get("size", 256))
                return web.json_response({"keys": [_key_doc(size=size // 8) for _ in range(number)]})
            if action == "dec_keys":
                if request.method == "GET":
                    ids = [request.query["key_ID"]]
                else:
                    ids = [item["key_ID"] for item in json.loads(body)["key_IDs"]]
                return web.json_response({"keys": [_key_doc(k) for k in ids]})
        return web.json_response({"message": "not found"}, status=404)

    def _status(self, slave: str) -> dict[str, Any]:
        return {
            "source_KME_ID": str(KME_ID),
            "target_KME_ID": "2",
            "master_SAE_ID": str(SAE),
            "slave_SAE_ID": slave,
            "key_size": 256,
            "stored_key_count": 100,
            "max_key_count": 1000,
            "max_key_per_request": self.max_key_per_request,
            "max_key_size": 1024,
            "min_key_size": 64,
            "max_SAE_ID_count": 0,
        }


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiLayout:
    return pki.build_testbed_pki(
        tmp_path_factory.mktemp("pki"),
        [pki.ZoneSpec(KME_ID, {SAE: 0x5AE1001}), pki.ZoneSpec(2, {PEER_SAE: 0x5AE2001})],
    )


@pytest.fixture
def kme(layout: pki.PkiLayout) -> Iterator[ScriptedKme]:
    server = ScriptedKme(layout.zones[KME_ID])
    server.start()
    yield server
    server.stop()


def _settings(layout: pki.PkiLayout, url: str, **overrides: Any) -> KmeClientSettings:
    zone = layout.zones[KME_ID]
    sae = zone.saes[SAE]
    return KmeClientSettings(url=url, certfile=sae.cert, keyfile=sae.key, cafile=zone.ca, **overrides)


@pytest.fixture
def client(layout: pki.PkiLayout, kme: ScriptedKme) -> Iterator[KmeClient]:
    with KmeClient(_settings(layout, kme.url, timeout=2.0)) as c:
        yield c


def _reply(
    status: int, body: bytes | str | dict[str, Any], *, content_type: str = "application/json"
) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if isinstance(body, dict):
            return web.json_response(body, status=status)
        data = body.encode() if isinstance(body, str) else body
        return web.Response(body=data, status=status, content_type=content_type)

    return handler


ENC = "/api/v1/keys/2001/enc_keys"
DEC = "/api/v1/keys/2001/dec_keys"

# --- the ETSI 014 operations --------------------------------------------------------------------------------


def test_enc_keys_post_sends_an_etsi_key_request(client: KmeClient, kme: ScriptedKme) -> None:
    container = client.enc_keys(PEER_SAE, number=3, size=512, additional_slave_sae_ids=["2002"])
    assert len(container.keys) == 3
    assert all(len(k.key) == 64 for k in container.keys)
    method, path, body = kme.requests[-1]
    assert (method, path) == ("POST", ENC)
    assert json.loads(body) == {"number": 3, "size": 512, "additional_slave_SAE_IDs": ["2002"]}


def test_enc_keys_get_uses_query_parameters(client: KmeClient, kme: ScriptedKme) -> None:
    assert len(client.enc_keys("2001", number=2, method="GET").keys) == 2
    assert kme.requests[-1][:2] == ("GET", ENC + "?number=2")
    with pytest.raises(ValueError, match="POST"):
        client.enc_keys(PEER_SAE, additional_slave_sae_ids=[2002], method="GET")


def test_dec_keys_post_and_get(client: KmeClient, kme: ScriptedKme) -> None:
    ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    container = client.dec_keys(PEER_SAE, ids)
    assert [k.key_ID for k in container.keys] == ids
    assert json.loads(kme.requests[-1][2]) == {"key_IDs": [{"key_ID": i} for i in ids]}
    assert client.dec_keys(PEER_SAE, ids[:1], method="GET").keys[0].key_ID == ids[0]
    assert kme.requests[-1][1] == f"{DEC}?key_ID={ids[0]}"
    with pytest.raises(ValueError, match="exactly one"):
        client.dec_keys(PEER_SAE, ids, method="GET")


def test_status_and_sae_info(client: KmeClient, kme: ScriptedKme) -> None:
    status = client.status(PEER_SAE)
    assert (status.source_KME_ID, status.slave_SAE_ID, status.max_key_per_request) == ("1", "2001", 5)
    assert client.sae_info().SAE_ID == SAE
    assert client.sae_info().KME_ID == KME_ID
    assert kme.count("/sae/info/me") == 1  # cached


def test_admin_links_returns_the_links_array(client: KmeClient, kme: ScriptedKme) -> None:
    links = [{"peer_KME_ID": 2, "stock_bytes": 1024, "entropy_bits_per_byte": 7.99}]
    kme.handlers[("GET", "/api/v1/admin/links")] = _reply(200, {"KME_ID": 1, "links": links})
    assert client.admin_links() == links
    kme.handlers[("GET", "/api/v1/admin/links")] = _reply(200, {"KME_ID": 1})
    with pytest.raises(KmeProtocolError, match="links"):
        client.admin_links()


@pytest.mark.parametrize("bad", [True, "12a", "", " 7", 2**63, "-9223372036854775809", 1.5])
def test_sae_ids_must_be_64_bit_integers(client: KmeClient, bad: Any) -> None:
    with pytest.raises(ValueError, match="SAE ID"):
        client.enc_keys(bad)


def test_negative_and_extreme_sae_ids_are_sent_in_decimal(client: KmeClient, kme: ScriptedKme) -> None:
    client.status(-(2**63))
    assert kme.requests[-1][1] == f"/api/v1/keys/{-(2**63)}/status"


# --- errors -------------------------------------------------------------------------------------------------


def test_401_with_etsi_error_body_is_refused(client: KmeClient, kme: ScriptedKme) -> None:
    kme.handlers[("POST", ENC)] = _reply(401, {"message": "unknown SAE certificate"})
    with pytest.raises(KmeRefused) as info:
        client.enc_keys(PEER_SAE)
    assert (info.value.status, info.value.message) == (401, "unknown SAE certificate")
    assert "registered" in str(info.value)  # says what to check


def test_400_keeps_message_and_details(client: KmeClient, kme: ScriptedKme) -> None:
    details = [{"size": "shall be a multiple of 8"}]
    kme.handlers[("POST", ENC)] = _reply(
        400, {"message": "size shall be a multiple of 8", "details": details}
    )
    with pytest.raises(KmeRefused) as info:
        client.enc_keys(PEER_SAE, size=7)
    assert info.value.status == 400 and info.value.details == details


def test_error_without_json_body_is_still_typed(client: KmeClient, kme: ScriptedKme) -> None:
    kme.handlers[("POST", ENC)] = _reply(404, "Not found", content_type="text/plain")
    with pytest.raises(KmeRefused) as info:
        client.enc_keys(PEER_SAE)
    assert info.value.status == 404 and "without an ETSI Error body" in info.value.message


@pytest.mark.parametrize("status", [503, 500, 504])
def test_server_errors_are_unavailable(client: KmeClient, kme: ScriptedKme, status: int) -> None:
    kme.handlers[("POST", ENC)] = _reply(status, {"message": "not enough key material"})
    with pytest.raises(KmeUnavailable, match=f"HTTP {status}"):
        client.enc_keys(PEER_SAE)


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe garbage",
        b'{"keys": [{"key_ID": "not-a-uuid", "key": "AAAA"}]}',
        b'{"keys": [{"key_ID": "6f0b5a8e-4a5c-4f3a-9a67-0f6b3c5a1d20", "key": "%%%"}]}',
        b"[]",
        b'{"keys": 5}',
    ],
)
def test_non_etsi_answers_are_protocol_errors(client: KmeClient, kme: ScriptedKme, body: bytes) -> None:
    kme.handlers[("POST", ENC)] = _reply(200, body)
    with pytest.raises(KmeProtocolError) as info:
        client.enc_keys(PEER_SAE)
    assert "garbage" not in str(info.value)  # a 200 body may carry keys: it is never quoted
    assert client.status(PEER_SAE).slave_SAE_ID == "2001"  # the client still works


def test_dec_keys_answer_with_other_keys_is_a_protocol_error(client: KmeClient, kme: ScriptedKme) -> None:
    kme.handlers[("POST", DEC)] = _reply(200, {"keys": [_key_doc()]})
    with pytest.raises(KmeProtocolError, match="other keys"):
        client.dec_keys(PEER_SAE, [str(uuid.uuid4())])


def test_oversized_body_is_refused(client: KmeClient, kme: ScriptedKme) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(MAX_BODY + 1)})
        await response.prepare(request)
        await response.write(b"{")
        return response

    kme.handlers[("POST", ENC)] = huge
    with pytest.raises(KmeProtocolError, match="limit"):
        client.enc_keys(PEER_SAE)


def test_unexpected_status_code_is_a_protocol_error(client: KmeClient, kme: ScriptedKme) -> None:
    kme.handlers[("POST", ENC)] = _reply(302, {"message": "elsewhere"})
    with pytest.raises(KmeProtocolError, match="302"):
        client.enc_keys(PEER_SAE)


def test_slow_answer_times_out(layout: pki.PkiLayout, kme: ScriptedKme) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.json_response({"keys": []})

    kme.handlers[("POST", ENC)] = slow
    with KmeClient(_settings(layout, kme.url, timeout=0.3)) as client:
        started = time.monotonic()
        with pytest.raises(KmeUnavailable, match=r"did not answer within 0\.3 s"):
            client.enc_keys(PEER_SAE)
        assert time.monotonic() - started < 0.8


def test_dripping_answer_is_cut_at_the_deadline(layout: pki.PkiLayout, kme: ScriptedKme) -> None:
    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "200", "Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(200):  # each byte arrives well within the socket timeout, the whole never does
            await response.write(b" ")
            await asyncio.sleep(0.02)
        return response

    kme.handlers[("POST", ENC)] = drip
    with KmeClient(_settings(layout, kme.url, timeout=0.4)) as client:
        started = time.monotonic()
        with pytest.raises(KmeUnavailable, match="did not answer"):
            client.enc_keys(PEER_SAE)
        assert time.monotonic() - started < 1.0
        kme.handlers.clear()
        assert client.status(PEER_SAE).slave_SAE_ID == "2001"  # the pool recovers


def test_connection_refused_is_unavailable(layout: pki.PkiLayout) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = _settings(layout, f"https://127.0.0.1:{port}", timeout=1.0)
    with KmeClient(settings) as client, pytest.raises(KmeUnavailable, match="refused"):
        client.status(PEER_SAE)


def test_untrusted_kme_certificate_is_a_tls_error(layout: pki.PkiLayout, kme: ScriptedKme) -> None:
    settings = _settings(layout, kme.url)
    wrong_ca = KmeClientSettings(
        url=kme.url, certfile=settings.certfile, keyfile=settings.keyfile, cafile=layout.zones[2].ca
    )
    with KmeClient(wrong_ca) as client, pytest.raises(KmeTlsError, match="did not verify"):
        client.status(PEER_SAE)
    assert kme.requests == []


def test_client_certificate_from_a_foreign_ca_is_refused_by_tls(
    layout: pki.PkiLayout, kme: ScriptedKme, tmp_path: Path
) -> None:
    _, foreign = pki.build_foreign_client(tmp_path, serial=0x5AE1001)
    settings = KmeClientSettings(
        url=kme.url, certfile=foreign.cert, keyfile=foreign.key, cafile=layout.zones[KME_ID].ca, timeout=2.0
    )
    # The KME's TLS alert may or may not be read before the connection closes: both say what to check.
    with KmeClient(settings) as client, pytest.raises((KmeTlsError, KmeUnavailable)) as info:
        client.status(PEER_SAE)
    assert "trust" in str(info.value)
    assert kme.requests == []


def test_missing_credentials_fail_early(layout: pki.PkiLayout, tmp_path: Path) -> None:
    settings = _settings(layout, "https://127.0.0.1:1")
    bad = KmeClientSettings(
        url=settings.url, certfile=tmp_path / "nope.crt", keyfile=settings.keyfile, cafile=settings.cafile
    )
    with pytest.raises(KmeClientError, match=r"nope\.crt"):
        KmeClient(bad)
    with pytest.raises(ValueError, match="https"):
        KmeClient(_settings(layout, "http://127.0.0.1:1"))


def test_kme_id_is_confirmed_before_keys_are_requested(layout: pki.PkiLayout, kme: ScriptedKme) -> None:
    with KmeClient(_settings(layout, kme.url, expected_kme_id=KME_ID)) as client:
        client.enc_keys(PEER_SAE)
        client.enc_keys(PEER_SAE)
        assert kme.count("/sae/info/me") == 1
    with KmeClient(_settings(layout, kme.url, expected_kme_id=7)) as client:
        with pytest.raises(KmeProtocolError, match="expects KME 7"):
            client.enc_keys(PEER_SAE)
        assert kme.count("enc_keys") == 2  # no key was requested from the wrong KME


def test_key_bytes_never_reach_logs_or_reprs(
    client: KmeClient, kme: ScriptedKme, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="qkdtls.etsi014.client"):
        key = client.get_key(PEER_SAE)
    encoded = base64.b64encode(key.key).decode()
    assert caplog.records, "the request is logged at debug level"
    assert encoded not in caplog.text and key.key.hex() not in caplog.text
    assert encoded not in repr(key) and key.key.hex() not in repr(key)
    assert "key" not in repr(client).lower().replace("keyfile", "")


# --- connections --------------------------------------------------------------------------------------------


def test_connections_are_kept_alive_with_tcp_nodelay(client: KmeClient, kme: ScriptedKme) -> None:
    for _ in range(20):
        client.status(PEER_SAE)
    assert client.connections_opened == 1
    assert len(kme.client_ports) == 1
    conn = client._idle[0]
    assert conn.sock is not None
    assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_kept_alive_requests_are_much_cheaper_than_new_connections(
    layout: pki.PkiLayout, kme: ScriptedKme
) -> None:
    def median_ms(fresh: bool, rounds: int = 15) -> float:
        times = []
        with KmeClient(_settings(layout, kme.url)) as client:
            client.sae_info()
            for _ in range(rounds):
                if fresh:
                    for conn in client._all:
                        conn.close()
                started = time.perf_counter()
                client.status(PEER_SAE)
                times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    kept, fresh = median_ms(False), median_ms(True)
    print(f"\nKME request: kept-alive {kept:.2f} ms, new mTLS connection {fresh:.2f} ms")
    assert kept < fresh / 1.5
    assert kept < 20  # no Nagle/delayed-ACK stall (that alone costs 40 ms)


def test_connection_closed_by_server_while_idle_is_replaced(layout: pki.PkiLayout) -> None:
    server = ScriptedKme(layout.zones[KME_ID], keepalive_timeout=0.1)
    server.start()
    try:
        with KmeClient(_settings(layout, server.url)) as client:
            client.status(PEER_SAE)
            time.sleep(0.3)  # the server closes the idle connection
            client.status(PEER_SAE)
            assert client.connections_opened == 2
    finally:
        server.stop()


def test_stale_connection_is_retried_once_transparently(
    layout: pki.PkiLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ScriptedKme(layout.zones[KME_ID], keepalive_timeout=0.1)
    server.start()
    try:
        with KmeClient(_settings(layout, server.url)) as client:
            client.status(PEER_SAE)
            time.sleep(0.3)
            # Skip the idle check so the request really goes out on the dead connection.
            monkeypatch.setattr("qkdtls.etsi014.client._Connection.idle_and_alive", lambda self: True)
            assert len(client.enc_keys(PEER_SAE, number=2).keys) == 2
            assert client.connections_opened == 2
            assert server.count("enc_keys") == 1  # the request reached the KME once
    finally:
        server.stop()


def test_concurrent_callers_share_a_bounded_pool(layout: pki.PkiLayout, kme: ScriptedKme) -> None:
    errors: list[BaseException] = []
    with KmeClient(_settings(layout, kme.url, pool_size=2)) as client:

        def work() -> None:
            try:
                for _ in range(15):
                    assert len(client.enc_keys(PEER_SAE, number=1).keys) == 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert errors == []
        assert client.requests_sent == 90
        assert client.connections_opened <= 2


def test_busy_pool_fails_within_the_timeout(layout: pki.PkiLayout, kme: ScriptedKme) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.json_response({"keys": []})

    kme.handlers[("POST", ENC)] = slow
    kme.handlers[("GET", "/api/v1/keys/2001/status")] = slow
    with KmeClient(_settings(layout, kme.url, pool_size=1, timeout=0.25)) as client:
        outcome: list[BaseException] = []

        def hold() -> None:
            try:
                client.enc_keys(PEER_SAE)
            except KmeClientError as exc:
                outcome.append(exc)

        holder = threading.Thread(target=hold)
        holder.start()
        time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(KmeUnavailable, match=r"busy|did not answer"):
            client.status(PEER_SAE)
        assert time.monotonic() - started < 0.5
        holder.join(5)
        assert [type(e) for e in outcome] == [KmeUnavailable]  # the holder itself timed out too


def test_closed_client_refuses_requests(layout: pki.PkiLayout, kme: ScriptedKme) -> None:
    client = KmeClient(_settings(layout, kme.url))
    client.status(PEER_SAE)
    client.close()
    client.close()  # idempotent
    with pytest.raises(KmeClientError, match="closed"):
        client.status(PEER_SAE)


# --- prefetch -----------------------------------------------------------------------------------------------


def _wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_prefetch_hands_out_each_key_once_and_refills_in_batches(
    layout: pki.PkiLayout, kme: ScriptedKme
) -> None:
    kme.max_key_per_request = 4
    with KmeClient(_settings(layout, kme.url, prefetch=6)) as client:
        prefetcher = client._prefetcher
        assert prefetcher is not None
        first = client.get_key(PEER_SAE)  # pool still empty: one direct request
        _wait_for(lambda: prefetcher.available("2001") == 6)
        batches = [json.loads(b)["number"] for m, p, b in kme.requests if p == ENC and b]
        assert max(batches) <= 4  # never more than the KME allows per request
        assert sorted(batches) == [1, 2, 4]  # the direct request, then 6 keys in two batches
        pooled = [key.key_ID for _, key in prefetcher._pools[("2001", None)]]
        taken = [client.get_key(PEER_SAE).key_ID for _ in range(6)]
        assert taken == pooled  # served from the pool, oldest first
        assert len({first.key_ID, *taken}) == 7  # no key handed out twice
        _wait_for(lambda: prefetcher.available("2001") == 6)
        assert not {key.key_ID for _, key in prefetcher._pools[("2001", None)]} & set(taken)


def test_prefetch_refills_only_once_half_empty_then_up_to_full(
    layout: pki.PkiLayout, kme: ScriptedKme
) -> None:
    with KmeClient(_settings(layout, kme.url, prefetch=6)) as client:
        prefetcher = client._prefetcher
        assert prefetcher is not None
        client.get_key(PEER_SAE)  # opens the pool (one direct request)
        _wait_for(lambda: prefetcher.available("2001") == 6)

        def enc_requests() -> int:
            return sum(1 for _, p, _ in kme.requests if p == ENC)

        before = enc_requests()
        client.get_key(PEER_SAE)
        client.get_key(PEER_SAE)
        time.sleep(0.2)  # a refill, if one were started, would have reached the KME by now
        assert enc_requests() == before and prefetcher.available("2001") == 4
        client.get_key(PEER_SAE)  # down to half: one batch tops the pool up again
        _wait_for(lambda: prefetcher.available("2001") == 6)
        assert enc_requests() == before + 1


def test_prefetched_keys_expire_unused(layout: pki.PkiLayout, kme: ScriptedKme) -> None:
    with KmeClient(_settings(layout, kme.url, prefetch=2, prefetch_max_age=0.2)) as client:
        prefetcher = client._prefetcher
        assert prefetcher is not None
        client.get_key(PEER_SAE)
        _wait_for(lambda: prefetcher.available("2001") == 2)
        stale_ids = {k.key_ID for _, k in prefetcher._pools[("2001", None)]}
        time.sleep(0.3)
        assert client.get_key(PEER_SAE).key_ID not in stale_ids


def test_prefetch_failure_falls_back_to_direct_requests(layout: pki.PkiLayout, kme: ScriptedKme) -> None:
    kme.handlers[("GET", "/api/v1/keys/2001/status")] = _reply(503, {"message": "peer KME down"})
    with KmeClient(_settings(layout, kme.url, prefetch=3)) as client:
        keys = [client.get_key(PEER_SAE) for _ in range(3)]
        assert len({k.key_ID for k in keys}) == 3
        assert client.prefetch_available(PEER_SAE) == 0


# --- asyncio ------------------------------------------------------------------------------------------------


async def test_async_client(layout: pki.PkiLayout, kme: ScriptedKme) -> None:
    async with AsyncKmeClient(_settings(layout, kme.url)) as client:
        keys, info = await asyncio.gather(client.enc_keys(PEER_SAE, number=2), client.sae_info())
        assert len(keys.keys) == 2 and info.KME_ID == KME_ID
        collected = await client.dec_keys(PEER_SAE, [k.key_ID for k in keys.keys])
        assert len(collected.keys) == 2
        assert (await client.get_key(PEER_SAE)).key_ID
        assert (await client.status(PEER_SAE)).slave_SAE_ID == "2001"
        kme.handlers[("GET", "/api/v1/admin/links")] = _reply(200, {"links": []})
        assert await client.admin_links() == []


def test_clients_leave_no_threads_behind(layout: pki.PkiLayout, kme: ScriptedKme) -> None:
    for _ in range(5):
        with KmeClient(_settings(layout, kme.url, prefetch=2)) as client:
            client.get_key(PEER_SAE)
    names = [t.name for t in threading.enumerate()]
    assert names.count("kme-client-watchdog") == 1  # one per process, shared by every client
    assert "kme-client-prefetch" not in names
