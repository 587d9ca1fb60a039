"""What one image costs the server before the engine sees it (CPU smoke figures):
base64 decode + Pillow decode + SmolVLM-256M preprocessing (tiles of 512, longest edge
2048) + content hash, per image, and the hand-off of its pixel tensor to another process
through a multiprocessing queue (shared memory: a handle crosses, not the bytes).

    PYTHONPATH=. python benchmarks/bench_image_prep.py --out benchmarks/results/image_prep_cpu.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing as mp
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image

from pdserve.media.image_inputs import ImagePreparer, ImageRef
from pdserve.media.limits import MediaLimits
from pdserve.media.vision_spec import VisionSpec

CASES = [("photo 1024x768 JPEG", 768, 1024, "JPEG"), ("photo 1024x768 JPEG, detail low", 768,
         1024, "JPEG"), ("screenshot 1920x1080 PNG", 1080, 1920, "PNG"),
         ("small 256x256 PNG", 256, 256, "PNG")]


def smooth_image(height: int, width: int) -> Image.Image:
    """Gradients and noise: compresses like a photo, not like random bytes."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    rgb = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) % 256)], -1)
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def data_url(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=90) if fmt == "JPEG" else image.save(buf, format=fmt)
    kind = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _receive(q, out) -> None:
    while True:
        sent_at, tensor = q.get()
        if tensor is None:
            return
        out.put((time.perf_counter() - sent_at, tuple(tensor.shape)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = VisionSpec(image_token_id=0)  # SmolVLM-256M's settings
    preparer = ImagePreparer(spec, MediaLimits())
    ctx = mp.get_context("spawn")
    q, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receive, args=(q, out), daemon=True)
    proc.start()
    rows = []
    for name, height, width, fmt in CASES:
        url = data_url(smooth_image(height, width), fmt)
        detail = "low" if "low" in name else "auto"
        times, handoffs = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            prepared = preparer.prepare_now(ImageRef(url, detail, "url"))
            times.append(time.perf_counter() - start)
            q.put((time.perf_counter(), prepared.input.pixel_values))
            handoffs.append(out.get()[0])
        pixels = prepared.input.pixel_values
        rows.append({"case": name, "encoded_bytes": len(url) * 3 // 4,
                     "tiles": pixels.shape[0], "image_tokens": prepared.input.num_tokens,
                     "pixel_mb": round(pixels.numel() * 4 / 1e6, 1),
                     "prepare_ms_median": round(1000 * statistics.median(times), 1),
                     "handoff_ms_median": round(1000 * statistics.median(handoffs), 2)})
        print(rows[-1])
    q.put((0.0, None))
    proc.join(5)
    preparer.close()
    result = {"command": "PYTHONPATH=. python benchmarks/bench_image_prep.py",
              "device": f"CPU, {os.cpu_count()} cores, shared with other work (smoke)",
              "load_average": os.getloadavg(), "torch_threads": 1, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
