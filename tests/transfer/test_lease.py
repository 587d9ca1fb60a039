"""LeaseTable: hold, renew, release, expiry, reads, and concurrent use."""

from __future__ import annotations

import threading

import pytest

from pdserve.transfer import LeaseTable


def test_hold_then_release_returns_the_blocks():
    table = LeaseTable()
    table.hold("r1", [3, 5, 7], ttl_s=30)
    assert "r1" in table
    assert table.release("r1") == [3, 5, 7]
    assert "r1" not in table and len(table) == 0


def test_releasing_twice_or_unknown_is_a_false_no_op():
    table = LeaseTable()
    table.hold("r1", [1])
    assert table.release("r1") == [1]
    assert table.release("r1") is False
    assert table.release("nope") is False


def test_holding_a_request_twice_is_a_bug():
    table = LeaseTable()
    table.hold("r1", [1])
    with pytest.raises(ValueError):
        table.hold("r1", [2])


def test_expire_returns_only_expired_blocks():
    table = LeaseTable()
    table.hold("old", [1, 2], ttl_s=10, now=100.0)
    table.hold("new", [3], ttl_s=50, now=100.0)
    assert table.expire(now=109.0) == []
    assert table.expire(now=110.0) == [1, 2]
    assert "old" not in table and "new" in table
    assert table.expire(now=110.0) == []


def test_renew_pushes_expiry():
    table = LeaseTable()
    table.hold("r", [1], ttl_s=10, now=0.0)
    assert table.renew("r", ttl_s=10, now=5.0)
    assert table.expire(now=12.0) == []
    assert table.expire(now=15.0) == [1]
    assert not table.renew("r", now=16.0)


def test_renew_of_an_expired_lease_fails():
    table = LeaseTable()
    table.hold("r", [1], ttl_s=1, now=0.0)
    assert not table.renew("r", now=2.0)


def test_release_later_hands_blocks_to_the_next_expire():
    table = LeaseTable()
    table.hold("r", [4, 2], ttl_s=30, now=0.0)
    assert table.release_later("r")
    assert "r" not in table
    assert not table.release_later("r")
    assert table.expire(now=1.0) == [4, 2]
    assert table.expire(now=1.0) == []


def test_begin_read_admits_only_covered_blocks_of_a_live_lease():
    table = LeaseTable()
    table.hold("r", [1, 2, 3], ttl_s=10, now=0.0)
    assert table.begin_read("r", [3, 1], read_timeout_s=5, now=1.0) is not None
    assert table.begin_read("r", [1, 4], read_timeout_s=5, now=1.0) is None
    assert table.begin_read("other", [1], read_timeout_s=5, now=1.0) is None
    assert table.begin_read("r", [1], read_timeout_s=5, now=10.0) is None  # expired


def test_a_read_keeps_the_lease_alive_until_it_times_out():
    table = LeaseTable()
    table.hold("r", [1], ttl_s=1, now=0.0)
    lease_id = table.begin_read("r", [1], read_timeout_s=20, now=0.5)
    assert table.expire(now=5.0) == []
    assert table.is_live("r", lease_id, now=5.0)
    assert table.expire(now=21.0) == [1]


def test_is_live_tells_a_new_lease_of_the_same_request_apart():
    table = LeaseTable()
    first = table.hold("r", [1])
    table.release("r")
    second = table.hold("r", [1])
    assert not table.is_live("r", first.lease_id)
    assert table.is_live("r", second.lease_id)


def test_concurrent_holds_and_releases_lose_nothing():
    table = LeaseTable()
    freed: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(200):
            rid = f"{t}-{i}"
            table.hold(rid, [t * 1000 + i])
            blocks = table.release(rid)
            with lock:
                freed.extend(blocks)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(freed) == sorted(t * 1000 + i for t in range(8) for i in range(200))
    assert len(table) == 0


def race_to_release(table: LeaseTable, threads: int = 4) -> list:
    """Half the threads release, half release_later, all at once; their results."""
    results: list = []
    barrier = threading.Barrier(threads)

    def release(i: int) -> None:
        barrier.wait()
        results.append(table.release("r") if i % 2 else table.release_later("r"))

    workers = [threading.Thread(target=release, args=(i,)) for i in range(threads)]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    return results


def test_concurrent_release_of_one_lease_frees_it_once():
    for _ in range(50):
        table = LeaseTable()
        table.hold("r", [7])
        results = race_to_release(table)
        assert sum(r is not False for r in results) == 1
        freed = [b for r in results if isinstance(r, list) for b in r] + table.expire()
        assert freed == [7]
