"""The cluster as the main process sees it: TE groups, placement (dist_sched), admission.

A TE group is the TEs of one model in one mode (here: colocated). `dist_sched` picks the
TE for a task; today it is load-aware (fewest tasks, ties broken round-robin), the policy
of Algorithm 1 when loads are imbalanced. Admission control bounds the queued tasks per
group so an overload gets a fast 429 instead of an ever-growing queue. A TE that dies is
replaced while the server runs, and its tasks that had produced no token yet are placed
again (`resubmit`), so their clients never notice.
"""
import asyncio
import itertools
import logging
import time

from flowserve.config import EngineConfig
from scheduler.job import Task
from scheduler.te import TEHandle, TEState

log = logging.getLogger("deepflow.cluster")


class Overloaded(Exception):
    pass


class Cluster:
    def __init__(self, model_path: str, engine_cfg: EngineConfig, num_tes: int = 1,
                 max_queued: int = 256, te_env: dict | None = None):
        self.model_path, self.engine_cfg = model_path, engine_cfg
        self.num_tes, self.max_queued, self.te_env = num_tes, max_queued, te_env or {}
        self.groups: dict[str, list[TEHandle]] = {"colocated": []}
        self._ids = itertools.count()
        self._rr = itertools.count()
        self.closing = False
        self._restarts: set[asyncio.Task] = set()

    @property
    def tes(self) -> list[TEHandle]:
        return [te for group in self.groups.values() for te in group]

    def ready_tes(self, group: str = "colocated") -> list[TEHandle]:
        return [te for te in self.groups[group] if te.state is TEState.READY]

    async def start(self) -> None:
        await asyncio.gather(*(self.add_te("colocated") for _ in range(self.num_tes)))

    async def add_te(self, group: str) -> TEHandle:
        te = TEHandle(f"te-{next(self._ids)}", group, group, self.model_path, self.engine_cfg)
        te.on_death = self._on_death
        self.groups[group].append(te)
        try:
            await te.start(self.te_env)
        except BaseException:  # failed or cancelled mid-start: leave no process behind
            self.groups[group].remove(te)
            if te.proc and te.proc.returncode is None:
                te.proc.kill()
                await te.proc.wait()
            raise
        return te

    def _on_death(self, te: TEHandle) -> None:
        self.groups[te.group].remove(te)
        if not self.closing:  # refill the group
            task = asyncio.create_task(self.add_te(te.group))
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    @property
    def max_model_len(self) -> int:
        return min((te.max_model_len for te in self.tes if te.max_model_len), default=0)

    def dist_sched(self, task: Task, group: str = "colocated") -> TEHandle:
        """Pick the TE for `task`: the least loaded ready TE, round-robin among equals."""
        tes = self.ready_tes(group)
        if not tes:
            raise Overloaded("no engine is ready")
        least = min(te.load for te in tes)
        candidates = [te for te in tes if te.load == least]
        return candidates[next(self._rr) % len(candidates)]

    def admit(self, num_tasks: int, group: str = "colocated") -> None:
        """Refuse work past the bound: tasks beyond what the TEs run at once wait in queues."""
        tes = self.ready_tes(group)
        capacity = len(tes) * self.engine_cfg.max_num_seqs + self.max_queued
        if not tes or sum(te.load for te in tes) + num_tasks > capacity:
            raise Overloaded("server is at capacity")

    def submit(self, task: Task) -> None:
        self.dist_sched(task).submit(task)

    async def resubmit(self, task: Task, timeout: float = 60.0, group: str = "colocated") -> None:
        """Place a task again after its TE died, waiting for the group's refill if no TE is left."""
        deadline = time.monotonic() + timeout
        while not self.ready_tes(group):
            if self.closing or time.monotonic() > deadline:
                raise Overloaded("no engine is ready")
            await asyncio.sleep(0.05)
        task.retries += 1
        self.submit(task)

    def abort(self, tasks: list[Task]) -> None:
        for te in self.tes:
            te.abort([t.id for t in tasks if t.te_id == te.id])

    def healthy(self) -> bool:
        return len(self.ready_tes()) >= self.num_tes

    async def shutdown(self) -> None:
        self.closing = True
        for t in list(self._restarts):
            t.cancel()
        await asyncio.gather(*(te.stop() for te in self.tes), return_exceptions=True)

    def to_dict(self) -> dict:
        return {"groups": {name: [te.id for te in tes] for name, tes in self.groups.items()},
                "tes": [te.to_dict() for te in self.tes]}
