"""A real KME process under a flood of unauthenticated TLS connections: its file descriptors stay bounded,
the legitimate SAE is still served (kept-alive and new connections), a request without a certificate still
gets the JSON 401, and the flood's idle connections are closed after the short timeout."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path

from qkdtls.testbed import Testbed

from .conftest import SMALL_STOCK, Caller, tls_client_context

CAPS = {
    "max_connections": 256,
    "max_unauthenticated": 48,
    "max_unauthenticated_per_address": 16,
    "unauthenticated_timeout": 2.0,
}
FLOOD = 400


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _open(port: int, source: str, ctx: ssl.SSLContext | None) -> asyncio.StreamWriter | None:
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, local_addr=(source, 0)), 10
        )
    except (OSError, ssl.SSLError, TimeoutError):
        return None  # closed by the KME during the handshake (evicted): what the caps are for
    return writer


async def test_flood_of_unauthenticated_connections_is_bounded(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=SMALL_STOCK, sae_interface=CAPS)
    with bed:
        pid = bed.pid(1)
        assert pid is not None
        port = bed.kmes[1].sae_port
        zone = bed.pki.zones[1]
        sae = Caller(bed.sae_url(1), tls_client_context(*bed.sae_credentials(1001)))
        try:
            assert (await sae.get("/api/v1/keys/2001/status")).status == 200
            idle_fds = _fds(pid)
            no_cert = tls_client_context(None, None, zone.ca)
            # TLS handshakes without a certificate, and TCP connections that never start TLS, from four
            # addresses; each is held open by this process.
            writers = []
            for i in range(FLOOD):
                writer = await _open(port, f"127.0.0.{2 + i % 4}", no_cert if i % 3 else None)
                if writer is not None:
                    writers.append(writer)
            await asyncio.sleep(0.2)
            flooded_fds = _fds(pid)
            # At most 48 unauthenticated connections (plus a few for handshakes being torn down).
            assert flooded_fds - idle_fds <= CAPS["max_unauthenticated"] + 8, (idle_fds, flooded_fds)
            # The kept-alive SAE connection is served; so is a new one, and a stranger still gets a 401.
            assert (await sae.get("/api/v1/keys/2001/status")).status == 200
            fresh = Caller(bed.sae_url(1), tls_client_context(*bed.sae_credentials(1002)))
            stranger = Caller(bed.sae_url(1), no_cert)
            try:
                reply = await fresh.post("/api/v1/keys/2001/enc_keys", {"number": 1})
                assert reply.status == 200 and len(reply.json["keys"]) == 1
                reply = await stranger.get("/api/v1/keys/2001/status")
                assert reply.status == 401 and reply.content_type == "application/json"
                assert "message" in reply.json
            finally:
                await fresh.close()
                await stranger.close()
            # The flood's idle connections are closed within the short timeout (checked once a second).
            deadline = time.monotonic() + 15
            while _fds(pid) > idle_fds + 4:
                assert time.monotonic() < deadline, (_fds(pid), idle_fds)
                await asyncio.sleep(0.1)
            metrics = bed.admin_credentials(1)
            admin = Caller(bed.sae_url(1), tls_client_context(*metrics))
            try:
                page = (await admin.get("/metrics")).body.decode()
            finally:
                await admin.close()
            assert 'qkdtls_kme_connections_closed_total{listener="sae",reason="evicted"}' in page
            assert 'reason="unauthenticated_timeout"' in page
            for writer in writers:
                writer.close()
        finally:
            await sae.close()
