"""Pre-warmed TEs: a small pool of model-agnostic TE processes, waiting for a model.

Each is a `flowserve.te_shell` started without `--model`: the interpreter is up, torch is
imported, the device is initialised, and it has said `prewarmed`. Taking one (the
`preloaded` start mode of `scheduler/cluster.py`) and sending it `Load` takes TE-Pre-Load
off the critical path; the weights then come from the mmap'ed loading-optimized cache
(DRAM pre-loading). The pool refills itself in the background after each take.
"""
import asyncio
import logging
import socket
import sys

from flowserve.config import EngineConfig
from flowserve.protocol import BadFrame, Prewarmed, expect, next_frame
from scaling.launch import Launched, reap, spawn_te_shell

log = logging.getLogger("deepflow.prewarm")


class PrewarmPool:
    def __init__(self, size: int, engine_cfg: EngineConfig, env: dict | None = None, python: str = sys.executable):
        self.size, self.engine_cfg, self.env, self.python = size, engine_cfg, env or {}, python
        self.ready: list[Launched] = []
        self._filling: set[asyncio.Task] = set()

    def fill(self) -> None:
        for _ in range(self.size - len(self.ready) - len(self._filling)):
            task = asyncio.create_task(self._spawn())
            self._filling.add(task)
            task.add_done_callback(self._filling.discard)

    async def wait_filled(self) -> None:
        await asyncio.gather(*self._filling, return_exceptions=True)

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            proc = await spawn_te_shell(self.engine_cfg, self.env, None, theirs, self.python)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        buf = bytearray()
        try:
            hello = expect(await next_frame(reader, buf), Prewarmed)
        except BadFrame:
            hello = None
        if hello is None:  # dropping our end of its socket ends it
            log.error("pre-warmed TE (pid %d) failed to start", proc.pid)
            return
        self.ready.append(Launched(reader, writer, buf, proc.pid, "preloaded", proc))

    def take(self) -> Launched | None:
        """A pre-warmed TE, if one is waiting (a refill starts at once)."""
        while self.ready:
            te = self.ready.pop(0)
            self.fill()
            if te.proc.returncode is None:
                return te
        self.fill()
        return None

    async def stop(self) -> None:
        for task in list(self._filling):
            task.cancel()
        for te in self.ready:
            te.writer.close()  # EOF: it exits
            await reap(te.proc)
        self.ready.clear()
