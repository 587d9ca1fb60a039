"""Tensor-parallel model runner: rank 0 in the engine process, ranks 1..N-1 in worker processes.

Each rank holds its shard of the weights and its slice of the KV heads, and runs the same
forward; the model's all-reduces and the LM head's all-gather meet in the default process
group (NCCL on CUDA, gloo on CPU). Rank 0 builds a step's inputs once and pipes them to the
workers (`tp.pack_step`); only rank 0's logits are used.

Lifecycle: `TPWorkers.start` spawns the workers, which load their shards while the engine
loads rank 0's; `connect` joins the group; `TPModelRunner` gives the workers their caches
(and captures CUDA graphs on every rank, in the same order); `close` stops them. A worker
exits when its pipe from rank 0 closes or its parent disappears; rank 0 raises
`TPWorkerError` naming the rank when a worker dies.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from pdserve.cpu_heap import keep_cpu_heap
from pdserve.engine.batch_inputs import InputBuilder
from pdserve.engine.cuda_graphs import DecodeGraphs
from pdserve.engine.kv_caches import KVCaches, allocate_worker_caches
from pdserve.engine.runner import ModelRunner, forward_step, profile_peak_activation_bytes
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.tp import (
    NCCL_SAFE_ENV,
    TPSpec,
    broadcast_ids,
    ids_follow,
    join_group,
    make_store,
    pack_step,
    unpack_step,
)
from pdserve.lifecycle import exit_with_parent
from pdserve.models.layers import build_rope_tables

if TYPE_CHECKING:
    from pdserve.engine.step_loop import PendingIds

log = logging.getLogger(__name__)


class TPWorkerError(RuntimeError):
    """A tensor-parallel worker died, failed or stopped answering; the engine cannot go on."""


@dataclass
class CacheSpec:
    """What a worker needs to allocate its KV caches and capture its graphs like rank 0."""

    cache_shape: tuple[int, ...]  # one layer's cache on this rank (same on every rank)
    num_layers: int
    max_seqs: int
    max_blocks_per_seq: int
    max_model_len: int
    use_cuda_graphs: bool
    shared: list[dict | None] | None = None  # KVCaches.worker_plan: P/D, rank 0 maps them all

    def allocate(self, rank: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[list[torch.Tensor], list[dict] | None]:
        """This worker's caches, and their CUDA IPC export when rank 0 must map them."""
        return allocate_worker_caches(self.shared, rank, self.cache_shape, self.num_layers,
                                      dtype, device)


# ---- rank 0 ---------------------------------------------------------------------------------


