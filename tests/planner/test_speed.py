"""The drift check's arithmetic: a profile scaled to the machine's speed predicts what the
same profile on a machine that much slower would."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from pdserve.planner.layouts import SimLayout
from pdserve.planner.profile import Profile
from pdserve.planner.served import ServingOverhead
from pdserve.planner.simulate import SimOptions, simulate
from pdserve.planner.speed import SpeedCheck, at_speed, compared, recorded_probes
from tests.planner.conftest import fixed_requests

LONE = {"prompt_len": 64, "streams": 1, "first_token_s": 0.1, "decode_step_s": 0.05}
PROMPTS = [{"prompt_len": n, "streams": 1, "first_token_s": n / 1e3, "decode_step_s": 0.0}
           for n in (32, 256)]


def _served(profile: Profile) -> Profile:
    overhead = ServingOverhead(step_s=0.001, row_s=0.0005, request_s=0.004, measured=True,
                               probes=[LONE, {**LONE, "streams": 4}, *PROMPTS])
    return replace(profile, serving={1: overhead})


def test_the_lone_stream_and_the_longest_lone_prompt_are_the_references(profile: Profile):
    decode, first = recorded_probes(_served(profile), 1)
    assert asdict(decode) == LONE and first.prompt_len == 256
    with pytest.raises(ValueError, match="--served"):
        recorded_probes(profile, 1)  # nothing probed: say how to get it


def test_probes_taken_now_read_as_ratios_to_the_profiles(profile: Profile):
    now = [{**LONE, "decode_step_s": 0.06}, {**PROMPTS[1], "first_token_s": 0.384}]
    check = compared(_served(profile), 1, now)
    assert check.decode == pytest.approx(1.2) and check.prefill == pytest.approx(1.5)
    assert check.probes == now


def test_a_machine_twice_as_slow_doubles_every_step_and_serving_term(profile: Profile):
    served = _served(profile)
    slow = at_speed(served, SpeedCheck(1, decode=2.0, prefill=3.0))
    m, s = served.step_model(1), slow.step_model(1)
    assert s.base_s == 2 * m.base_s and s.per_decode_row_s == 2 * m.per_decode_row_s
    assert s.per_prefill_token_s == 3 * m.per_prefill_token_s
    o, t = served.serving[1], slow.serving[1]
    assert (t.step_s, t.row_s, t.request_s) == (2 * o.step_s, 2 * o.row_s, 2 * o.request_s)
    assert t.probes == o.probes and slow.router_overhead_s == served.router_overhead_s
    # one request alone: every decode step (base + a row + serving) takes twice as long
    requests = fixed_requests(1, prompt=400, output=16, rate=1.0)
    layout = SimLayout(colocated=1)
    fast = simulate(layout, served, requests, SimOptions(), {})
    slower = simulate(layout, slow, requests, SimOptions(), {})
    assert slower["mean_itl_ms"] == pytest.approx(2 * fast["mean_itl_ms"], rel=1e-6)
    assert slower["mean_ttft_ms"] > 2.5 * fast["mean_ttft_ms"]  # prefill-bound: towards 3x
