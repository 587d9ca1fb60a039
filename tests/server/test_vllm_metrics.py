"""/metrics serves every series vLLM serves, under vLLM's names, types and labels, and their
values follow the requests served (tests/data/vllm_metrics.json is read from vLLM's source by
scripts/vllm_metric_names.py)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import GREEDY, chat, complete, stream_events

REPO = Path(__file__).resolve().parents[2]
VLLM = json.loads((REPO / "tests" / "data" / "vllm_metrics.json").read_text())["metrics"]

# vLLM series with no meaning in pdserve, each named with why in docs/DESIGN.md, "Metrics"
NOT_SERVED = {
    "vllm:corrupted_requests",  # only with VLLM_COMPUTE_NANS_IN_LOGITS
    "vllm:external_prefix_cache_queries",  # a KV connector's cross-instance cache sharing
    "vllm:external_prefix_cache_hits",
    "vllm:mm_cache_queries",  # multi-modal inputs
    "vllm:mm_cache_hits",
    "vllm:kv_block_lifetime_seconds",  # only with --kv-cache-metrics sampling
    "vllm:kv_block_idle_before_evict_seconds",
    "vllm:kv_block_reuse_gap_seconds",
    "vllm:lora_requests_info",  # LoRA adapters
    "vllm:watermark_requests",  # only with vLLM's watermark config
}
# served, as in vLLM, only where the instance pulls KV (P and D; tests/router/test_disagg.py)
KV_CONSUMER_ONLY = {"vllm:num_requests_kv_fetch_by_stage"}


def families(client: httpx.Client) -> dict:
    text = client.get("/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def totals(client: httpx.Client, model: str) -> dict[str, float]:
    """Sample name -> value summed over label sets (finished reasons), buckets left out."""
    out: dict[str, float] = {}
    for family in families(client).values():
        for s in family.samples:
            if "le" not in s.labels and s.labels.get("model_name") == model:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def by_label(client: httpx.Client, name: str, label: str) -> dict[str, float]:
    """A labelled series' samples (buckets left out), by the value of `label`."""
    family = families(client)[name.removesuffix("_total")]
    return {s.labels[label]: s.value for s in family.samples
            if s.name == name and label in s.labels}


def test_every_vllm_series_is_served_with_its_type_and_labels(client, model_name):
    complete(client, "Hello", max_tokens=2, **GREEDY)
    served = families(client)
    for name, spec in VLLM.items():
        if name in NOT_SERVED:
            continue
        if name in KV_CONSUMER_ONLY:  # this instance is colocated: it pulls no KV
            assert name not in served, name
            continue
        assert name in served, f"{name} is not served"
        family = served[name]
        assert family.type == spec["type"], (name, family.type)
        assert family.samples, f"{name} has no sample"
        for sample in family.samples:
            assert set(spec["labels"]) <= set(sample.labels), name
            assert sample.labels["model_name"] == model_name
            assert sample.labels.get("engine", "0") == "0"


def test_vllm_series_not_served_are_few_and_documented():
    assert NOT_SERVED <= set(VLLM), "a series listed as not served is not vLLM's"
    design = (REPO / "docs" / "DESIGN.md").read_text()
    for name in NOT_SERVED:
        assert f"`{name}`" in design, f"docs/DESIGN.md does not say why {name} is not served"


def test_counters_and_histograms_follow_the_requests(client, model_name):
    before = totals(client, model_name)
    usages = [complete(client, "The capital of France is", max_tokens=5, **GREEDY)["usage"],
              chat(client, "Say hi", max_tokens=4, **GREEDY)["usage"]]
    for path, body in (("/v1/completions", {"prompt": "One, two,", "max_tokens": 6}),
                       ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "Count"}], "max_tokens": 3})):
        events = stream_events(client, path, {**body, **GREEDY,
                                              "stream_options": {"include_usage": True}})
        usages.append(events[-2]["usage"])
    after = totals(client, model_name)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    n = len(usages)
    assert delta["vllm:request_success_total"] == n
    assert delta["vllm:prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert delta["vllm:generation_tokens_total"] == sum(u["completion_tokens"] for u in usages)
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_time_per_output_token_seconds", "request_prompt_tokens",
                 "request_generation_tokens", "request_max_num_generation_tokens",
                 "request_params_n", "request_params_max_tokens"):
        assert delta[f"vllm:{hist}_count"] == n, hist
    assert delta["vllm:request_generation_tokens_sum"] == delta["vllm:generation_tokens_total"]
    assert delta["vllm:request_params_max_tokens_sum"] == 5 + 4 + 6 + 3
    # every token after a request's first is one inter-token gap (one token per step here)
    assert delta["vllm:inter_token_latency_seconds_count"] == sum(
        u["completion_tokens"] - 1 for u in usages)
    # the engine's phases add up: prefill + decode = inference, queue + inference <= e2e
    assert delta["vllm:request_prefill_time_seconds_sum"] + delta[
        "vllm:request_decode_time_seconds_sum"] == pytest.approx(
        delta["vllm:request_inference_time_seconds_sum"], abs=1e-3)
    assert (delta["vllm:request_queue_time_seconds_sum"]
            + delta["vllm:request_inference_time_seconds_sum"]
            <= delta["vllm:e2e_request_latency_seconds_sum"] + 0.05)
    assert delta["vllm:request_decode_time_seconds_sum"] > 0
    # each step computes at least one token; prompts and outputs all went through steps
    steps = delta["vllm:iteration_tokens_total_count"]
    assert 0 < steps <= delta["vllm:iteration_tokens_total_sum"]
    assert delta["vllm:iteration_tokens_total_sum"] >= delta["vllm:generation_tokens_total"]
    assert delta["vllm:prefix_cache_queries_total"] >= delta["vllm:prompt_tokens_total"]


