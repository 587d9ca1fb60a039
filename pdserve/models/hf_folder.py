"""A Hugging Face checkpoint folder: `config.json` + `*.safetensors` (sharded or not)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from pdserve.config import ModelConfig, VisionConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# SmolVLM checkpoints say "idefics3" (v1) or "smolvlm" (v2): the same architecture
VISION_MODEL_TYPES = ("smolvlm", "idefics3")


def is_hf_folder(path: str | Path) -> bool:
    """True if `path` is a folder holding a `config.json`."""
    return (Path(path) / "config.json").is_file()


def config_from_hf(hf: dict) -> ModelConfig:
    """Translate a HF `config.json` dict (transformers 4.x or 5.x layout) into a ModelConfig."""
    model_type = hf.get("model_type", "llama")
    if model_type in VISION_MODEL_TYPES:
        return _vision_language_config(hf)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = SUPPORTED_MODEL_TYPES + VISION_MODEL_TYPES
        raise ValueError(f"model_type {model_type!r} is not supported ({supported})")
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


def _vision_language_config(hf: dict) -> ModelConfig:
    """SmolVLM / Idefics3: a Llama `text_config`, a SigLIP `vision_config`, the connector's
    `scale_factor` and the placeholder `image_token_id` at the top level."""
    text = dict(hf["text_config"])
    text.setdefault("model_type", "llama")
    if text["model_type"] != "llama":
        raise ValueError(f"a SmolVLM text model must be llama, not {text['model_type']!r}")
    config = config_from_hf(text)
    v = hf["vision_config"]
    config.vision = VisionConfig(
        hidden_size=v.get("hidden_size", 1152),
        intermediate_size=v.get("intermediate_size", 3072),
        num_layers=v.get("num_hidden_layers", 12),
        num_heads=v.get("num_attention_heads", 16),
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        scale_factor=hf.get("scale_factor", 2),
        image_token_id=hf.get("image_token_id", 128257),
        num_channels=v.get("num_channels", 3),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
    )
    if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"vision hidden_act {v['hidden_act']!r} is not supported")
    # transformers ties the head by the top-level flag (default False), not text_config's
    config.tie_word_embeddings = bool(hf.get("tie_word_embeddings", False))
    config.architecture = "smolvlm"
    return config


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
