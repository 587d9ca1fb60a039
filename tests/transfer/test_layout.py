"""KVLayout: compatibility checks, JSON round trip, heterogeneous-TP head plans."""

from __future__ import annotations

import json

import pytest

from pdserve.transfer.layout import HeadSlice, IncompatibleLayout, KVLayout

BASE = dict(dtype="bfloat16", block_size=16, num_layers=32, num_kv_heads=8, head_dim=128)


def layout(**kw) -> KVLayout:
    return KVLayout(**{**BASE, **kw})


def test_same_layout_is_compatible():
    layout().check_compatible(layout())


def test_different_tp_is_compatible():
    layout(tp_size=2).check_compatible(layout(tp_size=4, tp_rank=3))


@pytest.mark.parametrize(
    "field,value",
    [
        ("dtype", "float16"),
        ("block_size", 32),
        ("num_layers", 28),
        ("num_kv_heads", 4),
        ("head_dim", 64),
    ],
)
def test_each_difference_is_refused_naming_it(field, value):
    with pytest.raises(IncompatibleLayout) as e:
        layout().check_compatible(layout(**{field: value}))
    message = str(e.value)
    assert field in message and str(value) in message
    assert "prefilled locally" in message  # says what happens / what to do


def test_round_trips_through_json():
    original = layout(tp_size=2, tp_rank=1)
    assert KVLayout.from_dict(json.loads(json.dumps(original.to_dict()))) == original


def test_rejects_bad_values():
    with pytest.raises(ValueError):
        layout(dtype="bfloat17")
    with pytest.raises(ValueError):
        layout(tp_size=2, tp_rank=2)
    with pytest.raises(ValueError):
        layout(num_kv_heads=8, tp_size=3)


def test_rank_heads_and_cache_shape():
    r1 = layout(tp_size=2, tp_rank=1)
    assert r1.heads == (4, 8)
    assert r1.cache_shape(10) == (2, 10, 16, 4, 128)
    assert layout().bytes_per_block == 32 * 2 * 16 * 8 * 128 * 2


def test_same_tp_takes_everything_from_the_same_rank():
    d = layout(tp_size=2, tp_rank=1)
    assert d.head_slices_from(layout(tp_size=2)) == [HeadSlice(1, 0, 4, 0)]


def test_decode_tp2_from_prefill_tp1_takes_half_the_heads_each():
    p = layout(tp_size=1)
    assert layout(tp_size=2, tp_rank=0).head_slices_from(p) == [HeadSlice(0, 0, 4, 0)]
    assert layout(tp_size=2, tp_rank=1).head_slices_from(p) == [HeadSlice(0, 4, 8, 0)]


def test_decode_tp1_from_prefill_tp2_takes_from_both_ranks():
    slices = layout(tp_size=1).head_slices_from(layout(tp_size=2))
    assert slices == [HeadSlice(0, 0, 4, 0), HeadSlice(1, 0, 4, 4)]
    assert slices[1].local_stop == 8


def test_replicated_heads_are_read_from_spread_ranks():
    # 2 KV heads over 4 prefill ranks: ranks 0,1 hold head 0; ranks 2,3 hold head 1
    p = layout(num_kv_heads=2, tp_size=4)
    assert layout(num_kv_heads=2, tp_size=1).head_slices_from(p) == [
        HeadSlice(0, 0, 1, 0),
        HeadSlice(2, 0, 1, 1),
    ]
    d1 = layout(num_kv_heads=2, tp_size=4, tp_rank=1)  # holds head 0
    assert d1.head_slices_from(p) == [HeadSlice(1, 0, 1, 0)]


def test_head_plan_refuses_incompatible_layouts():
    with pytest.raises(IncompatibleLayout):
        layout().head_slices_from(layout(head_dim=64))
