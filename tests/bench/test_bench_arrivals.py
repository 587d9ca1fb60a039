"""Arrival schedules: rates, burstiness and seeds give the intended distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdserve.bench.arrivals import (
    arrival_offsets,
    arrival_offsets_for_duration,
    inter_arrival_times,
)

N = 20000  # the sample mean of N gaps is within ~2.5% of its mean at 3 sigma for CV <= 1.4


@pytest.mark.parametrize("rate", [0.5, 10.0, 500.0])
def test_poisson_gaps_are_exponential_with_mean_one_over_rate(rate):
    gaps = inter_arrival_times(N, rate, "poisson", seed=1)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # CV of an exponential
    # P(gap > mean) = e^-1 for an exponential
    assert (gaps > 1 / rate).mean() == pytest.approx(math.exp(-1), abs=0.015)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 8.0])
def test_gamma_burstiness_sets_cv_and_keeps_the_rate(burstiness):
    gaps = inter_arrival_times(N, 20.0, "gamma", burstiness, seed=2)
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_constant_arrivals_are_evenly_spaced():
    offsets = arrival_offsets(5, 4.0, "constant")
    assert offsets.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(4, math.inf).tolist() == [0.0] * 4


def test_same_seed_same_schedule_different_seed_different():
    a = arrival_offsets(100, 5.0, "gamma", 0.5, seed=7)
    b = arrival_offsets(100, 5.0, "gamma", 0.5, seed=7)
    c = arrival_offsets(100, 5.0, "gamma", 0.5, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_offsets_are_absolute_and_start_at_zero():
    gaps = inter_arrival_times(10, 3.0, seed=3)
    offsets = arrival_offsets(10, 3.0, seed=3)
    assert offsets[0] == 0.0
    assert np.allclose(np.diff(offsets), gaps[:-1])


def test_duration_bound_schedule_covers_the_duration_at_the_rate():
    offsets = arrival_offsets_for_duration(200.0, 50.0, seed=4)
    assert offsets.max() < 200.0
    assert len(offsets) == pytest.approx(200 * 50, rel=0.03)
    # a longer draw keeps the same prefix: the schedule does not depend on the buffer size
    assert np.array_equal(offsets[:100], arrival_offsets(100, 50.0, seed=4))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        inter_arrival_times(3, 1.0, "weibull")
    with pytest.raises(ValueError):
        inter_arrival_times(3, 0.0)
