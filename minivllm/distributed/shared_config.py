"""Rank 0's EngineConfig, posted in the group's store as JSON: every rank builds its shard from
the same settings, whoever started it (rank 0, torchrun, a shell on another host). Each rank
validates what it reads, as the dataclasses validate every config."""
from __future__ import annotations

import dataclasses
import json

import torch.distributed as dist

from minivllm.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig,
                             SchedulerConfig)
from minivllm.distributed.group import store_key

_PARTS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
          "parallel": ParallelConfig}


def post_config(store: dist.Store, config: EngineConfig) -> None:
    store.set(store_key("config"), json.dumps(dataclasses.asdict(config)))


def read_config(store: dist.Store) -> EngineConfig:
    """Rank 0's config (waits until it is posted)."""
    fields = json.loads(store.get(store_key("config")))
    return EngineConfig(**{name: cls(**fields[name]) for name, cls in _PARTS.items()})
