"""A KME of another make, for what our KME never does: an ETSI 014 SAE interface over mutual-TLS HTTPS that
hands the same key out on every ``dec_keys`` (as the authors' KME does: it never erases a key) and may leave
out the key's holders (``key_extension``). A real HTTPS server on loopback, with the testbed's certificates.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qkdtls.testbed import LOOPBACK, Testbed

_DEC_KEYS = re.compile(r"^/api/v1/keys/(-?\d+)/dec_keys$")


@dataclass
class StoredKey:
    key: bytes = field(repr=False)
    master_sae_id: int
    holders: dict[str, Any] | None  # the key_extension to report (None: reports no holders)


class ForeignKme:
    """Serves SAE ``sae_id`` of KME ``kme_id`` (certificates of that zone of the testbed)."""

    def __init__(self, testbed: Testbed, kme_id: int, sae_id: int) -> None:
        zone = testbed.pki.zones[kme_id]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(zone.kme_server.cert, zone.kme_server.key)
        context.load_verify_locations(zone.ca)
        context.verify_mode = ssl.CERT_REQUIRED
        self.keys: dict[str, StoredKey] = {}
        self.dec_keys_requests = 0
        self.delay = 0.0  # seconds before each dec_keys answer (a slow KME)
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                return

            def _answer(self, status: int, doc: Any) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/api/v1/sae/info/me":
                    self._answer(200, {"SAE_ID": sae_id, "KME_ID": kme_id})
                else:
                    self._answer(404, {"message": "not found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                doc = json.loads(self.rfile.read(length) or b"{}")
                match = _DEC_KEYS.match(self.path)
                if match is None:
                    self._answer(404, {"message": "not found"})
                    return
                double.dec_keys_requests += 1
                time.sleep(double.delay)
                master = int(match.group(1))
                answer = []
                for item in doc.get("key_IDs", []):
                    stored = double.keys.get(item.get("key_ID"))
                    if stored is None or stored.master_sae_id != master:
                        self._answer(400, {"message": "one or more keys specified are not found on KME"})
                        return
                    key: dict[str, Any] = {
                        "key_ID": item["key_ID"],
                        "key": base64.b64encode(stored.key).decode("ascii"),
                    }
                    if stored.holders is not None:
                        key["key_extension"] = stored.holders
                    answer.append(key)
                self._answer(200, {"keys": answer})  # never erased: the next dec_keys gets it again

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ForeignKme:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
