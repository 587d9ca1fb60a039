"""Faults under load on CPU: kill -9 of a prefill or a decode server, clients that drop
mid-stream, and a soak; each on a fresh `pdserve up` deployment.

For every scenario it prints (and writes to benchmarks/results/ as JSON): requests correct /
failed / hung / wrong (wrong = HTTP 200 whose greedy text differs from the reference run of
the same prompt, collected first on an undisturbed deployment), dropped on purpose, KV blocks
still in use once the run is over (the instances' `pdserve:kv_blocks_total` minus
`pdserve:kv_blocks_free`), /dev/shm/pdserve-kv-* files of the deployment's processes left
after `pdserve up` stopped, and its processes still alive then (orphans). The soak adds each
process's RSS at its start and end (a flat heap). Leftover files and orphans are removed after
they are counted, so that one scenario cannot spoil the next.

Scenarios (the layout is chosen so that the fault can be survived at all):
  p-kill-1p1d  the only P dies: requests must fall back to D
  p-kill-2p1d  one of two Ps dies: requests retry on the other
  d-kill-1p2d  one of two Ds dies mid-stream: its streams must resume on the other D (with a
               single D, as in 2P1D, nothing is left to resume on)
  drop-1p1d    a quarter of the clients close mid-stream, a quarter before the answer
  soak-2p1d    steady load for --soak-seconds

    python benchmarks/fault_suite.py                       # everything, 100 requests, 80 at once
    python benchmarks/fault_suite.py -n 20 -c 8 --soak-seconds 30 --scenarios p-kill-2p1d,soak-2p1d
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "pdserve-kv-"  # + "<pid of the engine that made it>-<name>"
LAYOUTS = {"1P1D": ("--prefill", "1", "--decode", "1"), "2P1D": ("--prefill", "2", "--decode", "1"),
           "1P2D": ("--prefill", "1", "--decode", "2"), "1C": ("--colocated", "1")}
TOPICS = ["the sea", "a red bicycle", "prime numbers", "the history of tea", "volcanoes",
          "a quiet library", "how bridges stand", "the moon landing", "bread baking", "owls"]
console = Console(highlight=False, width=max(Console().width, 150))


@dataclass(frozen=True)
class Scenario:
    kind: str  # p-kill, d-kill, drop, soak
    layout: str
    why: str


SCENARIOS = {
    "p-kill-1p1d": Scenario("p-kill", "1P1D", "the only prefill server is killed: fall back to D"),
    "p-kill-2p1d": Scenario("p-kill", "2P1D", "one of two prefill servers is killed: retry"),
    "d-kill-1p2d": Scenario("d-kill", "1P2D", "one of two decode servers is killed mid-stream: "
                            "its streams resume on the other (one D would leave none)"),
    "drop-1p1d": Scenario("drop", "1P1D", "a quarter of the clients close mid-stream, a "
                          "quarter before the answer"),
    "soak-2p1d": Scenario("soak", "2P1D", "steady load, C clients back to back"),
}


@dataclass
class Outcome:
    index: int
    stream: bool
    status: str  # correct, wrong, failed, hung, dropped (or "ok" in the reference run)
    seconds: float
    text: str | None = None
    error: str | None = None


@dataclass
class Report:
    """One scenario's result (what the table and the JSON show)."""

    scenario: str
    layout: str
    requests: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    leaked_blocks: dict[str, float | None] = field(default_factory=dict)
    shm_files_left: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    rss_mib: dict[str, list[float]] = field(default_factory=dict)  # soak: process -> [start, end]
    rss_series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # a few distinct failure messages
    seconds: float = 0.0


def prompt(i: int) -> str:
    return f"Request {i}. Write two sentences about {TOPICS[i % len(TOPICS)]}."


