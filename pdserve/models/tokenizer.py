"""Tokenizers: from a HF folder, or converted once from GGUF metadata and cached on disk."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pdserve.models.cache import cache_root, file_key


def gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer and chat template stored in a GGUF file.

    transformers' conversion takes seconds, so the result is saved under
    `<cache>/tokenizers/<key>` and later calls load that folder instead.
    """
    target = cache_root() / "tokenizers" / file_key(path)
    if (target / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # save beside the target, then rename: concurrent instances never read a partial folder
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    tokenizer.save_pretrained(staging)
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like ~/.cache
    try:
        os.replace(staging, target)
    except OSError:  # another process got there first
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def folder_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a HF checkpoint folder."""
    return AutoTokenizer.from_pretrained(path)
