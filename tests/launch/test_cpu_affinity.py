"""CPU pinning: the list syntax, `pdserve up --cpu-affinity` giving each instance its own, and
a real `pdserve serve --cpu-affinity` whose engine process is pinned with it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import psutil
import pytest

from pdserve.cpu_affinity import format_cpu_list, parse_cpu_list, pin_to
from pdserve.launch.cli import add_parser, instance_proc, layout_from_args
from pdserve.launch.layout import Layout, plan
from tests.router.cluster import start_instance, wait_healthy


def parse_up(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["up", *argv])


def test_cpu_lists_parse_and_format_as_taskset_writes_them():
    assert parse_cpu_list("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpu_list(" 5 ") == {5}
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert parse_cpu_list(format_cpu_list({3, 4, 9})) == {3, 4, 9}


@pytest.mark.parametrize("bad", ["", "a", "1-", "-1", "3-1", "1,,2", "0-99999", "1" * 2000])
def test_a_bad_cpu_list_is_refused_with_a_reason(bad):
    with pytest.raises(ValueError):
        parse_cpu_list(bad)


def test_pinning_to_a_cpu_this_process_may_not_use_is_refused():
    missing = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ValueError, match="may not use"):
        pin_to(str(missing))


def test_up_gives_each_instance_its_own_cpu_list(tmp_path):
    layout = layout_from_args(parse_up("--prefill", "1", "--decode", "1",
                                       "--cpu-affinity", "0|1-2"))
    cmds = [instance_proc(p, layout, tmp_path).cmd for p in plan(layout, num_gpus=0)]
    assert [c[c.index("--cpu-affinity") + 1] for c in cmds] == ["0", "1-2"]


def test_up_refuses_a_cpu_list_count_unlike_the_instances():
    with pytest.raises(ValueError, match="2 CPU lists for 3 instances"):
        layout_from_args(parse_up("--colocated", "3", "--cpu-affinity", "0|1"))
    with pytest.raises(ValueError):
        Layout(colocated=1, cpu_affinity=["x"])


def test_serve_refuses_a_cpu_it_may_not_use_before_loading_anything():
    missing = max(os.sched_getaffinity(0)) + 1
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "serve", "--cpu-affinity",
                          str(missing)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "may not use" in out.stderr


def test_serve_pins_itself_and_its_engine_process(tmp_path):
    cpu = min(os.sched_getaffinity(0))
    server = start_instance(tmp_path, "colocated", "--device", "cpu", "--cpu-threads", "1",
                            "--cpu-affinity", str(cpu))
    try:
        wait_healthy(server)
        procs = [psutil.Process(server.proc.pid)]
        procs += procs[0].children(recursive=True)
        assert len(procs) >= 2  # the server and its engine process
        assert {p.pid: p.cpu_affinity() for p in procs} == {p.pid: [cpu] for p in procs}
    finally:
        server.stop()
