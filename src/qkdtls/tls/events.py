"""Events a sans-I/O TLS connection reports to its adapter (``conn.next_event()``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionInfo:
    """What was negotiated; available once the handshake completed."""

    mode: str                    # "qkd" | "classic"
    profile: str | None          # "secure" | "reference" | None
    key_id: str | None
    peer_sae_id: int | None
    cipher: str                  # IANA suite name, e.g. "TLS_AES_256_GCM_SHA384"
    group: str | None            # "x25519" | "secp256r1" | "X25519MLKEM768" | None
    version: str                 # "TLSv1.3"
    alpn: str | None
    server_name: str | None
    peer_certificate: bytes | None = None   # DER of the peer's end-entity certificate


class Event:
    """Base class of everything ``next_event()`` returns."""


@dataclass(frozen=True)
class HandshakeComplete(Event):
    info: ConnectionInfo


@dataclass(frozen=True)
class ApplicationData(Event):
    # A bytearray when it was decrypted in place (the record layer's bulk path): the receiver owns it.
    data: bytes | bytearray

    def __repr__(self) -> str:
        return f"ApplicationData(<{len(self.data)} bytes>)"


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """The peer closed: ``alert`` is None for close_notify or plain EOF after it, else the alert code."""

    alert: int | None = None


@dataclass(frozen=True)
class NeedQkdKey(Event):
    """Server: fetch the key with dec_keys for ``master_sae_id`` and call ``provide_qkd_key``."""

    key_id: str
    master_sae_id: int
    profile: str


@dataclass(frozen=True)
class HandOff(Event):
    """Server: a classic ClientHello; the adapter gives ``initial_data`` and the socket to Python ssl.

    ``eof``: the peer already closed its side after ``initial_data``; OpenSSL must be told at once (it then
    answers a truncated flight with decode_error, as for any other client) since the adapter may not see
    the end of the stream again.
    """

    initial_data: bytes
    eof: bool = False

    def __repr__(self) -> str:
        return f"HandOff(<{len(self.initial_data)} bytes>, eof={self.eof})"


@dataclass(frozen=True)
class NeedRekeyKey(Event):
    """Server: the client announced a QKD rekey; fetch the key and call ``provide_rekey_key``."""

    key_id: str
    master_sae_id: int


@dataclass(frozen=True)
class KeyUpdated(Event):
    direction: str               # "send" | "receive"


@dataclass(frozen=True)
class QkdRekeyed(Event):
    key_id: str


@dataclass(frozen=True)
class KeysAnnounced(Event):
    """Server: the client announced keys it will offer on its next connections (0xFEA9 negotiated).

    The adapter may collect them with one dec_keys for ``master_sae_id`` in the background; nothing in this
    connection waits for it.
    """

    master_sae_id: int
    key_ids: tuple[str, ...]
