"""The cluster as the main process sees it: TE groups, placement (dist_sched), admission, size.

A TE group is the TEs of one model in one mode: `colocated` TEs run whole jobs; a
`prefill` TE runs prompts and first tokens and hands their KV to a `decode` TE, which
generates the rest (PD disaggregation; the KV moves TE to TE over DistFlow,
`flowserve/distflow.py`). Each group has an engine config and a target size the
autoscaler (`scaling/autoscaler.py`) or `POST /admin/scale` sets. New TEs are forked
from the warm template (`scaling/template.py`); with `--start-mode preloaded` a
pre-warmed process from the pool (`scaling/prewarm.py`) is told to map the cached
weights; with `--start-mode peer` such a process receives the weights from a running TE
instead (DistFlow); with `--start-mode cold`, or while the template is down or the pool
empty, a fresh interpreter starts.

dist_sched is Algorithm 1 in two steps. At submit, the PD-aware step (`pd_aware`) picks
the TE type: a cluster with both kinds asks the heatmap (`scheduler/pd_policy.py`) with
the predicted decode length; the task then waits in that type's pending queue (PD tasks
in `prefill`'s). `_place_pending` hands it to a TE with a free batch slot, chosen by
`dist_sched`: locality-aware over the group's global prompt tree
(`PromptTree`, below) while loads are balanced, else load-aware; a PD task also
takes the least-loaded decode TE, which reserves a slot for it before the prefill starts.
A task that finds no free slot (the group is busy, at zero, or all its TEs died) waits
until a slot frees or a TE joins. Admission control bounds the tasks held so an overload
gets a fast 429 instead of an ever-growing queue. A TE that dies is replaced, and its
tasks that had produced no token yet are placed again (`resubmit`), so their clients
never notice.
"""
import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import asdict, replace

from flowserve.config import EngineConfig
from flowserve.protocol import FinishReason
from flowserve.rtc import prefix_blocks
from scaling.launch import TemplateHandle
from scaling.prewarm import PrewarmPool
from scheduler.je import Overloaded, Task, TaskEvent
from scheduler.pd_policy import DecodeLengthPredictor, Heatmap
from scheduler.te import TEHandle, TEState

log = logging.getLogger("deepflow.cluster")


GROUPS = ("colocated", "prefill", "decode")


