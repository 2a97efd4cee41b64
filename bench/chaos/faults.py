"""Chaos scenarios for process deaths and shutdowns (issue 16), run by bench/chaos/run.py:

    python -m bench.chaos.run kill-engine-registering --duration 60 --every 15
    python -m bench.chaos.run kill-supervisor --duration 30
    python -m bench.chaos.run drain-deadline --clients 64

kill-engine-registering  Poisson load on two API servers; twice, the engine is killed (-9), and
                         so is its successor while it holds api-server-1's register (a test-only
                         fault hook of the engine): serve keeps serving, and both API servers,
                         never restarted, are registered with the third engine.
kill-supervisor          Poisson load; kill -9 of `serve` itself: its engine and API servers
                         drain and exit (streams end), leaving only what `serve` itself named;
                         a later start on the same port, under load, has every one of its
                         processes killed (-9); a last start removes what both left.
drain-deadline           `clients` streams and `clients` / 4 whole requests too long for the
                         drain, then SIGTERM (--drain-timeout 2): every stream ends with an SSE
                         error event then [DONE], every whole request with a JSON error; none is
                         cut.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
from collections import Counter

import httpx

from bench.server_proc import (ServeProcess, leftovers, wait_engine_holds, wait_engine_idle,
                               wait_healthy)
from minivllm.engine.engine_proc import FAULT_HOLD_REGISTER

# api-server-1's register is held while this file exists (the runner starts serve with it).
HOLD = os.path.join(tempfile.gettempdir(), f"minivllm-chaos-hold-register-{os.getpid()}")
# Each cycle kills two engines; the supervisor gives up past 5 restarts in 300 s.
CYCLES = 2


def _run():
    """run.py's helpers (it imports this module to register the scenarios)."""
    from bench.chaos import run
    return run


def _with_load(srv: ServeProcess, args, fault) -> Counter:
    """Poisson load for args.duration s, with `fault()` run in a thread meanwhile."""
    async def go():
        done = asyncio.ensure_future(asyncio.to_thread(fault))
        outcomes = await _run().poisson_load(srv.url, args.duration, args.rate, 64,
                                             args.timeout)
        await done
        return outcomes
    return asyncio.run(go())


# ---- kill-engine-registering -----------------------------------------------------------------
def kill_engine_registering(srv: ServeProcess, args) -> dict:
    api = sorted(srv.api_server_pids())
    kills: list[int] = []
    recovered_s: list[float] = []  # from the first kill to both API servers serving again

    def fault() -> None:
        for _ in range(CYCLES):
            time.sleep(args.every)
            open(HOLD, "w").close()
            mark = srv.stderr_lines
            engine = srv.engine_pid()
            t0 = time.monotonic()
            os.kill(engine, signal.SIGKILL)
            held = int(srv.expect(r"holding the register of api-server-1 .*engine pid (\d+)",
                                  timeout=args.timeout, after=mark).group(1))
            os.kill(held, signal.SIGKILL)
            kills.extend([engine, held])
            leftovers([held], settle=args.timeout)
            os.unlink(HOLD)
            wait_healthy(srv.url, args.timeout, engine_pid=held)
            while len(srv.engine_stats()["frontends"]) < 2:
                time.sleep(0.1)
            recovered_s.append(round(time.monotonic() - t0, 1))
    outcomes = _with_load(srv, args, fault)
    wait_engine_idle(srv.url, timeout=args.timeout)
    frontends = srv.engine_stats()["frontends"]
    same_api = sorted(srv.api_server_pids()) == api
    return {"outcomes": outcomes, "engines_killed": len(kills),
            "killed_while_registering": len(kills) // 2, "recovered_s": recovered_s,
            "frontends_after": frontends,
            "api_servers_restarted": not same_api, "killed_engines_left": leftovers(kills),
            "scenario_ok": frontends == ["api-server-0", "api-server-1"] and same_api}


kill_engine_registering.serve_env = {FAULT_HOLD_REGISTER: f"api-server-1:{HOLD}"}


