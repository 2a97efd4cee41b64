"""Every process death and every shutdown of `minivllm serve` ends cleanly (issue 16): the engine
killed while an API server registers, the supervisor killed, a stream cut by the drain
deadline, the shutdown grace on slow steps, /health while the API servers start. Real servers
and signals; two test-only fault hooks of the engine (a register held until a file exists,
slow steps) make the races reproducible. (A second serve on a taken port: test_chaos.py.)"""
import asyncio
import contextlib
import json
import os
import signal
import time

import httpx
import pytest

from bench.server_proc import (STOP_TIMEOUT_S, ServeProcess, free_port, leftovers, metrics,
                               wait_healthy)
from minivllm.engine.engine_proc import FAULT_HOLD_REGISTER, FAULT_STEP_S
from minivllm.transport import shm

SERVE = ["--dtype", "float32", "--num-blocks", "512"]
NOTHING_LEFT = {"processes": [], "shm": [], "sockets": []}


def _body(max_tokens: int, stream: bool = True) -> dict:
    return {"prompt": "Write a long story about a river.", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}


def _until(probe, done, timeout: float):
    """probe() until done(its value), up to `timeout` s; the last value."""
    deadline = time.monotonic() + timeout
    while not done(value := probe()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def _held(tmp_path, *args: str) -> tuple[ServeProcess, object, int]:
    """serve with two API servers, the engine holding the second one's register while the
    returned file exists: (server, that file, the engine's pid) once it holds."""
    hold = tmp_path / "hold-register"
    hold.touch()
    srv = ServeProcess([*SERVE, "--api-servers", "2", *args], wait=False,
                       env={FAULT_HOLD_REGISTER: f"api-server-1:{hold}"})
    try:
        held = srv.expect(r"holding the register of api-server-1 .*engine pid (\d+)")
    except BaseException:
        srv.kill()
        raise
    return srv, hold, int(held.group(1))


def test_engine_killed_while_an_api_server_registers_every_api_server_reattaches(tmp_path):
    """Repro of a bug: the register sent to an engine that dies before it answers is lost, the
    API server waited 120 s for the answer and died, and serve exited with a traceback."""
    srv, hold, engine = _held(tmp_path)
    try:
        api = srv.api_server_pids(engine)
        assert len(api) == 2
        os.kill(engine, signal.SIGKILL)
        assert leftovers([engine], settle=60)["processes"] == []
        hold.unlink()  # the restarted engine answers at once
        srv.wait_url()
        new_engine = wait_healthy(srv.url, engine_pid=engine)
        # /health of one API server says only that it reattached: wait for the other
        frontends = _until(lambda: srv.engine_stats()["frontends"],
                           lambda f: len(f) == 2, timeout=STOP_TIMEOUT_S)
        assert frontends == ["api-server-0", "api-server-1"]
        assert sorted(srv.api_server_pids(new_engine)) == sorted(api)  # none was restarted
        resp = httpx.post(srv.url + "/v1/completions", json=_body(4, stream=False), timeout=120)
        assert resp.status_code == 200, resp.text
        pids = [*srv.process_tree(), engine]
        assert srv.stop() == 0, "".join(srv.stderr)[-3000:]
    except BaseException:
        srv.kill()
        raise
    assert leftovers(pids) == NOTHING_LEFT


def test_health_is_503_starting_until_every_api_server_is_up(tmp_path):
    """Repro of a bug: the first API server answered 200 while the second was not up yet."""
    port = free_port()
    srv, hold, _ = _held(tmp_path, "--port", str(port))
    try:
        # api-server-0 listens and is registered; api-server-1 waits for its register
        resp = httpx.get(f"http://127.0.0.1:{port}/health", timeout=120)
        assert (resp.status_code, resp.json()["status"]) == (503, "starting")
        hold.unlink()
        srv.wait_url()
        assert httpx.get(srv.url + "/health", timeout=60).status_code == 200
        pids = srv.process_tree()
        assert srv.stop() == 0, "".join(srv.stderr)[-3000:]
    except BaseException:
        srv.kill()
        raise
    assert leftovers(pids) == NOTHING_LEFT


def test_kill9_of_the_supervisor_takes_its_children_down_and_leaves_nothing():
    """Repro of a bug: kill -9 of `serve` left the engine and the API servers running,
    unsupervised and bound to the port. Now they drain (a stream in flight ends) and exit;
    what the killed process itself held goes with the next start's stale cleanup."""
    srv = ServeProcess([*SERVE, "--api-servers", "2", "--drain-timeout", "2"])
    pids = srv.process_tree()
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", json=_body(300),
                          timeout=120) as resp:
            lines = (line for line in resp.iter_lines() if line.startswith("data: "))
            next(lines)
            os.kill(srv.pid, signal.SIGKILL)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        left = leftovers(pids, settle=STOP_TIMEOUT_S)
    finally:
        for pid in pids:  # the orphans of a failing run are not left to the next tests
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert left["processes"] == [] and left["shm"] == [], left
    assert all(name.startswith(f"mvl_{srv.pid}_") for name in left["sockets"]), left
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=10)  # the port is free
    shm.cleanup_stale()  # what every start does first
    assert leftovers(pids) == NOTHING_LEFT


