"""A TLS-QKD key is accepted only when its holders are exactly the master and the one slave of the connection.

ETSI 014 lets a master ask for a key shared with several slaves (``additional_slave_SAE_IDs``). Every slave
then knows it, so one slave could pose as the master to another (RFC 9257 §4.2: an external PSK must be known
to exactly two parties besides the KMEs). Both ends check the holders the KME reports (``key_extension``);
a KME that reports none is refused unless the context opts out (``allow_keys_without_holders``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import uuid

import pytest
from tests.peers.clients import OneShotServer
from tests.tls_qkd.conftest import (
    CLIENT_SAE,
    HOST,
    SERVER_SAE,
    SITE_B_OTHER_SAE,
    TIMEOUT,
    FixedOfferContext,
    Site,
    client_context,
    echo_once,
    ping_echo,
    server_context,
)
from tests.tls_qkd.kme_double import ForeignKme, StoredKey

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.errors import QKDHandshakeError, QKDKeyUnavailable, QKDPolicyError
from qkdtls.testbed import Testbed
from qkdtls.tls.alerts import AlertDescription
from qkdtls.tls.config import QkdOffer


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]



def test_co_slave_of_a_multicast_key_cannot_pose_as_the_master(
    site_b: Site, kme_a: KmeClient, kme_b: KmeClient, kme_2002: KmeClient, caplog: pytest.LogCaptureFixture
) -> None:
    # SAE 1001 asks its KME for one key for slaves 2001 and 2002.
    [key] = kme_a.enc_keys(SERVER_SAE, number=1, additional_slave_sae_ids=[SITE_B_OTHER_SAE]).keys
    holders = {"master_SAE_ID": CLIENT_SAE, "slave_SAE_IDs": [SERVER_SAE, SITE_B_OTHER_SAE]}
    assert key.key_extension == holders
    # SAE 2002 collects its copy ...
    [copy] = kme_2002.dec_keys(CLIENT_SAE, [key.key_ID]).keys
    assert copy.key == key.key and copy.key_extension == holders
    # ... and offers it to 2001's required server as qkd1:1001:<key ID>: it would pass for SAE 1001.
    impostor = FixedOfferContext(
        QkdOffer(key_id=key.key_ID, key=copy.key, master_sae_id=CLIENT_SAE), cafile=site_b.app_ca
    )
    server = server_context(site_b, kme_b, qkd="required")
    with OneShotServer(echo_once(server)) as srv, caplog.at_level(logging.INFO):
        raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
        with pytest.raises(QKDHandshakeError) as failure:
            impostor.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE)
        raw.close()
        srv.join()
    assert not srv.results, "the server accepted a connection as SAE 1001"
    assert len(srv.errors) == 1 and isinstance(srv.errors[0], QKDPolicyError)
    assert failure.value.sent_by_peer and failure.value.alert == AlertDescription.insufficient_security
    [record] = _events(caplog, "tls.key_holders_refused")
    assert "2002" in record.reason  # type: ignore[attr-defined]


def test_client_refuses_a_key_its_kme_shares_with_another_slave(
    site_b: Site, kme_a: KmeClient, kme_b: KmeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client KME that answers with a multicast key (here: one obtained for 2001 and 2002)."""
    [shared] = kme_a.enc_keys(SERVER_SAE, number=1, additional_slave_sae_ids=[SITE_B_OTHER_SAE]).keys
    client = client_context(site_b, kme_a, qkd="required")
    monkeypatch.setattr(kme_a, "get_key", lambda *args, **kwargs: shared)
    with pytest.raises(QKDKeyUnavailable, match="slaves"):
        client.prepare_offer(HOST, 1, server_hostname="localhost", target_sae_id=SERVER_SAE)
    # Under preferred the same key means a classic ClientHello, not a QKD one.
    preferred = client_context(site_b, kme_a, qkd="preferred")
    assert preferred.client_offer("localhost", 1, SERVER_SAE) is None


def test_client_never_offers_a_key_shorter_than_128_bits(
    site_b: Site, kme_a: KmeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A two-party key too short for TLS (the KME allows 64 bits) is refused like a missing one."""
    [short] = kme_a.enc_keys(SERVER_SAE, number=1, size=64).keys
    assert len(short.key) == 8
    monkeypatch.setattr(kme_a, "get_key", lambda *args, **kwargs: short)
    client = client_context(site_b, kme_a, qkd="required")
    with pytest.raises(QKDKeyUnavailable, match="64 bits"):
        client.prepare_offer(HOST, 1, server_hostname="localhost", target_sae_id=SERVER_SAE)
    preferred = client_context(site_b, kme_a, qkd="preferred")
    assert preferred.client_offer("localhost", 1, SERVER_SAE) is None
    assert ("localhost", 1) not in preferred.non_qkd_peers


def test_the_two_party_keys_of_our_kme_are_accepted(site_b: Site, kme_a: KmeClient, kme_b: KmeClient) -> None:
    client = client_context(site_b, kme_a, qkd="required")
    with OneShotServer(echo_once(server_context(site_b, kme_b, qkd="required"))) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
        with client.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE) as tls:
            tls.sendall(b"ping")
            assert tls.recv(100) == b"echo:ping"
        srv.join()
    assert not srv.errors, srv.errors
    assert srv.results[0].mode == "qkd" and srv.results[0].peer_sae_id == CLIENT_SAE  # type: ignore[attr-defined]


@pytest.mark.parametrize("opt_out", [False, True], ids=["default-refuses", "allow_keys_without_holders"])
def test_a_kme_that_reports_no_holders(opt_out: bool, testbed: Testbed, site_b: Site) -> None:
    """A KME of another make names no holders: refused by default, accepted when the context says that KME
    hands out two-party keys only."""
    key_id, material = str(uuid.uuid4()), os.urandom(32)
    with ForeignKme(testbed, kme_id=2, sae_id=SERVER_SAE) as foreign:
        foreign.keys[key_id] = StoredKey(material, CLIENT_SAE, holders=None)
        kme = KmeClient(dataclasses.replace(site_b.kme, url=foreign.url))
        server = server_context(site_b, kme, qkd="preferred", allow_keys_without_holders=opt_out)
        client = FixedOfferContext(QkdOffer(key_id, material, CLIENT_SAE), cafile=site_b.app_ca)
        with OneShotServer(echo_once(server)) as srv:
            info = ping_echo(client, srv.port)
            srv.join()
        kme.close()
    assert not srv.errors, srv.errors
    assert info.mode == ("qkd" if opt_out else "classic")
    assert foreign.dec_keys_requests == 1
