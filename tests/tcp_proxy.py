"""A TCP proxy on loopback that delays every chunk by `delay` seconds in each direction, keeping order.

Used to give one gateway instance a slow link to Redis (a congested network, a far region) while
another instance talks to the same Redis directly: the real sockets, the real Redis, only later.

With `delay` 0 it is a plain relay that a test can cut from outside: `drop()` aborts every connection it
carries (a phone losing its network), and while `refusing` is set new connections are closed at once.
`freeze()` makes the connections open at that moment silent in both directions while they stay
open (a NAT or load balancer that forgot them); connections made afterwards work.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.helpers import free_port


class DelayingProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.delay = 0.0
        self.refusing = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.connections = 0  # accepted so far
        self._frozen_below = 0  # connections numbered below this pass nothing

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> DelayingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def drop(self) -> None:
        """Abort every connection carried so far, both sides (the peers see a reset, no close frame)."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def freeze(self) -> None:
        self._frozen_below = self.connections

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            client_writer.transport.abort()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        self._writers += [client_writer, upstream_writer]
        number = self.connections
        self.connections += 1
        for reader, writer in ((client_reader, upstream_writer), (upstream_reader, client_writer)):
            task = asyncio.ensure_future(self._pipe(reader, writer, number))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        """Chunks leave in the order they came, each `delay` after it arrived (none once frozen)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send_later(queue, writer))
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(65536):
                if number >= self._frozen_below:
                    queue.put_nowait((loop.time() + self.delay, data))
            queue.put_nowait((loop.time() + self.delay, b""))
            await sender
        except ConnectionError:  # a peer reset its side, or `drop()` cut it: this direction is over
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _send_later(queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                return
            writer.write(data)
