"""Reports: vLLM-named JSON, console summary, Markdown comparison, PNG plots."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.compare import compare_files, delta_pct
from pdserve.bench.metrics import Summary
from pdserve.bench.plots import plot_all
from pdserve.bench.report import build_result, format_summary
from pdserve.bench.sweep import auto_rates

VLLM_FIELDS = (
    "date", "backend", "model_id", "num_prompts", "request_rate", "burstiness",
    "max_concurrency", "duration", "completed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
    "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms",
    "max_output_tokens_per_s", "max_concurrent_requests",
)  # fmt: skip


def _stage(rate, ttft, thr, good=None):
    return {
        "request_rate": rate, "completed": 10, "failed": 0, "request_throughput": thr,
        "request_goodput": good, "goodput_fraction": None if good is None else good / thr,
        "output_throughput": thr * 8, "median_ttft_ms": ttft, "p99_ttft_ms": 2 * ttft,
        "median_itl_ms": 5.0, "p99_itl_ms": 9.0, "median_e2el_ms": ttft + 40,
        "p99_e2el_ms": 2 * ttft + 80, "mean_ttft_ms": ttft,
    }  # fmt: skip


def test_result_json_uses_vllm_field_names():
    meta = {"backend": "openai", "model_id": "m", "num_prompts": 5, "burstiness": 1.0,
            "request_rate": float("inf"), "max_concurrency": None}  # fmt: skip
    fields = {k: 1.0 for k in VLLM_FIELDS if k != "date" and k not in meta}
    result = build_result(Summary(fields, {"ttfts": [0.1]}), meta, save_detailed=False)
    assert result["request_rate"] == "inf"  # as vLLM writes it
    assert all(k in result for k in VLLM_FIELDS)
    assert "ttfts" not in result
    assert "ttfts" in build_result(Summary(fields, {"ttfts": [0.1]}), meta, save_detailed=True)
    json.dumps(result)


def test_console_summary_reads_like_vllm():
    text = format_summary(
        {"completed": 3, "failed": 1, "mean_ttft_ms": 12.345, "p99_ttft_ms": None}
    )
    assert "Serving Benchmark Result" in text
    assert "Successful requests:" in text and "Mean TTFT (ms):" in text and "12.35" in text
    assert "P99 TTFT (ms):                           n/a" in text


def test_delta_percent():
    assert delta_pct(100.0, 80.0) == pytest.approx(-20.0)
    assert delta_pct(0, 5) is None and delta_pct(None, 5) is None


def test_compare_table_side_by_side_with_delta(tmp_path):
    a = tmp_path / "colocated.json"
    b = tmp_path / "1p1d.json"
    a.write_text(json.dumps(_stage(2.0, 100.0, 2.0)))
    b.write_text(json.dumps(_stage(2.0, 80.0, 2.2)))
    md = compare_files([str(a), str(b)])
    assert "| metric | colocated | 1p1d | Δ% 1p1d vs colocated |" in md
    assert "| median_ttft_ms ↓ | 100.00 | 80.00 | -20.0% ✓ |" in md
    assert "| request_throughput ↑ | 2.00 | 2.20 | +10.0% ✓ |" in md


def test_compare_sweeps_stage_by_stage(tmp_path):
    for name, ttft in (("A", 100.0), ("B", 50.0)):
        sweep = {"label": name, "stages": [_stage(1.0, ttft, 1.0), _stage(2.0, ttft, 2.0)]}
        (tmp_path / f"{name}.json").write_text(json.dumps(sweep))
    md = compare_files([str(tmp_path / "A.json"), str(tmp_path / "B.json")])
    assert "### Stage 1: request rate 1.0 req/s" in md and "### Stage 2" in md
    assert md.count("-50.0% ✓") >= 2


def test_plots_are_written(tmp_path):
    series = [
        ("colocated", [_stage(1.0, 50, 1.0, 1.0), _stage(2.0, 90, 2.0, 1.5)]),
        ("1P1D", [_stage(1.0, 40, 1.0, 1.0), _stage(2.0, 60, 2.0, 1.9)]),
    ]
    paths = plot_all(series, str(tmp_path))
    assert [p.split("/")[-1] for p in paths] == [
        "latency_vs_rate.png", "goodput_vs_rate.png", "latency_cdf.png",
    ]  # fmt: skip
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 10_000 for p in paths)


def test_auto_rates_are_evenly_spaced_below_saturation():
    assert auto_rates(10.0, 4) == [2.0, 4.0, 6.0, 8.0]
