"""Chaos: SIGKILL a tensor-parallel rank > 0 of a serving engine under load (issue 27).

    python -m bench.chaos.run kill-tp-rank --duration 120 --every 30 --rate 0.5

The server runs the embedded model at --tensor-parallel-size 3. Each kill must take the whole
group down (the engine fails its next step or its periodic check with RankDiedError, ending
its in-flight requests with an error) and the supervisor must bring a new group up: a new
engine pid on /health, new ranks under it, and nothing of the old group left running.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal

import psutil

from bench.server_proc import ServeProcess, leftovers, wait_healthy

TP_SIZE = 3


def tp_ranks(engine_pid: int) -> list[int]:
    """The engine's spawned rank processes (its children other than the resource tracker)."""
    return [c.pid for c in psutil.Process(engine_pid).children()
            if "spawn_main" in (line := " ".join(c.cmdline())) and "resource_tracker" not in line]


def kill_tp_rank(srv: ServeProcess, args) -> dict:
    from bench.chaos.run import under_load  # run.py imports this module's scenario

    rng = random.Random(2)
    kills, groups = [], []

    async def killer():
        await asyncio.sleep(args.every)
        while len(kills) < max(1, int(args.duration // args.every) - 1):
            engine = srv.engine_pid()
            ranks = tp_ranks(engine)
            if len(ranks) != TP_SIZE - 1:
                raise AssertionError(f"engine {engine} has ranks {ranks}, expected "
                                     f"{TP_SIZE - 1}")
            victim = rng.choice(ranks)
            os.kill(victim, signal.SIGKILL)
            kills.append(victim)
            groups.append([engine, *ranks])
            new = await asyncio.to_thread(wait_healthy, srv.url, 600, engine)
            assert len(tp_ranks(new)) == TP_SIZE - 1, f"new engine {new} lacks its ranks"
            await asyncio.sleep(args.every)

    outcomes = under_load(srv, args, killer, 32)
    old = [p for group in groups for p in group]
    return {"outcomes": outcomes, "ranks_killed": len(kills),
            "groups_restarted": len(groups), "old_groups_left": leftovers(old),
            "scenario_ok": not any(leftovers(old).values())}


SCENARIOS = {"kill-tp-rank": (kill_tp_rank, ["--tensor-parallel-size", str(TP_SIZE)])}
