"""An xPyD layout (from flags or YAML) and its plan: which instance runs where, on which port.

YAML accepts the flags' names, with counts given plainly or as {count, tp}:

    model: null                 # null = the embedded SmolLM2
    port: 8000                  # the router; instances take the next ports
    prefill: {count: 2, tp: 1}
    decode: {count: 1, tp: 2}
    encoder: 4                  # a vision-language model's image encoders (tp 1 each)
    kv_cache_memory: 1GiB       # per instance (CPU, or to cap it on GPU)
    pd_min_prompt_tokens: 4096  # the router's: shorter prompts are served whole on a D
    routing_policy: cache_aware # the router's --routing-policy (default least_loaded)
    pd_max_stall_ms: 500        # the router's: conditional policy's whole-on-D stall bound
    cpu_affinity: ["0-3", "4-7"] # one CPU list per instance (role order): each is pinned
    instance_args: [--max-num-seqs, "64"]
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from pdserve.cpu_affinity import parse_cpu_list
from pdserve.router.policy import POLICIES

ROLES = ("prefill", "decode", "colocated", "encoder")


@dataclass
class Layout:
    """How many instances of each role, their TP sizes, and what they all share."""

    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    encoder: int = 0  # image encoders in front of P (or colocated): E->P->D
    prefill_tp: int = 1
    decode_tp: int = 1
    colocated_tp: int = 1
    encoder_tp: int = 1  # an encoder runs on one device
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    kv_cache_memory: str | None = None
    cpu: bool = False  # force CPU even where GPUs exist
    pd_min_prompt_tokens: int = 0  # the router's conditional disaggregation (0: always)
    routing_policy: str = "least_loaded"  # the router's --routing-policy
    pd_max_stall_ms: float | None = None  # the conditional policy's bound (None: D's hop)
    instance_args: list[str] = field(default_factory=list)
    cpu_affinity: list[str] = field(default_factory=list)  # a CPU list per instance, role order

    def __post_init__(self) -> None:
        if self.prefill == self.decode == self.colocated == 0:
            self.prefill = self.decode = 1  # the default deployment: 1P1D
        for role in ROLES:
            if getattr(self, role) < 0 or getattr(self, f"{role}_tp") < 1:
                raise ValueError(f"{role}: count must be >= 0 and tp >= 1")
        if self.encoder_tp != 1:
            raise ValueError("encoder: an encoder instance runs on one device (tp 1)")
        if self.pd_min_prompt_tokens < 0:
            raise ValueError("pd_min_prompt_tokens must be >= 0")
        if self.routing_policy not in POLICIES:
            raise ValueError(f"routing_policy must be one of {POLICIES}")
        if self.pd_max_stall_ms is not None and not 0 < self.pd_max_stall_ms < float("inf"):
            raise ValueError("pd_max_stall_ms must be a positive number of milliseconds")
        if (self.prefill == 0) != (self.decode == 0):
            raise ValueError("a disaggregated layout needs both prefill and decode instances "
                             f"(got {self.prefill}P{self.decode}D)")
        count = sum(getattr(self, role) for role in ROLES)
        if self.cpu_affinity and len(self.cpu_affinity) != count:
            raise ValueError(f"cpu_affinity: {len(self.cpu_affinity)} CPU lists for {count} "
                             "instances; give one per instance, in the order prefill, decode, "
                             "colocated, encoder (e.g. '0|1')")
        self.cpu_affinity = [str(cpus) for cpus in self.cpu_affinity]  # YAML may give ints
        for cpus in self.cpu_affinity:
            parse_cpu_list(cpus)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> Layout:
        """The file's layout; `overrides` (flags the user gave) win over it."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a layout file must be a mapping")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        for role in ROLES:
            spec = data.get(role)
            if isinstance(spec, dict):
                data[role] = int(spec.get("count", 1))
                if "tp" in spec:
                    data[f"{role}_tp"] = int(spec["tp"])
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        if data.get("kv_cache_memory") is not None:
            data["kv_cache_memory"] = str(data["kv_cache_memory"])
        data["instance_args"] = [str(a) for a in data.get("instance_args") or []]
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def gpus_needed(self) -> int:
        return sum(getattr(self, r) * getattr(self, f"{r}_tp") for r in ROLES)


@dataclass
class InstancePlan:
    """One instance to start."""

    name: str  # e.g. "prefill-0"
    role: str
    host: str
    port: int
    devices: list[int] | None  # GPU indices for CUDA_VISIBLE_DEVICES; None = CPU
    tp: int
    gpu_memory_utilization: float | None = None  # set when instances share a GPU
    wave: int = 0  # instances sharing a GPU start one wave after another
    cpus: str | None = None  # the CPU list it is pinned to (`serve --cpu-affinity`)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def devices_label(self) -> str:
        if self.devices is None:
            return f"cpu {self.cpus}" if self.cpus else "cpu"
        shared = f" (shared, up to {self.gpu_memory_utilization:.0%})" \
            if self.gpu_memory_utilization else ""
        return "cuda:" + ",".join(map(str, self.devices)) + shared


def plan(layout: Layout, num_gpus: int) -> list[InstancePlan]:
    """Instances in role order, each on the next free GPUs (TP consecutive), or all on CPU.

    More single-GPU instances than GPUs share them round-robin (so `pdserve up` runs 1P1D
    on a one-GPU machine): the engine's --gpu-memory-utilization caps all processes on the
    GPU together, so the k-th of n sharers starts after the others, with a cap of (k+1)/n
    of 90%, and gets an equal share. TP layouts must fit.
    """
    on_gpu = num_gpus > 0 and not layout.cpu
    needed = layout.gpus_needed()
    tps = [getattr(layout, f"{r}_tp") for r in ROLES if getattr(layout, r)]
    share = on_gpu and needed > num_gpus
    if share and max(tps) > 1:
        raise ValueError(f"the layout needs {needed} GPUs; this machine has {num_gpus}")
    per_gpu = -(-needed // num_gpus) if share else 1
    plans, next_gpu, port = [], 0, layout.port + 1
    for role in ROLES:
        tp = getattr(layout, f"{role}_tp")
        for i in range(getattr(layout, role)):
            devices, wave, fraction = None, 0, None
            if on_gpu:
                devices = [(next_gpu + k) % num_gpus for k in range(tp)]
                wave = next_gpu // num_gpus
                next_gpu += tp
            if share:
                fraction = round(0.9 * (wave + 1) / per_gpu, 3)
            cpus = layout.cpu_affinity[len(plans)] if layout.cpu_affinity else None
            plans.append(InstancePlan(f"{role}-{i}", role, layout.host, port, devices, tp,
                                      fraction, wave, cpus))
            port += 1
    return plans


def count_gpus() -> int:
    """CUDA devices visible to this process (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver means: run on CPU
        return 0
