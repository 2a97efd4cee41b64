"""The process of a tensor-parallel rank > 0: its shard of the model, no scheduler, no sampler
use. It runs every step rank 0 hands it, in lock-step with the others, until STOP.

Spawned by rank 0 (rank_group.py), or started on another host by torchrun or by hand:

    MASTER_ADDR=host0 MASTER_PORT=29500 RANK=1 WORLD_SIZE=2 \\
        python -m minivllm.distributed.worker --model ... [engine options as for rank 0]
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from minivllm.config import EngineConfig

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # how long one wait for a step blocks (the loop just waits again)


def worker_main(config: EngineConfig, rank: int, port: int, parent_pid: Optional[int]) -> None:
    """Join rank 0's group as `rank` and run steps until STOP; with `parent_pid` (spawned by
    rank 0) die with that parent."""
    from minivllm import logger as log_setup
    from minivllm.distributed.group import join, leave, open_store
    from minivllm.distributed.rank_group import backend_for
    from minivllm.distributed.step_channel import StepReceiver
    from minivllm.distributed.step_record import decode_step
    from minivllm.engine.model_runner import ModelRunner
    from minivllm.engine.supervisor import die_with_parent
    from minivllm.loader import resolve_model

    if parent_pid is not None:
        die_with_parent(parent_pid)
    log_setup.configure()
    p = config.parallel
    store = open_store(rank, p.tensor_parallel_size, p.master_addr, port)
    tp = join(store, rank, p.tensor_parallel_size, backend_for(config))
    receiver = None
    try:
        receiver = StepReceiver(store, rank)  # before the model: rank 0 waits for it
        source = resolve_model(config.model.model, config.model.load_format)
        runner = ModelRunner(config, source, overlap=False, tp=tp)
        logger.info("tensor-parallel rank %d of %d ready (pid %d)", rank, tp.size, os.getpid())
        while True:
            record = receiver.recv(IDLE_WAIT_S)
            if record is None:
                continue
            batch = decode_step(record)
            if batch is None:
                break
            runner.forward(batch)
    finally:
        if receiver is not None:
            receiver.close()
        leave()
    logger.info("tensor-parallel rank %d stopped", rank)
