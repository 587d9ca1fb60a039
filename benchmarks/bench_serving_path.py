"""How promptly does pdserve's serving path deliver tokens? (issue #14: one event per token)

A real instance (`pdserve serve`: FastAPI app, EngineClient, engine process) and a real
router (`pdserve router`) in front of it, but the engine process runs a stand-in
(`--engine-standin T_MS`, pdserve/server/engine_standin.py) that gives every running request
one token each T ms, as real RequestOutput deltas; the server's detokenizer (the embedded
model's tokenizer), SSE, metrics and the router's relay run unchanged. So whatever the client
sees beyond "one token each T ms" is the serving path's doing.

A real streaming client (httpx, one process) runs 1..64 concurrent /v1/completions streams
and stamps each read off the socket. Reported, through the instance and through the router:

  tok/event   tokens per SSE event, mean and max (1.0 = no bunching)
  add p50/p99 the latency the path adds: the gap between a stream's consecutive token
              events minus T, in ms (first token excluded)
  cpu us/tok  CPU time per token of the server process (HTTP side), the engine process and
              the router (psutil, over the run)
  wakes/tok   voluntary context switches per token, all threads of each process: the
              hand-offs between threads and processes (robust to a loaded machine)

Targets (issue #14), at T = 5 ms and up to 64 streams: <= 1.05 tok/event, add p99 <= 1 ms
through an instance and <= 2 ms through the router. The load average of the machine goes
into the JSON: on a shared, loaded machine the tails are the machine's as much as pdserve's.

    python benchmarks/bench_serving_path.py [--quick] [--t-ms 2 5 20] [--streams 1 8 64]
    python benchmarks/bench_serving_path.py --quick --repo /tmp/old-checkout  # before/after

Writes benchmarks/results/serving_path_cpu.json (--out to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import httpx
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "benchmarks", "results", "serving_path_cpu.json")
PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun."
CODE = REPO  # the pdserve checkout whose servers run (--repo)
MODEL: str | None = None  # --model: a folder instead of the embedded model
CLIENT_PROCS = 1  # --client-procs
SECRET = "bench-serving-path-deployment-secret-0123456789"  # router -> instance signing


@dataclass
class Proc:
    """A server process of the benchmark and the pids whose CPU time it reports."""

    url: str
    popen: subprocess.Popen
    pids: dict[str, int] = field(default_factory=dict)  # role -> pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


@dataclass
class Result:
    """One (path, T, streams) run."""

    path: str  # "instance" or "router"
    t_ms: float
    streams: int
    tokens: int
    events: int
    tok_per_event_mean: float
    tok_per_event_max: int
    added_ms_p50: float
    added_ms_p99: float
    added_ms_max: float
    cpu_us_per_token: dict[str, float]
    wakes_per_token: dict[str, float]
    failed_streams: int  # refused (e.g. a router that saw its instance as down) or broken
    loadavg_1m: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (CODE, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PDSERVE_DEPLOYMENT_SECRET": SECRET,
            "OMP_NUM_THREADS": "1"}


def _spawn(*args: str) -> Proc:
    port = _free_port()
    cmd = [sys.executable, "-m", "pdserve.cli", *args, "--port", str(port)]
    popen = subprocess.Popen(cmd, cwd=CODE, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    return Proc(f"http://127.0.0.1:{port}", popen, {args[0]: popen.pid})


def _wait_healthy(proc: Proc, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.url} exited with {proc.popen.returncode}")
        try:
            resp = httpx.get(proc.url + "/health", timeout=2)
            if resp.status_code == 200:
                return resp.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{proc.url} did not become healthy")


def start_instance(t_ms: float, busy: float) -> Proc:
    inst = _spawn("serve", "--engine-standin", str(t_ms), "--engine-standin-busy", str(busy),
                  "--max-num-seqs", "256", *(["--model", MODEL] if MODEL else []))
    inst.pids["engine"] = _wait_healthy(inst)["engine_pid"]
    return inst


def start_router(inst: Proc) -> Proc:
    router = _spawn("router", "--colocated", inst.url)
    _wait_healthy(router)
    return router


async def _one_stream(client: httpx.AsyncClient, url: str, max_tokens: int,
                      reads: list[tuple[float, bytes]]) -> bool:
    """One stream, its reads stamped into `reads`; False if it was refused or broke."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
            "return_token_ids": True, "ignore_eos": True}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return False
            async for chunk in resp.aiter_raw():
                reads.append((time.monotonic(), chunk))  # parsed later: the loop only stamps
    except httpx.HTTPError:
        return False
    return True


