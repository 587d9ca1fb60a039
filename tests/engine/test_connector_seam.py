"""The KV connector seam: what the scheduler asks a connector, and what P's and D's
connector (and a colocated engine's null one) answer."""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.config import SchedulerConfig
from pdserve.engine.blocks import BlockPool
from pdserve.engine.connector import NullConnector, PullResult
from pdserve.engine.handoff import HeldPrefill, HoldForDecode, RemotePrefill
from pdserve.engine.kv_caches import KVCaches
from pdserve.engine.kv_connector import KVConnector
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.security import DeploymentSecret
from pdserve.transfer.layout import KVLayout

BLOCK_SIZE = 4
LAYOUT = KVLayout("float32", BLOCK_SIZE, num_layers=2, num_kv_heads=2, head_dim=8)
SECRET = DeploymentSecret.from_env()  # tests/conftest.py sets it


class RemotePrompts:
    """A connector whose listed requests' prompts come from elsewhere, once (as D's):
    it records the blocks it is given and hands pulls back when told."""

    def __init__(self, *request_ids: str):
        self.remote = set(request_ids)
        self.allocated: list[tuple[str, list[int], int]] = []
        self.done: list[PullResult] = []

    def matched_remote_tokens(self, request: Request) -> int:
        if request.request_id not in self.remote:
            return 0
        return request.num_prompt_tokens - request.num_computed_tokens

    def blocks_allocated(self, request: Request, block_ids: list[int],
                         num_local_hit_tokens: int) -> None:
        if request.request_id in self.remote:
            self.remote.discard(request.request_id)  # pulled once
            self.allocated.append((request.request_id, list(block_ids), num_local_hit_tokens))

    def request_finished(self, request: Request) -> tuple[bool, HeldPrefill | None]:
        return False, None

    def poll(self) -> tuple[list[PullResult], list[int]]:
        done, self.done = self.done, []
        return done, []


def scheduler(connector, num_blocks: int = 16) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, BLOCK_SIZE))
    return Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, connector)


def request(rid: str, prompt: list[int], handoff=None, output: list[int] | None = None
            ) -> Request:
    r = Request(rid, list(prompt), SamplingParams(max_tokens=8), handoff=handoff)
    r.output_token_ids = list(output or [])
    return r


def run(sched: Scheduler) -> list[tuple[str, int]]:
    """One step as the engine runs it, without a model: apply the plan, sample token 1."""
    plan = sched.schedule()
    for s in plan.scheduled:
        samples = s.samples
        s.request.num_computed_tokens += s.num_new_tokens
        sched.kv.publish_full_blocks(s.request)
        if samples:
            s.request.output_token_ids.append(1)
    for result in sched.connector.poll()[0]:
        sched.finish_pull(result.request_id, result.ok)
    return [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled]


# ---- the scheduler asks ------------------------------------------------------------------


def test_a_request_with_remote_tokens_waits_for_its_pull_with_the_prompts_blocks():
    connector = RemotePrompts("d")
    sched = scheduler(connector)
    d = request("d", list(range(10)), output=[7])  # D: P's first token comes with it
    sched.add(d)
    assert run(sched) == []  # nothing to compute until the pull lands
    assert d.status == RequestStatus.WAITING_FOR_REMOTE_KV and sched.pulling == {"d": d}
    [(rid, blocks, hit)] = connector.allocated
    assert rid == "d" and blocks == d.block_ids and len(blocks) == 3 and hit == 0


def test_a_finished_pull_decodes_next():
    connector = RemotePrompts("d")
    sched = scheduler(connector)
    d = request("d", list(range(10)), output=[7])
    sched.add(d)
    run(sched)
    connector.done.append(PullResult("d", True))
    run(sched)  # the pull is handed back after this step's plan
    assert d.status == RequestStatus.RUNNING and d.num_computed_tokens == 10
    assert run(sched) == [("d", 1)]  # P's token goes in: a decode, no prefill


def test_the_local_prefix_hit_is_not_pulled():
    connector = RemotePrompts("d")
    sched = scheduler(connector)
    local = request("a", list(range(8)) + [50, 51])
    sched.add(local)
    run(sched)  # publishes its two full blocks
    sched.add(request("d", list(range(8)) + [60, 61], output=[7]))
    run(sched)
    [(_, blocks, hit)] = connector.allocated
    assert hit == 8 and blocks[:2] == local.block_ids[:2] and len(blocks) == 3


def test_a_failed_pull_prefills_locally():
    connector = RemotePrompts("d")
    sched = scheduler(connector)
    d = request("d", list(range(10)), output=[7])
    sched.add(d)
    run(sched)
    connector.done.append(PullResult("d", False, "refused"))
    run(sched)
    assert d.status == RequestStatus.WAITING and d.block_ids == []
    assert run(sched) == [("d", 11)]  # the prompt and P's token, computed here
    assert len(connector.allocated) == 1  # asked once: no second pull


def test_a_request_aborted_during_its_pull_frees_its_blocks_when_the_pull_ends():
    connector = RemotePrompts("d")
    sched = scheduler(connector)
    d = request("d", list(range(10)), output=[7])
    sched.add(d)
    run(sched)
    free = sched.kv.pool.num_free_blocks
    sched.remove(d)
    assert sched.kv.pool.num_free_blocks == free and "d" in sched.aborted_pulls
    sched.finish_pull("d", True)
    assert sched.kv.pool.num_free_blocks == 16 and not sched.aborted_pulls


