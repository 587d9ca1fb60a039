"""The real client against the scripted loopback server: measured = scripted times."""

from __future__ import annotations

import numpy as np
import pytest
from fake_server import FakeServer, Script

from pdserve.bench.client import EndpointConfig
from pdserve.bench.metrics import summarize
from pdserve.bench.request import RequestSpec
from pdserve.bench.runner import LoadSpec, run_load

TOL_MS = 25.0  # loopback + event-loop wake-up jitter on a busy 2-core machine
S = 3  # script times are S x the hand-computed values below, in ms (x S again here)

SCRIPTS = {
    "four": Script(ttft=0.100 * S, gaps=[0.020 * S, 0.030 * S, 0.040 * S]),
    "two": Script(ttft=0.050 * S, gaps=[0.060 * S], completion_tokens=3),  # usage: 3 tokens
    "one": Script(ttft=0.030 * S),  # one token: no TPOT, no ITL
    "empty": Script(empty_after_s=0.040 * S),  # no output at all
    "fail": Script(status=500),
    "midfail": Script(ttft=0.020 * S, gaps=[0.020 * S, 0.020 * S], error_after_chunks=2),
}


def _run(names, stream=True, endpoint="/v1/completions", slos=None, ignore_eos=False):
    with FakeServer(SCRIPTS) as server:
        cfg = EndpointConfig(server.url, endpoint, "fake", stream=stream, ignore_eos=ignore_eos)
        specs = [RequestSpec(name, 5, 8) for name in names]
        load = LoadSpec(
            request_rate=4.0, arrival="constant", num_prompts=len(specs), progress=False
        )
        run = run_load(specs, cfg, load)
        bodies = list(server.bodies)
    return run, summarize(run.records, run.duration_s, slos), bodies


@pytest.fixture(scope="module")
def streamed():
    slos = {"ttft": 80 * S, "tpot": 35 * S}
    return _run(["four", "two", "one", "empty", "fail", "midfail"], slos=slos)


def test_ttft_matches_script(streamed):
    _, s, _ = streamed
    assert s.detail["ttfts"][0] * 1000 == pytest.approx(100 * S, abs=TOL_MS)
    assert s.detail["ttfts"][1] * 1000 == pytest.approx(50 * S, abs=TOL_MS)
    assert s.detail["ttfts"][2] * 1000 == pytest.approx(30 * S, abs=TOL_MS)
    assert s.detail["ttfts"][3] is None  # empty output: no first token


def test_itl_and_e2e_match_script(streamed):
    _, s, _ = streamed
    itls = np.array(s.detail["itls"][0]) * 1000
    assert itls == pytest.approx([20 * S, 30 * S, 40 * S], abs=TOL_MS)
    assert s.detail["e2els"][0] * 1000 == pytest.approx(190 * S, abs=TOL_MS)
    assert s.detail["e2els"][3] * 1000 == pytest.approx(40 * S, abs=TOL_MS)


def test_summary_percentiles_match_hand_computation(streamed):
    _, s, _ = streamed
    f = s.fields
    assert f["completed"] == 4 and f["failed"] == 2
    ttfts, e2es, itls = [100, 50, 30], [190, 110, 30, 40], [20, 30, 40, 60]
    tpots = [(190 - 100) / 3, (110 - 50) / 2]
    for name, hand in (("ttft", ttfts), ("e2el", e2es), ("itl", itls), ("tpot", tpots)):
        vals = [v * S for v in hand]
        assert f[f"mean_{name}_ms"] == pytest.approx(np.mean(vals), abs=TOL_MS)
        for p in (1, 50, 90, 99):
            assert f[f"p{p}_{name}_ms"] == pytest.approx(np.percentile(vals, p), abs=TOL_MS)
    assert f["total_output_tokens"] == 4 + 3 + 1 + 0


def test_failures_listed_by_error(streamed):
    _, s, _ = streamed
    errors = s.fields["errors_by_type"]
    assert any(e.startswith("HTTP 500") for e in errors)
    assert any("scripted stream error" in e for e in errors)


def test_goodput_by_hand(streamed):
    _, s, _ = streamed
    # (x S) ttft<=80 & tpot<=35: four fails ttft, two (tpot 30) ok, one ok, empty ok (40)
    assert s.fields["goodput_fraction"] == pytest.approx(3 / 6)


def test_request_body_asks_for_usage_and_passes_ignore_eos():
    _, _, bodies = _run(["one"], ignore_eos=True)
    assert bodies[0]["stream_options"] == {"include_usage": True}
    assert bodies[0]["ignore_eos"] is True and bodies[0]["max_tokens"] == 8


def test_non_streamed_requests_report_e2e_only():
    run, s, bodies = _run(["four", "one"], stream=False)
    assert bodies[0]["stream"] is False and "stream_options" not in bodies[0]
    f = s.fields
    assert f["mean_ttft_ms"] is None and f["mean_itl_ms"] is None and f["mean_tpot_ms"] is None
    assert s.detail["e2els"][0] * 1000 == pytest.approx(190 * S, abs=TOL_MS)
    assert f["total_output_tokens"] == 5 and f["num_non_streamed"] == 2


def test_chat_endpoint_ignores_role_only_chunk():
    _, s, bodies = _run(["four"], endpoint="/v1/chat/completions")
    assert bodies[0]["messages"] == [{"role": "user", "content": "four"}]
    assert s.detail["ttfts"][0] * 1000 == pytest.approx(100 * S, abs=TOL_MS)
    assert s.detail["generated_texts"][0] == "t0 t1 t2 t3 "
