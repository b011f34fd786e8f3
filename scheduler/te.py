"""The main process's handle on one TE process: start it, talk to it, notice its death.

A TE is a `flowserve.te_shell` process that its host's node agent started (`scaling/node.py`
on this host, `scaling/node_agent.py` on a Ray node): a fresh interpreter, a pre-warmed
one, or a fork of the warm template. It holds one end of a socket (a unix socketpair, or
TCP from another host); this side wraps the other end in asyncio streams. Commands go
out as `flowserve/protocol.py` frames (`Add`, `Abort`, `Stop`, `Ping`, `Threads`); a reader
task takes `Step` frames back, keeps the TE's latest `Stats` and routes each `TokenOut`
to its task's event queue. EOF on the socket means the process died, and so does silence
past the health bound (`fail`, called by the cluster's heartbeat): every task still on it
gets a clean error event at once. A prefill TE's task leaves it with `handoff` (its KV
went to a decode TE), and a decode TE's task is announced with `await_kv`. The handle
reports its steps, freed slots and death to the `TEObserver` it was built with (the cluster).
A TE that outlived the previous main process is taken back with `adopt` instead of `start`:
it reconnected to the TE listener and sent its `Ready` again.
"""
import asyncio
import logging
import time
from enum import Enum
from typing import Protocol

from flowserve.config import EngineConfig, TELaunch
from flowserve.protocol import (
    Abort, Add, Alive, BadFrame, Error, FinishReason, Message, Ping, Ready, Stats, Step, Stop, Threads, Unpin, expect,
    next_frame, pack, unpack_frames)
from scaling.hosts import Host
from scheduler.job import State, Task, TaskEvent

log = logging.getLogger("deepflow.te")


class TEState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


class TEObserver(Protocol):
    """What a TE handle reports to: each step (new stats, prefix-cache changes included; a
    slot may be free), aborted tasks (free slots), its death (its tasks have their errors)."""
    def on_step(self, te: "TEHandle") -> None: ...
    def on_free(self, te: "TEHandle") -> None: ...
    def on_death(self, te: "TEHandle") -> None: ...


