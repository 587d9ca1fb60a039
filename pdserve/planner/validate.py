"""`pdserve plan validate`: measure what the planner predicted.

The recommended layout and the best of the other kind (colocated if P/D won, else P/D) are
each started with `pdserve up` (optionally pinned with `taskset -c`), benched with
`pdserve bench run` on the same workload, seed and rate the simulation replayed, and
stopped; then each metric is printed predicted vs measured with its error. Every JSON is
kept in --result-dir: the predicted and measured ones compare with `pdserve bench compare`.

A shared host's speed drifts between the profile and the runs (planner/speed.py). With
--speed-check, the profile's lone-stream probes run again just before each layout; the table
then has a second prediction, from the profile scaled to the machine's speed at that
moment, beside the one from the profile as is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pdserve.bench.report import save_result
from pdserve.bench.workloads import WorkloadConfig
from pdserve.cpu_affinity import format_cpu_list, usable_cpus
from pdserve.planner.layouts import SimLayout, candidate_layouts
from pdserve.planner.profile import Profile
from pdserve.planner.recommend import Ranked, budget_of, rank_layouts
from pdserve.planner.simulate import simulate
from pdserve.planner.speed import SpeedCheck, at_speed, check_speed, compared

METRICS = ("completed", "failed", "mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "p99_itl_ms",
           "mean_tpot_ms", "mean_e2el_ms", "p99_e2el_ms", "request_throughput", "request_goodput")
READY = "- ready"


def error_pct(predicted: Any, measured: Any) -> float | None:
    """(predicted - measured) / measured in %; None where either is missing or 0."""
    if not isinstance(predicted, int | float) or not isinstance(measured, int | float) \
            or measured == 0:
        return None
    return (predicted - measured) / abs(measured) * 100.0


@dataclass
class Run:
    """One layout: predicted from the profile, measured, and (after a speed check)
    predicted from the profile at the machine's speed just before the run."""

    label: str
    predicted: dict
    measured: dict
    speed: SpeedCheck | None = None
    predicted_at_speed: dict | None = None


def comparison_table(runs: list[Run]) -> str:
    """Markdown: per layout and metric, predicted, measured and the error; with a speed
    check, the prediction at the machine's speed and its error too."""
    checked = any(r.predicted_at_speed is not None for r in runs)
    head = "| layout | metric | predicted | measured | error |"
    lines = [head + (" at speed | error at speed |" if checked else ""),
             "|---|---|---|---|---|" + ("---|---|" if checked else "")]
    for run in runs:
        for key in METRICS:
            p, m = run.predicted.get(key), run.measured.get(key)
            line = f"| {run.label} | {key} | {_num(p)} | {_num(m)} | {_err(p, m)} |"
            if checked:
                s = (run.predicted_at_speed or {}).get(key)
                line += f" {_num(s)} | {_err(s, m)} |"
            lines.append(line)
    return "\n".join(lines)


def _err(predicted: Any, measured: Any) -> str:
    err = error_pct(predicted, measured)
    return "n/a" if err is None else f"{err:+.1f}%"


def _num(v: Any) -> str:
    return "n/a" if not isinstance(v, int | float) else f"{v:.2f}"


