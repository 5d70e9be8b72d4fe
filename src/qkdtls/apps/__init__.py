"""Applications over TLS-QKD: the two-site demo, HTTPS, the video call and the handshake benchmark."""
