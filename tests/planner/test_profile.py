"""`pdserve plan profile` on this CPU with a tiny budget gives a file the planner loads, with
what a real server adds measured."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pdserve.cpu_affinity import usable_cpus
from pdserve.engine.step_time import StepShape, StepTimeModel
from pdserve.planner.measure import ProfileSpec, measure_profile, refit_profile
from pdserve.planner.profile import Profile
from pdserve.planner.speed import check_speed


def test_a_tiny_cpu_profile_saves_and_loads(tmp_path):
    spec = ProfileSpec(threads=(1,), num_shapes=9, max_prefill_tokens=32, max_decode_rows=4,
                       max_context=128, kv_cache_memory=16 * 2**20, repeats=2,
                       probe_repeats=1)
    profile = measure_profile(spec)
    loaded = Profile.load(profile.save(str(tmp_path / "profile.json")))
    assert loaded == profile
    assert loaded.device == "cpu" and loaded.parallelism == "cpu_threads"
    assert loaded.model == "SmolLM2-135M-Instruct" and loaded.dtype == "float32"
    model = loaded.step_model(1)
    assert model.base_s > 0 and min(model.to_dict().values()) >= 0
    # every timing is kept: refitting the ones the fit kept gives the same model
    rows = loaded.samples[1]
    assert len(rows) == 9 and all(len(r) == 6 and r[4] > 0 for r in rows)
    kept = [r for r in rows if r[5] == 1.0]
    shapes = [StepShape(*(int(x) for x in r[:4])) for r in kept]
    refit = StepTimeModel.fit(shapes, [r[4] for r in kept]).to_dict()
    assert refit == pytest.approx(model.to_dict(), rel=1e-9, abs=1e-15)
    # `plan refit`: the same timings and probes, fitted again without the device
    again = refit_profile(loaded)
    assert again.step_time[1].to_dict() == pytest.approx(model.to_dict(), rel=1e-9, abs=1e-15)
    assert again.samples == loaded.samples and again.serving[1].probes == loaded.serving[1].probes
    assert again.serving[1].row_s == pytest.approx(loaded.serving[1].row_s, rel=1e-9, abs=1e-15)
    assert loaded.kv_bytes_per_token == 30 * 2 * 3 * 64 * 4  # layers, K+V, heads, dim, fp32
    assert loaded.transfer_seconds(1000) > loaded.transfer_seconds(10) > 0
    assert loaded.step_model(2).base_s == model.base_s  # unprofiled: scaled, base kept
    served = loaded.serving[1]  # a real `pdserve serve` on one thread, probed
    assert served.measured and served.request_s >= 0 and served.probed_rows == 8
    assert [p["streams"] for p in served.probes] == [1, 4, 8, 1, 1]
    assert loaded.router_overhead_measured and 0 <= loaded.router_overhead_s < 1.0
    corun = loaded.corun[1]  # a neighbour process on the second core, where there is one
    if len(usable_cpus()) >= 2:
        assert corun.measured and corun.shapes == 6  # the 3 prefill-only, 3 decode-only
        assert corun.prefill > 0 and corun.decode > 0
        assert loaded.shared_step_model(1) == model.scaled(corun.prefill, corun.decode)
    else:
        assert not corun.measured and loaded.shared_step_model(1) == model
    assert not _neighbours_alive()
    # `plan validate`'s drift check: the same probes again, minutes later on the same cores
    speed = check_speed(loaded, None, repeats=1)
    assert speed.units == 1 and [p["prompt_len"] for p in speed.probes] == [64, 256]
    assert 1 / 3 < speed.decode < 3 and 1 / 3 < speed.prefill < 3


def _neighbours_alive() -> list[str]:
    """Command lines of co-run neighbour processes still running."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "pdserve.planner.corun" in cmd:
            alive.append(cmd)
    return alive
