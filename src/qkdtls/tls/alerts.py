"""TLS alerts (RFC 8446 §6) and the exceptions of the TLS core.

Every protocol failure is a :class:`TLSAlert` subclass named after the alert the local side sends for it,
so the state machines can turn any error into the right alert in one place. An alert received from the
peer is a :class:`PeerAlert`. Messages never carry key material.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class AlertLevel(IntEnum):
    warning = 1
    fatal = 2


class AlertDescription(IntEnum):
    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    record_overflow = 22
    handshake_failure = 40
    bad_certificate = 42
    unsupported_certificate = 43
    certificate_revoked = 44
    certificate_expired = 45
    certificate_unknown = 46
    illegal_parameter = 47
    unknown_ca = 48
    access_denied = 49
    decode_error = 50
    decrypt_error = 51
    protocol_version = 70
    insufficient_security = 71
    internal_error = 80
    inappropriate_fallback = 86
    user_canceled = 90
    missing_extension = 109
    unsupported_extension = 110
    unrecognized_name = 112
    bad_certificate_status_response = 113
    unknown_psk_identity = 115
    certificate_required = 116
    no_application_protocol = 120


class TLSError(Exception):
    """Base of every exception the TLS core raises."""


class InvalidState(TLSError):
    """The application called a method the connection cannot honour in its current state."""


class TLSAlert(TLSError):
    """A fatal alert the local side sends (the connection has queued it by the time the caller sees it)."""

    default_description: ClassVar[AlertDescription] = AlertDescription.internal_error

    def __init__(self, message: str = "", description: AlertDescription | None = None) -> None:
        self.description: AlertDescription = (
            description if description is not None else self.default_description
        )
        super().__init__(message or self.description.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description.name}: {self.args[0]!r})"


class UnexpectedMessage(TLSAlert):
    default_description = AlertDescription.unexpected_message


class BadRecordMac(TLSAlert):
    default_description = AlertDescription.bad_record_mac


class RecordOverflow(TLSAlert):
    default_description = AlertDescription.record_overflow


class HandshakeFailure(TLSAlert):
    default_description = AlertDescription.handshake_failure


class BadCertificate(TLSAlert):
    default_description = AlertDescription.bad_certificate


class UnsupportedCertificate(TLSAlert):
    default_description = AlertDescription.unsupported_certificate


class CertificateExpired(TLSAlert):
    default_description = AlertDescription.certificate_expired


class CertificateUnknown(TLSAlert):
    default_description = AlertDescription.certificate_unknown


class IllegalParameter(TLSAlert):
    default_description = AlertDescription.illegal_parameter


class UnknownCA(TLSAlert):
    default_description = AlertDescription.unknown_ca


class DecodeError(TLSAlert):
    default_description = AlertDescription.decode_error


class DecryptError(TLSAlert):
    default_description = AlertDescription.decrypt_error


class ProtocolVersion(TLSAlert):
    default_description = AlertDescription.protocol_version


class InsufficientSecurity(TLSAlert):
    default_description = AlertDescription.insufficient_security


class InternalError(TLSAlert):
    default_description = AlertDescription.internal_error


class MissingExtension(TLSAlert):
    default_description = AlertDescription.missing_extension


class UnsupportedExtension(TLSAlert):
    default_description = AlertDescription.unsupported_extension


class UnrecognizedName(TLSAlert):
    default_description = AlertDescription.unrecognized_name


class CertificateRequired(TLSAlert):
    default_description = AlertDescription.certificate_required


class NoApplicationProtocol(TLSAlert):
    default_description = AlertDescription.no_application_protocol


class PeerAlert(TLSError):
    """The peer sent a fatal alert (or an error-level alert we treat as fatal, RFC 8446 §6.2)."""

    def __init__(self, description: int, level: int = AlertLevel.fatal) -> None:
        self.description = description
        self.level = level
        try:
            name = AlertDescription(description).name
        except ValueError:
            name = f"alert {description}"
        super().__init__(f"peer sent {name}")


def encode_alert(description: AlertDescription | int, level: AlertLevel = AlertLevel.fatal) -> bytes:
    """The two-byte alert body."""
    return bytes((int(level), int(description)))
