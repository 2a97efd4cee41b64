"""A real `minivllm serve` subprocess for benchmarks, chaos runs and the server tests, and the
checks that it left nothing behind (KV blocks, shared-memory segments, socket files, processes).

    srv = ServeProcess(["--max-num-seqs", "8"])      # --port 0: the port it prints is used
    ... load against srv.url ...
    idle = wait_engine_idle(srv.url)                 # running == 0 and KV usage == 0, or raises
    pids = srv.process_tree()                        # before stopping: who to look for after
    code = srv.stop()                                # SIGTERM, drain, exit status
    print(leftovers(pids))                           # {"processes": [], "shm": [], "sockets": []}
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

import httpx

from minivllm.engine.supervisor import die_with_parent
from minivllm.transport import shm


# How long a stop may take before a test calls it hung: the shutdown rule scales the drain with
# the engine's step time, which a loaded machine stretches far (config.shutdown_timeouts).
STOP_TIMEOUT_S = 600.0


def _ppid(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _ppid(int(entry))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def segments(pids: Sequence[int], directory: str = shm.SHM_DIR) -> list[str]:
    """The transport's segments (or socket files) created by any of `pids`."""
    return sorted(name for pid in set(pids) for name in shm.list_segments(pid, directory))


class ServeProcess:
    """`python -m minivllm.cli serve --port 0 ARGS` with its URL parsed from the line it prints
    when every API server is up. Its stderr is drained by a thread (a full pipe would block the
    server's logging, which would look like a hang) and kept for reports."""

    def __init__(self, args: Sequence[str] | str = (), start_timeout: float = 300.0,
                 env: Optional[dict] = None, wait: bool = True,
                 cwd: Optional[str] = None) -> None:
        """`cwd`: the code tree whose minivllm it runs (`python -m` imports from there)."""
        if isinstance(args, str):
            args = shlex.split(args)
        self.args = list(args)
        env = {**os.environ, "MINIVLLM_LOG_LEVEL": "WARNING", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minivllm.cli", "serve", "--port", "0", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
            start_new_session=True,  # a Ctrl-C of the bench is not also the server's SIGINT
            # a killed bench leaves no server behind: SIGTERM (a graceful stop) when it dies
            preexec_fn=functools.partial(die_with_parent, os.getpid()))
        self.stderr: list[str] = []  # its last 200 lines
        self.stderr_lines = 0         # how many it has written
        self._stderr_lock = threading.Lock()
        threading.Thread(target=self._drain, args=(self.proc.stderr, True), daemon=True).start()
        self.url: Optional[str] = None
        if wait:
            self.wait_url(start_timeout)

    def _drain(self, stream, keep: bool) -> None:
        for line in stream:
            if keep:
                with self._stderr_lock:
                    self.stderr.append(line)
                    del self.stderr[:-200]
                    self.stderr_lines += 1

    def wait_url(self, timeout: float = 300.0) -> str:
        """The URL the server prints once every API server is up (raises if it exits first)."""
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        match = re.search(r"http://([\w.:\[\]-]+):(\d+)", box[0]) if box else None
        if not match:
            self.kill()
            raise RuntimeError("the server did not start: " + (box[0] if box else "(silent)")
                               + "".join(self.stderr)[-3000:])
        threading.Thread(target=self._drain, args=(self.proc.stdout, False), daemon=True).start()
        self.url = f"http://{match.group(1)}:{match.group(2)}"
        return self.url

    def expect(self, pattern: str, timeout: float = 300.0, after: int = 0) -> re.Match:
        """The first line of its stderr that matches `pattern`, among those written after its
        first `after` (see stderr_lines), waiting for it (raises if the server exits or
        `timeout` passes first)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._stderr_lock:
                lines = self.stderr[max(0, after - self.stderr_lines + len(self.stderr)):]
            for line in lines:
                if match := re.search(pattern, line):
                    return match
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r} (exit status "
                                     f"{self.proc.poll()}): " + "".join(self.stderr)[-3000:])
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def engine_pid(self) -> int:
        """The engine's pid (the first's, with data parallelism)."""
        return self.engine_pids()[0]

    def process_tree(self) -> list[int]:
        """This process and every descendant (engine, API servers, resource tracker)."""
        return [self.proc.pid, *descendants(self.proc.pid)]

    def engine_pids(self) -> list[int]:
        """Its engines' pids, by data-parallel rank."""
        return [e["pid"] for e in httpx.get(self.url + "/health", timeout=10).json()["engines"]]

    def api_server_pids(self, engine: Optional[int] = None) -> list[int]:
        """Its API-server processes (`engine`: the engine's pid, when /health cannot tell)."""
        engines = [engine] if engine else self.engine_pids()
        return [p for p in descendants(self.proc.pid) if _ppid(p) == self.proc.pid
                and p not in engines and "resource_tracker" not in _cmdline(p)]

    def engine_stats(self) -> dict:
        """The engine's stats, asked on its control socket (its file carries this pid)."""
        import zmq

        from minivllm.transport.control import ControlClient

        [name] = [n for n in segments([self.proc.pid], shm.SOCKET_DIR) if "_control" in n]
        ctx = zmq.Context()
        ctx.setsockopt(zmq.LINGER, 0)
        client = ControlClient(ctx, "ipc://" + os.path.join(shm.SOCKET_DIR, name))
        try:
            return client.call("stats", timeout=60)
        finally:
            client.close()
            ctx.term()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> Optional[int]:
        """SIGTERM (graceful drain); its exit status, or None if it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole tree (a failed run must not leave an engine behind)."""
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def metrics(url: str) -> dict[str, float]:
    """/metrics as {name: value}, labelled samples summed under their bare name too."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
            if sample.labels:
                key = sample.name + "{" + ",".join(f"{k}={v}" for k, v in
                                                   sorted(sample.labels.items())) + "}"
                values[key] = values.get(key, 0.0) + sample.value
    return values


def wait_engine_idle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """Poll /metrics until the engine runs nothing and holds no KV block; raise if it never
    does (a leaked request or block). Needs the engine up (its stats come over control)."""
    deadline = time.monotonic() + timeout
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            last = metrics(url)
        except httpx.HTTPError:
            last = {}
        if last.get("minivllm:num_requests_running") == 0 and \
                last.get("minivllm:num_requests_waiting") == 0 and \
                last.get("minivllm:kv_cache_usage_perc") == 0:
            return last
        time.sleep(0.2)
    raise AssertionError(f"the engine did not go idle within {timeout:g} s: running="
                         f"{last.get('minivllm:num_requests_running')} waiting="
                         f"{last.get('minivllm:num_requests_waiting')} kv_usage="
                         f"{last.get('minivllm:kv_cache_usage_perc')}")


def engine_holds(m: dict[str, float], engine: int) -> float:
    """The requests data-parallel engine `engine` holds (running or waiting), from metrics()."""
    return sum(m.get(f"minivllm:num_requests_{q}{{engine={engine}}}", 0)
               for q in ("running", "waiting"))


def wait_engine_holds(url: str, n: int, timeout: float = 120.0) -> None:
    """Poll /metrics until the engine holds `n` requests or more (running or waiting): they
    are in flight, not on their way."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        held = m.get("minivllm:num_requests_running", 0) + \
            m.get("minivllm:num_requests_waiting", 0)
        if held >= n:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine held {held} requests, not {n}, after {timeout:g} s")
        time.sleep(0.1)


