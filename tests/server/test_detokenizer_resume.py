"""A resumed detokenizer: the text after a break continues exactly where the client's ends."""

from __future__ import annotations

import pytest

from pdserve.server.detokenizer import IncrementalDetokenizer

PROMPT = "Tell me a story:"
OUTPUT = " Once 🎉 upon a time, a café naïve 中文 stood there; the end is near. Done"


def _run(tokenizer, stop: list[str] | None, cut: int) -> tuple[str, str]:
    """(uninterrupted text, text of a run broken after `cut` tokens and resumed)."""
    prompt = tokenizer(PROMPT, add_special_tokens=False).input_ids
    ids = tokenizer(OUTPUT, add_special_tokens=False).input_ids

    def fresh() -> IncrementalDetokenizer:
        return IncrementalDetokenizer(tokenizer, prompt, stop)

    whole = fresh()
    reference = "".join(whole.add_token(t) for t in ids) + whole.flush()
    first = fresh()
    sent = "".join(first.add_token(t) for t in ids[:cut])  # what the client got
    second = fresh()
    second.resume(ids[:cut], len(sent))
    rest = "".join(second.add_token(t) for t in ids[cut:]) + second.flush()
    return reference, sent + rest


@pytest.mark.parametrize("stop", [None, ["the end"], ["🎉 upon"]])
def test_every_break_point_gives_the_uninterrupted_text(tokenizer, stop):
    n = len(tokenizer(OUTPUT, add_special_tokens=False).input_ids)
    for cut in range(1, n):
        reference, resumed = _run(tokenizer, stop, cut)
        assert resumed == reference, (cut, resumed)


def test_a_stop_string_spanning_the_break_still_stops(tokenizer):
    ids = tokenizer(OUTPUT, add_special_tokens=False).input_ids
    cut = next(i for i in range(1, len(ids))
               if tokenizer.decode(ids[:i]).endswith(" the"))  # break inside "the end"
    reference, resumed = _run(tokenizer, ["the end"], cut)
    assert reference == resumed and reference.endswith("stood there; ")
