"""A Hugging Face checkpoint folder: `config.json` + `*.safetensors` (sharded or not)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from pdserve.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def is_hf_folder(path: str | Path) -> bool:
    """True if `path` is a folder holding a `config.json`."""
    return (Path(path) / "config.json").is_file()


def config_from_hf(hf: dict) -> ModelConfig:
    """Translate a HF `config.json` dict (transformers 4.x or 5.x layout) into a ModelConfig."""
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported ({SUPPORTED_MODEL_TYPES})")
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=None if rope_type == "default" else rope,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama and Qwen3 say so in attention_bias
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=[] if eos is None else list(eos) if isinstance(eos, list) else [eos],
        architecture=model_type,
    )


def hf_folder_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a HF folder; EOS ids from generation_config.json when it has them."""
    folder = Path(path)
    config = config_from_hf(json.loads((folder / "config.json").read_text()))
    generation = folder / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        if eos is not None:
            config.eos_token_ids = list(eos) if isinstance(eos, list) else [eos]
    return config


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from every `*.safetensors` file of the folder, one at a time."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
