"""Prometheus metrics of the API server, SGLang's names under the `minisgl:` prefix.

Gauges mirror the scheduler's latest SchedulerStats (it publishes them every ~0.5 s while busy and once
when it becomes idle). Counters and latency histograms are measured here, where the client's view of
latency is: from the HTTP request's arrival to each output's arrival at this process.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from minisgl.scheduler.io import SchedulerStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    """One registry per server (not the global one), so several servers in one process do not collide."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, dp_rank: int = 0):
        self.registry = CollectorRegistry()
        labels = ["model_name", "dp_rank"]  # dp_rank: which data-parallel replica (--dp) this server is
        values = (model_name, str(dp_rank))
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"minisgl:{name}", doc, labels, registry=r).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"minisgl:{name}", doc, labels, registry=r).labels(*values)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"minisgl:{name}", doc, labels, buckets=buckets, registry=r).labels(*values)

        self.num_running_reqs = gauge("num_running_reqs", "requests decoding or prefilling")
        self.num_queue_reqs = gauge("num_queue_reqs", "requests waiting for the scheduler")
        self.token_usage = gauge("token_usage", "fraction of KV-cache pages in use")
        self.cache_hit_rate = gauge("cache_hit_rate", "prompt tokens served from the prefix cache / prompt tokens")
        self.prompt_tokens = counter("prompt_tokens", "prompt tokens of accepted requests")
        self.cached_tokens = counter("cached_tokens", "prompt tokens of accepted requests served from the prefix cache")
        self.generation_tokens = counter("generation_tokens", "tokens generated and delivered")
        self.ttft = histogram("time_to_first_token_seconds", "request arrival to first output", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "time between tokens of one sample", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "request arrival to last output", _LATENCY_BUCKETS)
        self.stats = SchedulerStats()  # the latest, as published (GET /status reads it)

    def set_stats(self, s: SchedulerStats) -> None:
        self.stats = s
        self.num_running_reqs.set(s.num_running_reqs)
        self.num_queue_reqs.set(s.num_queue_reqs)
        self.token_usage.set(s.token_usage)
        self.cache_hit_rate.set(s.cache_hit_rate)

    def render(self) -> bytes:
        return generate_latest(self.registry)
