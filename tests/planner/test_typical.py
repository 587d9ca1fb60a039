"""The profile's estimator of a host's speed: the mean of repeated timings, stalls dropped."""

from __future__ import annotations

import pytest

from pdserve.planner.served import Probe, typical_probe
from pdserve.planner.typical import typical


def test_the_mean_not_the_fastest():
    # the host's swing over minutes is what a run sees: all of it counts
    assert typical([0.048, 0.052, 0.068, 0.064]) == pytest.approx(0.058)


def test_a_stall_is_dropped():
    # 1.5x the fastest or more: another process's burst, not the host's speed
    assert typical([0.050, 0.054, 0.080]) == pytest.approx(0.052)
    assert typical([0.050, 0.075]) == pytest.approx(0.0625)  # the bound itself is kept


def test_one_timing_is_its_own_mean_and_none_is_an_error():
    assert typical([0.2]) == 0.2
    with pytest.raises(ValueError):
        typical([])


def test_probes_are_averaged_per_figure():
    probes = [Probe(64, 4, 0.60, 0.050), Probe(64, 4, 0.70, 0.056), Probe(64, 4, 1.20, 0.053)]
    p = typical_probe(probes)
    assert (p.prompt_len, p.streams) == (64, 4)
    assert p.first_token_s == pytest.approx(0.65)  # 1.20 is a stall of the first token only
    assert p.decode_step_s == pytest.approx(0.053)
