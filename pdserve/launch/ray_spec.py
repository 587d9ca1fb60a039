"""What `pdserve up --ray` asks of the Ray cluster beyond the layout: which cluster, the CPUs
each server reserves, and custom resources that pin a role to nodes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

SERVER_ROLES = ("prefill", "decode", "colocated", "router")
RESOURCE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,63}")
RESERVED = {"CPU", "GPU", "memory", "object_store_memory"}  # asked for by their own flags


@dataclass
class RaySpec:
    """`--ray [ADDRESS]`, `--ray-num-cpus`, `--ray-resources`."""

    address: str | None = None  # None: ray.init()'s choice ($RAY_ADDRESS, else a local cluster)
    num_cpus: float = 1.0  # each CPU instance's and the router's bundle (GPU instances: 1)
    resources: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> {name: n}

    def __post_init__(self) -> None:
        if not (math.isfinite(self.num_cpus) and 0 < self.num_cpus <= 1024):
            raise ValueError(f"--ray-num-cpus must be in (0, 1024], not {self.num_cpus}")

    def bundle(self, role: str, num_gpus: int) -> dict[str, float]:
        """The resources one server of `role` reserves (`num_gpus` 0: a CPU server)."""
        base = {"CPU": 1.0, "GPU": float(num_gpus)} if num_gpus else {"CPU": self.num_cpus}
        return {**base, **self.resources.get(role, {})}


def parse_resources(specs: list[str]) -> dict[str, dict[str, float]]:
    """['prefill=node_p:1', 'decode=node_d:1,ssd:0.5'] -> {'prefill': {'node_p': 1.0}, ...};
    ValueError naming the bad part."""
    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        role, sep, rest = spec.partition("=")
        if not sep or role not in SERVER_ROLES:
            raise ValueError(f"--ray-resources {spec!r}: expected ROLE=NAME:AMOUNT[,...] with "
                             f"ROLE one of {', '.join(SERVER_ROLES)}")
        for item in rest.split(","):
            name, sep, amount = item.partition(":")
            if not sep or not RESOURCE_NAME.fullmatch(name) or name in RESERVED:
                raise ValueError(f"--ray-resources {spec!r}: {item!r} is not NAME:AMOUNT with "
                                 "a custom resource name (CPU and GPU have their own flags)")
            try:
                value = float(amount)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and 0 < value <= 1e6):
                raise ValueError(f"--ray-resources {spec!r}: amount {amount!r} must be a "
                                 "number in (0, 1e6]")
            out.setdefault(role, {})[name] = value
    return out