def wait_not_serving(url: str, timeout: float = 120.0) -> None:
    """Until /health no longer answers 200 (draining, or nothing listens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code != 200:
                return
        except httpx.HTTPError:
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} still served after {timeout:g} s")


def wait_healthy(url: str, timeout: float = 300.0, engine_pid: Optional[int] = None) -> int:
    """Wait for /health 200 with every engine ready (after a restart: `engine_pid` none of
    them); returns the first engine's pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(url + "/health", timeout=5)
            engines = resp.json().get("engines", []) if resp.status_code == 200 else []
            if engines and all(e["state"] == "ready" and e["pid"] != engine_pid
                               for e in engines):
                return engines[0]["pid"]
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} was not healthy within {timeout:g} s")


def check_served(code: Optional[int], pids: Sequence[int], summary: dict, sent: int) -> None:
    """RuntimeError unless a benchmark's server stopped cleanly (exit `code` 0, nothing of
    `pids` left) and every one of the `sent` requests of the load's `summary` succeeded."""
    left = leftovers(pids)
    if code != 0 or any(left.values()):
        raise RuntimeError(f"the server exited {code}, leaving {left}")
    if summary["counts"]["ok"] != sent:
        raise RuntimeError(f"not every request succeeded: {summary['counts']} "
                           f"{summary['errors']}")


def zmq_status(endpoint: str, timeout_s: float = 60.0) -> dict:
    """The fields of the status record an engine's ZeroMQ endpoint answers a query with."""
    import zmq

    from minivllm.transport import protocol

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(protocol.encode_status_query(1))
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"the engine at {endpoint} did not answer a status query")
        return protocol.decode(sock.recv()).fields
    finally:
        sock.close()
        ctx.term()


def _exiting(pid: int) -> bool:
    """Whether `pid` runs or still exits: a killed process's main thread shows as a zombie
    while its other threads still exit, and they hold its files (listening sockets) open."""
    try:
        return shm.pid_alive(pid) or len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def leftovers(pids: Sequence[int], settle: float = 10.0) -> dict[str, list]:
    """What the given processes left once stopped: any still running, their /dev/shm segments
    and their ZeroMQ socket files. Processes get `settle` seconds to finish exiting (every
    thread: then their sockets are closed)."""
    deadline = time.monotonic() + settle
    while any(_exiting(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {"processes": [p for p in pids if _exiting(p)], "shm": segments(pids),
            "sockets": segments(pids, shm.SOCKET_DIR)}
