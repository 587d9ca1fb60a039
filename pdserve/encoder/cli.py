"""`pdserve serve --role encoder`: the encoder's own flags, and running its server."""

from __future__ import annotations

import argparse
import functools
import sys

import uvicorn

from pdserve.encoder.app import EncoderSettings, build_encoder_app
from pdserve.media.flags import media_limits
from pdserve.security import SecretError, load_secret
from pdserve.uvicorn_config import server_config


def add_encoder_flags(p: argparse.ArgumentParser, parse_bytes) -> None:
    """Flags that only `--role encoder` reads."""
    p.add_argument("--encoder-batch-window-ms", type=float, default=2.0,
                   help="encoder role: images that arrive within this of the first are "
                   "encoded in one batch")
    p.add_argument("--encoder-cache-bytes", type=parse_bytes, default=1 << 30,
                   help="encoder role: embeddings kept by image content hash (LRU)")
    p.add_argument("--encoder-held-bytes", type=parse_bytes, default=2 << 30,
                   help="encoder role: most bytes of rows held for prefill instances to pull; "
                   "past it /v1/encode answers 503 (and P encodes itself)")
    p.add_argument("--encoder-advertise-host", default=None,
                   help="encoder role: the address prefill instances dial for the rows "
                   "(default: --host; with 0.0.0.0, this host's name)")


def run_encoder(args: argparse.Namespace) -> int:
    """Serve the vision tower of --model; return when the server stops."""
    import torch

    from pdserve.encoder.tower import load_encoder_model
    from pdserve.engine.engine import resolve_device, resolve_dtype, set_cpu_threads
    from pdserve.models.loader import model_config
    from pdserve.server.cli import advertise_url, api_key

    try:
        secret = load_secret(args.secret_file)
        if secret is None:
            raise SecretError("an encoder instance needs the deployment secret: set "
                              "$PDSERVE_DEPLOYMENT_SECRET or pass --secret-file")
        if args.tensor_parallel_size != 1:
            raise ValueError("an encoder instance runs on one device: "
                             "--tensor-parallel-size 1")
        if args.encoder_batch_window_ms < 0:
            raise ValueError("--encoder-batch-window-ms must be at least 0")
        limits = media_limits(args)
        if model_config(args.model).vision is None:  # before the server: a clear line
            raise ValueError(f"--role encoder needs a vision-language model; "
                             f"{args.model or 'the embedded SmolLM2'} takes no images")
    except (SecretError, ValueError) as exc:
        print(f"pdserve serve: {exc}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":
        set_cpu_threads(args.cpu_threads)
    wildcard = args.host in ("", "0.0.0.0", "::")
    settings = EncoderSettings(
        batch_window_s=args.encoder_batch_window_ms / 1000,
        cache_bytes=args.encoder_cache_bytes,
        lease_ttl_s=args.kv_lease_ttl_s,
        max_held_bytes=args.encoder_held_bytes,
        bind_host=args.host,
        advertise_host=args.encoder_advertise_host or (
            advertise_url(args).split("//")[1].rsplit(":", 1)[0].strip("[]") if wildcard
            else None))
    heartbeat = None
    if args.router:
        from pdserve.router.heartbeat import keep_registered

        heartbeat = functools.partial(keep_registered, args.router, advertise_url(args),
                                      "encoder", secret)
    load = functools.partial(load_encoder_model, args.model, dtype, device, args.seed)
    app = build_encoder_app(load, args.model, settings, secret, limits, heartbeat,
                            api_key=api_key(args), open_metrics=args.open_metrics)
    torch.set_grad_enabled(False)
    config = server_config(app, host=args.host, port=args.port, log_level=args.log_level,
                           timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0
