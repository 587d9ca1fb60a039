"""Prometheus metrics, named like vLLM's `vllm:` family under a `pdserve:` prefix.

Per-request histograms are observed by the server as requests finish; engine-wide gauges
(running, waiting, KV blocks, prefix cache) are read from the engine's latest stats at
scrape time, so they never go stale between observations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdserve.engine.outputs import EngineStats

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class _EngineStatsCollector(Collector):
    """Engine-wide state, read from the engine process's latest stats snapshot."""

    def __init__(self, get_stats: Callable[[], EngineStats], model: str) -> None:
        self._get_stats = get_stats
        self._model = model

    def collect(self) -> Iterator:
        s = self._get_stats()
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        gauges = {
            "num_requests_running": ("Requests in the running batch.", s.num_running),
            "num_requests_waiting": ("Requests waiting to be scheduled.", s.num_waiting),
            "kv_cache_usage_perc": ("Fraction of KV blocks in use (0-1).", s.kv_usage),
            "kv_blocks_free": ("KV cache blocks free (evictable cached ones included).",
                               s.num_free_blocks),
            "kv_blocks_total": ("KV cache blocks in the pool.", s.num_total_blocks),
            "prefix_cache_hit_rate": ("Prefix-cache hits over queries, in tokens, since start.",
                                      rate),
            "num_requests_pulling_kv": ("Decode side: requests waiting for their KV.",
                                        s.num_pulling),
            "num_kv_leases": ("Prefill side: finished prefills holding KV for a decode.",
                              s.num_leases),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(f"pdserve:{name}", doc, labels=["model_name"])
            g.add_metric([self._model], float(value))
            yield g
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.",
                                     s.prefix_cache_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.",
                                  s.prefix_cache_hits),
            "num_preemptions": ("Requests preempted to free KV blocks.", s.num_preemptions),
            "kv_pulls_ok": ("KV pulls from a prefill instance that succeeded.", s.kv_pulls_ok),
            "kv_pulls_failed": ("KV pulls that failed (each fell back to a local prefill).",
                                s.kv_pulls_failed),
            "kv_bytes_pulled": ("Bytes of KV pulled from prefill instances.",
                                s.kv_bytes_pulled),
            "request_failures": ("Requests the engine failed on an unexpected error (each "
                                 "failed alone; the engine went on).", s.request_failures),
        }
        for name, (doc, value) in counters.items():
            c = CounterMetricFamily(f"pdserve:{name}", doc, labels=["model_name"])
            c.add_metric([self._model], float(value))
            yield c


class ServerMetrics:
    """All metrics of one instance, in their own registry (tests can build several)."""

    def __init__(self, model: str, get_stats: Callable[[], EngineStats]) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.requests = Counter("pdserve:request_success", "Finished requests, by reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.errors = Counter("pdserve:request_errors", "Requests refused or failed, by status.",
                              ["model_name", "status"], registry=r)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens processed.",
                                     labels, registry=r)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated.",
                                         labels, registry=r)
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pdserve:inter_token_latency_seconds",
                             "Time between consecutive output deltas of a request.",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "End-to-end latency.",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_hist = Histogram("pdserve:request_prompt_tokens", "Prompt length.",
                                     labels, buckets=TOKEN_BUCKETS, registry=r)
        self.generation_hist = Histogram("pdserve:request_generation_tokens",
                                         "Generated length.", labels, buckets=TOKEN_BUCKETS,
                                         registry=r)
        r.register(_EngineStatsCollector(get_stats, model))

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model).observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.labels(self.model).observe(seconds)

    def observe_finished(
        self, reason: str, prompt_tokens: int, generation_tokens: int, e2e_s: float
    ) -> None:
        """One request ended (any reason, aborts included)."""
        self.requests.labels(self.model, reason).inc()
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.generation_tokens.labels(self.model).inc(generation_tokens)
        self.prompt_hist.labels(self.model).observe(prompt_tokens)
        self.generation_hist.labels(self.model).observe(generation_tokens)
        self.e2e.labels(self.model).observe(e2e_s)

    def observe_error(self, status: int) -> None:
        self.errors.labels(self.model, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
