#!/usr/bin/env python3
"""bench/run.py: tokenman's performance harness (standard library only; wrk used when installed).

Starts bench/mock_upstream.py and tokenman (with a profile config), drives load from a separate
process (wrk when installed, else bench/loadgen.py) and prints, for each API and concurrency, the
figures for a direct call to the mock next to the same figures through tokenman, with the
difference and the ratio, then checks them against the budget of the performance issue. Before
the profiles it measures the machine: its speed, how much slower code runs just after the CPU
idled, and its floor: bench/relay_floor.py (a byte relay, no HTTP) in tokenman's place, so the
table tells what any process in the path costs here from what tokenman adds to it.

    python bench/run.py                         # default profile, full run (a few minutes)
    python bench/run.py --quick                 # about a minute
    python bench/run.py --all-profiles          # default, bare and full, one after the other
    python bench/run.py --config my.toml --json new.json --compare old.json

Pinning (2+ cores): tokenman on CPU 1; this script, the mock and the load generator on CPU 0.
Everything is on 127.0.0.1, every phase is bounded in time, and every child process is stopped
on exit, Ctrl-C or error (and, on Linux, killed by the kernel if this script dies).

Sections: §01 constants  §02 machine and /proc  §03 child processes  §04 configs
          §05 load runners  §06 scenarios  §07 budget  §08 report and compare  §09 command line
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import datetime
import http.client
import json
import math
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib

# ================================================================================================
# §01 constants: scenario defaults, request bodies, budget limits
# ================================================================================================

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKENMAN = os.path.join(ROOT, "tokenman.py")
MOCK = os.path.join(HERE, "mock_upstream.py")
LOADGEN = os.path.join(HERE, "loadgen.py")
FLOOR = os.path.join(HERE, "relay_floor.py")
PROFILES = {name: os.path.join(HERE, "profiles", name + ".toml")
            for name in ("default", "bare", "full")}
JSON_VERSION = 1
PYTHON = [sys.executable]      # the interpreter (and flags) of every Python child; see --no-site

APIS = ("anthropic", "openai")
PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
MODELS = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4o-mini"}
HEADERS = {  # dummy keys: tokenman passes the client's own key through (no key_ref)
    "anthropic": {"Content-Type": "application/json", "x-api-key": "sk-ant-bench-dummy",
                  "anthropic-version": "2023-06-01"},
    "openai": {"Content-Type": "application/json",
               "Authorization": "Bearer sk-bench-dummy"},
}
PROMPT = ("You are a concise assistant. Answer the question in one short paragraph and do not "
          "use lists. Question: what does a reverse proxy do for an application that calls "
          "a large language model API over HTTPS? Ticket qqqqqq.")
# Both generators put a different six-letter word in place of VARY in every request (from a
# random start, so no two phases repeat one): the user's message is new on every call, as in real
# traffic, and a proxy that remembers texts it scanned (tokenman does: agents resend history) is
# not flattered by byte-identical requests. Letters only: which PII detectors run stays the same.
VARY = "qqqqqq"

CONCURRENCY = (1, 16, 64, 256)
STREAM_CONCURRENCY = (1, 16, 64)
STREAM_CHUNKS = 50
STREAM_INTERVAL_MS = 1.0
HOLD_STREAMS = 1000
HOLD_CHUNKS = 20
HOLD_INTERVAL_MS = 150.0
PHASE_SECONDS = 5.0
QUICK_PHASE_SECONDS = 2.0
LOADGEN_WARMUP = 0.25          # seconds at the start of each asyncio phase not measured
COLD_RUNS = 5
START_TIMEOUT = 15.0           # a child that is not answering after this has failed
STOP_TIMEOUT = 15.0
OTHER_CPU_WARN = 0.10         # other processes' CPU (share of one core) that flags a phase
CALIBRATION_DRIFT = 0.10       # host speed change (before vs after, old vs new) worth a warning
QUIET_WAIT = 60.0              # longest wait for a quiet machine before measuring a pair again
NOFILE_WANTED = 65536          # 1,000 streams = 1,000 client + 1,000 upstream sockets, and more

# The budget, for the default pipeline: (key, description, limit, unit, kind)
BUDGET = {
    "added_p50_c1_us": 150.0,
    "added_p99_c1_us": 1000.0,
    "cpu_per_1k_s": 0.15,
    "rps_c64": 5000.0,
    "stream_added_ttfb_p50_us": 500.0,
    "stream_added_chunk_delay_us": 50.0,   # "no added inter-chunk delay": 5 % of 1 ms pacing
    "hold_rss_mb": 100.0,
    "idle_rss_mb": 25.0,
    "after_rss_ratio": 1.10,
    "cold_start_ms": 300.0,
}

# ================================================================================================
# §02 machine facts and /proc readers
# ================================================================================================

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int, main_thread: bool = False) -> float | None:
    """User + system CPU of a process (all its threads, dead ones included), from /proc; with
    main_thread, of its first thread only (tokenman's event loop)."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    try:
        with open(path, "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def cpu_busy() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat: user, nice
    and system time (interrupt time left out, so our own loopback traffic cannot count as
    someone else's), and the time the hypervisor gave to other guests."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            vals = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    steal = vals[7] if len(vals) > 7 else 0
    return (vals[0] + vals[1] + vals[2]) / CLK_TCK, steal / CLK_TCK


def rss_mb(pid: int) -> tuple[float | None, float | None]:
    """(VmRSS, VmHWM) in MB (10^6 bytes), from /proc/PID/status."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024 / 1e6
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    return rss, hwm


def open_fds(pid: int) -> int | None:
    """Open file descriptors of a process (a leak check: sockets not closed)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def reset_peak(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def machine_info(pin: bool, wrk: str | None, script: str) -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            kb = int(fh.readline().split()[1])
            mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    commit = _commit_of(script)
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cpus": os.cpu_count(), "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0] + (" -S" if "-S" in PYTHON else ""),
        "python_env": " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                               if k.startswith("PYTHON")) or "none",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": commit,
        "tokenman": script,
        "tokenman_sha256": _sha256(script)[:12],
        "pinning": ("tokenman on CPU 1; run.py, mock and load generator on CPU 0" if pin
                    else "none (fewer than 2 CPUs or --no-pin)"),
        "generator": wrk or "asyncio loadgen (bench/loadgen.py)",
    }


def _commit_of(script: str) -> str:
    """The git commit of a tokenman.py: from --rev's marker file, else its checkout's HEAD
    (with +dirty when the file has uncommitted changes)."""
    marker = os.path.join(os.path.dirname(script), "COMMIT")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as fh:
            return fh.read().strip()
    where = os.path.dirname(script)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--", script],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + "+dirty" if commit and dirty else commit


def _sha256(path: str) -> str:
    import hashlib
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return ""


def wrk_version(path: str) -> str:
    try:
        out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=5)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0].split(" [")[0] if text else "wrk"
    except (OSError, subprocess.SubprocessError):
        return "wrk"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(NOFILE_WANTED, hard)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# ================================================================================================
# §03 child processes: pinned, registered, always stopped
# ================================================================================================


_LIBC = None


def _preexec(cpus: set[int] | None):
    def setup() -> None:
        if cpus is not None:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass
        if _LIBC is not None:
            try:
                _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with this script
            except Exception:
                pass
    return setup


class Children:
    """Every process this script starts; stop_all() runs on exit, error and Ctrl-C."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, cmd: list[str], cpus: set[int] | None, **kw) -> subprocess.Popen:
        global _LIBC
        if _LIBC is None and sys.platform.startswith("linux"):
            try:
                _LIBC = ctypes.CDLL(None, use_errno=True)
            except OSError:
                _LIBC = False
        proc = subprocess.Popen(cmd, preexec_fn=_preexec(cpus), **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGINT,
             timeout: float = STOP_TIMEOUT) -> int | None:
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except OSError:
                pass
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(self.procs):
            if proc.poll() is None:
                try:
                    proc.terminate()
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for proc in list(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()


CHILDREN = Children()


def _start_listener(cmd: list[str], cpus: set[int] | None, what: str) -> tuple:
    """Starts a child that prints `... listening on HOST:PORT`; returns (proc, port)."""
    proc = CHILDREN.spawn(cmd, cpus, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline().decode() if ready else ""
    m = re.search(r"listening on [0-9.]+:([0-9]+)", line)
    if not m:
        CHILDREN.stop(proc)
        raise RuntimeError(f"{what} did not start: {line!r}")
    return proc, int(m.group(1))


def start_mock(cpus: set[int] | None, port: int = 0, extra: tuple = ()) -> tuple:
    """Starts the mock; returns (proc, port) once it listens."""
    return _start_listener([*PYTHON, MOCK, "--port", str(port), *extra], cpus, "mock")


def start_floor(cpus: set[int] | None, mock_port: int) -> tuple:
    """Starts the byte relay in front of the mock; returns (proc, port) once it listens."""
    return _start_listener([*PYTHON, FLOOR, "--upstream", f"127.0.0.1:{mock_port}"], cpus,
                           "byte relay")


def start_tokenman(script: str, cfg_path: str, log_path: str, cpus: set[int] | None,
                   cprofile: str = "") -> subprocess.Popen:
    cmd = list(PYTHON)
    if cprofile:
        cmd += ["-m", "cProfile", "-o", cprofile]
    cmd += [script, "--config", cfg_path]
    log = open(log_path, "ab")
    try:
        return CHILDREN.spawn(cmd, cpus, stdout=log, stderr=subprocess.STDOUT,
                              cwd=os.path.dirname(cfg_path))
    finally:
        log.close()

# A fixed pure-Python workload (JSON, regex, dict and list churn: what a proxy does) timed in a
# child on tokenman's CPU before and after the run. A shared host's speed drifts by tens of
# percent within minutes; this tells a slow host from a slow commit.
_CALIBRATION = r"""
import json, re, statistics, time
obj = {"model": "m", "max_tokens": 256, "messages": [
    {"role": "user", "content": "what does a reverse proxy do " * 8}] * 4}
