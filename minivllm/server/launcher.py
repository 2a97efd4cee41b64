"""`minivllm serve`: the engines under their supervisors, and N API-server processes on one port.

    serve process (this) ── Supervisor ── engine process (model, KV cache, step loop)
                        ├── ... one Supervisor and engine per data-parallel rank
                        └── API server 0..N-1 (uvicorn + DataParallelClient; no torch),
                            each a frontend of every engine

Before anything loads it claims the port: an abstract Unix socket named after it keeps a
second `serve` off it (its pid is named), and a bind without SO_REUSEPORT finds another
program on it; either way it exits with one line naming the port. It then waits until the
engine and every API server are up (until then /health answers 503 "starting"), prints the
address, and watches: a dead API server is restarted (the engine has aborted its requests
already). Every child dies with this process, even on SIGKILL (`die_with_parent`).

SIGTERM or SIGINT (also during start-up) stops it, by the one rule of `shutdown_timeouts`:
the API servers and the engine drain (503 to new requests; in-flight ones get
max(--drain-timeout, 3 x the engine's p99 step) to finish, then end with an error), each
process then gets the rule's grace to exit before it is killed; exit status 0, and no
process, shared-memory segment, socket file or directory is left behind.
"""
from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Optional

from minivllm.config import (EngineConfig, ServerConfig, SupervisorConfig, TransportConfig,
                             shutdown_timeouts)
from minivllm.distributed import data_parallel
from minivllm.engine.supervisor import Supervisor
from minivllm.server.api_server import STEP_ANSWER_S, listening_socket, run_api_server
from minivllm.transport import shm

logger = logging.getLogger(__name__)


class PortInUseError(RuntimeError):
    """The port is served already (the message says by whom)."""


class _Stopped(Exception):
    """A signal came while starting."""


def claim_port(port: int) -> socket.socket:
    """This user's claim on TCP `port`, held while the returned socket is open: an abstract
    Unix socket named after the port, which the kernel releases when this process dies,
    however it dies (no file is left behind). PortInUseError names the holder's pid."""
    name = f"\0minivllm-{os.getuid()}-port-{port}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise PortInUseError(f"port {port} is in use by minivllm serve "
                             f"(pid {_holder(name)})") from None
    return sock


def _holder(name: str) -> str:
    """The pid of the process that holds abstract Unix socket `name` ("?" if none is found):
    its inode from /proc/net/unix, then the process with a descriptor on it."""
    with open("/proc/net/unix") as f:
        links = {f"socket:[{fields[6]}]" for fields in map(str.split, f)
                 if fields[-1] == "@" + name[1:]}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in links
                   for fd in os.listdir(f"/proc/{pid}/fd")):
                return pid
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return "?"