class TEHandle:
    def __init__(self, te_id: str, group: str, engine_cfg: EngineConfig, host: Host, cost: int,
                 observer: TEObserver):
        self.id, self.group, self.observer = te_id, group, observer
        self.engine_cfg, self.host, self.cost = engine_cfg, host, cost
        self.threads = engine_cfg.num_threads
        self.state = TEState.STARTING
        self.pid: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.stats = Stats()
        self.timings_ms: dict[str, float] = {}
        self.max_model_len = 0
        self.tasks: dict[str, Task] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task | None = None
        self.start_mode = ""           # fork | preloaded | peer | cold
        self.fresh = False             # started as a new interpreter (not forked, not pre-warmed)
        self.retiring = False          # being scaled in: its exit is expected
        self.t_ready = 0.0
        self.weights_addr: str | None = None  # where this TE streams its weights (DistFlow)
        self.kv_addrs: list[str] = []         # a decode TE: where prefill TEs send KV (DistFlow)
        self.secret = b""                     # what it shows when it reconnects after a main-process restart
        self.adopted = False                  # taken back after a main-process restart (not started by this one)
        self.last_heard = time.monotonic()    # any frame: the heartbeat's evidence of life
        self.busy_s = 0.0                     # how long its current step has run, as its liveness thread said

    @property
    def load(self) -> int:
        """Tasks on this TE, counted here (not from its stats), so it is current at once."""
        return len(self.tasks)

    @property
    def batch_load(self) -> int:
        """Of `load`, the low-priority (batch) tasks, whose batch slots others may take."""
        return sum(t.params.low_priority for t in self.tasks.values())

    async def start(self, launch: TELaunch, weights_from: str | None = None, timeout: float = 300) -> Ready:
        """Have the host's node agent start the TE process (`weights_from`: a running TE to
        stream the weights from, for a pre-warmed one). Returns its `Ready` once it serves;
        records the five-step timeline (the cluster adds scaler_post)."""
        t0 = time.perf_counter()
        launched = await self.host.node.launch(self.id, self.engine_cfg, launch, weights_from)
        self.pid, self.proc, self.start_mode = launched.pid, launched.proc, launched.start_mode
        self.fresh = launched.fresh
        t_started = time.perf_counter()
        ready = await self._serve(launched.reader, launched.writer, launched.buf, timeout)
        te = ready.timings_ms
        # Scaler-Pre: spawning the interpreter, the template's fork round trip, or sending a
        # pre-warmed TE its model. TE-Pre-Load: for a fresh interpreter, its start-up and
        # imports, i.e. all the time before the load that the TE did not report (for a standby,
        # its `Load` on the way).
        gap = 1e3 * (self.t_ready - t_started) - te.te_load - te.te_post_load
        self.timings_ms = {"scaler_pre": 1e3 * (t_started - t0),
                           "te_pre_load": gap if self.fresh else max(gap, te.te_pre_load),
                           "te_load": te.te_load, "te_post_load": te.te_post_load}
        return ready

    async def adopt(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, buf: bytearray,
                    timeout: float = 5) -> Ready:
        """Take back a TE that outlived the previous main process and reconnected (its `Hello`
        checked by the TE listener): its `Ready` again says what it holds (the context caches
        it pins), and the first `Ping` tells it that it is adopted."""
        self.adopted = True
        ready = await self._serve(reader, writer, buf, timeout)
        self.pid = ready.pid
        self.ping()
        return ready

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, buf: bytearray,
                     timeout: float) -> Ready:
        """Wait for the TE's `Ready`, then serve: read its frames from now on."""
        self.writer = writer
        ready = expect(await asyncio.wait_for(next_frame(reader, buf), timeout), Ready)
        if ready is None:
            self.state = TEState.DEAD
            raise RuntimeError(f"TE {self.id} (pid {self.pid}) exited during start-up")
        self.t_ready = time.perf_counter()
        self.stats, self.max_model_len = ready.stats, ready.max_model_len
        self.weights_addr, self.kv_addrs, self.secret = ready.weights_addr, ready.kv_addrs, ready.secret
        self.state = TEState.READY
        self.last_heard = time.monotonic()
        self.reader_task = asyncio.create_task(self._read_loop(reader, buf))
        return ready

    async def _read_loop(self, reader: asyncio.StreamReader, buf: bytearray) -> None:
        try:
            while data := await reader.read(1 << 20):
                self.last_heard = time.monotonic()
                buf += data
                for msg in unpack_frames(buf):
                    self._on_frame(msg)
        except (ConnectionError, ValueError) as e:  # a reset, or a frame past MAX_FRAME: the stream is lost
            if self.state is TEState.READY:  # (a TE told to stop may reset a heartbeat it did not read)
                log.error("TE %s: bad stream: %s", self.id, e)
        self._on_exit()

    def _on_frame(self, msg: Message | BadFrame) -> None:
        match msg:
            case Step():
                self._on_step(msg)
            case Alive():
                self.busy_s = msg.busy_s
            case Error():
                log.error("TE %s answered: %s", self.id, msg.message)
            case _:  # undecodable, or not a TE's message: say so, keep serving
                log.error("TE %s: bad frame: %s", self.id, msg)
                self._send(Error(f"bad frame: {msg}"))

    def _on_step(self, msg: Step) -> None:
        self.stats = msg.stats
        for out in msg.outs:
            task = self.tasks.get(out.rid)
            if task is None:
                continue  # aborted here while the TE was still running it
            if out.finish:
                del self.tasks[out.rid]
            if out.finish is FinishReason.HANDOFF:  # its decode task carries on, on the decode TE
                task.placement["kv_transfer_ms"] = round(msg.kv_ms, 1)
                task.placement["kv_transfer_bytes"] = msg.kv_bytes
                continue
            # an error on a prefill TE: the KV transfer failed, not the request
            lost = out.finish is FinishReason.ERROR and task.decode is not None
            task.events.put_nowait(TaskEvent(out.token_ids, out.finish, out.num_cached, msg.error, engine_lost=lost,
                                             logprobs=out.logprobs, prompt_logprobs=out.prompt_logprobs))
        self.observer.on_step(self)

    def _on_exit(self, why: str = "stopped") -> None:
        if self.state is TEState.DEAD:
            return  # `fail` got here first
        was = self.state
        self.state = TEState.DEAD
        for task in self.tasks.values():
            task.events.put_nowait(TaskEvent([], FinishReason.ERROR, error=f"engine {self.id} {why}",
                                             engine_lost=True))
        self.tasks.clear()
        if was is not TEState.DRAINING:
            log.error("TE %s (pid %s) on %s %s", self.id, self.pid, self.host.name, why)
        self.observer.on_death(self)

    def fail(self, why: str) -> None:
        """Give the TE up now (it is silent past the health bound, or its host is gone): kill
        it if its node agent still can, close its socket, and settle its tasks."""
        self.kill()
        if self.reader_task:
            self.reader_task.cancel()
        if self.writer:
            self.writer.close()
        self._on_exit(why)

    def ping(self) -> None:
        self._send(Ping())

    def set_threads(self, n: int) -> None:
        """A starting TE keeps the count it was started with; the cluster re-balances once it is ready."""
        if n != self.threads and self.state is TEState.READY:
            self.threads = n
            self._send(Threads(n))

    def kv_addr_for(self, sender: Host) -> str:
        """Where a prefill TE on `sender` sends KV: shared memory on this TE's own host, else TCP."""
        if sender is self.host:
            return next((a for a in self.kv_addrs if a.startswith("unix:")), self.kv_addrs[0])
        return next(a for a in self.kv_addrs if a.startswith("tcp:"))

    def submit(self, task: Task, kv_to: str | None = None, kv_skip: int = 0) -> None:
        """Run `task` here; with `kv_to`, only its prefill, then send its KV to that decode TE,
        but for the `kv_skip` leading blocks it caches. On a decode TE the task waits for its KV."""
        self.tasks[task.id] = task
        task.te_id, task.state = self.id, State.RUNNING
        self._send(Add(task.id, task.prompt_ids, task.params, kv_to, kv_to and task.decode.id, kv_skip,
                       await_kv=self.group == "decode", cache_id=task.cache_id, pin=task.pin, adapter=task.adapter))

    def unpin(self, cache_ids: list[str]) -> None:
        self._send(Unpin(cache_ids))

    def abort(self, task_ids: list[str]) -> None:
        ids = [t for t in task_ids if self.tasks.pop(t, None) is not None]
        if ids:
            self._send(Abort(ids))
            self.observer.on_free(self)

    def _send(self, msg: Message) -> None:
        if self.state in (TEState.READY, TEState.DRAINING) and not self.writer.is_closing():
            self.writer.write(pack(msg))

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the TE to exit; kill it if it does not. Returns once its socket is closed."""
        if self.pid is None:
            return
        self._send(Stop())
        self.state = TEState.DRAINING if self.state is not TEState.DEAD else self.state
        try:  # EOF on the socket: the process has exited (a forked TE is the template's child)
            await asyncio.wait_for(asyncio.shield(self.reader_task or self._wait_proc()), timeout)
        except TimeoutError:
            self.kill()
        if self.reader_task:
            await self.reader_task
        if self.proc:
            await self.proc.wait()

    async def _wait_proc(self) -> None:
        if self.proc:
            await self.proc.wait()

    def kill(self) -> None:
        if self.pid is not None:
            self.host.node.kill(self.pid)

    def to_dict(self) -> dict:
        s = self.stats
        return {"id": self.id, "group": self.group, "host": self.host.name, "pid": self.pid, "state": self.state.value,
                "threads": s.threads, "running": s.running, "waiting": s.waiting, "tasks": self.load,
                "start_mode": self.start_mode, "fresh_interpreter": self.fresh, "adopted": self.adopted,
                "kv_usage": s.kv_usage, "kv_blocks_total": s.kv_blocks_total, "pinned_blocks": s.pinned_blocks,
                "prefix_queries": s.prefix_queries, "prefix_hits": s.prefix_hits,
                "lora_slots": s.lora_slots, "lora_disk_loads": s.lora_disk_loads,
                "lora_slot_loads": s.lora_slot_loads, "lora_slot_load_ms": round(s.lora_slot_load_ms, 1),
                "busy_s": round(self.busy_s, 1), "weights_addr": self.weights_addr, "kv_addrs": self.kv_addrs,
                "timeline_ms": self.timings_ms}
