"""Deployment layouts the planner simulates: colocated x N, or xPyD, each instance on some
units of the device budget (CPU threads, or GPUs for tensor parallelism), and the router's
conditional-disaggregation threshold; with the `pdserve up` command that starts one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SimLayout:
    """How many instances of each role and the units (threads or GPUs) each takes."""

    colocated: int = 0
    prefill: int = 0
    decode: int = 0
    colocated_units: int = 1
    prefill_units: int = 1
    decode_units: int = 1
    pd_min_prompt_tokens: int = 0  # the router's: shorter prompts are served whole on a D

    def __post_init__(self) -> None:
        for role in ("colocated", "prefill", "decode"):
            if getattr(self, role) < 0 or getattr(self, f"{role}_units") < 1:
                raise ValueError(f"{role}: count must be >= 0 and units >= 1")
        if self.pd_min_prompt_tokens < 0:
            raise ValueError("pd_min_prompt_tokens must be >= 0")
        if (self.prefill == 0) != (self.decode == 0):
            raise ValueError("a disaggregated layout needs prefill and decode instances")
        if self.colocated and self.prefill:
            raise ValueError("pdserve's router serves colocated or P/D instances, not both")
        if self.colocated + self.prefill == 0:
            raise ValueError("a layout needs at least one instance")

    @property
    def disaggregated(self) -> bool:
        return self.prefill > 0

    def instances(self) -> list[tuple[str, str, int]]:
        """(name, role, units) of each instance, named as `pdserve up` names them."""
        out = []
        for role in ("prefill", "decode", "colocated"):
            units = getattr(self, f"{role}_units")
            out += [(f"{role}-{i}", role, units) for i in range(getattr(self, role))]
        return out

    def units(self) -> int:
        return sum(units for _, _, units in self.instances())

    def label(self) -> str:
        """E.g. "2xC/1", "1P/1+1D/1", "1P/2+2D/1 min512" (/units per instance)."""
        if not self.disaggregated:
            return f"{self.colocated}xC/{self.colocated_units}"
        tail = f" min{self.pd_min_prompt_tokens}" if self.pd_min_prompt_tokens else ""
        return f"{self.prefill}P/{self.prefill_units}+{self.decode}D/{self.decode_units}{tail}"

    def to_dict(self) -> dict:
        return asdict(self)

    def up_command(self, parallelism: str, model: str | None = None, port: int = 8000,
                   tokenizer: str | None = None) -> str:
        """The `pdserve up` command that starts this layout (`tokenizer`: every instance's
        --tokenizer, e.g. a preset's on a machine without the embedded model)."""
        cmd = ["pdserve up"]
        if self.disaggregated:
            cmd += [f"--prefill {self.prefill}", f"--decode {self.decode}"]
        else:
            cmd += [f"--colocated {self.colocated}"]
        if model:
            cmd += [f"--model {model}"]
        if port != 8000:
            cmd += [f"--port {port}"]
        if self.pd_min_prompt_tokens:
            cmd += [f"--pd-min-prompt-tokens {self.pd_min_prompt_tokens}"]
        serve_args = [f"--tokenizer {tokenizer}"] if tokenizer else []
        if parallelism == "cpu_threads":
            threads = {u for _, _, u in self.instances()}
            cmd += ["--cpu"]
            serve_args.insert(0, f"--cpu-threads {threads.pop()}")
        else:
            for role in ("prefill", "decode", "colocated"):
                tp = getattr(self, f"{role}_units")
                if getattr(self, role) and tp > 1:
                    cmd += [f"--{role}-tp {tp}"]
        if serve_args:
            cmd += ["--", *serve_args]
        return " ".join(cmd)


def unit_sizes(budget: int, parallelism: str) -> list[int]:
    """Units one instance may take: any thread count on CPU, powers of two of GPUs."""
    if parallelism == "cpu_threads":
        return list(range(1, budget + 1))
    return [u for u in (1, 2, 4, 8, 16) if u <= budget]


def candidate_layouts(budget: int, parallelism: str, thresholds: tuple[int, ...] = (0,)
                      ) -> list[SimLayout]:
    """Every layout that uses the whole budget: colocated x (budget/u) for each size u that
    divides it; xPyD for every ratio and size per role (one size for all instances on a
    CPU, as `pdserve up` passes --cpu-threads to every instance), each threshold."""
    sizes = unit_sizes(budget, parallelism)
    out = [SimLayout(colocated=budget // u, colocated_units=u) for u in sizes if budget % u == 0]
    same_size = parallelism == "cpu_threads"
    for pu in sizes:
        for du in ([pu] if same_size else sizes):
            for x in range(1, budget // pu + 1):
                rest = budget - x * pu
                if rest > 0 and rest % du == 0:
                    out += [SimLayout(prefill=x, decode=rest // du, prefill_units=pu,
                                      decode_units=du, pd_min_prompt_tokens=t)
                            for t in thresholds]
    return out
