"""Per-request timings only the engine can see, as vLLM exports them: queue time (arrival in the
engine to first scheduled) and prefill time (first scheduled to first sampled token).

They are kept as cumulative histograms that the `stats` control reply carries to /metrics, so
every API server reports the engine's own figures, never a sum of copies. A step pays nothing
once no request is waiting for its first token.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

# Seconds: vLLM's request-time buckets, up to ten minutes in an engine queue.
TIME_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)


class Histogram:
    """Prometheus semantics: bucket i counts values <= bounds[i], the last one is +Inf."""

    def __init__(self, bounds: Iterable[float] = TIME_BUCKETS) -> None:
        self.bounds = np.asarray(tuple(bounds), dtype=np.float64)
        self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[np.searchsorted(self.bounds, value, side="left")] += 1
        self.sum += value

    def snapshot(self) -> dict:
        """{"bounds": upper bounds, "cumulative": counts <= each bound then in all, "sum"}."""
        return {"bounds": self.bounds.tolist(), "cumulative": np.cumsum(self.counts).tolist(),
                "sum": self.sum}


class RequestTimings:
    def __init__(self) -> None:
        self.queue = Histogram()
        self.prefill = Histogram()
        self._scheduled: dict[int, float] = {}  # owner -> first scheduled, until its first token

    def scheduled(self, admitted: Iterable, now: float) -> None:
        """Requests the scheduler admitted this step; a first admission starts the prefill clock
        (a request resumed after preemption has tokens already, or is on the clock)."""
        for req in admitted:
            if req.num_tokens == req.num_prompt_tokens and req.owner not in self._scheduled:
                self._scheduled[req.owner] = now
                self.queue.observe(now - req.arrival_time)

    def sampled(self, owners: np.ndarray, now: float) -> None:
        """The owners that got a token this step: the first one ends their prefill time."""
        if not self._scheduled or not len(owners):
            return
        waiting = np.fromiter(self._scheduled, dtype=np.int64, count=len(self._scheduled))
        for owner in owners[np.isin(owners, waiting)].tolist():
            self.prefill.observe(now - self._scheduled.pop(owner))

    def forget(self, owner: int) -> None:
        """An aborted request leaves without a first token."""
        self._scheduled.pop(owner, None)

    def snapshot(self) -> dict:
        return {"queue_time": self.queue.snapshot(), "prefill_time": self.prefill.snapshot()}
