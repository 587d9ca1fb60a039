"""--log-requests: one INFO line per request with its id, prompt and sampling params."""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass

from pdserve.engine.sampling_params import SamplingParams

log = logging.getLogger("pdserve.requests")


@dataclass
class RequestLog:
    """Logs requests with their prompt cut to `max_len` characters and token ids (None:
    whole)."""

    max_len: int | None = None

    def __post_init__(self) -> None:
        if not log.handlers:  # uvicorn configures only its own loggers
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
        log.setLevel(logging.INFO)

    def _cut(self, seq):
        return seq if self.max_len is None else seq[: self.max_len]

    def request(self, request_id: str, prompt: object, prompt_ids: list[int],
                params: SamplingParams, n: int) -> None:
        """One line for a request (its first choice's params; choice i's seed is seed + i)."""
        text = prompt if isinstance(prompt, str) else repr(prompt)
        log.info("request %s: prompt %r, prompt_token_ids %s (%d tokens), n %d, params %s",
                 request_id, self._cut(text), self._cut(prompt_ids), len(prompt_ids), n,
                 {k: v for k, v in asdict(params).items() if v not in (None, [], {})})