rx = re.compile(r"[A-Za-z]+ing\b|\d{3}-\d{4}")
runs = []
for _ in range(5):
    t = time.perf_counter()
    for i in range(400):
        text = json.dumps(obj)
        back = json.loads(text)
        rx.findall(text)
        d = {k: [v, i] for k, v in back.items()}
        sorted(d)
    runs.append((time.perf_counter() - t) * 1000)
print(statistics.median(runs))
"""


# The same kind of small workload (about 5 us: one step of what a proxy does per request) timed
# back to back, then as the first thing after the CPU idled 0.2 ms (a round trip at c=1), 1 ms
# (a paced stream's chunks) and 20 ms. On a machine whose caches survive a short idle they are
# close; on a shared VM the host reclaims them and the first run after an idle is many times
# slower. A proxy pays that whenever its code ran last an idle ago: at c=1 between the steps of
# every request, at the start of every paced stream; a byte relay runs too little code to notice.
_COLD_PROBE = r"""
import json, re, statistics, sys, time
body = json.dumps({"model": "m", "max_tokens": 256, "stream": True, "messages": [
    {"role": "user", "content": "what does a reverse proxy do for an app " * 4}]})
rx = re.compile(r"[0-9]{3}-[0-9]{4}|@[a-z]+[.]")
def work():
    obj = json.loads(body)
    rx.search(obj["messages"][0]["content"])
    return {k: v for k, v in obj.items() if k != "stream"}
def timed():
    t = time.perf_counter()
    work()
    return (time.perf_counter() - t) * 1e6
out = {"hot_us": statistics.median([timed() for _ in range(500)][100:])}
for gap in (0.0002, 0.001, 0.02):
    samples = []
    for _ in range(max(20, int(float(sys.argv[1]) / (gap + 0.0005)))):
        time.sleep(gap)
        samples.append(timed())
    out[f"idle_{gap * 1000:g}ms_us"] = statistics.median(samples)
print(json.dumps({k: round(v, 1) for k, v in out.items()}))
"""


def cold_probe(cpus: set[int] | None, seconds: float = 1.5) -> dict:
    """The after-idle slowdown of this machine on these CPUs (see _COLD_PROBE), or {}."""
    proc = CHILDREN.spawn([*PYTHON, "-c", _COLD_PROBE, str(seconds)], cpus, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=60)
        return json.loads(out.decode())
    except (subprocess.TimeoutExpired, ValueError):
        return {}
    finally:
        CHILDREN.stop(proc, signal.SIGKILL)


def calibrate(cpus: set[int] | None) -> float | None:
    """Milliseconds the calibration workload takes on these CPUs (median of 5), or None."""
    proc = CHILDREN.spawn([*PYTHON, "-c", _CALIBRATION], cpus, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=60)
        return round(float(out.decode().strip()), 2)
    except (subprocess.TimeoutExpired, ValueError):
        return None
    finally:
        CHILDREN.stop(proc, signal.SIGKILL)

# ================================================================================================
# §04 configs: profile TOML -> ports, data_dir and mock address filled in -> TOML
# ================================================================================================


def _toml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: dict, prefix: str = "") -> str:
    """A minimal TOML writer: scalars and arrays first, then nested tables."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_scalar(value)}")
    out = ""
    if prefix and (lines or not tables):
        out += f"[{prefix}]\n"
    out += "".join(line + "\n" for line in lines)
    for key, value in tables:
        name = f"{prefix}.{key}" if prefix else key
        out += ("\n" if out else "") + dump_toml(value, name)
    return out


def render_config(profile_path: str, port: int, data_dir: str, mock_port: int) -> str:
    with open(profile_path, "rb") as fh:
        data = tomllib.load(fh)
    for table in ("server", "providers"):
        if not isinstance(data.setdefault(table, {}), dict):
            raise ValueError(f"{table} must be a table ([{table}])")
    server = data["server"]
    server["bind_address"] = "127.0.0.1"
    server["proxy_port"] = port
    server["data_dir"] = data_dir
    server["dashboard_port"] = free_port()  # never the default 7678: another instance may hold it
    providers = data.setdefault("providers", {})
    for name in APIS:
        providers.setdefault(name, {})
    for prov in providers.values():
        if isinstance(prov, dict):
            prov["api_base"] = f"http://127.0.0.1:{mock_port}"
    return dump_toml(data)

# ================================================================================================
# §05 load runners: wrk (buffered requests) and the asyncio generator (everything else)
# ================================================================================================


def request_body(api: str, stream: bool = False, include_usage: bool = False) -> str:
    obj: dict = {"model": MODELS[api], "max_tokens": 256}
    if api == "anthropic":
        obj["system"] = "You are a helpful assistant."
        obj["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        obj["messages"] = [{"role": "system", "content": "You are a helpful assistant."},
                           {"role": "user", "content": PROMPT}]
    if stream:
        obj["stream"] = True
        if include_usage:
            obj["stream_options"] = {"include_usage": True}
    return json.dumps(obj, separators=(",", ":"))


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of a sorted list."""
    if not values:
        return None
    k = min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))
    return values[k]


_WRK_LUA = r"""
wrk.method = "POST"
%(headers)s
local body = [==[%(body)s]==]
local at = body:find("%(vary)s", 1, true)
local head, tail = body:sub(1, at - 1), body:sub(at + %(vary_len)d)
local n = %(start)d
function request()
  n = n + 1
  local k, w = n, {}
  for i = 1, %(vary_len)d do
    w[i] = string.char(97 + k %% 26)
    k = math.floor(k / 26)
  end
  return wrk.format(nil, nil, nil, head .. table.concat(w) .. tail)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "\nWRKJSON {\"requests\":%%d,\"duration_us\":%%d,\"connect\":%%d,\"read\":%%d," ..
    "\"write\":%%d,\"status\":%%d,\"timeout\":%%d,\"p50\":%%.1f,\"p99\":%%.1f," ..
    "\"p999\":%%.1f,\"mean\":%%.1f,\"max\":%%.1f}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max))
end
"""


class Sampler:
    """Watches one process during a phase: CPU from /proc/PID/stat, peak RSS from VmHWM
    (reset at the start) and from sampling every 20 ms."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.cpu0 = cpu_seconds(pid) if pid else None
        self.main0 = cpu_seconds(pid, True) if pid else None
        self.hwm_ok = reset_peak(pid) if pid else False
        self.peak = 0.0
        self.t0 = time.perf_counter()

    def sample(self) -> None:
        if self.pid:
            rss, _ = rss_mb(self.pid)
            if rss:
                self.peak = max(self.peak, rss)

    def finish(self) -> dict:
        if not self.pid:
            return {}
        wall = time.perf_counter() - self.t0
        cpu1 = cpu_seconds(self.pid)
        main1 = cpu_seconds(self.pid, True)
        rss, hwm = rss_mb(self.pid)
        peak = max(self.peak, rss or 0.0, hwm or 0.0 if self.hwm_ok else 0.0)
        cpu = (cpu1 - self.cpu0) if cpu1 is not None and self.cpu0 is not None else None
        main = (main1 - self.main0) if main1 is not None and self.main0 is not None else None
        return {"cpu_s": cpu, "cpu_util": cpu / wall if cpu is not None and wall else None,
                "main_cpu_s": main,
                "rss_peak_mb": peak, "rss_end_mb": rss}


