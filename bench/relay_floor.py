#!/usr/bin/env python3
"""bench/relay_floor.py: the machine's floor for any proxy: a byte relay, standard library only.

Each client connection gets its own connection to the upstream, and bytes are copied both ways
as they arrive: no HTTP parsing, no pooling, no pipeline, no accounting. run.py runs it in
tokenman's place (same CPU pinning, same load) so that the table shows what merely putting a
process in the path costs on this machine: the wake-ups of a second CPU, the extra loopback hops
and the event loop. What tokenman adds beyond this figure is its own work.

    python bench/relay_floor.py --port 0 --upstream 127.0.0.1:18080

On start it prints one line `relay listening on 127.0.0.1:PORT` to stdout (run.py reads it).
SIGINT / SIGTERM stop it. TCP_NODELAY is set on both sockets of every pair; a side whose peer
cannot take more (a full write buffer) stops reading until the peer drains.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

HIGH_WATER = 256 * 1024          # a peer's write buffer past this pauses the reading side


class Side(asyncio.Protocol):
    """One socket of a pair: what it reads goes to the other socket, as it came."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.early: list[bytes] = []   # bytes read before the peer was connected
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def link(self, peer: "Side") -> None:
        self.peer = peer
        for data in self.early:
            peer.transport.write(data)
        self.early = []
        if self.eof:
            self._half_close()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None:
            self._half_close()
        return True  # keep our side open: the peer may still answer

    def _half_close(self) -> None:
        peer = self.peer.transport
        if peer.can_write_eof() and not peer.is_closing():
            peer.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.close()

    def pause_writing(self) -> None:  # our buffer is full: the peer stops reading
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class Client(Side):
    """The accepted side: connects its upstream, then the pair relays."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host = host
        self.port = port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(Side, self.host, self.port)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            upstream.transport.close()
            return
        upstream.peer = self
        self.link(upstream)


async def serve(port: int, host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(host, upstream_port), "127.0.0.1", port,
                                      backlog=4096)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    bound = server.sockets[0].getsockname()
    print(f"relay listening on {bound[0]}:{bound[1]}", flush=True)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    p.add_argument("--upstream", required=True, help="host:port to relay to (loopback)")
    args = p.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
        p.error("--upstream must be a loopback host:port")
    asyncio.run(serve(args.port, host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
