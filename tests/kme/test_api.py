"""ETSI GS QKD 014 behaviour of the SAE interface over real mutual-TLS HTTPS (two in-process KMEs)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from pathlib import Path

from qkdtls.etsi014.models import (
    MSG_EXT_MANDATORY_UNSUPPORTED,
    MSG_KEYS_NOT_FOUND,
    MSG_SIZE_MULTIPLE_OF_8,
)
from qkdtls.testbed import Testbed

from .conftest import SMALL_STOCK, Pair, Reply, start_pair, stop_pair

ENC = "/api/v1/keys/{}/enc_keys"
DEC = "/api/v1/keys/{}/dec_keys"
STATUS = "/api/v1/keys/{}/status"


def error(reply: Reply, status: int) -> str:
    assert reply.status == status, reply.body
    assert reply.content_type == "application/json"
    doc = reply.json
    assert isinstance(doc["message"], str) and doc["message"]
    return doc["message"]


def keys_of(reply: Reply) -> dict[str, bytes]:
    assert reply.status == 200, reply.body
    assert reply.content_type == "application/json"
    return {k["key_ID"]: base64.b64decode(k["key"], validate=True) for k in reply.json["keys"]}


async def test_status_cross_and_local(pair: Pair) -> None:
    reply = await pair.caller(1001).get(STATUS.format(2001))
    assert reply.status == 200
    doc = reply.json
    assert doc["source_KME_ID"] == "1" and doc["target_KME_ID"] == "2"
    assert doc["master_SAE_ID"] == "1001" and doc["slave_SAE_ID"] == "2001"
    assert doc["key_size"] == 256 and doc["min_key_size"] <= 256 <= doc["max_key_size"]
    # Half of the link's blocks belong to KME 1's direction; a 256-bit key is one 32-byte block.
    assert doc["stored_key_count"] == SMALL_STOCK // 32 // 2
    local = (await pair.caller(1001).get(STATUS.format(1002))).json
    assert local["target_KME_ID"] == "1" and local["stored_key_count"] == SMALL_STOCK // 32


async def test_cross_kme_post_then_get_forms(pair: Pair) -> None:
    master, slave = pair.caller(1001), pair.caller(2001)
    delivered = keys_of(await master.post(ENC.format(2001), {"number": 3, "size": 512}))
    assert len(delivered) == 3 and all(len(v) == 64 for v in delivered.values())
    body = {"key_IDs": [{"key_ID": k} for k in delivered]}
    assert keys_of(await slave.post(DEC.format(1001), body)) == delivered
    # Collected keys are gone from the slave's KME.
    assert error(await slave.post(DEC.format(1001), body), 400) == MSG_KEYS_NOT_FOUND

    one = keys_of(await master.get(ENC.format(2001)))  # empty GET: one key of the default size
    assert [len(v) for v in one.values()] == [32]
    (key_id,) = one
    assert keys_of(await slave.get(DEC.format(1001), params={"key_ID": key_id})) == one
    got = keys_of(await master.get(ENC.format(2001), params={"number": "2", "size": "128"}))
    assert len(got) == 2 and all(len(v) == 16 for v in got.values())


async def test_opposite_direction_and_empty_post(pair: Pair) -> None:
    delivered = keys_of(await pair.caller(2001).post(ENC.format(1002)))  # no body at all
    ids = {"key_IDs": [{"key_ID": k} for k in delivered]}
    assert keys_of(await pair.caller(1002).post(DEC.format(2001), ids)) == delivered
    empty = keys_of(await pair.caller(2001).post(ENC.format(1001), {}))
    assert len(empty) == 1


async def test_local_pair(pair: Pair) -> None:
    delivered = keys_of(await pair.caller(1001).post(ENC.format(1002), {"number": 2}))
    ids = {"key_IDs": [{"key_ID": k} for k in delivered]}
    assert keys_of(await pair.caller(1002).post(DEC.format(1001), ids)) == delivered


async def test_multicast(pair: Pair) -> None:
    delivered = keys_of(
        await pair.caller(2001).post(ENC.format(1001), {"number": 2, "additional_slave_SAE_IDs": ["1002"]})
    )
    ids = {"key_IDs": [{"key_ID": k} for k in delivered]}
    assert keys_of(await pair.caller(1001).post(DEC.format(2001), ids)) == delivered
    assert keys_of(await pair.caller(1002).post(DEC.format(2001), ids)) == delivered
    # Slaves on different KMEs cannot share one request.
    reply = await pair.caller(1001).post(ENC.format(2001), {"additional_slave_SAE_IDs": ["1002"]})
    error(reply, 400)


async def test_keys_carry_their_holders(pair: Pair) -> None:
    enc = await pair.caller(2001).post(ENC.format(1001), {"number": 2, "additional_slave_SAE_IDs": ["1002"]})
    holders = {"master_SAE_ID": 2001, "slave_SAE_IDs": [1001, 1002]}
    assert [k["key_extension"] for k in enc.json["keys"]] == [holders, holders]
    ids = {"key_IDs": [{"key_ID": k["key_ID"]} for k in enc.json["keys"]]}
    dec = await pair.caller(1002).post(DEC.format(2001), ids)
    assert dec.status == 200 and dec.json["keys"] == enc.json["keys"]
    enc = await pair.caller(1001).get(ENC.format(2001))
    assert enc.json["keys"][0]["key_extension"] == {"master_SAE_ID": 1001, "slave_SAE_IDs": [2001]}
    dec = await pair.caller(2001).get(DEC.format(1001), params={"key_ID": enc.json["keys"][0]["key_ID"]})
    assert dec.json["keys"] == enc.json["keys"]


async def test_normative_400_messages(pair: Pair) -> None:
    master = pair.caller(1001)
    assert error(await master.post(ENC.format(2001), {"size": 260}), 400) == MSG_SIZE_MULTIPLE_OF_8
    assert error(await master.get(ENC.format(2001), params={"size": "12"}), 400) == MSG_SIZE_MULTIPLE_OF_8
    reply = await master.post(ENC.format(2001), {"extension_mandatory": [{"abc_route_type": "direct"}]})
    assert error(reply, 400) == MSG_EXT_MANDATORY_UNSUPPORTED
    unknown = {"key_IDs": [{"key_ID": str(uuid.uuid4())}]}
    assert error(await pair.caller(2001).post(DEC.format(1001), unknown), 400) == MSG_KEYS_NOT_FOUND
    reply = await pair.caller(2001).get(DEC.format(1001), params={"key_ID": str(uuid.uuid4())})
    assert error(reply, 400) == MSG_KEYS_NOT_FOUND
    # extension_optional may be ignored.
    assert len(keys_of(await master.post(ENC.format(2001), {"extension_optional": [{"x_y": 1}]}))) == 1


async def test_limits(pair: Pair) -> None:
    master = pair.caller(1001)
    cfg = pair.config(1).service
    error(await master.post(ENC.format(2001), {"number": cfg.max_key_per_request + 1}), 400)
    error(await master.post(ENC.format(2001), {"size": cfg.max_key_size + 8}), 400)
    error(await master.post(ENC.format(2001), {"size": cfg.min_key_size - 8}), 400)
    error(await master.post(ENC.format(2001), {"number": 0}), 400)
    # More keys than the stock holds: 503, and nothing was consumed.
    before = (await master.get(STATUS.format(2001))).json["stored_key_count"]
    big = {"number": cfg.max_key_per_request, "size": cfg.max_key_size}
    assert error(await master.post(ENC.format(2001), big), 503)
    assert (await master.get(STATUS.format(2001))).json["stored_key_count"] == before


async def test_only_a_named_slave_collects(pair: Pair) -> None:
    delivered = keys_of(await pair.caller(1001).post(ENC.format(1002)))
    ids = {"key_IDs": [{"key_ID": k} for k in delivered]}
    # The master itself is not a slave of its keys.
    assert error(await pair.caller(1001).post(DEC.format(1001), ids), 401)
    # Wrong master named: the key is not found for that master.
    assert error(await pair.caller(1002).post(DEC.format(1002), ids), 400)
    assert keys_of(await pair.caller(1002).post(DEC.format(1001), ids)) == delivered


async def test_dec_keys_get_needs_exactly_one_key_id(pair: Pair) -> None:
    slave = pair.caller(2001)
    error(await slave.get(DEC.format(1001)), 400)
    two = f"?key_ID={uuid.uuid4()}&key_ID={uuid.uuid4()}"
    error(await slave.get(DEC.format(1001) + two), 400)
    error(await slave.get(DEC.format(1001), params={"key_ID": "not-a-uuid"}), 400)
    error(await slave.get(DEC.format(1001), params={"key_ID": str(uuid.uuid4()), "x": "1"}), 400)


async def test_sae_info(pair: Pair) -> None:
    assert (await pair.caller(1002).get("/api/v1/sae/info/me")).json == {"SAE_ID": 1002, "KME_ID": 1}
    assert (await pair.caller(2001).get("/api/v1/sae/info/me")).json == {"SAE_ID": 2001, "KME_ID": 2}


async def test_admin_links_metrics_and_openapi(pair: Pair) -> None:
    admin = pair.admins[1]
    keys_of(await pair.caller(1001).post(ENC.format(2001)))
    doc = (await admin.get("/api/v1/admin/links")).json
    assert doc["KME_ID"] == 1
    links = {link["peer_KME_ID"]: link for link in doc["links"]}
    assert set(links) == {1, 2}
    assert links[2]["imported_bytes"] == SMALL_STOCK
    assert links[2]["stock_blocks"] == {"0": SMALL_STOCK // 64 - 1, "1": SMALL_STOCK // 64}
    assert 7.9 < links[2]["entropy_bits_per_byte"] <= 8.0
    # SAEs are not administrators; administrators are not SAEs.
    error(await pair.caller(1001).get("/api/v1/admin/links"), 401)
    error(await admin.get(STATUS.format(2001)), 401)

    metrics = await admin.get("/metrics")
    assert metrics.status == 200
    text = metrics.body.decode()
    assert "qkdtls_kme_keys_delivered_total 1.0" in text
    assert 'qkdtls_kme_stock_blocks{direction="1",peer_kme="2"}' in text
    assert 'qkdtls_kme_request_seconds_count{method="POST",route="/api/v1/keys/{slave}/enc_keys"}' in text
    error(await pair.caller(1001).get("/metrics"), 401)

    spec = await pair.caller(1001).get("/api/v1/openapi.yaml")
    assert spec.status == 200 and spec.body.startswith(b"openapi: 3.0.3")


async def test_stalled_handshakes_do_not_block_others(pair: Pair) -> None:
    port = pair.testbed.kmes[1].sae_port
    stalled = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
    try:
        reply = await asyncio.wait_for(pair.caller(1002).get("/api/v1/sae/info/me"), timeout=3)
        assert reply.status == 200
    finally:
        for _reader, writer in stalled:
            writer.close()


async def test_uncollected_keys_expire(tmp_path: Path) -> None:
    service = {"reservation_ttl": 0.3, "peer_timeout": 0.5, "stale_hold_after": 1.0}
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=4096, service=service, sweep_interval=0.1)
    pair = await start_pair(bed)
    try:
        delivered = keys_of(await pair.caller(1001).post(ENC.format(2001), {"number": 2}))
        await asyncio.sleep(0.8)
        ids = {"key_IDs": [{"key_ID": k} for k in delivered]}
        assert error(await pair.caller(2001).post(DEC.format(1001), ids), 400) == MSG_KEYS_NOT_FOUND
        metrics = (await pair.admins[2].get("/metrics")).body.decode()
        assert "qkdtls_kme_keys_expired_total 2.0" in metrics
    finally:
        await stop_pair(pair)
