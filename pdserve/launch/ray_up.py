"""`pdserve up --ray [ADDRESS]`: connect to (or start) a Ray cluster, place the layout on it
(ray_deploy.py), print what runs where, report deaths, and remove it all on the way out."""

from __future__ import annotations

import argparse
import tempfile
import uuid

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pdserve.launch.credentials import Credentials
from pdserve.launch.layout import Layout
from pdserve.launch.procs import ShutdownRequested, raise_on_signals
from pdserve.launch.ray_spec import RaySpec, parse_resources


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    """`pdserve up`'s Ray flags."""
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="place the layout on a Ray cluster: ADDRESS as `ray.init(address=...)` "
                   "takes it (HEAD_IP:6379, auto); with no ADDRESS, "
                   "$RAY_ADDRESS or a cluster started here. Needs `pip install pdserve[ray]`")
    p.add_argument("--ray-num-cpus", type=float, default=1.0, metavar="N",
                   help="with --ray: CPUs each CPU instance (its torch threads) and the router "
                   "reserve (a GPU instance reserves its TP GPUs and one CPU)")
    p.add_argument("--ray-resources", action="append", default=[],
                   metavar="ROLE=NAME:AMOUNT[,...]",
                   help="with --ray: custom Ray resources a role's servers reserve, pinning "
                   "them to the nodes that have them (ROLE: prefill, decode, colocated or "
                   "router; repeatable)")


def spec_from_args(args: argparse.Namespace) -> RaySpec:
    """The Ray flags as a RaySpec; ValueError names the bad flag."""
    return RaySpec(args.ray or None, args.ray_num_cpus, parse_resources(args.ray_resources))


def table(dep) -> Table:
    t = Table(title="pdserve deployment on Ray")
    for col in ("name", "role", "URL", "node", "reserves", "PID", "log (on its node)"):
        t.add_column(col, overflow="fold")
    for s in dep.servers:
        reserves = ", ".join(f"{k} {v:g}" for k, v in s.bundle.items() if v)
        t.add_row(s.name, s.role, s.url, s.placement.node_ip if s.placement else "-", reserves,
                  str(s.started.pid if s.started else "-"),
                  s.started.log_path if s.started else "-")
    return t


def run_on_ray(args: argparse.Namespace, layout: Layout, creds: Credentials,
               console: Console) -> int:
    """Start the deployment on Ray, watch it until Ctrl-C or nothing is left; 0 on a stop
    asked for, 1 on a failure or when every server died."""
    try:
        spec = spec_from_args(args)
        import ray  # an optional dependency: only this path needs it

        from pdserve.launch.ray_deploy import RayDeployment
    except ValueError as exc:
        console.print(f"[red]pdserve up: {escape(str(exc))}[/red]", highlight=False)
        return 2
    except ImportError as exc:
        console.print(f"[red]pdserve up --ray: Ray is not installed ({escape(str(exc))}); "
                      "pip install 'pdserve[ray]'[/red]", highlight=False)
        return 2
    log_dir = args.log_dir or f"{tempfile.gettempdir()}/pdserve-ray-{uuid.uuid4().hex[:8]}"
    ray.init(address=spec.address, log_to_driver=False, logging_level="warning")
    dep = None
    code = 0
    raise_on_signals()
    try:
        dep = RayDeployment(layout, spec, creds, log_dir, args.drain_timeout)
        short = dep.shortfall(ray.cluster_resources())
        if short:  # an autoscaler may add nodes: wait, but say what is missing
            console.print(f"[yellow]pdserve up: the cluster lacks {escape(short)} for this "
                          f"layout; waiting up to {args.startup_timeout:.0f} s for nodes to "
                          "join[/yellow]", highlight=False)
        dep.start(args.startup_timeout, args.host)
        console.print(table(dep))
        console.print(f"pdserve up: serving at {dep.router.url}/v1 on Ray (actors "
                      f"pdserve-{dep.deployment_id}-* in namespace pdserve) - ready "
                      "(Ctrl-C to stop)", highlight=False)
        dep.watch(lambda s: console.print(f"[red]pdserve up: {escape(dep.death_message(s))}"
                                          "[/red]", highlight=False))
        console.print("[red]pdserve up: nothing left to serve; stopping[/red]")
        code = 1
    except ShutdownRequested as sig:
        console.print(f"pdserve up: {sig}, stopping", highlight=False)
    except (RuntimeError, ValueError) as exc:
        console.print(f"[red]pdserve up: {escape(str(exc))}[/red]", highlight=False)
        code = 1
    finally:
        if dep is not None:
            dep.stop()
        ray.shutdown()
        console.print("pdserve up: stopped", highlight=False)
    return code
