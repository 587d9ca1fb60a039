"""The engine: requests in, one scheduling + forward + sampling step at a time, deltas out."""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import torch

from pdserve import switches
from pdserve.config import EngineArgs, ModelConfig
from pdserve.engine import seeded_noise
from pdserve.engine.blocks import BlockPool
from pdserve.engine.calibrate import calibrate
from pdserve.engine.compilations import COMPILATIONS
from pdserve.engine.connector import Connector, NullConnector
from pdserve.engine.grammar import GrammarCompiler, RequestGrammar
from pdserve.engine.handoff import RemotePrefill
from pdserve.engine.kv_caches import KVCaches
from pdserve.engine.kv_connector import KVConnector
from pdserve.engine.kv_manager import KVCacheManager
from pdserve.engine.outputs import EngineRequest, EngineStats, RequestOutput, RequestTimes
from pdserve.engine.prompt_images import PromptImages
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.runner import ModelRunner, profile_peak_activation_bytes
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from pdserve.engine.step_loop import StepLoop
from pdserve.engine.step_time import StepTimeModel
from pdserve.engine.tp import TPSpec, visible_gpus_for
from pdserve.engine.tp_runner import TPModelRunner, TPWorkers
from pdserve.kernels.cpu_native import native_kernels
from pdserve.media.image_check import check_image_tokens
from pdserve.media.vision_spec import vision_spec_of
from pdserve.models.layers import build_rope_tables
from pdserve.transfer.layout import KVLayout

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 512 * 2**20


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(dtypes)} or auto")
    return dtypes[name]


