"""How one request wants its tokens sampled and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.grammar import GrammarSpec


@dataclass
class SamplingParams:
    """Per-request sampling. Stop *strings* are the server's job (it detokenizes); the engine
    stops on token ids, EOS and max_tokens."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0
    seed: int | None = None  # same seed and prompt: the same tokens, in any layout
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives to return with each sampled token
    grammar: GrammarSpec | None = None  # structured output: what the text must match
    logit_bias: dict[int, float] | None = None  # added to the logits before temperature

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
