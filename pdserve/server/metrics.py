"""Prometheus metrics of one instance, under vLLM's own names, types and labels.

Every series vLLM's `PrometheusStatLogger` serves by default is here as `vllm:...`, labelled
`model_name` and `engine` ("0": one engine per instance, as a single-engine vLLM), so vLLM's
Grafana dashboard, llm-d's scheduler and autoscalers read pdserve unchanged; the list is
tests/data/vllm_metrics.json (scripts/vllm_metric_names.py) and docs/DESIGN.md, "Metrics",
names the few vLLM series with no meaning here. What vLLM has no name for is `pdserve:...`.

Where the figures come from: engine-wide gauges and counters (running, waiting, KV usage,
prefix cache, preemptions, tokens per step, KV pulls) from the engine's latest stats at
scrape time, so they never go stale; per-request histograms from the server as each request
finishes, its phase times (queue, prefill, decode, inference) from the engine's RequestTimes.

On a prefill instance (P of P/D) a request is the prefill: TTFT is P's first (and only)
token, decode and inter-token figures are empty or zero. On a decode instance (D) a request
arrives with its prompt's KV on P: queue = arrival -> its KV pull began, prefill = the pull
plus D's first step, TTFT = arrival -> D's first sampled token (the client saw P's before),
generation tokens count P's first token too (as the client's usage does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from pdserve.config import EngineArgs
from pdserve.engine.compilations import KINDS
from pdserve.engine.histogram import StepHistogram
from pdserve.engine.outputs import EngineStats, RequestTimes

ENGINE = "0"  # vLLM's engine label of a single-engine server
LABELS = ["model_name", "engine"]
# vLLM's buckets (vllm/v1/metrics/loggers.py), so that dashboards' quantiles compare
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                         2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
N_BUCKETS = (1, 2, 5, 10, 20)
PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
# vLLM's PromptTokenStats.ALL_SOURCES; on D, KV pulled from P is the external transfer
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
# vLLM's CacheHitSource values; pdserve's tiers are the device pool and P's KV (p2p)
CACHE_HIT_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")
KV_FETCH_STAGES = ("waiting_to_start", "in_progress", "completed_waiting")
# vLLM's queue limits (--max-num-queued-reqs/-tokens); pdserve has none, so never rejects
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


def cache_info(args: EngineArgs) -> dict[str, str]:
    """vllm:cache_config_info's labels (vLLM's CacheConfig field names) that pdserve has;
    num_gpu_blocks is added at scrape time, once the engine has sized its pool."""
    c = args.cache
    return {"block_size": str(c.block_size), "cache_dtype": "auto",
            "enable_prefix_caching": str(c.enable_prefix_caching),
            "gpu_memory_utilization": str(c.gpu_memory_utilization)}


@dataclass
class FinishedRequest:
    """One request that ended (aborts included), as the server saw it."""

    reason: str  # "stop", "length" or "abort"
    prompt_tokens: int
    generation_tokens: int
    e2e_s: float  # arrival at this server -> finished
    max_tokens: int  # the generation budget it ran with
    max_tokens_param: int | None  # the client's max_tokens, if it sent one
    times: RequestTimes | None  # the engine's phase times (None: it never reached it)
    cached_tokens: int = 0  # prompt tokens found in this instance's prefix cache
    n: int = 1  # the choices its client asked for (0: a sibling choice, counted by the first)

    def prompt_sources(self) -> dict[str, int]:
        """Where its prompt's KV came from, as vLLM's PromptTokenStats: this instance's
        prefix cache, P's KV pulled on D (a failed pull is prefilled here: local), the rest
        computed here (or to be, for a request aborted before its prefill ran)."""
        pulled = self.times.num_pulled_tokens if self.times else 0
        cached = min(self.cached_tokens, self.prompt_tokens - pulled)
        return {"local_compute": self.prompt_tokens - cached - pulled,
                "local_cache_hit": cached, "external_kv_transfer": pulled}


class _EngineStatsCollector(Collector):
    """Engine-wide series, read from the engine process's latest stats snapshot."""

    def __init__(self, get_stats: Callable[[], EngineStats], model: str,
                 cache_info: dict[str, str], kv_consumer: bool) -> None:
        self._get_stats = get_stats
        self._model = model
        self._cache_info = cache_info
        self._kv_consumer = kv_consumer

    def collect(self) -> Iterator:
        s, labels = self._get_stats(), [self._model, ENGINE]
        gauges = {
            "vllm:num_requests_running": ("Number of requests in model execution batches.",
                                          s.num_running),
            "vllm:num_requests_waiting": ("Number of requests waiting to be processed (on D, "
                                          "those waiting for their KV pull included).",
                                          s.num_waiting + s.num_pulling),
            "vllm:kv_cache_usage_perc": ("KV-cache usage. 1 means 100 percent usage.",
                                         s.kv_usage),
            "pdserve:kv_blocks_free": ("KV cache blocks free (evictable cached ones included).",
                                       s.num_free_blocks),
            "pdserve:kv_blocks_total": ("KV cache blocks in the pool.", s.num_total_blocks),
            "pdserve:num_requests_pulling_kv": ("Decode side: requests waiting for their KV.",
                                                s.num_pulling),
            "pdserve:num_kv_leases": ("Prefill side: finished prefills holding KV for a "
                                      "decode instance.", s.num_leases),
        }
        for name, (doc, value) in gauges.items():
            yield _gauge(name, doc, labels, value)
        counters = {
            "vllm:prefix_cache_queries": ("Prefix cache queries, in terms of number of queried "
                                          "tokens.", s.prefix_cache_queries),
            "vllm:prefix_cache_hits": ("Prefix cache hits, in terms of number of cached "
                                       "tokens.", s.prefix_cache_hits),
            "vllm:num_preemptions": ("Cumulative number of preemption from the engine.",
                                     s.num_preemptions),
            "pdserve:kv_pulls_ok": ("KV pulls from a prefill instance that succeeded.",
                                    s.kv_pulls_ok),
            "pdserve:kv_pulls_failed": ("KV pulls that failed (each fell back to a local "
                                        "prefill).", s.kv_pulls_failed),
            "pdserve:kv_bytes_pulled": ("Bytes of KV pulled from prefill instances.",
                                        s.kv_bytes_pulled),
            "pdserve:request_failures": ("Requests the engine failed on an unexpected error "
                                         "(each failed alone; the engine went on).",
                                         s.request_failures),
        }
        for name, (doc, value) in counters.items():
            c = CounterMetricFamily(name, doc, labels=LABELS)
            c.add_metric(labels, float(value))
            yield c
        yield _histogram("vllm:iteration_tokens_total",
                         "Histogram of number of tokens per engine_step.", labels,
                         s.iteration_tokens)
        yield _histogram("pdserve:kv_transfer_seconds",
                         "Decode side: seconds one KV pull from a prefill instance took.",
                         labels, s.kv_transfer_seconds)
        yield from self._by_label(s, labels)
        yield from self._constant_gauges(labels, s.num_total_blocks)

    def _by_label(self, s: EngineStats, labels: list[str]) -> Iterator:
        """vLLM's series split by a reason, stage or source label."""
        # vLLM counts a request waiting for its KV transfer as deferred, not short of capacity
        yield _labelled(GaugeMetricFamily, "vllm:num_requests_waiting_by_reason",
                        "Number of waiting requests by reason: 'capacity' = waiting for "
                        "scheduling capacity; 'deferred' = waiting for its KV pull. Sum of all "
                        "reasons equals vllm:num_requests_waiting.", labels, "reason",
                        {"capacity": s.num_waiting, "deferred": s.num_pulling})
        if self._kv_consumer:  # vLLM's KV consumers only: instances that pull a prompt's KV
            # a pull that lands moves its request straight to running: none completed-waiting
            yield _labelled(GaugeMetricFamily, "vllm:num_requests_kv_fetch_by_stage",
                            "Number of waiting requests by KV pull stage: 'waiting_to_start' "
                            "= blocks not yet given; 'in_progress' = pulling; "
                            "'completed_waiting' = pulled, not running yet.", labels, "stage",
                            dict(zip(KV_FETCH_STAGES, (s.num_waiting_to_pull, s.num_pulling,
                                                       0))))
            yield _labelled(CounterMetricFamily, "pdserve:kv_pulls_by_transport",
                            "Decode side: KV pulls that moved blocks, by the transport chosen "
                            "(cuda_ipc, host: same host; tcp: another host).", labels,
                            "transport", {t: s.kv_pulls_by_transport.get(t, 0)
                                          for t in KV_TRANSPORTS})
        hits = dict.fromkeys(CACHE_HIT_SOURCES, 0)
        hits.update(device=s.prefix_cache_hits, p2p=s.num_pulled_tokens)
        yield _labelled(CounterMetricFamily, "pdserve:compilations_after_ready",
                        "Triton compiles, CUDA-graph captures and torch.compile graphs in the "
                        "engine process since it said ready (each stalled a step; should stay "
                        "0), by kind.", labels, "kind",
                        {kind: s.compilations_after_ready.get(kind, 0) for kind in KINDS})
        yield _labelled(CounterMetricFamily, "vllm:prompt_tokens_cached_by_source",
                        "Prompt tokens whose KV was not computed, by where it came from: device "
                        "(this instance's prefix cache), p2p (pulled from a prefill instance).",
                        labels, "source", hits)

    def _constant_gauges(self, labels: list[str], num_blocks: int) -> Iterator:
        """Info-style series: the cache config, and a sleep state (pdserve never sleeps)."""
        config = {**self._cache_info, "num_gpu_blocks": str(num_blocks)}
        info = GaugeMetricFamily("vllm:cache_config_info",
                                 "Information of the LLMEngine CacheConfig",
                                 labels=[*LABELS, *config])
        info.add_metric([*labels, *config.values()], 1.0)
        yield info
        sleep = GaugeMetricFamily("vllm:engine_sleep_state", "Engine sleep state; awake = 1 "
                                  "means engine is awake (pdserve has no sleep mode).",
                                  labels=[*LABELS, "sleep_state"])
        for state, value in (("awake", 1.0), ("weights_offloaded", 0.0), ("discard_all", 0.0)):
            sleep.add_metric([*labels, state], value)
        yield sleep


