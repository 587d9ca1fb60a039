"""A run's result: the JSON (vLLM's field names) and the console summary (vLLM's layout)."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from typing import Any

from pdserve.bench.metrics import Summary

_LATENCY_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def build_result(
    summary: Summary, meta: dict[str, Any], save_detailed: bool = False
) -> dict[str, Any]:
    """The run's JSON: `meta` (settings), every figure, and per-request lists if asked."""
    result: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y%m%d-%H%M%S")}
    result.update(meta)
    rate = result.get("request_rate")
    if isinstance(rate, float) and math.isinf(rate):
        result["request_rate"] = "inf"  # as vLLM writes it: JSON has no infinity
    result.update(summary.fields)
    if save_detailed:
        result.update(summary.detail)
    return result


def save_result(result: dict[str, Any], path: str) -> str:
    """Write `result` as JSON at `path` (folders created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


def default_filename(result: dict[str, Any]) -> str:
    """vLLM's naming: {backend}-{rate}qps-concurrency{n}-{model}-{date}.json."""
    model = str(result.get("model_id", "model")).split("/")[-1]
    conc = result.get("max_concurrency")
    conc_part = f"-concurrency{conc}" if conc else ""
    label = result.get("label") or result.get("backend", "openai")
    return f"{label}-{result.get('request_rate')}qps{conc_part}-{model}-{result['date']}.json"


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def format_summary(result: dict[str, Any], percentiles: tuple[str, ...] = ("99",)) -> str:
    """The console block, laid out as `vllm bench serve` prints it."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(name: str, key: str) -> None:
        lines.append(f"{name:<40} {_fmt(result.get(key)):<10}")

    row("Successful requests:", "completed")
    row("Failed requests:", "failed")
    if result.get("cancelled"):
        row("Cancelled (early stop):", "cancelled")
    if result.get("max_concurrency"):
        row("Maximum request concurrency:", "max_concurrency")
    row("Request rate configured (RPS):", "request_rate")
    row("Request rate achieved (RPS):", "achieved_request_rate")
    row("Benchmark duration (s):", "duration")
    row("Total input tokens:", "total_input_tokens")
    if result.get("total_input_vision_tokens"):
        row("Total input text tokens:", "total_input_text_tokens")
        row("Total input vision tokens:", "total_input_vision_tokens")
    row("Total generated tokens:", "total_output_tokens")
    row("Request throughput (req/s):", "request_throughput")
    if result.get("request_goodput") is not None:
        row("Request goodput (req/s):", "request_goodput")
        row("Goodput fraction:", "goodput_fraction")
    row("Output token throughput (tok/s):", "output_throughput")
    row("Peak output token throughput (tok/s):", "max_output_tokens_per_s")
    row("Peak concurrent requests:", "max_concurrent_requests")
    row("Total Token throughput (tok/s):", "total_token_throughput")
    row("Max schedule delay (ms):", "max_schedule_delay_ms")
    for key, (title, short) in _LATENCY_TITLES.items():
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        row(f"Mean {short} (ms):", f"mean_{key}_ms")
        row(f"Median {short} (ms):", f"median_{key}_ms")
        for p in percentiles:
            row(f"P{p} {short} (ms):", f"p{p}_{key}_ms")
    lines.append("=" * 50)
    for err, n in (result.get("errors_by_type") or {}).items():
        lines.append(f"error x{n}: {err}")
    if result.get("early_stop_reason"):
        lines.append(f"stopped early: {result['early_stop_reason']}")
    return "\n".join(lines)
