"""Hostile and mistaken requests: each gets the right status and a JSON message, or a refused handshake.

ETSI 014 allows only 200/400/401/503, so unknown paths, wrong methods and oversized bodies are 400 too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qkdtls.kme.peers import RESERVATIONS_PATH
from qkdtls.kme.routes import MSG_INTERNAL
from qkdtls.pki import build_foreign_client, issue_client_cert

from .conftest import Caller, Pair, Reply, tls_client_context

ENC = "/api/v1/keys/2001/enc_keys"
DEC = "/api/v1/keys/1001/dec_keys"


def assert_json_error(reply: Reply, status: int) -> str:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.content_type == "application/json"
    doc = json.loads(reply.body)
    assert isinstance(doc, dict) and isinstance(doc["message"], str) and doc["message"]
    assert set(doc) <= {"message", "details"}
    return doc["message"]


BAD_ENC_BODIES: list[Any] = [
    b"{",
    b"[]",
    b'"text"',
    b"17",
    b"null",
    b"\xff\xfe",
    b'{"number": NaN}',
    b'{"number": Infinity}',
    {"number": "1"},
    {"number": True},
    {"number": -1},
    {"number": 0},
    {"number": 10**30},
    {"number": 1.5},
    {"number": 1e300},
    {"size": -256},
    {"size": 2**64},
    {"size": None, "number": [1]},
    {"additional_slave_SAE_IDs": "1002"},
    {"additional_slave_SAE_IDs": [None]},
    {"additional_slave_SAE_IDs": ["99999"]},
    {"additional_slave_SAE_IDs": ["not-a-number"]},
    {"additional_slave_SAE_IDs": [str(2**70)]},
    {"extension_mandatory": "x"},
    {"extension_mandatory": [1, 2]},
    {"extension_optional": {"a": 1}},
    b'{"number": ' + b"9" * 5000 + b"}",
    b"[" * 5000 + b"]" * 5000,
]


@pytest.mark.parametrize("body", BAD_ENC_BODIES, ids=range(len(BAD_ENC_BODIES)))
async def test_bad_enc_keys_bodies(pair: Pair, body: Any) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = await pair.caller(1001).post(ENC, data=data, headers={"Content-Type": "application/json"})
    assert_json_error(reply, 400)


BAD_DEC_BODIES: list[Any] = [
    b"",
    b"{}",
    {"key_IDs": []},
    {"key_IDs": "x"},
    {"key_IDs": [{"key_ID": 5}]},
    {"key_IDs": [{"key_ID": "nope"}]},
    {"key_IDs": [{"id": str(uuid.uuid4())}]},
    {"key_IDs": [str(uuid.uuid4())]},
    {"key_IDs": [{"key_ID": str(uuid.uuid4())} for _ in range(1000)]},
]


@pytest.mark.parametrize("body", BAD_DEC_BODIES, ids=range(len(BAD_DEC_BODIES)))
async def test_bad_dec_keys_bodies(pair: Pair, body: Any) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = await pair.caller(2001).request("POST", DEC, data=data)
    assert_json_error(reply, 400)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", ENC + "?number=-1"),
        ("GET", ENC + "?number=abc"),
        ("GET", ENC + "?number=99999999999999999999999"),
        ("GET", ENC + "?number=1&number=2"),
        ("GET", ENC + "?additional_slave_SAE_IDs=1002"),
        ("GET", "/api/v1/keys/abc/status"),
        ("GET", "/api/v1/keys/99999999999999999999999/status"),
        ("GET", "/api/v1/keys/12345/status"),
        ("GET", "/api/v1/keys/%00/enc_keys"),
        ("GET", "/api/v1/keys/" + "1" * 5000 + "/status"),
        ("GET", "/api/v1/keys/2001/status?x=1"),
        ("GET", "/"),
        ("GET", "/api/v1/nothing"),
        ("GET", "/api/v2/keys/2001/status"),
        ("POST", "/api/v1/keys/2001/status"),
        ("DELETE", ENC),
        ("PUT", DEC),
        ("PATCH", "/api/v1/sae/info/me"),
        ("POST", RESERVATIONS_PATH),
    ],
)
async def test_bad_paths_queries_and_methods(pair: Pair, method: str, path: str) -> None:
    assert_json_error(await pair.caller(1001).request(method, path), 400)


async def test_body_too_large(pair: Pair) -> None:
    limit = pair.config(1).sae_interface.max_body_bytes
    body = b'{"extension_optional": [' + b'{"a": 1},' * (limit // 9) + b'{"a": 1}]}'
    assert_json_error(await pair.caller(1001).post(ENC, data=body), 400)


async def test_unexpected_failure_is_a_generic_503(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(*_args: object) -> None:
        raise RuntimeError("secret internals")

    service = pair.servers[1].service
    assert service is not None
    monkeypatch.setattr(service, "status", boom)
    reply = await pair.caller(1001).get("/api/v1/keys/2001/status")
    assert assert_json_error(reply, 503) == MSG_INTERNAL
    assert b"secret" not in reply.body


# --- certificates ------------------------------------------------------------------------------------------

ROUTES = [
    ("GET", "/api/v1/keys/2001/status"),
    ("POST", ENC),
    ("GET", DEC + f"?key_ID={uuid.uuid4()}"),
    ("POST", DEC),
    ("GET", "/api/v1/sae/info/me"),
    ("GET", "/api/v1/admin/links"),
    ("GET", "/metrics"),
]


async def _call(base: str, ctx: ssl.SSLContext, method: str, path: str) -> Reply:
    caller = Caller(base, ctx, timeout=5.0)
    try:
        return await caller.request(method, path)
    finally:
        await caller.close()


async def _refused(
    base: str, ctx: ssl.SSLContext, path: str = "/api/v1/sae/info/me", method: str = "GET"
) -> None:
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await _call(base, ctx, method, path)


async def test_no_client_certificate_gets_json_401(pair: Pair) -> None:
    bed = pair.testbed
    ctx = tls_client_context(None, None, bed.pki.zones[1].ca)
    for method, path in ROUTES:
        assert_json_error(await _call(bed.sae_url(1), ctx, method, path), 401)


async def test_unregistered_certificate_of_the_right_ca(pair: Pair, tmp_path: Path) -> None:
    zone = pair.testbed.pki.zones[1]
    stranger = issue_client_cert(zone.ca, zone.ca_key, tmp_path, "stranger", serial=0x1234567)
    ctx = tls_client_context(stranger.cert, stranger.key, zone.ca)
    for method, path in ROUTES:
        assert_json_error(await _call(pair.testbed.sae_url(1), ctx, method, path), 401)


async def test_expired_and_foreign_certificates_fail_the_handshake(pair: Pair, tmp_path: Path) -> None:
    bed = pair.testbed
    zone = bed.pki.zones[1]
    registered_serial = zone.saes[1001].serial
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    expired = issue_client_cert(
        zone.ca,
        zone.ca_key,
        tmp_path,
        "expired",
        serial=registered_serial,
        not_before=past - dt.timedelta(days=30),
        not_after=past,
    )
    await _refused(bed.sae_url(1), tls_client_context(expired.cert, expired.key, zone.ca))
    # A foreign CA's certificate carrying a registered serial must not be taken for SAE 1001.
    _ca, forged = build_foreign_client(tmp_path / "foreign", serial=registered_serial)
    await _refused(bed.sae_url(1), tls_client_context(forged.cert, forged.key, zone.ca))
    # SAE 2001 belongs to the other zone: KME 1's SAE interface does not trust its CA.
    cert, key, _ = bed.sae_credentials(2001)
    await _refused(bed.sae_url(1), tls_client_context(cert, key, zone.ca))


def _reservation(master_kme: int = 2) -> dict[str, Any]:
    return {
        "master_KME_ID": master_kme,
        "direction": 1,
        "master_SAE_ID": 2001,
        "slave_SAE_IDs": [1001],
        "size": 256,
        "keys": [{"key_ID": str(uuid.uuid4()), "blocks": [1]}],
    }


async def test_inter_kme_interface_identifies_the_calling_kme(pair: Pair, tmp_path: Path) -> None:
    bed = pair.testbed
    url = bed.inter_kme_url(1)
    zone1, zone2 = bed.pki.zones[1], bed.pki.zones[2]
    path = RESERVATIONS_PATH

    # No certificate: CERT_REQUIRED refuses the handshake.
    await _refused(url, tls_client_context(None, None, zone1.ca), path, "POST")
    # A certificate of KME 1's own zone (an SAE's): not trusted on the inter-KME interface.
    cert, key, _ = bed.sae_credentials(1001)
    await _refused(url, tls_client_context(cert, key, zone1.ca), path, "POST")

    async def post(cert: Path, key: Path, doc: Any) -> Reply:
        caller = Caller(url, tls_client_context(cert, key, zone1.ca), timeout=5.0)
        try:
            return await caller.post(path, doc)
        finally:
            await caller.close()

    # Trusted CA but not the certificate of KME 2's inter-KME client: another KME or an SAE of zone 2.
    cert, key, _ = bed.sae_credentials(2001)
    assert_json_error(await post(cert, key, _reservation()), 401)
    other_kme = issue_client_cert(zone2.ca, zone2.ca_key, tmp_path, "KME 3 inter-KME client", serial=0x3333)
    assert_json_error(await post(other_kme.cert, other_kme.key, _reservation()), 401)

    # The real peer, but claiming to be another master KME, or sending garbage.
    peer = zone2.inter_kme_clients[1]
    assert_json_error(await post(peer.cert, peer.key, _reservation(master_kme=3)), 401)
    assert_json_error(await post(peer.cert, peer.key, {"keys": "x"}), 400)
    bad_direction = dict(_reservation(), direction=0, keys=[{"key_ID": str(uuid.uuid4()), "blocks": [0]}])
    assert_json_error(await post(peer.cert, peer.key, bad_direction), 400)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"GARBAGE\r\n\r\n", "malformed HTTP request"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: kme\r\n\r\n", "request target too long"),
        (
            b"POST /api/v1/keys/2001/enc_keys HTTP/1.1\r\nHost: kme\r\nContent-Length: abc\r\n\r\n",
            "malformed HTTP request",
        ),
        (
            b"GET /api/v1/sae/info/me HTTP/1.1\r\nHost: kme\r\nX: " + b"b" * 9000 + b"\r\n\r\n",
            "header field too long",
        ),
        (
            b"GET /api/v1/sae/info/me HTTP/1.1\r\nHost: kme\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b"c" * 4000) for i in range(9))
            + b"\r\n",
            "request headers too large",
        ),
        (
            b"GET /api/v1/sae/info/me HTTP/1.1\r\nHost: kme\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(120))
            + b"\r\n",
            "too many header fields",
        ),
        (
            b"POST /api/v1/keys/2001/enc_keys HTTP/1.1\r\nHost: kme\r\nContent-Length: 99999999\r\n\r\n",
            "request body too large",
        ),
    ],
    ids=["method", "long-line", "content-length", "long-header", "many-bytes", "many-fields", "huge-body"],
)
async def test_malformed_http_gets_a_json_400(pair: Pair, raw: bytes, message: str) -> None:
    bed = pair.testbed
    ctx = tls_client_context(*bed.sae_credentials(1001))
    reader, writer = await asyncio.open_connection("127.0.0.1", bed.kmes[1].sae_port, ssl=ctx)
    try:
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400") or head.startswith(b"HTTP/1.1 400")
    assert b"Content-Type: application/json" in head
    assert json.loads(body) == {"message": message}


async def test_upgrade_request_is_answered_without_upgrading_then_closed(pair: Pair) -> None:
    bed = pair.testbed
    ctx = tls_client_context(*bed.sae_credentials(1001))
    reader, writer = await asyncio.open_connection("127.0.0.1", bed.kmes[1].sae_port, ssl=ctx)
    try:
        writer.write(
            b"GET /api/v1/sae/info/me HTTP/1.1\r\nHost: kme\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
            b"\x00\x01not http"
        )
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in head
    assert json.loads(body) == {"SAE_ID": 1001, "KME_ID": 1}