def _gauge(name: str, doc: str, labels: list[str], value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=LABELS)
    g.add_metric(labels, float(value))
    return g


KV_TRANSPORTS = ("cuda_ipc", "host", "tcp")


def _labelled(family_type: type, name: str, doc: str, labels: list[str], label: str,
              values: dict[str, float]):
    family = family_type(name, doc, labels=[*LABELS, label])
    for value_label, value in values.items():
        family.add_metric([*labels, value_label], float(value))
    return family


def _histogram(name: str, doc: str, labels: list[str], h: StepHistogram
               ) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=LABELS)
    family.add_metric(labels, h.cumulative(), sum_value=h.sum)
    return family


class ServerMetrics:
    """All metrics of one instance, in their own registry (tests can build several)."""

    def __init__(self, model: str, get_stats: Callable[[], EngineStats],
                 max_model_len: int = 2**20, cache_info: dict[str, str] | None = None,
                 kv_consumer: bool = False) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        tokens = buckets_1_2_5(max_model_len)
        self.requests = Counter("vllm:request_success",
                                "Count of successfully processed requests.",
                                [*LABELS, "finished_reason"], registry=self.registry)
        self.errors = Counter("pdserve:request_errors", "Requests refused or failed, by status.",
                              [*LABELS, "status"], registry=self.registry)
        self.prompt_tokens = self._counter("vllm:prompt_tokens",
                                           "Number of prefill tokens processed.")
        self.generation_tokens = self._counter("vllm:generation_tokens",
                                               "Number of generation tokens processed.")
        self.prompt_tokens_cached = self._counter(
            "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local prefix cache "
            "+ KV pulled from a prefill instance).")
        self.prompt_by_source = Counter("vllm:prompt_tokens_by_source",
                                        "Number of prompt tokens by source.",
                                        [*LABELS, "source"], registry=self.registry)
        self.image_embeddings = Counter(
            "pdserve:image_embeddings", "Images of prompts by where their embedding rows came "
            "from: encoder (pulled from an encoder instance), fallback (its pull failed: "
            "encoded here), local (no encoder: encoded here).",
            [*LABELS, "source"], registry=self.registry)
        self.admission_rejections = Counter(
            "vllm:admission_rejections", "Number of admission attempts rejected by a queue "
            "limit, by reason (pdserve has no queue limit: always 0).",
            ["model_name", "reason"], registry=self.registry)
        h = self._histogram
        self.prompt_hist = h("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                             tokens)
        self.generation_hist = h("vllm:request_generation_tokens",
                                 "Number of generation tokens processed.", tokens)
        self.max_generation_hist = h("vllm:request_max_num_generation_tokens",
                                     "Histogram of maximum number of requested generation "
                                     "tokens.", tokens)
        self.preemptions_hist = h("vllm:request_num_preemptions",
                                  "Histogram of the number of times a request was preempted.",
                                  PREEMPTION_BUCKETS)
        self.kv_computed_hist = h("vllm:request_prefill_kv_computed_tokens",
                                  "Histogram of new KV tokens computed during prefill "
                                  "(excluding cached tokens and those pulled from a prefill "
                                  "instance).", tokens)
        self.n_hist = h("vllm:request_params_n", "Histogram of the n request parameter.",
                        N_BUCKETS)
        self.max_tokens_hist = h("vllm:request_params_max_tokens",
                                 "Histogram of the max_tokens request parameter.", tokens)
        self.ttft = h("vllm:time_to_first_token_seconds",
                      "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = h("vllm:inter_token_latency_seconds",
                     "Histogram of inter-token latency in seconds.", TOKEN_LATENCY_BUCKETS)
        self.tpot = h("vllm:request_time_per_output_token_seconds",
                      "Histogram of time_per_output_token_seconds per request.",
                      TOKEN_LATENCY_BUCKETS)
        phases = {"e2e": ("vllm:e2e_request_latency_seconds",
                          "Histogram of e2e request latency in seconds."),
                  "queue": ("vllm:request_queue_time_seconds",
                            "Histogram of time spent in WAITING phase for request."),
                  "inference": ("vllm:request_inference_time_seconds",
                                "Histogram of time spent in RUNNING phase for request."),
                  "prefill": ("vllm:request_prefill_time_seconds",
                              "Histogram of time spent in PREFILL phase for request."),
                  "decode": ("vllm:request_decode_time_seconds",
                             "Histogram of time spent in DECODE phase for request.")}
        self.phase = {k: h(name, doc, REQUEST_LATENCY_BUCKETS)
                      for k, (name, doc) in phases.items()}
        self.registry.register(_EngineStatsCollector(get_stats, model, cache_info or {},
                                                     kv_consumer))
        for reason in ("stop", "length", "abort"):  # every series from the start, as vLLM's
            self.requests.labels(model, ENGINE, reason)
        for source in PROMPT_SOURCES:
            self.prompt_by_source.labels(model, ENGINE, source)
        for reason in ADMISSION_REASONS:
            self.admission_rejections.labels(model, reason)

    def _counter(self, name: str, doc: str) -> Counter:
        """A counter exposed at zero from the start: dashboards see it exist before use."""
        counter = Counter(name, doc, LABELS, registry=self.registry)
        counter.labels(self.model, ENGINE)
        return counter

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        histogram = Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry)
        histogram.labels(self.model, ENGINE)
        return histogram

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model, ENGINE).observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.labels(self.model, ENGINE).observe(seconds)

    def observe_finished(self, r: FinishedRequest) -> None:
        """One request ended (any reason, aborts included)."""
        m = (self.model, ENGINE)
        self.requests.labels(*m, r.reason).inc()
        self.prompt_tokens.labels(*m).inc(r.prompt_tokens)
        self.generation_tokens.labels(*m).inc(r.generation_tokens)
        self.prompt_hist.labels(*m).observe(r.prompt_tokens)
        sources = r.prompt_sources()
        for source, tokens in sources.items():
            self.prompt_by_source.labels(*m, source).inc(tokens)
        self.prompt_tokens_cached.labels(*m).inc(r.prompt_tokens - sources["local_compute"])
        self.kv_computed_hist.labels(*m).observe(sources["local_compute"])
        self.generation_hist.labels(*m).observe(r.generation_tokens)
        self.max_generation_hist.labels(*m).observe(r.max_tokens)
        if r.n:  # a request's n is observed once, by its first choice
            self.n_hist.labels(*m).observe(r.n)
        if r.max_tokens_param is not None:
            self.max_tokens_hist.labels(*m).observe(r.max_tokens_param)
        self.phase["e2e"].labels(*m).observe(r.e2e_s)
        t = r.times or RequestTimes(arrival=0.0)  # never reached the engine: all phases 0
        self.preemptions_hist.labels(*m).observe(t.num_preemptions)
        for name, seconds in (("queue", t.queue_s), ("prefill", t.prefill_s),
                              ("decode", t.decode_s), ("inference", t.inference_s)):
            self.phase[name].labels(*m).observe(seconds)
        # vLLM's mean time per output token: the decode phase over the tokens after the first
        per_token = t.decode_s / (r.generation_tokens - 1) if r.generation_tokens > 1 else 0.0
        self.tpot.labels(*m).observe(per_token)

    def observe_error(self, status: int) -> None:
        self.errors.labels(self.model, ENGINE, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
