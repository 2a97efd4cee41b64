"""Prompt logprobs (vLLM's `prompt_logprobs`): each prompt token's logprob, and the top N at its
position, from the logits of the prefill that computes it, chunk by chunk, without a second
pass. Such a request skips the prefix cache (the scheduler computes its whole prompt), and a
position computed twice (recompute after preemption) is reported once.

A step's result maps each owner to (first position, logprob [n], top ids [n, k], top logprobs
[n, k]): position p's entry is the logprob of prompt token p (p >= 1) given the tokens before
it, so a prompt of P tokens has P - 1 entries, the first token none.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from minivllm.core.batch import ScheduledBatch

PromptLogprobs = dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]]
# Logits of this many positions at a time: [rows, vocab] fp32 stays small (50 MB at 49k).
ROWS_PER_PASS = 256


class PromptLogprobsTracker:
    def __init__(self) -> None:
        # owner -> [req_index, prompt ids, top N, next position to report]; kept across a
        # preemption (the request comes back under another req_index), dropped once reported
        self._wanted: dict[int, list] = {}

    def __bool__(self) -> bool:
        return bool(self._wanted)

    def admitted(self, admitted: Iterable) -> None:
        """Requests admitted this step: those that asked, with their prompt not yet reported."""
        for req in admitted:
            k = req.params.prompt_logprobs
            if k is None or req.num_tokens != req.num_prompt_tokens:
                continue
            if req.owner in self._wanted:
                self._wanted[req.owner][0] = req.req_index
            else:
                prompt = np.asarray(req.token_ids[:req.num_prompt_tokens], dtype=np.int64)
                self._wanted[req.owner] = [req.req_index, prompt, k, 1]

    def forget(self, owner: int) -> None:
        """An aborted request."""
        self._wanted.pop(owner, None)

    def compute(self, batch: ScheduledBatch, hidden: torch.Tensor,
                compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> PromptLogprobs:
        """The logprobs of the prompt positions `batch` computes for the requests that asked,
        from `hidden` (every token's, in batch order)."""
        out: PromptLogprobs = {}
        owner_of = {entry[0]: owner for owner, entry in self._wanted.items()}
        starts = batch.query_start_loc
        for row, req_index in enumerate(batch.req_indices.tolist()):
            owner = owner_of.get(req_index)
            if owner is None:
                continue
            _, prompt, k, first = entry = self._wanted[owner]
            # token t at position p predicts prompt token p + 1: report positions p + 1 >= first
            lo, hi = int(starts[row]), int(starts[row + 1])
            positions = batch.positions[lo:hi] + 1
            keep = np.flatnonzero((positions >= first) & (positions < len(prompt)))
            if not len(keep):
                continue
            rows = torch.as_tensor(lo + keep, device=hidden.device)
            out[owner] = (int(positions[keep[0]]),
                          *_logprobs(hidden[rows], prompt[positions[keep]], k, compute_logits))
            entry[3] = int(positions[keep[-1]]) + 1
            if entry[3] >= len(prompt):
                del self._wanted[owner]
        return out


@torch.inference_mode()
def _logprobs(hidden: torch.Tensor, targets: np.ndarray, k: int,
              compute_logits: Callable[[torch.Tensor], torch.Tensor]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logprob of each target [n], top-k ids [n, k], their logprobs [n, k]), in fp32."""
    target = torch.as_tensor(targets, device=hidden.device).unsqueeze(1)
    parts = []
    for i in range(0, len(target), ROWS_PER_PASS):
        logprobs = compute_logits(hidden[i:i + ROWS_PER_PASS]).float().log_softmax(dim=-1)
        top = logprobs.topk(k, dim=-1)
        parts.append((logprobs.gather(1, target[i:i + ROWS_PER_PASS]).squeeze(1),
                      top.indices, top.values))
    sampled, top_ids, top_logprobs = (torch.cat(p).cpu().numpy() for p in zip(*parts))
    return sampled, top_ids.astype(np.int32), top_logprobs
