"""The sampler on hand-made logits: each filter does what it says."""

import torch

from pdserve.engine.request import Request
from pdserve.engine.sampler import sample
from pdserve.engine.sampling_params import SamplingParams


def req(output=(), **params) -> Request:
    r = Request("r", [0], SamplingParams(**params))
    r.output_token_ids = list(output)
    if r.params.seed is not None:
        r.generator = torch.Generator().manual_seed(r.params.seed)
    return r


def draws(logits, n=300, **params):
    return {sample(logits[None].clone(), [req(**params)], [])[0][0] for _ in range(n)}


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample(logits, [req(temperature=0.0)], [])[0] == [1]


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([1.0, 1.1, 1.2, 5.0, 4.9])
    assert draws(logits, top_k=2, temperature=5.0) == {3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert draws(logits, top_p=0.7) == {0, 1}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    assert draws(logits, min_p=0.2) == {0, 1}


def test_repetition_penalty_moves_away_from_seen_tokens():
    logits = torch.tensor([[2.0, 1.9]])
    r = req(output=[0], temperature=0.0, repetition_penalty=1.5)
    assert sample(logits, [r], [])[0] == [1]


def test_frequency_and_presence_penalties_subtract_per_occurrence():
    logits = torch.tensor([[3.0, 2.5]])
    frequent = req(output=[0, 0], temperature=0.0, frequency_penalty=0.3)
    assert sample(logits, [frequent], [])[0] == [1]
    assert sample(logits, [req(output=[0], temperature=0.0, presence_penalty=0.6)], [])[0] == [1]


def test_min_tokens_masks_eos_until_reached():
    logits = torch.tensor([[5.0, 1.0]])
    assert sample(logits, [req(temperature=0.0, min_tokens=2)], [0])[0] == [1]
    assert sample(logits, [req(output=[1, 1], temperature=0.0, min_tokens=2)], [0])[0] == [0]


def test_same_seed_same_tokens():
    logits = torch.zeros(1, 1000)
    a = [sample(logits, [r], [])[0][0] for r in [req(seed=7)] for _ in range(5)]
    b = [sample(logits, [r], [])[0][0] for r in [req(seed=7)] for _ in range(5)]
    assert a == b and len(set(a)) > 1
