"""Request: what the scheduler knows of one sequence (the reference scheduler's state).

A request is named by its `owner`, an int64 handle chosen by whoever adds it (the engine process
packs its client and request into it through one table; `LLM` counts): step outputs carry owners,
so the core keeps no other map from batch rows to requests."""
from __future__ import annotations

import enum
from typing import Sequence

import numpy as np

from minivllm._cext.records import FINISH_LENGTH, FINISH_NONE, FINISH_STOP
from minivllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(self, owner: int, prompt_token_ids: Sequence[int], params: SamplingParams,
                 eos_token_ids: Sequence[int], max_model_len: int, arrival_seq: int,
                 arrival_time: float, priority: int = 0) -> None:
        self.owner = owner
        self.params = params
        self.priority = priority
        self.arrival_seq = arrival_seq  # tie-breaker: earlier arrivals go first, are preempted last
        self.arrival_time = arrival_time
        self.num_prompt_tokens = len(prompt_token_ids)
        max_new = params.max_tokens or max_model_len
        self.max_total_tokens = min(max_model_len, self.num_prompt_tokens + max_new)
        # One buffer for prompt + output: prefix hashing and recompute read token ids from here.
        self.token_ids = np.zeros(self.max_total_tokens, dtype=np.int64)
        self.token_ids[:self.num_prompt_tokens] = prompt_token_ids
        self.num_tokens = self.num_prompt_tokens
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.req_index = -1
        self.status = RequestStatus.WAITING
        self.finish_code = FINISH_NONE
        self.eos_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self.stop_ids = frozenset(params.stop_token_ids)
        self.in_flight = 0  # rows of a deferred step not resolved yet (Scheduler.defer)

    @property
    def output_token_ids(self) -> np.ndarray:
        return self.token_ids[self.num_prompt_tokens:self.num_tokens]

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival_seq)

    def append_token(self, token: int) -> int:
        """Record a sampled token; return its finish code (FINISH_NONE: it goes on)."""
        self.num_tokens += 1
        return self.set_token(self.num_tokens - 1, token)

    def set_token(self, index: int, token: int) -> int:
        """Write the token at `index`, the last one held (a deferred step's placeholder, or
        the one just appended); return its finish code."""
        self.token_ids[index] = token
        if index + 1 - self.num_prompt_tokens >= self.params.min_tokens and \
                (token in self.eos_ids or token in self.stop_ids):
            return FINISH_STOP
        if index + 1 >= self.max_total_tokens:
            return FINISH_LENGTH
        return FINISH_NONE