class TPWorkers:
    """Rank 0's handle on ranks 1..N-1: spawn, command, watch, stop."""

    def __init__(self, spec: TPSpec, procs: list, conns: list, store) -> None:
        self.spec = spec
        self.procs = procs  # procs[i] is rank i + 1
        self.conns = conns
        self.store = store
        self.connected = False
        self.closing = False
        threading.Thread(target=self._watch, daemon=True, name="tp-watchdog").start()
        atexit.register(self.close)

    @classmethod
    def start(cls, spec: TPSpec) -> TPWorkers:
        """Spawn ranks 1..N-1; they load their shards in the background. Returns at once."""
        os.environ.update(NCCL_SAFE_ENV)  # rank 0 and (inherited) the workers
        store = make_store(spec.tp_size, spec.timeout_s)
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA state
        procs, conns = [], []
        for rank in range(1, spec.tp_size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(spec, rank, store.port, theirs),
                               name=f"pdserve-tp{rank}", daemon=True)
            proc.start()
            theirs.close()  # the worker's end lives in the worker only: EOF when we die
            procs.append(proc)
            conns.append(ours)
        return cls(spec, procs, conns, store)

    def connect(self) -> None:
        """Wait until every worker loaded its shard, then join the process group as rank 0."""
        if self.connected:
            return
        self.gather("loading its shard")
        self.send("connect")
        join_group(self.spec, 0, self.store.port, self.store)
        self.connected = True

    def send(self, command: str, arg: object = None) -> None:
        """Send a command to every worker; raises TPWorkerError if one is gone."""
        self.check_alive()
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send((command, arg))
            except (BrokenPipeError, ConnectionError, EOFError) as exc:
                raise self.failure(f"could not send {command!r} to rank {rank}") from exc

    def gather(self, what: str) -> list:
        """Each worker's answer to the last command (in rank order), waiting while they live."""
        answers = []
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            while not conn.poll(0.1):  # short polls so that a dead worker is noticed
                if not proc.is_alive():
                    raise self.failure(f"rank {rank} exited while {what}")
            answers.append(self._answer(rank, conn, what))
        return answers

    def _answer(self, rank: int, conn, what: str) -> object:
        try:
            kind, value = conn.recv()
        except (EOFError, ConnectionError) as exc:
            raise self.failure(f"rank {rank} exited while {what}") from exc
        if kind == "error":
            raise TPWorkerError(f"tensor-parallel rank {rank} failed while {what}:\n{value}")
        return value

    def check_alive(self) -> None:
        """Raise TPWorkerError if any worker has exited (a waitpid per worker: microseconds)."""
        if any(proc.exitcode is not None for proc in self.procs):
            raise self.failure("a worker is gone")

    def failure(self, context: str, wait_s: float = 1.0) -> TPWorkerError:
        """The error to raise: which ranks died, with what exit code, and their last words."""
        # a collective fails a moment before the dead peer can be reaped: give it a second
        ready = mpc.wait([proc.sentinel for proc in self.procs], timeout=wait_s)
        for proc in self.procs:
            if proc.sentinel in ready:
                proc.join(1)
        lines = [f"tensor-parallel worker failure ({context})"]
        if all(proc.exitcode is None for proc in self.procs):
            lines.append("every worker is still running: a hung one times a collective out")
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            if proc.exitcode is None:
                continue
            lines.append(f"rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")
            try:
                while conn.poll(0):
                    kind, value = conn.recv()
                    if kind == "error":
                        lines.append(f"rank {rank} said:\n{value}")
            except (EOFError, OSError):
                pass
        return TPWorkerError("\n".join(lines))

    def _watch(self) -> None:
        # NCCL waits out its whole timeout on a dead peer: abort the group at once instead
        ready = mpc.wait([proc.sentinel for proc in self.procs])
        if self.closing:
            return
        # no join here: two threads reaping one child race, and one of them reads no exit code
        dead = [f"rank {r} (pid {p.pid})" for r, p in enumerate(self.procs, start=1)
                if p.sentinel in ready]
        log.error("tensor-parallel worker exited: %s", ", ".join(dead))
        if self.spec.backend == "nccl" and dist.is_initialized():
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception:  # best effort: the collective's own timeout still applies
                log.exception("could not abort the NCCL process group")

    def profile(self, model: torch.nn.Module, num_tokens: int, num_seqs: int, block_size: int,
                kv_shape_per_block: tuple, dtype: torch.dtype, device: torch.device,
                max_seq_len: int | None = None) -> int:
        """`profile_peak_activation_bytes` on every rank at once (its all-reduces need them
        all); returns the largest peak of the ranks."""
        self.connect()
        self.send("profile", (num_tokens, num_seqs, block_size, kv_shape_per_block, max_seq_len))
        ours = profile_peak_activation_bytes(model, num_tokens, num_seqs, block_size,
                                             kv_shape_per_block, dtype, device, max_seq_len)
        return max([ours, *self.gather("profiling")])

    def close(self) -> None:
        """Stop every worker (politely, then by force) and leave the process group."""
        if self.closing:
            return
        self.closing = True
        atexit.unregister(self.close)
        for conn in self.conns:
            try:
                conn.send(("stop", None))
            except (OSError, EOFError):
                pass  # already gone
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()
        if self.connected and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a group broken by a dead rank may refuse a clean exit
                log.warning("destroying the tensor-parallel process group failed", exc_info=True)
        self.connected = False


