"""`pdserve serve`: run one engine instance behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import socket
import sys

from pdserve.config import CacheConfig, EngineArgs, SchedulerConfig
from pdserve.cpu_affinity import pin_to
from pdserve.drain import Drain, DrainingServer, add_drain_flag
from pdserve.encoder.cli import add_encoder_flags
from pdserve.media.flags import add_media_flags, media_limits
from pdserve.security import API_KEY_ENV, SECRET_ENV, SecretError, load_secret
from pdserve.server.chat_template import install_chat_template, read_chat_template
from pdserve.server.request_log import RequestLog
from pdserve.server.tool_parsers import PARSERS
from pdserve.uvicorn_config import server_config

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1e9' or '1073741824' → bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 512MB)")
    try:
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return int(value)


def add_parser(subparsers) -> None:
    """Register `serve` on the top-level `pdserve` parser."""
    p = subparsers.add_parser(
        "serve", help="serve one model over an OpenAI-compatible HTTP API",
        description="Serve one engine instance: /v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None,
                   help="a Hugging Face folder, a preset name, or omit for the embedded "
                   "SmolLM2-135M-Instruct")
    p.add_argument("--tokenizer", default=None,
                   help="a folder with a Hugging Face tokenizer (tokenizer.json ...) to use "
                        "instead of the model's; presets default to the embedded SmolLM2's")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_JINJA",
                   help="a Jinja chat template (a file, or the template inline) instead of "
                   "the model's; it must render a conversation or the server does not start")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients pass as `model`; omitted = the model's own name")
    p.add_argument("--tool-call-parser", default=None, choices=PARSERS,
                   help="the format of tool calls in the model's text (vLLM's names): hermes "
                   "(<tool_call>...</tool_call>: Qwen, Hermes, SmolLM2) or llama3_json; "
                   "omitted = llama3_json for a Llama 3 chat template, else hermes. "
                   "tool_choice auto is always on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--dtype", default="auto",
                   help="weights and activations: auto (float32 on CPU, bfloat16 on GPU), "
                   "float32, float16 or bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="bytes for the KV cache, suffixes allowed (2GiB, 512MB); "
                   "omitted = derived from the device")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90,
                   help="fraction of GPU memory for weights, activations and KV cache")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one engine step (decode tokens + prefill chunks)")
    p.add_argument("--max-step-ms", "--itl-target-ms", type=float, default=None,
                   help="inter-token latency target: while requests decode, a step's prefill "
                   "chunk is the largest whose predicted time stays under it (at least one "
                   "block); the engine times a few steps at start to predict. Omitted or 0 = "
                   "the token budget alone")
    p.add_argument("--step-time-file", default=None,
                   help="a step-time model as JSON (StepTimeModel.to_dict) to use with "
                   "--max-step-ms instead of timing steps at start")
    p.add_argument("--finish-first-tokens", type=int, default=0,
                   help="a response at most this many tokens short of its max_tokens "
                   "finishes before a prompt of over 256 tokens starts its prefill (held at "
                   "most this many steps in a row): its last tokens do not each wait a long "
                   "prefill step, and new prompts wait a few decode steps. 0 (default) = "
                   "admit prompts at once")
    p.add_argument("--max-num-seqs", type=int, default=128,
                   help="most sequences running at once; more requests wait in the queue")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length limit; omitted = the model's")
    p.add_argument("--no-enable-prefix-caching", action="store_true",
                   help="turn the prefix cache off")
    p.add_argument("--seed", type=int, default=0, help="seed of the engine's sampler")
    p.add_argument("--role", choices=["colocated", "prefill", "decode", "encoder"],
                   default="colocated",
                   help="colocated serves whole requests; prefill/decode are halves of a P/D "
                   "pair; encoder serves a vision-language model's image embeddings to them")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs to shard the model over")
    p.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan and queue the next step while the device runs this one (every role "
                   "and tensor-parallel size); default: on for a GPU, off for a CPU, where the "
                   "device is the host and nothing overlaps")
    p.add_argument("--kv-transport", choices=["cuda_ipc", "host", "tcp"], default=None,
                   help="P/D only: force how KV moves between instances; omitted = the "
                   "fastest that works")
    p.add_argument("--kv-host", default=None, metavar="HOST",
                   help="P/D only: the address the KV source listens on, which decode "
                   "instances dial; omitted = --host (with 0.0.0.0 or ::, every interface, "
                   "advertised as this machine's name)")
    p.add_argument("--kv-lease-ttl-s", type=float, default=30.0,
                   help="prefill role: how long a finished prefill's KV is kept for the "
                   "decode instance unless it releases it sooner")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="CPU engines: torch threads; omitted = $PDSERVE_CPU_THREADS, else "
                   "half the cores")
    p.add_argument("--cpu-affinity", default=None, metavar="CPUS",
                   help="pin the server and its engine to these CPUs, e.g. 0-3 or 0,2 (as "
                   "taskset -c); pair it with --cpu-threads; `pdserve up --cpu-affinity "
                   "'0|1'` gives each instance its own")
    p.add_argument("--router", default=None, metavar="URL",
                   help="join this router (POST /register with --role, every few seconds) "
                   "for the server's lifetime; leave it on a clean stop")
    p.add_argument("--advertise-url", default=None, metavar="URL",
                   help="with --router: how the router reaches this instance; omitted = "
                   "http://HOST:PORT (this machine's name when HOST is 0.0.0.0 or ::)")
    add_security_flags(p)
    add_max_request_bytes_flag(p)
    p.add_argument("--accept-client-kv-requests", action="store_true",
                   help="prefill role: hold a prompt's KV for callers that hold no deployment "
                   "secret (needed behind vLLM's P/D proxies); decode instances still take "
                   "only hand-offs signed by a prefill instance of the deployment")
    add_drain_flag(p)
    # benchmarks/bench_serving_path.py: a token per request each T ms, no model (hidden)
    p.add_argument("--engine-standin", type=float, default=None, metavar="T_MS",
                   help=argparse.SUPPRESS)
    # the fraction of each stand-in step that holds the GIL, as a real engine's host thread
    p.add_argument("--engine-standin-busy", type=float, default=0.0, help=argparse.SUPPRESS)
    add_media_flags(p, parse_bytes)
    add_encoder_flags(p, parse_bytes)
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    p.add_argument("--log-requests", action="store_true",
                   help="log each request's id, prompt and sampling params at INFO")
    p.add_argument("--max-log-len", type=int, default=None, metavar="N",
                   help="with --log-requests: log at most N characters of a prompt and N of "
                   "its token ids; omitted = all")
    p.set_defaults(func=run)


def add_security_flags(p: argparse.ArgumentParser) -> None:
    """The flags every server of a deployment shares (serve, router, up)."""
    p.add_argument("--api-key", default=None,
                   help="clients must send `Authorization: Bearer KEY` on /v1/*; omitted = "
                   f"${API_KEY_ENV}, else no key (anyone who reaches the port may call it)")
    p.add_argument("--secret-file", default=None, metavar="PATH",
                   help="a file holding the deployment secret that the router and the "
                   f"instances share; omitted = ${SECRET_ENV} (`pdserve up` sets it)")
    p.add_argument("--open-metrics", action="store_true",
                   help="serve /metrics without the API key (for a scraper inside the "
                   "deployment's network)")


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else $PDSERVE_API_KEY, else None (no key)."""
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def add_max_request_bytes_flag(p: argparse.ArgumentParser) -> None:
    """--max-request-bytes, shared by serve and router."""
    from pdserve.http_limits import DEFAULT_MAX_REQUEST_BYTES

    p.add_argument("--max-request-bytes", type=parse_bytes, default=DEFAULT_MAX_REQUEST_BYTES,
                   metavar="BYTES", help="refuse a request body larger than this with 413 "
                   "(suffixes allowed: 8MiB, 100KB)")


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """Flags → the engine's configuration."""
    return EngineArgs(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=not args.no_enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            max_step_ms=args.max_step_ms,
            step_time_file=args.step_time_file,
            finish_first_tokens=args.finish_first_tokens,
        ),
        role=args.role,
        tensor_parallel_size=args.tensor_parallel_size,
        kv_transport=args.kv_transport,
        kv_host=args.kv_host or args.host,
        kv_advertise_host=_advertised_host(args.kv_host or args.host),
        kv_lease_ttl_s=args.kv_lease_ttl_s,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        cpu_threads=args.cpu_threads,
        deployment_secret=load_secret(args.secret_file),
        accept_client_kv_requests=args.accept_client_kv_requests,
    )


