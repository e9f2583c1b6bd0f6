"""A delaying TCP proxy: adds latency without `tc netem` (this kernel has none).

Every chunk read from either side is delivered to the other side ``latency_ms / 2`` later, in
order, so a request/response round trip costs ``latency_ms`` more. Runs an asyncio loop in a
daemon thread of the calling process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Pipe:
    queue: asyncio.Queue[tuple[float, bytes]] = field(default_factory=asyncio.Queue)


class LatencyProxy:
    """Listen on ``(listen_host, listen_port)`` and forward to ``(target_host, target_port)``."""

    def __init__(
        self,
        listen_host: str,
        target_host: str,
        target_port: int,
        latency_ms: int,
        listen_port: int = 0,
    ) -> None:
        self.listen_host = listen_host
        self.target_host = target_host
        self.target_port = target_port
        self.one_way = max(0, latency_ms) / 2000.0
        self._requested_port = listen_port
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> LatencyProxy:
        self._thread = threading.Thread(
            target=self._run, name=f"latency-proxy-{self.target_port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("latency proxy did not start in time")
        if self._error is not None:
            raise RuntimeError(f"latency proxy failed to start: {self._error}") from self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._handle, self.listen_host, self._requested_port, reuse_address=True
            )
            sock = self._server.sockets[0]
            self.port = int(sock.getsockname()[1])
        except OSError as exc:
            self._error = exc
            asyncio.get_running_loop().stop()
        finally:
            self._ready.set()

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            asyncio.get_running_loop().stop()

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ data path

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                server_r, server_w = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), timeout=10.0
                )
            except (OSError, TimeoutError):
                client_w.close()
                return
            for writer in (client_w, server_w):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up, down = _Pipe(), _Pipe()
            parts = [
                self._reader(client_r, up),
                self._writer(up, server_w),
                self._reader(server_r, down),
                self._writer(down, client_w),
            ]
            try:
                await asyncio.gather(*parts, return_exceptions=True)
            finally:
                server_w.close()
        except asyncio.CancelledError:
            # stop(): end quietly (a cancelled connection callback makes asyncio log an error)
            return
        finally:
            if task is not None:
                self._tasks.discard(task)
            client_w.close()

    async def _reader(self, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        try:
            while True:
                data = await reader.read(65536)
                pipe.queue.put_nowait((time.monotonic() + self.one_way, data))
                if not data:
                    return
        except (OSError, asyncio.IncompleteReadError):
            pipe.queue.put_nowait((time.monotonic(), b""))

    def forwarded(self, writer: asyncio.StreamWriter) -> None:
        """Called before each chunk is written on; subclasses count traffic here."""

    async def _writer(self, pipe: _Pipe, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                due, data = await pipe.queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                self.forwarded(writer)
                writer.write(data)
                await writer.drain()
        except OSError:
            return
