"""Prometheus metrics, correct across several API-server processes.

Request-level metrics (counts by finish reason, TTFT, inter-token latency, end-to-end latency,
token counters, rejections) live in each API-server process and are summed by
prometheus_client's multiprocess mode: `minivllm serve` points PROMETHEUS_MULTIPROC_DIR at a
fresh directory before any API server starts. Engine-level figures (running and waiting
requests, KV-cache usage, prefix-cache hits, preemptions) are the engine's own: each scrape asks
the engine over the control channel, so they are never double counted.
"""
from __future__ import annotations

import os
from typing import Optional

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "minivllm:"
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0)

requests = Counter(f"{PREFIX}request_success", "Finished requests by finish reason",
                   ["finished_reason"])
rejected = Counter(f"{PREFIX}requests_rejected", "Requests refused before the engine",
                   ["reason"])  # overloaded (429), draining / engine_unavailable (503)
aborted = Counter(f"{PREFIX}requests_aborted", "Requests aborted in flight", ["reason"])
prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of served requests")
generation_tokens = Counter(f"{PREFIX}generation_tokens", "Generated tokens")
ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "Time to first token",
                 buckets=_LATENCY)
itl = Histogram(f"{PREFIX}inter_token_latency_seconds", "Time between streamed tokens",
                buckets=_LATENCY)
e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds", "Request latency, arrival to finish",
                buckets=_LATENCY)
restarts = Gauge(f"{PREFIX}engine_restarts", "Engine restarts seen by the API servers",
                 multiprocess_mode="max")
in_flight = Gauge(f"{PREFIX}api_requests_in_flight",
                  "Requests admitted by the API servers and not finished (--max-pending's count)",
                  multiprocess_mode="livesum")


class EngineCollector:
    """Engine-level gauges and counters from one `stats` reply."""

    def __init__(self, stats: dict) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats
        for name, doc, value in (
                ("num_requests_running", "Requests running in the engine", s["running"]),
                ("num_requests_waiting", "Requests waiting in the engine", s["waiting"]),
                ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use", s["kv_usage"])):
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        for name, doc, value in (
                ("prefix_cache_queries", "Prefix-cache lookups (blocks)", s["prefix_queries"]),
                ("prefix_cache_hits", "Prefix-cache hits (blocks)", s["prefix_hits"]),
                ("num_preemptions", "Requests preempted", s["preemptions"])):
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        hit_rate = s["prefix_hits"] / s["prefix_queries"] if s["prefix_queries"] else 0.0
        yield GaugeMetricFamily(PREFIX + "prefix_cache_hit_rate",
                                "Prefix-cache hits per lookup since start", value=hit_rate)


def render(engine_stats: Optional[dict]) -> tuple[bytes, str]:
    """The /metrics body: this server's metrics (all processes' in multiprocess mode) and the
    engine's, when it answered."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        from prometheus_client import REGISTRY

        body = generate_latest(REGISTRY)
    if engine_stats is not None:
        engine = CollectorRegistry()
        engine.register(EngineCollector(engine_stats))
        body += generate_latest(engine)
    return body, CONTENT_TYPE_LATEST
