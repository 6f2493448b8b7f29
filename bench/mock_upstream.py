#!/usr/bin/env python3
"""bench/mock_upstream.py: a fast stand-in for the Anthropic and OpenAI APIs, standard library only.

It answers `POST /v1/messages` (Anthropic) and `POST /v1/chat/completions` (OpenAI), buffered or
as server-sent events with the providers' real event sequences and usage, plus `GET /health`.
Responses are rendered once per parameter set and cached, requests are parsed with a couple of
`bytes.find` calls, and everything runs in one asyncio Protocol, so on loopback it answers far
faster than tokenman can relay (run.py measures its ceiling and prints it).

    python bench/mock_upstream.py --port 18080 --ttfb-ms 0 --chunks 50 --interval-ms 1

Per-request overrides (request headers; tokenman forwards them unchanged):
    x-mock-ttfb-ms       delay before the response head (and first event) is written
    x-mock-chunks        number of content deltas in a stream
    x-mock-interval-ms   pause between stream writes (0 = the whole stream in one write)
    x-mock-size          characters of generated text in the response
    x-mock-status        answer with this status and a provider-native error body

On start it prints one line `mock listening on 127.0.0.1:PORT` to stdout (run.py reads it).
SIGINT / SIGTERM stop it and print `mock served N requests in S s cpu` to stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import sys
import time

# ================================================================================================
# §01 constants and limits
# ================================================================================================

MAX_HEAD = 64 * 1024              # 431 past this (same as tokenman's request head limit)
MAX_BODY = 16 * 1024 * 1024       # 413 past this; the benchmark sends a few hundred bytes
MAX_CACHE = 256                   # rendered responses kept (parameter sets are few in practice)
MAX_CHUNKS = 100_000              # upper bound for x-mock-chunks
MAX_DELAY_MS = 600_000.0          # upper bound for x-mock-ttfb-ms and x-mock-interval-ms
MAX_SIZE = 16 * 1024 * 1024       # upper bound for x-mock-size
LOREM = ("The quick brown fox jumps over the lazy dog while the proxy counts every token. ")

_CL_RE = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,12})[ \t]*(?=\r\n)", re.I)
_TE_RE = re.compile(rb"\r\ntransfer-encoding:", re.I)
_CLOSE_RE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)
_AUTH_RE = re.compile(rb"\r\n(?:x-api-key|authorization|api-key):[ \t]*\S", re.I)
_OVERRIDE_RE = re.compile(rb"\r\nx-mock-(ttfb-ms|chunks|interval-ms|size|status):[ \t]*"
                          rb"([0-9]{1,9}(?:\.[0-9]{1,6})?)", re.I)
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')
_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,128})"')

ANTHROPIC = "anthropic"
OPENAI = "openai"
ROUTES = {b"/v1/messages": ANTHROPIC, b"/v1/chat/completions": OPENAI}

# ================================================================================================
# §02 response rendering: bodies and event sequences as the providers send them (cached)
# ================================================================================================


def _text(size: int) -> str:
    reps = size // len(LOREM) + 1
    return (LOREM * reps)[:size]


def _split(text: str, parts: int) -> list[str]:
    """text in `parts` nearly equal, non-empty-where-possible pieces."""
    parts = max(1, parts)
    step, extra = divmod(len(text), parts)
    out, pos = [], 0
    for i in range(parts):
        n = step + (1 if i < extra else 0)
        out.append(text[pos:pos + n])
        pos += n
    return out


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _head(status: int, ctype: bytes, extra: bytes, length: int | None, close: bool) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
              411: b"Length Required", 413: b"Content Too Large", 429: b"Too Many Requests",
              500: b"Internal Server Error", 529: b"Overloaded"}.get(status, b"Status")
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"Content-Type: " + ctype,
             b"Date: Thu, 01 Jan 2026 00:00:00 GMT", b"Server: mock-upstream"]
    if extra:
        lines.append(extra)
    if length is None:
        lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"Cache-Control: no-cache")
    else:
        lines.append(b"Content-Length: %d" % length)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _event(name: str | None, obj: object) -> bytes:
    data = obj if isinstance(obj, bytes) else _dumps(obj)
    return (b"event: " + name.encode() + b"\n" if name else b"") + b"data: " + data + b"\n\n"


def anthropic_body(model: str, size: int) -> bytes:
    text = _text(size)
    return _dumps({
        "id": "msg_01BenchMockResponse0000001", "type": "message", "role": "assistant",
        "model": model, "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": max(1, len(text) // 4)}})


def openai_body(model: str, size: int) -> bytes:
    text = _text(size)
    return _dumps({
        "id": "chatcmpl-BenchMock000000000000001", "object": "chat.completion",
        "created": 1767225600, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 25, "completion_tokens": max(1, len(text) // 4),
                  "total_tokens": 25 + max(1, len(text) // 4),
                  "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}},
        "system_fingerprint": "fp_benchmock"})


def anthropic_events(model: str, size: int, chunks: int) -> list[bytes]:
    """Writes of one Messages stream: preamble with the first delta, one delta per write, and
    the last delta with the closing events (message_delta carries the final usage)."""
    pieces = _split(_text(size), chunks)
    out_tokens = max(1, size // 4)
    start = _event("message_start", {"type": "message_start", "message": {
        "id": "msg_01BenchMockResponse0000001", "type": "message", "role": "assistant",
        "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 1}}})
    start += _event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
    start += _event("ping", {"type": "ping"})
    deltas = [_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": p}})
              for p in pieces]
    tail = _event("content_block_stop", {"type": "content_block_stop", "index": 0})
    tail += _event("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                     "usage": {"output_tokens": out_tokens}})
    tail += _event("message_stop", {"type": "message_stop"})
    deltas[0] = start + deltas[0]
    deltas[-1] += tail
    return deltas


def openai_events(model: str, size: int, chunks: int, include_usage: bool) -> list[bytes]:
    """Writes of one Chat Completions stream: role chunk with the first delta, one delta per
    write, then the finish chunk, the usage chunk (`choices: []`, only when the request asked
    with stream_options.include_usage) and `data: [DONE]`."""
    pieces = _split(_text(size), chunks)
    out_tokens = max(1, size // 4)
    base = {"id": "chatcmpl-BenchMock000000000000001", "object": "chat.completion.chunk",
            "created": 1767225600, "model": model, "system_fingerprint": "fp_benchmock"}

    def chunk(delta: dict, finish: str | None) -> bytes:
        obj = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None,
                                   "finish_reason": finish}])
        if include_usage:
            obj["usage"] = None
        return _event(None, obj)

    writes = [chunk({"content": p}, None) for p in pieces]
    writes[0] = chunk({"role": "assistant", "content": "", "refusal": None}, None) + writes[0]
    tail = chunk({}, "stop")
    if include_usage:
        tail += _event(None, dict(base, choices=[], usage={
            "prompt_tokens": 25, "completion_tokens": out_tokens,
            "total_tokens": 25 + out_tokens, "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0}}))
    tail += _event(None, b"[DONE]")
    writes[-1] += tail
    return writes


def error_body(api: str, status: int) -> bytes:
    if api == ANTHROPIC:
        kind = {401: "authentication_error", 429: "rate_limit_error",
                529: "overloaded_error"}.get(status, "api_error")
        return _dumps({"type": "error", "error": {"type": kind,
                                                  "message": f"mock status {status}"}})
    return _dumps({"error": {"message": f"mock status {status}", "type": "server_error",
                             "param": None, "code": None}})


class Renderer:
    """Renders (and caches) complete responses: bytes for buffered ones, a list of writes for
    streams (the first carries the head, each is one HTTP chunk)."""

    def __init__(self) -> None:
        self.cache: dict[tuple, object] = {}

    def get(self, key: tuple) -> object:
        found = self.cache.get(key)
        if found is None:
            if len(self.cache) >= MAX_CACHE:
                self.cache.clear()
            found = self.cache[key] = self._render(*key)
        return found

    @staticmethod
    def _render(api: str, stream: bool, usage: bool, model: str, size: int, chunks: int,
                status: int, close: bool) -> object:
        if status != 200:
            body = error_body(api, status)
            return _head(status, b"application/json", b"", len(body), close) + body
        if api == ANTHROPIC:
            extra = b"request-id: req_01BenchMock0000000000000001\r\nanthropic-organization-id: " \
                    b"00000000-0000-0000-0000-000000000000"
        else:
            extra = b"x-request-id: req_benchmock0000000000000001\r\nopenai-processing-ms: 1"
        if not stream:
            body = anthropic_body(model, size) if api == ANTHROPIC else openai_body(model, size)
            return _head(200, b"application/json", extra, len(body), close) + body
        writes = anthropic_events(model, size, chunks) if api == ANTHROPIC \
            else openai_events(model, size, chunks, usage)
        out = [_chunk(w) for w in writes]
        out[-1] += b"0\r\n\r\n"
        out[0] = _head(200, b"text/event-stream; charset=utf-8", extra, None, close) + out[0]
        return out


# ================================================================================================
# §03 the server: one Protocol per connection, keep-alive, no coroutine per request
# ================================================================================================


class Settings:
    __slots__ = ("ttfb", "chunks", "interval", "size")

    def __init__(self, ttfb_ms: float, chunks: int, interval_ms: float, size: int) -> None:
        self.ttfb = ttfb_ms / 1000.0
        self.chunks = chunks
        self.interval = interval_ms / 1000.0
        self.size = size


class Stats:
    __slots__ = ("requests", "streams", "open_streams", "max_open_streams", "connections")

    def __init__(self) -> None:
        self.requests = 0
        self.streams = 0
        self.open_streams = 0
        self.max_open_streams = 0
        self.connections = 0


_HEALTH = _head(200, b"application/json", b"", 15, False) + b'{"status":"ok"}'


class MockConn(asyncio.Protocol):
    __slots__ = ("loop", "settings", "renderer", "stats", "transport", "buf", "busy", "closed",
                 "timer", "writes", "index", "interval", "streaming", "close_after")

    def __init__(self, loop, settings: Settings, renderer: Renderer, stats: Stats) -> None:
        self.loop = loop
        self.settings = settings
        self.renderer = renderer
        self.stats = stats
        self.transport = None
        self.buf = bytearray()
        self.busy = False     # a delayed or streamed response is in progress
        self.closed = False
        self.timer = None
        self.writes: list[bytes] = []
        self.index = 0
        self.interval = 0.0
        self.streaming = False
        self.close_after = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.stats.connections += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            if self.streaming:
                self.stats.open_streams -= 1
        self.writes = []

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        """Answers every complete request in the buffer, in order, until one needs a timer."""
        buf = self.buf
        while buf and not self.busy and not self.closed:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._fail(431)
                return
            head = bytes(buf[:end + 2])
            m = _CL_RE.search(head)
            length = int(m.group(1)) if m else 0
            if m is None and _TE_RE.search(head):
                self._fail(411)  # the benchmark clients always send Content-Length
                return
            if length > MAX_BODY:
                self._fail(413)
                return
            if len(buf) < end + 4 + length:
                return
            body = bytes(buf[end + 4:end + 4 + length])
            del buf[:end + 4 + length]
            self._answer(head, body)

    def _fail(self, status: int) -> None:
        self.transport.write(self.renderer.get((OPENAI, False, False, "", 0, 0, status, True)))
        self.transport.close()
        self.closed = True

    def _answer(self, head: bytes, body: bytes) -> None:
        stats = self.stats
        stats.requests += 1
        sp = head.find(b" ")
        target = head[sp + 1:head.find(b" ", sp + 1)]
        api = ROUTES.get(target.partition(b"?")[0])
        close = _CLOSE_RE.search(head) is not None
        if api is None:
            if target == b"/health":
                self.transport.write(_HEALTH)
            else:
                self.transport.write(self.renderer.get((OPENAI, False, False, "", 0, 0, 404,
                                                        close)))
            if close:
                self.transport.close()
                self.closed = True
            return
        s = self.settings
        ttfb, chunks, interval, size, status = s.ttfb, s.chunks, s.interval, s.size, 200
        if b"x-mock-" in head or b"X-Mock-" in head or b"X-MOCK-" in head:
            for name, value in _OVERRIDE_RE.findall(head):
                name = name.lower()
                num = float(value)
                if name == b"ttfb-ms":
                    ttfb = min(num, MAX_DELAY_MS) / 1000.0
                elif name == b"chunks":
                    chunks = max(1, min(int(num), MAX_CHUNKS))
                elif name == b"interval-ms":
                    interval = min(num, MAX_DELAY_MS) / 1000.0
                elif name == b"size":
                    size = min(int(num), MAX_SIZE)
                elif name == b"status" and 200 <= num <= 599:
                    status = int(num)
        if _AUTH_RE.search(head) is None:
            status = 401  # a real provider refuses a request without a key
        stream = _STREAM_RE.search(body) is not None
        usage = stream and api == OPENAI and _USAGE_RE.search(body) is not None
        m = _MODEL_RE.search(body)
        model = m.group(1).decode("latin-1") if m else "mock-model"
        rendered = self.renderer.get((api, stream, usage, model, size,
                                      chunks if stream else 0, status, close))
        if isinstance(rendered, bytes):
            if ttfb > 0:
                self.busy = True
                self.writes = [rendered]
                self.index = 0
                self.streaming = False
                self.close_after = close
                self.timer = self.loop.call_later(ttfb, self._next)
            else:
                self.transport.write(rendered)
                if close:
                    self.transport.close()
                    self.closed = True
            return
        stats.streams += 1
        stats.open_streams += 1
        if stats.open_streams > stats.max_open_streams:
            stats.max_open_streams = stats.open_streams
        if ttfb <= 0 and interval <= 0:
            self.transport.write(b"".join(rendered))
            stats.open_streams -= 1
            if close:
                self.transport.close()
                self.closed = True
            return
        self.busy = True
        self.writes = rendered
        self.index = 0
        self.interval = interval
        self.streaming = True
        self.close_after = close
        if interval <= 0:  # only a first-byte delay: the stream goes out in one write
            self.writes = [b"".join(rendered)]
        self.timer = self.loop.call_later(ttfb, self._next) if ttfb > 0 else None
        if self.timer is None:
            self._next()

    def _next(self) -> None:
        """Writes the next part of a delayed response or stream, then re-arms the timer."""
        self.timer = None
        if self.closed:
            return
        writes = self.writes
        self.transport.write(writes[self.index])
        self.index += 1
        if self.index < len(writes):
            self.timer = self.loop.call_later(self.interval, self._next)
            return
        if self.streaming:
            self.stats.open_streams -= 1
        self.writes = []
        self.busy = False
        if self.close_after:
            self.transport.close()
            self.closed = True
        elif self.buf:
            self._process()


# ================================================================================================
# §04 command line
# ================================================================================================


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    settings = Settings(args.ttfb_ms, args.chunks, args.interval_ms, args.size)
    renderer = Renderer()
    stats = Stats()
    server = await loop.create_server(lambda: MockConn(loop, settings, renderer, stats),
                                      args.host, args.port, reuse_address=True, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"mock listening on {args.host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    t0 = time.monotonic()
    c0 = cpu_seconds()
    if args.duration:
        loop.call_later(args.duration, stop.set)
    await stop.wait()
    server.close()
    wall = time.monotonic() - t0
    cpu = cpu_seconds() - c0
    print(f"mock served {stats.requests} requests ({stats.streams} streams, "
          f"{stats.connections} connections, at most {stats.max_open_streams} streams open) "
          f"in {wall:.1f} s wall, {cpu:.2f} s cpu"
          + (f", {cpu / stats.requests * 1e6:.1f} us cpu/request" if stats.requests else ""),
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Mock Anthropic + OpenAI upstream for benchmarks.")
    p.add_argument("--host", default="127.0.0.1", help="listen address (loopback only)")
    p.add_argument("--port", type=int, default=0, help="port (0 = any free port)")
    p.add_argument("--ttfb-ms", type=float, default=0.0, help="delay before the first byte")
    p.add_argument("--chunks", type=int, default=50, help="content deltas per stream")
    p.add_argument("--interval-ms", type=float, default=0.0, help="pause between stream writes")
    p.add_argument("--size", type=int, default=400, help="characters of generated text")
    p.add_argument("--duration", type=float, default=0.0,
                   help="exit after this many seconds (0 = run until SIGINT/SIGTERM)")
    args = p.parse_args(argv)
    if not (args.host.startswith("127.") or args.host in ("localhost", "::1")):
        p.error("the mock listens on loopback only")
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
