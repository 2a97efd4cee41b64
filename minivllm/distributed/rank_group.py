"""Rank 0's side of a tensor-parallel group: the other ranks' processes (when rank 0 spawns
them), the process group, and the step hand-off.

    group = RankGroup(config, arch)  # ranks started and joined; a bad head count fails here
    group.send(batch)                # before each forward: every rank runs the same step
    group.close()                    # STOP to every rank, join them, unlink the rings

Ranks stay in lock-step: each forward's all-reduces and the logits gather wait for all of
them. A rank that dies fails the next collective on every other rank (gloo sees its sockets
close), and rank 0 also checks its spawned workers before each step: either way the engine
raises RankDiedError and exits, its workers die with it (PR_SET_PDEATHSIG), and the supervisor
restarts the whole group.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import socket
import weakref
from typing import Optional

import torch

from minivllm.config import ArchConfig, EngineConfig
from minivllm.core.batch import ScheduledBatch
from minivllm.distributed.group import (RankDiedError, TensorParallelGroup, join, leave,
                                        open_store, share_cpu_threads, store_key)
from minivllm.distributed.shared_config import post_config
from minivllm.distributed.step_channel import StepSender
from minivllm.distributed.step_record import (encode_logits, encode_step, encode_stop,
                                              largest_record)
from minivllm.engine.prompt_logprobs import ROWS_PER_PASS

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0  # what a rank gets to exit after STOP before it is killed


def check_shardable(arch: ArchConfig, size: int) -> None:
    """Raise ValueError, before any process starts, when `size` ranks cannot split `arch`."""
    from minivllm.models.llama import kv_head_shard

    tp = TensorParallelGroup(0, size)
    tp.shard(arch.num_attention_heads, "num_attention_heads")
    tp.shard(arch.intermediate_size, "intermediate_size")
    kv_head_shard(arch, tp)


def rank_info(rank: int, kv_cache_bytes: int) -> dict:
    """What /metrics labels a rank's figures with, and the figure that differs by rank."""
    return dict(rank=rank, host=socket.gethostname(), pid=os.getpid(),
                kv_cache_bytes=kv_cache_bytes)


def post_rank_info(store, rank: int, kv_cache_bytes: int) -> None:
    """A rank > 0, once its model and KV cache are up, tells rank 0 about itself."""
    store.set(store_key("ranks", rank, "info"), json.dumps(rank_info(rank, kv_cache_bytes)))


def joining_key(rank: int) -> str:
    """Posted by a rank just before it joins the process group."""
    return store_key("ranks", rank, "joining")


def backend_for(config: EngineConfig) -> str:
    if config.parallel.backend is not None:
        return config.parallel.backend
    return "nccl" if config.model.torch_device().type == "cuda" else "gloo"


class RankGroup:
    def __init__(self, config: EngineConfig, arch: ArchConfig, max_model_len: int) -> None:
        p = config.parallel
        check_shardable(arch, p.tensor_parallel_size)
        if config.model.quantization.startswith("gguf-native"):
            raise ValueError(f"quantization {config.model.quantization} does not shard: with "
                             f"tensor_parallel_size > 1 the linears run dense weights "
                             f"(quantization none or auto)")
        self.workers: list[mp.Process] = []
        self.sender: Optional[StepSender] = None
        # This process's threads while it is rank 0 (given back on close: LLM's caller keeps
        # its process).
        self.threads = share_cpu_threads(p.tensor_parallel_size) \
            if config.model.torch_device().type == "cpu" else None
        try:
            self.store = open_store(0, p.master_addr, p.master_port)
            post_config(self.store, config)
            if p.spawn_workers:
                self._spawn(config, self.store.port)
                self._await_joining()
            self.tp = join(self.store, 0, p.tensor_parallel_size, backend_for(config))
            self.sender = StepSender(self.store, p.tensor_parallel_size, p.remote_steps,
                                     p.master_addr, _ring_capacity(config, arch, max_model_len))
        except BaseException:
            self.close()
            raise
        self._finalizer = weakref.finalize(self, _close, self.workers, self.sender,
                                           self.threads)
        logger.info("tensor parallel: %d ranks over %s, steps to %d local rank(s) by shared "
                    "memory and %d by ZeroMQ", self.tp.size, backend_for(config),
                    len(self.sender.rings), len(self.sender.identities))

    def _spawn(self, config: EngineConfig, port: int) -> None:
        from minivllm.distributed.worker import worker_main

        ctx = mp.get_context("spawn")
        for rank in range(1, config.parallel.tensor_parallel_size):
            proc = ctx.Process(target=worker_main, name=f"minivllm-tp{rank}",
                               args=(rank, config.parallel.master_addr, port, os.getpid()))
            proc.start()
            self.workers.append(proc)

    def _await_joining(self) -> None:
        """Wait until every spawned rank is about to join the process group: one that dies
        before (an import, the store) would otherwise leave rank 0 waiting in the join for
        the whole timeout."""
        for rank, proc in enumerate(self.workers, start=1):
            while not self.store.check([joining_key(rank)]):
                proc.join(0.05)  # returns at once if it exits
                if proc.exitcode is not None:
                    raise RankDiedError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited "
                                        f"with code {proc.exitcode} before joining the group")

    def check(self) -> None:
        """Raise RankDiedError if a spawned rank has exited (ranks started elsewhere show
        their death by failing the next collective)."""
        for rank, proc in enumerate(self.workers, start=1):
            if not proc.is_alive():
                raise RankDiedError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited "
                                    f"with code {proc.exitcode}")

    def send(self, batch: ScheduledBatch) -> None:
        """Hand `batch` to every other rank (before rank 0 runs its own forward)."""
        self.check()
        self.sender.send(encode_step(batch))

    def send_hidden(self, hidden: torch.Tensor) -> None:
        """Hand hidden states to every other rank, whose vocabulary shards of their logits
        rank 0 gathers next (prompt logprobs)."""
        self.check()
        self.sender.send(encode_logits(hidden))

    def ranks_info(self) -> list[dict]:
        """rank_info() of every other rank that has posted it (each does once its model and KV
        cache are up, about when rank 0's are)."""
        keys = [store_key("ranks", r, "info") for r in range(1, self.tp.size)]
        return [json.loads(self.store.get(k)) for k in keys if self.store.check([k])]

    def close(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        else:
            _close(self.workers, self.sender, self.threads)


def _ring_capacity(config: EngineConfig, arch: ArchConfig, max_model_len: int) -> int:
    """A step ring holds two of the largest records (rank 0 may be one step ahead)."""
    s = config.scheduler
    largest = largest_record(s.max_num_batched_tokens, s.max_num_seqs,
                             -(-max_model_len // config.cache.block_size), ROWS_PER_PASS,
                             arch.hidden_size)
    return max(1 << 20, 1 << (2 * largest + 64).bit_length())


def _close(workers: list[mp.Process], sender: Optional[StepSender],
           threads: Optional[int]) -> None:
    """STOP to every rank, wait for them (kill the late ones), leave the group, give this
    process its `threads` back."""
    if sender is not None:
        try:
            sender.send(encode_stop())
        except Exception as exc:  # a dead rank's ring may be full: it is killed below
            logger.warning("tensor-parallel stop not delivered: %s", exc)
    for proc in workers:  # without a sender they never joined: nothing to wait for
        proc.join(JOIN_TIMEOUT_S if sender is not None else 0)
        if proc.is_alive():
            logger.warning("tensor-parallel rank %s did not stop: killed", proc.name)
            proc.kill()
            proc.join()
    if sender is not None:
        sender.close()
    leave()
    if threads is not None:
        torch.set_num_threads(threads)
