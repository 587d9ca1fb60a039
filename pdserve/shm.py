"""Names of the KV caches' shared-memory files, and their cleanup (no torch: the server and
the launcher use it too).

A file is /dev/shm/pdserve-kv-<pid>-<name>, <pid> being the process that created it (the
engine): so the file of a process that is gone can be told from one in use, and removed by
its server, by the next engine to start, or by `pdserve up`.
"""

from __future__ import annotations

import contextlib
import os

SHM_DIR = "/dev/shm"
SHM_PREFIX = "pdserve-kv-"


def shared_kv_path(name: str, pid: int | None = None) -> str:
    """The /dev/shm file of the caches `name` of process `pid` (pid lets stale files be found)."""
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}{os.getpid() if pid is None else pid}-{name}")


def unlink_shared_kv_caches(name: str) -> bool:
    """Remove the /dev/shm file (mappings stay valid until dropped); False if already gone."""
    try:
        os.unlink(shared_kv_path(name))
        return True
    except FileNotFoundError:
        return False


def remove_stale_shared_kv_caches() -> list[str]:
    """Unlink cache files of processes that no longer exist (crashed engines); returns paths."""
    removed = []
    for entry in _entries():
        pid = owner_pid(entry)
        if pid is not None and not _alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, entry))
                removed.append(os.path.join(SHM_DIR, entry))
    return removed


def unlink_shared_kv_files_of(pid: int) -> list[str]:
    """Unlink every cache file process `pid` created (it exited, or is about to); returns
    the paths. Safe from any thread: it touches names, never the mappings."""
    removed = []
    for entry in _entries():
        if entry.startswith(f"{SHM_PREFIX}{pid}-"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, entry))
                removed.append(os.path.join(SHM_DIR, entry))
    return removed


def owner_pid(path: str) -> int | None:
    """The pid in a cache file's name (None for a name that is not one of ours)."""
    entry = os.path.basename(path)
    if not entry.startswith(SHM_PREFIX):
        return None
    pid = entry[len(SHM_PREFIX) :].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _entries() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except OSError:  # no /dev/shm on this system: nothing of ours can be there
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) holds no mapping: its files are stale
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
