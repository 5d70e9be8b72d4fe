"""Every decoder is total: arbitrary or mutated input gives a result or a TLSError, nothing else."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.tls import rfc8448 as v

from qkdtls.tls import extensions as ext
from qkdtls.tls import messages as msg
from qkdtls.tls.alerts import TLSError
from qkdtls.tls.buffer import Reader
from qkdtls.tls.records import HandshakeBuffer, RecordLayer

DECODERS: dict[str, Callable[[bytes], object]] = {
    "ClientHello": msg.ClientHello.decode,
    "ServerHello": msg.ServerHello.decode,
    "EncryptedExtensions": msg.EncryptedExtensions.decode,
    "Certificate": msg.Certificate.decode,
    "CertificateRequest": msg.CertificateRequest.decode,
    "CertificateVerify": msg.CertificateVerify.decode,
    "Finished": msg.Finished.decode,
    "NewSessionTicket": msg.NewSessionTicket.decode,
    "KeyUpdate": msg.KeyUpdate.decode,
    "extensions": lambda data: ext.decode_extensions(Reader(data)),
    "server_name": ext.decode_server_name,
    "u16_list": ext.decode_u16_list,
    "supported_versions_client": ext.decode_supported_versions_client,
    "supported_versions_server": ext.decode_supported_versions_server,
    "key_share_client": ext.decode_key_share_client,
    "key_share_server": ext.decode_key_share_server,
    "key_share_hrr": ext.decode_key_share_hrr,
    "psk_modes": ext.decode_psk_modes,
    "pre_shared_key": ext.OfferedPsks.decode,
    "selected_identity": ext.decode_selected_identity,
    "alpn": ext.decode_alpn,
    "cookie": ext.decode_cookie,
}


def _total(decode: Callable[[bytes], object], data: bytes) -> None:
    try:
        decode(data)
    except TLSError:
        pass


@pytest.mark.parametrize("name", list(DECODERS))
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes(name: str, data: bytes) -> None:
    _total(DECODERS[name], data)


SAMPLES = [bytes.fromhex(m) for m in v.MESSAGES]


@settings(max_examples=300, deadline=None)
@given(
    sample=st.sampled_from(SAMPLES),
    position=st.integers(min_value=0, max_value=10_000),
    value=st.integers(min_value=0, max_value=255),
    cut=st.integers(min_value=0, max_value=10_000),
)
def test_mutated_rfc8448_messages(sample: bytes, position: int, value: int, cut: int) -> None:
    body = bytearray(sample[4:])
    body[position % len(body)] = value
    mutated = bytes(body[: len(body) - cut % 8])
    decoder = {1: msg.ClientHello, 2: msg.ServerHello, 8: msg.EncryptedExtensions, 11: msg.Certificate,
               15: msg.CertificateVerify, 20: msg.Finished}[sample[0]]
    _total(decoder.decode, mutated)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8), st.booleans())
def test_record_layer_and_reassembly(chunks: list[bytes], allow_ccs: bool) -> None:
    layer = RecordLayer()
    layer.allow_ccs = allow_ccs
    handshake = HandshakeBuffer()
    try:
        for chunk in chunks:
            layer.feed(chunk)
            for _ in range(len(chunk) + 1):   # at most one record per fed byte
                record = layer.next_record()
                if record is None:
                    break
                handshake.add(record[1])
                while handshake.next_message() is not None:
                    pass
    except TLSError:
        pass
