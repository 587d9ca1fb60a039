"""`pdserve plan [profile | simulate | validate]`: the planner's command line.

`pdserve plan` alone recommends a layout (recommend.py); `profile` times this device
(measure.py); `simulate` predicts one layout (simulate.py); `validate` launches layouts and
measures them against their predictions (validate.py). Workload flags are the bench's.
"""

from __future__ import annotations

import argparse

from pdserve.bench.arrivals import ARRIVAL_KINDS

EPILOG = """examples:
  pdserve plan profile --threads 1,2 -o profile.json
  pdserve plan simulate --profile profile.json --prefill 1 --decode 1 \\
      --random-input-len 512 --random-output-len 64 --num-prompts 100 --request-rate 1
  pdserve plan --profile profile.json --cores 2 --goodput ttft:2000 itl:200 \\
      --random-input-len 512 --random-output-len 64 --request-rate 1
  pdserve plan validate --profile profile.json --cores 2 --goodput ttft:2000 itl:200 ...
See docs/PLANNER.md."""


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _add_workload(p: argparse.ArgumentParser) -> None:
    from pdserve.bench.cli import _add_workload as bench_workload

    bench_workload(p)  # the bench's own flags: the same workload is predicted and measured
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=1.0, help="req/s (inf: all at once)")
    g.add_argument("--arrival", choices=ARRIVAL_KINDS, default="poisson")
    g.add_argument("--burstiness", type=float, default=1.0)
    g.add_argument("--tokenizer", default=None, help="HF tokenizer folder (default: embedded)")
    g.add_argument("--goodput", nargs="*", default=[], metavar="METRIC:MS",
                   help="SLOs, e.g. ttft:2000 itl:200 (as `pdserve bench --goodput`)")


