"""Drain: stop taking requests, let those in flight finish, abort what is left at a deadline."""
from __future__ import annotations

import time
from typing import Optional


class Drain:
    def __init__(self) -> None:
        self.active = False           # new submits are refused
        self.stop_when_done = False   # the engine process exits once nothing is in flight
        self.deadline: Optional[float] = None

    def start(self, timeout_s: Optional[float], then_stop: bool = False) -> None:
        self.active = True
        self.stop_when_done = self.stop_when_done or then_stop
        if timeout_s is not None:
            self.deadline = time.monotonic() + float(timeout_s)

    def expired(self) -> bool:
        """True once, when the deadline passes: the caller aborts what is still running."""
        if self.deadline is None or time.monotonic() <= self.deadline:
            return False
        self.deadline = None
        return True

    def wait_s(self, timeout_s: float) -> float:
        """An idle wait, cut short so that the deadline is not overslept."""
        if self.deadline is None:
            return timeout_s
        return min(timeout_s, max(0.0, self.deadline - time.monotonic()))