class TPModelRunner:
    """`ModelRunner`'s interface over `tp_size` ranks; `execute` returns rank 0's logits."""

    def __init__(self, workers: TPWorkers, model: torch.nn.Module, caches: KVCaches,
                 block_size: int, device: torch.device, max_tokens: int, max_seqs: int,
                 max_model_len: int, use_cuda_graphs: bool = False):
        """Gives every worker its part of `caches` (KVCaches.worker_plan) and maps back the
        caches GPU workers export, so that `caches` holds every rank's."""
        workers.connect()
        self.workers = workers
        use_graphs = use_cuda_graphs and device.type == "cuda"
        kv_caches = caches.local
        workers.send("caches", CacheSpec(
            cache_shape=tuple(kv_caches[0].shape), num_layers=len(kv_caches), max_seqs=max_seqs,
            max_blocks_per_seq=(max_model_len + block_size - 1) // block_size,
            max_model_len=max_model_len, use_cuda_graphs=use_graphs,
            shared=caches.worker_plan()))
        try:  # rank 0 captures its graphs while the workers capture theirs
            self.local = ModelRunner(model, kv_caches, block_size, device, max_tokens, max_seqs,
                                     max_model_len, use_cuda_graphs=use_graphs)
        except Exception as exc:
            raise self._explain(exc) from exc
        exports: list[list[dict] | None] = workers.gather("allocating caches")
        caches.adopt_exports(exports, [workers.spec.device(rank)
                                       for rank in range(1, workers.spec.tp_size)])
        self.model, self.kv_caches, self.device = model, kv_caches, device

    @property
    def inputs(self) -> InputBuilder:
        return self.local.inputs

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> torch.Tensor:
        """Forward every scheduled token on every rank; logits [num_sampling, vocab] (float32)."""
        return self.launch(step, self.local.inputs, None)

    @torch.inference_mode()
    def launch(self, step: SchedulerOutput, builder: InputBuilder,
               pending: PendingIds | None) -> torch.Tensor:
        """`execute` with the inputs staged in `builder`; input ids the host does not know
        yet (async scheduling) are copied in on rank 0's device and broadcast to the ranks."""
        x = builder.build(step)
        self.workers.send("step", pack_step(builder, x, ids_follow=pending is not None))
        try:
            if pending is not None:
                pending.apply(x)
                broadcast_ids(x)
            return forward_step(self.model, self.kv_caches, self.local.graphs, x)
        except Exception as exc:
            raise self._explain(exc) from exc

    def _explain(self, exc: Exception) -> Exception:
        # a collective fails when a peer died or hung: say which
        if isinstance(exc, TPWorkerError):
            return exc
        return self.workers.failure(f"a collective failed on rank 0: {exc}")

    def close(self) -> None:
        """Stop the workers; the runner is unusable afterwards."""
        self.workers.close()


# ---- ranks 1..N-1 ---------------------------------------------------------------------------


def _worker_main(spec: TPSpec, rank: int, port: int, conn) -> None:
    """A worker's life: load the shard, join the group, then run commands until stopped."""
    os.environ.update(NCCL_SAFE_ENV)
    # Ctrl-C and a group's SIGTERM are rank 0's to handle (after its server drains): it stops
    # us. The pipe's EOF only reaches a worker waiting on it; the watch catches one busy
    # elsewhere the moment rank 0's process dies
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent()
    if spec.device_type == "cpu":
        torch.set_num_threads(spec.cpu_threads)
        keep_cpu_heap()
    try:
        from pdserve.models.loader import load_model  # heavy: import in the worker only

        device = spec.device(rank)
        if spec.device_type == "cuda":
            torch.cuda.set_device(device)
        loaded = load_model(spec.model, spec.dtype, device, tp_rank=rank, tp_size=spec.tp_size,
                            seed=spec.seed)
        model = loaded.model
        positions = spec.max_model_len or loaded.config.max_position_embeddings
        build_rope_tables(model, positions, spec.dtype)  # as Engine.__init__ does rank 0's
        conn.send(("ok", None))
        _serve(spec, rank, port, conn, model, device)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        os._exit(0)  # rank 0 is gone: nothing to tear down politely
    except BaseException:
        text = traceback.format_exc()
        try:
            conn.send(("error", text))
        except OSError:
            pass
        print(f"pdserve tensor-parallel rank {rank} failed:\n{text}", flush=True)
        os._exit(1)  # skip atexit and process-group teardown: the group may be broken
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.inference_mode()
def _serve(spec: TPSpec, rank: int, port: int, conn, model: torch.nn.Module,
           device: torch.device) -> None:
    kv_caches: list[torch.Tensor] = []
    graphs: DecodeGraphs | None = None
    while True:
        command, arg = conn.recv()  # blocks while the engine is idle; EOF when rank 0 dies
        if command == "step":
            assert isinstance(arg, np.ndarray)
            x = unpack_step(arg, device)
            if ids_follow(arg):
                broadcast_ids(x)
            forward_step(model, kv_caches, graphs, x)
        elif command == "connect":
            join_group(spec, rank, port)
        elif command == "profile":
            tokens, seqs, block_size, shape, max_seq_len = arg
            conn.send(("ok", profile_peak_activation_bytes(model, tokens, seqs, block_size,
                                                           shape, spec.dtype, device,
                                                           max_seq_len)))
        elif command == "caches":
            kv_caches, export = arg.allocate(rank, spec.dtype, device)
            if arg.use_cuda_graphs:  # captured in the same order as rank 0's: their NCCL calls pair
                graphs = DecodeGraphs(model, kv_caches, arg.max_seqs, arg.max_blocks_per_seq,
                                      arg.max_model_len, device)
                graphs.capture()
            conn.send(("ok", export))
        elif command == "stop":
            return
        else:
            raise ValueError(f"unknown tensor-parallel command {command!r}")