def _add_sim(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="profile.json",
                   help="a profile JSON (`pdserve plan profile`; default ./profile.json)")
    p.add_argument("--transport", default=None, help="KV transport to assume (default fastest)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-step-ms", type=float, default=None, help="instances' ITL target")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `pdserve plan` and its sub-commands."""
    from pdserve.planner import commands

    fmt = argparse.RawDescriptionHelpFormatter
    plan = subparsers.add_parser(
        "plan", help="predict layouts for a workload, recommend one, validate it",
        description="Recommend a layout for a device budget, workload and SLOs, from a "
        "simulation of pdserve's own scheduler on a profiled step-time model.",
        epilog=EPILOG, formatter_class=fmt)
    _add_sim(plan)
    _add_recommend(plan)
    _add_workload(plan)
    plan.set_defaults(func=commands.cmd_recommend)
    sub = plan.add_subparsers(dest="plan_command", metavar="SUBCOMMAND", required=False)

    prof = sub.add_parser("profile", help="time the engine on this device; write a profile")
    prof.add_argument("-o", "--output", default="profile.json")
    prof.add_argument("--model", default=None, help="as `pdserve serve --model` (default: "
                      "the embedded SmolLM2)")
    prof.add_argument("--device", default="auto")
    prof.add_argument("--dtype", default="auto")
    prof.add_argument("--threads", type=_ints, default=(1, 2),
                      help="CPU thread counts to profile, e.g. 1,2")
    prof.add_argument("--tensor-parallel-size", type=int, default=1)
    prof.add_argument("--num-shapes", type=int, default=150, help="timed steps per count")
    prof.add_argument("--max-prefill-tokens", type=int, default=512)
    prof.add_argument("--max-decode-rows", type=int, default=32)
    prof.add_argument("--max-context", type=int, default=2048)
    prof.add_argument("--time-limit", type=float, default=240.0, help="seconds per count")
    prof.add_argument("--served", action=argparse.BooleanOptionalAction, default=True,
                      help="also start a real `pdserve serve` per count and measure what "
                      "serving adds to each step and request (about 30 s per count)")
    prof.add_argument("--corun", action=argparse.BooleanOptionalAction, default=True,
                      help="CPU: also time a few steps beside a neighbour process of the same "
                      "model on the next cores, and record how much it slows them (instances "
                      "of a layout share the host; about 30 s per count that fits twice)")
    prof.add_argument("--tokenizer", default=None,
                      help="the served probes' tokenizer folder, as `pdserve serve "
                      "--tokenizer` (a preset on a machine without the embedded model)")
    prof.set_defaults(func=commands.cmd_profile)

    refit = sub.add_parser("refit", help="fit a profile's step-time models and serving terms "
                           "again from the timings and probes it keeps (no device needed: "
                           "after an upgrade of pdserve's step-time model)")
    refit.add_argument("profile", help="the profile JSON to read")
    refit.add_argument("-o", "--output", required=True, help="where to write the refitted one")
    refit.set_defaults(func=commands.cmd_refit)

    sim = sub.add_parser("simulate", help="predict one layout (bench JSON)", epilog=EPILOG,
                         formatter_class=fmt)
    _add_sim(sim)
    _add_workload(sim)
    sim.add_argument("--colocated", type=int, default=0)
    sim.add_argument("--prefill", type=int, default=0)
    sim.add_argument("--decode", type=int, default=0)
    sim.add_argument("--units", type=int, default=1,
                     help="threads (CPU) or TP GPUs per instance")
    sim.add_argument("--prefill-units", type=int, default=None)
    sim.add_argument("--decode-units", type=int, default=None)
    sim.add_argument("--pd-min-prompt-tokens", type=int, default=0)
    sim.add_argument("--result-filename", default=None, help="write the JSON here")
    sim.set_defaults(func=commands.cmd_simulate)

    val = sub.add_parser("validate", help="launch the recommended and best colocated "
                         "layouts, bench them, print predicted vs measured", epilog=EPILOG,
                         formatter_class=fmt)
    _add_sim(val)
    _add_recommend(val)
    _add_workload(val)
    val.add_argument("--port", type=int, default=8400)
    val.add_argument("--result-dir", default="plan-validate")
    val.add_argument("--cpu-list", default=None,
                     help="pin the deployment to these cores (taskset -c), e.g. 0,1")
    val.add_argument("--bench-cpu-list", default=None,
                     help="pin the load generator to these cores, e.g. 2")
    val.add_argument("--pin-instances", action="store_true",
                     help="CPU: give each instance its own cores, as many as its threads, in "
                     "role order from the first usable core (`pdserve up --cpu-affinity`)")
    val.add_argument("--reuse-measured", action="store_true",
                     help="where --result-dir already holds a layout's measured JSON, compare "
                     "with it instead of running it again (e.g. after a new profile)")
    val.add_argument("--speed-check", action="store_true",
                     help="before each layout, run the profile's lone-stream serving probes "
                     "again: the machine's speed against the profile, and a second "
                     "prediction from the profile scaled to it (a diagnostic of drift; one "
                     "probe is noisy: see docs/PLANNER.md)")
    val.add_argument("--layouts", choices=("pair", "all"), default="pair",
                     help="pair: the recommended layout and the best of the other kind; all: "
                     "every candidate of the budget, in predicted order")
    val.set_defaults(func=commands.cmd_validate)


def _add_recommend(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search")
    g.add_argument("--cores", type=int, default=None, help="CPU budget (threads in all)")
    g.add_argument("--gpus", type=int, default=None, help="GPU budget")
    g.add_argument("--thresholds", type=_ints, default=None,
                   help="conditional-disaggregation thresholds to try (prompt tokens); "
                   "default: 0 and the workload's prompt-length quartiles when they differ")
    g.add_argument("--plot", default=None, help="PNG of where P/D pays (rate x prompt length)")
    g.add_argument("--json", default=None, help="write the ranked predictions here")
    g.add_argument("--top", type=int, default=10, help="rows of the table")

