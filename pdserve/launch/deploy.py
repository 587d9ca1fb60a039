"""`pdserve deploy k8s`: the layout of `pdserve up` as Kubernetes manifests (stdout or a folder).

A command of its own rather than `up --render`: `up` runs processes here and its flags
(--host, --log-dir, the secret it makes) mean nothing to a cluster, while the cluster's
(image, model volume, resources, secret name) mean nothing here; the layout flags and the
YAML file are shared (launch/layout_flags.py), so one layout file serves both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pdserve import __version__
from pdserve.drain import add_drain_flag
from pdserve.launch.kubernetes import SECRET_KEY, KubeOptions, render, roles_of
from pdserve.launch.layout import Layout
from pdserve.launch.layout_flags import add_instance_args, add_layout_flags, layout_from_args

FILE_OF_KIND = {"Secret": "secret.yaml", "ServiceMonitor": "monitoring.yaml"}


def add_parser(subparsers) -> None:
    """Register `deploy` (with its one target, `k8s`) on the top-level parser."""
    deploy = subparsers.add_parser("deploy", help="render a layout for a cluster engine",
                                   description="Render a layout for a cluster engine.")
    targets = deploy.add_subparsers(dest="target", metavar="TARGET", required=True)
    p = targets.add_parser(
        "k8s", help="Kubernetes manifests",
        description="Kubernetes manifests of a layout (the flags and YAML of `pdserve up`): "
        "the router (Deployment + Services), each role's instances (Deployment of COUNT pods "
        "with TP GPUs each, headless Service), a ServiceMonitor. Instances register with "
        "the router under their pod IP. The deployment secret is read from a Secret "
        "(create it, or --generate-secret). Writes YAML to stdout, or files to --out.",
        usage="pdserve deploy k8s [--prefill N --decode M | --colocated K] [--prefill-tp T] "
        "[--decode-tp T] [--config layout.yaml] [--image I] [--out DIR] [-- serve args]")
    add_layout_flags(p)
    k = p.add_argument_group("cluster")
    k.add_argument("--name", default="pdserve", help="prefix of every object's name")
    k.add_argument("--namespace", default=None, help="omitted: the one kubectl applies to")
    k.add_argument("--image", default=f"pdserve:{__version__}",
                   help="an image with pdserve installed (`pdserve` on its PATH)")
    k.add_argument("--image-pull-policy", default="IfNotPresent",
                   choices=["Always", "IfNotPresent", "Never"])
    k.add_argument("--model-pvc", default=None, metavar="CLAIM",
                   help="a PersistentVolumeClaim mounted read-only at /models (give --model "
                   "/models/...); omitted: the model is in the image or a preset")
    k.add_argument("--secret-name", default=None,
                   help=f"the Secret holding the deployment secret (key {SECRET_KEY}); "
                   "default NAME-deployment-secret")
    k.add_argument("--generate-secret", action="store_true",
                   help="also render that Secret, with a new random value (apply it; "
                   "never commit it)")
    k.add_argument("--api-key-secret", default=None, metavar="SECRET",
                   help="a Secret whose key api-key is the clients' API key (router, "
                   "instances, and the ServiceMonitor's scrapes)")
    k.add_argument("--service-type", default="ClusterIP",
                   choices=["ClusterIP", "NodePort", "LoadBalancer"],
                   help="of the router's Service")
    k.add_argument("--gpus-per-node", type=int, default=8,
                   help="a TP larger than this is refused (TP stays within a pod)")
    k.add_argument("--cpus-per-rank", type=int, default=None,
                   help="CPU cores requested per TP rank (default 4 on GPU, 2 with --cpu)")
    k.add_argument("--memory-per-rank-gib", type=int, default=None,
                   help="memory per TP rank in GiB (default 32 on GPU, 4 with --cpu)")
    k.add_argument("--router-cpus", type=int, default=2)
    k.add_argument("--router-memory-gib", type=int, default=2)
    k.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                   help="where GPU pods may run (repeatable), e.g. "
                   "nvidia.com/gpu.product=NVIDIA-H200")
    k.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds an instance may take to load before it counts as failed")
    k.add_argument("--scrape-interval", default="15s", help="the ServiceMonitor's interval")
    k.add_argument("--service-monitor", action=argparse.BooleanOptionalAction, default=True,
                   help="render a ServiceMonitor (needs the Prometheus operator's CRDs)")
    k.add_argument("--out", default=None, metavar="DIR",
                   help="write one file per component and a kustomization.yaml here "
                   "(default: all to stdout)")
    add_drain_flag(p)
    add_instance_args(p)
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> KubeOptions:
    selector = {}
    for item in args.node_selector:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--node-selector {item!r}: expected KEY=VALUE")
        selector[key] = value
    return KubeOptions(
        name=args.name, namespace=args.namespace, image=args.image,
        image_pull_policy=args.image_pull_policy, model_pvc=args.model_pvc,
        secret_name=args.secret_name, generate_secret=args.generate_secret,
        api_key_secret=args.api_key_secret, service_type=args.service_type,
        gpus_per_node=args.gpus_per_node, cpus_per_rank=args.cpus_per_rank,
        memory_per_rank_gib=args.memory_per_rank_gib, router_cpus=args.router_cpus,
        router_memory_gib=args.router_memory_gib, node_selector=selector,
        drain_timeout_s=args.drain_timeout, startup_timeout_s=args.startup_timeout,
        scrape_interval=args.scrape_interval, service_monitor=args.service_monitor)


def header(layout: Layout, opts: KubeOptions) -> str:
    """What the YAML is, and the one step it leaves to the user: the secret."""
    parts = [f"{getattr(layout, r)} {r}" + (f" (TP {getattr(layout, r + '_tp')})"
             if getattr(layout, r + "_tp") > 1 else "") for r in roles_of(layout)]
    lines = [f"pdserve deployment {opts.name!r}: {', '.join(parts)}; "
             f"rendered by `pdserve deploy k8s` (pdserve {__version__})"]
    if opts.generate_secret:
        lines.append(f"Holds a NEW deployment secret (Secret {opts.secret}): apply it, never "
                     "commit it; re-applying it replaces the secret (restart every pod then).")
    else:
        lines += [f"The pods read the deployment secret from Secret {opts.secret}, key "
                  f"{SECRET_KEY}. Create it once:",
                  f"  kubectl create secret generic {opts.secret} "
                  f"--from-literal={SECRET_KEY}=\"$(openssl rand -hex 32)\""]
    if opts.service_monitor:
        lines.append("The ServiceMonitor needs the Prometheus operator's CRDs "
                     "(--no-service-monitor leaves it out).")
    return "".join(f"# {line}\n" for line in lines)


def to_yaml(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


def write_folder(out: Path, objects: list[dict], head: str) -> list[Path]:
    """One file per component (router, each role, monitoring, secret) and a kustomization
    listing them; the secret's file is git-ignored."""
    files: dict[str, list[dict]] = {}
    for obj in objects:
        name = FILE_OF_KIND.get(obj["kind"]) or \
            obj["metadata"]["labels"]["app.kubernetes.io/component"].split("-")[0] + ".yaml"
        files.setdefault(name, []).append(obj)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, objs in files.items():
        (out / name).write_text(head + to_yaml(objs))
        written.append(out / name)
    resources = [n for n in files if n != "secret.yaml"]  # applied on its own, once
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": resources}
    (out / "kustomization.yaml").write_text(head + yaml.safe_dump(kustomization,
                                                                  sort_keys=False))
    written.append(out / "kustomization.yaml")
    if "secret.yaml" in files:
        (out / ".gitignore").write_text("secret.yaml\n")
    return written


def run(args: argparse.Namespace) -> int:
    """Render the layout; print it or write the folder."""
    try:
        layout = layout_from_args(args)
        if layout.encoder:
            raise ValueError("--encoder: encoder instances are not rendered for Kubernetes "
                             "yet; run them with `pdserve up --encoder N`")
        if layout.cpu_affinity:
            raise ValueError("cpu_affinity: a pod's CPUs come from its resources "
                             "(--cpus-per-rank), not from a CPU list")
        opts = options_from_args(args)
        objects = render(layout, opts)
    except (ValueError, OSError) as exc:
        print(f"pdserve deploy k8s: {exc}", file=sys.stderr)
        return 2
    if layout.host != Layout.host:
        print(f"pdserve deploy k8s: note: host {layout.host} is for `pdserve up`; every pod "
              "listens on all of its addresses", file=sys.stderr)
    head = header(layout, opts)
    if args.out is None:
        sys.stdout.write(head + to_yaml(objects))
        return 0
    for path in write_folder(Path(args.out), objects, head):
        print(path)
    return 0