async def _run_streams(url: str, streams: int, max_tokens: int) -> tuple[list[list], int]:
    """Each stream's stamped reads, and how many streams failed."""
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        per_stream: list[list] = [[] for _ in range(streams)]
        ok = await asyncio.gather(*(_one_stream(client, url, max_tokens, r)
                                    for r in per_stream))
    return per_stream, ok.count(False)


def _streams_in_process(url: str, streams: int, max_tokens: int) -> tuple[list[list], int]:
    return asyncio.run(_run_streams(url, streams, max_tokens))


def _client_streams(url: str, streams: int, max_tokens: int) -> tuple[list[list], int]:
    """The streams, split over CLIENT_PROCS client processes: one Python process stamping
    12,800 events a second is itself busy enough to add to the gaps it measures."""
    procs = max(1, min(CLIENT_PROCS, streams))
    if procs == 1:
        return _streams_in_process(url, streams, max_tokens)
    shares = [streams // procs + (i < streams % procs) for i in range(procs)]
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = list(pool.map(_streams_in_process, [url] * procs, shares,
                             [max_tokens] * procs))
    return [s for per_stream, _ in done for s in per_stream], sum(f for _, f in done)


def _events(reads: list[tuple[float, bytes]]) -> list[tuple[float, int]]:
    """(time the event's last byte arrived, its token count) of each token-carrying event."""
    out, buf = [], b""
    for t, chunk in reads:
        buf += chunk
        *complete, buf = buf.split(b"\n\n")
        for ev in complete:
            if not ev.startswith(b"data: {"):
                continue
            choices = json.loads(ev[len(b"data: "):]).get("choices") or []
            n = sum(len(c.get("token_ids") or []) for c in choices)
            if n:
                out.append((t, n))
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(int(q * len(s)), len(s) - 1)]


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for role, pid in pids.items():
        t = psutil.Process(pid).cpu_times()
        out[role] = t.user + t.system
    return out


def _wakes(pids: dict[str, int]) -> dict[str, int]:
    """Voluntary context switches of all threads of each process."""
    out = {}
    for role, pid in pids.items():
        out[role] = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        out[role] += int(line.split()[1])
    return out


def measure(path: str, url: str, pids: dict[str, int], t_ms: float, streams: int,
            max_tokens: int) -> Result:
    asyncio.run(_run_streams(url, 1, 4))  # warm: connections, imports, first-request paths
    before, wakes_before = _cpu(pids), _wakes(pids)
    per_stream, failed = _client_streams(url, streams, max_tokens)
    after, wakes_after = _cpu(pids), _wakes(pids)
    tokens, sizes, added = 0, [], []
    for reads in per_stream:
        evs = _events(reads)
        tokens += sum(n for _, n in evs)
        sizes += [n for _, n in evs]
        added += [(b[0] - a[0]) * 1e3 - t_ms for a, b in zip(evs, evs[1:], strict=False)]
    cpu = {role: (after[role] - before[role]) / max(tokens, 1) * 1e6 for role in pids}
    wakes = {role: (wakes_after[role] - wakes_before[role]) / max(tokens, 1) for role in pids}
    return Result(path, t_ms, streams, tokens, len(sizes), sum(sizes) / max(len(sizes), 1),
                  max(sizes, default=0), _pct(added, 0.5), _pct(added, 0.99),
                  max(added, default=float("nan")), cpu, wakes, failed,
                  os.getloadavg()[0])


