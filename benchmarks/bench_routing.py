"""Routing policies side by side (issue #15): prefix-cache hits and TTFT over 2 colocated
instances, and the router's own cost per request.

For each workload (shared-prefix groups interleaved, multi-turn chat, random prompts with no
sharing) and each policy (cache_aware, least_loaded, round_robin), two fresh colocated
instances of the embedded SmolLM2 (CPU, one torch thread each, pinned to a core each where
`taskset` exists) and a router with that policy; `pdserve bench run` sends the same seeded
requests at a fixed Poisson rate. Reported: prefix-cache hit tokens (the instances'
usage.cached_tokens), their share of an oracle's (every prompt where its longest cached
prefix is: one infinite cache holding every earlier prompt), mean and P99 TTFT.

The router's cost: tokenize (the instances' own code), hash the blocks and look them up in an
index of 2 instances, in-process, for 1k- and 8k-token prompts (median of 20).

    python benchmarks/bench_routing.py [--rate 0.25] [--workloads ...] [--policies ...]
        [--groups 8 --kv-cache-memory 128MiB]

With --groups 8 and 128 MiB of KV cache per instance (2,900 tokens), the prefixes (8 x 512,
or 8 conversations of ~600 tokens) overflow one instance's cache but fit two: the regime
where routing decides the hit rate, as a fleet of many instances is.

`--pd-mix`: instead, a prefill and a decode instance, prompts of 40..760 tokens, and the
P/D decision always (disaggregate every prompt), never (every prompt whole on D) and
conditional: mean TTFT and P99 ITL; `--pd-max-stall-ms 1000` adds conditional with that
stall bound. Each run also records the router's measured rates and hops and the largest
inter-token gaps (chunk 0: the hop from P's token to D's first). `--passes 2` runs every
variant twice, in forward then reverse order, and pools each variant's requests and gaps
over its passes: a machine that slows during the run (a shared host drifts 20-30% within an
hour) then charges every variant alike, where one pass charges the last variants most.
`--mix-shape bimodal`: chat turns (8-32 tokens) and documents (400-760) with even odds,
replayed as a trace at `--rate`. The run ends with each conditional variant against always
and never, request by request, with bootstrap 95% intervals (`paired`).

Writes benchmarks/results/routing_cpu.json (routing_pd_mix_cpu.json). On a shared, loaded
machine: smoke figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from statistics import median

import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "benchmarks", "results", "routing_cpu.json")
SECRET = "bench-routing-deployment-secret-0123456789"
POLICIES = ("cache_aware", "least_loaded", "round_robin")
WORKLOADS = ("shared-prefix", "multi-turn", "random", "mix")


def workload_flags(name: str, groups: int = 4, per_group: int = 4, mix_prompts: int = 20
                   ) -> list[str]:
    """`pdserve bench run` flags of a workload; `groups`: prefix groups or conversations,
    `per_group`: prompts of a group or turns of a conversation (each instance runs on one
    thread; prefixes are as long as system prompts are)."""
    return {
        "shared-prefix": ["--dataset-name", "shared-prefix", "--gsp-num-groups", str(groups),
                          "--gsp-prompts-per-group", str(per_group),
                          "--gsp-system-prompt-len", "512", "--gsp-question-len", "32",
                          "--gsp-output-len", "4"],
        "multi-turn": ["--dataset-name", "multi-turn", "--mt-num-conversations", str(groups),
                       "--mt-turns", str(per_group), "--mt-system-prompt-len", "384",
                       "--mt-turn-len", "48", "--mt-output-len", "4"],
        "random": ["--dataset-name", "random", "--num-prompts", str(per_group * groups),
                   "--random-input-len", "256", "--random-output-len", "4"],
        # short and long prompts mixed, for the P/D decision (1P1D)
        "mix": ["--dataset-name", "random", "--num-prompts", str(mix_prompts),
                "--random-input-len", "400",
                "--random-range-ratio", "0.9", "--random-output-len", "32"],
    }[name]


BIMODAL_SHORT = (8, 32)  # prompt tokens of a chat turn
BIMODAL_LONG = (400, 760)  # a document


def bimodal_trace(path: str, num: int, rate: float, seed: int = 1) -> list[str]:
    """Write a Mooncake-format trace of `num` requests, Poisson at `rate`, each prompt short
    or long with even odds (32 output tokens), no prefix shared; its `bench run` flags. The
    uniform mix has few prompts short enough to skip P; chat turns beside documents is the
    traffic the conditional decision is for (a short turn queued behind a document on P)."""
    rng = np.random.default_rng(seed)
    clock = np.cumsum(rng.exponential(1.0 / rate, num))
    with open(path, "w") as f:
        for t in clock:
            low, high = BIMODAL_SHORT if rng.random() < 0.5 else BIMODAL_LONG
            f.write(json.dumps({"timestamp": round(1e3 * float(t), 1),
                                "input_length": int(rng.integers(low, high + 1)),
                                "output_length": 32}) + "\n")
    return ["--dataset-name", "trace", "--dataset-path", path, "--num-prompts", str(num)]


PD_VARIANTS = {  # name -> (policy, router flags)
    "always_disagg": ("least_loaded", ()),
    "never_disagg": ("least_loaded", ("--pd-min-prompt-tokens", "1000000")),
    "conditional": ("conditional", ()),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], log: str, core: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pdserve.cli", *args]
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
    env = {**os.environ, "PYTHONPATH": REPO, "PDSERVE_DEPLOYMENT_SECRET": SECRET}
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy")


def run_one(policy: str, workload: list[str], rate: float, tmp: str, kv_cache: str,
            roles: tuple[str, str] = ("colocated", "colocated"), flags: tuple = (),
            warm_prompts: tuple[str, ...] = ()) -> dict:
    """Fresh instances (of `roles`) and a router; one bench run; its summary. Each instance
    first serves one unrelated request (a fresh process's first request pays its lazy
    set-up, no policy's doing); `warm_prompts` then go through the router, one at a time,
    unmeasured (the shared prefixes of a deployment in steady state)."""
    ports = [free_port() for _ in range(3)]
    cores = os.cpu_count() or 1
    insts = [spawn(["serve", "--role", role, "--port", str(p), "--cpu-threads", "1",
                    "--kv-cache-memory", kv_cache], f"{tmp}/inst{i}.log", i % cores)
             for i, (role, p) in enumerate(zip(roles, ports))]
    urls = [f"http://127.0.0.1:{p}" for p in ports[:2]]
    router = None
    try:
        for url in urls:
            wait_healthy(url)
            if roles[0] == "colocated":  # a P/D pair serves a client only through a router
                complete(url, "Warm-up: the quick brown fox jumps over the lazy dog.")
        router = spawn(["router", "--port", str(ports[2]), "--routing-policy", policy,
                        "--tokenizer", "embedded", *flags,
                        *[a for role, url in zip(roles, urls) for a in (f"--{role}", url)]],
                       f"{tmp}/router.log")
        base = f"http://127.0.0.1:{ports[2]}"
        wait_healthy(base)
        time.sleep(3)  # health checks, the tokenizer and the KV event streams
        for prompt in warm_prompts:
            complete(base, prompt)
        time.sleep(1 if warm_prompts else 0)  # their KV events reach the router's index
        name = f"{workload[1]}-{policy}-{len(flags)}.json"
        subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "run", "--base-url", base,
                        *workload, "--request-rate", str(rate), "--seed", "1",
                        "--ignore-eos", "--save-result", "--save-detailed", "--result-dir", tmp,
                        "--result-filename", name, "--disable-tqdm"],
                       env={**os.environ, "PYTHONPATH": REPO}, check=True,
                       stdout=subprocess.DEVNULL)
        with open(os.path.join(tmp, name)) as f:
            summary = json.load(f)
        lines = httpx.get(base + "/metrics").text.splitlines()
        decisions = [line for line in lines
                     if line.startswith("pdserve_router:routing_decisions_total{")]
        measured = [line for line in lines  # the rates and hops the conditional rule used
                    if line.startswith(("pdserve_router:instance_prefill_rate{",
                                        "pdserve_router:instance_hop_seconds{"))]
    finally:
        for p in ([router] if router else []) + insts:
            stop(p)
    keys = ("completed", "failed", "total_input_tokens", "prefix_cache_hit_tokens",
            "prefix_cache_hit_rate", "mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms",
            "p99_itl_ms", "mean_e2el_ms")
    return {**{k: summary.get(k) for k in keys}, "decisions": decisions, "measured": measured,
            "slowest_first_tokens": slowest(summary), "largest_gaps": largest_gaps(summary),
            "ttfts_ms": [round(1e3 * t, 2) for t in summary["ttfts"] if t is not None],
            "itls_ms": [round(1e3 * g, 2) for gaps in summary["itls"] for g in gaps or []],
            "per_request": [{"input_tokens": n, "ttft_ms": None if t is None else
                             round(1e3 * t, 2), "itls_ms": [round(1e3 * g, 2) for g in gaps or []]}
                            for t, n, gaps in zip(summary["ttfts"], summary["input_lens"],
                                                  summary["itls"])]}


def paired(a: list[dict], b: list[dict], rounds: int = 2000, seed: int = 0) -> dict:
    """Variant a minus variant b, request by request (the same seeded requests, pass k of
    each): mean TTFT and P99 ITL differences with bootstrap 95% intervals over the requests,
    so that "at least as good" is read against the run's own noise."""
    pairs = [(x, y) for pa, pb in zip(a, b)
             for x, y in zip(pa["per_request"], pb["per_request"])
             if x["ttft_ms"] is not None and y["ttft_ms"] is not None]
    rng = np.random.default_rng(seed)

    def figures(idx) -> tuple[float, float]:
        ttft = np.mean([pairs[i][0]["ttft_ms"] - pairs[i][1]["ttft_ms"] for i in idx])
        gaps = [[g for i in idx for g in pairs[i][k]["itls_ms"]] for k in (0, 1)]
        return float(ttft), float(np.percentile(gaps[0], 99) - np.percentile(gaps[1], 99))

    point = figures(range(len(pairs)))
    draws = np.array([figures(rng.integers(0, len(pairs), len(pairs))) for _ in range(rounds)])
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    return {"requests": len(pairs),
            "mean_ttft_ms": {"diff": point[0], "ci95": [float(low[0]), float(high[0])]},
            "p99_itl_ms": {"diff": point[1], "ci95": [float(low[1]), float(high[1])]}}


def by_length(passes: list[dict], split: int = 200) -> dict:
    """Mean TTFT of the short (< `split` tokens) and the long prompts, over the passes."""
    rows = [r for p in passes for r in p["per_request"] if r["ttft_ms"] is not None]
    return {name: float(np.mean([r["ttft_ms"] for r in rows if short == (r["input_tokens"] < split)]
                                or [np.nan]))
            for name, short in (("short", True), ("long", False))}


def pooled(passes: list[dict]) -> dict:
    """A variant's figures over every request and gap of its passes."""
    ttfts = [t for p in passes for t in p["ttfts_ms"]]
    gaps = [g for p in passes for g in p["itls_ms"]]
    return {"passes": len(passes), "requests": len(ttfts),
            "mean_ttft_ms": float(np.mean(ttfts)), "p99_ttft_ms": float(np.percentile(ttfts, 99)),
            "mean_itl_ms": float(np.mean(gaps)), "p99_itl_ms": float(np.percentile(gaps, 99))}


def slowest(detail: dict, count: int = 4) -> list[dict]:
    """The requests behind the P99: TTFT, prompt and cached tokens, and send order."""
    rows = [{"ttft_ms": round(1e3 * t, 1), "input_tokens": n, "cached_tokens": c, "sent": i}
            for i, (t, n, c) in enumerate(zip(detail["ttfts"], detail["input_lens"],
                                              detail["cached_tokens"])) if t is not None]
    return sorted(rows, key=lambda r: -r["ttft_ms"])[:count]


def largest_gaps(detail: dict, count: int = 10) -> list[dict]:
    """The inter-token gaps behind the P99 ITL: which request (send order), after which of
    its chunks (0: the first token's, i.e. a hand-off's hop), and how long."""
    rows = [{"gap_ms": round(1e3 * g, 1), "sent": i, "after_chunk": k, "input_tokens": n}
            for i, (gaps, n) in enumerate(zip(detail["itls"], detail["input_lens"]))
            for k, g in enumerate(gaps or [])]
    return sorted(rows, key=lambda r: -r["gap_ms"])[:count]


def complete(base: str, prompt: str) -> None:
    """One unmeasured completion of one token (a client's call: no key is set)."""
    httpx.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 1},
               timeout=120).raise_for_status()


