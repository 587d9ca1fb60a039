"""The layouts a budget allows, and the `pdserve up` command of each."""

from __future__ import annotations

import pytest

from pdserve.engine.step_time import StepTimeModel
from pdserve.planner.layouts import SimLayout, candidate_layouts
from pdserve.planner.simulate import simulate
from tests.planner.conftest import fixed_requests, synthetic_profile


def test_two_cpu_cores_give_the_three_layouts_of_the_issue():
    labels = {lay.label() for lay in candidate_layouts(2, "cpu_threads")}
    assert labels == {"2xC/1", "1xC/2", "1P/1+1D/1"}


def test_eight_gpus_give_every_ratio_and_tp_per_role():
    layouts = candidate_layouts(8, "tensor_parallel", thresholds=(0, 2048))
    labels = {lay.label() for lay in layouts}
    assert {"8xC/1", "4xC/2", "1xC/8", "1P/1+7D/1", "7P/1+1D/1", "1P/4+2D/2",
            "2P/2+4D/1 min2048"} <= labels
    assert all(lay.units() == 8 for lay in layouts)


def test_up_commands_start_the_layout():
    cpu = SimLayout(prefill=1, decode=1, pd_min_prompt_tokens=256)
    assert cpu.up_command("cpu_threads") == ("pdserve up --prefill 1 --decode 1 "
                                             "--pd-min-prompt-tokens 256 --cpu -- "
                                             "--cpu-threads 1")
    gpu = SimLayout(prefill=1, decode=2, prefill_units=4, decode_units=2)
    assert gpu.up_command("tensor_parallel", model="llama-3.1-8b") == (
        "pdserve up --prefill 1 --decode 2 --model llama-3.1-8b --prefill-tp 4 --decode-tp 2")
    # a preset on a machine without the embedded model: every instance gets the tokenizer
    assert gpu.up_command("tensor_parallel", model="llama-3.1-8b", tokenizer="tok") == (
        "pdserve up --prefill 1 --decode 2 --model llama-3.1-8b --prefill-tp 4 --decode-tp 2"
        " -- --tokenizer tok")
    assert cpu.up_command("cpu_threads", tokenizer="tok").endswith(
        "--cpu -- --cpu-threads 1 --tokenizer tok")


def test_a_gpu_profile_simulates_tp_instances_with_their_own_step_model():
    profile = synthetic_profile()
    profile.parallelism = "tensor_parallel"
    fast = StepTimeModel(0.005, 0.0001, 0.0, 0.002, 0.0)
    profile.step_time[2] = fast
    requests = fixed_requests(20, 400, 8, rate=1.0, arrival="constant")
    one = simulate(SimLayout(prefill=1, decode=1), profile, requests)
    tp2 = simulate(SimLayout(prefill=1, decode=1, prefill_units=2), profile, requests)
    assert tp2["mean_ttft_ms"] < one["mean_ttft_ms"] / 2  # P's prompt tokens cost 5x less


def test_a_layout_refuses_impossible_counts():
    for bad in (dict(colocated=-1), dict(colocated=1, colocated_units=0),
                dict(prefill=1), dict(colocated=1, prefill=1, decode=1),
                dict(prefill=1, decode=1, pd_min_prompt_tokens=-5)):
        with pytest.raises(ValueError):
            SimLayout(**bad)


def test_validation_pins_each_instance_to_its_own_cores_in_up_order():
    from pdserve.launch.layout import Layout, plan
    from pdserve.planner.validate import instance_cpus

    pd = SimLayout(prefill=1, decode=2, prefill_units=2, decode_units=2)
    assert instance_cpus(pd, usable={0, 1, 2, 3, 4, 5, 8}) == ["0-1", "2-3", "4-5"]
    up = plan(Layout(prefill=1, decode=2, cpu_affinity=instance_cpus(pd, set(range(6)))), 0)
    assert [(p.role, p.cpus) for p in up] == [("prefill", "0-1"), ("decode", "2-3"),
                                              ("decode", "4-5")]
    with pytest.raises(ValueError, match="needs 6 cores"):
        instance_cpus(pd, usable={0, 1})
