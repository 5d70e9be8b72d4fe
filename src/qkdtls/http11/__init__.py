"""A lean HTTP/1.1 server and client for the KME's JSON APIs over mutual TLS (see the module docstrings)."""
