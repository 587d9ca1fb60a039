"""The OpenAI API as applications call it, with the official `openai` client: seeded sampling
that gives the same text in every layout, n choices prefilled once, logit_bias, echo and
batched prompts, against a plain instance and through routers of the CPU P/D fleet."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from pdserve.models.gguf_file import EMBEDDED_NAME as MODEL
from tests.router.cluster import metric

MAX_TOKENS = 8
BLOCK_SIZE = 16  # the instances' default --block-size
SEEDED = [  # (prompt, sampling): varied lengths and filters, all at temperature 1
    ("Hi", {}),
    ("The three primary colours are", {"top_p": 0.9}),
    ("Write a haiku about the sea:", {"top_k": 40}),
    ("Once upon a time, in a land far away, " * 6, {"top_p": 0.8, "top_k": 20}),
    ("def fibonacci(n):\n", {"top_k": 5}),
    ("List the planets of the solar system in order from the sun: Mercury,", {}),
]
CHAT = [{"role": "user", "content": "Tell me a fun fact about octopuses."}]
LAYOUTS = ["1P1D", "2P1D", "1P2D"]


@pytest.fixture(scope="module")
def routers(fleet, routers_tmp):
    made = fleet.routers(routers_tmp, ("colocated", *LAYOUTS))
    yield made
    for r in made.values():
        r.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)


def seeded_texts(url: str, seed: int) -> list[str]:
    """Every SEEDED prompt and one chat, at once (so that 2P/2D layouts use both sides)."""
    c = client(url)

    def one(i: int) -> str:
        if i == len(SEEDED):
            answer = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS,
                                               temperature=1.0, seed=seed,
                                               extra_body={"ignore_eos": True})
            return answer.choices[0].message.content
        prompt, fields = SEEDED[i]
        extra = {"ignore_eos": True, **({"top_k": fields["top_k"]} if "top_k" in fields
                                        else {})}
        answer = c.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=1.0, seed=seed, top_p=fields.get("top_p"),
                                      extra_body=extra)
        return answer.choices[0].text

    with ThreadPoolExecutor(len(SEEDED) + 1) as pool:
        return list(pool.map(one, range(len(SEEDED) + 1)))


def test_seeded_sampling_gives_the_same_text_in_every_layout(fleet, routers):
    """The headline: P samples the first token, D the rest, and yet the text is the plain
    instance's, token for token, in 1P1D, 2P1D and 1P2D."""
    plain = seeded_texts(fleet.c0.url, seed=42)
    assert seeded_texts(routers["colocated"].url, seed=42) == plain
    for layout in LAYOUTS:
        assert seeded_texts(routers[layout].url, seed=42) == plain, layout
    other = seeded_texts(routers["1P1D"].url, seed=7)
    assert sum(a != b for a, b in zip(plain, other)) >= len(plain) - 1


def prompt_tokens_by_source(url: str) -> dict[str, float]:
    return {s: metric(url, "vllm:prompt_tokens_by_source_total", source=s)
            for s in ("local_compute", "local_cache_hit")}


