"""The process of a tensor-parallel rank > 0: its shard of the model, no scheduler, no sampler
use. It runs every step rank 0 hands it, in lock-step with the others, until STOP. Its
settings are rank 0's (shared_config.py).

Spawned by rank 0 (rank_group.py), or started elsewhere with torchrun's environment, rank 0
being `minivllm serve|generate --tensor-parallel-size N` under the same environment (RANK=0):

    MASTER_ADDR=host0 MASTER_PORT=29500 RANK=1 WORLD_SIZE=2 python -m minivllm.distributed.worker
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # how long one wait for a step blocks (the loop just waits again)


def worker_main(rank: int, host: str, port: int, parent_pid: Optional[int]) -> None:
    """Join the group whose store is at host:port as `rank` and run steps until STOP; with
    `parent_pid` (spawned by rank 0) die with that parent."""
    from minivllm import logger as log_setup
    from minivllm.distributed.group import (join, leave, open_store, share_cpu_threads,
                                            store_key)
    from minivllm.distributed.rank_group import backend_for, joining_key, post_rank_info
    from minivllm.distributed.shared_config import read_config
    from minivllm.distributed.step_channel import StepReceiver
    from minivllm.core.batch import ScheduledBatch
    from minivllm.distributed.step_record import decode_record
    from minivllm.engine.model_runner import ModelRunner
    from minivllm.engine.supervisor import die_with_parent
    from minivllm.loader import resolve_model

    if parent_pid is not None:
        # A spawned rank lives and stops with its engine: STOP ends it, and so does the
        # engine's death (SIGKILL: nothing of it is worth saving). The signals a terminal or
        # `timeout` sends to the whole process group are the engine's to act on: a rank that
        # died of them would fail the steps of the engine's drain.
        die_with_parent(parent_pid, signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log_setup.configure()
    store = open_store(rank, host, port)
    config = read_config(store)
    store.set(joining_key(rank), "")
    tp = join(store, rank, config.parallel.tensor_parallel_size, backend_for(config))
    receiver = None
    try:
        receiver = StepReceiver(store, rank)  # before the model: rank 0 waits for it
        source = resolve_model(config.model.model, config.model.load_format)
        if config.model.torch_device().type == "cpu":
            share_cpu_threads(tp.size)
        runner = ModelRunner(config, source, overlap=False, tp=tp)
        post_rank_info(store, rank, runner.kv_cache_bytes)
        logger.info("tensor-parallel rank %d of %d ready (pid %d)", rank, tp.size, os.getpid())
        while True:
            record = receiver.recv(IDLE_WAIT_S)
            if record is None:
                _check_rank0(store, store_key("config"), host, port)
                continue
            item = decode_record(record)
            if item is None:
                break
            if isinstance(item, ScheduledBatch):
                runner.forward(item)
            else:  # hidden states rank 0 wants logits of (prompt logprobs)
                runner.compute_logits(item)
    finally:
        if receiver is not None:
            receiver.close()
        leave()
    logger.info("tensor-parallel rank %d stopped", rank)


def _check_rank0(store, key: str, host: str, port: int) -> None:
    """A rank that rank 0 did not spawn has no parent to die with; but the store lives in rank
    0 (outside torchrun, whose agent stops the group itself), and fails once rank 0 is gone."""
    try:
        store.check([key])
    except RuntimeError as exc:  # torch's DistNetworkError / DistStoreError
        logger.error("rank 0 is gone (its store at %s:%d: %s): exiting", host, port,
                     str(exc).splitlines()[0])
        raise SystemExit(1) from None


def main() -> int:
    from minivllm.distributed.launch import run_launched_worker

    if run_launched_worker():
        return 0
    print("error: a worker needs torchrun's environment with RANK > 0 (RANK, WORLD_SIZE, "
          "MASTER_ADDR, MASTER_PORT); rank 0 is `minivllm serve|generate`", file=sys.stderr)
    return 2

if __name__ == "__main__":
    sys.exit(main())
