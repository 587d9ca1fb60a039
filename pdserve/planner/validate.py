"""`pdserve plan validate`: measure what the planner predicted.

The recommended layout and the best of the other kind (colocated if P/D won, else P/D) are
each started with `pdserve up` (optionally pinned with `taskset -c`), benched with
`pdserve bench run` on the same workload, seed and rate the simulation replayed, and
stopped; then each metric is printed predicted vs measured with its error. Every JSON is
kept in --result-dir: the predicted and measured ones compare with `pdserve bench compare`.
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
from dataclasses import fields
from pathlib import Path
from typing import Any

from pdserve.bench.report import save_result
from pdserve.bench.workloads import WorkloadConfig
from pdserve.cpu_affinity import format_cpu_list, usable_cpus
from pdserve.planner.layouts import SimLayout, candidate_layouts
from pdserve.planner.profile import Profile
from pdserve.planner.recommend import Ranked, budget_of, rank_layouts

METRICS = ("completed", "failed", "mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "p99_itl_ms",
           "mean_tpot_ms", "mean_e2el_ms", "p99_e2el_ms", "request_throughput", "request_goodput")
READY = "- ready"


def error_pct(predicted: Any, measured: Any) -> float | None:
    """(predicted - measured) / measured in %; None where either is missing or 0."""
    if not isinstance(predicted, int | float) or not isinstance(measured, int | float) \
            or measured == 0:
        return None
    return (predicted - measured) / abs(measured) * 100.0


def comparison_table(rows: list[tuple[str, dict, dict]]) -> str:
    """Markdown: per layout and metric, predicted, measured and the error."""
    lines = ["| layout | metric | predicted | measured | error |", "|---|---|---|---|---|"]
    for label, pred, meas in rows:
        for key in METRICS:
            p, m = pred.get(key), meas.get(key)
            err = error_pct(p, m)
            lines.append(f"| {label} | {key} | {_num(p)} | {_num(m)} | "
                         f"{'n/a' if err is None else f'{err:+.1f}%'} |")
    return "\n".join(lines)


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
    rows = []
    for r in (ranked if args.layouts == "all" else pick_pair(ranked)):
        name = r.layout.label()
        save_result(r.result, str(out_dir / f"predicted-{_file(name)}.json"))
        kept = out_dir / f"measured-{_file(name)}.json"
        if args.reuse_measured and kept.exists():  # a new profile's predictions, same runs
            measured = json.loads(kept.read_text())
        else:
            measured = measure(r.layout, profile, args, len(requests), out_dir)
        rows.append((name, r.result, measured))
    table = comparison_table(rows)
    order = " > ".join(label for label, _, _ in rows)
    best = max(rows, key=lambda row: _goodput(row[2]))[0]
    summary = (f"predicted order: {order}; measured best (goodput): {best}\n\n{table}\n")
    (out_dir / "validation.json").write_text(json.dumps(
        {"predicted_order": [label for label, _, _ in rows], "measured_best": best,
         "runs": [{"layout": label, "predicted": _pick(pred), "measured": _pick(meas)}
                  for label, pred, meas in rows]}, indent=1))
    (out_dir / "validation.md").write_text(summary)
    print(summary)
    return 0


def _pick(result: dict) -> dict:
    return {key: result.get(key) for key in METRICS}


def _goodput(result: dict) -> float:
    g = result.get("request_goodput")
    v = g if g is not None else result.get("request_throughput")
    return v if isinstance(v, int | float) and not math.isnan(v) else 0.0


def _file(label: str) -> str:
    return label.replace("/", "t").replace("+", "_").replace(" ", "_")
