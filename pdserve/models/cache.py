"""pdserve's on-disk cache (converted tokenizers, parsed GGUF configs, converted GGUF weights):
where it lives, its keys, and atomic writes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from pdserve import switches


def cache_root() -> Path:
    """`$PDSERVE_CACHE_DIR`, else `~/.cache/pdserve`."""
    configured = switches.SWITCHES.cache_dir
    return configured if configured else Path.home() / ".cache" / "pdserve"


def file_key(path: Path) -> str:
    """A key that changes when the file is replaced: its name, plus a hash of path, size, mtime."""
    stat = path.stat()
    identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha1(identity.encode()).hexdigest()[:12]}"


def replace_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Make `target` with `write(path)` on a temporary file, then rename it into place, so
    that concurrent readers see the whole file or none; no temporary is left on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(target: Path, data: str) -> None:
    """Write a text file so that concurrent readers never see half of it."""
    replace_atomically(target, lambda path: path.write_text(data))
