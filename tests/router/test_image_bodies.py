"""The router's own reading of a body with image parts: its load estimate counts images as
tokens, not their URLs as text, and its cache-aware tokenizer leaves such prompts to be
routed by load (their image tokens depend on the decoded image) instead of failing."""

from __future__ import annotations

import json

from pdserve.models.loader import load_tokenizer
from pdserve.router.pairing import IMAGE_TOKENS_ESTIMATE, estimate_prompt_tokens
from pdserve.router.prompt_tokens import PromptTokenizer
from pdserve.router.validation import check_body

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 400_000}}
BODY = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a" * 40}, IMAGE]}]}


def test_an_image_counts_as_image_tokens_not_as_its_url():
    assert estimate_prompt_tokens(BODY) == (40 + 8) // 4 + 1 + IMAGE_TOKENS_ESTIMATE


def test_the_router_validates_image_parts_as_instances_do():
    assert check_body(b'{"messages": [{"role": "user", "content": [{"type": "image_url", '
                      b'"image_url": {"url": "data:,", "detail": "ultra"}}]}]}',
                      "/v1/chat/completions").status_code == 400
    assert isinstance(check_body(json.dumps(BODY).encode(),
                                 "/v1/chat/completions"), dict)


def test_cache_aware_tokenization_routes_image_prompts_by_load():
    tokens = PromptTokenizer(tokenizer=load_tokenizer(None))
    assert tokens.ids_now(True, BODY) is None
    text_only = {"messages": [{"role": "user", "content": "hello"}]}
    assert tokens.ids_now(True, text_only)


def test_the_router_raises_its_body_limit_only_when_told_of_images():
    import argparse

    from pdserve.media.flags import router_body_bytes
    from pdserve.router.cli import add_parser

    top = argparse.ArgumentParser()
    add_parser(top.add_subparsers())

    def parse(flags: list[str]) -> argparse.Namespace:
        return top.parse_args(["router", *flags])
    assert router_body_bytes(parse([])) == 8 * 2**20  # text models: the plain limit
    raised = router_body_bytes(parse(["--limit-mm-per-prompt", "4"]))
    assert raised > 4 * 8 * 2**20  # four 8 MiB images as base64
    assert router_body_bytes(parse(["--max-image-bytes", "1MiB", "--limit-mm-per-prompt",
                                    "2"])) == 8 * 2**20  # two 1 MiB images fit in 8 MiB


def test_pdserve_up_tells_the_router_when_its_instances_take_images():
    from pdserve.media.flags import body_flags, takes_images

    assert takes_images("smolvlm-tiny") and not takes_images(None)
    assert body_flags([], images=True) == ["--limit-mm-per-prompt", "4"]
    assert body_flags(["--max-image-bytes", "1MiB"], images=True) == ["--max-image-bytes",
                                                                       "1MiB"]
    assert body_flags(["--max-num-seqs", "8"], images=False) == []
