"""What serving adds to the runner's step time, measured on a real `pdserve serve`.

The step-time model (engine/step_time.py) times the runner alone. A client also waits for
what lies around it: the engine loop's scheduling and sampling, the engine->server pipe,
detokenizing, one SSE event per token, and per request the HTTP call, tokenizing and
admission. `measure_router_overhead` measures what a real router in front adds to a first
token. `measure_serving` starts one real instance on each profiled thread count, streams
a few requests of known shapes through them, and fits

    served step  = runner step + step_s + row_s * (tokens the step streams)
    first token  = request_s + served step of the whole prompt

from the gaps a client sees. The simulator adds the same terms (planner/instance.py).
step_s and row_s may come out negative: they correct the runner's linear fit over all shapes,
which can miss the small decode steps a server mostly runs (on the 2-core EPYC of 2026-12-07
it put 46 / 66 / 86 ms on steps of 1 / 4 / 8 streams the client saw take 54 / 62 / 72 ms),
and the served probes are the better witness of those. The correction is not extrapolated
past the most streams probed, and a served step is never predicted below MIN_FRACTION of the
runner's.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.console import Console

from pdserve.cpu_affinity import format_cpu_list, usable_cpus
from pdserve.engine.step_time import StepShape, StepTimeModel
from pdserve.launch.procs import Deployment, Proc, free_port
from pdserve.planner.typical import typical
from pdserve.security import SECRET_ENV

PROMPT_LEN = 64  # decode probes: a short prompt, so that the steps are decode steps
OUTPUT_LEN = 32
BATCHES = (1, 4, 8)  # concurrent streams: the per-row term needs several batch sizes
FIRST_TOKEN_PROMPTS = (32, 256)  # lone prompts for the per-request term
TOKEN_ID_BASE = 1000  # prompt ids from the middle of the vocabulary: ordinary words
_PROMPT_SEEDS = itertools.count(1)  # every probe's prompt differs from its first token on
MIN_FRACTION = 0.5  # a served step is at least this share of the runner's prediction
REPEATS = 3  # rounds of probes over every shape; a shape's are averaged (typical.py)


@dataclass
class ServingOverhead:
    """Seconds serving adds: per step, per streamed token of a step, per request."""

    step_s: float = 0.0  # may be < 0: a correction of the runner's fit (module doc)
    row_s: float = 0.0  # may be < 0 too
    request_s: float = 0.0
    measured: bool = False  # False: nothing measured, every term 0
    probes: list[dict] = field(default_factory=list)  # what the client saw, for the record
    probed_rows: int = 0  # the most streams probed: row_s holds up to there (0: no bound)

    def served_seconds(self, runner_s: float, rows: int) -> float:
        """A step the runner takes `runner_s` for, streaming `rows` tokens, as served."""
        if self.probed_rows:
            rows = min(rows, self.probed_rows)
        return max(runner_s + self.step_s + self.row_s * rows, MIN_FRACTION * runner_s)


@dataclass
class Probe:
    """One batch of concurrent streams: what the client saw."""

    prompt_len: int
    streams: int
    first_token_s: float  # mean over streams: send to first event
    decode_step_s: float  # mean over streams: (last event - first) / (tokens - 1)


def measure_serving(models: dict[int, StepTimeModel], cpu_threads: bool,
                    model_name: str | None, timeout_s: float = 300.0,
                    tokenizer: str | None = None, repeats: int = REPEATS
                    ) -> dict[int, ServingOverhead]:
    """For each parallelism of `models` (threads, pinned to the first usable cores, when
    `cpu_threads`; else the one GPU instance), start `pdserve serve`, probe it, and fit the
    overhead against its model. The instances run side by side, probed one at a time in
    `repeats` rounds over every shape, so that a shape's probes spread over most of a minute
    (a round of both instances took ~15 s on the 2-core EPYC) and their mean (typical.py) is
    the host's typical speed, not its best moment."""
    shapes = [(PROMPT_LEN, OUTPUT_LEN, b) for b in BATCHES] + \
        [(n, 2, 1) for n in FIRST_TOKEN_PROMPTS]
    taken: dict[tuple[int, int], list[Probe]] = {}
    with ExitStack() as stack:
        urls = {units: stack.enter_context(probed_servers(units if cpu_threads else None,
                                                          model_name, timeout_s,
                                                          tokenizer=tokenizer))[0]
                for units in models}
        for url in urls.values():
            stream_once(url, 16, 4)  # warm: the first request pays for lazy set-up
        for _ in range(max(repeats, 1)):
            for units, url in urls.items():
                for i, shape in enumerate(shapes):
                    taken.setdefault((units, i), []).append(_batch(url, *shape))
    fitted = {}
    for units, model in models.items():
        probes = [typical_probe(taken[units, i]) for i in range(len(shapes))]
        fitted[units] = fit_overhead(model, probes[:len(BATCHES)], probes[len(BATCHES):])
    return fitted


