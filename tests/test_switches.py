"""Run-time switches: read from the environment once, typed, and refused with a clear error."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from pdserve.switches import SwitchError, Switches, read_switches

REPO = Path(__file__).resolve().parents[1]


def test_unset_or_empty_variables_keep_the_defaults():
    assert read_switches({}) == Switches()
    assert read_switches({"PDSERVE_PDL": "", "PDSERVE_CPU_THREADS": " "}) == Switches()


def test_values_are_typed():
    read = read_switches({"PDSERVE_PDL": "0", "PDSERVE_PREFILL_SDPA": "1",
                          "PDSERVE_ATTENTION_BACKEND": "triton", "PDSERVE_CPU_THREADS": "3",
                          "PDSERVE_CACHE_DIR": "/tmp/c", "PDSERVE_TP_SHARE_GPUS": "1"})
    assert read.pdl is False and read.prefill_sdpa is True and read.tp_share_gpus is True
    assert read.attention_backend == "triton" and read.cpu_threads == 3
    assert read.cache_dir == Path("/tmp/c")
    assert read_switches({"PDSERVE_CPU_THREADS": "0"}).cpu_threads is None  # 0 = the default
    assert read_switches({"PDSERVE_HOST_ID": "ray-node-1"}).host_id == "ray-node-1"


@pytest.mark.parametrize(("name", "value", "accepts"), [
    ("PDSERVE_PDL", "true", "0 or 1"),
    ("PDSERVE_GEMV", "2", "0 or 1"),
    ("PDSERVE_ATTENTION_BACKEND", "flash", "torch or triton"),
    ("PDSERVE_CPU_THREADS", "-1", "whole number"),
    ("PDSERVE_HOST_ID", "x" * 129, "128 printable"),
])
def test_a_bad_value_names_the_variable_and_what_it_accepts(name, value, accepts):
    with pytest.raises(SwitchError, match=f"{name}='{value}'.*{accepts}"):
        read_switches({name: value})


def test_a_process_with_a_bad_switch_stops_at_import_with_that_error():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PDSERVE_PDL": "yes"}
    run = subprocess.run([sys.executable, "-c", "import pdserve.switches"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "SwitchError: PDSERVE_PDL='yes' is not valid: it accepts 0 or 1" in run.stderr


def test_every_switch_is_documented_with_its_default():
    design = (REPO / "docs" / "DESIGN.md").read_text()
    for f in fields(Switches):
        assert f.metadata["doc"], f.name
        assert f"| `{f.metadata['env']}` | `{f.name}` |" in design, f.name
