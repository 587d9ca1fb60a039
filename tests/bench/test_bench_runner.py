"""Load shapes: open-loop timing, closed-loop concurrency, warm-ups, duration, processes."""

from __future__ import annotations

import numpy as np
import pytest
from fake_server import FakeServer, Script

from pdserve.bench.client import EndpointConfig
from pdserve.bench.metrics import summarize
from pdserve.bench.overload import OverloadRule
from pdserve.bench.request import RequestSpec
from pdserve.bench.runner import LoadSpec, run_load

SLOW = {"slow": Script(ttft=0.05, gaps=[0.05] * 3)}  # 200 ms per request


def _specs(n, prompt="fast", out=4):
    return [RequestSpec(prompt, 3, out) for _ in range(n)]


def _fitted_sends_per_s(records) -> float:
    """The pace of the sends, fitted over all of them: one late send moves it little."""
    sends = sorted(r.send_s for r in records)
    return 1 / np.polyfit(np.arange(len(sends)), sends, 1)[0]


def test_open_loop_achieves_the_requested_rate_within_2_percent():
    with FakeServer() as server:
        cfg = EndpointConfig(server.url, model="fake")
        load = LoadSpec(request_rate=100.0, arrival="constant", num_prompts=300, progress=False)
        run = run_load(_specs(300), cfg, load)
    f = summarize(run.records, run.duration_s).fields
    assert f["completed"] == 300
    # CI once saw the last send ~170 ms late on a busy host: the first-to-last rate read 94
    assert _fitted_sends_per_s(run.records) == pytest.approx(100.0, rel=0.02)
    assert f["achieved_request_rate"] == pytest.approx(100.0, rel=0.10)  # first to last send
    assert f["p99_schedule_delay_ms"] < 50


def test_poisson_sends_follow_the_schedule():
    with FakeServer() as server:
        cfg = EndpointConfig(server.url, model="fake")
        load = LoadSpec(request_rate=50.0, num_prompts=100, seed=3, progress=False)
        run = run_load(_specs(100), cfg, load)
    f = summarize(run.records, run.duration_s).fields
    # each send against its scheduled time, fitted over all 100 (robust to one late send)
    records = sorted(run.records, key=lambda r: r.scheduled_s)
    scheduled = [r.scheduled_s for r in records]
    pace = np.polyfit(scheduled, [r.send_s for r in records], 1)[0]
    assert pace == pytest.approx(1.0, rel=0.02)
    assert f["achieved_request_rate"] == pytest.approx(f["scheduled_request_rate"], rel=0.10)


def test_closed_loop_holds_the_concurrency():
    with FakeServer(SLOW) as server:
        cfg = EndpointConfig(server.url, model="fake")
        # 10 rounds: one stalled request on a busy host is a small part of the run
        load = LoadSpec(max_concurrency=3, num_prompts=30, progress=False)
        run = run_load(_specs(30, "slow"), cfg, load)
    f = summarize(run.records, run.duration_s).fields
    assert f["max_concurrent_requests"] == 3
    assert f["request_throughput"] == pytest.approx(3 / 0.2, rel=0.25)  # Little's law
    assert f["mean_schedule_delay_ms"] < 50  # waiting for a slot is not client lag


def test_warmups_are_sent_but_not_measured():
    with FakeServer() as server:
        cfg = EndpointConfig(server.url, model="fake")
        load = LoadSpec(num_prompts=5, num_warmups=3, progress=False)
        run = run_load(_specs(5), cfg, load)
        sent = len(server.bodies)
    assert sent == 8 and len(run.records) == 5


def test_duration_bound_closed_loop_stops_issuing_at_the_deadline():
    with FakeServer(SLOW) as server:
        cfg = EndpointConfig(server.url, model="fake")
        load = LoadSpec(max_concurrency=2, duration_s=1.0, progress=False)
        run = run_load(_specs(3, "slow"), cfg, load)
    assert 8 <= len(run.records) <= 12  # 2 slots x 1 s / 0.2 s
    assert max(r.send_s for r in run.records) < 1.0


def test_several_client_processes_merge_into_one_run():
    with FakeServer() as server:
        cfg = EndpointConfig(server.url, model="fake")
        load = LoadSpec(
            request_rate=80.0, arrival="constant", num_prompts=80, num_processes=2, progress=False
        )
        run = run_load(_specs(80), cfg, load)
    f = summarize(run.records, run.duration_s).fields
    assert f["completed"] == 80 and sorted(r.index for r in run.records) == list(range(80))
    assert _fitted_sends_per_s(run.records) == pytest.approx(80.0, rel=0.03)
    assert f["achieved_request_rate"] == pytest.approx(80.0, rel=0.10)


def test_over_saturated_stage_stops_early():
    rule = OverloadRule(window_s=0.5, windows=3, min_backlog=8)
    with FakeServer(SLOW, max_concurrent=1) as server:  # serves 5 req/s at most
        cfg = EndpointConfig(server.url, model="fake")
        load = LoadSpec(request_rate=40.0, num_prompts=400, overload=rule, progress=False)
        run = run_load(_specs(400, "slow"), cfg, load)
    assert run.early_stop_reason and "over-saturated" in run.early_stop_reason
    f = summarize(run.records, run.duration_s).fields
    assert f["cancelled"] > 0 and f["failed"] == 0
    assert len(run.records) < 400


def test_over_saturation_is_detected_across_client_processes():
    rule = OverloadRule(window_s=0.5, windows=3, min_backlog=8)
    with FakeServer(SLOW, max_concurrent=1) as server:
        cfg = EndpointConfig(server.url, model="fake")
        load = LoadSpec(
            request_rate=40.0, num_prompts=400, overload=rule, num_processes=2, progress=False
        )
        run = run_load(_specs(400, "slow"), cfg, load)
    assert run.early_stop_reason and "over-saturated" in run.early_stop_reason
    assert sum(r.cancelled for r in run.records) > 0 and len(run.records) < 400


def test_trace_replay_sends_at_the_trace_timestamps(tokenizer, tmp_path):
    import json

    from pdserve.bench.workloads.trace import trace_workload

    stamps = [0, 150, 400, 450, 900]  # ms
    rows = [{"timestamp": t, "input_length": 12, "output_length": 2} for t in stamps]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    specs = trace_workload(tokenizer, str(path))
    with FakeServer() as server:
        cfg = EndpointConfig(server.url, model="fake")
        run = run_load(specs, cfg, LoadSpec(num_prompts=len(specs), progress=False))
    sends = [r.send_s * 1000 for r in sorted(run.records, key=lambda r: r.index)]
    assert sends == pytest.approx(stamps, abs=25)