def test_kill9_of_every_process_leaves_nothing_the_next_start_does_not_remove():
    """Repro of a leak: SIGKILL of every process of `serve`, its multiprocessing resource
    tracker included, left the launcher's Event (five named semaphores) in /dev/shm for good;
    its flags are anonymous shared memory now. Our own segments go with the next start."""
    ours = ("sem.mp-", "mvl_")
    before = {n for n in os.listdir("/dev/shm") if n.startswith(ours)}
    srv = ServeProcess([*SERVE, "--api-servers", "2"])
    pids = srv.process_tree()
    assert any("resource_tracker" in open(f"/proc/{p}/cmdline").read() for p in pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert leftovers(pids)["processes"] == []
    shm.cleanup_stale()  # what every start does first
    assert {n for n in os.listdir("/dev/shm") if n.startswith(ours)} <= before


def test_a_stream_cut_by_the_drain_deadline_ends_with_an_error_event_then_done():
    """Repro of a bug: at the drain deadline the streams still running were cut with a bare
    TCP close (and whole responses never came)."""
    srv = ServeProcess([*SERVE, "--drain-timeout", "1"])
    try:
        pids = srv.process_tree()

        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                whole = asyncio.ensure_future(c.post("/v1/completions",
                                                     json=_body(4000, stream=False)))
                async with c.stream("POST", "/v1/completions", json=_body(4000)) as resp:
                    lines = resp.aiter_lines()
                    while not (await anext(lines)).startswith("data: "):
                        pass
                    while metrics(srv.url).get("minivllm:num_requests_running") != 2:
                        await asyncio.sleep(0.1)  # the whole one runs too
                    srv.proc.send_signal(signal.SIGTERM)
                    rest = [line async for line in lines if line.startswith("data: ")]
                return rest, await whole
        rest, whole = asyncio.run(go())
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])["error"]
        assert error["code"] == 503 and "drain" in error["message"], error
        assert whole.status_code == 503 and "drain" in whole.json()["error"]["message"]
        assert srv.proc.wait(STOP_TIMEOUT_S) == 0, "".join(srv.stderr)[-3000:]
    except BaseException:
        srv.kill()
        raise
    assert leftovers(pids) == NOTHING_LEFT


def test_shutdown_gives_three_slow_steps_not_a_fixed_five_seconds():
    """Repro of a bug: the shutdown grace was 5 s whatever a step takes: with 4-s steps and
    --drain-timeout 0.5, a request two steps from its end was cut. The rule: in-flight
    requests get max(--drain-timeout, 3 x the engine's p99 step time)."""
    srv = ServeProcess([*SERVE, "--drain-timeout", "0.5"], env={FAULT_STEP_S: "4"})
    try:
        pids = srv.process_tree()
        with httpx.stream("POST", srv.url + "/v1/completions", json=_body(3),
                          timeout=120) as resp:
            lines = (line for line in resp.iter_lines() if line.startswith("data: "))
            first = next(lines)  # the first step is done, two are left
            srv.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
        assert not any("error" in c for c in chunks), chunks
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(STOP_TIMEOUT_S) == 0, "".join(srv.stderr)[-3000:]
    except BaseException:
        srv.kill()
        raise
    assert leftovers(pids) == NOTHING_LEFT
