"""`pdserve up`: bring up a whole xPyD (or colocated) deployment on this machine."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pdserve.drain import add_drain_flag
from pdserve.launch.credentials import Credentials
from pdserve.launch.layout import InstancePlan, Layout, count_gpus, plan
from pdserve.launch.layout_flags import add_instance_args, add_layout_flags, layout_from_args
from pdserve.launch.procs import (
    Deployment,
    Proc,
    ShutdownRequested,
    ports_in_use,
    raise_on_signals,
)
from pdserve.launch.ray_up import add_ray_flags, run_on_ray
from pdserve.media.flags import body_flags, takes_images
from pdserve.router.prompt_tokens import EMBEDDED
from pdserve.server.cli import add_security_flags
from pdserve.shm import remove_stale_shared_kv_caches


def add_parser(subparsers) -> None:
    """Register `up` on the top-level `pdserve` parser."""
    p = subparsers.add_parser(
        "up", help="start prefill/decode (or colocated) instances and the router",
        description="Start a deployment on this machine: instances on consecutive GPUs (or "
        "the CPU), the router in front, a table of what runs where; Ctrl-C stops it all. "
        "With no counts: 1 prefill + 1 decode instance. Arguments after `--` go to every "
        "instance's `pdserve serve`. A new deployment secret is made for the router and "
        "the instances (in their environment) unless $PDSERVE_DEPLOYMENT_SECRET or "
        "--secret-file gives one; --api-key protects the router and the instances alike. "
        "With --ray the same layout runs on a Ray cluster, each server a Ray actor.",
        usage="pdserve up [--prefill N --decode M | --colocated K] [--encoder E] "
        "[--prefill-tp T] "
        "[--decode-tp T] [--model M] [--port P] [--config layout.yaml] [--ray [ADDRESS]] "
        "[-- serve args]",
    )
    add_layout_flags(p)
    p.add_argument("--host", default=None, help="address of the router and the instances "
                   "(default 127.0.0.1)")
    p.add_argument("--log-dir", default=None,
                   help="where each process's log goes (default: a new temp folder)")
    p.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds to wait for every process to be healthy")
    add_security_flags(p)
    add_drain_flag(p)
    add_ray_flags(p)
    add_instance_args(p)
    p.set_defaults(func=run)


def child_env(creds: Credentials | None) -> dict[str, str]:
    """This process's environment, plus the deployment's credentials."""
    return {**os.environ, **(creds.env() if creds else {})}


def serve_flags(inst: InstancePlan, layout: Layout, creds: Credentials | None = None,
                drain_timeout_s: float | None = None) -> list[str]:
    """`pdserve serve`'s flags for `inst`, but its role, where it listens and the layout's
    extra instance arguments (shared with `pdserve up --ray`)."""
    cmd = []
    if drain_timeout_s is not None:
        cmd += ["--drain-timeout", str(drain_timeout_s)]
    if layout.model:
        cmd += ["--model", layout.model]
    if inst.tp > 1:
        cmd += ["--tensor-parallel-size", str(inst.tp)]
    if inst.devices is None:
        cmd += ["--device", "cpu"]
    if inst.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(inst.gpu_memory_utilization)]
    if layout.kv_cache_memory:
        cmd += ["--kv-cache-memory", layout.kv_cache_memory]
    if inst.cpus:
        cmd += ["--cpu-affinity", inst.cpus]
    return cmd + (creds.flags() if creds else [])


def instance_proc(inst: InstancePlan, layout: Layout, log_dir: Path,
                  creds: Credentials | None = None, drain_timeout_s: float | None = None
                  ) -> Proc:
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--role", inst.role,
           "--host", inst.host, "--port", str(inst.port)]
    cmd += serve_flags(inst, layout, creds, drain_timeout_s)
    env = child_env(creds)
    if inst.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, inst.devices))
    return Proc(inst.name, inst.role, inst.url, inst.devices_label(),
                cmd + layout.instance_args, env, log_dir / f"{inst.name}.log", wave=inst.wave)


def router_flags(layout: Layout, creds: Credentials | None = None,
                 drain_timeout_s: float | None = None) -> list[str]:
    """`pdserve router`'s flags, but where it listens and its instances (shared with
    `pdserve up --ray`)."""
    cmd = []
    if drain_timeout_s is not None:
        cmd += ["--drain-timeout", str(drain_timeout_s)]
    if layout.pd_min_prompt_tokens:
        cmd += ["--pd-min-prompt-tokens", str(layout.pd_min_prompt_tokens)]
    if layout.pd_max_stall_ms is not None:
        cmd += ["--pd-max-stall-ms", f"{layout.pd_max_stall_ms:g}"]
    if layout.routing_policy != "least_loaded":
        cmd += ["--routing-policy", layout.routing_policy,
                "--tokenizer", layout.model or EMBEDDED]
    cmd += body_flags(layout.instance_args, takes_images(layout.model))  # bodies they take
    return cmd + (creds.flags() if creds else [])


def router_proc(instances: list[InstancePlan], layout: Layout, log_dir: Path,
                creds: Credentials | None = None, drain_timeout_s: float | None = None
                ) -> Proc:
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--host", layout.host,
           "--port", str(layout.port)]
    cmd += router_flags(layout, creds, drain_timeout_s)
    for inst in instances:
        cmd += [f"--{inst.role}", inst.url]
    url = f"http://{layout.host}:{layout.port}"
    return Proc("router", "router", url, "-", cmd, child_env(creds), log_dir / "router.log")


def table(dep: Deployment) -> Table:
    t = Table(title="pdserve deployment")
    for col in ("name", "role", "URL", "devices", "PID", "log"):
        t.add_column(col, overflow="fold")
    for p in dep.procs:
        t.add_row(p.name, p.role, p.url, p.devices, str(p.pid), str(p.log_path))
    return t


def run(args: argparse.Namespace) -> int:
    """Start, wait for health, print the table, watch; stop everything on the way out."""
    console = Console(width=max(Console().width, 140))
    try:
        layout = layout_from_args(args)
        creds = Credentials.from_args(args)
        if args.ray is not None:  # the same layout, placed by Ray instead of on this machine
            if layout.cpu_affinity:
                raise ValueError("--cpu-affinity: on Ray, placement groups place the "
                                 "instances; leave it out")
            if layout.encoder:
                raise ValueError("--encoder: encoder instances are not placed on Ray yet; "
                                 "run them with `pdserve up --encoder N` on one machine")
            return run_on_ray(args, layout, creds, console)
        instances = plan(layout, 0 if layout.cpu else count_gpus())
    except (ValueError, OSError) as exc:  # SecretError is a ValueError
        console.print(f"[red]pdserve up: {escape(str(exc))}[/red]")
        return 2
    taken = ports_in_use([("router", layout.host, layout.port)]
                         + [(i.name, i.host, i.port) for i in instances])
    if taken:  # before anything starts: never health-check someone else's server
        names = ", ".join(f"{port} ({name})" for name, _, port in taken)
        word = "port" if len(taken) == 1 else "ports"
        console.print(f"[red]pdserve up: {word} {escape(names)} on {escape(layout.host)} "
                      f"already in use; nothing was started. Stop what listens there, or "
                      f"choose free ports with --port P (the router listens on P, the "
                      f"{len(instances)} instance(s) on P+1 to P+{len(instances)}).[/red]",
                      highlight=False)
        return 1
    remove_stale_shared_kv_caches()  # KV files of engines that died without unlinking them
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdserve-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    drain = args.drain_timeout
    procs = [instance_proc(i, layout, log_dir, creds, drain) for i in instances]
    dep = Deployment(procs + [router_proc(instances, layout, log_dir, creds, drain)], console)
    raise_on_signals(on_repeat=dep.hurry)  # Ctrl-C again: end the drains now
    code = 0
    try:
        dep.start(args.startup_timeout)
        console.print(table(dep))
        console.print(f"pdserve up: serving at {dep.router.url}/v1 - ready "
                      "(Ctrl-C to stop)", highlight=False)
        dep.watch(lambda p: console.print(f"[red]pdserve up: {escape(dep.death_message(p))}[/red]",
                                          highlight=False))
        console.print("[red]pdserve up: nothing left to serve; stopping[/red]")
        code = 1
    except ShutdownRequested as sig:
        console.print(f"pdserve up: {sig}, stopping", highlight=False)
    except RuntimeError as exc:
        console.print(f"[red]pdserve up: {escape(str(exc))}[/red]", highlight=False)
        code = 1
    finally:
        dep.stop(drain)  # the router drains first, then the instances
        console.print("pdserve up: stopped", highlight=False)
    return code
