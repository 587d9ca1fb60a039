"""`pdserve router`: the OpenAI front door over prefill, decode and colocated instances."""

from __future__ import annotations

import argparse
import sys

from pdserve.drain import Drain, DrainingServer, add_drain_flag
from pdserve.media.flags import add_media_flags, router_body_bytes
from pdserve.router.policy import POLICIES
from pdserve.security import SecretError, load_secret
from pdserve.server.cli import (
    add_max_request_bytes_flag,
    add_security_flags,
    api_key,
    parse_bytes,
)
from pdserve.uvicorn_config import server_config


def add_parser(subparsers) -> None:
    """Register `router` on the top-level `pdserve` parser."""
    p = subparsers.add_parser(
        "router", help="route OpenAI requests over P/D or colocated instances",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health, "
        "/metrics, /register and /instances in front of pdserve instances. Each request "
        "goes to the least-loaded prefill + decode pair, or to one colocated instance. "
        "The router signs its calls to instances with the deployment secret, and takes "
        "/register, /deregister and /instances only from holders of it: without a secret, "
        "nothing can register and the router serves only the --prefill, --decode and "
        "--colocated URLs given here (which must then run without --api-key).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--prefill", nargs="+", action="extend", default=[], metavar="URL",
                   help="prefill instances (repeatable)")
    p.add_argument("--decode", nargs="+", action="extend", default=[], metavar="URL",
                   help="decode instances (repeatable)")
    p.add_argument("--colocated", nargs="+", action="extend", default=[], metavar="URL",
                   help="colocated instances (repeatable)")
    p.add_argument("--encoder", nargs="+", action="extend", default=[], metavar="URL",
                   help="encoder instances (repeatable): a chat request's images are spread "
                   "over them, and P pulls their embeddings")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--health-interval", type=float, default=1.0,
                   help="seconds between health checks of each instance")
    p.add_argument("--heartbeat-ttl", type=float, default=10.0,
                   help="seconds a registered instance may go without heartbeat or health")
    p.add_argument("--pd-min-prompt-tokens", type=_non_negative_int, default=0, metavar="N",
                   help="conditional disaggregation: a prompt of fewer tokens skips the "
                   "prefill instance and is served whole on the least-loaded decode instance. "
                   "Tokens are estimated (about 4 characters each; token-id prompts exactly), "
                   "so the router needs no tokenizer. 0 = always disaggregate: where the "
                   "crossover lies depends on model, GPU and load (on H200, 1P1D lost at "
                   "2k-token prompts and won at 8k), so measure before setting it")
    p.add_argument("--pd-max-stall-ms", type=_positive_float, default=None, metavar="MS",
                   help="conditional policy: the longest a prompt prefilled whole on D may "
                   "stall the decodes it meets (running there or handed off meanwhile) before "
                   "it goes to P instead; default: D's measured hop (P's first token to D's), "
                   "the gap a hand-off itself puts into a stream")
    p.add_argument("--routing-policy", choices=POLICIES, default="least_loaded",
                   help="how instances are chosen: least_loaded (fewest outstanding tokens), "
                   "round_robin, cache_aware (lowest predicted time to first token from the "
                   "instances' KV events: the prompt's uncached part and the queue at each "
                   "instance's measured prefill rate; needs --tokenizer for text prompts), "
                   "conditional (cache_aware, and each request is disaggregated or served "
                   "whole on D from the uncached tokens, the measured rates and P's queue)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="the instances' model (path or preset; 'embedded' for the embedded "
                   "SmolLM2) or tokenizer folder: a cache-aware policy tokenizes prompts with "
                   "it, exactly as the instances do (without it, only token-id prompts are "
                   "matched against the caches)")
    add_security_flags(p)
    add_drain_flag(p)
    add_max_request_bytes_flag(p)
    add_media_flags(p, parse_bytes, instance=False)  # the body limit lets images through
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    p.set_defaults(func=run)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    from pdserve.router.app import build_app
    from pdserve.router.registry import Registry

    try:
        secret = load_secret(args.secret_file)
    except SecretError as exc:
        print(f"pdserve router: {exc}", file=sys.stderr)
        return 2
    if secret is None:
        print("pdserve router: no deployment secret ($PDSERVE_DEPLOYMENT_SECRET or "
              "--secret-file): /register is refused; serving only the instances given on "
              "the command line", file=sys.stderr)
    registry = Registry(heartbeat_ttl_s=args.heartbeat_ttl)
    for role in ("prefill", "decode", "colocated", "encoder"):
        for url in getattr(args, role):
            registry.add_static(url, role)
    drain = Drain(args.drain_timeout)
    app = build_app(registry, args.health_interval, args.pd_min_prompt_tokens,
                    api_key=api_key(args), secret=secret, open_metrics=args.open_metrics,
                    drain=drain,
                    max_request_bytes=router_body_bytes(args),
                    routing_policy=args.routing_policy, tokenizer=args.tokenizer,
                    pd_max_stall_s=None if args.pd_max_stall_ms is None
                    else args.pd_max_stall_ms / 1e3)
    config = server_config(app, host=args.host, port=args.port, log_level=args.log_level,
                           timeout_graceful_shutdown=5)
    server = DrainingServer(config, drain)
    try:
        server.run()  # SIGTERM and Ctrl-C drain, then return (see pdserve/drain.py)
    except (KeyboardInterrupt, SystemExit):  # before serving; or the port was taken
        pass
    if server.started:
        return 0
    print(f"pdserve router: could not start on {args.host}:{args.port}", file=sys.stderr)
    return 1
