"""`pdserve plan`: simulate every candidate layout for a budget, workload and SLOs, rank
them by goodput per device, print the table and the winner's `pdserve up` command, and
(optionally) draw where P/D pays over request rate x prompt length.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdserve.bench.request import RequestSpec
from pdserve.planner.layouts import SimLayout, candidate_layouts
from pdserve.planner.profile import Profile
from pdserve.planner.simulate import SimOptions, SimRequest, simulate
from pdserve.planner.workload import at_rate, sim_requests


@dataclass
class Ranked:
    """One layout's prediction and its score."""

    layout: SimLayout
    result: dict[str, Any]

    @property
    def goodput_per_device(self) -> float:
        """SLO goodput (req/s) per device unit; plain throughput when no SLO was given."""
        r = self.result
        good = r.get("request_goodput")
        return (good if good is not None else r["request_throughput"]) / self.layout.units()

    def key(self) -> tuple[float, float]:
        return (-self.goodput_per_device, self.result.get("mean_e2el_ms") or float("inf"))


def default_thresholds(requests: list[SimRequest]) -> tuple[int, ...]:
    """0 (always disaggregate), and the prompt-length quartiles when prompts differ."""
    lengths = sorted({len(r.prompt_ids) for r in requests})
    if len(lengths) < 4:
        return (0,)
    qs = np.percentile([len(r.prompt_ids) for r in requests], [25, 50, 75])
    return (0, *sorted({int(q) for q in qs}))


def rank_layouts(layouts: list[SimLayout], profile: Profile, requests: list[SimRequest],
                 options: SimOptions, slos_ms: dict[str, float],
                 meta: dict[str, Any] | None = None) -> list[Ranked]:
    """Every layout simulated on the same requests, best first."""
    ranked = [Ranked(lay, simulate(lay, profile, requests, options, slos_ms, meta))
              for lay in layouts]
    return sorted(ranked, key=Ranked.key)


def best_colocated(ranked: list[Ranked]) -> Ranked | None:
    return next((r for r in ranked if not r.layout.disaggregated), None)