def free_port_run(run: int) -> int:
    """The first of `run` consecutive free loopback ports (the router's, then the instances'),
    below the kernel's ephemeral range."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 32000 - run)
        try:
            for i in range(run):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


def _flag(cmdline: list[str], name: str) -> str | None:
    return cmdline[cmdline.index(name) + 1] if name in cmdline[:-1] else None


def _kind(proc: psutil.Process) -> str:
    """What a server's child is: its engine, or multiprocessing's resource tracker."""
    return "resource_tracker" if "resource_tracker" in " ".join(proc.cmdline()) else "engine"


class Up:
    """One `pdserve up` and every process it started (remembered after they die)."""

    def __init__(self, layout: str, args: argparse.Namespace, log_dir: Path) -> None:
        self.layout = layout
        self.port = free_port_run(5)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.out_path = log_dir / "up.out"
        self.seen: dict[int, tuple[float, str]] = {}  # pid -> (create time, label)
        cmd = [sys.executable, "-m", "pdserve.cli", "up", *LAYOUTS[layout], "--cpu",
               "--port", str(self.port), "--log-dir", str(log_dir / "logs"),
               "--kv-cache-memory", args.kv_cache_memory, "--",
               "--max-num-seqs", str(args.max_num_seqs), "--max-model-len",
               str(args.max_model_len), "--cpu-threads", str(args.cpu_threads),
               *args.instance_arg]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            "OMP_NUM_THREADS": str(args.cpu_threads), "COLUMNS": "200"}
        if args.api_key:
            env["PDSERVE_API_KEY"] = args.api_key
        log_dir.mkdir(parents=True, exist_ok=True)
        self.cmd = cmd
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while "- ready" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pdserve up did not get ready:\n{self.output()[-3000:]}")
            time.sleep(0.5)
        self.snapshot()

    def snapshot(self) -> dict[int, str]:
        """Live processes under `up` (pid -> label), all remembered in `seen`."""
        live: dict[int, str] = {}
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return live
        for child in children:
            try:
                cmd = child.cmdline()
                role = _flag(cmd, "--role") or ("router" if "router" in cmd else child.name())
                label = f"{role}:{_flag(cmd, '--port')}"
                family = [(child, label)] + [(g, f"{label}/{_kind(g)}")
                                             for g in child.children(recursive=True)]
                for p, name in family:
                    self.seen.setdefault(p.pid, (p.create_time(), name))
                    live[p.pid] = name
            except psutil.Error:
                continue
        return live

    def servers(self, role: str) -> list[tuple[int, str]]:
        """(pid, url) of the live servers of `role` (router included), by port."""
        out = []
        for pid, label in self.snapshot().items():
            name, _, port = label.partition(":")
            if name == role and port.isdigit():
                out.append((int(port), pid))
        return [(pid, f"http://127.0.0.1:{port}") for port, pid in sorted(out)]

    def instance_urls(self) -> list[str]:
        return [url for role in ("prefill", "decode", "colocated") for _, url in self.servers(role)]

    def stop(self, timeout_s: float) -> list[str]:
        """Ctrl-C, as an operator would; SIGKILL if it hangs. Returns notes."""
        notes = []
        if self.proc.poll() is None:
            self.snapshot()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                notes.append(f"pdserve up did not stop within {timeout_s:.0f} s: SIGKILL")
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode not in (0, None):
            notes.append(f"pdserve up exited with code {self.proc.returncode}")
        time.sleep(1.0)  # let the kernel reap what did exit
        return notes

    def leftovers(self) -> tuple[list[str], list[str]]:
        """(orphans still alive, /dev/shm files of the deployment's processes) after stop."""
        orphans = []
        for pid, (created, label) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    orphans.append(f"{label} (pid {pid})")
            except psutil.Error:
                continue
        pids = {str(pid) for pid in self.seen}
        files = sorted(str(f) for f in SHM_DIR.glob(SHM_PREFIX + "*")
                       if f.name[len(SHM_PREFIX):].split("-", 1)[0] in pids)
        return orphans, files

    def clean(self) -> None:
        """Kill the orphans and remove the files just counted (the next scenario starts clean)."""
        for pid, (created, _) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    p.kill()
            except psutil.Error:
                continue
        for f in self.leftovers()[1]:
            Path(f).unlink(missing_ok=True)


class Load:
    """Greedy completions against the router; half streamed; each checked against the reference."""

    def __init__(self, url: str, args: argparse.Namespace, reference: dict[int, str] | None,
                 label: str) -> None:
        self.url, self.args, self.reference, self.label = url, args, reference, label
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.outcomes: list[Outcome] = []
        self.in_flight = 0

    def body(self, i: int, stream: bool) -> dict:
        return {"prompt": prompt(i), "max_tokens": self.args.max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": stream}

    async def one(self, client: httpx.AsyncClient, i: int, stream: bool,
                  drop: str | None = None) -> Outcome:
        """drop: None, "mid-stream" (close after 2 chunks) or "early" (close after 0.3 s)."""
        t0 = time.monotonic()
        self.in_flight += 1
        limit = 0.3 if drop == "early" else self.args.request_timeout
        try:
            work = self._stream(client, i, drop) if stream else self._whole(client, i)
            status, text, error = await asyncio.wait_for(work, limit)
        except TimeoutError:
            if drop == "early":
                return Outcome(i, stream, "dropped", time.monotonic() - t0)
            return Outcome(i, stream, "hung", time.monotonic() - t0,
                           error=f"no complete answer in {limit:.0f} s")
        except (httpx.HTTPError, httpx.StreamError, ValueError, KeyError, IndexError) as exc:
            status, text, error = "failed", None, f"{type(exc).__name__}: {exc}"[:300]
        finally:
            self.in_flight -= 1
        if status == "ok" and self.reference is not None:
            ref = self.reference.get(i)
            status = "correct" if ref is None or text == ref else "wrong"
            if status == "wrong":
                error = f"text {text!r} != reference {ref!r}"[:300]
        return Outcome(i, stream, status, time.monotonic() - t0, text, error)

    async def _whole(self, client: httpx.AsyncClient, i: int):
        resp = await client.post(self.url + "/v1/completions", json=self.body(i, False),
                                 headers=self.headers)
        if resp.status_code != 200:
            return "failed", None, f"HTTP {resp.status_code}: {resp.text[:200]}"
        out = resp.json()
        choice = out["choices"][0]
        if choice.get("finish_reason") != "length":
            return "failed", None, f"finish_reason {choice.get('finish_reason')!r}"
        if out.get("usage", {}).get("completion_tokens") != self.args.max_tokens:
            return "failed", None, f"usage {out.get('usage')}"
        return "ok", choice["text"], None

    async def _stream(self, client: httpx.AsyncClient, i: int, drop: str | None):
        async with client.stream("POST", self.url + "/v1/completions",
                                 json=self.body(i, True), headers=self.headers) as resp:
            if resp.status_code != 200:
                return "failed", None, f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            text, finish, chunks = "", None, 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    if finish != "length":
                        return "failed", None, f"stream ended with finish_reason {finish!r}"
                    return "ok", text, None
                event = json.loads(data)
                if "error" in event:
                    return "failed", None, f"error event: {json.dumps(event['error'])[:200]}"
                for choice in event.get("choices") or []:
                    text += choice.get("text") or ""
                    finish = choice.get("finish_reason") or finish
                chunks += 1
                if drop == "mid-stream" and chunks >= 2:
                    return "dropped", None, None  # leaving the block closes the connection
            return "failed", None, "stream cut before [DONE]"

    async def progress(self, total: int | None, t0: float) -> None:
        while True:
            await asyncio.sleep(self.args.progress_interval)
            counts = count(self.outcomes)
            of = f"/{total}" if total else ""
            console.print(f"  [{self.label}] {len(self.outcomes)}{of} done {counts} "
                          f"in flight {self.in_flight}, {time.monotonic() - t0:.0f} s",
                          markup=False)

    async def batch(self, n: int, drop_plan: dict[int, str] | None = None,
                    on_done=None) -> list[Outcome]:
        """n requests, at most C at once; `on_done(outcomes)` after each (the kill trigger)."""
        limit = asyncio.Semaphore(self.args.concurrency)
        t0 = time.monotonic()

        async def run(client: httpx.AsyncClient, i: int) -> None:
            async with limit:
                drop = (drop_plan or {}).get(i)
                self.outcomes.append(await self.one(client, i, i % 2 == 0, drop))
            if on_done:
                on_done(self.outcomes)

        async with self.client() as client:
            ticker = asyncio.create_task(self.progress(n, t0))
            try:
                await asyncio.gather(*(run(client, i) for i in range(n)))
            finally:
                ticker.cancel()
        return self.outcomes

    async def soak(self, seconds: float, n: int, sample) -> list[Outcome]:
        """C clients back to back for `seconds`, cycling over the n prompts."""
        t0, next_i = time.monotonic(), iter(range(10**9))

        async def client_loop(client: httpx.AsyncClient) -> None:
            while time.monotonic() - t0 < seconds:
                i = next(next_i)
                self.outcomes.append(await self.one(client, i % n, i % 2 == 0))

        async def sampler() -> None:
            while True:
                sample()
                await asyncio.sleep(self.args.rss_interval)

        async with self.client() as client:
            tasks = [asyncio.create_task(t) for t in (self.progress(None, t0), sampler())]
            try:
                await asyncio.gather(*(client_loop(client) for _ in range(self.args.concurrency)))
            finally:
                for t in tasks:
                    t.cancel()
        sample()
        return self.outcomes

    def client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.args.concurrency + 8)
        return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits)


