"""The tensor-parallel group: this process's rank, the group size, and the two collectives the
sharded layers need (all-reduce after a row-parallel linear or the vocab-parallel embedding,
gather of vocab shards of the logits to rank 0).

A group of one is the single-process engine: every collective is the identity and nothing
imports torch.distributed's process group machinery. Larger groups run over torch.distributed
(gloo on the CPU, NCCL on GPUs), joined through a TCPStore that rank 0 hosts.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

# A collective waits this long for a rank that stopped answering before it raises (a killed
# rank closes its sockets and fails its peers at once; this bounds a hung one).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)


class RankDiedError(RuntimeError):
    """A rank of the tensor-parallel group is gone: the engine cannot step without it."""


def _collective(what: str, collective, *args, **kwargs) -> None:
    """Run a torch.distributed collective; its failure (gloo/NCCL: a peer's sockets closed,
    or a timeout) is a RankDiedError."""
    try:
        collective(*args, **kwargs)
    except RuntimeError as exc:
        raise RankDiedError(f"tensor-parallel {what} failed, a rank is gone (or hung): "
                            f"{str(exc).splitlines()[0]}") from exc


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal share of `total` items; `what` names them in
        the error when the group size does not divide `total`."""
        if total % self.size:
            raise ValueError(f"tensor_parallel_size {self.size} does not divide {what} "
                             f"({total})")
        n = total // self.size
        return self.rank * n, n

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        if self.size > 1:
            _collective("all-reduce", dist.all_reduce, x)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Every rank's `x` concatenated along the last dimension, on rank 0 (None elsewhere)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_first else None
        _collective("gather", dist.gather, x, parts, dst=0)
        return torch.cat(parts, dim=-1) if self.is_first else None

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (each rank's KV cache from its own memory, all
        of them the same size)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        _collective("all-reduce", dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return int(t.item())


def share_cpu_threads(size: int) -> int:
    """Give this rank its share of the CPUs (at least one thread): ranks that each ran the
    default, every CPU, spin in OpenMP against each other (a 2-rank step on 2 cores took 0.7 s
    instead of 10 ms). Returns the thread count it had, for whoever restores it."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // size))
    return before


def open_store(rank: int, host: str, port: int) -> dist.TCPStore:
    """The group's rendezvous: rank 0 hosts it (port 0: a free port, which `store.port`
    tells the others), the other ranks connect to it. Under torchrun its agent hosts one on
    MASTER_PORT already (TORCHELASTIC_USE_AGENT_STORE): every rank connects to that."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(host, port, is_master=rank == 0 and not agent,
                         timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)


def store_key(*parts: object) -> str:
    """A key of ours in the group's store. torchrun's agent store outlives a restart of the
    group: its restart count keeps a new group from reading the old one's keys."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return "/".join(("minivllm", restart, *map(str, parts)))


def join(store: dist.TCPStore, rank: int, size: int, backend: str = "gloo"
         ) -> TensorParallelGroup:
    """Join the process group (returns once every rank has joined)."""
    dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)
    return TensorParallelGroup(rank, size)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
