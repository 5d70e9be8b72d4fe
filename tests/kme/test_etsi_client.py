"""An independent ETSI 014 client (PyPI ``etsi-qkd-014-client``) against the KME pair."""

from __future__ import annotations

import asyncio
import base64
import uuid

from etsi_qkd_014_client import QKD014Client

from qkdtls.etsi014.models import MSG_KEYS_NOT_FOUND, MSG_SIZE_MULTIPLE_OF_8

from .conftest import Pair


def _client(pair: Pair, sae: int) -> QKD014Client:
    bed = pair.testbed
    cert, key, ca = bed.sae_credentials(sae)
    host = bed.sae_url(bed.kme_of(sae)).removeprefix("https://")
    return QKD014Client(host, str(cert), str(key), str(ca))


def _session(pair: Pair) -> None:
    master, slave = _client(pair, 1001), _client(pair, 2001)
    code, status = master.get_status("2001")
    assert code == 200 and status.source_kme_id == "1" and status.key_size == 256

    code, container = master.get_key("2001")  # the library's simple GET form
    assert code == 200 and len(container.keys) == 1
    code, more = master.get_key("2001", number=2, size=512)  # POST form
    assert code == 200 and len(more.keys) == 2
    keys = {k.key_id: k.key for k in [*container.keys, *more.keys]}
    assert all(len(base64.b64decode(v)) in (32, 64) for v in keys.values())

    code, got = slave.get_key_with_key_IDs("1001", list(keys))
    assert code == 200 and {k.key_id: k.key for k in got.keys} == keys

    # Errors reach the library as ETSI Error objects (it calls .json() on every answer).
    code, err = master.get_key("2001", size=100)
    assert code == 400 and err.message == MSG_SIZE_MULTIPLE_OF_8
    code, err = slave.get_key_with_key_IDs("1001", [str(uuid.uuid4())])
    assert code == 400 and err.message == MSG_KEYS_NOT_FOUND
    code, err = master.get_key_with_key_IDs("2001", list(keys))  # SAE 1001 is not a slave of SAE 2001 here
    assert code == 400 and err.message == MSG_KEYS_NOT_FOUND


async def test_independent_client(pair: Pair) -> None:
    # The library is blocking; the KMEs run in this event loop, so the client runs in a thread.
    await asyncio.wait_for(asyncio.to_thread(_session, pair), timeout=60)
