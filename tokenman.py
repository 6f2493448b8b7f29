#!/usr/bin/env python3
"""tokenman: a local reverse proxy for LLM API calls, in one standard-library file.

Point the Anthropic or OpenAI SDK, Claude Code, Cursor or curl at it and it relays
`/v1/messages` and `/v1/chat/completions` (streaming included, across the two formats when
routing says so) to the provider, with response caching, prompt-cache hints, PII redaction,
injection detection, budgets, rate limits, retries, circuit breakers and fallback, and records
the exact usage and cost of every call in a SQLite request log, a dashboard, Prometheus metrics
and OpenTelemetry traces.

Quick start (CPython >= 3.11, nothing to install):
    python tokenman.py                        # proxy on http://127.0.0.1:7677, built-in defaults
    ANTHROPIC_BASE_URL=http://127.0.0.1:7677 claude
    OPENAI_BASE_URL=http://127.0.0.1:7677/v1 python my_app.py
    python tokenman.py stats --since 24h      # usage and cost from the request log
    python -m unittest -v test_tokenman       # the test suite

Sections (search for the banner mark, e.g. "§05"). Each section only uses the ones above it.
    §01 constants and limits            §10 accounting: usage, token estimate, prices
    §02 errors                          §11 store: SQLite request log, one writer thread
    §03 small utilities and the logger  §12 observability: metrics and tracing
    §04 config                          §13 pipeline: Context, Stage, Pipeline, every stage
    §05 HTTP wire, sans-IO              §14 proxy: routing, translation, relays, log rows
    §06 connections over asyncio        §15 dashboard API, auth, CORS
    §07 HTTP server                     §16 dashboard page (one HTML string)
    §08 HTTP client (upstream pool)     §17 App: wiring, reload, graceful stop
    §09 resilience: retry, breaker      §18 command line
"""
from __future__ import annotations

import os as _os
import sys as _sys

# `python tokenman.py` keeps the parse tree of the whole script alive for as long as it runs
# (~15 MB here). Re-executing into a normal import of this file frees it and lets Python use (and
# write) the cached bytecode; the process keeps its PID. Interpreter options given before the
# script (`python -u -X dev tokenman.py`) and the PYTHON* variables that set the same things
# (PYTHONUNBUFFERED and PYTHONDONTWRITEBYTECODE, as container images set them, PYTHONOPTIMIZE,
# PYTHONWARNINGS, PYTHONDEVMODE, ...), which -I would drop, are passed on as the options this
# interpreter ended up with (sys.flags, sys.warnoptions, -X options). A script run by a module
# (`python -m cProfile tokenman.py`, `-m pdb`) stays in that module: no re-exec.
# The re-executed process imports asyncio with ssl held back: asyncio imports it eagerly, and
# OpenSSL's libraries and the ssl module are ~4 MB of RSS that a proxy without a TLS connection
# never uses; load_ssl() (§03) imports it on first use and hands it to asyncio. Only on the
# versions whose asyncio this was checked against (3.11-3.13); later ones import ssl as before.
if __name__ == "__main__" and _os.name == "posix" \
        and _os.environ.get("TOKENMAN_REEXEC", "1") == "1":
    _at = len(_sys.orig_argv) - len(_sys.argv)  # where the script's path is in orig_argv
    _opts = [o for o in _sys.orig_argv[1:max(_at, 1)] if o != "--"]  # (-- ends the options)
    # the short flags of each option (-Bm is -B -m), up to -W or -X, which take the rest
    _flags = [o[1:].split("W")[0].split("X")[0] for o in _opts if o[:1] == "-" != o[1:2]]
    if _at >= 1 and "__file__" in globals() and not any("m" in f or "c" in f for f in _flags) \
            and _os.path.abspath(_sys.orig_argv[_at]) == _os.path.abspath(__file__):
        _f = _sys.flags
        _opts = (["-B"] if _f.dont_write_bytecode else []) + ["-O"] * _f.optimize \
            + ["-v"] * _f.verbose + ["-b"] * _f.bytes_warning + ["-d"] * _f.debug \
            + (["-u"] if getattr(_sys.stdout, "write_through", False) else []) \
            + [f"-W{w}" for w in _sys.warnoptions] + [f"-X{k}" if v is True else f"-X{k}={v}"
                                                    for k, v in _sys._xoptions.items()] \
            + (["-Xdev"] if _f.dev_mode and "dev" not in _sys._xoptions else []) \
            + (["-Xutf8"] if _f.utf8_mode and "utf8" not in _sys._xoptions else [])
        _os.execv(_sys.executable, [_sys.executable, *_opts, "-I", "-S", "-c", (
                      "import importlib.util as u, sys; s = u.spec_from_file_location("
                      "'tokenman', sys.argv[1]); m = u.module_from_spec(s); sys.modules["
                      "'tokenman'] = m; lazy = sys.version_info < (3, 14) and 'ssl' not in "
                      "sys.modules; lazy and sys.modules.update(ssl=None); "
                      "s.loader.exec_module(m); lazy and sys.modules.pop('ssl'); "
                      "sys.exit(m.run_cli(sys.argv[2:]))"),
                      _os.path.abspath(__file__)] + _sys.argv[1:])

__version__ = "0.2.0"
__all__ = [
    "App", "Config", "ConfigError", "HTTPError", "TokenmanError", "UpstreamError",
    "Usage", "PriceTable", "Store", "estimate_tokens", "load_config", "main",
]

import argparse
import asyncio
import bisect
import collections
import dataclasses
import datetime
import json
import os
import queue
import random
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
import types
import urllib.parse
import weakref

# ================================================================================================
# §01 constants and limits: every number the wire layer enforces, with where it comes from
# ================================================================================================

MAX_REQUEST_LINE = 8 * 1024      # 414 past this: CPython http.server and nginx use 8 KiB
MAX_HEAD = 64 * 1024             # 431 past this: the whole request head (h11 uses 16 KiB; SDKs
                                 # send large anthropic-beta lists, so we allow more)
MAX_HEADERS = 100                # 431 past this many header lines (CPython http.client's limit)
MAX_CHUNK_LINE = 4 * 1024        # a chunk-size line with extensions (RFC 9112 7.1.1)
MAX_TRAILERS = 16 * 1024         # trailer section after the last chunk
MAX_UPSTREAM_HEAD = 64 * 1024    # a provider's response head
SSE_MAX_EVENT = 10 * 1024 * 1024 # one SSE event the side parser follows (long tool outputs, base64)
READ_CHUNK = 64 * 1024           # the most bytes taken from a buffer in one read
READ_HIGH_WATER = 256 * 1024     # pause reading a socket past this much unread data
READ_LOW_WATER = 64 * 1024       # and resume below this
WRITE_BATCH_MAX = 64 * 1024      # a write this large is sent at once, not held for the batch
UPLOAD_PIECE = 1024 * 1024       # a large request body goes upstream in pieces of this size
LARGE_BODY = 1024 * 1024         # a request body this large: memory is trimmed after it
MIN_BODY_RATE = 64 * 1024        # bytes/s a request body may arrive at: its declared length
                                 # adds that time to read_timeout (a large upload on a slow
                                 # link is not a slow client)
LINGER_SECONDS = 10.0            # after refusing a request whose body is still arriving, read
LINGER_IDLE = 2.0                # and drop it this long (this long without bytes ends it) before
                                 # closing: closing on unread bytes sends a reset, and the
                                 # client, still sending, never reads the answer (RFC 9112 9.6)
POOL_MAX_IDLE = 256              # idle keep-alive connections kept per upstream origin: at
                                 # least the busiest concurrency, or every request past it pays a
                                 # new connection (and TLS handshake) to the provider
POOL_IDLE_SECONDS = 30.0         # an idle upstream connection older than this is not reused
POOL_PROBE_SECONDS = 1.0         # one idle this long is checked for a close first (a syscall)
GC_YOUNG_THRESHOLD = 10_000      # new container objects before a young-generation collection
                                 # (CPython: 700, which 64 requests in flight cross all the time)
FIRST_EVENT_WAIT = 5.0           # a stream's head waits this long for its first event while
                                 # a retry or fallback could replace it (an error in it, or an
                                 # end before it, is then one more failed attempt); a slower
                                 # first event (a reasoning model) finds the head already sent
STALE_RETRY_SECONDS = 0.25       # a reused connection closed this soon after the request was
                                 # written, with no byte back, was closed idle by the provider:
                                 # sent again at once. Later, the provider may be working on it:
                                 # only the retry policy (counted, off with retry_enabled) resends
CACHE_MEMORY_MAX = 32 * 1024 * 1024  # answer bytes the response cache (and the heartbeat)
                                 # keep in memory, whatever max_entries allows (1,000 answers of
                                 # up to max_entry_bytes could otherwise hold a gigabyte)
INFLATABLE = frozenset((b"gzip", b"x-gzip", b"deflate"))  # codings tokenman decodes (zlib)
DECODED_BODY_MAX = 256 * 1024 * 1024  # a compressed request body inflates to this at most
                                 # when server.max_body_size is 0 (no limit): no gzip bomb
RATE_KEYS_PRUNE = 4096           # rate-limit buckets kept before the idle (full) ones are dropped
LAYOUT_MIN_BODY = 16 * 1024      # request bodies this large are parsed member by member, so a
                                 # stage's change is patched in without parsing them again
STORE_MAX_PENDING = 100_000      # rows held in memory while the database refuses writes
CLOSE_FLUSH_SECONDS = 2.0        # at stop, what a connection still has to send gets this long
STORE_BATCH = 500                # rows written in one transaction
STORE_RETRY_SECONDS = 1.0        # wait before retrying a failed write
STORE_GATHER_SECONDS = 0.005     # the writer collects rows this long, then commits them at once:
#                                  long enough to batch under load (15-30 rows at 3-6k req/s), short
#                                  enough that one batch (~0.3 ms of SQLite work on the proxy's core)
#                                  does not hold requests up: 50 ms batches put c=1 p99 at 1.4 ms
STORED_BODY_MAX = 1024 * 1024    # bodies kept in the log when server.store_body is on

TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate",
))
# Headers tokenman itself owns on the way upstream (framing, routing, its own controls).
UPSTREAM_DROP = HOP_BY_HOP | frozenset((b"host", b"content-length", b"expect"))
REASONS = types.MappingProxyType({
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
    505: "HTTP Version Not Supported", 529: "Overloaded",
})
# Provider-native error types by status, for errors tokenman produces itself.
ANTHROPIC_ERROR_TYPES = types.MappingProxyType({
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 415: "invalid_request_error",
    429: "rate_limit_error", 529: "overloaded_error",
})
OPENAI_ERROR_TYPES = types.MappingProxyType({
    400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
    404: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
    429: "rate_limit_exceeded",
})
LOG_LEVELS = types.MappingProxyType({
    "trace": 5, "debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "fatal": 50,
})
API_ANTHROPIC = "anthropic"
API_OPENAI = "openai"
API_FORMATS = (API_ANTHROPIC, API_OPENAI)
ANTHROPIC_PATH = "/v1/messages"
OPENAI_PATH = "/v1/chat/completions"
ACCOUNTED_PATHS = types.MappingProxyType({ANTHROPIC_PATH: API_ANTHROPIC,
                                          OPENAI_PATH: API_OPENAI})
API_PATHS = types.MappingProxyType({API_ANTHROPIC: ANTHROPIC_PATH, API_OPENAI: OPENAI_PATH})
# calls that carry a whole conversation without answering it: PII is screened there too
SIDE_CALL_PATHS = frozenset({ANTHROPIC_PATH + "/count_tokens"})
UNBILLED_PATHS = frozenset({ANTHROPIC_PATH + "/count_tokens"})  # free: no budget reserved
EMBEDDINGS_PATH = "/v1/embeddings"
COMPLETIONS_PATH = "/v1/completions"  # OpenAI's legacy text completions (passed through)
SHUTDOWN_CUT = "tokenman shut down with the request in flight (server.shutdown_timeout)"
BATCHES_PATH = ANTHROPIC_PATH + "/batches"  # (its requests are capped as each call would be)
RESPONSES_PATH = "/v1/responses"  # OpenAI's Responses API (passed through, accounted)
# content parts that are media, not text: their base64 or URL says nothing about their tokens.
# An image costs up to ~1,600 input tokens at Anthropic (about width x height / 750, large ones
# scaled down) and up to ~1,100 at OpenAI (high detail); a PDF is billed per page (text plus an
# image of each page, ~1,500-3,000 tokens), up to 100 pages.
MEDIA_PARTS = frozenset(("image", "document", "image_url", "input_image", "input_audio", "file",
                         "input_file"))
MEDIA_PART_TOKENS = 1_600
DOCUMENT_MAX_TOKENS = 300_000
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # files tokenman writes in data_dir (not on Windows)
MODEL_NAME_MAX = 256  # characters in a model id a request may name (the longest real ones,
# fine-tuned ids and cloud ARNs, are under 200): each becomes a label, a span, a log field
GZIP_MEMBERS_MAX = 64  # members of a gzip request body (RFC 1952 allows many; clients send one)
LOG_PENDING_MAX = 100_000  # log lines waiting for a stalled reader, at the most (then dropped)
USAGE_MAX = 1_000_000_000  # a provider's token count past this is taken as garbage (the largest
# context windows are a few million tokens; a batch's usage is per request)
WEB_SEARCH_USD = 0.01  # Anthropic's web search tool: $10 per 1,000 searches, beside the tokens
BUDGET_HELD_RETRY = 5  # Retry-After (s) of a budget refusal that only held reservations cause
WEB_SEARCH_USES = 10  # searches a budget holds for a web search tool that sets no max_uses

# ================================================================================================
# §02 errors: exceptions that know how they look on the wire
# ================================================================================================


class TokenmanError(Exception):
    """Base of every error tokenman raises on purpose."""


class HTTPError(TokenmanError):
    """A request tokenman answers itself: status, a client-safe message, whether to close."""

    def __init__(self, status: int, detail: str, close: bool = False, kind: str = "",
                 headers: tuple = ()) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.close = close
        self.kind = kind
        self.headers = headers  # (name, value) pairs the answer carries


class ConfigError(TokenmanError):
    """Every problem found in a configuration, reported together."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


class UpstreamError(TokenmanError):
    """The provider could not be reached (connect=True: nothing was sent), answered garbage,
    or too slowly (timeout=True)."""

    def __init__(self, detail: str, timeout: bool = False, connect: bool = False) -> None:
        super().__init__(detail)
        self.timeout = timeout
        self.connect = connect


class ConnectionGone(TokenmanError):
    """The peer closed the connection before a read could complete."""

    def __init__(self, partial: bool = False) -> None:
        super().__init__("connection closed")
        self.partial = partial


class HeadTooLarge(TokenmanError):
    """A head grew past its limit before its blank line arrived."""


# ================================================================================================
# §03 small utilities: ids, time, escaping, secrets, JSON patching, the logger
# ================================================================================================

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PROJECT_RE = re.compile(r"[^A-Za-z0-9._:/@-]")  # characters not allowed in a project name
_SECRET_RE = re.compile(r"(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-]+|(Bearer\s+)\S+|"
                        r"((?:x-)?api[-_]key[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]+|"
                        r"(AIza[0-9A-Za-z_\-]{4})[0-9A-Za-z_\-]{20,}", re.I)
# (an OpenAI or Anthropic key, a bearer token, an api-key header or field echoed back, a
# Google key)
# a log value with one of these must be escaped
_LOG_SPECIAL = re.compile(r"[\x00-\x20\x7f-\x9f\u2028\u2029\"=]")


def project_name(text: str) -> str:
    """A project as tokenman names it: other characters become _, at most 64 of them."""
    return _PROJECT_RE.sub("_", text)[:64]


def new_request_id() -> str:
    """Unique and time-ordered (new rows land at the end of the primary-key index)."""
    return f"req_{time.time_ns():016x}{random.getrandbits(64):016x}"  # (no syscall, unlike urandom)


def new_tool_id() -> str:
    """An id for a tool call a provider sent without one: the client answers by it."""
    return "toolu_" + os.urandom(12).hex()


def utc_iso(ts: float) -> str:
    """Seconds since the epoch as a sortable UTC string with milliseconds."""
    t = time.gmtime(ts)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour,
                                                   t.tm_min, t.tm_sec, int(ts * 1000) % 1000)


class IsoStamps:
    """utc_iso for a hot path: the part up to the second is formatted once per second."""
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = (-1, "")  # (second, its text): one attribute, so threads never mix them

    def __call__(self, ts: float) -> str:
        sec = int(ts)
        last = self.last
        if sec != last[0]:
            last = self.last = (sec, utc_iso(sec)[:-5])
        return "%s.%03dZ" % (last[1], int(ts * 1000) % 1000)


def escape_log(text: str) -> str:
    """Control characters become visible escapes so a value cannot forge log lines."""
    if _CONTROL_RE.search(text):
        return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}" if m.group() < "\u0100"
                               else f"\\u{ord(m.group()):04x}", text)
    return text


def _usd(amount: float) -> str:
    """12,345.67 / 25.00 / 0.0006: cents when the amount has no finer part."""
    return f"{amount:,.2f}" if round(amount, 2) == amount else f"{amount:,.6f}".rstrip("0")


def load_ssl() -> types.ModuleType:
    """The ssl module, imported on first use: a TLS connection (a provider, a CONNECT tunnel,
    the trace collector) or serving TLS. Run as a script, tokenman imported asyncio with ssl held
    back (see the top of this file), so asyncio's modules kept None for it; they get it here
    (no-op when asyncio had it from the start, as in a process that imports tokenman)."""
    import ssl
    for name, module in list(sys.modules.items()):
        if name.startswith("asyncio.") and getattr(module, "ssl", ssl) is None:
            module.ssl = ssl
    proto = sys.modules.get("asyncio.sslproto")
    if proto is not None and not hasattr(proto, "SSLAgainErrors"):  # (set at import with ssl)
        proto.SSLAgainErrors = (ssl.SSLWantReadError, ssl.SSLSyscallError)
    return ssl


def redact_secrets(text: str) -> str:
    """Masks API keys and bearer tokens that might sit inside an error text."""
    return _SECRET_RE.sub(lambda m: next(g for g in m.groups() if g) + "***", text)


def parse_duration(value: object) -> float:
    """Seconds from an int/float or a string such as "30s", "5m", "1h", "250ms"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
        if m:
            scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
            return float(m.group(1)) * scale
    raise ValueError(f"expected seconds or a duration like '30s', got {value!r}")


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as "10MiB", "512KiB", "1GB"."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B?|B)?\s*", value, re.I)
        if m:
            unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
            return int(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit]
    raise ValueError(f"expected bytes or a size like '10MiB', got {value!r}")


def parse_since(text: str, now: float) -> float:
    """An absolute start time from "24h", "7d", "30m" (relative to now; at the earliest the
    epoch: a range of a billion days means all of it, not a time past the platform's)."""
    return max(0.0, now - parse_duration(text))


def json_dumps(obj: object) -> bytes:
    """Compact JSON, non-ASCII as UTF-8. A lone surrogate (a client's unpaired \\ud800 escape,
    which json.loads takes) cannot be UTF-8: such a body is sent ASCII-escaped, as it came, and
    the provider answers it (Anthropic refuses it with a 400)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode()


_JSON_WS = " \t\n\r"
_PLAIN_JSON = json.JSONDecoder()


def _top_level_members(text: str, decoder: json.JSONDecoder | None = None,
                       values: dict | None = None) -> tuple[dict[str, tuple[int, int, int]], int]:
    """Spans of the members of a top-level JSON object: key -> (member start, value start, value
    end), plus the index of the closing brace. Raises ValueError on anything but an object.
    With `values`, the decoded members are put there too (a repeated name is DuplicateKey)."""
    decoder = decoder or _PLAIN_JSON
    i = len(text) - len(text.lstrip(_JSON_WS))
    if i >= len(text) or text[i] != "{":
        raise ValueError("not a JSON object")
    i += 1
    members: dict[str, tuple[int, int, int]] = {}
    while True:
        while i < len(text) and text[i] in _JSON_WS:
            i += 1
        if i < len(text) and text[i] == "}" and not members:
            return members, i
        start = i
        if i >= len(text) or text[i] != '"':
            raise ValueError("expected a key")
        key, i = json.decoder.scanstring(text, i + 1)
        while text[i] in _JSON_WS:
            i += 1
        if text[i] != ":":
            raise ValueError("expected ':'")
        i += 1
        while text[i] in _JSON_WS:
            i += 1
        value, end = decoder.raw_decode(text, i)
        if values is not None:
            if key in values:
                raise DuplicateKey(f"request body names the member {key[:100]!r} twice in one "
                                   "object")
            values[key] = value
        members[key] = (start, i, end)
        i = end
        while text[i] in _JSON_WS:
            i += 1
        if text[i] == "}":
            return members, i
        if text[i] != ",":
            raise ValueError("expected ',' or '}'")
        i += 1


def json_patch(raw: bytes, changes: dict[str, object], layout: tuple | None = None) -> bytes:
    """The original JSON object with only the named top-level members replaced, added (value
    given) or removed (value is REMOVE). Every other byte, unknown fields included, is kept.
    `layout` is what parse_with_layout() found for these bytes: no second parse."""
    if layout is not None:
        text, members, close = layout
    else:
        added = _append_members(raw, changes)
        if added is not None:
            return added
        text = raw.decode("utf-8-sig")
        members, close = _top_level_members(text)
    edits: list[tuple[int, int, str]] = []
    additions: list[str] = []
    for key, value in changes.items():
        if key in members:
            start, vstart, vend = members[key]
            if value is REMOVE:
                edits.append(_removal_span(text, start, vend))
            else:
                edits.append((vstart, vend, _compact(value)))
        elif value is not REMOVE:
            additions.append(json.dumps(key) + ":" + _compact(value))
    if additions:
        remaining = len(members) - sum(1 for k, v in changes.items() if k in members and v is REMOVE)
        sep = "," if remaining else ""
        edits.append((close, close, sep + ",".join(additions)))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text.encode("utf-8")


def _append_members(raw: bytes, changes: dict[str, object]) -> bytes | None:
    """json_patch without parsing when every change adds a member whose name occurs nowhere in
    the body (e.g. stream_options on an OpenAI stream); None when the full path is needed.
    A body with \\u escapes takes the full path: an escaped key could name the same member; so
    does anything that is not a UTF-8 object (a NUL byte means UTF-16 or -32)."""
    if b"\\u" in raw or b"\x00" in raw or raw.lstrip(b" \t\n\r\xef\xbb\xbf")[:1] != b"{":
        return None
    members = []
    for key, value in changes.items():
        name = json.dumps(key, ensure_ascii=False).encode()
        if value is REMOVE or name in raw:
            return None
        members.append(name + b":" + _compact(value).encode())
    body = raw.rstrip(b" \t\n\r")
    inner = body[:-1].rstrip(b" \t\n\r")
    if body[-1:] != b"}" or not inner:
        return None
    return inner + (b"" if inner.endswith(b"{") else b",") + b",".join(members) \
        + raw[len(inner):]


def _compact(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (the client sent a \\ud800 escape): escape all
        return json.dumps(value, separators=(",", ":"))
    return text


def _removal_span(text: str, start: int, vend: int) -> tuple[int, int, str]:
    """The span that removes one member together with one neighbouring comma."""
    j = vend
    while text[j] in _JSON_WS:
        j += 1
    if text[j] == ",":
        return (start, j + 1, "")
    k = start - 1
    while text[k] in _JSON_WS:
        k -= 1
    if text[k] == ",":
        return (k, vend, "")
    return (start, vend, "")


REMOVE = object()  # marker for json_patch: delete this member


class DuplicateKey(ValueError):
    """A JSON object names a member twice: json.loads keeps the last, json_patch and a provider
    may see the first, so what the pipeline scanned would not be what goes upstream."""


def _unique_members(pairs: list, dict=dict, len=len) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        name = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKey(f"request body names the member {name[:100]!r} twice in one object")
    return obj


# request bodies: ~0.2 us more per JSON object than json.loads, for the check above
_REQUEST_JSON = json.JSONDecoder(object_pairs_hook=_unique_members)


def parse_with_layout(text: str) -> tuple[object, tuple | None]:
    """A request body decoded as _REQUEST_JSON does, plus, for an object, where each top-level
    member sits (text, spans, closing brace) for json_patch: an agent's large body that a stage
    changes is then not parsed a second time (~5 us per KB)."""
    if text.lstrip(_JSON_WS)[:1] != "{":
        return _REQUEST_JSON.decode(text), None
    values: dict = {}
    try:
        members, close = _top_level_members(text, _REQUEST_JSON, values)
    except IndexError:
        raise ValueError("the JSON object is not closed") from None
    if text[close + 1:].strip(_JSON_WS):
        raise ValueError("extra data after the JSON object")
    return values, (text, members, close)


def _json_strings(obj: object, out: list[str], depth: int = 0, counted=None) -> None:
    """Every string value (not key) inside a decoded JSON value, for token estimates.
    `counted(obj, depth)` may take an object over (True: it was counted another way)."""
    if depth > 64:
        return
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, dict):
        if counted is not None and counted(obj, depth):
            return
        for value in obj.values():
            _json_strings(value, out, depth + 1, counted)
    elif isinstance(obj, list):
        for value in obj:
            _json_strings(value, out, depth + 1, counted)


def has_member(obj: object, name: str, depth: int = 0) -> bool:
    """Whether any object inside has a member `name` (a parsed body: however it was spelled)."""
    if depth > 64:
        return False
    if isinstance(obj, dict):
        return name in obj or any(isinstance(v, (dict, list)) and has_member(v, name, depth + 1)
                                  for v in obj.values())
    return isinstance(obj, list) and any(isinstance(v, (dict, list)) and has_member(
        v, name, depth + 1) for v in obj)


def names_member(body: bytes, pattern: re.Pattern) -> bool:
    """Whether a JSON text has a member the pattern (its quoted name and colon) matches, not a
    string holding those characters: its quote follows an even number of backslashes.
    (A pattern with a literal start: the search runs at C speed.)"""
    for m in pattern.finditer(body):
        i = start = m.start()
        while i and body[i - 1] == 92:  # (a backslash)
            i -= 1
        if (start - i) % 2 == 0:
            return True
    return False


class RotatingFile:
    """A log file that rotates itself by size (path, path.1 .. path.N), 0600."""

    def __init__(self, path: str, max_bytes: int = 10 * 1024 * 1024, backups: int = 3) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.fh = os.fdopen(fd, "a", encoding="utf-8", buffering=1,
                             errors="backslashreplace")  # (a lone surrogate from a client)
        self.size = self.fh.tell()

    def write(self, text: str) -> None:
        # a batch may span a rotation, a record never: split at \n only (splitlines would
        # also split at U+2028 and friends, which a JSON log value may hold)
        lines = text.split("\n")
        for line in [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else []):
            if self.size and self.size + len(line) > self.max_bytes:
                self._rotate()
            self.fh.write(line)
            self.size += len(line)

    def _rotate(self) -> None:
        self.fh.close()
        for i in range(self.backups - 1, 0, -1):
            if os.path.exists(f"{self.path}.{i}"):
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
        os.replace(self.path, self.path + ".1")
        self._open()

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _secret_hint(low: str) -> bool:
    """Whether a lowercased text may hold what redact_secrets() masks (a cheap first look)."""
    return "sk-" in low or "bearer" in low or "aiza" in low or "api-key" in low \
        or "api_key" in low


class Logger:
    """Leveled logfmt lines (`time level msg key=value ...`) to a text stream. Formatting only
    happens for enabled levels; values are escaped so no client input can forge a line.
    Buffered (the server's): lines are queued (bounded: past LOG_PENDING_MAX they are counted
    and dropped) and written by a thread of their own, warnings and errors at once, the rest
    within a quarter second, so a log reader that stops reading (a full pipe, a stalled log
    driver) never stops the event loop."""
    __slots__ = ("level", "stream", "json", "pending", "stamp", "wake", "lock", "told",
                 "dropped_total", "max_pending")

    def __init__(self, level: str = "info", stream=None, fmt: str = "text",
                 buffered: bool = False, max_pending: int = LOG_PENDING_MAX) -> None:
        self.level = LOG_LEVELS.get(level.lower(), 20)
        self.max_pending = max_pending
        self.stream = stream if stream is not None else sys.stderr
        self.json = fmt == "json"
        self.pending: collections.deque | None = collections.deque() if buffered else None
        self.stamp = IsoStamps()
        self.wake: threading.Event | None = None  # the writer thread's, once it runs
        self.lock = threading.Lock()  # one writer at a time: lines keep their order
        self.dropped_total = 0  # lines dropped (counted where they are made)
        self.told = 0  # of them, how many the writer has said so (only it changes this)

    def _emit(self, name: str, msg: str, fields: dict) -> None:
        if self.json:
            record = {"time": utc_iso(time.time()), "level": name.lower(), "msg": msg}
            texts = {k: str(v) for k, v in fields.items()
                     if not (type(v) in (int, float, bool) or v is None)}
            secret = _secret_hint("|".join(texts.values()).lower())  # (one check, as below)
            record.update({k: (redact_secrets(texts[k]) if secret else texts[k])
                           if k in texts else v for k, v in fields.items()})
            self._write(json.dumps(record, ensure_ascii=False) + "\n", name)
            return
        texts = [v if type(v) is str else str(v) for v in fields.values()]
        joined = "|".join(texts)  # one check for the whole line: most need no escaping
        low = joined.lower()
        if _LOG_SPECIAL.search(joined) or _secret_hint(low):
            texts = [escape_log(redact_secrets(t)) for t in texts]
            texts = [json.dumps(t) if " " in t or '"' in t or "=" in t else t for t in texts]
        line = " ".join([self.stamp(time.time()), name, escape_log(msg)]
                        + [f"{k}={t}" if t else k + '=""' for k, t in zip(fields, texts)])
        self._write(line + "\n", name)

    def _write(self, line: str, name: str = "ERROR") -> None:
        pending = self.pending
        if pending is None:
            try:
                self.stream.write(line)
            except (OSError, ValueError):
                pass  # a closed or full log stream never fails a request
            return
        if len(pending) >= self.max_pending:
            self.dropped_total += 1
            return
        pending.append(line)
        if self.wake is None:
            self.wake = threading.Event()
            threading.Thread(target=self._run, name="tokenman-log", daemon=True).start()
        if name not in ("INFO", "DEBUG") or len(pending) >= 256:
            self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait(0.25)
            self.wake.clear()
            with self.lock:
                self._drain()

    def _drain(self) -> None:
        pending = self.pending
        lines = []
        while pending:
            lines.append(pending.popleft())
        dropped = self.dropped_total - self.told
        if dropped:  # (said here, in this thread: utc_iso, not the loop's stamp cache)
            self.told += dropped
            msg, now = "log lines dropped: the log was not read fast enough", utc_iso(time.time())
            lines.append(json.dumps({"time": now, "level": "warn", "msg": msg,
                                     "dropped": dropped}) + "\n" if self.json else
                         f"{now} WARN {escape_log(msg)} dropped={dropped}\n")
        if lines:
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def flush(self, timeout: float = 2.0) -> None:
        """Writes what is queued now (at stop and exit; the writer thread does it otherwise),
        waiting at most `timeout` for a write the thread has under way."""
        if self.pending is not None and self.lock.acquire(timeout=timeout):
            try:  # (taken even with nothing queued: the thread may be writing lines it took)
                self._drain()
            finally:
                self.lock.release()

    def debug(self, msg: str, **fields: object) -> None:
        if self.level <= 10:
            self._emit("DEBUG", msg, fields)

    def info(self, msg: str, **fields: object) -> None:
        if self.level <= 20:
            self._emit("INFO", msg, fields)

    def warn(self, msg: str, **fields: object) -> None:
        if self.level <= 30:
            self._emit("WARN", msg, fields)

    def error(self, msg: str, **fields: object) -> None:
        if self.level <= 40:
            self._emit("ERROR", msg, fields)

# ================================================================================================
# §04 config: frozen dataclasses; TOML file -> built-in defaults -> TOKENMAN_* env -> validation
# ================================================================================================
# Each field carries its kind (how a TOML or environment value is coerced) and a one-line doc,
# which `init-config` writes next to every key, so the example file and the code cannot drift.


def _f(default: object, doc: str, kind: str = "") -> dataclasses.Field:
    kind = kind or {bool: "bool", int: "int", float: "float", str: "str", tuple: "list",
                    dict: "map"}[type(default)]
    if isinstance(default, (tuple, dict)):
        frozen = default if isinstance(default, tuple) else types.MappingProxyType(default)
        return dataclasses.field(default_factory=lambda: frozen,
                                 metadata={"kind": kind, "doc": doc})
    return dataclasses.field(default=default, metadata={"kind": kind, "doc": doc})


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    bind_address: str = _f("127.0.0.1", "address both servers listen on (0.0.0.0 in containers)")
    proxy_port: int = _f(7677, "port of the LLM API proxy")
    dashboard_port: int = _f(7678, "port of the dashboard (must differ from proxy_port)")
    log_level: str = _f("info", "trace, debug, info, warn, error or fatal")
    log_format: str = _f("text", "text (key=value lines) or json (one object per line)")
    data_dir: str = _f("~/.tokenman", "directory of the request log database (created 0700)")
    tls_enabled: bool = _f(False, "serve HTTPS with cert_file and key_file")
    cert_file: str = _f("", "PEM certificate chain, when tls_enabled")
    key_file: str = _f("", "PEM private key, when tls_enabled")
    read_timeout: float = _f(10.0, "seconds a client may take to send a request head and body "
                                   "(plus a second per 64 KiB of a declared body)",
                             "duration")
    idle_timeout: float = _f(120.0, "seconds an idle keep-alive client connection is kept",
                             "duration")
    write_timeout: float = _f(60.0, "seconds a client may stall reading a response", "duration")
    stream_timeout: float = _f(600.0, "longest total duration of one streamed response (0 = none)",
                               "duration")
    shutdown_timeout: float = _f(30.0, "seconds in-flight requests get to finish on stop",
                                 "duration")
    max_body_size: int = _f(10 * 1024 * 1024, "largest request body in bytes (413 past it)",
                            "size")
    max_response_size: int = _f(100 * 1024 * 1024,
                                "largest non-streamed upstream response in bytes (502 past it)",
                                "size")
    store_body: bool = _f(False, "keep request and response bodies (up to 1 MiB) in the log")
    allowed_hosts: tuple = _f((), "Host names accepted besides loopback ones while listening on "
                                  "loopback (a guard against DNS rebinding; \"*\" = any)")
    allowed_origins: tuple = _f((), "web pages (Origin) that may call the proxy besides loopback"
                                    " ones (\"*\" = any)")


@dataclasses.dataclass(frozen=True)
class ProviderConfig:
    name: str = _f("", "display name (defaults to the table key)")
    format: str = _f("", "API format: anthropic or openai (inferred from the key when empty)")
    api_base: str = _f("", "base URL, e.g. https://api.anthropic.com")
    key_ref: str = _f("", "env:VAR, file:///path or keyring://tokenman/<provider>; empty = "
                          "passthrough of the client's own key")
    models: tuple = _f((), "model ids served here (exact, or with * wildcards); empty = any")
    enabled: bool = _f(True, "false removes the provider from routing")
    priority: int = _f(0, "lower is preferred when several providers serve a model")
    timeout: float = _f(600.0, "seconds to wait for the response head, and for a whole "
                                "non-streamed body", "duration")
    connect_timeout: float = _f(10.0, "TCP + TLS connect timeout in seconds", "duration")
    ca_file: str = _f("", "extra PEM CA bundle for this provider's TLS (private gateways)")
    max_output_tokens: int = _f(0, "cap on the output tokens a request sent here may ask for "
                                   "(0 = none): a larger max_tokens is lowered to it, e.g. "
                                   "16384 for gpt-4o behind Claude Code's 32000")


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    default_provider: str = _f("", "provider for models no provider lists (empty = the first "
                                   "provider of the request's format with an empty models list)")
    model_map: dict = _f({}, "model id -> provider key, or provider:model to also rename the "
                             "model (e.g. \"local:llama-3-70b\"); checked first")
    fallback_enabled: bool = _f(True, "try the next eligible provider when one is open or "
                                      "exhausted (before any byte reaches the client)")
    cross_format_fallback: bool = _f(False, "let fallback continue to providers of the other "
                                            "API format (requests and answers are translated)")
    fallback_models: dict = _f({}, "model id -> alternate models to try after its own "
                                    "providers, e.g. {\"claude-sonnet-4-5\" = "
                                    "[\"claude-haiku-4-5\"]}", "maplist")
    share_client_keys: bool = _f(False, "let a fallback send a client's own key (passthrough) "
                                        "to a provider on another host than the one its "
                                        "request was routed to")


@dataclasses.dataclass(frozen=True)
class ResilienceConfig:
    retry_enabled: bool = _f(True, "retry failed upstream attempts")
    retry_max_attempts: int = _f(3, "attempts per provider, the first one included")
    retry_base_delay_ms: int = _f(500, "backoff base: a retry waits random(0, base * 2^n)")
    retry_max_delay_ms: int = _f(30000, "cap on any wait, an upstream Retry-After included")
    retry_on_timeout: bool = _f(False, "also retry read timeouts (the provider may already be "
                                       "generating and billing)")
    circuit_breaker_enabled: bool = _f(True, "stop calling a provider after repeated failures")
    cb_failure_threshold: int = _f(5, "consecutive failures (5xx, 429, 529, timeouts, connect "
                                      "errors) that open the breaker")
    cb_reset_timeout_seconds: float = _f(60.0, "seconds open before probing again", "duration")
    cb_half_open_max_calls: int = _f(1, "concurrent probes when half-open; that many successes "
                                        "close it")
    stream_idle_timeout: float = _f(300.0, "seconds a stream may go without a byte from the "
                                           "provider", "duration")


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    enabled: bool = _f(False, "require a bearer token on the proxy (except /health) and the "
                              "dashboard (except /api/health)")
    token: str = _f("", "the token, or env:VAR / file:///path to read it from")
    protect_metrics: bool = _f(True, "also require it for /metrics")


@dataclasses.dataclass(frozen=True)
class DashboardConfig:
    enabled: bool = _f(True, "serve the dashboard, JSON API and /metrics on dashboard_port")
    bind_address: str = _f("", "address the dashboard listens on (empty = server.bind_address):"
                               " a sidecar keeps the proxy on loopback and lets Prometheus in")
    allowed_origins: tuple = _f(("http://localhost:7678", "http://127.0.0.1:7678"),
                                "origins allowed by CORS (\"*\" = any)")


@dataclasses.dataclass(frozen=True)
class TracingConfig:
    enabled: bool = _f(False, "record spans and export them")
    exporter: str = _f("otlp-http", "otlp-http (OTLP/HTTP, JSON encoding) or stdout; gRPC is "
                                    "not supported")
    endpoint: str = _f("http://localhost:4318/v1/traces", "the collector's OTLP/HTTP URL")
    service_name: str = _f("tokenman", "service.name of the spans")
    sample_rate: float = _f(1.0, "share of requests traced when the client sent no traceparent")


@dataclasses.dataclass(frozen=True)
class PluginsConfig:
    enabled: bool = _f(False, "load plugins (Python files that add pipeline stages or hooks)")
    paths: tuple = _f((), "plugin files, or directories whose *.py files are plugins")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    retention_days: int = _f(30, "request log rows older than this are pruned hourly "
                                 "(0 = keep forever)")


STAGE_NAMES = ("cache", "heartbeat", "injection", "pii", "budget", "ratelimit", "summarization",
               "history", "rules", "cache_hints")  # §13 registers each


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    order: tuple = _f(STAGE_NAMES, "stages in request order (answers pass them in reverse); "
                                   "each also has its own enabled switch")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    enabled: bool = _f(True, "answer repeated deterministic requests from the response cache")
    ttl_seconds: float = _f(300.0, "how long an answer stays cached", "duration")
    max_entries: int = _f(1000, "answers kept in memory (least recently used go first)")
    max_rows: int = _f(10000, "answers kept in the database")
    max_entry_bytes: int = _f(1024 * 1024, "larger answers are not cached", "size")
    sampled: bool = _f(False, "also cache requests without temperature = 0")
    tool_use: bool = _f(False, "also cache answers that call tools")


@dataclasses.dataclass(frozen=True)
class CacheHintsConfig:
    enabled: bool = _f(True, "add Anthropic prompt-cache breakpoints to requests that set none")
    ttl: str = _f("5m", "lifetime of added breakpoints: 5m or 1h")


@dataclasses.dataclass(frozen=True)
class RulesConfig:
    enabled: bool = _f(False, "lossless compression of prompt text outside code blocks")
    collapse_whitespace: bool = _f(True, "runs of blank lines become one (nothing inside a line, "
                                         "at its end or in a fence changes)")
    minify_json: bool = _f(True, "text parts that are a whole JSON document lose the blanks "
                                 "between tokens (every key, string and number kept as written)")
    tool_results: bool = _f(False, "also compact tool results that are a whole JSON document "
                                   "(an agent that edits a file by exact match after reading it "
                                   "as JSON would miss: leave off for coding agents)")


@dataclasses.dataclass(frozen=True)
class HistoryConfig:
    enabled: bool = _f(False, "drop older turns (changes what the model sees: opt in)")
    window_size: int = _f(10, "most recent user turns kept")
    truncate_tool_results: int = _f(0, "cut tool results longer than this many characters to "
                                       "head and tail (0 = never)")


@dataclasses.dataclass(frozen=True)
class SummarizationConfig:
    enabled: bool = _f(False, "summarise older turns of long conversations with a second model")
    provider: str = _f("", "provider key that serves the summaries (empty = the request's own)")
    model: str = _f("claude-haiku-4-5", "model that writes the summaries")
    max_tokens: int = _f(1024, "longest summary")
    threshold_messages: int = _f(40, "conversations with more messages are summarised")
    keep_last: int = _f(10, "most recent user turns always sent as they are")


@dataclasses.dataclass(frozen=True)
class HeartbeatConfig:
    enabled: bool = _f(False, "answer identical requests within the window with the previous "
                              "answer, even sampled ones (X-Tokenman-Heartbeat: HIT)")
    window_seconds: float = _f(30.0, "how long an answer is reused", "duration")


PII_TYPES = ("email", "phone", "ssn", "credit_card", "api_key", "file_path")
PII_ACTIONS = ("redact", "hash", "log", "block")
INJECTION_ACTIONS = ("log", "warn", "sanitize", "block")


@dataclasses.dataclass(frozen=True)
class PIIConfig:
    enabled: bool = _f(True, "detect personal data and secrets in every text field")
    action: str = _f("redact", "redact (placeholders, restored in answers), hash, log or block")
    allow_list: tuple = _f((), "exact values never treated as PII")
    types: tuple = _f(PII_TYPES, "detectors to run")
    hash_key_ref: str = _f("", "the secret that keys hash digests and placeholder numbers "
                               "(env:, file:// or keyring:// ref, 16+ characters; share one "
                               "across replicas); empty: one made at first start, kept in "
                               "the data dir (pii.key)")


@dataclasses.dataclass(frozen=True)
class InjectionConfig:
    enabled: bool = _f(True, "detect prompt-injection patterns in user messages and tool "
                             "results")
    action: str = _f("log", "log, warn (response header), sanitize or block")


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    enabled: bool = _f(False, "enforce spend limits (USD)")
    hourly_limit: float = _f(0.0, "USD per clock hour, all projects (0 = none)")
    daily_limit: float = _f(0.0, "USD per UTC day, all projects (0 = none)")
    monthly_limit: float = _f(0.0, "USD per UTC month, all projects (0 = none)")
    alert_thresholds: tuple = _f((50.0, 75.0, 90.0), "percent of a limit that logs an alert",
                                 "floats")
    default_max_tokens: int = _f(4096, "output tokens reserved when a request sets no max")
    projects: dict = _f({}, "per project limits: {\"team-a\" = {daily_limit = 5.0}}", "limits")


@dataclasses.dataclass(frozen=True)
class RateLimitConfig:
    enabled: bool = _f(False, "enforce request and token rates")
    default_rate: float = _f(10.0, "requests per second per provider")
    default_burst: int = _f(20, "requests allowed at once above the rate")
    tokens_per_minute: int = _f(0, "input+output tokens per minute per provider (0 = none)")
    per_project: bool = _f(False, "separate buckets for each project")
    provider_limits: dict = _f({}, "per provider: {openai = {rate = 5.0, burst = 10, "
                                   "tokens_per_minute = 100000}}", "limits")


BUILTIN_PROVIDERS = types.MappingProxyType({
    "anthropic": {"api_base": "https://api.anthropic.com", "format": API_ANTHROPIC,
                  "name": "anthropic", "priority": 1},
    "openai": {"api_base": "https://api.openai.com", "format": API_OPENAI, "name": "openai",
               "priority": 2},
})
PRICE_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read",
                "audio_input", "audio_output")
# (TOML path, Config attribute, class) of every plain section
SECTIONS = (("server", "server", ServerConfig), ("routing", "routing", RoutingConfig),
            ("resilience", "resilience", ResilienceConfig), ("pipeline", "pipeline",
                                                             PipelineConfig),
            ("cache", "cache", CacheConfig), ("security.pii", "pii", PIIConfig),
            ("compression.cache_hints", "cache_hints", CacheHintsConfig),
            ("compression.rules", "rules", RulesConfig),
            ("compression.history", "history", HistoryConfig),
            ("compression.summarization", "summarization", SummarizationConfig),
            ("compression.heartbeat", "heartbeat", HeartbeatConfig),
            ("security.injection", "injection", InjectionConfig),
            ("security.budget", "budget", BudgetConfig),
            ("security.rate_limit", "rate_limit", RateLimitConfig),
            ("auth", "auth", AuthConfig), ("dashboard", "dashboard", DashboardConfig),
            ("tracing", "tracing", TracingConfig), ("plugins", "plugins", PluginsConfig),
            ("metrics", "metrics", MetricsConfig))
_OPENAI_HINTS = ("openai", "azure", "vllm", "ollama", "openrouter", "groq", "together",
                 "deepseek", "mistral", "lmstudio", "llamacpp", "litellm")


@dataclasses.dataclass(frozen=True)
class Config:
    """One validated, immutable configuration snapshot, passed explicitly everywhere."""
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    providers: types.MappingProxyType = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    routing: RoutingConfig = dataclasses.field(default_factory=RoutingConfig)
    resilience: ResilienceConfig = dataclasses.field(default_factory=ResilienceConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    pii: PIIConfig = dataclasses.field(default_factory=PIIConfig)
    cache_hints: CacheHintsConfig = dataclasses.field(default_factory=CacheHintsConfig)
    rules: RulesConfig = dataclasses.field(default_factory=RulesConfig)
    history: HistoryConfig = dataclasses.field(default_factory=HistoryConfig)
    summarization: SummarizationConfig = dataclasses.field(default_factory=SummarizationConfig)
    heartbeat: HeartbeatConfig = dataclasses.field(default_factory=HeartbeatConfig)
    injection: InjectionConfig = dataclasses.field(default_factory=InjectionConfig)
    budget: BudgetConfig = dataclasses.field(default_factory=BudgetConfig)
    rate_limit: RateLimitConfig = dataclasses.field(default_factory=RateLimitConfig)
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)
    dashboard: DashboardConfig = dataclasses.field(default_factory=DashboardConfig)
    tracing: TracingConfig = dataclasses.field(default_factory=TracingConfig)
    plugins: PluginsConfig = dataclasses.field(default_factory=PluginsConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    pricing: types.MappingProxyType = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    source: str = ""
    warnings: tuple = ()

    @property
    def data_dir(self) -> str:
        return os.path.expanduser(self.server.data_dir)


def _coerce(kind: str, value: object, from_env: bool) -> object:
    """A TOML (or, with from_env, an environment string) value converted to the field's kind."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if from_env and str(value).strip().lower() in ("1", "true", "yes", "on"):
            return True
        if from_env and str(value).strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if kind == "int":
        if from_env and isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected an integer, got {value!r}")
    if kind == "float":
        if from_env and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and abs(value) < float("inf"):  # (nan fails this too)
            return float(value)
        raise ValueError(f"expected a finite number, got {value!r}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}")
    if kind == "list":
        if from_env and isinstance(value, str):
            return tuple(s.strip() for s in value.split(",") if s.strip())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f"expected a list of strings, got {value!r}")
    if kind == "map":
        if from_env and isinstance(value, str):
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if all(len(p) == 2 for p in pairs):
                return types.MappingProxyType({k.strip(): v.strip() for k, v in pairs})
        elif isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            return types.MappingProxyType(dict(value))
        raise ValueError(f"expected a table of strings, got {value!r}")
    if kind == "maplist":
        if from_env and isinstance(value, str):  # "a=b|c,d=e"
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if all(len(p) == 2 for p in pairs):
                return types.MappingProxyType({k.strip(): tuple(s.strip() for s in v.split("|")
                                                                if s.strip()) for k, v in pairs})
        elif isinstance(value, dict) and all(isinstance(v, list) and all(isinstance(s, str)
                                                                         for s in v)
                                             for v in value.values()):
            return types.MappingProxyType({k: tuple(v) for k, v in value.items()})
        raise ValueError(f"expected a table of string lists, got {value!r}")
    if kind == "floats":
        items = value.split(",") if from_env and isinstance(value, str) else value
        if isinstance(items, list):
            try:
                return tuple(float(v) for v in items if not isinstance(v, bool))
            except (TypeError, ValueError):
                pass
        raise ValueError(f"expected a list of numbers, got {value!r}")
    if kind == "limits":  # {name = {key = number, ...}, ...}
        if isinstance(value, dict) and all(
                isinstance(t, dict) and all(isinstance(n, (int, float)) and not isinstance(
                    n, bool) and n >= 0 for n in t.values()) for t in value.values()):
            return types.MappingProxyType({k: types.MappingProxyType(
                {n: float(v) for n, v in t.items()}) for k, t in value.items()})
        raise ValueError("expected tables of numbers >= 0, e.g. {name = {rate = 5.0}}")
    if kind == "duration":
        return parse_duration(value)
    if kind == "size":
        return parse_size(value)
    raise AssertionError(kind)


def _env_name(*parts: str) -> str:
    return "TOKENMAN_" + "_".join(re.sub(r"[^A-Za-z0-9]", "_", p).upper() for p in parts)


def _build_section(cls: type, path: str, raw: object, env: dict, errors: list[str],
                   warnings: list[str], env_parts: tuple[str, ...],
                   base: dict | None = None) -> object:
    """One frozen section: defaults, then the file's table, then environment overrides."""
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table")
        raw = {}
    values = dict(base or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            warnings.append(f"{path}.{key}: unknown key, ignored")
    for name, field in known.items():
        kind = field.metadata["kind"]
        if name in raw:
            try:
                values[name] = _coerce(kind, raw[name], from_env=False)
            except ValueError as exc:
                errors.append(f"{path}.{name}: {exc}")
        env_key = _env_name(*env_parts, name)
        if env_key in env:
            try:
                values[name] = _coerce(kind, env[env_key], from_env=True)
            except ValueError as exc:
                errors.append(f"{env_key}: {exc}")
    return cls(**values)


def find_config_file(explicit: str | None, env: dict) -> str:
    """The config file to read: explicit path, $TOKENMAN_CONFIG, ~/.tokenman/tokenman.toml,
    ./tokenman.toml; "" when there is none (built-in defaults)."""
    if explicit:
        return explicit
    if env.get("TOKENMAN_CONFIG"):
        return env["TOKENMAN_CONFIG"]
    for candidate in (os.path.expanduser("~/.tokenman/tokenman.toml"), "tokenman.toml"):
        if os.path.isfile(candidate):
            return candidate
    return ""


def load_config(path: str | None = None, env: dict | None = None) -> Config:
    """Reads, merges and validates the configuration; raises ConfigError with every problem."""
    env = dict(os.environ if env is None else env)
    source = find_config_file(path, env)
    raw: dict = {}
    if source:
        try:
            with open(source, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"{source}: no such file"]) from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([f"{source}: {exc}"]) from None
    return config_from_dict(raw, env, source)


def config_from_dict(raw: dict, env: dict, source: str = "") -> Config:
    errors: list[str] = []
    warnings: list[str] = []
    known = {path.split(".")[0] for path, _, _ in SECTIONS} | {"providers", "pricing"}
    for key in raw:
        if key not in known:
            warnings.append(f"[{key}]: unknown section, ignored")
    for group in ("security", "compression"):
        table = raw.get(group, {})
        for key in table if isinstance(table, dict) else ():
            if f"{group}.{key}" not in {path for path, _, _ in SECTIONS}:
                warnings.append(f"[{group}.{key}]: unknown section, ignored")
    sections = {}
    for path, attr, cls in SECTIONS:
        table = raw
        for part in path.split("."):
            table = table.get(part, {}) if isinstance(table, dict) else {}
        sections[attr] = _build_section(cls, path, table, env, errors, warnings,
                                        tuple(path.split(".")))
    providers = _build_providers(raw.get("providers"), env, errors, warnings)
    pricing = _build_pricing(raw.get("pricing", {}), errors)
    cfg = Config(providers=providers, pricing=pricing, source=source, **sections)
    warnings += _unknown_env(env, providers)
    errors.extend(validate_config(cfg, env))
    if errors:  # the warnings too: a misspelt key may be why a value is wrong
        raise ConfigError(errors + [f"{w} (warning)" for w in warnings])
    return dataclasses.replace(
        cfg, warnings=tuple(warnings),
        server=dataclasses.replace(cfg.server, log_level=cfg.server.log_level.lower()
                                   .replace("warning", "warn")),
        pii=dataclasses.replace(cfg.pii, action=cfg.pii.action.lower(),
                                types=tuple(t.lower() for t in cfg.pii.types)),
        injection=dataclasses.replace(cfg.injection, action=cfg.injection.action.lower()))


_ENV_NOT_SETTINGS = ("TOKENMAN_CONFIG", "TOKENMAN_REEXEC", "TOKENMAN_SOAK", "TOKENMAN_PORT",
                     "TOKENMAN_NAME")
# keyring fallbacks, and what Kubernetes (a Service named tokenman) and Docker links inject
_ENV_NOT_SETTING_PREFIXES = ("TOKENMAN_KEY_", "TOKENMAN_SERVICE_", "TOKENMAN_PORT_",
                             "TOKENMAN_ENV_")


def _unknown_env(env: dict, providers: types.MappingProxyType) -> list[str]:
    """TOKENMAN_* variables that name no setting (TOKENMAN_SERVER_PROXYPORT): said, not
    silently ignored."""
    names = {_env_name(*path.split("."), f.name) for path, _, cls in SECTIONS
             for f in dataclasses.fields(cls)}
    names |= {_env_name("providers", key, f.name) for key in providers
              for f in dataclasses.fields(ProviderConfig)}
    return [f"{name}: not a setting tokenman knows (environment), ignored"
            for name in sorted(env) if name.startswith("TOKENMAN_") and name not in names
            and name not in _ENV_NOT_SETTINGS and not name.startswith(_ENV_NOT_SETTING_PREFIXES)]


def _build_providers(raw: object, env: dict, errors: list[str],
                     warnings: list[str]) -> types.MappingProxyType:
    tables = raw if isinstance(raw, dict) and raw else dict(BUILTIN_PROVIDERS)
    if raw is not None and not isinstance(raw, dict):
        errors.append("providers: expected a table of provider tables")
    out = {}
    for key, table in tables.items():
        base = dict(BUILTIN_PROVIDERS.get(key, {}))
        base.setdefault("name", key)
        lowered = key.lower()
        if "anthropic" in lowered or "claude" in lowered:
            base.setdefault("format", API_ANTHROPIC)
        elif any(hint in lowered for hint in _OPENAI_HINTS):
            base.setdefault("format", API_OPENAI)
        prov = _build_section(ProviderConfig, f"providers.{key}", table, env, errors, warnings,
                              ("providers", key), base)
        out[key] = dataclasses.replace(prov, format=prov.format.lower())
    return types.MappingProxyType(out)


def _build_pricing(raw: object, errors: list[str]) -> types.MappingProxyType:
    out = {}
    if not isinstance(raw, dict):
        errors.append("pricing: expected a table of model tables")
        return types.MappingProxyType(out)
    for model, table in raw.items():
        if not isinstance(table, dict):
            errors.append(f"pricing.{model}: expected a table")
            continue
        entry = {}
        for key, value in table.items():
            if key not in PRICE_FIELDS:
                errors.append(f"pricing.{model}.{key}: unknown price field "
                              f"(use {', '.join(PRICE_FIELDS)})")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                errors.append(f"pricing.{model}.{key}: expected a number >= 0 (USD per million)")
            else:
                entry[key] = float(value)
        if "input" not in entry or "output" not in entry:
            errors.append(f"pricing.{model}: input and output prices are required")
        out[model] = types.MappingProxyType(entry)
    return types.MappingProxyType(out)


def validate_config(cfg: Config, env: dict | None = None) -> list[str]:
    """Every semantic problem of an assembled config (types were checked while coercing)."""
    errs: list[str] = []
    s = cfg.server
    for name in ("proxy_port", "dashboard_port"):
        if not 0 <= getattr(s, name) <= 65535:
            errs.append(f"server.{name}: must be between 1 and 65535 (0 = any free port)")
    if s.proxy_port == s.dashboard_port and s.proxy_port:
        errs.append("server.dashboard_port: must differ from server.proxy_port")
    if s.log_level.lower() not in LOG_LEVELS:
        errs.append(f"server.log_level: must be one of trace, debug, info, warn, error, fatal "
                    f"(got {s.log_level!r})")
    if s.log_format not in ("text", "json"):
        errs.append("server.log_format: must be text or json")
    if not s.data_dir.strip():
        errs.append("server.data_dir: must not be empty")
    if s.tls_enabled and not (s.cert_file and s.key_file):
        errs.append("server.tls_enabled: cert_file and key_file are required")
    for name in ("read_timeout", "idle_timeout", "write_timeout", "stream_timeout",
                 "shutdown_timeout", "max_body_size", "max_response_size"):
        if getattr(s, name) < 0:
            errs.append(f"server.{name}: must be >= 0")
    for key, p in cfg.providers.items():
        where = f"providers.{key}"
        if p.format not in API_FORMATS:
            errs.append(f"{where}.format: must be anthropic or openai (got {p.format!r}; it "
                        f"cannot be inferred from the name {key!r})")
        url = urllib.parse.urlsplit(p.api_base)
        if "@" in url.netloc:  # (never used to sign in, and shown by the dashboard, the spans)
            errs.append(f"{where}.api_base: must not carry a user name or password (they are "
                        "never sent: put the provider's key in key_ref)")
        elif url.scheme not in ("http", "https") or not url.hostname:
            errs.append(f"{where}.api_base: must be an http:// or https:// URL "
                        f"(got {p.api_base!r})")
        if p.key_ref and not p.key_ref.startswith(("env:", "file://", "keyring://")):
            scheme, colon, _ = p.key_ref.partition(":")  # (never the value: it may be the
            shown = f"{scheme!r}:..." if colon and scheme.isalpha() and len(scheme) <= 10 \
                else f"a value of {len(p.key_ref)} characters"  # key itself, pasted in)
            errs.append(f"{where}.key_ref: must be env:VAR, file:///path, "
                        f"keyring://tokenman/<provider> or empty (passthrough), never the key "
                        f"itself; got {shown}")
        if p.priority < 0:
            errs.append(f"{where}.priority: must be >= 0")
        if p.timeout <= 0 or p.connect_timeout <= 0:
            errs.append(f"{where}: timeout and connect_timeout must be > 0")
        if p.max_output_tokens < 0:
            errs.append(f"{where}: max_output_tokens must be >= 0 (0 = no cap)")
    r = cfg.routing
    if r.default_provider and r.default_provider not in cfg.providers:
        errs.append(f"routing.default_provider: {r.default_provider!r} is not a configured "
                    f"provider")
    for model, target in r.model_map.items():
        if target.split(":", 1)[0] not in cfg.providers:
            errs.append(f"routing.model_map.{model}: {target!r} is not a configured provider")
    res = cfg.resilience
    for name in ("retry_max_attempts", "cb_failure_threshold", "cb_half_open_max_calls"):
        if getattr(res, name) < 1:
            errs.append(f"resilience.{name}: must be >= 1")
    for name in ("retry_base_delay_ms", "retry_max_delay_ms"):
        if getattr(res, name) < 0:
            errs.append(f"resilience.{name}: must be >= 0")
    if res.cb_reset_timeout_seconds <= 0 or res.stream_idle_timeout <= 0:
        errs.append("resilience: cb_reset_timeout_seconds and stream_idle_timeout must be > 0")
    from_order = set(cfg.pipeline.order) - set(STAGE_NAMES)
    if from_order and not cfg.plugins.enabled:  # plugin stages are known once loaded
        errs.append(f"pipeline.order: unknown stage(s) {', '.join(sorted(from_order))} "
                    f"(known: {', '.join(STAGE_NAMES)})")
    if cfg.pii.action.lower() not in PII_ACTIONS:
        errs.append(f"security.pii.action: must be one of {', '.join(PII_ACTIONS)}")
    unknown = {t.lower() for t in cfg.pii.types} - set(PII_TYPES)
    if unknown:
        errs.append(f"security.pii.types: unknown {', '.join(sorted(unknown))} "
                    f"(known: {', '.join(PII_TYPES)})")
    if cfg.injection.action.lower() not in INJECTION_ACTIONS:
        errs.append(f"security.injection.action: must be one of {', '.join(INJECTION_ACTIONS)}")
    b = cfg.budget
    for name in ("hourly_limit", "daily_limit", "monthly_limit"):
        if getattr(b, name) < 0:
            errs.append(f"security.budget.{name}: must be >= 0")
    if any(not 0 < t <= 100 for t in b.alert_thresholds):
        errs.append("security.budget.alert_thresholds: each must be in (0, 100]")
    for project, limits in b.projects.items():
        bad = set(limits) - {"hourly_limit", "daily_limit", "monthly_limit"}
        if bad:
            errs.append(f"security.budget.projects.{project}: unknown {', '.join(sorted(bad))}")
        spelled = project_name(project.encode("utf-8", "replace").decode("latin-1"))
        if spelled != project:  # (a request's project is never spelled so: never limited)
            errs.append(f"security.budget.projects.{project!r}: no request's project can be "
                        f"named so (letters, digits and ._:/@- only, at most 64): "
                        f"X-Tokenman-Project: {project} is project {spelled!r}")
    rl = cfg.rate_limit
    if rl.enabled and (rl.default_rate <= 0 or rl.default_burst < 1):
        errs.append("security.rate_limit: default_rate must be > 0 and default_burst >= 1")
    for name, limits in rl.provider_limits.items():
        bad = set(limits) - {"rate", "burst", "tokens_per_minute"}
        if bad:
            errs.append(f"security.rate_limit.provider_limits.{name}: unknown "
                        f"{', '.join(sorted(bad))}")
        if rl.enabled and (limits.get("rate", 1) <= 0 or limits.get("burst", 1) < 1):
            errs.append(f"security.rate_limit.provider_limits.{name}: rate must be > 0 and "
                        f"burst >= 1")
    if cfg.auth.enabled and not cfg.auth.token:
        errs.append("auth.token: required when auth.enabled")
    elif cfg.auth.token == "****":
        errs.append("auth.token: \"****\" is the mask config-export writes, not a token: put the "
                    "token (or env:VAR / file:///path) back, or export with --with-secrets")
    elif cfg.auth.enabled and cfg.auth.token.startswith(("env:", "file://")):
        try:
            resolve_key(cfg.auth.token, os.environ if env is None else env)
        except ValueError as exc:
            errs.append(f"auth.token: {exc}")
    tr = cfg.tracing
    if tr.exporter not in ("otlp-http", "stdout"):
        errs.append(f"tracing.exporter: must be otlp-http or stdout (got {tr.exporter!r}; "
                    f"otlp-grpc is not supported)")
    if not 0 <= tr.sample_rate <= 1:
        errs.append("tracing.sample_rate: must be between 0 and 1")
    if tr.enabled and tr.exporter == "otlp-http" and not tr.endpoint.startswith(
            ("http://", "https://")):
        errs.append("tracing.endpoint: must be an http:// or https:// URL")
    if cfg.cache_hints.ttl not in ("5m", "1h"):
        errs.append("compression.cache_hints.ttl: must be 5m or 1h")
    sm = cfg.summarization
    if sm.provider and sm.provider not in cfg.providers:
        errs.append(f"compression.summarization.provider: {sm.provider!r} is not configured")
    if sm.keep_last < 1 or sm.threshold_messages < 2 or sm.max_tokens < 1:
        errs.append("compression.summarization: keep_last >= 1, threshold_messages >= 2, "
                    "max_tokens >= 1")
    if cfg.history.window_size < 1 or cfg.history.truncate_tool_results < 0:
        errs.append("compression.history: window_size must be >= 1, truncate_tool_results >= 0")
    if cfg.cache.max_entries < 0 or cfg.cache.max_rows < 0:
        errs.append("cache: max_entries and max_rows must be >= 0")
    if cfg.metrics.retention_days < 0:
        errs.append("metrics.retention_days: must be >= 0")
    return errs


def is_own_token(authorization: bytes, token: str) -> bool:
    """An Authorization value that carries tokenman's own auth token (never sent upstream)."""
    return bool(token) and authorization[7:].strip() == token.encode()


def resolve_key(key_ref: str, env: dict) -> str:
    """The provider key a key_ref names ("" = passthrough). Raises ValueError when unresolvable."""
    if not key_ref:
        return ""
    if key_ref.startswith("env:"):
        value = env.get(key_ref[4:], "").strip()
        if not value:
            raise ValueError(f"environment variable {key_ref[4:]} is not set")
        return value
    if key_ref.startswith("keyring://"):
        service, _, provider = key_ref[10:].partition("/")
        if service != "tokenman" or not provider:
            raise ValueError("keyring refs look like keyring://tokenman/<provider>")
        return keyring_get(provider, env)
    if key_ref.startswith("file://"):
        path = urllib.parse.unquote(key_ref[7:])
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read key file {path}: {exc.strerror}") from None
        if not value:
            raise ValueError(f"key file {path} is empty")
        return value
    raise ValueError("unsupported key_ref format")


def keyring_tool() -> list[str] | None:
    """The OS keyring command of this machine: secret-tool (Linux) or security (macOS)."""
    import shutil
    if shutil.which("secret-tool"):
        return ["secret-tool"]
    if shutil.which("security"):
        return ["security"]
    return None


def keyring_get(provider: str, env: dict) -> str:
    """A provider key from the OS keyring (service "tokenman", account = provider), else from
    TOKENMAN_KEY_<PROVIDER>."""
    import subprocess
    tool = keyring_tool()
    if tool is not None:
        argv = (tool + ["lookup", "service", "tokenman", "account", provider]
                if tool[0] == "secret-tool" else
                tool + ["find-generic-password", "-s", "tokenman", "-a", provider, "-w"])
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    fallback = env.get(_env_name("KEY", provider), "").strip()
    if fallback:
        return fallback
    where = f"the {tool[0]} keyring" if tool else "no OS keyring tool (secret-tool, security)"
    raise ValueError(f"no key for {provider}: not in {where}, and {_env_name('KEY', provider)} "
                     f"is not set")


def resolve_secret(value: str, env: dict) -> str:
    """A secret given literally or as env:VAR / file:///path."""
    return resolve_key(value, env) if value.startswith(("env:", "file://")) else value


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, types.MappingProxyType):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) \
            + "}"
    raise AssertionError(type(value))


def render_default_config() -> str:
    """The full default configuration as commented TOML (init-config, tokenman.example.toml)."""
    return render_config(config_from_dict({}, {}), "every key with its default.")


def render_config(cfg: Config, title: str, mask: bool = False) -> str:
    """A configuration as commented TOML; with mask, secret values become "****"."""
    lines = ["# tokenman configuration: " + title,
             "# Environment variables override the file: TOKENMAN_<SECTION>_<KEY>, e.g.",
             "# TOKENMAN_SERVER_PROXY_PORT=8080 or TOKENMAN_PROVIDERS_OPENAI_API_BASE=http://...",
             ""]

    def section(title: str, obj: object) -> None:
        lines.append(f"[{title}]")
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if mask and field.name in ("key_ref", "token") and value:
                value = "****"
            lines.append(f"# {field.metadata['doc']}")
            lines.append(f"{field.name} = {_toml_value(value)}")
        lines.append("")

    section("server", cfg.server)
    lines.append("# Providers. When the file names none, these two built-ins are used, in "
                 "passthrough mode.")
    lines.append("")
    for key, prov in cfg.providers.items():
        section(f"providers.{key}", prov)
    section("routing", cfg.routing)
    for path, attr, _ in SECTIONS[2:]:
        section(path, getattr(cfg, attr))
    for model, entry in cfg.pricing.items():
        lines.append(f"[pricing.{json.dumps(model)}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()] + [""]
    lines += ["# Prices in USD per million tokens override or extend the built-in table; the",
              "# longest matching model-id prefix wins, a prefix ending where the id's next",
              "# part begins (- @ : [ _ or the end). cache_* default to Anthropic's ratios",
              "# of the input price (1.25x, 2x, 0.1x).",
              '# [pricing."my-model"]',
              "# input = 1.0", "# output = 2.0", "# cache_write_5m = 1.25",
              "# cache_write_1h = 2.0", "# cache_read = 0.1",
              "# audio tokens (OpenAI audio models): without both, a call that reports them",
              "# costs null", "# audio_input = 40.0", "# audio_output = 80.0", ""]
    return "\n".join(lines)


# ================================================================================================
# §05 HTTP wire, sans-IO: heads, framing, chunk sizes, SSE events (bytes in, values out)
# ================================================================================================

_BAD_HEAD_BYTES = bytes(i for i in range(32) if i not in (9, 10, 13)) + b"\x7f"
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n")
_STATUS_RE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9]{2})(?: ([^\r\n]*))?")  # (RFC 9110 15)


class Headers:
    """Header fields in arrival order with their raw casing, plus a lowercase lookup.
    Repeated fields are combined with ", " (RFC 9110 5.3) in the lookup."""
    __slots__ = ("raw", "map", "repeated")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw
        self.map: dict[bytes, bytes] = {name.lower(): value for name, value in raw}
        self.repeated: set[bytes] | None = None
        if len(self.map) != len(raw):  # a repeated field: combine its values in order
            self.map = {}
            self.repeated = set()
            for name, value in raw:
                lower = name.lower()
                if lower in self.map:
                    self.map[lower] += b", " + value
                    self.repeated.add(lower)
                else:
                    self.map[lower] = value

    def get(self, lower: bytes, default: bytes | None = None) -> bytes | None:
        return self.map.get(lower, default)

    def text(self, lower: bytes, default: str = "") -> str:
        value = self.map.get(lower)
        return default if value is None else value.decode("latin-1")


def inflate_bits(coding: bytes, first: bytes) -> int:
    """zlib's wbits for a gzip or deflate body from its first two bytes: gzip (47: zlib also
    accepted, as some label it gzip); deflate is the zlib format (RFC 9110 8.4.1.2: a header
    whose low nibble is 8 and whose two bytes are a multiple of 31), though some send it raw."""
    if coding != b"deflate":
        return 47
    if len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0:
        return 15
    return -15


def decode_content(coding: bytes, body: bytes, limit: int) -> bytes:
    """A body sent with Content-Encoding gzip or deflate (RFC 9110 8.4), decoded within `limit`
    bytes (0: none). HTTPError 415 for another coding, 413 past the limit, 400 when broken."""
    import zlib  # (compressed request bodies are rare)
    codings = [c.strip().lower() for c in coding.split(b",")]
    for name in reversed([c for c in codings if c and c != b"identity"]):  # last applied first
        if name not in INFLATABLE:
            raise HTTPError(415, f"Content-Encoding {name.decode('latin-1')[:40]} is not "
                                 "supported: send gzip, deflate or identity")
        parts, size, rest = [], 0, body
        while True:  # (a gzip body may hold several members, one after the other: RFC 1952)
            if len(parts) == GZIP_MEMBERS_MAX:  # (each member copies the rest of the body:
                raise HTTPError(400, f"request body has more than {GZIP_MEMBERS_MAX} "  # a
                                     f"{name.decode()} members")  # million empty ones took
            inflater = zlib.decompressobj(inflate_bits(name, rest[:2]))  # a minute of CPU)
            try:
                parts.append(inflater.decompress(rest, limit + 1 - size if limit else 0))
            except zlib.error:
                raise HTTPError(400, f"request body is not valid {name.decode()} data") from None
            size += len(parts[-1])
            if limit and size > limit:
                raise HTTPError(413, f"request body too large once decoded: over the limit of "
                                     f"{limit:,} bytes (server.max_body_size)")
            if not inflater.eof:
                raise HTTPError(400, f"request body is cut short {name.decode()} data")
            rest = inflater.unused_data
            if not rest:
                break
            if rest[:2] != b"\x1f\x8b":  # (bytes after the data, not another member)
                raise HTTPError(400, f"request body has bytes after its {name.decode()} data")
        body = b"".join(parts)
    return body


class Request:
    """One parsed client request. The body is filled in once it has been read."""
    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "keep_alive",
                 "t0", "expect_continue")

    def __init__(self, method: str, target: str, version: int, headers: Headers) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = b""
        conn = headers.map.get(b"connection", b"").lower()
        self.keep_alive = (b"close" not in conn) if version == 1 else (b"keep-alive" in conn)
        self.expect_continue = version == 1 and \
            headers.map.get(b"expect", b"").lower() == b"100-continue"  # (HTTP/1.0: ignored)
        self.t0 = 0.0


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    """The start line and the header block (its fields, each ending in CRLF) of a head that
    ends with CRLF CRLF; bare CR, bare LF, NUL and other control characters are refused.
    (Byte-string methods throughout: each is one pass in C, several times faster than sre.)"""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        raise HTTPError(400, "malformed request head", close=True)
    if len(data.translate(None, _BAD_HEAD_BYTES)) != len(data):
        raise HTTPError(400, "control character in request head", close=True)
    end = data.find(b"\r\n")
    return data[:end], data[end + 2:-2]


def _parse_fields(block: bytes, limit: int) -> Headers:
    raw = []
    if block:
        lines = block[:-2].split(b"\r\n")
        if len(lines) > limit:
            raise HTTPError(431, "too many header fields", close=True)
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name.translate(None, TOKEN_BYTES):
                # includes obs-fold (leading SP/HTAB) and space before the colon
                raise HTTPError(400, "malformed header field", close=True)
            raw.append((name, value.strip(b" \t")))
    return Headers(raw)


def parse_request_head(data: bytes) -> Request:
    """A request head (through the blank line) as a Request; HTTPError on anything invalid."""
    data = data.lstrip(b"\r\n")  # RFC 9112 2.2: ignore empty lines before the request line
    line, block = _split_head(data)
    if len(line) > MAX_REQUEST_LINE:
        raise HTTPError(414, "request line too long", close=True)
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or parts[0].translate(None, TOKEN_BYTES) or not parts[1]:
        raise HTTPError(400, "malformed request line", close=True)
    method, target, version = parts
    if version == b"HTTP/1.1":
        ver = 1
    elif version == b"HTTP/1.0":
        ver = 0
    elif re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version):
        raise HTTPError(505, "HTTP version not supported", close=True)
    else:
        raise HTTPError(400, "malformed request line", close=True)
    headers = _parse_fields(block, MAX_HEADERS)
    try:
        target_s = target.decode("ascii")
    except UnicodeDecodeError:
        raise HTTPError(400, "non-ASCII request target", close=True) from None
    if target_s.startswith(("http://", "https://")):  # absolute-form (RFC 9112 3.2.2)
        try:
            split = urllib.parse.urlsplit(target_s)
        except ValueError:  # e.g. a broken [IPv6] authority
            raise HTTPError(400, "invalid request target", close=True) from None
        target_s = (split.path or "/") + ("?" + split.query if split.query else "")
    elif not target_s.startswith("/") and not (target_s == "*" and method == b"OPTIONS"):
        raise HTTPError(400, "invalid request target", close=True)
    if ver == 1 and (b"host" not in headers.map or (headers.repeated and b"host" in
                                                     headers.repeated)):
        raise HTTPError(400, "exactly one Host header is required", close=True)
    if ver == 0 and b"transfer-encoding" in headers.map:  # (RFC 9112 6.1: faulty framing)
        raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request", close=True)
    return Request(method.decode("ascii"), target_s, ver, headers)


def content_length(headers: Headers) -> int | None:
    """The declared body length; None when absent. Duplicates must agree (RFC 9110 8.6)."""
    value = headers.map.get(b"content-length")
    if value is None:
        return None
    if b"," in value:
        values = {v.strip(b" \t") for v in value.split(b",")}
        if len(values) != 1:
            raise HTTPError(400, "conflicting Content-Length", close=True)
        value = values.pop()
    only = value.strip(b" \t")
    if not (only.isdigit() and len(only) <= 19):  # (bytes.isdigit: ASCII digits only)
        raise HTTPError(400, "invalid Content-Length", close=True)
    return int(only)


def request_framing(headers: Headers) -> int | None:
    """The request body length, or None for chunked. Refuses ambiguous framing (smuggling)."""
    te = headers.map.get(b"transfer-encoding")
    if te is not None:
        if b"content-length" in headers.map:
            raise HTTPError(400, "both Transfer-Encoding and Content-Length", close=True)
        if te.strip(b" \t").lower() != b"chunked":
            raise HTTPError(501, "unsupported Transfer-Encoding", close=True)
        return None
    length = content_length(headers)
    return 0 if length is None else length


def parse_chunk_size(line: bytes) -> int:
    """The size from a chunk-size line (with CRLF); ValueError when it is not strict hex."""
    m = _CHUNK_SIZE_RE.fullmatch(line)
    if m is None:
        raise ValueError("invalid chunk size line")
    return int(m.group(1), 16)


class ResponseHead:
    """A parsed upstream status line and header fields."""
    __slots__ = ("status", "reason", "version", "headers")

    def __init__(self, status: int, reason: bytes, version: int, headers: Headers) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers


def parse_response_head(data: bytes) -> ResponseHead:
    """An upstream response head; UpstreamError on anything a strict client would refuse."""
    try:
        line, block = _split_head(data)
        m = _STATUS_RE.fullmatch(line)
        if m is None:
            raise HTTPError(502, "bad status line")
        headers = _parse_fields(block, MAX_HEADERS * 2)
    except HTTPError as exc:
        raise UpstreamError(f"malformed upstream response head: {exc.detail}") from None
    return ResponseHead(int(m.group(2)), m.group(3) or b"", int(m.group(1)), headers)


def response_framing(head: ResponseHead, method: str) -> tuple[str, int]:
    """How an upstream body is delimited: ("none"|"length"|"chunked"|"close", length)."""
    if method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
        return "none", 0
    te = head.headers.map.get(b"transfer-encoding")
    if te is not None:  # (chunked alone: a body in another transfer coding is not decoded)
        if te.strip(b" \t").lower() != b"chunked":
            raise UpstreamError("unsupported Transfer-Encoding from upstream: "
                                + te.decode("latin-1")[:60])
        return "chunked", 0
    try:
        length = content_length(head.headers)
    except HTTPError:
        raise UpstreamError("invalid Content-Length from upstream") from None
    if length is None:
        return "close", 0
    return ("length", length) if length else ("none", 0)


def render_head(status: int, headers: list[tuple[bytes, bytes]], reason: bytes = b"") -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, "").encode())]
    for name, value in headers:
        parts.append(name + b": " + value + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class RawPiece(bytes):
    """A piece of an SSE stream that is not a whole event (an oversized event passed on in
    parts): relayed as it is, never parsed."""


class SSESplitter:
    """Cuts a byte stream into complete SSE events (each with its terminating blank line),
    leaving the bytes untouched. An event larger than `limit` is passed on in pieces (as
    RawPiece), so relaying never stalls and memory stays bounded."""
    __slots__ = ("buf", "limit", "crlf", "oversize", "oversized")

    def __init__(self, limit: int = SSE_MAX_EVENT) -> None:
        self.buf = bytearray()
        self.limit = limit
        self.crlf = False
        self.oversize = False  # the current event overflowed: its rest is passed through raw
        self.oversized = False  # some event did (its bytes went out unparsed)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        start = max(0, len(buf) - 3)
        buf += data
        if not self.crlf and b"\r" in data:
            self.crlf = True
        events = []
        pos = 0
        while True:
            end = self._boundary(buf, max(pos, start))
            if end < 0:
                break
            if self.oversize:  # the tail of an oversized event
                self.oversize = False
                events.append(RawPiece(buf[pos:end]))
            else:
                events.append(bytes(buf[pos:end]))
            pos = end
        if pos:
            del buf[:pos]
        if len(buf) > self.limit:
            events.append(RawPiece(buf))
            buf.clear()
            self.oversize = self.oversized = True
        return events

    def _boundary(self, buf: bytearray, start: int) -> int:
        """End index (exclusive) of the first complete event at or after start, or -1."""
        best = buf.find(b"\n\n", start)
        best = best + 2 if best >= 0 else -1
        if self.crlf:
            for sep in (b"\r\n\r\n", b"\r\r"):
                i = buf.find(sep, start)
                if i >= 0 and (best < 0 or i + len(sep) < best):
                    best = i + len(sep)
        return best

    def flush(self) -> bytes:
        """Whatever is left when the stream ends (an unterminated last event)."""
        rest = bytes(self.buf)
        self.buf.clear()
        return rest


def leading_event(data: bytes) -> bytes | None:
    """The first whole event of a stream's start that is more than comments or a ping (the
    keep-alives some providers send while they wait), LF-normalized (lines may end in CRLF, LF
    or CR); None before one."""
    end = data.find(b"\n\n")  # (the usual first event: LF lines, no comment or ping first)
    if end > 0 and data[:1] not in b":\n" and b"\r" not in data[:end] \
            and not (data[:6] == b"event:" and b"ping" in data[:data.find(b"\n")]):
        return data[:end + 2]
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")  # (a bare CR ends a line, a
    # last one too: an LF after it would end no other line)
    pos = 0
    while True:
        end = text.find(b"\n\n", pos)
        if end < 0:
            return None
        block = text[pos:end + 2]
        pos = end + 2
        lines = [line for line in block.split(b"\n") if line and line[:1] != b":"]
        if lines and lines[0].replace(b" ", b"") != b"event:ping":
            return block


def sse_fields(event: bytes) -> tuple[bytes, bytes]:
    """The event name and the joined data of one raw SSE event (WHATWG SSE parsing rules)."""
    name = b""
    data: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            value = line[6:]
            name = value[1:] if value.startswith(b" ") else value
    return name, b"\n".join(data)


_JSON_OBJECT_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*\{")  # a JSON object's body


def form_field(body: bytes, name: bytes) -> str:
    """A short text field of a multipart/form-data body (RFC 7578), "" when absent."""
    at = body.find(b' name="%s"' % name)  # (the space: not a filename="...")
    start = body.find(b"\r\n\r\n", at) + 4 if at >= 0 else -1
    end = body.find(b"\r\n", start, start + 202) if start >= 4 else -1
    return body[start:end].decode("utf-8", "replace") if end >= 0 else ""


def is_websocket(req: Request) -> bool:
    """A WebSocket opening handshake (RFC 6455 4.1): a GET asking to upgrade."""
    headers = req.headers.map
    return req.method == "GET" and b"websocket" in headers.get(b"upgrade", b"").lower() \
        and b"upgrade" in headers.get(b"connection", b"").lower()


# ================================================================================================
# §06 connections over asyncio: one Protocol with awaitable reads, used by server and client
# ================================================================================================
# A hand-made Protocol instead of asyncio streams: reads take an absolute deadline and arm a
# timer only when they must wait, the peer going away runs a hook at once (the relay uses it to
# abort the upstream call when the client disconnects), and TCP_NODELAY is set on every socket.


class WriteBatch:
    """Holds the sends of one event-loop iteration while other callbacks are ready to run, and
    makes them one after another once those have run.

    A send on loopback runs the receiver's side at once and, when the receiver's CPU is idle,
    wakes it (an inter-processor interrupt; in a VM an exit to the hypervisor: ~30 us of this
    proxy's CPU on the benchmark's VM). Under load, sends made back to back find the peers'
    CPU already awake, so one wake-up serves many: at c=64 the benchmark's CPU per request fell
    by 10-20 % and its throughput rose by as much (bench/RESULTS.md, round 6). With nothing
    else ready (one request at a time) a write goes out at once, so latency does not grow. Reads asyncio's private ready queue (CPython 3.11 to
    3.13); an event loop without one gets unbatched writes."""
    __slots__ = ("loop", "ready", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ready = getattr(loop, "_ready", ())  # callbacks due in this iteration
        self.pending: list["Channel"] = []

    def hold(self, chan: "Channel") -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)  # after every callback already due
        self.pending.append(chan)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for chan in pending:
            try:
                chan.flush()
            except Exception:  # a transport that fails to write loses its connection only
                chan.abort()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Channel(asyncio.Protocol):
    """One TCP or TLS connection with a read buffer and backpressure in both directions."""

    def __init__(self, loop: asyncio.AbstractEventLoop, batch: WriteBatch | None = None) -> None:
        self.loop = loop
        self.batch = batch  # None: every write is sent at once
        self._out: list[bytes] | None = None  # writes held for the batch, in order
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.lost = False
        self._waiter: asyncio.Future | None = None
        self._deadline: float | None = None  # of the read being waited for
        self._timer: asyncio.TimerHandle | None = None  # armed at _timer_at, kept across reads
        self._timer_at = 0.0
        self._drain: asyncio.Future | None = None
        self._drain_on_data = False  # a drain also ends when the peer sends (or closes)
        self._write_paused = False
        self._read_paused = False
        self.on_lost = None  # callable run once when the peer goes away
        self.on_made = None  # callable(channel) run when the connection is established

    # -- protocol callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self._drain_on_data:  # (an upload watched for the provider's early answer)
            self._end_drain()
        if len(self.buf) > READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self.flush()  # the transport closes when this returns: what is held goes out first
        self.eof = True
        self._wake()
        if self._drain_on_data:
            self._end_drain()
        return False  # let the transport close; a half-closed peer counts as gone

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.eof = True
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionGone())
        hook = self.on_lost
        if hook is not None:
            self.on_lost = None
            hook()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end_drain(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- reading --------------------------------------------------------------------------------
    # One timer per channel, not one per read: a keep-alive connection waits with about the
    # same far deadline for every request, so the timer armed for the first wait is kept while
    # it is not later than the current deadline; when it fires early it re-arms for that one.
    async def _wait(self, deadline: float | None) -> None:
        if self._waiter is not None:
            raise RuntimeError("concurrent reads on one channel")
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        fut = self.loop.create_future()
        self._waiter = fut
        if deadline:
            self._deadline = deadline
            if self._timer is None or self._timer_at > deadline:
                self._arm(deadline)
        try:
            await fut
        finally:
            self._waiter = None
            self._deadline = None

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._timed_out)
        self._timer_at = when

    def _timed_out(self) -> None:
        self._timer = None
        fut, deadline = self._waiter, self._deadline
        if fut is None or fut.done() or deadline is None:
            return  # not reading now: the next wait arms a timer of its own
        if deadline <= self._timer_at:
            fut.set_exception(TimeoutError())
        else:
            self._arm(deadline)

    def _consumed(self) -> None:
        if self._read_paused and len(self.buf) < READ_LOW_WATER:
            self._read_paused = False
            self.transport.resume_reading()

    async def read_head(self, limit: int, deadline: float | None) -> bytes:
        """Bytes through the first CRLF CRLF (or LF LF: such a head is the parser's to refuse,
        not a wait for a CRLF that never comes), empty lines before it skipped (RFC 9112 2.2).
        ConnectionGone at EOF, HeadTooLarge past limit."""
        buf = self.buf
        start = 0
        while True:
            while buf.startswith(b"\r\n"):
                del buf[:2]
            i = buf.find(b"\r\n\r\n", start)
            j = buf.find(b"\n\n", start, i if i >= 0 else len(buf))
            end = j + 2 if j >= 0 else i + 4 if i >= 0 else 0
            if end:
                if end > limit:
                    raise HeadTooLarge()
                head = bytes(buf[:end])
                del buf[:end]
                self._consumed()
                return head
            if len(buf) > limit:
                raise HeadTooLarge()
            if self.eof:
                raise ConnectionGone(partial=bool(buf.strip()))
            start = max(0, len(buf) - 3)
            await self._wait(deadline)

    async def read_line(self, limit: int, deadline: float | None) -> bytes:
        buf = self.buf
        while True:
            i = buf.find(b"\n")
            if i >= 0:
                line = bytes(buf[:i + 1])
                del buf[:i + 1]
                self._consumed()
                return line
            if len(buf) > limit:
                raise HeadTooLarge()
            if self.eof:
                raise ConnectionGone(partial=True)
            await self._wait(deadline)

    async def read_exactly(self, n: int, deadline: float | None) -> bytes:
        buf = self.buf
        while len(buf) < n:
            if self.eof:
                raise ConnectionGone(partial=True)
            await self._wait(deadline)
        if len(buf) == n:  # (the usual case, and a large body's: one copy, and the buffer's
            data = bytes(buf)  # memory handed back at once)
            buf.clear()
        else:
            with memoryview(buf) as view:
                data = bytes(view[:n])
            del buf[:n]
        self._consumed()
        return data

    async def wait_more(self, deadline: float | None) -> bool:
        """Waits for more bytes or the end, leaving them in the buffer; False when the
        deadline came first."""
        if self.eof:
            return True
        try:
            await self._wait(deadline)
        except TimeoutError:
            return False
        return True

    async def read_some(self, n: int, deadline: float | None) -> bytes:
        """Up to n bytes as soon as any are there; b"" at EOF."""
        buf = self.buf
        while not buf:
            if self.eof:
                return b""
            await self._wait(deadline)
        if len(buf) <= n:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        self._consumed()
        return data

    # -- writing --------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.lost:
            return
        out = self._out
        if out is not None:  # held writes go first
            if len(data) >= WRITE_BATCH_MAX:  # (then the large one as it is: not copied into
                self.flush()  # one with them)
                self.transport.write(data)
            else:
                out.append(data)
        elif self.batch is None or not self.batch.ready or len(data) >= WRITE_BATCH_MAX:
            self.transport.write(data)
        else:
            self._out = [data]
            self.batch.hold(self)

    def flush(self) -> None:
        """Sends the writes held for the batch (a close, a half-close or the batch's turn)."""
        out = self._out
        if out is not None:
            self._out = None
            if not self.lost:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def drain(self, deadline: float | None) -> None:
        """Waits while the peer is not reading; TimeoutError past the deadline."""
        if self.lost:
            raise ConnectionGone()
        if not self._write_paused:
            return
        fut = self.loop.create_future()
        self._drain = fut
        timer = self.loop.call_at(deadline, _expire, fut) if deadline else None
        try:
            await fut
        finally:
            self._drain = None
            if timer is not None:
                timer.cancel()

    async def linger(self, seconds: float, idle: float) -> None:
        """Half-closes once the answer is out, then drops what the peer still sends until it
        closes, goes quiet for `idle` or `seconds` pass (the caller closes afterwards)."""
        if self.lost or self.transport is None:
            return
        self.flush()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # after the buffered answer: the peer sees its end
        end = self.loop.time() + seconds
        while not self.eof:
            self.buf.clear()
            now = self.loop.time()
            if now >= end:
                return
            try:
                await self._wait(min(end, now + idle))
            except TimeoutError:
                return
        self.buf.clear()

    def close(self) -> None:
        """Closes once every write is sent."""
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        self._out = None
        if self.transport is not None and not self.lost:  # (a transport already gone is
            self.transport.abort()  # left alone: asyncio's has let go of its loop)


class BodyReader:
    """Reads one message body (content-length, chunked or close-delimited) piece by piece."""
    __slots__ = ("chan", "mode", "remaining", "done", "trailer_limit", "crlf")

    def __init__(self, chan: Channel, mode: str, length: int = 0) -> None:
        self.chan = chan
        self.mode = mode  # "none", "length", "chunked", "close"
        self.remaining = length if mode == "length" else 0
        self.done = mode == "none"
        self.trailer_limit = MAX_TRAILERS
        self.crlf = False  # the CRLF after a chunk's data is still to be read

    async def read(self, deadline: float | None) -> bytes:
        """The next piece of the body, b"" once it is complete. ConnectionGone if cut short,
        ValueError on bad chunked framing, TimeoutError past the deadline."""
        if self.done:
            return b""
        chan = self.chan
        if self.mode == "length":
            data = await chan.read_some(min(self.remaining, READ_CHUNK), deadline)
            if not data:
                raise ConnectionGone(partial=True)
            self.remaining -= len(data)
            self.done = self.remaining == 0
            return data
        if self.mode == "close":
            data = await chan.read_some(READ_CHUNK, deadline)
            self.done = not data
            return data
        while True:  # chunked
            if self.remaining == 0:
                if self.crlf:  # (checked now: the data went out without waiting for it)
                    if await chan.read_exactly(2, deadline) != b"\r\n":
                        raise ValueError("chunk data not followed by CRLF")
                    self.crlf = False
                line = await chan.read_line(MAX_CHUNK_LINE, deadline)
                size = parse_chunk_size(line)
                if size == 0:
                    await self._skip_trailers(deadline)
                    self.done = True
                    return b""
                self.remaining = size
            data = await chan.read_some(min(self.remaining, READ_CHUNK), deadline)
            if not data:
                raise ConnectionGone(partial=True)
            self.remaining -= len(data)
            self.crlf = self.remaining == 0
            return data

    async def _skip_trailers(self, deadline: float | None) -> None:
        used = 0
        while True:
            line = await self.chan.read_line(MAX_CHUNK_LINE, deadline)
            used += len(line)
            if used > self.trailer_limit:
                raise ValueError("trailer section too large")
            if line == b"\r\n":
                return
            if not line.endswith(b"\r\n"):
                raise ValueError("malformed trailer line")

    async def read_all(self, limit: int, deadline: float | None) -> bytes:
        """The whole body; HeadTooLarge when it exceeds limit (0 = no limit)."""
        if self.mode == "length":
            if limit and self.remaining > limit:
                raise HeadTooLarge()
            data = await self.chan.read_exactly(self.remaining, deadline)
            self.remaining = 0
            self.done = True
            return data
        return await read_to_end(self, limit, deadline)


def peek_body(body: "BodyReader", limit: int = READ_CHUNK) -> tuple[bytes, bool]:
    """The body bytes already in the channel's buffer (about `limit` of them at most), through
    the chunked framing, without taking them, and whether the body's end is among them (or the
    framing is broken: reading it will say so)."""
    buf = body.chan.buf
    if body.mode == "length":
        return bytes(buf[:min(body.remaining, limit)]), len(buf) >= body.remaining
    if body.mode != "chunked":
        return bytes(buf[:limit]), body.chan.eof
    out, pos, left, size = [], 2 if body.crlf else 0, body.remaining, 0
    while size < limit:
        if left:
            piece = buf[pos:pos + min(left, limit - size)]
            out.append(bytes(piece))
            size += len(piece)
            if len(piece) < left:
                return b"".join(out), False
            pos += left + 2  # (and its CRLF)
        end = buf.find(b"\n", pos)
        if end < 0:  # (a size line longer than the reader takes: reading it will say so)
            return b"".join(out), len(buf) - pos > MAX_CHUNK_LINE
        try:
            left = parse_chunk_size(bytes(buf[pos:end + 1]))
        except ValueError:
            return b"".join(out), True
        if not left:
            return b"".join(out), True
        pos = end + 1
    return b"".join(out), False


class PrefetchedReader:
    """A body reader whose first bytes were read ahead (a stream's first event, checked before
    the stream was taken as the answer): they come first."""
    __slots__ = ("inner", "prefix")

    def __init__(self, inner: BodyReader, prefix: bytes) -> None:
        self.inner = inner
        self.prefix = prefix

    @property
    def done(self) -> bool:
        return not self.prefix and self.inner.done

    @property
    def mode(self) -> str:
        return self.inner.mode

    async def read(self, deadline: float | None) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return await self.inner.read(deadline)

    async def read_all(self, limit: int, deadline: float | None) -> bytes:
        return await read_to_end(self, limit, deadline)


async def read_to_end(reader, limit: int, deadline: float | None) -> bytes:
    """Every remaining piece of a body reader; HeadTooLarge past limit (0 = no limit)."""
    parts = bytearray()
    while True:
        data = await reader.read(deadline)
        if not data:
            return bytes(parts)
        parts += data
        if limit and len(parts) > limit:
            raise HeadTooLarge()


class InflatingReader:
    """A BodyReader's pieces inflated: for a provider (or a proxy on the way) that gzip- or
    deflate-encodes its answer although tokenman asked for identity. Usage, placeholders and
    event boundaries are in the inflated bytes; each read inflates at most READ_CHUNK * 16
    bytes, so a small compressed piece cannot make one huge buffer."""
    __slots__ = ("inner", "coding", "inflater", "error", "pending", "ended")

    def __init__(self, inner: BodyReader, coding: bytes) -> None:
        import zlib  # (only for a provider that ignores Accept-Encoding)
        self.inner = inner
        self.coding = coding
        self.inflater = None  # made at the first bytes: deflate may be zlib-wrapped or raw
        self.error = zlib.error
        self.pending = b""  # compressed input not inflated yet (the output cap was reached)
        self.ended = False

    def _inflater(self, first: bytes):
        import zlib
        return zlib.decompressobj(inflate_bits(self.coding, first[:2]))

    @property
    def done(self) -> bool:
        return self.inner.done and self.ended

    @property
    def mode(self) -> str:
        return self.inner.mode

    async def read(self, deadline: float | None) -> bytes:
        """The next inflated piece, b"" at the end. ValueError when the data is not valid or
        ends before the compressed stream does."""
        while not self.ended:
            data = self.pending or await self.inner.read(deadline)
            if self.inflater is None:
                if not data:  # no body at all (HEAD, 304, an empty error): nothing to inflate
                    self.ended = True
                    return b""
                if len(data) < 2:  # (the format is told by two bytes)
                    data += await self.inner.read(deadline)
                self.inflater = self._inflater(data)
            try:
                if not data:
                    self.ended = True
                    if not self.inflater.eof:
                        raise ValueError("compressed answer is cut short")
                    return self.inflater.flush()
                out = self.inflater.decompress(data, READ_CHUNK * 16)
            except self.error as exc:
                raise ValueError(f"answer is not valid compressed data: {exc}") from None
            self.pending = self.inflater.unconsumed_tail
            rest = self.inflater.unused_data
            if rest and self.coding != b"deflate" and rest[:2] in (b"\x1f\x8b", b"\x1f"):
                self.inflater = None  # another gzip member follows (RFC 1952 2.2)
                self.pending = rest
            if out:
                return out
        return b""

    async def read_all(self, limit: int, deadline: float | None) -> bytes:
        return await read_to_end(self, limit, deadline)


async def _pipe(src: Channel, dst: Channel, stall: float) -> None:
    """Bytes from one side of a tunnel to the other as they come, until src ends (or dst
    takes nothing for `stall` seconds: TimeoutError)."""
    loop = asyncio.get_running_loop()
    while True:
        data = await src.read_some(READ_CHUNK, None)
        if not data or dst.lost:
            return
        dst.write(data)
        if dst._write_paused:
            await dst.drain(loop.time() + stall if stall else None)


# ================================================================================================
# §07 HTTP server: accept, one guarded loop per connection, keep-alive, limits and timeouts
# ================================================================================================


def api_for(path: str, headers: Headers | None) -> str:
    """Which provider API a path (or, for shared paths like /v1/models, the headers) speaks."""
    if path.startswith(("/v1/messages", "/v1/complete")):
        return API_ANTHROPIC
    if path.startswith(("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/responses")):
        return API_OPENAI
    if headers is not None and (b"anthropic-version" in headers.map
                                or b"x-api-key" in headers.map):
        return API_ANTHROPIC
    return API_OPENAI


def native_error(api: str, status: int, message: str, kind: str = "") -> bytes:
    """An error body in the client's own API shape, so its SDK raises the right exception."""
    if api == API_ANTHROPIC:
        etype = kind or ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return json_dumps({"type": "error", "error": {"type": etype, "message": message}})
    etype = kind or OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else
                                           "invalid_request_error")
    return json_dumps({"error": {"message": message, "type": etype, "param": None,  # (OpenAI
                                 "code": etype if status == 429 else None}})  # codes its 429s)


_LOOPBACK_NAME = (rb"(?:localhost|[a-z0-9-]+\.localhost|127(?:\.[0-9]{1,3}){3}|0\.0\.0\.0|"
                  rb"\[(?:0{0,4}:){2,7}0{0,3}1\]|host\.docker\.internal)\.?")
_LOOPBACK_HOST_RE = re.compile(_LOOPBACK_NAME + rb"(?::[0-9]{1,5})?\Z", re.IGNORECASE)
_LOOPBACK_ORIGIN_RE = re.compile(rb"https?://" + _LOOPBACK_NAME + rb"(?::[0-9]{1,5})?/?\Z",
                                 re.IGNORECASE)
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
# a path that a server behind the provider's base URL could resolve elsewhere: dot segments,
# plain or escaped, and backslashes; an escaped slash too, but in a model id (the OpenAI SDKs
# write "meta-llama/Llama-3.1-8B" so)
_PATH_ESCAPE_RE = re.compile(r"(?:/|%2f)(?:\.|%2e){1,2}(?:/|%2f|\Z)|\\|%5c", re.IGNORECASE)
_ESCAPED_SLASH = re.compile(r"%2f", re.IGNORECASE)


def _host_name(host: bytes) -> bytes:
    """A Host value without its port (and a trailing dot)."""
    if host[:1] == b"[":
        return host[:host.index(b"]") + 1] if b"]" in host else host
    return (host.rpartition(b":")[0] if b":" in host else host).rstrip(b".")


def url_host(address: str) -> str:
    """An address as a URL's host part (an IPv6 one in brackets)."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def is_loopback(address: str) -> bool:
    return address in ("localhost", "::1") or address.startswith("127.")


class BrowserGuard:
    """Keeps web pages out of a server on loopback. A request whose Host is not a loopback
    name (nor allowed) may come from a page whose DNS name was rebound to 127.0.0.1 (a
    same-origin GET carries neither Origin nor, over plain HTTP, Sec-Fetch-*: the Host is all
    that tells); where `origins` is given, a web page's Origin that is neither a loopback page
    nor allowed is a page elsewhere posting to the proxy, which adds the operator's key. Apps'
    own origins (vscode-webview://, app://) are not web pages."""
    __slots__ = ("check_host", "hosts", "origins")

    def __init__(self, bind: str, hosts: tuple = (), origins: tuple | None = None) -> None:
        self.check_host = is_loopback(bind) and "*" not in hosts
        self.hosts = frozenset(_host_name(h.lower().encode()) for h in hosts)
        self.origins = None if origins is None or "*" in origins else frozenset(
            o.rstrip("/").encode() for o in origins)

    def refusal(self, headers: Headers) -> str:
        """Why the request is refused, or "" when it is not."""
        fields = headers.map
        host = fields.get(b"host", b"")
        if self.check_host and host and not _LOOPBACK_HOST_RE.match(host):
            if _host_name(host.lower()) not in self.hosts:
                return (f"Host {host.decode('latin-1')[:100]!r} is not a loopback name "
                        "(server.allowed_hosts lists others)")
        origin = headers.map.get(b"origin")
        if origin is not None and self.origins is not None and (
                origin[:7].lower() == b"http://" or origin[:8].lower() == b"https://"
                or origin == b"null") and not _LOOPBACK_ORIGIN_RE.match(origin) \
                and origin.rstrip(b"/") not in self.origins:
            return (f"requests from the web page {origin.decode('latin-1')[:100]!r} are refused "
                    "(server.allowed_origins lists pages that may call the proxy)")
        return ""


def auth_token(cfg: "Config") -> str:
    """tokenman's own token ("" with auth off): a value, or read from where it says."""
    return resolve_secret(cfg.auth.token, os.environ) if cfg.auth.enabled else ""


def check_token(headers: Headers, token: str, allow_custom: bool = True) -> int:
    """0 when the request carries the bearer token (X-Tokenman-Token, else Authorization),
    401 when it carries none, 403 when it carries a wrong one. Constant-time comparison. With
    X-Tokenman-Token sent, Authorization is the client's own (an OpenAI key passed through)."""
    import hmac
    offered = headers.map.get(b"x-tokenman-token") if allow_custom else None
    auth = headers.map.get(b"authorization")
    if offered is None and auth is not None and auth[:7].lower() == b"bearer ":
        offered = auth[7:].strip()
    if offered is None:
        return 401
    return 0 if hmac.compare_digest(offered, token.encode()) else 403


class _DateCache:
    """The IMF-fixdate for the Date header, formatted once per second."""
    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def now(self) -> bytes:
        sec = int(time.time())
        if sec != self.second:
            self.second = sec
            t = time.gmtime(sec)  # IMF-fixdate (RFC 9110 5.6.7), locale-independent
            self.value = ("%s, %02d %s %04d %02d:%02d:%02d GMT" % (
                ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[t.tm_wday], t.tm_mday,
                ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                 "Dec")[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)).encode()
        return self.value


def _declares_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"content-length" for name, _ in headers)


class ServerConn:
    """The server side of one client connection: what handlers use to answer."""
    __slots__ = ("server", "chan", "busy", "chunked", "close_after", "started", "held",
                 "bodiless")

    def __init__(self, server: "HTTPServer", chan: Channel) -> None:
        self.server = server
        self.chan = chan
        self.busy = False
        self.chunked = False
        self.close_after = False
        self.started = False  # a response head went out for the current request
        self.held = b""  # a stream's head kept back to go out with its first bytes
        self.bodiless = False  # the current stream answers HEAD: its body is not sent

    @property
    def lost(self) -> bool:
        return self.chan.lost

    def send(self, req: Request | None, status: int, headers: list[tuple[bytes, bytes]],
             body: bytes, reason: bytes = b"") -> None:
        """A complete response with Content-Length."""
        keep = req is not None and req.keep_alive and not self.close_after \
            and not self.server.draining
        if not keep:
            self.close_after = True
            headers = headers + [(b"Connection", b"close")]
        if status in (204, 304):  # no body and no Content-Length of one (RFC 9110 8.6)
            head, body = render_head(status, headers, reason), b""
        elif req is not None and req.method == "HEAD" and _declares_length(headers):
            head = render_head(status, headers, reason)  # (the provider's, for its GET)
        else:
            head = render_head(status, headers + [(b"Content-Length", b"%d" % len(body))],
                               reason)
        if req is not None and req.method == "HEAD":
            body = b""
        self.started = True
        self.chan.write(head + body)

    def send_error(self, req: Request | None, api: str, status: int, message: str,
                   extra: list[tuple[bytes, bytes]] = (), kind: str = "") -> None:
        headers = [(b"Content-Type", b"application/json"), (b"Date", self.server.date.now())]
        self.send(req, status, headers + list(extra), native_error(api, status, message, kind))

    def start_stream(self, req: Request, status: int, headers: list[tuple[bytes, bytes]],
                     reason: bytes = b"", hold: bool = False, length: int | None = None) -> None:
        """Response head for a body sent piece by piece: of `length` bytes when it is known
        (a provider's download), else chunked to HTTP/1.1 clients and close-delimited to
        HTTP/1.0 ones. hold: the head waits for the first stream_write (one send, one
        wake-up of the client, for head and first bytes); release_head() sends it alone."""
        self.bodiless = req.method == "HEAD" or status in (204, 304)
        if length is not None and not self.bodiless:
            headers = headers + [(b"Content-Length", b"%d" % length)]
        # its end told without chunks: no body by definition (RFC 9112 6.3; a HEAD answer may
        # say the length its GET would have), or a known length
        told = status in (204, 304) or self.bodiless and _declares_length(headers) \
            or length is not None
        self.chunked = req.version == 1 and not told
        if told:
            if not req.keep_alive or self.close_after or self.server.draining:
                self.close_after = True
                headers = headers + [(b"Connection", b"close")]
        elif self.chunked:
            headers = headers + [(b"Transfer-Encoding", b"chunked")]
            if not req.keep_alive or self.close_after or self.server.draining:
                self.close_after = True
                headers.append((b"Connection", b"close"))
        else:
            self.close_after = True
            headers = headers + [(b"Connection", b"close")]
        self.started = True
        head = render_head(status, headers, reason)
        if hold:
            self.held = head
        else:
            self.chan.write(head)

    def release_head(self) -> None:
        if self.held:
            self.chan.write(self.held)
            self.held = b""

    def stream_write(self, data: bytes) -> None:
        if self.bodiless:
            self.release_head()
        elif data:
            data = b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data
            if self.held:
                data = self.held + data
                self.held = b""
            self.chan.write(data)

    def end_stream(self) -> None:
        self.release_head()
        if self.chunked and not self.bodiless:
            self.chan.write(b"0\r\n\r\n")

    async def drain(self) -> None:
        """Waits while the client is not reading. One that takes nothing for write_timeout
        is cut off and counts as gone (ConnectionGone, `lost`): the fault is its own, never
        the provider's whose stream was being relayed. A slow reader that keeps taking bytes
        is not stalled, however long a large answer takes it."""
        chan, loop, timeout = self.chan, self.server.loop, self.server.cfg.write_timeout
        if not timeout:
            return await chan.drain(None)
        left = chan.transport.get_write_buffer_size() if chan.transport is not None else 0
        deadline = loop.time() + timeout
        while True:
            try:
                return await chan.drain(min(deadline, loop.time() + 1.0))
            except TimeoutError:
                now = chan.transport.get_write_buffer_size() if chan.transport is not None \
                    else 0
                if now < left:  # (it took some since: the wait starts again)
                    left, deadline = now, loop.time() + timeout
                elif loop.time() >= deadline:
                    chan.abort()
                    chan.lost = True
                    raise ConnectionGone() from None


def _target_hint(buf: bytearray) -> str:
    """The path in a request line that could not be parsed whole (for the error's shape)."""
    parts = bytes(buf[:MAX_REQUEST_LINE + 2]).lstrip(b"\r\n").split(b"\r\n", 1)[0].split(b" ")
    return parts[1].decode("latin-1") if len(parts) > 1 else ""


class HTTPServer:
    """An HTTP/1.1 server over Channel. `handler(req, conn)` answers each request; everything
    about framing, limits, 100-continue, keep-alive and slow clients is settled here."""

    def __init__(self, handler, cfg: ServerConfig, log: "Logger",
                 ssl_ctx: ssl.SSLContext | None = None, name: str = "proxy",
                 on_reject=None, screen=None) -> None:
        self.handler = handler
        self.on_reject = on_reject  # on_reject(req, status, detail): a parsed request refused
        self.screen = screen  # screen(req): an HTTPError refusing it before its body is read
        self.cfg = cfg
        self.log = log
        self.ssl_ctx = ssl_ctx
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.AbstractServer | None = None
        self.conns: set[ServerConn] = set()
        self.tasks: set[asyncio.Task] = set()
        self.chans: weakref.WeakSet = weakref.WeakSet()  # every connection, till it is gone
        self.draining = False
        self.date = _DateCache()
        self.port = 0
        self.large_bodies = 0  # request bodies of LARGE_BODY bytes or more read so far

    async def start(self, host: str, port: int) -> int:
        self.loop = asyncio.get_running_loop()
        loop = self.loop
        batch = WriteBatch(loop)

        def factory() -> Channel:
            chan = Channel(loop, batch)
            chan.on_made = self._accepted
            self.chans.add(chan)
            return chan

        if host in ("::", "[::]"):  # every address, IPv4 too (asyncio's own would be IPv6
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)  # only)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", port))
            except OSError:
                sock.close()
                raise
            self.server = await loop.create_server(factory, sock=sock, ssl=self.ssl_ctx,
                                                   backlog=1024)
        else:
            self.server = await loop.create_server(factory, host, port, ssl=self.ssl_ctx,
                                                   reuse_address=True, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def _accepted(self, chan: Channel) -> None:
        task = self.loop.create_task(self._serve(chan))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, chan: Channel) -> None:
        conn = ServerConn(self, chan)
        self.conns.add(conn)
        try:
            await self._requests(conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the guard: one connection never takes the server down
            self.log.error("connection failed", server=self.name,
                           error=f"{type(exc).__name__}: {exc}")
        finally:
            self.conns.discard(conn)
            chan.close()

    async def _requests(self, conn: ServerConn) -> None:
        chan = conn.chan
        loop = self.loop
        first = True
        while True:
            cfg = self.cfg  # (a reload's limits and timeouts: from the next request on)
            conn.busy = False
            if self.draining:
                return
            if not chan.buf:
                if chan.eof:
                    return
                wait = cfg.read_timeout if first and cfg.read_timeout else cfg.idle_timeout
                try:  # (a new connection that sends nothing is not held as if it were idle
                    await chan._wait(loop.time() + wait if wait else None)  # between requests:
                except TimeoutError:  # hundreds of them took every descriptor)
                    return
                if not chan.buf or self.draining and not chan.buf.strip():
                    return
            first = False
            conn.busy = True
            conn.started = False
            conn.held = b""
            t0 = time.perf_counter()
            req = await self._read_request(conn, t0)
            if req is None:
                if conn.close_after and not chan.eof:  # refused: let the client finish sending
                    conn.busy = False  # (a graceful stop does not wait for this)
                    await chan.linger(LINGER_SECONDS, LINGER_IDLE)
                return
            await self.handler(req, conn)
            if chan._write_paused and not chan.lost:  # an answer the client is not taking:
                try:  # cut off after write_timeout, never held (and its memory) forever
                    await conn.drain()
                except ConnectionGone:
                    return
            if not req.keep_alive or conn.close_after or chan.lost:
                return
            req = None  # (its body, megabytes maybe, is not kept while the connection idles)

    async def _read_request(self, conn: ServerConn, t0: float) -> Request | None:
        """The next request with its body, or None after answering an error / on EOF."""
        chan = conn.chan
        cfg = self.cfg
        deadline = self.loop.time() + cfg.read_timeout if cfg.read_timeout else None
        req = None
        head = b""
        try:
            try:
                head = await chan.read_head(MAX_HEAD, deadline)
            except HeadTooLarge:
                first = chan.buf.find(b"\r\n", 0, MAX_REQUEST_LINE + 2)
                if first < 0 and len(chan.buf.lstrip(b"\r\n")) > MAX_REQUEST_LINE:
                    raise HTTPError(414, "request line too long", close=True) from None
                raise HTTPError(431, "request head too large", close=True) from None
            req = parse_request_head(head)
            length = request_framing(req.headers)
            if self.screen is not None:  # (a stranger's 10 MB is not read, nor 100-continued)
                refused = self.screen(req)
                if refused is not None:
                    raise refused
            limit = cfg.max_body_size
            if length is not None and limit and length > limit:
                raise HTTPError(413, f"request body too large: {length:,} bytes, the limit is "
                                f"{limit:,} (server.max_body_size)", close=True)
            if req.expect_continue and (length is None or length > 0):
                chan.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if length is None:
                try:
                    req.body = await BodyReader(chan, "chunked").read_all(limit, deadline)
                except HeadTooLarge:
                    raise HTTPError(413, f"request body too large: over the limit of {limit:,} "
                                    "bytes (server.max_body_size)", close=True) from None
                except ValueError:
                    raise HTTPError(400, "malformed chunked body", close=True) from None
            elif length:
                req.body = await chan.read_exactly(length, deadline and deadline + length /
                                                   MIN_BODY_RATE)
            if len(req.body) >= LARGE_BODY:
                self.large_bodies += 1  # (their memory is handed back once it is quiet)
        except HTTPError as exc:
            self.log.debug("bad request", server=self.name, status=exc.status, error=exc.detail)
            conn.close_after = True
            api = api_for(req.path if req else _target_hint(head or chan.buf),
                          req.headers if req else None)
            conn.send_error(req, api, exc.status, exc.detail,
                            self._rejected(req, t0, exc.status, exc.detail, head or chan.buf)
                            + list(exc.headers))
            return None
        except TimeoutError:
            if req is not None or chan.buf.strip():
                conn.close_after = True
                conn.send_error(req, api_for(req.path if req else _target_hint(chan.buf), None),
                                408, "request not received in time",
                                self._rejected(req, t0, 408, "request not received in time",
                                               chan.buf))
            return None
        except ConnectionGone:
            return None
        req.t0 = t0
        if self.draining:
            req.keep_alive = False
        return req

    def _rejected(self, req: Request | None, t0: float, status: int, detail: str,
                  raw: bytes | bytearray = b"") -> list[tuple[bytes, bytes]]:
        """Logs a refused request (on_reject); the headers its answer carries (X-Request-Id).
        A head that could not be parsed is logged with the method and path its request line
        shows (so a /v1 request has its row whatever went wrong)."""
        if self.on_reject is None:
            return []
        if req is None:
            line = bytes(raw[:MAX_REQUEST_LINE + 2]).lstrip(b"\r\n").split(b" ", 1)[0]
            method = re.sub(r"[^A-Z]", "", line[:16].decode("latin-1").upper()) or "-"
            req = Request(method, _CONTROL_RE.sub("", _target_hint(raw)[:2048]) or "-", 1,
                          Headers([]))
        req.t0 = t0
        return self.on_reject(req, status, detail)

    def stop_accepting(self) -> None:
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            if not conn.busy:
                conn.chan.close()

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no request is in flight (True) or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        while any(conn.busy for conn in self.conns):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def close(self) -> None:
        """Ends what is still in flight: each request is cancelled (it answers with an error,
        or ends its stream with an error event, and records its row), then every connection
        closes once that is sent."""
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for chan in list(self.chans):  # (also those whose answer still waits to be read:
            chan.close()  # a Connection: close one has left self.conns already)
        if self.server is None:
            return
        for give_up in (False, True):  # (3.12+ waits for every connection: one whose client
            try:  # stopped reading would never close)
                async with asyncio.timeout(CLOSE_FLUSH_SECONDS):
                    await self.server.wait_closed()
                return
            except TimeoutError:
                for chan in list(self.chans):
                    chan.abort()
                if give_up:
                    self.log.warn("connections still open at stop", server=self.name)


# ================================================================================================
# §08 HTTP client: per-origin keep-alive pool, TLS with SNI, CONNECT proxies, streaming bodies
# ================================================================================================


class ClientTLS:
    """Client TLS contexts, one per CA bundle, shared by every origin that trusts it and kept
    across reloads: loading the system store takes ~20 ms and ~2.4 MB (~0.8 MB for each further
    copy), which every provider and every reload paid again. A bundle that changed on disk (a
    renewed private CA, an updated system store) is loaded again by the next router build."""
    __slots__ = ("_by_ca", "_lock")

    def __init__(self) -> None:
        self._by_ca: dict[str, tuple[tuple, ssl.SSLContext]] = {}
        self._lock = threading.Lock()  # reloads build routers in worker threads

    def context(self, ca_file: str = "") -> ssl.SSLContext:
        ssl = load_ssl()
        if ca_file:
            try:
                stamp = self._stamp(ca_file)
            except OSError:  # not cached: create_default_context reports the problem
                return ssl.create_default_context(cafile=ca_file)
        else:  # the system store (a file, a directory or both): an update shows in their stat
            paths = ssl.get_default_verify_paths()
            stamp = tuple(self._stamp(p) if p and os.path.exists(p) else None
                          for p in (paths.cafile, paths.capath))
        with self._lock:
            known = self._by_ca.get(ca_file)
            if known is None or known[0] != stamp:
                known = self._by_ca[ca_file] = (
                    stamp, ssl.create_default_context(cafile=ca_file or None))
            return known[1]

    @staticmethod
    def _stamp(path: str) -> tuple:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode)


class Origin:
    """Where one provider lives: scheme, host, port, base path and its TLS context."""
    __slots__ = ("scheme", "host", "port", "base_path", "ssl", "key", "host_header")

    def __init__(self, api_base: str, ca_file: str = "", tls: ClientTLS | None = None) -> None:
        url = urllib.parse.urlsplit(api_base)
        self.scheme = url.scheme
        self.host = url.hostname or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base_path = url.path.rstrip("/")
        self.ssl = None
        if url.scheme == "https":
            self.ssl = (tls or ClientTLS()).context(ca_file)
        default_port = self.port == (443 if url.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default_port else f"{host}:{self.port}").encode()
        self.key = (self.scheme, self.host, self.port, ca_file)

    def target(self, path_and_query: str) -> str:
        """The upstream request target; a base ending in /v1 is not doubled for /v1/ paths."""
        base = self.base_path
        if base.endswith("/v1") and path_and_query.startswith("/v1/"):
            base = base[:-3]
        return base + path_and_query


def _final_head(buf: bytearray) -> bool:
    """Whether the bytes hold a whole response head other than an interim (1xx) one."""
    pos = 0
    while True:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return False
        status = bytes(buf[pos + 9:pos + 12])
        if not (status[:1] == b"1" and status != b"101"):
            return True
        pos = end + 4


class UpstreamResponse:
    """A provider's response whose body is read on demand; release() or close() it."""
    __slots__ = ("head", "body", "chan", "pool", "origin", "reusable", "data")

    def __init__(self, head: ResponseHead, body: BodyReader, chan: Channel, pool: "UpstreamPool",
                 origin: Origin) -> None:
        self.head = head
        self.body = body
        self.chan = chan
        self.pool = pool
        self.origin = origin
        conn = head.headers.map.get(b"connection", b"").lower()
        self.reusable = head.version == 1 and b"close" not in conn and body.mode != "close"
        self.data = None  # the whole body when it was read ahead (Dispatcher._whole_body)

    @property
    def status(self) -> int:
        return self.head.status

    def release(self) -> None:
        """Returns the connection to the pool when the body was read to its end."""
        if self.body.done and self.reusable and not self.chan.lost and not self.chan.buf:
            self.pool.put(self.origin, self.chan)
        else:
            self.chan.abort()

    def close(self) -> None:
        self.chan.abort()

    def inflate(self) -> None:
        """A gzip- or deflate-encoded body (sent although tokenman asked for identity) is read
        inflated from now on, and the head no longer names the encoding, nor the compressed
        length (a HEAD answer would pass it on)."""
        coding = self.head.headers.map.get(b"content-encoding", b"").strip().lower()
        if coding in INFLATABLE:
            self.body = InflatingReader(self.body, coding)
            self.head.headers = Headers([(n, v) for n, v in self.head.headers.raw
                                         if n.lower() not in (b"content-encoding",
                                                              b"content-length")])


def _quiet(chan: Channel) -> bool:
    """No close or byte from the peer waits in the kernel: a provider's close of an idle
    connection can be there before the event loop has read it (one poll(2), no read)."""
    sock = chan.transport.get_extra_info("socket") if chan.transport is not None else None
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class UpstreamPool:
    """Keep-alive connections to providers, per origin, with idle eviction and a cap."""

    def __init__(self, env: dict | None = None) -> None:
        self.idle: dict[tuple, collections.deque] = {}
        self.proxies: dict[str, str] = {}  # scheme -> proxy URL, from HTTPS_PROXY & co.
        for name, value in (os.environ if env is None else env).items():
            if name.lower().endswith("_proxy") and value:
                scheme = name[:-6].lower()
                if name.islower() or scheme not in self.proxies:  # lowercase wins, as in curl
                    self.proxies[scheme] = value
        self.opened = 0  # connections opened since start (tests and metrics read it)
        self.stale_retry = STALE_RETRY_SECONDS
        self.tls = ClientTLS()  # what every origin reached through this pool verifies with
        self.batch: WriteBatch | None = None  # for the loop the pool last connected on

    def size(self) -> int:
        return sum(len(q) for q in self.idle.values())

    def put(self, origin: Origin, chan: Channel) -> None:
        idle = self.idle.setdefault(origin.key, collections.deque())
        idle.append((chan, time.monotonic()))
        while len(idle) > POOL_MAX_IDLE:
            idle.popleft()[0].abort()
        chan.on_lost = None

    def take(self, origin: Origin) -> Channel | None:
        idle = self.idle.get(origin.key)
        now = time.monotonic()
        while idle:
            chan, since = idle.pop()
            if chan.lost or chan.eof or chan.buf or now - since > POOL_IDLE_SECONDS \
                    or now - since > POOL_PROBE_SECONDS and not _quiet(chan):
                chan.abort()
                continue
            return chan
        return None

    def close_all(self) -> None:
        for idle in self.idle.values():
            while idle:
                idle.pop()[0].abort()
        self.idle.clear()

    def _proxy_for(self, origin: Origin) -> urllib.parse.SplitResult | None:
        if _is_loopback(origin.host):
            return None
        url = self.proxies.get(origin.scheme)
        if not url:
            return None
        no_proxy = self.proxies.get("no", "")
        if no_proxy:
            from urllib.request import proxy_bypass_environment  # only NO_PROXY needs it
            if proxy_bypass_environment(origin.host, {"no": no_proxy}):
                return None
        return urllib.parse.urlsplit(url if "://" in url else "http://" + url)

    async def connect(self, origin: Origin, timeout: float) -> Channel:
        loop = asyncio.get_running_loop()
        if self.batch is None or self.batch.loop is not loop:
            self.batch = WriteBatch(loop)
        batch = self.batch
        proxy = self._proxy_for(origin)
        try:
            async with asyncio.timeout(timeout):
                if proxy is None:
                    _, chan = await loop.create_connection(
                        lambda: Channel(loop, batch), origin.host, origin.port, ssl=origin.ssl,
                        server_hostname=origin.host if origin.ssl else None)
                else:
                    chan = await self._connect_via(loop, proxy, origin, timeout)
        except TimeoutError:
            raise UpstreamError(f"connect to {origin.host}:{origin.port} timed out",
                                timeout=True, connect=True) from None
        except (OSError, ConnectionGone, HeadTooLarge) as exc:  # (ssl.SSLError is an OSError)
            raise UpstreamError(f"cannot connect to {origin.host}:{origin.port}: "
                                f"{type(exc).__name__}: {exc}", connect=True) from None
        self.opened += 1
        return chan

    async def _connect_via(self, loop: asyncio.AbstractEventLoop, proxy: urllib.parse.SplitResult,
                           origin: Origin, timeout: float) -> Channel:
        """A tunnel through an HTTP CONNECT proxy (HTTPS_PROXY), then TLS to the origin."""
        _, chan = await loop.create_connection(lambda: Channel(loop, self.batch), proxy.hostname,
                                               proxy.port or 80)
        authority = f"{origin.host}:{origin.port}".encode()
        lines = [b"CONNECT " + authority + b" HTTP/1.1", b"Host: " + authority]
        if proxy.username:
            import base64  # only proxies with credentials need it
            cred = f"{urllib.parse.unquote(proxy.username)}:" \
                   f"{urllib.parse.unquote(proxy.password or '')}"
            lines.append(b"Proxy-Authorization: Basic " + base64.b64encode(cred.encode()))
        try:  # (every way out but a tunnel closes the socket: a timeout, a bad head, TLS)
            chan.write(b"\r\n".join(lines) + b"\r\n\r\n")
            head = parse_response_head(await chan.read_head(MAX_UPSTREAM_HEAD, None))
            if head.status != 200:
                raise OSError(f"proxy refused CONNECT with status {head.status}")
            if origin.ssl is not None:
                chan.transport = await loop.start_tls(chan.transport, chan, origin.ssl,
                                                      server_hostname=origin.host)
        except BaseException:
            chan.abort()
            raise
        return chan

    @staticmethod
    async def _send_large(chan: Channel, body: bytes, deadline: float) -> bool:
        """A large upload in pieces, each once the provider took the one before: the
        transport never holds a copy of what the socket did not take at once (megabytes).
        A provider may answer (a 401, a 413) or close before it has read it all: the upload
        stops there, and its answer is read as any (False: not all of the body went)."""
        view = memoryview(body)  # (not released here: the transport may hold a piece yet)
        chan._drain_on_data = True
        try:
            for start in range(0, len(body), UPLOAD_PIECE):
                if chan.eof or chan.buf and _final_head(chan.buf):  # (an interim 100 or 103
                    return False  # is no answer: the provider still waits for the body)
                chan.write(view[start:start + UPLOAD_PIECE])
                if chan._write_paused:
                    await chan.drain(deadline)
        except ConnectionGone:  # (closed: what it said before, if anything, is in the buffer)
            return False
        finally:
            chan._drain_on_data = False
        return True

    async def request(self, origin: Origin, method: str, target: str,
                      headers: list[tuple[bytes, bytes]], body: bytes, connect_timeout: float,
                      read_timeout: float, watch: Channel | None = None,
                      upgrade: bool = False) -> UpstreamResponse:
        """Sends one request and reads the response head. UpstreamError when the provider
        cannot be reached or answers badly; ConnectionGone when `watch` (the client) left.
        upgrade: the request asks for one (a WebSocket), so a 101 is its answer."""
        head = [f"{method} {target} HTTP/1.1\r\n".encode(), b"Host: ", origin.host_header,
                b"\r\n"]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        data = b"".join(head)
        if len(body) < WRITE_BATCH_MAX:  # (one write: one segment for head and body; a large
            data, body = data + body, b""  # upload is written as it is, not copied)
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            chan = self.take(origin) if attempt == 0 else None
            reused = chan is not None
            if chan is None:
                chan = await self.connect(origin, connect_timeout)
            if watch is not None:
                if watch.lost:
                    chan.abort()
                    raise ConnectionGone()
                watch.on_lost = chan.abort
            chan.write(data)
            written = loop.time()
            deadline = written + read_timeout  # (interim 1xx heads do not extend it)
            whole = True
            try:
                if body:
                    whole = await self._send_large(chan, body, deadline)
                while True:
                    rhead = parse_response_head(await chan.read_head(MAX_UPSTREAM_HEAD,
                                                                     deadline))
                    if rhead.status == 101:
                        if upgrade:
                            break
                        raise UpstreamError("upstream switched protocols unasked (101)")
                    if rhead.status >= 200:
                        break
                mode, length = response_framing(rhead, method)
            except ConnectionGone as exc:
                chan.abort()
                if watch is not None and watch.lost:
                    raise
                if reused and not exc.partial and loop.time() - written < self.stale_retry:
                    continue  # a kept-alive connection the provider had closed: one fresh try
                raise UpstreamError("upstream closed the connection before answering") from None
            except TimeoutError:
                chan.abort()
                raise UpstreamError("upstream did not answer in time", timeout=True) from None
            except HeadTooLarge:
                chan.abort()
                raise UpstreamError("upstream response head too large") from None
            except UpstreamError:
                chan.abort()
                raise
            resp = UpstreamResponse(rhead, BodyReader(chan, mode, length), chan, self, origin)
            resp.reusable = resp.reusable and whole  # (an upload cut short: never reused)
            return resp
        raise AssertionError("unreachable")

# ================================================================================================
# §09 resilience: retry policy with full jitter, Retry-After, per-provider circuit breaker
# ================================================================================================
# Clock and random source are injected, so every bound is testable without sleeping.

RETRY_STATUSES = frozenset((429, 500, 502, 503, 504, 529))


def parse_retry_after(headers: Headers, now: float) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (delta seconds or an HTTP date)."""
    ms = headers.map.get(b"retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.map.get(b"retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():  # (absurdly long: no header)
        return float(int(value)) if len(value.lstrip(b"0")) <= 9 else None
    import email.utils  # HTTP dates in Retry-After are rare: load the parser only then
    try:
        when = email.utils.parsedate_to_datetime(value.decode("latin-1"))
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        return max(0.0, when.timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):  # (a year past any clock)
        return None


# words in an error's type or code that name a refusal of the request itself
_REFUSAL_WORDS = ("invalid", "notfound", "badrequest", "toolarge", "contextlength", "image",
                  "apikey", "authentication", "permission")


def retry_status(err: dict) -> int:
    """The status an error sent inside a stream stands for, when another attempt could get
    an answer: an overload (529), a rate limit (429), a server error (500, 503) or the
    provider's own timeout (504), by its type or code as the providers and OpenAI-compatible
    servers spell them (vLLM's InternalServerError, a numeric code 503); 0 for any other."""
    code = _int_code(err.get("code"))
    if type(code) is int and 400 <= code < 600:
        return code if code in RETRY_STATUSES else 0
    kind = f"{err.get('type') or ''} {err.get('code') or ''}".lower().replace("_", "")
    if any(word in kind for word in _REFUSAL_WORDS):
        return 0  # (a refusal of the request, whatever else its name says)
    return 529 if "overload" in kind else 429 if "ratelimit" in kind or "toomanyrequests" \
        in kind else 503 if "unavailable" in kind else 504 if "timeout" in kind \
        else 500 if "apierror" in kind or "servererror" in kind else 0


def error_status(err: object) -> int:
    """The HTTP status an error sent inside a 200 stream stands for: retry_status() for what
    another attempt could change, 401 for a key refused, 400 for a refusal of the request
    itself (as the same error answered as JSON would be), 0 when it cannot be told."""
    if isinstance(err, str):  # (a server that sends the error's name alone)
        err = {"type": err}
    if not isinstance(err, dict):
        return 0
    status = retry_status(err)
    if status:
        return status
    code = _int_code(err.get("code"))
    if type(code) is int and 400 <= code < 600:
        return code
    kind = f"{err.get('type') or ''} {err.get('code') or ''}".lower().replace("_", "")
    if "apikey" in kind or "authentication" in kind:
        return 401
    if "permission" in kind:
        return 403
    if any(word in kind for word in _REFUSAL_WORDS):
        return 400
    return 0


def _int_code(code: object) -> object:
    """A numeric error code given as a string ("503") as an int; anything else as it is."""
    if type(code) is str and code.isascii() and code.isdigit() and len(code) <= 4:
        return int(code)
    return code


class RetryPolicy:
    """Attempts per provider and the wait before each retry: full jitter, capped, and an
    upstream Retry-After honoured up to the same cap."""
    __slots__ = ("attempts", "base", "cap", "on_timeout", "rng")

    def __init__(self, cfg: ResilienceConfig, rng=random.random) -> None:
        self.attempts = cfg.retry_max_attempts if cfg.retry_enabled else 1
        self.base = cfg.retry_base_delay_ms / 1000
        self.cap = cfg.retry_max_delay_ms / 1000
        self.on_timeout = cfg.retry_on_timeout
        self.rng = rng

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds before retry number `retry` (1 = the first retry)."""
        if retry_after is not None:
            return min(retry_after, self.cap)
        return self.rng() * min(self.cap, self.base * (2 ** (retry - 1)))


class CircuitBreaker:
    """closed -> open after `threshold` consecutive failures; open -> half-open once `reset`
    seconds passed; half-open admits at most `probes` concurrent calls and closes after that
    many successes, or opens again on a failure. allow() returns a ticket (None = refused)
    that the caller hands back with record() or release()."""
    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
    __slots__ = ("name", "threshold", "reset", "max_probes", "clock", "on_change", "state",
                 "failures", "opened_at", "probes", "successes")

    def __init__(self, name: str, cfg: ResilienceConfig, clock=time.monotonic,
                 on_change=None) -> None:
        self.name = name
        self.threshold = cfg.cb_failure_threshold
        self.reset = cfg.cb_reset_timeout_seconds
        self.max_probes = cfg.cb_half_open_max_calls
        self.clock = clock
        self.on_change = on_change
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probes = 0
        self.successes = 0

    def _set(self, state: str) -> None:
        if state != self.state:
            old, self.state = self.state, state
            if self.on_change is not None:
                self.on_change(self, old)

    def allow(self) -> str | None:
        if self.state == self.CLOSED:
            return "call"
        if self.state == self.OPEN:
            if self.clock() - self.opened_at < self.reset:
                return None
            self.probes = self.successes = 0
            self._set(self.HALF_OPEN)
        if self.probes >= self.max_probes:
            return None
        self.probes += 1
        return "probe"

    @property
    def shown(self) -> str:
        """The state as the next call finds it (dashboards, metrics): an open breaker whose
        reset time passed is half-open, though no call has moved it yet."""
        return self.HALF_OPEN if self.state == self.OPEN and not self.retry_in() else self.state

    def retry_in(self) -> float:
        """Seconds until an open breaker admits a probe (0 when it would now)."""
        if self.state != self.OPEN:
            return 0.0
        return max(0.0, self.reset - (self.clock() - self.opened_at))

    def release(self, ticket: str | None) -> None:
        """A call ended without a verdict on the provider (the client went away)."""
        if ticket == "probe" and self.probes:
            self.probes -= 1

    def record(self, ticket: str | None, ok: bool) -> None:
        if ticket is None:
            return
        self.release(ticket)
        if ok:
            if self.state == self.CLOSED:
                self.failures = 0
            elif self.state == self.HALF_OPEN and ticket == "probe":
                self.successes += 1
                if self.successes >= self.max_probes:
                    self.failures = 0
                    self._set(self.CLOSED)
        elif self.state == self.HALF_OPEN or (self.state == self.CLOSED and
                                              self.failures + 1 >= self.threshold):
            self.failures += 1
            self.opened_at = self.clock()
            self._set(self.OPEN)
        elif self.state == self.CLOSED:
            self.failures += 1


# ================================================================================================
# §10 accounting: provider usage (buffered and streamed), the local token estimate, prices
# ================================================================================================
# Token counts are kept in one provider-neutral shape: `input` is uncached input, and cache reads
# and writes are separate, as Anthropic reports them. OpenAI's prompt_tokens (which include cached
# tokens) are split accordingly, so a cost is always sum(count x price) over disjoint counts.

# The local token estimate, for providers that report no usage. It mimics how o200k/cl100k-style
# BPE tokenizers pre-split text (words with their leading space, punctuation runs, digit groups,
# newline and indentation runs) and counts those pieces for the whole text at once: each ASCII
# character becomes a class byte, the class bytes one big int, and shifts plus int.bit_count()
# count run starts, camelCase breaks and long-word tails without a Python loop per character.
# Non-ASCII text is priced per UTF-8 byte with extra weights for CJK, accented Latin and symbols.
# Measured on 196 held-out texts (code, JSON, markdown, prose; en de fr es ru zh ja ko) against
# OpenAI's o200k_base: 5.2% mean absolute error (bias +2%, worst single text -20%); against
# cl100k_base 11.4%; English and code 2-8%. 11-18 us per KB on CPython 3.11.
_LET, _UP, _DIG, _PUN, _SP, _NL, _PFX, _APO = 1, 2, 4, 8, 16, 32, 64, 128  # bit lanes


def _ascii_class(c: str) -> int:
    if c.isalpha():
        return _LET | (_UP if c.isupper() else 0)
    if c.isdigit():
        return _DIG
    if c == " ":
        return _SP
    if c in "\r\n":
        return _NL
    if c in "./_(%$\\":
        return _PUN | _PFX  # glues onto a following word: ".js", "(self", "_id"
    if c == "'":
        return _PUN | _APO
    return _PUN if "!" <= c <= "~" else 0


_EST_CLASSES = bytes(_ascii_class(chr(i)) if i < 128 else 0 for i in range(256))
_EST_RULER = bytes(1 if chr(i) in "-=#*~_" else 0 for i in range(256))
_EST_ASCII = bytes(range(128))
_CJK = "\u2e80-\u2fff\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_CJK_RUN = re.compile("[" + _CJK + "]+")
_LATIN_RUN = re.compile("[\u00c0-\u024f]+")  # accented Latin letters
_SYMBOL_RUN = re.compile("[^\\w\\s" + _CJK + "]+")  # emoji, typographic marks
_EST_CHUNK = 65536  # characters per big-int pass (larger ints fall out of the CPU cache)


def estimate_tokens(text: str) -> int:
    """Tokens `text` would encode to with an o200k-like BPE tokenizer (see above)."""
    if not text:
        return 0
    total, start, end = 0.0, 0, len(text)
    while end - start > _EST_CHUNK:  # long text: cut after a newline near the chunk size
        cut = text.rfind("\n", start + _EST_CHUNK // 2, start + _EST_CHUNK) + 1 \
            or start + _EST_CHUNK
        total += _estimate_chunk(text[start:cut])
        start = cut
    return max(1, round(total + _estimate_chunk(text[start:] if start else text)))


def _estimate_chunk(text: str) -> float:
    raw = text.encode("ascii", "ignore")  # non-ASCII is priced at the end
    ones = int.from_bytes(b"\x01" * (len(raw) or 1), "little")
    x = int.from_bytes(raw.translate(_EST_CLASSES), "little")
    let, up, dig, pun = x & ones, x >> 1 & ones, x >> 2 & ones, x >> 3 & ones
    sp, nl, pfx, apo = x >> 4 & ones, x >> 5 & ones, x >> 6 & ones, x >> 7 & ones
    lo = let ^ up
    # Bit i is set where character i starts a run of its class ("<< 8" = previous character).
    word = let ^ (let & let << 8)
    glued = word & pfx << 8  # ".bar", "(self": one token ...
    word ^= glued ^ (glued & pun << 16)  # ... unless the prefix ends a longer punctuation run
    punct = pun ^ (pun & pun << 8)
    digit = dig ^ (dig & dig << 8)
    camel = up & lo << 8  # fooBar
    caps = up & up << 8 & lo >> 8  # HTTPServer
    space_digit = dig & sp << 8  # " 42": that space is a token of its own
    count = (word | camel << 1 | caps << 2 | digit << 3 | space_digit << 4
             | punct << 5).bit_count()
    newline = nl ^ (nl & nl << 8)
    newline ^= newline & pun << 8  # "):\n" is a single token
    indent = sp & sp << 8
    indent ^= indent & sp << 16  # each run of two or more spaces
    l2 = lo & lo << 8
    l4 = l2 & l2 << 16
    long_word = l4 & l4 << 32 & lo << 64  # 9th and later letters of a word
    u2 = up & up << 8
    long_caps = u2 & u2 << 16 & up << 32  # 5th and later capitals
    d2 = dig & dig << 8
    long_num = d2 & d2 << 16  # 4th and later digits
    r = int.from_bytes(raw.translate(_EST_RULER), "little")
    r2 = r & r << 8
    ruler = r2 & r2 << 16  # ----, ====
    p2 = pun & pun << 8
    long_punct = p2 & p2 << 16
    long_punct ^= long_punct & ruler
    contraction = apo & let << 8 & let >> 8  # don't, I've
    tokens = (count + 1.5 * newline.bit_count() + 1.25 * indent.bit_count()
              + 0.4 * (long_word | long_punct << 1).bit_count() + 0.25 * long_caps.bit_count()
              + long_num.bit_count() / 3 + ruler.bit_count() / 32
              - 1.75 * contraction.bit_count() + text.count("\t"))
    if len(raw) != len(text):
        utf8 = text.encode("utf-8", "surrogatepass").translate(None, _EST_ASCII)
        na = utf8.decode("utf-8", "surrogatepass")  # just the non-ASCII characters
        tokens += (0.25 * (len(utf8) - len(na))
                   + 0.2 * sum(map(len, _CJK_RUN.findall(na)))
                   + 0.25 * sum(map(len, _LATIN_RUN.findall(na)))
                   + 0.75 * sum(map(len, _SYMBOL_RUN.findall(na))))
    return tokens


class Usage:
    """Token counts of one call. `reported` is False while they come only from an estimate;
    `sides` says which the provider stated (INPUT_SIDE, OUTPUT_SIDE): a side it left out is
    estimated by the caller, which knows the request and the answer."""
    __slots__ = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read",
                 "reasoning", "reported", "estimated", "sides", "audio_in", "audio_out",
                 "web_searches")

    def __init__(self) -> None:
        self.input = self.output = self.cache_write_5m = self.cache_write_1h = 0
        self.cache_read = self.reasoning = self.audio_in = self.audio_out = 0
        self.web_searches = 0  # Anthropic's server-side web search: billed per search
        self.reported = False
        self.estimated = False
        self.sides = 0

    @property
    def cache_write(self) -> int:
        return self.cache_write_5m + self.cache_write_1h

    def apply_anthropic(self, u: object) -> None:
        """Overwrites with the counts in an Anthropic usage object. Streamed message_delta usage
        is cumulative, so later values replace earlier ones; nothing is ever added twice."""
        if not isinstance(u, dict):
            return
        if (n := _tokens(u.get("input_tokens"))) is not None:
            self.input = n
            self.sides |= INPUT_SIDE
        if (n := _tokens(u.get("output_tokens"))) is not None:
            self.output = n
            self.sides |= OUTPUT_SIDE
        if (n := _tokens(u.get("cache_read_input_tokens"))) is not None:
            self.cache_read = n
        split = u.get("cache_creation")
        total = _tokens(u.get("cache_creation_input_tokens"))
        if isinstance(split, dict):
            self.cache_write_5m = _tokens(split.get("ephemeral_5m_input_tokens")) or 0
            self.cache_write_1h = _tokens(split.get("ephemeral_1h_input_tokens")) or 0
            if total is not None and total > self.cache_write:
                self.cache_write_5m += total - self.cache_write  # tokens the split leaves out
        elif total is not None and total != self.cache_write:
            self.cache_write_1h = min(self.cache_write_1h, total)
            self.cache_write_5m = total - self.cache_write_1h
        details = u.get("output_tokens_details")
        if isinstance(details, dict) and (n := _tokens(details.get("thinking_tokens"))) \
                is not None:
            self.reasoning = n
        tools = u.get("server_tool_use")
        if isinstance(tools, dict) and (n := _tokens(tools.get("web_search_requests"))) \
                is not None:
            self.web_searches = n
        self.reported = self.reported or bool(self.sides)  # (an empty or all-null usage
        # object reports nothing: the estimate stands in for it)

    def apply_openai(self, u: object) -> None:
        """Sets the counts from an OpenAI usage object (chat completions or responses API)."""
        if not isinstance(u, dict):
            return
        prompt = _tokens(u.get("prompt_tokens", u.get("input_tokens")))
        completion = _tokens(u.get("completion_tokens", u.get("output_tokens")))
        pdet = u.get("prompt_tokens_details", u.get("input_tokens_details"))
        cdet = u.get("completion_tokens_details", u.get("output_tokens_details"))
        pdet = pdet if isinstance(pdet, dict) else {}
        cdet = cdet if isinstance(cdet, dict) else {}
        self.cache_read = _tokens(pdet.get("cached_tokens")) or 0
        self.cache_write_5m = _tokens(pdet.get("cache_write_tokens")) or 0
        self.cache_write_1h = 0
        self.audio_in = _tokens(pdet.get("audio_tokens")) or 0
        self.audio_out = _tokens(cdet.get("audio_tokens")) or 0
        if prompt is not None:
            self.input = max(0, prompt - self.cache_read - self.cache_write_5m)
            self.sides |= INPUT_SIDE
        if completion is not None:
            self.output = completion
            self.sides |= OUTPUT_SIDE
        if (n := _tokens(cdet.get("reasoning_tokens"))) is not None:
            self.reasoning = n
        self.reported = self.reported or bool(self.sides)

    def apply(self, api: str, u: object) -> None:
        if api == API_ANTHROPIC:
            self.apply_anthropic(u)
        else:
            self.apply_openai(u)


INPUT_SIDE, OUTPUT_SIDE = 1, 2  # Usage.sides: which counts the provider stated


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _tokens(value: object) -> int | None:
    """A token count as a provider states it (an integral float too), or None for anything
    else: missing, null, negative, or past USAGE_MAX (no call is that large: such a number
    would poison every total and budget it joins, and the estimate stands in for it)."""
    if type(value) is float and value.is_integer():
        value = int(value)
    return value if type(value) is int and 0 <= value <= USAGE_MAX else None


_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")  # a request's
# limit on its answer, as each API names it (Anthropic; OpenAI chat; OpenAI Responses)


def stated_output(obj: dict) -> tuple[int | None, int]:
    """The request's own limit on each answer (None when it states none; a whole-number float
    is a number) and how many answers it asks for (OpenAI's `n`; legacy completions' `best_of`
    makes that many, billed, and returns n of them)."""
    if not isinstance(obj, dict):
        return None, 1
    most = next((n for n in (_asked(obj.get(k)) for k in _OUTPUT_LIMITS) if n is not None),
                None)
    n = max(_asked(obj.get("n")) or 1, _asked(obj.get("best_of")) or 1)
    return most, n


def _asked(value: object) -> int | None:
    """A count a request states (a whole-number float too), at most USAGE_MAX: a larger one is
    that much, never "unstated" (a reservation would shrink to the default)."""
    if type(value) is float and value.is_integer() and value >= 0:
        return int(min(value, USAGE_MAX))
    return min(value, USAGE_MAX) if type(value) is int and value >= 0 else None


def web_searches_at_most(obj: object) -> int:
    """Web searches an Anthropic request allows its model (each billed apart from the tokens):
    every web search tool's max_uses, WEB_SEARCH_USES for one that sets none."""
    tools = obj.get("tools") if isinstance(obj, dict) else None
    if not isinstance(tools, list):
        return 0
    return sum(_tokens(t.get("max_uses")) or WEB_SEARCH_USES for t in tools
               if isinstance(t, dict) and str(t.get("type", "")).startswith("web_search"))


class Price:
    """USD per million tokens for one model family. Audio tokens have prices of their own, which
    no built-in entry holds: a call that reports them costs null unless the config gives both."""
    __slots__ = PRICE_FIELDS

    def __init__(self, input: float, output: float, cache_write_5m: float | None = None,
                 cache_write_1h: float | None = None, cache_read: float | None = None,
                 audio_input: float | None = None, audio_output: float | None = None) -> None:
        self.input = input
        self.output = output
        self.cache_write_5m = input * 1.25 if cache_write_5m is None else cache_write_5m
        self.cache_write_1h = input * 2.0 if cache_write_1h is None else cache_write_1h
        self.cache_read = input * 0.1 if cache_read is None else cache_read
        self.audio_input = audio_input
        self.audio_output = audio_output

    def cost(self, u: Usage) -> float | None:
        cost = (u.input * self.input + u.output * self.output
                + u.cache_write_5m * self.cache_write_5m + u.cache_write_1h * self.cache_write_1h
                + u.cache_read * self.cache_read) / 1_000_000 + u.web_searches * WEB_SEARCH_USD
        if u.audio_in or u.audio_out:  # (counted in input and output at text rates so far)
            if self.audio_input is None or self.audio_output is None:
                return None
            cost += (min(u.audio_in, u.input) * (self.audio_input - self.input)
                     + min(u.audio_out, u.output) * (self.audio_output - self.output)) / 1e6
        return cost


# Built-in list prices (USD per million tokens): input, output, cache write 5m, cache write 1h,
# cache read (and audio input, audio output where the model takes audio). Standard tier, no batch or long-context surcharges. Compiled 2026-11-27 from the
# providers' pricing pages; OpenAI bills cache writes only from GPT-5.6 on (earlier: = input).
# Override or extend with [pricing."<model>"] in the config.
BUILTIN_PRICES = (
    ("claude-fable-5-1", 10, 50, 12.5, 20, 0.25),
    ("claude-mythos-5-1", 10, 50, 12.5, 20, 0.25),
    ("claude-fable-5", 10, 50, 12.5, 20, 1.0),
    ("claude-mythos-5", 10, 50, 12.5, 20, 1.0),
    ("claude-opus-5-5", 4, 20, 5, 8, 0.2),
    ("claude-opus-5", 5, 25, 6.25, 10, 0.5),
    ("claude-opus-4-8", 5, 25, 6.25, 10, 0.5),
    ("claude-opus-4-7", 5, 25, 6.25, 10, 0.5),
    ("claude-opus-4-6", 5, 25, 6.25, 10, 0.5),
    ("claude-opus-4-5", 5, 25, 6.25, 10, 0.5),
    ("claude-opus-4-1", 15, 75, 18.75, 30, 1.5),
    ("claude-opus-4", 15, 75, 18.75, 30, 1.5),
    ("claude-sonnet-5-5", 2, 10, 2.5, 4, 0.1),
    ("claude-sonnet-5", 2, 10, 2.5, 4, 0.2),
    ("claude-sonnet-4-6", 3, 15, 3.75, 6, 0.3),
    ("claude-sonnet-4-5", 3, 15, 3.75, 6, 0.3),
    ("claude-sonnet-4", 3, 15, 3.75, 6, 0.3),
    ("claude-3-7-sonnet", 3, 15, 3.75, 6, 0.3),
    ("claude-3-5-sonnet", 3, 15, 3.75, 6, 0.3),
    ("claude-haiku-5-5", 0.1, 0.5, 0.125, 0.2, 0.01),
    ("claude-haiku-4-5", 1, 5, 1.25, 2, 0.1),
    ("claude-3-5-haiku", 0.8, 4, 1, 1.6, 0.08),
    ("claude-3-opus", 15, 75, 18.75, 30, 1.5),
    ("claude-3-haiku", 0.25, 1.25, 0.3, 0.5, 0.03),
    ("gpt-6.2-sol", 2, 10, 2.5, 2.5, 0.1),
    ("gpt-6.1-sol", 2, 10, 2.5, 2.5, 0.1),
    ("gpt-6-sol", 2, 10, 2.5, 2.5, 0.2),
    ("gpt-6-luna", 0.1, 0.5, 0.125, 0.125, 0.01),
    ("gpt-6-astra", 10, 50, 12.5, 12.5, 1),
    ("gpt-5.6-sol", 4, 20, 5, 5, 0.4),
    ("gpt-5.6-terra", 2, 12, 2.5, 2.5, 0.2),
    ("gpt-5.6-luna", 0.2, 1.2, 0.25, 0.25, 0.02),
    ("gpt-5.5-pro", 30, 180, 30, 30, 30),
    ("gpt-5.5", 5, 30, 5, 5, 0.5),
    ("gpt-5.4-mini", 0.75, 4.5, 0.75, 0.75, 0.075),
    ("gpt-5.4-nano", 0.2, 1.25, 0.2, 0.2, 0.02),
    ("gpt-5.4", 2.5, 15, 2.5, 2.5, 0.25),
    ("gpt-5.3-codex", 1.75, 14, 1.75, 1.75, 0.175),
    ("gpt-5.2", 1.75, 14, 1.75, 1.75, 0.175),
    ("gpt-5.1", 1.25, 10, 1.25, 1.25, 0.125),
    ("gpt-5-codex", 1.25, 10, 1.25, 1.25, 0.125),
    ("gpt-5-pro", 15, 120, 15, 15, 15),
    ("gpt-5-mini", 0.25, 2, 0.25, 0.25, 0.025),
    ("gpt-5-nano", 0.05, 0.4, 0.05, 0.05, 0.005),
    ("gpt-5", 1.25, 10, 1.25, 1.25, 0.125),
    # fine-tuned models (ft:<base>:<org>::<id>) have prices of their own
    ("ft:gpt-4.1-mini", 0.8, 3.2, 0.8, 0.8, 0.2),
    ("ft:gpt-4.1-nano", 0.2, 0.8, 0.2, 0.2, 0.05),
    ("ft:gpt-4.1", 3, 12, 3, 3, 0.75),
    ("ft:gpt-4o-mini", 0.3, 1.2, 0.3, 0.3, 0.15),
    ("ft:gpt-4o", 3.75, 15, 3.75, 3.75, 1.875),
    ("ft:gpt-3.5-turbo", 3, 6, 3, 3, 3),
    ("gpt-4.1-mini", 0.4, 1.6, 0.4, 0.4, 0.1),
    ("gpt-4.1-nano", 0.1, 0.4, 0.1, 0.1, 0.025),
    ("gpt-4.1", 2, 8, 2, 2, 0.5),
    ("gpt-4o-mini-search-preview", 0.15, 0.6, 0.15, 0.15, 0.15),  # (its per-search fee:
    ("gpt-4o-search-preview", 2.5, 10, 2.5, 2.5, 2.5),  # not modelled)
    ("gpt-4o-mini-audio-preview", 0.15, 0.6, 0.15, 0.15, 0.15, 10, 20),  # (then audio tokens)
    ("gpt-4o-audio-preview", 2.5, 10, 2.5, 2.5, 2.5, 40, 80),
    ("gpt-4o-mini-realtime-preview", 0.6, 2.4, 0.6, 0.6, 0.3, 10, 20),
    ("gpt-4o-realtime-preview", 5, 20, 5, 5, 2.5, 40, 80),
    ("gpt-4o-mini", 0.15, 0.6, 0.15, 0.15, 0.075),
    ("gpt-4o-2024-05-13", 5, 15, 5, 5, 5),
    ("gpt-4o", 2.5, 10, 2.5, 2.5, 1.25),
    ("o1-pro", 150, 600, 150, 150, 150),
    ("o1-mini", 1.1, 4.4, 1.1, 1.1, 0.55),
    ("o1", 15, 60, 15, 15, 7.5),
    ("o3-pro", 20, 80, 20, 20, 20),
    ("o3-deep-research", 10, 40, 10, 10, 2.5),
    ("o4-mini-deep-research", 2, 8, 2, 2, 0.5),
    ("o3-mini", 1.1, 4.4, 1.1, 1.1, 0.55),
    ("o3", 2, 8, 2, 2, 0.5),
    ("o4-mini", 1.1, 4.4, 1.1, 1.1, 0.275),
    ("gpt-4-turbo", 10, 30, 10, 10, 10),
    ("gpt-3.5-turbo-instruct", 1.5, 2, 1.5, 1.5, 1.5),
    ("gpt-3.5-turbo", 0.5, 1.5, 0.5, 0.5, 0.5),
    ("text-embedding-3-small", 0.02, 0, 0.02, 0.02, 0.02),  # (input only)
    ("text-embedding-3-large", 0.13, 0, 0.13, 0.13, 0.13),
    ("text-embedding-ada-002", 0.1, 0, 0.1, 0.1, 0.1),
)
_MODEL_BOUNDARY = "-@:[_"  # a prefix must end where the id's next part begins
# Words that make a variant with prices of its own (audio, realtime, per-call fees, a longer
# context): after a family's prefix they stop the id taking the family's price (null instead,
# unless an entry names the variant), so gpt-4o-realtime-preview is never priced as gpt-4o.
_PRICED_APART = re.compile(r"[-_.](?:realtime|audio|transcribe|tts|instruct|deep-research|"
                           r"search|computer-use|image|16k|32k)(?![a-z])")


class PriceTable:
    """Longest-prefix price lookup on model ids (a dated id takes its family's entry, never a
    shorter unrelated one: gpt-4o-mini-2024-07-18 is gpt-4o-mini, gpt-5.1 is not gpt-5)."""

    def __init__(self, overrides: types.MappingProxyType | dict | None = None,
                 warn=None) -> None:
        self.prices: dict[str, Price] = {row[0]: Price(*row[1:]) for row in BUILTIN_PRICES}
        for model, entry in (overrides or {}).items():
            self.prices[model] = Price(**dict(entry))
        self.builtin = frozenset(row[0] for row in BUILTIN_PRICES)  # (an entry overriding
        # one prices the family anew, not its variants)
        self._memo: dict[str, Price | None] = {}
        self._warned: set[str] = set()
        self._warn = warn

    def lookup(self, model: str) -> Price | None:
        try:
            return self._memo[model]
        except KeyError:
            pass
        found = self._find(model)
        if found is None and "/" in model:  # "anthropic/claude-..." style ids of routers
            found = self._find(model.rsplit("/", 1)[1])
        if len(self._memo) < 4096:
            self._memo[model] = found
        return found

    def _find(self, model: str) -> Price | None:
        best = ""
        for prefix in self.prices:
            if len(prefix) > len(best) and model.startswith(prefix) and (
                    len(model) == len(prefix) or model[len(prefix)] in _MODEL_BOUNDARY):
                best = prefix
        if not best:
            return None
        if best in self.builtin:  # (a family tokenman's table holds; the operator's own
            end = model.find(":", len(best))  # entries price what they match; a fine-tune's
            if _PRICED_APART.search(model, len(best) - 1, len(model) if end < 0 else end):
                return None  # :org:name: suffix is its name, not a variant)
        return self.prices[best]

    def cost(self, model: str, usage: Usage) -> float | None:
        """USD for the usage; None (not 0) when the model has no price, warned once per model."""
        price = self.lookup(model)
        if price is None:
            if not (usage.input or usage.output or usage.cache_read or usage.cache_write):
                return 0.0
            if model not in self._warned and len(self._warned) < 1024:
                self._warned.add(model)
                if self._warn is not None:
                    self._warn(model)
            return None
        cost = price.cost(usage)
        if cost is None and model not in self._warned and len(self._warned) < 1024:
            self._warned.add(model)  # (audio tokens, which the entry has no price for)
            if self._warn is not None:
                self._warn(model)
        return cost


_DELTA_TEXT_RE = re.compile(
    rb'"(?:text|thinking|partial_json|content|arguments|refusal)":\s*"((?:[^"\\]|\\.)*)"')
# a Responses API delta (response.output_text.delta, .function_call_arguments.delta, ...); the
# .done events and response.completed repeat the whole text and are not kept
_RESPONSE_DELTA_RE = re.compile(rb'"delta":\s*"((?:[^"\\]|\\.)*)"')
_TEXT_KEEP = 2 * 1024 * 1024  # generated text kept per stream for an estimate, at the most
# `"usage": null` as a member of an OpenAI chunk (outside strings a quote is never escaped, so
# this cannot match inside one): what include_usage adds to every chunk before the last
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,')


def strip_null_usage(event: bytes) -> bytes:
    """An OpenAI chunk without the `"usage": null` that include_usage put there: for clients
    that did not ask for usage, which tokenman asked for on their behalf."""
    if b'"usage"' not in event:
        return event
    return _NULL_USAGE.sub(b"", event)


_FINISHED_RE = re.compile(rb'"finish_reason"\s*:\s*"')
# The Responses API's terminal events, and the number each event carries
_RESPONSE_END_RE = re.compile(rb'"type"\s*:\s*"response\.(?:completed|incomplete|failed)"')
_SEQUENCE_RE = re.compile(rb'"sequence_number"\s*:\s*([0-9]{1,18})')


class StreamMeter:
    """Follows one SSE stream beside the relay: model, usage (last value wins), generated text
    for an estimate if the stream is cut short, and provider error events. Only the few event
    kinds that carry usage are parsed as JSON; content deltas are scanned with one regex."""
    __slots__ = ("api", "usage", "model", "pieces", "kept", "error", "complete", "ended",
                 "drop_usage_chunk", "events", "errors", "responses", "sequence", "error_status")

    def __init__(self, api: str, drop_usage_chunk: bool = False,
                 responses: bool = False) -> None:
        self.api = api
        self.responses = responses  # a Responses API stream (response.* events)
        self.sequence = -1  # its last event's sequence_number
        self.usage = Usage()
        self.model = ""
        self.pieces: list[bytes] = []
        self.kept = 0
        self.error = ""
        self.error_status = 0  # the HTTP status the error stands for (error_status())
        self.complete = False  # the stream's last event came (message_stop, [DONE], ...)
        self.ended = False  # the answer said how it ended (a stop or finish reason)
        self.drop_usage_chunk = drop_usage_chunk
        self.events = 0  # data events other than pings
        self.errors = 0  # of them error events

    def _keep_text(self, raw: bytes, pattern: re.Pattern = _DELTA_TEXT_RE) -> None:
        if self.kept < _TEXT_KEEP:
            for m in pattern.finditer(raw):
                self.pieces.append(m.group(1))
                self.kept += len(m.group(1))

    def on_event(self, raw: bytes) -> bool:
        """Notes one complete event; False means: do not pass it to the client."""
        if b"data:" in raw and not (raw.startswith((b"event: ping", b"event:ping"))
                                    or b"\nevent: ping" in raw or b"\nevent:ping" in raw):
            self.events += 1  # (what answers: not comments, keep-alives or pings)
        if self.api == API_ANTHROPIC:
            if raw.startswith(b"event: content_block_delta"):
                self._keep_text(raw)
                return True
            name, data = sse_fields(raw)
            if name in (b"message_start", b"message_delta"):
                obj = _loads(data)
                if isinstance(obj, dict):
                    if name == b"message_start":
                        msg = obj.get("message")
                        if isinstance(msg, dict):
                            self.model = str(msg.get("model") or self.model)[
                                :MODEL_NAME_MAX]  # (a provider's id, as a request's is)
                            self.usage.apply_anthropic(msg.get("usage"))
                            self.usage.sides &= ~OUTPUT_SIDE  # (a placeholder: 1 or so; the
                            # count comes with message_delta, estimated if it never does)
                    else:
                        self.usage.apply_anthropic(obj.get("usage"))
                        delta = obj.get("delta")
                        if isinstance(delta, dict) and delta.get("stop_reason"):
                            self.ended = True
            elif name == b"message_stop":
                self.complete = self.ended = True
            elif name == b"error":
                obj = _loads(data)
                self.error = _error_text(obj) or "error event"
                self.error_status = error_status(obj.get("error") if isinstance(obj, dict)
                                                 else None)
                self.errors += 1
            elif name == b"content_block_start":
                self._keep_text(raw)
            return True
        return self._on_openai(raw)

    @staticmethod
    def has_usage(raw: bytes) -> bool:
        """An OpenAI chunk with a usage object (not "usage": null)."""
        u = raw.find(b'"usage"')
        return u >= 0 and raw[u + 7:u + 12].lstrip(b": ")[:1] not in (b"n", b"")

    def _on_openai(self, raw: bytes) -> bool:
        i = raw.find(b"data:")
        if i < 0:
            return True
        if raw.startswith(b"[DONE]", i + 5 + (raw[i + 5:i + 6] == b" ")):
            self.complete = self.ended = True
            return True
        if b'"finish_reason"' in raw and _FINISHED_RE.search(raw):  # (a reason, not null)
            self.ended = True
        has_usage = self.has_usage(raw)
        final = False
        if self.responses:  # (its last event may carry "usage": null on some servers)
            seq = _SEQUENCE_RE.search(raw)
            if seq:
                self.sequence = int(seq.group(1))
            final = b'"response.' in raw and _RESPONSE_END_RE.search(raw) is not None
        if has_usage or final or not self.model or b'"error"' in raw:
            _, data = sse_fields(raw)
            obj = _loads(data)
            if isinstance(obj, dict) and isinstance(obj.get("response"), dict):
                self._on_response(obj)  # the Responses API: a response.* event
            elif isinstance(obj, dict):
                self.model = self.model or str(obj.get("model") or "")[:MODEL_NAME_MAX]
                if obj.get("error"):
                    self.error = _error_text(obj) or "error event"
                    self.error_status = error_status(obj["error"])
                    self.errors += 1
                elif obj.get("type") == "error":  # the Responses API's own error event
                    self.error = f"{obj.get('code') or 'error'}: {obj.get('message') or ''}"
                    self.error_status = error_status(obj)
                    self.errors += 1
                if has_usage and isinstance(obj.get("usage"), dict):
                    self.usage.apply_openai(obj["usage"])
                    if self.drop_usage_chunk and not obj.get("choices"):  # ([] or null)
                        return False
        if not self.responses:
            self._keep_text(raw)
        elif b'.delta"' in raw:
            self._keep_text(raw, _RESPONSE_DELTA_RE)
        return True

    def _on_response(self, obj: dict) -> None:
        """response.created / .in_progress / .completed / .incomplete / .failed: the model,
        the usage (on the final one) and how the answer ended are inside `response`."""
        resp = obj["response"]
        self.model = self.model or str(resp.get("model") or "")[:MODEL_NAME_MAX]
        if isinstance(resp.get("usage"), dict):
            self.usage.apply_openai(resp["usage"])
        kind = obj.get("type")
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.complete = self.ended = True
        if kind == "response.failed" or resp.get("error"):
            self.error = _error_text(resp) or "response failed"
            self.error_status = error_status(resp.get("error"))

    def estimate_output(self) -> int:
        text = b"".join(self.pieces).decode("utf-8", "replace")
        try:
            text = json.loads('"' + text + '"')
        except ValueError:
            pass
        return estimate_tokens(text)


_ANSWER_TEXT_KEYS = frozenset(("text", "thinking", "content", "arguments", "refusal"))


def answer_text(obj: object, depth: int = 0, out: list | None = None) -> str:
    """What a model generated in a whole answer: the members a stream's deltas carry (text,
    thinking, content, arguments, refusal; a tool call's input as its JSON), so an answer
    without usage is estimated alike buffered or streamed (not its ids, type names or
    signatures)."""
    top = out is None
    out = [] if top else out
    if depth <= 64:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if isinstance(value, str):
                    if key in _ANSWER_TEXT_KEYS:
                        out.append(value)
                elif key == "input" and obj.get("type") in ("tool_use", "server_tool_use"):
                    out.append(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
                elif isinstance(value, (dict, list)):
                    answer_text(value, depth + 1, out)
        elif isinstance(obj, list):
            for value in obj:
                answer_text(value, depth + 1, out)
    return "".join(out) if top else ""


def _loads(data: bytes) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # (JSON nested thousands deep)
        return None


def _error_parts(obj: object, unwrap: bool = True) -> tuple[str, str]:
    """An error body's kind and message, in the shapes servers use: the providers'
    {"error": {...}} (or a bare string), vLLM's {"object": "error", "message": ...}, and
    FastAPI's {"detail": ...} (a string, or a list of {"msg": ...}); ("", "") otherwise."""
    if unwrap and isinstance(obj, list) and obj and isinstance(obj[0], dict):
        return _error_parts(obj[0], False)  # (servers that wrap the error in a list; once:
        # a body nested a thousand deep must not reach the recursion limit)
    if not isinstance(obj, dict):
        return "", ""
    errors = obj.get("errors")
    if unwrap and isinstance(errors, list) and errors and isinstance(errors[0], dict) \
            and "error" not in obj:  # (Cloudflare's {"errors": [{"message": ...}]})
        return _error_parts(errors[0], False)
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("type") or err.get("code") or ""), str(err.get("message") or "")
    if isinstance(err, str):
        return "", err
    if isinstance(obj.get("message"), str):  # (a Responses "error" event: its code)
        kind = obj.get("type") if obj.get("type") != "error" else None
        return str(kind or obj.get("code") or ""), obj["message"]
    detail = obj.get("detail")
    if isinstance(detail, str):
        return "", detail
    if isinstance(detail, list):
        return "", "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d)
                             for d in detail[:10])
    return "", ""


def _error_text(obj: object) -> str:
    kind, message = _error_parts(obj)
    return f"{kind}: {message}" if kind else message


def _is_error_body(obj: dict) -> bool:
    """A whole body that is an error in either API's shape, not an answer (which may carry
    `"error": null`, or a failed Responses API call's error beside its output)."""
    return obj.get("type") == "error" or bool(obj.get("error")) and not any(
        key in obj for key in ("choices", "content", "output", "data"))


def usage_from_body(api: str, obj: object) -> tuple[Usage, str]:
    """Usage and model from a whole (non-streamed) response body."""
    usage = Usage()
    model = ""
    if isinstance(obj, dict):
        usage.apply(api, obj.get("usage"))
        model = str(obj.get("model") or "")[:MODEL_NAME_MAX]
    return usage, model


def media_tokens(part: dict) -> int:
    """Input tokens an image, audio clip or document part may cost: images MEDIA_PART_TOKENS;
    a base64 document or clip by its size (a quarter token per byte, at most DOCUMENT_MAX_TOKENS);
    a document tokenman cannot see (a URL, a file id) DOCUMENT_MAX_TOKENS, the worst case."""
    kind = part["type"]
    if kind in ("image", "image_url", "input_image"):
        return MEDIA_PART_TOKENS
    source = part  # where the bytes are: Anthropic source, OpenAI chat file / input_audio
    for key in ("source", "file", "input_audio"):
        if isinstance(part.get(key), dict):
            source = part[key]
            break
    data = source.get("data", source.get("file_data"))
    if isinstance(data, str):
        return max(MEDIA_PART_TOKENS, min(DOCUMENT_MAX_TOKENS, len(data) * 3 // 16))
    return DOCUMENT_MAX_TOKENS


def estimate_request_tokens(obj: object) -> int:
    """Input tokens of a request from its text-bearing fields, when the provider says nothing;
    media parts count what media_tokens() says, not the length of their base64 as text (a
    text document's text is text)."""
    strings: list[str] = []
    extra = [0]

    def counted(part: dict, depth: int) -> bool:
        kind = part.get("type")
        if type(kind) is not str:
            return False
        if kind in ("tool_use", "server_tool_use"):  # its input is JSON the model wrote: text
            _json_strings(part, strings, depth + 1)
            return True
        if kind not in MEDIA_PARTS:
            return False
        source = part.get("source")
        if kind == "document" and isinstance(source, dict) and source.get("type") in (
                "text", "content"):  # a plain-text document: its text is counted as text
            _json_strings(source.get("data", source.get("content")), strings, depth + 2,
                          counted)
        else:
            extra[0] += media_tokens(part)
        return True
    messages = 0
    if isinstance(obj, dict):
        for key in ("system", "messages", "tools", "input", "prompt", "instructions"):
            if key in obj:  # (tool schemas are text: a property may be named "type")
                _json_strings(obj[key], strings, 0, None if key == "tools" else counted)
        if isinstance(obj.get("messages"), list):
            messages = len(obj["messages"])
    # chat formats add about 4 tokens per message and 3 per request (measured on o200k)
    return estimate_tokens(" ".join(strings)) + extra[0] + 4 * messages + 3

# ================================================================================================
# §11 store: the SQLite request log; one writer thread owns the write connection
# ================================================================================================
# The event loop only puts rows on a queue (a C-level put, never a wait). The writer commits them
# in small batches; when the database refuses (locked, read-only, full) rows stay in a bounded
# in-memory backlog and are retried, so a storage fault never fails or slows a client request.

ROW_COLUMNS = (
    "id", "timestamp", "method", "path", "format", "model", "provider", "project",
    "status_code", "outcome", "streaming", "latency_ms", "ttfb_ms", "overhead_ms",
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "cache_write_5m_tokens", "cache_write_1h_tokens", "reasoning_tokens", "cost_usd",
    "estimated", "error_message", "upstream_request_id", "request_body", "response_body",
    "attempts", "client_request_id", "cache_hit", "tokens_saved", "savings_usd", "pipeline_ms",
    "saved_cache_usd", "saved_prompt_cache_usd", "saved_compression_usd", "saved_heartbeat_usd",
    "compressed_tokens",
)
SAVING_SOURCES = ("cache", "prompt_cache", "compression", "heartbeat")
OUTCOMES = ("ok", "upstream_error", "rejected", "client_closed", "upstream_failed",
            "internal_error", "cache_hit", "heartbeat_hit")
MIGRATIONS = (
    # v1: the request log
    """
    CREATE TABLE IF NOT EXISTS requests (
        id TEXT PRIMARY KEY,
        timestamp TEXT NOT NULL,
        method TEXT NOT NULL DEFAULT '',
        path TEXT NOT NULL DEFAULT '',
        format TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        provider TEXT NOT NULL DEFAULT '',
        project TEXT NOT NULL DEFAULT 'default',
        status_code INTEGER NOT NULL DEFAULT 0,
        outcome TEXT NOT NULL DEFAULT 'ok',
        streaming INTEGER NOT NULL DEFAULT 0,
        latency_ms REAL NOT NULL DEFAULT 0,
        ttfb_ms REAL,
        overhead_ms REAL,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cache_read_tokens INTEGER NOT NULL DEFAULT 0,
        cache_write_tokens INTEGER NOT NULL DEFAULT 0,
        cache_write_5m_tokens INTEGER NOT NULL DEFAULT 0,
        cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0,
        reasoning_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL,
        estimated INTEGER NOT NULL DEFAULT 0,
        error_message TEXT NOT NULL DEFAULT '',
        upstream_request_id TEXT NOT NULL DEFAULT '',
        request_body TEXT,
        response_body TEXT
    );
    CREATE INDEX IF NOT EXISTS idx_requests_timestamp ON requests(timestamp);
    CREATE INDEX IF NOT EXISTS idx_requests_model ON requests(model);
    CREATE INDEX IF NOT EXISTS idx_requests_project ON requests(project, timestamp);
    """,
    # v2: upstream attempts (retries, fallback) and the client's own X-Request-Id
    """
    ALTER TABLE requests ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN client_request_id TEXT NOT NULL DEFAULT '';
    """,
    # v3: the policy pipeline: cache, detections, budgets
    """
    ALTER TABLE requests ADD COLUMN cache_hit INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN tokens_saved INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN savings_usd REAL NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN pipeline_ms REAL;
    CREATE TABLE IF NOT EXISTS cache (
        key TEXT PRIMARY KEY,
        created REAL NOT NULL,
        expires REAL NOT NULL,
        model TEXT NOT NULL DEFAULT '',
        status INTEGER NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL
    );
    CREATE INDEX IF NOT EXISTS idx_cache_expires ON cache(expires);
    CREATE TABLE IF NOT EXISTS pii_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        timestamp TEXT NOT NULL,
        pii_type TEXT NOT NULL,
        action TEXT NOT NULL,
        field_path TEXT NOT NULL DEFAULT '',
        context TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX IF NOT EXISTS idx_pii_timestamp ON pii_log(timestamp);
    CREATE TABLE IF NOT EXISTS injection_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        timestamp TEXT NOT NULL,
        category TEXT NOT NULL,
        pattern TEXT NOT NULL,
        action TEXT NOT NULL,
        field_path TEXT NOT NULL DEFAULT '',
        context TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX IF NOT EXISTS idx_injection_timestamp ON injection_log(timestamp);
    CREATE TABLE IF NOT EXISTS budgets (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        period_start TEXT NOT NULL,
        spent_usd REAL NOT NULL DEFAULT 0,
        limit_usd REAL NOT NULL DEFAULT 0,
        last_updated TEXT NOT NULL,
        PRIMARY KEY (scope, period, period_start)
    );
    CREATE TABLE IF NOT EXISTS budget_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        timestamp TEXT NOT NULL,
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        period_start TEXT NOT NULL,
        threshold REAL NOT NULL,
        spent_usd REAL NOT NULL,
        limit_usd REAL NOT NULL
    );
    """,
    # v4: savings by source
    """
    ALTER TABLE requests ADD COLUMN saved_cache_usd REAL NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN saved_prompt_cache_usd REAL NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN saved_compression_usd REAL NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN saved_heartbeat_usd REAL NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN compressed_tokens INTEGER NOT NULL DEFAULT 0;
    """,
)
_INSERT_SQL = (f"INSERT OR IGNORE INTO requests ({', '.join(ROW_COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(ROW_COLUMNS))})")
_STOP = object()


def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True,
                               timeout=5.0, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, timeout=1.0, isolation_level=None, check_same_thread=False)
        # WAL with NORMAL: a commit survives a crash of tokenman; only a power loss can take
        # the last few (FULL would fsync every commit)
        conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = %d" % (5000 if readonly else 1000))
    return conn


def open_database(data_dir: str) -> str:
    """Creates the data dir (0700) and database file (0600), migrates; returns the path."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    try:
        os.chmod(data_dir, 0o700)
    except OSError:
        pass
    path = os.path.join(data_dir, "tokenman.db")
    init_database(path)
    return path


def init_database(path: str) -> None:
    """Creates the database file (0600) if needed and migrates it to the current schema."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    conn = _connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn)
    finally:
        conn.close()
    for suffix in ("", "-wal", "-shm"):
        try:
            os.chmod(path + suffix, 0o600)
        except OSError:
            pass


def migrate(conn: sqlite3.Connection) -> None:
    """Brings a database to the current schema (MIGRATIONS past its user_version)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(MIGRATIONS, start=1):
        if number > version:
            conn.executescript("BEGIN IMMEDIATE;" + script
                               + f"PRAGMA user_version = {number}; COMMIT;")


def _row_fault(exc: Exception) -> bool:
    """A row's own fault (a value no column can take: a lone surrogate, an int past 64 bits, a
    wrong number of values; a constraint it breaks; a table or column it names that is not
    there), as opposed to a fault of the database or the connection, which a retry may cure."""
    if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return "binding" in str(exc) or "unsupported type" in str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return "no such table" in str(exc) or "has no column" in str(exc)
    return isinstance(exc, (ValueError, TypeError, OverflowError))


def _storable(row: tuple) -> tuple:
    """A row SQLite can bind: text with a lone surrogate gets "?" for it, an integer past 64
    bits and any other object become text."""
    out = []
    for value in row:
        if isinstance(value, str):
            value = value.encode("utf-8", "replace").decode()
        elif isinstance(value, int) and not -2**63 <= value < 2**63:
            value = str(value)
        elif value is not None and not isinstance(value, (int, float, bytes)):
            value = str(value)
        out.append(value)
    return tuple(out)


class Store:
    """The request log: rows in through record(), read through query() on other connections."""

    def __init__(self, path: str, log: Logger, max_pending: int = STORE_MAX_PENDING) -> None:
        self.path = path
        self.log = log
        self.max_pending = max_pending
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: collections.deque = collections.deque()  # rows waiting for a write
        self._thread: threading.Thread | None = None
        self.errors = 0      # failed write attempts
        self.dropped = 0     # rows given up because the backlog was full
        self.written = 0     # rows committed
        self.backlog = 0     # rows waiting for a retry
        self.last_error = ""
        self._ident: tuple | None = None  # (device, inode) of the file the writer has open
        self._stop_by = 0.0  # (monotonic) until when close() lets failed writes be retried

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tokenman-store", daemon=True)
        self._thread.start()

    def record(self, row: tuple) -> None:
        """Queues one request row (a tuple in ROW_COLUMNS order). Never blocks or raises."""
        self._q.put((_INSERT_SQL, row))

    def write(self, sql: str, row: tuple) -> None:
        """Queues any other insert or upsert; written in order with the request rows."""
        self._q.put((sql, row))

    def submit(self, job) -> None:
        """Runs job(connection) on the writer thread (maintenance such as pruning)."""
        self._q.put(job)

    def flush(self, timeout: float = 10.0) -> bool:
        """Blocks (call from a worker thread) until all queued rows were attempted."""
        done = threading.Event()
        self._q.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Writes what is queued and stops the writer; rows a write could not take yet (a
        database locked for a moment) are tried again for up to `timeout` seconds."""
        if self._thread is not None and self._thread.is_alive():
            self._stop_by = time.monotonic() + max(0.0, timeout - STORE_RETRY_SECONDS)
            self._q.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                self._loop()
                return
            except Exception as exc:  # never let the writer die: log and start over
                self.errors += 1
                self.log.error("request log writer crashed; restarting",
                               error=f"{type(exc).__name__}: {exc}")
                time.sleep(STORE_RETRY_SECONDS)

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        pending: collections.deque = self._pending
        events: list[threading.Event] = []
        stopping = False
        while True:
            try:
                item = self._q.get(timeout=STORE_RETRY_SECONDS if pending else None)
            except queue.Empty:
                item = None
            if isinstance(item, tuple):  # let a batch gather: one commit for many rows, and
                time.sleep(STORE_GATHER_SECONDS)  # no thread wake-up per row under load
            while item is not None:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, tuple):
                    pending.append(item)
                elif isinstance(item, threading.Event):
                    events.append(item)
                elif callable(item):  # rows queued before a job are written before it runs
                    if pending:
                        conn = self._write(conn, pending)
                    conn = self._job(conn, item)
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    item = None
            if pending:
                conn = self._write(conn, pending)
            for event in events:
                event.set()
            events.clear()
            if stopping:
                while pending and time.monotonic() < self._stop_by:
                    time.sleep(STORE_RETRY_SECONDS)  # (the writer's thread: nothing waits on it
                    conn = self._write(conn, pending)  # but the shutdown, bounded)
                if pending:
                    self.log.error("request log rows lost at shutdown", rows=len(pending),
                                   error=self.last_error)
                if conn is not None:
                    conn.close()
                return

    def _write(self, conn: sqlite3.Connection | None, pending: collections.deque):
        single = 0  # rows to write one at a time: their batch held a row no repair could fix
        while pending:
            batch = [pending[i] for i in range(min(1 if single else STORE_BATCH, len(pending)))]
            groups: dict[str, list[tuple]] = {}
            for sql, row in batch:
                groups.setdefault(sql, []).append(row)
            try:
                conn = self._connection(conn)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for sql, rows in groups.items():
                        conn.executemany(sql, rows)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # SQLITE_FULL and friends roll back by themselves
                        conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError, ValueError, TypeError, OverflowError) as exc:
                if _row_fault(exc):
                    fixed = [(sql, _storable(row)) for sql, row in batch]
                    if fixed != batch:  # (a lone surrogate from a client, an int past 64 bits)
                        for i, item in enumerate(fixed):
                            pending[i] = item
                    elif len(batch) > 1:  # find the rows at fault; the others are written
                        single = len(batch)
                    else:  # no repair: dropped rather than stalling every row behind it
                        pending.popleft()
                        single = max(0, single - 1)
                        self.dropped += 1
                        self.log.error("request log row dropped: a value cannot be stored",
                                       error=f"{type(exc).__name__}: {exc}")
                    continue
                self.errors += 1  # the database's or the connection's fault (OSError: making
                # a deleted file again): rows wait for a retry
                if self.last_error != str(exc) or self.errors % 100 == 1:
                    self.log.error("request log write failed; rows kept for retry",
                                   error=str(exc), backlog=len(pending))
                self.last_error = str(exc)
                while len(pending) > self.max_pending:
                    pending.popleft()
                    self.dropped += 1
                self.backlog = len(pending)
                if conn is not None:
                    conn.close()  # reopen next time: the fault may have been the connection's
                return None
            for _ in batch:
                pending.popleft()
            self.written += len(batch)
            single = max(0, single - len(batch))
        if self.backlog:
            self.log.info("request log writes recovered", written=self.written)
        self.backlog = 0
        return conn

    def _connection(self, conn: sqlite3.Connection | None) -> sqlite3.Connection:
        """The writer's connection, opened again when the file it writes to was deleted or
        replaced (a cleaned data dir, a restored backup): rows written to an unlinked file
        are lost at the next start."""
        if self.path == ":memory:" or self.path.startswith("file:"):  # (not a file to watch)
            if conn is None:
                conn = _connect(self.path)
                migrate(conn)
            return conn
        try:
            st = os.stat(self.path)
            ident = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            ident = None
        if conn is not None and ident == self._ident:
            return conn
        if conn is not None:
            conn.close()
            self.errors += 1
            self.log.error("request log database was deleted or replaced; opening it again",
                           path=self.path, exists=ident is not None)
        if ident is None:  # make it again, schema and all; an old journal must not replay into it
            for suffix in ("-wal", "-shm"):
                try:
                    os.unlink(self.path + suffix)
                except FileNotFoundError:
                    pass
            init_database(self.path)
            st = os.stat(self.path)
            ident = (st.st_dev, st.st_ino)
        conn = _connect(self.path)
        self._ident = ident
        return conn

    def _job(self, conn: sqlite3.Connection | None, job) -> sqlite3.Connection | None:
        try:
            conn = self._connection(conn)
            job(conn)
        except Exception as exc:  # a maintenance job never kills the writer
            self.errors += 1
            self.log.error("request log maintenance failed", error=str(exc))
        return conn

    # -- reading (any thread; each call opens its own read-only connection) ---------------------
    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        conn = _connect(self.path, readonly=True)
        try:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def ping(self) -> str:
        """"" when the database answers, else the error text."""
        try:
            self.query("SELECT 1")
            return ""
        except sqlite3.Error as exc:
            return str(exc)


def prune_job(retention_days: int, now: float):
    """A writer job deleting rows older than the retention period."""
    cutoff = utc_iso(now - retention_days * 86400)

    def job(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM requests WHERE timestamp < ?", (cutoff,))
        conn.execute("DELETE FROM pii_log WHERE timestamp < ?", (cutoff,))
        conn.execute("DELETE FROM injection_log WHERE timestamp < ?", (cutoff,))
        conn.execute("DELETE FROM budget_events WHERE timestamp < ?", (cutoff,))
    return job


STATS_GROUPS = types.MappingProxyType({"model": "model", "provider": "provider",
                                       "project": "project", "outcome": "outcome"})


def usage_summary(store: Store, since: float, by: str) -> list[dict]:
    """Requests, tokens and cost per group since a time (the `stats` command and the API)."""
    column = STATS_GROUPS[by]
    rows = store.query(
        f"SELECT {column} AS grp, COUNT(*) AS requests, SUM(input_tokens) AS input_tokens, "
        "SUM(output_tokens) AS output_tokens, SUM(cache_read_tokens) AS cache_read_tokens, "
        "SUM(cache_write_tokens) AS cache_write_tokens, SUM(cost_usd) AS cost_usd, "
        "SUM(cost_usd IS NULL AND (input_tokens + output_tokens) > 0) AS unpriced, "
        "SUM(savings_usd) AS savings_usd, SUM(saved_cache_usd) AS saved_cache, "
        "SUM(saved_prompt_cache_usd) AS saved_prompt_cache, "
        "SUM(saved_compression_usd) AS saved_compression, "
        "SUM(saved_heartbeat_usd) AS saved_heartbeat, "
        "SUM(estimated) AS estimated, SUM(status_code >= 400 OR outcome NOT IN "
        "('ok', 'cache_hit', 'heartbeat_hit')) AS errors "
        f"FROM requests WHERE timestamp >= ? GROUP BY {column} ORDER BY cost_usd DESC, "
        "requests DESC", (utc_iso(since),))
    return [{by: r["grp"], "requests": r["requests"], "input_tokens": r["input_tokens"] or 0,
             "output_tokens": r["output_tokens"] or 0,
             "cache_read_tokens": r["cache_read_tokens"] or 0,
             "cache_write_tokens": r["cache_write_tokens"] or 0,
             "cost_usd": round(r["cost_usd"] or 0.0, 8), "unpriced_requests": r["unpriced"] or 0,
             "savings_usd": round(r["savings_usd"] or 0.0, 8),
             "savings_by_source": {s: round(r["saved_" + s] or 0.0, 8) for s in SAVING_SOURCES},
             "estimated_requests": r["estimated"] or 0, "errors": r["errors"] or 0}
            for r in rows]

# ================================================================================================
# §12 observability: metrics (Prometheus text exposition 0.0.4) and tracing (OTLP/HTTP JSON)
# ================================================================================================

REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STAGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)
METRICS_HELP = types.MappingProxyType({
    "tokenman_requests_total": ("counter", "Requests proxied (every outcome)."),
    "tokenman_tokens_in_total": ("counter", "Input tokens, cache reads and writes included."),
    "tokenman_tokens_out_total": ("counter", "Output tokens."),
    "tokenman_tokens_saved_total": ("counter", "Tokens not sent: cache hits and compression."),
    "tokenman_tokens_total": ("counter", "Tokens by provider, model and kind."),
    "tokenman_cost_usd_total": ("counter", "Cost in USD by provider, model and project."),
    "tokenman_savings_usd_total": ("counter", "USD saved by source (requests that saved)."),
    "tokenman_savings_cost_usd_total": ("counter", "USD a saving cost where it cost more than it "
                                        "saved (prompt-cache writes, summary calls), by source; "
                                        "net savings are the difference."),
    "tokenman_savings_percent": ("gauge", "Savings as a percent of cost plus savings."),
    "tokenman_cache_hits_total": ("counter", "Requests answered from the response cache or "
                                             "the heartbeat."),
    "tokenman_cache_misses_total": ("counter", "Requests the cache looked up and could not "
                                               "answer."),
    "tokenman_cache_hit_rate": ("gauge", "Cache hits as a percent of hits plus misses."),
    "tokenman_active_requests": ("gauge", "Requests in flight."),
    "tokenman_uptime_seconds": ("gauge", "Seconds since start."),
    "tokenman_errors_total": ("counter", "Requests that did not end ok, by type."),
    "tokenman_request_duration_seconds": ("histogram", "Request latency."),
    "tokenman_provider_requests_total": ("counter", "Upstream attempts by outcome."),
    "tokenman_provider_circuit_state": ("gauge", "0 closed, 1 open, 2 half-open."),
    "tokenman_middleware_duration_seconds": ("histogram", "Time spent in each stage."),
    "tokenman_budget_spend_usd": ("gauge", "Spend in the current budget period."),
    "tokenman_pii_detections_total": ("counter", "PII detections by type and action."),
    "tokenman_injection_detections_total": ("counter", "Injection detections."),
    "tokenman_store_errors_total": ("counter", "Failed request-log writes."),
    "tokenman_store_backlog_rows": ("gauge", "Request-log rows waiting for a write to succeed."),
    "tokenman_store_dropped_rows_total": ("counter", "Request-log rows given up (backlog full, "
                                                     "or a value that cannot be stored)."),
    "tokenman_log_dropped_lines_total": ("counter", "Log lines dropped: the log was not read "
                                                    "fast enough."),
    "tokenman_trace_spans_total": ("counter", "Spans exported, or dropped (the collector slow, "
                                              "down or refusing)."),
    "tokenman_build_info": ("gauge", "Version and Python of this process."),
})
MODEL_LABEL_CAP = 100  # distinct model (and project) label values; later ones are "other"
# tokenman_errors_total's type: the reference's parse, budget, ratelimit, pipeline and upstream;
# a stage's refusal is named by its stage (budget, ratelimit, pii, injection, ...)
_ERROR_TYPES = types.MappingProxyType({
    "upstream_error": "upstream", "upstream_failed": "upstream", "internal_error": "pipeline",
    "client_closed": "client_closed"})
_PARSE_STATUSES = frozenset((400, 411, 413, 414, 415, 431))
_CLIENT_FAULTS = frozenset((400, 404, 409, 413, 422))  # a provider refusing a request


def _capped(seen: set[str], name: str, admit: bool = True) -> str:
    if name in seen:
        return name
    if admit and len(seen) < MODEL_LABEL_CAP:
        seen.add(name)
        return name
    return "other"


def net_savings(m: "Metrics") -> float:
    """USD saved less what savings cost (both counters only go up)."""
    return m.total("tokenman_savings_usd_total") - m.total("tokenman_savings_cost_usd_total")


def _label_value(value: object) -> str:
    text = str(value)
    if not text.isascii():  # a lone surrogate (from a client's model name) is no UTF-8: "?"
        text = text.encode("utf-8", "replace").decode()
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Histogram:
    """Per-bucket counts; exported cumulatively once (never double-cumulative)."""
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """Counters, gauges and histograms keyed by (name, label names, label values)."""

    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.started = clock()
        self.values: dict[tuple, float] = {}
        self.histograms: dict[tuple, Histogram] = {}
        self.models: set[str] = set()
        self.projects: set[str] = set()
        self.gauges = []  # callables returning [(name, labels dict, value)] at render time

    def model(self, name: str, answered: bool = True) -> str:
        """The model label value, folded into "other" past the cardinality cap. A model takes
        a label of its own once a provider answered for it: names a provider refused (any
        client can send a hundred) never fill the slots."""
        return _capped(self.models, name, answered)

    def project(self, name: str) -> str:
        """The project label value (any client can name one): capped the same way; projects
        with a budget have theirs before any client names one (seen())."""
        return _capped(self.projects, name)

    def seen(self, projects) -> None:
        """Gives these projects label values of their own first (at start and reload)."""
        for name in projects:
            _capped(self.projects, name)

    def inc(self, name: str, labels: tuple = (), value: float = 1.0) -> None:
        key = (name, labels)
        self.values[key] = self.values.get(key, 0.0) + value

    def get(self, name: str, labels: tuple = ()) -> float:
        return self.values.get((name, labels), 0.0)

    def total(self, name: str) -> float:
        return sum(v for (n, _), v in self.values.items() if n == name)

    def histogram(self, name: str, labels: tuple, bounds: tuple) -> Histogram:
        """The histogram of one series (made on first use); hot paths keep it."""
        hist = self.histograms.get((name, labels))
        if hist is None:
            hist = self.histograms[(name, labels)] = Histogram(bounds)
        return hist

    def observe(self, name: str, labels: tuple, value: float, bounds: tuple) -> None:
        self.histogram(name, labels, bounds).observe(value)

    def render(self) -> bytes:
        """Prometheus text exposition format 0.0.4."""
        series: dict[str, list[str]] = {}

        def labels_text(pairs) -> str:
            pairs = sorted(pairs)
            return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in pairs) + "}" \
                if pairs else ""
        for (name, labels), value in self.values.items():
            series.setdefault(name, []).append(f"{name}{labels_text(labels)} {_number(value)}")
        for gauge in self.gauges:
            for name, labels, value in gauge():
                series.setdefault(name, []).append(
                    f"{name}{labels_text(labels.items())} {_number(value)}")
        for (name, labels), hist in self.histograms.items():
            lines = series.setdefault(name, [])
            running = 0
            for bound, count in zip(hist.bounds + (float("inf"),), hist.counts):
                running += count
                lines.append(f"{name}_bucket{labels_text(labels + (('le', _number(bound)),))}"
                             f" {running}")
            lines.append(f"{name}_sum{labels_text(labels)} {_number(hist.sum)}")
            lines.append(f"{name}_count{labels_text(labels)} {hist.count}")
        out = []
        for name in sorted(series):
            kind, text = METRICS_HELP.get(name, ("untyped", name))
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"] + series[name]
        return ("\n".join(out) + "\n").encode()



# -- tracing: W3C trace context in and out, spans exported as OTLP/HTTP JSON --------------------

# W3C Trace Context: version-traceid-parentid-flags; a later version may append fields
_TRACEPARENT_RE = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
SPAN_SERVER, SPAN_CLIENT, SPAN_INTERNAL = 2, 3, 1


class Trace:
    """The spans of one request: a server span (child of the client's traceparent), its
    stages and upstream calls. Times are wall-clock nanoseconds."""
    __slots__ = ("trace_id", "parent_id", "span_id", "start_ns", "t0", "spans", "attrs")

    def __init__(self, trace_id: str, parent_id: str, t0: float) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.span_id = os.urandom(8).hex()
        self.start_ns = time.time_ns() - int((time.perf_counter() - t0) * 1e9)
        self.t0 = t0
        self.spans: list[dict] = []
        self.attrs: dict[str, object] = {}

    def ns(self, perf: float) -> int:
        return self.start_ns + int((perf - self.t0) * 1e9)

    def child(self, name: str, start: float, end: float, kind: int = SPAN_INTERNAL,
              attrs: dict | None = None, span_id: str = "", error: bool = False) -> str:
        span_id = span_id or os.urandom(8).hex()
        self.spans.append({"name": name, "spanId": span_id, "parentSpanId": self.span_id,
                           "kind": kind, "start": self.ns(start), "end": self.ns(end),
                           "attrs": attrs or {}, "error": error})
        return span_id

    def traceparent(self, span_id: str) -> bytes:
        return f"00-{self.trace_id}-{span_id}-01".encode()


def _otlp_value(value: object) -> dict:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}  # int64 travels as a string in OTLP JSON
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": str(value)}


def _otlp_attrs(attrs: dict) -> list[dict]:
    return [{"key": k, "value": _otlp_value(v)} for k, v in attrs.items() if v is not None]


class Tracer:
    """Samples requests, builds their spans and exports them in the background: OTLP/HTTP with
    JSON encoding (POST {endpoint}) or JSON lines on stdout. A bounded queue: when the
    collector is slow or down, spans are dropped and counted, never waited for."""

    def __init__(self, cfg: "TracingConfig", log: Logger, rng=random.random) -> None:
        self.cfg = cfg
        self.log = log
        self.rng = rng
        self.queue: collections.deque = collections.deque()
        self.dropped = 0
        self.exported = 0
        self.max_queue = 4096
        self.export_timeout = 10.0  # seconds for the collector's whole answer

    def start(self, req: Request) -> Trace | None:
        """A Trace for this request when it is sampled (the client's decision wins)."""
        m = _TRACEPARENT_RE.fullmatch(req.headers.map.get(b"traceparent", b"").strip())
        if m is not None and m.group(1) != b"ff" and not (m.group(1) == b"00" and m.group(5)) \
                and m.group(2).strip(b"0") and m.group(3).strip(b"0"):  # (all-zero ids: none)
            if not int(m.group(4), 16) & 1:
                return None
            return Trace(m.group(2).decode(), m.group(3).decode(), req.t0)
        if self.rng() >= self.cfg.sample_rate:
            return None
        return Trace(os.urandom(16).hex(), "", req.t0)

    def finish(self, trace: Trace, name: str, end: float, error: bool) -> None:
        spans = [{"name": name, "spanId": trace.span_id, "parentSpanId": trace.parent_id,
                  "kind": SPAN_SERVER, "start": trace.start_ns, "end": trace.ns(end),
                  "attrs": trace.attrs, "error": error}] + trace.spans
        for span in spans:
            if len(self.queue) >= self.max_queue:
                self.dropped += 1
                continue
            self.queue.append((trace.trace_id, span))

    def payload(self, batch: list) -> bytes:
        spans = []
        for trace_id, s in batch:
            span = {"traceId": trace_id, "spanId": s["spanId"], "name": s["name"],
                    "kind": s["kind"], "startTimeUnixNano": str(s["start"]),
                    "endTimeUnixNano": str(s["end"]), "attributes": _otlp_attrs(s["attrs"]),
                    "status": {"code": 2} if s.get("error") else {}}
            if s["parentSpanId"]:
                span["parentSpanId"] = s["parentSpanId"]
            spans.append(span)
        resource = {"attributes": _otlp_attrs({"service.name": self.cfg.service_name,
                                               "service.version": __version__})}
        return json_dumps({"resourceSpans": [{"resource": resource, "scopeSpans": [{
            "scope": {"name": "tokenman", "version": __version__}, "spans": spans}]}]})

    async def run(self, pool: UpstreamPool) -> None:
        """The exporter task: a batch every second (or sooner when 512 are waiting)."""
        origin = Origin(self.cfg.endpoint, tls=pool.tls) if self.cfg.exporter == "otlp-http" \
            else None
        while True:
            for _ in range(10):
                if len(self.queue) >= 512:
                    break
                await asyncio.sleep(0.1)
            await self.flush(pool, origin)

    async def flush(self, pool: UpstreamPool, origin: "Origin | None") -> None:
        while self.queue:
            batch = [self.queue.popleft() for _ in range(min(512, len(self.queue)))]
            body = self.payload(batch)
            try:
                if origin is None:  # (in a thread: a reader that stalls never stops the loop)
                    await asyncio.to_thread(_write_line, sys.stdout, body.decode() + "\n")
                    self.exported += len(batch)
                    continue
                resp = await pool.request(origin, "POST", origin.target(""),
                                          [(b"Content-Type", b"application/json")], body,
                                          5.0, self.export_timeout)
                try:
                    await resp.body.read_all(1024 * 1024, asyncio.get_running_loop().time()
                                             + self.export_timeout)
                except BaseException:
                    resp.close()  # (a collector that stalls mid-answer: not a socket leaked)
                    raise
                resp.release()
                if resp.status >= 300:
                    raise UpstreamError(f"collector answered {resp.status}")
                self.exported += len(batch)
            except (UpstreamError, TimeoutError, ConnectionGone, HeadTooLarge, ValueError,
                    OSError) as exc:
                self.dropped += len(batch)
                self.log.warn("trace export failed", spans=len(batch),
                              error=f"{type(exc).__name__}: {exc}")
                return


def _write_line(stream, text: str) -> None:
    stream.write(text)
    stream.flush()


# ================================================================================================
# §13 pipeline: the per-request Context, the Stage interface, the Pipeline, then every stage
# ================================================================================================
# A stage is a small class with a name and up to four hooks: request(ctx) may change the request
# JSON (ctx.obj, marking changed top-level members in ctx.changes) or answer it (return a Reply);
# response(ctx, body) and stream_event(ctx, event) rewrite what goes back, for the requests whose
# stage opted in (ctx.hooks); finish(ctx) runs once for every request that passed the stage,
# whatever its outcome (settle budgets, store the answer in the cache, write detections).
# Pipelines are built once per config snapshot. Internal state lives on the Context, never in
# the client's JSON.


class Context:
    """What tokenman knows about one proxied request; becomes one row of the request log."""
    __slots__ = ("id", "client_id", "xid", "req", "api", "model", "provider", "project",
                 "streaming", "status", "outcome", "usage", "cost", "error", "wall", "ttfb",
                 "upstream_s", "upstream_request_id", "response_body", "drop_usage_chunk", "obj",
                 "attempts", "changes", "hooks", "passed", "timings", "headers_out", "notes",
                 "upstream_body", "cache_hit", "tokens_saved", "saved", "trace", "pipeline",
                 "upstream_api", "layout", "plan")

    def __init__(self, req: Request, api: str) -> None:
        self.id = new_request_id()  # the log row's own key: unique whatever clients send
        rid = req.headers.map.get(b"x-request-id")
        self.client_id = rid.decode("latin-1")[:128] if rid else ""
        self.xid = rid[:128] if rid else self.id.encode()  # X-Request-Id we send and answer
        self.req = req
        self.api = api
        self.model = ""
        self.provider = ""
        project = req.headers.map.get(b"x-tokenman-project")
        self.project = project_name(project.decode("latin-1")) if project \
            else "default"
        self.streaming = False
        self.status = 0
        self.outcome = "ok"
        self.usage = Usage()
        self.cost: float | None = 0.0
        self.error = ""
        self.wall = time.time()
        self.ttfb: float | None = None
        self.upstream_s = 0.0
        self.upstream_request_id = ""
        self.response_body: bytes | None = None
        self.drop_usage_chunk = False
        self.obj: object = None            # the parsed request JSON (stages may change it)
        self.attempts = 0
        self.changes: dict[str, object] = {}  # top-level members to patch into the body
        self.layout: tuple | None = None      # where those members sit (large bodies)
        self.plan: list = []                  # (provider, model sent) in the order to try
        self.hooks: list = []               # stages that rewrite this request's answer
        self.passed: list = []              # stages whose request phase ran (for finish)
        self.timings: dict[str, float] = {}  # seconds spent per stage and phase
        self.headers_out: list[tuple[bytes, bytes]] = []  # extra response headers
        self.notes: dict[str, object] = {}   # per-stage private state, keyed by stage name
        self.upstream_body: bytes | None = None  # the provider's body before any rewrite
        self.cache_hit = False
        self.tokens_saved = 0
        self.saved: dict[str, float] = {}  # USD saved by source: cache, prompt_cache, ...
        self.trace: Trace | None = None
        self.pipeline: "Pipeline | None" = None  # the snapshot this request started with
        self.upstream_api = api  # the API format of the provider that answers

    @property
    def pipeline_ms(self) -> float | None:
        return round(sum(self.timings.values()) * 1000, 3) if self.timings else None


HIT_OUTCOMES = ("cache_hit", "heartbeat_hit")


class Reply:
    """An answer a stage gives instead of the provider: a JSON error or a cached answer, whole
    (body) or as SSE events for a streaming request."""
    __slots__ = ("status", "headers", "body", "events", "outcome")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"",
                 events: list[bytes] | None = None, outcome: str = "rejected") -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.events = events
        self.outcome = outcome


def error_reply(ctx: Context, status: int, message: str, kind: str = "",
                headers: list[tuple[bytes, bytes]] = (), extra: dict | None = None) -> Reply:
    """A native-shape error Reply; `extra` adds fields inside the error object."""
    body = native_error(ctx.api, status, message, kind)
    if extra:
        obj = json.loads(body)
        obj["error"].update(extra)
        body = json_dumps(obj)
    return Reply(status, [(b"Content-Type", b"application/json")] + list(headers), body)


class Stage:
    """Base of every pipeline stage. `fails_closed`: an internal error in this stage rejects the
    request (security stages); otherwise the request goes on without it (optimisations).
    request() may be a coroutine function (a stage that waits, e.g. for SQLite) or a plain one
    (a stage that only computes: no coroutine to create and schedule per request)."""
    name = ""
    section = ""  # a built-in stage's config section (default: its name); disabled = left out
    fails_closed = False
    runs_on_hit = False  # also runs (after the cache) when the answer comes from the cache
    side_calls = False  # also runs on side calls that carry a conversation (count_tokens)

    def __init__(self, cfg: Config, **services: object) -> None:
        """Built with the config snapshot and the services (store, log, prices, ...); a
        stage takes what it needs."""

    def request(self, ctx: Context) -> Reply | None:
        return None

    def response(self, ctx: Context, body: bytes) -> bytes:
        return body

    def stream_event(self, ctx: Context, event: bytes) -> bytes:
        return event

    def finish(self, ctx: Context) -> None:
        pass

    def close(self) -> None:
        """Called when the pipeline is replaced or tokenman stops."""


class Pipeline:
    """The stages of one config snapshot, in order. Each hook is timed per request and runs
    under a guard: an exception is logged, counted, and fails closed or open by stage."""

    def __init__(self, stages: list[Stage], log: Logger) -> None:
        self.stages = stages
        self.log = log
        self.errors: dict[str, int] = {}
        self.finishers = [s for s in stages if type(s).finish is not Stage.finish]
        self.users = 0  # requests in flight with this pipeline (a reload replaces it)
        self.retired = False
        self.hints = self.stage("cache_hints")  # (also placed on translated requests)

    def _failed(self, stage: Stage, ctx: Context | None, phase: str,
                exc: BaseException) -> None:
        self.errors[stage.name] = self.errors.get(stage.name, 0) + 1
        self.log.error("pipeline stage failed", stage=stage.name, phase=phase,
                       id=ctx.id if ctx is not None else "",
                       fails="closed" if stage.fails_closed else "open",
                       error=f"{type(exc).__name__}: {exc}")

    async def request(self, ctx: Context, side_call: bool = False) -> Reply | None:
        """Runs the request phases; the first Reply answers the request. After a cache hit
        only the stages marked runs_on_hit still run (they may still refuse it); a side call
        only meets the stages marked side_calls."""
        hit = None
        timings = ctx.timings
        t1 = time.perf_counter()
        for stage in self.stages:
            if hit is not None and not stage.runs_on_hit or side_call and not stage.side_calls:
                continue
            t0 = t1
            try:
                ctx.passed.append(stage)
                reply = stage.request(ctx)  # a Reply or None, or a coroutine that gives one
                if reply is not None and not isinstance(reply, Reply):
                    reply = await reply
            except Exception as exc:
                self._failed(stage, ctx, "request", exc)
                reply = error_reply(ctx, 500, f"policy check {stage.name} failed") \
                    if stage.fails_closed else None
            t1 = time.perf_counter()
            timings[stage.name] = t1 - t0
            if ctx.trace is not None:
                ctx.trace.child(f"middleware.{stage.name}.request", t0, t1, attrs={
                    "middleware.name": stage.name, "middleware.phase": "request"})
            if reply is not None:
                if reply.outcome not in HIT_OUTCOMES or hit is not None:
                    if reply.outcome == "rejected":  # (the errors metric's type)
                        ctx.notes["refused_by"] = "pipeline" if reply.status >= 500 \
                            else stage.name
                    return reply
                hit = reply
        return hit

    def response(self, ctx: Context, body: bytes) -> bytes:
        for stage in reversed(ctx.hooks):
            t0 = time.perf_counter()
            try:
                body = stage.response(ctx, body)
            except Exception as exc:
                self._failed(stage, ctx, "response", exc)
            key = stage.name + ".response"
            ctx.timings[key] = ctx.timings.get(key, 0.0) + time.perf_counter() - t0
        return body

    def stream_event(self, ctx: Context, event: bytes) -> bytes:
        for stage in reversed(ctx.hooks):
            try:
                event = stage.stream_event(ctx, event)
            except Exception as exc:
                self._failed(stage, ctx, "stream", exc)
        return event

    def finish(self, ctx: Context) -> None:
        for stage in self.finishers:
            if stage in ctx.passed:
                try:
                    stage.finish(ctx)
                except Exception as exc:
                    self._failed(stage, ctx, "finish", exc)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def retire(self) -> None:
        """A reload replaced this pipeline (or tokenman stops): its stages close once no
        request uses it, once."""
        if self.retired:
            return
        self.retired = True
        if not self.users:
            self.close()

    def leave(self) -> None:
        """A request that used this pipeline ended."""
        self.users -= 1
        if self.retired and not self.users:
            self.close()

    def close(self) -> None:
        for stage in self.stages:
            try:
                stage.close()
            except Exception as exc:  # (a plugin's) never stops a reload or a shutdown
                self._failed(stage, None, "close", exc)


# -- stages: response cache, heartbeat, injection, PII, budgets, rate limits, savings -----------
# (REGISTRY, at the end, maps each config name to its class)


class CitedText(dict):
    """The text of a document with citations enabled, handed to the stages as a copy: they
    check it (log, block) but never rewrite it, because the provider's citations point at the
    characters of the text as sent."""
    __slots__ = ()


def text_fields(api: str, obj: dict, roles: tuple | None = None) -> list[tuple]:
    """Every text-bearing string of a request, as (container, key, path, role): string and
    array system prompts, every message's string or text parts, plain-text documents (a cited
    one as a CitedText copy) and their titles, tool results (nested too), tool-use inputs and
    tool-call arguments. `roles` limits which messages are visited. Thinking blocks are
    skipped: the provider verifies their signatures. A path is a tuple
    (("messages", 3, "content", 0, "text")); field_path() spells it for records: an agent's
    request holds hundreds of fields, and most are never reported."""
    out: list[tuple] = []
    if roles is None or "system" in roles:
        system = obj.get("system")
        if isinstance(system, str):
            out.append((obj, "system", ("system",), "system"))
        elif isinstance(system, list):
            for i, block in enumerate(system):
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    out.append((block, "text", ("system", i, "text"), "system"))
    messages = obj.get("messages")
    if not isinstance(messages, list):
        return out
    calls_too = api == API_OPENAI and (roles is None or "assistant" in roles)
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        role = msg.get("role")
        if not isinstance(role, str):
            role = ""
        elif role == "function":  # (the legacy functions API's results)
            role = "tool"
        if roles is not None and role not in roles and not (role == "user" and "tool" in roles):
            continue
        _content_fields(out, msg, "content", ("messages", i, "content"), role, roles, 0)
        if isinstance(msg.get("refusal"), str) and (roles is None or role in roles):
            out.append((msg, "refusal", ("messages", i, "refusal"), role))
        calls = msg.get("tool_calls") if calls_too else None
        if isinstance(calls, list):
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    out.append((fn, "arguments",
                                ("messages", i, "tool_calls", j, "function", "arguments"),
                                "assistant"))
    prediction = obj.get("prediction")  # (OpenAI's predicted output: text the model is shown)
    if isinstance(prediction, dict) and (roles is None or "user" in roles):
        _content_fields(out, prediction, "content", ("prediction", "content"), "user", None, 0)
    return out


# OpenAI calls whose text is a bare prompt: path -> its member (a string, or a list of strings;
# token-id arrays carry no text to screen)
_PROMPT_MEMBERS = types.MappingProxyType({EMBEDDINGS_PATH: "input", COMPLETIONS_PATH: "prompt",
                                          "/v1/moderations": "input"})


def prompt_fields(obj: dict, member: str) -> list[tuple]:
    """The text of a bare-prompt call (embeddings, legacy completions, moderations), in
    text_fields' form, as the user's."""
    value = obj.get(member)
    if isinstance(value, str):
        return [(obj, member, (member,), "user")]
    if isinstance(value, list):
        return [(value, i, (member, i), "user") for i, v in enumerate(value)
                if isinstance(v, str)]
    return []


def id_fields(obj: dict) -> list[tuple]:
    """A request's end-user ids, in text_fields' form with the role "id": personal data in
    one is replaced by a keyed digest in redact, hash and block mode (never refused), so that
    users stay apart for the provider's abuse checks (a numbered placeholder would make them all
    [EMAIL_1]); log mode only records it."""
    out = [(obj, key, (key,), "id") for key in ("user", "safety_identifier")
           if type(obj.get(key)) is str]
    meta = obj.get("metadata")  # (Anthropic's)
    if type(meta) is dict and type(meta.get("user_id")) is str:
        out.append((meta, "user_id", ("metadata", "user_id"), "id"))
    return out


# Responses API input items that carry text: type -> (its member, the role it counts as)
_RESPONSES_ITEM_TEXT = {
    "function_call_output": (("output", "tool"),),
    "custom_tool_call_output": (("output", "tool"),),
    "local_shell_call_output": (("output", "tool"),),
    "mcp_call": (("arguments", "assistant"), ("output", "tool")),
    "function_call": (("arguments", "assistant"),),
    "custom_tool_call": (("input", "assistant"),),
}


def responses_text_fields(obj: dict, roles: tuple | None = None) -> list[tuple]:
    """The text of a Responses API request, as text_fields() gives it for the chat APIs:
    `instructions`, `input` as a string, every message's string content or text and refusal
    parts, function call arguments, custom tool call inputs and the outputs of function, custom
    and MCP tool calls (a string or text parts). `roles` limits which are visited ("tool" for
    the outputs). Reasoning items are left alone (the provider may verify them)."""
    out: list[tuple] = []
    if roles is None and isinstance(obj.get("instructions"), str):
        out.append((obj, "instructions", ("instructions",), "system"))
    items = obj.get("input")
    if isinstance(items, str):
        if roles is None or "user" in roles:
            out.append((obj, "input", ("input",), "user"))
        return out
    for i, item in enumerate(items if isinstance(items, list) else ()):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind in (None, "message"):
            members = (("content", item.get("role") if isinstance(item.get("role"), str)
                        else ""),)
        else:  # (a type that is not a string names nothing)
            members = _RESPONSES_ITEM_TEXT.get(kind, ()) if type(kind) is str else ()
        for key, role in members:
            if roles is not None and role not in roles:
                continue
            value = item.get(key)
            if isinstance(value, str):
                out.append((item, key, ("input", i, key), role))
            for j, part in enumerate(value if isinstance(value, list) else ()):
                if not isinstance(part, dict):
                    continue
                field = "refusal" if part.get("type") == "refusal" else "text"
                if part.get("type") in ("input_text", "output_text", "refusal") \
                        and isinstance(part.get(field), str):
                    out.append((part, field, ("input", i, key, j, field), role))
    return out


def _content_fields(out: list, parent: dict, key: str, path: tuple, role: str, roles,
                    depth: int) -> None:
    content = parent.get(key)
    if isinstance(content, str):
        if roles is None or role in roles:
            out.append((parent, key, path, role))
        return
    if not isinstance(content, list) or depth > 4:
        return
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in ("tool_result", "mcp_tool_result"):
            if roles is None or "tool" in roles:
                _content_fields(out, block, "content", path + (j, "content"), "tool", None,
                                depth + 1)
        elif kind in ("tool_use", "server_tool_use", "mcp_tool_use") and (
                roles is None or "assistant" in roles):
            _value_fields(out, block, "input", path + (j, "input"), depth)
        elif kind in ("thinking", "redacted_thinking"):
            continue
        elif kind == "document":
            if roles is not None and role not in roles:
                continue
            for key in ("title", "context"):  # read by the model, never cited
                if isinstance(block.get(key), str):
                    out.append((block, key, path + (j, key), role))
            source = block.get("source")
            if not isinstance(source, dict):
                continue
            if source.get("type") == "text" and isinstance(source.get("data"), str):
                cited = isinstance(block.get("citations"), dict) and \
                    block["citations"].get("enabled") is True
                out.append((CitedText(data=source["data"]) if cited else source, "data",
                            path + (j, "source", "data"), role))
            elif source.get("type") == "content":
                _content_fields(out, source, "content", path + (j, "source", "content"), role,
                                roles, depth + 1)
        elif kind == "search_result":  # (a RAG result: what indirect injection rides on)
            if roles is not None and role not in roles:
                continue
            if isinstance(block.get("title"), str):
                out.append((block, "title", path + (j, "title"), role))
            cited = isinstance(block.get("citations"), dict) and \
                block["citations"].get("enabled") is True
            parts = block.get("content")
            for k, part in enumerate(parts if isinstance(parts, list) else ()):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append((CitedText(text=part["text"]) if cited else part, "text",
                                path + (j, "content", k, "text"), role))
        elif isinstance(block.get("text"), str) and (roles is None or role in roles):
            out.append((block, "text", path + (j, "text"), role))


def _value_fields(out: list, parent, key, path: tuple, depth: int) -> None:
    value = parent.get(key) if isinstance(parent, dict) else parent[key]  # (input may be absent)
    if isinstance(value, str):
        out.append((parent, key, path, "assistant"))
    elif depth < 16 and isinstance(value, dict):
        for k in value:
            _value_fields(out, value, k, path + (k,), depth + 1)
    elif depth < 16 and isinstance(value, list):
        for i in range(len(value)):
            _value_fields(out, value, i, path + (i,), depth + 1)


def field_path(path: tuple) -> str:
    """("messages", 3, "content", 0, "text") -> "messages[3].content[0].text"."""
    return path[0] + "".join(f"[{p}]" if type(p) is int else "." + p for p in path[1:])


def mark_changed(ctx: Context, path: tuple) -> None:
    """Records that the top-level member a field path starts in must be re-sent."""
    ctx.changes[path[0]] = ctx.obj[path[0]]


def mask(value: str) -> str:
    """What a detection record keeps of a sensitive value: its first and last two characters."""
    return "*" * len(value) if len(value) <= 4 else value[:2] + "*" * (len(value) - 4) + value[-2:]


# -- the response cache -------------------------------------------------------------------------

class CacheEntry:
    __slots__ = ("expires", "status", "headers", "body", "model", "tokens", "cost")

    def __init__(self, expires: float, status: int, headers: list, body: bytes, model: str,
                 tokens: int, cost: float | None) -> None:
        self.expires = expires
        self.status = status
        self.headers = headers
        self.body = body
        self.model = model
        self.tokens = tokens
        self.cost = cost


_CACHE_SQL = ("INSERT OR REPLACE INTO cache (key, created, expires, model, status, headers, body, "
              "tokens, cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_CACHED_HEADERS = frozenset((b"content-type", b"openai-model", b"anthropic-organization-id"))
_KEYED_HEADERS = (b"anthropic-version", b"anthropic-beta", b"openai-beta",  # part of the key
                  b"openai-organization", b"openai-project")  # (whose data, settings, models)
# a client's own credential, in any of the headers a provider takes it from (Azure: api-key)
_CREDENTIAL_HEADERS = (b"x-api-key", b"authorization", b"api-key")
_MAX_AGE_0 = re.compile(rb"(?:^|[,\s])max-age\s*=\s*\"?0+\"?(?:$|[,\s])")  # nothing stored is fresh
# an answer that calls a tool (not vLLM's empty "tool_calls": [] in every message)
_CALLS_TOOL = re.compile(rb'"tool_use"|"(?:tool_calls|function_call)"\s*:\s*[\[{]\s*[^\s\]]')
# (not request-id / x-request-id: a hit answers with its own X-Request-Id, and the provider's id
# belongs to the request that filled the cache)


class ResponseCache(Stage):
    """Exact-match answers for repeated deterministic requests: an LRU in memory over the
    SQLite `cache` table. The key covers the API, the path, the tenant (project plus a hash of
    the client's own credential when it is passed through) and the whole request except
    `stream`, so one tenant never receives another's answer. Fails open."""
    name = "cache"

    def __init__(self, cfg: Config, store: Store, clock=time.time, **_: object) -> None:
        self.cfg = cfg.cache
        self.passthrough = {k: not p.key_ref for k, p in cfg.providers.items()}
        self.store = store
        self.clock = clock
        self.memory: collections.OrderedDict[str, CacheEntry] = collections.OrderedDict()
        self.memory_bytes = 0  # answer bodies held in memory (the rest stays in SQLite)
        self.memory_max = CACHE_MEMORY_MAX

    def _eligible(self, ctx: Context) -> bool:
        obj = ctx.obj
        if ctx.req.path not in ACCOUNTED_PATHS or not isinstance(obj, dict):
            return False
        temp = obj.get("temperature")
        return self.cfg.sampled or (type(temp) in (int, float) and temp == 0)

    def key(self, ctx: Context) -> str:
        import hashlib  # loaded on the first cacheable request, not at start
        body = {k: int(v) if type(v) is float and v.is_integer() else v  # (temperature 0.0
                for k, v in ctx.obj.items() if k not in ("stream", "stream_options")}  # is 0)
        tenant = ctx.project
        if self.passthrough.get(ctx.provider, True):
            headers = ctx.req.headers.map
            cred = b"\x00".join(headers.get(name, b"") for name in _CREDENTIAL_HEADERS)
            tenant += ":" + hashlib.sha256(cred).hexdigest()[:16]
        digest = hashlib.sha256()
        planned = ctx.plan[0][1] if ctx.plan else ""  # where it goes, as routed now (a
        for part in (ctx.api, ctx.req.path, ctx.req.query, tenant, ctx.provider, planned,  # map
                     "raw" if no_compress(ctx) else ""):  # changed by a reload: not the old
            digest.update(part.encode() + b"\x00")  # answer), and what the stages rewrote
        headers = ctx.req.headers.map
        for name in _KEYED_HEADERS:  # an API version or beta changes what the model does
            digest.update(headers.get(name, b"") + b"\x00")
        digest.update(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                 ensure_ascii=False).encode("utf-8", "surrogatepass"))
        return digest.hexdigest()

    def request(self, ctx: Context):
        if not self.cfg.enabled or not self._eligible(ctx):
            return None  # (most requests: no coroutine made for them)
        return self._lookup(ctx)

    async def _lookup(self, ctx: Context) -> Reply | None:
        headers = ctx.req.headers.map
        control = headers.get(b"cache-control", b"").lower()
        if not control and b"no-cache" in headers.get(b"pragma", b"").lower():
            control = b"no-cache"  # (RFC 9111 5.4: Pragma without Cache-Control)
        key = self.key(ctx)
        ctx.notes["cache"] = None if b"no-store" in control else key
        ctx.headers_out.append((b"X-Tokenman-Cache", b"MISS"))
        if b"no-cache" in control or _MAX_AGE_0.search(control):
            return None
        entry = self.memory.get(key)
        now = self.clock()
        if entry is not None and entry.expires <= now:
            self._forget(key)
            entry = None
        if entry is None:
            entry = await asyncio.to_thread(self._load, key, now)
            if entry is not None:
                self._remember(key, entry)
        else:
            self.memory.move_to_end(key)
        if entry is None:
            return None
        ctx.headers_out[-1] = (b"X-Tokenman-Cache", b"HIT")
        ctx.cache_hit = True
        _note_own_thinking(ctx, entry.body)
        ctx.model = entry.model or ctx.model
        ctx.tokens_saved = entry.tokens
        ctx.saved["cache"] = entry.cost or 0.0
        return Reply(entry.status, list(entry.headers), entry.body, outcome="cache_hit")

    def _load(self, key: str, now: float) -> CacheEntry | None:
        try:
            rows = self.store.query("SELECT * FROM cache WHERE key = ? AND expires > ?",
                                    (key, now))
        except sqlite3.Error:
            return None  # the cache is an optimisation: a storage fault is a miss
        if not rows:
            return None
        r = rows[0]
        headers = [(n.encode("latin-1"), v.encode("latin-1"))
                   for n, v in json.loads(r["headers"]) if n.lower().encode() in _CACHED_HEADERS]
        return CacheEntry(r["expires"], r["status"], headers, bytes(r["body"]), r["model"],
                          r["tokens"], r["cost_usd"])

    def _remember(self, key: str, entry: CacheEntry) -> None:
        self._forget(key)
        self.memory[key] = entry
        self.memory_bytes += len(entry.body)
        while len(self.memory) > self.cfg.max_entries or self.memory_bytes > self.memory_max:
            _, old = self.memory.popitem(last=False)
            self.memory_bytes -= len(old.body)

    def _forget(self, key: str) -> None:
        old = self.memory.pop(key, None)
        if old is not None:
            self.memory_bytes -= len(old.body)

    def _forget_expired(self, now: float) -> None:
        for key in [k for k, e in self.memory.items() if e.expires <= now]:
            self._forget(key)

    def finish(self, ctx: Context) -> None:
        key = ctx.notes.get("cache")
        body = ctx.upstream_body
        if not key or ctx.cache_hit or ctx.outcome != "ok" or not replayable(ctx, body) \
                or len(body) > self.cfg.max_entry_bytes or "stand_in" in ctx.notes:
            return  # (a fallback's answer stands in for the request's own: not kept for it)
        if not self.cfg.tool_use and _CALLS_TOOL.search(body):
            return
        u = ctx.usage
        now = self.clock()
        headers = [(n, v) for n, v in ctx.notes.get("cache_headers", ())
                   if n.lower() in _CACHED_HEADERS]
        entry = CacheEntry(now + self.cfg.ttl_seconds, ctx.status, headers, body, ctx.model,
                           u.input + u.output + u.cache_read + u.cache_write, answer_cost(ctx))
        self._remember(key, entry)
        self.store.write(_CACHE_SQL, (key, now, entry.expires, entry.model, entry.status,
                                      json.dumps([(n.decode("latin-1"), v.decode("latin-1"))
                                                  for n, v in headers]),
                                      body, entry.tokens, entry.cost))

    def purge_job(self):
        """A writer job: drop expired rows, and the oldest beyond max_rows."""
        now = self.clock()
        self._forget_expired(now)
        return cache_purge_job(now, self.cfg.max_rows)


def answer_cost(ctx: Context) -> float | None:
    """What the answer itself cost: a hit of it saves that (a summary tokenman made for the
    request, billed with it, is not made again: it is kept)."""
    if ctx.cost is None or "summary_cost" not in ctx.notes:
        return ctx.cost
    return max(0.0, ctx.cost - ctx.notes["summary_cost"])


def _note_own_thinking(ctx: Context, body: bytes) -> None:
    """A stored answer whose thinking blocks are unsigned was translated: tokenman made them
    (a provider signs each of its own), so the PII stage may restore values in them when the
    answer is given as a stream, whose events do not carry the signature up front."""
    if b'"signature":""' not in body:
        return
    obj = _loads(body)
    blocks = [b for b in obj.get("content") or () if isinstance(b, dict)
              and b.get("type") == "thinking"] if isinstance(obj, dict) else []
    if blocks and all(b.get("signature") == "" for b in blocks):
        ctx.notes["own_thinking"] = True


def replayable(ctx: Context, body: bytes | None) -> bool:
    """A 2xx answer a hit can give again: a plain JSON object, not an empty body or one the
    provider compressed although tokenman asked for identity (a hit would drop its encoding)."""
    if body is None or not 200 <= ctx.status < 300 or body.lstrip()[:1] != b"{":
        return False
    for name, value in ctx.notes.get("cache_headers", ()):
        if name.lower() == b"content-encoding" and value.strip().lower() != b"identity":
            return False
    return True


def cache_purge_job(now: float, max_rows: int | None = None):
    """A writer job: expired response-cache rows go, and the oldest beyond max_rows. Also run
    while the cache is switched off: what it stored before still expires."""
    def job(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM cache WHERE expires <= ?", (now,))
        if max_rows is not None:
            conn.execute("DELETE FROM cache WHERE key NOT IN (SELECT key FROM cache ORDER BY "
                         "created DESC LIMIT ?)", (max_rows,))
    return job


# -- whole answers and streams: a stored answer replayed as events, a stream's answer rebuilt
# (ToolSlots, which reads OpenAI tool-call deltas, also serves the stream translator in §14)

def synthesize_sse(api: str, body: bytes, include_usage: bool = True) -> list[bytes]:
    """A valid SSE stream, in the provider's own event format, for a stored whole answer."""
    obj = json.loads(body)
    if api == API_ANTHROPIC:
        return _anthropic_events(obj)
    return _openai_events(obj, include_usage)


def _sse(name: str, obj: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json_dumps(obj) + b"\n\n"


_CHUNK_KEYS = ("id", "created", "model", "system_fingerprint", "service_tier")
_OPENAI_DELTA_KEYS = frozenset(("role", "content", "refusal", "tool_calls"))
_REASONING_KEYS = ("reasoning_content", "reasoning")  # (OpenAI-compatible servers' reasoning)


_JSON_MARKS = re.compile(r'[][{}"\\]')  # what moves a JSON scanner: brackets, quotes, escapes


class ToolArgs:
    """One tool call's arguments as they stream in, and whether they are whole yet (a JSON
    object or array closed, nothing but blanks after it: nothing valid can follow, so the call
    is complete). Each piece is scanned once, the text joined and parsed once, when the outer
    bracket closes: linear in the arguments' size, however many pieces they come in."""
    __slots__ = ("parts", "depth", "quoted", "escaped", "state")

    OPENING, OPEN, WHOLE, BROKEN = range(4)

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.depth = 0
        self.quoted = False   # inside a string
        self.escaped = False  # the next character is escaped (a piece ended in a backslash)
        self.state = ToolArgs.OPENING

    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    @property
    def whole(self) -> bool:
        return self.state == ToolArgs.WHOLE

    def add(self, piece: str) -> None:
        if not piece:
            return
        self.parts.append(piece)
        if self.state == ToolArgs.BROKEN:
            return
        if self.state == ToolArgs.WHOLE:
            if piece.strip():
                self.state = ToolArgs.BROKEN  # (more after the end: not JSON any more)
            return
        i = 0
        if self.state == ToolArgs.OPENING:
            rest = piece.lstrip()
            if not rest:
                return
            if rest[0] not in "{[":
                self.state = ToolArgs.BROKEN  # (not an object or array: never whole)
                return
            self.state = ToolArgs.OPEN
            i = len(piece) - len(rest)
        elif self.escaped:
            self.escaped = False
            i = 1
        find = _JSON_MARKS.search
        while (m := find(piece, i)) is not None:
            c = m.group()
            i = m.end()
            if self.quoted:
                if c == "\\":
                    if i < len(piece):
                        i += 1
                    else:
                        self.escaped = True
                elif c == '"':
                    self.quoted = False
            elif c == '"':
                self.quoted = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self._closed(piece[i:])
                    return
            # (a backslash outside a string is invalid JSON: json.loads will say so)

    def _closed(self, after: str) -> None:
        if after.strip():
            self.state = ToolArgs.BROKEN  # (more after the end: not JSON)
            return
        try:
            json.loads(self.text().strip())  # (blanks json.loads would not take: U+00A0...)
        except (ValueError, RecursionError):  # (nested past the parser's depth: not whole)
            self.state = ToolArgs.BROKEN
            return
        self.state = ToolArgs.WHOLE


class ToolSlots:
    """Which tool call an OpenAI tool_calls delta continues (numbered from 0 in the order the
    calls start). By its index, as OpenAI numbers them; but under an index already taken, a
    delta that names a function starts a new call when it brings an id other than the call's
    (servers that number every call 0), or brings no id while the call's arguments so far are
    a whole JSON value (the same without ids); a name repeated on every delta of one call, or
    an id that changes mid-call, continues it. Without an index (servers that leave it out): a
    known id continues its call, a named delta starts one, any other continues the last."""
    __slots__ = ("by_index", "ids", "args")

    def __init__(self) -> None:
        self.by_index: dict[int, int] = {}  # the delta's index -> the call it continues now
        self.ids: list[str] = []  # per call: its id ("" when the server gave none)
        self.args: list[ToolArgs] = []  # per call: its arguments so far

    def slot(self, call: dict) -> int:
        index = call.get("index")
        cid = call.get("id")
        cid = cid if type(cid) is str else ""
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        piece = fn.get("arguments")
        piece = piece if type(piece) is str else ""
        slot = None
        if type(index) is int:
            slot = self.by_index.get(index)
            if slot is not None and fn.get("name") and self._ended(slot, cid):
                slot = None
        elif cid and cid in self.ids:
            slot = self.ids.index(cid)
        elif self.ids and not fn.get("name"):
            slot = len(self.ids) - 1
        if slot is None:
            self.ids.append(cid)
            self.args.append(ToolArgs())
            slot = len(self.ids) - 1
            if type(index) is int:
                self.by_index[index] = slot
        elif cid and not self.ids[slot]:
            self.ids[slot] = cid
        self.args[slot].add(piece)
        return slot

    def _ended(self, slot: int, cid: str) -> bool:
        """A named delta under this call's index begins another call."""
        if cid:
            return bool(self.ids[slot]) and cid != self.ids[slot]
        return self.args[slot].whole


class StreamAssembler:
    """The whole answer a stream makes, as the provider would have given it without `stream`
    (the inverse of synthesize_sse): so a streamed answer fills the response cache and a hit
    can be given as JSON or as a stream. Gives up (body() is None) on whatever it could not
    give back exactly: an event or delta kind it does not know, an error event, logprobs,
    an answer of more than `limit` bytes (what it holds: not the events' size)."""
    __slots__ = ("api", "limit", "size", "failed", "msg", "json", "choices", "usage", "done",
                 "calls")

    def __init__(self, api: str, limit: int) -> None:
        self.api = api
        self.limit = limit
        self.size = 0
        self.failed = False
        self.msg: dict | None = None  # Anthropic: the message; OpenAI: the chunk's fields
        self.json: dict[int, str] = {}  # Anthropic: tool input JSON of a block, as streamed
        self.choices: dict[int, dict] = {}  # OpenAI: index -> the choice being built
        self.usage = None
        self.done = False
        self.calls: dict[int, ToolSlots] = {}  # OpenAI: choice index -> its tool calls

    def feed(self, raw: bytes) -> None:
        """One complete event, as the client's API has it."""
        if self.failed:
            return
        _, data = sse_fields(raw)
        try:
            if not (self._anthropic(data) if self.api == API_ANTHROPIC else self._openai(data)) \
                    or self.size > self.limit:
                self.failed = True
        except Exception:  # not the shape it knows (or nested too deeply): never the relay's
            self.failed = True  # problem

    def feed_all(self, events: bytes) -> None:
        """Events made by the stream translator (one upstream event may make several)."""
        for event in events.split(b"\n\n"):
            if event:
                self.feed(event + b"\n\n")

    def _anthropic(self, data: bytes) -> bool:
        obj = json.loads(data)
        kind = obj["type"]
        if kind == "ping":
            return True
        if kind == "message_start":
            self.size += len(data)
            self.msg = dict(obj["message"], content=[])
            return self.msg.get("type") == "message"
        content = self.msg["content"]
        if kind == "content_block_start":
            if obj["index"] != len(content):
                return False
            self.size += len(data)
            content.append(dict(obj["content_block"]))
        elif kind == "content_block_delta":
            i = obj["index"]
            block, delta = content[i], obj["delta"]
            step = delta["type"]
            if step == "text_delta":
                block["text"] += delta["text"]
                self.size += len(delta["text"])
            elif step == "input_json_delta":
                self.json[i] = self.json.get(i, "") + delta["partial_json"]
                self.size += len(delta["partial_json"])
            elif step == "thinking_delta":
                block["thinking"] += delta["thinking"]
                self.size += len(delta["thinking"])
            elif step == "signature_delta":
                block["signature"] = delta["signature"]
                self.size += len(delta["signature"])
            elif step == "citations_delta":
                block["citations"] = (block.get("citations") or []) + [delta["citation"]]
                self.size += len(data)
            else:
                return False
        elif kind == "content_block_stop":
            i = obj["index"]
            if i in self.json:
                text = self.json.pop(i)
                content[i]["input"] = json.loads(text) if text.strip() else {}
        elif kind == "message_delta":
            for key, value in obj["delta"].items():
                self.msg[key] = value
            self.msg["usage"] = dict(self.msg.get("usage") or {}, **(obj.get("usage") or {}))
        elif kind == "message_stop":
            self.done = True
        else:
            return False  # an error event, or one this does not know
        return True

    def _openai(self, data: bytes) -> bool:
        if data.strip() == b"[DONE]":
            self.done = True
            return True
        obj = json.loads(data)
        if obj.get("error") or obj.get("object", "chat.completion.chunk") \
                != "chat.completion.chunk":
            return False
        if self.msg is None:
            self.msg = {k: obj[k] for k in _CHUNK_KEYS if k in obj}
            self.size += 256
        if obj.get("usage"):
            self.usage = obj["usage"]
        for choice in obj["choices"]:
            if choice.get("logprobs") is not None:
                return False
            out = self.choices.setdefault(choice["index"], {
                "index": choice["index"], "message": {"role": "assistant", "content": None,
                                                      "refusal": None},
                "logprobs": None, "finish_reason": None})
            message = out["message"]
            delta = choice.get("delta") or {}
            for key, value in delta.items():
                if value is None:
                    continue
                if key not in _OPENAI_DELTA_KEYS and key not in _REASONING_KEYS:
                    return False
                if key == "role":
                    message["role"] = value
                elif key == "tool_calls":
                    calls = message.setdefault("tool_calls", [])
                    slots = self.calls.setdefault(choice["index"], ToolSlots())
                    for call in value:
                        k = slots.slot(call)  # (it keeps the call's id and arguments)
                        if k == len(calls):
                            calls.append({"id": "", "type": call.get("type") or "function",
                                          "function": {"name": "", "arguments": ""}})
                            self.size += 64
                        fn = call.get("function") or {}
                        made = calls[k]["function"]
                        if not made["name"]:  # (some servers repeat it on every delta)
                            made["name"] = fn.get("name") or ""
                        self.size += len(fn.get("name") or "") + len(fn.get("arguments") or "")
                elif key == "content" or value:  # (content "" is an answer; refusal "" is not)
                    message[key] = (message.get(key) or "") + value
                    self.size += len(value)
            if choice.get("finish_reason"):
                out["finish_reason"] = choice["finish_reason"]
        return True

    def body(self) -> bytes | None:
        """The answer as JSON; None when the stream was not whole or not understood."""
        if self.failed or not self.done or self.msg is None:
            return None
        try:
            if self.api == API_ANTHROPIC:
                return None if self.json else json_dumps(self.msg)
            if not self.choices or any(c["finish_reason"] is None
                                       for c in self.choices.values()):
                return None
            for index, slots in self.calls.items():
                for k, call in enumerate(self.choices[index]["message"]["tool_calls"]):
                    call["id"] = slots.ids[k]
                    call["function"]["arguments"] = slots.args[k].text()
            for choice in self.choices.values():  # a tool call or a refusal: content null
                message = choice["message"]
                if message["content"] == "" and (message.get("tool_calls") or
                                                 message["refusal"]):
                    message["content"] = None
            answer = dict(self.msg, object="chat.completion",
                          choices=[self.choices[i] for i in sorted(self.choices)])
            if self.usage is not None:
                answer["usage"] = self.usage
            return json_dumps(answer)
        except Exception:  # (an answer nested too deeply to encode)
            return None


def _anthropic_events(msg: dict) -> list[bytes]:
    usage = dict(msg.get("usage") or {})
    start = {k: v for k, v in msg.items() if k not in ("content", "stop_reason",
                                                        "stop_sequence", "usage")}
    start.update(content=[], stop_reason=None, stop_sequence=None,
                 usage=dict(usage, output_tokens=min(1, usage.get("output_tokens", 0))))
    events = [_sse("message_start", {"type": "message_start", "message": start})]
    for i, block in enumerate(msg.get("content") or ()):
        kind = block.get("type")
        if kind == "text":
            shell, delta = dict(block, text=""), {"type": "text_delta", "text": block["text"]}
        elif kind in ("tool_use", "server_tool_use"):
            shell = dict(block, input={})
            delta = {"type": "input_json_delta",
                     "partial_json": json.dumps(block.get("input", {}), ensure_ascii=False)}
        elif kind == "thinking":
            shell = dict(block, thinking="", signature="")
            delta = {"type": "thinking_delta", "thinking": block.get("thinking", "")}
        else:
            shell, delta = block, None
        events.append(_sse("content_block_start", {"type": "content_block_start", "index": i,
                                                   "content_block": shell}))
        if delta is not None:
            events.append(_sse("content_block_delta", {"type": "content_block_delta",
                                                       "index": i, "delta": delta}))
        if kind == "thinking" and block.get("signature"):
            events.append(_sse("content_block_delta", {
                "type": "content_block_delta", "index": i,
                "delta": {"type": "signature_delta", "signature": block["signature"]}}))
        events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(_sse("message_delta", {"type": "message_delta", "delta": {
        "stop_reason": msg.get("stop_reason"), "stop_sequence": msg.get("stop_sequence")},
        "usage": usage}))
    events.append(_sse("message_stop", {"type": "message_stop"}))
    return events


def _openai_events(obj: dict, include_usage: bool) -> list[bytes]:
    base = {k: obj[k] for k in _CHUNK_KEYS if k in obj}
    base["object"] = "chat.completion.chunk"
    events = []

    def chunk(choices: list, **extra) -> None:
        events.append(b"data: " + json_dumps(dict(base, choices=choices, **extra)) + b"\n\n")
    for choice in obj.get("choices") or ():
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        chunk([{"index": index, "delta": {"role": message.get("role", "assistant"), "content":
                                          None if message.get("content") is None else ""},
                 "finish_reason": None}])  # (a tool call's message has content null)
        for key in _REASONING_KEYS:  # (a reasoning server's thoughts come before the answer)
            if message.get(key) and type(message[key]) is str:
                chunk([{"index": index, "delta": {key: message[key]}, "finish_reason": None}])
        if message.get("content"):  # (with the logprobs of its tokens, when asked)
            chunk([dict({"index": index, "delta": {"content": message["content"]},
                         "finish_reason": None},
                        **({"logprobs": choice["logprobs"]} if choice.get("logprobs") else {}))])
        if message.get("refusal"):
            chunk([{"index": index, "delta": {"refusal": message["refusal"]},
                    "finish_reason": None}])
        for j, call in enumerate(message.get("tool_calls") or ()):
            chunk([{"index": index, "delta": {"tool_calls": [dict(call, index=j)]},
                    "finish_reason": None}])
        if isinstance(message.get("function_call"), dict):  # (the legacy functions API)
            chunk([{"index": index, "delta": {"function_call": message["function_call"]},
                    "finish_reason": None}])
        chunk([{"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}])
    if include_usage and obj.get("usage"):
        chunk([], usage=obj["usage"])
    events.append(b"data: [DONE]\n\n")
    return events


# -- prompt injection ---------------------------------------------------------------------------

# (name, category, regex, literal that must occur first: in the lowercased text for
# case-insensitive patterns). The literal check is a C-speed substring search, so the regex only
# runs on the few texts that could match.
INJECTION_PATTERNS = tuple((name, cat, re.compile(rx, flags), needle) for name, cat, rx, flags,
                           needle in (
    ("ignore_previous", "instruction_override",
     r"\bignore\s+(?:all\s+)?(?:the\s+)?(?:previous|prior|above|earlier)\s+(?:instructions?|"
     r"prompts?|directives?|rules?)", re.I, "ignore"),
    # disregard_above: an instruction-like object (up to two words before it) or nothing after
    # "previous", so not "disregard the earlier draft"
    ("disregard_above", "instruction_override",
     r"\bdisregard\s+(?:all\s+)?(?:the\s+|your\s+|any\s+)?(?:above|previous|prior|earlier)"
     r"(?:(?:\s+[\w-]+){0,2}?\s+(?:instructions?|prompts?|directives?|directions?|commands?|"
     r"orders?|rules?|guidelines?|guidance|polic(?:y|ies)|constraints?|text|messages?|"
     r"context|conversation|content|input)\b|\s*(?:[.,;:!)]|\band\b|$))", re.I, "disregard"),
    ("new_instructions", "instruction_override",
     r"\b(?:new|updated|revised|real)\s+instructions?\s*:", re.I, "instruction"),
    # system_prompt_override: not someone's own ("improve my system prompt: ...")
    ("system_prompt_override", "instruction_override",
     r"(?<!\bmy )(?<!\bour )\bsystem\s+prompt\s*:", re.I, "prompt"),
    ("forget_instructions", "instruction_override",
     r"\bforget\s+(?:all\s+)?(?:your\s+)?(?:previous\s+)?(?:instructions?|rules?|guidelines?)",
     re.I, "forget"),
    ("code_block_system", "delimiter_injection", r"```\s*system(?!-verilog)\b", re.I, "```"),
    # markdown_system: not a documentation heading such as "### System requirements"
    ("markdown_system", "delimiter_injection",
     r"###\s*SYSTEM\b(?!\s+(?:requirements?|design|architecture|overview|status|information|"
     r"info|settings|configuration|setup|diagram|health|logs?|details|components?|"
     r"dependencies|specs?|specifications?|calls?)\b)", re.I, "###"),
    ("chatml_system", "delimiter_injection", r"<\|im_start\|>system", 0, "<|im_start|>"),
    # xml_system_tag: not a one-word data element inside an XML document (a Maven pom's
    # <system>GitHub</system><url>...)
    ("xml_system_tag", "delimiter_injection",
     r"<system\s*>(?!\s*[^\s<]{1,80}\s*</system\s*>\s*<(?!/?(?:user|assistant|human|ai|"
     r"model|instructions?)\s*>))", re.I, "<system"),
    ("chatml_end_start", "delimiter_injection", r"<\|im_end\|>\s*<\|im_start\|>", 0, "<|im_end|>"),
    # you_are_now: as the reference, except a user asking for help ("you are now going to
    # help me ...")
    # you_are_now: nor a program's status line ("You are now logged in.", "you are now
    # connected")
    ("you_are_now", "role_confusion",
     r"\byou\s+are\s+now\s(?!\s*going\s+to\s+(?:help|write|answer|explain|review|check|"
     r"translate|summari[sz]e|read|fix)\b)(?!\s*(?:(?:logged|signed)\s+(?:in|out|on|off)|"
     r"(?:dis)?connected(?:\s+to\s+[\w.:/@-]+)?|authenticated|(?:un)?subscribed|"
     r"on\s+branch\s+[\w./-]+|up\s+to\s+date)\s*(?:[.!]|\n|$))", re.I, "now"),
    ("act_as_if", "role_confusion", r"\bact\s+as\s+if\s+you\s+are\s", re.I, "as if"),
    ("pretend_you_are", "role_confusion", r"\bpretend\s+(?:that\s+)?you\s+are\s", re.I, "pretend"),
    ("roleplay_as", "role_confusion", r"\brole[\s-]?play\s+as\s", re.I, "play"),
    ("base64_ignore", "encoded_injection", r"aWdub3Jl", 0, "aWdub3Jl"),
))
# a lowercase needle is looked for in the lowercased text, any other as it is
_INJECTION_CASELESS = tuple(p for p in INJECTION_PATTERNS if p[3].islower())
_INJECTION_CASED = tuple(p for p in INJECTION_PATTERNS if not p[3].islower())
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{40,}={0,2}")
_BASE64_MAP = bytes(ord("a") if chr(i).isascii() and (chr(i).isalnum() or chr(i) in "+/_-")
                    else 32 for i in range(256))  # the base64 alphabet -> "a", the rest -> " "


def find_injections(text: str) -> list[tuple[str, str, str]]:
    """(pattern, category, matched text) for every injection pattern in a text, including
    patterns hidden in base64 runs."""
    low = text.lower()
    found = [(name, cat, m.group()) for name, cat, rx, needle in _INJECTION_CASELESS
             if needle in low for m in rx.finditer(text)]
    found += [(name, cat, m.group()) for name, cat, rx, needle in _INJECTION_CASED
              if needle in text for m in rx.finditer(text)]
    if len(text) >= 40 and b"a" * 40 in text.encode("ascii", "replace").translate(_BASE64_MAP):
        import base64  # only texts with a long base64-looking run need it
        for run in _BASE64_RUN.findall(text):
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    inner = decode(run + "=" * (-len(run) % 4)).decode("utf-8")
                except (ValueError, UnicodeDecodeError):
                    continue
                found += [(name + " (base64 encoded)", "encoded_injection", run)
                          for name, cat, rx, _ in INJECTION_PATTERNS[:-1] if rx.search(inner)]
                break
    return found


_INJECTION_SQL = ("INSERT INTO injection_log (request_id, timestamp, category, pattern, action, "
                  "field_path, context) VALUES (?, ?, ?, ?, ?, ?, ?)")


class ScanMemo:
    """Results of scanning texts, by the text itself: agents resend the same system prompt,
    tool results and history on every turn, so only the new part of a conversation is scanned.
    Short texts are kept only from requests with a history (`short=True`): an agent's history
    holds a hundred short tool inputs and answers, each costing a full scan when it has a digit
    or a slash; a one-off chat message would only churn the table. Bounded by the memory its
    texts hold, oldest first out."""
    __slots__ = ("entries", "size", "max_bytes")
    MIN_LENGTH = 256   # shorter texts are scanned each time unless `short`
    HISTORY = 16       # text fields from which a request counts as carrying a history
    ENTRY_BYTES = 128  # what an entry costs besides its text (table slot, order link, result)

    def __init__(self, max_bytes: int = 8 * 1024 * 1024) -> None:
        self.entries: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.size = 0
        self.max_bytes = max_bytes

    def get(self, text: str, scan, short: bool = False):
        if len(text) < self.MIN_LENGTH and not short:
            return scan(text)
        found = self.entries.get(text)
        if found is not None:
            self.entries.move_to_end(text)
            return found
        found = self.entries[text] = scan(text) or ()
        self.size += self._cost(text, found)
        while self.size > self.max_bytes:
            old, result = self.entries.popitem(last=False)
            self.size -= self._cost(old, result)
        return found

    def _cost(self, text: str, found) -> int:
        return sys.getsizeof(text) + self.ENTRY_BYTES + 96 * len(found)  # (a hit: a tuple)


class FirstSeen:
    """Texts whose findings an earlier request of the project recorded already: an agent
    resends its whole history on every turn, and one injection (or email) in an early tool
    result would be a new detection in each of them. The action applies every time; the
    record is made once (by the first request: every field of it). One per process (a reload
    keeps it), shared by the stages that record; bounded, oldest first out."""
    __slots__ = ("keys", "limit")

    def __init__(self, limit: int = 65536) -> None:
        self.keys: collections.OrderedDict[tuple, str] = collections.OrderedDict()
        self.limit = limit

    def first(self, scope: str, text: str, request: str) -> bool:
        """True when no earlier request in this scope (a stage and a project) had the text."""
        key = (scope, len(text), hash(text))
        owner = self.keys.get(key)
        if owner is not None:
            self.keys.move_to_end(key)
            return owner == request
        self.keys[key] = request
        if len(self.keys) > self.limit:
            self.keys.popitem(last=False)
        return True


class InjectionGuard(Stage):
    """Prompt-injection patterns in user messages and tool results (both APIs, array content
    and nested tool results included), and in Responses API calls (`input` and tool outputs).
    log records, warn also sets a response header, sanitize replaces the matches, block answers
    400. Fails closed."""
    name = "injection"
    fails_closed = True
    side_calls = True  # for /v1/responses; other pass-through calls are not a conversation

    def __init__(self, cfg: Config, store: Store, log: Logger, metrics: Metrics,
                 first_seen: "FirstSeen | None" = None, **_: object) -> None:
        self.cfg = cfg.injection
        self.store = store
        self.log = log
        self.metrics = metrics
        self.memo = ScanMemo()
        self.recorded = first_seen if first_seen is not None else FirstSeen()  # (outlives
        # reloads)

    def request(self, ctx: Context) -> Reply | None:
        if not self.cfg.enabled or not isinstance(ctx.obj, dict):
            return None
        action = self.cfg.action
        hits = []
        if ctx.req.path in ACCOUNTED_PATHS:
            fields = text_fields(ctx.api, ctx.obj, ("user", "tool"))
        elif ctx.req.path == RESPONSES_PATH and ctx.req.method == "POST":
            fields = responses_text_fields(ctx.obj, ("user", "tool"))
        else:  # (count_tokens, embeddings: nothing a model acts on)
            return None
        short = len(fields) >= ScanMemo.HISTORY
        for parent, key, path, _ in fields:
            found = self.memo.get(parent[key], find_injections, short)
            if not found:
                continue
            where = field_path(path)
            done = "log" if action == "sanitize" and type(parent) is CitedText else action
            fresh = self.recorded.first("injection/" + ctx.project, parent[key], ctx.id)
            hits += [(where, done, f, fresh) for f in found]
            if done == "sanitize":
                text = parent[key]
                for _, _, matched in found:
                    text = text.replace(matched, "[REMOVED]")
                parent[key] = text
                mark_changed(ctx, path)
        if not hits:
            return None
        now = utc_iso(ctx.wall)
        categories = sorted({f[1] for _, _, f, _ in hits})
        fresh = [hit for hit in hits if hit[3]]
        for path, done, (pattern, category, matched), _ in fresh:
            self.store.write(_INJECTION_SQL, (ctx.id, now, category, pattern, done, path,
                                              mask(matched[:60])))
            self.metrics.inc("tokenman_injection_detections_total",
                             (("action", done), ("category", category)))
        if fresh or action == "block":
            self.log.warn("prompt injection detected", id=ctx.id, action=action,
                          categories=",".join(categories), fields=len(hits))
        if action == "block":
            return error_reply(ctx, 400, "prompt injection detected: " + ", ".join(categories),
                               extra={"categories": categories} if ctx.api == API_OPENAI
                               else None)
        if action == "warn":
            ctx.headers_out.append((b"X-Tokenman-Injection-Warning",
                                    ",".join(categories).encode()))
        return None


# -- PII ----------------------------------------------------------------------------------------

def _luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _ssn_ok(m: re.Match) -> bool:
    area, group, serial = m.group(1), m.group(2), m.group(3)
    return area not in ("000", "666") and not area.startswith("9") and group != "00" \
        and serial != "0000"


def _card_ok(m: re.Match) -> bool:
    """Luhn-valid and shaped like a card a network issues (its first digits and length): one
    random digit run in ten passes Luhn alone (a millisecond timestamp, a run of zeros)."""
    digits = re.sub(r"\D", "", m.group())
    n = len(digits)
    if not 13 <= n <= 19 or digits.count(digits[0]) == n or not _luhn(digits):
        return False
    two, four = int(digits[:2]), int(digits[:4])
    if digits[0] == "4":  # Visa
        return n in (13, 16, 19)
    if 51 <= two <= 55 or 2221 <= four <= 2720:  # Mastercard
        return n == 16
    if two in (34, 37):  # American Express
        return n == 15
    if 2200 <= four <= 2204:  # Mir
        return n == 16
    if 300 <= int(digits[:3]) <= 305 or two in (36, 38, 39) or 3528 <= four <= 3589:
        return n >= 14  # Diners Club, JCB
    return digits[0] in "56"  # Maestro, Discover, UnionPay, RuPay


def _entropy_ok(m: re.Match) -> bool:
    import math  # only texts with a keyword=value secret candidate need it
    value = m.group("secret")
    counts = collections.Counter(value)
    entropy = -sum(c / len(value) * math.log2(c / len(value)) for c in counts.values())
    return entropy > 3.5


# (type, priority, pattern, validator, gate); on overlap the higher priority wins. A pattern
# with a group named "secret" replaces only that group. The gate keeps the regexes off texts that
# cannot match: ("text", literals one of which must occur as written), ("lower", keywords looked
# for in the lowercased text), or "digits": the digit-based patterns only run on the short
# candidate windows that _digit_windows finds.
PII_DETECTORS = (
    ("api_key", 6, re.compile(
        r"\b(?:sk-(?:ant-|proj-|svcacct-)?[A-Za-z0-9_\-]{20,}|AKIA[0-9A-Z]{16}|"
        r"gh[pousr]_[A-Za-z0-9]{36,}|glpat-[A-Za-z0-9_\-]{20,}|xox[abpr]-[A-Za-z0-9\-]{10,}|"
        r"AIza[0-9A-Za-z_\-]{35})"), None,
     ("text", ("sk-", "AKIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "glpat-", "xox", "AIza"))),
    ("api_key", 5, re.compile(
        r"(?i)\b(?:api[_-]?key|secret|token|password|passwd|credential)s?[\"']?\s*[=:]\s*"
        r"[\"']?(?P<secret>[A-Za-z0-9/+_\-.]{16,})"), _entropy_ok,
     ("lower", ("key", "secret", "token", "passw", "credential"))),
    ("credit_card", 4, re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"), _card_ok,
     "digits"),
    ("ssn", 3, re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])"), _ssn_ok, "digits"),
    # (a local part is at most 64 characters: an unbounded one was tried from every position of
    # a long run of its characters, so a 40 KB text took 1.5 s)
    ("email", 2, re.compile(r"[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"), None,
     ("text", ("@",))),
    # phones need a + country code or separators: bare digit runs (ids, timestamps) are not phones
    ("phone", 1, re.compile(
        r"(?<![\w+])(?:\+[1-9]\d{0,2}[ .\-]?(?:\(\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-]\d{2,4}){1,4}"
        r"|\(\d{3}\)[ .\-]?\d{3}[ .\-]\d{4}|\d{3}[.\-]\d{3}[.\-]\d{4})(?![\w])"), None, "digits"),
    # (a Windows profile in any case, with / or \\ or, in JSON text and code, \\\\)
    ("file_path", 0, re.compile(r"(?:/Users/|/home/)[A-Za-z0-9._\-]+|"
                                r"[A-Za-z]:(?:\\{1,2}|/)(?i:users)(?:\\{1,2}|/)[^\\/\s\"']+"),
     None, ("lower", ("/users/", "/home/", ":\\users", ":\\\\users", ":/users"))),
)
_DIGIT_MAP = bytes(ord("0") if chr(i).isdigit() and i < 128 else i if chr(i) in " .()+-" else
                   ord("x") for i in range(256))
_DIGIT_WINDOW = re.compile(rb"0[0 .()+\-]{5,}0")  # literal first byte: the fast search path
_PLACEHOLDER_TEXT_RE = re.compile(r"\[(?:EMAIL|PHONE|SSN|CREDIT_CARD|API_KEY|FILE_PATH)_\d+\]")
_PLACEHOLDER_RE = re.compile(_PLACEHOLDER_TEXT_RE.pattern.encode())
_PII_SQL = ("INSERT INTO pii_log (request_id, timestamp, pii_type, action, field_path, context) "
            "VALUES (?, ?, ?, ?, ?, ?)")


def _digit_windows(text: str) -> list[tuple[int, int]]:
    """Spans that could hold a card, SSN or phone number: digit runs with separators, found
    on a translated ASCII copy (one character per character) in one fast pass."""
    raw = text.encode("ascii", "replace").translate(_DIGIT_MAP)
    return [(max(0, m.start() - 2), min(len(text), m.end() + 2))
            for m in _DIGIT_WINDOW.finditer(raw)]


# What any detector needs at least one of; three cheap checks keep the regexes off plain prose
# (one regex with these as alternatives tries every one at every position: ~10x slower).
_PII_GATE_CHARS = re.compile(r"[@/\\0-9]")
_PII_GATE_WORDS = ("sk-", "AKIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "glpat-", "xox", "AIza")
_PII_GATE_LOWER = ("key", "secret", "token", "passw", "credential")


def _pii_possible(text: str) -> bool:
    if _PII_GATE_CHARS.search(text):
        return True
    for word in _PII_GATE_WORDS:  # (a loop: any() over a generator costs twice as much)
        if word in text:
            return True
    low = text.lower()
    for word in _PII_GATE_LOWER:
        if word in low:
            return True
    return False


def find_pii(text: str, types: frozenset, allow: frozenset) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) spans, higher-priority detectors winning overlaps."""
    if len(text) < 512 and not _pii_possible(text):
        return []  # a short text none of the detectors could match (one scan instead of seven)
    spans = []
    windows = low = None
    for kind, priority, rx, valid, gate in PII_DETECTORS:
        if kind not in types:
            continue
        if gate == "digits":
            if windows is None:
                windows = _digit_windows(text)
            matches = [m for a, b in windows for m in rx.finditer(text, a, b)]
        else:
            where, words = gate
            if where == "lower":  # keyword gates are checked on the lowercased text
                low = text.lower() if low is None else low
                if not any(g in low for g in words):
                    continue
            elif not any(g in text for g in words):
                continue
            matches = rx.finditer(text)
        for m in matches:
            if valid is not None and not valid(m):
                continue
            start, end = m.span("secret") if "secret" in rx.groupindex else m.span()
            if text[start:end] not in allow:
                spans.append((priority, start, end, kind))
    if not spans:
        return []
    spans.sort(key=lambda s: (-s[0], s[1] - s[2]))
    starts: list[int] = []  # the spans taken, in text order (they never overlap: their ends
    taken: list[tuple[int, int, str]] = []  # are in order too, so a new one meets only its
    for _, start, end, kind in spans:  # neighbours; a text of 20,000 e-mails took seconds)
        i = bisect.bisect_right(starts, start)
        if (i and taken[i - 1][1] > start) or (i < len(starts) and starts[i] < end):
            continue
        starts.insert(i, start)
        taken.insert(i, (start, end, kind))
    return taken


def json_answer(obj: object) -> bool:
    """A request whose answer text is JSON: OpenAI's JSON mode or a schema (response_format,
    the Responses API's text.format), Anthropic's structured outputs (output_format)."""
    if not isinstance(obj, dict):
        return False
    text = obj.get("text")
    config = obj.get("output_config")
    for fmt in (obj.get("response_format"), obj.get("output_format"),
                text.get("format") if isinstance(text, dict) else None,
                config.get("format") if isinstance(config, dict) else None):
        if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
            return True
    return False


def _unescaped(value: str) -> str:
    """A value found in JSON text as the string it spells (itself when it spells none)."""
    if "\\" not in value:
        return value
    try:
        out = json.loads('"' + value + '"')
    except ValueError:
        return value
    return out if type(out) is str else value


def _spelled_placeholders(obj: object) -> set[str]:
    """Placeholders a request already spells anywhere (a template, a document, a tool schema)
    but in thinking blocks: those keep tokenman's own from earlier turns, numbers unchanged."""
    strings: list[str] = []
    _json_strings(obj, strings, 0, lambda part, depth: part.get("type") in (
        "thinking", "redacted_thinking"))
    return {t for text in strings if "[" in text for t in _PLACEHOLDER_TEXT_RE.findall(text)}


def _clashes(text: str, mapping: dict[str, str]) -> list[tuple[int, int, str]]:
    """Where a text spells, as written by the client, a placeholder this request already gave
    a value (a README quoted in a later turn that shows [EMAIL_1]): such a spelling is given a
    placeholder of its own, restored as it was written, so that neither the model nor the
    restorer takes it for the value (an agent editing that README would write the address)."""
    given = set(mapping.values())
    return [(m.start(), m.end(), m.group()[1:].rpartition("_")[0].lower())
            for m in _PLACEHOLDER_TEXT_RE.finditer(text) if m.group() in given]


class SpelledSoFar:
    """The placeholders a request spells (as _spelled_placeholders) before a field's turn ends:
    the parts before its turns (tools, system, instructions) and its turns up to that one. A
    value is never numbered as a placeholder spelled before it; one spelled only in a later
    turn (a document quoted in a tool result) does not renumber the values before it, so an
    agent's history, and the provider's prompt cache of it, stay as they were. Each turn is
    read before it is redacted (fields come in order)."""
    __slots__ = ("turns", "upto", "turns_key")

    def __init__(self, obj: dict) -> None:
        key = next((k for k in ("messages", "input") if isinstance(obj.get(k), list)), None)
        self.turns = obj[key] if key else []
        self.upto = [_spelled_placeholders({k: v for k, v in obj.items() if k != key})]
        self.turns_key = key

    def at(self, path: tuple) -> set[str]:
        if len(path) < 2 or path[0] != self.turns_key or type(path[1]) is not int:
            return self.upto[0]
        return self._through(path[1])

    def everything(self) -> set[str]:
        return self._through(len(self.turns) - 1)

    def _through(self, index: int) -> set[str]:
        upto = self.upto
        while len(upto) <= index + 1:
            upto.append(upto[-1] | _spelled_placeholders(self.turns[len(upto) - 1]))
        return upto[index + 1]


_RESPONSES_BODIES = frozenset((RESPONSES_PATH, RESPONSES_PATH + "/input_tokens"))  # (the same
# body: input_tokens counts what a call would send, so it is screened as the call is)
_COUNTING_PATHS = SIDE_CALL_PATHS | {RESPONSES_PATH + "/input_tokens"}  # (their detections
# are the call's: recorded once, with it)


class PlaceholderMemory:
    """The values behind the placeholders of Responses API answers the provider keeps, per
    (response id, tenant): the values first sent in that turn and the response it continued,
    so a turn's values are those of its whole chain (walked back, the latest winning); and a
    conversation's last response. Bounded by entries and bytes (oldest out); memory only."""
    __slots__ = ("entries", "threads", "size", "max_entries", "max_bytes")
    CHAIN = 1024  # responses walked back at most
    MAX_ID = 256  # characters of a response or conversation id
    ENTRY_BYTES = 160  # what an entry costs besides its values

    def __init__(self, max_entries: int = 4096, max_bytes: int = 8 * 1024 * 1024) -> None:
        self.entries: collections.OrderedDict[tuple[str, str], tuple[dict, str, int]] = \
            collections.OrderedDict()
        self.threads: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self.size = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def learn(self, rid: str, tenant: str, values: dict[str, str], prev: str,
              conv: str) -> None:
        if max(len(rid), len(prev), len(conv)) > self.MAX_ID or not values and not prev:
            return  # (ids are short: a long one is no provider's)
        cost = self.ENTRY_BYTES + len(rid) + len(prev) + len(conv) \
            + sum(len(p) + len(v) for p, v in values.items())
        if cost > self.max_bytes // 16:
            return  # (one answer may not push out most of the others)
        self.forget(rid, tenant)
        self.entries[(rid, tenant)] = (values, prev, cost)
        self.size += cost
        if conv:
            self.threads[(conv, tenant)] = rid
            self.threads.move_to_end((conv, tenant))
            if len(self.threads) > self.max_entries:
                self.threads.popitem(last=False)
        while len(self.entries) > self.max_entries or self.size > self.max_bytes:
            self.size -= self.entries.popitem(last=False)[1][2]

    def recall(self, rid: str, tenant: str) -> dict[str, str]:
        chain = []
        while rid and len(chain) < self.CHAIN:
            entry = self.entries.get((rid, tenant))
            if entry is None:
                break
            self.entries.move_to_end((rid, tenant))
            chain.append(entry[0])
            rid = entry[1]
        out: dict[str, str] = {}
        for values in reversed(chain):
            out.update(values)
        return out

    def thread(self, conv: str, tenant: str) -> str:
        return self.threads.get((conv, tenant), "")

    def forget(self, rid: str, tenant: str) -> None:
        old = self.entries.pop((rid, tenant), None)
        if old is not None:
            self.size -= old[2]

    def forget_thread(self, conv: str, tenant: str) -> None:
        self.threads.pop((conv, tenant), None)


class PIIGuard(Stage):
    """Personal data and secrets in every text field of both APIs. redact swaps each value for a
    placeholder ([EMAIL_1]) and restores it in the answer (streamed deltas included, with JSON
    escaping where the text is JSON); hash swaps it for a digest; log records; block answers 400
    naming the types. Every detection lands in pii_log (masked). Fails closed."""
    name = "pii"
    fails_closed = True
    runs_on_hit = True  # a cached answer holds placeholders: rebuild the mapping to restore
    side_calls = True  # count_tokens carries the same conversation to the same provider

    def __init__(self, cfg: Config, store: Store, log: Logger, metrics: Metrics,
                 pii_key: bytes = b"", pii_memory: "PlaceholderMemory | None" = None,
                 router: "Router | None" = None, first_seen: "FirstSeen | None" = None,
                 **_: object) -> None:
        self.cfg = cfg.pii
        self.key = pii_key or os.urandom(16)  # numbers stable placeholders (kept across reloads)
        # the Responses API's stored answers, for later turns and fetches (kept across reloads)
        self.memory = pii_memory if pii_memory is not None else PlaceholderMemory()
        # providers that answer with tokenman's own key: their callers cannot be told apart
        self.own_key = frozenset(k for k, p in router.providers.items() if p.api_key) \
            if router is not None else frozenset()
        self.metrics = metrics
        self.types = frozenset(cfg.pii.types)
        self.allow = frozenset(cfg.pii.allow_list)
        self.store = store
        self.log = log
        self.memo = ScanMemo()
        self.recorded = first_seen if first_seen is not None else FirstSeen()  # (outlives
        # reloads)

    def _scan(self, text: str) -> list[tuple[int, int, str]]:
        return find_pii(text, self.types, self.allow)

    def request(self, ctx: Context) -> Reply | None:
        if not self.cfg.enabled or not isinstance(ctx.obj, dict):
            return None
        action = self.cfg.action
        mapping: dict[str, str] = {}     # original value -> placeholder
        counters: dict[str, int] = {}
        spelled: SpelledSoFar | None = None
        taken: set[str] | None = None
        found = []
        path = ctx.req.path
        if path.endswith("/") or "//" in path:  # (a path the provider may read as its own)
            path = re.sub("/+", "/", path).rstrip("/")
        responses = path in _RESPONSES_BODIES
        prompt = _PROMPT_MEMBERS.get(path) if ctx.api == API_OPENAI else None
        fields = responses_text_fields(ctx.obj) if responses else \
            prompt_fields(ctx.obj, prompt) if prompt else text_fields(ctx.api, ctx.obj)
        fields += id_fields(ctx.obj)
        # a Responses call the provider keeps (store is on unless turned off) may be continued
        # without being resent: numbered in order, [EMAIL_1] would be another person in every
        # turn (and be restored as this turn's); numbered from the value (a keyed digest, so
        # the provider cannot confirm a guess), it means one value in all of them
        stable = responses and (
            ctx.obj.get("store") is not False or bool(ctx.obj.get("previous_response_id")
                                                      or ctx.obj.get("conversation")))
        tenant = self._tenant(ctx) if stable else ""
        number_key = self._number_key(tenant) if stable else b""
        earlier, keep = self._earlier(ctx, tenant) if tenant and action == "redact" \
            else (None, None)
        short = len(fields) >= ScanMemo.HISTORY
        for parent, key, path, role in fields:
            text = parent[key]
            spans = self.memo.get(text, self._scan, short)
            clashes = _clashes(text, mapping) if mapping and action == "redact" \
                and "[" in text and type(parent) is not CitedText else ()
            if not spans and not clashes:
                continue
            where = field_path(path)
            if role == "id" and action != "log":
                done = "hash"  # an end user's id: digested, never refused
            elif type(parent) is CitedText and action in ("redact", "hash"):
                done = "log"  # cited text: checked, never rewritten
            else:
                done = action
            found += [(kind, where, text[s:e], done, text) for s, e, kind in spans]
            if done in ("redact", "hash"):
                if action == "redact":
                    spelled = spelled or SpelledSoFar(ctx.obj)
                    taken = spelled.at(path)
                    if clashes:
                        spans = sorted((*spans, *clashes))
                out, pos = [], 0
                json_text = key == "arguments"  # (a value there is spelled JSON-escaped:
                for s, e, kind in spans:  # C:\\Users\\bob means C:\Users\bob, restored so)
                    out.append(text[pos:s])
                    value = text[s:e]
                    out.append(self._placeholder(_unescaped(value) if json_text else value,
                                                 kind, done, mapping, counters, taken,
                                                 number_key))
                    pos = e
                out.append(text[pos:])
                parent[key] = "".join(out)
                mark_changed(ctx, path)
        if not found and not earlier:
            return None
        fresh = [] if ctx.cache_hit or ctx.req.path in _COUNTING_PATHS else \
            self._first_found(ctx, found)  # (counting: the call it counts records them)
        if fresh:
            now = utc_iso(ctx.wall)
            for kind, path, value, done, _ in fresh:
                self.store.write(_PII_SQL, (ctx.id, now, kind, done, path, mask(value)))
                self.metrics.inc("tokenman_pii_detections_total",
                                 (("action", done), ("type", kind)))
            self.log.info("pii detected", id=ctx.id, action=action,
                          types=",".join(sorted({f[0] for f in fresh})), count=len(fresh))
        if any(f[3] == "block" for f in found):  # (an id is digested, never refused)
            kinds = sorted({f[0] for f in found if f[3] == "block"})
            return error_reply(ctx, 400, "request contains personal data or secrets: "
                               + ", ".join(kinds))
        if action == "redact" and prompt != "input":  # (embeddings and moderations answer
            originals = {p: v for v, p in mapping.items()}  # with no text to restore)
            if earlier:  # an earlier turn's values (not where this request spells the same)
                taken = spelled.everything() if spelled else _spelled_placeholders(ctx.obj)
                originals = {**{p: v for p, v in earlier.items() if p not in taken},
                             **originals}
            ctx.notes["pii"] = PIIRestorer(originals, json_answer(ctx.obj))
            ctx.hooks.append(self)
            if keep is not None:  # (this turn's own values: the earlier ones are kept already)
                ctx.notes["pii_keep"] = keep + ({p: v for v, p in mapping.items()},)
        return None

    def _first_found(self, ctx: Context, found: list[tuple]) -> list[tuple]:
        """The findings in texts no earlier request of the project had (recorded then)."""
        scope = "pii/" + ctx.project
        return [finding for finding in found if self.recorded.first(scope, finding[4], ctx.id)]

    # -- Responses API: placeholders kept per response and conversation ---------------------------
    # A stored response is continued by id (previous_response_id, a conversation) without the
    # earlier turns being resent, run in the background, and fetched again later
    # (GET /v1/responses/{id}, its input_items, plain or streamed, a cancel): the text the
    # provider keeps holds placeholders. Each answer's values are kept under its id and the
    # caller's credential (a keyed digest of the provider key it sends), so only a caller that
    # holds that key (as the provider itself demands) gets them back. An answer made with
    # tokenman's own key is not kept: nothing tells its callers apart.
    def _tenant(self, ctx: Context) -> str:
        headers = ctx.req.headers.map
        cred = headers.get(b"authorization") or headers.get(b"x-api-key") \
            or headers.get(b"api-key") or b""  # (Azure's)
        if not cred.strip():
            return ""
        import hmac
        return ctx.project + ":" + hmac.new(self.key, cred, "sha256").hexdigest()[:24]

    def _number_key(self, tenant: str) -> bytes:
        """The key that numbers a caller's placeholders: one per caller, so another caller
        able to continue this one's stored response cannot confirm a guessed value by seeing
        it given the same placeholder."""
        if not tenant:
            return self.key
        import hmac
        return hmac.new(self.key, tenant.encode("utf-8", "surrogatepass"), "sha256").digest()

    def _earlier(self, ctx: Context, tenant: str) -> tuple[dict[str, str], tuple | None]:
        """The values of the response (or conversation) this call continues, and what to
        keep this call's answer under: (tenant, the response it continues, conversation)."""
        obj = ctx.obj
        prev = obj.get("previous_response_id")
        prev = prev if isinstance(prev, str) else ""
        conv = obj.get("conversation")
        conv = conv.get("id") if isinstance(conv, dict) else conv
        conv = conv if isinstance(conv, str) else ""
        if not prev and conv:
            prev = self.memory.thread(conv, tenant)
        return self.memory.recall(prev, tenant), (tenant, prev, conv)

    def _learn(self, ctx: Context, response_id: object) -> None:
        keep = ctx.notes.pop("pii_keep", None)
        if keep is None or not isinstance(response_id, str) or not response_id \
                or ctx.provider in self.own_key:
            return
        tenant, prev, conv, values = keep
        self.memory.learn(response_id, tenant, values, prev, conv)

    def retrieval(self, ctx: Context) -> None:
        """/v1/responses/{id} and below (a fetch, its input_items, a cancel, a delete), and a
        conversation's items (/v1/conversations/{id}/items): the values kept for that response
        (or the conversation's last) and this caller, restored in the body or the replayed
        stream; a delete forgets them."""
        if not self.cfg.enabled or self.cfg.action != "redact":
            return
        parts = ctx.req.path.split("/")  # "", "v1", "responses" or "conversations", id, ...
        tenant = self._tenant(ctx)
        if len(parts) < 4 or not parts[3] or not tenant:
            return
        rid = parts[3]
        if parts[2] == "conversations":  # its items: the values of its last response's chain
            if ctx.req.method == "DELETE" and len(parts) == 4:  # (its responses stay the
                ctx.notes["pii_forget"] = ("", tenant, rid)  # provider's; the thread goes)
                ctx.passed.append(self)
                return
            rid = self.memory.thread(rid, tenant)
        elif ctx.req.method == "DELETE":  # forgotten once the provider says it is deleted
            ctx.notes["pii_forget"] = (rid, tenant, "")
            ctx.passed.append(self)  # (finish() runs for it)
            return
        found = self.memory.recall(rid, tenant)
        if found:
            ctx.notes["pii"] = PIIRestorer(found)
            ctx.hooks.append(self)

    def _placeholder(self, value: str, kind: str, action: str, mapping: dict, counters: dict,
                     taken: set[str], stable_key: bytes = b"") -> str:
        placeholder = mapping.get(value)
        import hmac  # (only for requests with personal data)
        if action == "hash":  # keyed: a plain digest of a phone number or an SSN is reversed
            digest = hmac.new(self.key, value.encode("utf-8", "surrogatepass"),  # by trying
                              "sha256").hexdigest()  # every candidate (10^4 SSNs in ms)
            return f"[{kind.upper()}_HASH_{digest[:8]}]"
        if placeholder is None and stable_key:  # the same number for the same value while
            digest = hmac.new(stable_key, value.encode("utf-8", "surrogatepass"),
                              "sha256").hexdigest()
            number = int(digest[:15], 16) % 900_000_000 + 100_000_000
            used = set(mapping.values())
            while f"[{kind.upper()}_{number}]" in taken or f"[{kind.upper()}_{number}]" in used:
                number += 1
            placeholder = mapping[value] = f"[{kind.upper()}_{number}]"
        while placeholder is None or placeholder in taken and mapping.get(value) is None:
            counters[kind] = counters.get(kind, 0) + 1  # a number nobody else means
            placeholder = f"[{kind.upper()}_{counters[kind]}]"
        mapping[value] = placeholder
        return placeholder

    def response(self, ctx: Context, body: bytes) -> bytes:
        if ctx.notes.get("pii_keep") and ctx.status < 300:
            obj = _loads(body)
            self._learn(ctx, obj.get("id") if isinstance(obj, dict) else None)
        return ctx.notes["pii"].restore_json(body)

    def finish(self, ctx: Context) -> None:
        forget = ctx.notes.get("pii_forget")  # (the provider's answer: its body may have
        status = ctx.notes.get("upstream_status", 0)  # been cut, or the client gone, after it)
        if forget is not None and (200 <= status < 300 or status == 404):
            rid, tenant, conv = forget
            if conv:
                self.memory.forget_thread(conv, tenant)
            else:
                self.memory.forget(rid, tenant)

    def stream_event(self, ctx: Context, event: bytes) -> bytes:
        if ctx.notes.get("pii_keep") and b"response.created" in event:
            name, data = sse_fields(event)
            obj = _loads(data) if data[:1] == b"{" else None
            if isinstance(obj, dict) and obj.get("type") == "response.created" \
                    and isinstance(obj.get("response"), dict):
                self._learn(ctx, obj["response"].get("id"))
        restorer = ctx.notes.get("pii")
        if restorer is None:
            return event
        restorer.own_thinking = ctx.upstream_api != ctx.api or "own_thinking" in ctx.notes
        return restorer.restore_event(ctx.api, event)  # (translated: tokenman's blocks)


_RESPONSE_PART_KEYS = ("item_id", "output_index", "content_index", "summary_index")
_RESPONSE_ENDS = frozenset(("response.completed", "response.incomplete", "response.failed",
                            "error"))


_TOOL_CALL_KINDS = frozenset(("tool_use", "server_tool_use", "function_call", "mcp_call",
                              "custom_tool_call"))  # (their values are a tool's, not the answer)


class PIIRestorer:
    """Puts original values back where placeholders come out of the provider. In JSON text the
    value is inserted JSON-escaped (a Windows path stays valid JSON); in streamed deltas a
    placeholder split across events is held back until it is whole."""
    __slots__ = ("plain", "escaped", "held", "pending", "json_answer", "own_thinking")

    def __init__(self, originals: dict[str, str], json_answer: bool = False) -> None:
        self.plain = originals  # placeholder -> original value
        self.json_answer = json_answer  # the answer's text is JSON (JSON mode, a schema)
        self.own_thinking = False  # a stream's thinking blocks are tokenman's (made from a
        # server's reasoning, unsigned): restored like text; a provider's own are signed and
        # left as they are (in a whole answer each block says which it is: its signature)
        self.escaped = {p: _compact(v)[1:-1] for p, v in originals.items()}
        self.pending: dict[tuple, tuple[dict, str]] = {}  # Responses: a delta event held whole
        self.held: dict[tuple, str] = {}  # (choice or block index, field) -> held-back text

    def restore_json(self, body: bytes) -> bytes:
        """Placeholders inside the JSON string values of a body, replaced JSON-escaped. Tool
        call arguments are JSON text inside a string: their values are escaped for it (a
        Windows path stays valid JSON there too). Thinking blocks keep theirs: the provider
        signed that text and verifies it when it comes back (streamed thinking deltas are left
        alone the same way)."""
        if b"[" not in body or not _PLACEHOLDER_RE.search(body):
            return body
        if b'"arguments"' in body or b'"thinking"' in body or b'"redacted_thinking"' in body \
                or self.json_answer:
            obj = _loads(body)
            if isinstance(obj, (dict, list)):
                return json_dumps(self._restore_value(obj))
        esc = self.escaped
        return _PLACEHOLDER_RE.sub(
            lambda m: esc.get(m.group().decode(), m.group().decode()).encode(), body)

    def _restore_value(self, value, key: str = "", json_text: bool = False,
                       answer_ok: bool = True):
        """`answer_ok`: not inside a tool call, whose values are never the answer's text."""
        if isinstance(value, str):
            if "[" not in value:
                return value
            table = self.escaped if json_text else self.plain
            return _PLACEHOLDER_TEXT_RE.sub(lambda m: table.get(m.group(), m.group()), value)
        if isinstance(value, dict):  # arguments are JSON text in a chat tool call's function
            kind = value.get("type")  # and in Responses function and MCP calls
            text_args = key in ("function", "function_call") or kind in (
                "function_call", "mcp_call") or type(kind) is str and kind.endswith(
                "arguments.done")
            answer_ok = answer_ok and not text_args and kind not in _TOOL_CALL_KINDS
            # the answer's own text is JSON too: a text block, a chat message, output text
            answer = self.json_answer and answer_ok and (
                kind in ("text", "output_text") or "role" in value
                or type(kind) is str and kind.endswith("output_text.done"))
            return {k: self._restore_value(v, k, text_args and k == "arguments" or answer
                                           and k in ("content", "text") and type(v) is str,
                                           answer_ok and k not in ("input", "tool_calls"))
                    for k, v in value.items()}
        if isinstance(value, list):  # (thinking content blocks are signed: left as they are)
            return [v if key == "content" and isinstance(v, dict) and v.get("type") in (
                "thinking", "redacted_thinking") and v.get("signature") != ""
                else self._restore_value(v, key, False, answer_ok)
                for v in value]  # (an unsigned block is tokenman's: translated)
        return value

    def _restore_text(self, slot: tuple, text: str, json_text: bool) -> str:
        text = self.held.pop(slot, "") + text
        cut = text.rfind("[")
        if cut >= 0 and "]" not in text[cut:] and any(p.startswith(text[cut:])
                                                      for p in self.plain):
            self.held[slot] = text[cut:]  # maybe the start of a placeholder: wait for the rest
            text = text[:cut]
        if "[" not in text:
            return text
        table = self.escaped if json_text else self.plain
        return _PLACEHOLDER_TEXT_RE.sub(lambda m: table.get(m.group(), m.group()), text)

    def restore_event(self, api: str, event: bytes) -> bytes:
        if b"[" not in event and not self.held and not self.pending:
            return event
        name, data = sse_fields(event)
        if api == API_OPENAI and data.strip() == b"[DONE]":  # the end without a finish
            return self._openai_rest() + event  # reason: nothing may stay held back
        obj = _loads(data) if data[:1] == b"{" else None
        if not isinstance(obj, dict):
            return event
        if api == API_ANTHROPIC:
            return self._anthropic(name, obj, event)
        kind = obj.get("type")
        if isinstance(kind, str) and (kind.startswith("response.") or kind == "error"):
            return self._responses(name, kind, obj, data, event)  # the Responses API
        return self._openai(obj, event)

    def _responses(self, name: bytes, kind: str, obj: dict, data: bytes,
                   event: bytes) -> bytes:
        """A Responses API event. A delta whose text may end in the start of a placeholder is
        held whole and goes out with the next delta of its part, merged (under the first one's
        sequence number: numbers stay unique), or before the part's .done event; the end of the
        response (completed, incomplete, failed, an error) sends everything still held. Other
        events (.done, whole items, response.completed) are restored in place."""
        named = bool(name)
        if kind.endswith(".delta") and isinstance(obj.get("delta"), str):
            slot = (kind,) + tuple(obj.get(k) for k in _RESPONSE_PART_KEYS)
            first, text = self.pending.pop(slot, (obj, ""))
            text += obj["delta"]
            cut = text.rfind("[")
            if cut >= 0 and "]" not in text[cut:] and any(p.startswith(text[cut:])
                                                          for p in self.plain):
                self.pending[slot] = (first, text)  # wait for the rest
                return b""
            return self._delta_event(named, first, text)
        flush = b""
        if kind.endswith(".done"):
            held = self.pending.pop((kind[:-5] + ".delta",) + tuple(
                obj.get(k) for k in _RESPONSE_PART_KEYS), None)
            if held is not None:
                flush = self._delta_event(named, *held)
        elif kind in _RESPONSE_ENDS and self.pending:
            flush = b"".join(self._delta_event(named, *held) for held in self.pending.values())
            self.pending.clear()
        restored = self.restore_json(data)
        if restored is data:
            return flush + event
        return flush + (b"event: " + name + b"\ndata: " if named else b"data: ") + restored \
            + b"\n\n"

    def _delta_event(self, named: bool, first: dict, text: str) -> bytes:
        kind = first["type"]
        if "[" in text:
            table = self.escaped if "arguments" in kind or self.json_answer and \
                "output_text" in kind else self.plain  # (JSON text)
            text = _PLACEHOLDER_TEXT_RE.sub(lambda m: table.get(m.group(), m.group()), text)
        return (b"event: " + kind.encode() + b"\ndata: " if named else b"data: ") \
            + json_dumps(dict(first, delta=text)) + b"\n\n"

    def _anthropic(self, name: bytes, obj: dict, event: bytes) -> bytes:
        index = obj.get("index")
        if name == b"content_block_stop":
            flush = b""
            for field in ("text", "partial_json", "thinking"):
                rest = self.held.pop((index, field), "")
                if rest:
                    kind = {"text": "text_delta", "thinking": "thinking_delta"}.get(
                        field, "input_json_delta")
                    flush += _sse("content_block_delta", {"type": "content_block_delta",
                                                          "index": index,
                                                          "delta": {"type": kind, field: rest}})
            return flush + event
        delta = obj.get("delta")
        if name != b"content_block_delta" or not isinstance(delta, dict):
            return event
        for field, json_text in (("text", self.json_answer), ("partial_json", True),
                                 ("thinking", False)):
            if field == "thinking" and not self.own_thinking:
                break  # (the provider's: signed)
            if isinstance(delta.get(field), str):
                delta[field] = self._restore_text((index, field), delta[field], json_text)
                return _sse("content_block_delta", obj)
        return event

    def _openai(self, obj: dict, event: bytes) -> bytes:
        changed = False
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                delta["content"] = self._restore_text((index, "content"), delta["content"],
                                                      self.json_answer)
                changed = True
            for key in _REASONING_KEYS:  # (a reasoning server's thoughts, or Claude's)
                if isinstance(delta.get(key), str):
                    delta[key] = self._restore_text((index, key), delta[key], False)
                    changed = True
            if isinstance(choice.get("text"), str):  # (a legacy /v1/completions stream)
                choice["text"] = self._restore_text((index, "text"), choice["text"], False)
                changed = True
            for call in delta.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    slot = (index, "arguments", call.get("index", 0))
                    fn["arguments"] = self._restore_text(slot, fn["arguments"], True)
                    changed = True
            if choice.get("finish_reason"):  # the answer ends: nothing may stay held back
                for slot in [s for s in self.held if s[0] == index]:
                    self._put_back(choice, delta, slot, self.held.pop(slot))
                    changed = True
        return b"data: " + json_dumps(obj) + b"\n\n" if changed else event

    @staticmethod
    def _put_back(choice: dict, delta: dict, slot: tuple, rest: str) -> None:
        """Text held back for `slot` goes out in this chunk's choice."""
        field = slot[1]
        if field == "text":  # (a legacy completion's choice has its text, no delta)
            choice["text"] = (choice.get("text") or "") + rest
            return
        if field == "arguments":
            delta.setdefault("tool_calls", []).append(
                {"index": slot[2], "function": {"arguments": rest}})
        else:  # content, reasoning
            delta[field] = delta[field] + rest if isinstance(delta.get(field), str) else rest
        choice["delta"] = delta

    def _openai_rest(self) -> bytes:
        """A chunk with whatever is still held back, for a stream that ends without a finish
        reason (b"" when nothing is)."""
        choices: dict[int, dict] = {}
        for slot in list(self.held):
            choice = choices.setdefault(slot[0], {"index": slot[0], "finish_reason": None})
            self._put_back(choice, choice.get("delta") or {}, slot, self.held.pop(slot))
        if not choices:
            return b""
        legacy = any("text" in c for c in choices.values())
        return b"data: " + json_dumps({
            "object": "text_completion" if legacy else "chat.completion.chunk",
            "choices": list(choices.values())}) + b"\n\n"


# -- budgets ------------------------------------------------------------------------------------

BUDGET_PERIODS = ("hourly", "daily", "monthly")
_BUDGET_SQL = ("INSERT INTO budgets (scope, period, period_start, spent_usd, limit_usd, "
               "last_updated) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (scope, period, "
               "period_start) DO UPDATE SET spent_usd = spent_usd + excluded.spent_usd, "
               "limit_usd = excluded.limit_usd, last_updated = excluded.last_updated")
_BUDGET_EVENT_SQL = ("INSERT INTO budget_events (timestamp, scope, period, period_start, "
                     "threshold, spent_usd, limit_usd) VALUES (?, ?, ?, ?, ?, ?, ?)")


def period_bounds(period: str, now: float) -> tuple[str, float]:
    """The UTC start (as text) and end (epoch seconds) of the period containing `now`."""
    dt = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if period == "hourly":
        start = dt.replace(minute=0, second=0, microsecond=0)
        end = start + datetime.timedelta(hours=1)
    elif period == "daily":
        start = dt.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + datetime.timedelta(days=1)
    else:
        start = dt.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + datetime.timedelta(days=32)).replace(day=1)
    return start.strftime("%Y-%m-%dT%H:%M:%SZ"), end.timestamp()


def spend_query(start: str, project: str) -> tuple[str, tuple]:
    """SQL and parameters for the request log's spend since a period's start, of one project
    or all (row stamps have milliseconds: compared without the Z)."""
    return ("SELECT COALESCE(SUM(cost_usd), 0) AS spent FROM requests WHERE timestamp >= ?"
            + (" AND project = ?" if project else ""),
            (start[:-1], project) if project else (start[:-1],))


def budget_limits(cfg: BudgetConfig, project: str | None = None) -> list[tuple[str, str, float]]:
    """(scope, period, USD) of every limit set: global, and one project's (None: every
    configured project's)."""
    out = [("global", p, getattr(cfg, p + "_limit")) for p in BUDGET_PERIODS]
    names = cfg.projects if project is None else (project,)
    for name in names:
        own = cfg.projects.get(name, {})
        out += [("project:" + name, p, own.get(p + "_limit", 0.0)) for p in BUDGET_PERIODS]
    return [limit for limit in out if limit[2] > 0]


class BudgetLedger:
    """Spend per (scope, period, period start): settled spend plus open reservations. One per
    process, kept across config reloads, loaded from the budgets table at start. The event loop
    is its only writer, so check-and-reserve is atomic without locks."""

    def __init__(self) -> None:
        self.spent: dict[tuple, float] = {}
        self.reserved: dict[tuple, float] = {}
        self.fired: set[tuple] = set()
        self.limits: dict[tuple, float] = {}  # (scope, period) -> USD, as the config says now

    def set_limits(self, cfg: BudgetConfig) -> None:
        """The limits alerts compare against (at start, and when a reload is committed: a
        request that reserved under the old ones settles against these)."""
        self.limits = {(scope, period): limit for scope, period, limit in budget_limits(cfg)}

    @staticmethod
    def logged(store: Store, limits: list[tuple[str, str, float]],
               now: float) -> dict[tuple, tuple[float, float]]:
        """For each limit, the spend the request log has for its current period so far (and
        the limit). (Reads the database: run in a worker thread.)"""
        out = {}
        for scope, period, limit in limits:
            key = (scope, period, period_bounds(period, now)[0])
            sql, params = spend_query(key[2], scope.partition(":")[2])
            out[key] = (store.query(sql, params)[0]["spent"] or 0.0, limit)
        return out

    def adopt(self, logged: dict[tuple, tuple[float, float]], store: Store, now: float) -> None:
        """Raises each limit's figure to what the request log shows (on the event loop):
        spend made while no limit watched (one added by a reload or a restart, or removed
        and added again) counts against it; kept in the budgets table too. A figure above
        the log's (rows not written yet, or pruned) stands."""
        for key, (spent, limit) in logged.items():
            more = spent - self.spent.get(key, 0.0)
            if more > 1e-12:
                self.spent[key] = spent
                store.write(_BUDGET_SQL, key + (more, limit, utc_iso(now)))

    def load(self, store: Store) -> None:
        for r in store.query("SELECT scope, period, period_start, spent_usd FROM budgets"):
            self.spent[(r["scope"], r["period"], r["period_start"])] = r["spent_usd"]
        for r in store.query("SELECT DISTINCT scope, period, period_start, threshold "
                             "FROM budget_events"):  # (an alert fires once per period, also
            self.fired.add((r["scope"], r["period"], r["period_start"], r["threshold"]))
            # across a restart)


def request_estimate(ctx: Context) -> int:
    """Input tokens of the request, estimated once and shared by the stages that need it."""
    est = ctx.notes.get("estimate")
    if est is None:
        est = ctx.notes["estimate"] = estimate_request_tokens(ctx.obj)
    return est


class BudgetGuard(Stage):
    """Hourly, daily and monthly USD limits, global and per project. Before a request goes out
    its worst case (input estimate at the dearest input rate, plus max_tokens of output) is
    reserved against every limit that applies; when it ends the reservation is settled to the
    exact cost. A request that does not fit gets 429 until the period resets. Fails closed."""
    name = "budget"
    fails_closed = True
    side_calls = True  # a pass-through POST (/v1/responses, embeddings) spends too

    def __init__(self, cfg: Config, store: Store, log: Logger, prices: PriceTable,
                 ledger: BudgetLedger, clock=time.time, **_: object) -> None:
        self.cfg = cfg.budget
        self.summaries = cfg.summarization
        self.store = store
        self.log = log
        self.prices = prices
        self.ledger = ledger
        self.clock = clock

    def _worst(self, ctx: Context) -> float:
        """The most this request can cost: its input estimate at the dearest input rate and
        max_tokens (times n choices; lowered to a provider's max_output_tokens where the step
        that goes there is capped) of output, at the dearest step of its plan (a model_map
        alias is priced as its target, so a model mapped to an unpriced local one reserves
        nothing; a fallback as itself)."""
        steps = [(m, prov.cfg.max_output_tokens) for prov, m in ctx.plan] or [(ctx.model, 0)]
        prices = [(p, cap) for p, cap in ((self.prices.lookup(m), cap) for m, cap in steps)
                  if p is not None]
        most, n = stated_output(ctx.obj)
        if most is None:
            most = self.cfg.default_max_tokens
        tokens = request_estimate(ctx)
        return max((tokens * max(p.input, p.cache_write_5m, p.cache_write_1h,
                                 p.audio_input or 0)
                    + (min(most, cap) if cap else most) * n * max(p.output, p.audio_output or 0)
                    for p, cap in prices), default=0.0) / 1_000_000 \
            + web_searches_at_most(ctx.obj) * WEB_SEARCH_USD + self._summary_worst(ctx, tokens)
        # (an unpriced model costs null: its tokens reserve nothing, logged by PriceTable; a
        # summary tokenman makes for it, or a search fee, still cost)

    def _summary_worst(self, ctx: Context, tokens: int) -> float:
        """What the summary call tokenman may make for this request can cost (its transcript
        is at most the request's input; its answer summarization.max_tokens)."""
        s = self.summaries
        messages = ctx.obj.get("messages") if isinstance(ctx.obj, dict) else None
        if not s.enabled or not isinstance(messages, list) \
                or len(messages) <= s.threshold_messages or no_compress(ctx):
            return 0.0
        price = self.prices.lookup(s.model)
        return 0.0 if price is None else (tokens * price.input
                                          + s.max_tokens * price.output) / 1_000_000

    def request(self, ctx: Context) -> Reply | None:
        if not self.cfg.enabled or ctx.req.path in UNBILLED_PATHS:
            return None
        limits = budget_limits(self.cfg, ctx.project)
        if not limits:
            return None
        now = self.clock()
        worst = self._worst(ctx)
        if not worst:  # (an unpriced model, a free call: nothing to hold, never refused)
            return None
        keys = []
        ledger = self.ledger
        for scope, period, limit in limits:
            start, end = period_bounds(period, now)
            key = (scope, period, start)
            spent = ledger.spent.get(key, 0.0)
            held = ledger.reserved.get(key, 0.0)
            if spent + held + worst > limit + 1e-12:  # (until the period ends; when only
                wait = b"%d" % (max(1, int(end - now + 0.999)) if spent + worst > limit  # what
                                else BUDGET_HELD_RETRY)  # requests in flight hold is in the way,
                # it is soon back; an SDK told to wait for the period would hang for it)
                self.log.warn("budget exceeded", id=ctx.id, scope=scope, period=period,
                              limit=limit, spent=f"{spent:.6f}", held=f"{held:.6f}")
                state = f"spent ${spent:.4f}" + (
                    f" and ${held:.4f} held for requests in flight" if held else "") \
                    + f" of ${_usd(limit)}"
                return error_reply(
                    ctx, 429, f"{period} budget for {scope} reached: {state} (this request may "
                    f"cost up to ${worst:.4f})" if spent + held >= limit else
                    f"{period} budget for {scope}: this request may cost up to ${worst:.4f}, "
                    f"more than the ${max(0.0, limit - spent - held):.4f} left ({state})",
                    "rate_limit_error" if ctx.api == API_ANTHROPIC else "budget_exceeded",
                    [(b"Retry-After", wait)] + ([(b"X-Should-Retry", b"false")]
                                                if spent + worst > limit else []),
                    {"period": period, "scope": scope, "limit": limit,
                     "spent": round(spent, 6)})
            keys.append((key, limit))
        for key, _ in keys:
            ledger.reserved[key] = ledger.reserved.get(key, 0.0) + worst
        ctx.notes["budget"] = (keys, worst, any(  # (whether its tokens were priced)
            self.prices.lookup(m) is not None for _, m in ctx.plan or [(None, ctx.model)]))
        return None

    def finish(self, ctx: Context) -> None:
        held = ctx.notes.get("budget")
        if not held:
            return
        keys, worst, priced = held
        if ctx.cost is not None:
            actual = ctx.cost
        elif priced:  # (usage a priced model's entry could not price, audio with no audio
            actual = worst  # rates: the most it could cost, not nothing)
        else:  # (an unpriced model: its tokens cost null; its searches are billed all the same)
            actual = ctx.usage.web_searches * WEB_SEARCH_USD
        ledger = self.ledger
        now = utc_iso(self.clock())
        for key, limit in keys:
            ledger.reserved[key] = max(0.0, ledger.reserved.get(key, 0.0) - worst)
            limit = ledger.limits.get(key[:2], limit)  # (a reload may have changed it since)
            if not actual:
                continue
            before = ledger.spent.get(key, 0.0)
            after = ledger.spent[key] = before + actual
            self.store.write(_BUDGET_SQL, key + (actual, limit, now))
            for threshold in self.cfg.alert_thresholds:
                mark = key + (threshold,)
                if after >= limit * threshold / 100 and mark not in ledger.fired:
                    ledger.fired.add(mark)
                    self.log.warn("budget alert", scope=key[0], period=key[1],
                                  threshold=f"{threshold:g}%", spent=f"{after:.6f}",
                                  limit=limit)
                    self.store.write(_BUDGET_EVENT_SQL, (now,) + key + (threshold, after, limit))


# -- rate limits --------------------------------------------------------------------------------

class TokenBucket:
    """A bucket refilled continuously at `rate` per second up to `capacity`; it may go below
    zero when actual usage settles above what was reserved."""
    __slots__ = ("capacity", "rate", "level", "stamp")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = capacity
        self.stamp = now

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0 = now). A request larger than the whole
        bucket passes when the bucket is full."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def resize(self, capacity: float, rate: float) -> None:
        """New limits from a reload; the current level is kept (clamped)."""
        self.capacity = capacity
        self.rate = rate
        self.level = min(self.level, capacity)


class RateLimiter(Stage):
    """Requests per second and tokens per minute per provider (optionally per project), as token
    buckets. Tokens are reserved from the input estimate plus the output the request allows
    itself (max_tokens times n; nothing when it states no limit) and settled with the actual
    usage.
    429 with Retry-After of the real wait (at least 1 s). Buckets outlive reloads. Fails closed."""
    name = "ratelimit"
    section = "rate_limit"
    fails_closed = True
    side_calls = True  # a pass-through POST (/v1/responses, embeddings) is a call too

    def __init__(self, cfg: Config, log: Logger, rate_state: dict, clock=time.monotonic,
                 **_: object) -> None:
        self.cfg = cfg.rate_limit
        self.log = log
        self.state = rate_state  # key -> (request bucket, token bucket or None)
        self.clock = clock
        self.prune_at = RATE_KEYS_PRUNE

    def _buckets(self, provider: str, project: str, now: float):
        limits = self.cfg.provider_limits.get(provider, {})
        rate = limits.get("rate", self.cfg.default_rate)
        burst = limits.get("burst", float(self.cfg.default_burst))
        tpm = limits.get("tokens_per_minute", float(self.cfg.tokens_per_minute))
        key = provider + ("/" + project if self.cfg.per_project else "")
        pair = self.state.get(key)
        if pair is None:
            if len(self.state) >= self.prune_at and len(self.state) % 256 == 0:
                self._prune(now)  # (at most once per 256 new keys)
            pair = self.state[key] = (TokenBucket(burst, rate, now),
                                      TokenBucket(tpm, tpm / 60, now) if tpm else None)
        requests, tokens = pair
        if (requests.capacity, requests.rate) != (burst, rate):
            requests.resize(burst, rate)
        if tpm and tokens is None:
            tokens = TokenBucket(tpm, tpm / 60, now)
            self.state[key] = (requests, tokens)
        elif tokens is not None and not tpm:
            tokens = None
            self.state[key] = (requests, None)
        elif tokens is not None and tokens.capacity != tpm:
            tokens.resize(tpm, tpm / 60)
        return key, requests, tokens

    def _prune(self, now: float) -> None:
        """Drops the buckets that have refilled completely (a project names itself in a
        header: without this, every name ever sent would keep its buckets forever). A full
        bucket is the same as a new one, so nothing is forgotten that matters."""
        for key, (requests, tokens) in list(self.state.items()):
            if requests.wait(requests.capacity, now) == 0 and \
                    (tokens is None or tokens.wait(tokens.capacity, now) == 0):
                del self.state[key]

    def request(self, ctx: Context) -> Reply | None:
        if not self.cfg.enabled or ctx.req.path in SIDE_CALL_PATHS:  # (count_tokens: free)
            return None
        key, wait = self._take(ctx, ctx.provider)
        if wait > 0:
            seconds = max(1, int(wait + 0.999))
            self.log.info("rate limited", id=ctx.id, key=key, wait=f"{wait:.3f}")
            return error_reply(ctx, 429, f"rate limit for {key} reached; retry in {seconds} s",
                               "rate_limit_error" if ctx.api == API_ANTHROPIC
                               else "rate_limit_exceeded",
                               [(b"Retry-After", b"%d" % seconds)])
        ctx.notes["admit"] = self._fallback
        return None

    def _take(self, ctx: Context, provider: str) -> tuple[str, float]:
        """Takes a request, and the tokens it may use, from the provider's buckets: the key
        and 0, or the key and the seconds until they would be there (nothing taken)."""
        now = self.clock()
        key, requests, tokens = self._buckets(provider, ctx.project, now)
        wait = requests.wait(1, now)
        need = 0
        if tokens is not None:  # input and the output the request allows itself, as the
            most, n = stated_output(ctx.obj)  # providers count a call against their own
            cap = next((prov.cfg.max_output_tokens for prov, _ in ctx.plan  # limits (at most
                        if prov.key == provider), 0)  # what a capped provider is sent)
            if most and cap:
                most = min(most, cap)
            need = request_estimate(ctx) + (most or 0) * n  # (settled at its end)
            wait = max(wait, tokens.wait(need, now))
        if wait > 0:
            return key, wait
        requests.level -= 1
        if tokens is not None:
            tokens.level -= need
        ctx.notes["ratelimit"] = (key, requests, tokens, need) if tokens is not None else None
        return key, 0.0

    def _fallback(self, ctx: Context, provider: str) -> tuple[str, float]:
        """A fallback step to another provider goes through that provider's limits: taken
        from its buckets (the tokens reserved at the one before, which did not answer, go
        back to it; the request it was sent stays counted) or skipped."""
        before = ctx.notes.get("ratelimit")
        key, wait = self._take(ctx, provider)
        if not wait and before is not None and before[0] != key:
            before[2].level += before[3]
        return key, wait

    def finish(self, ctx: Context) -> None:
        held = ctx.notes.get("ratelimit")
        if held:
            key, requests, tokens, reserved = held
            # a long call's buckets may have refilled and been pruned meanwhile: they come back
            bucket = self.state.setdefault(key, (requests, tokens))[1]
            if bucket is not None:
                u = ctx.usage
                bucket.level -= (u.input + u.output + u.cache_read + u.cache_write) - reserved


# -- token savings: prompt-cache hints, lossless compression, history window, heartbeat ---------

def no_compress(ctx: Context) -> bool:
    """The client opted out of rewriting stages for this request."""
    return ctx.req.headers.map.get(b"x-tokenman-no-compress", b"").strip() in (b"1", b"true")


# Smallest prefix each Anthropic model caches (tokens); a breakpoint below it is ignored.
CACHE_MINIMUMS = (("claude-3-haiku", 2048), ("claude-3-5-haiku", 2048),
                  ("claude-haiku-4-5", 4096), ("claude-opus-4-5", 4096),
                  ("claude-opus-4-6", 4096), ("claude-haiku-5", 4096), ("claude-opus-5", 4096))
CACHE_MINIMUM_ANY = 1024  # the smallest of them: the default of cache_minimum()
_NO_MARK_BLOCKS = frozenset(("thinking", "redacted_thinking"))


def cache_minimum(model: str) -> int:
    return next((n for prefix, n in CACHE_MINIMUMS if model.startswith(prefix)),
                CACHE_MINIMUM_ANY)


# an escaped letter of "cache_control" (c a h e _ o n t r l): rare in real text, where only
# quotes, controls and non-ASCII are escaped
_ESCAPED_NAME = re.compile(rb"\\u00(?:6[1358cCeEfF]|5[fF]|7[24])")
# the name as a member (a colon after it; its quote escaped by no backslash), not a value
_CACHE_CONTROL_KEY = re.compile(rb'"cache_control"\s*:')


class CacheHints(Stage):
    """Adds Anthropic prompt-cache breakpoints (end of tools, end of system, last message) to
    requests that carry no cache_control anywhere, each only when the prefix before it reaches
    the model's minimum cacheable length. A client-set cache_control means the client manages
    caching: nothing is touched. At most three added breakpoints, all with the same TTL, so the
    4-breakpoint limit and the non-increasing TTL order always hold. Fails open."""
    name = "cache_hints"

    def __init__(self, cfg: Config, **_: object) -> None:
        self.cfg = cfg.cache_hints
        self.mark = {"type": "ephemeral"} if cfg.cache_hints.ttl == "5m" \
            else {"type": "ephemeral", "ttl": "1h"}

    def request(self, ctx: Context) -> Reply | None:
        obj = ctx.obj
        body = ctx.req.body
        if not self.cfg.enabled or ctx.api != API_ANTHROPIC:
            return None
        if b'"cache_control"' in body and names_member(body, _CACHE_CONTROL_KEY) or \
                _ESCAPED_NAME.search(body) and has_member(obj, "cache_control"):
            return None  # (a member, not a value; spelled with escapes, the parsed body says)
        if len(ctx.req.body) // 3 < CACHE_MINIMUM_ANY:  # the whole prompt is too short to cache
            return None
        minimum = cache_minimum(ctx.model)
        if len(ctx.req.body) // 3 < minimum:
            return None
        if any('"cache_control"' in json.dumps(ctx.changes[k]) for k in ctx.changes):
            return None  # a stage before this one set breakpoints (the quoted name: a key;
            # in a string value its quotes are escaped, so a text about it does not count)
        self._place(obj, self._sizes(ctx), minimum, ctx.changes)
        return None

    def translated(self, obj: dict, model: str, ctx: Context) -> None:
        """Breakpoints for a request translated for an Anthropic provider from the OpenAI
        format, whose clients (Cursor, OpenAI SDK applications) cannot set cache_control.
        Sizes come from the client's body where it was laid out (no second serialisation)."""
        minimum = cache_minimum(model)
        if not self.cfg.enabled or len(ctx.req.body) // 3 < minimum:
            return
        system = obj.get("system")
        sizes = {"system": len(_compact(system)) // 4 if system else 0}  # (JSON text, as spans)
        spans = ctx.layout[1] if ctx.layout is not None else None
        for key in ("tools", "messages"):
            if spans is not None and key in spans and key not in ctx.changes:  # (a stage's
                sizes[key] = (spans[key][2] - spans[key][1]) // 4  # rewrite: measured anew)
            elif key in obj:
                sizes[key] = len(json_dumps(obj[key])) // 4
        if spans is not None and "messages" in spans and "messages" not in ctx.changes:
            sizes["messages"] = max(0, sizes["messages"] - sizes["system"])  # (OpenAI's
            # messages held the system prompt)
        if sum(sizes.values()) >= minimum:
            self._place(obj, sizes, minimum, {})

    def _place(self, obj: dict, sizes: dict[str, int], minimum: int, changes: dict) -> None:
        """Marks the end of tools, system and the last message where the prefix up to it is
        long enough to cache; `changes` gets every member it changed."""
        prefix = 0
        tools = obj.get("tools")
        if isinstance(tools, list) and tools and isinstance(tools[-1], dict):
            prefix += sizes.get("tools", 0)
            if prefix >= minimum:
                tools[-1]["cache_control"] = dict(self.mark)
                changes["tools"] = tools
        system = obj.get("system")
        prefix += sizes.get("system", 0)
        if system and prefix >= minimum:
            if isinstance(system, str):
                obj["system"] = [{"type": "text", "text": system,
                                  "cache_control": dict(self.mark)}]
                changes["system"] = obj["system"]
            elif isinstance(system, list) and self._mark_last(system):
                changes["system"] = system
        prefix += sizes.get("messages", 0)
        messages = obj.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and prefix >= minimum:
            last = messages[-1]
            content = last.get("content")
            if isinstance(content, str) and content:
                last["content"] = [{"type": "text", "text": content,
                                    "cache_control": dict(self.mark)}]
                changes["messages"] = messages
            elif isinstance(content, list) and self._mark_last(content):
                changes["messages"] = messages

    def _mark_last(self, blocks: list) -> bool:
        for block in reversed(blocks):
            if isinstance(block, dict) and block.get("type") not in _NO_MARK_BLOCKS:
                if block.get("type") == "text" and not block.get("text"):
                    continue  # empty text blocks cannot carry a breakpoint
                block["cache_control"] = dict(self.mark)
                return True
        return False

    @staticmethod
    def _sizes(ctx: Context) -> dict[str, int]:
        """Estimated tokens of the tools, system and messages members (raw JSON / 4)."""
        sizes = {}
        for key in ("tools", "system", "messages"):
            if key in ctx.changes:
                sizes[key] = len(json_dumps(ctx.changes[key])) // 4
        if len(sizes) < 3:
            try:
                members = ctx.layout[1] if ctx.layout is not None else \
                    _top_level_members(ctx.req.body.decode("utf-8"))[0]
            except (ValueError, UnicodeDecodeError):
                members = {}
            for key, (_, start, end) in members.items():
                sizes.setdefault(key, (end - start) // 4)
        return sizes


_FENCE_LINE_RE = re.compile(r"[ \t]*(`{3,}|~{3,})")  # a fence, indented in a list item too
_BLANK_RUN_RE = re.compile(r"\n{3,}")  # two or more empty lines (a line of blanks is kept:
# a unified diff's unchanged empty line is a single space)
_JSON_SPACE_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\s+')  # a JSON string, or blanks between tokens


def compress_text(text: str, whitespace: bool, minify_json: bool) -> str:
    """Lossless compaction outside fenced code blocks: a text that is a whole JSON document
    loses the blanks between its tokens (every key, string and number kept as written, in its
    order); runs of blank lines become one. Nothing else changes: not the spaces inside a line
    (a string literal, a TSV row, a YAML value), not a line's end (a Markdown hard break, a
    Makefile value), not indentation, nothing inside a fence; the same input always gives the
    same output (provider prefix caches still hit)."""
    if minify_json and text.lstrip()[:1] in "{[" and text.rstrip()[-1:] in "}]":
        try:
            json.loads(text)
        except (ValueError, RecursionError):
            pass
        else:
            return _JSON_SPACE_RE.sub(lambda m: m.group() if m.group()[0] == '"' else "", text)
    if not whitespace or "\n" not in text:
        return text
    out, pos = [], 0
    for start, end in _fenced_spans(text):
        out.append(_BLANK_RUN_RE.sub("\n\n", text[pos:start]))
        out.append(text[start:end])
        pos = end
    out.append(_BLANK_RUN_RE.sub("\n\n", text[pos:]))
    return "".join(out)


def _fenced_spans(text: str) -> list[tuple[int, int]]:
    """Where fenced code blocks are (CommonMark: a fence of 3+ backticks or tildes, closed by
    one of the same character at least as long, alone on its line; unclosed: to the end)."""
    spans, opened, pos = [], None, 0
    for line in text.splitlines(keepends=True):
        m = _FENCE_LINE_RE.match(line)
        if opened is None:
            if m is not None:
                opened = (m.group(1)[0], len(m.group(1)), pos, m.start(1))
        elif m is not None and m.group(1)[0] == opened[0] and len(m.group(1)) >= opened[1] \
                and m.start(1) <= opened[3] + 3 and not line[m.end():].strip():
            spans.append((opened[2], pos + len(line)))  # (an indented one is the block's text)
            opened = None
        pos += len(line)
    if opened is not None:
        spans.append((opened[2], len(text)))
    return spans


class RulesCompressor(Stage):
    """compress_text over user, system and (when configured) tool-result text, whose empty
    lines stay as they are; off by default. Records the estimated tokens it removed. Fails
    open."""
    name = "rules"

    def __init__(self, cfg: Config, **_: object) -> None:
        self.cfg = cfg.rules
        self.roles = ("system", "user", "developer") + (("tool",) if cfg.rules.tool_results
                                                         else ())

    def request(self, ctx: Context) -> Reply | None:
        if not self.cfg.enabled or no_compress(ctx):
            return None
        before = after = 0
        for parent, key, path, role in text_fields(ctx.api, ctx.obj, self.roles):
            if role not in self.roles or type(parent) is CitedText:
                continue
            text = parent[key]  # (a tool result is a program's text as it is on disk: a
            # file an agent edits by exact match, a string literal holding empty lines; only a
            # whole JSON document in one is compacted)
            new = compress_text(text, self.cfg.collapse_whitespace and role != "tool",
                                self.cfg.minify_json)
            if new != text:
                before += estimate_tokens(text)
                after += estimate_tokens(new)
                parent[key] = new
                mark_changed(ctx, path)
        if before > after:
            ctx.notes["compressed_tokens"] = ctx.notes.get("compressed_tokens", 0) + before - after
        return None


def _is_tool_turn(api: str, msg: dict) -> bool:
    """A message that continues a turn (tool results) rather than starting a new one."""
    if api == API_OPENAI:
        return msg.get("role") == "tool"
    content = msg.get("content")  # (results and text in one message: still the tool turn)
    return msg.get("role") == "user" and isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


class HistoryWindow(Stage):
    """Keeps the last `window_size` user turns. System messages stay; the cut is always at the
    start of a real user turn, so no tool_use is parted from its tool_result and roles still
    alternate; the dropped part is replaced by a short note. Optionally truncates long tool
    results to head and tail. Off by default (it changes what the model sees). Fails open."""
    name = "history"

    def __init__(self, cfg: Config, **_: object) -> None:
        self.cfg = cfg.history

    def request(self, ctx: Context) -> Reply | None:
        messages = ctx.obj.get("messages")
        if not self.cfg.enabled or no_compress(ctx) or not isinstance(messages, list):
            return None
        before = estimate_tokens(json.dumps(messages))
        changed = self._window(ctx.api, ctx.obj, messages)
        if self.cfg.truncate_tool_results:
            changed = self._truncate(ctx, messages) or changed
        if changed:
            ctx.changes["messages"] = ctx.obj["messages"]
            saved = before - estimate_tokens(json.dumps(ctx.obj["messages"]))
            ctx.notes["compressed_tokens"] = ctx.notes.get("compressed_tokens", 0) + max(0, saved)
        return None

    def _window(self, api: str, obj: dict, messages: list) -> bool:
        starts = [i for i, m in enumerate(messages) if isinstance(m, dict)
                  and m.get("role") == "user" and not _is_tool_turn(api, m)]
        if len(starts) <= self.cfg.window_size:
            return False
        cut = starts[-self.cfg.window_size]
        kept_system = [m for m in messages[:cut] if isinstance(m, dict)
                       and m.get("role") in ("system", "developer")]
        dropped = cut - len(kept_system)
        first = dict(messages[cut])
        note = f"[tokenman: {dropped} earlier messages of this conversation were omitted]"
        content = first.get("content")
        if isinstance(content, str):
            first["content"] = note + "\n\n" + content
        elif isinstance(content, list):
            first["content"] = [{"type": "text", "text": note}] + content
        obj["messages"] = kept_system + [first] + messages[cut + 1:]
        return True

    def _truncate(self, ctx: Context, messages: list) -> bool:
        limit = self.cfg.truncate_tool_results
        changed = False
        for parent, key, _, role in text_fields(ctx.api, ctx.obj, ("tool",)):
            text = parent[key]
            if role == "tool" and len(text) > limit and type(parent) is not CitedText:
                half = limit // 2
                parent[key] = (text[:half] + f"\n[... {len(text) - 2 * half} characters "
                               f"omitted by tokenman ...]\n" + text[-half:])
                changed = True
        return changed


SUMMARY_PROMPT = ("Summarise the conversation below between a user and an AI assistant so that "
                  "the assistant can continue it without the original. Keep every fact, "
                  "decision, name, file path, number and tool result that may matter later; "
                  "drop pleasantries. Answer with the summary only.\n\n")


class Summarizer(Stage):
    """Long conversations: the turns before the last `keep_last` user turns are replaced by a
    summary written by a configured model through tokenman's own client, cut at a real user
    turn (tool pairs and role order stay valid) and cached by content hash. Any failure leaves
    the request as it was. Off by default. Its own call's cost is added to the request's and
    netted out of its savings."""
    name = "summarization"

    def __init__(self, cfg: Config, log: Logger, prices: PriceTable, pool: UpstreamPool = None,
                 router: "Router" = None, **_: object) -> None:
        self.cfg = cfg.summarization
        self.auth_token = auth_token(cfg)
        self.log = log
        self.prices = prices
        self.pool = pool
        self.router = router
        self.memo: collections.OrderedDict[str, str] = collections.OrderedDict()

    async def request(self, ctx: Context) -> Reply | None:
        messages = ctx.obj.get("messages")
        if not self.cfg.enabled or no_compress(ctx) or not isinstance(messages, list) \
                or len(messages) <= self.cfg.threshold_messages or self.pool is None:
            return None
        starts = [i for i, m in enumerate(messages) if isinstance(m, dict)
                  and m.get("role") == "user" and not _is_tool_turn(ctx.api, m)]
        if len(starts) <= self.cfg.keep_last:
            return None
        cut = starts[-self.cfg.keep_last]
        older = [m for m in messages[:cut] if m.get("role") not in ("system", "developer")]
        transcript = "\n".join(f"{role}: {p[k]}" for p, k, _, role in text_fields(
            ctx.api, {"messages": older}))
        import hashlib
        digest = hashlib.sha256(transcript.encode("utf-8", "surrogatepass")).hexdigest()
        summary = self.memo.get(digest)
        if summary is None:
            try:
                summary = await self._summarise(ctx, transcript)
            except Exception as exc:  # fails open: the request goes on unchanged
                self.log.warn("summarization failed; request sent unchanged", id=ctx.id,
                              error=f"{type(exc).__name__}: {exc}")
                return None
            self.memo[digest] = summary
            while len(self.memo) > 256:
                self.memo.popitem(last=False)
        before = estimate_tokens(json.dumps(messages))
        kept_system = [m for m in messages[:cut] if m.get("role") in ("system", "developer")]
        first = dict(messages[cut])
        note = f"[tokenman: summary of the {len(older)} earlier messages]\n{summary}"
        content = first.get("content")
        first["content"] = note + "\n\n" + content if isinstance(content, str) else \
            [{"type": "text", "text": note}] + list(content or [])
        ctx.obj["messages"] = ctx.changes["messages"] = kept_system + [first] + messages[cut + 1:]
        saved = before - estimate_tokens(json.dumps(ctx.obj["messages"]))
        ctx.notes["compressed_tokens"] = ctx.notes.get("compressed_tokens", 0) + max(0, saved)
        return None

    async def _summarise(self, ctx: Context, transcript: str) -> str:
        prov = self.router.providers.get(self.cfg.provider) if self.cfg.provider else \
            self.router.resolve(ctx.api, self.cfg.model)
        if prov is None or not prov.usable:
            raise UpstreamError("no usable provider for summaries")
        prompt = SUMMARY_PROMPT + transcript
        headers = [(b"Content-Type", b"application/json")]
        key = prov.api_key.encode() if prov.api_key else None
        client = ctx.req.headers
        auth = client.get(b"authorization")  # (the caller's bearer token or OAuth login)
        if auth and is_own_token(auth, self.auth_token):
            auth = None  # tokenman's own token never leaves the host
        body = {"model": self.cfg.model, "max_tokens": self.cfg.max_tokens,
                "messages": [{"role": "user", "content": prompt}]}
        if prov.cfg.format == API_ANTHROPIC:
            headers.append((b"anthropic-version", b"2023-06-01"))
            if key or client.get(b"x-api-key"):
                headers.append((b"x-api-key", key or client.get(b"x-api-key")))
            elif auth:  # (Claude Code with ANTHROPIC_AUTH_TOKEN or a subscription login;
                headers.append((b"Authorization", auth))  # an OAuth token needs its beta)
                beta = b",".join(flag.strip() for flag in client.get(b"anthropic-beta", b"")
                                 .split(b",") if flag.strip().startswith(b"oauth-"))
                if beta:
                    headers.append((b"anthropic-beta", beta))
        elif key or auth:
            headers.append((b"Authorization", b"Bearer " + key if key else auth))
        resp = await self.pool.request(prov.origin, "POST", prov.origin.target(
            API_PATHS[prov.cfg.format]), headers, json_dumps(body), prov.cfg.connect_timeout,
            prov.cfg.timeout)
        data = await resp.body.read_all(4 * 1024 * 1024,
                                        asyncio.get_running_loop().time() + prov.cfg.timeout)
        resp.release()
        if resp.status != 200:
            raise UpstreamError(f"summary call answered {resp.status}")
        obj = json.loads(data)
        usage, model = usage_from_body(prov.cfg.format, obj)
        ctx.notes["summary_cost"] = self.prices.cost(model or self.cfg.model, usage) or 0.0
        text = "".join(b.get("text", "") for b in obj.get("content") or ()) \
            if prov.cfg.format == API_ANTHROPIC else \
            ((obj.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
        if not text.strip():
            raise UpstreamError("empty summary")
        return text.strip()


class Heartbeat(ResponseCache):
    """Identical requests within a short window (agents polling, retries of a sampled request)
    get the previous answer, marked X-Tokenman-Heartbeat: HIT. Memory only; off by default
    because it reuses sampled answers. Fails open."""
    name = "heartbeat"

    def __init__(self, cfg: Config, store: Store, clock=time.time, **_: object) -> None:
        super().__init__(cfg, store, clock)
        self.enabled = cfg.heartbeat.enabled
        self.window = cfg.heartbeat.window_seconds

    def _eligible(self, ctx: Context) -> bool:
        return self.enabled and ctx.req.path in ACCOUNTED_PATHS and not no_compress(ctx)

    def request(self, ctx: Context) -> Reply | None:
        if not self._eligible(ctx):
            return None
        control = ctx.req.headers.map.get(b"cache-control", b"").lower()
        key = self.key(ctx)  # (as the response cache: no-store, the answer is not kept;
        ctx.notes["heartbeat"] = None if b"no-store" in control else key  # no-cache, none
        if b"no-cache" in control:  # is reused)
            return None
        entry = self.memory.get(key)
        if entry is None or entry.expires <= self.clock():
            return None
        self.memory.move_to_end(key)
        ctx.headers_out.append((b"X-Tokenman-Heartbeat", b"HIT"))
        _note_own_thinking(ctx, entry.body)
        ctx.model = entry.model or ctx.model
        ctx.tokens_saved = entry.tokens
        ctx.saved["heartbeat"] = entry.cost or 0.0
        return Reply(entry.status, list(entry.headers), entry.body, outcome="heartbeat_hit")

    def finish(self, ctx: Context) -> None:
        key = ctx.notes.get("heartbeat")
        body = ctx.upstream_body
        if not key or ctx.outcome != "ok" or not replayable(ctx, body):
            return
        u = ctx.usage
        headers = [(n, v) for n, v in ctx.notes.get("cache_headers", ())
                   if n.lower() in _CACHED_HEADERS]
        self._remember(key, CacheEntry(self.clock() + self.window, ctx.status, headers, body,
                                       ctx.model, u.input + u.output + u.cache_read +
                                       u.cache_write, answer_cost(ctx)))

    def purge_job(self):
        self._forget_expired(self.clock())
        return lambda conn: None


REGISTRY = types.MappingProxyType({
    "cache": ResponseCache, "heartbeat": Heartbeat, "injection": InjectionGuard,
    "pii": PIIGuard, "budget": BudgetGuard, "ratelimit": RateLimiter,
    "summarization": Summarizer, "history": HistoryWindow,
    "rules": RulesCompressor, "cache_hints": CacheHints,
})


class Plugin:
    """One loaded plugin file: its stage classes (same interface as Stage), its hook functions
    (request_start(ctx), request_complete(ctx), request_error(ctx)) and any load error."""
    __slots__ = ("name", "path", "stages", "hooks", "error")

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = os.path.splitext(os.path.basename(path))[0]
        self.stages: dict[str, type] = {}
        self.hooks: dict[str, object] = {}
        self.error = ""

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "stages": sorted(self.stages),
                "hooks": sorted(self.hooks), "loaded": not self.error, "error": self.error}


PLUGIN_HOOKS = ("request_start", "request_complete", "request_error")


def load_plugins(paths: tuple, log: Logger) -> list[Plugin]:
    """Imports every plugin file (a failing one is reported, never fatal). A plugin module
    lists its stages in STAGES and its hooks as module-level functions named in PLUGIN_HOOKS."""
    import importlib.util
    if paths:
        load_ssl()  # a plugin may open TLS connections through asyncio itself
    files = []
    for path in paths:
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".py"))
        else:
            files.append(path)
    plugins = []
    for path in files:
        plugin = Plugin(path)
        try:
            spec = importlib.util.spec_from_file_location(f"tokenman_plugin_{plugin.name}", path)
            if spec is None or spec.loader is None:
                raise ImportError("not a Python file")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            for cls in getattr(module, "STAGES", ()):
                if not isinstance(cls, type) or not getattr(cls, "name", "") \
                        or not callable(getattr(cls, "request", None)):
                    raise TypeError(f"{cls!r} is not a stage (needs a name and request())")
                if not issubclass(cls, Stage):  # the hooks it leaves out do nothing
                    cls = type(cls.__name__, (cls, Stage), {"__module__": cls.__module__})
                plugin.stages[cls.name] = cls
            plugin.hooks = {h: getattr(module, h) for h in PLUGIN_HOOKS
                            if callable(getattr(module, h, None))}
            log.info("plugin loaded", plugin=plugin.name, stages=",".join(plugin.stages),
                     hooks=",".join(plugin.hooks))
        except Exception as exc:  # isolated: reported in the log and /api/plugins
            plugin.error = f"{type(exc).__name__}: {exc}"
            plugin.stages, plugin.hooks = {}, {}
            log.error("plugin failed to load", plugin=plugin.name, error=plugin.error)
        plugins.append(plugin)
    return plugins


def build_pipeline(cfg: Config, log: Logger, plugins: list[Plugin] = (),
                   **services: object) -> Pipeline:
    """The stages named in pipeline.order, composed once for this config snapshot; plugin
    stages go where pipeline.order names them, else after the built-in ones."""
    registry = dict(REGISTRY)
    for plugin in plugins:
        registry.update(plugin.stages)
    names = list(cfg.pipeline.order)
    names += [n for p in plugins for n in p.stages if n not in names]
    stages = []
    for name in names:
        if name not in registry:
            log.error("pipeline stage not found (a plugin that failed to load?)", stage=name)
            continue
        cls = registry[name]
        if cls is REGISTRY.get(name) and not getattr(cfg, cls.section or name).enabled:
            continue  # a switched-off stage costs nothing per request (a reload rebuilds)
        try:
            stages.append(cls(cfg, log=log, **services))
        except Exception as exc:
            if cls is REGISTRY.get(name):
                raise
            error = f"{type(exc).__name__}: {exc}"
            log.error("plugin stage failed to start; left out", stage=name, error=error)
            for plugin in plugins:  # (/api/plugins says so)
                if plugin.stages.get(name) is cls:
                    plugin.error = (plugin.error + "; " if plugin.error else "") + \
                        f"stage {name} failed to start: {error}"
    return Pipeline(stages, log)


# ================================================================================================
# §14 proxy: routing, header rules, translation, buffered and SSE relay, one row per request
# ================================================================================================

# -- cross-format translation: Anthropic Messages <-> OpenAI Chat Completions ------------------
# Used only when routing sends a request to a provider of the other format. What has no
# counterpart is dropped (and logged at debug), never sent as an invalid field.

_A2O_STOP = types.MappingProxyType({"end_turn": "stop", "stop_sequence": "stop",
                                    "max_tokens": "length", "tool_use": "tool_calls",
                                    "pause_turn": "stop", "refusal": "content_filter"})
_O2A_STOP = types.MappingProxyType({"stop": "end_turn", "length": "max_tokens",
                                    "tool_calls": "tool_use", "function_call": "tool_use",
                                    "content_filter": "refusal"})
_EFFORT_BUDGET = types.MappingProxyType({"minimal": 1024, "low": 2048, "medium": 8192,
                                         "high": 24576})


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content
                       if isinstance(b, dict) and b.get("type") in ("text", "input_text"))
    return ""


THINKING_MIN = 1024  # the least thinking budget Anthropic takes; also left for the answer


def capped_output(obj: dict, cap: int) -> dict:
    """The top-level members to change so that a request asks for at most `cap` output
    tokens (a provider's max_output_tokens): each output limit above it, and a thinking budget
    that would no longer fit under it (lowered, or thinking dropped when nothing fits)."""
    changes: dict = {k: cap for k in _OUTPUT_LIMITS if _is_count(obj.get(k)) and obj[k] > cap}
    thinking = obj.get("thinking")
    if changes and isinstance(thinking, dict) and _is_count(thinking.get("budget_tokens")) \
            and thinking["budget_tokens"] > cap - THINKING_MIN:  # (room left for the answer)
        changes["thinking"] = dict(thinking, budget_tokens=cap - THINKING_MIN) \
            if cap - THINKING_MIN >= THINKING_MIN else REMOVE
    return changes


def capped_batch(obj: dict, cap: int) -> dict:
    """capped_output for each request of an Anthropic message batch (its `params`)."""
    items = obj.get("requests")
    out, changed = [], False
    for item in items if isinstance(items, list) else ():
        params = item.get("params") if isinstance(item, dict) else None
        changes = capped_output(params, cap) if isinstance(params, dict) else {}
        if changes:
            changed = True
            item = dict(item, params={k: v for k, v in {**params, **changes}.items()
                                      if v is not REMOVE})
        out.append(item)
    return {"requests": out} if changed else {}


def _image_part(block: dict) -> dict | None:
    """An Anthropic image block as an OpenAI image_url part; None when it is not one OpenAI
    can take (a file id, a source without its data)."""
    src = block.get("source")
    if block.get("type") != "image" or not isinstance(src, dict):
        return None
    if src.get("type") == "url" and isinstance(src.get("url"), str) and src["url"]:
        url = src["url"]
    elif src.get("type") == "base64" and isinstance(src.get("data"), str) and src["data"]:
        url = f"data:{src.get('media_type') or 'image/png'};base64,{src['data']}"
    else:
        return None
    return {"type": "image_url", "image_url": {"url": url}}


def _anthropic_image(url: str) -> dict:
    """An OpenAI image_url's URL as an Anthropic image block."""
    if url.startswith("data:") and ";base64," in url:
        media, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _tool_result(block: dict, dropped: list[str]) -> tuple[dict, list[dict]]:
    """An Anthropic tool_result as an OpenAI tool message, and its images: a tool message
    carries text only, so they go to the user message that follows (after a line saying
    whose they are). Several text blocks are kept apart by a line break."""
    content = block.get("content")
    call = block.get("tool_use_id", "")
    texts, images = [], []
    if isinstance(content, str):
        texts.append(content)
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        image = _image_part(part)
        kind = part.get("type")
        src = part.get("source")
        if kind == "text":
            texts.append(part.get("text", ""))
        elif image is not None:
            images.append(image)
        elif kind == "document" and isinstance(src, dict) and src.get("type") == "text":
            texts.append(str(src.get("data", "")))  # (a plain-text document: its text)
        elif kind == "search_result":  # (its title, where it came from, and its text)
            texts.append("\n".join([f"{part.get('title', '')} ({part.get('source', '')})"]
                                   + [_text_of([c]) for c in part.get("content") or ()
                                      if isinstance(c, dict)]))
        else:
            dropped.append(f"messages[].content[tool_result].content[{kind}]")
    text = "\n".join(texts) or ("(images: in the next message)" if images else "")
    if images:
        images.insert(0, {"type": "text", "text": f"Images from tool call {call}:"})
    return {"role": "tool", "tool_call_id": call,
            "content": ("[error] " + text) if block.get("is_error") else text}, images


def _json_args(text: object) -> object:
    try:
        value = json.loads(text.strip()) if isinstance(text, str) and text.strip() else {}
    except (ValueError, RecursionError):
        return {"_raw": text}
    return value if isinstance(value, dict) else {"_value": value}


# OpenAI's reasoning models (o1, o3-mini, o4-mini, gpt-5, gpt-5.1-codex, fine-tuned ft:o4-mini...;
# not gpt-5-chat-latest, which samples as other chat models do)
_REASONING_MODEL_RE = re.compile(r"(?:openai/)?(?:ft:)?(?:o\d+|gpt-5(?:\.\d+)?)(?![\w.])(?!-chat)",
                                 re.I)


def anthropic_to_openai_request(obj: dict, dropped: list[str]) -> dict:
    out: dict = {"model": obj.get("model", "")}
    messages = []
    system = obj.get("system")
    if system:
        messages.append({"role": "system", "content": system if isinstance(system, str)
                         else "\n\n".join(b.get("text", "") for b in system
                                          if isinstance(b, dict) and b.get("type") == "text")})
    shown: list[dict] = []  # tool results' images: for the user message after the tool messages
    for msg in obj.get("messages") or ():  # (an assistant's calls must be answered by tool
        role, content = msg.get("role"), msg.get("content")  # messages before anything else)
        if isinstance(content, str):
            if shown and role == "user":
                content = shown + [{"type": "text", "text": content}]
            elif shown:
                messages.append({"role": "user", "content": shown})
            messages.append({"role": role, "content": content})
            shown = []
            continue
        parts, results, calls = [], [], []
        for block in content or ():
            kind = block.get("type")
            image = _image_part(block)
            if kind == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif image is not None:
                parts.append(image)
            elif kind == "tool_result":
                result, images = _tool_result(block, dropped)
                results.append(result)
                shown += images  # (what a tool message cannot carry: the user's turn shows)
            elif kind == "tool_use":
                calls.append({"id": block.get("id", ""), "type": "function", "function": {
                    "name": block.get("name", ""),
                    "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
            else:
                dropped.append(f"messages[].content[{kind}]")
        messages += results  # tool results answer the assistant's calls just before them
        if role == "assistant":
            if shown:
                messages.append({"role": "user", "content": shown})
                shown = []
            message: dict = {"role": "assistant",  # (blocks apart: a line break between)
                             "content": "\n".join(p["text"] for p in parts if "text" in p)
                             or None}
            if calls:
                message["tool_calls"] = calls
            messages.append(message)
        elif parts:  # (a turn of tool results alone: its images wait for the next message)
            parts, shown = shown + parts, []
            only_text = all(p["type"] == "text" for p in parts)
            messages.append({"role": role, "content": "\n".join(p["text"] for p in parts)
                             if only_text else parts})  # (text blocks apart, as vLLM joins)
    if shown:
        messages.append({"role": "user", "content": shown})
    out["messages"] = messages
    # OpenAI's reasoning models refuse max_tokens (they take max_completion_tokens) and any
    # sampling setting or stop sequence: those are dropped for them, as having no counterpart
    reasoning = _REASONING_MODEL_RE.match(str(out["model"])) is not None
    for key in ("temperature", "top_p", "stream"):
        if key in obj:
            if reasoning and key != "stream":
                dropped.append(key)
            else:
                out[key] = obj[key]
    if "max_tokens" in obj:
        out["max_completion_tokens" if reasoning else "max_tokens"] = obj["max_tokens"]
    if obj.get("stop_sequences"):
        if reasoning:
            dropped.append("stop_sequences")
        else:
            out["stop"] = obj["stop_sequences"]
    if obj.get("stream"):
        out["stream_options"] = {"include_usage": True}
    user = (obj.get("metadata") or {}).get("user_id")
    if user:
        out["user"] = user
    if obj.get("tools"):
        out["tools"] = [{"type": "function", "function": {
            "name": t.get("name", ""), "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}}
            for t in obj["tools"] if isinstance(t, dict) and "input_schema" in t]
        dropped += [f"tools[{t.get('type')}]" for t in obj["tools"]
                    if isinstance(t, dict) and "input_schema" not in t]
    choice = obj.get("tool_choice")
    if isinstance(choice, dict):
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(
            choice.get("type"), {"type": "function", "function": {"name": choice.get("name")}})
        if choice.get("disable_parallel_tool_use") is True and out.get("tools"):
            out["parallel_tool_calls"] = False
    thinking = obj.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        if reasoning:  # (other models refuse reasoning_effort)
            budget = thinking.get("budget_tokens", 0)
            out["reasoning_effort"] = "low" if budget < 4096 else "medium" if budget < 16384 \
                else "high"
        else:
            dropped.append("thinking")
    config = obj.get("output_config")
    fmt = (config.get("format") if isinstance(config, dict) else None) \
        or obj.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" \
            and isinstance(fmt.get("schema"), dict):  # structured outputs, both sides
        out["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": fmt["schema"]}}
    elif fmt is not None:
        dropped.append("output_format")
    dropped += [k for k in obj if k in ("top_k", "service_tier", "container", "mcp_servers")]
    return out


def openai_to_anthropic_request(obj: dict, dropped: list[str], default_max: int) -> dict:
    system, messages = [], []

    def add(role: str, blocks: list) -> None:
        if messages and messages[-1]["role"] == role:  # keep roles alternating
            messages[-1]["content"] += blocks
        else:
            messages.append({"role": role, "content": blocks})
    for msg in obj.get("messages") or ():
        role, content = msg.get("role"), msg.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content))
        elif role == "tool":  # (parts stay apart, as blocks; blank text is refused there)
            blocks = []
            for part in content if isinstance(content, list) else ():
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("text", "input_text") and str(part.get("text", "")).strip():
                    blocks.append({"type": "text", "text": part["text"]})
                elif kind == "image_url" and (part.get("image_url") or {}).get("url"):
                    blocks.append(_anthropic_image(part["image_url"]["url"]))
                elif kind not in ("text", "input_text"):
                    dropped.append(f"messages[tool].content[{kind}]")
            add("user", [{"type": "tool_result", "tool_use_id": msg.get("tool_call_id", ""),
                          "content": blocks or _text_of(content)}])
        elif role in ("user", "assistant"):
            blocks = []
            if isinstance(content, str) and content:
                blocks.append({"type": "text", "text": content})
            for part in content if isinstance(content, list) else ():
                if part.get("type") in ("text", "input_text"):
                    blocks.append({"type": "text", "text": part.get("text", "")})
                elif part.get("type") == "image_url":
                    blocks.append(_anthropic_image((part.get("image_url") or {}).get("url", "")))
                else:
                    dropped.append(f"messages[].content[{part.get('type')}]")
            for call in msg.get("tool_calls") or ():
                fn = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id", ""),
                               "name": fn.get("name", ""),
                               "input": _json_args(fn.get("arguments"))})
            if blocks:
                add(role, blocks)
    out: dict = {"model": obj.get("model", ""), "messages": messages,
                 "max_tokens": obj.get("max_completion_tokens") or obj.get("max_tokens")
                 or default_max}
    if system:
        out["system"] = "\n\n".join(system)
    for key in ("temperature", "top_p", "stream"):
        if key in obj:
            out[key] = obj[key]
    stop = obj.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if obj.get("user"):
        out["metadata"] = {"user_id": obj["user"]}
    if obj.get("tools"):
        out["tools"] = [{"name": fn.get("name", ""), "description": fn.get("description", ""),
                         "input_schema": fn.get("parameters") or {"type": "object",
                                                                  "properties": {}}}
                        for t in obj["tools"] for fn in [t.get("function") or {}]
                        if t.get("type") == "function"]
    choice = obj.get("tool_choice")
    if isinstance(choice, str) and choice in ("auto", "required", "none"):
        out["tool_choice"] = {"type": {"required": "any"}.get(choice, choice)}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out["tool_choice"] = {"type": "tool", "name": choice["function"].get("name", "")}
    if obj.get("parallel_tool_calls") is False and out.get("tools") \
            and (out.get("tool_choice") or {}).get("type") != "none":  # one call per turn
        out["tool_choice"] = dict(out.get("tool_choice") or {"type": "auto"},
                                  disable_parallel_tool_use=True)
    effort = obj.get("reasoning_effort")
    budget = _EFFORT_BUDGET.get(effort) if isinstance(effort, str) else None
    asked = obj.get("max_completion_tokens") or obj.get("max_tokens")
    if budget and _is_count(asked):  # the client's cap holds its reasoning too (OpenAI's
        budget = min(budget, asked - THINKING_MIN)  # max_completion_tokens): the budget fits
    elif budget and asked is not None:  # (not a count: sent as it is, for the provider to
        budget = 0  # refuse; thinking is not made to fit it)
    if budget is not None and (budget < THINKING_MIN or _thinking_refused(out)):
        dropped.append("reasoning_effort")
    elif budget:
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
        out["max_tokens"] = max(out["max_tokens"], budget + THINKING_MIN)
        out.pop("temperature", None)  # thinking requires the default temperature
        if isinstance(out.get("top_p"), (int, float)) and out["top_p"] < 0.95:
            out.pop("top_p")  # and a top_p of 0.95 or more
    fmt = obj.get("response_format")
    spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
    if isinstance(spec, dict) and isinstance(spec.get("schema"), dict) \
            and fmt.get("type") == "json_schema":  # structured outputs, both sides
        out["output_config"] = {"format": {"type": "json_schema", "schema": spec["schema"]}}
    elif fmt is not None:  # (JSON mode without a schema has no counterpart)
        dropped.append("response_format")
    dropped += [k for k in obj if k in ("n", "seed", "logprobs", "top_logprobs",
                                        "presence_penalty", "frequency_penalty", "logit_bias")]
    return out


def _thinking_refused(out: dict) -> bool:
    """Whether Anthropic would refuse thinking on this translated request: with a forced tool
    choice, or in a tool loop, where the assistant turn that called the tools must start with
    its signed thinking block (which an OpenAI client never had to send back)."""
    if (out.get("tool_choice") or {}).get("type") in ("any", "tool"):
        return True
    last = next((m for m in reversed(out["messages"]) if m["role"] == "assistant"), None)
    return last is not None and any(isinstance(b, dict) and b.get("type") == "tool_use"
                                    for b in last["content"])


def anthropic_to_openai_response(obj: dict) -> dict:
    text = "".join(b.get("text", "") for b in obj.get("content") or ()
                   if b.get("type") == "text")
    calls = [{"id": b.get("id", ""), "type": "function", "function": {
        "name": b.get("name", ""), "arguments": json.dumps(b.get("input", {}),
                                                           ensure_ascii=False)}}
        for b in obj.get("content") or () if b.get("type") == "tool_use"]
    message: dict = {"role": "assistant", "content": text or None}
    reasoning = "\n".join(b.get("thinking", "") for b in obj.get("content") or ()
                          if b.get("type") == "thinking" and b.get("thinking"))
    if reasoning:  # (where OpenAI-compatible servers and their clients put a model's reasoning)
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    u = obj.get("usage") or {}
    cached = u.get("cache_read_input_tokens") or 0
    prompt = (u.get("input_tokens") or 0) + cached + (u.get("cache_creation_input_tokens") or 0)
    return {"id": "chatcmpl-" + str(obj.get("id", "")), "object": "chat.completion",
            "created": int(time.time()), "model": obj.get("model", ""),
            "choices": [{"index": 0, "message": message, "finish_reason": _A2O_STOP.get(
                obj.get("stop_reason"), "stop")}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": u.get("output_tokens") or 0,
                      "total_tokens": prompt + (u.get("output_tokens") or 0),
                      "prompt_tokens_details": {"cached_tokens": cached}}}


def _reasoning_of(message: dict) -> str:
    """An OpenAI-compatible server's reasoning text (DeepSeek and older vLLM say
    reasoning_content, newer vLLM, Ollama and OpenRouter reasoning), or ""."""
    for key in _REASONING_KEYS:
        text = message.get(key)
        if type(text) is str and text:
            return text
    return ""


def thinking_asked(obj: object) -> bool:
    """An Anthropic request that enabled extended thinking: only its answer has thinking
    blocks (a client that did not ask may read content[0] as the text)."""
    thinking = obj.get("thinking") if isinstance(obj, dict) else None
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def openai_to_anthropic_response(obj: dict, thinking: bool = False) -> dict:
    choice = (obj.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    reasoning = _reasoning_of(message) if thinking else ""
    content = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning \
        else []  # (no signature to give: a later turn to this provider drops the block)
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    content += [{"type": "tool_use", "id": c["id"] if isinstance(c.get("id"), str) and c["id"]
                 else new_tool_id(),
                 "name": (c.get("function") or {}).get("name", ""),
                 "input": _json_args((c.get("function") or {}).get("arguments"))}
                for c in message.get("tool_calls") or () if isinstance(c, dict)]
    usage = Usage()
    usage.apply_openai(obj.get("usage"))
    stop = _O2A_STOP.get(choice.get("finish_reason"), "end_turn")
    if stop == "end_turn" and any(b["type"] == "tool_use" for b in content):
        stop = "tool_use"  # (servers that say "stop" after calls: the client's loop must go on)
    return {"id": "msg_" + str(obj.get("id", "")), "type": "message", "role": "assistant",
            "model": obj.get("model", ""), "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": usage.input, "output_tokens": usage.output,
                      "cache_read_input_tokens": usage.cache_read,
                      "cache_creation_input_tokens": usage.cache_write}}


def translate_error(body: bytes, status: int, client_api: str) -> bytes:
    """A provider's error body in the client's native shape (same status)."""
    obj = _loads(body)
    kind, message = _error_parts(obj)
    if not (kind or message) and not (isinstance(obj, dict) and not any(obj.values())):
        message = body[:300].decode("utf-8", "replace").strip()  # (a shape not known: its
    return native_error(client_api, status, message or kind or "upstream error")  # text)


class HeldBlock:
    """A block that waits for the open tool call to end: a tool call, or (slot None) text,
    or thinking when its name is "thinking"."""
    __slots__ = ("slot", "name", "pieces")

    def __init__(self, slot: int | None, name: str, piece: str) -> None:
        self.slot = slot
        self.name = name
        self.pieces = [piece] if piece else []


class StreamTranslator:
    """Rewrites one provider's SSE events into the client's format as they arrive: OpenAI
    chunks into Anthropic's message/content-block events (tool arguments as input_json_delta)
    or Anthropic events into OpenAI chunks (tool calls with streamed arguments).

    Anthropic's blocks come one at a time (start, deltas, stop), while an OpenAI server may
    interleave the deltas of parallel tool calls. So a call (or text) that begins while the
    open tool call's arguments are not yet a whole JSON value is held back, and follows once
    they are (or at the end); calls made one after the other stream as they come."""

    def __init__(self, upstream: str, client: str, include_usage: bool,
                 thinking: bool = False) -> None:
        self.upstream = upstream
        self.include_usage = include_usage
        self.thinking = thinking  # the Anthropic client asked for thinking: reasoning shows
        self.started = False
        self.open_block: int | None = None   # index of the open Anthropic content block
        self.open_tool: int | None = None    # the tool call (its slot) that block is, if any
        self.open_kind = ""                  # else "" for text, "thinking" for thinking
        self.blocks = 0
        self.tools: dict[int, int] = {}      # OpenAI tool call (its slot) -> block index
        self.held: list[HeldBlock] = []      # blocks waiting for the open call to end
        self.held_tools: dict[int, HeldBlock] = {}  # the tool calls among them, by slot
        self.slots = ToolSlots()
        self.usage = Usage()
        self.stop = None
        self.id = "msg_" + os.urandom(8).hex()
        self.model = ""
        self.tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool index
        self.finished = False
        self.estimate = None  # () -> (input, output) tokens, for a stream that reports none

    def feed(self, event: bytes) -> bytes:
        return self._from_openai(event) if self.upstream == API_OPENAI \
            else self._from_anthropic(event)

    # -- OpenAI provider, Anthropic client --------------------------------------------------
    def _start(self, model: str) -> bytes:
        self.started = True
        return _sse("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "content": [],
            "model": model, "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _close_block(self) -> bytes:
        if self.open_block is None:
            return b""
        index, self.open_block, self.open_tool = self.open_block, None, None
        return _sse("content_block_stop", {"type": "content_block_stop", "index": index})

    def _open(self, slot: int | None, name: str, pieces: list[str]) -> bytes:
        """Starts the next block (text, or the tool call in `slot`) with what it has so far."""
        self.open_block = self.blocks
        self.blocks += 1
        self.open_tool = slot
        self.open_kind = name if slot is None else ""
        if slot is None:
            block = {"type": "thinking", "thinking": "", "signature": ""} if name \
                else {"type": "text", "text": ""}
        else:
            self.tools[slot] = self.open_block
            block = {"type": "tool_use", "id": self.slots.ids[slot] or new_tool_id(),
                     "name": name, "input": {}}
        out = _sse("content_block_start", {"type": "content_block_start",
                                           "index": self.open_block, "content_block": block})
        return out + self._delta("".join(pieces)) if pieces else out

    def _delta(self, piece: str) -> bytes:
        delta = {"type": "input_json_delta", "partial_json": piece} \
            if self.open_tool is not None else {"type": "thinking_delta", "thinking": piece} \
            if self.open_kind else {"type": "text_delta", "text": piece}
        return _sse("content_block_delta", {"type": "content_block_delta",
                                            "index": self.open_block, "delta": delta})

    def _busy_open(self) -> bool:
        """The open block is a tool call whose arguments are not whole yet: more may come."""
        return self.open_tool is not None and not self.slots.args[self.open_tool].whole

    def _busy(self) -> bool:
        """Whether a new block must wait: blocks already wait, or the open call goes on."""
        return bool(self.held) or self._busy_open()

    def _text(self, piece: str, kind: str = "") -> bytes:
        """Text, or (kind "thinking") reasoning: it goes on the open block of its kind."""
        if self.open_block is not None and self.open_tool is None \
                and self.open_kind == kind and not self.held:
            return self._delta(piece)
        if self._busy():
            last = self.held[-1] if self.held else None
            if last is not None and last.slot is None and last.name == kind:
                last.pieces.append(piece)
            else:
                self.held.append(HeldBlock(None, kind, piece))
            return b""
        return self._close_block() + self._open(None, kind, [piece])

    def _tool(self, call: dict) -> bytes:
        k = self.slots.slot(call)
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        piece = fn.get("arguments")
        piece = piece if type(piece) is str else ""
        name = fn.get("name")
        name = name if type(name) is str else ""
        held = self.held_tools.get(k)
        if held is not None:  # a held call goes on: kept with it
            held.name = held.name or name
            if piece:
                held.pieces.append(piece)
            return b""
        if k in self.tools:
            if k != self.open_tool:
                return b""  # (its block ended with whole arguments: nothing valid can follow)
            out = self._delta(piece) if piece else b""
            return out + self._release() if self.held and not self._busy_open() else out
        if not name and not piece:
            return b""  # (an id alone: the block starts when its name comes)
        if self._busy():
            held = self.held_tools[k] = HeldBlock(k, name, piece)
            self.held.append(held)
            return b""
        return self._close_block() + self._open(k, name, [piece] if piece else [])

    def _release(self, final: bool = False) -> bytes:
        """Held blocks after the open one, in the order they began: each whole one closed,
        the first unfinished tool call (or the last block) left open to go on live; at the
        end (`final`) all of them, closed."""
        out = b""
        while self.held:
            out += self._close_block()
            held = self.held.pop(0)
            if held.slot is not None:
                del self.held_tools[held.slot]
            out += self._open(held.slot, held.name, held.pieces)
            if not final and (not self.held or self._busy_open()):
                break
        return out

    def _from_openai(self, event: bytes) -> bytes:
        _, data = sse_fields(event)
        if data.strip() == b"[DONE]":
            return self.finish()
        obj = _loads(data)
        if not isinstance(obj, dict):
            return b""
        if obj.get("error"):
            return _sse("error", json.loads(native_error(API_ANTHROPIC, 502,
                                                         _error_text(obj) or "upstream error")))
        out = b"" if self.started else self._start(str(obj.get("model", "")))
        if isinstance(obj.get("usage"), dict):
            self.usage.apply_openai(obj["usage"])
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            reasoning = _reasoning_of(delta) if self.thinking else ""
            if reasoning:
                out += self._text(reasoning, "thinking")
            if delta.get("content") and type(delta["content"]) is str:
                out += self._text(delta["content"])
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):  # (else not a tool call: nothing to translate)
                    out += self._tool(call)
            if choice.get("finish_reason"):
                self.stop = _O2A_STOP.get(choice["finish_reason"], "end_turn")
        return out

    # -- Anthropic provider, OpenAI client --------------------------------------------------
    def _chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
        chunk = {"id": "chatcmpl-" + self.id[4:], "object": "chat.completion.chunk",
                 "created": int(time.time()), "model": self.model,
                 "choices": [] if usage is not None else
                 [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            chunk["usage"] = usage
        return b"data: " + json_dumps(chunk) + b"\n\n"

    def _from_anthropic(self, event: bytes) -> bytes:
        name, data = sse_fields(event)
        obj = _loads(data)
        if not isinstance(obj, dict):
            return b""
        kind = obj.get("type") or name.decode()
        if kind == "message_start":
            msg = obj.get("message") or {}
            self.model = str(msg.get("model", ""))
            self.id = str(msg.get("id") or self.id)
            self.usage.apply_anthropic(msg.get("usage"))
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            if block.get("type") == "tool_use":
                k = self.tool_index[obj.get("index", 0)] = len(self.tool_index)
                return self._chunk({"tool_calls": [{"index": k, "id": block.get("id", ""),
                                                    "type": "function", "function": {
                                                        "name": block.get("name", ""),
                                                        "arguments": ""}}]})
            return b""
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            if delta.get("type") == "input_json_delta" and obj.get("index") in self.tool_index:
                return self._chunk({"tool_calls": [{
                    "index": self.tool_index[obj["index"]],
                    "function": {"arguments": delta.get("partial_json", "")}}]})
            if delta.get("type") == "thinking_delta" and delta.get("thinking"):
                return self._chunk({"reasoning_content": delta["thinking"]})  # (as the
            return b""  # answer's reasoning_content; a signature has no counterpart)
        if kind == "message_delta":
            self.usage.apply_anthropic(obj.get("usage"))
            self.stop = _A2O_STOP.get((obj.get("delta") or {}).get("stop_reason"), "stop")
            return b""
        if kind == "message_stop":
            return self.finish()
        if kind == "error":
            return b"data: " + native_error(API_OPENAI, 502, _error_text(obj) or
                                            "upstream error") + b"\n\n"
        return b""  # ping

    def finish(self) -> bytes:
        """The closing events, once, when the provider's stream ends."""
        if self.finished:
            return b""
        self.finished = True
        u = self.usage
        if not u.reported and self.estimate is not None:  # (a server that sends no usage: the
            u.input, u.output = self.estimate()  # estimate the log row keeps, not zeros a
            # client's context meter would take at their word)
        if self.upstream == API_OPENAI:
            if not self.started:
                return b""
            stop = self.stop or "end_turn"
            if stop == "end_turn" and (self.tools or self.held_tools):
                stop = "tool_use"  # (servers that say "stop" after calls: the loop goes on)
            return self._release(final=True) + self._close_block() + _sse("message_delta", {
                "type": "message_delta", "delta": {"stop_reason": stop,
                                                   "stop_sequence": None},
                "usage": {"input_tokens": u.input, "output_tokens": u.output,
                          "cache_read_input_tokens": u.cache_read,
                          "cache_creation_input_tokens": u.cache_write}}) + \
                _sse("message_stop", {"type": "message_stop"})
        out = self._chunk({}, self.stop or "stop")
        if self.include_usage:
            out += self._chunk({}, usage=self.openai_usage())
        return out + b"data: [DONE]\n\n"

    def openai_usage(self) -> dict:
        """An Anthropic stream's usage as OpenAI reports it."""
        u = self.usage
        prompt = u.input + u.cache_read + u.cache_write
        return {"prompt_tokens": prompt, "completion_tokens": u.output,
                "total_tokens": prompt + u.output,
                "prompt_tokens_details": {"cached_tokens": u.cache_read}}




class Provider:
    """A configured provider made ready: its origin, resolved key and model matcher."""
    __slots__ = ("key", "cfg", "origin", "api_key", "exact", "patterns", "error")

    def __init__(self, key: str, cfg: ProviderConfig, env: dict,
                 tls: ClientTLS | None = None) -> None:
        self.key = key
        self.cfg = cfg
        self.error = ""
        self.api_key = ""
        try:
            self.api_key = resolve_key(cfg.key_ref, env)
        except ValueError as exc:
            self.error = str(exc)
        self.origin = Origin(cfg.api_base, cfg.ca_file, tls)
        self.exact = frozenset(m for m in cfg.models if "*" not in m)
        self.patterns = tuple(re.compile(re.escape(m).replace(r"\*", ".*"))
                              for m in cfg.models if "*" in m)

    @property
    def usable(self) -> bool:
        return self.cfg.enabled and not self.error

    def serves(self, model: str) -> bool:
        return model in self.exact or any(p.fullmatch(model) for p in self.patterns)


class Router:
    """Picks the provider for (API format, model): model_map, then providers listing the model
    (lowest priority), then routing.default_provider, then any provider with no model list."""

    def __init__(self, cfg: Config, env: dict, log: Logger, tls: ClientTLS | None = None) -> None:
        tls = tls or ClientTLS()
        self.providers = {key: Provider(key, p, env, tls) for key, p in cfg.providers.items()}
        for prov in self.providers.values():
            if prov.cfg.enabled and prov.error:
                log.warn("provider unusable", provider=prov.key, error=prov.error)
        order = {key: i for i, key in enumerate(self.providers)}
        self.by_format = {api: sorted((p for p in self.providers.values()
                                       if p.usable and p.cfg.format == api),
                                      key=lambda p: (p.cfg.priority, order[p.key]))
                          for api in API_FORMATS}
        self.model_map = cfg.routing.model_map
        self.default = cfg.routing.default_provider
        self.share_keys = cfg.routing.share_client_keys
        self.log = log
        self._memo: dict[tuple[str, str], Provider | None] = {}
        self._plans: dict[tuple, tuple] = {}

    def resolve(self, api: str, model: str) -> Provider | None:
        key = (api, model)
        try:
            return self._memo[key]
        except KeyError:
            pass
        found = self._resolve(api, model)
        if len(self._memo) < 4096:
            self._memo[key] = found
        return found

    def mapped(self, model: str) -> tuple[Provider | None, str]:
        """model_map's provider for a model and the model name to send it."""
        target = self.model_map.get(model, "")
        key, _, rename = target.partition(":")
        prov = self.providers.get(key)
        return (prov, rename or model) if prov is not None and prov.usable else (None, model)

    def pinned(self, model: str) -> Provider | None:
        """The enabled provider model_map sends a model to, usable or not (a key that could
        not be read): such a model never goes to a provider that merely takes any model."""
        prov = self.providers.get(self.model_map.get(model, "").partition(":")[0])
        return prov if prov is not None and prov.cfg.enabled else None

    def _resolve(self, api: str, model: str) -> Provider | None:
        candidates = self.by_format[api]
        mapped, _ = self.mapped(model)
        if mapped is not None:  # may be of the other format: then translated
            return mapped
        if self.pinned(model) is not None:  # (its provider is broken: only a provider that
            return next((p for p in candidates if p.serves(model)), None)  # names it, else a
            # refusal that says why, never one that merely takes any model)
        for prov in candidates:
            if (prov.exact or prov.patterns) and prov.serves(model):
                return prov
        default = self.providers.get(self.default)
        if default is not None and default in candidates:
            return default
        for prov in candidates:
            if not prov.exact and not prov.patterns:
                return prov
        return None

    def plan(self, api: str, model: str, fallback: bool, alternates: tuple = (),
             cross_format: bool = False) -> list[tuple[Provider, str]]:
        """The (provider, model) pairs to try in order: the routed provider, then (with
        fallback) every other provider of the format that lists the model or takes any model,
        then the same for each configured alternate model. A model that model_map sends
        somewhere falls back only to providers that list it by name or pattern: a mapping
        chosen to keep it (and the conversation) on one provider, a local one say, does not end
        on a provider that takes any model. (Fixed per snapshot: memoized.)"""
        key = (api, model, fallback, tuple(alternates), cross_format)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(api, model, fallback, alternates, cross_format)
            if len(self._plans) < 4096:  # model names come from clients: bounded
                self._plans[key] = plan
        return list(plan)

    def _plan(self, api: str, model: str, fallback: bool, alternates: tuple,
              cross_format: bool) -> tuple[tuple[Provider, str], ...]:
        plan: list[tuple[Provider, str]] = []
        for name in (model,) + (tuple(alternates) if fallback else ()):
            first = self.resolve(api, name)
            mapped, renamed = self.mapped(name)
            pinned = self.pinned(name) is not None
            if first is not None and first is mapped:
                plan.append((first, renamed))
            elif first is not None and (first, name) not in plan:
                plan.append((first, name))
            if fallback:
                formats = API_FORMATS if cross_format else (api,)
                for prov in [p for f in sorted(formats, key=lambda f: f != api)
                             for p in self.by_format[f]]:
                    if (prov, name) not in plan and (prov.serves(name) or not pinned
                                                     and not (prov.exact or prov.patterns)):
                        plan.append((prov, name))
        return tuple(self._own_keys_stay(plan, model))

    def _own_keys_stay(self, plan: list, model: str) -> list:
        """A client's own key goes only to the host its request is routed to (the first
        step's): never, by a fallback, to another host that passes keys through (a gateway
        run by someone else; a provider of the other format, as its Bearer token), whether the
        first step passes it or uses a key of its own. Steps with their own key stay. Each
        step taken out is logged (once: plans are memoized)."""
        if self.share_keys or not plan:
            return plan
        home = plan[0][0].origin.key[:3]
        kept = [(p, m) for p, m in plan if p.cfg.key_ref or p.origin.key[:3] == home]
        if len(self._plans) < 4096:  # (past it plans are not kept: not said every time)
            for step in plan:
                if step not in kept:
                    self.log.info("fallback step skipped: it would get the client's own key "
                                  "(routing.share_client_keys)", provider=step[0].key,
                                  model=model)
        return kept

    def usable_count(self) -> int:
        return sum(len(v) for v in self.by_format.values())


class Failure:
    """The last failed upstream attempt: a response (head and body, returned to the client as
    it was) or an error (502/504), or nothing admitted at all (every breaker open, or a
    fallback's rate limit reached: `limited` names its bucket)."""
    __slots__ = ("head", "body", "error", "retry_in", "api", "limited")

    def __init__(self, head: ResponseHead | None = None, body: bytes = b"",
                 error: UpstreamError | None = None, retry_in: float = 0.0,
                 api: str = "") -> None:
        self.head = head
        self.body = body
        self.error = error
        self.retry_in = retry_in
        self.api = api  # the provider's API format (its error body's shape)
        self.limited = ""


def relay_kind(accounted: bool, ctype: bytes, download: bool = False) -> str:
    """How an answer is relayed, by its path and content type: "sse" (event by event),
    "buffered" (read whole: accounted, restored, translated) or "raw" (bytes as they come: a
    file's content or a batch's results, whatever their type; JSON Lines). (Media types are
    case-insensitive: RFC 9110 8.3.1.)"""
    ctype = ctype.lower()
    if ctype.startswith(b"text/event-stream"):
        return "sse"
    if accounted:
        return "buffered"
    media = ctype.partition(b";")[0].strip()
    return "buffered" if not download and (media == b"application/json" or
                                           media.endswith(b"+json")) else "raw"


BATCHES_PATH = "/v1/messages/batches"
_HOST_RE = re.compile(rb"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def is_download(path: str) -> bool:
    """A file's content or a batch's results: relayed as it comes, never read whole."""
    return path.endswith(("/content", "/results"))


class Dispatcher:
    """Sends a request along its plan of providers: retries with backoff, Retry-After, circuit
    breakers and fallback, all before the first byte of an answer reaches the client."""

    def __init__(self, cfg: Config, pool: UpstreamPool, breakers: dict, log: Logger,
                 rng=random.random, clock=time.time, metrics: Metrics | None = None) -> None:
        self.pool = pool
        self.metrics = metrics or Metrics()
        self.policy = RetryPolicy(cfg.resilience, rng)
        self.breakers = breakers if cfg.resilience.circuit_breaker_enabled else {}
        self.max_error_body = min(cfg.server.max_response_size or STORED_BODY_MAX,
                                  STORED_BODY_MAX)
        self.max_response_size = cfg.server.max_response_size
        self.log = log
        self.clock = clock
        self.idle_timeout = cfg.resilience.stream_idle_timeout
        self.first_event_wait = FIRST_EVENT_WAIT

    async def send(self, proxy: "Proxy", req: Request, ctx: Context, conn: ServerConn,
                   plan: list[tuple[Provider, str, bytes]]):
        """An UpstreamResponse to relay (with the provider, model and breaker ticket), or a
        Failure. Raises ConnectionGone when the client leaves while waiting."""
        last = Failure()
        waits = []
        admit = ctx.notes.get("admit")  # (the rate limiter's, for a fallback to another provider)
        for index, (prov, model, body) in enumerate(plan):
            breaker = self.breakers.get(prov.key)
            retry_after = None
            for attempt in range(self.policy.attempts):
                if attempt:
                    await self._pause(self.policy.delay(attempt, retry_after), conn.chan)
                ticket = breaker.allow() if breaker is not None else "call"
                if ticket is None:
                    waits.append(breaker.retry_in())
                    self.metrics.inc("tokenman_provider_requests_total",
                                     (("provider", prov.key), ("status", "circuit_open")))
                    break
                if admit is not None and prov.key != ctx.provider:
                    key, wait = admit(ctx, prov.key)
                    if wait:  # its own limits hold for a fallback's traffic too
                        if breaker is not None:
                            breaker.release(ticket)
                        waits.append(wait)
                        last.limited = last.limited or key
                        self.metrics.inc("tokenman_provider_requests_total",
                                         (("provider", prov.key), ("status", "rate_limited")))
                        break
                ctx.attempts += 1
                ctx.provider = prov.key
                if index:
                    ctx.notes["stand_in"] = True  # (a later step of the plan answers)
                started = time.perf_counter()
                failed = ""  # the attempt's error, for its span
                if ctx.trace is not None:
                    ctx.notes["upstream_span"] = os.urandom(8).hex()
                try:
                    target = prov.origin.target(req.target) if prov.cfg.format == ctx.api \
                        or req.path not in ACCOUNTED_PATHS else \
                        prov.origin.target(API_PATHS[prov.cfg.format])
                    resp = await self.pool.request(
                        prov.origin, req.method, target,
                        proxy.upstream_headers(req, prov, ctx), body,
                        prov.cfg.connect_timeout, prov.cfg.timeout, watch=conn.chan)
                except ConnectionGone:
                    if breaker is not None:
                        breaker.release(ticket)
                    raise
                except UpstreamError as exc:
                    failed = str(exc)
                    if breaker is not None:
                        breaker.record(ticket, False)
                    self.metrics.inc("tokenman_provider_requests_total",
                                     (("provider", prov.key), ("status", "error")))
                    self._attempt_failed(proxy, ctx, prov, str(exc))
                    last = Failure(error=exc)
                    if exc.timeout and not exc.connect and not self.policy.on_timeout:
                        return last  # the provider may be generating: never send it twice
                    continue
                finally:
                    conn.chan.on_lost = None
                    if ctx.trace is not None:
                        ctx.trace.child("upstream.forward", started, time.perf_counter(),
                                        SPAN_CLIENT, {"upstream.provider": prov.key,
                                                      "upstream.url": prov.cfg.api_base,
                                                      "upstream.attempt": attempt + 1,
                                                      **({"error.type": failed} if failed
                                                         else {})},
                                        span_id=ctx.notes["upstream_span"], error=bool(failed))
                ok = resp.status not in RETRY_STATUSES
                early = None  # an answer that fails before any of it left, while others may
                if ok and 200 <= resp.status < 300 and (  # answer: a stream's first event,
                        req.path in ACCOUNTED_PATHS or proxy._responses_call(ctx)) and (
                        attempt + 1 < self.policy.attempts or index + 1 < len(plan)):
                    try:  # a buffered answer's whole body
                        early = await (self._first_event(resp, prov, conn.chan)
                                       if ctx.streaming else
                                       self._whole_body(resp, prov, conn.chan,
                                                        req.path in ACCOUNTED_PATHS))
                    except BaseException:  # (the client left, or a bug: the ticket goes back,
                        if breaker is not None:  # or a half-open probe would never return)
                            breaker.release(ticket)
                        resp.close()
                        raise
                    ok = early is None
                status = resp.status if early is None else \
                    early.head.status if early.head is not None else 502
                if ctx.trace is not None:  # (the span is in the trace's list: add its status)
                    span = ctx.trace.spans[-1]
                    span["attrs"]["http.response.status_code"] = status
                    span["error"] = status >= 500 or status == 429
                if ok:  # (counted when the relay ends: it may yet fail)
                    proxy.note_attempt(prov.key)
                    return resp, prov, model, ticket
                self.metrics.inc("tokenman_provider_requests_total",
                                 (("provider", prov.key), ("status", "error")))
                if early is not None:
                    if breaker is None:
                        pass
                    elif status == 429 and not prov.cfg.key_ref:
                        breaker.release(ticket)  # (the caller's own key: as for a JSON 429)
                    else:
                        breaker.record(ticket, False)
                    last = early
                    retry_after = None
                    if early.error is not None and early.error.timeout \
                            and not self.policy.on_timeout:
                        self._attempt_failed(proxy, ctx, prov, str(early.error))
                        return last  # (as for a head that did not come in time)
                    self._attempt_failed(proxy, ctx, prov, f"{status} " + (
                        _error_text(_loads(early.body)) if early.head is not None
                        else str(early.error)))
                    continue
                if breaker is not None:
                    if resp.status == 429 and not prov.cfg.key_ref:
                        breaker.release(ticket)  # the caller's own key hit its rate limit: that
                        # says nothing about the provider for the other callers' keys
                    else:
                        breaker.record(ticket, False)
                retry_after = parse_retry_after(resp.head.headers, self.clock())
                last = await self._keep_failure(resp, prov)
                self._attempt_failed(proxy, ctx, prov, f"{resp.status} " + (
                    _error_text(_loads(last.body)) if last.head is not None else str(last.error)))
                if last.error is not None and conn.lost:
                    raise ConnectionGone()
        if last.head is None and last.error is None and waits:
            last.retry_in = min(waits)
        return last

    def _attempt_failed(self, proxy: "Proxy", ctx: Context, prov: Provider, error: str) -> None:
        """One attempt that failed (a retry or a fallback may still answer): counted for the
        provider's panel and logged, so an operator sees what the client never does."""
        proxy.note_attempt(prov.key, error)
        self.log.warn("upstream attempt failed", id=ctx.id, provider=prov.key,
                      attempt=ctx.attempts, error=error[:300])

    async def _first_event(self, resp: UpstreamResponse, prov: Provider,
                           watch: Channel) -> Failure | None:
        """A stream that fails at its first event, while a retry or a fallback could still
        replace it: a provider that sent its 200 head before it knew may say "overloaded" (or
        rate limited, or a server error) in the first event (after comments or pings, too), or
        end the stream (cleanly or not) before one. That is a failed attempt, as the same error
        answered as JSON. So the head waits up to FIRST_EVENT_WAIT for the first event and
        leaves with it (the client sees its first byte no later); a stream whose first event
        is no such error, or comes later, is relayed untouched. The bytes are looked at where
        they lie (through the chunked framing): only an error or an end is taken from them."""
        head = resp.head.headers.map
        if relay_kind(False, head.get(b"content-type", b"")) != "sse" \
                or head.get(b"content-encoding", b"identity").strip().lower() != b"identity":
            return None
        if resp.body.done:
            resp.close()
            return Failure(error=UpstreamError("upstream stream ended before its first event"))
        chan = resp.chan
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self.first_event_wait, self.idle_timeout)
        watch.on_lost = chan.abort  # a client that leaves ends the wait
        try:
            while True:
                data, ended = peek_body(resp.body)
                event = leading_event(data)
                if event is not None or ended or chan.eof or len(chan.buf) >= READ_CHUNK:
                    break
                if watch.lost or not await chan.wait_more(deadline):
                    break  # (a slow first event: the head goes out alone)
            if watch.lost:
                resp.close()
                raise ConnectionGone()
            if event is not None and b"error" not in event or event is None and not (
                    ended or chan.eof):
                return None  # the usual case: a first event that is no error
            got = b""  # every byte the event needs is here: read it out for the relay
            ended = False  # (a read said so: the body's end, not only a long first event)
            until = max(deadline, loop.time()) + 1.0  # (a last CRLF late: no longer than that)
            try:
                while (event is None or leading_event(got) is None) and len(got) < READ_CHUNK:
                    data = await resp.body.read(until)
                    if not data:
                        ended = True
                        break
                    got += data
            except (TimeoutError, ConnectionGone, ValueError, OSError, HeadTooLarge):
                return self._broken(resp, watch, "upstream stream broken at its first event")
        finally:
            watch.on_lost = None
        event = leading_event(got)
        if event is None and ended:
            resp.close()  # the body ended (cleanly) before a whole event
            return Failure(error=UpstreamError("upstream stream ended before its first event"))
        resp.body = PrefetchedReader(resp.body, got)
        if event is None:
            return None  # a first event longer than READ_CHUNK: relayed as it comes
        return self._event_failure(event, resp, prov)

    @staticmethod
    def _event_failure(event: bytes, resp: UpstreamResponse, prov: Provider) -> Failure | None:
        """A stream's first event as a failed attempt, when it is an error another attempt
        could change: the error as the API answers it in JSON, with the status it stands for."""
        name, data = sse_fields(event)
        obj = _loads(data) if data[:1] == b"{" else None
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, str):  # (a server that sends the error's name alone)
            err = {"type": err, "message": err}
        if err is None and isinstance(obj, dict) and obj.get("type") == "error":
            err = obj  # the Responses API's error event: its fields at the top
        if not isinstance(err, dict) or name not in (b"error", b""):
            return None
        status = retry_status(err)
        if not status:
            return None  # an error another attempt would not change: relayed as it came
        resp.close()
        if prov.cfg.format == API_OPENAI:  # as the API answers it in JSON: {"error": {...}}
            status = 503 if status == 529 else status  # (OpenAI has no 529)
            kind = err.get("type")
            obj = {"error": dict({k: v for k, v in err.items()
                                  if k not in ("type", "sequence_number")},
                                 type=kind if isinstance(kind, str) and kind != "error"
                                 else OPENAI_ERROR_TYPES.get(status, "server_error"))}
        headers = Headers([(n, v) for n, v in resp.head.headers.raw if n.lower() not in (
            b"content-type", b"content-length", b"transfer-encoding")]
            + [(b"content-type", b"application/json")])
        return Failure(head=ResponseHead(status, b"", 1, headers), body=json_dumps(obj),
                       api=prov.cfg.format)

    async def _whole_body(self, resp: UpstreamResponse, prov: Provider, watch: Channel,
                          accounted: bool) -> Failure | None:
        """A buffered answer read whole before it is taken, while a retry or a fallback could
        still replace it: a body cut short after its 200 head is a failed attempt (nothing
        reached the client yet). The bytes are kept on the response for the relay."""
        head = resp.head.headers.map
        if relay_kind(accounted, head.get(b"content-type", b"")) != "buffered" \
                or head.get(b"content-encoding", b"identity").strip().lower() != b"identity":
            return None  # (what the buffered relay would not take: the relay reads it)
        loop = asyncio.get_running_loop()
        watch.on_lost = resp.chan.abort  # a client that leaves ends the read
        try:
            resp.data = await resp.body.read_all(self.max_response_size,
                                                 loop.time() + prov.cfg.timeout)
        except HeadTooLarge:
            resp.data = HeadTooLarge  # (too large whoever answers: the relay says so)
            resp.close()
        except TimeoutError:
            resp.close()
            return Failure(error=UpstreamError("upstream timed out sending its answer",
                                               timeout=True))
        except (ConnectionGone, ValueError, OSError):
            return self._broken(resp, watch, "upstream response cut short")
        finally:
            watch.on_lost = None
        return None

    @staticmethod
    def _broken(resp: UpstreamResponse, watch: Channel, message: str) -> Failure:
        """A read ahead that failed: the response is closed; the attempt failed, unless the
        client left (ConnectionGone: nobody is waiting for another)."""
        resp.close()
        if watch.lost:
            raise ConnectionGone()
        return Failure(error=UpstreamError(message))

    async def _keep_failure(self, resp: UpstreamResponse, prov: Provider) -> Failure:
        loop = asyncio.get_running_loop()
        resp.inflate()  # (logged, maybe translated: plain bytes)
        try:
            body = await resp.body.read_all(self.max_error_body, loop.time() + prov.cfg.timeout)
        except (HeadTooLarge, TimeoutError, ConnectionGone, ValueError) as exc:
            resp.close()
            return Failure(error=UpstreamError(f"upstream error body unreadable: "
                                               f"{type(exc).__name__}"))
        resp.release()
        return Failure(head=resp.head, body=body, api=prov.cfg.format)

    async def _pause(self, seconds: float, watch: Channel) -> None:
        """Sleeps before a retry; ends at once (ConnectionGone) when the client goes away."""
        if watch.lost:
            raise ConnectionGone()
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        timer = loop.call_later(seconds, lambda: fut.done() or fut.set_result(None))
        watch.on_lost = lambda: fut.done() or fut.set_result(None)
        try:
            await fut
        finally:
            timer.cancel()
            watch.on_lost = None
        if watch.lost:
            raise ConnectionGone()


class ResponseRelay:
    """The answer side of the proxy: buffered, SSE and raw relays, failures, and the
    accounting of what came back. A mixin of Proxy (it uses its cfg, log, prices)."""

    def _answer_failure(self, req: Request, conn: ServerConn, ctx: Context,
                        failure: Failure) -> None:
        """After the last attempt: the provider's own last answer as it was, else a native
        502/504, or 503 when every eligible provider's breaker is open."""
        xid = [(b"X-Request-Id", ctx.xid)]
        if failure.head is not None:
            head = failure.head
            ctx.status = head.status
            ctx.outcome = "upstream_error"
            ctx.error = redact_secrets(failure.body[:500].decode("utf-8", "replace"))
            headers = self._client_headers(head, ctx)
            body = failure.body
            status = head.status
            if failure.api and failure.api != ctx.api and req.path in ACCOUNTED_PATHS:
                body = translate_error(body, head.status, ctx.api)
                if status == 529 and ctx.api == API_OPENAI:
                    status = ctx.status = 503  # (OpenAI has no 529)
            conn.send(req, status, headers, body, head.reason)
        elif failure.error is not None:
            exc = failure.error
            ctx.status = 504 if exc.timeout and not exc.connect else 502
            ctx.outcome = "upstream_failed"
            ctx.error = str(exc)
            conn.send_error(req, ctx.api, ctx.status, "upstream timed out"
                            if ctx.status == 504 else "upstream unavailable", xid)
        elif failure.limited:  # (the provider planned first was skipped: its circuit open)
            ctx.status = 429
            ctx.outcome = "rejected"
            ctx.notes["refused_by"] = "ratelimit"  # (as the stage's own refusal is counted)
            ctx.error = f"rate limit for {failure.limited} reached"
            seconds = max(1, int(failure.retry_in + 0.999))
            conn.send_error(req, ctx.api, 429, f"{ctx.error}; retry in {seconds} s",
                            xid + [(b"Retry-After", b"%d" % seconds)],
                            "rate_limit_error" if ctx.api == API_ANTHROPIC
                            else "rate_limit_exceeded")
        else:
            ctx.status = 503
            ctx.outcome = "upstream_failed"
            ctx.error = "circuit open for every eligible provider"
            wait = b"%d" % max(1, int(failure.retry_in + 0.999))
            conn.send_error(req, ctx.api, 503, "upstream temporarily unavailable "
                            "(circuit open)", xid + [(b"Retry-After", wait)],
                            "overloaded_error" if ctx.api == API_ANTHROPIC else "")

    async def _relay_buffered(self, req: Request, conn: ServerConn, ctx: Context, prov: Provider,
                              resp: UpstreamResponse, t_up: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            data = resp.data  # (read whole already, while another attempt could replace it)
            if data is None:
                data = await resp.body.read_all(self.cfg.server.max_response_size,
                                                loop.time() + prov.cfg.timeout)
            elif data is HeadTooLarge:
                raise HeadTooLarge()
        except HeadTooLarge:
            return self._fail(req, conn, ctx, 502, "upstream response too large")
        except TimeoutError:
            return self._fail(req, conn, ctx, 504, "upstream timed out")
        except (ConnectionGone, ValueError):
            if conn.lost:
                ctx.outcome = "client_closed"
                ctx.error = "client disconnected while the upstream answered"
                return None
            return self._fail(req, conn, ctx, 502, "upstream response cut short")
        resp.release()
        now = time.perf_counter()
        ctx.upstream_s = now - t_up
        if ctx.outcome == "ok" and not data.strip() and req.path in ACCOUNTED_PATHS \
                and req.method != "HEAD":
            return self._fail(req, conn, ctx, 502, "upstream answered with an empty body")
        if ctx.outcome == "ok":
            self._account_body(ctx, data)
        else:
            ctx.error = redact_secrets(data[:500].decode("utf-8", "replace"))
        if ctx.upstream_api != ctx.api:  # answered by a provider of the other format
            data = self._translate_body(ctx, data, resp.status)
        if ctx.outcome == "ok":
            ctx.upstream_body = data  # what the cache keeps: before any PII restore
            ctx.notes["cache_headers"] = resp.head.headers.raw
        if req.path.startswith(BATCHES_PATH) and b'"results_url"' in data:
            data = self._local_results_url(req, prov, data)
        if ctx.hooks:
            data = ctx.pipeline.response(ctx, data)
        headers = self._client_headers(resp.head, ctx)
        if ctx.cost is not None and ctx.outcome == "ok":
            headers.append((b"X-Tokenman-Cost-Usd", b"%.8f" % ctx.cost))
        overhead = (now - ctx.req.t0 - ctx.upstream_s) * 1000
        headers.append((b"X-Tokenman-Overhead-Ms", b"%.3f" % overhead))
        ctx.ttfb = now
        conn.send(req, resp.status, headers, data, resp.head.reason)
        if self.cfg.server.store_body:
            ctx.response_body = data
        if conn.chan._write_paused:  # a large answer: the client has write_timeout to take it
            try:
                await conn.drain()
            except ConnectionGone:
                ctx.outcome = "client_closed"
                ctx.error = "client stopped reading the answer"

    def _local_results_url(self, req: Request, prov: Provider, data: bytes) -> bytes:
        """A message batch names its results by an absolute URL at the provider, which SDKs
        follow as it is: past tokenman (no row, no key_ref, no way out where only tokenman
        reaches the provider). It is made to name tokenman, as the client reached it."""
        host = req.headers.map.get(b"host", b"")
        if not _HOST_RE.fullmatch(host):
            return data
        https = self.cfg.server.tls_enabled or req.headers.map.get(  # (behind a proxy that
            b"x-forwarded-proto", b"").strip().lower() == b"https"  # ends TLS)
        origin = (b"https://" if https else b"http://") + host
        base = urllib.parse.urlsplit(prov.cfg.api_base)
        return re.sub(rb'("results_url"\s*:\s*")' + re.escape(
            f"{base.scheme}://{base.netloc}".encode()) + rb'[^"]*?(/v1/messages/batches/)',
            lambda m: m.group(1) + origin + m.group(2), data)

    def _translate_body(self, ctx: Context, data: bytes, status: int) -> bytes:
        if status >= 400:
            return translate_error(data, status, ctx.api)
        obj = _loads(data)
        if not isinstance(obj, dict):
            return data
        out = anthropic_to_openai_response(obj) if ctx.upstream_api == API_ANTHROPIC \
            else openai_to_anthropic_response(obj, thinking_asked(ctx.obj))
        return json_dumps(out)

    @staticmethod
    def _billable(ctx: Context) -> bool:
        """A POST, which makes an answer (chat, responses, embeddings, images, audio). A
        retrieval (GET /v1/responses/{id}, buffered or streamed), a cancel or an update of a
        stored answer (POST /v1/chat/completions/{id}) shows usage billed when the answer was
        made: not on every poll."""
        path = ctx.req.path
        return ctx.req.method == "POST" and not path.endswith("/cancel") \
            and not path.startswith(OPENAI_PATH + "/")

    def _account_body(self, ctx: Context, data: bytes) -> None:
        if not self._billable(ctx):
            return
        obj = _loads(data) if data[:1] in (b"{", b" ", b"\n") else None
        usage, model = usage_from_body(ctx.upstream_api, obj)
        if isinstance(obj, dict) and not usage.reported and isinstance(obj.get("response"),
                                                                        dict):
            usage, model = usage_from_body(ctx.upstream_api, obj["response"])
        sent = ctx.model
        if model:
            ctx.model = model
        if isinstance(obj, dict) and obj.get("object") == "response" and not usage.reported \
                and obj.get("status") in ("queued", "in_progress"):
            usage = self._background_estimate(ctx)
        if ctx.req.path == EMBEDDINGS_PATH and usage.sides:
            usage.sides |= OUTPUT_SIDE  # (it has none to state)
        if isinstance(obj, dict) and _is_error_body(obj):  # an error sent with a 200 (as
            ctx.outcome = "upstream_error"  # OpenRouter does when a model fails mid-way): no
            ctx.error = redact_secrets(_error_text(obj)[:500]) or "error body"  # answer to
            usage.sides |= INPUT_SIDE | OUTPUT_SIDE  # estimate, bill or cache
        if usage.sides != INPUT_SIDE | OUTPUT_SIDE and (
                usage.reported or self._answers(ctx) or ctx.req.path == EMBEDDINGS_PATH):
            answer = obj.get("response", obj) if isinstance(obj, dict) else None
            self._estimate_sides(ctx, usage, lambda: estimate_tokens(answer_text(
                answer.get("content", answer.get("choices", answer.get("output")))
                if isinstance(answer, dict) and ctx.req.path != EMBEDDINGS_PATH else None)))
        ctx.usage = usage
        ctx.cost = self._cost(ctx, usage, sent)

    def _cost(self, ctx: Context, usage: Usage, sent: str) -> float | None:
        """The answer's cost at the price of the model the provider names; one that names a
        model without a price (a gateway's alias) is priced as the model it was sent for,
        which its budget reservation was made for (it would be null: spend no budget sees)."""
        if sent and sent != ctx.model and self.prices.lookup(ctx.model) is None \
                and self.prices.lookup(sent) is not None:
            return self.prices.cost(sent, usage)
        return self.prices.cost(ctx.model, usage)

    def _answers(self, ctx: Context) -> bool:
        """A call answered now whose usage is recorded (estimated if the provider says none)."""
        return ctx.req.path in ACCOUNTED_PATHS or self._responses_call(ctx) \
            or ctx.req.path == COMPLETIONS_PATH and ctx.req.method == "POST"

    @staticmethod
    def _estimate_sides(ctx: Context, usage: Usage, output) -> None:
        """Estimates what the provider left out: its input from the request, its output (never
        below a count it stated: streamed Anthropic usage states one at the start) by calling
        output()."""
        if not usage.sides & INPUT_SIDE:
            usage.input = estimate_request_tokens(ctx.obj)
        if not usage.sides & OUTPUT_SIDE:
            usage.output = max(usage.output, output())
        usage.estimated = True

    @staticmethod
    def _responses_call(ctx: Context) -> bool:
        """A Responses API call answered now (not one run in the background): its stream ends
        with response.completed, .incomplete or .failed."""
        return ctx.req.path == RESPONSES_PATH and ctx.req.method == "POST" \
            and isinstance(ctx.obj, dict) and ctx.obj.get("background") is not True

    @staticmethod
    def _background(ctx: Context) -> bool:
        """A Responses API call made in the background: it runs on at the provider."""
        return ctx.req.path == RESPONSES_PATH and isinstance(ctx.obj, dict) \
            and ctx.obj.get("background") is True

    def _background_estimate(self, ctx: Context) -> Usage:
        """A Responses API call made in the background answers before its usage exists, and
        its retrievals are not billed (they would bill every poll): it is billed now, at the
        most it can cost (the input estimate and max_output_tokens), marked estimated."""
        usage = Usage()
        obj = ctx.obj if isinstance(ctx.obj, dict) else {}
        usage.input = estimate_request_tokens(obj)
        most = obj.get("max_output_tokens")
        most = most if _is_count(most) else self.cfg.budget.default_max_tokens
        prov = self.router.providers.get(ctx.provider)
        cap = prov.cfg.max_output_tokens if prov is not None else 0
        usage.output = min(most, cap) if cap else most  # (what the provider was asked for)
        usage.estimated = True
        return usage

    def _fail(self, req: Request, conn: ServerConn, ctx: Context, status: int,
              message: str) -> None:
        """An upstream problem found after its head arrived, before anything was sent."""
        ctx.status = status
        ctx.outcome = "upstream_failed"
        ctx.error = message
        conn.send_error(req, ctx.api, status, message,
                        [(b"X-Request-Id", ctx.xid)])

    async def _relay_sse(self, req: Request, conn: ServerConn, ctx: Context, prov: Provider,
                         resp: UpstreamResponse, t_up: float) -> None:
        """Relays events as they arrive, bytes unchanged, one write per upstream read."""
        loop = asyncio.get_running_loop()
        answers = req.path in ACCOUNTED_PATHS or self._responses_call(ctx)  # (one made now)
        meter = StreamMeter(ctx.upstream_api, ctx.drop_usage_chunk and ctx.outcome == "ok",
                            responses=req.path == RESPONSES_PATH)
        translator = None
        if ctx.upstream_api != ctx.api:
            opts = ctx.obj.get("stream_options") if isinstance(ctx.obj, dict) else None
            translator = StreamTranslator(ctx.upstream_api, ctx.api, isinstance(opts, dict)
                                          and opts.get("include_usage") is True,
                                          thinking_asked(ctx.obj))
            translator.estimate = lambda: (estimate_request_tokens(ctx.obj),
                                           meter.estimate_output())
        buffered = resp.chan.buf  # an event came with the head: both leave in one write (an
        ahead = getattr(resp.body, "prefix", b"")  # event end in the buffer, or read ahead,
        conn.start_stream(req, resp.status, self._client_headers(resp.head, ctx),  # means the
                          resp.head.reason,  # first read cannot wait)
                          hold=b"\n\n" in buffered or b"\r\n\r\n" in buffered
                          or b"\n\n" in ahead or b"\r\n\r\n" in ahead)
        splitter = SSESplitter()
        assembler = None  # the whole answer, for the response cache (before PII restore)
        if (ctx.notes.get("cache") or ctx.notes.get("heartbeat")) and resp.status == 200:
            assembler = StreamAssembler(ctx.api, self.cfg.cache.max_entry_bytes)
        passthrough = translator is None and not ctx.hooks  # events go out as they came
        droppable = meter.drop_usage_chunk  # except an OpenAI usage chunk tokenman asked for
        body = resp.body
        read_timeout = self.cfg.resilience.stream_idle_timeout
        stream_timeout = self.cfg.server.stream_timeout
        end = loop.time() + stream_timeout if stream_timeout else None
        failure = ""
        cancelled = False
        try:
            while True:
                deadline = loop.time() + read_timeout
                if end is not None and end < deadline:
                    deadline = end
                data = await body.read(deadline)
                if not data:
                    break
                events = splitter.feed(data)
                if passthrough:  # nothing rewrites events: send first, count after
                    out = events
                    early = {id(e) for e in events if type(e) is not RawPiece
                             and meter.has_usage(e)} if droppable else ()
                    if early:  # a usage chunk is counted (and maybe dropped) before sending
                        out = [e for e in events if id(e) not in early or meter.on_event(e)]
                else:
                    out = []
                    for event in events:
                        if type(event) is RawPiece:
                            if translator is None:
                                out.append(event)
                            if assembler is not None:
                                assembler.failed = True  # (an event too large to hold)
                            continue
                        if assembler is not None and translator is None:
                            assembler.feed(event)  # (a usage chunk tokenman drops too)
                        if meter.on_event(event) or translator is not None:
                            if translator is not None:
                                event = translator.feed(event)
                                if not event:
                                    continue
                                if assembler is not None:
                                    assembler.feed_all(event)
                                if ctx.hooks:  # (one upstream event may make several)
                                    out += self._hooked(ctx, event)
                                    continue
                            out.append(ctx.pipeline.stream_event(ctx, event) if ctx.hooks
                                       else event)
                if out:
                    if droppable:  # the client did not ask for usage: no "usage": null either
                        out = [e if type(e) is RawPiece else strip_null_usage(e) for e in out]
                    conn.stream_write(out[0] if len(out) == 1 else b"".join(out))
                    if ctx.ttfb is None:
                        ctx.ttfb = time.perf_counter()
                        ctx.upstream_s = ctx.ttfb - t_up  # the upstream's share of the TTFB
                conn.release_head()  # (no complete event in the first bytes: head alone)
                if passthrough:
                    for event in events:
                        if type(event) is not RawPiece and id(event) not in early:
                            meter.on_event(event)
                    if assembler is not None:
                        for event in events:
                            if type(event) is RawPiece:
                                assembler.failed = True
                            else:
                                assembler.feed(event)
                if out and conn.chan._write_paused:
                    await conn.drain()
            rest = splitter.flush()  # (an event without its blank line: the stream ended)
            if rest and assembler is not None and translator is None:
                assembler.feed(rest)
            if rest and meter.on_event(rest) and translator is None \
                    and (meter.complete or not answers):
                conn.stream_write(rest)  # (a cut one is not sent: glued to the error event
                # below it would break the client's parser before it read the error)
        except TimeoutError:
            failure = "stream_timeout reached" if end is not None and loop.time() >= end \
                else "upstream stream idle too long (stream_idle_timeout)"
        except (ConnectionGone, ValueError, OSError, HeadTooLarge) as exc:
            failure = "upstream stream broken" if not isinstance(exc, ValueError) \
                else f"upstream stream malformed: {exc}"
        except asyncio.CancelledError:  # tokenman stopping: the client gets the error event,
            failure, cancelled = SHUTDOWN_CUT, True  # the row what the stream used
        if body.done:
            resp.release()
        if meter.complete:  # the answer ended (message_stop / [DONE]); what follows is framing
            failure = ""
        empty = not meter.events and not splitter.oversized  # no bytes, or only pings
        if meter.responses and splitter.oversized:  # a response.completed over SSE_MAX_EVENT
            answers = False  # (an image's base64) passes unread: its end cannot be told
        if not meter.complete and not failure and answers \
                and 200 <= resp.status < 300 and not conn.lost:
            if empty:
                failure = "upstream answered with an empty stream"
            elif not meter.ended and not meter.error:  # (an error event ends it as it is)
                failure = "upstream stream ended before the answer did"
        if translator is not None and not failure and not meter.error and not conn.lost:
            closing = translator.finish()  # (nothing when already finished; after an error
            # event no made-up ending: the client's SDK would take the answer as whole)
            if assembler is not None:
                assembler.feed_all(closing)
            conn.stream_write(b"".join(self._hooked(ctx, closing)) if ctx.hooks and closing
                              else closing)
        if conn.lost and not meter.complete:
            if meter.error:  # the provider's error reached the client, whose SDK hung up on it
                ctx.outcome = "upstream_error"
                ctx.error = meter.error
            else:
                ctx.outcome = "client_closed"
                ctx.error = "client disconnected mid-stream"
        elif failure:
            ctx.outcome = "upstream_failed"
            ctx.error = failure
            conn.stream_write(self._stream_error_event(ctx.api, failure,
                                                       meter.sequence if meter.responses
                                                       else None))
            conn.close_after = True
        if not conn.lost:
            conn.end_stream()
        if meter.error and ctx.outcome == "ok":
            ctx.outcome = "upstream_error"
            ctx.error = meter.error
        if meter.error_status and req.method == "POST":  # (for the breaker and the panel: a
            ctx.notes["stream_error_status"] = meter.error_status  # stored failure fetched
            # again says nothing of the provider now)
        if meter.events > meter.errors or self._background(ctx):
            self._account_stream(ctx, meter)  # (an answer that never came, or came as an
            # error alone, is not charged, unless it goes on at the provider without the client)
        if assembler is not None and ctx.outcome == "ok" and meter.complete:
            if translator is not None and ctx.api == API_OPENAI and assembler.usage is None:
                assembler.usage = translator.openai_usage()  # (the client did not ask for it)
            whole = assembler.body()
            if whole is not None:  # the response cache keeps it as a JSON answer
                ctx.upstream_body = whole
                ctx.notes["cache_headers"] = [(b"Content-Type", b"application/json")] + [
                    (n, v) for n, v in resp.head.headers.raw
                    if n.lower() in _CACHED_HEADERS and n.lower() != b"content-type"]
        if cancelled:
            raise asyncio.CancelledError

    @staticmethod
    def _hooked(ctx: Context, events: bytes) -> list[bytes]:
        """Translated events (one upstream event may make several) through the stages' stream
        hooks one by one: a placeholder restored in each, text held back flushed at a block's
        end."""
        return [ctx.pipeline.stream_event(ctx, e + b"\n\n") for e in events.split(b"\n\n") if e]

    def _stream_error_event(self, api: str, message: str, sequence: int | None = None) -> bytes:
        """The provider's own way to end a stream with an error; a Responses API stream gets
        its `error` event (sequence: the number of the last event relayed)."""
        if sequence is not None:
            return b"event: error\ndata: " + json_dumps({
                "type": "error", "code": "server_error", "message": message, "param": None,
                "sequence_number": sequence + 1}) + b"\n\n"
        if api == API_ANTHROPIC:
            return b"event: error\ndata: " + native_error(api, 502, message) + b"\n\n"
        return b"data: " + native_error(api, 502, message) + b"\n\n"

    def _account_stream(self, ctx: Context, meter: StreamMeter) -> None:
        usage = meter.usage
        sent = ctx.model
        if meter.model:
            ctx.model = meter.model
        if not self._billable(ctx):  # a streamed retrieval (GET /v1/responses/{id}?stream=)
            return  # shows usage billed when the answer was made
        if not usage.reported and self._background(ctx):  # left before it ended: it goes on
            usage = self._background_estimate(ctx)  # (and is billed) at the provider
        if usage.reported or self._answers(ctx):
            if usage.sides != INPUT_SIDE | OUTPUT_SIDE:
                self._estimate_sides(ctx, usage, meter.estimate_output)
            elif ctx.outcome != "ok" and not meter.complete:
                guess = meter.estimate_output()
                if guess > usage.output:  # generated before the cut, not yet reported
                    usage.output = guess
                    usage.estimated = True
        ctx.usage = usage
        ctx.cost = self._cost(ctx, usage, sent)

    async def _relay_raw(self, req: Request, conn: ServerConn, ctx: Context, prov: Provider,
                         resp: UpstreamResponse) -> None:
        """Any other body (files, audio, HTML errors) passes through as it arrives."""
        loop = asyncio.get_running_loop()
        conn.start_stream(req, resp.status, self._client_headers(resp.head, ctx),
                          resp.head.reason, length=resp.body.remaining
                          if resp.body.mode == "length" else None)  # (the provider's length:
        try:  # a client can show progress; a cut is still told, the connection closing)
            while True:
                data = await resp.body.read(loop.time() + prov.cfg.timeout)
                if not data:
                    break
                conn.stream_write(data)
                if ctx.ttfb is None:
                    ctx.ttfb = time.perf_counter()
                if conn.chan._write_paused:
                    await conn.drain()
            resp.release()
        except (TimeoutError, ConnectionGone, ValueError, OSError, HeadTooLarge) as exc:
            ctx.outcome = "client_closed" if conn.lost else "upstream_failed"
            ctx.error = f"relay stopped: {type(exc).__name__}"
            conn.close_after = True
            return
        conn.end_stream()


_REQUESTS_KEY = ("tokenman_requests_total", ())
_TOKENS_IN_KEY = ("tokenman_tokens_in_total", ())
_TOKENS_OUT_KEY = ("tokenman_tokens_out_total", ())
_TOKENS_SAVED_KEY = ("tokenman_tokens_saved_total", ())
_CACHE_HITS_KEY = ("tokenman_cache_hits_total", ())
_CACHE_MISSES_KEY = ("tokenman_cache_misses_total", ())
_NO_SAVINGS = (0.0,) * len(SAVING_SOURCES)


class RequestLog:
    """One row and one set of metrics per request: savings by source, counters,
    histograms, the log line. A mixin of Proxy."""

    def _savings(self, ctx: Context) -> tuple[dict[str, float], int]:
        """USD saved by source, from provider usage and prices: cache and heartbeat hits save
        the answer's original cost; prompt-cache reads save (input - read price) net of the
        write premium; compression saves the estimated tokens it removed at the input price."""
        saved = ctx.saved
        u = ctx.usage
        compressed = ctx.notes.get("compressed_tokens", 0) if ctx.outcome == "ok" else 0
        if u.cache_read or u.cache_write_5m or u.cache_write_1h or compressed:
            saved = dict(saved)
            price = self.prices.lookup(ctx.model)
            if price is not None:
                if u.cache_read or u.cache_write:
                    saved["prompt_cache"] = (
                        u.cache_read * (price.input - price.cache_read)
                        - u.cache_write_5m * (price.cache_write_5m - price.input)
                        - u.cache_write_1h * (price.cache_write_1h - price.input)) / 1_000_000
                if compressed:  # (at what this request's input cost per token: removed
                    # tokens a prompt cache would have read were worth a tenth of the input
                    # price, not all of it)
                    tokens = u.input + u.cache_read + u.cache_write
                    rate = (u.input * price.input + u.cache_read * price.cache_read
                            + u.cache_write_5m * price.cache_write_5m
                            + u.cache_write_1h * price.cache_write_1h) / tokens \
                        if tokens else price.input
                    saved["compression"] = compressed * rate / 1_000_000 \
                        - ctx.notes.get("summary_cost", 0.0)
        return saved, compressed

    def _labels(self, provider: str, model: str, project: str, streaming: bool) -> tuple:
        """The label tuples and the duration histogram of one (provider, model, project,
        streaming), looked up once."""
        key = (provider, model, project, streaming)
        labels = self._label_memo.get(key)
        if labels is None:
            kinds = tuple((("kind", k), ("model", model), ("provider", provider))
                          for k in ("input", "output", "cache_read", "cache_write"))
            labels = (kinds, (("model", model), ("project", project), ("provider", provider)),
                      self.metrics.histogram("tokenman_request_duration_seconds", (
                          ("model", model), ("provider", provider),
                          ("streaming", "true" if streaming else "false")), REQUEST_BUCKETS))
            if len(self._label_memo) < 4096:
                self._label_memo[key] = labels
        return labels

    def _count(self, ctx: Context, seconds: float, saved: dict, compressed: int) -> None:
        m = self.metrics
        values = m.values
        get = values.get
        u = ctx.usage
        provider = ctx.provider
        outcome = ctx.outcome
        kinds, cost_labels, duration = self._labels(
            provider, m.model(ctx.model, outcome == "ok" or outcome in HIT_OUTCOMES),
            m.project(ctx.project), ctx.streaming)
        for key, value in ((_REQUESTS_KEY, 1),
                           (_TOKENS_IN_KEY, u.input + u.cache_read + u.cache_write),
                           (_TOKENS_OUT_KEY, u.output),
                           (_TOKENS_SAVED_KEY, ctx.tokens_saved + compressed),
                           (_CACHE_HITS_KEY if outcome in HIT_OUTCOMES else _CACHE_MISSES_KEY,
                            1 if outcome in HIT_OUTCOMES or "cache" in ctx.notes
                            or "heartbeat" in ctx.notes else 0),  # (a miss: the cache looked)
                           (("tokenman_cost_usd_total", cost_labels), ctx.cost or 0.0)):
            values[key] = get(key, 0.0) + value
        for labels, count in zip(kinds, (u.input, u.output, u.cache_read, u.cache_write)):
            if count:
                key = ("tokenman_tokens_total", labels)
                values[key] = get(key, 0.0) + count
        for source, usd in saved.items():  # counters only go up: a net loss (a prompt-cache
            if usd > 0:  # write premium, a summary call's cost) has a counter of its own
                m.inc("tokenman_savings_usd_total", (("source", source),), usd)
            elif usd < 0:
                m.inc("tokenman_savings_cost_usd_total", (("source", source),), -usd)
        if outcome != "ok" and outcome not in HIT_OUTCOMES:
            kind = _ERROR_TYPES.get(outcome) or ctx.notes.get("refused_by") or (
                "parse" if ctx.status in _PARSE_STATUSES else "rejected")
            m.inc("tokenman_errors_total", (("provider", provider),
                                            ("status_code", str(ctx.status)), ("type", kind)))
        if ctx.status != 101:  # (a WebSocket session: its length is no request's latency)
            if outcome == "ok" and provider and provider != "cache":
                live = self._live(provider)  # (its attempts are counted as they are made)
                ms = seconds * 1000
                old = live.get("latency_ms")
                live["latency_ms"] = round(ms if old is None else old * 0.9 + ms * 0.1, 3)
            duration.observe(seconds)
        stage_hists = self._stage_hists
        for stage, secs in ctx.timings.items():
            hist = stage_hists.get(stage)
            if hist is None:
                name, _, phase = stage.partition(".")
                hist = stage_hists[stage] = m.histogram(
                    "tokenman_middleware_duration_seconds",
                    (("middleware", name), ("phase", phase or "request")), STAGE_BUCKETS)
            hist.observe(secs)

    def _live(self, provider: str) -> dict:
        live = self.provider_stats.get(provider)
        if live is None:
            live = self.provider_stats[provider] = {"requests": 0, "errors": 0}
        return live

    def note_attempt(self, provider: str, error: str = "") -> None:
        """/api/providers: one request sent to a provider, and what went wrong with it (a
        connection or timeout error, a 429 or 5xx), whether or not a retry or fallback saved
        the request; requests refused before they left are not counted."""
        live = self._live(provider)
        live["requests"] += 1
        if error:
            self.note_failure(provider, error)

    def note_failure(self, provider: str, error: str) -> None:
        live = self._live(provider)
        live["errors"] += 1
        live["last_error"] = redact_secrets(error)[:200]  # (a provider may echo a key)

    def _finish(self, ctx: Context) -> None:
        req = ctx.req
        now = time.perf_counter()
        latency = (now - req.t0) * 1000
        ttfb = (ctx.ttfb - req.t0) * 1000 if ctx.ttfb is not None else None
        if ctx.streaming:  # streams: tokenman's share of the time to the first event
            overhead = None if ttfb is None else max(0.0, ttfb - ctx.upstream_s * 1000)
        else:
            overhead = max(0.0, latency - ctx.upstream_s * 1000)
        u = ctx.usage
        saved, compressed = self._savings(ctx)
        store_body = self.cfg.server.store_body
        self.store.record((
            ctx.id, self._stamp(ctx.wall), req.method, req.path, ctx.api, ctx.model,
            ctx.provider, ctx.project, ctx.status, ctx.outcome, int(ctx.streaming),
            round(latency, 3), None if ttfb is None else round(ttfb, 3),
            None if overhead is None else round(overhead, 3),
            u.input, u.output, u.cache_read, u.cache_write, u.cache_write_5m, u.cache_write_1h,
            u.reasoning, ctx.cost, int(u.estimated), ctx.error, ctx.upstream_request_id,
            req.body[:STORED_BODY_MAX].decode("utf-8", "replace") if store_body else None,
            ctx.response_body[:STORED_BODY_MAX].decode("utf-8", "replace")
            if store_body and ctx.response_body is not None else None,
            ctx.attempts, ctx.client_id, int(ctx.cache_hit), ctx.tokens_saved + compressed,
            round(sum(saved.values()), 10) if saved else 0.0, ctx.pipeline_ms,
            *(tuple(round(saved.get(source, 0.0), 10) for source in SAVING_SOURCES) if saved
              else _NO_SAVINGS), compressed,
        ))
        self._count(ctx, latency / 1000, saved, compressed)
        if self.plugins:
            self._hook("request_complete" if ctx.outcome in ("ok",) + HIT_OUTCOMES
                       else "request_error", ctx)
        if ctx.trace is not None:
            ctx.trace.attrs.update({
                "http.request.method": req.method, "url.path": req.path,
                "http.response.status_code": ctx.status, "request.id": ctx.id,
                "request.model": ctx.model, "request.format": ctx.api,
                "request.stream": ctx.streaming, "response.provider": ctx.provider,
                "response.outcome": ctx.outcome, "response.tokens_in": u.input + u.cache_read
                + u.cache_write, "response.tokens_out": u.output,
                "response.cost_usd": ctx.cost, "response.cache_hit": ctx.cache_hit})
            self.tracer.finish(ctx.trace, f"{req.method} {req.path}", now,
                               ctx.status >= 500 or ctx.outcome == "upstream_failed")
        log = self.log
        if log.level <= 20:
            log.info("request", id=ctx.id, method=req.method, path=req.path, model=ctx.model,
                     provider=ctx.provider, status=ctx.status, outcome=ctx.outcome,
                     ms=round(latency, 1), tokens_in=u.input + u.cache_read + u.cache_write,
                     tokens_out=u.output,
                     cost="" if ctx.cost is None else f"{ctx.cost:.6f}",
                     error=ctx.error)


class Proxy(ResponseRelay, RequestLog):
    """Answers every request on the proxy port."""

    def __init__(self, cfg: Config, router: Router, pool: UpstreamPool, store: Store,
                 prices: PriceTable, log: Logger, breakers: dict | None = None,
                 pipeline: Pipeline | None = None, metrics: Metrics | None = None,
                 tracer: "Tracer | None" = None) -> None:
        self.cfg = cfg
        self.tracer = tracer
        self.router = router
        self.pipeline = pipeline or Pipeline([], log)
        self.metrics = metrics or Metrics()
        for key in (_REQUESTS_KEY, _TOKENS_IN_KEY, _TOKENS_OUT_KEY, _TOKENS_SAVED_KEY,
                    _CACHE_HITS_KEY, _CACHE_MISSES_KEY):  # counters without labels start at 0
            self.metrics.values.setdefault(key, 0.0)
        self.pool = pool
        self.breakers = breakers if breakers is not None else {}
        self.dispatcher = Dispatcher(cfg, pool, self.breakers, log, metrics=self.metrics)
        self.store = store
        self.prices = prices
        self.log = log
        self.in_flight = 0
        self.provider_stats: dict[str, dict] = {}  # live per-provider view for the dashboard
        self._label_memo: dict[tuple, tuple] = {}
        self._stage_hists: dict[str, Histogram] = {}  # stage name -> its duration series
        self._stamp = IsoStamps()
        self.plugins: list[Plugin] = []
        self.auth_token = auth_token(cfg)
        self.guard = BrowserGuard(cfg.server.bind_address, cfg.server.allowed_hosts,
                                  cfg.server.allowed_origins)
        self.metrics.seen(cfg.budget.projects)

    def reconfigure(self, cfg: Config, router: Router, prices: PriceTable,
                    pipeline: Pipeline, token: str | None = None) -> None:
        """A reload: new requests use the new snapshot, requests in flight keep theirs.
        `token`: tokenman's own, as auth_token() read it (None: read it now)."""
        self.cfg = cfg
        self.router = router
        self.prices = prices
        self.pipeline = pipeline
        self.dispatcher = Dispatcher(cfg, self.pool, self.breakers, self.log,
                                     metrics=self.metrics)
        self.auth_token = auth_token(cfg) if token is None else token
        self.guard = BrowserGuard(cfg.server.bind_address, cfg.server.allowed_hosts,
                                  cfg.server.allowed_origins)
        self.metrics.seen(cfg.budget.projects)

    def screen(self, req: Request) -> HTTPError | None:
        """Refuses, from its head alone (its body is not read), a request from a web page
        (BrowserGuard), without tokenman's token when auth is on, or with a method or path no
        provider API has. Logged and counted like any refused request."""
        refused = self.guard.refusal(req.headers)
        if refused:
            return HTTPError(403, refused, close=True)
        if not req.path.startswith("/v1/"):
            return None
        if self.auth_token:
            denied = check_token(req.headers, self.auth_token)
            if denied:
                return HTTPError(denied, "authentication required" if denied == 401 else
                                 "invalid token (tokenman's token goes in X-Tokenman-Token, or "
                                 "in Authorization when no key of your own is sent there)",
                                 close=True, headers=(
                                     ((b"WWW-Authenticate", b"Bearer"),) if denied == 401
                                     else ()))
        if req.method not in HTTP_METHODS:
            return HTTPError(501, f"method {req.method[:20]!r} is not supported", close=True)
        if _PATH_ESCAPE_RE.search(req.path) or "%" in req.path and _ESCAPED_SLASH.search(
                req.path) and not req.path.startswith("/v1/models/"):  # (a model id's is
            return HTTPError(400, "request path has dot segments or escaped slashes or dots",
                             close=True)  # its own; elsewhere an escaped slash may be read as
        return None  # a path tokenman did not meter: /v1/chat%2Fcompletions)

    async def handle(self, req: Request, conn: ServerConn) -> None:
        path = req.path
        if path.startswith("/v1/"):
            self.in_flight += 1
            try:
                await self.relay(req, conn)
            finally:
                self.in_flight -= 1
        elif path == "/health" and req.method in ("GET", "HEAD"):
            self._json(req, conn, 200, {"status": "ok"})
        elif path == "/health/ready" and req.method in ("GET", "HEAD"):
            await self.ready(req, conn)
        else:
            conn.send_error(req, api_for(path, req.headers), 404,
                            f"no route for {req.method} {path[:200]}")

    def _json(self, req: Request, conn: ServerConn, status: int, obj: object) -> None:
        conn.send(req, status, [(b"Content-Type", b"application/json")], json_dumps(obj))

    async def ready(self, req: Request, conn: ServerConn) -> None:
        db_error = await asyncio.to_thread(self.store.ping)
        checks = [{"name": "database", "status": "fail" if db_error else "ok"},
                  {"name": "providers", "status": "ok" if self.router.usable_count() else "fail"}]
        if db_error:
            checks[0]["error"] = db_error
        elif self.store.backlog:  # (requests are served: ready, but the rows wait)
            checks[0].update(backlog=self.store.backlog, error=self.store.last_error)
        if not self.router.usable_count():
            checks[1]["error"] = "no usable provider (check enabled and key_ref)"
        ok = all(c["status"] == "ok" for c in checks)
        self._json(req, conn, 200 if ok else 503,
                   {"status": "ready" if ok else "not_ready", "checks": checks})

    def _hook(self, name: str, ctx: Context) -> None:
        for plugin in self.plugins:
            hook = plugin.hooks.get(name)
            if hook is not None:
                try:
                    hook(ctx)
                except Exception as exc:  # a plugin hook never fails a request
                    self.log.error("plugin hook failed", plugin=plugin.name, hook=name,
                                   error=f"{type(exc).__name__}: {exc}")

    def rejected(self, req: Request, status: int, detail: str) -> list[tuple[bytes, bytes]]:
        """Logs an API request the HTTP layer refused (body too large, bad framing, too slow);
        returns the X-Request-Id of its row for the answer."""
        ctx = Context(req, api_for(req.path, req.headers))
        if req.path.startswith("/v1/"):
            ctx.status = status
            ctx.outcome = "rejected"
            ctx.error = detail
            self._finish(ctx)
        return [(b"X-Request-Id", ctx.xid)]

    # -- the relay ------------------------------------------------------------------------------
    async def relay(self, req: Request, conn: ServerConn) -> None:
        ctx = Context(req, api_for(req.path, req.headers))
        ctx.pipeline = self.pipeline  # a reload swaps self.pipeline; this request keeps its own
        ctx.pipeline.users += 1
        if self.tracer is not None:
            ctx.trace = self.tracer.start(req)
        if self.plugins:
            self._hook("request_start", ctx)
        try:
            if b"content-encoding" in req.headers.map:
                await self._decode_body(req)
            pairs = self._prepare(req, ctx)
            reply = None
            if ctx.obj is not None and req.path in ACCOUNTED_PATHS:
                reply = await ctx.pipeline.request(ctx)
            elif isinstance(ctx.obj, dict):  # a pass-through call (any method with a body)
                reply = await ctx.pipeline.request(ctx, side_call=True)
            if reply is None and req.path.startswith((RESPONSES_PATH + "/",
                                                      "/v1/conversations/")) \
                    and "pii" not in ctx.notes:  # a stored response fetched, cancelled...
                pii = ctx.pipeline.stage("pii")
                if pii is not None:
                    pii.retrieval(ctx)
            if reply is None and req.path not in ACCOUNTED_PATHS:
                pairs, reply = self._passthrough_plan(req, ctx, pairs)
            if reply is not None:
                self._answer(req, conn, ctx, reply)
            elif is_websocket(req):
                await self._tunnel(req, conn, ctx, pairs[0][0])
            else:
                await self._forward(req, conn, ctx, self._bodies(req, ctx, pairs))
        except HTTPError as exc:
            ctx.status = exc.status
            ctx.outcome = "rejected"
            ctx.error = exc.detail
            if not conn.lost:
                conn.send_error(req, ctx.api, exc.status, exc.detail,
                                [(b"X-Request-Id", ctx.xid)], exc.kind)
        except asyncio.CancelledError:  # tokenman stopping: shutdown_timeout reached (a
            if not conn.started and ctx.outcome == "ok":  # stream ends itself, recorded)
                ctx.outcome, ctx.error, ctx.status = "upstream_failed", SHUTDOWN_CUT, 503
                if not conn.lost:
                    conn.send_error(req, ctx.api, 503, SHUTDOWN_CUT, [(b"X-Request-Id", ctx.xid)])
            raise
        except Exception as exc:  # a bug: contained, answered, logged with context, counted
            ctx.outcome = "internal_error"
            ctx.error = f"{type(exc).__name__}: {exc}"
            self.log.error("request failed inside tokenman", id=ctx.id, path=req.path,
                           error=ctx.error)
            if conn.started and not conn.held:
                conn.close_after = True
                conn.chan.abort()
            elif not conn.lost:  # nothing went out yet (a held stream head is dropped)
                conn.held = b""
                ctx.status = 500
                conn.send_error(req, ctx.api, 500, "internal error in tokenman",
                                [(b"X-Request-Id", ctx.xid)])
        finally:  # (cancelled too: the row is written, a reservation released)
            if "summary_cost" in ctx.notes:  # tokenman's own call made for this request is
                ctx.cost = (ctx.cost or 0.0) + ctx.notes["summary_cost"]  # billed with it
            ctx.pipeline.finish(ctx)
            ctx.pipeline.leave()
            self._finish(ctx)

    async def _tunnel(self, req: Request, conn: ServerConn, ctx: Context,
                      prov: Provider) -> None:
        """A WebSocket (the Realtime API) to the provider: the upgrade request is sent with its
        key (as any call's), and once the provider switches protocols, bytes pass both ways
        as they come until either side closes. Its frames are not read: no usage is recorded.
        An answer other than 101 (a refusal) is relayed as any answer."""
        ctx.provider = prov.key
        headers = self.upstream_headers(req, prov, ctx) + [
            (b"Connection", b"Upgrade"), (b"Upgrade", req.headers.map[b"upgrade"])]
        try:
            resp = await self.pool.request(prov.origin, "GET", prov.origin.target(req.target),
                                           headers, b"", prov.cfg.connect_timeout,
                                           prov.cfg.timeout, watch=conn.chan, upgrade=True)
        except UpstreamError as exc:
            return self._fail(req, conn, ctx, 504 if exc.timeout and not exc.connect else 502,
                              f"upstream unavailable: {exc}")
        except ConnectionGone:
            ctx.outcome, ctx.error = "client_closed", "client left before the upgrade"
            return
        finally:
            conn.chan.on_lost = None  # (the client's end no longer aborts the provider's)
        ctx.status = resp.status
        conn.close_after = True  # (refused too: what the client sends next is not HTTP)
        if resp.status != 101:
            await self._relay_raw(req, conn, ctx, prov, resp)
            if resp.status >= 400 and ctx.outcome == "ok":
                ctx.outcome = "upstream_error"
                ctx.error = f"upgrade refused ({resp.status})"
            return
        conn.started = True
        conn.chan.write(render_head(101, self._client_headers(resp.head, ctx) + [
            (b"Connection", b"Upgrade"), (b"Upgrade", resp.head.headers.map.get(
                b"upgrade", req.headers.map[b"upgrade"]))], resp.head.reason))
        ctx.ttfb = time.perf_counter()
        up = resp.chan
        stall = self.cfg.server.write_timeout
        ends = [asyncio.ensure_future(_pipe(conn.chan, up, stall)),
                asyncio.ensure_future(_pipe(up, conn.chan, stall))]
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            for task, side, outcome in ((ends[1], "client", "client_closed"),
                                        (ends[0], "provider", "upstream_failed")):
                if task.done() and not task.cancelled() \
                        and isinstance(task.exception(), TimeoutError):
                    ctx.outcome = outcome
                    ctx.error = f"the {side} took nothing for write_timeout: session ended"
        finally:
            for task in ends:
                task.cancel()
            ctx.upstream_s = time.perf_counter() - ctx.ttfb  # (the session: not overhead)
            if ends[0].done() and not ends[0].cancelled() and ends[0].exception() is None:
                up.close()  # the client ended: what it sent last (a Close frame) still goes,
                asyncio.get_running_loop().call_later(CLOSE_FLUSH_SECONDS, up.abort)  # bounded
            else:
                up.abort()  # (never pooled; the client's connection closes after this answer)

    async def _decode_body(self, req: Request) -> None:
        """A compressed POST body is decoded here, in a worker thread (~1.5 ms per MiB of
        output), so the stages read it, and forwarded decoded; the chat paths and count_tokens
        refuse a coding other than gzip and deflate (415)."""
        coding = req.headers.map[b"content-encoding"]
        if req.method != "POST" or coding.strip().lower() == b"identity":
            return
        read = req.path in ACCOUNTED_PATHS or req.path in SIDE_CALL_PATHS
        if not read and any(c.strip().lower() not in INFLATABLE | {b"identity", b""}
                            for c in coding.split(b",")):
            return  # another coding on a pass-through path goes as it came (not screened)
        try:
            req.body = await asyncio.to_thread(decode_content, coding, req.body,
                                               self.cfg.server.max_body_size or DECODED_BODY_MAX)
        except HTTPError:
            ctype = req.headers.map.get(b"content-type", b"application/json").lower()
            if read or self.cfg.pii.enabled and ctype.startswith(b"application/json"):
                raise  # (the stages could not read it: it is not sent unscreened)
            return  # another pass-through body too large or not what it says goes as it came
        req.headers = Headers([(n, v) for n, v in req.headers.raw
                               if n.lower() != b"content-encoding"])

    def _passthrough_plan(self, req: Request, ctx: Context, pairs: list[tuple[Provider, str]]
                          ) -> tuple[list[tuple[Provider, str]], Reply | None]:
        """A path tokenman does not translate only goes to providers of its own API format:
        never the client's key and conversation to a provider of the other format because a
        model_map (or a cross-format fallback) sends the model there. When the model itself is
        routed to the other format, count_tokens is answered with tokenman's estimate (Claude
        Code on a local model keeps working) and anything else is refused."""
        same = [(p, m) for p, m in pairs if p.cfg.format == ctx.api]
        if pairs[0][0].cfg.format == ctx.api:
            return same, None
        ctx.provider = ""
        if req.method == "POST" and req.path == ANTHROPIC_PATH + "/count_tokens" \
                and isinstance(ctx.obj, dict):
            return same, Reply(200, [(b"Content-Type", b"application/json"),
                                     (b"X-Tokenman-Estimate", b"true")],
                               json_dumps({"input_tokens": request_estimate(ctx)}),
                               outcome="ok")
        raise HTTPError(404, f"model {ctx.model!r} is routed to a {pairs[0][0].cfg.format} "
                             f"provider, which has no equivalent of {req.path}")

    def _answer(self, req: Request, conn: ServerConn, ctx: Context, reply: Reply) -> None:
        """Sends a stage's answer: a refusal, or a cached answer (as SSE for a stream)."""
        ctx.status = reply.status
        ctx.outcome = reply.outcome
        headers = reply.headers + ctx.headers_out + [(b"X-Request-Id", ctx.xid)]
        body = reply.body
        if reply.outcome == "rejected":
            ctx.error = _error_text(_loads(body)) or "rejected by policy"
        if ctx.hooks:
            body = ctx.pipeline.response(ctx, body)
        if reply.outcome in HIT_OUTCOMES:
            ctx.provider = "cache"
            ctx.cost = 0.0
            headers += [(b"X-Tokenman-Cost-Usd", b"0.00000000"), (b"X-Tokenman-Overhead-Ms",
                         b"%.3f" % ((time.perf_counter() - req.t0) * 1000))]
        if reply.outcome in HIT_OUTCOMES and ctx.streaming:
            events = synthesize_sse(ctx.api, body, include_usage=not ctx.drop_usage_chunk)
            headers = [(n, v) for n, v in headers if n.lower() != b"content-type"]
            conn.start_stream(req, reply.status, headers + [
                (b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache")])
            conn.stream_write(b"".join(events))
            conn.end_stream()
        else:
            conn.send(req, reply.status, headers, body)
        ctx.ttfb = time.perf_counter()

    def _bodies(self, req: Request, ctx: Context,
                pairs: list[tuple[Provider, str]]) -> list[tuple[Provider, str, bytes]]:
        """The upstream body for each step of the plan: the client's bytes, patched only where
        tokenman changed something (top-level members named in ctx.changes, or the model)."""
        body = json_patch(req.body, ctx.changes, ctx.layout) if ctx.changes else req.body
        plan = []  # (each step's own changes patched into the client's bytes in one pass)
        for prov, model in pairs:
            cap = prov.cfg.max_output_tokens if isinstance(ctx.obj, dict) else 0
            if prov.cfg.format != ctx.api and isinstance(ctx.obj, dict) \
                    and req.path in ACCOUNTED_PATHS:
                plan.append((prov, model, self._translated(ctx, model, prov.cfg.format, cap)))
                continue
            changes = {} if model == ctx.model or ctx.obj is None else {"model": model}
            if cap:
                changes.update(capped_batch(ctx.obj, cap) if req.path == BATCHES_PATH
                               else capped_output(ctx.obj, cap))
            plan.append((prov, model, json_patch(req.body, {**ctx.changes, **changes},
                                                 ctx.layout) if changes else body))
        return plan

    def _translated(self, ctx: Context, model: str, target: str, cap: int = 0) -> bytes:
        """The request rewritten for a provider of the other API format (its output capped)."""
        dropped: list[str] = []
        obj = dict(ctx.obj, model=model)
        if target == API_OPENAI:
            out = anthropic_to_openai_request(obj, dropped)
        else:
            out = openai_to_anthropic_request(obj, dropped,
                                              self.cfg.budget.default_max_tokens)
            if ctx.pipeline.hints is not None:
                ctx.pipeline.hints.translated(out, model, ctx)
        for key, value in (capped_output(out, cap) if cap else {}).items():
            if value is REMOVE:  # (thinking, which no longer fits: the sampling settings it
                out.pop(key)  # made translation drop come back)
                dropped.append(key)
                out.update({k: obj[k] for k in ("temperature", "top_p") if k in obj})
            else:
                out[key] = value
        if dropped:
            self.log.debug("fields without a counterpart dropped in translation", id=ctx.id,
                           fields=",".join(sorted(set(dropped))))
        return json_dumps(out)

    def _prepare(self, req: Request, ctx: Context) -> list[tuple[Provider, str]]:
        """Parses what routing and accounting need; returns the (provider, model) plan."""
        body = req.body
        accounted = req.method == "POST" and req.path in ACCOUNTED_PATHS
        checked = accounted or req.method == "POST" and req.path in SIDE_CALL_PATHS
        metered = accounted or req.method == "POST" and req.path == COMPLETIONS_PATH
        obj = None
        if checked or body[:1] == b"{" or body and _JSON_OBJECT_START.match(body):
            # (a JSON object, whatever the method or the blanks before it: the stages read
            # what the provider reads, and a body they cannot read is not sent unscreened)
            if body[:3] == b"\xef\xbb\xbf":  # a UTF-8 BOM: not forwarded
                body = req.body = body[3:]
            try:  # UTF-8 only (RFC 8259 8.1): json.loads would also take UTF-16 and -32
                if len(body) < LAYOUT_MIN_BODY:
                    obj = _REQUEST_JSON.decode(body.decode("utf-8"))
                else:
                    obj, ctx.layout = parse_with_layout(body.decode("utf-8"))
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, DuplicateKey too
                raise HTTPError(400, str(exc) if isinstance(exc, DuplicateKey) else
                                "request body is nested too deeply" if isinstance(
                                    exc, RecursionError)
                                else "request body is not valid UTF-8 JSON") from None
            if checked and not isinstance(obj, dict):
                raise HTTPError(400, "request body must be a JSON object")
        if isinstance(obj, dict):
            ctx.obj = obj
            model = obj.get("model")
            ctx.model = model if isinstance(model, str) else ""
            if len(ctx.model) > MODEL_NAME_MAX:
                raise HTTPError(400, f"model is longer than {MODEL_NAME_MAX} characters")
            ctx.streaming = obj.get("stream") is True
            if metered and ctx.api == API_OPENAI and ctx.streaming:  # (usage is asked for)
                opts = obj.get("stream_options")
                if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                    opts = dict(opts) if isinstance(opts, dict) else {}
                    opts["include_usage"] = True
                    ctx.changes["stream_options"] = opts
                    ctx.drop_usage_chunk = True
        elif req.method == "POST" and b"multipart/form-data" in req.headers.map.get(
                b"content-type", b"").lower():  # (an audio transcription names its model
            ctx.model = form_field(body, b"model")[:MODEL_NAME_MAX]  # in a form field: for
            # routing and the row)
        elif req.query and is_websocket(req):  # (a Realtime session, in its query string)
            ctx.model = urllib.parse.parse_qs(req.query).get("model", [""])[0][:MODEL_NAME_MAX]
        routing = self.cfg.routing
        pairs = self.router.plan(ctx.api, ctx.model, routing.fallback_enabled,
                                 routing.fallback_models.get(ctx.model, ()),
                                 routing.cross_format_fallback)
        if not pairs:
            pinned = self.router.pinned(ctx.model)
            broken = [pinned] if pinned is not None and pinned.error else [
                p for p in self.router.providers.values()
                if p.cfg.enabled and p.error and p.cfg.format == ctx.api
                and (not p.cfg.models or p.serves(ctx.model))]
            if broken:  # the provider exists, but its key could not be read
                raise HTTPError(503, f"provider {broken[0].key} is unusable: {broken[0].error}")
            what = f"model {ctx.model!r}" if ctx.model else "this request"
            raise HTTPError(404, f"no configured {ctx.api} provider serves {what}")
        ctx.provider = pairs[0][0].key
        ctx.plan = pairs
        return pairs

    def upstream_headers(self, req: Request, prov: Provider,
                          ctx: Context) -> list[tuple[bytes, bytes]]:
        nominated = req.headers.map.get(b"connection")
        drop = UPSTREAM_DROP
        if nominated:
            drop = drop | {t.strip().lower() for t in nominated.split(b",")}
        replace_auth = bool(prov.api_key)
        cross = prov.cfg.format != ctx.api
        out = []
        has_version = False
        for name, value in req.headers.raw:
            lower = name.lower()
            if lower in drop or lower.startswith(b"x-tokenman-") or lower == b"x-request-id" \
                    or lower == b"accept-encoding":
                continue
            if replace_auth and lower in (b"authorization", b"x-api-key", b"api-key"):
                continue
            if lower == b"authorization" and is_own_token(value, self.auth_token):
                continue  # tokenman's own token never leaves the host
            if cross:  # the other API: its feature headers mean nothing there, and a
                if lower.startswith((b"anthropic-", b"openai-")):  # passed-through key moves
                    continue                                      # to that API's header
                if lower == b"x-api-key" and prov.cfg.format == API_OPENAI:
                    out.append((b"Authorization", b"Bearer " + value))
                    continue
                if lower == b"authorization" and prov.cfg.format == API_ANTHROPIC and \
                        value[:7].lower() == b"bearer ":
                    out.append((b"x-api-key", value[7:].strip()))
                    continue
            if lower == b"anthropic-version":
                has_version = True
            if ctx.trace is not None and lower == b"traceparent":
                continue  # replaced by tokenman's own span below
            out.append((name, value))
        if prov.cfg.format == API_ANTHROPIC:
            if replace_auth:
                out.append((b"x-api-key", prov.api_key.encode("latin-1")))
            if not has_version:
                out.append((b"anthropic-version", b"2023-06-01"))
        elif replace_auth:
            out.append((b"Authorization", b"Bearer " + prov.api_key.encode("latin-1")))
        out.append((b"X-Request-Id", ctx.xid))
        if ctx.trace is not None:
            out.append((b"traceparent", ctx.trace.traceparent(ctx.notes["upstream_span"])))
        # Bodies are read for usage, so ask for them uncompressed.
        out.append((b"Accept-Encoding", b"identity"))
        return out

    def _client_headers(self, head: ResponseHead, ctx: Context) -> list[tuple[bytes, bytes]]:
        nominated = head.headers.map.get(b"connection")
        drop = HOP_BY_HOP
        if nominated:
            drop = drop | {t.strip().lower() for t in nominated.split(b",")}
        out = []
        own_id = True
        for name, value in head.headers.raw:
            lower = name.lower()
            if lower in drop or lower == b"content-length" and ctx.req.method != "HEAD":
                continue  # (a HEAD answer keeps the length its GET would have)
            if lower == b"x-request-id":
                ctx.upstream_request_id = value.decode("latin-1")[:128]
                if ctx.client_id:  # the client's id wins; the provider's stays visible
                    out.append((b"X-Upstream-Request-Id", value))
                    continue
                own_id = False  # the provider's id is what its SDK shows users: keep it
            elif lower == b"request-id":
                ctx.upstream_request_id = value.decode("latin-1")[:128]
            out.append((name, value))
        if own_id:
            out.append((b"X-Request-Id", ctx.xid))
        out += ctx.headers_out
        return out

    async def _forward(self, req: Request, conn: ServerConn, ctx: Context,
                       plan: list[tuple[Provider, str, bytes]]) -> None:
        t_up = time.perf_counter()
        try:
            dispatcher = self.dispatcher  # (a reload may swap it: tickets go back to its breakers)
            sent = await dispatcher.send(self, req, ctx, conn, plan)
        except ConnectionGone:
            ctx.status = 499
            ctx.outcome = "client_closed"
            ctx.error = "client disconnected before the upstream answered"
            return
        if isinstance(sent, Failure):
            ctx.upstream_s = time.perf_counter() - t_up
            return self._answer_failure(req, conn, ctx, sent)
        resp, prov, model, ticket = sent
        ctx.model = model
        ctx.status = resp.status
        if "pii_forget" in ctx.notes and (resp.status != 404 or prov is plan[0][0]):
            ctx.notes["upstream_status"] = resp.status  # (a fallback's 404: it never had it)
        if req.path in ACCOUNTED_PATHS:
            ctx.upstream_api = prov.cfg.format
        if resp.status >= 400:
            ctx.outcome = "upstream_error"
        conn.chan.on_lost = resp.chan.abort
        try:
            if conn.lost:  # (gone while the answer was chosen: nobody to relay it to)
                resp.close()
                ctx.status = 499
                ctx.outcome = "client_closed"
                ctx.error = "client disconnected before the upstream answered"
                return
            kind = relay_kind(req.path in ACCOUNTED_PATHS,
                              resp.head.headers.map.get(b"content-type", b""),
                              is_download(req.path))
            if kind != "raw":
                resp.inflate()  # (usage, placeholders and events are in the plain bytes)
            if kind == "sse":
                ctx.streaming = True
                await self._relay_sse(req, conn, ctx, prov, resp, t_up)
            elif kind == "buffered":  # (the dispatcher may have read it whole: relay_kind)
                await self._relay_buffered(req, conn, ctx, prov, resp, t_up)
            else:
                await self._relay_raw(req, conn, ctx, prov, resp)
        finally:
            conn.chan.on_lost = None
            if not resp.chan.lost and not resp.body.done:
                resp.close()
            # the provider's panel shows what went wrong after its head (a broken stream, a 401
            # for a wrong key, an error event), not a request it refused as malformed; an
            # error event in a 200 stream counts as the status it stands for
            status = ctx.notes.get("stream_error_status") or ctx.status
            # (an error in a stored answer streamed again says nothing of the provider now)
            stored = ctx.outcome == "upstream_error" and ctx.streaming and req.method != "POST"
            if ctx.outcome == "upstream_failed" or ctx.outcome == "upstream_error" \
                    and status not in _CLIENT_FAULTS and not stored:
                self.note_failure(prov.key, f"{ctx.status} {ctx.error}")
            failed = ctx.outcome == "upstream_failed" or not stored and ctx.outcome != \
                "client_closed" and (status >= 500 or status == 429)
            self.metrics.inc("tokenman_provider_requests_total",  # (the attempt that answered,
                             (("provider", prov.key), ("status", "error" if failed  # counted
                                                       else "success")))  # once it ended)
            if failed:  # (it broke after its head, or its error was the last word)
                self.log.warn("upstream attempt failed", id=ctx.id, provider=prov.key,
                              attempt=ctx.attempts, error=f"{status} {ctx.error}"[:300])
            breaker = dispatcher.breakers.get(prov.key)  # (none when they are off)
            if breaker is not None:
                if ctx.outcome == "client_closed" or stored or status == 429 \
                        and ctx.outcome != "upstream_failed" and not prov.cfg.key_ref:
                    breaker.release(ticket)  # (a rate limit on the caller's own key says
                else:  # nothing about the provider, as for a JSON 429 in Dispatcher.send)
                    breaker.record(ticket, ctx.outcome != "upstream_failed" and
                                   status < 500 and status != 429)


# ================================================================================================
# §15 dashboard API: /metrics, the JSON API of the reference, the page, auth and CORS
# ================================================================================================


def mask_config(obj: object, key: str = "") -> object:
    """The config as JSON-ready data, every secret-looking string value masked."""
    if dataclasses.is_dataclass(obj):
        return {f.name: mask_config(getattr(obj, f.name), f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, (dict, types.MappingProxyType)):
        return {k: mask_config(v, k) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [mask_config(v, key) for v in obj]
    if isinstance(obj, str) and obj and any(s in key.lower() for s in ("key", "secret", "token")):
        return "****"
    return obj


_PAGE_LIMIT = 500


def request_detail(row: sqlite3.Row) -> dict:
    """One row for /api/requests/{id}: every column, plus the reference's names for the
    totals (tokens_in, tokens_out, tokens_cached, request_type), flags as booleans."""
    out = dict(row)
    out.update(tokens_in=row["input_tokens"] + row["cache_read_tokens"]
               + row["cache_write_tokens"], tokens_out=row["output_tokens"],
               tokens_cached=row["cache_read_tokens"], request_type=row["outcome"],
               cache_hit=bool(row["cache_hit"]), streaming=bool(row["streaming"]),
               estimated=bool(row["estimated"]))
    return out


def _page(query: dict, default: int = 50) -> tuple[int, int]:
    """`page` (from 1) and `limit` of a dashboard query (a larger limit is _PAGE_LIMIT, the
    most); a value that is not a whole number from 1 is refused with a 400 (it was silently
    replaced)."""
    out = []
    for name, fallback, most in (("page", "1", 10 ** 9), ("limit", str(default), _PAGE_LIMIT)):
        text = query.get(name, [fallback])[0]
        if not (text.isascii() and text.isdigit() and int(text) >= 1):
            raise HTTPError(400, f"invalid {name} parameter: expected a whole number from 1")
        out.append(min(int(text), most))  # (past SQLite's integers: the most)
    return out[0], out[1]


def human_uptime(seconds: float) -> str:
    if seconds < 60:
        return f"{int(seconds)}s"
    d, rem = divmod(int(seconds), 86400)
    h, rem = divmod(rem, 3600)
    parts = [f"{d}d" if d else "", f"{h}h" if h else "", f"{rem // 60}m" if rem // 60 else ""]
    return " ".join(p for p in parts if p) or "0m"


class Dashboard:
    """Answers every request on the dashboard port."""

    def __init__(self, cfg: Config, store: Store, metrics: Metrics, proxy: "Proxy",
                 breakers: dict, ledger: BudgetLedger, log: Logger) -> None:
        self.store = store
        self.metrics = metrics
        self.proxy = proxy
        self.breakers = breakers
        self.ledger = ledger
        self.log = log
        self.reconfigure(cfg)

    def reconfigure(self, cfg: Config, token: str | None = None) -> None:
        """A reload: auth and CORS follow the new snapshot, as the proxy port's do."""
        self.cfg = cfg
        self.token = auth_token(cfg) if token is None else token
        self.origins = frozenset(cfg.dashboard.allowed_origins)
        self.guard = BrowserGuard(cfg.dashboard.bind_address or cfg.server.bind_address,
                                  cfg.server.allowed_hosts)  # (its Origins: by CORS)

    def _cors(self, req: Request) -> list[tuple[bytes, bytes]] | None:
        """CORS headers for an allowed Origin; [] without Origin; None for a refused one."""
        origin = req.headers.map.get(b"origin")
        if origin is None:
            return []
        common = [(b"Access-Control-Allow-Methods", b"GET, OPTIONS"),
                  (b"Access-Control-Allow-Headers", b"Authorization, Content-Type")]
        if "*" in self.origins:
            return [(b"Access-Control-Allow-Origin", b"*")] + common
        if origin.decode("latin-1") in self.origins:
            return [(b"Access-Control-Allow-Origin", origin), (b"Vary", b"Origin")] + common
        return None

    def _send_json(self, req: Request, conn: ServerConn, status: int, obj: object,
                   extra: list = ()) -> None:
        body = json.dumps(obj, indent=2).encode()
        conn.send(req, status, [(b"Content-Type", b"application/json; charset=utf-8")]
                  + list(extra), body)

    async def handle(self, req: Request, conn: ServerConn) -> None:
        refused = self.guard.refusal(req.headers)
        if refused:
            return self._send_json(req, conn, 403, {"error": refused})
        cors = self._cors(req)
        if req.method == "OPTIONS":
            conn.send(req, 204 if cors is not None else 403, cors or [], b"")
            return
        extra = cors or []
        path = req.path
        if req.method not in ("GET", "HEAD"):
            return self._send_json(req, conn, 405, {"error": "method not allowed"}, extra)
        if path == "/api/health":
            return self._send_json(req, conn, 200, {"status": "ok"}, extra)
        if not path.startswith("/api/") and path != "/metrics":
            conn.send(req, 200, [(b"Content-Type", b"text/html; charset=utf-8"),
                                 (b"Cache-Control", b"no-store")] + extra,
                      DASHBOARD_HTML.encode())
            return
        if self.token and (path != "/metrics" or self.cfg.auth.protect_metrics):
            denied = check_token(req.headers, self.token)
            if denied:
                message = "authentication required" if denied == 401 else "invalid token"
                www = [(b"WWW-Authenticate", b"Bearer")] if denied == 401 else []
                return self._send_json(req, conn, denied, {"error": message}, extra + www)
        if path == "/metrics":
            conn.send(req, 200, [(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")]
                      + extra, self.metrics.render())
            return
        query = urllib.parse.parse_qs(req.query)
        try:
            status, obj = await self._api(path, query)
        except HTTPError as exc:
            status, obj = exc.status, {"error": exc.detail}
        except sqlite3.Error as exc:
            self.log.error("dashboard query failed", path=path, error=str(exc))
            status, obj = 500, {"error": "database error"}
        self._send_json(req, conn, status, obj, extra)

    async def _api(self, path: str, query: dict) -> tuple[int, object]:
        q = self._query
        if path == "/api/stats":
            return 200, self.stats()
        if path == "/api/stats/history":
            text = query.get("range", ["7d"])[0]
            try:
                since = parse_since(text, time.time())
            except ValueError:
                return 400, {"error": "invalid range parameter"}
            rows = await q("SELECT substr(timestamp, 1, 10) AS day, COUNT(*) AS requests, "
                           "SUM(input_tokens + cache_read_tokens + cache_write_tokens) AS tin, "
                           "SUM(output_tokens) AS tout, SUM(cost_usd) AS cost, "
                           "SUM(savings_usd) AS savings FROM requests WHERE timestamp >= ? "
                           "GROUP BY day ORDER BY day", (utc_iso(since),))
            return 200, [{"timestamp": r["day"], "requests": r["requests"],
                          "tokens_in": r["tin"] or 0, "tokens_out": r["tout"] or 0,
                          "cost": round(r["cost"] or 0.0, 8),
                          "savings": round(r["savings"] or 0.0, 8)} for r in rows]
        if path == "/api/requests":
            return 200, await self._requests(query)
        if path.startswith("/api/requests/"):
            rid = urllib.parse.unquote(path[14:])
            rows = await q("SELECT * FROM requests WHERE id = ?", (rid,))
            if not rows and rid:  # the X-Request-Id a client sent, or its provider's
                rows = await q("SELECT * FROM requests WHERE client_request_id = ? OR "
                               "upstream_request_id = ? ORDER BY timestamp DESC LIMIT 1",
                               (rid, rid))
            return (200, request_detail(rows[0])) if rows else \
                (404, {"error": "request not found"})
        if path == "/api/projects":  # (the busiest first, a page at a time: any client can
            page, limit = _page(query, 100)  # name a project)
            rows = await q("SELECT project, COUNT(*) AS requests, SUM(input_tokens + "
                           "cache_read_tokens + cache_write_tokens) AS tin, SUM(output_tokens) "
                           "AS tout, SUM(cost_usd) AS cost, SUM(savings_usd) AS savings FROM "
                           "requests WHERE project != '' GROUP BY project ORDER BY requests DESC, "
                           "project LIMIT ? OFFSET ?", (limit, (page - 1) * limit))
            return 200, [{"project": r["project"], "requests": r["requests"],
                          "tokens_in": r["tin"] or 0, "tokens_out": r["tout"] or 0,
                          "cost_usd": round(r["cost"] or 0.0, 8),
                          "savings_usd": round(r["savings"] or 0.0, 8)} for r in rows]
        if path == "/api/providers":
            return 200, self.providers()
        if path == "/api/config":
            return 200, mask_config(self.cfg)
        if path == "/api/security/budget":
            return 200, await self.budget()
        if path in ("/api/security/pii", "/api/security/injection"):
            table = "pii_log" if path.endswith("pii") else "injection_log"
            page, limit = _page(query, 50)
            rows = await q(f"SELECT * FROM {table} ORDER BY id DESC LIMIT ? OFFSET ?",
                           (limit, (page - 1) * limit))
            return 200, {"page": page, "limit": limit, "entries": [dict(r) for r in rows]}
        if path == "/api/plugins":
            return 200, [p.describe() for p in self.proxy.plugins]
        return 404, {"error": "not found"}

    async def _query(self, sql: str, params: tuple = ()) -> list:
        return await asyncio.to_thread(self.store.query, sql, params)

    async def _requests(self, query: dict) -> dict:
        page, limit = _page(query)
        where, params = [], []
        for field in ("model", "provider", "project"):
            if field in query:
                where.append(f"{field} = ?")
                params.append(query[field][0])
        if "status" in query:  # an HTTP status, or an outcome by name
            value = query["status"][0]
            code = value.isascii() and value.isdigit() and len(value) == 3
            if not code and value not in OUTCOMES:
                raise HTTPError(400, "invalid status parameter: expected an HTTP status (3 "
                                     f"digits) or an outcome ({', '.join(OUTCOMES)})")
            where.append("status_code = ?" if code else "outcome = ?")
            params.append(int(value) if code else value)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        total = (await self._query(f"SELECT COUNT(*) AS n FROM requests {clause}",
                                   tuple(params)))[0]["n"]
        rows = await self._query(
            f"SELECT id, timestamp, method, path, model, provider, project, input_tokens, "
            f"cache_read_tokens, "
            f"cache_write_tokens, output_tokens, tokens_saved, cost_usd, savings_usd, latency_ms, "
            f"status_code, cache_hit, outcome, streaming FROM requests {clause} "
            f"ORDER BY timestamp DESC LIMIT ? OFFSET ?", tuple(params) + (limit,
                                                                         (page - 1) * limit))
        return {"page": page, "limit": limit, "total": total, "requests": [{
            "id": r["id"], "timestamp": r["timestamp"], "method": r["method"],
            "path": r["path"], "model": r["model"], "provider": r["provider"],
            "project": r["project"],
            "tokens_in": r["input_tokens"] + r["cache_read_tokens"] + r["cache_write_tokens"],
            "tokens_out": r["output_tokens"], "tokens_saved": r["tokens_saved"],
            "cost_usd": r["cost_usd"], "savings_usd": r["savings_usd"],
            "latency_ms": r["latency_ms"], "status_code": r["status_code"],
            "cache_hit": bool(r["cache_hit"]), "request_type": r["outcome"],
            "streaming": bool(r["streaming"])} for r in rows]}

    def stats(self) -> dict:
        m = self.metrics
        hits, misses = m.get("tokenman_cache_hits_total"), m.get("tokenman_cache_misses_total")
        cost, saved = m.total("tokenman_cost_usd_total"), net_savings(m)
        up = time.time() - m.started
        return {"uptime": human_uptime(up), "uptime_seconds": round(up, 3),
                "total_requests": int(m.get("tokenman_requests_total")),
                "tokens_in": int(m.get("tokenman_tokens_in_total")),
                "tokens_out": int(m.get("tokenman_tokens_out_total")),
                "tokens_saved": int(m.get("tokenman_tokens_saved_total")),
                "cost_usd": round(cost, 8), "savings_usd": round(saved, 8),
                "savings_percent": round(saved / (cost + saved) * 100, 2) if cost + saved > 0
                else 0.0,
                "cache_hit_rate": round(hits / (hits + misses) * 100, 2) if hits + misses
                else 0.0,
                "cache_hits": int(hits), "cache_misses": int(misses),
                "active_requests": self.proxy.in_flight,
                "errors": int(m.total("tokenman_errors_total"))}

    def providers(self) -> list[dict]:
        out = []
        for key, prov in self.proxy.router.providers.items():
            live = self.proxy.provider_stats.get(key, {})
            breaker = self.breakers.get(key)
            out.append({"name": key, "format": prov.cfg.format, "enabled": prov.cfg.enabled,
                        "usable": prov.usable, "models": list(prov.cfg.models),
                        "priority": prov.cfg.priority, "api_base": prov.cfg.api_base,
                        "breaker": breaker.shown if breaker else "disabled",
                        "last_error": live.get("last_error", prov.error),
                        "requests": live.get("requests", 0), "errors": live.get("errors", 0),
                        "latency_ms": live.get("latency_ms")})
        return out

    async def budget(self) -> list[dict]:
        """Spend per scope and period: the budget ledger's figure for a period it tracks (one
        with a limit, reservations included), the request log's sum for the others (the
        reference showed 0 for them, and for every period while budgets were off)."""
        cfg = self.cfg.budget
        now = time.time()
        out = []
        scopes = [("global", {p: getattr(cfg, p + "_limit") for p in BUDGET_PERIODS})]
        scopes += [("project:" + name, {p: limits.get(p + "_limit", 0.0) for p in BUDGET_PERIODS})
                   for name, limits in cfg.projects.items()]
        for scope, limits in scopes:
            for period in BUDGET_PERIODS:
                start, _ = period_bounds(period, now)
                spent = self.ledger.spent.get((scope, period, start))
                if spent is None:
                    rows = await self._query(*spend_query(start, scope.partition(":")[2]))
                    spent = rows[0]["spent"] or 0.0
                limit = limits[period]
                out.append({"period": period, "scope": scope, "spent": round(spent, 8),
                            "limit": limit,
                            "pct": round(min(100.0, spent / limit * 100), 2) if limit else 0.0})
        return out


# ================================================================================================
# §16 dashboard page: one self-contained HTML document (no CDN: works air-gapped)
# ================================================================================================

DASHBOARD_HTML = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>tokenman dashboard</title>
<style>
:root{--bg:#f4f6f9;--card:#fff;--ink:#1b2430;--muted:#5f6b7a;--line:#e2e6ec;--accent:#2456c7;
--green:#1f8a4c;--green-bg:#e3f4ea;--yellow:#b7791f;--yellow-bg:#fdf3dc;--red:#c53030;--red-bg:#fde8e8;
--grey-bg:#eef0f3;--spend:#2456c7;--save:#1f8a4c;font-size:14px}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;line-height:1.4}
header{display:flex;align-items:center;gap:12px;flex-wrap:wrap;padding:12px 20px;background:var(--card);border-bottom:1px solid var(--line)}
header h1{font-size:18px;margin:0;font-weight:650;letter-spacing:-.01em}
header h1 span{color:var(--accent)}
#status{margin-left:auto;color:var(--muted);font-size:12.5px;display:flex;align-items:center;gap:6px;min-width:0;max-width:100%}
#status span{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
#status i{flex:none}
#status i{width:8px;height:8px;border-radius:50%;background:#a0aec0;display:inline-block}
#status.ok i{background:var(--green)}#status.err i{background:var(--red)}#status.err{color:var(--red)}
button{font:inherit;cursor:pointer;border:1px solid var(--line);background:var(--card);color:var(--ink);border-radius:6px;padding:4px 10px}
button:hover{border-color:var(--accent);color:var(--accent)}
main{padding:16px 20px 40px;max-width:1500px;margin:0 auto;display:grid;gap:16px}
.cards{display:grid;grid-template-columns:repeat(6,minmax(0,1fr));gap:12px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px;min-width:0}
.card .k{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:24px;font-weight:650;margin-top:2px;font-variant-numeric:tabular-nums;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.card .s{font-size:12.5px;color:var(--muted);margin-top:2px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.grid2{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:16px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px;min-width:0}
section h2{font-size:14px;margin:0 0 10px;font-weight:650;display:flex;align-items:baseline;gap:4px 8px;flex-wrap:wrap}
.stream{font-size:11px;color:var(--muted);margin-left:4px}
section h2 small{font-weight:400;color:var(--muted);font-size:12px}
.note{color:var(--muted);font-size:13px;padding:8px 0}
.note.err{color:var(--red)}
.tw{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);white-space:nowrap;vertical-align:top}
th{font-size:11.5px;color:var(--muted);text-transform:uppercase;letter-spacing:.03em;font-weight:600;background:#fafbfc}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.wrap{white-space:normal;word-break:break-word;min-width:160px;max-width:360px}
td.mono,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
tbody tr:hover{background:#f6f8fb}
tr.click{cursor:pointer}tr.click:focus{outline:2px solid var(--accent);outline-offset:-2px}
.b{display:inline-block;padding:1px 8px;border-radius:999px;font-size:11.5px;font-weight:600;background:var(--grey-bg);color:var(--muted)}
.b.g{background:var(--green-bg);color:var(--green)}.b.y{background:var(--yellow-bg);color:var(--yellow)}.b.r{background:var(--red-bg);color:var(--red)}
.b.bl{background:#e6edfb;color:var(--accent)}
.bud{display:grid;grid-template-columns:130px minmax(0,1fr);gap:4px 12px;align-items:center;margin-bottom:10px}
.bud .lbl{font-weight:600;text-transform:capitalize;min-width:0}.bud .lbl small{display:block;font-weight:400;color:var(--muted);text-transform:none;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar{height:10px;background:var(--grey-bg);border-radius:999px;overflow:hidden}
.bar div{height:100%;border-radius:999px}
.bar .g{background:var(--green)}.bar .y{background:#d69e2e}.bar .r{background:var(--red)}
.bud .amt{grid-column:2;font-size:12.5px;color:var(--muted);font-variant-numeric:tabular-nums}
svg text{font-size:11px;fill:var(--muted);font-family:inherit}
.legend{display:flex;gap:14px;font-size:12.5px;color:var(--muted);margin-left:auto}
.legend i{display:inline-block;width:14px;height:3px;border-radius:2px;vertical-align:middle;margin-right:5px}
#auth{position:fixed;inset:0;background:rgba(20,28,40,.45);display:flex;align-items:center;justify-content:center;z-index:20;padding:16px}
#auth form{background:var(--card);border-radius:12px;padding:20px;width:100%;max-width:360px;box-shadow:0 10px 40px rgba(0,0,0,.2)}
#auth h2{margin:0 0 6px;font-size:16px}#auth p{margin:0 0 12px;color:var(--muted);font-size:13px}
#auth input{width:100%;font:inherit;padding:8px 10px;border:1px solid #c5ccd6;border-radius:6px;margin-bottom:10px}
#auth .err{color:var(--red);font-size:13px;margin:0 0 10px}
#auth button{background:var(--accent);color:#fff;border-color:var(--accent);padding:7px 14px}
#panel{position:fixed;top:0;right:0;bottom:0;width:min(560px,100%);background:var(--card);border-left:1px solid var(--line);box-shadow:-8px 0 30px rgba(0,0,0,.12);z-index:10;display:flex;flex-direction:column}
#panel .hd{display:flex;align-items:center;gap:10px;padding:12px 16px;border-bottom:1px solid var(--line)}
#panel .hd h2{margin:0;font-size:15px;flex:1;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
#panel .bd{overflow:auto;padding:8px 16px 24px}
#panel dl{display:grid;grid-template-columns:minmax(120px,auto) 1fr;gap:0;margin:0;font-size:13px}
#panel dt{color:var(--muted);padding:5px 10px 5px 0;border-bottom:1px solid var(--line)}
#panel dd{margin:0;padding:5px 0;border-bottom:1px solid var(--line);word-break:break-word;min-width:0}
#panel pre{margin:0;white-space:pre-wrap;word-break:break-word;max-height:320px;overflow:auto;background:#f6f8fa;border-radius:6px;padding:6px 8px}
.null{color:#a0aec0;font-style:italic}
[hidden]{display:none!important}
@media (max-width:1200px){.cards{grid-template-columns:repeat(3,minmax(0,1fr))}}
@media (max-width:1000px){.grid2{grid-template-columns:minmax(0,1fr)}}
@media (max-width:600px){.cards{grid-template-columns:repeat(2,minmax(0,1fr))}main{padding:10px}header{padding:10px}.card .v{font-size:20px}#panel dl{grid-template-columns:1fr}#panel dt{border-bottom:0;padding-bottom:0}}
</style>
</head>
<body>
<header>
  <h1><span>tokenman</span> dashboard</h1>
  <div id="status"><i></i><span id="statusText">connecting…</span></div>
  <button id="signout" type="button" hidden>Sign out</button>
</header>
<main>
  <div class="cards">
    <div class="card"><div class="k">Total spend</div><div class="v" id="c-spend">–</div><div class="s" id="c-spend-s">&nbsp;</div></div>
    <div class="card"><div class="k">Total savings</div><div class="v" id="c-save">–</div><div class="s" id="c-save-s">&nbsp;</div></div>
    <div class="card"><div class="k">Requests</div><div class="v" id="c-req">–</div><div class="s" id="c-req-s">&nbsp;</div></div>
    <div class="card"><div class="k">Cache hit rate</div><div class="v" id="c-cache">–</div><div class="s" id="c-cache-s">&nbsp;</div></div>
    <div class="card"><div class="k">Active requests</div><div class="v" id="c-active">–</div><div class="s" id="c-active-s">&nbsp;</div></div>
    <div class="card"><div class="k">Uptime</div><div class="v" id="c-up">–</div><div class="s" id="c-up-s">&nbsp;</div></div>
  </div>
  <div class="grid2">
    <section><h2>Spend &amp; savings <small>daily, last 30 days (UTC)</small>
      <span class="legend"><span><i style="background:var(--spend)"></i>Spend</span><span><i style="background:var(--save)"></i>Savings</span></span></h2>
      <div id="chart"></div></section>
    <section><h2>Budgets</h2><div id="budgets"></div></section>
  </div>
  <section><h2>Providers</h2><div id="providers" class="tw"></div></section>
  <section><h2>Recent requests <small id="req-total"></small></h2><div id="requests" class="tw"></div></section>
  <section><h2>PII events <small>latest 20</small></h2><div id="pii" class="tw"></div></section>
  <section><h2>Prompt-injection events <small>latest 20</small></h2><div id="inj" class="tw"></div></section>
</main>
<div id="panel" hidden role="dialog" aria-modal="false" aria-labelledby="panelTitle">
  <div class="hd"><h2 id="panelTitle">Request</h2><button type="button" id="panelClose" aria-label="Close">Close ✕</button></div>
  <div class="bd" id="panelBody"></div>
</div>
<div id="auth" hidden>
  <form id="authForm" autocomplete="off">
    <h2>Authentication required</h2>
    <p>Enter the dashboard bearer token. It is kept in this tab's session storage only.</p>
    <p class="err" id="authErr" hidden></p>
    <input id="authToken" type="password" autocomplete="off" placeholder="Bearer token" aria-label="Bearer token" required>
    <button type="submit">Sign in</button>
  </form>
</div>
<script>
(function () {
  "use strict";
  var TOKEN_KEY = "tokenman.dashboard.token";
  var POLL_MS = 5000, HISTORY_EVERY = 6; // history is refreshed every 6th poll (30 s)
  var SVGNS = "http://www.w3.org/2000/svg";
  var tick = 0, busy = false, authWait = false, timer = null;

  // ---------- DOM helpers: every API string goes through textContent ----------
  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, kids) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (k === "text") e.textContent = attrs[k] == null ? "" : String(attrs[k]);
      else if (k === "cls") e.className = attrs[k];
      else e.setAttribute(k, attrs[k]);
    }
    append(e, kids);
    return e;
  }
  function append(e, kids) {
    if (kids == null) return;
    if (!Array.isArray(kids)) kids = [kids];
    kids.forEach(function (c) {
      if (c == null) return;
      e.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    });
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = String(text);
    return e;
  }
  function setText(id, t) { $(id).textContent = t == null ? "" : String(t); }
  function replace(id, node) { var c = $(id); c.replaceChildren(node); }
  function note(text, err) { return el("div", { cls: "note" + (err ? " err" : ""), text: text }); }

  // ---------- formatting ----------
  function num(v) { return typeof v === "number" && isFinite(v) ? v : null; }
  function usd(v) {
    v = num(v);
    if (v === null) return "—";
    if (Math.abs(v) >= 1000) return (v < 0 ? "-$" : "$") + Math.round(Math.abs(v)).toLocaleString("en-US");
    return (v < 0 ? "-$" : "$") + Math.abs(v).toFixed(4);
  }
  function usdShort(v, step) { // axis labels only
    if (step >= 1000) return "$" + (v / 1000).toFixed(step % 1000 ? 1 : 0) + "k";
    return "$" + v.toFixed(step >= 1 ? (step % 1 ? 1 : 0) : step >= 0.1 ? 2 : step >= 0.01 ? 3 : 4);
  }
  function int(v) { v = num(v); return v === null ? "—" : Math.round(v).toLocaleString("en-US"); }
  function compact(v) {
    v = num(v);
    if (v === null) return "—";
    var a = Math.abs(v);
    return a >= 1e9 ? (v / 1e9).toFixed(1) + "B" : a >= 1e6 ? (v / 1e6).toFixed(1) + "M" : a >= 1e4 ? (v / 1e3).toFixed(1) + "k" : int(v);
  }
  function pct(v) { v = num(v); return v === null ? "—" : v.toFixed(1) + " %"; }
  function ms(v) {
    v = num(v);
    if (v === null) return "—";
    return v >= 1000 ? (v / 1000).toFixed(2) + " s" : v.toFixed(v < 10 ? 1 : 0) + " ms";
  }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function time(ts) {
    var d = new Date(ts);
    if (typeof ts !== "string" || isNaN(d.getTime())) return ts == null ? "—" : String(ts);
    var now = new Date(), t = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
    return d.toDateString() === now.toDateString() ? t : d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + t;
  }
  function badge(text, cls) { return el("span", { cls: "b " + (cls || ""), text: text }); }
  var BREAKER = { closed: "g", half_open: "y", open: "r" };
  var OUTCOME = { ok: "g", cache_hit: "bl", heartbeat_hit: "bl", client_closed: "", rejected: "y",
                  upstream_error: "r", upstream_failed: "r", internal_error: "r" };

  // ---------- API ----------
  function token() { try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; } }
  function setToken(t) { try { if (t) sessionStorage.setItem(TOKEN_KEY, t); else sessionStorage.removeItem(TOKEN_KEY); } catch (e) {} }
  function AuthError(status) { this.status = status; }
  function api(path) {
    var h = { "Accept": "application/json" }, t = token();
    if (t) h.Authorization = "Bearer " + t;
    return fetch(path, { headers: h, cache: "no-store", credentials: "same-origin" }).then(function (r) {
      if (r.status === 401 || r.status === 403) throw new AuthError(r.status);
      return r.json().catch(function () { return null; }).then(function (body) {
        if (!r.ok) throw new Error((body && body.error) || ("HTTP " + r.status));
        return body;
      });
    });
  }

  // ---------- auth form ----------
  function showAuth(status) {
    authWait = true;
    var had = !!token();
    setToken("");
    $("signout").hidden = true;
    var err = $("authErr");
    err.hidden = !(status === 403 || had);
    err.textContent = status === 403 ? "Invalid token — try again." : "Your token was not accepted — sign in again.";
    $("auth").hidden = false;
    $("authToken").value = "";
    $("authToken").focus();
    setStatus("authentication required", true);
  }
  $("authForm").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var t = $("authToken").value.trim();
    if (!t) return;
    setToken(t);
    $("auth").hidden = true;
    authWait = false;
    tick = 0;
    poll();
  });
  $("signout").addEventListener("click", function () { setToken(""); closePanel(); tick = 0; poll(); });

  function setStatus(text, err) {
    $("status").className = err ? "err" : "ok";
    setText("statusText", text);
  }

  // ---------- renderers ----------
  function renderStats(s) {
    setText("c-spend", usd(s.cost_usd));
    setText("c-spend-s", compact(s.tokens_in) + " tokens in · " + compact(s.tokens_out) + " out");
    setText("c-save", usd(s.savings_usd));
    setText("c-save-s", pct(s.savings_percent) + " saved · " + compact(s.tokens_saved) + " tokens");
    setText("c-req", int(s.total_requests));
    setText("c-req-s", int(s.errors) + " errors");
    setText("c-cache", pct(s.cache_hit_rate));
    setText("c-cache-s", int(s.cache_hits) + " hits · " + int(s.cache_misses) + " misses");
    setText("c-active", int(s.active_requests));
    setText("c-active-s", "in flight now");
    setText("c-up", s.uptime == null ? "—" : s.uptime);
    setText("c-up-s", num(s.uptime_seconds) === null ? "" : "since " + time(new Date(Date.now() - s.uptime_seconds * 1000).toISOString()));
  }

  function dayKey(d) { return d.toISOString().slice(0, 10); }
  var chartRows = null;
  function renderChart(rows) {
    rows = chartRows = Array.isArray(rows) ? rows : [];
    var byDay = {}, last = null;
    rows.forEach(function (r) {
      if (!r || typeof r.timestamp !== "string") return;
      var k = r.timestamp.slice(0, 10);
      byDay[k] = { cost: num(r.cost) || 0, savings: num(r.savings) || 0, requests: num(r.requests) || 0 };
      if (!last || k > last) last = k;
    });
    var end = new Date(dayKey(new Date()) + "T00:00:00Z");
    if (last && !isNaN(Date.parse(last + "T00:00:00Z")) && new Date(last + "T00:00:00Z") > end) end = new Date(last + "T00:00:00Z");
    var days = [];
    for (var i = 29; i >= 0; i--) {
      var k = dayKey(new Date(end.getTime() - i * 86400000));
      days.push({ day: k, v: byDay[k] || { cost: 0, savings: 0, requests: 0 }, has: !!byDay[k] });
    }
    var W = Math.max(300, Math.min(900, $("chart").clientWidth || 720)), H = W < 500 ? 220 : 260, L = 56, R = 12, T = 12, B = 30, pw = W - L - R, ph = H - T - B;
    var max = 0;
    days.forEach(function (d) { max = Math.max(max, d.v.cost, d.v.savings); });
    var any = days.some(function (d) { return d.has; });
    var step = niceStep(max > 0 ? max / 4 : 0.25), top = step * 4;
    var s = svg("svg", { viewBox: "0 0 " + W + " " + H, width: "100%", role: "img", "aria-label": "Daily spend and savings, last 30 days", style: "display:block" });
    for (var j = 0; j <= 4; j++) {
      var y = T + ph - (ph * j) / 4;
      s.appendChild(svg("line", { x1: L, x2: W - R, y1: y, y2: y, stroke: j ? "#e8ebf0" : "#aab3bf", "stroke-width": 1 }));
      s.appendChild(svg("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, usdShort(step * j, step)));
    }
    function X(i) { return L + (pw * (i + 0.5)) / days.length; }
    function Y(v) { return T + ph - (ph * v) / top; }
    days.forEach(function (d, i) {
      if (i % 5 === 4 || i === 0) s.appendChild(svg("text", { x: X(i), y: H - 10, "text-anchor": "middle" }, d.day.slice(5)));
    });
    if (!any) {
      s.appendChild(svg("text", { x: L + pw / 2, y: T + ph / 2, "text-anchor": "middle", style: "font-size:14px" }, "No spend recorded in the last 30 days"));
    } else {
      [["cost", "var(--spend)"], ["savings", "var(--save)"]].forEach(function (p) {
        var pts = days.map(function (d, i) { return X(i).toFixed(1) + "," + Y(d.v[p[0]]).toFixed(1); });
        s.appendChild(svg("polyline", { points: pts.join(" "), fill: "none", stroke: p[1], "stroke-width": 2, "stroke-linejoin": "round", style: "stroke:" + p[1] }));
      });
      days.forEach(function (d, i) { // hover targets with native tooltips
        var g = svg("g", {});
        g.appendChild(svg("title", {}, d.day + "\nspend " + usd(d.v.cost) + "\nsavings " + usd(d.v.savings) + "\nrequests " + int(d.v.requests)));
        g.appendChild(svg("rect", { x: X(i) - pw / days.length / 2, y: T, width: pw / days.length, height: ph, fill: "transparent" }));
        g.appendChild(svg("circle", { cx: X(i), cy: Y(d.v.cost), r: 2.5, style: "fill:var(--spend)" }));
        g.appendChild(svg("circle", { cx: X(i), cy: Y(d.v.savings), r: 2.5, style: "fill:var(--save)" }));
        s.appendChild(g);
      });
    }
    replace("chart", s);
  }
  function niceStep(raw) {
    var p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * p;
  }

  function renderBudgets(rows) {
    rows = Array.isArray(rows) ? rows : [];
    if (!rows.length) return replace("budgets", note("Budgets are not configured."));
    var order = { hourly: 0, daily: 1, monthly: 2 }, box = el("div");
    rows.slice().sort(function (a, b) {
      return (String(a.scope) === "global" ? 0 : 1) - (String(b.scope) === "global" ? 0 : 1) ||
        String(a.scope).localeCompare(String(b.scope)) || (a.period in order ? order[a.period] : 9) - (b.period in order ? order[b.period] : 9);
    }).forEach(function (b) {
      var limit = num(b.limit) || 0, spent = num(b.spent) || 0, row = el("div", { cls: "bud" });
      var p = limit > 0 ? (spent / limit) * 100 : 0;
      var cls = p >= 90 ? "r" : p >= 75 ? "y" : "g";
      row.appendChild(el("div", { cls: "lbl" }, [String(b.period || "?"), el("small", { text: b.scope || "global" })]));
      var bar = el("div", { cls: "bar", title: limit > 0 ? p.toFixed(1) + " %" : "no limit" });
      if (limit > 0) bar.appendChild(el("div", { cls: cls, style: "width:" + Math.min(100, Math.max(0, p)).toFixed(1) + "%" }));
      row.appendChild(bar);
      row.appendChild(el("div", { cls: "amt", text: limit > 0 ? usd(spent) + " of " + usd(limit) + " · " + p.toFixed(1) + " %" : usd(spent) + " spent · no limit" }));
      box.appendChild(row);
    });
    replace("budgets", box);
  }

  function table(cols, rows, onRow) {
    var thead = el("thead", null, el("tr", null, cols.map(function (c) { return el("th", { cls: c.n ? "n" : "", text: c.h }); })));
    var tbody = el("tbody");
    rows.forEach(function (r) {
      var tr = el("tr");
      cols.forEach(function (c) {
        var v = c.f(r), td = el("td", { cls: (c.n ? "n " : "") + (c.cls || "") });
        append(td, v == null || v === "" ? "—" : v);
        if (c.title) td.title = String(c.title(r) || "");
        tr.appendChild(td);
      });
      if (onRow) {
        tr.className = "click"; tr.tabIndex = 0;
        tr.addEventListener("click", function () { onRow(r); });
        tr.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); onRow(r); } });
      }
      tbody.appendChild(tr);
    });
    return el("table", null, [thead, tbody]);
  }

  function renderProviders(rows) {
    rows = Array.isArray(rows) ? rows : [];
    if (!rows.length) return replace("providers", note("No providers configured."));
    replace("providers", table([
      { h: "Provider", f: function (p) { return el("strong", { text: p.name }); }, title: function (p) { return p.api_base; } },
      { h: "Format", f: function (p) { return p.format; } },
      { h: "Breaker", f: function (p) { var b = String(p.breaker || "unknown"); return badge(b.replace("_", "-"), BREAKER[b]); } },
      { h: "State", f: function (p) { return !p.enabled ? badge("disabled") : p.usable ? badge("usable", "g") : badge("unusable", "r"); } },
      { h: "Priority", n: 1, f: function (p) { return int(p.priority); } },
      { h: "Requests", n: 1, f: function (p) { return int(p.requests); } },
      { h: "Errors", n: 1, f: function (p) { return int(p.errors); } },
      { h: "Latency", n: 1, f: function (p) { return ms(p.latency_ms); } },
      { h: "Last error", cls: "wrap", f: function (p) { return p.last_error ? el("span", { style: "color:var(--red)", text: p.last_error }) : ""; } }
    ], rows));
  }

  function renderRequests(d) {
    var rows = d && Array.isArray(d.requests) ? d.requests.slice() : [];
    rows.sort(function (a, b) { return String(b.timestamp).localeCompare(String(a.timestamp)); });
    setText("req-total", d && num(d.total) !== null ? "showing " + rows.length + " of " + int(d.total) + (rows.length ? " · click a row for details" : "") : "");
    if (!rows.length) return replace("requests", note("No requests logged yet."));
    replace("requests", table([
      { h: "Time", f: function (r) { return time(r.timestamp); }, title: function (r) { return r.timestamp; } },
      { h: "Model", f: function (r) { return r.model; } },
      { h: "Provider", f: function (r) { return r.provider; } },
      { h: "Project", f: function (r) { return r.project; } },
      { h: "Status", n: 1, f: function (r) { var c = num(r.status_code); return el("span", { style: c >= 400 ? "color:var(--red);font-weight:600" : "", text: c === null ? "—" : c }); } },
      { h: "Outcome", f: function (r) { var o = String(r.request_type || "unknown"); return [badge(o.replace(/_/g, " "), OUTCOME[o]), r.streaming ? el("span", { cls: "stream", title: "streaming response", text: "stream" }) : null]; } },
      { h: "Tokens in", n: 1, f: function (r) { return int(r.tokens_in); } },
      { h: "Tokens out", n: 1, f: function (r) { return int(r.tokens_out); } },
      { h: "Cost", n: 1, f: function (r) { return usd(r.cost_usd); } },
      { h: "Savings", n: 1, f: function (r) { return num(r.savings_usd) ? el("span", { style: "color:var(--green)", text: usd(r.savings_usd) }) : usd(r.savings_usd); } },
      { h: "Latency", n: 1, f: function (r) { return ms(r.latency_ms); } }
    ], rows, openDetail));
  }

  function renderEvents(id, d, cols, empty) {
    var rows = d && Array.isArray(d.entries) ? d.entries.slice(0, 20) : [];
    if (!rows.length) return replace(id, note(empty));
    replace(id, table([{ h: "Time", f: function (r) { return time(r.timestamp); }, title: function (r) { return r.timestamp; } }].concat(cols, [
      { h: "Field", cls: "mono", f: function (r) { return r.field_path; } },
      { h: "Context", cls: "wrap mono", f: function (r) { return r.context; } },
      { h: "Request", cls: "mono", f: function (r) { return r.request_id; } }
    ]), rows, function (r) { if (r.request_id) openDetail({ id: r.request_id }); }));
  }
  var ACTION = { block: "r", redact: "y", log: "", warn: "y" };
  function actionCol() { return { h: "Action", f: function (r) { return badge(r.action, ACTION[r.action]); } }; }

  // ---------- detail panel ----------
  var detailSeq = 0;
  function openDetail(r) {
    var seq = ++detailSeq, id = String(r.id || "");
    $("panel").hidden = false;
    setText("panelTitle", "Request " + id);
    replace("panelBody", note("Loading…"));
    api("/api/requests/" + encodeURIComponent(id)).then(function (d) {
      if (seq !== detailSeq) return;
      if (!d || typeof d !== "object") throw new Error("empty response");
      var dl = el("dl");
      Object.keys(d).forEach(function (k) {
        var v = d[k], dd = el("dd");
        if (v === null || v === undefined) dd.appendChild(el("span", { cls: "null", text: "null" }));
        else if (typeof v === "object") dd.appendChild(el("pre", { cls: "mono", text: JSON.stringify(v, null, 2) }));
        else if (typeof v === "string" && /_body$/.test(k)) dd.appendChild(el("pre", { cls: "mono", text: pretty(v) }));
        else if (typeof v === "number" && /(cost|savings)_usd$/.test(k)) append(dd, usd(v) + "  (" + v + ")");
        else append(dd, v === "" ? el("span", { cls: "null", text: "(empty)" }) : String(v));
        dl.appendChild(el("dt", { text: k }));
        dl.appendChild(dd);
      });
      replace("panelBody", dl);
    }).catch(function (e) {
      if (seq !== detailSeq) return;
      if (e instanceof AuthError) { closePanel(); return showAuth(e.status); }
      replace("panelBody", note("Could not load request: " + (e && e.message || e), true));
    });
  }
  function pretty(s) { try { return JSON.stringify(JSON.parse(s), null, 2); } catch (e) { return s; } }
  function closePanel() { detailSeq++; $("panel").hidden = true; }
  $("panelClose").addEventListener("click", closePanel);
  document.addEventListener("keydown", function (e) { if (e.key === "Escape" && !$("panel").hidden) closePanel(); });

  // ---------- polling ----------
  var loaded = {}, failed = [];
  function section(id, p, render) {
    return p.then(function (d) { render(d); loaded[id] = true; }).catch(function (e) {
      if (e instanceof AuthError) throw e;
      var msg = (e && e.message) || String(e);
      failed.push(id + ": " + msg);
      // keep the last good data on a transient failure; show the error only if nothing was shown yet
      if (!loaded[id]) replace(id, note("Failed to load: " + msg, true));
    });
  }
  function poll() {
    if (busy || authWait) return;
    busy = true;
    failed = [];
    var first = tick % HISTORY_EVERY === 0;
    tick++;
    // /api/stats first: if it answers 401/403 nothing else is requested.
    api("/api/stats").then(function (s) {
      renderStats(s || {});
      $("signout").hidden = !token();
      var jobs = [
        section("requests", api("/api/requests?page=1&limit=25"), renderRequests),
        section("providers", api("/api/providers"), renderProviders),
        section("budgets", api("/api/security/budget"), renderBudgets),
        section("pii", api("/api/security/pii?limit=20"), function (d) {
          renderEvents("pii", d, [{ h: "Type", f: function (r) { return badge(r.pii_type, "bl"); } }, actionCol()], "No PII detected.");
        }),
        section("inj", api("/api/security/injection?limit=20"), function (d) {
          renderEvents("inj", d, [{ h: "Category", f: function (r) { return badge(r.category, "bl"); } },
            { h: "Pattern", cls: "wrap mono", f: function (r) { return r.pattern; } }, actionCol()], "No prompt-injection attempts detected.");
        })
      ];
      if (first) jobs.push(section("chart", api("/api/stats/history?range=30d"), renderChart));
      return Promise.all(jobs);
    }).then(function () {
      if (first && failed.some(function (f) { return f.indexOf("chart:") === 0; })) tick = 0; // retry history on the next poll
      if (failed.length) setStatus("partial update · " + failed.join("; "), true);
      else setStatus("live · updated " + time(new Date().toISOString()), false);
    }).catch(function (e) {
      if (e instanceof AuthError) return showAuth(e.status);
      if (first) tick = 0; // retry history next time if this poll failed
      setStatus("offline: " + (e && e.message || e) + " · retrying", true);
    }).then(function () { busy = false; });
  }
  function schedule() {
    clearInterval(timer);
    timer = setInterval(function () { if (!document.hidden) poll(); }, POLL_MS);
  }
  document.addEventListener("visibilitychange", function () { if (!document.hidden) poll(); });
  var rz = null;
  window.addEventListener("resize", function () { clearTimeout(rz); rz = setTimeout(function () { if (chartRows) renderChart(chartRows); }, 150); });
  replace("chart", note("Loading…"));
  poll();
  schedule();
})();
</script>
</body>
</html>
"""


# ================================================================================================
# §17 App: builds every component from one config snapshot, starts, and stops gracefully
# ================================================================================================


def malloc_trim():
    """glibc's malloc_trim (gives freed heap pages back to the OS), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim


def release_memory() -> None:
    """Gives memory freed after start-up back to the OS. Running as `python tokenman.py`
    compiles this whole module first (the main script is never cached as bytecode); the
    compiler's scratch memory stays mapped unless the allocator is asked to trim it."""
    import gc
    gc.collect()
    trim = malloc_trim()
    if trim is not None:
        trim(0)


def settle_gc() -> None:
    """After start-up, for a long run: what start-up made (modules, config, tables) is taken
    out of the cyclic collector's sight (gc.freeze: a full collection walked all of it), and a
    young collection waits for GC_YOUNG_THRESHOLD new container objects. With many requests in
    flight their objects crossed CPython's 700 a few hundred times a second, each time for
    nothing: the request path makes almost no reference cycles (refcounting frees the rest at
    once; ~400 objects were collected over 30,000 requests), and the collections cost ~4 % of
    the CPU per request at 64 in flight."""
    import gc
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(data_dir: str) -> int:
    """The PID in data_dir/tokenman.pid, 0 when there is none (or it is not a number)."""
    try:
        with open(os.path.join(data_dir, "tokenman.pid"), encoding="ascii") as fh:
            return int(fh.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def claim_pid_file(data_dir: str) -> str:
    """Writes this process's PID; refuses when another live tokenman holds the file, and
    replaces a stale one."""
    pid = read_pid(data_dir)
    if pid and pid != os.getpid() and pid_alive(pid):
        raise TokenmanError(f"tokenman is already running with this data_dir (pid {pid})")
    path = os.path.join(data_dir, "tokenman.pid")
    try:  # (never through a symlink: truncating its target)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise TokenmanError(f"cannot write {path}: {exc.strerror} (a symlink is refused)") \
            from None
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    return path


def load_pii_key(data_dir: str, key_ref: str, env: dict) -> bytes:
    """The secret behind PII digests, so that one value has one digest across restarts (and
    replicas, given one ref): from the ref, or made once and kept in data_dir/pii.key (0600)."""
    if key_ref:
        try:
            value = resolve_key(key_ref, env)
        except ValueError as exc:
            raise ValueError(f"security.pii.hash_key_ref: {exc}") from None
        if len(value) < 16:
            raise ValueError("security.pii.hash_key_ref: the key must have 16 characters or more")
        return value.encode()
    path = os.path.join(data_dir, "pii.key")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:  # (never through a symlink: a key someone else chose)
            with os.fdopen(os.open(path, os.O_RDONLY | O_NOFOLLOW), "rb") as fh:
                key = fh.read()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror} (a symlink is refused)") \
                from None
        if len(key) < 16:
            raise ValueError(f"{path} holds no key (delete it to make a new one: PII digests "
                             "will change)") from None
        return key
    key = os.urandom(32)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


class App:
    """Owns the store, the upstream pool, the proxy and its server, and background tasks."""

    def __init__(self, cfg: Config, env: dict | None = None, log: Logger | None = None) -> None:
        self.cfg = cfg
        self.env = dict(os.environ if env is None else env)
        self.log = log or Logger(cfg.server.log_level, fmt=cfg.server.log_format,
                                 buffered=True)
        self.store: Store | None = None
        self.pool: UpstreamPool | None = None
        self.proxy: Proxy | None = None
        self.server: HTTPServer | None = None
        self.dashboard: HTTPServer | None = None
        self.pid_path = ""
        self.port = 0
        self.dashboard_port = 0
        self._tasks: list[asyncio.Task] = []
        self.config_seen: tuple | None = None  # the config file's version last read
        self.rate_state: dict = {}  # rate-limit buckets, kept across reloads
        self.pii_key = b""  # PII digests and stable placeholders: read at start, kept
        self.pii_memory = PlaceholderMemory()  # Responses API placeholders (the same)
        self.first_seen = FirstSeen()  # texts whose PII and injection findings are recorded
        self.metrics = Metrics()
        self.tracer: Tracer | None = None
        self.pipeline: Pipeline | None = None
        self.breakers: dict[str, CircuitBreaker] = {}
        self.dashboard_api: Dashboard | None = None
        self.plugins: list[Plugin] = []

    async def start(self) -> None:
        cfg = self.cfg
        asyncio.get_running_loop().set_exception_handler(self._loop_error)
        for warning in cfg.warnings:
            self.log.warn("config", problem=warning)
        path = await asyncio.to_thread(open_database, cfg.data_dir)
        self.pid_path = await asyncio.to_thread(claim_pid_file, cfg.data_dir)
        try:
            self.pii_key = await asyncio.to_thread(load_pii_key, cfg.data_dir,
                                                   cfg.pii.hash_key_ref, self.env)
        except ValueError as exc:
            raise TokenmanError(str(exc)) from None
        except OSError as exc:
            raise TokenmanError(f"cannot keep the PII key in the data dir: {exc}") from None
        self.store = Store(path, self.log)
        self.store.start()
        self.pool = UpstreamPool(self.env)
        self.ledger = BudgetLedger()
        self.ledger.set_limits(cfg.budget)
        await asyncio.to_thread(self.ledger.load, self.store)
        self.config_seen = await asyncio.to_thread(self._stamp, cfg.source)
        await self._count_earlier_spend(cfg)
        router, prices, self.pipeline, self.plugins = await asyncio.to_thread(
            self._components, cfg)
        self._set_breakers(cfg)
        self.tracer = Tracer(cfg.tracing, self.log) if cfg.tracing.enabled else None
        self.proxy = Proxy(cfg, router, self.pool, self.store, prices, self.log, self.breakers,
                           self.pipeline, self.metrics, self.tracer)
        self.proxy.plugins = self.plugins
        self.metrics.gauges.append(self._gauges)
        ssl_ctx = None
        if cfg.server.tls_enabled:
            ssl = load_ssl()
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(cfg.server.cert_file, cfg.server.key_file)
        self.server = HTTPServer(self.proxy.handle, cfg.server, self.log, ssl_ctx,
                                 on_reject=self.proxy.rejected, screen=self.proxy.screen)
        self.port = await self.server.start(cfg.server.bind_address, cfg.server.proxy_port)
        if cfg.dashboard.enabled:
            self.dashboard_api = Dashboard(cfg, self.store, self.metrics, self.proxy,
                                           self.breakers, self.ledger, self.log)
            self.dashboard = HTTPServer(self.dashboard_api.handle, cfg.server, self.log, ssl_ctx,
                                        name="dashboard")
            self.dashboard_port = await self.dashboard.start(
                cfg.dashboard.bind_address or cfg.server.bind_address, cfg.server.dashboard_port)
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self._pruner()), loop.create_task(self._purger()),
                        loop.create_task(self._watch()), loop.create_task(self._flush_log())]
        if self.tracer is not None:
            self._tasks.append(loop.create_task(self.tracer.run(self.pool)))
        scheme = "https" if ssl_ctx else "http"
        dash_bind = cfg.dashboard.bind_address or cfg.server.bind_address
        self.log.info("tokenman started", version=__version__,
                      proxy=f"{scheme}://{url_host(cfg.server.bind_address)}:{self.port}",
                      dashboard=f"{scheme}://{url_host(dash_bind)}:{self.dashboard_port}"
                      if self.dashboard else "off",
                      config=cfg.source or "built-in defaults", database=path,
                      providers=",".join(p.key for ps in router.by_format.values() for p in ps))
        if not is_loopback(cfg.server.bind_address) and not cfg.auth.enabled:
            self.log.warn("the proxy listens beyond this machine with auth off: anyone who "
                          "reaches it spends with its providers' keys (set [auth] enabled and "
                          "a token)", bind_address=cfg.server.bind_address)

    def _components(self, cfg: Config) -> tuple[Router, PriceTable, Pipeline, list[Plugin]]:
        """What one config snapshot needs (reads key files: run in a worker thread). Breakers,
        rate-limit buckets, budget ledger and metrics are shared across snapshots."""
        prices = PriceTable(cfg.pricing, warn=lambda model: self.log.warn(
            "no price for model; its cost is recorded as null", model=model))
        router = Router(cfg, self.env, self.log, self.pool.tls)
        plugins = load_plugins(cfg.plugins.paths, self.log) if cfg.plugins.enabled else []
        pipeline = build_pipeline(cfg, self.log, plugins, store=self.store, prices=prices,
                                  ledger=self.ledger, rate_state=self.rate_state,
                                  pii_key=self.pii_key, pii_memory=self.pii_memory,
                                  first_seen=self.first_seen,
                                  metrics=self.metrics, pool=self.pool, router=router)
        return router, prices, pipeline, plugins

    async def _count_earlier_spend(self, cfg: Config) -> None:
        """Each limit starts from no less than what its period already spent (the log's)."""
        if not cfg.budget.enabled:
            return
        try:
            logged = await asyncio.to_thread(BudgetLedger.logged, self.store,
                                             budget_limits(cfg.budget), time.time())
        except (sqlite3.Error, OSError) as exc:  # (the ledger's own figures still hold)
            self.log.warn("budget: the request log's spend could not be read", error=str(exc))
            return
        self.ledger.adopt(logged, self.store, time.time())

    def _set_breakers(self, cfg: Config) -> None:
        """A breaker per provider (on the event loop, once the snapshot is known good): a new
        one closed, a kept one with the new thresholds and its state."""
        for key in cfg.providers:
            breaker = self.breakers.get(key)
            if breaker is None:
                self.breakers[key] = CircuitBreaker(key, cfg.resilience,
                                                    on_change=self._breaker_moved)
            else:
                breaker.threshold = cfg.resilience.cb_failure_threshold
                breaker.reset = cfg.resilience.cb_reset_timeout_seconds
                breaker.max_probes = cfg.resilience.cb_half_open_max_calls

    async def reload(self, reason: str) -> bool:
        """Loads and validates the config again; on success swaps the snapshot (requests in
        flight finish on theirs), on failure keeps the old one and logs every problem."""
        self.config_seen = await asyncio.to_thread(self._stamp, self.cfg.source)
        try:
            cfg = await asyncio.to_thread(load_config, self.cfg.source or None, self.env)
            router, prices, pipeline, plugins = await asyncio.to_thread(self._components, cfg)
            token = await asyncio.to_thread(auth_token, cfg)  # (a file: read off the loop;
        except ConfigError as exc:  # gone since validation, the reload fails, not half-done)
            self.log.error("config reload failed; keeping the running config", reason=reason,
                           problems=len(exc.problems))
            for problem in exc.problems:
                self.log.error("config problem", problem=problem)
            return False
        except Exception as exc:  # (a plugin stage that fails to start, a key file...)
            self.log.error("config reload failed; keeping the running config", reason=reason,
                           error=f"{type(exc).__name__}: {exc}")
            return False
        running = self.proxy.router.providers
        broken = [prov for key, prov in router.providers.items() if prov.cfg.enabled
                  and prov.error and key in running and running[key].usable]
        if broken:  # (a key_ref typo would turn every request into a 503 and the pod unready)
            pipeline.retire()
            self.log.error("config reload failed; keeping the running config", reason=reason,
                           problems=len(broken))
            for prov in broken:
                self.log.error("config problem", problem=f"providers.{prov.key}: {prov.error} "
                               "(it serves now; the new config would make it unusable)")
            return False
        old = self.cfg
        fixed = [f"server.{k}" for k in ("bind_address", "proxy_port", "dashboard_port",
                                         "tls_enabled", "cert_file", "key_file", "data_dir",
                                         "log_format")
                 if getattr(cfg.server, k) != getattr(old.server, k)]
        fixed += [f"dashboard.{k}" for k in ("enabled", "bind_address")
                  if getattr(cfg.dashboard, k) != getattr(old.dashboard, k)]
        fixed += ["tracing"] if cfg.tracing != old.tracing else []
        fixed += ["security.pii.hash_key_ref"] if cfg.pii.hash_key_ref != old.pii.hash_key_ref \
            else []
        if fixed:
            self.log.warn("these settings need a restart to take effect", keys=",".join(fixed))
        await self._count_earlier_spend(cfg)
        self._set_breakers(cfg)
        self.server.cfg = cfg.server  # (limits and timeouts: read for each new request)
        if self.dashboard is not None:
            self.dashboard.cfg = cfg.server
        self.proxy.reconfigure(cfg, router, prices, pipeline, token)
        self.ledger.set_limits(cfg.budget)
        self.proxy.plugins = self.plugins = plugins
        if self.pipeline is not None:
            self.pipeline.retire()  # (its stages close when its last request ends)
        if self.dashboard is not None:
            self.dashboard_api.reconfigure(cfg, token)
        self.log.level = LOG_LEVELS.get(cfg.server.log_level, 20)
        self.pipeline, self.cfg = pipeline, cfg
        self.log.info("config reloaded", reason=reason, source=cfg.source or "built-in defaults")
        return True

    @staticmethod
    def _stamp(path: str | None) -> tuple | None:
        """What tells one version of the config file from another (mtime, size and inode:
        editors that save by renaming a new file over the old one are seen too)."""
        try:
            st = os.stat(path)
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except (OSError, TypeError):
            return None

    async def _config_changed(self) -> bool:
        now = await asyncio.to_thread(self._stamp, self.cfg.source)
        return now is not None and now != self.config_seen

    async def _watch(self) -> None:
        """Reloads when the config file changes; a version a reload already read (SIGHUP sent
        after an edit) is not read again."""
        if not self.cfg.source:
            return
        while True:
            await asyncio.sleep(1.0)
            try:
                if await self._config_changed():
                    await asyncio.sleep(0.1)  # let the editor finish writing
                    await self.reload("file changed")
            except Exception as exc:  # a background task logs and keeps going
                self.log.error("config watcher failed", error=f"{type(exc).__name__}: {exc}")

    def _gauges(self) -> list[tuple[str, dict, float]]:
        """Values read at scrape time rather than counted per request."""
        m = self.metrics
        hits, misses = m.get("tokenman_cache_hits_total"), m.get("tokenman_cache_misses_total")
        cost, saved = m.total("tokenman_cost_usd_total"), net_savings(m)
        out = [("tokenman_active_requests", {}, self.proxy.in_flight),
               ("tokenman_uptime_seconds", {}, round(time.time() - m.started, 3)),
               ("tokenman_cache_hit_rate", {}, hits / (hits + misses) * 100
                if hits + misses else 0.0),
               ("tokenman_savings_percent", {}, saved / (cost + saved) * 100
                if cost + saved > 0 else 0.0),
               ("tokenman_store_errors_total", {}, self.store.errors),
               ("tokenman_store_backlog_rows", {}, self.store.backlog),
               ("tokenman_store_dropped_rows_total", {}, self.store.dropped),
               ("tokenman_log_dropped_lines_total", {}, self.log.dropped_total),
               ("tokenman_build_info", {"python": sys.version.split()[0],
                                        "version": __version__}, 1)]
        states = {CircuitBreaker.CLOSED: 0, CircuitBreaker.OPEN: 1, CircuitBreaker.HALF_OPEN: 2}
        live = self.proxy.router.providers  # (a provider a reload removed keeps no series)
        if self.tracer is not None:
            out += [("tokenman_trace_spans_total", {"result": "exported"}, self.tracer.exported),
                    ("tokenman_trace_spans_total", {"result": "dropped"}, self.tracer.dropped)]
        out += [("tokenman_provider_circuit_state", {"provider": key}, states[b.shown])
                for key, b in list(self.breakers.items()) if key in live]  # (a reload's
        # worker thread may add to it meanwhile: list() copies it in one step)
        now = time.time()
        for (scope, period, start), spent in self.ledger.spent.items():
            if period_bounds(period, now)[0] == start:
                project = scope.split(":", 1)[1] if scope.startswith("project:") else "*"
                out.append(("tokenman_budget_spend_usd", {"period": period, "project": project},
                            spent))
        return out

    def _breaker_moved(self, breaker: CircuitBreaker, old: str) -> None:
        self.log.warn("circuit breaker", provider=breaker.name, state=breaker.state, was=old,
                      failures=breaker.failures)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """asyncio's own reports (a failed TLS handshake, a callback error) in our log."""
        exc = context.get("exception")
        self.log.debug("event loop", message=context.get("message", ""),
                       error=f"{type(exc).__name__}: {exc}" if exc else "")

    async def _pruner(self) -> None:
        while True:
            days = self.cfg.metrics.retention_days  # (as the running config has it now)
            try:
                if days > 0:
                    self.store.submit(prune_job(days, time.time()))
            except Exception as exc:  # a background task logs and keeps going
                self.log.error("pruner failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(3600)

    async def _flush_log(self) -> None:
        """Four times a second: flush the batched log lines. And once a burst of traffic is
        over, hand the memory its buffers used back to the OS (malloc_trim, a millisecond)."""
        trim = malloc_trim()
        served, large, quiet_since = 0, 0, time.monotonic()
        while True:
            await asyncio.sleep(0.25)  # (the log's own thread writes its lines)
            if trim is None or self.proxy is None:
                continue
            if self.proxy.in_flight:
                quiet_since = time.monotonic()
                continue
            count = int(self.metrics.get("tokenman_requests_total"))
            if (count - served >= 1000 or self.server.large_bodies != large) \
                    and time.monotonic() - quiet_since >= 0.5:  # (a burst, or an upload)
                served, large = count, self.server.large_bodies
                trim(0)

    async def _purger(self) -> None:
        """Every five minutes: expired response-cache entries go."""
        while True:
            await asyncio.sleep(300)
            try:
                self.purge_cache()
            except Exception as exc:  # a background task logs and keeps going
                self.log.error("cache purger failed", error=f"{type(exc).__name__}: {exc}")

    def purge_cache(self) -> None:
        caches = [s for s in self.pipeline.stages if isinstance(s, ResponseCache)]
        for stage in caches:
            self.store.submit(stage.purge_job())
        if not any(type(stage) is ResponseCache for stage in caches):  # the cache is off
            self.store.submit(cache_purge_job(time.time()))

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), stop background tasks,
        then flush and close the store."""
        if self.dashboard is not None:
            self.dashboard.stop_accepting()
            await self.dashboard.close()
        if self.server is not None:
            self.server.stop_accepting()
            if not await self.server.wait_idle(self.cfg.server.shutdown_timeout):
                self.log.warn("shutdown timeout reached; closing requests still in flight")
            await self.server.close()
        if self.pipeline is not None:
            self.pipeline.retire()  # (no request uses it now: its stages close)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.tracer is not None:  # the last spans still go out, within a bound
            try:
                async with asyncio.timeout(5):
                    await self.tracer.flush(self.pool, Origin(
                        self.cfg.tracing.endpoint, tls=self.pool.tls)
                        if self.cfg.tracing.exporter == "otlp-http" else None)
            except TimeoutError:
                self.log.warn("trace export at shutdown timed out")
        if self.pool is not None:
            self.pool.close_all()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        if self.pid_path:
            try:
                os.unlink(self.pid_path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.log.error("cannot remove the PID file", path=self.pid_path, error=str(exc))
            self.pid_path = ""
        self.log.info("tokenman stopped")
        self.log.flush()

    async def run(self) -> int:
        """Foreground mode: runs until SIGINT/SIGTERM, then stops gracefully; a second signal
        exits at once."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def first_signal() -> None:
            self.log.info("stopping (a second signal exits at once)")
            stop.set()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, os._exit, 1)

        try:
            await self.start()
        except BaseException:
            await self.stop()  # gives back what start took: the PID file, the store
            raise
        release_memory()
        settle_gc()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, first_signal)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload("SIGHUP")))
        await stop.wait()
        await self.stop()
        return 0


# ================================================================================================
# §18 command line: argparse subcommands; main(argv) -> exit code
# ================================================================================================


_CONFIG_HELP = "config file (as the --config before the command)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenman", description="A local reverse proxy for LLM API calls. With no command "
        "it runs the proxy in the foreground.")
    parser.add_argument("--config", "-c", help="config file (default: $TOKENMAN_CONFIG, "
                        "~/.tokenman/tokenman.toml, ./tokenman.toml, else built-in defaults)")
    sub = parser.add_subparsers(dest="command", metavar="command")
    start = sub.add_parser("start", help="run the proxy (detached unless --foreground)")
    start.add_argument("--foreground", "-f", action="store_true",
                       help="stay in the foreground (containers, service managers)")
    start.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=_CONFIG_HELP)
    start.add_argument("--log-file", help="write the log to this file (rotated by size) "
                       "instead of stderr; detached runs use data_dir/tokenman.log")
    for name, text in (("stop", "stop a detached tokenman"),
                       ("restart", "stop, then start detached")):
        sub.add_parser(name, help=text).add_argument("--config", "-c", dest="sub_config",
                                                     metavar="FILE", help=_CONFIG_HELP)
    init = sub.add_parser("init-config", help="write the full default config")
    init.add_argument("path", nargs="?", default="~/.tokenman/tokenman.toml",
                      help="where to write it (default ~/.tokenman/tokenman.toml)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    check = sub.add_parser("check-config", help="validate a config and list every problem")
    check.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=_CONFIG_HELP)
    sub.add_parser("version", help="print the version")
    export = sub.add_parser("config-export", help="write the effective config (secrets masked)")
    export.add_argument("path", nargs="?", default="tokenman-export.toml",
                        help="where to write it (default tokenman-export.toml)")
    export.add_argument("--with-secrets", action="store_true",
                        help="write the auth token and key_refs as they are (default: ****)")
    export.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=_CONFIG_HELP)
    imp = sub.add_parser("config-import", help="validate a config file and make it the active "
                         "one (a running tokenman reloads it)")
    imp.add_argument("file", help="the config file to validate and install")
    imp.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=_CONFIG_HELP)
    keys = sub.add_parser("keys", help="provider keys in the OS keyring")
    keys.add_argument("action", choices=("list", "set", "delete"))
    keys.add_argument("provider", nargs="?")
    keys.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=_CONFIG_HELP)
    status = sub.add_parser("status", help="is tokenman running? its live stats")
    status.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=_CONFIG_HELP)
    stats = sub.add_parser("stats", help="usage and cost from the request log")
    stats.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=_CONFIG_HELP)
    stats.add_argument("--since", default="24h", help="window, e.g. 30m, 24h, 7d (default 24h)")
    stats.add_argument("--by", choices=tuple(STATS_GROUPS), default="model")
    stats.add_argument("--json", action="store_true", help="JSON for scripts")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_path = getattr(args, "sub_config", None) or args.config
    command = args.command or "start"
    if command == "version":
        print(f"tokenman {__version__} (python {sys.version.split()[0]})")
        return 0
    if command == "init-config":
        return _init_config(os.path.expanduser(args.path), args.force)
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        print(f"tokenman: {exc}", file=sys.stderr)
        return 1
    if command == "config-export":
        return _write_private(args.path, render_config(
            cfg, f"effective config ({cfg.source or 'built-in defaults'} + environment)",
            mask=not args.with_secrets))
    if command == "config-import":
        return _config_import(cfg, args.file)
    if command == "keys":
        return _keys(cfg, args.action, args.provider)
    if command == "check-config":
        print(f"configuration ok: {cfg.source or 'built-in defaults'}")
        for warning in cfg.warnings:
            print(f"warning: {warning}")
        # a key that cannot be read here is a warning, not a failure: a CI job without the
        # secrets may check a config that is fine where it runs
        for key, p in cfg.providers.items():
            for problem in _key_problem(p.key_ref) if p.enabled else []:
                print(f"warning: providers.{key}.key_ref: {problem} (the provider is unusable "
                      "here until it is)")
        return 0
    if command == "stats":
        return _stats(cfg, args)
    if command == "status":
        return _status(cfg)
    if command == "stop":
        return _stop(cfg)
    if command == "restart":
        _stop(cfg)
        return _detach(cfg)
    if args.command == "start" and not args.foreground:  # plain `tokenman.py` stays in front
        return _detach(cfg)
    log = None
    if getattr(args, "log_file", None):
        os.makedirs(os.path.dirname(os.path.abspath(args.log_file)), exist_ok=True)
        log = Logger(cfg.server.log_level, RotatingFile(args.log_file), cfg.server.log_format,
                     buffered=True)
    try:
        return asyncio.run(App(cfg, log=log).run())
    except (OSError, TokenmanError) as exc:  # the port is taken, or tokenman already runs
        print(f"tokenman: cannot start: {exc}", file=sys.stderr)
        if log is not None:  # a detached start: its stderr goes nowhere, its log is read
            log.error("cannot start", error=str(exc))
            log.flush()
        return 1


def _detach(cfg: Config) -> int:
    """Starts tokenman in the background (a new session, logs to data_dir/tokenman.log) and
    waits until it has claimed its PID file, or reports why it did not."""
    pid = read_pid(cfg.data_dir)
    if pid and pid_alive(pid):
        print(f"tokenman: already running (pid {pid})", file=sys.stderr)
        return 1
    os.makedirs(cfg.data_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(cfg.data_dir, "tokenman.log")
    argv = [sys.executable, os.path.abspath(__file__), "start", "--foreground",
            "--log-file", log_path]
    if cfg.source:
        argv += ["--config", os.path.abspath(cfg.source)]
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if child.poll() is not None:
            print(f"tokenman: failed to start (exit {child.returncode}){_last_error(log_path)};"
                  f" see {log_path}", file=sys.stderr)
            return 1
        if read_pid(cfg.data_dir) == child.pid:
            print(f"tokenman started (pid {child.pid}); log: {log_path}")
            return 0
        time.sleep(0.05)
    print(f"tokenman: no PID file after 15 s; see {log_path}", file=sys.stderr)
    return 1


def _key_problem(key_ref: str) -> list[str]:
    if key_ref.startswith("keyring://"):  # not asked here: it may run a tool or prompt
        return []
    try:
        resolve_key(key_ref, os.environ)
    except ValueError as exc:
        return [str(exc)]
    return []


def _last_error(log_path: str) -> str:
    """": <the last ERROR line's message>" of a log file, or ""."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            lines = [line for line in fh.readlines()[-50:] if " ERROR " in line
                     or '"level": "error"' in line]
    except OSError:
        return ""
    return ": " + lines[-1].split(" ERROR ", 1)[-1].strip()[:300] if lines else ""


def _stop(cfg: Config) -> int:
    pid = read_pid(cfg.data_dir)
    if not pid or not pid_alive(pid):
        if pid:
            try:
                os.unlink(os.path.join(cfg.data_dir, "tokenman.pid"))
            except OSError:
                pass
        print("tokenman is not running" + (" (stale PID file removed)" if pid else ""))
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + cfg.server.shutdown_timeout + 10
    while time.monotonic() < deadline:
        if not pid_alive(pid) or read_pid(cfg.data_dir) != pid:
            print(f"tokenman stopped (pid {pid})")
            return 0
        time.sleep(0.05)
    print(f"tokenman: pid {pid} did not stop within {cfg.server.shutdown_timeout + 10:.0f} s",
          file=sys.stderr)
    return 1


def _status(cfg: Config) -> int:
    import urllib.request
    pid = read_pid(cfg.data_dir)
    if not pid or not pid_alive(pid):
        print("tokenman is not running" + (" (stale PID file)" if pid else ""))
        return 1
    s = cfg.server
    host = "127.0.0.1" if s.bind_address in ("0.0.0.0", "::", "") else s.bind_address
    scheme = "https" if s.tls_enabled else "http"
    print(f"tokenman is running (pid {pid})")
    if not cfg.dashboard.enabled:
        return 0
    req = urllib.request.Request(f"{scheme}://{host}:{s.dashboard_port}/api/stats")
    if cfg.auth.enabled:
        req.add_header("Authorization", "Bearer " + resolve_secret(cfg.auth.token, os.environ))
    ctx = None
    if s.tls_enabled:  # our own certificate, possibly self-signed, possibly for another name
        ctx = load_ssl().create_default_context(cafile=s.cert_file)
        ctx.check_hostname = False
    try:
        with urllib.request.urlopen(req, timeout=3, context=ctx) as resp:
            stats = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        print(f"  (dashboard unreachable: {exc})")
        return 0
    print(f"  uptime:          {stats['uptime']}")
    print(f"  requests:        {stats['total_requests']} ({stats['errors']} not ok, "
          f"{stats['active_requests']} active)")
    print(f"  tokens:          {stats['tokens_in']} in, {stats['tokens_out']} out, "
          f"{stats['tokens_saved']} saved")
    print(f"  cost:            ${stats['cost_usd']:.4f}")
    print(f"  savings:         ${stats['savings_usd']:.4f} ({stats['savings_percent']}%)")
    print(f"  cache hit rate:  {stats['cache_hit_rate']}% ({stats['cache_hits']} hits / "
          f"{stats['cache_misses']} misses)")
    return 0


def _write_private(path: str, text: str) -> int:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)  # atomic: a watching tokenman never reads half a file
    print(f"wrote {path}")
    return 0


def _config_import(cfg: Config, source: str) -> int:
    try:
        load_config(source)
    except ConfigError as exc:
        print(f"tokenman: {source} not imported: {exc}", file=sys.stderr)
        return 1
    target = cfg.source or os.path.expanduser("~/.tokenman/tokenman.toml")
    with open(source, encoding="utf-8") as fh:
        text = fh.read()
    code = _write_private(target, text)
    with open(target, encoding="utf-8") as fh:  # verify it landed
        if fh.read() != text:
            print(f"tokenman: {target} does not hold the imported text", file=sys.stderr)
            return 1
    return code


def _keys(cfg: Config, action: str, provider: str | None) -> int:
    import getpass
    tool = keyring_tool()
    if action == "list":
        for key in cfg.providers:
            try:
                keyring_get(key, os.environ)
                print(f"  {key}: ****")
            except ValueError:
                print(f"  {key}: (none)")
        return 0
    if tool is None:
        print("tokenman: no OS keyring tool here (secret-tool on Linux, security on macOS); "
              "use key_ref = \"env:VAR\" or \"file:///path\"", file=sys.stderr)
        return 1
    if not provider:
        print("tokenman: keys set|delete need a provider name", file=sys.stderr)
        return 2
    if action == "set":
        secret = getpass.getpass(f"key for {provider}: ") if sys.stdin.isatty() \
            else sys.stdin.readline().strip()
        argv = (tool + ["store", "--label", f"tokenman {provider}", "service", "tokenman",
                        "account", provider] if tool[0] == "secret-tool" else
                tool + ["add-generic-password", "-U", "-s", "tokenman", "-a", provider, "-w",
                        secret])
        done = subprocess.run(argv, input=secret, capture_output=True, text=True, timeout=30)
    else:
        argv = (tool + ["clear", "service", "tokenman", "account", provider]
                if tool[0] == "secret-tool" else
                tool + ["delete-generic-password", "-s", "tokenman", "-a", provider])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode:
        print(f"tokenman: {tool[0]} failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"{action}: {provider}")
    return 0


def _init_config(path: str, force: bool) -> int:
    if os.path.exists(path) and not force:
        print(f"tokenman: {path} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(render_default_config())
    print(f"wrote {path}")
    return 0


def _stats(cfg: Config, args: argparse.Namespace) -> int:
    path = os.path.join(cfg.data_dir, "tokenman.db")
    if not os.path.exists(path):
        print(f"tokenman: no request log at {path}", file=sys.stderr)
        return 1
    try:
        since = parse_since(args.since, time.time())
    except ValueError as exc:
        print(f"tokenman: --since: {exc}", file=sys.stderr)
        return 2
    try:
        rows = usage_summary(Store(path, Logger("error")), since, args.by)
    except sqlite3.Error as exc:
        print(f"tokenman: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"since": utc_iso(since), "by": args.by, "rows": rows}, indent=2))
        return 0
    cols = (args.by, "requests", "input_tokens", "output_tokens", "cache_read_tokens",
            "cache_write_tokens", "cost_usd", "savings_usd", "errors")
    money = ("cost_usd", "savings_usd")
    table = [[f"{r[c]:.6f}" if c in money else str(r[c]) for c in cols] for r in rows]
    total = ["TOTAL"] + [f"{sum(r[c] for r in rows):.6f}" if c in money
                         else str(sum(r[c] for r in rows)) for c in cols[1:]]
    widths = [max(len(c), *(len(row[i]) for row in table + [total])) for i, c in enumerate(cols)]
    print(f"usage since {utc_iso(since)} by {args.by}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in table + [total]:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                        for i, (v, w) in enumerate(zip(row, widths))))
    by_source = {s: sum(r["savings_by_source"][s] for r in rows) for s in SAVING_SOURCES}
    if any(by_source.values()):
        print("savings by source: " + ", ".join(f"{s} ${v:.6f}" for s, v in by_source.items()))
    unpriced = sum(r["unpriced_requests"] for r in rows)
    if unpriced:
        print(f"note: {unpriced} request(s) used models without a price (cost unknown, not 0)")
    return 0


def run_cli(argv: list[str] | None = None) -> int:
    """main(), quiet when its output is piped into a reader that stops early (`| head`)."""
    try:
        code = main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit flush)
        return 1


if __name__ == "__main__":
    sys.exit(run_cli())
