"""``qkdtls tunnel``: an stunnel-like service that puts any TCP protocol on TLS-QKD (docs/tunnel.md).

config.py (TOML → ServiceConfig), relay.py (one connection: two transports, back-pressure, half-close),
service.py (a listener, its context, connection set-up), metrics.py (Prometheus), runner.py (the process:
reload on SIGHUP, graceful shutdown on SIGTERM).
"""