def wait_sampling(procs: list[subprocess.Popen], samplers: list[Sampler],
                  timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        for s in samplers:
            s.sample()
        if time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            raise RuntimeError("load generator overran its time bound")
        time.sleep(0.02)


def run_wrk(wrk: str, port: int, api: str, conc: int, seconds: float, workdir: str,
            samplers: list[Sampler], cpus: set[int] | None) -> dict:
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in HEADERS[api].items())
    script = os.path.join(workdir, f"wrk-{api}.lua")
    with open(script, "w") as fh:
        fh.write(_WRK_LUA % {"body": request_body(api), "headers": headers, "vary": VARY,
                             "vary_len": len(VARY), "start": random.randrange(26 ** len(VARY))})
    cmd = [wrk, "-t1", f"-c{conc}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", script, f"http://127.0.0.1:{port}{PATHS[api]}"]
    out_path = os.path.join(workdir, "wrk.out")
    with open(out_path, "wb") as out:
        proc = CHILDREN.spawn(cmd, cpus, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_sampling([proc], samplers, seconds + 30)
        finally:
            CHILDREN.stop(proc, signal.SIGKILL)
    text = open(out_path, encoding="utf-8", errors="replace").read()
    m = re.search(r"WRKJSON (\{.*\})", text)
    if not m:
        raise RuntimeError(f"wrk gave no result: {text[-500:]}")
    w = json.loads(m.group(1))
    secs = w["duration_us"] / 1e6
    errors = w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
    return {"generator": "wrk", "requests": w["requests"], "rps": w["requests"] / secs,
            "p50_us": w["p50"], "p99_us": w["p99"], "p999_us": w["p999"],
            "mean_us": w["mean"], "max_us": w["max"], "errors": errors,
            # closed loop: latencies of one connection cannot add up to more than the run; when
            # they do, wrk was stalled (preempted, or the VM paused) and the figures are suspect
            "latency_sum_ratio": w["requests"] * w["mean"] / (conc * w["duration_us"])
            if w["duration_us"] else None,
            "error_kinds": {k: w[k] for k in ("connect", "read", "write", "status", "timeout")
                            if w[k]}}


def run_loadgen(spec: dict, procs: int, samplers: list[Sampler], cpus: set[int] | None,
                workdir: str) -> dict:
    """Runs bench/loadgen.py in `procs` processes (connections split between them) and merges
    their samples."""
    conc = int(spec["concurrency"])
    procs = max(1, min(procs, conc))
    running = []
    for i in range(procs):
        part = dict(spec, concurrency=conc // procs + (1 if i < conc % procs else 0))
        out_path = os.path.join(workdir, f"loadgen-{i}.json")
        out = open(out_path, "wb")
        running.append((CHILDREN.spawn([*PYTHON, LOADGEN, json.dumps(part)], cpus,
                                       stdout=out, stderr=subprocess.STDOUT), out, out_path))
    bound = float(spec.get("duration", 5)) + float(spec.get("warmup", 0)) \
        + float(spec.get("timeout", 10)) + 30
    try:
        wait_sampling([p for p, _, _ in running], samplers, bound)
    finally:
        for p, out, _ in running:
            CHILDREN.stop(p, signal.SIGKILL)
            out.close()
    merged: dict = {"requests": 0, "measured": 0, "rps": 0.0, "errors": 0, "error_kinds": {},
                    "lat": [], "ttfb": [], "gap": [], "body": [], "gen_cpu_s": 0.0,
                    "max_open": 0, "first_error": ""}
    for _, _, path in running:
        text = open(path, encoding="utf-8", errors="replace").read()
        try:
            r = json.loads(text)
        except ValueError:
            raise RuntimeError(f"load generator failed: {text[-800:]}") from None
        merged["requests"] += r["requests"]
        merged["measured"] += r["measured"]
        merged["rps"] += r["rps"]
        for kind, n in r["errors"].items():
            if n:
                merged["errors"] += n
                merged["error_kinds"][kind] = merged["error_kinds"].get(kind, 0) + n
        merged["first_error"] = merged["first_error"] or r["first_error"]
        for key in ("lat", "ttfb", "gap", "body"):
            merged[key] += r[key + "_us"]
        merged["gen_cpu_s"] += r["cpu_s"]
        merged["max_open"] += r["max_open"]
    for key in ("lat", "ttfb", "gap", "body"):
        merged[key].sort()
    return merged


def summarize(res: dict) -> dict:
    """Percentiles out of a merged loadgen result (the raw samples are dropped)."""
    lat = res["lat"]
    out = {"generator": "asyncio", "requests": res["requests"], "rps": res["rps"],
           "p50_us": pct(lat, 50), "p99_us": pct(lat, 99), "p999_us": pct(lat, 99.9),
           "mean_us": sum(lat) / len(lat) if lat else None,
           "errors": res["errors"], "error_kinds": res["error_kinds"],
           "gen_cpu_s": res["gen_cpu_s"]}
    if res["first_error"]:
        out["first_error"] = res["first_error"]
    if res["ttfb"]:
        out.update({"ttfb_p50_us": pct(res["ttfb"], 50), "ttfb_p99_us": pct(res["ttfb"], 99),
                    "gap_p50_us": pct(res["gap"], 50), "gap_p99_us": pct(res["gap"], 99),
                    "body_p50_us": pct(res["body"], 50), "body_p99_us": pct(res["body"], 99),
                    "max_open": res["max_open"]})
    return out

# ================================================================================================
# §06 scenarios
# ================================================================================================


class Bench:
    """One run: the mock, the machine facts and the options; profiles are run one by one."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pin = not args.no_pin and (os.cpu_count() or 1) >= 2 \
            and hasattr(os, "sched_setaffinity")
        self.load_cpus = {0} if self.pin else None
        self.tm_cpus = {1} if self.pin else None
        wrk = None if args.generator == "asyncio" else shutil.which("wrk")
        if args.generator == "wrk" and not wrk:
            raise SystemExit("run.py: --generator wrk but wrk is not installed")
        self.wrk = wrk
        self.workdir = tempfile.mkdtemp(prefix="tokenman-bench-")
        self.mock = None
        self.mock_port = 0
        self.mock_idle_mb = None
        self.floor_rows: dict = {}
        self.seconds = args.duration or (QUICK_PHASE_SECONDS if args.quick else PHASE_SECONDS)
        self.progress = sys.stderr

    def say(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=self.progress, flush=True)

    # -- helpers --------------------------------------------------------------------------------
    def _http(self, port: int, api: str, body: str, extra: dict | None = None,
              timeout: float = 5.0) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("POST", PATHS[api], body=body.encode(),
                         headers={**HEADERS[api], **(extra or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def _wait_ready(self, port: int, api: str, t0: float, proc: subprocess.Popen) -> float:
        """Polls with a real proxied request until it succeeds; seconds since t0."""
        body = request_body(api)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before answering")
            try:
                status, _, _ = self._http(port, api, body, timeout=2.0)
                if status == 200:
                    return time.perf_counter() - t0
            except (ConnectionError, OSError, http.client.HTTPException):
                pass
            time.sleep(0.001)
        raise RuntimeError("no successful response before the start timeout")

    def _load(self, port: int, api: str, conc: int, pids: list[int], stream: bool = False,
              once: bool = False, extra_headers: dict | None = None, seconds: float = 0.0,
              include_usage: bool = False, timeout: float = 10.0,
              use_wrk: bool = True) -> tuple[dict, list[dict]]:
        samplers = [Sampler(pid) for pid in pids]
        seconds = seconds or self.seconds
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy0, steal0 = cpu_busy()
        self0 = time.process_time()
        t0 = time.perf_counter()
        wall0 = time.time()
        if self.wrk and use_wrk and not stream and not once:
            res = run_wrk(self.wrk, port, api, conc, seconds, self.workdir, samplers,
                          self.load_cpus)
        else:
            spec = {"port": port, "path": PATHS[api],
                    "body": request_body(api, stream, include_usage),
                    "headers": {**HEADERS[api], **(extra_headers or {})},
                    "concurrency": conc, "duration": seconds,
                    "warmup": 0.0 if once else LOADGEN_WARMUP, "stream": stream,
                    "once": once, "timeout": timeout, "vary": VARY}
            res = summarize(run_loadgen(spec, self.args.procs, samplers, self.load_cpus,
                                        self.workdir))
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter() - t0
        res["gen_cpu_s"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        res["gen_cpu_util"] = res["gen_cpu_s"] / wall if wall else None
        res["window"] = [wall0, time.time()]
        finished = [s.finish() for s in samplers]
        # CPU used by anything but this run's processes: another benchmark or a test suite on
        # the same machine makes the figures of this phase unreliable (reported as a warning)
        busy1, steal1 = cpu_busy()
        ours = res["gen_cpu_s"] + (time.process_time() - self0) + sum(
            f.get("cpu_s") or 0.0 for f in finished)
        res["other_cpu_util"] = max(0.0, (busy1 - busy0) - ours) / wall if wall else None
        res["steal_util"] = (steal1 - steal0) / wall if wall else None
        return res, finished

    def _pair(self, kind: str, api: str, conc: int, port: int, tm_pid: int,
              pause: float = 0.0, **load) -> dict:
        """One scenario: a direct phase, then the same through tokenman. When other processes
        used the CPUs meanwhile, waits for a quiet machine and measures the pair again (up to
        --retries times); the row says how many attempts it took and if it stayed disturbed."""
        mock_pid = self.mock.pid
        for attempt in range(1, self.args.retries + 2):
            d, (dm,) = self._load(self.mock_port, api, conc, [mock_pid], **load)
            if pause:
                time.sleep(pause)
            t, (tmm, mm) = self._load(port, api, conc, [tm_pid, mock_pid], **load)
            if pause:
                time.sleep(pause)
            row = _row(kind, api, conc, d, dm, t, tmm, mm)
            row["attempts"] = attempt
            row["disturbed"] = any(
                (side.get("other_cpu_util") or 0) > OTHER_CPU_WARN
                or (side.get("steal_util") or 0) > OTHER_CPU_WARN
                or (side.get("latency_sum_ratio") or 0) > 1.1 for side in (d, t))
            if not row["disturbed"] or attempt > self.args.retries:
                return row
            self.say(f"  other processes (or the hypervisor) took CPU time; waiting for a quiet "
                     f"machine to measure {api} {kind} c={conc} again")
            self.wait_quiet([mock_pid, tm_pid])
        return row

    def wait_quiet(self, pids: list[int], limit: float = QUIET_WAIT) -> bool:
        """Waits (at most `limit` seconds) until other processes use under OTHER_CPU_WARN of a
        core for 2 s in a row."""
        deadline = time.monotonic() + limit
        quiet_since = None
        while time.monotonic() < deadline:
            busy0, _ = cpu_busy()
            ours0 = sum(cpu_seconds(p) or 0.0 for p in pids) + time.process_time()
            time.sleep(0.5)
            busy1, _ = cpu_busy()
            ours1 = sum(cpu_seconds(p) or 0.0 for p in pids) + time.process_time()
            if (busy1 - busy0) - (ours1 - ours0) < OTHER_CPU_WARN * 0.5:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= 2.0:
                    return True
            else:
                quiet_since = None
        return False

    # -- the mock -------------------------------------------------------------------------------
    def start(self) -> None:
        self.mock, self.mock_port = start_mock(self.load_cpus)
        self._wait_ready(self.mock_port, "anthropic", time.perf_counter(), self.mock)
        time.sleep(0.5)
        self.mock_idle_mb = rss_mb(self.mock.pid)[0]  # before any load: the mock's idle RSS
        self.say(f"mock on 127.0.0.1:{self.mock_port} (pid {self.mock.pid})")

    def stop(self) -> None:
        if self.mock is not None:
            CHILDREN.stop(self.mock)
            self.mock = None

    def floor(self) -> dict:
        """The machine's floor: the byte relay in tokenman's place (same CPU, same load), for
        the scenarios the budget judges at c=1 (and c=64 for CPU); direct runs alongside."""
        rows: dict = {"buffered": [], "streams": []}
        buffered = [c for c in (1, 64) if c in self._concurrency()]
        streams = [c for c in (1,) if c in self._stream_concurrency()]
        if self.args.no_floor or not (buffered or streams):
            return rows
        try:
            proc, port = start_floor(self.tm_cpus, self.mock_port)
        except RuntimeError as exc:  # (a side figure: the run goes on without it)
            self.say(f"[floor] skipped: {exc}")
            return dict(rows, error=str(exc))
        try:
            self._wait_ready(port, "anthropic", time.perf_counter(), proc)
            for api in self._apis():  # the same warm-up as tokenman's
                self._load(port, api, 16, [], seconds=min(1.0, self.seconds), use_wrk=False)
            hdr = {"x-mock-chunks": str(self.args.chunks),
                   "x-mock-interval-ms": str(self.args.interval_ms)}
            for api in self._apis():
                for conc in buffered:
                    self.say(f"[floor] byte relay: buffered {api} c={conc}")
                    rows["buffered"].append(self._pair("buffered", api, conc, port, proc.pid))
                for conc in streams:
                    self.say(f"[floor] byte relay: streams {api} c={conc}")
                    rows["streams"].append(self._pair("stream", api, conc, port, proc.pid,
                                                      stream=True, extra_headers=hdr))
                if proc.poll() is not None:  # (its figures would be the errors of a dead port)
                    raise RuntimeError(f"the byte relay exited with {proc.returncode}")
        except RuntimeError as exc:
            self.say(f"[floor] stopped: {exc}")
            rows["error"] = str(exc)
        finally:
            CHILDREN.stop(proc)
        self.floor_rows = rows
        return rows

    def direct_cold_start(self, runs: int) -> dict:
        quiet = self.wait_quiet([self.mock.pid], QUIET_WAIT / 2)
        samples = []
        for _ in range(runs):
            port = free_port()
            t0 = time.perf_counter()
            proc = CHILDREN.spawn([*PYTHON, MOCK, "--port", str(port)], self.load_cpus,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                samples.append(self._wait_ready(port, "anthropic", t0, proc) * 1000)
            finally:
                CHILDREN.stop(proc)
        return dict(_cold_summary(samples), quiet=quiet)

    # -- one profile ----------------------------------------------------------------------------
    def run_profile(self, name: str, profile_path: str, direct_cold: dict) -> dict:
        args = self.args
        out: dict = {"name": name, "config": os.path.relpath(profile_path, ROOT)
                     if profile_path.startswith(ROOT) else profile_path}
        pdir = os.path.join(self.workdir, name)
        os.makedirs(pdir, exist_ok=True)

        # cold start: process start -> first successful proxied response, fresh data_dir
        self.say(f"[{name}] cold start x{args.cold_runs}")
        compile_bytecode(args.tokenman)
        quiet = self.wait_quiet([self.mock.pid], QUIET_WAIT / 2)
        out["import_time"] = import_time(args.tokenman)
        samples = []
        for i in range(args.cold_runs):
            port = free_port()
            cfg = os.path.join(pdir, f"cold-{i}.toml")
            with open(cfg, "w") as fh:
                fh.write(render_config(profile_path, port, os.path.join(pdir, f"cold-data-{i}"),
                                       self.mock_port))
            t0 = time.perf_counter()
            proc = start_tokenman(args.tokenman, cfg, os.path.join(pdir, f"cold-{i}.log"),
                                  self.tm_cpus)
            try:
                samples.append(self._wait_ready(port, "anthropic", t0, proc) * 1000)
            finally:
                CHILDREN.stop(proc)
        out["cold_start"] = {"direct": direct_cold, "tokenman": _cold_summary(samples)}
        out["cold_start"]["tokenman"]["quiet"] = quiet

        # the main instance
        port = free_port()
        cfg = os.path.join(pdir, "tokenman.toml")
        data_dir = os.path.join(pdir, "data")
        with open(cfg, "w") as fh:
            fh.write(render_config(profile_path, port, data_dir, self.mock_port))
        log_path = os.path.join(pdir, "tokenman.log")
        prof_path = args.cprofile if args.cprofile else ""
        tm = start_tokenman(args.tokenman, cfg, log_path, self.tm_cpus, prof_path)
        t0 = time.perf_counter()
        self._wait_ready(port, "anthropic", t0, tm)
        time.sleep(1.0)
        mem = {"idle_mb": rss_mb(tm.pid)[0], "direct_idle_mb": self.mock_idle_mb,
               "idle_fds": open_fds(tm.pid)}
        self.say(f"[{name}] tokenman pid {tm.pid} on :{port}, idle RSS {mem['idle_mb']:.1f} MB")
        tm_pid, mock_pid = tm.pid, self.mock.pid
        try:
            out["sanity"] = self.sanity(port)
            bad = [s for s in out["sanity"] if not s["ok"]]
            if bad:
                self.say(f"[{name}] SANITY FAILED: {bad}")

            # warm-up, both paths, both APIs, at c=16 ...
            for api in self._apis():
                for target_port in (self.mock_port, port):
                    self._load(target_port, api, 16, [], seconds=1.0, use_wrk=False)
            time.sleep(0.5)
            mem["warm16_mb"] = rss_mb(tm_pid)[0]
            # ... then briefly at every buffered concurrency of the run: the post-warm-up RSS
            # the budget compares with is the working set of the load that follows (256
            # requests in flight leave ~3 MB of allocator high-water that a c=16 warm-up
            # never reaches; later runs of the same load do not add to it)
            for conc in self._concurrency():
                self._load(port, self._apis()[0], conc, [], seconds=0.5, use_wrk=False)
            time.sleep(0.5)
            mem["warm_mb"] = rss_mb(tm_pid)[0]
            reset_peak(tm_pid)

            # buffered requests: every API x concurrency, direct then tokenman
            rows = []
            for api in self._apis():
                for conc in self._concurrency():
                    self.say(f"[{name}] buffered {api} c={conc}")
                    rows.append(self._pair("buffered", api, conc, port, tm_pid))
            out["buffered"] = rows

            # streams: 50 chunks paced 1 ms apart
            srows = []
            hdr = {"x-mock-chunks": str(args.chunks), "x-mock-interval-ms": str(args.interval_ms)}
            for api in self._apis():
                for conc in self._stream_concurrency():
                    self.say(f"[{name}] streams {api} c={conc} ({args.chunks} chunks, "
                             f"{args.interval_ms} ms apart)")
                    srows.append(self._pair("stream", api, conc, port, tm_pid, stream=True,
                                            extra_headers=hdr))
            out["streams"] = srows
            time.sleep(1.0)
            mem["after_mb"] = rss_mb(tm_pid)[0]
            mem["after_fds"] = open_fds(tm_pid)
            mem["peak_mb"] = max([r["tokenman"].get("rss_peak_mb") or 0
                                  for r in rows + srows] + [mem["warm_mb"] or 0])

            # many concurrent slow streams held open at once
            hrows = []
            if args.hold:
                hdr = {"x-mock-chunks": str(HOLD_CHUNKS),
                       "x-mock-interval-ms": str(HOLD_INTERVAL_MS)}
                bound = HOLD_CHUNKS * HOLD_INTERVAL_MS / 1000 + 20
                for api in self._apis():
                    self.say(f"[{name}] {args.hold} concurrent streams {api}")
                    hrows.append(self._pair("hold", api, args.hold, port, tm_pid, stream=True,
                                            once=True, extra_headers=hdr, seconds=bound,
                                            timeout=bound, pause=0.5))
                time.sleep(1.0)
                mem["after_hold_mb"] = rss_mb(tm_pid)[0]
                mem["after_hold_fds"] = open_fds(tm_pid)
            out["hold"] = hrows
            out["memory"] = mem
        finally:
            self.say(f"[{name}] stopping tokenman")
            out["exit_code"] = CHILDREN.stop(tm, signal.SIGINT, 60 if prof_path else STOP_TIMEOUT)
        out["log"] = scan_log(log_path)
        db = os.path.join(data_dir, "tokenman.db")
        out["request_log"] = read_request_log(db)
        for r in out.get("buffered", []) + out.get("streams", []) + out.get("hold", []):
            r["tokenman"].update(own_overhead(db, r))
        if prof_path and os.path.exists(prof_path):
            out["cprofile"] = top_functions(prof_path, 25)
        out["budget"] = budget(out, self.args, self.floor_rows)
        return out

    def _apis(self) -> tuple:
        return tuple(a for a in self.args.apis.split(",") if a)

    def _concurrency(self) -> tuple:
        return tuple(int(c) for c in self.args.concurrency.split(",") if c)

    def _stream_concurrency(self) -> tuple:
        return tuple(int(c) for c in self.args.stream_concurrency.split(",") if c)

    # -- correctness spot checks ----------------------------------------------------------------
    def sanity(self, port: int) -> list[dict]:
        """Tokenman must relay bodies unchanged (bar the usage chunk it injected itself)."""
        checks = []

        def check(name: str, ok: bool, detail: str = "") -> None:
            checks.append({"name": name, "ok": bool(ok), "detail": detail[:300]})

        small = {"x-mock-chunks": "5"}
        for api in self._apis():
            body = request_body(api)
            ds, _, db = self._http(self.mock_port, api, body)
            ts, th, tb = self._http(port, api, body)
            check(f"{api} buffered: same status and body", ds == ts == 200 and db == tb,
                  f"direct {ds} {len(db)} B, tokenman {ts} {len(tb)} B")
            check(f"{api} buffered: overhead and cost headers",
                  "x-tokenman-overhead-ms" in th and "x-tokenman-cost-usd" in th,
                  ",".join(sorted(k for k in th if k.startswith("x-tokenman"))))
            sbody = request_body(api, stream=True)
            ds, _, db = self._http(self.mock_port, api, sbody, small)
            ts, th, tb = self._http(port, api, sbody, small)
            if api == "anthropic":
                check("anthropic stream: same events", ds == ts == 200 and db == tb,
                      f"direct {len(db)} B, tokenman {len(tb)} B")
            else:
                # tokenman asked upstream for usage: neither the usage chunk nor the
                # "usage":null of every other chunk may reach the client
                check("openai stream: usage chunk injected upstream and dropped",
                      ds == ts == 200 and tb == db and b"[DONE]" in tb,
                      f"direct {len(db)} B, tokenman {len(tb)} B")
                ubody = request_body(api, stream=True, include_usage=True)
                _, _, ub = self._http(self.mock_port, api, ubody, small)
                ts2, _, tb2 = self._http(port, api, ubody, small)
                check("openai stream with include_usage: same events", ts2 == 200 and tb2 == ub,
                      f"direct {len(ub)} B, tokenman {len(tb2)} B")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/health")
            r = conn.getresponse()
            hb = r.read()
            check("GET /health", r.status == 200 and b'"ok"' in hb, hb.decode(errors="replace"))
        finally:
            conn.close()
        return checks


def _cold_summary(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_ms": pct(s, 50), "min_ms": s[0] if s else None, "max_ms": s[-1] if s else None,
            "samples_ms": [round(x, 1) for x in samples]}


def _row(kind: str, api: str, conc: int, d: dict, dm: dict, t: dict, tmm: dict,
         mm: dict) -> dict:
    """One scenario: direct figures (with the mock's CPU) and tokenman figures (with
    tokenman's CPU; the mock's CPU during the tokenman phase is kept for reference)."""
    def per_1k(cpu: float | None, n: int) -> float | None:
        return cpu / n * 1000 if cpu is not None and n else None
    d = dict(d)
    t = dict(t)
    d.update({"cpu_per_1k_s": per_1k(dm.get("cpu_s"), d["requests"]),
              "cpu_util": dm.get("cpu_util"), "rss_peak_mb": dm.get("rss_peak_mb")})
    d["loop_cpu_per_1k_s"] = per_1k(dm.get("main_cpu_s"), d["requests"])
    t["loop_cpu_per_1k_s"] = per_1k(tmm.get("main_cpu_s"), t["requests"])
    t.update({"cpu_per_1k_s": per_1k(tmm.get("cpu_s"), t["requests"]),
              "cpu_util": tmm.get("cpu_util"), "rss_peak_mb": tmm.get("rss_peak_mb"),
              "mock_cpu_util": mm.get("cpu_util")})
    for side, mock in ((d, dm), (t, mm)):
        if mock.get("cpu_util") is not None and side.get("gen_cpu_util") is not None:
            side["load_cpu_util"] = mock["cpu_util"] + side["gen_cpu_util"]
    return {"kind": kind, "api": api, "c": conc, "direct": d, "tokenman": t}


def compile_bytecode(script: str) -> None:
    """tokenman's bytecode cache, as an installation (or the Dockerfile) leaves it: tokenman
    honours PYTHONDONTWRITEBYTECODE, and without a cache every cold start would compile the
    whole module (~100 ms) instead of measuring a start."""
    try:
        done = subprocess.run([*PYTHON, "-m", "py_compile", script], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"[bench] could not compile {script}: {exc}", file=sys.stderr)
        return
    if done.returncode:
        print(f"[bench] could not compile {script}: {done.stderr.strip()[-300:]}",
              file=sys.stderr)


def import_time(script: str) -> dict:
    """`python -X importtime tokenman.py version`: total and the slowest top-level imports."""
    try:
        out = subprocess.run([*PYTHON, "-X", "importtime", script, "version"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = []
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and len(m.group(3)) <= 1:
            rows.append((int(m.group(2)), m.group(4)))
    rows.sort(reverse=True)
    return {"total_ms": round(sum(r[0] for r in rows) / 1000, 1),
            "top": [[name, round(us / 1000, 1)] for us, name in rows[:10]]}


def scan_log(path: str) -> dict:
    """Counts of request lines, errors and tracebacks in tokenman's stderr log."""
    info = {"lines": 0, "errors": 0, "tracebacks": 0, "first_problems": []}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                info["lines"] += 1
                bad = " ERROR " in line or " FATAL " in line
                tb = line.startswith("Traceback")
                info["errors"] += bad
                info["tracebacks"] += tb
                if (bad or tb) and len(info["first_problems"]) < 5:
                    info["first_problems"].append(line.strip()[:300])
    except OSError:
        pass
    return info


def read_request_log(path: str) -> dict:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute("SELECT outcome, streaming, COUNT(*), SUM(input_tokens), "
                                "SUM(output_tokens), SUM(cost_usd IS NULL) FROM requests "
                                "GROUP BY outcome, streaming").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return {"error": str(exc)}
    return {"rows": sum(r[2] for r in rows),
            "by_outcome": [{"outcome": r[0], "streaming": r[1], "rows": r[2],
                            "input_tokens": r[3], "output_tokens": r[4], "unpriced": r[5]}
                           for r in rows]}


def own_overhead(db: str, row: dict) -> dict:
    """tokenman's own view of its overhead during one phase: the overhead_ms column of its
    request log (time in the process, upstream wait excluded), as percentiles."""
    window = row["tokenman"].get("window")
    if not window:
        return {}
    start = datetime.datetime.fromtimestamp(window[0], datetime.timezone.utc)
    end = datetime.datetime.fromtimestamp(window[1], datetime.timezone.utc)
    fmt_ = "%Y-%m-%dT%H:%M:%S.%f"
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            values = sorted(v for (v,) in conn.execute(
                "SELECT overhead_ms FROM requests WHERE timestamp >= ? AND timestamp <= ? "
                "AND format = ? AND overhead_ms IS NOT NULL AND outcome = 'ok'",
                (start.strftime(fmt_)[:-3], end.strftime(fmt_)[:-3] + "Z", row["api"])))
        finally:
            conn.close()
    except sqlite3.Error:
        return {}
    if not values:
        return {}
    return {"own_p50_us": pct(values, 50) * 1000, "own_p99_us": pct(values, 99) * 1000}


def top_functions(path: str, n: int) -> list[str]:
    import io
    import pstats
    buf = io.StringIO()
    stats = pstats.Stats(path, stream=buf)
    stats.sort_stats("tottime").print_stats(n)
    lines = buf.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return [line for line in lines[start:] if line.strip()]

# ================================================================================================
# §07 budget: the limits, checked on the figures of one profile
# ================================================================================================


def _find(rows: list[dict], api: str, conc: int) -> dict | None:
    return next((r for r in rows if r["api"] == api and r["c"] == conc), None)


def _added(row: dict, key: str) -> float | None:
    a, b = row["tokenman"].get(key), row["direct"].get(key)
    return a - b if a is not None and b is not None else None


def _floor_note(floor: dict, kind: str, api: str, conc: int, key: str, unit: str,
                mine: float | None, added: bool = True) -> str:
    """What the byte relay measured for the same figure, and what tokenman adds beyond it."""
    r = _find(floor.get(kind, []), api, conc)
    if r is None:
        return ""
    value = _added(r, key) if added else r["tokenman"].get(key)
    if value is None:
        return ""
    text = f"a byte relay here: {fmt(value, unit, added)}"
    if mine is not None:
        text += f"; tokenman beyond it: {fmt(mine - value, unit, True)}"
    return text


def budget(out: dict, args: argparse.Namespace, floor: dict | None = None) -> list[dict]:
    lines = []
    floor = floor or {}

    def line(what: str, value: float | None, limit: float, unit: str, le: bool = True,
             extra_ok: bool = True, note: str = "") -> None:
        ok = value is not None and (value <= limit if le else value >= limit) and extra_ok
        lines.append({"what": what, "value": value, "limit": limit, "unit": unit,
                      "op": "<=" if le else ">=", "ok": ok, "note": note})

    rows = out.get("buffered", [])
    for api in APIS:
        r1 = _find(rows, api, 1)
        if r1:
            for key, limit in (("p50_us", "added_p50_c1_us"), ("p99_us", "added_p99_c1_us")):
                value = _added(r1, key)
                line(f"added latency {key[:3]}, c=1, {api}", value, BUDGET[limit], "us",
                     note=_floor_note(floor, "buffered", api, 1, key, "us",  # (tails of two
                                 value if key == "p50_us" else None))  # runs do not subtract)
    for api in APIS:
        for conc in (1, 64):
            r = _find(rows, api, conc)
            if r:
                value = r["tokenman"].get("cpu_per_1k_s")
                line(f"tokenman CPU per 1,000 requests, c={conc}, {api}", value,
                     BUDGET["cpu_per_1k_s"], "s", note=_floor_note(
                         floor, "buffered", api, conc, "cpu_per_1k_s", "s", value, added=False))
    for api in APIS:
        r = _find(rows, api, 64)
        if r:
            errs = r["tokenman"]["errors"]
            line(f"throughput c=64, {api} (zero errors)", r["tokenman"]["rps"],
                 BUDGET["rps_c64"], "req/s", le=False, extra_ok=errs == 0,
                 note=f"{errs} errors" if errs else "")
    srows = out.get("streams", [])
    for api in APIS:
        r = _find(srows, api, 1)
        if r:
            value = _added(r, "ttfb_p50_us")
            line(f"stream added TTFB p50, c=1, {api}", value,
                 BUDGET["stream_added_ttfb_p50_us"], "us",
                 note=_floor_note(floor, "streams", api, 1, "ttfb_p50_us", "us", value))
            body = _added(r, "body_p50_us")
            per_chunk = body / max(1, args.chunks - 1) if body is not None else None
            line(f"stream added delay per chunk (p50 body time / {args.chunks - 1}), c=1, {api}",
                 per_chunk, BUDGET["stream_added_chunk_delay_us"], "us")
    for r in out.get("hold", []):
        t = r["tokenman"]
        held = t.get("max_open", 0)
        line(f"{r['c']} concurrent streams held, {r['api']}: tokenman peak RSS",
             t.get("rss_peak_mb"), BUDGET["hold_rss_mb"], "MB",
             extra_ok=held >= r["c"] and t["errors"] == 0,
             note=f"{held} open at once, {t['errors']} errors")
    mem = out.get("memory", {})
    line("idle RSS", mem.get("idle_mb"), BUDGET["idle_rss_mb"], "MB")
    if mem.get("after_mb") and mem.get("warm_mb"):
        line("RSS after the load runs / post-warm-up RSS", mem["after_mb"] / mem["warm_mb"],
             BUDGET["after_rss_ratio"], "x",
             note=f"{mem['warm_mb']:.1f} MB -> {mem['after_mb']:.1f} MB"
             + (f"; {mem['after_mb'] / mem['warm16_mb']:.2f}x of the RSS after the c=16 part "
                f"of the warm-up ({mem['warm16_mb']:.1f} MB)" if mem.get("warm16_mb") else ""))
    cold = out.get("cold_start", {}).get("tokenman", {})
    line("cold start to first proxied response (median)", cold.get("p50_ms"),
         BUDGET["cold_start_ms"], "ms", note=f"max {cold.get('max_ms') or 0:.0f} ms"
         + ("" if cold.get("quiet", True) else "; the machine was not quiet"))
    return lines

# ================================================================================================
# §08 report: the side-by-side table, the budget verdicts, JSON, and --compare
# ================================================================================================

# (key, label, unit, kinds): the figures shown for each scenario, in order
METRICS = (
    ("rps", "req/s", "rate", ("buffered", "stream")),
    ("p50_us", "latency p50", "us", ("buffered",)),
    ("p99_us", "latency p99", "us", ("buffered",)),
    ("p999_us", "latency p99.9", "us", ("buffered",)),
    ("ttfb_p50_us", "TTFB p50", "us", ("stream", "hold")),
    ("ttfb_p99_us", "TTFB p99", "us", ("stream", "hold")),
    ("p50_us", "total p50", "us", ("stream", "hold")),
    ("p99_us", "total p99", "us", ("stream", "hold")),
    ("gap_p50_us", "chunk gap p50", "us", ("stream",)),
    ("gap_p99_us", "chunk gap p99", "us", ("stream",)),
    ("max_open", "open at once", "count", ("hold",)),
    ("own_p50_us", "own overhead p50", "us", ("buffered", "stream")),
    ("own_p99_us", "own overhead p99", "us", ("buffered", "stream")),
    ("errors", "errors", "count", ("buffered", "stream", "hold")),
    ("cpu_per_1k_s", "CPU s / 1k req", "s", ("buffered", "stream", "hold")),
    ("loop_cpu_per_1k_s", "  of it main thread", "s", ("buffered", "stream", "hold")),
    ("cpu_util", "server CPU util", "pct", ("buffered", "stream")),
    ("load_cpu_util", "mock+gen CPU util", "pct", ("buffered", "stream")),
    ("rss_peak_mb", "RSS peak", "MB", ("buffered", "stream", "hold")),
    ("other_cpu_util", "other processes' CPU", "pct", ("buffered", "stream", "hold")),
)


def fmt(value: object, unit: str, signed: bool = False) -> str:
    if value is None:
        return "-"
    v = float(value)
    sign = "+" if signed and v > 0 else ""
    if unit == "us":
        if abs(v) >= 10_000:
            return f"{sign}{v / 1000:,.1f} ms"
        return f"{sign}{v:,.0f} us"
    if unit == "ms":
        return f"{sign}{v:,.1f} ms"
    if unit == "rate":
        return f"{sign}{v:,.1f}" if abs(v) < 100 else f"{sign}{v:,.0f}"
    if unit == "count":
        return f"{sign}{v:,.0f}"
    if unit == "s":
        return f"{sign}{v:.3f} s"
    if unit == "pct":
        return f"{sign}{v * 100:.0f}%"
    if unit == "MB":
        return f"{sign}{v:.1f} MB"
    if unit == "x":
        return f"{sign}{v:.2f}x"
    return f"{sign}{v}"


def ratio(a: object, b: object) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{float(a) / float(b):.2f}x"


def _table(rows: list[list[str]], right: tuple = ()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        out.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return out


KIND_LABELS = {"buffered": "buffered", "stream": "stream", "hold": "held streams"}


def scenario_label(r: dict, args_chunks: int | None = None) -> str:
    kind = KIND_LABELS[r["kind"]]
    gen = r["tokenman"].get("generator", "")
    note = f" (try {r['attempts']})" if r.get("attempts", 1) > 1 else ""
    note += " DISTURBED" if r.get("disturbed") else ""
    return f"{r['api']} {kind} c={r['c']} [{gen}]{note}"


def scenario_table(scenarios: list[dict], column: str = "tokenman") -> list[str]:
    """Every figure of every scenario: direct next to the process in the path."""
    rows = [["scenario", "metric", "direct", column, "diff", "ratio"]]
    for r in scenarios:
        label = scenario_label(r)
        for key, name, unit, kinds in METRICS:
            if r["kind"] not in kinds:
                continue
            d, t = r["direct"].get(key), r["tokenman"].get(key)
            if d is None and t is None:
                continue
            diff = t - d if d is not None and t is not None else None
            rows.append([label, name, fmt(d, unit), fmt(t, unit), fmt(diff, unit, True),
                         ratio(t, d) if (unit != "count" or key == "max_open")
                         and key != "other_cpu_util" else "-"])
            label = ""
    return _table(rows, right=(2, 3, 4, 5))


def report_floor(floor: dict) -> list[str]:
    scenarios = floor.get("buffered", []) + floor.get("streams", [])
    if not scenarios:
        return [f"machine floor: not measured ({floor['error']})", ""] if floor.get("error") \
            else []
    return ["== machine floor: bench/relay_floor.py in tokenman's place (a byte relay: asyncio, "
            "no HTTP parsing, one upstream connection per client connection) ==",
            *scenario_table(scenarios, "byte relay"),
            *([f"the floor's measurement stopped early: {floor['error']}"]
              if floor.get("error") else []),
            "what any process in the path costs on this machine (its CPU pinning, wake-ups and "
            "loopback hops); the budget lines below say what tokenman adds beyond it", ""]


def report_profile(p: dict, settings: dict) -> list[str]:
    out = [f"== profile {p['name']}: {p['config']} =="]
    out += scenario_table(p.get("buffered", []) + p.get("streams", []) + p.get("hold", []))
    mem = p.get("memory", {})
    cold = p.get("cold_start", {})
    out.append("")
    rows = [["process figure", "direct (mock)", "tokenman", "diff", "ratio"]]
    dc, tc = cold.get("direct", {}), cold.get("tokenman", {})
    rows.append(["cold start p50 (start -> first 200)", fmt(dc.get("p50_ms"), "ms"),
                 fmt(tc.get("p50_ms"), "ms"), fmt(_sub(tc.get("p50_ms"), dc.get("p50_ms")),
                                                  "ms", True),
                 ratio(tc.get("p50_ms"), dc.get("p50_ms"))])
    rows.append(["cold start max", fmt(dc.get("max_ms"), "ms"), fmt(tc.get("max_ms"), "ms"),
                 fmt(_sub(tc.get("max_ms"), dc.get("max_ms")), "ms", True),
                 ratio(tc.get("max_ms"), dc.get("max_ms"))])
    rows.append(["RSS idle", fmt(mem.get("direct_idle_mb"), "MB"), fmt(mem.get("idle_mb"), "MB"),
                 fmt(_sub(mem.get("idle_mb"), mem.get("direct_idle_mb")), "MB", True),
                 ratio(mem.get("idle_mb"), mem.get("direct_idle_mb"))])
    for key, name in (("warm16_mb", "RSS after warm-up at c=16"),
                      ("warm_mb", "RSS after warm-up (all concurrencies)"),
                      ("peak_mb", "RSS peak (load runs)"),
                      ("after_mb", "RSS after load runs (+1 s)"),
                      ("after_hold_mb", "RSS after held streams (+1 s)")):
        if mem.get(key) is not None:
            rows.append([name, "", fmt(mem[key], "MB"), "", ""])
    out += _table(rows, right=(1, 2, 3, 4))
    fds = [(k, mem.get(k)) for k in ("idle_fds", "after_fds", "after_hold_fds")
           if mem.get(k) is not None]
    if fds:
        out.append("tokenman open file descriptors: " + ", ".join(
            f"{k.replace('_fds', '').replace('_', ' ')} {v}" for k, v in fds)
            + " (the upstream pool keeps idle keep-alive connections, up to 256 per "
            "provider address, for 30 s: after a c=256 run most of them are still open)")
    imp = p.get("import_time") or {}
    if imp:
        out.append(f"imports (python -X importtime): {imp.get('total_ms')} ms; slowest: "
                   + ", ".join(f"{n} {ms} ms" for n, ms in imp.get("top", [])[:6]))
    # the mock's and the generator's own ceilings
    ceil = []
    for r in p.get("buffered", []):
        d = r["direct"]
        if d.get("cpu_per_1k_s"):
            ceil.append(1000 / d["cpu_per_1k_s"])
    if ceil:
        out.append(f"mock ceiling: {max(ceil):,.0f} req/s per core (from its CPU per request "
                   f"in the direct runs); tokenman runs reached at most "
                   f"{max(r['tokenman']['rps'] for r in p['buffered']):,.0f} req/s")
    scenarios = p.get("buffered", []) + p.get("streams", []) + p.get("hold", [])
    disturbed = [f"{r['api']} {r['kind']} c={r['c']}" for r in scenarios if r.get("disturbed")]
    again = sum(1 for r in scenarios if r.get("attempts", 1) > 1)
    if again:
        out.append(f"{again} scenario(s) measured again because other processes used the CPUs")
    if disturbed:
        out.append("WARNING: other processes kept using the CPUs during " + ", ".join(disturbed)
                   + ": those figures are not reliable; rerun on a quiet machine")
    sanity = p.get("sanity", [])
    failed = [s for s in sanity if not s["ok"]]
    out.append(f"relay checks: {len(sanity) - len(failed)}/{len(sanity)} passed"
               + "".join(f"\n  FAILED {s['name']}: {s['detail']}" for s in failed))
    log = p.get("log", {})
    rl = p.get("request_log", {})
    out.append(f"tokenman exit code {p.get('exit_code')}; log: {log.get('lines', 0)} lines, "
               f"{log.get('errors', 0)} errors, {log.get('tracebacks', 0)} tracebacks; "
               f"request log: {rl.get('rows', rl.get('error'))} rows "
               + ", ".join(f"{o['outcome']}{'/stream' if o['streaming'] else ''}={o['rows']}"
                           for o in rl.get("by_outcome", [])))
    for line in log.get("first_problems", []):
        out.append(f"  log: {line}")
    out.append("")
    out.append(f"budget ({p['name']} profile"
               + ("; the issue's budget is for the default pipeline" if p["name"] != "default"
                  else "") + ")")
    rows = [["check", "measured", "limit", "verdict"]]
    for b in p.get("budget", []):
        unit = b["unit"]
        val = fmt(b["value"], "x" if unit == "x" else ("rate" if unit == "req/s" else unit),
                  signed=b["what"].startswith(("added", "stream added")))
        lim = f"{b['op']} {fmt(b['limit'], 'x' if unit == 'x' else ('rate' if unit == 'req/s' else unit))}"
        rows.append([b["what"], val, lim, ("ok" if b["ok"] else "MISSED")
                     + (f" ({b['note']})" if b["note"] else "")])
    out += _table(rows, right=(1,))
    if p.get("cprofile"):
        out.append("")
        out.append("cProfile of tokenman over the whole run (top 25 by tottime; profiling "
                   "slows it, so figures above are not budget figures):")
        out += ["  " + line for line in p["cprofile"]]
    return out


def _sub(a: object, b: object) -> float | None:
    return float(a) - float(b) if a is not None and b is not None else None


def report(result: dict) -> str:
    m = result["machine"]
    s = result["settings"]
    lines = [
        "tokenman benchmark",
        f"machine: {m['cpu_model']}, {m['cpus']} CPUs, {m['memory']}, {m['kernel']}, "
        f"Python {m['python']}, {m['date']}",
        f"tokenman: {m['tokenman']} (commit {m['commit'] or '?'}, "
        f"sha256 {m['tokenman_sha256']})",
        f"pinning: {m['pinning']}; python environment: {m.get('python_env', '?')}",
        f"generator: {m['generator']} for buffered requests; asyncio loadgen for streams "
        f"({s['procs']} process{'es' if s['procs'] > 1 else ''})",
        f"phases: {s['seconds']} s each; streams {s['chunks']} chunks {s['interval_ms']} ms apart; "
        f"held streams {s['hold']} x {HOLD_CHUNKS} chunks {HOLD_INTERVAL_MS:.0f} ms apart; "
        f"cold start x{s['cold_runs']}",
        "direct = the same request sent straight to the mock; diff = tokenman - direct; "
        "for CPU and RSS the direct column is the mock process itself",
    ]
    cal = m.get("calibration_ms") or {}
    if cal.get("before") and cal.get("after"):
        drift = cal["after"] / cal["before"] - 1
        lines.append(f"host speed: a fixed Python workload took {cal['before']:.1f} ms on "
                     f"tokenman's CPU before the run and {cal['after']:.1f} ms after it"
                     + (f" (the host got {abs(drift):.0%} {'slower' if drift > 0 else 'faster'}"
                        " meanwhile: figures of this run are less comparable)"
                        if abs(drift) > CALIBRATION_DRIFT else ""))
    cold = m.get("cold_code_us") or {}
    idles = [(k[5:-3], v) for k, v in cold.items() if k.startswith("idle_") and v]
    if cold.get("hot_us") and idles:
        lines.append(f"after-idle slowdown on tokenman's CPU: a fixed piece of Python (a small "
                     f"request's json.loads, a regex, a dict) takes {cold['hot_us']:.1f} us back "
                     "to back and, as the first thing after the CPU idled, " + ", ".join(
                         f"{v:.1f} us after {gap} ({v / cold['hot_us']:.1f}x)" for gap, v in idles)
                     + ": what the caches lose while the CPU waits, paid again by a proxy's code "
                     "after each idle (at c=1 between the steps of every request)")
    lines.append("")
    lines += report_floor(result.get("floor") or {})
    for p in result["profiles"]:
        lines += report_profile(p, s)
        lines.append("")
    return "\n".join(lines)


def _flat(p: dict) -> dict[str, tuple[float | None, float | None, str]]:
    """(tokenman, added) per figure name, for --compare."""
    flat = {}
    for r in p.get("buffered", []) + p.get("streams", []) + p.get("hold", []):
        label = f"{r['api']} {KIND_LABELS[r['kind']]} c={r['c']}"
        for key, name, unit, kinds in METRICS:
            if r["kind"] in kinds and r["tokenman"].get(key) is not None:
                t = r["tokenman"][key]
                d = r["direct"].get(key)
                flat[f"{label} {name}"] = (t, t - d if d is not None else None, unit)
    for k, name in (("idle_mb", "RSS idle"), ("after_mb", "RSS after load")):
        v = p.get("memory", {}).get(k)
        if v is not None:
            flat[name] = (v, None, "MB")
    c = p.get("cold_start", {}).get("tokenman", {}).get("p50_ms")
    if c is not None:
        flat["cold start p50"] = (c, None, "ms")
    return flat


def _scenarios(p: dict) -> set[str]:
    return {f"{r['api']} {KIND_LABELS[r['kind']]} c={r['c']}"
            for r in p.get("buffered", []) + p.get("streams", []) + p.get("hold", [])}


def _compare_speed(old: dict, new: dict) -> list[str]:
    """The host-speed readings of two runs (before and after each): what they say, and a
    warning when the host's speed moved within either run or between them."""
    cals = [r["machine"].get("calibration_ms") or {} for r in (old, new)]
    readings = [[v for v in (c.get("before"), c.get("after")) if v] for c in cals]
    if not all(readings):
        which = " and ".join(n for n, r in zip(("old", "new"), readings) if not r)
        return [f"warning: no host-speed reading in the {which} run (older run.py): CPU and "
                "latency changes below may include a change of the host's speed"]
    out = ["host speed: the calibration workload took " + " ms in the old run and ".join(
        "/".join(f"{v:.1f}" for v in r) for r in readings)
        + " ms in the new one (before/after)"]
    moved = [n for n, r in zip(("old", "new"), readings)
             if max(r) / min(r) - 1 > CALIBRATION_DRIFT]
    means = [sum(r) / len(r) for r in readings]
    if moved:
        out.append(f"warning: the host's speed moved during the {' and '.join(moved)} run: "
                   "changes below include that")
    elif abs(means[1] / means[0] - 1) > CALIBRATION_DRIFT:
        out.append(f"warning: the host ran {abs(means[1] / means[0] - 1) * 100:.0f}% "
                   f"{'slower' if means[1] > means[0] else 'faster'} in the new run: CPU and "
                   "latency changes below include that")
    return out


def compare(old: dict, new: dict) -> str:
    lines = [f"comparison: old {old['machine'].get('commit') or '?'} "
             f"({old['machine'].get('date')}) -> new {new['machine'].get('commit') or '?'}"]
    if old["machine"].get("generator") != new["machine"].get("generator"):
        lines.append(f"warning: different load generators ({old['machine'].get('generator')} vs "
                     f"{new['machine'].get('generator')}): the direct baselines differ")
    if old["machine"].get("cpu_model") != new["machine"].get("cpu_model"):
        lines.append(f"warning: different machines ({old['machine'].get('cpu_model')} vs "
                     f"{new['machine'].get('cpu_model')})")
    lines += _compare_speed(old, new)
    for key, what in (("seconds", "seconds per load phase"), ("chunks", "chunks per stream"),
                      ("interval_ms", "ms between stream chunks"), ("hold", "held streams"),
                      ("procs", "load generator processes")):
        was, now = old.get("settings", {}).get(key), new.get("settings", {}).get(key)
        if was is not None and was != now:
            lines.append(f"warning: {what} differ ({was} vs {now}): those figures are not "
                         "like for like")
    olds = {p["name"]: p for p in old.get("profiles", [])}
    news = list(new["profiles"])
    if (new.get("floor") or {}).get("error"):
        lines.append(f"machine floor: {new['floor']['error']}")
    if _scenarios(old.get("floor") or {}) and _scenarios(new.get("floor") or {}):
        olds["machine floor"] = dict(old["floor"], name="machine floor")  # (the floor of both
        news.insert(0, dict(new["floor"], name="machine floor"))  # runs: the machine's drift)
    for p in news:
        what = p["name"] if p["name"] == "machine floor" else f"profile {p['name']}"
        if p["name"] not in olds:
            lines.append(f"{what}: not in the old file")
            continue
        a, b = _flat(olds[p["name"]]), _flat(p)
        gone = _scenarios(olds[p["name"]]) - _scenarios(p)
        if gone:
            lines.append(f"{what}: not measured in this run: "
                         + ", ".join(sorted(gone)))
        rows = [["figure", "old", "new", "change", "old added", "new added"]]
        for key in b:
            if key not in a:
                continue
            (ov, oa, unit), (nv, na, _) = a[key], b[key]
            change = f"{(nv - ov) / ov * 100:+.1f}%" if ov else fmt(nv - ov, unit, True)
            rows.append([key, fmt(ov, unit), fmt(nv, unit), change, fmt(oa, unit, True),
                         fmt(na, unit, True)])
        ob = {x["what"]: x["ok"] for x in olds[p["name"]].get("budget", [])}
        for x in p.get("budget", []):
            if x["what"] in ob and ob[x["what"]] != x["ok"]:
                lines.append(f"budget {'now met' if x['ok'] else 'now MISSED'}: {x['what']}")
        lines.append(f"== {what} ==")
        lines += _table(rows, right=(1, 2, 3, 4, 5))
    return "\n".join(lines)

# ================================================================================================
# §09 command line
# ================================================================================================


def checkout_rev(rev: str) -> str:
    """tokenman.py at a git revision, written to a temp dir (removed at exit)."""
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev + "^{commit}"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        src = subprocess.run(["git", "-C", ROOT, "show", f"{sha}:tokenman.py"],
                             capture_output=True, timeout=10, check=True).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"run.py: cannot read tokenman.py at {rev!r}: {exc}") from None
    where = tempfile.mkdtemp(prefix=f"tokenman-{sha}-")
    atexit.register(shutil.rmtree, where, True)
    path = os.path.join(where, "tokenman.py")
    with open(path, "wb") as fh:
        fh.write(src)
    with open(os.path.join(where, "COMMIT"), "w") as fh:
        fh.write(sha)
    return path


def _number(kind, least: float, what: str):
    """An argparse type: a number of `kind` no smaller than `least`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not least <= value < float("inf"):  # (NaN fails both)
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


def _levels(text: str) -> str:
    """An argparse type: comma-separated concurrencies (positive integers); "" skips the kind."""
    for part in text.split(","):
        if part.strip() and not (part.strip().isdigit() and int(part) > 0):
            raise argparse.ArgumentTypeError(
                f"{text!r}: concurrencies are positive integers separated by commas")
    return ",".join(part.strip() for part in text.split(",") if part.strip())


def load_results(path: str) -> dict:
    """An earlier --json file, or SystemExit with the reason."""
    try:
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
    except OSError as exc:
        raise SystemExit(f"run.py: cannot read --compare file: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SystemExit(f"run.py: --compare {path}: not a JSON file written by --json "
                         f"({exc})") from None
    if not (isinstance(old, dict) and isinstance(old.get("machine"), dict)
            and isinstance(old.get("profiles"), list)):
        raise SystemExit(f"run.py: --compare {path}: not a results file written by --json")
    return old


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark tokenman against a direct call to a mock upstream.")
    p.add_argument("--config", action="append", default=[],
                   help="tokenman config (a profile); repeatable. run.py fills in ports, "
                        "data_dir and the mock's address")
    p.add_argument("--profile", action="append", default=[], choices=sorted(PROFILES),
                   help="a shipped profile from bench/profiles/ (repeatable)")
    p.add_argument("--all-profiles", action="store_true", help="default, bare and full")
    p.add_argument("--quick", action="store_true",
                   help="about 90 s: 2 s phases, streams at c=1,16, 3 cold starts")
    p.add_argument("--duration", type=_number(float, 0.1, "a number of seconds >= 0.1"),
                   help="seconds per load phase")
    p.add_argument("--concurrency", type=_levels,
                   help='buffered concurrencies (1,16,64,256; "" for none)')
    p.add_argument("--stream-concurrency", type=_levels,
                   help='stream concurrencies (1,16,64; "" for none)')
    p.add_argument("--chunks", type=_number(int, 2, "a whole number >= 2"), default=STREAM_CHUNKS,
                   help="content chunks per stream")
    p.add_argument("--interval-ms", type=_number(float, 0, "a number of milliseconds >= 0"),
                   default=STREAM_INTERVAL_MS,
                   help="pause between stream chunks")
    p.add_argument("--hold", type=_number(int, 0, "a whole number >= 0"), default=HOLD_STREAMS,
                   help="concurrent slow streams held at once (0 = skip)")
    p.add_argument("--apis", default=",".join(APIS), help="anthropic,openai")
    p.add_argument("--generator", choices=("auto", "wrk", "asyncio"), default="auto",
                   help="buffered-request load generator (auto = wrk when installed)")
    p.add_argument("--procs", type=_number(int, 1, "a whole number >= 1"), default=1,
                   help="asyncio load generator processes")
    p.add_argument("--cold-runs", type=_number(int, 1, "a whole number >= 1"),
                   help="cold starts measured (5)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the machine floor (bench/relay_floor.py, a byte relay, measured "
                        "in tokenman's place: buffered at c=1 and c=64, streams at c=1)")
    p.add_argument("--retries", type=_number(int, 0, "a whole number >= 0"), default=2,
                   help="measure a scenario again when other processes used the CPUs (2)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--compare", help="an earlier --json file: print the changes")
    p.add_argument("--cprofile", help="run tokenman under cProfile, write the profile here and "
                                      "print the top 25 functions (slows tokenman)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a budget line of the default profile is missed")
    p.add_argument("--tokenman", default=TOKENMAN,
                   help="the tokenman.py to run (e.g. an older checkout, to compare commits)")
    p.add_argument("--rev", help="benchmark tokenman.py as committed at this git revision "
                                 "(read with git show; the work tree is not touched)")
    p.add_argument("--no-site", action="store_true",
                   help="run tokenman, the mock and the generator with python -S (no site "
                        "module, so no .pth start-up hooks of this machine's site-packages)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs, DBs)")
    args = p.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = ",".join(map(str, CONCURRENCY))
    if args.stream_concurrency is None:
        args.stream_concurrency = "1,16" if args.quick else ",".join(map(str, STREAM_CONCURRENCY))
    args.duration = args.duration or 0.0
    args.cold_runs = args.cold_runs or (3 if args.quick else COLD_RUNS)
    for api in args.apis.split(","):
        if api and api not in APIS:
            p.error(f"unknown api {api!r}")
    if args.cprofile:
        args.cprofile = os.path.abspath(args.cprofile)
    args.tokenman = os.path.abspath(args.tokenman)
    if args.rev:
        args.tokenman = checkout_rev(args.rev)
    if not os.path.exists(args.tokenman):
        p.error(f"no such file: {args.tokenman}")
    for path in args.config:  # a broken profile is reported now, not after the direct runs
        if not os.path.exists(path):
            p.error(f"no such config: {path}")
        try:
            render_config(path, 1, "/nonexistent", 2)
        except (OSError, ValueError, TypeError) as exc:  # TOMLDecodeError; TypeError:
            # a value dump_toml cannot write (dates, arrays of tables)
            p.error(f"config {path}: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.no_site:
        PYTHON.append("-S")
    configs = [(name, PROFILES[name]) for name in args.profile]
    configs += [(os.path.splitext(os.path.basename(c))[0], os.path.abspath(c))
                for c in args.config]
    if args.all_profiles:
        configs += [(n, PROFILES[n]) for n in ("default", "bare", "full")
                    if (n, PROFILES[n]) not in configs]
    if not configs:
        configs = [("default", PROFILES["default"])]
    old = load_results(args.compare) if args.compare else None

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with it ignored
    atexit.register(CHILDREN.stop_all)
    nofile = raise_nofile()
    bench = Bench(args)
    if bench.pin:
        os.sched_setaffinity(0, bench.load_cpus)
    wrk = wrk_version(bench.wrk) if bench.wrk else None
    result = {"version": JSON_VERSION, "machine": machine_info(bench.pin, wrk, args.tokenman),
              "settings": {"seconds": bench.seconds, "quick": args.quick,
                           "concurrency": args.concurrency,
                           "stream_concurrency": args.stream_concurrency,
                           "chunks": args.chunks, "interval_ms": args.interval_ms,
                           "hold": args.hold, "procs": args.procs, "cold_runs": args.cold_runs,
                           "nofile": nofile, "cprofile": bool(args.cprofile)},
              "profiles": []}
    if args.hold and nofile < 2 * args.hold + 200:
        bench.say(f"warning: RLIMIT_NOFILE is {nofile}; {args.hold} held streams may fail")
    try:
        bench.start()
        calibration = result["machine"]["calibration_ms"] = {"before": calibrate(bench.tm_cpus)}
        result["machine"]["cold_code_us"] = cold_probe(bench.tm_cpus, min(1.5, bench.seconds))
        bench.say("direct cold start (the mock)")
        direct_cold = bench.direct_cold_start(args.cold_runs)
        result["floor"] = bench.floor()
        for name, path in configs:
            result["profiles"].append(bench.run_profile(name, path, direct_cold))
        calibration["after"] = calibrate(bench.tm_cpus)
    except KeyboardInterrupt:
        bench.say("interrupted; stopping every child process")
        CHILDREN.stop_all()
        return 130
    finally:
        bench.stop()
        CHILDREN.stop_all()
        if args.keep:
            bench.say(f"kept {bench.workdir}")
        else:
            shutil.rmtree(bench.workdir, ignore_errors=True)
    print(report(result))
    if old is not None:
        print(compare(old, result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        bench.say(f"wrote {args.json}")
    missed = [b["what"] for p in result["profiles"] if p["name"] == "default"
              for b in p["budget"] if not b["ok"]]
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
