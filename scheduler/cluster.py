"""The cluster as the main process sees it: TE groups, placement (dist_sched), admission, size.

A TE group is the TEs of one model in one mode: `colocated` TEs run whole jobs; a
`prefill` TE runs prompts and first tokens and hands their KV to a `decode` TE, which
generates the rest (PD disaggregation; the KV moves TE to TE over DistFlow,
`flowserve/distflow.py`). Each group has an engine config and a target size the
autoscaler (`scaling/autoscaler.py`) or `POST /admin/scale` sets.

The cluster spans hosts (`scheduler/hosts.py`): one for the local backend, one per Ray
node with `--backend ray` (`scaling/ray_backend.py` adds and removes them). A new TE goes
to the host with the fewest TEs among those where it fits (`add_te`; each TE's memory is
known before it starts), and that host's node agent starts
it: forked from the warm template (`scaling/template.py`), a pre-warmed process
(`--start-mode preloaded|peer`, `scaling/prewarm.py`), or a fresh interpreter (`cold`).
Each TE's threads are its host's cores divided among the host's TEs, re-balanced as TEs
come and go. A heartbeat (`watch_health`) pings every TE each second; one silent past
`health_timeout_s` (stopped, deadlocked, its host unreachable) is failed like a dead one.

dist_sched is Algorithm 1 in two steps. At submit, the PD-aware step (`pd_aware`) picks
the TE type: a cluster with both kinds asks the heatmap (`scheduler/pd_policy.py`) with
the predicted decode length; the task then waits in that type's pending queue (PD tasks
in `prefill`'s). `_place_pending` hands it to a TE with a free batch slot, chosen by
`dist_sched`: locality-aware over the group's global prompt tree
(`PromptTree`, below) while loads are balanced, else load-aware; a PD task also
takes the least-loaded decode TE, on the prefill TE's host if one is free there (KV then
moves through shared memory, not TCP), and of those the one whose cache holds the longest
prefix of the prompt (the decode group's prompt tree): the prefill TE sends only the blocks
past it (`kv_skip`). That reserves a decode slot for it before the prefill starts.
A request on a context cache goes to a TE that pins it (the ID index, `id_index`, beside the
prompt trees; scheduler/caches.py).
A task that finds no free slot (the group is busy, at zero, or all its TEs died) waits
until a slot frees or a TE joins. Admission control bounds the tasks held so an overload
gets a fast 429 instead of an ever-growing queue. A TE that dies is replaced, and its
tasks that had produced no token yet are placed again (`resubmit`), so their clients
never notice.
"""
import asyncio
import itertools
import logging
import os
import secrets
import time
from collections import deque
from dataclasses import asdict, replace

from flowserve.config import EngineConfig, TELaunch, weights_cache_path
from flowserve.protocol import FinishReason
from flowserve.rtc import prefix_blocks
from scaling.node import LocalNode
from scheduler.hosts import GiB, Host, probe, te_bytes
from scheduler.je import Overloaded, Task, TaskEvent
from scheduler.pd_policy import DecodeLengthPredictor, Heatmap
from scheduler.te import TEHandle, TEState

log = logging.getLogger("deepflow.cluster")


GROUPS = ("colocated", "prefill", "decode")
HEARTBEAT_S = 1.0


