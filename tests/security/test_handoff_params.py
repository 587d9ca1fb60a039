"""Finding 1 (parsing half): a malformed hand-off is a ValueError, never another exception.

The engine catches ValueError and answers 400; anything else used to kill it for good
(num_kv_heads 0 -> ZeroDivisionError, a block id 1e400 -> OverflowError).
"""

from __future__ import annotations

import json

import pytest

from pdserve.transfer.layout import KVLayout
from pdserve.transfer.params import RemoteKV

LAYOUT = {"dtype": "float32", "block_size": 16, "num_layers": 30, "num_kv_heads": 2,
          "head_dim": 64}
GOOD = {
    "do_remote_prefill": True,
    "remote_engine_id": "p0",
    "remote_request_id": "cmpl-1",
    "remote_block_ids": [3, 4],
    "kv_layout": LAYOUT,
    "kv_endpoints": [{"host": "127.0.0.1", "port": 4000, "transports": ["tcp"]}],
    "lease_token": "t0ken",
}

BAD = [
    {"kv_layout": LAYOUT | {"num_kv_heads": 0}},  # the ZeroDivisionError of finding 1
    {"remote_block_ids": json.loads("[1e400]")},  # the OverflowError of finding 1 (inf)
    {"remote_block_ids": [1.0]},
    {"remote_block_ids": [True]},  # a bool is not an int
    {"remote_block_ids": [-1]},
    {"remote_block_ids": [2**31]},
    {"remote_block_ids": "12"},
    {"remote_block_ids": list(range(70_000))},
    {"kv_layout": LAYOUT | {"head_dim": 0}},
    {"kv_layout": LAYOUT | {"block_size": 10**30}},
    {"kv_layout": LAYOUT | {"num_layers": json.loads("1e400")}},
    {"kv_layout": LAYOUT | {"dtype": "complex128"}},
    {"kv_layout": LAYOUT | {"dtype": ["float32"]}},
    {"kv_layout": LAYOUT | {"surprise": 1}},
    {"kv_layout": LAYOUT | {"tp_size": 2, "tp_rank": 5}},
    {"kv_layout": {"dtype": "float32"}},
    {"kv_layout": [1, 2]},
    {"kv_layout": None},
    {"kv_endpoints": []},
    {"kv_endpoints": {"host": "x"}},
    {"kv_endpoints": ["127.0.0.1:4000"]},
    {"kv_endpoints": [{"host": "127.0.0.1", "port": 0}]},
    {"kv_endpoints": [{"host": "127.0.0.1", "port": 70000}]},
    {"kv_endpoints": [{"host": "127.0.0.1", "port": "4000"}]},
    {"kv_endpoints": [{"host": 127, "port": 4000}]},
    {"kv_endpoints": [{"host": "127.0.0.1", "port": 4000, "transports": ["rdma"]}]},
    {"kv_endpoints": [{"host": "127.0.0.1", "port": 4000, "transports": []}]},
    {"remote_request_id": 7},
    {"remote_request_id": "x" * 10_000},
    {"remote_engine_id": None},
    {"lease_token": ""},
    {"lease_token": 5},
    {"remote_block_ids": [[3], [4]]},  # two KV cache groups: no pdserve model has them
    {"remote_block_ids": [[3], 4]},
    {"remote_block_ids": [[-1]]},
]


@pytest.mark.parametrize("change", BAD, ids=lambda c: json.dumps(c)[:60])
def test_malformed_hand_off_is_a_value_error(change):
    with pytest.raises(ValueError):
        RemoteKV.from_kv_transfer_params(GOOD | change)


@pytest.mark.parametrize("params", [None, [], "x", 5, {}], ids=repr)
def test_what_is_not_a_hand_off_is_a_value_error(params):
    with pytest.raises(ValueError):
        RemoteKV.from_kv_transfer_params(params)


@pytest.mark.parametrize("missing", ["kv_layout", "kv_endpoints", "remote_block_ids",
                                     "remote_request_id", "lease_token"])
def test_missing_fields_are_named(missing):
    params = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ValueError, match=missing):
        RemoteKV.from_kv_transfer_params(params)


def test_a_good_hand_off_parses_with_only_known_endpoint_fields():
    params = GOOD | {"kv_endpoints": [GOOD["kv_endpoints"][0] | {"evil": "x"}]}
    remote = RemoteKV.from_kv_transfer_params(params)
    assert remote.block_ids == [3, 4] and remote.lease_token == "t0ken"
    assert remote.layout == KVLayout(**LAYOUT)
    assert "evil" not in remote.endpoints[0] and remote.endpoints[0]["port"] == 4000


@pytest.mark.parametrize("field,value", [("num_kv_heads", 0), ("head_dim", -1),
                                         ("block_size", True), ("tp_size", 0)])
def test_layout_from_dict_refuses_out_of_range_ints(field, value):
    with pytest.raises(ValueError, match=field):
        KVLayout.from_dict(LAYOUT | {field: value})


def test_vllms_one_list_per_kv_cache_group_is_accepted():
    """Newer vLLM writes remote_block_ids as [[ids]] (one list per KV cache group)."""
    assert RemoteKV.from_kv_transfer_params(GOOD | {"remote_block_ids": [[3, 4]]}).block_ids == [
        3, 4]
