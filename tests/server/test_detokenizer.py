"""The incremental detokenizer: whole characters only, and nothing past a stop string."""

from __future__ import annotations

import pytest

from pdserve.server.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! Plain ASCII with  double  spaces.",
    "Emoji: 🎉🚀👩‍👩‍👧 and flags 🇫🇷 in a row",
    "中文分词测试：你好，世界。日本語もテストします。",
    "Mixed: café naïve — “quotes” … 한국어 🙂 end",
]


def _stream(tokenizer, text: str, stop=None, include=False) -> tuple[list[str], str]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, [], stop, include)
    pieces = [detok.add_token(t) for t in ids]
    pieces.append(detok.flush())
    return pieces, "".join(pieces)


@pytest.mark.parametrize("text", TEXTS)
def test_concatenated_deltas_equal_the_full_decode(tokenizer, text):
    _, out = _stream(tokenizer, text)
    assert out == tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("text", TEXTS)
def test_no_delta_contains_a_broken_character(tokenizer, text):
    pieces, _ = _stream(tokenizer, text)
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_characters_span_several_tokens(tokenizer):
    # The premise of the tests above: an emoji is split over byte-level tokens.
    assert len(tokenizer("🎉", add_special_tokens=False).input_ids) > 1


def test_prompt_context_keeps_word_spacing(tokenizer):
    prompt = tokenizer("The capital of France is", add_special_tokens=False).input_ids
    out = tokenizer(" Paris, of course.", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detok.add_token(t) for t in out) + detok.flush()
    assert text == " Paris, of course."


def test_stop_string_cuts_the_text_and_is_not_sent(tokenizer):
    pieces, out = _stream(tokenizer, "one two three four five", stop=["three"])
    assert out == "one two "
    assert "thr" not in "".join(pieces)


def test_stop_string_inside_one_token_is_found(tokenizer):
    _, out = _stream(tokenizer, "Hello, world! Again.", stop=["llo"])
    assert out == "He"


def test_stop_string_spanning_tokens_with_multibyte_characters(tokenizer):
    _, out = _stream(tokenizer, "Party 🎉🚀 time", stop=["🎉🚀"])
    assert out == "Party "


def test_include_stop_str_in_output(tokenizer):
    _, out = _stream(tokenizer, "one two three four", stop=["two"], include=True)
    assert out == "one two"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    _, out = _stream(tokenizer, "alpha beta gamma delta", stop=["delta", "beta"])
    assert out == "alpha "


def test_nothing_is_released_after_a_stop(tokenizer):
    ids = tokenizer("stop here and more text", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, [], ["here"])
    released = "".join(detok.add_token(t) for t in ids) + detok.flush()
    assert released == "stop " and detok.stopped_by == "here"
    assert detok.add_token(ids[0]) == ""