def test_a_preempted_request_is_recomputed_not_pulled_again():
    connector = RemotePrompts("d")
    sched = scheduler(connector, num_blocks=4)
    d = request("d", list(range(10)), output=[7])
    sched.add(d)
    run(sched)
    connector.done.append(PullResult("d", True))
    run(sched)
    sched._preempt(sched.running.pop())
    # the pulled full blocks stay in the prefix cache: only the rest is recomputed here
    assert run(sched) == [("d", 3)] and len(connector.allocated) == 1


# ---- a colocated engine: the null connector ----------------------------------------------


def test_the_null_connector_sends_every_prompt_to_local_prefill():
    sched = scheduler(NullConnector())
    sched.add(r := request("r", list(range(10)), handoff=HoldForDecode()))
    assert run(sched) == [("r", 10)]
    assert sched.connector.matched_remote_tokens(r) == 0


def test_the_null_connector_never_keeps_blocks_nor_holds_a_lease():
    null = NullConnector()
    r = request("r", list(range(10)), handoff=HoldForDecode(), output=[3])
    r.status = RequestStatus.FINISHED_LENGTH
    assert null.request_finished(r) == (False, None)
    assert null.poll() == ([], []) and null.num_leases() == 0
    assert not null.release_lease("r", "token")


# ---- P's and D's connector ---------------------------------------------------------------


@pytest.fixture
def prefill_connector():
    caches = KVCaches.allocate(LAYOUT, 16, torch.device("cpu"), "prefill")
    connector = KVConnector(caches, secret=SECRET)
    yield connector
    connector.close()
    caches.close()


@pytest.fixture
def decode_side():
    caches = KVCaches.allocate(LAYOUT, 16, torch.device("cpu"), "decode")
    connector = KVConnector(caches, secret=SECRET)
    yield connector, caches
    connector.close()
    caches.close()


def finished(handoff, status: RequestStatus) -> Request:
    r = request("p", list(range(10)), handoff=handoff, output=[3])
    r.block_ids, r.status = [4, 5, 6], status
    return r


def test_p_keeps_the_blocks_of_a_prefill_held_for_decode_that_ran_to_its_length(
        prefill_connector):
    keep, held = prefill_connector.request_finished(
        finished(HoldForDecode(), RequestStatus.FINISHED_LENGTH))
    assert keep and held.remote.block_ids == [4, 5, 6] and held.first_token_id == 3
    assert "p" in prefill_connector.leases


@pytest.mark.parametrize("handoff, status", [
    (HoldForDecode(), RequestStatus.FINISHED_STOPPED),  # EOS first: nothing for D to do
    (HoldForDecode(), RequestStatus.FINISHED_ABORTED),
    (None, RequestStatus.FINISHED_LENGTH),  # a plain request on P
])
def test_p_frees_everything_else(prefill_connector, handoff, status):
    assert prefill_connector.request_finished(finished(handoff, status)) == (False, None)
    assert prefill_connector.num_leases() == 0


def held_on_p(prefill_connector) -> HeldPrefill:
    """P's caches hold known values in the held prefill's blocks."""
    for layer in prefill_connector.ranks[0].kv_caches:
        for block in (4, 5, 6):
            layer[:, block] = float(block)
    _, held = prefill_connector.request_finished(
        finished(HoldForDecode(), RequestStatus.FINISHED_LENGTH))
    return held


def pulled(connector: KVConnector, timeout_s: float = 10.0) -> list[PullResult]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        results, _ = connector.poll()
        if results:
            return results
        connector.wait(0.05)
    raise AssertionError("no pull ended")


def test_d_pulls_into_the_blocks_its_prefix_cache_did_not_give(prefill_connector, decode_side):
    connector, caches = decode_side
    held = held_on_p(prefill_connector)
    d = request("d", list(range(10)), handoff=RemotePrefill(held.remote, 3), output=[3])
    d.num_computed_tokens = 4  # its first block hit D's prefix cache
    assert connector.matched_remote_tokens(d) == 6
    connector.blocks_allocated(d, [9, 10, 11], num_local_hit_tokens=4)
    assert connector.matched_remote_tokens(d) == 0  # pulled once, whatever comes of it
    [result] = pulled(connector)
    assert result.ok and result.request_id == "d"
    layer = caches.local[0]
    assert layer[:, 9].eq(0).all()  # the hit block is D's own, untouched
    assert layer[:, 10].eq(5).all() and layer[:, 11].eq(6).all()


def test_d_aborting_before_its_pull_lets_p_free_at_once(prefill_connector, decode_side):
    connector, _ = decode_side
    held = held_on_p(prefill_connector)
    d = request("d", list(range(10)), handoff=RemotePrefill(held.remote, 3), output=[3])
    d.status = RequestStatus.FINISHED_ABORTED
    assert connector.request_finished(d) == (False, None)
    deadline = time.monotonic() + 10
    freed: list[int] = []
    while not freed and time.monotonic() < deadline:
        freed += prefill_connector.poll()[1]
        time.sleep(0.02)
    assert sorted(freed) == [4, 5, 6]
