"""Layouts from flags and YAML, and their plans: GPUs, ports, and each instance's command."""

from __future__ import annotations

import argparse

import pytest

from pdserve.launch.cli import add_parser, instance_proc, layout_from_args, router_proc
from pdserve.launch.layout import Layout, plan


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["up", *argv])


def test_no_counts_means_one_prefill_and_one_decode():
    layout = layout_from_args(parse())
    assert (layout.prefill, layout.decode, layout.colocated) == (1, 1, 0)
    assert layout.model is None and layout.port == 8000


def test_colocated_only_layout_has_no_prefill_or_decode():
    layout = layout_from_args(parse("--colocated", "2"))
    assert (layout.prefill, layout.decode, layout.colocated) == (0, 0, 2)


def test_prefill_without_decode_is_refused():
    with pytest.raises(ValueError, match="both prefill and decode"):
        Layout(prefill=2)


def test_gpus_are_assigned_in_consecutive_ranges_of_each_tp():
    layout = layout_from_args(parse("--prefill", "2", "--decode", "1", "--prefill-tp", "1",
                                    "--decode-tp", "2", "--port", "9000"))
    plans = plan(layout, num_gpus=4)
    assert [(p.name, p.devices, p.port) for p in plans] == [
        ("prefill-0", [0], 9001), ("prefill-1", [1], 9002), ("decode-0", [2, 3], 9003)]
    assert plans[2].devices_label() == "cuda:2,3"


def test_a_tensor_parallel_layout_larger_than_the_machine_is_refused():
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        plan(Layout(prefill=2, decode=1, decode_tp=2), num_gpus=2)


def test_single_gpu_instances_share_too_few_gpus_one_wave_after_another(tmp_path):
    layout = Layout()  # 1P1D
    plans = plan(layout, num_gpus=1)
    assert [(p.devices, p.gpu_memory_utilization, p.wave) for p in plans] == [
        ([0], 0.45, 0), ([0], 0.9, 1)]
    proc = instance_proc(plans[1], layout, tmp_path)
    assert proc.cmd[proc.cmd.index("--gpu-memory-utilization") + 1] == "0.9"
    assert plans[0].devices_label() == "cuda:0 (shared, up to 45%)"


def test_without_gpus_every_instance_runs_on_cpu():
    plans = plan(Layout(prefill=2, decode=2, decode_tp=2), num_gpus=0)
    assert [p.devices_label() for p in plans] == ["cpu"] * 4


def test_yaml_layout_with_flags_overriding(tmp_path):
    path = tmp_path / "layout.yaml"
    path.write_text("prefill: {count: 2, tp: 1}\ndecode: {count: 1, tp: 2}\n"
                    "kv-cache-memory: 1GiB\nport: 9100\ninstance_args: [--max-num-seqs, 8]\n")
    layout = layout_from_args(parse("--config", str(path), "--decode", "3"))
    assert (layout.prefill, layout.decode, layout.decode_tp) == (2, 3, 2)
    assert layout.kv_cache_memory == "1GiB" and layout.port == 9100
    assert layout.instance_args == ["--max-num-seqs", "8"]


def test_yaml_with_an_unknown_key_is_refused(tmp_path):
    path = tmp_path / "layout.yaml"
    path.write_text("prefil: 2\n")
    with pytest.raises(ValueError, match="unknown keys"):
        Layout.from_yaml(path)


def test_instance_and_router_commands(tmp_path):
    layout = layout_from_args(parse("--kv-cache-memory", "256MiB", "--", "--max-num-seqs", "8"))
    plans = plan(layout, num_gpus=0)
    prefill = instance_proc(plans[0], layout, tmp_path)
    assert prefill.cmd[prefill.cmd.index("serve"):] == [
        "serve", "--role", "prefill", "--host", "127.0.0.1", "--port", "8001",
        "--device", "cpu", "--kv-cache-memory", "256MiB", "--max-num-seqs", "8"]
    router = router_proc(plans, layout, tmp_path)
    assert router.cmd[-4:] == ["--prefill", "http://127.0.0.1:8001",
                               "--decode", "http://127.0.0.1:8002"]
    assert "--pd-min-prompt-tokens" not in router.cmd  # the router's default: always P/D


def test_conditional_disaggregation_threshold_reaches_the_router(tmp_path):
    layout = layout_from_args(parse("--pd-min-prompt-tokens", "4096"))
    router = router_proc(plan(layout, num_gpus=0), layout, tmp_path)
    i = router.cmd.index("--pd-min-prompt-tokens")
    assert router.cmd[i + 1] == "4096"


def test_routing_policy_reaches_the_router_with_the_instances_tokenizer(tmp_path):
    layout = layout_from_args(parse("--routing-policy", "cache_aware", "--colocated", "2"))
    router = router_proc(plan(layout, num_gpus=0), layout, tmp_path)
    i = router.cmd.index("--routing-policy")
    assert router.cmd[i:i + 4] == ["--routing-policy", "cache_aware", "--tokenizer", "embedded"]
    with pytest.raises(ValueError, match="routing_policy"):
        Layout(routing_policy="fastest")


def test_the_stall_bound_reaches_the_router_as_its_flag_parses_it(tmp_path):
    from pdserve.cli import build_parser

    layout = layout_from_args(parse("--routing-policy", "conditional",
                                    "--pd-max-stall-ms", "750"))
    router = router_proc(plan(layout, num_gpus=0), layout, tmp_path)
    i = router.cmd.index("router")
    assert build_parser("router").parse_args(router.cmd[i:]).pd_max_stall_ms == 750.0
    assert "--pd-max-stall-ms" not in router_proc(plan(Layout(), num_gpus=0), Layout(),
                                                  tmp_path).cmd
    for bad in (0.0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="pd_max_stall_ms"):
            Layout(pd_max_stall_ms=bad)


def test_gpu_instances_see_only_their_devices(tmp_path):
    layout = Layout(colocated=2, colocated_tp=2)
    proc = instance_proc(plan(layout, num_gpus=4)[1], layout, tmp_path)
    assert proc.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "--tensor-parallel-size" in proc.cmd and "--device" not in proc.cmd


def test_the_instances_body_size_flags_reach_the_router(tmp_path):
    layout = layout_from_args(parse("--", "--max-image-bytes", "20MiB", "--max-num-seqs", "8",
                                    "--limit-mm-per-prompt={\"image\": 8}"))
    router = router_proc(plan(layout, num_gpus=0), layout, tmp_path)
    assert "--max-num-seqs" not in router.cmd
    i = router.cmd.index("--max-image-bytes")
    assert router.cmd[i:i + 3] == ["--max-image-bytes", "20MiB",
                                   "--limit-mm-per-prompt={\"image\": 8}"]
