"""A GGUF's weights converted once: dequantized to float32 with HF names, kept as safetensors.

Loading the embedded SmolLM2 from its GGUF took ~8 s of one core, 6 of them spent opening the
file (`GGUFReader` parses the whole vocabulary, element by element) and dequantizing; every
instance start, engine and test paid it. With the converted copy in pdserve's cache a load
reads one memory-mapped file. The copy is keyed by the GGUF's path, size and mtime and by
`FORMAT` (bumped whenever the conversion changes), and made only for files whose float32
weights fit `MAX_CACHED_BYTES`: a big quantized GGUF would grow four-fold or more on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import gguf
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pdserve.config import ModelConfig
from pdserve.models.cache import cache_root, file_key, replace_atomically
from pdserve.models.gguf_file import iter_gguf_tensors

FORMAT = 1  # the conversion's version: iter_gguf_tensors' names, permutations and dtype
MAX_CACHED_BYTES = 2 << 30  # float32 weights larger than this are converted on every load

log = logging.getLogger(__name__)


def cached_path(path: Path) -> Path:
    """Where the converted weights of the GGUF at `path` are kept."""
    return cache_root() / "weights" / f"{file_key(path)}-v{FORMAT}.safetensors"


def gguf_weights(path: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the GGUF at `path`: from the converted
    copy when there is a readable one, else converted now (and kept, if small enough)."""
    cached = cached_path(path)
    if cached.is_file():
        try:
            handle = safe_open(str(cached), framework="pt", device="cpu")
        except (SafetensorError, OSError) as err:  # half-written by a killed process, or stale
            log.warning("converted weights %s unreadable (%s): converting again", cached, err)
        else:
            with handle as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
            return
    reader = gguf.GGUFReader(path)
    if sum(int(t.n_elements) for t in reader.tensors) * 4 > MAX_CACHED_BYTES:
        yield from iter_gguf_tensors(reader, config)
        return
    tensors = dict(iter_gguf_tensors(reader, config))
    _save_atomically(tensors, cached)
    yield from tensors.items()


def _save_atomically(tensors: dict[str, torch.Tensor], target: Path) -> None:
    """Keep the converted weights; a failure only logs."""
    try:
        replace_atomically(target, lambda path: save_file(tensors, str(path)))
    except OSError as err:  # a read-only or full disk: serve anyway, convert next time too
        log.warning("could not keep converted weights at %s: %s", target, err)
