"""A TCP proxy that delays every chunk it forwards: a slow API server, for tests.

TLS passes through untouched, so clients still verify the API server's
certificate (its SAN is 127.0.0.1, where the proxy listens too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path


class SlowProxy:
    def __init__(self, target_port: int, delay: float):
        self.target_port = target_port
        self.delay = delay
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _connection(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, self.delay),
            self._pipe(up_reader, writer, 0),
            return_exceptions=True,
        )

    @staticmethod
    async def _pipe(reader, writer, delay: float) -> None:
        try:
            while chunk := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)  # the latency being simulated
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()


def kubeconfig_via(kubeconfig: Path, port: int, target: Path) -> Path:
    """A copy of ``kubeconfig`` that talks to the API server through ``port``."""
    config = json.loads(kubeconfig.read_text())
    for cluster in config["clusters"]:
        server = cluster["cluster"]["server"]
        cluster["cluster"]["server"] = server.rsplit(":", 1)[0] + f":{port}"
    target.write_text(json.dumps(config))
    return target
