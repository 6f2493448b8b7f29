#!/usr/bin/env python3
"""bench/loadgen.py: a closed-loop HTTP/1.1 load generator over raw asyncio sockets (stdlib only).

Each of `concurrency` keep-alive connections sends one pre-built request, waits for the whole
response and sends the next, until `duration` seconds have passed (or `max_requests`). Parsing is
minimal: the status line, Content-Length or chunked framing, Connection: close. For streamed
responses it also records the time to the first body byte, the gaps between body reads and the
body duration, and checks the stream's terminal event (`message_stop` / `[DONE]`).

    python bench/loadgen.py '{"port": 18080, "path": "/v1/messages", "body": "{...}",
                              "concurrency": 16, "duration": 5}'

The spec is one JSON object (argument or stdin); the result is one JSON object on stdout:
    requests (all completed), measured (completed inside the window), window_s, rps,
    errors {status, reset, timeout, connect, bad}, lat_us / ttfb_us / gap_us / body_us (samples),
    cpu_s (this process), max_open (streams open at once), first_error.
Only loopback addresses are accepted; every loop is bounded by the duration and a request cap.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sys
import time

MAX_RESPONSE_HEAD = 64 * 1024
MAX_SAMPLES = 400_000            # latency samples kept per kind (a 5 s run at 20k req/s is 100k)
MAX_GAP_SAMPLES = 400_000
DEFAULTS = {
    "host": "127.0.0.1", "port": 0, "method": "POST", "path": "/v1/messages", "body": "",
    "headers": {}, "concurrency": 1, "duration": 5.0, "warmup": 0.0, "max_requests": 10_000_000,
    "timeout": 10.0, "once": False, "stream": False, "ramp_batch": 64, "ramp_pause": 0.002,
    "vary": "",  # a placeholder in the body that each request replaces with a new word
}


def build_request(spec: dict) -> bytes:
    body = spec["body"].encode() if isinstance(spec["body"], str) else spec["body"]
    lines = [f"{spec['method']} {spec['path']} HTTP/1.1", f"Host: {spec['host']}:{spec['port']}"]
    for name, value in spec["headers"].items():
        lines.append(f"{name}: {value}")
    if body or spec["method"] in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Results:
    __slots__ = ("lat", "ttfb", "gap", "body", "requests", "measured", "errors", "open",
                 "max_open", "first_error")

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.ttfb: list[float] = []
        self.gap: list[float] = []
        self.body: list[float] = []
        self.requests = 0
        self.measured = 0
        self.errors = {"status": 0, "reset": 0, "timeout": 0, "connect": 0, "bad": 0}
        self.open = 0
        self.max_open = 0
        self.first_error = ""

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if not self.first_error:
            self.first_error = f"{kind}: {detail}"[:300]


class Client(asyncio.Protocol):
    """One keep-alive connection running requests back to back."""

    def __init__(self, gen: "Generator") -> None:
        self.gen = gen
        self.transport = None
        self.buf = bytearray()
        self.t0 = 0.0
        self.in_flight = False
        self.head_done = False
        self.status = 0
        self.mode = ""          # "length", "chunked" or "close"
        self.remaining = 0
        self.chunk_need = -1    # chunked: -1 = reading a size line, else bytes of data + CRLF
        self.chunk_done = False
        self.close_after = False
        self.t_first = 0.0
        self.t_last = 0.0
        self.tail = b""
        self.gaps: list[float] | None = None
        self.counted_open = False
        self.sent_once = False

    # -- lifecycle -------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.gen.maybe_send(self)

    def connection_lost(self, exc) -> None:
        if self.in_flight:
            if self.mode == "close" and self.head_done and exc is None:
                self._complete(time.perf_counter())
            else:
                self.in_flight = False
                self._close_open()
                self.gen.results.error("reset", f"connection lost mid-response: {exc!r}")
                self.gen.settled()
        self.transport = None
        self.gen.lost(self)

    def send(self) -> None:
        self.in_flight = True
        self.head_done = False
        self.buf.clear()
        self.t_first = 0.0
        self.tail = b""
        self.gaps = [] if self.gen.stream else None
        self.t0 = time.perf_counter()
        self.transport.write(self.gen.next_request())

    # -- parsing --------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.in_flight:
            self.gen.results.error("bad", "bytes received with no request in flight")
            self.transport.abort()
            return
        if not self.head_done:
            buf = self.buf
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_RESPONSE_HEAD:
                    self._fail("bad", "response head too large")
                return
            head = bytes(buf[:end + 2]).lower()
            data = bytes(buf[end + 4:])
            buf.clear()
            try:
                self.status = int(head[9:12])
            except ValueError:
                return self._fail("bad", f"bad status line {head[:40]!r}")
            if 100 <= self.status < 200:
                self.data_received(data) if data else None
                return
            self.head_done = True
            self.close_after = b"\r\nconnection: close" in head
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                self.mode = "length"
                self.remaining = int(head[i + 17:head.find(b"\r\n", i + 2)].strip())
            elif b"\r\ntransfer-encoding: chunked" in head:
                self.mode = "chunked"
                self.chunk_need = -1
                self.chunk_done = False
            else:
                self.mode = "close"
                self.close_after = True
            if self.mode == "length" and self.remaining == 0:
                return self._complete(now)
            if not data:
                return
        if not self.t_first:
            self.t_first = now
            if self.gaps is not None and not self.counted_open:
                self.counted_open = True
                res = self.gen.results
                res.open += 1
                if res.open > res.max_open:
                    res.max_open = res.open
        elif self.gaps is not None:
            self.gaps.append(now - self.t_last)
        self.t_last = now
        if self.gen.stream:
            self.tail = (self.tail + data)[-64:]
        mode = self.mode
        if mode == "length":
            self.remaining -= len(data)
            if self.remaining <= 0:
                if self.remaining < 0:
                    return self._fail("bad", "more body bytes than Content-Length")
                self._complete(now)
        elif mode == "chunked":
            if self._feed_chunked(data):
                self._complete(now)

    def _feed_chunked(self, data: bytes) -> bool:
        """Consumes chunked framing; True once the last chunk and the final CRLF are in."""
        buf = self.buf
        buf += data
        pos = 0
        n = len(buf)
        while pos < n:
            need = self.chunk_need
            if need >= 0:
                take = min(need, n - pos)
                pos += take
                self.chunk_need = need - take
                if self.chunk_need == 0:
                    self.chunk_need = -1
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            line = bytes(buf[pos:eol])
            pos = eol + 2
            if self.chunk_done:  # trailer section: ends with an empty line
                if not line:
                    del buf[:pos]
                    return True
                continue
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                self.chunk_done = True
            else:
                self.chunk_need = size + 2
        del buf[:pos]
        return False

    def _fail(self, kind: str, detail: str) -> None:
        self.in_flight = False
        self._close_open()
        self.gen.results.error(kind, detail)
        if self.transport is not None:
            self.transport.abort()
        self.gen.settled()

    def _close_open(self) -> None:
        if self.counted_open:
            self.counted_open = False
            self.gen.results.open -= 1

    def _complete(self, now: float) -> None:
        self.in_flight = False
        gen = self.gen
        res = gen.results
        self._close_open()
        if self.status >= 400:
            res.error("status", f"HTTP {self.status}")
        elif gen.stream and gen.marker and gen.marker not in self.tail:
            res.error("bad", f"stream ended without its terminal event: {self.tail[-40:]!r}")
        else:
            res.requests += 1
            if self.t0 >= gen.measure_from:
                if len(res.lat) < MAX_SAMPLES:
                    res.lat.append(now - self.t0)
                if now <= gen.end:
                    res.measured += 1
                if gen.stream and self.t_first:
                    if len(res.ttfb) < MAX_SAMPLES:
                        res.ttfb.append(self.t_first - self.t0)
                        res.body.append(self.t_last - self.t_first)
                    if len(res.gap) < MAX_GAP_SAMPLES and self.gaps:
                        res.gap.extend(self.gaps)
        if gen.once:
            gen.settled()
        if self.close_after or gen.once:
            self.transport.close()  # connection_lost opens the next one if the run goes on
            return
        gen.maybe_send(self)


class Generator:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.request = build_request(spec)
        vary = spec["vary"].encode()
        at = self.request.find(vary) if vary else -1
        self.vary = (self.request[:at], len(vary), self.request[at + len(vary):]) \
            if at >= 0 else None
        self.counter = random.randrange(26 ** len(vary)) if vary else 0
        self.stream = bool(spec["stream"])
        self.marker = (b"message_stop" if "/messages" in spec["path"] else b"[DONE]") \
            if self.stream else b""
        self.once = bool(spec["once"])
        self.n = int(spec["concurrency"])
        self.results = Results()
        self.loop = asyncio.get_running_loop()
        self.start = time.perf_counter()
        self.measure_from = self.start + float(spec["warmup"])
        self.end = self.measure_from + float(spec["duration"])
        self.max_requests = int(spec["max_requests"])
        self.sent = 0
        self.finished = 0       # once-mode: connections whose one request is settled
        self.clients: set[Client] = set()
        self.stopping = False
        self.connecting = 0
        self.done = self.loop.create_future()

    def next_request(self) -> bytes:
        """The request, with a new word (same length, letters only) where `vary` was."""
        if self.vary is None:
            return self.request
        head, width, tail = self.vary
        self.counter += 1
        k, word = self.counter, bytearray(width)
        for i in range(width):
            word[i] = 97 + k % 26
            k //= 26
        return head + word + tail

    def running(self) -> bool:
        return not self.stopping and time.perf_counter() < self.end \
            and self.sent < self.max_requests

    def maybe_send(self, client: Client) -> None:
        """Called when a connection is up or a response completed: send the next request."""
        if self.once:
            if not client.sent_once:
                client.sent_once = True
                self.sent += 1
                client.send()
            return
        if self.running():
            self.sent += 1
            client.send()
        else:
            self._check_done()

    def settled(self) -> None:
        """One request finished (success or error)."""
        if self.once:
            self.finished += 1
        self._check_done()

    def lost(self, client: Client) -> None:
        self.clients.discard(client)
        if self.once:
            if not client.sent_once:
                self.finished += 1
            self._check_done()
        elif self.running():
            self.loop.create_task(self.connect())
        else:
            self._check_done()

    def _check_done(self) -> None:
        if self.done.done():
            return
        if self.once:
            if self.finished >= self.n:
                self.done.set_result(None)
        elif not self.running() and self.connecting == 0 and not any(
                c.in_flight for c in self.clients):
            self.done.set_result(None)

    async def connect(self) -> None:
        self.connecting += 1
        ok = False
        try:
            while self.running() or self.once and time.perf_counter() < self.end:
                try:
                    _, client = await asyncio.wait_for(self.loop.create_connection(
                        lambda: Client(self), self.spec["host"], self.spec["port"]),
                        self.spec["timeout"])
                    self.clients.add(client)
                    ok = True
                    return
                except (OSError, asyncio.TimeoutError) as exc:
                    self.results.error("connect", repr(exc))
                    await asyncio.sleep(0.01)
        finally:
            self.connecting -= 1
            if self.once and not ok:
                self.finished += 1
            self._check_done()

    async def watchdog(self) -> None:
        timeout = float(self.spec["timeout"])
        while not self.done.done():
            await asyncio.sleep(0.05)
            now = time.perf_counter()
            for client in list(self.clients):
                if client.in_flight and now - client.t0 > timeout:
                    client._fail("timeout", f"no complete response in {timeout} s")
            if now > self.end + timeout + 1.0 and not self.done.done():
                self.done.set_result(None)  # hard stop: never outlive duration + timeout

    async def run(self) -> dict:
        spec = self.spec
        n = self.n
        dog = self.loop.create_task(self.watchdog())
        batch = max(1, int(spec["ramp_batch"]))
        for i in range(0, n, batch):
            await asyncio.gather(*(self.connect() for _ in range(min(batch, n - i))))
            if i + batch < n:
                await asyncio.sleep(float(spec["ramp_pause"]))
        await self.done
        self.stopping = True
        dog.cancel()
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abort()
        window = min(time.perf_counter(), self.end) - self.measure_from
        res = self.results
        times = os.times()
        return {
            "requests": res.requests, "measured": res.measured, "window_s": round(window, 4),
            "rps": res.measured / window if window > 0 and not self.once else 0.0,
            "errors": res.errors, "first_error": res.first_error,
            "lat_us": [round(x * 1e6, 1) for x in res.lat],
            "ttfb_us": [round(x * 1e6, 1) for x in res.ttfb],
            "gap_us": [round(x * 1e6, 1) for x in res.gap],
            "body_us": [round(x * 1e6, 1) for x in res.body],
            "cpu_s": times.user + times.system, "max_open": res.max_open,
        }


def run(spec: dict) -> dict:
    full = dict(DEFAULTS)
    full.update(spec)
    host = full["host"]
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        raise SystemExit("loadgen: loopback targets only")

    async def main() -> dict:
        return await Generator(full).run()

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0] if argv else sys.stdin.read())
    out = run(spec)
    sys.stdout.write(json.dumps(out, separators=(",", ":")))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
