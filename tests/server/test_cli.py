"""`pdserve serve` flags: parsing, help, and their mapping onto EngineArgs."""

from __future__ import annotations

import argparse
import socket

import pytest

from pdserve.server.cli import add_parser, advertise_url, engine_args, parse_bytes


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


@pytest.mark.parametrize("text, value", [("2GiB", 2 * 2**30), ("512MB", 512 * 10**6),
                                         ("1e9", 10**9), ("4096", 4096), ("1.5kib", 1536)])
def test_kv_cache_memory_accepts_suffixes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "2XB", "-1GiB", "0"])
def test_kv_cache_memory_rejects_nonsense(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_defaults_serve_the_embedded_model_on_port_8000():
    args = parse()
    assert args.model is None and args.port == 8000
    ea = engine_args(args)
    assert ea.model is None and ea.role == "colocated" and ea.cache.enable_prefix_caching


def test_flags_reach_engine_args():
    ea = engine_args(parse(
        "--block-size", "32", "--kv-cache-memory", "1GiB", "--max-num-seqs", "7",
        "--max-num-batched-tokens", "512", "--max-model-len", "1024",
        "--no-enable-prefix-caching", "--seed", "3", "--role", "decode",
        "--tensor-parallel-size", "2", "--enforce-eager", "--dtype", "float32",
        "--device", "cpu", "--gpu-memory-utilization", "0.5", "--kv-transport", "tcp",
        "--kv-lease-ttl-s", "5", "--cpu-threads", "1",
    ))
    assert (ea.cache.block_size, ea.cache.kv_cache_memory) == (32, 2**30)
    assert not ea.cache.enable_prefix_caching and ea.cache.gpu_memory_utilization == 0.5
    assert (ea.scheduler.max_num_seqs, ea.scheduler.max_num_batched_tokens) == (7, 512)
    assert ea.scheduler.max_model_len == 1024
    assert (ea.seed, ea.role, ea.tensor_parallel_size, ea.enforce_eager) == (3, "decode", 2, True)
    assert (ea.dtype, ea.device) == ("float32", "cpu")
    assert (ea.kv_transport, ea.kv_lease_ttl_s, ea.cpu_threads) == ("tcp", 5.0, 1)


def test_the_kv_source_listens_where_the_server_does_unless_told():
    assert (engine_args(parse()).kv_host, engine_args(parse()).kv_advertise_host) == (
        "127.0.0.1", "127.0.0.1")
    ea = engine_args(parse("--host", "10.250.0.1"))
    assert (ea.kv_host, ea.kv_advertise_host) == ("10.250.0.1", "10.250.0.1")
    ea = engine_args(parse("--host", "0.0.0.0", "--kv-host", "10.250.0.2"))
    assert (ea.kv_host, ea.kv_advertise_host) == ("10.250.0.2", "10.250.0.2")
    ea = engine_args(parse("--host", "0.0.0.0"))
    assert ea.kv_host == "0.0.0.0" and ea.kv_advertise_host == socket.gethostname()


def test_itl_target_flag_reaches_the_scheduler_and_is_off_by_default():
    assert engine_args(parse()).scheduler.max_step_ms is None
    sched = engine_args(parse("--itl-target-ms", "40", "--step-time-file", "m.json")).scheduler
    assert (sched.max_step_ms, sched.step_time_file) == (40.0, "m.json")


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    text = capsys.readouterr().out
    for flag in ["--model", "--host", "--port", "--dtype", "--device", "--block-size",
                 "--kv-cache-memory", "--gpu-memory-utilization", "--max-num-batched-tokens",
                 "--max-num-seqs", "--max-model-len", "--no-enable-prefix-caching", "--seed",
                 "--role", "--tensor-parallel-size", "--enforce-eager", "--served-model-name"]:
        assert flag in text


def test_router_flag_registers_under_the_listening_address_unless_told_otherwise():
    args = parse("--router", "http://r:8000", "--host", "10.0.0.5", "--port", "9001")
    assert args.router == "http://r:8000" and advertise_url(args) == "http://10.0.0.5:9001"
    assert advertise_url(parse("--advertise-url", "http://me:1")) == "http://me:1"
    assert advertise_url(parse("--host", "0.0.0.0")) == f"http://{socket.gethostname()}:8000"
    assert advertise_url(parse("--host", "::1")) == "http://[::1]:8000"
    assert parse().router is None