def system_prompts(workload: list[str], tok) -> tuple[str, ...]:
    """Each prefix group's or conversation's system prompt, as the generator drew it (a
    conversation's turns share more than that: its first turn, which is no system prompt)."""
    from pdserve.bench.workloads import multi_turn

    cfg = _config(workload)
    if cfg.dataset_name == "multi-turn":
        return tuple(multi_turn.system_prompts(tok, cfg.mt_num_conversations,
                                               cfg.mt_system_prompt_len, cfg.seed))
    texts: dict[int, list[str]] = {}
    for spec in _specs(workload, tok):  # a group's prompts share exactly its system prompt
        texts.setdefault(spec.group, []).append(spec.prompt)
    return tuple(os.path.commonprefix(texts[g]) for g in sorted(texts))


def _config(workload: list[str]):
    """The workload `pdserve bench run` builds from these flags (seed 1, as run_one's)."""
    from pdserve.bench.cli import add_parser
    from pdserve.bench.commands import workload_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return workload_config(parser.parse_args(["bench", "run", *workload, "--seed", "1"]))


def _specs(workload: list[str], tok) -> list:
    """The requests `pdserve bench run` sends for these flags."""
    from pdserve.bench.workloads import build_workload

    return build_workload(_config(workload), tok)


def oracle_hits(workload: list[str], tok, warm_prompts: tuple[str, ...] = ()) -> int:
    """Hit tokens if every prompt met every earlier one's blocks (one unbounded cache), the
    warm-up prompts' too."""
    from pdserve.block_hashing import block_hashes, usable_blocks
    from pdserve.server.prompts import completion_prompt_ids

    seen = {h for p in warm_prompts for h in block_hashes(completion_prompt_ids(tok, p), 16)}
    hits = 0
    for spec in _specs(workload, tok):
        ids = completion_prompt_ids(tok, spec.prompt)
        hashes = block_hashes(ids, 16)
        n = 0
        for h in hashes[:usable_blocks(len(ids), 16)]:
            if h not in seen:
                break
            n += 1
        hits += n * 16
        seen.update(hashes)
    return hits


