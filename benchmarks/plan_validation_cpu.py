"""Issue #16's validation on this CPU: every layout of a 2-core budget, four workloads,
predicted by `pdserve plan` and measured with `pdserve up` + `pdserve bench run`.

Layouts (all three candidates of `--cores 2`): one colocated instance on 2 threads, two
colocated on 1 thread each, 1P1D on 1 thread each. Each instance is pinned to its own cores
(`pdserve up --cpu-affinity`); the router and the load generator float (a 2-core machine has
no third core for them, and the profile's serving probe measured them the same way).

Workloads: short (128 tokens) and long (512) prompts, 32 output tokens, each at a low and a
high Poisson rate. Per run, the table gives predicted and measured mean/P99 TTFT, mean/P99
ITL, mean E2E latency and the SLO goodput, with errors; then the median absolute error per
metric (the issue's targets: <= 10% on the means, <= 20% on the P99s) and, per workload,
whether the recommended layout is the measured best. With --speed-check, before each layout
`plan validate` checks the machine's speed against the profile (planner/speed.py: a shared
host drifts) and the table adds the prediction from the profile scaled to that speed.

    python benchmarks/plan_validation_cpu.py [--profile P.json] [--num-prompts 64]

Without --profile it first runs `pdserve plan profile --threads 1,2` (a few minutes).
Writes benchmarks/results/planner/validation_cpu/{validation.md,validation.json} and each
run's predicted/measured bench JSON under it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from pdserve.planner.validate import error_pct

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "planner" / "validation_cpu"
WORKLOADS = {  # name -> (prompt tokens, request rate)
    "short-low": (128, 0.6),
    "short-high": (128, 1.6),
    "long-low": (512, 0.3),
    "long-high": (512, 0.8),
}
OUTPUT_LEN = 32
SLOS = ["ttft:3000", "itl:300"]
MEANS = ("mean_ttft_ms", "mean_itl_ms", "mean_e2el_ms")
TAILS = ("p99_ttft_ms", "p99_itl_ms")


def pdserve(*args: str, log: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "pdserve.cli", *args]
    print("$", " ".join(cmd), flush=True)
    out = open(log, "w") if log else None
    try:
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()


def validate(name: str, profile: Path, num_prompts: int, port: int, out: Path,
             reuse: bool, speed_check: bool, rate_scale: float = 1.0) -> dict:
    prompt, rate = WORKLOADS[name]
    rate = round(rate * rate_scale, 3)
    folder = out / name
    pdserve("plan", "validate", "--profile", str(profile), "--cores", "2",
            "--layouts", "all", "--pin-instances", "--port", str(port),
            "--dataset-name", "random", "--random-input-len", str(prompt),
            "--random-output-len", str(OUTPUT_LEN), "--random-range-ratio", "0.25",
            "--num-prompts", str(num_prompts), "--request-rate", str(rate), "--seed", "0",
            "--goodput", *SLOS, "--result-dir", str(folder),
            *(["--reuse-measured"] if reuse else []),
            *(["--speed-check"] if speed_check else []), log=out / f"{name}.log")
    return json.loads((folder / "validation.json").read_text())


def report(results: dict[str, dict], meta: dict) -> str:
    checked = any("predicted_at_speed" in run for v in results.values() for run in v["runs"])
    lines = [f"# `pdserve plan` validated on this CPU ({meta['date']})", "",
             f"Profile: `{meta['profile']}`. {meta['how']}", ""]
    if "rates" in meta:
        lines += ["Request rates (req/s): " + ", ".join(
            f"{name} {rate}" for name, rate in meta["rates"].items()) + ".", ""]
    if checked:
        lines += ["\"At speed\": predicted from the profile scaled by a speed check run just "
                  "before the layout (the profile's lone-stream probes again; "
                  "pdserve/planner/speed.py). The speed column is decode / prefill, now "
                  "against the profile.", ""]
    lines += ["| workload | layout | metric | predicted | measured | error |"
              + (" at speed | error at speed | speed |" if checked else ""),
              "|---|---|---|---|---|---|" + ("---|---|---|" if checked else "")]
    errors: dict[str, list[float]] = {m: [] for m in MEANS + TAILS}
    errors_at_speed: dict[str, list[float]] = {m: [] for m in MEANS + TAILS}
    picks = []
    for name, v in results.items():
        for run in v["runs"]:
            speed = run.get("speed")
            for m in (*MEANS, *TAILS, "request_goodput"):
                p, q = run["predicted"].get(m), run["measured"].get(m)
                e = error_pct(p, q)
                if e is not None and m in errors:
                    errors[m].append(abs(e))
                line = (f"| {name} | {run['layout']} | {m} | {_n(p)} | {_n(q)} | "
                        f"{_e(e)} |")
                if checked:
                    s = run.get("predicted_at_speed", {}).get(m)
                    es = error_pct(s, q)
                    if es is not None and m in errors_at_speed:
                        errors_at_speed[m].append(abs(es))
                    line += (f" {_n(s)} | {_e(es)} | " + (
                        f"{speed['decode']:.2f} / {speed['prefill']:.2f} |" if speed else "|"))
                lines.append(line)
        recommended = v["predicted_order"][0]
        at_speed = _best(v, "predicted_at_speed") if checked else None
        picks.append((name, recommended, at_speed, v["measured_best"], _gap(v, recommended)))
    lines += ["", "| metric | median absolute error | runs | target |"
              + (" at speed |" if checked else ""),
              "|---|---|---|---|" + ("---|" if checked else "")]
    for m, errs in errors.items():
        target = "10%" if m in MEANS else "20%"
        lines.append(f"| {m} | {_median(errs)} | {len(errs)} | {target} |"
                     + (f" {_median(errors_at_speed[m])} |" if checked else ""))
    lines += ["", "| workload | recommended | " + ("recommended at speed | " if checked else "")
              + "measured best (goodput) | recommended's goodput vs the best |",
              "|---|---|---|---|" + ("---|" if checked else "")]
    lines += [f"| {n} | {r} | " + (f"{s} | " if checked else "") + f"{b} | {g} |"
              for n, r, s, b, g in picks]
    return "\n".join(lines) + "\n"


def _best(v: dict, key: str) -> str:
    """The layout whose `key` prediction has the most goodput (ties: the first ranked)."""
    return max(v["runs"], key=lambda run: run.get(key, {}).get("request_goodput") or 0.0
               )["layout"]


def _median(errs: list[float]) -> str:
    return f"{statistics.median(errs):.1f}%" if errs else "n/a"


def _e(e: float | None) -> str:
    return "n/a" if e is None else f"{e:+.1f}%"


def _gap(v: dict, label: str) -> str:
    goodput = {run["layout"]: run["measured"].get("request_goodput") or 0.0
               for run in v["runs"]}
    best = max(goodput.values())
    return f"{goodput[label]:.3f} vs {best:.3f} req/s" if best else "n/a"


def _n(v) -> str:
    return "n/a" if not isinstance(v, int | float) else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=None, help="default: profile this CPU first")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--port", type=int, default=8400)
    ap.add_argument("--result-dir", default=str(OUT))
    ap.add_argument("--reuse-measured", action="store_true",
                    help="predict again with --profile, compare with the runs already there")
    ap.add_argument("--speed-check", action="store_true",
                    help="plan validate --speed-check: the machine's speed before each layout")
    ap.add_argument("--rate-scale", type=float, default=1.0,
                    help="multiply every workload's request rate (the rates suit a 2-core "
                         "Xeon with AVX-512; size them to a slower or faster machine)")
    args = ap.parse_args()
    out = Path(args.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    profile = Path(args.profile) if args.profile else out / "profile.json"
    if not args.profile:
        pdserve("plan", "profile", "--threads", "1,2", "--num-shapes", "120",
                "--max-prefill-tokens", "640", "--max-context", "1024", "--time-limit", "90",
                "-o", str(profile), log=out / "profile.log")
    start = time.monotonic()
    results = {name: validate(name, profile, args.num_prompts, args.port, out,
                              args.reuse_measured, args.speed_check, args.rate_scale)
               for name in args.workloads}
    meta = {"date": datetime.now(UTC).isoformat(timespec="minutes"),
            "profile": os.path.relpath(profile, REPO),
            "rates": {name: round(WORKLOADS[name][1] * args.rate_scale, 3)
                      for name in args.workloads},
            "how": f"{args.num_prompts} random prompts a run (+-25% length), {OUTPUT_LEN} "
                   f"output tokens, SLOs {' '.join(SLOS)}; instances pinned to their own "
                   "cores, router and load generator floating; "
                   f"{(time.monotonic() - start) / 60:.0f} min of runs."}
    (out / "validation.json").write_text(json.dumps({"meta": meta, "workloads": results},
                                                    indent=1))
    text = report(results, meta)
    (out / "validation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
