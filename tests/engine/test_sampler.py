"""The sampler on hand-made logits: each filter does what it says."""

import pytest
import torch

from pdserve.engine.request import Request
from pdserve.engine.sampler import sample
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.seeded_noise import exponential_noise, prompt_digest, row_key


def req(output=(), **params) -> Request:
    r = Request("r", [0], SamplingParams(**params))
    r.output_token_ids = list(output)
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


def seeded_run(seed: int, prompt: list[int], n: int = 8) -> list[int]:
    """Tokens drawn one position after another from flat logits, as a request grows."""
    r = Request("r", prompt, SamplingParams(seed=seed))
    for _ in range(n):
        r.output_token_ids.append(sample(torch.zeros(1, 1000), [r], [])[0][0])
    return r.output_token_ids


def test_same_seed_same_tokens():
    a = seeded_run(7, [0])
    assert a == seeded_run(7, [0]) and len(set(a)) > 1


def test_seeded_tokens_depend_on_seed_and_prompt():
    assert seeded_run(7, [0]) != seeded_run(8, [0])
    assert seeded_run(7, [0]) != seeded_run(7, [1])


def test_a_seeded_draw_is_a_function_of_position_alone():
    """A request that arrives with its first tokens (D after P, a resumed one) continues
    exactly as the request that drew them: nothing but the position carries over."""
    whole = seeded_run(7, [3, 4], n=6)
    resumed = Request("r", [3, 4], SamplingParams(seed=7))
    resumed.output_token_ids = whole[:2]
    for _ in range(4):
        resumed.output_token_ids.append(sample(torch.zeros(1, 1000), [resumed], [])[0][0])
    assert resumed.output_token_ids == whole


def test_pending_tokens_count_in_the_position():
    """The async loop samples with its previous token still on the device (pending)."""
    known, pending = req(output=[5], seed=3), req(seed=3)
    pending.num_pending_tokens = 1
    logits = torch.zeros(1, 1000)
    assert sample(logits, [known], [])[0] == sample(logits, [pending], [])[0]


def test_seeded_rows_ignore_their_neighbours():
    logits = torch.randn(4, 500)
    alone = sample(logits[1:2], [req(seed=11)], [])[0]
    mixed = [req(), req(seed=11), req(temperature=0.0), req(seed=12)]
    assert sample(logits, mixed, [])[0][1] == alone[0]


def test_seeded_noise_is_exponential():
    noise = exponential_noise([row_key(5, prompt_digest([1, 2]), i) for i in range(64)],
                              4096, torch.float32, torch.device("cpu"))
    assert noise.min() > 0 and abs(noise.mean().item() - 1.0) < 0.01
    assert abs(noise.var().item() - 1.0) < 0.03


def test_seeded_noise_is_the_same_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    keys = [row_key(5, prompt_digest([1, 2]), i) for i in range(8)]
    cpu = exponential_noise(keys, 50000, torch.float32, torch.device("cpu"))
    gpu = exponential_noise(keys, 50000, torch.float32, torch.device("cuda")).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=0)


def test_logit_bias_moves_greedy_and_bans():
    logits = torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    boosted, banned = req(temperature=0.0, logit_bias={2: 100.0}), req(
        temperature=0.0, logit_bias={0: -100.0})
    assert sample(logits, [boosted, banned], [])[0] == [2, 1]


def test_logit_bias_applies_before_sampling_and_leaves_other_rows():
    logits = torch.zeros(2, 50)
    assert draws(logits[0], n=50, logit_bias={7: 100.0}) == {7}
    plain = req(temperature=0.0)
    assert sample(logits[:1].clone(), [plain], [])[0] == [0]
