"""The server's access control holds in both modes: ``allowed_peer_sae_ids`` for QKD offers, client
certificates for classic clients - and a server that requires client certificates takes QKD offers only
from the SAEs it lists (a TLS-QKD client presents no certificate).

An offer from another SAE is refused *before* any KME request (the server's KME is not asked, so the key
stays collectable), with a log line: ``required`` answers insufficient_security, ``preferred`` hands the
ClientHello to the classic path, which then applies the certificate requirement.
"""

from __future__ import annotations

import logging
import socket

import pytest
from tests.peers.clients import OneShotServer
from tests.tls_qkd.conftest import (
    CLIENT_SAE,
    HOST,
    SERVER_SAE,
    SITE_A_OTHER_SAE,
    SITE_B_OTHER_SAE,
    TIMEOUT,
    FixedOfferContext,
    Site,
    client_context,
    echo_once,
    ping_echo,
    server_context,
)

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.errors import QKDConfigurationError, QKDError, QKDHandshakeError, QKDPolicyError
from qkdtls.testbed import Testbed
from qkdtls.tls.alerts import AlertDescription
from qkdtls.tls.config import QkdOffer


def _offer_of(kme: KmeClient, master: int) -> QkdOffer:
    """A genuine key of SAE ``master`` for the server's SAE, as that SAE's own client would offer it."""
    key = kme.get_key(SERVER_SAE)
    return QkdOffer(key_id=key.key_ID, key=key.key, master_sae_id=master)



@pytest.mark.parametrize(
    "stranger", [SITE_A_OTHER_SAE, SITE_B_OTHER_SAE], ids=["same-site-as-client", "server-site"]
)
def test_required_server_refuses_saes_not_allowed_before_asking_its_kme(
    stranger: int,
    site_b: Site,
    kme_a: KmeClient,
    kme_b: KmeClient,
    kme_1002: KmeClient,
    kme_2002: KmeClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server_kme = KmeClient(site_b.kme)  # its own, to count its requests
    server = server_context(site_b, server_kme, qkd="required", allowed_peer_sae_ids=[CLIENT_SAE])
    server.keys.own_sae_id()
    offer = _offer_of(kme_1002 if stranger == SITE_A_OTHER_SAE else kme_2002, stranger)
    with OneShotServer(echo_once(server), connections=2) as srv, caplog.at_level(logging.INFO):
        before = server_kme.requests_sent
        raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
        with pytest.raises(QKDHandshakeError) as failure:
            FixedOfferContext(offer, cafile=site_b.app_ca).wrap_socket(raw, server_hostname="localhost")
        raw.close()
        assert server_kme.requests_sent == before, "the server asked its KME about a stranger's key"
        # The allowed SAE is served as before.
        assert ping_echo(client_context(site_b, kme_a, qkd="required"), srv.port).mode == "qkd"
        srv.join()
    server_kme.close()
    assert failure.value.sent_by_peer and failure.value.alert == AlertDescription.insufficient_security
    assert isinstance(srv.errors[0], QKDPolicyError)
    assert srv.results[0].peer_sae_id == CLIENT_SAE  # type: ignore[attr-defined]
    refused = [r for r in caplog.records if getattr(r, "event", None) == "tls.offer_refused"]
    reasons = [(r.reason, r.master_SAE_ID) for r in refused]  # type: ignore[attr-defined]
    assert reasons == [("peer SAE not allowed", stranger)]
    assert refused[0].levelno == logging.WARNING
    # The stranger's key was never collected: the server's KME still has it.
    assert kme_b.dec_keys(stranger, [offer.key_id]).keys[0].key == offer.key


def test_preferred_server_hands_strangers_to_the_classic_path_and_its_certificate_check(
    testbed: Testbed, site_b: Site, kme_a: KmeClient, kme_b: KmeClient, kme_2002: KmeClient
) -> None:
    """A server requiring client certificates: QKD only for the SAEs listed; everyone else must present a
    certificate on the classic path."""
    server = server_context(
        site_b, kme_b, qkd="preferred", cafile=site_b.app_ca, allowed_peer_sae_ids={CLIENT_SAE}
    )
    stranger = FixedOfferContext(_offer_of(kme_2002, SITE_B_OTHER_SAE), cafile=site_b.app_ca)
    cert, key, _ = testbed.sae_credentials(SITE_B_OTHER_SAE)  # a client certificate of the server's CA
    stranger_with_cert = FixedOfferContext(
        _offer_of(kme_2002, SITE_B_OTHER_SAE), cafile=site_b.app_ca, certfile=cert, keyfile=key
    )
    with OneShotServer(echo_once(server), connections=3) as srv:
        assert ping_echo(client_context(site_b, kme_a, qkd="required"), srv.port).mode == "qkd"
        raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
        with pytest.raises(QKDError):  # no certificate: refused (TLS 1.3: after the client's Finished)
            stranger.wrap_socket(raw, server_hostname="localhost").recv(100)
        raw.close()
        info = ping_echo(stranger_with_cert, srv.port)
        srv.join()
    assert info.mode == "classic"  # the certificate got it in, classically
    assert [type(e) for e in srv.errors] == [QKDHandshakeError]
    assert "CERTIFICATE" in str(srv.errors[0]).upper()


def test_client_certificates_without_an_allow_list_mean_no_qkd_client(
    testbed: Testbed, site_b: Site, kme_a: KmeClient, kme_b: KmeClient
) -> None:
    server = server_context(site_b, kme_b, qkd="preferred", cafile=site_b.app_ca)
    cert, key, _ = testbed.sae_credentials(SITE_B_OTHER_SAE)  # a client certificate the server trusts
    client = client_context(site_b, kme_a, qkd="preferred", certfile=cert, keyfile=key)
    with OneShotServer(echo_once(server)) as srv:
        assert ping_echo(client, srv.port).mode == "classic"
        srv.join()
    assert not srv.errors, srv.errors
    # Under required nobody could connect at all: a configuration error, said before serving.
    strict = server_context(site_b, kme_b, qkd="required", cafile=site_b.app_ca)
    with socket.socket() as sock, pytest.raises(QKDConfigurationError, match="allowed_peer_sae_ids"):
        strict.wrap_socket(sock, server_side=True)


def test_allow_list_validation(site_b: Site) -> None:
    for bad in ([0], [-5], [2**63], [True], ["1001"]):
        with pytest.raises(ValueError, match="allowed_peer_sae_ids"):
            server_context(site_b, None, allowed_peer_sae_ids=bad)
    assert server_context(site_b, None, allowed_peer_sae_ids=[1001, 1001]).allowed_peer_sae_ids == {1001}
