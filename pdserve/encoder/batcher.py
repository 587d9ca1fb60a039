"""Requests' images encoded together: a queue that gathers what arrived within a few
milliseconds and runs the vision tower once per tile size over all of it."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

MAX_TILES_PER_CALL = 32  # bounds one call's activations (as the engine's image_rows.py)


@dataclass
class _Job:
    pixels: torch.Tensor  # [tiles, 3, S, S]
    rows: int  # what the tower gives for it
    done: Future


@dataclass
class BatcherStats:
    calls: int = 0  # vision-tower calls
    images: int = 0
    largest_batch: int = 0  # images in one gathered batch


class EncodeBatcher:
    """Runs `embed(pixels) -> rows` on its own thread (off the event loop), over batches of
    the images that arrived within `window_s` of the first, at most `max_images` a batch."""

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], window_s: float = 0.002,
                 max_images: int = 64) -> None:
        self.embed = embed
        self.window_s = window_s
        self.max_images = max_images
        self.stats = BatcherStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="encode-batcher", daemon=True)
        self._thread.start()

    async def encode(self, pixels: torch.Tensor, rows: int) -> torch.Tensor:
        """The rows [rows, hidden] of one image's tiles, encoded in the next batch."""
        job = _Job(pixels, rows, Future())
        self._queue.put(job)
        return await asyncio.wrap_future(job.done)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_images:
                left = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(job)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            self._encode(batch)

    def _encode(self, batch: list[_Job]) -> None:
        """One tower call per tile size (and MAX_TILES_PER_CALL tiles); each job gets its
        rows, or the error of its group."""
        groups: dict[tuple[int, ...], list[_Job]] = {}
        for job in batch:
            groups.setdefault(tuple(job.pixels.shape[1:]), []).append(job)
        for jobs in groups.values():
            try:
                pixels = torch.cat([job.pixels for job in jobs])
                parts = []
                for part in pixels.split(MAX_TILES_PER_CALL):
                    parts.append(self.embed(part))
                    self.stats.calls += 1
                rows = torch.cat(parts).cpu()  # served over the socket from host memory
                for job, mine in zip(jobs, rows.split([j.rows for j in jobs]), strict=True):
                    job.done.set_result(mine.clone())  # its own storage: cached alone
                self.stats.images += len(jobs)
            except Exception as e:  # a bad batch fails its jobs, never the thread
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(e)
