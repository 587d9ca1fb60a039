"""`pdserve bench run | sweep | compare | plot`: the command line (flags named as vLLM's)."""

from __future__ import annotations

import argparse

from pdserve.bench.arrivals import ARRIVAL_KINDS
from pdserve.bench.workloads import WORKLOADS

EPILOG = """examples:
  pdserve bench run --base-url http://127.0.0.1:8000 --dataset-name random \\
      --random-input-len 64 --random-output-len 32 --num-prompts 50 --request-rate 4 \\
      --goodput ttft:500 tpot:50 --save-result --result-dir results/
  pdserve bench sweep --request-rates 1,2,4 --label 1P1D --result-dir results/1p1d
  pdserve bench sweep --max-concurrencies 1,4,16 --label colocated --result-dir results/colo
  pdserve bench sweep --auto-rates 5 --label 2xregular --result-dir results/regular
  pdserve bench compare results/1p1d/sweep.json results/regular/sweep.json
  pdserve bench plot results/1p1d/sweep.json results/regular/sweep.json -o results/plots
See docs/BENCH.md for metric definitions."""


def _add_target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--endpoint",
        default="/v1/completions",
        help="/v1/completions or /v1/chat/completions (chat is inferred from the path)",
    )
    g.add_argument("--model", default=None, help="model name sent (default: first of /v1/models)")
    g.add_argument("--tokenizer", default=None, help="HF tokenizer folder (default: embedded)")
    g.add_argument("--label", default=None, help="deployment name used in files, tables, plots")
    g.add_argument("--no-stream", action="store_true", help="non-streamed requests (no TTFT/ITL)")
    g.add_argument("--ignore-eos", action="store_true", help="pass ignore_eos: generate max_tokens")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    g.add_argument("--header", nargs="*", default=[], metavar="KEY=VALUE", help="HTTP headers")
    g.add_argument("--request-timeout", type=float, default=6 * 3600.0, help="seconds")


def _add_workload(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset-name", choices=WORKLOADS, default="random")
    g.add_argument("--dataset-path", default=None, help="sharegpt JSON or trace JSONL file")
    g.add_argument("--num-prompts", type=int, default=None, help="requests per run/stage")
    g.add_argument("--seed", type=int, default=0, help="makes prompts and arrivals reproducible")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [len*(1-r), len*(1+r)]",
    )
    g.add_argument("--gsp-num-groups", type=int, default=4, help="shared-prefix: groups")
    g.add_argument("--gsp-prompts-per-group", type=int, default=8)
    g.add_argument("--gsp-system-prompt-len", type=int, default=512)
    g.add_argument("--gsp-question-len", type=int, default=64)
    g.add_argument("--gsp-output-len", type=int, default=64)
    g.add_argument("--mt-num-conversations", type=int, default=8, help="multi-turn: "
                   "conversations (--num-prompts is ignored: conversations x turns)")
    g.add_argument("--mt-turns", type=int, default=4, help="multi-turn: turns each")
    g.add_argument("--mt-system-prompt-len", type=int, default=256)
    g.add_argument("--mt-turn-len", type=int, default=64, help="multi-turn: tokens a turn adds")
    g.add_argument("--mt-output-len", type=int, default=32)
    g.add_argument("--code-length-scale", type=float, default=1.0, help="code: shrink lengths")
    g.add_argument("--sharegpt-output-len", type=int, default=None)
    g.add_argument("--trace-block-size", type=int, default=512, help="tokens per hash id")
    g.add_argument("--trace-time-scale", type=float, default=1.0, help="<1 replays faster")
    g.add_argument("--image-count", type=int, default=1, help="image: images per request")
    g.add_argument("--image-resolution", default="1080p",
                   help="image: 4k, 1080p, 720p, 360p or WxH")
    g.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg",
                   help="image: how the random images are encoded")


def _add_load(p: argparse.ArgumentParser, sweep: bool) -> None:
    g = p.add_argument_group("load")
    if not sweep:
        g.add_argument(
            "--request-rate", type=float, default=float("inf"), help="req/s; inf = all at once"
        )
    g.add_argument("--arrival", choices=ARRIVAL_KINDS, default="poisson")
    g.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape: 1 = Poisson, <1 burstier, >1 smoother (implies --arrival gamma)",
    )
    g.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    g.add_argument("--duration", type=float, default=None, help="seconds instead of a count")
    g.add_argument("--num-warmups", type=int, default=0, help="unmeasured requests first")
    g.add_argument("--num-client-processes", type=int, default=1, help="load-generator processes")
    g.add_argument(
        "--early-stop",
        action=argparse.BooleanOptionalAction,
        default=sweep,
        help="stop a stage when the backlog keeps growing (over-saturated)",
    )


def _add_output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("results")
    g.add_argument(
        "--goodput",
        nargs="*",
        default=[],
        metavar="METRIC:MS",
        help="SLOs, e.g. ttft:500 tpot:50 itl:100 e2el:2000",
    )
    g.add_argument("--save-result", action="store_true", help="write the result JSON")
    g.add_argument("--save-detailed", action="store_true", help="add per-request lists")
    g.add_argument("--result-dir", default=".", help="where JSON files go")
    g.add_argument("--result-filename", default=None)
    g.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE")
    g.add_argument("--metric-percentiles", default="99", help="console percentiles, e.g. 50,99")
    g.add_argument("--disable-tqdm", action="store_true")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `pdserve bench` and its sub-commands."""
    from pdserve.bench import commands

    fmt = argparse.RawDescriptionHelpFormatter
    bench = subparsers.add_parser(
        "bench",
        help="benchmark any OpenAI-compatible server",
        description="Load generator and reports: TTFT, TPOT, ITL, E2E, throughput, goodput.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)

    run = sub.add_parser("run", help="one benchmark run", epilog=EPILOG, formatter_class=fmt)
    for add in (_add_target, _add_workload, _add_output):
        add(run)
    _add_load(run, sweep=False)
    run.set_defaults(func=commands.cmd_run)

    sweep = sub.add_parser(
        "sweep",
        help="stages over request rates or concurrencies (sweep.json + one JSON per stage)",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    for add in (_add_target, _add_workload, _add_output):
        add(sweep)
    _add_load(sweep, sweep=True)
    what = sweep.add_mutually_exclusive_group(required=True)
    what.add_argument("--request-rates", help="comma list of req/s, e.g. 1,2,4")
    what.add_argument("--max-concurrencies", help="comma list, e.g. 1,4,16 (closed loop)")
    what.add_argument(
        "--auto-rates", type=int, help="find saturation, then this many rates evenly below it"
    )
    sweep.add_argument("--plot", action="store_true", help="also write the PNGs of this sweep")
    sweep.set_defaults(func=commands.cmd_sweep)

    cmp_ = sub.add_parser("compare", help="side-by-side Markdown table with Δ%% per metric")
    cmp_.add_argument("files", nargs="+", help="run or sweep JSONs; the first is the baseline")
    cmp_.add_argument("-o", "--output", default=None, help="also write the Markdown here")
    cmp_.set_defaults(func=commands.cmd_compare)

    plot = sub.add_parser("plot", help="PNGs: latency and goodput vs rate, latency CDFs")
    plot.add_argument("files", nargs="+", help="sweep (or run) JSONs, one curve per file")
    plot.add_argument("-o", "--output-dir", default=".", help="where the PNGs go")
    plot.add_argument("--cdf-stage", type=int, default=-1, help="stage index for the CDFs")
    plot.set_defaults(func=commands.cmd_plot)
