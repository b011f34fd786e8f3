"""The local backend's node agent: starts TEs on the main process's own host.

Each TE gets a fresh socketpair with the main process, and comes from one of three places
(`--start-mode`): forked from the warm template (`scaling/template.py`, restarted here if
it dies), a standby forked ahead of time first; a pre-warmed process told to `Load`, from
the mmap'ed cache (`preloaded`) or streamed from a running TE (`peer`); both from the pool
(`scaling/prewarm.py`); or a fresh interpreter (`cold`, and the fallback while the
template is down or the pool is empty). `scaling/node_agent.py` is the same role on a Ray
node, where the TE's socket is TCP. `local_host` is this machine as a cluster's one host,
with such a node agent.
"""
import asyncio
import contextlib
import logging
import os
import signal
import socket

from flowserve.config import EngineConfig, TELaunch
from flowserve.protocol import Load, pack
from scaling.hosts import Host, probe, secret_env
from scaling.launch import Launched, TemplateHandle, fork_or_spawn, spawn_trainer
from scaling.prewarm import PrewarmPool

log = logging.getLogger("deepflow.node")


class LocalNode:
    def __init__(self, model_path: str, start_mode: str = "fork", prewarmed: int = 1,
                 pool_cfg: EngineConfig | None = None, env: dict | None = None):
        self.model_path, self.start_mode, self.env = model_path, start_mode, env or {}
        self.template: TemplateHandle | None = None
        self.pool = PrewarmPool(prewarmed, pool_cfg or EngineConfig(), self.env,
                                template=(lambda: self.template) if start_mode == "fork" else None) \
            if start_mode != "cold" else None
        self.closing = self.evicted = False
        self._stopping: asyncio.Task | None = None

    async def start(self) -> None:
        if self.start_mode == "fork":
            await self._start_template()
        if self.pool:
            self.pool.fill()
            await self.pool.wait_filled()

    async def _start_template(self) -> None:
        self.template = TemplateHandle(self.model_path, {**self.env, "OMP_NUM_THREADS": "1"},
                                       on_death=self._on_template_death)
        await self.template.start()

    def _on_template_death(self) -> None:
        if not (self.closing or self.evicted):  # running TEs are separate processes and keep serving
            asyncio.create_task(self._start_template())

    def evict(self) -> None:
        """Another base model needs this DRAM: the warm template exits (the next launch starts it again)."""
        if self.template:
            self.pool.resize(0)  # standbys forked from it hold its pages too
            self.evicted = True
            self._stopping = asyncio.create_task(self.template.stop())
            self.template = None

    async def launch(self, te_id: str, cfg: EngineConfig, launch: TELaunch, weights_from: str | None) -> Launched:
        """Start one TE process; it is not serving yet (the caller waits for its `Ready`)."""
        # a standby holds the packed linears of a TP size 1 TE
        if self.pool and (cfg.tensor_parallel_size == 1 or self.start_mode != "fork") and (te := self.pool.take()):
            te.writer.write(pack(Load(self.model_path, cfg, launch, weights_from)))
            te.start_mode = "peer" if weights_from else te.start_mode
            return te
        if self.evicted:  # back in DRAM first: the page cache may still hold the weights' file
            self.evicted = False
            await self._start_template()
        ours, theirs = socket.socketpair()
        with theirs:
            pid, mode, proc = await fork_or_spawn(self.template, te_id, cfg, launch, theirs, self.model_path, self.env)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        return Launched(reader, writer, bytearray(), pid, mode, proc, fresh=proc is not None)

    async def launch_training(self, job_dir: str, threads: int) -> asyncio.subprocess.Process:
        """Start a training task here (scheduler/fine_tuning.py: the cluster counted its memory)."""
        return await spawn_trainer(job_dir, threads, self.env)

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def kill_stale(self, pid: int) -> None:
        """A TE of a previous main process that did not come back to this one (frozen, or past
        its grace): kill it, if that pid is still a TE (a TE-shell, or a fork of a template)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            return
        if b"flowserve.te_shell" in cmdline or b"scaling.template" in cmdline:
            self.kill(pid)

    async def stop(self) -> None:
        self.closing = True
        if self.template:
            await self.template.stop()
        if self.pool:
            await self.pool.stop()

    def to_dict(self) -> dict:
        return {"template_pid": self.template.proc.pid if self.template and self.template.alive else None,
                "prewarmed_ready": len(self.pool.ready) if self.pool else 0,
                "prewarmed_target": self.pool.size if self.pool else 0}


def local_host(model_path: str, start_mode: str = "fork", prewarmed: int = 1,
               pool_cfg: EngineConfig | None = None, machine: list[Host] | None = None, model: str = "",
               env: dict | None = None) -> Host:
    """This machine as a deployment's one host for `model_path` (served as `model`), its TEs
    sharing a DistFlow secret (`env`, else a new one); `machine`: the hosts other base models
    already have here (it joins them)."""
    return Host("local", "127.0.0.1", **probe(),
                node=LocalNode(model_path, start_mode, prewarmed, pool_cfg, env or secret_env()),
                machine=machine if machine is not None else [], model=model)
