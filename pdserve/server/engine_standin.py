"""An engine stand-in that gives every running request one token each T ms, for measuring the
serving path alone (benchmarks/bench_serving_path.py; `pdserve serve --engine-standin T_MS`).

It runs in the engine process in place of Engine, behind the same message loop, and makes
real RequestOutput deltas, so the server's detokenizer, SSE and metrics run unchanged. Its
tokens are the prompt's, over and over: real text for the real tokenizer.
"""

from __future__ import annotations

import time

from pdserve.config import EngineArgs
from pdserve.engine.outputs import EngineRequest, EngineStats, RequestOutput, RequestTimes
from pdserve.media.image_check import check_image_tokens
from pdserve.media.vision_spec import (
    IMAGE_TOKEN,
    VisionSpec,
    is_vision_folder,
    tokenizer_folder_added_tokens,
)
from pdserve.models.loader import model_config

STANDIN_BLOCKS = 1 << 20  # a cache no request fills: the stand-in keeps no KV


class StandinEngine:
    """Steps on a fixed grid of `interval_s`: each step emits one token per running request."""

    def __init__(self, args: EngineArgs, interval_s: float, busy: float = 0.0) -> None:
        cfg = model_config(args.model)  # the real model's sizes and EOS, without its weights
        self.model_name = args.model or "SmolLM2-135M-Instruct"
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = list(cfg.eos_token_ids)
        self.max_model_len = args.scheduler.max_model_len or cfg.max_position_embeddings
        self.request_failures = 0
        self.vision = standin_vision(args.tokenizer)
        if self.vision is not None:  # a vision model's vocabulary holds its image tokens
            added = tokenizer_folder_added_tokens(args.tokenizer).values()
            self.vocab_size = max(self.vocab_size, max(added) + 1)
        self.interval_s = interval_s
        self.busy = busy  # of each step spent computing, GIL held, as an engine's host thread
        self._running: dict[str, tuple[EngineRequest, list[int], RequestTimes]] = {}
        self._next_step = 0.0

    def add_request(self, req: EngineRequest) -> None:
        if not req.prompt_token_ids:
            raise ValueError("the prompt is empty")
        check_image_tokens(req.prompt_token_ids, req.images, self.vision)
        times = RequestTimes(arrival=req.arrival_time, scheduled=time.monotonic())
        self._running[req.request_id] = (req, [], times)

    def abort_request(self, request_id: str) -> None:
        del self._running[request_id]

    def release_lease(self, request_id: str, lease_token: object) -> bool:
        return False  # it never holds KV for a decode instance

    def has_unfinished_requests(self) -> bool:
        return bool(self._running)

    def step(self) -> list[RequestOutput]:
        """Wait for the next point of the grid, then one token for each running request."""
        now = time.monotonic()
        if self._next_step < now - self.interval_s:  # idle before: a new grid starts now
            self._next_step = now
        self._next_step += self.interval_s
        _hold_gil_until(now + self.busy * self.interval_s)
        time.sleep(max(self._next_step - time.monotonic(), 0.0))
        return [self._advance(rid) for rid in list(self._running)]

    def _advance(self, request_id: str) -> RequestOutput:
        req, out, times = self._running[request_id]
        prompt = req.prompt_token_ids
        token = prompt[len(out) % len(prompt)]
        out.append(token)
        now = time.monotonic()
        times.first_token = times.first_token or now
        done = len(out) >= req.params.max_tokens
        if not done:
            return RequestOutput(request_id, [token], num_prompt_tokens=len(prompt))
        del self._running[request_id]
        times.finished = now
        return RequestOutput(request_id, [token], finished=True, finish_reason="length",
                             num_prompt_tokens=len(prompt), times=times)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self._running), num_total_blocks=STANDIN_BLOCKS,
                           num_free_blocks=STANDIN_BLOCKS)


def standin_vision(tokenizer: str | None) -> VisionSpec | None:
    """A stand-in takes images (as a vision model with these settings would, for measuring
    and testing the image path) when --tokenizer is a folder with an image processor's
    settings and an <image> token."""
    if not tokenizer or not is_vision_folder(tokenizer):
        return None
    token_id = tokenizer_folder_added_tokens(tokenizer).get(IMAGE_TOKEN)
    return None if token_id is None else VisionSpec.from_folder(tokenizer, token_id)


def _hold_gil_until(deadline: float) -> None:
    """Python work until `deadline`: the GIL is held, as by an engine that schedules,
    prepares inputs and launches kernels in its step."""
    while time.monotonic() < deadline:
        sum(range(100))


def standin_factory(interval_ms: float, busy: float, args: EngineArgs) -> StandinEngine:
    """For EngineClient(factory=functools.partial(standin_factory, T_MS, BUSY)): picklable."""
    return StandinEngine(args, interval_ms / 1000.0, busy)
