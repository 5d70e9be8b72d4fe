"""The Key Management Entity: ETSI GS QKD 014 REST API, key store, key folders, inter-KME synchronisation."""
