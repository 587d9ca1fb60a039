"""How fast is `pdserve bench`'s own client? Run against a trivial server, so that any
limit found is the client's (or the 2-core machine's), not a model's.

Measures: (1) the achieved vs requested rate at 500 req/s (Poisson and constant arrivals),
(2) the most requests/s it completes (1-token answers, concurrency 64), (3) the most
streamed chunks/s it parses (200-chunk answers, concurrency 32), each with 1 and 2 client
processes. Writes benchmarks/results/bench_client_capacity.json.

    python benchmarks/bench_client_capacity.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from datetime import UTC, datetime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pdserve.bench.client import EndpointConfig  # noqa: E402
from pdserve.bench.metrics import summarize  # noqa: E402
from pdserve.bench.request import RequestSpec  # noqa: E402
from pdserve.bench.runner import LoadSpec, run_load  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "results", "bench_client_capacity.json")


def _trivial_server(port: int) -> None:
    """max_tokens chunks written at once: costs the server as little as possible."""
    from aiohttp import web

    def chunk(i: int) -> bytes:
        return b'data: {"choices":[{"index":0,"text":"t%d "}]}\n\n' % i

    usage = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":%d}}\n\n'

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = body["max_tokens"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"".join(chunk(i) for i in range(n)) + usage % n + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("trivial server did not start")


def _measure(url: str, n: int, out_len: int, **load: object) -> dict:
    cfg = EndpointConfig(url, model="trivial")
    specs = [RequestSpec("hi", 1, out_len) for _ in range(n)]
    run = run_load(specs, cfg, LoadSpec(num_prompts=n, progress=False, **load))
    f = summarize(run.records, run.duration_s).fields
    chunks = sum(len(r.chunk_s) for r in run.records)
    return {
        "load": {k: v for k, v in load.items()},
        "num_prompts": n,
        "output_len": out_len,
        "completed": f["completed"],
        "failed": f["failed"],
        "duration_s": round(run.duration_s, 3),
        "request_throughput": round(f["request_throughput"], 1),
        "chunks_per_s": round(chunks / run.duration_s, 1),
        "scheduled_request_rate": f["scheduled_request_rate"],
        "achieved_request_rate": f["achieved_request_rate"],
        "p99_schedule_delay_ms": round(f["p99_schedule_delay_ms"], 2),
        "max_schedule_delay_ms": round(f["max_schedule_delay_ms"], 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = ap.parse_args()
    scale = 0.2 if args.quick else 1.0
    load_before = os.getloadavg()
    port = _free_port()
    server = mp.get_context("spawn").Process(target=_trivial_server, args=(port,), daemon=True)
    server.start()
    _wait_up(port)
    url = f"http://127.0.0.1:{port}"
    n500 = int(5000 * scale)
    results: dict[str, dict] = {}
    try:
        _measure(url, 200, 1, max_concurrency=32)  # warm the server and the imports
        for arrival in ("poisson", "constant"):
            for procs in (1, 2):
                key = f"rate500_{arrival}_{procs}proc"
                results[key] = _measure(
                    url, n500, 16, request_rate=500.0, arrival=arrival, seed=1,
                    num_processes=procs,
                )  # fmt: skip
                print(key, results[key], flush=True)
        for procs in (1, 2):
            key = f"max_requests_{procs}proc"
            results[key] = _measure(url, int(10000 * scale), 1, max_concurrency=64,
                                    num_processes=procs)  # fmt: skip
            print(key, results[key], flush=True)
            key = f"max_chunks_{procs}proc"
            results[key] = _measure(url, int(2000 * scale), 200, max_concurrency=32,
                                    num_processes=procs)  # fmt: skip
            print(key, results[key], flush=True)
    finally:
        server.terminate()
        server.join()
    doc = {
        "command": "python benchmarks/bench_client_capacity.py"
        + (" --quick" if args.quick else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()}-core CPU, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; trivial server and client share the cores",
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "results": results,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=2)
    print("wrote", OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