def router_cost() -> dict:
    """Median (and min: the least disturbed by the machine's load) ms to tokenize, and to
    hash + look up, a prompt of 1k and 8k tokens."""
    import numpy as np

    from pdserve.bench.workloads.tokens import random_prompt, usable_ids
    from pdserve.block_hashing import block_hashes
    from pdserve.models.loader import load_tokenizer
    from pdserve.router.kv_index import KVIndex
    from pdserve.router.prompt_tokens import PromptTokenizer

    tok = load_tokenizer(None)
    tokens = PromptTokenizer(tokenizer=tok)
    rng = np.random.default_rng(0)
    out = {}
    for n in (1024, 8192):
        text, _ = random_prompt(tok, rng, n, usable_ids(tok))
        body = {"prompt": text}
        ids = tokens.ids_now(False, body)
        index = KVIndex()
        index.reset("http://a", 16, block_hashes(ids, 16))
        index.reset("http://b", 16, block_hashes(ids[: n // 2], 16))
        tok_s, look_s = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            ids = tokens.ids_now(False, body)
            t1 = time.perf_counter()
            index.cached_tokens(ids)
            look_s.append(time.perf_counter() - t1)
            tok_s.append(t1 - t0)
        out[f"{n}_tokens"] = {"tokenize_ms": round(median(tok_s) * 1e3, 3),
                              "hash_and_lookup_ms": round(median(look_s) * 1e3, 3),
                              "tokenize_min_ms": round(min(tok_s) * 1e3, 3),
                              "hash_and_lookup_min_ms": round(min(look_s) * 1e3, 3),
                              "prompt_tokens": len(ids)}
    return out


def main() -> None:
    from pdserve.models.loader import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=0.25, help="requests/s (Poisson)")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS[:3]), choices=WORKLOADS)
    ap.add_argument("--groups", type=int, default=4,
                    help="prefix groups, or conversations (random: groups x per-group prompts)")
    ap.add_argument("--per-group", type=int, default=4,
                    help="prompts of a prefix group, or turns of a conversation")
    ap.add_argument("--kv-cache-memory", default="256MiB",
                    help="each instance's KV cache; below the prefixes' total, only a router "
                    "that keeps each prefix on one instance holds them all")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--cost-only", action="store_true",
                    help="only the router's cost per request (routing_cost_cpu.json)")
    ap.add_argument("--pd-mix", action="store_true",
                    help="instead: 1P1D on the short/long mix, always vs never vs conditional")
    ap.add_argument("--pd-max-stall-ms", type=float, nargs="+", default=[], metavar="MS",
                    help="--pd-mix: also conditional with each of these stall bounds (the "
                    "router's --pd-max-stall-ms; default bound: D's measured hop)")
    ap.add_argument("--warm-prefixes", action="store_true",
                    help="shared-prefix and multi-turn: send each group's or conversation's "
                    "system prompt through the router before the measured run (steady state: "
                    "no policy can avoid a prefix's first prefill, and those cold misses "
                    "otherwise set every P99)")
    ap.add_argument("--mix-prompts", type=int, default=20,
                    help="--pd-mix: requests a variant (a P99 over 20 x 31 gaps is the 6th "
                    "largest; more make it steadier)")
    ap.add_argument("--mix-shape", choices=("uniform", "bimodal"), default="uniform",
                    help="--pd-mix: prompts uniform in 40..760 tokens, or half chat turns "
                    f"({BIMODAL_SHORT[0]}..{BIMODAL_SHORT[1]}) and half documents "
                    f"({BIMODAL_LONG[0]}..{BIMODAL_LONG[1]}), replayed as a trace at --rate")
    ap.add_argument("--passes", type=int, default=1,
                    help="--pd-mix: run every variant this many times, alternating forward and "
                    "reverse order, and pool each variant's requests over its passes")
    ap.add_argument("--out", default=None,
                    help="default: results/routing_cpu.json (--pd-mix: routing_pd_mix_cpu.json)")
    args = ap.parse_args()
    name = "routing_pd_mix_cpu" if args.pd_mix else "routing_cost_cpu" if args.cost_only \
        else "routing_cpu"
    args.out = args.out or OUT.replace("routing_cpu", name)
    if args.cost_only:
        args.workloads = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop our servers on the way out
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
              "rate": args.rate, "groups": args.groups, "per_group": args.per_group,
              "mix_prompts": args.mix_prompts if args.pd_mix else None,
              "passes": args.passes if args.pd_mix else None,
              "kv_cache_memory": args.kv_cache_memory, "router_cost": router_cost(), "runs": {}}
    print(json.dumps(result["router_cost"], indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.pd_mix:
            runs = result["runs"]["mix-1P1D"] = {}
            variants = {**PD_VARIANTS, **{  # the same rule, a looser bound: its trade-off
                f"conditional_stall_{ms:g}ms": ("conditional", ("--pd-max-stall-ms", str(ms)))
                for ms in args.pd_max_stall_ms}}
            mix = workload_flags("mix", mix_prompts=args.mix_prompts) \
                if args.mix_shape == "uniform" else \
                bimodal_trace(f"{tmp}/bimodal.jsonl", args.mix_prompts, args.rate)
            passes: dict[str, list[dict]] = {name: [] for name in variants}
            for k in range(args.passes):  # forward, then reverse: drift charged evenly
                for name in (list(variants) if k % 2 == 0 else list(variants)[::-1]):
                    policy, flags = variants[name]
                    passes[name].append(run_one(policy, mix, args.rate, tmp,
                                                args.kv_cache_memory, ("prefill", "decode"),
                                                flags))
                    print("mix", name, f"pass {k + 1}", json.dumps(passes[name][-1]),
                          flush=True)
            for name, done in passes.items():
                runs[name] = done[0] if args.passes == 1 else \
                    {"pooled": pooled(done), "passes": done}
                runs[name]["ttft_by_length_ms"] = by_length(done)
                print("mix", name, json.dumps(pooled(done)), runs[name]["ttft_by_length_ms"],
                      flush=True)
            result["paired"] = {f"{a} - {b}": paired(passes[a], passes[b])
                                for a in passes if a.startswith("conditional")
                                for b in ("always_disagg", "never_disagg")}
            print(json.dumps(result["paired"], indent=1), flush=True)
        tok = None if args.pd_mix else load_tokenizer(None)
        for workload in [] if args.pd_mix else args.workloads:
            flags = workload_flags(workload, args.groups, args.per_group)
            warm = system_prompts(flags, tok) \
                if args.warm_prefixes and workload != "random" else ()
            runs = result["runs"][workload] = {"oracle_hit_tokens": oracle_hits(flags, tok, warm),
                                               "warm_prefixes": len(warm)}
            for policy in args.policies:
                runs[policy] = run_one(policy, flags, args.rate, tmp, args.kv_cache_memory,
                                       warm_prompts=warm)
                print(workload, policy, json.dumps(runs[policy]), flush=True)
    result["machine"]["loadavg_after"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
