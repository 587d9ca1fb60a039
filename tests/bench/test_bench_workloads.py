"""Workload generators: lengths, shared prefixes and trace timing are what was asked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdserve.bench.workloads import WorkloadConfig, build_workload
from pdserve.bench.workloads.code import CODE_TASKS, code_workload
from pdserve.bench.workloads.multi_turn import multi_turn_workload, system_prompts
from pdserve.bench.workloads.random_tokens import random_workload
from pdserve.bench.workloads.shared_prefix import shared_prefix_workload
from pdserve.bench.workloads.sharegpt import sharegpt_workload
from pdserve.bench.workloads.trace import trace_workload


def n_tokens(tok, text):
    return len(tok.encode(text, add_special_tokens=False))


def test_random_prompts_tokenize_back_to_the_asked_length(tokenizer):
    specs = random_workload(tokenizer, 50, input_len=100, output_len=20, seed=1)
    assert all(s.prompt_len == 100 and s.output_len == 20 for s in specs)
    assert all(n_tokens(tokenizer, s.prompt) == 100 for s in specs)


def test_random_range_ratio_bounds_the_lengths(tokenizer):
    specs = random_workload(tokenizer, 200, 100, 40, range_ratio=0.5, seed=2)
    ins = np.array([s.prompt_len for s in specs])
    outs = np.array([s.output_len for s in specs])
    assert ins.min() >= 50 and ins.max() <= 150 and abs(ins.mean() - 100) < 6
    assert outs.min() >= 20 and outs.max() <= 60
    assert all(abs(n_tokens(tokenizer, s.prompt) - s.prompt_len) == 0 for s in specs[:50])


def test_random_workload_is_reproducible_from_the_seed(tokenizer):
    a = random_workload(tokenizer, 5, 30, 5, 0.3, seed=9)
    b = random_workload(tokenizer, 5, 30, 5, 0.3, seed=9)
    c = random_workload(tokenizer, 5, 30, 5, 0.3, seed=10)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]


def test_shared_prefix_groups_share_their_system_prompt(tokenizer):
    specs = shared_prefix_workload(tokenizer, 3, 4, 64, 16, 8, seed=3)
    assert len(specs) == 12
    groups: dict[int, list[str]] = {}
    for s in specs:
        groups.setdefault(s.group, []).append(s.prompt)
    assert sorted(len(v) for v in groups.values()) == [4, 4, 4]
    heads = []
    for prompts in groups.values():
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        shared = min(_common(ids[0], other) for other in ids[1:])
        assert shared >= 64  # the 64-token system prompt (+ its newline)
        heads.append(ids[0])
    assert max(_common(heads[0], h) for h in heads[1:]) < 8  # groups differ
    assert [s.group for s in specs] != sorted(s.group for s in specs)  # interleaved
    assert all(abs(s.prompt_len - (64 + 1 + 16)) <= 2 for s in specs)


def test_code_mix_has_its_kinds_lengths_and_ttft_targets(tokenizer):
    specs = code_workload(tokenizer, 300, seed=4, length_scale=0.25)
    by_kind = {t.name: [s for s in specs if s.category == t.name] for t in CODE_TASKS}
    for task in CODE_TASKS:
        got = by_kind[task.name]
        assert len(got) / 300 == pytest.approx(task.weight, abs=0.08)
        assert all(s.slo_ms == {"ttft": task.ttft_target_ms} for s in got)
        assert np.mean([s.prompt_len for s in got]) == pytest.approx(
            task.input_mean * 0.25, rel=0.15
        )
        assert np.mean([s.output_len for s in got]) == pytest.approx(
            task.output_mean * 0.25, rel=0.15
        )
    inline = by_kind["inline-completion"][0]
    assert inline.prompt.startswith("Complete the code")
    assert all(n_tokens(tokenizer, s.prompt) == s.prompt_len for s in specs[:20])


def test_sharegpt_takes_the_first_turn_pair_and_filters(tokenizer, tmp_path):
    convs = [
        {
            "conversations": [
                {"from": "human", "value": f"question {i} " * 5},
                {"from": "gpt", "value": f"answer {i} " * (3 + i)},
            ]
        }
        for i in range(10)
    ]
    convs.append(
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    )
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    specs = sharegpt_workload(tokenizer, str(path), 8, seed=0)
    assert len(specs) == 8
    for s in specs:
        assert s.prompt.startswith("question")
        assert s.prompt_len == n_tokens(tokenizer, s.prompt) >= 4
    fixed = sharegpt_workload(tokenizer, str(path), 3, seed=0, output_len=7)
    assert all(s.output_len == 7 for s in fixed)


def _write_trace(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_trace_keeps_timing_and_lengths(tokenizer, tmp_path):
    rows = [
        {"timestamp": 1000, "input_length": 40, "output_length": 5},
        {"timestamp": 1500, "input_length": 60, "output_length": 7},
        {"timestamp": 4000, "input_length": 20, "output_length": 2},
    ]
    path = tmp_path / "t.jsonl"
    _write_trace(path, rows)
    specs = trace_workload(tokenizer, str(path))
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 0.5, 3.0])
    assert [s.output_len for s in specs] == [5, 7, 2]
    assert [s.prompt_len for s in specs] == [40, 60, 20]
    fast = trace_workload(tokenizer, str(path), time_scale=0.5)
    assert [s.arrival_s for s in fast] == pytest.approx([0.0, 0.25, 1.5])


def test_trace_hash_ids_give_shared_prefixes(tokenizer, tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 48, "output_length": 3, "hash_ids": [1, 2, 3]},
        {"timestamp": 10, "input_length": 40, "output_length": 3, "hash_ids": [1, 2, 4]},
        {"timestamp": 20, "input_length": 30, "output_length": 3, "hash_ids": [5, 6]},
    ]
    path = tmp_path / "m.jsonl"
    _write_trace(path, rows)
    a, b, c = trace_workload(tokenizer, str(path), block_size=16)
    ta, tb, tc = (tokenizer.encode(s.prompt, add_special_tokens=False) for s in (a, b, c))
    common = _common(ta, tb)
    assert common >= 31  # blocks 1 and 2 (32 tokens), give or take a merge at the seam
    assert _common(ta, tc) < 4
    assert abs(a.prompt_len - 48) <= 2 and abs(b.prompt_len - 40) <= 2


def _common(x, y):
    n = 0
    for p, q in zip(x, y, strict=False):
        if p != q:
            break
        n += 1
    return n


def test_build_workload_dispatches_by_dataset_name(tokenizer):
    cfg = WorkloadConfig(
        dataset_name="random", num_prompts=3, random_input_len=12, random_output_len=4
    )
    assert len(build_workload(cfg, tokenizer)) == 3
    with pytest.raises(ValueError):
        build_workload(WorkloadConfig(dataset_name="trace"), tokenizer)


def test_multi_turn_prompts_extend_their_conversation_turn_by_turn(tokenizer):
    specs = multi_turn_workload(tokenizer, 3, 4, 32, 8, 5, seed=2)
    assert len(specs) == 12 and all(s.output_len == 5 for s in specs)
    last: dict[int, str] = {}
    for i, s in enumerate(specs):
        assert i // 3 == len([1 for x in specs[:i] if x.group == s.group])  # turn-major
        assert s.prompt.startswith(last.get(s.group, "")) and s.prompt != last.get(s.group)
        assert s.prompt_len == n_tokens(tokenizer, s.prompt)
        last[s.group] = s.prompt
    assert len(last) == 3
    systems = system_prompts(tokenizer, 3, 32, seed=2)  # what a benchmark warms
    assert all(n_tokens(tokenizer, p) == 32 for p in systems)
    assert all(s.prompt.startswith(systems[s.group] + "\n") for s in specs)
