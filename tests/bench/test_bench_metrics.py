"""Metric definitions on records whose every time is set by hand (exact equality)."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.bench.metrics import PERCENTILES, peak_concurrency, summarize
from pdserve.bench.request import RequestRecord


def rec(i, send, chunks, end=None, out=None, streamed=True, error=None, slo=None, text="x"):
    return RequestRecord(
        index=i,
        prompt_len=10,
        requested_output_len=8,
        category="",
        scheduled_s=send,
        ready_s=send,
        send_s=send,
        chunk_s=list(chunks),
        end_s=end if end is not None else (chunks[-1] if chunks else send),
        streamed=streamed,
        output_text=text,
        usage_prompt_tokens=10,
        usage_completion_tokens=out if out is not None else len(chunks),
        error=error,
        slo_ms=slo or {},
    )


@pytest.fixture
def run():
    """A: 4 tokens; B: 2 tokens (3 by usage); C: one token; D: empty; E: failed."""
    return [
        rec(0, 0.0, [0.100, 0.120, 0.140, 0.160], end=0.170),
        rec(1, 0.5, [0.550, 0.590], out=3),
        rec(2, 1.0, [1.030]),
        rec(3, 1.5, [], end=1.520, text=""),
        rec(4, 2.0, [], end=2.010, error="HTTP 500: boom"),
    ]


def test_ttft_is_first_chunk_minus_send(run):
    f = summarize(run, 2.0).fields
    ttfts = [100.0, 50.0, 30.0]  # D streamed nothing: it has no TTFT
    assert f["mean_ttft_ms"] == pytest.approx(np.mean(ttfts))
    assert f["median_ttft_ms"] == pytest.approx(50.0)


def test_e2e_ends_at_last_chunk_or_response_end(run):
    f = summarize(run, 2.0).fields
    e2es = [160.0, 90.0, 30.0, 20.0]
    assert f["mean_e2el_ms"] == pytest.approx(np.mean(e2es))
    assert f["p99_e2el_ms"] == pytest.approx(np.percentile(e2es, 99))


def test_tpot_uses_usage_tokens_and_skips_one_token_outputs(run):
    f = summarize(run, 2.0).fields
    tpots = [(160 - 100) / 3, (90 - 50) / 2]  # B: usage says 3 tokens in 2 chunks
    assert f["mean_tpot_ms"] == pytest.approx(np.mean(tpots))


def test_itl_pools_chunk_gaps_over_requests(run):
    f = summarize(run, 2.0).fields
    itls = [20.0, 20.0, 20.0, 40.0]
    assert f["mean_itl_ms"] == pytest.approx(25.0)
    for p in PERCENTILES:
        word = str(int(p)) if float(p).is_integer() else str(p)
        assert f[f"p{word}_itl_ms"] == pytest.approx(np.percentile(itls, p))


def test_every_percentile_field_present(run):
    f = summarize(run, 2.0).fields
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for word in ("0.1", "1", "5", "10", "25", "50", "75", "90", "95", "99", "99.9"):
            assert f"p{word}_{metric}_ms" in f
        assert f"mean_{metric}_ms" in f and f"median_{metric}_ms" in f


def test_failures_counted_by_error_and_kept_out_of_latencies(run):
    f = summarize(run, 2.0).fields
    assert f["completed"] == 4 and f["failed"] == 1
    assert f["errors_by_type"] == {"HTTP 500: boom": 1}
    assert f["mean_e2el_ms"] < 100  # the failure's 10 ms is not among them either way
    assert f["total_output_tokens"] == 4 + 3 + 1 + 0


def test_throughputs_are_totals_over_duration(run):
    f = summarize(run, 2.0).fields
    assert f["request_throughput"] == pytest.approx(4 / 2.0)
    assert f["output_throughput"] == pytest.approx(8 / 2.0)
    assert f["input_throughput"] == pytest.approx(40 / 2.0)
    assert f["total_token_throughput"] == pytest.approx(48 / 2.0)


def test_goodput_counts_requests_meeting_every_slo(run):
    # A: ttft 100, tpot 20, max itl 20, e2e 160; B: 50, 20, 40, 90; C: 30, -, -, 30; D: e2e 20
    f = summarize(run, 2.0, {"ttft": 60, "itl": 30}).fields
    # A fails ttft; B fails itl; C passes; D passes (first seen at its end, 20 ms)
    assert f["request_goodput"] == pytest.approx(2 / 2.0)
    assert f["goodput_fraction"] == pytest.approx(2 / 5)  # of all sent, failures included


def test_goodput_absent_without_slos(run):
    f = summarize(run, 2.0).fields
    assert f["request_goodput"] is None and f["goodput_fraction"] is None


def test_per_request_slo_overrides_global():
    records = [rec(0, 0, [0.3, 0.31], slo={"ttft": 500}), rec(1, 0, [0.3, 0.31])]
    f = summarize(records, 1.0, {"ttft": 100}).fields
    assert f["request_goodput"] == pytest.approx(1.0)


def test_non_streamed_requests_have_no_ttft_itl_tpot():
    records = [rec(0, 0.0, [], end=0.25, out=5, streamed=False, text="abcde")]
    f = summarize(records, 1.0).fields
    assert f["mean_ttft_ms"] is None and f["p99_itl_ms"] is None and f["mean_tpot_ms"] is None
    assert f["mean_e2el_ms"] == pytest.approx(250.0)
    assert f["total_output_tokens"] == 5


def test_peak_concurrency_from_start_end_events():
    records = [rec(0, 0.0, [1.0]), rec(1, 0.5, [1.5]), rec(2, 1.0, [2.0]), rec(3, 1.2, [1.3])]
    assert peak_concurrency(records) == 3  # 1 ends at 1.0 exactly when 2 starts: not both


def test_rate_fields_from_schedule_and_sends():
    records = [rec(i, i * 0.1, [i * 0.1 + 0.01]) for i in range(11)]
    f = summarize(records, 1.1).fields
    assert f["scheduled_request_rate"] == pytest.approx(10.0)
    assert f["achieved_request_rate"] == pytest.approx(10.0)


class WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_usage_disagreements_with_client_tokenization_are_counted():
    records = [rec(0, 0, [0.1, 0.2], text="a b"), rec(1, 0, [0.1, 0.2], text="a b c")]
    f = summarize(records, 1.0, tokenizer=WordTokenizer()).fields
    assert f["output_token_disagreements"] == 1


def test_usage_missing_falls_back_to_client_count():
    r = rec(0, 0, [0.1, 0.2], text="a b c")
    r.usage_completion_tokens = None
    f = summarize([r], 1.0, tokenizer=WordTokenizer()).fields
    assert f["total_output_tokens"] == 3 and f["usage_missing"] == 1


def test_detail_lists_are_vllm_named(run):
    d = summarize(run, 2.0).detail
    assert d["ttfts"][3] is None  # absent, never faked as 0
    assert d["output_lens"][:4] == [4, 3, 1, 0]
    assert d["errors"][4] == "HTTP 500: boom"