def test_engine_gauges_and_cache_config(client, model_name):
    f = families(client)
    assert f["vllm:num_requests_running"].samples[0].value == 0
    assert 0 <= f["vllm:kv_cache_usage_perc"].samples[0].value <= 1
    (info,) = f["vllm:cache_config_info"].samples
    total = f["pdserve:kv_blocks_total"].samples[0].value
    assert info.value == 1 and info.labels["num_gpu_blocks"] == str(int(total))
    assert int(info.labels["block_size"]) > 0
    awake = {s.labels["sleep_state"]: s.value for s in f["vllm:engine_sleep_state"].samples}
    assert awake == {"awake": 1, "weights_offloaded": 0, "discard_all": 0}


def test_prompt_tokens_by_source_add_up_to_the_prompt_tokens(client, model_name):
    """A prompt's tokens are computed here or found in the prefix cache (colocated: nothing
    is pulled); the second run of a long prompt finds its leading blocks cached."""
    def snapshot() -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        return (totals(client, model_name),
                by_label(client, "vllm:prompt_tokens_by_source_total", "source"),
                by_label(client, "vllm:prompt_tokens_cached_by_source_total", "source"))

    prompt = "The history of the city is long and full of surprises. " * 6
    complete(client, prompt, max_tokens=2, **GREEDY)  # fills the prefix cache
    t0, src0, hit0 = snapshot()
    usage = complete(client, prompt, max_tokens=2, **GREEDY)["usage"]
    t1, src1, hit1 = snapshot()
    d = {k: t1[k] - t0.get(k, 0.0) for k in t1}
    src = {k: src1[k] - src0[k] for k in src1}
    assert set(src) == {"local_compute", "local_cache_hit", "external_kv_transfer"}
    assert sum(src.values()) == d["vllm:prompt_tokens_total"] == usage["prompt_tokens"]
    assert src["local_cache_hit"] == usage["prompt_tokens_details"]["cached_tokens"] > 0
    assert src["external_kv_transfer"] == 0
    assert d["vllm:prompt_tokens_cached_total"] == src["local_cache_hit"]
    assert d["vllm:request_prefill_kv_computed_tokens_count"] == 1
    assert d["vllm:request_prefill_kv_computed_tokens_sum"] == src["local_compute"] > 0
    assert d["vllm:request_num_preemptions_count"] == 1
    assert d["vllm:request_num_preemptions_sum"] == 0
    # cache hits by tier: this instance's device pool, as vllm:prefix_cache_hits counts them
    hits = {k: hit1[k] - hit0[k] for k in hit1}
    assert set(hits) == {"device", "host", "p2p", "disk", "external_unspecified"}
    assert hits["device"] == d["vllm:prefix_cache_hits_total"] >= src["local_cache_hit"]
    assert sum(hits.values()) == hits["device"]


def test_waiting_by_reason_and_admission_rejections(client, model_name):
    waiting = by_label(client, "vllm:num_requests_waiting_by_reason", "reason")
    assert set(waiting) == {"capacity", "deferred"}
    total = families(client)["vllm:num_requests_waiting"].samples[0].value
    assert sum(waiting.values()) == total
    rejections = by_label(client, "vllm:admission_rejections_total", "reason")
    assert rejections == {"max_num_queued_reqs": 0, "max_num_queued_tokens": 0}
