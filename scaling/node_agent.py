"""The node agent: one Ray actor per Ray node (`--backend ray`), pinned to it, reserving no CPUs.

It owns its host's TE processes, as plain subprocesses, per `--start-mode`: the warm
template (`fork`; `scaling/template.py`, which maps the model's cache, or receives the
weights from a running TE of another host when this host's DRAM holds none), a pool of
pre-warmed TE-shells (`preloaded`, `peer`; `scaling/prewarm.py`), and fresh spawns (`cold`,
and the fallback). Fork happens only inside the template, never here: a Ray worker runs
gRPC threads, which make fork unsafe.

To start a TE, the agent opens a TCP connection to the main process's TE listener
(`scaling/ray_backend.py`), sends `Hello` with the secret the main process gave it for this
TE, and hands that socket (SCM_RIGHTS) to the template's fork, to a pre-warmed TE-shell
with its `Load`, or to a fresh TE-shell: from then on the TE talks to the main process
directly, with the project's own frames. Ray carries only these calls (start, launch,
kill, ping, reap): never per-step traffic, never KV or weights.

An agent started on a node that had lost its host (its agent died, its link was cut) first
`reap`s what its predecessor left there: a TE cut off from the main process may still run.

With an adoption grace (`serve --adopt-grace-s`) the agent is a detached actor: it outlives
the main process with its template and TEs, and a restarted main process finds it again by
name (`scaling/ray_backend.py`). Without the main process's ping for the grace, it stops
them all and exits, as it would have died with the main process.
"""
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time

from flowserve.config import TELaunch, weights_cache_path
from flowserve.protocol import Hello, Load, decode_config, dial_main, pack
from scaling.hosts import probe
from scaling.launch import TemplateHandle, fork_or_spawn
from scaling.prewarm import PrewarmPool

log = logging.getLogger("deepflow.node_agent")


class NodeAgent:
    def __init__(self, model_path: str, python: str, env: dict, start_mode: str, prewarmed: int, pool_config: str,
                 grace_s: float = 0.0):
        """`python`: the project's interpreter (inside a Ray worker, sys.executable is Ray's
        choice); `env`: added to its TE processes' environment (the cluster's DistFlow secret);
        `prewarmed`, `pool_config`: the pool's size and engine config (`preloaded`, `peer`);
        `grace_s`: how long it outlives the main process (its pings)."""
        self.model_path, self.python, self.env, self.start_mode = model_path, python, env, start_mode
        self.template: TemplateHandle | None = None
        self.pool = PrewarmPool(prewarmed, decode_config(pool_config), env, python) \
            if start_mode in ("preloaded", "peer") else None
        self.procs: dict[int, object] = {}   # pid -> its process handle (cold spawns) or None (forks)
        self.grace_s, self.last_ping, self.started = grace_s, time.monotonic(), False

    def probe(self) -> dict:
        """This host's cores, memory for TEs, agent pid, and whether its DRAM cache holds the weights."""
        try:
            has_weights = weights_cache_path(self.model_path).exists()
        except OSError:
            has_weights = False
        return {**probe(), "pid": os.getpid(), "has_weights": has_weights, "started": self.started,
                "template_pid": self.template.proc.pid if self.template and self.template.alive else None}

    async def start(self, weights_from: str | None) -> int | None:
        """Start the template (`fork`; returns its pid) or fill the pre-warmed pool."""
        self.started = True
        if self.grace_s:
            asyncio.create_task(self._watchdog())
        if self.pool:
            self.pool.fill()
            await self.pool.wait_filled()
        if self.start_mode != "fork":
            return None
        self.template = TemplateHandle(self.model_path, {**self.env, "OMP_NUM_THREADS": "1"}, self.python,
                                       weights_from)
        await self.template.start()
        return self.template.proc.pid

    async def launch(self, te_id: str, engine_config: str, te_launch: str, main_address: str, secret: bytes,
                     weights_from: str | None) -> tuple[int, str, bool]:
        """Start a TE connected to the main process; returns its pid, how it started, and
        whether it is a fresh interpreter (its imports then count in its start-up).
        `weights_from`: a running TE to stream the weights from (a pre-warmed TE, `peer`)."""
        cfg, launch = decode_config(engine_config), decode_config(te_launch, TELaunch)
        sock = dial_main(main_address)
        with sock:
            sock.sendall(pack(Hello(te_id, secret)))
            if self.pool and (te := self.pool.take()):
                pair = socket.socket(fileno=os.dup(te.writer.get_extra_info("socket").fileno()))
                with pair:  # its `Load`, and the socket it serves on from then on
                    socket.send_fds(pair, [pack(Load(self.model_path, cfg, launch, weights_from))], [sock.fileno()])
                te.writer.close()
                self.pool.fill()  # no cluster sizes this pool: it refills at once
                pid, mode, proc, fresh = te.pid, "peer" if weights_from else "preloaded", te.proc, False
            else:
                pid, mode, proc = await fork_or_spawn(self.template, te_id, cfg, launch, sock, self.model_path,
                                                      self.env, self.python)
                fresh = proc is not None
        self.procs[pid] = proc
        return pid, mode, fresh

    def kill(self, pid: int) -> None:
        if pid in self.procs:  # only what this agent started
            del self.procs[pid]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def ping(self) -> bool:
        self.last_ping = time.monotonic()
        return True

    def reap(self) -> list[int]:
        """Kill this deployment's processes left on this host (its TEs, their executors, the
        template, the pre-warmed pool): those in this host's network namespace whose
        environment holds the deployment's DistFlow secret. Returns their pids."""
        marks, net = [f"{k}={v}".encode() for k, v in self.env.items()], os.readlink("/proc/self/ns/net")
        reaped = []
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = f.read()
                stale = all(m in environ for m in marks) and os.readlink(f"/proc/{pid}/ns/net") == net
                if stale:
                    os.kill(pid, signal.SIGKILL)
                    reaped.append(pid)
            except OSError:  # gone meanwhile, or not ours to read
                pass
        if reaped:
            log.warning("killed %d process(es) an earlier agent left: %s", len(reaped), reaped)
        return reaped

    async def _watchdog(self) -> None:
        """No ping from a main process for the grace: end as if this agent had died with it."""
        while time.monotonic() - self.last_ping < self.grace_s:
            await asyncio.sleep(1)
        log.warning("no main process for %.0f s: stopping this host's TEs", self.grace_s)
        await self.shutdown()
        os._exit(0)

    async def shutdown(self) -> None:
        for pid in list(self.procs):
            self.kill(pid)
        if self.template:
            await self.template.stop()
        if self.pool:
            await self.pool.stop()
