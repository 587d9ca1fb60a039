"""LeaseTable: hold, renew, release, expiry, reads, and concurrent use."""

from __future__ import annotations

import threading

import pytest

from pdserve.transfer.lease import LeaseTable

T = "the-lease-token"  # every lease here is held with it; its own tests try others


def test_hold_then_release_returns_the_blocks():
    table = LeaseTable()
    table.hold("r1", [3, 5, 7], ttl_s=30, token=T)
    assert "r1" in table
    assert table.release("r1", T) == [3, 5, 7]
    assert "r1" not in table and len(table) == 0


def test_releasing_twice_or_unknown_is_a_false_no_op():
    table = LeaseTable()
    table.hold("r1", [1], token=T)
    assert table.release("r1", T) == [1]
    assert table.release("r1", T) is False
    assert table.release("nope", T) is False


def test_holding_a_request_twice_is_a_bug():
    table = LeaseTable()
    table.hold("r1", [1], token=T)
    with pytest.raises(ValueError):
        table.hold("r1", [2], token=T)


def test_expire_returns_only_expired_blocks():
    table = LeaseTable()
    table.hold("old", [1, 2], ttl_s=10, now=100.0, token=T)
    table.hold("new", [3], ttl_s=50, now=100.0, token=T)
    assert table.expire(now=109.0) == []
    assert table.expire(now=110.0) == [1, 2]
    assert "old" not in table and "new" in table
    assert table.expire(now=110.0) == []


def test_renew_pushes_expiry():
    table = LeaseTable()
    table.hold("r", [1], ttl_s=10, now=0.0, token=T)
    assert table.renew("r", ttl_s=10, now=5.0)
    assert table.expire(now=12.0) == []
    assert table.expire(now=15.0) == [1]
    assert not table.renew("r", now=16.0)


def test_renew_of_an_expired_lease_fails():
    table = LeaseTable()
    table.hold("r", [1], ttl_s=1, now=0.0, token=T)
    assert not table.renew("r", now=2.0)


def test_release_later_hands_blocks_to_the_next_expire():
    table = LeaseTable()
    table.hold("r", [4, 2], ttl_s=30, now=0.0, token=T)
    assert table.release_later("r", T)
    assert "r" not in table
    assert not table.release_later("r", T)
    assert table.expire(now=1.0) == [4, 2]
    assert table.expire(now=1.0) == []


def test_begin_read_admits_only_covered_blocks_of_a_live_lease():
    table = LeaseTable()
    table.hold("r", [1, 2, 3], ttl_s=10, now=0.0, token=T)
    assert table.begin_read("r", [3, 1], T, now=1.0) is not None
    assert table.begin_read("r", [1, 4], T, now=1.0) is None
    assert table.begin_read("other", [1], T, now=1.0) is None
    assert table.begin_read("r", [1], T, now=10.0) is None  # expired


def test_a_release_during_a_read_frees_the_blocks_when_the_read_ends():
    table = LeaseTable()
    table.hold("r", [4, 2], token=T)
    lease_id = table.begin_read("r", [2], T)
    assert table.release_later("r", T)
    assert "r" not in table and table.begin_read("r", [2], T) is None  # ended: no new reads
    assert table.expire() == []  # but the read still copies the blocks
    assert table.end_read(lease_id)
    assert table.expire() == [4, 2]


def test_an_immediate_release_during_a_read_hands_the_blocks_back_later():
    table = LeaseTable()
    table.hold("r", [5], token=T)
    lease_id = table.begin_read("r", [5], T)
    assert table.release("r", T) == []  # ended, nothing to free yet
    table.end_read(lease_id)
    assert table.expire() == [5]


def test_a_lease_that_expires_during_a_read_is_freed_when_the_read_ends():
    table = LeaseTable()
    table.hold("r", [1], ttl_s=1, now=0.0, token=T)
    lease_id = table.begin_read("r", [1], T, now=0.5)
    assert table.expire(now=5.0) == []
    assert "r" not in table and not table.is_live("r", lease_id, T, now=5.0)
    assert table.end_read(lease_id)
    assert table.expire(now=5.0) == [1]


def test_every_concurrent_read_pins_the_lease():
    table = LeaseTable()
    table.hold("r", [7, 8], token=T)
    first, second = table.begin_read("r", [7], T), table.begin_read("r", [8], T)
    assert first == second
    table.release_later("r", T)
    table.end_read(first)
    assert table.expire() == []  # the other rank still reads
    table.end_read(second)
    assert table.expire() == [7, 8]
    assert not table.end_read(first)  # every read was ended already


