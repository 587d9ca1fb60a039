"""pdserve's on-disk cache (converted tokenizers, parsed GGUF configs): where it lives and keys."""

from __future__ import annotations

import hashlib
import os
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


def write_atomically(target: Path, data: str) -> None:
    """Write a text file so that concurrent readers never see half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    temporary.write_text(data)
    os.replace(temporary, target)
