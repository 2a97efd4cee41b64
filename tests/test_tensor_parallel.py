"""Tensor parallelism on the CPU through gloo (issue 27): greedy tokens of TP=2 and TP=3 equal
TP=1's, token for token, in fp32; the steps reach the other ranks by shared memory or, forced,
by ZeroMQ over loopback TCP; a bad head count fails before any process starts; a dead rank
fails the next step with a clear error; nothing is left behind."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.config import SupervisorConfig, TransportConfig
from minivllm.core.batch import ScheduledBatch
from minivllm.distributed.group import RankDiedError
from minivllm.distributed.rank_group import RankGroup
from minivllm.engine.supervisor import Supervisor
from minivllm.llm import build_engine_config
from minivllm.distributed.step_record import (decode_record, encode_logits, encode_step,
                                              encode_stop)
from minivllm.transport import shm

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
WITH_PROMPT_LOGPROBS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                      prompt_logprobs=2)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], list(range(20, 70))]
# Small engines: the KV cache is 16 MiB a rank, contexts stay short.
THREADS = torch.get_num_threads()
SMALL = dict(dtype="float32", cpu_kv_cache_bytes=1 << 24, max_model_len=256)


def _config(tmp_path, name: str, **fields) -> str:
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=1001,
               hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32,
               max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=0)
    cfg.update(fields)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _generate(model, prompts=PROMPTS, params=GREEDY, **kwargs) -> list:
    llm = LLM(model, **SMALL, **kwargs)
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.close()


def _greedy(model, prompts=PROMPTS, **kwargs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in _generate(model, prompts, **kwargs)]


def _nothing_left_behind() -> None:
    assert torch.get_num_threads() == THREADS  # rank 0's share of the CPUs given back
    assert not mp.active_children()
    assert not shm.list_segments(pid=os.getpid())
    assert not shm.list_segments(pid=os.getpid(), directory=shm.SOCKET_DIR)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched_rank(port: int) -> subprocess.Popen:
    """Rank 1 of 2 started as torchrun starts it."""
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, "-m", "minivllm.distributed.worker"], env=env)


def test_step_record_round_trips_every_array():
    batch = ScheduledBatch(np.arange(5), np.arange(5) + 1, np.arange(5) + 2, np.array([0, 3, 5]),
                           np.array([3, 2]), np.array([[1, 2, 3], [4, 5, 6]], np.int32),
                           np.array([7, 9]), np.array([0, 1]))
    back = decode_record(encode_step(batch).tobytes())
    for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens",
                 "block_tables", "req_indices", "sample_rows"):
        np.testing.assert_array_equal(getattr(back, name), getattr(batch, name))
        assert getattr(back, name).dtype == getattr(batch, name).dtype
    assert decode_record(encode_stop().tobytes()) is None
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(3, 5).to(dtype)
        assert torch.equal(decode_record(encode_logits(hidden).tobytes()), hidden)
    with pytest.raises(ValueError, match="malformed step record"):
        decode_record(encode_step(batch).tobytes()[:-8])


def test_a_head_count_the_size_does_not_divide_fails_before_any_rank_starts(tmp_path):
    model = _config(tmp_path, "four-heads")
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not divide "
                                         r"num_attention_heads \(4\)"):
        LLM(model, load_format="dummy", tensor_parallel_size=3, **SMALL)
    with pytest.raises(ValueError, match="neither a divisor nor a multiple of "
                                         "num_key_value_heads"):
        LLM(_config(tmp_path, "kv3", num_attention_heads=12, num_key_value_heads=3),
            load_format="dummy", tensor_parallel_size=4, **SMALL)
    _nothing_left_behind()


@pytest.mark.parametrize("options, message", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be a positive integer"),
    (dict(tensor_parallel_size=2, spawn_workers=False),
     "master_port 0 .* works only when rank 0 spawns its workers"),
    (dict(tensor_parallel_size=2, backend="mpi"), "backend must be one of gloo, nccl, None"),
    (dict(tensor_parallel_size=2, async_scheduling=True),
     "async_scheduling is not supported with tensor_parallel_size > 1"),
    (dict(tensor_parallel_size=2, quantization="gguf-native"),
     "quantization gguf-native does not shard"),
])
def test_bad_parallel_options_are_named(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        LLM(_config(tmp_path, "opts"), load_format="dummy", **SMALL, **options)
    _nothing_left_behind()


@pytest.mark.parametrize("fields", [
    # KV heads split; vocabulary 1001 pads the second rank's shard; untied head
    dict(),
    # Qwen2: q/k/v biases, one KV head replicated on both ranks, tied embeddings
    dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_key_value_heads=1,
         tie_word_embeddings=True),
], ids=["llama-split-kv", "qwen2-replicated-kv"])
def test_tp2_on_a_small_model_gives_tp1_greedy_tokens(tmp_path, fields):
    """And the prompt logprobs, whose logits every rank computes a shard of."""
    model = _config(tmp_path, "small", **fields)
    want = _generate(model, params=WITH_PROMPT_LOGPROBS, load_format="dummy", kernels="torch")
    got = _generate(model, params=WITH_PROMPT_LOGPROBS, load_format="dummy", kernels="torch",
                    tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for g, w in zip(got, want):
        assert g.prompt_logprobs[0] is None and len(g.prompt_logprobs) == len(w.prompt_logprobs)
        for gp, wp in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            assert gp.keys() == wp.keys()
            assert [gp[t] for t in wp] == pytest.approx([wp[t] for t in wp], abs=1e-4)
    _nothing_left_behind()


def test_tp3_on_the_embedded_model_gives_tp1_greedy_tokens():
    """9 query heads and 3 KV heads: one KV head and three query heads a rank."""
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
    # The default CPU path, the one-call decoder, on the dense fp32 weights the ranks load
    want = _greedy(None, prompts, quantization="none")
    assert _greedy(None, prompts, tensor_parallel_size=3) == want
    _nothing_left_behind()


def test_a_rank_launched_from_the_environment_over_the_remote_path(tmp_path):
    """Rank 1 started as torchrun starts it (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; the
    settings come from rank 0); remote_steps: its steps go over ZeroMQ on loopback TCP, as to
    a rank on another host. Same tokens as TP=1; rank 1 exits when rank 0 closes."""
    model = _config(tmp_path, "remote")
    want = _greedy(model, load_format="dummy", kernels="torch")
    port = _free_port()
    worker = _launched_rank(port)
    try:
        llm = LLM(model, load_format="dummy", kernels="torch", tensor_parallel_size=2,
                  spawn_workers=False, master_port=port, remote_steps=True, **SMALL)
        try:
            sender = llm.engine.ranks.sender
            assert len(sender.identities) == 1 and not sender.rings  # the ZeroMQ path
            got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
            # what /metrics labels by rank: each rank's KV cache, its host and pid
            ranks = llm.engine.ranks_info()
            assert [r["rank"] for r in ranks] == [0, 1]
            assert ranks[1]["pid"] == worker.pid
            assert ranks[0]["kv_cache_bytes"] == ranks[1]["kv_cache_bytes"] > 0
        finally:
            llm.close()
        assert [o.outputs[0].token_ids for o in got] == want
        assert worker.wait(60) == 0
    finally:
        worker.kill()
        worker.wait()
    _nothing_left_behind()


def test_a_launched_rank_exits_when_rank_0_is_killed(tmp_path):
    """No parent to die with: it notices that rank 0's store is gone while it waits."""
    port = _free_port()
    worker = _launched_rank(port)
    rank0 = subprocess.Popen([sys.executable, "-c", f"""
from minivllm import LLM
llm = LLM({_config(tmp_path, "orphan")!r}, load_format="dummy", kernels="torch",
          tensor_parallel_size=2, spawn_workers=False, master_port={port}, remote_steps=True,
          **{SMALL!r})
print("ready", flush=True)
input()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert rank0.stdout.readline() == "ready\n"
        rank0.kill()
        assert worker.wait(120) == 1
    finally:
        for proc in (rank0, worker):
            proc.kill()
            proc.wait()


def test_a_killed_spawned_rank_fails_the_next_step_clearly_and_leaves_nothing(tmp_path):
    """Rank 0 sees its child gone before it hands out the step."""
    llm = LLM(_config(tmp_path, "dies"), load_format="dummy", kernels="torch",
              tensor_parallel_size=2, **SMALL)
    try:
        (worker,) = mp.active_children()
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(60)
        with pytest.raises(RankDiedError, match=r"tensor-parallel rank 1 \(pid \d+\) exited "
                                                r"with code -9"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.close()
    _nothing_left_behind()


def test_a_rank_that_dies_before_joining_fails_the_start_at_once(tmp_path, monkeypatch):
    """Not after the join's timeout: rank 0 watches its spawned ranks until they join."""
    spawn = RankGroup._spawn

    def spawn_and_kill(self, *args):
        spawn(self, *args)
        os.kill(self.workers[0].pid, signal.SIGKILL)
    monkeypatch.setattr(RankGroup, "_spawn", spawn_and_kill)
    with pytest.raises(RankDiedError, match=r"rank 1 \(pid \d+\) exited with code -9 before "
                                            r"joining the group"):
        LLM(_config(tmp_path, "early"), load_format="dummy", kernels="torch",
            tensor_parallel_size=2, **SMALL)
    _nothing_left_behind()


def test_a_killed_launched_rank_fails_the_next_collective_clearly(tmp_path):
    """A rank rank 0 did not spawn: its death shows in the first collective (gloo sees its
    sockets close), which names it a dead rank rather than a transport error."""
    port = _free_port()
    worker = _launched_rank(port)
    try:
        llm = LLM(_config(tmp_path, "dies-far"), load_format="dummy", kernels="torch",
                  tensor_parallel_size=2, spawn_workers=False, master_port=port, **SMALL)
        try:
            worker.kill()
            worker.wait()
            with pytest.raises(RankDiedError, match="tensor-parallel all-reduce failed, a rank "
                                                    "is gone"):
                llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        finally:
            llm.close()
    finally:
        worker.kill()
        worker.wait()
    _nothing_left_behind()


def _ranks_of(engine_pid: int) -> list[int]:
    """The engine's spawned rank processes (its children but the resource tracker)."""
    psutil = pytest.importorskip("psutil", reason="finds the engine's rank processes")
    return [c.pid for c in psutil.Process(engine_pid).children()
            if "resource_tracker" not in " ".join(c.cmdline())]


def test_the_supervisor_restarts_the_group_of_a_killed_rank(tmp_path):
    config = build_engine_config(_config(tmp_path, "supervised"), load_format="dummy",
                                 kernels="torch", tensor_parallel_size=2, **SMALL)
    sup = Supervisor(config, TransportConfig(), SupervisorConfig(backoff_s=0.1))
    sup.start()
    try:
        old = [sup.engine_pid, *_ranks_of(sup.engine_pid)]
        assert len(old) == 2
        os.kill(old[1], signal.SIGKILL)
        deadline = time.monotonic() + 300  # a bound for a loaded machine, not a speed check
        while not (sup.restarts == 1 and sup.state == "ready"):
            assert time.monotonic() < deadline, f"no new group: {sup.state}"
            time.sleep(0.1)
        new = [sup.engine_pid, *_ranks_of(sup.engine_pid)]
        assert new[0] != old[0] and len(new) == 2
    finally:
        sup.shutdown()
    assert not any(shm.pid_alive(p) for p in old + new)
    _nothing_left_behind()
    for pid in old + new:
        assert not shm.list_segments(pid=pid)
        assert not shm.list_segments(pid=pid, directory=shm.SOCKET_DIR)
