"""The server's handle on the engine process: submit, stream outputs, abort, watch its health.

The event loop reads each step's outputs off the engine's outbox pipe as soon as they are
written (pdserve/server/outbox.py) and fans them into one asyncio queue per request. If the
engine process dies, every open request fails with a 503 and `healthy` turns false for good.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections.abc import Callable

from pdserve.config import EngineArgs
from pdserve.engine.outputs import EngineRequest, EngineStats
from pdserve.server.engine_messages import (
    AbortRequest,
    AddRequest,
    EngineFatal,
    EngineInfo,
    EngineReady,
    ReleaseLease,
    Shutdown,
    StepOutputs,
)
from pdserve.server.engine_process import default_engine_factory, run_engine_process
from pdserve.server.kv_event_hub import KVEventHub
from pdserve.server.outbox import Outbox
from pdserve.shm import unlink_shared_kv_files_of

READER_POLL_S = 0.5  # how often start() checks that the engine process is alive
ABORTED = object()  # put on a request's queue when the server aborts it


class EngineDeadError(RuntimeError):
    """The engine process exited; no request can be served."""


class EngineClient:
    """Owns the engine process and routes its outputs to the requests waiting for them."""

    def __init__(
        self, args: EngineArgs,
        factory: Callable[[EngineArgs], object] = default_engine_factory,
    ) -> None:
        args.require_deployment_secret()  # P and D: a clear error before anything starts
        self.args = args
        self.info: EngineInfo | None = None
        self.stats = EngineStats()
        self.kv_events = KVEventHub()  # the prefix cache's hashes, streamed to routers
        self.dead_reason: str | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        ctx = mp.get_context("spawn")  # fork would copy the server's threads and CUDA state
        self._inbox = ctx.Queue()
        self._outbox = Outbox(ctx)
        self._proc = ctx.Process(
            target=run_engine_process, args=(args, self._inbox, self._outbox, factory),
            name="pdserve-engine", daemon=True,
        )

    @property
    def healthy(self) -> bool:
        return self.info is not None and self.dead_reason is None

    def start(self, timeout_s: float = 600.0) -> EngineInfo:
        """Spawn the engine and block until it has loaded the model (raises if it cannot)."""
        self._proc.start()
        self._outbox.writer.close()  # the engine's copy is the only one: its exit ends the pipe
        waited = 0.0
        while not self._outbox.reader.poll(READER_POLL_S):
            waited += READER_POLL_S
            code = self._proc.exitcode
            if not self._proc.is_alive():
                raise RuntimeError(f"engine process exited with code {code}")
            if waited > timeout_s:
                raise TimeoutError("engine did not become ready in time")
        try:
            first = self._outbox.reader.recv()
        except EOFError:
            self._proc.join(timeout=5)
            raise RuntimeError(f"engine process exited with code {self._proc.exitcode}") from None
        if not isinstance(first, EngineReady):  # EngineInitError
            raise RuntimeError(f"engine failed to start:\n{first.traceback}")
        self.info = first.info
        self.kv_events.block_size = first.info.block_size
        return self.info

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start routing outputs into `loop` (call from inside the running loop)."""
        self._loop = loop
        loop.add_reader(self._outbox.reader.fileno(), self._read_outputs)

    def add(self, req: EngineRequest) -> asyncio.Queue:
        """Submit a request. Its queue receives RequestOutputs until one is finished, or an
        EngineDeadError, or ABORTED after `abort`."""
        if not self.healthy:
            raise EngineDeadError(self.dead_reason or "engine not started")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[req.request_id] = q
        self._inbox.put(AddRequest(req))
        return q

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its waiter wakes with ABORTED."""
        q = self._queues.pop(request_id, None)
        if q is None:
            return
        q.put_nowait(ABORTED)
        if self.healthy:
            self._inbox.put(AbortRequest(request_id))

    def release_lease(self, request_id: str, lease_token: str | None) -> None:
        """On P: free a finished prefill's held KV now (no decode instance will pull it),
        if `lease_token` is its capability."""
        if self.healthy:
            self._inbox.put(ReleaseLease(request_id, lease_token))

    def shutdown(self) -> None:
        """Stop the engine process (politely, then by force)."""
        if self._proc.is_alive():
            self._inbox.put(Shutdown())
            self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._forget_shared_memory()

    def _forget_shared_memory(self) -> None:
        """Unlink the KV files of an engine that is gone (killed with -9: it could not)."""
        if self._proc.pid is not None and not self._proc.is_alive():
            unlink_shared_kv_files_of(self._proc.pid)

    def _read_outputs(self) -> None:
        """On the event loop, when the outbox is readable: one message, so that one step's
        events are written before the next step is read (reading all that waited handed the
        streams two steps at once whenever the loop ran late, and their clients got clumps);
        more waiting keeps the pipe readable for the next iteration."""
        reader = self._outbox.reader
        try:
            if reader.poll():
                msg = reader.recv()
                if isinstance(msg, EngineFatal):
                    self._stop_reading(f"engine crashed:\n{msg.traceback}")
                    return
                self._dispatch(msg)
        except (EOFError, OSError):  # the engine process is gone (its end of the pipe closed)
            self._proc.join(timeout=1)
            self._forget_shared_memory()
            self._stop_reading(f"engine process exited with code {self._proc.exitcode}")

    def _stop_reading(self, reason: str) -> None:
        self._loop.remove_reader(self._outbox.reader.fileno())
        self._fail_all(reason)

    def _dispatch(self, msg: StepOutputs) -> None:
        self.stats = msg.stats
        if msg.kv_events is not None:
            self.kv_events.publish(msg.kv_events)
        for out in msg.outputs:
            q = self._queues.get(out.request_id)
            if q is None:
                continue  # aborted by the server already
            q.put_nowait(out)
            if out.finished:
                del self._queues[out.request_id]

    def _fail_all(self, reason: str) -> None:
        self.dead_reason = reason
        for q in self._queues.values():
            q.put_nowait(EngineDeadError(reason))
        self._queues.clear()
