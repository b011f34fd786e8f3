"""Tensor parallelism, the master's side: a model runner over N executor processes (PAPER.md
section 2: FlowServe's master makes the decisions, one SPMD executor per device runs them).

A TE with `tensor_parallel_size` N > 1 is a master and N executors (`flowserve/executor.py`).
The master is the TE process (TE-shell, engine loop, batcher, RTC, sampler) and holds no
shard: every rank is an executor, so the ranks run one code path, and the master's loop
(socket I/O, scheduling, sampling) runs beside them, not inside rank 0's forward.
`TPRunner` has `ModelRunner`'s interface, and each call becomes one command to all
executors, answered by each with `ExecDone`:
- `run`: the step's plan (`flowserve.model.plan_step`: plain lists in one msgspec frame, no
  pickle) goes to every executor; each runs the forward on its shard, all-reducing its
  partial sums with its peers over torch.distributed, and writes its vocabulary slice of
  the logits rows into the arena (a memfd they all map); the master samples from the whole
  rows there.
- `load_lora`: a LoRA adapter into a slot; each executor reads it from its path and keeps
  its shard (`flowserve.model.shard_lora`); a step's plan says which rows use which slot.
- `read_kv` / `write_kv` (PD): one layer of a request's KV through the arena, each rank its
  KV heads' slice, so a payload is the same whatever the TP size at either end: each rank's
  heads land on the decode TE's rank that holds them.

Executors come from a fork of the master when it is a TE-shell (`fork=True`), which has run
no multi-threaded torch op (a fork of the warm template, a pre-warmed process, a fresh
interpreter that loaded on one thread): they share its weights' pages, and the packed
linears of their shards that the template made. A process that may have run one (a library
user, the tests) spawns them as fresh interpreters that map the model's cache: a child
forked after an OpenMP pool started hangs.

Death: an executor that dies closes its link. In a step the master raises `ExecutorLost`
(also after STEP_TIMEOUT_S without an answer, though the main process's heartbeat ends a
frozen TE first); between steps the TE-shell watches the executors' pidfds. Either way the
TE exits and the main process replaces it (its TE-death path). Executors die with their
master (PR_SET_PDEATHSIG) and exit at EOF on their link.
"""
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import msgspec
import torch

from flowserve.sequence import Sequence
from flowserve.config import EngineConfig, ModelConfig, check_tensor_parallel
from flowserve.executor import Arena, forked_main
from flowserve.model import num_kv_blocks, plan_step
from flowserve.lora_slots import LoraWeights
from flowserve.protocol import (Adapter, ExecDone, ExecKV, ExecLora, ExecStart, ExecStep, Message, Threads, expect,
                                pack, recv_frame)

log = logging.getLogger("flowserve.tp")
ROOT = Path(__file__).resolve().parent.parent
# An executor silent this long froze: no step takes it (a 2048-token prefill at TP=3 on 2 busy cores: 14 s)
STEP_TIMEOUT_S = 120


class ExecutorLost(ConnectionError):
    """An executor died or froze: its TE cannot go on."""


