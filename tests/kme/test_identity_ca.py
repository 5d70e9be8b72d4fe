"""SAE identities bound to the CA that issued them: with two client CAs on the SAE interface, the same
serial number from the other CA is another certificate, not that SAE."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from qkdtls.kme.config import ConfigError, parse_config
from qkdtls.kme.server import KmeServer
from qkdtls.pki import create_ca, issue_client_cert
from qkdtls.testbed import Testbed

from .conftest import SMALL_STOCK, Caller, tls_client_context


def _two_ca_config(bed: Testbed, partner_ca: Path) -> dict[str, Any]:
    doc = tomllib.loads(bed.config_path(1).read_text())
    doc["sae_interface"]["client_ca"] = [str(bed.pki.zones[1].ca), str(partner_ca)]
    return doc


def _sae(doc: dict[str, Any], sae_id: int) -> dict[str, Any]:
    return next(s for s in doc["saes"] if s["id"] == sae_id)


def test_a_serial_without_its_ca_is_refused_when_two_cas_are_trusted(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=0)
    partner = create_ca(tmp_path / "partner", "Partner CA")
    doc = _two_ca_config(bed, partner.cert)
    base = bed.config_path(1).parent
    parse_config(doc, base=base)  # the generated identities name their CA: valid as they are
    del _sae(doc, 1001)["issuer"]
    with pytest.raises(ConfigError, match=r"saes\[0\]\.issuer: missing: sae_interface.client_ca trusts 2 CA"):
        parse_config(doc, base=base)
    _sae(doc, 1001)["issuer"] = str(bed.pki.zones[2].ca)  # trusted on no listener of this KME
    with pytest.raises(ConfigError, match=r"saes\[0\]\.issuer: is not one of the CAs of sae_interface"):
        parse_config(doc, base=base)
    # A fingerprint pins one certificate: no CA needed.
    del _sae(doc, 1001)["issuer"], _sae(doc, 1001)["serial"]
    _sae(doc, 1001)["fingerprint"] = bed.pki.zones[1].saes[1001].fingerprint_sha256
    assert parse_config(doc, base=base).saes[0].identity is not None


async def test_same_serial_from_another_trusted_ca_is_not_that_sae(tmp_path: Path) -> None:
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=SMALL_STOCK)
    zone = bed.pki.zones[1]
    serial = zone.saes[1001].serial
    partner = create_ca(tmp_path / "partner", "Partner CA")
    twin = issue_client_cert(partner.cert, partner.key, tmp_path / "partner", "twin", serial=serial)
    assert twin.serial == zone.saes[1001].serial
    doc = _two_ca_config(bed, partner.cert)
    # SAE 1002 is the partner CA's certificate with that same serial.
    _sae(doc, 1002)["serial"] = format(serial, "x")
    _sae(doc, 1002)["issuer"] = str(partner.cert)
    config = parse_config(doc, base=bed.config_path(1).parent)
    server = KmeServer(config)
    await server.start()
    callers = [
        Caller(bed.sae_url(1).rsplit(":", 1)[0] + f":{server.sae_port}", tls_client_context(c, k, zone.ca))
        for c, k in ((zone.saes[1001].cert, zone.saes[1001].key), (twin.cert, twin.key))
    ]
    try:
        real, other = callers
        # Status as master towards the local SAE 1002 / 1001: the caller's identity decides who is master.
        reply = await real.get("/api/v1/keys/1002/status")
        assert reply.status == 200 and reply.json["master_SAE_ID"] == "1001"
        reply = await other.get("/api/v1/keys/1001/status")
        assert reply.status == 200 and reply.json["master_SAE_ID"] == "1002"
        # Without SAE 1002's entry, the twin is nobody (before: it was SAE 1001).
        await server.stop()
        doc["saes"] = [s for s in doc["saes"] if s["id"] != 1002]
        server = KmeServer(parse_config(doc, base=bed.config_path(1).parent))
        await server.start()
        for caller in callers:
            await caller.close()
        callers = [
            Caller(f"https://127.0.0.1:{server.sae_port}", tls_client_context(c, k, zone.ca))
            for c, k in ((zone.saes[1001].cert, zone.saes[1001].key), (twin.cert, twin.key))
        ]
        real, other = callers
        assert (await real.get("/api/v1/keys/2001/status")).status == 200
        reply = await other.get("/api/v1/keys/2001/status")
        assert reply.status == 401 and "message" in reply.json
    finally:
        for caller in callers:
            await caller.close()
        await server.stop()
