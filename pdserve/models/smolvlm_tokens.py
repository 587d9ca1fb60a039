"""SmolVLM's special tokens and chat template, for a random-weight SmolVLM preset: the embedded
SmolLM2 tokenizer lacks them, and a real checkpoint's folder brings its own.

The ids are SmolVLM-256M-Instruct's: its 128 added tokens start at 49,152 with the global
image marker and the 36 tile markers, then the image-boundary and image tokens (49,190 is
the preset's image_token_id), and end with <end_of_utterance> (49,279, the preset's EOS).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

FIRST_ADDED_ID = 49152
END_OF_UTTERANCE_ID = 49279
IMAGE_MARKERS = (["<global-img>"]
                 + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
                 + ["<fake_token_around_image>", "<image>"])

# User/Assistant turns, an image part as <image> (the server expands it into tiles)
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}"
    "{% endif %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def add_smolvlm_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The embedded tokenizer (49,152 ids) with SmolVLM's added tokens at their ids."""
    if len(tokenizer) != FIRST_ADDED_ID:
        raise ValueError(f"SmolVLM's tokens start at id {FIRST_ADDED_ID}; this tokenizer has "
                         f"{len(tokenizer)} ids")
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_MARKERS})
    tokenizer.add_tokens([f"<|id_{i}|>" for i in range(len(tokenizer), END_OF_UTTERANCE_ID)])
    tokenizer.add_special_tokens({"eos_token": "<end_of_utterance>"})
    assert len(tokenizer) == END_OF_UTTERANCE_ID + 1
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
