"""An instance serving images, on the engine stand-in (the server side is the real one):
end-to-end latency of chat requests with one image each, N at once, and how long /health
takes meanwhile (the event loop must stay free while images are decoded and preprocessed
in the pool). SmolVLM-256M's processor settings; a processor folder is built locally.

    PYTHONPATH=. python benchmarks/bench_image_serving.py \
        --out benchmarks/results/image_serving_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_image_prep import data_url, smooth_image  # noqa: E402
from tests.media.vision_helpers import smolvlm_tokenizer  # noqa: E402


def processor_folder(folder: Path) -> Path:
    from transformers import SmolVLMImageProcessorPil

    smolvlm_tokenizer().save_pretrained(folder)
    SmolVLMImageProcessorPil(size={"longest_edge": 2048},
                             max_image_size={"longest_edge": 512}).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": 64}))
    return folder


async def run(url: str, concurrency: int, rounds: int, image_url: str) -> dict:
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": "What is this?"}]}], "max_tokens": 4}
    latencies, health = [], []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        done = asyncio.Event()

        async def poll_health() -> None:
            while not done.is_set():
                start = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                health.append(time.perf_counter() - start)
                await asyncio.sleep(0.02)

        async def one() -> None:
            start = time.perf_counter()
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            latencies.append(time.perf_counter() - start)

        poller = asyncio.create_task(poll_health())
        start = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(one() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        done.set()
        await poller
    health.sort()
    return {"concurrency": concurrency, "requests": len(latencies),
            "images_per_s": round(len(latencies) / wall, 2),
            "latency_ms_p50": round(1000 * statistics.median(latencies)),
            "latency_ms_max": round(1000 * max(latencies)),
            "health_ms_p50": round(1000 * statistics.median(health), 1),
            "health_ms_p99": round(1000 * health[int(0.99 * (len(health) - 1))], 1),
            "health_samples": len(health)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=28731)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pdserve-img-"))
    folder = processor_folder(tmp / "smolvlm")
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--engine-standin", "5",
           "--tokenizer", str(folder), "--port", str(args.port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        image_url = data_url(smooth_image(768, 1024), "JPEG")
        rows = [asyncio.run(run(url, c, r, image_url)) for c, r in ((1, 4), (4, 2), (8, 2))]
        for row in rows:
            print(row)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    result = {"command": "PYTHONPATH=. python benchmarks/bench_image_serving.py",
              "device": f"CPU, {os.cpu_count()} cores, shared with other work (smoke)",
              "load_average": os.getloadavg(), "image": "1024x768 JPEG, 13 tiles, 832 tokens",
              "server": "pdserve serve --engine-standin 5, --media-decode-threads 2",
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
