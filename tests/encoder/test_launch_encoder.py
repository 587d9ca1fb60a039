"""`pdserve up --encoder N`: N encoder instances in the plan, started as `serve --role
encoder`, and named to the router with --encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.launch.cli import instance_proc, layout_from_args, router_proc
from pdserve.launch.layout import Layout, plan
from tests.launch.test_layout import parse


def test_encoders_join_the_plan_after_the_engines():
    layout = layout_from_args(parse("--colocated", "1", "--encoder", "2", "--cpu",
                                    "--port", "9000"))
    plans = plan(layout, num_gpus=0)
    assert [(p.name, p.role, p.port) for p in plans] == [
        ("colocated-0", "colocated", 9001), ("encoder-0", "encoder", 9002),
        ("encoder-1", "encoder", 9003)]
    cmd = instance_proc(plans[1], layout, Path("/tmp")).cmd
    assert cmd[cmd.index("--role") + 1] == "encoder"
    router = router_proc(plans, layout, Path("/tmp")).cmd
    assert [router[i + 1] for i, a in enumerate(router) if a == "--encoder"] == [
        "http://127.0.0.1:9002", "http://127.0.0.1:9003"]


def test_encoders_share_gpus_with_the_others():
    layout = Layout(prefill=1, decode=1, encoder=2)
    assert [(p.name, p.devices) for p in plan(layout, num_gpus=2)] == [
        ("prefill-0", [0]), ("decode-0", [1]), ("encoder-0", [0]), ("encoder-1", [1])]


def test_an_encoder_runs_on_one_device(tmp_path):
    with pytest.raises(ValueError, match="tp 1"):
        Layout(colocated=1, encoder=1, encoder_tp=2)
    (tmp_path / "l.yaml").write_text("colocated: 1\nencoder: {count: 3}\n")
    assert Layout.from_yaml(tmp_path / "l.yaml").encoder == 3