def repeated_probe(url: str, prompt_len: int, output_len: int, streams: int, repeats: int
                   ) -> Probe:
    """`repeats` batches of one shape, back to back; their typical_probe."""
    return typical_probe([_batch(url, prompt_len, output_len, streams)
                          for _ in range(max(repeats, 1))])


def typical_probe(probes: list[Probe]) -> Probe:
    """Probes of one shape, averaged without their stalls (typical.py): another process's
    burst only ever makes a probe slower (one 8-stream probe of a 2-thread instance once
    took 133 ms a step where its neighbours said 80)."""
    first = probes[0]
    return Probe(first.prompt_len, first.streams, typical([p.first_token_s for p in probes]),
                 typical([p.decode_step_s for p in probes]))


def split_probes(probes: list[dict]) -> tuple[list[Probe], list[Probe]]:
    """A profile's kept probes (`ServingOverhead.probes`) as `measure_serving` took them:
    the decode probes (PROMPT_LEN-token prompts, BATCHES streams), then the lone prompts."""
    kept = [Probe(**p) for p in probes]
    return ([p for p in kept if p.prompt_len == PROMPT_LEN],
            [p for p in kept if p.prompt_len != PROMPT_LEN])


def fit_overhead(model: StepTimeModel, decode: list[Probe], first: list[Probe]
                 ) -> ServingOverhead:
    """Least squares of (seen - runner) = step_s + row_s * rows over the decode probes;
    request_s (>= 0) from the lone prompts' first tokens."""
    xs, ys = [], []
    for p in decode:
        shape = StepShape()
        for _ in range(p.streams):
            shape.add_decode(p.prompt_len + OUTPUT_LEN // 2)
        xs.append(p.streams)
        ys.append(p.decode_step_s - model.seconds(shape))
    row_s = _slope(xs, ys)
    step_s = statistics.fmean(y - row_s * x for x, y in zip(xs, ys))
    fitted = ServingOverhead(step_s, row_s, 0.0, True, [asdict(p) for p in decode + first],
                             probed_rows=max(xs, default=0))
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
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def _batch(url: str, prompt_len: int, output_len: int, streams: int) -> Probe:
    """`streams` concurrent streamed completions sent at once."""
    results: list[tuple[float, float] | BaseException] = [None] * streams  # type: ignore

    def one(i: int) -> None:
        try:
            results[i] = stream_once(url, prompt_len, output_len)
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


def stream_once(url: str, prompt_len: int, output_len: int) -> tuple[float, float]:
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
                            timeout_s: float = 300.0, tokenizer: str | None = None
                            ) -> tuple[float, list[dict]]:
    """Seconds a `pdserve router` in front of an instance adds to a first token (the lone
    prompts, alternately through the router and straight to the instance), and the probes."""
    with probed_servers(threads, model_name, timeout_s, with_router=True,
                        tokenizer=tokenizer) as (url, router):
        stream_once(router, 16, 4)  # warm both
        probes = []
        for _ in range(repeats):
            for n in FIRST_TOKEN_PROMPTS:
                direct = stream_once(url, n, 2)[0]
                routed = stream_once(router, n, 2)[0]
                probes.append({"prompt_len": n, "direct_s": direct, "routed_s": routed})
    extra = statistics.median(p["routed_s"] - p["direct_s"] for p in probes)
    return max(extra, 0.0), probes


@contextmanager
def probed_servers(threads: int | None, model_name: str | None, timeout_s: float,
                   with_router: bool = False, tokenizer: str | None = None
                   ) -> Iterator[tuple[str, str]]:
    """(instance URL, router URL or "") of a `pdserve serve` on free ports (pinned to the
    first `threads` cores on a CPU; None: a GPU instance), with a router in front of it if
    asked; started and stopped as `pdserve up` starts and stops its processes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           SECRET_ENV: secrets.token_hex(32)}  # the router's calls to the instance are signed
    logs = Path(tempfile.mkdtemp(prefix="pdserve-plan-serve-"))
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port)]
    if model_name:
        cmd += ["--model", model_name]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    if threads is not None:
        cores = format_cpu_list(set(sorted(usable_cpus())[:threads]))
        cmd += ["--device", "cpu", "--cpu-threads", str(threads), "--cpu-affinity", cores]
    procs = [Proc("instance", "colocated", url, "", cmd, env, logs / "instance.log")]
    router = ""
    if with_router:
        port = free_port("127.0.0.1")
        router = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "pdserve.cli", "router", "--colocated", url,
               "--port", str(port)]
        procs.append(Proc("router", "router", router, "", cmd, env, logs / "router.log",
                          wave=1))
    dep = Deployment(procs, Console(stderr=True))
    try:
        dep.start(timeout_s)  # raises, with the log's tail, if one dies or stays unhealthy
        yield url, router  # requests name no model: the instance serves one
    finally:
        dep.stop()  # the router first; what outlives the grace is killed with its group
    shutil.rmtree(logs)  # kept when the probe failed: the logs say why
