"""The key schedule reproduces RFC 8448 §3 value by value."""

from cryptography.hazmat.primitives.asymmetric import x25519
from tests.tls import rfc8448 as v

from qkdtls.tls.key_schedule import KeySchedule, Transcript
from qkdtls.tls.suites import CipherSuite

H = bytes.fromhex


def test_rfc8448_simple_handshake() -> None:
    client = x25519.X25519PrivateKey.from_private_bytes(H(v.CLIENT_PRIVATE))
    server = x25519.X25519PrivateKey.from_private_bytes(H(v.SERVER_PRIVATE))
    ecdhe = client.exchange(server.public_key())
    assert ecdhe == H(v.ECDHE)

    ks = KeySchedule(CipherSuite.TLS_AES_128_GCM_SHA256)
    transcript = Transcript(ks.algorithm)
    ks.extract_early(None)
    ks.extract_handshake(ecdhe)
    for message in (v.CLIENT_HELLO, v.SERVER_HELLO):
        transcript.update(H(message))
    c_hs, s_hs = ks.handshake_traffic_secrets(transcript.digest())
    assert (c_hs, s_hs) == (H(v.C_HS_TRAFFIC), H(v.S_HS_TRAFFIC))
    assert ks.traffic_keys(s_hs) == (H(v.S_HS_KEY), H(v.S_HS_IV))
    assert ks.traffic_keys(c_hs) == (H(v.C_HS_KEY), H(v.C_HS_IV))

    for message in (v.ENCRYPTED_EXTENSIONS, v.CERTIFICATE, v.CERTIFICATE_VERIFY):
        transcript.update(H(message))
    assert ks.finished_verify_data(s_hs, transcript.digest()) == H(v.SERVER_FINISHED)[4:]
    transcript.update(H(v.SERVER_FINISHED))
    ks.extract_master()
    c_ap, s_ap = ks.application_traffic_secrets(transcript.digest())
    assert (c_ap, s_ap) == (H(v.C_AP_TRAFFIC), H(v.S_AP_TRAFFIC))
    assert ks.traffic_keys(s_ap) == (H(v.S_AP_KEY), H(v.S_AP_IV))
    assert ks.exporter_master_secret(transcript.digest()) == H(v.EXPORTER_MASTER)
    assert ks.finished_verify_data(c_hs, transcript.digest()) == H(v.CLIENT_FINISHED)[4:]


def test_early_secret_without_psk() -> None:
    ks = KeySchedule(CipherSuite.TLS_AES_128_GCM_SHA256)
    ks.extract_early(None)
    ks.extract_handshake(b"\x00" * 32)
    assert repr(ks).startswith("KeySchedule(TLS_AES_128_GCM_SHA256")


def test_key_update_changes_secret_and_keys() -> None:
    ks = KeySchedule(CipherSuite.TLS_AES_256_GCM_SHA384)
    secret = bytes(48)
    nxt = ks.next_traffic_secret(secret)
    assert len(nxt) == 48 and nxt != secret
    assert ks.traffic_keys(nxt) != ks.traffic_keys(secret)


def test_hello_retry_request_rewrites_transcript() -> None:
    ks = KeySchedule(CipherSuite.TLS_AES_128_GCM_SHA256)
    transcript = Transcript(ks.algorithm)
    transcript.update(H(v.CLIENT_HELLO))
    first = transcript.digest()
    transcript.replace_with_message_hash()
    rewritten = Transcript(ks.algorithm)
    rewritten.update(b"\xfe\x00\x00\x20" + first)
    assert transcript.digest() == rewritten.digest()


def test_transcript_buffers_until_suite_known() -> None:
    late = Transcript()
    late.update(H(v.CLIENT_HELLO))
    ks = KeySchedule(CipherSuite.TLS_AES_128_GCM_SHA256)
    late.set_algorithm(ks.algorithm)
    early = Transcript(ks.algorithm)
    early.update(H(v.CLIENT_HELLO))
    assert late.digest() == early.digest()
