"""The engine process's messages to the server: one pipe, written by the engine loop itself
and read by the server's event loop itself.

A multiprocessing Queue put them through two threads that each had to win the GIL first:
the Queue's feeder thread in the engine process (against the step loop) and a reader thread
in the server (against the event loop that writes the SSE), plus a third wake-up to hand them
to that loop. Under load each hop waited out a switch interval, and a stream's tokens reached
its client in clumps. Here the step loop writes each message, and the event loop reads one
per iteration as soon as the pipe is readable.
"""

from __future__ import annotations

import contextlib
import fcntl

PIPE_BYTES = 1 << 20  # room for ~100 steps of 64 requests: the engine never waits on a busy loop


class Outbox:
    """Both ends of the pipe; the engine process uses `put` (as on a Queue), the server
    `reader`. The server closes its copy of the write end once the engine has it, so that
    the engine's exit ends the pipe (EOF)."""

    def __init__(self, ctx) -> None:
        self.reader, self.writer = ctx.Pipe(duplex=False)
        with contextlib.suppress(OSError, AttributeError):  # Linux only; the default is 64 KiB
            fcntl.fcntl(self.writer.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    def __getstate__(self) -> dict:
        """The engine process gets the write end alone."""
        return {"reader": None, "writer": self.writer}

    def put(self, msg: object) -> None:
        """Engine side: written now, by the calling thread (no feeder thread to wake)."""
        self.writer.send(msg)

    def cancel_join_thread(self) -> None:
        """Engine side, as a Queue's: nothing is buffered in the process to flush."""
