"""A device profile: what the planner knows of one device running one model.

It holds a `StepTimeModel` (engine/step_time.py, the same model the scheduler's ITL target
uses) per degree of parallelism of one instance (CPU threads, or tensor-parallel size on
GPUs), the KV bytes per token, the KV pull cost per transport, the router's per-request
overhead, and how much a neighbour instance on the same host slows a step (planner/corun.py).
Every figure says whether it was measured or estimated. Nothing here is CPU-specific:
`parallelism` names what the keys of `step_time` count.

`measure_profile` fills one by timing the engine's own runner on sampled step shapes
(engine/calibrate.py) — a few hundred shapes, minutes on a CPU.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import torch

from pdserve.engine.step_time import StepTimeModel
from pdserve.planner.corun import CoRunSlowdown
from pdserve.planner.served import ServingOverhead

# Defaults where nothing was measured: flagged `measured: False` in the file.
ROUTER_OVERHEAD_S = 0.002  # two HTTP hops through the router's proxy, loopback
TCP_LATENCY_S, TCP_BYTES_PER_S = 0.002, 1.0e9  # loopback stream, Python framing (PERF.md)
HOST_LATENCY_S = 0.001  # lease round trip over P's socket before the copy


@dataclass
class TransportCost:
    """A KV pull of `n` bytes takes latency_s + n / bytes_per_s."""

    latency_s: float
    bytes_per_s: float
    measured: bool = False  # False: a documented default or a copy ceiling, not a pull
    note: str = ""

    def seconds(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / self.bytes_per_s


@dataclass
class Profile:
    """Everything the simulator needs to know about one device and model."""

    device: str  # e.g. "cpu" or "cuda:NVIDIA H100 80GB HBM3"
    model: str
    dtype: str
    parallelism: str  # what step_time's keys count: "cpu_threads" or "tensor_parallel"
    step_time: dict[int, StepTimeModel]
    kv_bytes_per_token: int
    block_size: int = 16
    kv_cache_tokens: int = 32768  # one instance's KV cache capacity (per device unit)
    max_model_len: int = 8192
    transports: dict[str, TransportCost] = field(default_factory=dict)
    router_overhead_s: float = ROUTER_OVERHEAD_S
    router_overhead_measured: bool = False
    num_shapes: int = 0  # timed step shapes behind each step-time model
    fit_error: dict[int, float] = field(default_factory=dict)  # median |rel. error| of the fit
    # what a real server adds around the runner's steps, per parallelism (planner/served.py)
    serving: dict[int, ServingOverhead] = field(default_factory=dict)
    # every timed step: [prefill_tokens, prefill_attention, decode_rows, decode_context,
    # seconds, kept] (kept 0: dropped as a stall), so a fit can be redone without the device
    samples: dict[int, list[list[float]]] = field(default_factory=dict)
    # per parallelism: how much a step slows while another instance on the host computes
    corun: dict[int, CoRunSlowdown] = field(default_factory=dict)
    created: str = ""

    def step_model(self, units: int) -> StepTimeModel:
        """The step-time model of an instance on `units` threads (or GPUs): the profiled one,
        else the nearest profiled one with its per-token terms scaled by units (perfect
        scaling: an optimistic guess, said so in `scaled_from`)."""
        if units in self.step_time:
            return self.step_time[units]
        near = self.scaled_from(units)
        m, k = self.step_time[near], near / units
        return replace(m, per_prefill_token_s=m.per_prefill_token_s * k,
                       per_prefill_pair_s=m.per_prefill_pair_s * k,
                       per_decode_row_s=m.per_decode_row_s * k,
                       per_decode_context_s=m.per_decode_context_s * k)

    def shared_step_model(self, units: int) -> StepTimeModel:
        """The step-time model of an instance on `units` while a neighbour on the same host
        computes (the nearest measured slowdown; none measured: the model alone)."""
        model = self.step_model(units)
        measured = {u: c for u, c in self.corun.items() if c.measured}
        if not measured:
            return model
        c = measured[nearest(measured, units)]
        return model.scaled(c.prefill, c.decode)

    def serving_overhead(self, units: int) -> ServingOverhead:
        """What serving adds for an instance on `units` (the nearest measured; none: 0)."""
        if not self.serving:
            return ServingOverhead()
        return self.serving[nearest(self.serving, units)]

    def scaled_from(self, units: int) -> int:
        """The profiled parallelism closest to `units` (itself if profiled)."""
        return nearest(self.step_time, units)

    def transfer_seconds(self, num_tokens: int, transport: str | None = None) -> float:
        """One pull of `num_tokens` tokens' KV over `transport` (default: the fastest)."""
        if not self.transports or num_tokens <= 0:
            return 0.0
        nbytes = num_tokens * self.kv_bytes_per_token
        if transport is not None:
            return self.transports[transport].seconds(nbytes)
        return min(t.seconds(nbytes) for t in self.transports.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["step_time"] = {str(k): v.to_dict() for k, v in self.step_time.items()}
        d["fit_error"] = {str(k): v for k, v in self.fit_error.items()}
        d["serving"] = {str(k): asdict(v) for k, v in self.serving.items()}
        d["samples"] = {str(k): v for k, v in self.samples.items()}
        d["corun"] = {str(k): asdict(v) for k, v in self.corun.items()}
        return d

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        data = dict(data)
        data["step_time"] = {int(k): StepTimeModel.from_dict(v)
                             for k, v in data["step_time"].items()}
        if not data["step_time"]:
            raise ValueError("a profile needs at least one step-time model")
        data["fit_error"] = {int(k): float(v) for k, v in data.get("fit_error", {}).items()}
        data["serving"] = {int(k): ServingOverhead(**v)
                           for k, v in data.get("serving", {}).items()}
        data["samples"] = {int(k): [[float(x) for x in row] for row in v]
                           for k, v in data.get("samples", {}).items()}
        data["corun"] = {int(k): CoRunSlowdown(**v) for k, v in data.get("corun", {}).items()}
        data["transports"] = {k: TransportCost(**v)
                              for k, v in data.get("transports", {}).items()}
        return cls(**data)

    def save(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    @classmethod
    def load(cls, path: str) -> Profile:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def nearest(profiled: Iterable[int], units: int) -> int:
    """The profiled parallelism closest to `units` by ratio (ties: the larger)."""
    return min(profiled, key=lambda u: (abs(math.log(u / units)), -u))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def memcpy_bytes_per_s(num_bytes: int = 64 * 2**20, device: str = "cpu") -> float:
    """A plain tensor copy's bandwidth: the ceiling of a same-host pull."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch pages the memory in
    best = math.inf
    for _ in range(3):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def default_transports(device: torch.device) -> dict[str, TransportCost]:
    """Pull costs per transport: the copy bandwidth measured here, fixed latencies assumed."""
    dev = "cpu" if device.type == "cpu" else str(device)
    copy = memcpy_bytes_per_s(device=dev)
    out = {
        "host": TransportCost(HOST_LATENCY_S, copy if device.type == "cpu" else min(copy, 20e9),
                              note="bandwidth: a memcpy measured here (a ceiling); latency "
                              "assumed"),
        "tcp": TransportCost(TCP_LATENCY_S, TCP_BYTES_PER_S,
                             note="assumed (PERF.md: ~1-3.7 GB/s loopback in Python)"),
    }
    if device.type == "cuda":
        out["cuda_ipc"] = TransportCost(0.0005, copy * 0.8, note="80% of a device copy "
                                        "measured here; latency assumed")
    return out
