"""Structured output in the engine (embedded SmolLM2, CPU): a grammar row obeys its grammar
without changing its batch neighbours' tokens, async scheduling gives the serial tokens,
and a request that arrives with output already made (D, resumed) continues the grammar."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pdserve.config import CacheConfig, EngineArgs
from pdserve.engine.engine import Engine
from pdserve.engine.grammar import GrammarSpec
from pdserve.engine.outputs import EngineRequest
from pdserve.engine.sampling_params import SamplingParams
from pdserve.models.loader import load_tokenizer

SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y"]},
                                           "n": {"type": "integer", "maximum": 99}},
          "required": ["a", "n"], "additionalProperties": False}
SPEC = GrammarSpec("json_schema", json.dumps(SCHEMA))
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198, 1, 4093, 198]


def make_engine(async_scheduling: bool) -> Engine:
    return Engine(EngineArgs(cache=CacheConfig(kv_cache_memory=32 * 2**20),
                             async_scheduling=async_scheduling))


@pytest.fixture(scope="module")
def engines() -> dict[str, Engine]:
    return {"serial": make_engine(False), "overlapped": make_engine(True)}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def _run(engine: Engine, grammar_temps: list[float], plain: int = 2) -> dict[str, list[int]]:
    reqs = [EngineRequest(f"g{i}", PROMPT, SamplingParams(max_tokens=30, temperature=t,
                                                           seed=i, grammar=SPEC))
            for i, t in enumerate(grammar_temps)]
    reqs += [EngineRequest(f"p{i}", PROMPT[i:], SamplingParams(max_tokens=8, temperature=0.0,
                                                                ignore_eos=True))
             for i in range(plain)]
    return engine.generate(reqs)


def test_grammar_rows_obey_and_neighbours_are_untouched(engines, tokenizer):
    out = _run(engines["serial"], [0.0, 1.0, 1.0])
    for rid in ("g0", "g1", "g2"):
        text = tokenizer.decode(out[rid], skip_special_tokens=True)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert out[rid][-1] in engines["serial"].eos_token_ids  # stopped by the grammar
    alone = _run(engines["serial"], [])
    assert {k: v for k, v in out.items() if k.startswith("p")} == alone


def test_async_scheduling_gives_the_serial_tokens(engines):
    assert engines["overlapped"].loop.depth == 1
    assert _run(engines["overlapped"], [0.0, 1.0]) == _run(engines["serial"], [0.0, 1.0])


def test_known_output_advances_the_grammar(engines, tokenizer):
    engine = engines["serial"]
    whole = _run(engine, [0.0], plain=0)["g0"]
    resumed = EngineRequest("r", PROMPT, SamplingParams(max_tokens=30, temperature=0.0,
                                                        grammar=SPEC),
                            output_token_ids=whole[:3])
    rest = engine.generate([resumed])["r"]
    assert whole[:3] + rest == whole


def test_known_output_the_grammar_rejects_is_refused(engines, tokenizer):
    bad = tokenizer("hello", add_special_tokens=False).input_ids
    req = EngineRequest("bad", PROMPT, SamplingParams(max_tokens=30, grammar=SPEC),
                        output_token_ids=bad)
    with pytest.raises(ValueError, match="does not match"):
        engines["serial"].add_request(req)
    assert "bad" not in engines["serial"].requests