class TPRunner:
    def __init__(self, mcfg: ModelConfig, ecfg: EngineConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 model_path: str | None, packed: list[dict[str, torch.Tensor] | None] | None = None,
                 fork: bool = False):
        """`weights`: the whole model's (a TE serves them to new TEs); `packed`: each rank's
        packed linears, made by the warm template; `fork`: see the module docstring (else
        the executors are spawned and map `model_path`)."""
        check_tensor_parallel(mcfg, ecfg.tensor_parallel_size)
        if not fork and model_path is None:
            raise ValueError("spawned TP executors map the model's weights themselves: give its path")
        self.world = n = ecfg.tensor_parallel_size
        self.mcfg, self.block_size, self.weights = mcfg, ecfg.block_size, weights
        self.packed = [p for p in packed or [] if p]  # pages its forked executors share
        self.num_blocks = num_kv_blocks(mcfg, ecfg, dtype)
        # the longest request's KV, one layer at a time, is the most the arena carries
        max_rows, max_blocks = ecfg.max_num_seqs, min(self.num_blocks, -(-mcfg.max_position // ecfg.block_size))
        arena_fd = os.memfd_create("deepflow-tp-arena", 0)
        os.ftruncate(arena_fd, Arena.nbytes(mcfg, max_rows, max_blocks, ecfg.block_size, dtype))
        self.arena = Arena(arena_fd, mcfg, max_rows, max_blocks, ecfg.block_size, dtype)
        store = socket.create_server(("127.0.0.1", 0))  # the rendezvous: rank 0 serves it on this socket
        start = ExecStart(0, n, os.getpid(), store.getsockname()[1], -1, arena_fd, max_rows, max_blocks,
                          max(1, (ecfg.num_threads or len(os.sched_getaffinity(0))) // n),
                          replace(ecfg, num_kv_blocks=self.num_blocks), str(dtype).removeprefix("torch."),
                          None if fork else model_path)
        self.links: list[socket.socket] = []
        self.bufs: list[bytearray] = []
        self.procs: list[subprocess.Popen] = []
        self.pids: list[int] = []
        self.pidfds: list[int] = []  # readable once that executor has exited (the TE-shell watches them)
        # DistFlow's link threads read KV while the engine steps: one command at a time on the links
        self.lock = threading.RLock()
        try:
            for rank in range(n):
                ours, theirs = socket.socketpair()
                self.links.append(ours)
                self.bufs.append(bytearray())
                fds = {theirs.fileno(), arena_fd} | ({store.fileno()} if rank == 0 else set())
                if fork:
                    pid = os.fork()
                    if pid == 0:
                        forked_main(theirs, fds, (mcfg, weights), packed[rank] if packed else None)
                else:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, "-m", "flowserve.executor", "--fd", str(theirs.fileno()),
                         "--log-level", logging.getLevelName(logging.getLogger().level).lower()],
                        pass_fds=sorted(fds), cwd=ROOT))
                    pid = self.procs[-1].pid
                self.pids.append(pid)
                self.pidfds.append(os.pidfd_open(pid))
                theirs.close()
                ours.settimeout(STEP_TIMEOUT_S)
                store_fd = store.fileno() if rank == 0 else -1
                ours.sendall(pack(msgspec.structs.replace(start, rank=rank, store_fd=store_fd)))
            self.wait()  # each has joined the group and built its shard
        except BaseException:
            self.close()
            raise
        finally:
            store.close()
            os.close(arena_fd)  # the mappings keep the memory
        log.info("TP: %d executors (pids %s), %s", n, self.pids, "forked" if fork else "spawned")

    # ------------------------------------------------------------------ ModelRunner's interface

    def run(self, step: list[tuple[Sequence, int]], in_flight: tuple[list[Sequence], torch.Tensor] | None = None,
            on_layer: Callable[[int], None] | None = None) -> tuple[torch.Tensor, list[Sequence]]:
        """Forward one step on the executors. Returns the logits rows (a view of the arena,
        valid until the next command) and the sequences they belong to. `on_layer` (PD layer
        by layer) runs for every layer once the step is done: the layers are sent after the
        forward, not during it."""
        plan, sampled, pending = plan_step(step, self.block_size, in_flight and in_flight[0])
        if pending:  # async scheduling: the master samples on the host, so those tokens are here
            tokens = in_flight[1].tolist()
            for row, src in pending:
                plan.input_ids[row] = tokens[src]
        self.command(ExecStep(plan))
        if on_layer is not None:
            for layer in range(self.mcfg.num_layers):
                on_layer(layer)
        return self.arena.logits[:len(sampled)], sampled

    def load_lora(self, slot: int, adapter: Adapter, weights: LoraWeights) -> None:
        """As `ModelRunner.load_lora`: each executor reads the adapter from its path and keeps
        its shard (B split for column-parallel linears, A for row-parallel ones)."""
        self.command(ExecLora(slot, adapter))

    def kv_shape(self, num_blocks: int) -> list[int]:
        """As `ModelRunner.kv_shape`, every rank's KV heads: [layers, K/V, heads, blocks, block, dim]."""
        m = self.mcfg
        return [m.num_layers, 2, m.num_kv_heads, num_blocks, self.block_size, m.head_dim]

    def read_kv(self, block_ids: list[int], out: torch.Tensor, layer: int) -> None:
        """As `ModelRunner.read_kv`: each executor puts its heads' slice in the arena, then one
        copy. Thread-safe: DistFlow calls it from its link threads."""
        with self.lock:
            self.command(ExecKV(block_ids, layer, write=False))
            out[layer].copy_(self.arena.kv(len(block_ids)))

    def write_kv(self, block_ids: list[int], kv_in: torch.Tensor, layer: int) -> None:
        """As `ModelRunner.write_kv`: one copy into the arena, then each executor takes its heads."""
        with self.lock:
            self.arena.kv(len(block_ids)).copy_(kv_in[layer])
            self.command(ExecKV(block_ids, layer, write=True))

    # ------------------------------------------------------------------ the executors

    def set_threads(self, n: int) -> None:
        """The TE's `n` threads, shared by its executors (the master only samples)."""
        with self.lock:
            self.send(Threads(max(1, n // self.world)))

    def command(self, msg: Message) -> None:
        with self.lock:
            self.send(msg)
            self.wait()

    def send(self, msg: Message) -> None:
        frame = pack(msg)
        for rank, link in enumerate(self.links):
            try:
                link.sendall(frame)
            except OSError as e:
                raise ExecutorLost(f"executor {rank} (pid {self.pids[rank]}) is gone: {e}") from e

    def wait(self) -> None:
        """Every executor's `ExecDone` for the last command."""
        for rank, (link, buf) in enumerate(zip(self.links, self.bufs)):
            try:
                done = expect(recv_frame(link, buf), ExecDone)
            except TimeoutError as e:
                raise ExecutorLost(f"executor {rank} (pid {self.pids[rank]}) answered nothing for "
                                   f"{STEP_TIMEOUT_S} s") from e
            except OSError as e:
                done = None
                log.error("executor %d: %s", rank, e)
            if done is None:
                raise ExecutorLost(f"executor {rank} (pid {self.pids[rank]}) died")

    def close(self, timeout: float = 10) -> None:
        """Stop the executors (EOF on their links) and reap them; kill one still there after `timeout`."""
        for fd in self.pidfds:
            os.close(fd)
        self.pidfds = []
        for link in self.links:
            link.close()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        forked = [] if self.procs else list(self.pids)
        while forked:
            if time.monotonic() > deadline:
                for pid in forked:
                    os.kill(pid, signal.SIGKILL)
            forked = [pid for pid in forked if os.waitpid(pid, os.WNOHANG)[0] == 0]
            time.sleep(0.01)
