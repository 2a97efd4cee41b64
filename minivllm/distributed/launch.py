"""Ranks started by torchrun (or by hand with its environment): RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT say who this process is and where the group meets. Rank 0 runs the engine (and its
clients' endpoints); every other rank runs a worker (worker.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class EnvLaunch:
    rank: int
    world_size: int
    master_addr: str
    master_port: int

    def parallel_options(self) -> dict:
        """Rank 0's ParallelConfig settings: the group is launched, not spawned."""
        return dict(tensor_parallel_size=self.world_size, master_addr=self.master_addr,
                    master_port=self.master_port, spawn_workers=False)


def from_env() -> Optional[EnvLaunch]:
    """The launch the environment describes, or None when WORLD_SIZE is unset or 1; ValueError
    naming what is missing or malformed."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    try:
        launch = EnvLaunch(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                           os.environ.get("MASTER_ADDR", "127.0.0.1"),
                           int(os.environ["MASTER_PORT"]))
    except KeyError as e:
        raise ValueError(f"WORLD_SIZE is set but {e.args[0]} is not: a launched rank needs "
                         f"RANK, WORLD_SIZE and MASTER_PORT (MASTER_ADDR defaults to "
                         f"127.0.0.1)") from None
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and MASTER_PORT must be integers") from None
    if not 0 <= launch.rank < launch.world_size:
        raise ValueError(f"RANK {launch.rank} is outside [0, WORLD_SIZE {launch.world_size})")
    return launch


def run_launched_worker() -> bool:
    """Under torchrun every rank runs the same command: as a rank > 0, run the worker until
    the group stops and return True; otherwise (rank 0, or no launch) return False at once."""
    launch = from_env()
    if launch is None or launch.rank == 0:
        return False
    from minivllm.distributed.worker import worker_main

    worker_main(launch.rank, launch.master_addr, launch.master_port, None)
    return True
