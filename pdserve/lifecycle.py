"""Child processes that never outlive their parent, whatever state their pipes are in.

An engine process (and a tensor-parallel worker) is started by `multiprocessing` with the
spawn method, which leaves it the read end of a pipe whose write end only its parent
holds: `multiprocessing.parent_process().join()` returns when that end closes, that is the
moment the parent dies, by kill -9 included. A daemon thread waits on it, so the death is
seen at once even while the main thread is busy in a step or blocked on a queue.

Why not the alternatives: polling os.getppid() sees the death only when the poll runs (not
while a step or a blocked call runs); prctl(PR_SET_PDEATHSIG) fires when the parent
*thread* that spawned us exits (the server spawns its engine from a worker thread, which
may end long before the server) and it delivers a signal whose default action skips any
cleanup. The pipe is exact, needs no ctypes, and works wherever multiprocessing does.

The watcher then exits with os._exit: a normal exit would join multiprocessing's queue
feeder threads, and a feeder blocked on a full pipe that nobody reads any more never ends.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Callable

PARENT_GONE_EXIT_CODE = 1


def exit_with_parent(cleanup: Callable[[], object] | None = None) -> bool:
    """Watch this process's multiprocessing parent; once it is gone, run `cleanup` (it must
    be safe from another thread: unlink files, not tear down objects the main thread uses)
    and end the process at once. False where there is no such parent to watch."""
    parent = mp.parent_process()
    if parent is None:
        return False

    def watch() -> None:
        parent.join()  # returns when the parent's end of the spawn pipe closes: its death
        try:
            if cleanup is not None:
                cleanup()
        except BaseException as exc:  # exit regardless: nobody is left to report to
            print(f"pdserve: cleanup after the parent's death failed: {exc!r}",
                  file=sys.stderr, flush=True)
        finally:
            os._exit(PARENT_GONE_EXIT_CODE)

    threading.Thread(target=watch, name="pdserve-parent-watch", daemon=True).start()
    return True
