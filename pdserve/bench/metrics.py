"""Turns request records into the figures `vllm bench serve` reports, under its names.

Definitions (vLLM's): TTFT = first content chunk - send; ITL = gaps between content chunks,
pooled over requests; E2E = last content chunk - send (whole response for non-streamed);
TPOT = (E2E - TTFT) / (output tokens - 1), only for requests with > 1 output token;
throughputs = totals over completed requests / wall-clock duration.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pdserve.bench.request import RequestRecord

PERCENTILES = (0.1, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class RequestMetrics:
    """Per-request latencies in seconds; None where the request has no such figure."""

    input_tokens: int
    output_tokens: int
    ttft: float | None
    tpot: float | None
    itls: list[float]
    e2el: float
    client_output_tokens: int | None = None

    def first_seen(self) -> float:
        """When the user first saw output: TTFT, or the whole response if none streamed."""
        return self.ttft if self.ttft is not None else self.e2el


def request_metrics(rec: RequestRecord, tokenizer: Tokenizer | None = None) -> RequestMetrics:
    """Derive one completed request's metrics from its timestamps and usage."""
    client_out = None
    if tokenizer is not None:
        client_out = len(tokenizer.encode(rec.output_text, add_special_tokens=False))
    if rec.usage_completion_tokens is not None:
        out = rec.usage_completion_tokens
    elif client_out is not None:
        out = client_out
    else:
        out = len(rec.chunk_s)  # last resort: one token per streamed chunk
    inp = rec.usage_prompt_tokens if rec.usage_prompt_tokens is not None else rec.prompt_len
    chunks = rec.chunk_s if rec.streamed else []
    ttft = chunks[0] - rec.send_s if chunks else None
    e2el = (chunks[-1] if chunks else rec.end_s) - rec.send_s
    itls = [b - a for a, b in zip(chunks, chunks[1:], strict=False)]
    tpot = (e2el - ttft) / (out - 1) if ttft is not None and out > 1 else None
    return RequestMetrics(inp, out, ttft, tpot, itls, e2el, client_out)


def meets_slos(m: RequestMetrics, slos_ms: dict[str, float]) -> bool:
    """True when the request meets every SLO given (ms).

    ttft is judged on when output was first seen (E2E for non-streamed requests); tpot and
    itl are met vacuously by one-token outputs (as vLLM treats them); itl means every gap.
    """
    values = {
        "ttft": m.first_seen(),
        "tpot": m.tpot if m.tpot is not None else 0.0,
        "itl": max(m.itls) if m.itls else 0.0,
        "e2el": m.e2el,
    }
    return all(values[k] * 1000.0 <= v for k, v in slos_ms.items())


def percentile_fields(name: str, values_s: list[float]) -> dict[str, float | None]:
    """mean/median/std and every percentile of `values_s`, in ms, vLLM-named."""
    keys = ["mean", "median", "std"] + [f"p{percentile_word(p)}" for p in PERCENTILES]
    if not values_s:
        return {f"{k}_{name}_ms": None for k in keys}  # absent, never faked as 0
    arr = np.asarray(values_s, dtype=float) * 1000.0
    out = {
        f"mean_{name}_ms": float(arr.mean()),
        f"median_{name}_ms": float(np.median(arr)),
        f"std_{name}_ms": float(arr.std()),
    }
    for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES), strict=True):
        out[f"p{percentile_word(p)}_{name}_ms"] = float(v)
    return out


