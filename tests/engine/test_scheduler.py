"""The scheduler without a model: budgets, chunking, admission order and preemption."""

from pdserve.config import SchedulerConfig
from pdserve.engine.blocks import BlockPool
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, **cfg):
    from pdserve.engine.scheduler import Scheduler

    kv = KVCacheManager(BlockPool(num_blocks, block_size))
    return Scheduler(SchedulerConfig(**cfg), kv)


def req(rid: str, n: int) -> Request:
    return Request(rid, list(range(100 * len(rid), 100 * len(rid) + n)), SamplingParams())


def run_step(sched):
    """Pretend the model ran: advance computed tokens and emit token 1 for those that sample."""
    out = sched.schedule()
    for s in out.scheduled:
        samples = s.samples
        s.request.num_computed_tokens += s.num_new_tokens
        sched.kv.publish_full_blocks(s.request)
        if samples:
            s.request.output_token_ids.append(1)
    return out


def test_long_prompt_is_chunked_to_the_token_budget():
    sched = make(max_num_batched_tokens=8)
    r = req("a", 20)
    sched.add(r)
    sizes = [run_step(sched).scheduled[0].num_new_tokens for _ in range(3)]
    assert sizes == [8, 8, 4]
    assert r.output_token_ids == [1]  # sampled only once the prompt was complete


def test_decodes_are_scheduled_before_new_prefills():
    sched = make(max_num_batched_tokens=8)
    a, b = req("a", 4), req("bb", 30)
    sched.add(a)
    run_step(sched)
    sched.add(b)
    out = run_step(sched)
    plan = [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]
    assert plan == [("a", 1), ("bb", 7)]


def test_max_num_seqs_caps_running_requests():
    sched = make(max_num_seqs=2)
    for name in ["a", "bb", "ccc"]:
        sched.add(req(name, 3))
    out = run_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_preemption_frees_the_latest_request_and_recomputes_it_later():
    sched = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a, b = req("a", 7), req("bb", 7)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # each holds 2 blocks (8 slots): pool full
    run_step(sched)  # token 8 still fits
    run_step(sched)  # a needs a 3rd block for token 9 -> b, admitted last, is preempted
    assert b.status == RequestStatus.WAITING and b.num_preemptions == 1
    assert b.block_ids == [] and b.num_computed_tokens == 0
    assert a.status == RequestStatus.RUNNING


def test_second_prompt_with_same_prefix_hits_the_cache():
    sched = make(block_size=4)
    a = req("a", 10)
    sched.add(a)
    run_step(sched)
    b = Request("b", list(a.prompt_token_ids[:8]) + [7, 7, 7], SamplingParams())
    sched.add(b)
    out = run_step(sched)
    sb = [s for s in out.scheduled if s.request is b][0]
    assert b.num_cached_tokens == 8 and sb.num_new_tokens == 3
    assert b.block_ids[:2] == a.block_ids[:2]


def test_fully_cached_prompt_still_computes_its_last_token():
    sched = make(block_size=4)
    a = req("a", 8)
    sched.add(a)
    run_step(sched)
    b = Request("b", list(a.prompt_token_ids), SamplingParams())
    sched.add(b)
    out = sched.schedule()
    sb = [s for s in out.scheduled if s.request is b][0]
    assert b.num_cached_tokens == 4 and sb.num_new_tokens == 4 and sb.samples


def test_a_prompt_that_fits_a_step_is_not_split_by_the_prompts_ahead_of_it():
    """Two 6-token prompts and a budget of 10: the second waits a step and runs whole, where
    chunking would give it 4 tokens now and 2 behind a third prompt next step. A prompt longer
    than what is left after the running requests is still chunked."""
    sched = make(max_num_batched_tokens=10)
    a, b, c = req("a", 6), req("bb", 6), req("ccc", 30)
    for r in (a, b, c):
        sched.add(r)
    plans = [[(s.request.request_id, s.num_new_tokens) for s in run_step(sched).scheduled]
             for _ in range(4)]
    assert plans[0] == [("a", 6)]  # bb would be split: it waits
    assert plans[1] == [("a", 1), ("bb", 6), ("ccc", 3)]  # ccc never fits: chunked
    assert plans[2] == plans[3] == [("a", 1), ("bb", 1), ("ccc", 8)]
    assert len(b.output_token_ids) == 3 and len(a.output_token_ids) == 4


def test_a_response_about_to_end_finishes_before_a_long_prompt_starts():
    """A request 2 tokens short of its max_tokens ends in two decode steps before a 300-token
    prompt is admitted (its last tokens would each wait that prompt's prefill); a short prompt
    goes at once; and a long prompt is held at most `finish_first_tokens` steps in a row."""
    sched = make(num_blocks=256, max_num_batched_tokens=512, finish_first_tokens=2)
    a = Request("a", list(range(8)), SamplingParams(max_tokens=4))
    sched.add(a)
    run_step(sched)
    run_step(sched)  # a has 2 of its 4 tokens
    long_prompt, short_prompt = req("long", 300), req("s", 20)
    sched.add(long_prompt)
    plans = []
    for _ in range(3):
        plans.append([(s.request.request_id, s.num_new_tokens)
                      for s in run_step(sched).scheduled])
        if len(a.output_token_ids) == 4 and a in sched.running:
            sched.remove(a)  # as the engine does at max_tokens
    assert plans == [[("a", 1)], [("a", 1)], [("long", 300)]]

    b = Request("b", list(range(8)), SamplingParams(max_tokens=3))
    sched.add(b)
    run_step(sched)  # b's prefill; it has 1 of its 3 tokens
    sched.add(short_prompt)
    ids = [s.request.request_id for s in run_step(sched).scheduled]
    assert "s" in ids  # a short prompt is not held back

    held = make(num_blocks=256, max_num_batched_tokens=512, finish_first_tokens=2)
    ending = [Request(f"e{i}", list(range(8)), SamplingParams(max_tokens=2 + i)) for i in range(6)]
    for r in ending:  # one of them is always about to end
        held.add(r)
    run_step(held)
    held.add(req("long", 300))
    admitted_at = next(i for i in range(6) if any(
        s.request.request_id == "long" for s in run_step(held).scheduled))
    assert admitted_at == 2  # held two steps, then admitted however many are still ending


def test_finish_first_off_admits_a_long_prompt_at_once():
    sched = make(num_blocks=256, max_num_batched_tokens=512, finish_first_tokens=0)
    a = Request("a", list(range(8)), SamplingParams(max_tokens=3))
    sched.add(a)
    run_step(sched)
    sched.add(req("long", 300))
    assert [s.request.request_id for s in run_step(sched).scheduled] == ["a", "long"]
