"""Chaos: SIGKILL one data-parallel engine of two under load (issue 28).

    python -m bench.chaos.run kill-dp-engine --duration 120 --every 30 --rate 4

The server runs the embedded model at --data-parallel-size 2. Each kill takes a random engine;
only the requests it held may fail (read from /metrics just before the kill: its running and
waiting requests; one request per kill may also reach it in the moment before its API server
notices the death), every other request completes, the other engine serves on (no 503: /health
stays 200), and the supervisor restarts the killed one.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal

import httpx

from bench.server_proc import ServeProcess, engine_holds, leftovers, metrics, wait_healthy


def kill_dp_engine(srv: ServeProcess, args) -> dict:
    from bench.chaos.run import under_load  # run.py imports this module's scenario

    rng = random.Random(3)
    kills, held, unhealthy = [], [], 0

    async def killer():
        nonlocal unhealthy
        await asyncio.sleep(args.every)
        while len(kills) < max(1, int(args.duration // args.every) - 1):
            rank = rng.randrange(2)
            victim = srv.engine_pids()[rank]
            m = await asyncio.to_thread(metrics, srv.url)
            held.append(engine_holds(m, rank))
            os.kill(victim, signal.SIGKILL)
            kills.append(victim)
            for _ in range(20):  # the other engine serves on: /health stays 200
                resp = await asyncio.to_thread(httpx.get, srv.url + "/health", timeout=30)
                unhealthy += resp.status_code != 200
                await asyncio.sleep(0.1)
            await asyncio.to_thread(wait_healthy, srv.url, 600, victim)
            await asyncio.sleep(args.every)

    outcomes = under_load(srv, args, killer, 256)  # long enough that a kill finds some
    errored = outcomes.get("errored", 0)
    return {"outcomes": outcomes, "engines_killed": len(kills),
            "held_by_killed_engines": held, "unhealthy_probes": unhealthy,
            "killed_engines_left": leftovers(kills),
            "scenario_ok": (errored <= sum(held) + len(kills) and unhealthy == 0
                            and outcomes.get("rejected", 0) == 0
                            and not any(leftovers(kills).values()))}


SCENARIOS = {"kill-dp-engine": (kill_dp_engine, ["--data-parallel-size", "2"])}