def set_cpu_threads(requested: int | None) -> int:
    """Pin torch's intra-op threads for a CPU engine; returns the number used."""
    threads = requested or switches.SWITCHES.cpu_threads or max(
        1, (os.cpu_count() or 2) // 2
    )
    torch.set_num_threads(threads)
    return threads


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int) -> int:
    heads = max(cfg.num_kv_heads // tp_size, 1)
    return 2 * cfg.num_layers * block_size * heads * cfg.head_dim * dtype.itemsize


def kv_cache_budget(args: EngineArgs, device: torch.device, activation_bytes: int) -> int:
    """Bytes the KV cache may take: a fixed budget on CPU; on GPU, this process's share of
    the memory less what others use, the weights and the profiled peak activations."""
    if args.cache.kv_cache_memory is not None:
        return args.cache.kv_cache_memory
    if device.type != "cuda":
        return DEFAULT_CPU_KV_CACHE_BYTES
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    share = args.cache.gpu_memory_utilization * total
    graphs_and_slack = 2 * 2**30  # CUDA graphs' pool, NCCL, allocator fragmentation
    return int(share - used_by_others - torch.cuda.memory_allocated(device) - activation_bytes
               - graphs_and_slack)


def check_shared_gpu_budget(args: EngineArgs) -> None:
    """Ranks sharing a GPU each measure the same free memory: the KV budget must be given."""
    if args.cache.kv_cache_memory is None and not args.cache.num_blocks:
        raise ValueError("tensor-parallel ranks that share a GPU need --kv-cache-memory")
    log.warning("%d tensor-parallel ranks share %d GPU(s) over gloo, without CUDA graphs: "
                "a test mode, not a fast one", args.tensor_parallel_size,
                torch.cuda.device_count())


class Engine:
    """One engine instance: model, KV cache, scheduler and sampler on one device."""

    def __init__(self, args: EngineArgs) -> None:
        from pdserve.models.loader import load_model, model_config  # heavy: import here

        self.args = args
        args.require_deployment_secret()  # before minutes of model loading
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        if self.device.type == "cpu":
            set_cpu_threads(args.cpu_threads)
        else:  # before the first Triton kernel runs
            COMPILATIONS.watch_triton()
        tp = args.tensor_parallel_size
        self.tp_workers: TPWorkers | None = None
        shares_gpus = False
        if tp > 1:
            if model_config(args.model).vision is not None:  # before starting any worker
                raise ValueError("vision-language models run with tensor_parallel_size 1 for now")
            spec = TPSpec(args.model, self.dtype, self.device.type, tp, seed=args.seed,
                          cpu_threads=torch.get_num_threads(),
                          max_model_len=args.scheduler.max_model_len,
                          num_gpus=visible_gpus_for(tp) if self.device.type == "cuda" else 0)
            shares_gpus = spec.shares_gpus
            if shares_gpus:
                check_shared_gpu_budget(args)
            # ranks 1..tp-1 load their shards while this process loads rank 0's
            self.tp_workers = TPWorkers.start(spec)
        loaded = load_model(args.model, self.dtype, self.device, tp_rank=0, tp_size=tp,
                            seed=args.seed)
        self.model_config: ModelConfig = loaded.config
        self.model_name = loaded.name
        self.vision = vision_spec_of(args.model, loaded.model)  # None: text only
        cfg = self.model_config
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = list(cfg.eos_token_ids)
        self.max_model_len = args.scheduler.max_model_len or cfg.max_position_embeddings
        build_rope_tables(loaded.model, self.max_model_len, self.dtype)

        block_size = args.cache.block_size
        sched = args.scheduler
        heads = max(cfg.num_kv_heads // args.tensor_parallel_size, 1)
        activation_bytes = 0
        if self.device.type == "cuda" and not args.cache.num_blocks:
            profile = (self.tp_workers.profile if self.tp_workers is not None
                       else profile_peak_activation_bytes)  # with TP, every rank profiles
            activation_bytes = profile(
                loaded.model, sched.max_num_batched_tokens, sched.max_num_seqs, block_size,
                (block_size, heads, cfg.head_dim), self.dtype, self.device, self.max_model_len)
            log.info("peak activations of a %d-token step: %.2f GiB",
                     sched.max_num_batched_tokens, activation_bytes / 2**30)
        per_block = kv_bytes_per_block(cfg, block_size, self.dtype, args.tensor_parallel_size)
        num_blocks = args.cache.num_blocks or (
            kv_cache_budget(args, self.device, activation_bytes) // per_block)
        if num_blocks < 2:
            raise ValueError(
                f"the KV cache budget fits only {num_blocks} blocks of {per_block} bytes; "
                "raise --kv-cache-memory or --gpu-memory-utilization"
            )
        self.num_blocks = num_blocks
        self.layout = KVLayout(str(self.dtype).removeprefix("torch."), block_size,
                               cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                               args.tensor_parallel_size, 0)
        self.caches = KVCaches.allocate(self.layout, num_blocks, self.device, args.role)
        print(f"pdserve engine: KV cache of {num_blocks} blocks x {block_size} tokens = "
              f"{num_blocks * block_size} tokens ({num_blocks * per_block / 2**30:.2f} GiB)",
              flush=True)
        log.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)", num_blocks,
                 block_size, num_blocks * block_size, num_blocks * per_block / 2**30)
        self.pool = BlockPool(num_blocks, block_size, args.cache.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool)
        runner_args = dict(
            max_tokens=max(sched.max_num_batched_tokens, sched.max_num_seqs),
            max_seqs=sched.max_num_seqs, max_model_len=self.max_model_len,
            use_cuda_graphs=not (args.enforce_eager or shares_gpus))
        if self.tp_workers is not None:  # the workers' caches join self.caches here
            self.runner = TPModelRunner(self.tp_workers, loaded.model, self.caches, block_size,
                                        self.device, **runner_args)
        else:
            self.runner = ModelRunner(loaded.model, self.caches.local, block_size, self.device,
                                      **runner_args)
        # P and D: the transfer agent, over every rank's caches; colocated: nothing to move
        self.connector: Connector = (
            NullConnector() if args.role == "colocated" else
            KVConnector(self.caches, lease_ttl_s=args.kv_lease_ttl_s,
                        transport=args.kv_transport, secret=args.deployment_secret,
                        bind_host=args.kv_host, advertise_host=args.kv_advertise_host))
        self.scheduler = Scheduler(args.scheduler, self.kv, self.connector)
        self.requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []  # outputs produced outside step(), e.g. aborts
        self.request_failures = 0  # counted by the engine process, which contains them
        if self.device.type == "cuda":
            self._compile_mixed_step()
            seeded_noise.warm_up(self.vocab_size, self.device)
        elif self.dtype == torch.float32:
            native_kernels()  # built (or loaded) now, not by the first step
        self.scheduler.step_time = self._step_time_model()

    def _compile_mixed_step(self) -> None:
        """Run one dummy decode + prefill step now: Triton compiles the kernels' mixed-step
        variants here instead of stalling the first such step of real requests (~1 s)."""
        params = SamplingParams(max_tokens=1)
        decode, prefill = Request("warm-decode", [1] * 17, params), Request("warm-prefill",
                                                                            [1] * 32, params)
        decode.num_computed_tokens = 16  # one token left: a decode row
        free = iter(range(self.num_blocks))
        for r in (decode, prefill):
            r.block_ids = [next(free, 0) for _ in range(self.kv.blocks_needed(r.num_tokens))]
        # the blocks are free and uncached: what the step writes into them is never read
        self.runner.execute(SchedulerOutput([ScheduledRequest(decode, 1),
                                             ScheduledRequest(prefill, 32)]))

    def _step_time_model(self) -> StepTimeModel | None:
        """What --max-step-ms sizes prefill chunks by: read from --step-time-file, or fitted
        now from timed dummy steps (after the warm-up above, before any request)."""
        sched = self.args.scheduler
        if not sched.max_step_ms:
            return None
        if sched.step_time_file:
            with open(sched.step_time_file) as f:
                return StepTimeModel.from_dict(json.load(f))
        return calibrate(self.runner, self.num_blocks, self.args.cache.block_size,
                         sched.max_num_batched_tokens, sched.max_num_seqs, self.max_model_len,
                         self.device)

    # ---- requests in -------------------------------------------------------------------

    def validate(self, req: EngineRequest) -> None:
        """Raise ValueError with a message for the user if the request can never run."""
        n = len(req.prompt_token_ids)
        p = req.params
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already running")
        if n == 0:
            raise ValueError("the prompt is empty; send at least one token")
        bad = [t for t in req.prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is out of the vocabulary (0..{self.vocab_size - 1})"
            )
        check_image_tokens(req.prompt_token_ids, req.images, self.vision)
        if p.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if n + p.max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {n + p.max_tokens} tokens ({n} in the prompt, {p.max_tokens} "
                "in the completion). Please reduce the prompt or max_tokens."
            )
        if isinstance(req.handoff, RemotePrefill):
            self._validate_remote_prefill(req, req.handoff)
        if req.output_token_ids:
            self._validate_resumed(req)
        need = self.kv.blocks_needed(n + p.max_tokens)
        if need > self.num_blocks:
            raise ValueError(
                f"the request needs {need} KV blocks but the cache holds {self.num_blocks}; "
                "shorten it or start the server with a larger --kv-cache-memory"
            )

    def _validate_remote_prefill(self, req: EngineRequest, handoff: RemotePrefill) -> None:
        """D: P's KV must fit this engine's cache layout and cover the prompt."""
        if self.args.role == "colocated":
            raise ValueError("kv_transfer_params with do_remote_prefill need a decode "
                             "instance; this one runs with --role colocated")
        self.layout.check_compatible(handoff.remote.layout)  # IncompatibleLayout: ValueError
        if len(handoff.remote.block_ids) < self.kv.blocks_needed(len(req.prompt_token_ids)):
            raise ValueError("kv_transfer_params.remote_block_ids do not cover the prompt")
        if req.params.max_tokens < 2:
            raise ValueError("max_tokens must be at least 2 with do_remote_prefill "
                             "(the prefill instance produced the first token)")

    def _validate_resumed(self, req: EngineRequest) -> None:
        """A resumed request: its tokens already generated elsewhere leave one to do here."""
        out = req.output_token_ids
        if isinstance(req.handoff, RemotePrefill):
            if out != [req.handoff.first_token_id]:  # the client has P's token: D goes on
                raise ValueError("a resumed request with a hand-off resumes after P's token")
        elif req.handoff is not None:
            raise ValueError("a resumed request takes no kv_transfer_params")
        if len(out) >= req.params.max_tokens:
            raise ValueError("a resumed request must leave at least one token to generate")
        bad = [t for t in out if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is out of the vocabulary (0..{self.vocab_size - 1})"
            )

    def add_request(self, req: EngineRequest) -> None:
        """Queue a request; raises ValueError (a message for the user) if it is invalid."""
        try:
            self.validate(req)
            grammar = self._request_grammar(req)
            prompt_images = PromptImages.build(
                req.prompt_token_ids, req.images, self.model_config.vision,
                self.model_config.hidden_size, self.args.cache.block_size)
        except ValueError:
            self._release_refused(req)
            raise
        request = Request(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            params=req.params,
            arrival_time=req.arrival_time,
            images=list(req.images),
        )
        request.output_token_ids = list(req.output_token_ids)  # resumed: recomputed first
        request.handoff = req.handoff  # the connector's to read
        if isinstance(req.handoff, RemotePrefill):  # D: pull P's KV, go on after its token
            request.output_token_ids = [req.handoff.first_token_id]
        request.grammar = grammar
        request.prompt_images = prompt_images
        if req.prefill_after is not None:  # n > 1: prefill the shared prompt once
            request.prefill_leader = self.requests.get(req.prefill_after)
        self.requests[req.request_id] = request
        self.scheduler.add(request)

    def _request_grammar(self, req: EngineRequest) -> RequestGrammar | None:
        """Structured output: its matcher, advanced past the output already known (on D,
        P's first token; resumed, what another instance generated)."""
        if req.params.grammar is None:
            return None
        known = list(req.output_token_ids)
        if isinstance(req.handoff, RemotePrefill):
            known = [req.handoff.first_token_id]
        return self._grammars.matcher(req.params.grammar, known)

    @functools.cached_property
    def _grammars(self) -> GrammarCompiler:
        """Built at the first request with a grammar: it needs the tokenizer's vocabulary."""
        from pdserve.models.loader import load_tokenizer

        tokenizer = load_tokenizer(self.args.tokenizer or self.args.model)
        return GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids)

    def _release_refused(self, req: EngineRequest) -> None:
        """On D: a refused request's prefilled KV will never be pulled; let P free it now
        rather than at its lease's expiry (best effort, off the engine thread)."""
        self.connector.request_refused(req.handoff)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored, but
        on P a finished prefill's held KV is released: its client (the router) left before
        reading its hand-off, so no decode instance will ever pull it."""
        request = self.requests.pop(request_id, None)
        if request is None:
            self.connector.revoke_lease(request_id)
            return
        request.status = RequestStatus.FINISHED_ABORTED
        self.loop.release(request)  # D, never pulled: P may free it now
        self._pending.append(self.output(request, [], None))

    def release_lease(self, request_id: str, lease_token: object) -> bool:
        """On P: free a held prefill's blocks now (e.g. a stop string ended it: no D will
        pull). False if no lease of that id is held or `lease_token` is not its capability;
        the blocks return at the next step."""
        return self.connector.release_lease(request_id, lease_token)

    # ---- one step ----------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return (bool(self.requests) or bool(self._pending)
                or bool(self.scheduler.aborted_pulls))

    @functools.cached_property
    def loop(self) -> StepLoop:
        """The step loop; its depth (steps in flight) is 1 with --async-scheduling, which is
        the default where it pays: a GPU, which can run ahead of the host."""
        wanted = self.args.async_scheduling
        if wanted is None:
            wanted = self.device.type == "cuda"
        return StepLoop(self, depth=1 if wanted else 0)

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample; return the deltas of requests that moved."""
        return self.loop.step()

    def take_pending_outputs(self) -> list[RequestOutput]:
        """Outputs produced outside a step (aborts), for the next step to return."""
        outputs, self._pending = self._pending, []
        return outputs

    def collect_transfers(self) -> None:
        """Free blocks the connector let go of; move requests whose pull finished on."""
        results, freed = self.connector.poll()
        if freed:
            self.pool.free(freed)
        for result in results:
            self.scheduler.finish_pull(result.request_id, result.ok)

    def close(self) -> None:
        """Stop the transfer agent, drop shared memory and stop tensor-parallel workers."""
        self.connector.close()
        self.caches.close()
        if self.tp_workers is not None:
            self.tp_workers.close()

    def check_stop(self, request: Request, token: int) -> None:
        """Mark a request finished if `token`, just appended, ends it."""
        p = request.params
        if request.grammar is not None and request.grammar.advance(token):
            request.status = RequestStatus.FINISHED_STOPPED  # the grammar is complete
        elif token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            request.status = RequestStatus.FINISHED_STOPPED
        elif len(request.output_token_ids) >= p.max_tokens:
            request.status = RequestStatus.FINISHED_LENGTH
        elif request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH

    def output(self, request: Request, tokens: list[int], logprob) -> RequestOutput:
        """The delta a step returns for `request`; with its times once it finished."""
        if tokens and not request.first_token_time:
            request.first_token_time = time.monotonic()
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=tokens,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            new_logprobs=[logprob] if logprob is not None else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            times=RequestTimes(request.arrival_time, request.scheduled_time,
                               request.first_token_time, time.monotonic(),
                               request.num_preemptions, request.num_pulled_tokens)
            if request.is_finished else None,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_total_blocks=self.num_blocks,
            num_free_blocks=self.pool.num_free_blocks,
            prefix_cache_queries=self.pool.cache_queries,
            prefix_cache_hits=self.pool.cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_pulling=len(self.scheduler.pulling),
            num_waiting_to_pull=sum(self.connector.matched_remote_tokens(r) > 0
                                    for r in self.scheduler.waiting),
            num_pulled_tokens=self.scheduler.num_pulled_tokens,
            num_leases=self.connector.num_leases(),
            kv_pulls_ok=self.connector.stats.pulls_ok,
            kv_pulls_failed=self.connector.stats.pulls_failed,
            kv_bytes_pulled=self.connector.stats.bytes_pulled,
            kv_pulls_by_transport=dict(self.connector.stats.pulls_by_transport),
            request_failures=self.request_failures,
            iteration_tokens=self.scheduler.iteration_tokens.copy(),
            kv_transfer_seconds=self.connector.stats.pull_seconds.copy(),
            compilations_after_ready=COMPILATIONS.after_ready(),
        )

    def generate(self, requests: list[EngineRequest]) -> dict[str, list[int]]:
        """Run requests to completion offline; returns the output token ids of each."""
        for req in requests:
            self.add_request(req)
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        while self.has_unfinished_requests():
            for out in self.step():
                tokens[out.request_id].extend(out.new_token_ids)
        return tokens
