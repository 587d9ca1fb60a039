"""The KV connector seam: what the scheduler and the engine loop ask about KV that comes
from, or goes to, another instance (vLLM's KVConnectorBase_V1, scheduler side, made small).

The scheduler asks three questions:

    matched_remote_tokens(request) -> int      admitting: how many prompt tokens come from
                                               elsewhere (after the local prefix-cache hit)
    blocks_allocated(request, block_ids, hit)  admitted: its blocks are ready (D pulls here)
    request_finished(request) -> (keep, held)  finished or aborted: keep its blocks (the
                                               connector owns them now) or free them

and the engine loop takes the connector's hand-back once a step (`poll`: finished pulls and
the blocks of ended leases). The request's typed hand-off (`Request.handoff`) is read here
only: the scheduler and the engine never look at it. A colocated engine gets
`NullConnector`. The P/D connector is `kv_connector.KVConnector`; another payload (e.g.
encoder outputs) is another class with these methods, in a file of its own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.engine.handoff import HeldPrefill, KVHandoff
from pdserve.engine.histogram import KV_TRANSFER_BUCKETS, StepHistogram
from pdserve.engine.request import Request


@dataclass
class PullResult:
    """A pull that ended: `ok` or it failed (the request then prefills locally)."""

    request_id: str
    ok: bool
    error: str | None = None
    num_bytes: int = 0
    seconds: float = 0.0
    transport: str | None = None


@dataclass
class ConnectorStats:
    pulls_ok: int = 0
    pulls_failed: int = 0
    bytes_pulled: int = 0
    leases_held: int = 0
    pulls_by_transport: Counter[str] = field(default_factory=Counter)  # ok pulls that moved bytes
    # durations of the pulls that moved blocks (all-prefix-hit pulls move none)
    pull_seconds: StepHistogram = field(default_factory=lambda: StepHistogram(KV_TRANSFER_BUCKETS))


class Connector(Protocol):
    """What an engine needs of its KV connector. Every method runs on the engine's thread."""

    stats: ConnectorStats

    # ---- the scheduler's three questions -----------------------------------------------

    def matched_remote_tokens(self, request: Request) -> int:
        """Prompt tokens another instance computes for `request`, asked when it is admitted,
        after its local prefix-cache hit (`request.num_computed_tokens`) is attached; with
        0 it is prefilled here. Asked again after a preemption: a connector answers 0 once
        the request's remote KV was used."""
        ...

    def blocks_allocated(self, request: Request, block_ids: list[int],
                         num_local_hit_tokens: int) -> None:
        """`request` is admitted with `block_ids` (its first `num_local_hit_tokens` tokens'
        blocks from the local prefix cache). With remote tokens, the connector fills the
        rest and reports it through `poll`; the request waits until then."""
        ...

    def request_finished(self, request: Request) -> tuple[bool, HeldPrefill | None]:
        """`request` finished or was aborted (its status says which). True: the connector
        keeps its blocks (and frees them later through `poll`); False: free them now. The
        HeldPrefill is the hand-off to answer with, if any."""
        ...

    # ---- the engine loop's hand-back ---------------------------------------------------

    def poll(self) -> tuple[list[PullResult], list[int]]:
        """Pulls that ended since the last call, and block ids the connector let go of."""
        ...

    def wait(self, timeout_s: float) -> None:
        """Block until something ends or `timeout_s` passes (an idle loop's sleep)."""
        ...

    # ---- hand-offs of requests the engine does not hold --------------------------------

    def request_refused(self, handoff: KVHandoff | None) -> None:
        """A request with `handoff` was refused before admission: let its KV's owner know."""
        ...

    def revoke_lease(self, request_id: str) -> None:
        """End this engine's own lease of `request_id`, if any (its client left)."""
        ...

    def release_lease(self, request_id: str, lease_token: object) -> bool:
        """End a lease on its holder's word; False if none or `lease_token` is not its."""
        ...

    def num_leases(self) -> int: ...

    def close(self) -> None: ...


@dataclass
class NullConnector:
    """A colocated engine's connector: nothing comes from elsewhere, nothing is kept."""

    stats: ConnectorStats = field(default_factory=ConnectorStats)

    def matched_remote_tokens(self, request: Request) -> int:
        return 0

    def blocks_allocated(self, request: Request, block_ids: list[int],
                         num_local_hit_tokens: int) -> None:
        pass

    def request_finished(self, request: Request) -> tuple[bool, HeldPrefill | None]:
        # a hold asked of a colocated instance: it answers plain, as vLLM without a connector
        return False, None

    def poll(self) -> tuple[list[PullResult], list[int]]:
        return [], []

    def wait(self, timeout_s: float) -> None:
        pass

    def request_refused(self, handoff: KVHandoff | None) -> None:
        pass

    def revoke_lease(self, request_id: str) -> None:
        pass

    def release_lease(self, request_id: str, lease_token: object) -> bool:
        return False

    def num_leases(self) -> int:
        return 0

    def close(self) -> None:
        pass
