"""A TCP proxy on 127.0.0.1 in a background thread, to cut a real server off mid-test.

with TcpProxy(6379) as proxy:   # proxy.port forwards to 127.0.0.1:6379
    proxy.mode = "down"          # refuse: new connections are reset, open ones are closed
    proxy.mode = "blackhole"     # accept and swallow: the client waits for an answer that never comes
    proxy.mode = "up"
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Literal

Mode = Literal["up", "down", "blackhole"]


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._mode: Mode = "up"
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="TcpProxy", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        self._mode = value
        if value != "up":
            asyncio.run_coroutine_threadsafe(self._drop_all(), self._loop).result(5)

    async def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self._mode != "up":
                    continue  # blackhole: swallow
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode == "down":
            writer.close()
            return
        self._writers.add(writer)
        if self._mode == "blackhole":
            while await reader.read(65536):
                pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            await self._drop_all()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
