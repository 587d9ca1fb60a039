"""SmolVLM's vision tower + connector (`embed_images`) on the real SmolVLM-256M-Instruct
shape (random weights), against its matmul floor.

    python3 benchmarks/bench_vision_tower.py --out $OUT/vision_tower.json [--tiles 1 17 68]

A 512 x 512 tile is 1,024 patches through 12 SigLIP-B layers, then 64 rows of the text
model; a SmolVLM image is up to 16 tiles plus a global one (17). On a GPU (bfloat16) each
time is a median of CUDA-event-timed calls and its floor is FLOPs / the measured bf16 matmul
rate; on a CPU (float32) it is a smoke figure of wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.config import VisionConfig  # noqa: E402
from pdserve.models.loader import load_model  # noqa: E402


def tile_flops(v: VisionConfig, text_hidden: int) -> int:
    """Matmul FLOPs of one full tile: patch conv, layers (projections, attention, MLP),
    connector."""
    seq, d = v.patches_per_side**2, v.hidden_size
    conv = 2 * seq * d * v.num_channels * v.patch_size**2
    layer = 2 * seq * (4 * d * d + 2 * d * v.intermediate_size) + 4 * seq * seq * d
    connector = 2 * v.tokens_per_tile * d * v.scale_factor**2 * text_hidden
    return conv + v.num_layers * layer + connector


def time_call(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the floor's rate."""
    n = 8192 if device.type == "cuda" else 1024
    x, y = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / time_call(lambda: x @ y, device, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 17, 68])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_model("smolvlm-256m", dtype, device)
    model, v = loaded.model, loaded.config.vision
    rate = matmul_rate(device, dtype)
    rows = []
    for tiles in args.tiles:
        pixels = torch.randn(tiles, 3, v.image_size, v.image_size, device=device)
        with torch.inference_mode():
            seconds = time_call(lambda p=pixels: model.embed_images(p), device, args.repeats)
        floor = tiles * tile_flops(v, loaded.config.hidden_size) / rate
        rows.append({"tiles": tiles, "ms": seconds * 1e3, "floor_ms": floor * 1e3,
                     "x_floor": seconds / floor, "tiles_per_s": tiles / seconds})
        print(f"{tiles:4d} tiles: {seconds * 1e3:9.2f} ms  floor {floor * 1e3:8.2f} ms  "
              f"x{seconds / floor:5.2f}  {tiles / seconds:8.1f} tiles/s", flush=True)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "dtype": str(dtype), "threads": torch.get_num_threads(),
              "matmul_TFLOPs": rate / 1e12, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
