"""A CPU instance compiles and captures nothing once it has said ready: varied requests
(short and long prompts, streamed, several at once) leave every kind of
`pdserve:compilations_after_ready_total` at 0."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from server_helpers import chat, complete, metric, stream_events

KINDS = ("triton", "cuda_graph", "torch_compile", "native")
NAME = "pdserve:compilations_after_ready_total"


def test_nothing_is_compiled_or_captured_while_serving(client):
    assert [metric(client, NAME, kind=k) for k in KINDS] == [0] * 4  # served from the start
    complete(client, "Hi", max_tokens=2, temperature=0.0)
    complete(client, "Tell me about the sea. " * 60, max_tokens=3, temperature=0.0)  # ~400 tokens
    events = stream_events(client, "/v1/completions",
                           {"prompt": "Count: one, two,", "max_tokens": 4})
    assert events[-1] == "[DONE]"
    chat(client, "Name a colour.", max_tokens=3)
    prompts = ["a", "The quick brown fox " * 10, "Once upon a time", "1 2 3 4 5 6 7 8 9"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(lambda p: complete(client, p, max_tokens=5, temperature=0.8), prompts))
    assert [metric(client, NAME, kind=k) for k in KINDS] == [0] * 4
