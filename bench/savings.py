#!/usr/bin/env python3
"""Token savings of tokenman's prompt-cache hints on a realistic multi-turn agent transcript.

Drives a 25-turn, Claude-Code-shaped conversation (12 tool definitions, a long system prompt, tool
calls and tool results growing the history every turn) through a real tokenman process twice,
once with `compression.cache_hints` off and once on, against a fake Anthropic upstream that
applies Anthropic's prompt-caching rules to what it receives:

- a prefix is cached at each `cache_control` breakpoint (tools -> system -> messages order);
- a request reads the longest cached prefix that matches byte for byte, looking back up to 20
  block boundaries before each breakpoint (cache_read tokens),
  writes the prefix up to its last breakpoint beyond that (cache_creation tokens, 5m rate),
  and pays the rest as input;
- prefixes shorter than the model's minimum (1024 tokens for Sonnet) are not cached.

Token counts come from tokenman's own estimator on the JSON text of each part, so the absolute
numbers are approximate; the comparison between the two runs is what matters. The figures are
read back from tokenman's request log (`stats --json`), i.e. exactly what a user would see.

    python3 bench/savings.py            # prints a table; --json for machines
Loopback only, bounded: 2 x 25 requests.
"""
import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import tokenman as tm  # noqa: E402  (the estimator and the price table only)

MODEL = "claude-sonnet-4-5-20250929"
WORDS = ("file", "read", "write", "search", "the", "repository", "function", "returns", "value",
         "error", "test", "build", "command", "path", "line", "output", "class", "module")


def transcript(turns: int, seed: int = 1) -> list[dict]:
    """The request the agent sends at each turn (each one extends the previous)."""
    rng = random.Random(seed)

    def para(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))
    tools = [{"name": f"tool_{i}", "description": para(150), "input_schema": {
        "type": "object", "properties": {"path": {"type": "string"}}}} for i in range(12)]
    system = para(1500)
    messages: list[dict] = []
    requests = []
    for t in range(turns):
        messages.append({"role": "user", "content": para(30)})
        requests.append({"model": MODEL, "max_tokens": 2048, "tools": tools, "system": system,
                         "messages": json.loads(json.dumps(messages))})
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": para(15)},
            {"type": "tool_use", "id": f"toolu_{t}", "name": "tool_2",
             "input": {"path": f"src/m{t}.py"}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{t}", "content": para(300)}]})
        messages.append({"role": "assistant", "content": para(40)})
    return requests


class CachingProvider:
    """A fake Anthropic that bills like Anthropic's prompt cache (see the module docstring)."""

    def __init__(self) -> None:
        self.cache: dict[str, float] = {}  # prefix text -> expiry

    def usage(self, body: dict) -> dict:
        # The cache matches the rendered prompt: a string is the same as one text block, and
        # cache_control markers are not part of the content.
        def render(block: dict) -> str:
            return json.dumps({k: v for k, v in block.items() if k != "cache_control"})

        def blocks(content) -> list:
            return content if isinstance(content, list) else [{"type": "text", "text": content}]
        parts: list[tuple[str, bool]] = []  # (rendered part, breakpoint after it)
        for tool in body.get("tools", []):
            parts.append((render(tool), "cache_control" in tool))
        for block in blocks(body.get("system") or ""):
            parts.append((render(block), "cache_control" in block))
        for msg in body["messages"]:
            for block in blocks(msg["content"]):
                parts.append((msg["role"] + render(block), "cache_control" in block))
        now = time.monotonic()
        prefix, read, write_end, total = "", 0, 0, 0
        tokens = []
        for text, mark in parts:
            prefix += text
            total += tm.estimate_tokens(text)
            tokens.append((prefix, total, mark))
        for i, (_, _, mark) in enumerate(tokens):  # longest cached prefix: Anthropic checks
            if mark:                              # the 20 block boundaries before a breakpoint
                for pfx, count, _ in tokens[max(0, i - 20):i + 1]:
                    if self.cache.get(pfx, 0) > now:
                        read = max(read, count)
        for pfx, count, mark in tokens:  # the request writes up to its last breakpoint
            if mark and count >= 1024:
                write_end = count
                self.cache[pfx] = now + 300
        creation = max(0, write_end - read)
        return {"input_tokens": total - read - creation, "cache_read_input_tokens": read,
                "cache_creation_input_tokens": creation, "output_tokens": 120}

    async def handle(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = json.loads(await reader.readexactly(length))
                out = json.dumps({"id": "msg", "type": "message", "role": "assistant",
                                  "model": body["model"], "stop_reason": "end_turn",
                                  "content": [{"type": "text", "text": "ok"}],
                                  "usage": self.usage(body)}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(out), out))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_once(hints: bool, turns: int) -> dict:
    provider = CachingProvider()
    server = await asyncio.start_server(provider.handle, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "t.toml")
        with open(cfg, "w") as fh:
            fh.write(f'[server]\nproxy_port = {port}\ndata_dir = "{tmp}"\nlog_level = "warn"\n'
                     f'[providers.anthropic]\napi_base = "http://127.0.0.1:{up_port}"\n'
                     f'[compression.cache_hints]\nenabled = {"true" if hints else "false"}\n')
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "..", "tokenman.py"),
                                 "--config", cfg], stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    break
                except OSError:
                    await asyncio.sleep(0.02)
            for req in transcript(turns):
                body = json.dumps(req).encode()
                writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\n"
                             b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
            writer.close()
        finally:
            proc.terminate()
            proc.wait(10)
            server.close()
        out = subprocess.run([sys.executable, os.path.join(HERE, "..", "tokenman.py"), "stats",
                              "--config", cfg, "--json", "--since", "1h"],
                             capture_output=True, text=True, check=True)
    row = json.loads(out.stdout)["rows"][0]
    return {"hints": hints, "requests": row["requests"], "input": row["input_tokens"],
            "cache_read": row["cache_read_tokens"], "cache_write": row["cache_write_tokens"],
            "cost_usd": row["cost_usd"], "saved_prompt_cache_usd":
                row["savings_by_source"]["prompt_cache"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=25)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    off = asyncio.run(run_once(False, args.turns))
    on = asyncio.run(run_once(True, args.turns))
    if args.json:
        print(json.dumps({"off": off, "on": on}, indent=2))
        return 0
    print(f"{args.turns}-turn agent transcript, {MODEL}, costs from tokenman's request log")
    print(f"{'':22}{'hints off':>14}{'hints on':>14}")
    for key in ("input", "cache_read", "cache_write", "cost_usd", "saved_prompt_cache_usd"):
        print(f"{key:22}{off[key]:>14}{on[key]:>14}" if isinstance(off[key], int) else
              f"{key:22}{off[key]:>14.4f}{on[key]:>14.4f}")
    print(f"cost reduction: {(1 - on['cost_usd'] / off['cost_usd']) * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
