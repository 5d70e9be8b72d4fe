"""A full-duplex video and audio call over TLS-QKD: each site runs a sender and a receiver.

``protocol`` frames the media (sans-I/O), ``sources`` captures or synthesises it, ``sender`` and ``receiver``
move it over a TLS stream, ``web`` shows the received picture in a browser, ``call`` wires two sites together.
"""
