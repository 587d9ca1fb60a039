"""What each `pdserve bench` sub-command does, given its parsed arguments."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
from typing import Any

from pdserve.bench.client import EndpointConfig, fetch_model_id
from pdserve.bench.compare import compare_files, load_results
from pdserve.bench.metrics import LATENCY_METRICS, summarize
from pdserve.bench.overload import OverloadRule
from pdserve.bench.report import build_result, default_filename, format_summary, save_result
from pdserve.bench.runner import LoadSpec, run_load
from pdserve.bench.sweep import StageFn, auto_sweep, concurrency_sweep, rate_sweep
from pdserve.bench.workloads import WorkloadConfig, build_workload


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (ms)."""
    slos = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in LATENCY_METRICS or not value:
            raise SystemExit(f"--goodput {item!r}: expected one of {LATENCY_METRICS} as name:ms")
        slos[name] = float(value)
    return slos


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def endpoint_config(args: argparse.Namespace) -> EndpointConfig:
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    headers = _pairs(args.header)
    if os.environ.get("OPENAI_API_KEY") and "Authorization" not in headers:
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    model = args.model or asyncio.run(fetch_model_id(base_url, headers))
    return EndpointConfig(
        base_url=base_url,
        endpoint=args.endpoint,
        model=model,
        stream=not args.no_stream,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        extra_body=json.loads(args.extra_body) if args.extra_body else {},
        headers=headers,
        timeout_s=args.request_timeout,
    )


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    fields = WorkloadConfig.__dataclass_fields__
    values = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    if args.num_prompts is None:  # a trace replays all its rows; others default to 1000
        values["num_prompts"] = None if args.dataset_name == "trace" else 1000
    return WorkloadConfig(**values)


def load_spec(args: argparse.Namespace, request_rate: float = math.inf) -> LoadSpec:
    arrival = "gamma" if args.burstiness != 1.0 and args.arrival == "poisson" else args.arrival
    return LoadSpec(
        request_rate=getattr(args, "request_rate", request_rate),
        arrival=arrival,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        num_prompts=None if args.duration else args.num_prompts,
        duration_s=args.duration,
        num_warmups=args.num_warmups,
        seed=args.seed,
        num_processes=args.num_client_processes,
        overload=OverloadRule() if args.early_stop else None,
        progress=not args.disable_tqdm,
    )


def _stage_fn(args: argparse.Namespace) -> tuple[StageFn, EndpointConfig]:
    """Builds the workload once; every stage sends the same requests."""
    from pdserve.bench.tokenizer import load_bench_tokenizer

    cfg = endpoint_config(args)
    tokenizer = load_bench_tokenizer(args.tokenizer)
    wl = workload_config(args)
    specs = build_workload(wl, tokenizer)
    slos = parse_goodput(args.goodput)
    percentiles = tuple(p.strip() for p in args.metric_percentiles.split(","))
    meta_base: dict[str, Any] = {
        "backend": "openai-chat" if cfg.chat else "openai",
        "label": args.label,
        "model_id": cfg.model,
        "tokenizer_id": args.tokenizer or "pdserve-embedded",
        "base_url": cfg.base_url,
        "endpoint": cfg.endpoint,
        "stream": cfg.stream,
        "dataset_name": wl.dataset_name,
        "seed": wl.seed,
        "goodput_slos_ms": slos or None,
        **_pairs(args.metadata),
    }

    def stage(load: LoadSpec) -> dict[str, Any]:
        if load.num_prompts is None and load.duration_s is None:
            load = dataclasses.replace(load, num_prompts=len(specs))  # the whole workload
        run = run_load(specs, cfg, load)
        summary = summarize(run.records, run.duration_s, slos, tokenizer)
        meta = {
            **meta_base,
            "num_prompts": len(run.records),
            "request_rate": load.request_rate,
            "arrival": load.arrival,
            "burstiness": load.burstiness,
            "max_concurrency": load.max_concurrency,
            "num_warmups": load.num_warmups,
            "num_client_processes": load.num_processes,
            "early_stop_reason": run.early_stop_reason,
            "warnings": run.warnings,
        }
        result = build_result(summary, meta, args.save_detailed)
        print(format_summary(result, percentiles))
        return result

    return stage, cfg


def cmd_run(args: argparse.Namespace) -> int:
    """`pdserve bench run`: one run, console summary, optional JSON."""
    stage, _ = _stage_fn(args)
    result = stage(load_spec(args))
    if args.save_result or args.result_filename:
        name = args.result_filename or default_filename(result)
        print("saved", save_result(result, os.path.join(args.result_dir, name)))
    return 0 if result["completed"] else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    """`pdserve bench sweep`: stages, one JSON per stage plus sweep.json in --result-dir."""
    stage, cfg = _stage_fn(args)
    label = args.label or cfg.model
    base = load_spec(args)
    if args.request_rates:
        rates = [float(x) for x in args.request_rates.split(",")]
        out = rate_sweep(stage, base, rates, label)
    elif args.max_concurrencies:
        concs = [int(x) for x in args.max_concurrencies.split(",")]
        out = concurrency_sweep(stage, base, concs, label)
    else:
        out = auto_sweep(stage, base, args.auto_rates, label)
    for i, result in enumerate(out.stages):
        save_result(result, os.path.join(args.result_dir, f"stage-{i + 1:02d}.json"))
    path = save_result(out.to_json(), os.path.join(args.result_dir, "sweep.json"))
    print("saved", path)
    if out.skipped:
        print("skipped (over-saturated):", ", ".join(out.skipped))
    if args.plot:
        from pdserve.bench.plots import plot_all

        for png in plot_all([(label, out.stages)], args.result_dir):
            print("plot", png)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """`pdserve bench compare A.json B.json ...`: Markdown table to stdout (and -o)."""
    md = compare_files(args.files)
    sys.stdout.write(md)
    if args.output:
        with open(args.output, "w") as f:
            f.write(md)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """`pdserve bench plot FILES -o DIR`: one curve per file."""
    from pdserve.bench.plots import plot_all

    series = [load_results(p) for p in args.files]
    for png in plot_all(series, args.output_dir, args.cdf_stage):
        print("plot", png)
    return 0
