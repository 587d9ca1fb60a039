"""A chat with images becomes the token ids transformers' SmolVLMProcessor makes of the same
conversation and images: the template's image placeholders expanded into fake tokens,
row/col markers, the global-image marker and image_seq_len image tokens per tile."""

from __future__ import annotations

import pytest

from pdserve.media.image_inputs import ImagePreparer, ImageRef
from pdserve.media.limits import MediaLimits
from pdserve.media.vision_spec import VisionSpec
from pdserve.server.errors import APIError
from pdserve.server.prompts import chat_prompt_ids
from pdserve.server.protocol import ChatCompletionRequest
from tests.media.vision_helpers import (
    IMAGE_SEQ_LEN,
    LONGEST_EDGE,
    TILE,
    data_url,
    encoded,
    random_image,
    reference_processor,
    smolvlm_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return smolvlm_tokenizer()


@pytest.fixture(scope="module")
def preparer(tokenizer):
    spec = VisionSpec(image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      image_seq_len=IMAGE_SEQ_LEN, tile_size=TILE, longest_edge=LONGEST_EDGE)
    preparer = ImagePreparer(spec, MediaLimits())
    yield preparer
    preparer.close()


def chat(*contents: list[dict] | str) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": c} for c in contents]})


def image_part(image, detail: str = "auto") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(encoded(image)),
                                               "detail": detail}}


def ours(tokenizer, preparer, req: ChatCompletionRequest, detail: str = "auto") -> list[int]:
    refs = [ImageRef(p.url, p.detail, "url") for m in req.messages for _, p in m.images()]
    images = [preparer.prepare_now(ref) for ref in refs]
    return chat_prompt_ids(tokenizer, req.messages, True, images=images)


def reference(tokenizer, conversation: list[dict], images, split: bool = True) -> list[int]:
    processor = reference_processor(tokenizer)
    # the processor's own apply_chat_template wants its video processor; the template is
    # the tokenizer's either way
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                         tokenize=False)
    out = processor(text=[text], images=[images] if images else None,
                    do_image_splitting=split)
    return list(out["input_ids"][0])


def hf_turn(*parts) -> dict:
    """A user turn in transformers' content format."""
    return {"role": "user", "content": [
        {"type": "text", "text": p} if isinstance(p, str) else {"type": "image"}
        for p in parts]}


@pytest.mark.parametrize("size", [(100, 300), (40, 40), (300, 90)])
def test_one_image_and_text_match_the_processor(tokenizer, preparer, size):
    image = random_image(*size)
    req = chat([image_part(image), {"type": "text", "text": "What is in this image?"}])
    expected = reference(tokenizer, [hf_turn(None, "What is in this image?")], [image])
    assert ours(tokenizer, preparer, req) == expected


def test_several_images_in_several_messages_match_the_processor(tokenizer, preparer):
    a, b, c = random_image(100, 200, 1), random_image(250, 70, 2), random_image(30, 30, 3)
    req = chat([{"type": "text", "text": "Compare"}, image_part(a), image_part(b)],
               [image_part(c), {"type": "text", "text": "and this one?"}])
    expected = reference(tokenizer, [hf_turn("Compare", None, None),
                                     hf_turn(None, "and this one?")], [a, b, c])
    assert ours(tokenizer, preparer, req) == expected


def test_detail_low_matches_the_processor_without_splitting(tokenizer, preparer):
    image = random_image(100, 300)
    req = chat([image_part(image, "low"), {"type": "text", "text": "Describe it."}])
    expected = reference(tokenizer, [hf_turn(None, "Describe it.")], [image], split=False)
    assert ours(tokenizer, preparer, req) == expected


def test_text_only_chat_to_a_vision_model_matches_the_processor(tokenizer, preparer):
    req = chat("Hello there")
    assert ours(tokenizer, preparer, req) == reference(tokenizer, [hf_turn("Hello there")], [])


@pytest.mark.parametrize("text", ["look: <image>", "<fake_token_around_image><image>"])
def test_image_tokens_typed_by_the_client_are_refused(tokenizer, preparer, text):
    req = chat([image_part(random_image(20, 20)), {"type": "text", "text": text}])
    with pytest.raises(APIError) as info:
        ours(tokenizer, preparer, req)
    assert info.value.status_code == 400 and info.value.param == "messages"


def test_an_empty_message_renders_as_the_processor_renders_it(tokenizer, preparer):
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]})
    expected = reference(tokenizer, [{"role": "system", "content": [{"type": "text",
                                                                     "text": ""}]},
                                     hf_turn("Hi")], [])
    assert ours(tokenizer, preparer, req) == expected