# ---- kill-supervisor -------------------------------------------------------------------------
def kill_supervisor(srv: ServeProcess, args) -> dict:
    port = srv.url.rsplit(":", 1)[1]
    later_args = [*_run().SERVE, "--port", port]
    killed_at: list[float] = []

    def kill_midway(pids) -> None:
        time.sleep(args.duration / 2)
        killed_at.append(time.monotonic())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    first = srv.process_tree()
    outcomes = _with_load(srv, args, lambda: kill_midway([srv.pid]))
    by_supervisor_kill = leftovers(first, settle=args.timeout)
    children_gone_s = time.monotonic() - killed_at[0]
    t0 = time.monotonic()
    later = ServeProcess(later_args)  # the port is free; its start removes the stale names
    later_start_s = time.monotonic() - t0
    try:
        after_later_start = leftovers(first)
        second = later.process_tree()
        outcomes += _with_load(later, args, lambda: kill_midway(second))
        later.proc.wait(args.timeout)
        by_kill_all = leftovers(second, settle=args.timeout)
    except BaseException:
        later.kill()
        raise
    last = ServeProcess(later_args)
    try:
        after_last_start = leftovers(second)
        third = last.process_tree()
        code = last.stop(timeout=args.timeout)
    except BaseException:
        last.kill()
        raise
    left = leftovers([*first, *second, *third])
    own = [n for n in by_supervisor_kill["shm"] + by_supervisor_kill["sockets"]
           if not n.startswith(f"mvl_{srv.pid}_")]
    return {"outcomes": outcomes, "stopped": True, "server_exit": code,
            "after_kill9_supervisor": by_supervisor_kill,
            "after_kill9_of_every_process": by_kill_all,
            "after_the_later_start": after_later_start, "after_the_last_start": after_last_start,
            "children_gone_s": round(children_gone_s, 1),
            "later_start_s": round(later_start_s, 1),
            "scenario_ok": (not by_supervisor_kill["processes"] and not own
                            and not any(after_later_start.values())
                            and not any(after_last_start.values())
                            and not any(left.values()))}


# ---- drain-deadline --------------------------------------------------------------------------
async def _ending(client: httpx.AsyncClient, req: dict, started: asyncio.Event,
                  timeout: float) -> str:
    """How a request ended: "completed", "error event, [DONE]" (streamed), "error json 503"
    (whole), "cut" (the connection closed without either), "http <status>", or "hung"."""
    async def go() -> str:
        try:
            if not req["stream"]:
                started.set()
                resp = await client.post("/v1/completions", json=req)
                if resp.status_code == 200:
                    return "completed"
                error = resp.json().get("error", {}) if resp.headers.get(
                    "content-type", "").startswith("application/json") else {}
                return f"error json {error['code']}" if "code" in error else \
                    f"http {resp.status_code}"
            async with client.stream("POST", "/v1/completions", json=req) as resp:
                if resp.status_code != 200:
                    return f"http {resp.status_code}"
                data = []
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        data.append(line[6:])
                        started.set()
        except httpx.TransportError:
            return "cut"
        if not data or data[-1] != "[DONE]":
            return "cut"
        return "error event, [DONE]" if len(data) > 1 and "error" in json.loads(data[-2]) \
            else "completed"
    try:
        return await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        return "hung"


async def _engine_holds(srv: ServeProcess, started: list[asyncio.Event]) -> None:
    """Until every stream has its first chunk and the engine has every request."""
    await asyncio.gather(*(e.wait() for e in started))
    await asyncio.to_thread(wait_engine_holds, srv.url, len(started))


def drain_deadline(srv: ServeProcess, args) -> dict:
    run = _run()

    async def go():
        async with run.client(srv.url, args.timeout) as c:
            reqs = [run.body(2000) for _ in range(args.clients)] + \
                   [run.body(2000, stream=False) for _ in range(args.clients // 4)]
            started = [asyncio.Event() for _ in reqs]
            ends = [asyncio.ensure_future(_ending(c, r, e, args.timeout))
                    for r, e in zip(reqs, started)]
            await asyncio.wait_for(_engine_holds(srv, started), args.timeout)
            srv.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            outcomes = Counter(await asyncio.gather(*ends))
            return outcomes, time.monotonic() - t0
    outcomes, ended_s = asyncio.run(go())
    code = srv.proc.wait(args.timeout)
    return {"outcomes": outcomes, "stopped": True, "server_exit": code,
            "all_ended_s_after_sigterm": round(ended_s, 1),
            "scenario_ok": set(outcomes) <= {"error event, [DONE]", "error json 503"}}


SCENARIOS = {
    "kill-engine-registering": (kill_engine_registering, ["--api-servers", "2"]),
    "kill-supervisor": (kill_supervisor, ["--drain-timeout", "2"]),
    "drain-deadline": (drain_deadline, ["--drain-timeout", "2"]),
}
