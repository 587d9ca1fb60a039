"""E + colocated against colocated alone, on CPU, on the multi-image workload (a smoke
test of encoder disaggregation's plumbing and its overlap, not a speed claim).

The fair pair gets the same two CPU threads: colocated alone runs its engine with 2;
E + colocated runs the encoder with 1 and the colocated engine with 1. Colocated with one
thread is measured too: on a loaded 2-core machine a 2-thread engine can lose more to
OpenMP contention than it gains. Each is started
with `pdserve up` (router in front) and measured with `pdserve bench run --dataset-name
image`. The model is a random-weight SmolVLM folder made here, with a vision tower big
enough that encoding is a real part of a request (transformers' classes, no download).

    python benchmarks/bench_encoder_cpu.py --out benchmarks/results/encoder_cpu_side_by_side.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
TILE, LONGEST = 256, 512  # tiles of 256 px; images first resized to 512 px at most
PATCH, SCALE = 16, 4  # 16 x 16 patches a tile, folded 4 x 4: 16 rows a tile
SEQ = (TILE // PATCH // SCALE) ** 2


def build_folder(folder: Path) -> Path:
    """A SmolVLM: a small Llama text model, a 6-layer 384-wide SigLIP tower."""
    import transformers

    sys.path.insert(0, str(REPO))
    from tests.media.vision_helpers import image_processor, smolvlm_tokenizer

    tokenizer = smolvlm_tokenizer()
    torch.manual_seed(0)
    config = transformers.SmolVLMConfig(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=256,
                         intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                           num_attention_heads=6, image_size=TILE, patch_size=PATCH),
        scale_factor=SCALE, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    transformers.SmolVLMForConditionalGeneration(config).float().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(TILE, LONGEST).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": SEQ}))
    return folder


def run_layout(name: str, up_args: list[str], threads: int, folder: Path, port: int,
               bench_args: list[str], out_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    logs = out_dir / f"logs-{name}"
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--cpu", "--model", str(folder),
           "--port", str(port), "--log-dir", str(logs), *up_args, "--",
           "--cpu-threads", str(threads), "--kv-cache-memory", "256MiB"]
    up = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", up)
        result = out_dir / f"{name}.json"
        subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "run",
                        "--base-url", f"http://127.0.0.1:{port}", "--label", name,
                        "--tokenizer", str(folder), "--save-result", "--result-dir",
                        str(out_dir), "--result-filename", result.name, "--disable-tqdm",
                        *bench_args], env=env, cwd=REPO, check=True)
        out = json.loads(result.read_text())
        out["image_rows_by_source"] = _rows_by_source(f"http://127.0.0.1:{port + 1}")
        return out
    finally:
        os.killpg(up.pid, signal.SIGINT)  # `pdserve up` stops its instances and router
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def _rows_by_source(instance: str) -> dict[str, float]:
    """The colocated instance's pdserve:image_embeddings by source (encoder, fallback, local):
    proof of where the rows came from."""
    counts = {}
    for line in httpx.get(instance + "/metrics", timeout=10).text.splitlines():
        if line.startswith("pdserve:image_embeddings_total{"):
            source = line.split('source="', 1)[1].split('"', 1)[0]
            counts[source] = float(line.rsplit(" ", 1)[1])
    return counts


def _wait_ready(url: str, up: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"pdserve up exited with {up.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                time.sleep(3)  # the router's health checks see every instance
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("the deployment did not become healthy")


KEYS = ("completed", "failed", "duration", "total_input_tokens", "total_input_vision_tokens",
        "request_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "mean_e2el_ms", "p99_e2el_ms", "image_rows_by_source",
        "load_average_1m")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/encoder_cpu_side_by_side.json")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--request-rate", type=float, default=0.5)
    p.add_argument("--image-count", type=int, default=2)
    p.add_argument("--image-resolution", default="640x360")
    p.add_argument("--port", type=int, default=18600)
    args = p.parse_args()
    bench = ["--endpoint", "/v1/chat/completions", "--dataset-name", "image",
             "--image-count", str(args.image_count), "--image-resolution",
             args.image_resolution, "--random-input-len", "64", "--random-output-len", "32",
             "--ignore-eos", "--num-prompts", str(args.num_prompts), "--request-rate",
             str(args.request_rate), "--seed", "0"]
    with tempfile.TemporaryDirectory(prefix="bench-encoder-") as tmp:
        folder = build_folder(Path(tmp) / "smolvlm-cpu")
        out_dir = Path(tmp)
        layouts = [  # (name, label, `pdserve up` counts, threads per instance)
            ("colocated_2t", "colocated (2 threads)", ["--colocated", "1"], 2),
            ("colocated_1t", "colocated (1 thread)", ["--colocated", "1"], 1),
            ("e_colocated", "E + colocated (1 + 1 threads)",
             ["--colocated", "1", "--encoder", "1"], 1),
        ]
        runs = {}
        for i, (name, label, counts, threads) in enumerate(layouts):
            load = os.getloadavg()[0]
            runs[label] = run_layout(name, counts, threads, folder, args.port + 10 * i,
                                     bench, out_dir)
            runs[label]["load_average_1m"] = [load, os.getloadavg()[0]]  # before, after
    summary = {
        "command": "python benchmarks/bench_encoder_cpu.py " + " ".join(sys.argv[1:]),
        "device": "CPU, 2 threads a deployment, on a machine shared with other jobs",
        "workload": " ".join(bench),
        "model": f"random SmolVLM: text 4 x 256, vision 6 x 384 at {TILE} px tiles, "
                 f"{SEQ} rows a tile",
        "runs": {name: {k: r.get(k) for k in KEYS} for name, r in runs.items()},
    }
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
