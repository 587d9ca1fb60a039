"""The messages between the HTTP server and its engine process, one small dataclass each.

Into the engine (its inbox): AddRequest | AbortRequest | ReleaseLease | Shutdown.
Out of it (its outbox): EngineReady | EngineInitError, once; then StepOutputs, until
EngineFatal or the end. Every AddRequest is answered first by a verdict in StepOutputs: an
empty RequestOutput (accepted) or a finished one carrying `error` (refused).
They cross a multiprocessing queue, so each is plain picklable data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.kv_events import KVEvents
from pdserve.engine.outputs import EngineRequest, EngineStats, RequestOutput
from pdserve.media.vision_spec import VisionSpec


@dataclass
class EngineInfo:
    """What the server needs to know about the model, sent once the engine is ready."""

    model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    pid: int
    block_size: int = 0  # of the prefix cache's blocks (0: it publishes no KV events)
    vision: VisionSpec | None = None  # how its images are prepared; None: it takes none
    hidden_size: int = 0  # rows an encoder sends must be this wide (0: unknown)


# --- server -> engine ---


@dataclass
class AddRequest:
    """Queue a request; answered by a verdict before the next step's outputs."""

    request: EngineRequest


@dataclass
class AbortRequest:
    """Stop a request and free its blocks (a no-op if it has finished already)."""

    request_id: str


@dataclass
class ReleaseLease:
    """On P: free a finished prefill's held KV now, if `lease_token` is its capability."""

    request_id: str
    lease_token: str | None


@dataclass
class Shutdown:
    """Leave the step loop and exit."""


ToEngine = AddRequest | AbortRequest | ReleaseLease | Shutdown


# --- engine -> server ---


@dataclass
class EngineReady:
    """The model is loaded (and warmed up); requests may come."""

    info: EngineInfo


@dataclass
class EngineInitError:
    """The engine could not start; `traceback` says why."""

    traceback: str


@dataclass
class StepOutputs:
    """One step's outputs (or a batch of verdicts), with the engine's stats after it."""

    outputs: list[RequestOutput] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)
    kv_events: KVEvents | None = None  # the prefix cache's changes since the last message


@dataclass
class EngineFatal:
    """The step loop raised; the engine process is ending and no request can be served."""

    traceback: str


FromEngine = EngineReady | EngineInitError | StepOutputs | EngineFatal
