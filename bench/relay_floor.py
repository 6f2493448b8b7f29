#!/usr/bin/env python3
"""bench/relay_floor.py: the machine's floor for any proxy: a byte relay, standard library only.

Each client connection gets its own connection to the upstream, and bytes are copied both ways
as they arrive: no HTTP parsing, no pooling, no pipeline, no accounting. run.py runs it in
tokenman's place (same CPU pinning, same load) so that the table shows what merely putting a
process in the path costs on this machine: the wake-ups of a second CPU, the extra loopback hops
and the event loop. What tokenman adds beyond this figure is its own work.

    python bench/relay_floor.py --port 0 --upstream 127.0.0.1:18080

On start it prints one line `relay listening on 127.0.0.1:PORT` to stdout (run.py reads it).
SIGINT / SIGTERM stop it. TCP_NODELAY is set on both sockets of every pair; the client is not
read until its upstream is connected; a side whose peer cannot take more (a full write buffer)
stops reading until the peer drains; an end of input is passed on as a half-close, and the pair
is closed once both sides have ended.

Sections: §01 constants  §02 a pair of sockets  §03 the server and the command line
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

# ================================================================================================
# §01 constants
# ================================================================================================

HIGH_WATER = 256 * 1024          # a peer's write buffer past this pauses the reading side
LOOPBACK = ("127.0.0.1", "localhost", "::1")

# ================================================================================================
# §02 a pair of sockets: what one reads, the other writes
# ================================================================================================


class Side(asyncio.Protocol):
    """One socket of a pair: what it reads goes to the other socket, as it came."""

    def __init__(self, peer: "Side | None" = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer.eof:  # both ended: nothing more can cross (close() still flushes)
            self.transport.close()
            self.peer.transport.close()
        elif self.peer.transport.can_write_eof() and not self.peer.transport.is_closing():
            self.peer.transport.write_eof()  # the peer may still answer
        return True

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
    """The accepted side: not read until its upstream is connected, then the pair relays."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self.connecting: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.pause_reading()
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: Side(self), self.host, self.port)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            upstream.transport.close()
            return
        self.peer = upstream
        self.transport.resume_reading()

# ================================================================================================
# §03 the server and the command line
# ================================================================================================


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
    if host not in LOOPBACK or not port.isdigit():
        p.error("--upstream must be a loopback host:port")
    asyncio.run(serve(args.port, host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
