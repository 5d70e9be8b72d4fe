"""A fibre that can be cut: a TCP relay in front of a KME's inter-KME port, for tests of real KME processes
that route around a broken link while both of its KMEs keep running."""

from __future__ import annotations

import asyncio
import threading

from qkdtls.testbed import Testbed


class CuttableLink:
    """A TCP relay in front of one KME's inter-KME port: cutting it drops its connections and refuses new
    ones, as a broken fibre between two running KMEs would (both ends stay up)."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._cut = False
        self._transports: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.transport.abort()
            return
        self._transports |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._transports -= {writer, up_writer}

    def cut(self, cut: bool = True) -> None:
        def apply() -> None:
            self._cut = cut
            if cut:
                for writer in list(self._transports):
                    writer.transport.abort()

        self._loop.call_soon_threadsafe(apply)

    def close(self) -> None:
        self.cut()
        self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def route_through(bed: Testbed, kme_id: int, peer: int, link: CuttableLink) -> None:
    """Make ``kme_id`` call ``peer``'s inter-KME interface through ``link``."""
    config = bed.config_path(kme_id)
    direct = f'url = "{bed.inter_kme_url(peer)}"'
    text = config.read_text()
    assert text.count(direct) == 1
    config.write_text(text.replace(direct, f'url = "https://127.0.0.1:{link.port}"'))
