"""End to end through the command line against the loopback server: sweeps -> JSON ->
compare -> plots, for two "deployments" (a fast and a slow fake server)."""

from __future__ import annotations

import argparse
import json

import pytest
from fake_server import FakeServer

from pdserve.bench import cli


def bench(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pdserve")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


def workload(tok_dir: str) -> list[str]:
    return [
        "--tokenizer", tok_dir, "--dataset-name", "random", "--random-input-len", "16",
        "--random-output-len", "8", "--num-prompts", "20", "--disable-tqdm",
        "--goodput", "ttft:30", "tpot:10",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sweeps(tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    for label, token_s in (("fast", 0.002), ("slow", 0.008)):
        with FakeServer(token_s=token_s) as server:
            common = ["--base-url", server.url, "--label", label, *workload(tiny_tokenizer_dir)]
            assert bench("sweep", *common, "--request-rates", "10,20", "--save-detailed",
                         "--result-dir", str(out / label / "rate")) == 0  # fmt: skip
            assert bench("sweep", *common, "--max-concurrencies", "1,4",
                         "--result-dir", str(out / label / "conc")) == 0  # fmt: skip
    return out


def test_rate_sweep_writes_one_json_per_stage_and_a_sweep_file(sweeps):
    sweep = json.loads((sweeps / "fast" / "rate" / "sweep.json").read_text())
    assert sweep["kind"] == "request_rate" and sweep["label"] == "fast"
    assert [s["request_rate"] for s in sweep["stages"]] == [10.0, 20.0]
    stage = json.loads((sweeps / "fast" / "rate" / "stage-02.json").read_text())
    assert stage["completed"] == 20 and stage["model_id"] == "fake-model"
    assert len(stage["ttfts"]) == 20  # --save-detailed
    assert stage["mean_ttft_ms"] > 0 and stage["request_goodput"] is not None


def test_concurrency_sweep_stages_are_closed_loop(sweeps):
    sweep = json.loads((sweeps / "slow" / "conc" / "sweep.json").read_text())
    assert [s["max_concurrency"] for s in sweep["stages"]] == [1, 4]
    assert [s["max_concurrent_requests"] for s in sweep["stages"]] == [1, 4]
    assert all(s["request_rate"] == "inf" for s in sweep["stages"])


def test_compare_two_deployments(sweeps, capsys):
    out = sweeps / "compare.md"
    fast, slow = (str(sweeps / d / "rate" / "sweep.json") for d in ("fast", "slow"))
    assert bench("compare", fast, slow, "-o", str(out)) == 0
    md = out.read_text()
    assert "| metric | fast | slow | Δ% slow vs fast |" in md
    assert "mean_tpot_ms" in md and "### Stage 2: request rate 20.0 req/s" in md
    assert md == capsys.readouterr().out


def test_plots_of_two_deployments(sweeps):
    fast, slow = (str(sweeps / d / "rate" / "sweep.json") for d in ("fast", "slow"))
    assert bench("plot", fast, slow, "-o", str(sweeps / "plots")) == 0
    for name in ("latency_vs_rate.png", "goodput_vs_rate.png", "latency_cdf.png"):
        assert (sweeps / "plots" / name).stat().st_size > 10_000


def test_single_run_saves_a_result_file(tiny_tokenizer_dir, tmp_path):
    with FakeServer(token_s=0.001) as server:
        rc = bench("run", "--base-url", server.url, *workload(tiny_tokenizer_dir),
                   "--request-rate", "50", "--endpoint", "/v1/chat/completions",
                   "--save-result", "--result-filename", "r.json",
                   "--result-dir", str(tmp_path))  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["backend"] == "openai-chat" and result["completed"] == 20


def test_auto_sweep_finds_saturation_then_rates_below(tiny_tokenizer_dir, tmp_path):
    with FakeServer(token_s=0.002, max_concurrent=4) as server:  # ~60 req/s at most
        rc = bench("sweep", "--base-url", server.url, *workload(tiny_tokenizer_dir),
                   "--auto-rates", "2", "--result-dir", str(tmp_path))  # fmt: skip
    assert rc == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    sat = sweep["saturation"]["request_throughput"]
    assert sweep["kind"] == "auto" and sat > 0
    assert [s["request_rate"] for s in sweep["stages"]] == pytest.approx([sat / 3, 2 * sat / 3])


def test_code_workload_through_the_cli(tiny_tokenizer_dir, tmp_path):
    with FakeServer() as server:
        rc = bench("run", "--base-url", server.url, "--tokenizer", tiny_tokenizer_dir,
                   "--dataset-name", "code", "--code-length-scale", "0.05", "--num-prompts", "30",
                   "--disable-tqdm", "--result-filename", "code.json",
                   "--result-dir", str(tmp_path))  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "code.json").read_text())
    cats = result["categories"]
    assert set(cats) <= {"inline-completion", "code-explanation", "function-generation"}
    assert cats["inline-completion"]["slo_ms"] == {"ttft": 200.0}
    assert result["request_goodput"] is not None  # the mix's own TTFT targets
