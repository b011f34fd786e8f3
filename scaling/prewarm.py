"""Pre-warmed TEs: a small pool of processes started ahead of demand, each waiting to become a TE.

Where the host's warm template is up (`--start-mode fork`), each is a standby forked from it
(`scaling/template.py`): it holds the model's weights and CPU kernels already, and builds
only its engine when taken, so the fork (the serial part of a start: the template copies its
page tables, ~15-35 ms a TE on a 2-core box) happened before the request came (none is
forked while the template is down or evicted). With `preloaded` or `peer` each is a model-agnostic
`flowserve.te_shell` started without `--model`: the interpreter is up, torch is imported, the
device is initialised. Either says `prewarmed`; taken (the node agent, `scaling/node.py`), it
becomes a TE on `Load`, whose weights come from the template's pages or the mmap'ed cache.

How many to keep is the cluster's call (`resize`, from the autoscalers' predictions:
`Cluster.prewarm`), never below `floor` (`--prewarmed`). A take does not refill at once: a
later `resize` does, a second after the host's last TE start, so a refill neither queues at
the template ahead of a burst's own forks nor takes cores from their first steps (a Ray
node's agent, `scaling/node_agent.py`, refills its pool of `floor` at each take).
"""
import asyncio
import logging
import socket
import sys
from typing import Callable

from flowserve.config import EngineConfig, TELaunch
from flowserve.protocol import BadFrame, Prewarmed, expect, next_frame
from scaling.launch import Launched, TemplateHandle, reap, spawn_te_shell

log = logging.getLogger("deepflow.prewarm")


class PrewarmPool:
    def __init__(self, size: int, engine_cfg: EngineConfig, env: dict | None = None, python: str = sys.executable,
                 template: Callable[[], TemplateHandle | None] | None = None):
        """`template`: the host's warm template as it is now, to fork standbys from (None: no
        template, pre-warmed TE-shells instead)."""
        self.size = self.floor = size
        self.engine_cfg, self.env, self.python, self.template = engine_cfg, env or {}, python, template
        self.ready: list[Launched] = []
        self._filling: set[asyncio.Task] = set()

    def fill(self) -> None:
        template = self.template() if self.template else None
        if self.template and not (template and template.alive):
            return  # its template is starting (or evicted): standbys come from it
        for _ in range(self.size - len(self.ready) - len(self._filling)):
            task = asyncio.create_task(self._spawn(template))
            self._filling.add(task)
            task.add_done_callback(self._filling.discard)

    def resize(self, size: int, refill: bool = True) -> None:
        """Keep `size` pre-warmed TEs: extra ones exit, missing ones start if `refill`."""
        self.size = size
        while len(self.ready) > size:
            self._drop(self.ready.pop())
        if refill:
            self.fill()

    async def wait_filled(self) -> None:
        await asyncio.gather(*self._filling, return_exceptions=True)

    async def _spawn(self, template: TemplateHandle | None) -> None:
        """One standby forked from `template`, or (None) one pre-warmed TE-shell."""
        ours, theirs = socket.socketpair()
        try:
            with theirs:
                if template:  # RuntimeError once it has gone away
                    pid, proc = await template.fork("", self.engine_cfg, TELaunch(), theirs), None
                else:
                    proc = await spawn_te_shell(self.engine_cfg, self.env, None, theirs, self.python)
                    pid = proc.pid
        except (RuntimeError, OSError) as e:
            ours.close()
            log.error("pre-warmed TE failed to start: %s", e)
            return
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        buf = bytearray()
        try:
            hello = expect(await next_frame(reader, buf), Prewarmed)
        except BadFrame:
            hello = None
        if hello is None:  # dropping our end of its socket ends it
            log.error("pre-warmed TE (pid %d) failed to start", pid)
            return
        self.ready.append(Launched(reader, writer, buf, pid, "fork" if proc is None else "preloaded", proc))

    def take(self) -> Launched | None:
        """A pre-warmed TE, if one is waiting."""
        while self.ready:
            te = self.ready.pop(0)
            if te.proc is None or te.proc.returncode is None:
                return te
        return None

    def _drop(self, te: Launched) -> None:
        te.writer.close()  # EOF: it exits (a standby's template reaps it)
        if te.proc:
            asyncio.create_task(reap(te.proc))

    async def stop(self) -> None:
        for task in list(self._filling):
            task.cancel()
        for te in self.ready:
            te.writer.close()
            if te.proc:
                await reap(te.proc)
        self.ready.clear()
