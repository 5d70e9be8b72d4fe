"""ETSI GS QKD 014 v1.1.1: the data model and the SAE-side client, shared by the KME and by TLS-QKD."""
