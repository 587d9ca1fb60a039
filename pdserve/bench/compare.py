"""`pdserve bench compare`: a side-by-side Markdown table of runs, with Δ% against the first."""

from __future__ import annotations

import json
import os
from typing import Any

# (field, lower is better?) — the rows of the table, in reading order.
COMPARE_FIELDS: tuple[tuple[str, bool], ...] = (
    ("completed", False),
    ("failed", True),
    ("request_throughput", False),
    ("request_goodput", False),
    ("goodput_fraction", False),
    ("output_throughput", False),
    ("total_token_throughput", False),
    ("mean_ttft_ms", True),
    ("median_ttft_ms", True),
    ("p99_ttft_ms", True),
    ("mean_tpot_ms", True),
    ("median_tpot_ms", True),
    ("p99_tpot_ms", True),
    ("mean_itl_ms", True),
    ("median_itl_ms", True),
    ("p99_itl_ms", True),
    ("mean_e2el_ms", True),
    ("median_e2el_ms", True),
    ("p99_e2el_ms", True),
)


def load_results(path: str) -> tuple[str, list[dict[str, Any]]]:
    """(label, stages): a run JSON is one stage; a sweep JSON holds several."""
    with open(path) as f:
        data = json.load(f)
    stages = data["stages"] if "stages" in data else [data]
    label = data.get("label") or os.path.splitext(os.path.basename(path))[0]
    return label, stages


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def delta_pct(base: Any, other: Any) -> float | None:
    """(other − base) / base in %, or None when either is missing or base is 0."""
    if not isinstance(base, int | float) or not isinstance(other, int | float) or base == 0:
        return None
    return (other - base) / abs(base) * 100.0


def compare_table(labels: list[str], runs: list[dict[str, Any]]) -> str:
    """One Markdown table: a row per metric, a column per run, then Δ% of each vs the first."""
    head = ["metric", *labels] + [f"Δ% {lab} vs {labels[0]}" for lab in labels[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, lower_better in COMPARE_FIELDS:
        values = [r.get(key) for r in runs]
        if all(v is None for v in values):
            continue
        deltas = []
        for v in values[1:]:
            d = delta_pct(values[0], v)
            if d is None:
                deltas.append("n/a")
            else:
                better = (d < 0) == lower_better and d != 0
                deltas.append(f"{d:+.1f}%" + (" ✓" if better else ""))
        arrow = "↓" if lower_better else "↑"
        lines.append("| " + " | ".join([f"{key} {arrow}", *map(_cell, values), *deltas]) + " |")
    return "\n".join(lines)


def _stage_title(stage: dict[str, Any]) -> str:
    if stage.get("max_concurrency") and stage.get("request_rate") in ("inf", None):
        return f"concurrency {stage['max_concurrency']}"
    return f"request rate {stage.get('request_rate')} req/s"


def compare_files(paths: list[str]) -> str:
    """Markdown comparing the given run or sweep JSONs (sweeps stage by stage)."""
    loaded = [load_results(p) for p in paths]
    labels = [lab for lab, _ in loaded]
    n_stages = min(len(stages) for _, stages in loaded)
    parts = ["## " + " vs ".join(labels), "", "↓ lower is better, ↑ higher; ✓ marks a gain."]
    for i in range(n_stages):
        runs = [stages[i] for _, stages in loaded]
        if n_stages > 1:
            parts += ["", f"### Stage {i + 1}: {_stage_title(runs[0])}"]
        parts += ["", compare_table(labels, runs)]
    return "\n".join(parts) + "\n"