def bench_flags(args: argparse.Namespace, num_prompts: int) -> list[str]:
    """`pdserve bench run` flags for the workload, load and SLOs the simulation used."""
    flags = []
    for f in fields(WorkloadConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "num_prompts":
            flags += [f"--{f.name.replace('_', '-')}", str(value)]
    flags += ["--num-prompts", str(num_prompts), "--request-rate", str(args.request_rate),
              "--arrival", args.arrival, "--burstiness", str(args.burstiness), "--ignore-eos",
              "--disable-tqdm"]
    if args.goodput:
        flags += ["--goodput", *args.goodput]
    if args.tokenizer:
        flags += ["--tokenizer", args.tokenizer]
    return flags


def _pinned(cpu_list: str | None) -> list[str]:
    return ["taskset", "-c", cpu_list] if cpu_list else []


def measure(layout: SimLayout, profile: Profile, args: argparse.Namespace, num_prompts: int,
            out_dir: Path) -> dict[str, Any]:
    """Start `layout` with `pdserve up`, bench it, stop it; the bench's result JSON."""
    name = _file(layout.label())
    up_cmd = layout.up_command(profile.parallelism, model=served_model(profile),
                               port=args.port, tokenizer=args.tokenizer).split()
    up = [*_pinned(args.cpu_list), sys.executable, "-m", "pdserve.cli", *up_cmd[1:]]
    up.insert(up.index("up") + 1, f"--log-dir={out_dir / ('logs-' + name)}")
    if args.pin_instances and profile.parallelism == "cpu_threads":
        up.insert(up.index("up") + 1, f"--cpu-affinity={'|'.join(instance_cpus(layout))}")
    log_path = out_dir / f"up-{name}.log"
    print("$", " ".join(up), flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(up, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "COLUMNS": "200"})
    try:
        _wait_ready(proc, log_path, timeout_s=300)
        result_file = f"measured-{name}.json"
        bench = [*_pinned(args.bench_cpu_list), sys.executable, "-m", "pdserve.bench", "run",
                 "--port", str(args.port), "--label", layout.label(),
                 *bench_flags(args, num_prompts), "--save-result",
                 "--result-dir", str(out_dir), "--result-filename", result_file]
        print("$", " ".join(bench), flush=True)
        subprocess.run(bench, check=True, timeout=3600)
        with open(out_dir / result_file) as f:
            return json.load(f)
    finally:
        _stop(proc)


def served_model(profile: Profile) -> str | None:
    """The --model that serves what was profiled; None for the embedded SmolLM2 (up's
    default, so that its command stays the one users type)."""
    from pdserve.models.gguf_file import EMBEDDED_NAME

    return None if profile.model == EMBEDDED_NAME else profile.model


def instance_cpus(layout: SimLayout, usable: set[int] | None = None) -> list[str]:
    """One CPU list per instance of `layout` (role order, as `pdserve up` starts them): as
    many consecutive usable cores as the instance has threads."""
    cores = sorted(usable if usable is not None else usable_cpus())
    if layout.units() > len(cores):
        raise ValueError(f"{layout.label()} needs {layout.units()} cores to pin its "
                         f"instances; {len(cores)} are usable")
    out, at = [], 0
    for _, _, units in layout.instances():
        out.append(format_cpu_list(set(cores[at:at + units])))
        at += units
    return out


def _wait_ready(proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if READY in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"pdserve up did not become ready; see {log_path}")


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to `pdserve up` (it drains and stops its processes), then make sure."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def pick_pair(ranked: list[Ranked]) -> list[Ranked]:
    """The winner, and the best layout of the other kind (colocated vs P/D)."""
    win = ranked[0]
    other = next((r for r in ranked if r.layout.disaggregated != win.layout.disaggregated),
                 None)
    return [win] + ([other] if other is not None else [])


def validate_from_args(args: argparse.Namespace) -> int:
    """Predict, measure both layouts, print and save the comparison."""
    from pdserve.bench.commands import parse_goodput
    from pdserve.planner.commands import load_requests, run_meta, sim_options

    profile = Profile.load(args.profile)
    slos, requests = parse_goodput(args.goodput), load_requests(args)
    thresholds = args.thresholds or (0,)
    layouts = candidate_layouts(budget_of(args, profile), profile.parallelism, thresholds)
    ranked = rank_layouts(layouts, profile, requests, sim_options(args), slos, run_meta(args))
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for r in (ranked if args.layouts == "all" else pick_pair(ranked)):
        name = _file(r.layout.label())
        save_result(r.result, str(out_dir / f"predicted-{name}.json"))
        run = Run(r.layout.label(), r.result, {})
        kept = out_dir / f"measured-{name}.json"
        reuse = args.reuse_measured and kept.exists()  # a new profile's predictions, same runs
        if args.speed_check:
            run.speed = _speed(profile, args, out_dir / f"speed-{name}.json", reuse)
            print(f"{run.label}: the machine now: {run.speed.describe()}", flush=True)
            run.predicted_at_speed = simulate(r.layout, at_speed(profile, run.speed), requests,
                                              sim_options(args), slos, run_meta(args))
            save_result(run.predicted_at_speed, str(out_dir / f"predicted-at-speed-{name}.json"))
        run.measured = (json.loads(kept.read_text()) if reuse
                        else measure(r.layout, profile, args, len(requests), out_dir))
        runs.append(run)
    table = comparison_table(runs)
    order = " > ".join(run.label for run in runs)
    best = max(runs, key=lambda run: _goodput(run.measured)).label
    summary = (f"predicted order: {order}; measured best (goodput): {best}\n\n{table}\n")
    (out_dir / "validation.json").write_text(json.dumps(
        {"predicted_order": [run.label for run in runs], "measured_best": best,
         "runs": [_record(run) for run in runs]}, indent=1))
    (out_dir / "validation.md").write_text(summary)
    print(summary)
    return 0


def _speed(profile: Profile, args: argparse.Namespace, path: Path, reuse: bool
           ) -> SpeedCheck:
    """The speed check before a run (kept in `path`; reused with the run's measurement, its
    probes read against this profile)."""
    if reuse and path.exists():
        kept = json.loads(path.read_text())
        return compared(profile, kept["units"], kept["probes"])
    speed = check_speed(profile, served_model(profile), tokenizer=args.tokenizer)
    path.write_text(json.dumps(asdict(speed), indent=1))
    return speed


def _record(run: Run) -> dict:
    out = {"layout": run.label, "predicted": _pick(run.predicted),
           "measured": _pick(run.measured)}
    if run.speed is not None:
        out["speed"] = {"decode": run.speed.decode, "prefill": run.speed.prefill}
        out["predicted_at_speed"] = _pick(run.predicted_at_speed or {})
    return out


def _pick(result: dict) -> dict:
    return {key: result.get(key) for key in METRICS}


def _goodput(result: dict) -> float:
    g = result.get("request_goodput")
    v = g if g is not None else result.get("request_throughput")
    return v if isinstance(v, int | float) and not math.isnan(v) else 0.0


def _file(label: str) -> str:
    return label.replace("/", "t").replace("+", "_").replace(" ", "_")
