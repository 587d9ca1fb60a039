"""Write a GGUF model (by default the embedded SmolLM2) out as a Hugging Face folder.

Other engines (vLLM, transformers) cannot read the embedded Q4_1 GGUF; the folder holds the
same weights dequantized, so both sides serve bit-identical models and texts compare exactly.

    python -m pdserve.models.export_hf OUT_DIR [--gguf FILE] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from pdserve.config import ModelConfig
from pdserve.models.gguf_file import embedded_gguf_path, gguf_config, iter_gguf_tensors
from pdserve.models.tokenizer import gguf_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_HF_CLASSES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"
}


def hf_config(config: ModelConfig, dtype: str) -> dict:
    """The transformers `config.json` dict of a ModelConfig (the inverse of config_from_hf)."""
    eos = config.eos_token_ids
    hf = AutoConfig.for_model(
        config.architecture,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias,
        bos_token_id=config.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        architectures=[_HF_CLASSES[config.architecture]],
        dtype=dtype,
    )
    return hf.to_dict()


def export_hf_folder(
    target: str | Path, gguf_path: Path | None = None, dtype: str = "float32"
) -> Path:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files
    (chat template included) of `gguf_path` (default: the embedded model) into `target`."""
    source = gguf_path or embedded_gguf_path()
    folder = Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(source)
    config = gguf_config(reader)
    tensors = iter_gguf_tensors(reader, config)
    weights = {name: t.to(DTYPES[dtype]).contiguous() for name, t in tensors}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    gguf_tokenizer(source).save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    """`python -m pdserve.models.export_hf OUT_DIR`: export and print the folder's path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    print(export_hf_folder(args.out_dir, args.gguf, args.dtype))


if __name__ == "__main__":
    main()