def _advertised_host(host: str) -> str:
    """How peers reach a server listening on `host` (a wildcard: this machine's name)."""
    return socket.gethostname() if host in ("", "0.0.0.0", "::") else host


def advertise_url(args: argparse.Namespace) -> str:
    """The URL this instance registers under: how a router reaches it."""
    if args.advertise_url:
        return args.advertise_url
    host = _advertised_host(args.host)
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{args.port}"


def run(args: argparse.Namespace) -> int:
    """Start the engine process and the HTTP server; return when the server stops."""
    from pdserve.server.app import build_app
    from pdserve.server.engine_client import EngineClient

    if args.cpu_affinity:  # first: the engine process and every thread inherit it
        try:
            pin_to(args.cpu_affinity)
        except ValueError as exc:
            print(f"pdserve serve: {exc}", file=sys.stderr)
            return 2
    if args.role == "encoder":  # no engine: the vision tower alone (pdserve/encoder/)
        from pdserve.encoder.cli import run_encoder

        return run_encoder(args)
    try:
        eargs = engine_args(args)
        template = read_chat_template(args.chat_template) if args.chat_template else None
        if args.max_log_len is not None and args.max_log_len < 0:
            raise ValueError("--max-log-len must be at least 0")
        limits = media_limits(args)
        if limits.allowed_local_media_path is not None and \
                not os.path.isdir(limits.allowed_local_media_path):
            raise ValueError("--allowed-local-media-path must be a folder")
    except (SecretError, ValueError) as exc:
        print(f"pdserve serve: {exc}", file=sys.stderr)
        return 2

    def load_tokenizer():
        from pdserve.models.loader import serving_tokenizer

        tokenizer = serving_tokenizer(args.model, args.tokenizer)
        if template is not None:
            install_chat_template(tokenizer, template)
        return tokenizer

    heartbeat = None
    if args.router:
        from pdserve.router.heartbeat import keep_registered

        heartbeat = functools.partial(keep_registered, args.router, advertise_url(args),
                                      args.role, eargs.deployment_secret)
    client = EngineClient(eargs, _engine_factory(args))
    drain = Drain(args.drain_timeout)
    app = build_app(client, load_tokenizer, args.served_model_name, heartbeat,
                    api_key=api_key(args), secret=eargs.deployment_secret,
                    open_metrics=args.open_metrics, drain=drain,
                    max_request_bytes=args.max_request_bytes,
                    tool_call_parser=args.tool_call_parser,
                    request_log=RequestLog(args.max_log_len) if args.log_requests else None,
                    media_limits=limits)
    config = server_config(app, host=args.host, port=args.port, log_level=args.log_level,
                           timeout_graceful_shutdown=5)
    try:  # before the engine loads: a port in use fails at once, not a minute later
        sock = config.bind_socket()
    except SystemExit:
        print(f"pdserve serve: cannot listen on {args.host}:{args.port} (in use?); choose "
              "another with --port", file=sys.stderr)
        return 1
    server = _AnnouncingServer(config, drain)
    try:
        server.run(sockets=[sock])  # SIGTERM and Ctrl-C drain, then return (see pdserve/drain.py)
    except (KeyboardInterrupt, SystemExit):  # before serving: nothing to drain
        pass
    finally:
        # stopping the engine is bounded (5 s, then SIGKILL): a further signal must not cut
        # it short and leave the engine or its shared memory behind, nor print a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        client.shutdown()
    return 0 if server.started else 1


def _engine_factory(args: argparse.Namespace):
    """The real engine, or the serving-path benchmark's stand-in (server/engine_standin.py)."""
    from pdserve.server.engine_process import default_engine_factory

    if args.engine_standin is None:
        return default_engine_factory
    from pdserve.server.engine_standin import standin_factory

    return functools.partial(standin_factory, args.engine_standin, args.engine_standin_busy)


class _AnnouncingServer(DrainingServer):
    """A uvicorn server that prints one line once it accepts connections."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            st = self.config.app.state.server
            url = f"http://{self.config.host}:{self.config.port}"
            print(f"pdserve: serving {st.served_model_name} (max_model_len "
                  f"{st.client.info.max_model_len}) at {url}/v1 - ready",
                  file=sys.stderr, flush=True)