class NoRoom(RuntimeError):
    """No live host has the memory for another TE of a group."""


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
                 max_queued: int = 256, env: dict | None = None, start_mode: str = "fork",
                 prewarmed: int = 1, policy: str = "locality", imbalance: int = 4,
                 kv_transport: str = "unix", heatmap: Heatmap | None = None, hosts: list[Host] | None = None,
                 threads_per_te: int = 0, health_timeout_s: float = 10.0, weights_donors: bool = False):
        """`groups`: size and engine config of each of GROUPS (a missing one is empty).
        `kv_transport`: how prefill TEs send KV to decode TEs, unix (shared memory), tcp, or
        unix,tcp (each pair takes unix on one host, tcp across). `hosts`: where TEs run; by
        default this one, its node agent in-process. `threads_per_te`: fixed (0: cores / TEs).
        `weights_donors`: every TE serves its weights (DistFlow) to hosts that lack them.
        `env`: added to the environment of every TE process."""
        self.model_path = model_path
        # cold: every TE reads the model file; preloaded: a pre-warmed TE maps the loading-
        # optimized cache (DRAM pre-loading: the pages stay in the page cache); fork: from
        # the warm template, which maps that cache once.
        # peer: a pre-warmed TE receives the weights from a running TE over DistFlow.
        groups = {g: groups.get(g, (0, EngineConfig())) for g in GROUPS}
        self.engine_cfgs = {g: cfg for g, (_, cfg) in groups.items()}
        self.launches = {g: TELaunch(use_weight_cache=start_mode != "cold",
                                     serve_weights=start_mode == "peer" or weights_donors,
                                     kv_listen=kv_transport if g == "decode" else "") for g in GROUPS}
        self.max_queued, self.start_mode = max_queued, start_mode
        # Every TE and template of this cluster inherits it; DistFlow peers must show it (flowserve/distflow.py).
        self.te_env = {**(env or {}), "DEEPFLOW_DISTFLOW_SECRET": secrets.token_hex(32)}
        self.hosts: list[Host] = hosts if hosts is not None else [
            Host("local", "127.0.0.1", **probe(),
                 node=LocalNode(model_path, start_mode, prewarmed, self.engine_cfgs["colocated"], self.te_env))]
        self.threads_per_te, self.health_timeout_s = threads_per_te, health_timeout_s
        self.groups: dict[str, list[TEHandle]] = {g: [] for g in GROUPS}
        self.target: dict[str, int] = {g: n for g, (n, _) in groups.items()}
        self.pending: dict[str, deque[Task]] = {g: deque() for g in GROUPS}
        self.trees = {g: PromptTree(self.engine_cfgs[g].block_size) for g in GROUPS}
        self.id_index: dict[str, set[str]] = {}  # context cache id -> ids of the TEs that pin it
        self.on_cache_lost = None                # callback(cache id) when no TE holds a context any more
        self.policy, self.imbalance = policy, imbalance
        self.heatmap, self.predictor = heatmap, DecodeLengthPredictor()
        self.weights_bytes = weights_estimate(model_path)  # corrected by the first TE's Ready
        self._ids = itertools.count()
        self._rr = itertools.count()
        self.started = self.closing = False
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
        await asyncio.gather(*(host.node.start() for host in self.hosts))
        if (missing := self.target_beyond_room()):
            raise NoRoom(missing)
        await asyncio.gather(*(self.add_te(g) for g, n in self.target.items() for _ in range(n)))
        self.started = True
        self._in_background(self.watch_health())

    def _in_background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ hosts and placement

    def add_host(self, host: Host) -> None:
        """A host joins (at start, or a Ray node that came up): groups short of their target refill."""
        self.hosts.append(host)
        log.info("host %s (%s): %d cores, %.1f GiB for TEs", host.name, host.address, host.cores, host.memory / GiB)
        for group, n in self.target.items() if self.started else ():
            for _ in range(n - len(self.live(group))):
                self._refill(group)

    def remove_host(self, host: Host, why: str) -> None:
        """A host is gone (its node agent or its node died): its TEs are failed, and their
        groups refill on the hosts left."""
        if host not in self.hosts:
            return
        log.error("host %s lost: %s", host.name, why)
        host.alive = False
        self.hosts.remove(host)
        for te in list(host.tes):
            te.fail(f"lost with its host {host.name} ({why})")

    def te_cost(self, group: str) -> int:
        return te_bytes(self.engine_cfgs[group], self.start_mode, self.weights_bytes)

    def room(self, group: str) -> int:
        """How many more TEs of `group` fit on the live hosts."""
        return sum(host.room(self.te_cost(group), self.weights_bytes) for host in self.hosts)

    def live(self, group: str) -> list[TEHandle]:
        return [te for te in self.groups[group] if not te.retiring]

    def target_beyond_room(self, group: str | None = None, instances: int = 0) -> str:
        """Why the target sizes (with `group` set to `instances`) do not fit, or "" if they do."""
        target = {**self.target, **({group: instances} if group else {})}
        need = {g: n - len(self.live(g)) for g, n in target.items() if n > len(self.live(g))}
        free = {h.name: h.memory - h.used(self.weights_bytes) for h in self.hosts}
        fits = {}
        for g, n in need.items():  # greedily, as add_te would place them
            cost, fits[g] = self.te_cost(g), 0
            for name in free:
                k = min(n - fits[g], max(0, free[name] // cost))
                fits[g] += k
                free[name] -= k * cost
            if fits[g] < n:
                cfg = self.engine_cfgs[g]
                hosts = "; ".join(h.describe(self.weights_bytes) for h in self.hosts) or "no live host"
                return (f"{target[g]} {g} TEs do not fit: {len(self.live(g)) + fits[g]} can run. Each new TE commits "
                        f"{cost / GiB:.2f} GiB (KV pool {cfg.kv_cache_gb:g} GiB, runtime and activations"
                        f"{', its own weights' if self.start_mode in ('cold', 'peer') else ''}); hosts: {hosts}. "
                        f"Lower kv_cache_gb or add hosts.")
        return ""

    def _place(self, group: str) -> Host:
        cost = self.te_cost(group)
        fitting = [h for h in self.hosts if h.room(cost, self.weights_bytes)]
        if not fitting:
            raise NoRoom(self.target_beyond_room(group, len(self.live(group)) + 1) or f"no room for a {group} TE")
        # the fewest TEs first (spread the load), then the most free memory
        return min(fitting, key=lambda h: (len(h.tes), h.used(self.weights_bytes) - h.memory))

    def rebalance(self, host: Host) -> None:
        """Share the host's cores among its TEs again (its TE count changed)."""
        if not self.threads_per_te:
            for te in host.tes:
                te.set_threads(host.threads_per_te())

    def donor(self) -> str | None:
        """A running TE's DistFlow weights address, spreading new hosts over the donors."""
        donors = [te.weights_addr for te in self.ready_tes() if te.weights_addr]
        return donors[next(self._rr) % len(donors)] if donors else None

    async def add_te(self, group: str) -> TEHandle:
        t0 = time.perf_counter()
        host = self._place(group)
        cfg = replace(self.engine_cfgs[group], num_threads=self.threads_per_te or host.threads_per_te(extra=1))
        te = TEHandle(f"te-{next(self._ids)}", group, cfg, host, self.te_cost(group))
        te.on_death = self._on_death
        te.on_free = lambda te: self._place_pending(te.group)
        te.tree = self.trees[group]
        self.groups[group].append(te)
        host.tes.append(te)
        self.rebalance(host)
        try:
            ready = await te.start(replace(self.launches[group], host=host.address),
                                   self.donor() if self.start_mode == "peer" else None)
        except BaseException:  # failed or cancelled mid-start: leave no process behind
            self._forget(te)
            te.kill()
            raise
        self.weights_bytes = ready.weights_bytes or self.weights_bytes
        self.rebalance(host)  # TEs that joined while this one started
        self._max_model_len = self._max_model_len or te.max_model_len  # all TEs share one config
        self._place_pending(group)
        te.timings_ms["scaler_post"] = 1e3 * (time.perf_counter() - te.t_ready)
        te.timings_ms["total"] = 1e3 * (time.perf_counter() - t0)
        log.info("TE %s ready on %s (pid %d, %s, %d threads): %s", te.id, host.name, te.pid, te.start_mode,
                 te.threads, {k: round(v, 1) for k, v in te.timings_ms.items()})
        return te

    def _forget(self, te: TEHandle) -> None:
        if te in self.groups[te.group]:
            self.groups[te.group].remove(te)
        if te in te.host.tes:
            te.host.tes.remove(te)
            self.rebalance(te.host)
        self.trees[te.group].remove_te(te.id)
        for cache_id, holders in list(self.id_index.items()):
            if te.id in holders:
                holders.discard(te.id)
                if not holders and self.on_cache_lost:
                    self.on_cache_lost(cache_id)

    def _on_death(self, te: TEHandle) -> None:
        self._forget(te)
        if not self.closing and not te.retiring and len(self.live(te.group)) < self.target[te.group]:
            self._refill(te.group)

    def _refill(self, group: str) -> None:
        self.replacing += 1
        self._in_background(self._replace(group))

    async def _replace(self, group: str) -> None:
        try:
            await self.add_te(group)
        except NoRoom as e:  # a host that joins later refills the group
            log.error("cannot replace a %s TE: %s", group, e)
        except (RuntimeError, OSError, TimeoutError) as e:
            log.error("a replacement %s TE failed to start: %s", group, e)
        finally:
            self.replacing -= 1

    async def watch_health(self) -> None:
        """The heartbeat: ping every serving TE each second (it answers with its stats, and
        any frame counts); fail one that stayed silent past `health_timeout_s`."""
        while not self.closing:
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            for te in self.tes:
                if te.state not in (TEState.READY, TEState.DRAINING):
                    continue
                if now - te.last_heard > self.health_timeout_s:
                    te.fail(f"answered no heartbeat for {now - te.last_heard:.0f} s")
                else:
                    te.ping()

    def scale_to(self, group: str, instances: int) -> None:
        """Set the group's size: start TEs (as many as fit), or retire idle ones first (busy ones drain)."""
        self.target[group] = instances
        live = self.live(group)
        for _ in range(min(instances - len(live), self.room(group))):
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
        if task.cache_id:  # where its context is pinned
            group = self.cache_group()
            task.placement = {"pd": {"choice": "disaggregated" if group == "prefill" else "colocated",
                                     "why": "context cache"}}
            return group
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

    def cache_group(self) -> str:
        """Where context caches are pinned, and their requests run: colocated TEs if the
        cluster has any, else prefill TEs."""
        return "colocated" if self.target["colocated"] else "prefill"

    def dist_sched(self, task: Task, tes: list[TEHandle], group: str) -> tuple[TEHandle, dict]:
        """Algorithm 1, the TE within a group: when loads are balanced, the TE holding the
        longest prefix of the prompt (locality-aware); else the least loaded (load-aware).
        Load = tasks on a TE; balanced = the spread of loads across the group's ready TEs is
        at most `imbalance` tasks. Ties: least loaded, then round-robin. `--policy load|rr`
        are the baselines. Decode TEs get no prompt to compute, so they go by load alone.
        Returns the TE and why, for the task's placement record."""
        loads = {te.id: te.load for te in self.ready_tes(group)}
        holders = [te for te in tes if te.id in self.id_index.get(task.cache_id, ())]
        if holders:  # MatchByID there beats any prefix elsewhere
            te = min(holders, key=lambda te: te.load)
            return te, {"policy": "context_cache", "cache_id": task.cache_id, "loads": loads}
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
            task.placement["host"] = te.host.name
            if pd:  # a decode TE on the prefill TE's host if one is free: KV moves through shared memory
                near = [d for d in free_decode if d.host is te.host] or free_decode
                near, cached = self.decode_candidates(task, near)
                decode_te, task.placement["decode"] = self.dist_sched(task, near, "decode")
                task.placement["decode"].update(host=decode_te.host.name, matched_tokens=cached)
                task.decode = Task(task.job_id, task.index, task.prompt_ids, task.params, events=task.events)
                decode_te.submit(task.decode)
                te.submit(task, kv_to=decode_te.kv_addr_for(te.host),
                          kv_skip=cached // self.engine_cfgs["decode"].block_size)
            else:
                te.submit(task)

    def decode_candidates(self, task: Task, tes: list[TEHandle]) -> tuple[list[TEHandle], int]:
        """A PD task's decode TEs to choose from: the least loaded of `tes`, and of those the
        ones whose RTC caches the longest prefix of the prompt (the decode group's prompt
        tree); with that length in tokens: the prefill TE sends only the blocks past it."""
        least = min(te.load for te in tes)
        tes = [te for te in tes if te.load == least]
        matched = self.trees["decode"].matched_tokens(task.prompt_ids, [te.id for te in tes])
        best = max(matched.values())
        return [te for te in tes if matched[te.id] == best], best

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
        await asyncio.gather(*(host.node.stop() for host in self.hosts), return_exceptions=True)

    def to_dict(self) -> dict:
        local = self.hosts[0].node.to_dict() if len(self.hosts) == 1 else {}  # one host: its template, pool
        return {"start_mode": self.start_mode, **local,
                "hosts": [h.to_dict(self.weights_bytes) for h in self.hosts],
                "te_cost_gb": {g: round(self.te_cost(g) / GiB, 3) for g in GROUPS},
                "weights_gb": round(self.weights_bytes / GiB, 3),
                "groups": {name: {"target": self.target[name], "tes": [te.id for te in tes],
                                  "pending": len(self.pending[name]), "engine_config": asdict(self.engine_cfgs[name])}
                           for name, tes in self.groups.items()},
                "heatmap": self.heatmap and asdict(self.heatmap),
                "tes": [te.to_dict() for te in self.tes]}


def weights_estimate(model_path: str) -> int:
    """The weights' size before any TE reported it: the loading-optimized cache if there is
    one (what the template maps), else the model file."""
    try:
        cached = weights_cache_path(model_path)
        return os.path.getsize(cached if cached.exists() else model_path)
    except OSError:
        return 0
