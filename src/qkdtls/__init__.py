"""qkdtls: an ETSI GS QKD 014 Key Management Entity and TLS 1.3 keyed by QKD."""

__version__ = "0.1.0"
