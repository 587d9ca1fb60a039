"""What the prefix cache gained and lost since the last step: the KV events an instance
publishes so that a router can tell how much of a prompt it holds.

The BlockPool appends here as blocks are published (stored) and evicted (removed); the engine
process takes the batch once per step and sends it with the step's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KVEvents:
    """One step's changes to the set of cached block hashes, in order: removed first (an
    eviction happens at allocation, before the step's new blocks are published)."""

    removed: list[int] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.removed or self.stored)


class KVEventLog:
    """Collects events between two `take`s; a block both stored and evicted within one step
    appears in both lists, which applied removed-then-stored would wrongly keep: `take`
    therefore folds the step's history into its net change."""

    def __init__(self) -> None:
        self._net: dict[int, bool] = {}  # hash -> cached at the end (insertion order kept)
        self._was: dict[int, bool] = {}  # hash -> cached at the start of the step

    def stored(self, block_hash: int) -> None:
        self._was.setdefault(block_hash, False)
        self._net[block_hash] = True

    def removed(self, block_hash: int) -> None:
        self._was.setdefault(block_hash, True)
        self._net[block_hash] = False

    def take(self) -> KVEvents:
        """The net change since the last call."""
        events = KVEvents()
        for block_hash, now in self._net.items():
            if now != self._was[block_hash]:
                (events.stored if now else events.removed).append(block_hash)
        self._net.clear()
        self._was.clear()
        return events
