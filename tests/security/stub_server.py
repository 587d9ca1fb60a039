"""An HTTP server on loopback that claims to be an instance and records every call it gets:
a rogue trying to join a router, or a decode instance that fails in a chosen way."""

from __future__ import annotations

import json

from tests.router.stub_http import JSONHandler, serve_on_loopback

CHUNK = {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": "stub",
         "choices": [{"index": 0, "text": " stub", "logprobs": None, "finish_reason": None}]}


class StubInstance:
    """GET answers 200 {"status": "ok"} (so it looks healthy). POST, by `mode`: "error"
    answers 503 as an instance whose engine died; "break" closes the connection: at once for
    a plain request, after one SSE chunk for a streamed one; "ok" answers one token."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.calls: list[tuple[str, str]] = []  # (method, path) of every request received
        stub = self

        class Handler(JSONHandler):
            def do_GET(self) -> None:
                stub.calls.append(("GET", self.path))
                self._answer(200, {"status": "ok", "engine_pid": 0})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                stub.calls.append(("POST", self.path))
                streamed = b'"stream": true' in body
                if stub.mode == "error":
                    self._answer(503, {"error": {"message": "engine died", "type":
                                                 "server_error", "param": None,
                                                 "code": "engine_dead"}})
                elif stub.mode == "break" and not streamed:
                    self.close_connection = True  # no answer at all
                elif stub.mode == "break":
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.end_headers()
                    self.wfile.write(f"data: {json.dumps(CHUNK)}\n\n".encode())
                    self.wfile.flush()  # then the handler returns: HTTP/1.0 closes
                else:
                    choice = {**CHUNK["choices"][0], "finish_reason": "length"}
                    self._answer(200, {**CHUNK, "choices": [choice]})

        self.server, self.url = serve_on_loopback(Handler)

    def posts(self) -> list[str]:
        return [path for method, path in self.calls if method == "POST"]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
