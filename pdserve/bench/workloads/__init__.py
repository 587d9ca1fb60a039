"""Workload generators: each builds a reproducible list of RequestSpec from a seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.bench.request import RequestSpec

WORKLOADS = ("random", "shared-prefix", "multi-turn", "code", "sharegpt", "trace", "image")


@dataclass
class WorkloadConfig:
    """The --dataset-name and its options (flag names as vLLM's and SGLang's)."""

    dataset_name: str = "random"
    num_prompts: int | None = 100  # None: all a file holds (trace)
    seed: int = 0
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    gsp_num_groups: int = 4
    gsp_prompts_per_group: int = 8
    gsp_system_prompt_len: int = 512
    gsp_question_len: int = 64
    gsp_output_len: int = 64
    mt_num_conversations: int = 8
    mt_turns: int = 4
    mt_system_prompt_len: int = 256
    mt_turn_len: int = 64
    mt_output_len: int = 32
    code_length_scale: float = 1.0
    dataset_path: str | None = None
    sharegpt_output_len: int | None = None
    trace_block_size: int = 512
    trace_time_scale: float = 1.0
    image_count: int = 1
    image_resolution: str = "1080p"
    image_format: str = "jpeg"
    tokenizer: str | None = None  # its folder's processor settings count image tokens


def build_workload(cfg: WorkloadConfig, tokenizer: Any) -> list[RequestSpec]:
    """The requests of `cfg.dataset_name`; the same seed always gives the same requests."""
    name = cfg.dataset_name
    if name == "random":
        from pdserve.bench.workloads.random_tokens import random_workload

        return random_workload(
            tokenizer,
            cfg.num_prompts or 100,
            cfg.random_input_len,
            cfg.random_output_len,
            cfg.random_range_ratio,
            cfg.seed,
        )
    if name == "image":
        from pdserve.bench.workloads.images import image_workload

        return image_workload(
            tokenizer,
            cfg.num_prompts or 100,
            cfg.image_count,
            cfg.image_resolution,
            cfg.image_format,
            cfg.random_input_len,
            cfg.random_output_len,
            cfg.random_range_ratio,
            cfg.seed,
            cfg.tokenizer,
        )
    if name == "shared-prefix":
        from pdserve.bench.workloads.shared_prefix import shared_prefix_workload

        return shared_prefix_workload(
            tokenizer,
            cfg.gsp_num_groups,
            cfg.gsp_prompts_per_group,
            cfg.gsp_system_prompt_len,
            cfg.gsp_question_len,
            cfg.gsp_output_len,
            cfg.seed,
        )
    if name == "multi-turn":
        from pdserve.bench.workloads.multi_turn import multi_turn_workload

        return multi_turn_workload(
            tokenizer,
            cfg.mt_num_conversations,
            cfg.mt_turns,
            cfg.mt_system_prompt_len,
            cfg.mt_turn_len,
            cfg.mt_output_len,
            cfg.seed,
        )
    if name == "code":
        from pdserve.bench.workloads.code import code_workload

        return code_workload(tokenizer, cfg.num_prompts or 100, cfg.seed, cfg.code_length_scale)
    if name in ("sharegpt", "trace") and not cfg.dataset_path:
        raise ValueError(f"--dataset-name {name} needs --dataset-path")
    if name == "sharegpt":
        from pdserve.bench.workloads.sharegpt import sharegpt_workload

        return sharegpt_workload(
            tokenizer,
            cfg.dataset_path or "",
            cfg.num_prompts or 100,
            cfg.seed,
            cfg.sharegpt_output_len,
        )
    if name == "trace":
        from pdserve.bench.workloads.trace import trace_workload

        return trace_workload(
            tokenizer,
            cfg.dataset_path or "",
            cfg.num_prompts,
            cfg.seed,
            cfg.trace_block_size,
            cfg.trace_time_scale,
        )
    raise ValueError(f"unknown --dataset-name {name!r}; choose from {WORKLOADS}")
