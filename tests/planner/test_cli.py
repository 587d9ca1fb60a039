"""`pdserve plan` and `pdserve plan simulate` end to end, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdserve.engine.step_time import StepShape, StepTimeModel
from pdserve.planner.profile import Profile
from tests.planner.conftest import synthetic_profile

REPO = Path(__file__).resolve().parents[2]
WORKLOAD = ["--random-input-len", "128", "--random-output-len", "16", "--num-prompts", "40",
            "--random-range-ratio", "0.5", "--request-rate", "2", "--goodput", "ttft:500",
            "itl:100"]


def pdserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, check=True)


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory) -> str:
    profile = synthetic_profile()
    profile.step_time[2] = profile.step_time[1]  # a 2-thread instance is no faster here
    return profile.save(str(tmp_path_factory.mktemp("plan") / "profile.json"))


def test_plan_ranks_layouts_and_prints_the_winners_command(profile_path, tmp_path):
    start = time.monotonic()
    out = pdserve("plan", "--profile", profile_path, "--cores", "2", *WORKLOAD,
                  "--json", str(tmp_path / "ranked.json"), "--plot", str(tmp_path / "pd.png"))
    assert time.monotonic() - start < 60
    assert "| rank | layout |" in out.stdout
    winner = out.stdout.split("recommended: ")[1].splitlines()
    assert winner[1].strip().startswith("pdserve up ")
    ranked = json.loads((tmp_path / "ranked.json").read_text())
    labels = [r["label"] for r in ranked]
    assert {"2xC/1", "1xC/2", "1P/1+1D/1"} <= set(labels)  # every layout of 2 threads
    assert labels[0] == winner[0]
    scores = [r["goodput_per_device"] for r in ranked]
    assert scores == sorted(scores, reverse=True)
    assert (tmp_path / "pd.png").stat().st_size > 10_000


def test_simulate_writes_bench_json_for_bench_compare(profile_path, tmp_path):
    paths = []
    for name, layout in (("colo", ["--colocated", "2"]), ("pd", ["--prefill", "1",
                                                                   "--decode", "1"])):
        path = str(tmp_path / f"{name}.json")
        pdserve("plan", "simulate", "--profile", profile_path, *layout, *WORKLOAD,
                "--result-filename", path)
        paths.append(path)
    result = json.loads(Path(paths[1]).read_text())
    assert result["predicted"] is True and result["completed"] == 40
    table = pdserve("bench", "compare", *paths).stdout
    assert "2xC/1 vs 1P/1+1D/1" in table and "mean_itl_ms" in table


def test_refit_reads_a_profiles_own_timings_with_the_current_model(tmp_path):
    """An older profile (no wide-step term) whose timings show a kernel switch at 4 rows:
    `plan refit` finds it from the timings the file keeps; no device is touched."""
    switch = StepTimeModel(0.05, 0.002, 1e-7, 0.005, 1e-6, 0.02, 0.01, 0.06, 4)
    shapes = [StepShape(0, 0, d, d * c) for d in (1, 2, 3, 4, 5, 6, 8, 12) for c in (64, 400)]
    shapes += [StepShape(p, p * (p + 1) // 2, d, d * 200) for p in (16, 128, 512)
               for d in (0, 3)]
    old = synthetic_profile()
    old.samples = {1: [[s.prefill_tokens, s.prefill_attention, s.decode_rows,
                        s.decode_context, switch.seconds(s), 1.0] for s in shapes]}
    path = old.save(str(tmp_path / "old.json"))
    out = pdserve("plan", "refit", path, "-o", str(tmp_path / "new.json"))
    assert "wide_rows=4" in out.stdout and "saved" in out.stdout
    new = Profile.load(str(tmp_path / "new.json"))
    assert new.step_time[1].wide_rows == 4
    assert new.step_time[1].per_wide_step_s == pytest.approx(0.06, rel=1e-6)
    assert new.fit_error[1] < 1e-6 and new.samples == old.samples