def format_table(ranked: list[Ranked], top: int) -> str:
    """The ranked layouts as a Markdown table (ms, req/s)."""
    head = ("rank", "layout", "devices", "goodput/dev", "good %", "TTFT mean", "TTFT p99",
            "ITL mean", "ITL p99", "E2E mean", "req/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(ranked[:top], 1):
        res, frac = r.result, r.result.get("goodput_fraction")
        cells = [str(i), r.layout.label(), str(r.layout.units()), f"{r.goodput_per_device:.3f}",
                 "n/a" if frac is None else f"{100 * frac:.0f}",
                 *(_ms(res.get(k)) for k in ("mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms",
                                             "p99_itl_ms", "mean_e2el_ms")),
                 f"{res['request_throughput']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(v: Any) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def pd_gain_map(profile: Profile, budget: int, options: SimOptions, slos_ms: dict[str, float],
                rates: list[float], prompt_lens: list[int], output_len: int,
                num_requests: int = 60, seed: int = 0) -> np.ndarray:
    """gain[i, j] = goodput per device of the best P/D layout / that of the best colocated
    one - 1, at rates[j] and prompt_lens[i] (fixed lengths, Poisson arrivals); NaN where
    no layout meets the SLOs."""
    layouts = candidate_layouts(budget, profile.parallelism)
    gain = np.zeros((len(prompt_lens), len(rates)))
    for i, n in enumerate(prompt_lens):
        base = sim_requests([RequestSpec("", n, output_len)] * num_requests,
                            [0.0] * num_requests, None)
        for j, rate in enumerate(rates):
            ranked = rank_layouts(layouts, profile, at_rate(base, rate, seed), options, slos_ms)
            colo = max((r.goodput_per_device for r in ranked if not r.layout.disaggregated),
                       default=0.0)
            pd = max((r.goodput_per_device for r in ranked if r.layout.disaggregated),
                     default=0.0)
            if colo > 0:
                gain[i, j] = (pd - colo) / colo
            else:  # nothing colocated meets the SLOs: P/D is all gain, or neither serves
                gain[i, j] = 1.0 if pd > 0 else np.nan
    return gain


def plot_gain(gain: np.ndarray, rates: list[float], prompt_lens: list[int], path: str,
              title: str) -> str:
    """A heat map of the predicted P/D gain (green: P/D wins, red: colocated wins, grey:
    no layout meets the SLOs); colours saturate at +-100%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    cmap = matplotlib.colormaps["RdYlGn"].copy()
    cmap.set_bad("lightgrey")
    im = ax.imshow(np.ma.masked_invalid(np.clip(gain, -1, 1)), origin="lower", cmap=cmap,
                   vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_yticks(range(len(prompt_lens)), [str(n) for n in prompt_lens])
    for i in range(len(prompt_lens)):
        for j in range(len(rates)):
            text = "no layout" if np.isnan(gain[i, j]) else f"{100 * gain[i, j]:+.0f}%"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("prompt length (tokens)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="P/D goodput per device vs colocated")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def budget_of(args: argparse.Namespace, profile: Profile) -> int:
    """--gpus or --cores, else the largest profiled parallelism (CPU) or one GPU."""
    for flag in ("gpus", "cores"):
        value = getattr(args, flag)
        if value is not None and not 1 <= value <= 1024:
            raise SystemExit(f"--{flag} must be between 1 and 1024 (got {value})")
        if value:
            return value
    return max(profile.step_time) if profile.parallelism == "cpu_threads" else 1


def recommend_from_args(args: argparse.Namespace) -> int:
    """Search, print the table and the winner's command; the plot and JSON if asked."""
    from pdserve.bench.commands import parse_goodput
    from pdserve.planner.commands import load_requests, run_meta, sim_options

    start = time.perf_counter()
    profile = Profile.load(args.profile)
    budget, slos = budget_of(args, profile), parse_goodput(args.goodput)
    options, requests = sim_options(args), load_requests(args)
    thresholds = args.thresholds or default_thresholds(requests)
    layouts = candidate_layouts(budget, profile.parallelism, thresholds)
    ranked = rank_layouts(layouts, profile, requests, options, slos, run_meta(args))
    unit = "threads" if profile.parallelism == "cpu_threads" else "GPUs"
    print(f"{len(layouts)} layouts on {budget} {unit} ({profile.device}, {profile.model}), "
          f"{len(requests)} requests at {args.request_rate} req/s, SLOs {slos or 'none'}: "
          "predicted")
    print(format_table(ranked, args.top))
    win = ranked[0]
    print(f"\nrecommended: {win.layout.label()}\n  {win.layout.up_command(profile.parallelism)}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump([{"layout": r.layout.to_dict(), "label": r.layout.label(),
                        "goodput_per_device": r.goodput_per_device, "result": r.result}
                       for r in ranked], f, indent=2)
    if args.plot:
        _plot_from_args(args, profile, budget, options, slos, requests)
    print(f"(answered in {time.perf_counter() - start:.1f} s)")
    return 0


def _plot_from_args(args, profile, budget, options, slos, requests) -> None:
    mean_in = int(np.mean([len(r.prompt_ids) for r in requests]))
    mean_out = max(int(np.mean([r.output_len for r in requests])), 2)
    rate = args.request_rate if np.isfinite(args.request_rate) else 1.0
    rates = [round(rate * f, 3) for f in (0.25, 0.5, 1, 2, 4)]
    lens = [max(16, int(mean_in * f)) for f in (0.25, 0.5, 1, 2, 4)]
    gain = pd_gain_map(profile, budget, options, slos, rates, lens, mean_out)
    title = (f"Where P/D pays (predicted): {budget} units, {profile.model} on "
             f"{profile.device}, {mean_out} output tokens, SLOs {slos or 'none'}")
    print("plot", plot_gain(gain, rates, lens, args.plot, title))
