"""The machine's speed now against when it was profiled: `plan validate`'s drift check.

A shared host's speed drifts: on the 2-core CPU VM, one instance streaming one request at a
time went from 55.7 to 72.1 ms a token within an hour (benchmarks/results/planner/
drift_cpu_session13), and a profile taken between the two speeds under-predicted every run
after it. The profile's serving probe (planner/served.py) recorded what a client saw of one
instance: a lone stream's decode step and lone prompts' first tokens. `check_speed` runs the
same probes again, on the same cores; their ratios to the recorded ones say how much slower
(or faster) the machine is now, and `at_speed` scales the profile by them, so a prediction
can be made for the machine as it is, next to the one for the machine as profiled.
Opt-in (`plan validate --speed-check`): a 30-s probe is a small sample of a noisy host, and
in its one full run one transient reading made its scaled predictions worse (docs/PLANNER.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from pdserve.planner.profile import Profile
from pdserve.planner.served import (
    OUTPUT_LEN,
    PROMPT_LEN,
    REPEATS,
    Probe,
    probed_servers,
    repeated_probe,
    split_probes,
    stream_once,
)


@dataclass
class SpeedCheck:
    """Now / at profiling, for one instance on `units` (threads, or GPUs)."""

    units: int
    decode: float  # a lone stream's decode step
    prefill: float  # the first token of the profile's longest lone prompt
    probes: list[dict] = field(default_factory=list)  # what the client saw now

    def describe(self) -> str:
        return f"decode x{self.decode:.2f}, prefill x{self.prefill:.2f} against the profile"


def recorded_probes(profile: Profile, units: int) -> tuple[Probe, Probe]:
    """The profile's lone-stream decode probe and its longest lone-prompt probe on `units`."""
    overhead = profile.serving.get(units)
    if overhead is None or not overhead.measured:
        raise ValueError(f"the profile has no serving probe on {units} {profile.parallelism}; "
                         "profile again with `pdserve plan profile --served`")
    decode, first = split_probes(overhead.probes)
    lone = [p for p in decode if p.streams == 1]
    if not lone or not first:
        raise ValueError("the profile's serving probe lacks a lone stream or a lone prompt")
    return lone[0], max(first, key=lambda p: p.prompt_len)


def check_speed(profile: Profile, model_name: str | None, tokenizer: str | None = None,
                repeats: int = REPEATS, timeout_s: float = 300.0) -> SpeedCheck:
    """Serve on the smallest probed parallelism (pinned to the first cores, as the profile
    did), run its lone-stream probes again and compare."""
    units = min(profile.serving)
    _, then_first = recorded_probes(profile, units)
    threads = units if profile.parallelism == "cpu_threads" else None
    with probed_servers(threads, model_name, timeout_s, tokenizer=tokenizer) as (url, _):
        stream_once(url, 16, 4)  # warm: the first request pays for lazy set-up
        decode = repeated_probe(url, PROMPT_LEN, OUTPUT_LEN, 1, repeats)
        first = repeated_probe(url, then_first.prompt_len, 2, 1, repeats)
    return compared(profile, units, [asdict(decode), asdict(first)])


def compared(profile: Profile, units: int, probes: list[dict]) -> SpeedCheck:
    """The ratios of `probes` (a lone-stream decode probe, then a lone-prompt one, as
    `check_speed` takes them) to `profile`'s own: a kept check read against a new profile."""
    then_decode, then_first = recorded_probes(profile, units)
    decode, first = probes
    return SpeedCheck(units, decode["decode_step_s"] / then_decode.decode_step_s,
                      first["first_token_s"] / then_first.first_token_s, probes)


def at_speed(profile: Profile, check: SpeedCheck) -> Profile:
    """The profile as if taken now: the prefill terms times `check.prefill`; the base and
    decode terms, and what serving adds, times `check.decode` (host work slows as the
    decode steps do). One ratio per kind for every parallelism: the drift is the host's."""
    serving = {u: replace(o, step_s=o.step_s * check.decode, row_s=o.row_s * check.decode,
                          request_s=o.request_s * check.decode)
               for u, o in profile.serving.items()}
    return replace(profile, serving=serving,
                   step_time={u: m.scaled(check.prefill, check.decode)
                              for u, m in profile.step_time.items()})
