"""Image embeddings as a transfer payload: P pulls exactly the rows E holds, once, over a
connection that proves the deployment secret; a wrong shape, a forged lease token or a
source without the secret is a TransferError (P then encodes locally), never bad rows."""

from __future__ import annotations

import pytest
import torch

from pdserve.security import DeploymentSecret
from pdserve.transfer.embedding_params import RemoteEmbedding
from pdserve.transfer.embedding_puller import EmbeddingPuller
from pdserve.transfer.embedding_source import EmbeddingSource, EmbeddingStore
from pdserve.transfer.protocol import TransferError

SECRET = DeploymentSecret.from_text("embedding-transfer-test-secret-0123456789")
ROWS, HIDDEN = 16, 64


@pytest.fixture
def source():
    src = EmbeddingSource(EmbeddingStore(), SECRET).start()
    yield src
    src.close()


@pytest.fixture
def puller():
    p = EmbeddingPuller(SECRET, timeout_s=5.0)
    yield p
    p.close()


def held(source: EmbeddingSource, rows: torch.Tensor, **change) -> RemoteEmbedding:
    lease_id, token = source.store.hold(rows)
    handle = RemoteEmbedding("ab" * 32, int(rows.shape[0]), int(rows.shape[1]), "float32",
                             source.endpoint(), lease_id, token)
    return RemoteEmbedding.from_dict(handle.to_dict() | change)


def test_pull_returns_the_rows_and_ends_the_lease(source, puller):
    rows = torch.randn(ROWS, HIDDEN)
    handle = held(source, rows)
    assert torch.equal(puller.pull(handle, ROWS, HIDDEN), rows)
    source.store.expire()
    assert len(source.store) == 0 and source.store.held_bytes == 0
    with pytest.raises(TransferError, match="no live lease"):
        puller.pull(handle, ROWS, HIDDEN)  # read once: the lease ended with it


def test_a_handle_of_another_shape_is_refused_before_connecting(source, puller):
    handle = held(source, torch.randn(ROWS, HIDDEN))
    with pytest.raises(TransferError, match="needs"):
        puller.pull(handle, ROWS + 1, HIDDEN)  # P's own preprocessing gives 17 rows
    with pytest.raises(TransferError, match="needs"):
        puller.pull(handle, ROWS, HIDDEN * 2)  # P's model is wider
    assert source.reads == 0


def test_rows_of_another_shape_than_the_handle_promised_are_refused(source, puller):
    # a handle that lies (or an E whose rows differ from what it announced): the header
    # is checked before a byte of the rows is read
    handle = held(source, torch.randn(ROWS, HIDDEN), hidden_size=HIDDEN // 2)
    with pytest.raises(TransferError, match="sent"):
        puller.pull(handle, ROWS, HIDDEN // 2)
    handle = held(source, torch.randn(ROWS, HIDDEN), dtype="bfloat16")
    with pytest.raises(TransferError, match="sent"):
        puller.pull(handle, ROWS, HIDDEN)


def test_a_forged_lease_token_reads_nothing(source, puller):
    rows = torch.randn(ROWS, HIDDEN)
    handle = held(source, rows)
    forged = RemoteEmbedding.from_dict(handle.to_dict() | {"lease_token": "x" * 43})
    with pytest.raises(TransferError, match="no live lease"):
        puller.pull(forged, ROWS, HIDDEN)
    assert not puller.release(forged)
    assert torch.equal(puller.pull(handle, ROWS, HIDDEN), rows)  # the real one still reads


def test_secret_is_proved_both_ways(source):
    handle = held(source, torch.randn(ROWS, HIDDEN))
    stranger = EmbeddingPuller(DeploymentSecret.from_text("another-deployment-secret-0123456789"))
    with pytest.raises(TransferError):
        stranger.pull(handle, ROWS, HIDDEN)
    stranger.close()
    assert source.refused_handshakes == 1


def test_the_store_refuses_rows_past_its_limit_until_they_are_released():
    store = EmbeddingStore(ttl_s=60.0, max_bytes=ROWS * HIDDEN * 4)
    lease_id, token = store.hold(torch.randn(ROWS, HIDDEN))
    assert store.hold(torch.randn(1, HIDDEN)) is None  # full until P reads or the TTL passes
    assert not store.leases.release_later(lease_id, "forged")
    assert store.leases.release_later(lease_id, token)
    store.expire()
    assert store.held_bytes == 0 and store.hold(torch.randn(1, HIDDEN)) is not None


@pytest.mark.parametrize("change", [
    {"num_tokens": 0}, {"num_tokens": 1 << 20}, {"num_tokens": "16"}, {"hidden_size": -1},
    {"dtype": "int64"}, {"content_hash": "XYZ"}, {"lease_token": ""}, {"lease_id": 7},
    {"endpoint": {"host": "h", "port": 70000}}, {"endpoint": {"host": "h", "port": 1,
                                                              "transports": ["nvlink"]}},
    {"endpoint": "h:1"},
])
def test_malformed_handles_are_refused(change):
    good = {"content_hash": "ab" * 32, "num_tokens": ROWS, "hidden_size": HIDDEN,
            "dtype": "float32", "endpoint": {"host": "127.0.0.1", "port": 1},
            "lease_id": "emb-1", "lease_token": "t"}
    RemoteEmbedding.from_dict(good)
    with pytest.raises(ValueError, match=f"handle.{next(iter(change))}"):
        RemoteEmbedding.from_dict(good | change)
