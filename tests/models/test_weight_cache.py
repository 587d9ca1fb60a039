"""A GGUF's converted weights are kept once and read back unchanged; a bad copy is replaced."""

from __future__ import annotations

import dataclasses
import shutil

import gguf
import pytest
import torch

from pdserve import switches
from pdserve.models import weight_cache
from pdserve.models.gguf_file import embedded_gguf_path
from pdserve.models.loader import model_config


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(switches, "SWITCHES",
                        dataclasses.replace(switches.SWITCHES, cache_dir=tmp_path))
    yield tmp_path
    shutil.rmtree(tmp_path / "weights", ignore_errors=True)  # ~0.5 GB a copy: not kept


def test_the_second_load_reads_the_kept_copy_without_opening_the_gguf(empty_cache, monkeypatch):
    path = embedded_gguf_path()
    config = model_config(None)
    converted = dict(weight_cache.gguf_weights(path, config))
    kept = weight_cache.cached_path(path)
    assert kept.is_file() and kept.is_relative_to(empty_cache)

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was opened although a converted copy is kept")

    monkeypatch.setattr(gguf, "GGUFReader", no_gguf)
    again = dict(weight_cache.gguf_weights(path, config))
    assert again.keys() == converted.keys()
    for name, tensor in converted.items():
        assert again[name].dtype == torch.float32 and torch.equal(again[name], tensor), name


def test_an_unreadable_copy_is_converted_again_and_replaced(empty_cache):
    path = embedded_gguf_path()
    kept = weight_cache.cached_path(path)
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"\x00" * 64)  # what a process killed mid-write could leave, renamed
    names = [name for name, _ in weight_cache.gguf_weights(path, model_config(None))]
    assert "model.embed_tokens.weight" in names
    assert kept.stat().st_size > 100 * 2**20  # the whole float32 model, readable again
    assert [name for name, _ in weight_cache.gguf_weights(path, model_config(None))] == names


def test_a_model_too_big_to_keep_is_converted_each_time(empty_cache, monkeypatch):
    monkeypatch.setattr(weight_cache, "MAX_CACHED_BYTES", 1 << 20)
    path = embedded_gguf_path()
    name, tensor = next(weight_cache.gguf_weights(path, model_config(None)))
    assert tensor.dtype == torch.float32 and name.startswith("model.")
    assert not weight_cache.cached_path(path).exists()
