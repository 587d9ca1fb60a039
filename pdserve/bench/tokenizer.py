"""The tokenizer prompts are built with: a HF folder, or pdserve's embedded one."""

from __future__ import annotations

from typing import Any


def load_bench_tokenizer(path: str | None) -> Any:
    """`--tokenizer PATH` (a Hugging Face folder or id), else pdserve's embedded tokenizer."""
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    try:
        from pdserve.models.loader import load_tokenizer
    except ImportError as exc:
        raise SystemExit(
            "no --tokenizer given and pdserve's embedded tokenizer is not available "
            f"({exc}); pass --tokenizer /path/to/hf_folder"
        ) from exc
    return load_tokenizer(None)