def percentile_word(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once, from send/end events (ends first on ties)."""
    events = sorted([(r.send_s, 1) for r in records] + [(r.end_s, -1) for r in records])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def _rate(times: list[float]) -> float | None:
    """Events per second between the first and the last of `times`."""
    if len(times) < 2 or max(times) == min(times):
        return None
    return (len(times) - 1) / (max(times) - min(times))


def _max_tokens_per_s(pairs: list[tuple[RequestRecord, RequestMetrics]]) -> float | None:
    buckets: Counter[int] = Counter()
    for rec, m in pairs:
        if rec.chunk_s:
            per_chunk = m.output_tokens / len(rec.chunk_s)
            for t in rec.chunk_s:
                buckets[int(math.floor(t))] += per_chunk
    return float(max(buckets.values())) if buckets else None


@dataclass
class Summary:
    """The figures of one run (`fields`) and the per-request detail (`detail`)."""

    fields: dict[str, Any]
    detail: dict[str, list[Any]] = field(default_factory=dict)


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    goodput_slos_ms: dict[str, float] | None = None,
    tokenizer: Tokenizer | None = None,
) -> Summary:
    """All figures of a run; failed and cancelled requests never enter the latencies."""
    goodput_slos_ms = goodput_slos_ms or {}
    sent = [r for r in records if not r.cancelled]
    ok = [r for r in sent if r.ok]
    failed = [r for r in sent if not r.ok]
    pairs = [(r, request_metrics(r, tokenizer)) for r in ok]
    ms = [m for _, m in pairs]
    total_in = sum(m.input_tokens for m in ms)
    total_out = sum(m.output_tokens for m in ms)
    dur = duration_s if duration_s > 0 else math.nan
    good = [r for r, m in pairs if meets_slos(m, {**goodput_slos_ms, **r.slo_ms})]
    has_slos = bool(goodput_slos_ms) or any(r.slo_ms for r in ok)
    delays = [r.schedule_delay_s for r in sent]
    f: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(failed),
        "cancelled": len(records) - len(sent),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        # SGLang's split of the input: the images' tokens (as the processor expands them)
        "total_input_vision_tokens": sum(r.vision_len for r in ok),
        "total_input_text_tokens": total_in - sum(r.vision_len for r in ok),
        "request_throughput": len(ok) / dur,
        "request_goodput": len(good) / dur if has_slos else None,
        "goodput_fraction": len(good) / len(sent) if has_slos and sent else None,
        "input_throughput": total_in / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "max_output_tokens_per_s": _max_tokens_per_s(pairs),
        "max_concurrent_requests": peak_concurrency(sent),
        "scheduled_request_rate": _rate([r.scheduled_s for r in sent]),
        "achieved_request_rate": _rate([r.send_s for r in sent]),
        "num_streamed": sum(1 for r in ok if r.streamed),
        "num_non_streamed": sum(1 for r in ok if not r.streamed),
        "usage_missing": sum(1 for r in ok if r.usage_completion_tokens is None),
        "prefix_cache_hit_tokens": sum(r.usage_cached_tokens or 0 for r in ok),
        "prefix_cache_hit_rate": (sum(r.usage_cached_tokens or 0 for r in ok) / total_in
                                  if total_in else None),
        "output_token_disagreements": sum(
            1
            for r, m in pairs
            if m.client_output_tokens is not None
            and r.usage_completion_tokens is not None
            and m.client_output_tokens != r.usage_completion_tokens
        ),
        "input_token_disagreements": sum(
            1
            for r in ok
            if r.usage_prompt_tokens is not None and r.usage_prompt_tokens != r.prompt_len
        ),
        "errors_by_type": dict(Counter(r.error or "" for r in failed).most_common()),
        "mean_schedule_delay_ms": float(np.mean(delays) * 1000) if delays else None,
        "p99_schedule_delay_ms": float(np.percentile(delays, 99) * 1000) if delays else None,
        "max_schedule_delay_ms": float(np.max(delays) * 1000) if delays else None,
    }
    f.update(percentile_fields("ttft", [m.ttft for m in ms if m.ttft is not None]))
    f.update(percentile_fields("tpot", [m.tpot for m in ms if m.tpot is not None]))
    f.update(percentile_fields("itl", [g for m in ms for g in m.itls]))
    f.update(percentile_fields("e2el", [m.e2el for m in ms]))
    f["categories"] = _by_category(pairs, goodput_slos_ms)
    return Summary(f, _detail(sent, {id(r): m for r, m in pairs}))


def _by_category(
    pairs: list[tuple[RequestRecord, RequestMetrics]], slos: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Completed count, goodput fraction and TTFT per workload category (code mix)."""
    out: dict[str, dict[str, Any]] = {}
    for cat in sorted({r.category for r, _ in pairs if r.category}):
        sub = [(r, m) for r, m in pairs if r.category == cat]
        ttfts = [m.first_seen() for _, m in sub]
        good = sum(1 for r, m in sub if meets_slos(m, {**slos, **r.slo_ms}))
        out[cat] = {
            "completed": len(sub),
            "goodput_fraction": good / len(sub),
            "slo_ms": {**slos, **sub[0][0].slo_ms},
            "median_ttft_ms": float(np.median(ttfts) * 1000),
            "p99_ttft_ms": float(np.percentile(ttfts, 99) * 1000),
        }
    return out


def _detail(sent: list[RequestRecord], by_id: dict[int, RequestMetrics]) -> dict[str, list[Any]]:
    """Per-request lists, vLLM-named where vLLM has the field (seconds, like vLLM)."""
    d: dict[str, list[Any]] = {
        k: []
        for k in (
            "input_lens",
            "output_lens",
            "ttfts",
            "itls",
            "e2els",
            "generated_texts",
            "errors",
            "scheduled_times",
            "send_times",
            "end_times",
            "categories",
            "cached_tokens",
        )
    }
    for r in sent:
        m = by_id.get(id(r))
        d["input_lens"].append(m.input_tokens if m else r.prompt_len)
        d["output_lens"].append(m.output_tokens if m else 0)
        d["ttfts"].append(m.ttft if m else None)
        d["itls"].append(m.itls if m else [])
        d["e2els"].append(m.e2el if m else None)
        d["generated_texts"].append(r.output_text)
        d["errors"].append(r.error or "")
        d["scheduled_times"].append(r.scheduled_s)
        d["send_times"].append(r.send_s)
        d["end_times"].append(r.end_s)
        d["categories"].append(r.category)
        d["cached_tokens"].append(r.usage_cached_tokens)  # None: the server did not say
    return d