def test_n_choices_share_one_prefill(fleet):
    """n=3: three different seeded choices, and the prompt computed once (the siblings hit
    its full blocks in the prefix cache; each recomputes only its last partial block)."""
    url = fleet.c1.url
    prompt = f"[{uuid.uuid4().hex}] " + "Describe a walk through a forest in autumn. " * 4
    before = prompt_tokens_by_source(url)
    answer = client(url).completions.create(model=MODEL, prompt=prompt, n=3, seed=5,
                                            max_tokens=MAX_TOKENS, temperature=1.0,
                                            extra_body={"ignore_eos": True})
    after = prompt_tokens_by_source(url)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.text for c in answer.choices}) == 3
    n_prompt = answer.usage.prompt_tokens  # counted once, as OpenAI does
    assert answer.usage.completion_tokens == 3 * MAX_TOKENS
    shared = (n_prompt - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert after["local_cache_hit"] - before["local_cache_hit"] == 2 * shared
    assert after["local_compute"] - before["local_compute"] == n_prompt + 2 * (n_prompt
                                                                              - shared)


def test_n_choices_through_the_router_stream_and_repeat(routers):
    """Through P/D the request is served whole on one instance; streamed choices carry
    their index and are the non-streamed choices of the same seed."""
    c = client(routers["1P1D"].url)
    fields = dict(model=MODEL, messages=CHAT, n=2, seed=11, max_tokens=MAX_TOKENS,
                  temperature=1.0, extra_body={"ignore_eos": True})
    whole = c.chat.completions.create(**fields)
    texts = [ch.message.content for ch in whole.choices]
    streamed = ["", ""]
    for chunk in c.chat.completions.create(stream=True, **fields):
        for ch in chunk.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == texts and texts[0] != texts[1]


@pytest.mark.parametrize("layout", ["colocated", "1P1D"])
def test_logit_bias_forces_and_bans_a_token(layout, routers, smollm2_tokenizer):
    c = client(routers[layout].url)
    forced = smollm2_tokenizer.encode(" banana", add_special_tokens=False)[0]
    answer = c.completions.create(model=MODEL, prompt="My favourite fruit is", max_tokens=3,
                                  temperature=0.0, logit_bias={str(forced): 100},
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert answer.choices[0].model_extra["token_ids"] == [forced] * 3
    plain = c.completions.create(model=MODEL, prompt="My favourite fruit is", max_tokens=1,
                                 temperature=0.0, extra_body={"return_token_ids": True})
    first = plain.choices[0].model_extra["token_ids"][0]
    banned = c.completions.create(model=MODEL, prompt="My favourite fruit is", max_tokens=1,
                                  temperature=0.0, logit_bias={str(first): -100},
                                  extra_body={"return_token_ids": True})
    assert banned.choices[0].model_extra["token_ids"][0] != first


@pytest.mark.parametrize("layout", ["colocated", "1P1D"])
def test_echo_prepends_the_prompt(layout, routers):
    c = client(routers[layout].url)
    prompt = "The capital of France is"
    answer = c.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0,
                                  echo=True)
    plain = c.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0)
    assert answer.choices[0].text == prompt + plain.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0, echo=True, stream=True)
        if ch.choices)
    assert streamed == answer.choices[0].text
    with pytest.raises(openai.BadRequestError, match="echo"):
        c.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=1)


@pytest.mark.parametrize("layout", ["colocated", "1P2D"])
def test_batched_prompts_are_indexed_prompt_major(layout, routers, smollm2_tokenizer):
    c = client(routers[layout].url)
    prompts = ["The capital of France is", "Two plus two is"]
    answer = c.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4,
                                  temperature=0.0)
    assert [ch.index for ch in answer.choices] == [0, 1, 2, 3]
    alone = [c.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0.0)
             .choices[0].text for p in prompts]
    assert [ch.text for ch in answer.choices] == [alone[0], alone[0], alone[1], alone[1]]
    as_ids = [smollm2_tokenizer.encode(p) for p in prompts]
    by_ids = c.completions.create(model=MODEL, prompt=as_ids, max_tokens=4, temperature=0.0)
    assert [ch.text for ch in by_ids.choices] == alone


@pytest.mark.parametrize("fields, param", [
    ({"n": 17}, "n"),
    ({"logit_bias": {"banana": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"best_of": 2}, "best_of"),
    ({"prompt": ["a"] * 65}, "prompt"),
])
def test_out_of_bounds_fields_are_refused_by_name(fields, param, routers):
    for url in (routers["colocated"].url, routers["1P1D"].url):
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields}
        with pytest.raises(openai.BadRequestError) as err:
            client(url).completions.create(**body)
        error = err.value.body  # the OpenAI error object: param, or the message, names it
        assert error["param"] == param or param in error["message"], error
