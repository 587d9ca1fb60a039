"""`pdserve up --ray`'s flags: what each server reserves, and bad values refused by name
(no Ray needed)."""

from __future__ import annotations

import argparse

import pytest

from pdserve.launch.cli import add_parser
from pdserve.launch.ray_spec import RaySpec, parse_resources
from pdserve.launch.ray_up import spec_from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["up", *argv])


def test_ray_takes_an_optional_address():
    assert parse().ray is None  # on this machine
    assert spec_from_args(parse("--ray")).address is None  # ray.init()'s own choice
    assert spec_from_args(parse("--ray", "10.0.0.1:6379")).address == "10.0.0.1:6379"
    args = parse("--ray", "--prefill", "2", "--", "--max-num-seqs", "8")
    assert (args.ray, args.prefill, args.instance_args) == ("", 2, ["--", "--max-num-seqs", "8"])


def test_bundles_reserve_cpus_or_tp_gpus_plus_the_roles_resources():
    spec = spec_from_args(parse("--ray", "--ray-num-cpus", "4",
                                "--ray-resources", "prefill=node_p:1,fast_disk:0.5",
                                "--ray-resources", "router=head:1"))
    assert spec.bundle("prefill", 0) == {"CPU": 4.0, "node_p": 1.0, "fast_disk": 0.5}
    assert spec.bundle("decode", 2) == {"CPU": 1.0, "GPU": 2.0}
    assert spec.bundle("router", 0) == {"CPU": 4.0, "head": 1.0}


@pytest.mark.parametrize(("spec", "names"), [
    ("prefil=node_p:1", "ROLE one of prefill"),
    ("prefill", "ROLE=NAME:AMOUNT"),
    ("prefill=node_p", "'node_p' is not NAME:AMOUNT"),
    ("prefill=GPU:1", "'GPU:1' is not NAME:AMOUNT"),
    ("decode=node_d:-1", "amount '-1'"),
    ("decode=node_d:nan", "amount 'nan'"),
    ("decode=bad name:1", "'bad name:1'"),
])
def test_a_bad_resource_is_refused_naming_the_flag_and_the_part(spec, names):
    with pytest.raises(ValueError, match="--ray-resources") as err:
        parse_resources([spec])
    assert names in str(err.value)


@pytest.mark.parametrize("cpus", [0.0, -1.0, float("inf"), 4096.0])
def test_cpus_out_of_bounds_are_refused(cpus):
    with pytest.raises(ValueError, match="--ray-num-cpus"):
        RaySpec(num_cpus=cpus)
