"""Supervisor: starts the engine process, waits until it is ready, restarts it when it dies.

    sup = Supervisor(engine_config, transport)   # transport.control: where frontends connect
    sup.start()          # raises EngineStartError (with the engine's traceback) if it fails
    ...                  # sup.state: starting | ready | restarting | failed | stopped
    sup.shutdown()       # drain, stop, reap; nothing left behind

The engine reports "ready" (or its start-up traceback) over a pipe. A watcher thread reaps it
when it exits; unless a shutdown was asked for, it is restarted on the same control endpoint
after a backoff that doubles per consecutive failure, up to a limit. Frontends notice the
death on their own (they watch the engine's pid), fail their requests with EngineDeadError,
and re-register with the new engine once it answers.

The engine dies with its supervisor (`die_with_parent`): if the supervisor is killed, even by
SIGKILL, the engine gets SIGTERM, drains for `drain_timeout_s` and exits, removing its sockets.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections import deque
from typing import Optional

from minivllm.config import EngineConfig, SupervisorConfig, TransportConfig
from minivllm.transport import shm
from minivllm.transport.control import ControlClient, EngineGoneError

logger = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """The engine process did not come up (its own error is in the message)."""


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """First thing in a child process: have it get `sig` (SIGTERM: a graceful stop) when its
    parent dies, however it dies, so that nothing runs on unsupervised (PR_SET_PDEATHSIG).
    The parent may have died before this call: hence the check of who the parent is now. The
    signal follows the *thread* that started the child: start children from threads that
    outlive them."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def _engine_main(engine_config: EngineConfig, transport: TransportConfig, conn, parent_pid: int,
                 drain_timeout_s: Optional[float]) -> None:
    from minivllm.engine.engine_proc import run_engine

    die_with_parent(parent_pid)
    try:
        run_engine(engine_config, transport, ready=lambda: conn.send(("ready", None)),
                   drain_timeout_s=drain_timeout_s)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise


class Supervisor:
    def __init__(self, engine_config: EngineConfig, transport: Optional[TransportConfig] = None,
                 config: Optional[SupervisorConfig] = None,
                 drain_timeout_s: Optional[float] = None) -> None:
        """`drain_timeout_s`: what in-flight requests get when the engine is stopped by a
        signal rather than by shutdown() (its supervisor killed, say); None: all they need."""
        self.engine_config = engine_config
        self.drain_timeout_s = drain_timeout_s
        self.transport = transport or TransportConfig()
        if self.transport.control is None:  # fixed now: restarts must bind the same endpoint
            self.transport.control = shm.socket_endpoint("control")
        self.config = config or SupervisorConfig()
        parallel = engine_config.parallel
        self.name = (f"engine {parallel.data_parallel_rank}" if parallel.data_parallel_size > 1
                     else "engine")  # in its log lines
        self.state = "stopped"
        self.process: Optional[mp.Process] = None
        self.restarts = 0
        self._restart_times: deque[float] = deque()
        self._stopping = threading.Event()
        self._spawning = threading.Lock()  # held while an engine starts
        self._watcher: Optional[threading.Thread] = None

    @property
    def control(self) -> str:
        return self.transport.control

    @property
    def engine_pid(self) -> Optional[int]:
        return None if self.process is None else self.process.pid

    def start(self) -> None:
        self.state = "starting"
        try:
            self._spawn()
        except EngineStartError:
            self.state = "failed"
            raise
        self.state = "ready"
        self._watcher = threading.Thread(target=self._watch, name="engine-watcher", daemon=True)
        self._watcher.start()

    def _spawn(self) -> None:
        """Start an engine process and wait for its ready message; raises EngineStartError
        (also when a shutdown begins meanwhile)."""
        with self._spawning:
            if self._stopping.is_set():
                raise EngineStartError("the supervisor is shutting down")
            self._spawn_locked()

    def _spawn_locked(self) -> None:
        ctx = mp.get_context("spawn")
        receiver, sender = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_engine_main, name="minivllm-" + self.name.replace(
            " ", "-"), args=(
            self.engine_config, self.transport, sender, os.getpid(), self.drain_timeout_s))
        self.process.start()
        sender.close()
        deadline = time.monotonic() + self.config.start_timeout_s
        try:
            while True:
                if self._stopping.is_set():
                    raise EngineStartError("the supervisor is shutting down")
                if receiver.poll(0.1):
                    kind, detail = receiver.recv()
                    if kind == "ready":
                        logger.info("%s process %d ready", self.name, self.process.pid)
                        return
                    raise EngineStartError(f"the engine failed to start: "
                                           f"{detail.strip().splitlines()[-1]}\n{detail}")
                if not self.process.is_alive():
                    raise EngineStartError(f"the engine process exited with code "
                                           f"{self.process.exitcode} before it was ready")
                if time.monotonic() > deadline:
                    raise EngineStartError(f"the engine was not ready within "
                                           f"{self.config.start_timeout_s:g} s")
        except (EngineStartError, EOFError) as exc:
            self._kill()
            if isinstance(exc, EOFError):
                raise EngineStartError(f"the engine process exited with code "
                                       f"{self.process.exitcode} before it was ready") from None
            raise
        finally:
            receiver.close()

    def _watch(self) -> None:
        """Reap the engine, restart it. Ends only once the engine has exited: an engine this
        thread started gets SIGTERM when the thread ends (die_with_parent)."""
        while True:
            self.process.join(0.1)
            if self.process.is_alive():
                continue
            if self._stopping.is_set():
                return
            logger.error("%s process %d exited with code %s", self.name, self.process.pid,
                         self.process.exitcode)
            self.state = "restarting"
            if not self._restart():
                if not self._stopping.is_set():
                    self.state = "failed"
                    logger.error("%s restarts exhausted (%d within %g s): giving up", self.name,
                                 self.config.restart_limit, self.config.restart_window_s)
                return
            self.state = "ready"

    def _restart(self) -> bool:
        """Restart with backoff until one start succeeds or the limit is reached."""
        failures = 0
        while not self._stopping.is_set():
            now = time.monotonic()
            while self._restart_times and now - self._restart_times[0] > \
                    self.config.restart_window_s:
                self._restart_times.popleft()
            if len(self._restart_times) >= self.config.restart_limit:
                return False
            self._restart_times.append(now)
            delay = min(self.config.backoff_s * 2 ** failures, self.config.backoff_max_s)
            if self._stopping.wait(delay):
                return False
            try:
                self._spawn()
            except EngineStartError as exc:
                logger.error("%s restart failed: %s", self.name, str(exc).splitlines()[0])
                failures += 1
                continue
            self.restarts += 1
            return True
        return False

    def begin_shutdown(self) -> None:
        """From now on an engine that exits is not restarted (its frontends are stopping)."""
        self._stopping.set()

    def call(self, op: str, timeout: float, **args) -> Optional[dict]:
        """A control request to the engine; None if none runs, or it died or did not answer
        within `timeout` s (logged)."""
        process = self.process
        if process is None or not process.is_alive():
            return None
        import zmq

        ctx = zmq.Context()
        ctx.setsockopt(zmq.LINGER, 0)
        client = ControlClient(ctx, self.control)
        try:
            return client.call(op, timeout=timeout, engine_pid=process.pid, **args)
        except (TimeoutError, RuntimeError) as exc:
            if not isinstance(exc, EngineGoneError):
                logger.warning("the engine did not take %r: %s", op, exc)
            return None
        finally:
            client.close()
            ctx.term()

    def shutdown(self, drain: bool = True, timeout: float = 30.0, grace: float = 5.0) -> None:
        """Stop the engine: with `drain`, in-flight requests get `timeout` s to finish (then
        they are aborted); then it gets `grace` s to exit before it is killed."""
        self._stopping.set()
        with self._spawning:
            pass  # a start under way sees the flag and gives up
        self.call("shutdown", timeout=grace, drain=drain, timeout_s=timeout)
        if self.process is not None:
            self.process.join(timeout + grace)
        self._kill()
        if self._watcher is not None:
            self._watcher.join()
        shm.remove_endpoint(self.control)
        self.state = "stopped"

    def _kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(5)
