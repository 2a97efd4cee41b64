"""Data parallel against a real `minivllm serve --data-parallel-size 2`: two engine processes
behind one API server. Both take requests (per-engine counters in /metrics), each has its own
ZeroMQ endpoint, and a SIGKILL of one engine mid-load fails only its own requests: the other
engine's finish, its supervisor restarts the dead one, and nothing is left behind."""
import asyncio
import json
import os
import signal

import httpx
import pytest

from bench.server_proc import (ServeProcess, engine_holds, free_port, leftovers, metrics,
                               wait_engine_holds, wait_engine_idle, wait_healthy, zmq_status)
from minivllm.distributed.data_parallel import cores_of, zmq_endpoint

TIMEOUT = 180.0  # per request: past it, a request is hung


def test_endpoints_and_cores_per_engine():
    assert zmq_endpoint("tcp://127.0.0.1:5557", 0, 2) == "tcp://127.0.0.1:5557"
    assert zmq_endpoint("tcp://127.0.0.1:5557", 1, 2) == "tcp://127.0.0.1:5558"
    assert zmq_endpoint("ipc:///tmp/x.sock", 1, 2) == "ipc:///tmp/x.sock.1"
    assert zmq_endpoint(None, 1, 2) is None
    with pytest.raises(ValueError, match="65535"):
        zmq_endpoint("tcp://127.0.0.1:65535", 1, 2)
    assert [cores_of(r, 2, [0, 1, 2, 3, 4]) for r in range(2)] == [[0, 1], [2, 3]]
    assert [cores_of(r, 3, [0, 1]) for r in range(3)] == [[0], [1], [0]]


def test_data_parallel_size_is_refused_offline():
    from minivllm import LLM

    with pytest.raises(ValueError, match="minivllm serve --data-parallel-size"):
        LLM(data_parallel_size=2)


async def _stream(client: httpx.AsyncClient, max_tokens: int) -> str:
    """"done", or "error <code>" from the stream's error event or the status."""
    body = {"prompt": "Write a long story about a river.", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return f"error {resp.status_code}"
        last = None
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                last = line[6:]
                if last != "[DONE]" and "error" in json.loads(last):
                    return f"error {json.loads(last)['error']['code']}"
        return "done" if last == "[DONE]" else "truncated"


async def _many(url: str, n: int, max_tokens: int) -> list[str]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        return list(await asyncio.gather(*(_stream(client, max_tokens) for _ in range(n))))


def test_two_engines_share_the_load_and_one_dies_alone():
    port = free_port()
    srv = ServeProcess(["--data-parallel-size", "2", "--dtype", "float32", "--num-blocks", "512",
                        "--zmq-endpoint", f"tcp://127.0.0.1:{port}"])
    try:
        engines = srv.engine_pids()
        assert len(set(engines)) == 2
        # one ZeroMQ endpoint per engine: the base port, then the next
        assert [zmq_status(f"tcp://127.0.0.1:{port + r}")["pid"] for r in (0, 1)] == engines

        # least outstanding work: concurrent requests spread over both engines
        assert asyncio.run(_many(srv.url, 8, 16)) == ["done"] * 8
        m = metrics(srv.url)
        tokens = [m[f"minivllm:engine_generation_tokens_total{{engine={r}}}"] for r in (0, 1)]
        assert sum(tokens) == 8 * 16 and min(tokens) > 0, tokens

        # SIGKILL engine 1 with requests on both: only its own fail
        async def crash() -> tuple[list[str], float]:
            in_flight = asyncio.ensure_future(_many(srv.url, 12, 300))
            await asyncio.to_thread(wait_engine_holds, srv.url, 12)
            on_killed = engine_holds(metrics(srv.url), 1)
            os.kill(engines[1], signal.SIGKILL)
            return await in_flight, on_killed
        outcomes, on_killed = asyncio.run(crash())
        assert 0 < on_killed < 12
        assert sorted(outcomes) == ["done"] * (12 - int(on_killed)) + \
            ["error 503"] * int(on_killed), (outcomes, on_killed)

        new = wait_healthy(srv.url, engine_pid=engines[1])
        assert new == engines[0] and srv.engine_pids()[1] != engines[1]
        assert leftovers([engines[1]]) == {"processes": [], "shm": [], "sockets": []}
        assert asyncio.run(_many(srv.url, 4, 8)) == ["done"] * 4
        wait_engine_idle(srv.url)
        health = httpx.get(srv.url + "/health", timeout=10).json()
        assert [e["restarts"] for e in health["engines"]] == [0, 1]
        pids = srv.process_tree()
        assert srv.stop() == 0, "".join(srv.stderr)[-3000:]
    except BaseException:
        srv.kill()
        raise
    assert leftovers(pids) == {"processes": [], "shm": [], "sockets": []}
