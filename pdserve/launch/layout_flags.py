"""The layout's flags, shared by every command that places a layout: `pdserve up` (this
machine) and `pdserve deploy k8s` (manifests). One set of flags and one YAML file give
the same layout to each."""

from __future__ import annotations

import argparse

from pdserve.launch.layout import Layout
from pdserve.router.policy import POLICIES


def add_layout_flags(p: argparse.ArgumentParser) -> None:
    """Counts and TP per role, the model, the port, the router's policy, --config, and the
    `-- serve args` remainder (call it last: the remainder takes the rest)."""
    p.add_argument("--prefill", type=int, default=None, help="prefill instances")
    p.add_argument("--decode", type=int, default=None, help="decode instances")
    p.add_argument("--colocated", type=int, default=None, help="colocated instances")
    p.add_argument("--encoder", type=int, default=None,
                   help="image encoder instances of a vision-language --model: the router "
                   "spreads each request's images over them (E->P->D, E->colocated); "
                   "`pdserve up` on this machine only, for now")
    p.add_argument("--prefill-tp", type=int, default=None, help="GPUs per prefill instance")
    p.add_argument("--decode-tp", type=int, default=None, help="GPUs per decode instance")
    p.add_argument("--colocated-tp", type=int, default=None,
                   help="GPUs per colocated instance")
    p.add_argument("--model", default=None, help="as `pdserve serve --model`; omitted = the "
                   "embedded SmolLM2-135M-Instruct")
    p.add_argument("--port", type=int, default=None,
                   help="the router's port (default 8000); `up` gives instances the next "
                   "ones, a Kubernetes pod listens on it alone")
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV cache bytes per instance, e.g. 1GiB")
    p.add_argument("--pd-min-prompt-tokens", type=int, default=None, metavar="N",
                   help="as `pdserve router --pd-min-prompt-tokens`: shorter prompts skip the "
                   "prefill instance (default 0: always disaggregate)")
    p.add_argument("--routing-policy", choices=POLICIES, default=None,
                   help="as `pdserve router --routing-policy` (default least_loaded); a "
                   "cache-aware one gets the instances' model as its --tokenizer")
    p.add_argument("--pd-max-stall-ms", type=float, default=None, metavar="MS",
                   help="as `pdserve router --pd-max-stall-ms`: with --routing-policy "
                   "conditional, the longest a prompt prefilled whole on a decode instance may "
                   "stall its decodes (default: D's measured hop)")
    p.add_argument("--cpu", action="store_true", default=None,
                   help="run on the CPU even where GPUs exist")
    p.add_argument("--cpu-affinity", default=None, metavar="CPUS|CPUS|...",
                   help="pin each instance to its own CPUs, one list per instance in the "
                   "order prefill, decode, colocated, encoder, e.g. '0|1' or '0-3|4-7' (as "
                   "`pdserve serve --cpu-affinity`); the router is not pinned; `pdserve up` "
                   "on one machine only")
    p.add_argument("--config", default=None, help="a YAML layout; flags override it")


def add_instance_args(p: argparse.ArgumentParser) -> None:
    """After `--`: extra flags for every instance's `pdserve serve` (add it last)."""
    p.add_argument("instance_args", nargs=argparse.REMAINDER,
                   help="after `--`: extra flags for every `pdserve serve`")


def layout_from_args(args: argparse.Namespace) -> Layout:
    """The layout of --config (if given) with the flags the user gave on top."""
    extra = [a for a in args.instance_args if a != "--"] or None
    given = {"prefill": args.prefill, "decode": args.decode, "colocated": args.colocated,
             "encoder": args.encoder,
             "prefill_tp": args.prefill_tp, "decode_tp": args.decode_tp,
             "colocated_tp": args.colocated_tp, "model": args.model,
             "host": getattr(args, "host", None),  # `up` only: pods listen on their own IP
             "port": args.port, "kv_cache_memory": args.kv_cache_memory, "cpu": args.cpu,
             "pd_min_prompt_tokens": args.pd_min_prompt_tokens,
             "routing_policy": args.routing_policy,
             "pd_max_stall_ms": args.pd_max_stall_ms, "instance_args": extra,
             "cpu_affinity": args.cpu_affinity.split("|") if args.cpu_affinity else None}
    if args.config:
        return Layout.from_yaml(args.config, **given)
    return Layout(**{k: v for k, v in given.items() if v is not None})