def count(outcomes: list[Outcome]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        out[o.status] = out.get(o.status, 0) + 1
    return out


def blocks_in_use(url: str, headers: dict[str, str]) -> float | None:
    """KV blocks in use on one instance (None if it does not answer /metrics)."""
    try:
        text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    values = dict(re.findall(r"^(pdserve:kv_blocks_(?:total|free))\{[^}]*\} (\S+)$", text, re.M))
    if len(values) != 2:
        return None
    return float(values["pdserve:kv_blocks_total"]) - float(values["pdserve:kv_blocks_free"])


def wait_blocks_free(urls: list[str], headers: dict[str, str], timeout_s: float
                     ) -> dict[str, float | None]:
    """Blocks still in use per instance once the pools settle (leases expire) or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = {url: blocks_in_use(url, headers) for url in urls}
        if not any(used.values()) or time.monotonic() > deadline:
            return used
        time.sleep(1.0)


def kill_server(up: Up, role: str, report: Report, outcomes: list[Outcome]) -> None:
    servers = up.servers(role)
    if not servers:
        report.events.append(f"no live {role} server to kill")
        return
    pid, url = servers[0]
    os.kill(pid, signal.SIGKILL)  # the server process only: its engine must notice by itself
    msg = f"kill -9 {role} server {url} (pid {pid}) after {len(outcomes)} requests finished"
    report.events.append(msg)
    console.print(f"  {msg}", style="bold red", markup=False)


def run_scenario(name: str, sc: Scenario, args: argparse.Namespace, log_root: Path,
                 reference: dict[int, str] | None) -> tuple[Report, dict[int, str]]:
    """Fresh deployment, load (with the fault), settle, stop, count what is left."""
    report = Report(name, sc.layout)
    t0 = time.monotonic()
    console.rule(f"{name}: {sc.layout}, {sc.why}")
    up = Up(sc.layout, args, log_root / name)
    collected: dict[int, str] = {}
    try:
        console.print(f"  starting pdserve up (router {up.url}, logs {up.log_dir})")
        up.wait_ready(args.startup_timeout)
        console.print(f"  ready in {time.monotonic() - t0:.0f} s: {up.instance_urls()}",
                      markup=False)
        load = Load(up.url, args, reference, name)
        if sc.kind == "soak":
            rss: dict[str, list[tuple[float, float]]] = {}  # label -> [(seconds, MiB)]
            soak_t0 = time.monotonic()

            def sample() -> None:
                for pid, label in up.snapshot().items():
                    try:
                        mib = psutil.Process(pid).memory_info().rss / 2**20
                    except psutil.Error:
                        continue
                    rss.setdefault(label, []).append((round(time.monotonic() - soak_t0, 1),
                                                      round(mib, 1)))

            outcomes = asyncio.run(load.soak(args.soak_seconds, args.requests, sample))
            warm = args.soak_warmup * args.soak_seconds  # the start: after the warm-up
            for label, series in rss.items():
                start = next((m for t, m in series if t >= warm), series[-1][1])
                report.rss_mib[label] = [start, series[-1][1]]
            report.rss_series = {k: v for k, v in rss.items()}
        else:
            drop_plan, on_done = None, None
            if sc.kind == "drop":
                drop_plan = {i: ("mid-stream" if i % 2 == 0 else "early")
                             for i in range(args.requests) if i % 4 in (0, 1)}
            if sc.kind in ("p-kill", "d-kill"):
                role = "prefill" if sc.kind == "p-kill" else "decode"
                at = max(1, int(args.kill_after * args.requests))
                fired = []

                def on_done(outcomes: list[Outcome]) -> None:
                    if len(outcomes) >= at and not fired:
                        fired.append(True)
                        kill_server(up, role, report, outcomes)

            outcomes = asyncio.run(load.batch(args.requests, drop_plan, on_done))
        collected = {o.index: o.text for o in outcomes if o.status in ("ok", "correct")}
        report.requests = len(outcomes)
        report.counts = count(outcomes)
        report.errors = sorted({o.error for o in outcomes if o.error})[:5]
        urls = up.instance_urls()
        console.print(f"  load done; waiting up to {args.drain_wait:.0f} s for the KV pools "
                      "to be free")
        report.leaked_blocks = wait_blocks_free(urls, load.headers, args.drain_wait)
    except RuntimeError as exc:
        report.events.append(str(exc)[:2000])
        console.print(f"  {exc}", style="red", markup=False)
    finally:
        report.events += up.stop(args.stop_timeout)
        report.orphans, report.shm_files_left = up.leftovers()
        if not args.keep_leftovers:
            up.clean()
    report.seconds = round(time.monotonic() - t0, 1)
    return report, collected


def table(reports: list[Report]) -> Table:
    t = Table(title="fault suite")
    for col in ("scenario", "layout", "requests", "correct", "failed", "hung", "wrong",
                "dropped", "leaked blocks", "shm files left", "orphans", "s"):
        t.add_column(col, justify="left" if col in ("scenario", "layout") else "right")
    for r in reports:
        c = r.counts
        leaked = sum(v for v in r.leaked_blocks.values() if v)
        dead = sum(v is None for v in r.leaked_blocks.values())
        t.add_row(r.scenario, r.layout, str(r.requests),
                  str(c.get("correct", 0) + c.get("ok", 0)), str(c.get("failed", 0)),
                  str(c.get("hung", 0)), str(c.get("wrong", 0)), str(c.get("dropped", 0)),
                  f"{leaked:.0f}" + (f" ({dead} no answer)" if dead else ""),
                  str(len(r.shm_files_left)), str(len(r.orphans)), f"{r.seconds:.0f}")
    return t


def print_details(r: Report) -> None:
    for line in r.events:
        console.print(f"  event: {line}", markup=False)
    for line in r.errors:
        console.print(f"  e.g.: {line}", markup=False)
    for line in r.orphans:
        console.print(f"  orphan: {line}", markup=False)
    for line in r.shm_files_left:
        console.print(f"  shm left: {line}", markup=False)
    if r.rss_mib:
        t = Table(title=f"{r.scenario}: RSS (MiB)")
        for col in ("process", "start", "end", "change"):
            t.add_column(col, justify="left" if col == "process" else "right")
        for label, (start, end) in sorted(r.rss_mib.items()):
            t.add_row(label, f"{start:.0f}", f"{end:.0f}", f"{end - start:+.0f}")
        console.print(t)


def device(load_before: float) -> str:
    cpu = platform.processor() or platform.machine()
    return (f"CPU ({cpu}), {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} "
            f"GiB, Python {platform.python_version()}; 1-min load average {load_before:.1f} "
            f"before, {os.getloadavg()[0]:.1f} after (other work on the machine slows it all)")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, text=True,
                               capture_output=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("-n", "--requests", type=int, default=100,
                   help="requests per scenario (and distinct prompts; the soak cycles them)")
    p.add_argument("-c", "--concurrency", type=int, default=80, help="requests at once")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (greedy, "
                   "EOS ignored, so every answer has exactly this many)")
    p.add_argument("--soak-seconds", type=float, default=300.0, help="length of the soak")
    p.add_argument("--soak-warmup", type=float, default=0.1, metavar="FRACTION",
                   help="soak: the RSS 'start' is the first sample after this fraction of it "
                   "(allocators grow during the first requests)")
    p.add_argument("--kill-after", type=float, default=0.1, metavar="FRACTION",
                   help="kill scenarios: kill once this fraction of the requests finished "
                   "(the rest are in flight or still to come)")
    p.add_argument("--reference-layout", default="1P1D", choices=sorted(LAYOUTS),
                   help="the undisturbed deployment that gives each prompt's reference text")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds after which a request that has not finished counts as hung")
    p.add_argument("--drain-wait", type=float, default=45.0,
                   help="seconds to wait after the load for the KV pools to be all free "
                   "(a lease that no D pulled lasts --kv-lease-ttl-s, 30 s by default)")
    p.add_argument("--max-num-seqs", type=int, default=128, help="per instance")
    p.add_argument("--max-model-len", type=int, default=512, help="per instance")
    p.add_argument("--kv-cache-memory", default="256MiB", help="per instance")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads per engine")
    p.add_argument("--instance-arg", action="append", default=[], metavar="FLAG",
                   help="an extra flag for every `pdserve serve` (repeat; e.g. "
                   "--instance-arg=--kv-lease-ttl-s --instance-arg=10)")
    p.add_argument("--api-key", default=None, help="the deployment's client API key (sent "
                   "as Bearer on every request, /metrics included; set as $PDSERVE_API_KEY)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--stop-timeout", type=float, default=90.0,
                   help="seconds `pdserve up` gets to stop after Ctrl-C before SIGKILL")
    p.add_argument("--progress-interval", type=float, default=5.0)
    p.add_argument("--rss-interval", type=float, default=5.0, help="soak: RSS sampling period")
    p.add_argument("--keep-leftovers", action="store_true",
                   help="leave orphans and /dev/shm files in place (default: removed once "
                   "counted)")
    p.add_argument("--log-dir", default=None, help="default: a new folder under /tmp")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fault_suite_cpu.json"))
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_root = Path(args.log_dir or f"/tmp/pdserve-fault-suite-{int(time.time())}")
    started, load_before = datetime.now(UTC), os.getloadavg()[0]
    console.print(f"fault suite: {args.scenarios}, {args.requests} requests, "
                  f"{args.concurrency} at once, max_tokens {args.max_tokens}; logs {log_root}")
    ref_name = f"reference-{args.reference_layout.lower()}"
    ref_sc = Scenario("reference", args.reference_layout, "undisturbed: the reference texts")
    ref_report, reference = run_scenario(ref_name, ref_sc, args, log_root, None)
    reports = [ref_report]
    console.print(table([ref_report]))
    print_details(ref_report)
    missing = args.requests - len(reference)
    if missing:
        console.print(f"[yellow]reference: {missing} prompts without a reference text "
                      "(their answers count as correct whatever they say)[/yellow]")
    for name in args.scenarios:
        report, _ = run_scenario(name, SCENARIOS[name], args, log_root, reference)
        reports.append(report)
        console.print(table([report]))
        print_details(report)
    console.rule("summary")
    console.print(table(reports))
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "device": device(load_before),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "params": {k: v for k, v in vars(args).items() if k not in ("api_key", "out")},
        "reference_missing": missing,
        "scenarios": [asdict(r) for r in reports],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
