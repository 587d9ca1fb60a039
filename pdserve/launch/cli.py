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
from pdserve.launch.procs import (
    Deployment,
    Proc,
    ShutdownRequested,
    ports_in_use,
    raise_on_signals,
)
from pdserve.media.flags import body_flags
from pdserve.router.policy import POLICIES
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
        "--secret-file gives one; --api-key protects the router and the instances alike.",
        usage="pdserve up [--prefill N --decode M | --colocated K] [--encoder E] "
        "[--prefill-tp T] "
        "[--decode-tp T] [--model M] [--port P] [--config layout.yaml] [-- serve args]",
    )
    p.add_argument("--prefill", type=int, default=None, help="prefill instances")
    p.add_argument("--decode", type=int, default=None, help="decode instances")
    p.add_argument("--colocated", type=int, default=None, help="colocated instances")
    p.add_argument("--encoder", type=int, default=None,
                   help="image encoder instances of a vision-language --model: the router "
                   "spreads each request's images over them (E->P->D, E->colocated)")
    p.add_argument("--prefill-tp", type=int, default=None, help="GPUs per prefill instance")
    p.add_argument("--decode-tp", type=int, default=None, help="GPUs per decode instance")
    p.add_argument("--colocated-tp", type=int, default=None,
                   help="GPUs per colocated instance")
    p.add_argument("--model", default=None, help="as `pdserve serve --model`; omitted = the "
                   "embedded SmolLM2-135M-Instruct")
    p.add_argument("--host", default=None, help="address of the router and the instances "
                   "(default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="the router's port (default 8000); instances take the next ones")
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV cache bytes per instance, e.g. 1GiB")
    p.add_argument("--pd-min-prompt-tokens", type=int, default=None, metavar="N",
                   help="as `pdserve router --pd-min-prompt-tokens`: shorter prompts skip the "
                   "prefill instance (default 0: always disaggregate)")
    p.add_argument("--routing-policy", choices=POLICIES, default=None,
                   help="as `pdserve router --routing-policy` (default least_loaded); a "
                   "cache-aware one gets the instances' model as its --tokenizer")
    p.add_argument("--cpu", action="store_true", default=None,
                   help="run on the CPU even where GPUs exist")
    p.add_argument("--config", default=None, help="a YAML layout; flags override it")
    p.add_argument("--log-dir", default=None,
                   help="where each process's log goes (default: a new temp folder)")
    p.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds to wait for every process to be healthy")
    add_security_flags(p)
    add_drain_flag(p)
    p.add_argument("instance_args", nargs=argparse.REMAINDER,
                   help="after `--`: extra flags for every `pdserve serve`")
    p.set_defaults(func=run)


def layout_from_args(args: argparse.Namespace) -> Layout:
    extra = [a for a in args.instance_args if a != "--"] or None
    given = {"prefill": args.prefill, "decode": args.decode, "colocated": args.colocated,
             "encoder": args.encoder,
             "prefill_tp": args.prefill_tp, "decode_tp": args.decode_tp,
             "colocated_tp": args.colocated_tp, "model": args.model, "host": args.host,
             "port": args.port, "kv_cache_memory": args.kv_cache_memory, "cpu": args.cpu,
             "pd_min_prompt_tokens": args.pd_min_prompt_tokens,
             "routing_policy": args.routing_policy, "instance_args": extra}
    if args.config:
        return Layout.from_yaml(args.config, **given)
    return Layout(**{k: v for k, v in given.items() if v is not None})


def child_env(creds: Credentials | None) -> dict[str, str]:
    """This process's environment, plus the deployment's credentials."""
    return {**os.environ, **(creds.env() if creds else {})}


def instance_proc(inst: InstancePlan, layout: Layout, log_dir: Path,
                  creds: Credentials | None = None, drain_timeout_s: float | None = None
                  ) -> Proc:
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--role", inst.role,
           "--host", inst.host, "--port", str(inst.port)]
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
    if creds:
        cmd += creds.flags()
    env = child_env(creds)
    if inst.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, inst.devices))
    return Proc(inst.name, inst.role, inst.url, inst.devices_label(),
                cmd + layout.instance_args, env, log_dir / f"{inst.name}.log", wave=inst.wave)


def router_proc(instances: list[InstancePlan], layout: Layout, log_dir: Path,
                creds: Credentials | None = None, drain_timeout_s: float | None = None
                ) -> Proc:
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--host", layout.host,
           "--port", str(layout.port)]
    if drain_timeout_s is not None:
        cmd += ["--drain-timeout", str(drain_timeout_s)]
    if layout.pd_min_prompt_tokens:
        cmd += ["--pd-min-prompt-tokens", str(layout.pd_min_prompt_tokens)]
    if layout.routing_policy != "least_loaded":
        cmd += ["--routing-policy", layout.routing_policy,
                "--tokenizer", layout.model or EMBEDDED]
    cmd += body_flags(layout.instance_args)  # bodies the instances take pass the router
    for inst in instances:
        cmd += [f"--{inst.role}", inst.url]
    if creds:
        cmd += creds.flags()
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
        instances = plan(layout, 0 if layout.cpu else count_gpus())
        creds = Credentials.from_args(args)
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
