"""How a TE process comes to be, seen from whoever starts it (the main process, or a node
agent on another host); neither imports torch.

`spawn_te_shell` starts `python -m flowserve.te_shell` on a given socket, with a model (a
cold or DRAM-preloaded start) or without one (pre-warmed, `scaling/prewarm.py`); the one
frame it sends before it serves (`Prewarmed` or `Ready`) is read with
`flowserve.protocol.next_frame`. `TemplateHandle` is the other way in: it starts the warm
template (`scaling/template.py`), asks it to `fork` a TE onto a given socket, and notices its death
(its TEs are separate processes and keep serving); `fork_or_spawn` takes that way while the
template is up, else the first. `spawn_trainer` starts a training task (flowserve/train.py),
which is no TE: it talks over pipes. The socket is a socketpair's end on the main process's host,
or a TCP connection to the main process on another host.
"""
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from flowserve.config import EngineConfig, TELaunch
from flowserve.protocol import Fork, Forked, TemplateReady, encode_config, expect, pack, recv_frame

log = logging.getLogger("deepflow.launch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORK_TIMEOUT_S = 10  # a fork takes milliseconds: a template silent this long is frozen (SIGSTOP, wedged)


@dataclass
class Launched:
    """A TE process that has been started but is not serving yet: the main process's streams
    to it (and what they read ahead), its pid, how it started, and its process handle when
    the main process is its parent."""
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buf: bytearray
    pid: int
    start_mode: str            # fork | preloaded | peer | cold
    proc: asyncio.subprocess.Process | None = None
    fresh: bool = False        # a new interpreter: its start-up and imports are on this TE's clock


def _log_level() -> str:
    return logging.getLevelName(logging.getLogger().level).lower()


async def reap(proc: asyncio.subprocess.Process, timeout: float = 5) -> None:
    """Wait for a process told to exit (EOF on its socket); kill it if it has not after `timeout`."""
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def spawn_te_shell(engine_cfg: EngineConfig, env: dict | None, model_path: str | None,
                         te_sock: socket.socket, python: str = sys.executable,
                         launch: TELaunch | None = None) -> asyncio.subprocess.Process:
    """A fresh TE-shell interpreter talking over `te_sock`; without a model it starts pre-warmed
    (its `Load` brings the launch settings)."""
    model = ["--model", model_path, "--launch", encode_config(launch or TELaunch())] if model_path else []
    return await asyncio.create_subprocess_exec(
        python, "-m", "flowserve.te_shell", "--fd", str(te_sock.fileno()), *model,
        "--engine-config", encode_config(engine_cfg),
        "--log-level", _log_level(), pass_fds=[te_sock.fileno()], env={**os.environ, **(env or {})}, cwd=ROOT,
        start_new_session=True)  # Ctrl-C reaches the main process only: it drains, then stops the TEs


async def spawn_trainer(job_dir: str, threads: int, env: dict) -> asyncio.subprocess.Process:
    """A training task (`python -m flowserve.train JOB_DIR`): progress lines on its stdout; on
    its stdin thread counts, and EOF when this process dies (it then exits)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowserve.train", job_dir, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, **env, "OMP_NUM_THREADS": str(threads)}, cwd=ROOT,
        start_new_session=True)


class TemplateHandle:
    """The main process's side of the template."""

    def __init__(self, model_path: str, env: dict | None = None, python: str = sys.executable,
                 weights_from: str | None = None, on_death: Callable[[], None] | None = None):
        """`weights_from`: a running TE's DistFlow address to take the weights from, on a host
        whose DRAM does not hold them yet (else the template maps the model's cache).
        `on_death`: called if the template exits unasked."""
        self.model_path, self.env, self.python, self.weights_from = model_path, env or {}, python, weights_from
        self.proc: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()  # one fork command and its reply at a time
        self.buf = bytearray()
        self.on_death = on_death
        self.stopping = self.ready = False

    async def start(self, timeout: float = 300) -> None:
        self.sock, theirs = socket.socketpair()
        donor = ["--weights-from", self.weights_from] if self.weights_from else []
        self.proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "scaling.template", "--fd", str(theirs.fileno()), "--model", self.model_path, *donor,
            "--log-level", _log_level(), pass_fds=[theirs.fileno()], env={**os.environ, **self.env}, cwd=ROOT,
            start_new_session=True)  # as TEs: terminal signals are the main process's
        theirs.close()
        ready = expect(await asyncio.wait_for(asyncio.to_thread(recv_frame, self.sock, self.buf), timeout),
                       TemplateReady)
        if ready is None:
            raise RuntimeError(f"template exited during start-up (exit code {await self.proc.wait()})")
        self.ready = True  # forks may go now (before, a TE starts as a fresh interpreter)
        log.info("template ready (pid %d) in %.0f ms", self.proc.pid, ready.load_ms)
        asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        await self.proc.wait()
        if self.stopping:
            return
        log.error("template (pid %d) exited with %s", self.proc.pid, self.proc.returncode)
        if self.on_death:
            self.on_death()

    async def fork(self, te_id: str, engine_cfg: EngineConfig, launch: TELaunch, te_sock: socket.socket) -> int:
        """Fork a new TE from the template, talking over `te_sock`; returns its pid."""
        return await asyncio.to_thread(self._fork, te_id, engine_cfg, launch, te_sock)

    def _fork(self, te_id: str, engine_cfg: EngineConfig, launch: TELaunch, te_sock: socket.socket) -> int:
        with self.lock:
            self.sock.settimeout(FORK_TIMEOUT_S)
            try:
                socket.send_fds(self.sock, [pack(Fork(te_id, engine_cfg, launch))], [te_sock.fileno()])
                reply = expect(recv_frame(self.sock, self.buf), Forked)  # BadFrame if it answers Error
            except TimeoutError:  # killed, it is restarted (or TEs spawn) as after any death
                os.kill(self.proc.pid, signal.SIGKILL)
                raise RuntimeError(f"template (pid {self.proc.pid}) did not fork within {FORK_TIMEOUT_S} s: "
                                   "killed") from None
        if reply is None:
            raise RuntimeError("template is gone")
        return reply.pid

    @property
    def alive(self) -> bool:
        return self.ready and self.proc.returncode is None

    async def stop(self) -> None:
        self.stopping = True
        if self.sock:
            self.sock.close()  # EOF: the template returns from its loop and exits
        if self.proc:
            await reap(self.proc)


async def fork_or_spawn(template: TemplateHandle | None, te_id: str, cfg: EngineConfig, launch: TELaunch,
                        te_sock: socket.socket, model_path: str, env: dict, python: str = sys.executable
                        ) -> tuple[int, str, asyncio.subprocess.Process | None]:
    """A TE on `te_sock`, forked from the warm template or, while it is down, a fresh
    TE-shell: its pid, start mode, and process handle (None for a fork)."""
    if template and template.alive:
        return await template.fork(te_id, cfg, launch, te_sock), "fork", None
    env = {**env, "OMP_NUM_THREADS": str(cfg.num_threads or 1)}
    proc = await spawn_te_shell(cfg, env, model_path, te_sock, python, launch)
    return proc.pid, "preloaded" if launch.use_weight_cache else "cold", proc
