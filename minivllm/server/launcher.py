"""`minivllm serve`: the engine under its supervisor, and N API-server processes on one port.

    serve process (this) ── Supervisor ── engine process (model, KV cache, step loop)
                        └── API server 0..N-1 (uvicorn + AsyncEngineClient; no torch)

It waits until the engine and every API server are up, prints the address, then watches: a
dead API server is restarted (the engine has aborted its requests already). SIGTERM or SIGINT
starts a graceful shutdown: the API servers drain (503 to new requests, in-flight ones finish
within the drain timeout) and exit, then the engine stops; exit status 0, and no process,
shared-memory segment or socket file is left behind.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
from typing import Optional

from minivllm.config import EngineConfig, ServerConfig, SupervisorConfig, TransportConfig
from minivllm.engine.supervisor import EngineStartError, Supervisor
from minivllm.server.api_server import listening_socket, run_api_server

logger = logging.getLogger(__name__)


class Launcher:
    def __init__(self, engine_config: EngineConfig, server: ServerConfig,
                 transport: Optional[TransportConfig] = None,
                 supervisor: Optional[SupervisorConfig] = None) -> None:
        self.engine_config, self.server = engine_config, server
        self.supervisor = Supervisor(engine_config, transport, supervisor)
        self.ctx = mp.get_context("spawn")
        self.api_servers: list[Optional[mp.Process]] = [None] * server.api_servers
        self.stop = threading.Event()
        self.metrics_dir = tempfile.mkdtemp(prefix="minivllm-metrics-")

    def _start_api_server(self, index: int) -> None:
        ready = self.ctx.Event()
        model = self.engine_config.model
        proc = self.ctx.Process(target=run_api_server, name=f"minivllm-api-{index}", args=(
            self.supervisor.control, model.model, model.load_format, self.server,
            self.supervisor.transport, index, ready))
        proc.start()
        self.api_servers[index] = proc
        while not ready.wait(0.2):
            if not proc.is_alive():
                raise RuntimeError(f"API server {index} exited with code {proc.exitcode} "
                                   f"before it was ready")

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir  # inherited by API servers
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        probe = None
        try:
            self.supervisor.start()
            if self.server.port == 0:  # pick one port for all API servers, held until bound
                probe = listening_socket(self.server.host, 0)
                self.server.port = probe.getsockname()[1]
            for i in range(self.server.api_servers):
                self._start_api_server(i)
            if probe is not None:
                probe.close()
            print(f"minivllm: serving {self.server.served_model_name or 'the model'} on "
                  f"http://{self.server.host}:{self.server.port} "
                  f"({self.server.api_servers} API server(s))", flush=True)
            self._watch()
            return 0
        except EngineStartError as exc:
            logger.error("%s", exc)
            return 1
        finally:
            self._shutdown()

    def _watch(self) -> None:
        while not self.stop.wait(0.2):
            for i, proc in enumerate(self.api_servers):
                if not proc.is_alive() and not self.stop.is_set():
                    logger.error("API server %d (pid %d) exited with code %s: restarting it",
                                 i, proc.pid, proc.exitcode)
                    self._start_api_server(i)

    def _shutdown(self) -> None:
        self.supervisor.begin_shutdown()
        for proc in self.api_servers:
            if proc is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.api_servers:
            if proc is not None:
                proc.join(self.server.drain_timeout_s + 10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        self.supervisor.shutdown(drain=True, timeout=5.0)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        logger.info("minivllm stopped")
