"""What each `pdserve plan` sub-command does, given its parsed arguments."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from pdserve.config import SchedulerConfig
from pdserve.cpu_heap import keep_cpu_heap
from pdserve.planner.layouts import SimLayout
from pdserve.planner.profile import Profile
from pdserve.planner.simulate import SimOptions, simulate


def cmd_profile(args: argparse.Namespace) -> int:
    """`pdserve plan profile`: time the engine here and write the profile JSON."""
    from pdserve.engine.engine import resolve_device
    from pdserve.planner.measure import ProfileSpec, measure_profile

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    spec = ProfileSpec(model=args.model, device=args.device, dtype=args.dtype,
                       threads=args.threads, tensor_parallel_size=args.tensor_parallel_size,
                       num_shapes=args.num_shapes, max_prefill_tokens=args.max_prefill_tokens,
                       max_decode_rows=args.max_decode_rows, max_context=args.max_context,
                       time_limit_s=args.time_limit, served=args.served,
                       corun=args.corun, tokenizer=args.tokenizer)
    if resolve_device(args.device).type == "cpu":
        keep_cpu_heap()  # the runner is timed in this process: as a served CPU engine's runs
    start = time.perf_counter()
    profile = measure_profile(spec)
    print(f"profile of {profile.model} on {profile.device} ({profile.dtype}) in "
          f"{time.perf_counter() - start:.0f} s:")
    _describe(profile)
    print("saved", profile.save(args.output))
    return 0


def cmd_refit(args: argparse.Namespace) -> int:
    """`pdserve plan refit`: the profile's own timings and probes, fitted again."""
    from pdserve.planner.measure import refit_profile

    profile = refit_profile(Profile.load(args.profile))
    print(f"profile of {profile.model} on {profile.device} ({profile.dtype}), refitted:")
    _describe(profile)
    print("saved", profile.save(args.output))
    return 0


def _describe(profile: Profile) -> None:
    for units, model in profile.step_time.items():
        print(f"  {profile.parallelism}={units}: {model} "
              f"(median fit error {100 * profile.fit_error[units]:.1f}%)")
        if units in profile.serving:
            o = profile.serving[units]
            print(f"    served: {1e3 * o.step_s:+.1f} ms a step (a correction of the fit), "
                  f"{1e3 * o.row_s:+.2f} ms a streamed token, {1e3 * o.request_s:+.1f} ms a "
                  "request")
        c = profile.corun.get(units)
        if c is not None:
            print(f"    beside a neighbour: prefill x{c.prefill:.2f}, decode x{c.decode:.2f}"
                  if c.measured else f"    beside a neighbour: not measured ({c.note})")
    if profile.router_overhead_measured:
        print(f"  a router adds {1e3 * profile.router_overhead_s:.1f} ms to a first token")


def sim_options(args: argparse.Namespace) -> SimOptions:
    defaults = SchedulerConfig()
    sched = SchedulerConfig(
        max_num_batched_tokens=args.max_num_batched_tokens or defaults.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs or defaults.max_num_seqs,
        max_step_ms=args.max_step_ms)
    return SimOptions(scheduler=sched, transport=args.transport)


def load_requests(args: argparse.Namespace, request_rate: float | None = None):
    """The bench's workload for these flags, at the flags' (or the given) rate."""
    from pdserve.bench.commands import workload_config
    from pdserve.bench.tokenizer import load_bench_tokenizer
    from pdserve.planner.workload import workload_requests

    if not args.request_rate > 0:
        raise SystemExit(f"--request-rate must be > 0 (got {args.request_rate})")
    wl = workload_config(args)
    if args.num_prompts is None and args.dataset_name != "trace":
        wl = dataclasses.replace(wl, num_prompts=200)  # the bench's 1000 is slow to simulate
    tokenizer = load_bench_tokenizer(args.tokenizer)
    rate = args.request_rate if request_rate is None else request_rate
    return workload_requests(wl, tokenizer, rate, args.arrival, args.burstiness)


def run_meta(args: argparse.Namespace) -> dict:
    """The bench's run fields that describe the load (so compare/plot read them)."""
    return {"request_rate": args.request_rate, "arrival": args.arrival,
            "burstiness": args.burstiness, "dataset_name": args.dataset_name,
            "seed": args.seed, "max_concurrency": None}


def cmd_simulate(args: argparse.Namespace) -> int:
    """`pdserve plan simulate`: one layout's predicted bench JSON."""
    from pdserve.bench.commands import parse_goodput
    from pdserve.bench.report import format_summary, save_result

    layout = SimLayout(colocated=args.colocated, prefill=args.prefill, decode=args.decode,
                       colocated_units=args.units,
                       prefill_units=args.prefill_units or args.units,
                       decode_units=args.decode_units or args.units,
                       pd_min_prompt_tokens=args.pd_min_prompt_tokens)
    profile = Profile.load(args.profile)
    result = simulate(layout, profile, load_requests(args), sim_options(args),
                      parse_goodput(args.goodput), run_meta(args))
    print(format_summary(result))
    if args.result_filename:
        print("saved", save_result(result, args.result_filename))
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    """`pdserve plan`: search layouts, print the ranked table and the winner's command."""
    from pdserve.planner.recommend import recommend_from_args

    return recommend_from_args(args)


def cmd_validate(args: argparse.Namespace) -> int:
    """`pdserve plan validate`: measure the recommended and the best colocated layout."""
    from pdserve.planner.validate import validate_from_args

    return validate_from_args(args)
