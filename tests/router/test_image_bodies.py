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