def test_a_read_of_an_old_lease_does_not_pin_a_new_hold_of_the_request():
    table = LeaseTable()
    table.hold("r", [1], token=T)
    old = table.begin_read("r", [1], T)
    table.release_later("r", T)
    new = table.hold("r", [2], token=T).lease_id
    assert not table.release_later("r", T, lease_id=old)  # the old lease's release is not the new's
    table.end_read(old)
    assert table.expire() == [1]
    assert table.is_live("r", new, T) and table.release_later("r", T, lease_id=new)
    assert table.expire() == [2]


def test_is_live_tells_a_new_lease_of_the_same_request_apart():
    table = LeaseTable()
    first = table.hold("r", [1], token=T)
    table.release("r", T)
    second = table.hold("r", [1], token=T)
    assert not table.is_live("r", first.lease_id, T)
    assert table.is_live("r", second.lease_id, T)


def test_concurrent_holds_and_releases_lose_nothing():
    table = LeaseTable()
    freed: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(200):
            rid = f"{t}-{i}"
            table.hold(rid, [t * 1000 + i], token=T)
            blocks = table.release(rid, T)
            with lock:
                freed.extend(blocks)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(freed) == sorted(t * 1000 + i for t in range(8) for i in range(200))
    assert len(table) == 0


def run_at_once(calls: list) -> None:
    """Each call on a thread of its own, all let go at the same moment; returns when all end."""
    barrier = threading.Barrier(len(calls))

    def run(call) -> None:
        barrier.wait()
        call()

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def race_to_release(table: LeaseTable, threads: int = 4) -> list:
    """Half the threads release, half release_later, all at once; their results."""
    results: list = []

    def release(i: int) -> None:
        results.append(table.release("r", T) if i % 2 else table.release_later("r", T))

    run_at_once([lambda i=i: release(i) for i in range(threads)])
    return results


def test_concurrent_release_of_one_lease_frees_it_once():
    for _ in range(50):
        table = LeaseTable()
        table.hold("r", [7], token=T)
        results = race_to_release(table)
        assert sum(r is not False for r in results) == 1
        freed = [b for r in results if isinstance(r, list) for b in r] + table.expire()
        assert freed == [7]


def race_reads_with_a_release(table: LeaseTable, readers: int = 4) -> list[int]:
    """Readers read "r" while a thread releases it, all at once; what `expire` handed a
    reader while its read was open (must be nothing)."""
    freed_while_read: list[int] = []

    def read() -> None:
        lease_id = table.begin_read("r", [7], T)
        if lease_id is not None:
            freed_while_read.extend(table.expire())
            table.end_read(lease_id)

    run_at_once([read] * readers + [lambda: table.release_later("r", T)])
    return freed_while_read


def test_reads_racing_a_release_free_the_blocks_once_after_the_last_read():
    for _ in range(50):
        table = LeaseTable()
        table.hold("r", [7], token=T)
        assert race_reads_with_a_release(table) == []
        assert table.expire() == [7] and table.expire() == []


def test_a_lease_is_read_and_released_only_with_its_token():
    table = LeaseTable()
    table.hold("r", [1, 2], token=T)
    for wrong in ("", "the-lease-tokeN", None, 7, ["the-lease-token"]):
        assert table.begin_read("r", [1], wrong) is None
        assert table.release("r", wrong) is False
        assert table.release_later("r", wrong) is False
    assert "r" in table and table.expire() == []  # nothing a wrong token did ended it
    lease_id = table.begin_read("r", [1], T)
    assert not table.is_live("r", lease_id, "guess") and table.is_live("r", lease_id, T)
    table.end_read(lease_id)
    assert table.release("r", T) == [1, 2]


def test_each_hold_gets_its_own_unguessable_token():
    table = LeaseTable()
    tokens = {table.hold(f"r{i}", [i]).token for i in range(100)}
    assert len(tokens) == 100 and all(len(t) >= 20 for t in tokens)
    assert table.release("r1", table.hold("x", [7]).token) is False  # another lease's token


def test_the_owner_revokes_without_the_token():
    table = LeaseTable()
    table.hold("r", [4], token=T)
    assert table.revoke("r") and not table.revoke("r")
    assert table.expire() == [4]
