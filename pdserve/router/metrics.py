"""The router's Prometheus metrics: routes taken, retries, fallbacks, resumes, upstream errors,
latency."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pdserve.router.registry import Registry

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 20.0, 40.0, 80.0)


class _RegistryCollector(Collector):
    """Per-instance health and load, read from the registry at scrape time."""

    def __init__(self, get_registry: Callable[[], Registry]) -> None:
        self._get_registry = get_registry

    def collect(self) -> Iterator:
        healthy = GaugeMetricFamily("pdserve_router:instance_healthy",
                                    "1 if the instance passes health checks.",
                                    labels=["url", "role"])
        load = GaugeMetricFamily("pdserve_router:instance_outstanding_tokens",
                                 "Prompt + max tokens the router has in flight there.",
                                 labels=["url", "role"])
        rate = GaugeMetricFamily("pdserve_router:instance_prefill_rate",
                                 "Prompt tokens/s measured on prefills that ran alone there "
                                 "(absent until measured).", labels=["url", "role"])
        hop = GaugeMetricFamily("pdserve_router:instance_hop_seconds",
                                "Decode instances: seconds from handing them a prefilled "
                                "request to its next token, measured on streams (EWMA).",
                                labels=["url", "role"])
        for inst in self._get_registry().all():
            healthy.add_metric([inst.url, inst.role], float(inst.healthy))
            if inst.hop_s is not None:
                hop.add_metric([inst.url, inst.role], inst.hop_s)
            load.add_metric([inst.url, inst.role], float(inst.outstanding_tokens))
            if inst.prefill_rate is not None:
                rate.add_metric([inst.url, inst.role], inst.prefill_rate)
        yield healthy
        yield load
        yield rate
        yield hop


class RouterMetrics:
    """All router metrics in their own registry (tests can build several routers)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pdserve_router:requests",
                                "Requests by route: disagg (P then D), short_prompt (whole "
                                "on D: under --pd-min-prompt-tokens), colocated, fallback, "
                                "no_handoff (P kept no KV: whole on D).",
                                ["kind"], registry=r)
        self.decisions = Counter("pdserve_router:routing_decisions",
                                 "Routing decisions by policy, route (disagg, colocated, "
                                 "short_prompt, whole_on_decode, prefill_only, fallback) and "
                                 "reason (long_prompt, short_prompt, long_uncached, "
                                 "small_uncached, idle_decode, prefill_queue, decode_stall, "
                                 "one_token, choices_or_echo, colocated, no_pair_<role>).",
                                 ["policy", "decision", "reason"], registry=r)
        self.prefill_retries = Counter("pdserve_router:prefill_retries",
                                       "Prefill attempts that failed and moved on.", registry=r)
        self.fallbacks = Counter("pdserve_router:fallbacks",
                                 "Requests served plain because no prefill could.", registry=r)
        self.handoffs_missing = Counter("pdserve_router:handoffs_missing",
                                        "Prefills that ran to length but returned no "
                                        "kv_transfer_params (a P without a KV connector): "
                                        "each was served whole on a decode instance.",
                                        registry=r)
        self.images_encoded = Counter("pdserve_router:images_encoded",
                                      "Image parts sent to encoder instances, by outcome: "
                                      "encoder (a handle went to P), refused (a bad image: "
                                      "P answers the 400), failed (P encodes it itself).",
                                      ["outcome"], registry=r)
        self.upstream_errors = Counter("pdserve_router:upstream_errors",
                                       "Connection errors and 5xx from instances, by role.",
                                       ["role"], registry=r)
        self.kv_releases = Counter("pdserve_router:kv_releases",
                                   "Prefilled KV the router asked P to free, not to wait for "
                                   "its lease's expiry, because D did not take the request, "
                                   "by reason: client_disconnect, no_decode, decode_failed, "
                                   "decode_refused.",
                                   ["reason"], registry=r)
        self.resumes = Counter("pdserve_router:resumes",
                               "Answers an instance failed mid-way and the router moved on, "
                               "by outcome: resumed (a stream continues on another "
                               "instance), rerun (a non-streamed request runs again whole "
                               "elsewhere), no_instance, refused (the new instance refused "
                               "it), untracked (the chunks had no token ids), limit (it "
                               "failed more than the allowed resumes).",
                               ["outcome"], registry=r)
        self.client_disconnects = Counter("pdserve_router:client_disconnects",
                                          "Requests whose client left early.", registry=r)
        self.e2e = Histogram("pdserve_router:e2e_request_latency_seconds",
                             "End-to-end latency at the router.", ["kind"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("pdserve_router:time_to_first_token_seconds",
                              "Time until the first token reached the client (streaming).",
                              ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_latency = Histogram("pdserve_router:prefill_latency_seconds",
                                         "Time of the prefill instance's answer.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        r.register(_RegistryCollector(lambda: registry))

    def render(self) -> bytes:
        return generate_latest(self.registry)