def check_port_free(host: str, port: int) -> None:
    """PortInUseError if something listens on (host, port): a bind without SO_REUSEPORT
    fails beside any listener, ours included."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(f"port {port} is in use by another program") from None
            raise PortInUseError(f"cannot bind {host}:{port}: {exc.strerror}") from None


class Launcher:
    def __init__(self, engine_config: EngineConfig, server: ServerConfig,
                 transport: Optional[TransportConfig] = None,
                 supervisor: Optional[SupervisorConfig] = None) -> None:
        self.engine_config, self.server = engine_config, server
        size = engine_config.parallel.data_parallel_size
        transport = transport or TransportConfig()
        self.supervisors = [Supervisor(data_parallel.engine_config(engine_config, rank),
                                       data_parallel.transport(transport, rank, size),
                                       supervisor, drain_timeout_s=server.drain_timeout_s)
                            for rank in range(size)]
        self.ctx = mp.get_context("spawn")
        self.api_servers: list[Optional[mp.Process]] = [None] * server.api_servers
        # Flags in anonymous shared memory (set: 1), not Events: an Event is five named
        # semaphores in /dev/shm, which a SIGKILL of every process (the resource tracker that
        # would unlink them included) left behind.
        self.all_up = self.ctx.RawValue("b", 0)
        self.stop = threading.Event()
        self.metrics_dir: Optional[str] = None

    def _start_api_server(self, index: int) -> None:
        ready = self.ctx.RawValue("b", 0)
        model = self.engine_config.model
        proc = self.ctx.Process(target=run_api_server, name=f"minivllm-api-{index}", args=(
            [sup.control for sup in self.supervisors], model.model, model.load_format,
            self.server, self.supervisors[0].transport, index, os.getpid(), ready,
            self.all_up))
        proc.start()
        self.api_servers[index] = proc
        while not ready.value:
            if self.stop.wait(0.05):
                raise _Stopped()
            if not proc.is_alive():
                raise RuntimeError(f"API server {index} exited with code {proc.exitcode} "
                                   f"before it was ready")

    def _on_signal(self, *_) -> None:
        self.stop.set()
        for sup in self.supervisors:
            sup.begin_shutdown()  # an engine starting now gives up

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        probe = claim = None
        try:
            if self.server.port == 0:  # pick one port for all API servers, held until bound
                probe = listening_socket(self.server.host, 0)
                self.server.port = probe.getsockname()[1]
            claim = claim_port(self.server.port)
            if probe is None:
                check_port_free(self.server.host, self.server.port)
        except PortInUseError as exc:
            for sock in (probe, claim):
                if sock is not None:
                    sock.close()
            print(f"minivllm: {exc}", file=sys.stderr, flush=True)
            return 1
        try:
            self.metrics_dir = shm.private_dir("metrics")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir  # for the API servers
            for sup in self.supervisors:  # from this thread: engines die with it
                sup.start()
            for i in range(self.server.api_servers):
                self._start_api_server(i)
            if probe is not None:
                probe.close()
            self.all_up.value = 1
            print(f"minivllm: serving {self.server.served_model_name or 'the model'} on "
                  f"http://{self.server.host}:{self.server.port} "
                  f"({self.server.api_servers} API server(s), {len(self.supervisors)} "
                  f"engine(s))", flush=True)
            for sup in self.supervisors:
                if sup.transport.zmq_endpoint:
                    print(f"minivllm: {sup.name} ZeroMQ endpoint {sup.transport.zmq_endpoint}",
                          flush=True)
            self._watch()
            return 0
        except _Stopped:
            return 0
        except RuntimeError as exc:  # EngineStartError, or an API server that did not start
            if self.stop.is_set():
                return 0
            logger.error("%s", exc)
            return 1
        finally:
            self._shutdown()
            claim.close()

    def _watch(self) -> None:
        while not self.stop.wait(0.2):
            for i, proc in enumerate(self.api_servers):
                if not proc.is_alive() and not self.stop.is_set():
                    logger.error("API server %d (pid %d) exited with code %s: restarting it",
                                 i, proc.pid, proc.exitcode)
                    self._start_api_server(i)

    def _shutdown(self) -> None:
        """The API servers and the engine drain at once; see shutdown_timeouts."""
        for sup in self.supervisors:
            sup.begin_shutdown()
        start = time.monotonic()
        running = [p for p in self.api_servers if p is not None and p.is_alive()]
        for proc in running:
            os.kill(proc.pid, signal.SIGTERM)
        stats = [sup.call("stats", timeout=STEP_ANSWER_S) for sup in self.supervisors]
        drain_s, grace_s = shutdown_timeouts(self.server.drain_timeout_s, max(
            (s["step_p99_s"] for s in stats if s), default=0.0))

        def left(seconds: float) -> float:
            return max(0.0, start + seconds - time.monotonic())
        for sup in self.supervisors:  # the ZeroMQ peers' requests
            sup.call("drain", timeout=grace_s, timeout_s=left(drain_s))
        for proc in running:
            proc.join(left(drain_s + grace_s))
            if proc.is_alive():
                logger.error("API server pid %d did not exit within the drain and grace "
                             "(%g + %g s): killing it", proc.pid, drain_s, grace_s)
                proc.kill()
                proc.join(5)
        for sup in self.supervisors:  # each has drained meanwhile: one deadline for all
            sup.shutdown(drain=True, timeout=left(drain_s), grace=grace_s)
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        logger.info("minivllm stopped")
