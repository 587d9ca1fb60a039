"""The table of benchmarks/vs_vllm_cpu.sh: medians over passes of each `vllm bench serve`
result, pdserve beside vLLM, with the ratio pdserve / vLLM.

    python benchmarks/vs_vllm_table.py RESULTS_DIR [--notes F] [--vllm-version V] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

WORKLOADS = {
    "a": "256 in / 64 out, one client at a time",
    "b": "256 in / 64 out, 8 concurrent clients",
    "c": "1024 in / 16 out, 4 concurrent clients",
}


@dataclass(frozen=True)
class Figure:
    key: str  # in vllm bench serve's result JSON
    label: str
    higher_is_better: bool = False


FIGURES = [
    Figure("mean_ttft_ms", "TTFT mean (ms)"),
    Figure("p99_ttft_ms", "TTFT P99 (ms)"),
    Figure("mean_tpot_ms", "TPOT mean (ms)"),
    Figure("mean_itl_ms", "ITL mean (ms)"),
    Figure("p99_itl_ms", "ITL P99 (ms)"),
    Figure("output_throughput", "output tok/s", higher_is_better=True),
]


def medians(results: Path, server: str, workload: str) -> dict[str, float] | None:
    """Each figure's median over the passes that produced a result, or None if none did."""
    runs = [json.loads(p.read_text()) for p in sorted(results.glob(f"{server}_{workload}_*.json"))]
    if not runs:
        return None
    out = {f.key: statistics.median(r[f.key] for r in runs) for f in FIGURES}
    out["passes"] = len(runs)
    out["completed"] = min(r.get("completed", 0) for r in runs)
    return out


def rows(results: Path) -> list[dict]:
    table = []
    for w, name in WORKLOADS.items():
        ours, theirs = medians(results, "pdserve", w), medians(results, "vllm", w)
        if ours is None and theirs is None:
            continue
        for f in FIGURES:
            a = ours[f.key] if ours else None
            b = theirs[f.key] if theirs else None
            ratio = a / b if a is not None and b else None
            ahead = None if ratio is None else (ratio > 1 if f.higher_is_better else ratio < 1)
            table.append({"workload": w, "description": name, "figure": f.label,
                          "pdserve": a, "vllm": b, "ratio": ratio, "pdserve_ahead": ahead,
                          "passes": (ours or {}).get("passes"), "vllm_passes":
                          (theirs or {}).get("passes")})
    return table


def markdown(table: list[dict], vllm_version: str) -> str:
    lines = [f"| workload | figure | pdserve | vLLM CPU {vllm_version} | pdserve / vLLM |",
             "|---|---|---|---|---|"]
    last = None
    for r in table:
        w = r["description"] if r["workload"] != last else ""
        last = r["workload"]
        fmt = lambda v: "—" if v is None else f"{v:,.1f}"
        ratio = "—" if r["ratio"] is None else (
            f"{r['ratio']:.2f}" + (" (ahead)" if r["pdserve_ahead"] else " (behind)"))
        lines.append(f"| {w} | {r['figure']} | {fmt(r['pdserve'])} | {fmt(r['vllm'])} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="folder of <server>_<workload>_<pass>.json")
    p.add_argument("--notes", type=Path, help="the run's notes, copied into the JSON")
    p.add_argument("--vllm-version", default="?")
    p.add_argument("--out", type=Path, help="write the rows and notes here as JSON")
    args = p.parse_args(argv)
    table = rows(args.results)
    if not table:
        print(f"no results in {args.results}", file=sys.stderr)
        return 1
    print(markdown(table, args.vllm_version))
    ahead = sum(bool(r["pdserve_ahead"]) for r in table)
    print(f"\npdserve ahead on {ahead} of {len(table)} figures")
    if args.out:
        notes = args.notes.read_text().splitlines() if args.notes and args.notes.exists() else []
        args.out.write_text(json.dumps({"vllm_version": args.vllm_version, "rows": table,
                                        "notes": notes}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