class PromptTree:
    """The global prompt tree: which TE holds which prompt prefix (PAPER.md section 3).

    Each TE's RTC indexes full KV blocks by a chain hash (`flowserve.rtc.chain_hash`): a
    block's hash covers its tokens and, through its parent's hash, every token before it. A
    chain hash therefore names one node of a radix tree over token ids at block granularity,
    and a map from chain hash to the TEs holding that block *is* that tree, stored flat. TEs
    report the blocks they index and evict with every step (`Stats.cached`, `Stats.evicted`
    in `flowserve/protocol.py`), so the tree mirrors their caches without asking them.
    `dist_sched` asks it for the longest cached prefix of a prompt on each TE, walking the
    prompt with the RTC's own `prefix_blocks`.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.holders: dict[int, set[str]] = {}   # chain hash -> ids of the TEs that cache that block

    def update(self, te_id: str, cached: list[int], evicted: list[int]) -> None:
        for h in evicted:
            tes = self.holders.get(h)
            if tes:
                tes.discard(te_id)
                if not tes:
                    del self.holders[h]
        for h in cached:
            self.holders.setdefault(h, set()).add(te_id)

    def remove_te(self, te_id: str) -> None:
        self.update(te_id, [], [h for h, tes in self.holders.items() if te_id in tes])

    def matched_tokens(self, token_ids: list[int], te_ids: list[str]) -> dict[str, int]:
        """For each TE, how many leading tokens of `token_ids` its RTC would reuse."""
        matched = dict.fromkeys(te_ids, 0)
        alive = set(te_ids)
        for i, (h, _) in enumerate(prefix_blocks(token_ids, self.block_size)):
            alive &= self.holders.get(h, set())
            if not alive:
                break
            for te in alive:
                matched[te] = (i + 1) * self.block_size
        return matched


class Cluster:
    def __init__(self, model_path: str, groups: dict[str, tuple[int, EngineConfig]],
                 max_queued: int = 256, te_env: dict | None = None, start_mode: str = "fork",
                 prewarmed: int = 1, policy: str = "locality", imbalance: int = 4,
                 kv_transport: str = "unix", heatmap: Heatmap | None = None):
        """`groups`: size and engine config of each of GROUPS (a missing one is empty).
        `kv_transport`: how prefill TEs send KV to decode TEs, unix (shared memory) or tcp."""
        self.model_path = model_path
        # cold: every TE reads the model file; preloaded: a pre-warmed TE maps the loading-
        # optimized cache (DRAM pre-loading: the pages stay in the page cache); fork: from
        # the warm template, which maps that cache once.
        # peer: a pre-warmed TE receives the weights from a running TE over DistFlow.
        groups = {g: groups.get(g, (0, EngineConfig())) for g in GROUPS}
        self.engine_cfgs = {g: replace(cfg, use_weight_cache=start_mode != "cold", serve_weights=start_mode == "peer",
                                       kv_listen=kv_transport if g == "decode" else "") for g, (_, cfg) in groups.items()}
        self.max_queued, self.te_env, self.start_mode = max_queued, te_env or {}, start_mode
        self.groups: dict[str, list[TEHandle]] = {g: [] for g in GROUPS}
        self.target: dict[str, int] = {g: n for g, (n, _) in groups.items()}
        self.pending: dict[str, deque[Task]] = {g: deque() for g in GROUPS}
        self.trees = {g: PromptTree(self.engine_cfgs[g].block_size) for g in GROUPS}
        self.policy, self.imbalance = policy, imbalance
        self.heatmap, self.predictor = heatmap, DecodeLengthPredictor()
        self.template: TemplateHandle | None = None
        self.pool = PrewarmPool(prewarmed, self.engine_cfgs["colocated"], self.te_env) \
            if start_mode in ("preloaded", "peer") else None
        self._ids = itertools.count()
        self._rr = itertools.count()
        self.closing = False
        self.replacing = 0               # TEs being started to replace dead ones
        self._max_model_len = 0
        self.work_held = asyncio.Event()
        self._background: set[asyncio.Task] = set()

    @property
    def tes(self) -> list[TEHandle]:
        return [te for group in self.groups.values() for te in group]

    def ready_tes(self, group: str | None = None) -> list[TEHandle]:
        """Ready TEs of `group`, or of every group."""
        return [te for te in (self.groups[group] if group else self.tes) if te.state is TEState.READY]

    def free_tes(self, group: str) -> list[TEHandle]:
        """Ready TEs of `group` with a free batch slot."""
        return [te for te in self.ready_tes(group) if te.load < te.engine_cfg.max_num_seqs]

    async def start(self) -> None:
        if self.start_mode == "fork":
            await self._start_template()
        if self.pool:
            self.pool.fill()
            await self.pool.wait_filled()
        await asyncio.gather(*(self.add_te(g) for g, n in self.target.items() for _ in range(n)))

    async def _start_template(self) -> None:
        self.template = TemplateHandle(self.model_path, {"OMP_NUM_THREADS": "1"})
        self.template.on_death = self._on_template_death
        await self.template.start()

    def _on_template_death(self) -> None:
        if not self.closing:  # running TEs are separate processes and keep serving
            self._in_background(self._start_template())

    def _in_background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def add_te(self, group: str) -> TEHandle:
        t0 = time.perf_counter()
        te = TEHandle(f"te-{next(self._ids)}", group, self.model_path, self.engine_cfgs[group])
        te.on_death = self._on_death
        te.on_free = lambda te: self._place_pending(te.group)
        te.tree = self.trees[group]
        self.groups[group].append(te)
        template = self.template if self.template and self.template.alive else None
        prewarmed = self.pool.take() if self.pool else None
        donor = next((t.weights_addr for t in self.tes if t.weights_addr and t.state is TEState.READY), None)
        try:
            await te.start(self.te_env, template, prewarmed, donor)
        except BaseException:  # failed or cancelled mid-start: leave no process behind
            self.groups[group].remove(te)
            te.kill()
            raise
        self._max_model_len = self._max_model_len or te.max_model_len  # all TEs share one config
        self._place_pending(group)
        te.timings_ms["scaler_post"] = 1e3 * (time.perf_counter() - te.t_ready)
        te.timings_ms["total"] = 1e3 * (time.perf_counter() - t0)
        log.info("TE %s ready (pid %d, %s): %s", te.id, te.pid, te.start_mode,
                 {k: round(v, 1) for k, v in te.timings_ms.items()})
        return te

    def _on_death(self, te: TEHandle) -> None:
        self.groups[te.group].remove(te)
        self.trees[te.group].remove_te(te.id)
        if not self.closing and not te.retiring and len(self.groups[te.group]) < self.target[te.group]:
            self.replacing += 1
            self._in_background(self._replace(te.group))

    async def _replace(self, group: str) -> None:
        try:
            await self.add_te(group)
        finally:
            self.replacing -= 1

    def scale_to(self, group: str, instances: int) -> None:
        """Set the group's size: start TEs, or retire idle ones first (busy ones drain)."""
        self.target[group] = instances
        live = [te for te in self.groups[group] if not te.retiring]
        for _ in range(instances - len(live)):
            self._in_background(self.add_te(group))
        # starting TEs first, then the least busy: what retires soonest with least work lost
        surplus = sorted(live, key=lambda te: (te.state is TEState.READY, te.load))[:max(0, len(live) - instances)]
        for te in surplus:
            te.retiring = True
            self._in_background(self._retire(te))

    async def _retire(self, te: TEHandle) -> None:
        if te.state is TEState.READY:
            te.state = TEState.DRAINING  # dist_sched places nothing more on it
        while te.load and te.state is not TEState.DEAD:
            await asyncio.sleep(0.1)
        await te.stop()

    @property
    def max_model_len(self) -> int:
        """The served context, as the first ready TE reported it (still known at zero TEs)."""
        return self._max_model_len

    def pd_aware(self, task: Task) -> str:
        """Algorithm 1, first step: run the task colocated or disaggregated? Returns the group
        whose queue it waits in. Only a cluster with both kinds has a choice: the heatmap
        decides, at the cell of the prompt length and the predicted decode length."""
        prompt_len = len(task.prompt_ids)
        has_pd = self.target["prefill"] > 0 and self.target["decode"] > 0
        if not (has_pd and self.target["colocated"] > 0):
            task.placement = {"pd": {"choice": "disaggregated" if has_pd else "colocated", "why": "only kind"}}
            return "prefill" if has_pd else "colocated"
        predicted = self.predictor.predict(task.prompt_ids, task.params.max_tokens)
        disagg, cell = self.heatmap.choose(prompt_len, predicted)
        task.placement = {"pd": {"choice": "disaggregated" if disagg else "colocated",
                                 "predicted_output": predicted, **cell}}
        return "prefill" if disagg else "colocated"

    def dist_sched(self, task: Task, tes: list[TEHandle], group: str) -> tuple[TEHandle, dict]:
        """Algorithm 1, the TE within a group: when loads are balanced, the TE holding the
        longest prefix of the prompt (locality-aware); else the least loaded (load-aware).
        Load = tasks on a TE; balanced = the spread of loads across the group's ready TEs is
        at most `imbalance` tasks. Ties: least loaded, then round-robin. `--policy load|rr`
        are the baselines. Decode TEs get no prompt to compute, so they go by load alone.
        Returns the TE and why, for the task's placement record."""
        loads = {te.id: te.load for te in self.ready_tes(group)}
        if self.policy == "rr":
            return tes[next(self._rr) % len(tes)], {"policy": "rr", "loads": loads}
        balanced = max(loads.values()) - min(loads.values()) <= self.imbalance
        locality = self.policy == "locality" and balanced and group != "decode"
        matched = self.trees[group].matched_tokens(task.prompt_ids, [te.id for te in tes]) \
            if group != "decode" else dict.fromkeys((te.id for te in tes), 0)
        if locality:
            best = max(matched.values())
            tes = [te for te in tes if matched[te.id] == best]
        least = min(te.load for te in tes)
        tes = [te for te in tes if te.load == least]
        te = tes[next(self._rr) % len(tes)]
        return te, {"policy": "locality" if locality else "load", "balanced": balanced,
                    "matched_tokens": matched[te.id], "loads": loads}

    def admit(self, num_tasks: int) -> None:
        """Refuse work past the bound: tasks beyond what the TEs run at once wait in queues.
        A PD task holds a decode slot from its placement to its end, so decode TEs count."""
        running_groups = ("colocated", "decode")
        capacity = sum(self.target[g] * self.engine_cfgs[g].max_num_seqs for g in running_groups) + self.max_queued
        held = sum(te.load for g in running_groups for te in self.groups[g]) + sum(map(len, self.pending.values()))
        if held + num_tasks > capacity:
            raise Overloaded("server is at capacity")

    def submit(self, task: Task) -> None:
        group = self.pd_aware(task)
        self.pending[group].append(task)
        self._place_pending(group)

    def _place_pending(self, group: str) -> None:
        """Hand held tasks to TEs with a free batch slot, oldest first. The rest wait here, not
        in a TE's queue, so a TE that joins later (a scale-out) shares the backlog. A PD task
        needs a free prefill TE and a free decode TE; the decode TE hears of it first."""
        group = "prefill" if group == "decode" else group  # a decode slot freed: PD tasks may go
        queue, pd = self.pending[group], group == "prefill"
        while queue:
            free, free_decode = self.free_tes(group), self.free_tes("decode") if pd else []
            if not free or (pd and not free_decode):
                self.work_held.set()  # wakes the autoscaler now, not at its next tick
                return
            task = queue.popleft()
            te, why = self.dist_sched(task, free, group)
            task.placement.update(why)
            if pd:
                decode_te, task.placement["decode"] = self.dist_sched(task, free_decode, "decode")
                task.decode = Task(task.job_id, task.index, task.prompt_ids, task.params, events=task.events)
                decode_te.submit(task.decode)
                te.submit(task, kv_to=decode_te.kv_addr)
            else:
                te.submit(task)

    def resubmit(self, task: Task) -> None:
        """Place a task again after its TE died (held until the refill if no TE is left)."""
        if self.closing:
            raise Overloaded("server is shutting down")
        task.retries += 1
        self.abort([task])  # the other half of a PD pair, if it is alive
        # A new id: frames the old attempt's TEs had already sent are dropped, not taken as this one's.
        task.id, task.decode = f"{task.id.split('.')[0]}.{task.retries}", None
        self.submit(task)

    def abort(self, tasks: list[Task]) -> None:
        tasks = tasks + [t.decode for t in tasks if t.decode]
        for queue in self.pending.values():
            for t in tasks:
                if t in queue:
                    queue.remove(t)
        for te in self.tes:
            te.abort([t.id for t in tasks if t.te_id == te.id])

    def healthy(self) -> bool:
        """False while a dead TE's replacement is starting, or a non-empty group has no TE ready."""
        return self.replacing == 0 and all(self.ready_tes(g) or not self.target[g] for g in self.groups)

    async def shutdown(self) -> None:
        self.closing = True
        for t in list(self._background):
            t.cancel()
        for queue in self.pending.values():
            while queue:
                queue.popleft().events.put_nowait(TaskEvent([], FinishReason.ERROR, error="server is shutting down"))
        await asyncio.gather(*(te.stop() for te in self.tes), return_exceptions=True)
        if self.template:
            await self.template.stop()
        if self.pool:
            await self.pool.stop()

    def to_dict(self) -> dict:
        return {"start_mode": self.start_mode,
                "template_pid": self.template.proc.pid if self.template and self.template.alive else None,
                "prewarmed_ready": len(self.pool.ready) if self.pool else 0,
                "groups": {name: {"target": self.target[name], "tes": [te.id for te in tes],
                                  "pending": len(self.pending[name]), "engine_config": asdict(self.engine_cfgs[name])}
                           for name, tes in self.groups.items()},
                "heatmap": self.heatmap and asdict(self.heatmap),
                "tes": [te.to_dict() for te in self.tes]}
