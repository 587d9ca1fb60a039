"""The engine core's own process: requests and aborts in, per-step outputs and stats out.

It runs apart from the HTTP server so that tokenization, JSON and SSE work never take the
GIL from the step loop. It blocks on its inbox while it has nothing to do.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import traceback
from collections.abc import Callable

from pdserve.config import EngineArgs
from pdserve.cpu_heap import keep_cpu_heap
from pdserve.engine.compilations import COMPILATIONS
from pdserve.engine.kv_events import KVEventLog
from pdserve.engine.outputs import EngineRequest, RequestOutput
from pdserve.lifecycle import exit_with_parent
from pdserve.server.engine_messages import (
    AbortRequest,
    AddRequest,
    EngineFatal,
    EngineInfo,
    EngineInitError,
    EngineReady,
    ReleaseLease,
    Shutdown,
    StepOutputs,
    ToEngine,
)
from pdserve.shm import remove_stale_shared_kv_caches, unlink_shared_kv_files_of

IDLE_POLL_S = 1.0  # how often an idle engine checks that its parent is still alive
MAX_ERROR_CHARS = 300  # of an unexpected error's text in the verdict the client sees

log = logging.getLogger(__name__)


# The messages in and out are the dataclasses of pdserve/server/engine_messages.py.


def default_engine_factory(args: EngineArgs):
    """The real engine; imported here so that only the engine process loads the model code."""
    from pdserve.engine.engine import Engine, resolve_device

    if resolve_device(args.device).type == "cpu":
        keep_cpu_heap()  # this process is the engine's: before its weights are allocated
    return Engine(args)


def run_engine_process(
    args: EngineArgs,
    inbox,
    outbox,
    factory: Callable[[EngineArgs], object] = default_engine_factory,
) -> None:
    """Entry point of the spawned process."""
    # the server reaps this process as a daemon, but it must be free to start tensor-parallel
    # workers (multiprocessing forbids children of daemons; the workers exit with it)
    mp.current_process().daemon = False
    _bind_to_server()
    try:
        engine = factory(args)
    except BaseException:
        outbox.put(EngineInitError(traceback.format_exc()))
        return
    info = EngineInfo(
        model_name=engine.model_name,
        max_model_len=int(engine.max_model_len),
        vocab_size=int(engine.vocab_size),
        eos_token_ids=list(engine.eos_token_ids),
        pid=os.getpid(),
        block_size=_publish_kv_events(engine),
        vision=getattr(engine, "vision", None),
        hidden_size=int(getattr(getattr(engine, "model_config", None), "hidden_size", 0)),
    )
    COMPILATIONS.mark_ready()  # warmed up: whatever compiles from now on stalls a request
    outbox.put(EngineReady(info))
    outbox.put(_step_outputs(engine, []))  # /metrics has pool sizes from the start
    try:
        _loop(engine, inbox, outbox)
    except BaseException:
        outbox.put(EngineFatal(traceback.format_exc()))
        raise
    finally:
        if hasattr(engine, "close"):
            engine.close()  # the KV source's socket and shared memory
    outbox.cancel_join_thread()  # stopped: never let a full, unread pipe block the exit


def _bind_to_server() -> None:
    """The server owns this process's life: a terminal's Ctrl-C or a SIGTERM sent to the
    whole process group reaches us too, but the server drains its requests first and then
    stops us; if the server dies instead, we unlink our shared memory and exit at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pid = os.getpid()
    exit_with_parent(lambda: unlink_shared_kv_files_of(pid))
    remove_stale_shared_kv_caches()  # left by engines killed with -9


def _loop(engine, inbox, outbox) -> None:
    parent = os.getppid()
    while True:
        messages: list[ToEngine] = []
        if not engine.has_unfinished_requests():
            try:
                messages.append(inbox.get(timeout=IDLE_POLL_S))
            except queue.Empty:
                if os.getppid() != parent:
                    return  # the server is gone: nobody to serve
                # idle, but KV leases may have ended (released by D, or expired): free them
                outbox.put(_step_outputs(engine, engine.step()))
                continue
        messages.extend(_drain(inbox))
        verdicts: list[RequestOutput] = []
        for msg in messages:
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, AddRequest):
                verdicts.append(_add(engine, msg.request))
            elif isinstance(msg, AbortRequest):
                _abort(engine, msg.request_id)
            elif isinstance(msg, ReleaseLease):  # the step below frees its blocks
                _release_lease(engine, msg.request_id, msg.lease_token)
        if verdicts:  # before the step: the server answers 400 or starts streaming at once
            outbox.put(_step_outputs(engine, verdicts))
        if engine.has_unfinished_requests() or messages:
            outbox.put(_step_outputs(engine, engine.step()))


def _publish_kv_events(engine) -> int:
    """Make the engine's prefix cache log its KV events; its block size (0: it has no
    prefix cache to publish, e.g. a stand-in engine)."""
    pool = getattr(engine, "pool", None)
    if pool is None or not pool.enable_prefix_caching:
        return 0
    pool.events = KVEventLog()
    return int(pool.block_size)


def _step_outputs(engine, outputs: list[RequestOutput]) -> StepOutputs:
    """A step's outputs with the engine's stats and the prefix cache's changes since the
    last message (one batch a step keeps the events cheap)."""
    pool = getattr(engine, "pool", None)
    events = pool.events.take() if pool is not None and pool.events is not None else None
    return StepOutputs(outputs, engine.stats(), events or None)


def _drain(inbox) -> list:
    items = []
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items


def _add(engine, req: EngineRequest) -> RequestOutput:
    """Queue a request; the verdict is an empty output (accepted) or one with `error`.
    Whatever a request makes the engine raise fails that request alone, never the process."""
    try:
        engine.add_request(req)
    except ValueError as exc:  # the engine's message is meant for the user
        error = str(exc)
    except Exception as exc:
        _request_failed(engine, "add", req.request_id)
        with contextlib.suppress(Exception):  # undo whatever it left half-added
            engine.abort_request(req.request_id)
        error = f"the request could not be handled: {type(exc).__name__}: {exc}"
    else:
        return RequestOutput(req.request_id, [])
    return RequestOutput(req.request_id, [], finished=True, finish_reason="abort",
                         error=error[:MAX_ERROR_CHARS])


def _abort(engine, request_id: str) -> None:
    try:
        engine.abort_request(request_id)
    except (KeyError, ValueError):
        pass  # it finished on its own before the abort arrived
    except Exception:
        _request_failed(engine, "abort", request_id)


def _release_lease(engine, request_id: str, lease_token: str | None) -> None:
    try:
        engine.release_lease(request_id, lease_token)
    except Exception:
        _request_failed(engine, "release_lease", request_id)


def _request_failed(engine, what: str, request_id: str) -> None:
    """Log (with the traceback) and count one request's failure; the engine goes on."""
    log.exception("%s of request %s failed; the engine goes on", what, request_id)
    engine.request_failures += 1
