"""Sans-I/O TLS 1.3 with QKD keys: codecs, key schedule, record layer and state machines over bytes."""