def _print(r: Result) -> None:
    cpu = " ".join(f"{k}={v:.0f}" for k, v in r.cpu_us_per_token.items())
    wakes = " ".join(f"{k}={v:.2f}" for k, v in r.wakes_per_token.items())
    print(f"{r.path:9s} T={r.t_ms:4.0f}ms streams={r.streams:3d}  tok/event "
          f"{r.tok_per_event_mean:5.3f} (max {r.tok_per_event_max})  add p50 "
          f"{r.added_ms_p50:6.2f} p99 {r.added_ms_p99:6.2f} max {r.added_ms_max:6.1f} ms  "
          f"cpu us/tok {cpu}  wakes/tok {wakes}  load {r.loadavg_1m:.1f}"
          + (f"  FAILED {r.failed_streams}" if r.failed_streams else ""), flush=True)


def run(t_values: list[float], streams: list[int], seconds: float, paths: list[str],
        busy: float) -> list[Result]:
    results = []
    for t_ms in t_values:
        max_tokens = max(int(seconds * 1000 / t_ms), 20)
        inst = start_instance(t_ms, busy)
        router = start_router(inst) if "router" in paths else None
        try:
            for n in streams:
                if "instance" in paths:
                    results.append(measure("instance", inst.url, inst.pids, t_ms, n,
                                           max_tokens))
                    _print(results[-1])
                if router is not None:
                    pids = {**inst.pids, **router.pids}
                    results.append(measure("router", router.url, pids, t_ms, n, max_tokens))
                    _print(results[-1])
        finally:
            if router is not None:
                router.stop()
            inst.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a short run: T = 5 ms, 1 and 64 streams, ~1 s each")
    ap.add_argument("--t-ms", type=float, nargs="+", default=[2, 5, 20],
                    help="the stand-in's time per token, ms")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64],
                    help="concurrent streams")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each stream")
    ap.add_argument("--paths", nargs="+", choices=["instance", "router"],
                    default=["instance", "router"], help="through which to measure")
    ap.add_argument("--busy", type=float, default=0.0,
                    help="the fraction of each stand-in step spent in Python (GIL held), as "
                    "a real engine's host thread: 0 = it sleeps the whole step")
    ap.add_argument("--model", default=None,
                    help="a folder with the model's config.json and tokenizer (no weights: the "
                    "stand-in computes nothing), for a machine without the embedded model's "
                    "package; default: the embedded SmolLM2")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="split the streams over this many client processes (on a machine "
                    "with cores to spare: one process stamping 64 streams' events is busy "
                    "enough to add latency of its own)")
    ap.add_argument("--label", default="", help="a note stored with the results")
    ap.add_argument("--out", default=OUT, help="where the JSON goes")
    ap.add_argument("--repo", default=REPO,
                    help="the pdserve checkout whose servers to measure (an older commit's "
                    "export, for before/after figures); default: this one")
    args = ap.parse_args()
    global CODE, MODEL, CLIENT_PROCS
    CODE = os.path.abspath(args.repo)
    CLIENT_PROCS = args.client_procs
    MODEL = args.model and os.path.abspath(args.model)
    if args.quick:
        args.t_ms, args.streams, args.seconds = [5], [1, 64], 1.0
    load_before = os.getloadavg()
    results = run(args.t_ms, args.streams, args.seconds, args.paths, args.busy)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "label": args.label,
        "repo": CODE,
        "model": MODEL or "embedded SmolLM2",
        "client_procs": CLIENT_PROCS,
        "standin_busy": args.busy,
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "targets": {"t_ms": 5, "max_streams": 64, "tok_per_event": 1.05,
                    "added_p99_ms_instance": 1.0, "added_p99_ms_router": 2.0},
        "results": [asdict(r) for r in results],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
