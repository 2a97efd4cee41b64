"""Data parallel: `minivllm serve --data-parallel-size N` runs N whole engines (scheduler, KV
cache, model; each with its own supervisor, control socket and ZeroMQ endpoint) behind the same
API servers, which route every new request to one of them (frontend/data_parallel_client.py).
For a small model this beats one engine split N ways: no collective per layer, N schedulers.

What this module decides: engine `rank`'s config, its share of the machine (its own GPU, or its
own CPU cores), and its ZeroMQ endpoint (one per engine: the base port plus the rank).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from minivllm.config import EngineConfig, TransportConfig

logger = logging.getLogger(__name__)


def engine_config(config: EngineConfig, rank: int) -> EngineConfig:
    """Engine `rank`'s config: the shared one, with its rank."""
    return dataclasses.replace(config, parallel=dataclasses.replace(
        config.parallel, data_parallel_rank=rank))


def transport(base: TransportConfig, rank: int, size: int) -> TransportConfig:
    """Engine `rank`'s transport: a control socket of its own, and its own ZeroMQ endpoint."""
    return dataclasses.replace(base, control=None,
                               zmq_endpoint=zmq_endpoint(base.zmq_endpoint, rank, size))


def zmq_endpoint(base: Optional[str], rank: int, size: int) -> Optional[str]:
    """`tcp://host:port` -> port + rank; `ipc://path` -> path.rank (rank 0 keeps the base)."""
    if base is None or size == 1 or rank == 0:
        return base
    if base.startswith("tcp://"):
        host, _, port = base.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"data parallelism needs a numbered port in the ZeroMQ endpoint "
                             f"(engine i binds port + i), got {base!r}")
        if int(port) + size - 1 > 65535:
            raise ValueError(f"ZeroMQ endpoint {base!r}: ports {port}..{int(port) + size - 1} "
                             f"for {size} engines pass 65535")
        return f"{host}:{int(port) + rank}"
    return f"{base}.{rank}"


def cores_of(rank: int, size: int, cores: list[int]) -> list[int]:
    """Engine `rank`'s share of `cores`: an even split (the remainder unused, so the API servers
    keep a core); with fewer cores than engines, one core each, round robin."""
    per = len(cores) // size
    if per == 0:
        return [cores[rank % len(cores)]]
    return cores[rank * per:(rank + 1) * per]


def take_share(config: EngineConfig) -> None:
    """In engine `rank`'s process, before its model loads: its GPU (cuda:rank x the
    tensor-parallel size, where the device is auto or cuda), or its share of the CPU cores
    (pinned, as many torch threads). Without data parallelism: nothing."""
    import torch

    p = config.parallel
    if p.data_parallel_size == 1:
        return
    if config.model.torch_device().type == "cuda":
        index = p.data_parallel_rank * p.tensor_parallel_size
        if config.model.device in ("auto", "cuda"):
            if index >= torch.cuda.device_count():
                raise ValueError(f"data-parallel engine {p.data_parallel_rank} needs GPU "
                                 f"{index}; this machine has {torch.cuda.device_count()}")
            config.model.device = f"cuda:{index}"
        torch.cuda.set_device(config.model.torch_device())
        logger.info("data-parallel engine %d of %d on %s", p.data_parallel_rank,
                    p.data_parallel_size, config.model.device)
        return
    share = cores_of(p.data_parallel_rank, p.data_parallel_size,
                     sorted(os.sched_getaffinity(0)))
    os.sched_setaffinity(0, share)
    torch.set_num_threads(len(share))
    logger.info("data-parallel engine %d of %d on CPU cores %s (%d threads)",
                p.data_parallel_rank, p.data_parallel_size, share, len(share))
