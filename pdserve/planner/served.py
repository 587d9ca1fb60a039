"""What serving adds to the runner's step time, measured on a real `pdserve serve`.

The step-time model (engine/step_time.py) times the runner alone. A client also waits for
what lies around it: the engine loop's scheduling and sampling, the engine->server pipe,
detokenizing, one SSE event per token, and per request the HTTP call, tokenizing and
admission. `measure_router_overhead` measures what a real router in front adds to a first
token. `measure_serving` starts one real instance on the profiled thread count, streams
a few requests of known shapes through it, and fits

    served step  = runner step + step_s + row_s * (tokens the step streams)
    first token  = request_s + served step of the whole prompt

from the gaps a client sees. The simulator adds the same terms (planner/instance.py).
step_s may come out negative: the runner's linear fit over all shapes can over-predict the
small decode steps a server mostly runs, and the served probe is the better witness of those;
a served step is never predicted below MIN_FRACTION of the runner's.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

import httpx

from pdserve.cpu_affinity import format_cpu_list, usable_cpus
from pdserve.engine.step_time import StepShape, StepTimeModel
from pdserve.security import SECRET_ENV

PROMPT_LEN = 64  # decode probes: a short prompt, so that the steps are decode steps
OUTPUT_LEN = 32
BATCHES = (1, 4, 8)  # concurrent streams: the per-row term needs several batch sizes
FIRST_TOKEN_PROMPTS = (32, 256)  # lone prompts for the per-request term
TOKEN_ID_BASE = 1000  # prompt ids from the middle of the vocabulary: ordinary words
_PROMPT_SEEDS = itertools.count(1)  # every probe's prompt differs from its first token on
MIN_FRACTION = 0.5  # a served step is at least this share of the runner's prediction


@dataclass
class ServingOverhead:
    """Seconds serving adds: per step, per streamed token of a step, per request."""

    step_s: float = 0.0  # may be < 0: a correction of the runner's fit (module doc)
    row_s: float = 0.0
    request_s: float = 0.0
    measured: bool = False  # False: nothing measured, every term 0
    probes: list[dict] = field(default_factory=list)  # what the client saw, for the record

    def served_seconds(self, runner_s: float, rows: int) -> float:
        """A step the runner takes `runner_s` for, streaming `rows` tokens, as served."""
        return max(runner_s + self.step_s + self.row_s * rows, MIN_FRACTION * runner_s)


@dataclass
class Probe:
    """One batch of concurrent streams: what the client saw."""

    prompt_len: int
    streams: int
    first_token_s: float  # mean over streams: send to first event
    decode_step_s: float  # mean over streams: (last event - first) / (tokens - 1)


def measure_serving(model: StepTimeModel, threads: int | None, model_name: str | None,
                    timeout_s: float = 300.0) -> ServingOverhead:
    """Start `pdserve serve` on `threads` threads (pinned to the first usable cores on a
    CPU; `threads=None`: a GPU instance), probe it, fit the overhead against `model`."""
    with _Instance(threads, model_name, timeout_s) as url:
        _stream(url, 16, 4)  # warm: the first request pays for lazy set-up
        decode = [_batch(url, PROMPT_LEN, OUTPUT_LEN, b) for b in BATCHES]
        first = [_batch(url, n, 2, 1) for n in FIRST_TOKEN_PROMPTS]
    return fit_overhead(model, decode, first)


def fit_overhead(model: StepTimeModel, decode: list[Probe], first: list[Probe]
                 ) -> ServingOverhead:
    """Least squares of (seen - runner) = step_s + row_s * rows over the decode probes
    (row_s >= 0); request_s (>= 0) from the lone prompts' first tokens."""
    xs, ys = [], []
    for p in decode:
        shape = StepShape()
        for _ in range(p.streams):
            shape.add_decode(p.prompt_len + OUTPUT_LEN // 2)
        xs.append(p.streams)
        ys.append(p.decode_step_s - model.seconds(shape))
    row_s = _slope(xs, ys)
    step_s = statistics.fmean(y - row_s * x for x, y in zip(xs, ys))
    fitted = ServingOverhead(step_s, row_s, 0.0, True, [asdict(p) for p in decode + first])
    request = []
    for p in first:
        shape = StepShape()
        shape.add_prefill(p.prompt_len, 0)
        request.append(p.first_token_s - fitted.served_seconds(model.seconds(shape), 1))
    fitted.request_s = max(statistics.fmean(request), 0.0)
    return fitted


def _slope(xs: list[int], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return max(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var, 0.0) if var else 0.0


def _batch(url: str, prompt_len: int, output_len: int, streams: int) -> Probe:
    """`streams` concurrent streamed completions sent at once."""
    results: list[tuple[float, float] | BaseException] = [None] * streams  # type: ignore

    def one(i: int) -> None:
        try:
            results[i] = _stream(url, prompt_len, output_len)
        except BaseException as exc:  # surfaced below, on the caller's thread
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise RuntimeError(f"a serving probe failed: {r}") from r
    return Probe(prompt_len, streams, statistics.fmean(r[0] for r in results),
                 statistics.fmean(r[1] for r in results))


def _stream(url: str, prompt_len: int, output_len: int) -> tuple[float, float]:
    """(seconds to the first event, mean seconds per later token) of one stream, of a prompt
    no earlier probe shares a token of (a prefix-cache hit would shorten its first token)."""
    seed = next(_PROMPT_SEEDS)
    prompt = [TOKEN_ID_BASE + (seed * 7919 + i * 31) % 8000 for i in range(prompt_len)]
    body = {"prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    events, tokens = [], output_len
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120.0) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                events.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if not events:
        raise RuntimeError("the instance streamed no token")
    per_token = (events[-1] - events[0]) / (tokens - 1) if tokens > 1 else 0.0
    return events[0] - start, per_token


def measure_router_overhead(threads: int | None, model_name: str | None, repeats: int = 4,
                            timeout_s: float = 300.0) -> tuple[float, list[dict]]:
    """Seconds a `pdserve router` in front of an instance adds to a first token (the lone
    prompts, alternately through the router and straight to the instance), and the probes."""
    env = {SECRET_ENV: secrets.token_hex(32)}  # the router's calls to the instance are signed
    with _Instance(threads, model_name, timeout_s, env=env) as url:
        with _Instance(None, None, timeout_s, env=env, command=["router", "--colocated", url],
                       ok=(200,)) as router:
            _stream(router, 16, 4)  # warm both
            probes = []
            for _ in range(repeats):
                for n in FIRST_TOKEN_PROMPTS:
                    direct = _stream(url, n, 2)[0]
                    routed = _stream(router, n, 2)[0]
                    probes.append({"prompt_len": n, "direct_s": direct, "routed_s": routed})
    extra = statistics.median(p["routed_s"] - p["direct_s"] for p in probes)
    return max(extra, 0.0), probes


class _Instance:
    """A `pdserve serve` (or, with `command`, another pdserve server) subprocess on a free
    port, stopped on exit."""

    def __init__(self, threads: int | None, model_name: str | None, timeout_s: float,
                 env: dict[str, str] | None = None, command: list[str] | None = None,
                 ok: tuple[int, ...] = (200,)):
        self.threads, self.model_name, self.timeout_s = threads, model_name, timeout_s
        self.env, self.command, self.ok = env or {}, command or ["serve"], ok

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "pdserve.cli", *self.command, "--port", str(port)]
        if self.model_name:
            cmd += ["--model", self.model_name]
        if self.threads is not None:
            cores = sorted(usable_cpus())[:self.threads]
            cmd += ["--device", "cpu", "--cpu-threads", str(self.threads),
                    "--cpu-affinity", format_cpu_list(set(cores))]
        self.log = tempfile.NamedTemporaryFile("w+b", prefix="pdserve-plan-serve-",
                                               suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdserve serve exited; see {self.log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code in self.ok:
                    return url  # requests name no model: the instance serves one
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"pdserve serve was not healthy in {self.timeout_s:.0f} s; see "
                           f"{self.log.name}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if exc[0] is None:
            os.unlink(self.log.name)
