"""Prometheus metrics, correct across several API-server processes.

Request-level metrics (counts by finish reason, TTFT, inter-token latency, end-to-end latency,
token counters, rejections) live in each API-server process and are summed by
prometheus_client's multiprocess mode: `minivllm serve` points PROMETHEUS_MULTIPROC_DIR at a
fresh directory before any API server starts. Engine-level figures (running and waiting
requests, KV-cache usage, prefix-cache hits, preemptions, queue and prefill times) are the
engine's own: each scrape asks every engine over the control channel, so they are never double
counted, and each carries its engine's data-parallel rank (label `engine`).

Dashboards built for vLLM (its Grafana board, its alerts) read `vllm:` names with a `model_name`
label: every figure whose meaning and unit are vLLM's is served under both names (VLLM_NAMES),
renamed at scrape time rather than recorded twice.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import os
from typing import Optional

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily, Metric)

from minivllm._cext.text_sink import Tally

PREFIX = "minivllm:"
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0)
_TOKENS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))  # vLLM's 1-2-5 token buckets

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
request_prompt_tokens = Histogram(f"{PREFIX}request_prompt_tokens",
                                  "Prompt tokens per finished request", buckets=_TOKENS)
request_generation_tokens = Histogram(f"{PREFIX}request_generation_tokens",
                                      "Generated tokens per finished sequence", buckets=_TOKENS)
request_max_generation_tokens = Histogram(
    f"{PREFIX}request_max_num_generation_tokens",
    "Generated tokens of a finished request's longest sequence (n > 1)", buckets=_TOKENS)
decode_time = Histogram(f"{PREFIX}request_decode_time_seconds",
                        "Time from a request's first token to its last", buckets=_LATENCY)
restarts = Gauge(f"{PREFIX}engine_restarts", "Engine restarts seen by the API servers",
                 multiprocess_mode="max")
in_flight = Gauge(f"{PREFIX}api_requests_in_flight",
                  "Requests admitted by the API servers and not finished (--max-pending's count)",
                  multiprocess_mode="livesum")


class TokenTally(Tally):
    """Streamed tokens and the gaps between them (generation_tokens, itl), summed here (add(),
    and the server streams' TextSinks in C) and written to those metrics at most every
    FLUSH_S, when a request finishes and before a scrape. In multiprocess mode every metric
    update is a locked write to a file mapping: a server streaming a step's tokens would
    otherwise make three per request per step."""

    FLUSH_S = 0.1

    def __init__(self) -> None:
        super().__init__(itl._upper_bounds, self.FLUSH_S)

    def flush(self) -> None:
        if self.tokens:
            generation_tokens.inc(self.tokens)
            self.tokens = 0
        if self.gap_sum or any(self.gap_counts):
            itl._sum.inc(self.gap_sum)
            for bucket, count in zip(itl._buckets, self.gap_counts):
                if count:
                    bucket.inc(count)
            self.gap_sum, self.gap_counts = 0.0, [0] * len(self.gap_counts)


token_tally = TokenTally()


class RequestTally:
    """Per-request figures (TTFT, and a finished request's latencies, token counts and finish
    reason) kept here and written to their metrics by flush(), with the token tally's, at most
    once per pass of the event loop: the first figure after a flush schedules the next one
    (call_soon). That runs before the tasks the same engine-client read woke, which end the
    responses: a response ends after its figures are in the metrics, as if written at once. In
    multiprocess mode every metric update is a locked write to a file mapping, a dozen per
    request; a step that finishes many requests now makes them once."""

    def __init__(self) -> None:
        self.observed: dict[Histogram, list[float]] = {}
        self.counted: dict = {}  # a counter (or a labelled child) -> its increment
        self.scheduled = False

    def observe(self, histogram: Histogram, value: float) -> None:
        self.observed.setdefault(histogram, []).append(value)
        self._schedule()

    def inc(self, counter, amount: float = 1) -> None:
        self.counted[counter] = self.counted.get(counter, 0) + amount
        self._schedule()

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what is kept (Histogram.observe's buckets: the first bound >= the value)."""
        self.scheduled = False
        token_tally.flush()
        observed, counted = self.observed, self.counted
        self.observed, self.counted = {}, {}
        for histogram, values in observed.items():
            histogram._sum.inc(sum(values))
            buckets = collections.Counter(bisect.bisect_left(histogram._upper_bounds, v)
                                          for v in values)
            for k, count in buckets.items():
                histogram._buckets[k].inc(count)
        for counter, amount in counted.items():
            counter.inc(amount)


request_tally = RequestTally()


class EngineCollector:
    """Engine-level gauges, counters and histograms, one series per engine (label `engine`,
    its data-parallel rank), from the engines' `stats` replies (None: that one did not
    answer)."""

    def __init__(self, stats: list[Optional[dict]]) -> None:
        self.stats = [(str(i), s) for i, s in enumerate(stats) if s is not None]

    def _family(self, cls, name: str, doc: str, key) -> Metric:
        family = cls(PREFIX + name, doc, labels=["engine"])
        for engine, s in self.stats:
            family.add_metric([engine], key(s))
        return family

    def collect(self):
        for name, doc, key in (
                ("num_requests_running", "Requests running in the engine", "running"),
                ("num_requests_waiting", "Requests waiting in the engine", "waiting"),
                ("num_requests_waiting_for_grammar", "Requests whose structured-output grammar "
                 "is compiling", "waiting_for_grammar"),
                ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use", "kv_usage")):
            yield self._family(GaugeMetricFamily, name, doc, lambda s, k=key: s[k])
        for name, doc, key in (
                ("prefix_cache_queries", "Prefix-cache lookups (blocks)", "prefix_queries"),
                ("prefix_cache_hits", "Prefix-cache hits (blocks)", "prefix_hits"),
                ("num_preemptions", "Requests preempted", "preemptions"),
                ("engine_requests", "Requests the engine took (HTTP and ZeroMQ)", "requests"),
                ("engine_prompt_tokens", "Prompt tokens of the requests the engine took",
                 "prompt_tokens"),
                ("engine_generation_tokens", "Tokens the engine generated", "generation_tokens"),
                ("engine_steps", "Steps the engine ran", "step")):
            yield self._family(CounterMetricFamily, name, doc, lambda s, k=key: s[k])
        yield self._family(GaugeMetricFamily, "prefix_cache_hit_rate",
                           "Prefix-cache hits per lookup since start",
                           lambda s: s["prefix_hits"] / s["prefix_queries"]
                           if s["prefix_queries"] else 0.0)
        ranks = GaugeMetricFamily(PREFIX + "kv_cache_bytes", "KV-cache bytes of each "
                                  "tensor-parallel rank (its share of the KV heads)",
                                  labels=["engine", "rank", "host", "pid"])
        for engine, s in self.stats:
            for r in s["ranks"]:
                ranks.add_metric([engine, str(r["rank"]), r["host"], str(r["pid"])],
                                 r["kv_cache_bytes"])
        yield ranks
        for name, doc, key in (
                ("request_queue_time_seconds", "Time from arrival in the engine to first "
                 "scheduled", "queue_time"),
                ("request_prefill_time_seconds", "Time from first scheduled to first token",
                 "prefill_time")):
            family = HistogramMetricFamily(PREFIX + name, doc, labels=["engine"])
            for engine, s in self.stats:
                h = s[key]
                buckets = [(repr(le), n) for le, n in zip(h["bounds"], h["cumulative"])]
                family.add_metric([engine], buckets + [("+Inf", h["cumulative"][-1])],
                                  sum_value=h["sum"])
            yield family


# minivllm name -> the vLLM names serving the same figure in the same unit. vLLM calls KV-cache
# usage (a fraction, 1 = full) gpu_cache_usage_perc too, and its time_per_output_token histogram
# is the inter-token latency. Prefix-cache counters stay minivllm's: vLLM counts tokens, we
# count blocks.
VLLM_NAMES = {
    "num_requests_running": ("num_requests_running",),
    "num_requests_waiting": ("num_requests_waiting",),
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
    "num_preemptions": ("num_preemptions",),
    "prompt_tokens": ("prompt_tokens",),
    "generation_tokens": ("generation_tokens",),
    "request_success": ("request_success",),
    "time_to_first_token_seconds": ("time_to_first_token_seconds",),
    "inter_token_latency_seconds": ("inter_token_latency_seconds",
                                    "time_per_output_token_seconds"),
    "e2e_request_latency_seconds": ("e2e_request_latency_seconds",),
    "request_prompt_tokens": ("request_prompt_tokens",),
    "request_generation_tokens": ("request_generation_tokens",),
    "request_max_num_generation_tokens": ("request_max_num_generation_tokens",),
    "request_decode_time_seconds": ("request_decode_time_seconds",),
    "request_queue_time_seconds": ("request_queue_time_seconds",),
    "request_prefill_time_seconds": ("request_prefill_time_seconds",),
}


class Scrape:
    """Families collected once, then served under their own names and, those vLLM also has,
    under vLLM's names with its model label."""

    def __init__(self, families: list[Metric], model_name: str) -> None:
        self.families = families
        self.labels = {"model_name": model_name}

    def collect(self):
        yield from self.families
        for family in self.families:
            for vllm_name in VLLM_NAMES.get(family.name.removeprefix(PREFIX), ()):
                yield self._renamed(family, "vllm:" + vllm_name)

    def _renamed(self, family: Metric, name: str) -> Metric:
        out = Metric(name, family.documentation, family.type, family.unit)
        out.samples = [s._replace(name=name + s.name[len(family.name):],
                                  labels={**s.labels, **self.labels}) for s in family.samples]
        return out


def server_families() -> list[Metric]:
    """This server's metrics: all API-server processes' in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        server = CollectorRegistry()
        multiprocess.MultiProcessCollector(server)
    else:
        from prometheus_client import REGISTRY as server
    return list(server.collect())


def render(engine_stats: list[Optional[dict]], model_name: str) -> tuple[bytes, str]:
    """The /metrics body: this server's metrics and the engines' (those that answered)."""
    request_tally.flush()
    families = server_families() + list(EngineCollector(engine_stats).collect())
    registry = CollectorRegistry()
    registry.register(Scrape(families, model_name))
    return generate_latest(registry), CONTENT_TYPE_LATEST
