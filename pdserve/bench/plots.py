"""`pdserve bench plot`: PNGs of latency and goodput against rate, and latency CDFs.

One curve per deployment (per sweep file). The x axis is the requested rate; for
concurrency sweeps, whose rate is unbounded, it is the achieved request throughput.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pdserve.bench.metrics import PERCENTILES, percentile_word  # noqa: E402

Series = tuple[str, list[dict[str, Any]]]  # (deployment label, its stages)
_METRICS = (("ttft", "TTFT"), ("itl", "ITL"), ("e2el", "E2E latency"))


def x_value(stage: dict[str, Any]) -> tuple[float, str]:
    """(x, axis label) of a stage: requested rate, else achieved throughput."""
    rate = stage.get("request_rate")
    if isinstance(rate, int | float):
        return float(rate), "request rate (req/s, requested)"
    return float(stage.get("request_throughput") or 0.0), "request throughput (req/s, achieved)"


def _xs(stages: list[dict[str, Any]]) -> tuple[list[float], str]:
    pairs = [x_value(s) for s in stages]
    label = pairs[0][1] if pairs else ""
    return [x for x, _ in pairs], label


def _nan(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else float("nan")


def plot_latency_vs_rate(series: list[Series], path: str) -> str:
    """TTFT, ITL and E2E (p50 solid, p99 dashed) against rate, one colour per deployment."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ci, (label, stages) in enumerate(series):
        xs, xlabel = _xs(stages)
        color = f"C{ci}"
        for ax, (key, title) in zip(axes, _METRICS, strict=True):
            for p, style in (("median", "-"), ("p99", "--")):
                ys = [_nan(s.get(f"{p}_{key}_ms")) for s in stages]
                name = f"{label} {'p50' if p == 'median' else p}"
                ax.plot(xs, ys, style, marker="o", color=color, label=name)
                if p == "median":
                    _annotate_concurrency(ax, stages, xs, ys, color)
            ax.set_title(f"{title} vs load")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{title} (ms)")
            ax.grid(alpha=0.3)
    for ax in axes:
        _log_if_wide(ax)
    axes[0].legend(fontsize=8)
    fig.suptitle("Latency percentiles against load (solid p50, dashed p99)")
    return _save(fig, path)


def _annotate_concurrency(ax: Any, stages: list[dict], xs: list, ys: list, color: str) -> None:
    """Concurrency sweeps: label each point with its concurrency (x is achieved rate)."""
    for stage, x, y in zip(stages, xs, ys, strict=True):
        if stage.get("max_concurrency") and not isinstance(stage.get("request_rate"), int | float):
            ax.annotate(f"c={stage['max_concurrency']}", (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=color)  # fmt: skip


def _log_if_wide(ax: Any) -> None:
    """A log y axis when curves differ by > 30x, so the lower ones stay readable."""
    ys = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()])
    ys = ys[np.isfinite(ys) & (ys > 0)]
    if len(ys) and ys.max() / ys.min() > 30:
        ax.set_yscale("log")
        ax.set_ylabel(ax.get_ylabel() + ", log scale")


def plot_goodput_vs_rate(series: list[Series], path: str) -> str:
    """Goodput (req/s meeting every SLO) and its fraction against rate; throughput dotted."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    any_goodput = False
    for ci, (label, stages) in enumerate(series):
        xs, xlabel = _xs(stages)
        good = [_nan(s.get("request_goodput")) for s in stages]
        frac = [_nan(s.get("goodput_fraction")) * 100 for s in stages]
        thr = [_nan(s.get("request_throughput")) for s in stages]
        any_goodput |= not all(np.isnan(good))
        ax1.plot(xs, good, "-", marker="o", color=f"C{ci}", label=f"{label} goodput")
        ax1.plot(xs, thr, ":", marker=".", color=f"C{ci}", label=f"{label} throughput")
        ax2.plot(xs, frac, "-", marker="o", color=f"C{ci}", label=label)
        ax1.set_xlabel(xlabel)
        ax2.set_xlabel(xlabel)
    slos = next((s.get("goodput_slos_ms") for _, st in series for s in st), None)
    note = f"SLOs (ms): {slos}" if any_goodput else "no SLOs given (--goodput)"
    ax1.set_title("Goodput vs load")
    ax1.set_ylabel("requests/s")
    ax2.set_title("Requests meeting all SLOs")
    ax2.set_ylabel("fraction of requests (%)")
    ax2.set_ylim(-2, 102)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Goodput — {note}")
    return _save(fig, path)


def _cdf_points(stage: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact CDF from per-request detail when saved, else from the percentile fields."""
    detail = {"ttft": "ttfts", "itl": "itls", "e2el": "e2els"}[key]
    raw = stage.get(detail)
    if raw:
        vals = [v for x in raw for v in (x if isinstance(x, list) else [x]) if v is not None]
        if vals:
            xs = np.sort(np.asarray(vals) * 1000.0)
            return xs, np.arange(1, len(xs) + 1) / len(xs) * 100
    pts = [(stage.get(f"p{percentile_word(p)}_{key}_ms"), p) for p in PERCENTILES]
    pts = [(v, p) for v, p in pts if v is not None]
    return np.array([v for v, _ in pts]), np.array([p for _, p in pts])


def plot_latency_cdf(series: list[Series], path: str, stage_index: int = -1) -> str:
    """CDFs of TTFT, ITL and E2E at one stage (default: the last) of each deployment."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ci, (label, stages) in enumerate(series):
        stage = stages[stage_index]
        x, xlabel = x_value(stage)
        for ax, (key, title) in zip(axes, _METRICS, strict=True):
            xs, ys = _cdf_points(stage, key)
            ax.plot(xs, ys, "-", color=f"C{ci}", label=f"{label} @ {x:g} req/s")
            ax.set_title(f"{title} CDF")
            ax.set_xlabel(f"{title} (ms)")
            ax.set_ylabel(
                "requests at or below (%)" if key != "itl" else "token gaps at or below (%)"
            )
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Latency distributions (one stage per deployment)")
    return _save(fig, path)


def _save(fig: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(series: list[Series], out_dir: str, stage_index: int = -1) -> list[str]:
    """All three figures into `out_dir`; returns their paths."""
    return [
        plot_latency_vs_rate(series, os.path.join(out_dir, "latency_vs_rate.png")),
        plot_goodput_vs_rate(series, os.path.join(out_dir, "goodput_vs_rate.png")),
        plot_latency_cdf(series, os.path.join(out_dir, "latency_cdf.png"), stage_index),
    ]
