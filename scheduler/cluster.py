"""The cluster as the main process sees it: TE groups, placement, admission, size.

A TE group is the TEs of one model in one mode: `colocated` TEs run whole jobs; a
`prefill` TE runs prompts and first tokens and hands their KV to a `decode` TE, which
generates the rest (PD disaggregation; the KV moves TE to TE over DistFlow,
`flowserve/distflow.py`). Each group has an engine config and a target size the
autoscaler (`scaling/autoscaler.py`) or `POST /admin/scale` sets.

The cluster spans the hosts it is given (`scaling/hosts.py`): this one for the local
backend (`deepflow.serve` builds it), one per Ray node with `--backend ray` (`scaling/
ray_backend.py` adds and removes them). A new TE goes to the host with the fewest TEs among
those where it fits (`add_te`; each TE's memory is known before it starts), and that
host's node agent starts it: forked from the warm template (`scaling/template.py`), a
pre-warmed process (`--start-mode preloaded|peer`, `scaling/prewarm.py`), or a fresh
interpreter (`cold`). Each TE's threads are its host's cores divided among the host's TEs,
re-balanced as TEs come and go. A heartbeat (`watch_health`) pings every TE each second;
one silent past `health_timeout_s` (stopped, deadlocked, its host unreachable) is failed
like a dead one.

Placement is dist_sched (`scheduler/dist_sched.py`): the cluster hands it plain values and
acts on its answers. At submit, `pd_aware` picks the group the task waits in (PD tasks
wait in `prefill`'s queue). `_place_pending` hands it to a TE with a free batch slot,
chosen over the group's global prompt tree (fed from the TEs' steps, `on_step`) and loads;
a PD task also reserves a decode slot before its prefill starts. A request on a context
cache goes to a TE that pins it: the cluster keeps the ID index (`pin_started`,
`holders`, ...; scheduler/caches.py builds the contexts). A task that finds no free slot
waits until one frees or a TE joins, at most `place_timeout_s`: then it ends with a 503
that says why. Admission control bounds the tasks held so an overload gets a fast 429
instead of an ever-growing queue. Batch work (low-priority tasks, scheduler/batch.py) waits in
its own queue (`batch_pending`), placed only while no other task waits and only on batch slots no
task holds; the slots it holds count for no other task, which takes them back in the TE (its
batcher pauses or preempts batch sequences), and it is neither admitted nor timed out here.
A TE that dies is replaced, and its tasks that had
produced no token yet are placed again (`resubmit`), so their clients never notice.

Restart: with a state dir (`state`) and an adoption grace, every serving TE is recorded
there (id, group, host, pid, the secret it made at start), with the group targets. TEs
outlive a main-process crash for the grace (`flowserve/te_shell.py: TEShell.rejoin`); the
next main process, before `start`, waits for them at the TE listener (`adopt`), takes them
back with the context caches they pin, and restores the targets; `start` then only refills
what is missing, while the hosts' templates start in the background.
"""
import asyncio
import itertools
import logging
import math
import os
import time
from collections import Counter, deque
from dataclasses import asdict, replace

from flowserve.config import EngineConfig, TELaunch, read_model_config, weights_cache_path
from flowserve.lora import hash_seed
from flowserve.protocol import FinishReason
from scaling.hosts import GiB, Host, te_bytes
from scaling.prewarm import PrewarmPool
from scaling.te_listener import TEListener
from scheduler import dist_sched
from scheduler.dist_sched import PromptTree
from scheduler.job import Overloaded, Task, TaskEvent
from scheduler.pd_policy import DecodeLengthPredictor, Heatmap
from scheduler.state import GroupTargetsRow, StateStore, TERow, best_effort
from scheduler.te import TEHandle, TEState

log = logging.getLogger("deepflow.cluster")


GROUPS = ("colocated", "prefill", "decode")
HEARTBEAT_S = 1.0
STEP_BOUND = 30  # health timeouts one engine step may take before its TE counts as hung
DECISIONS_KEPT = 64
TE_IDS = itertools.count()  # one numbering for every base model's TEs
REFILL_AFTER_S = 1.0  # a host's pre-warmed TEs refill this long after its last TE start
ADOPT_WAIT_S = 2.0  # how long a restarted main process waits for its TEs (they dial every 0.2 s at most)


class NoRoom(RuntimeError):
    """No live host has the memory for another TE of a group."""


class Cluster:
    def __init__(self, model_path: str, groups: dict[str, tuple[int, EngineConfig]], hosts: list[Host] | None = None,
                 max_queued: int = 256, start_mode: str = "fork", policy: str = "locality", imbalance: int = 4,
                 kv_transport: str = "unix", heatmap: Heatmap | None = None, threads_per_te: int = 0,
                 health_timeout_s: float = 10.0, weights_donors: bool = False, place_timeout_s: float = 60.0,
                 distflow_ports: str = "", state: StateStore | None = None, main_address: str = "",
                 adopt_grace_s: float = 0.0):
        """`groups`: size and engine config of each of GROUPS (a missing one is empty).
        `hosts`: where TEs run (more may join: `add_host`). `kv_transport`: how prefill TEs
        send KV to decode TEs, unix (shared memory), tcp, or unix,tcp (each pair takes unix
        on one host, tcp across). `threads_per_te`: fixed (0: cores / TEs). `weights_donors`:
        every TE serves its weights (DistFlow) to hosts that lack them. `place_timeout_s`: a
        task that no TE takes within it fails with 503. `distflow_ports`: "LO-HI", the TCP
        ports TEs' DistFlow listeners take (empty: any). `state`: where TEs and targets are
        recorded for a restart; `main_address`, `adopt_grace_s`: the TE listener that TEs
        reconnect to if the main process dies, and how long they wait for it (0: not at all)."""
        self.model_path = model_path
        # cold: every TE reads the model file; preloaded, fork: a pre-warmed TE or the warm
        # template maps the loading-optimized cache; peer: weights from a running TE (DistFlow).
        groups = {g: groups.get(g, (0, EngineConfig())) for g in GROUPS}
        self.engine_cfgs = {g: cfg for g, (_, cfg) in groups.items()}
        self.launches = {g: TELaunch(use_weight_cache=start_mode != "cold",
                                     serve_weights=start_mode == "peer" or weights_donors,
                                     kv_listen=kv_transport if g == "decode" else "", ports=distflow_ports,
                                     main_address=main_address, adopt_grace_s=adopt_grace_s) for g in GROUPS}
        self.state = state
        self.max_queued, self.start_mode = max_queued, start_mode
        self.hosts: list[Host] = list(hosts or ())
        self.threads_per_te, self.health_timeout_s = threads_per_te, health_timeout_s
        self.place_timeout_s = place_timeout_s
        self.groups: dict[str, list[TEHandle]] = {g: [] for g in GROUPS}
        self.target: dict[str, int] = {g: n for g, (n, _) in groups.items()}
        self.by_hand: set[str] = set()   # groups whose size POST /admin/scale set (the autoscaler keeps it)
        self.pending: dict[str, deque[Task]] = {g: deque() for g in GROUPS}
        self.batch_pending: dict[str, deque[Task]] = {g: deque() for g in GROUPS}  # low-priority tasks held
        self.trees = {g: PromptTree(self.engine_cfgs[g].block_size) for g in GROUPS}
        self.id_index: dict[str, set[str]] = {}  # context cache id -> ids of the TEs that pin it
        self.policy, self.imbalance = policy, imbalance
        # The predictor learns only where the PD-aware step can ask it: beside a heatmap.
        self.heatmap, self.predictor = heatmap, DecodeLengthPredictor() if heatmap else None
        self.weights_bytes = weights_estimate(model_path)  # corrected by the first TE's Ready
        for host in self.hosts:
            host.weights_bytes = self.weights_bytes
        self._rr = itertools.count()
        self._turns = {g: itertools.count() for g in GROUPS}  # round-robin, per group
        self.started = self.closing = False
        self.replacing = 0               # TEs being started to replace dead ones
        self._max_model_len = 0
        self.work_held = {g: asyncio.Event() for g in GROUPS}  # wakes a group's autoscaler at once
        self.arrived = dict.fromkeys(GROUPS, 0)  # tasks submitted per group, ever (arrival rates)
        # Each size change, with its reason and the autoscaler's inputs, and a count per
        # (group, reason) for the metrics.
        self.decisions: deque[dict] = deque(maxlen=DECISIONS_KEPT)
        self.decision_counts: Counter[tuple[str, str]] = Counter()
        self.autoscaler: dict[str, dict] = {}  # each group's autoscaler state at its last tick
        self._background: set[asyncio.Task] = set()

    @property
    def tes(self) -> list[TEHandle]:
        return [te for group in self.groups.values() for te in group]

    def ready_tes(self, group: str | None = None) -> list[TEHandle]:
        """Ready TEs of `group`, or of every group."""
        return [te for te in (self.groups[group] if group else self.tes) if te.state is TEState.READY]

    def free_tes(self, group: str, low_priority: bool = False) -> list[TEHandle]:
        """Ready TEs of `group` with a free batch slot: one no task holds for a low-priority
        task, one no other task holds for another (low-priority ones give theirs up)."""
        return [te for te in self.ready_tes(group)
                if te.load - (0 if low_priority else te.batch_load) < te.engine_cfg.max_num_seqs]

    async def start(self) -> None:
        """Start the hosts' node agents (templates), then the groups' TEs. After a restart the
        adopted TEs serve at once: the rest happens in the background, missing TEs as refills."""
        if self.tes:  # /health says "degraded" until the refills are ready
            missing = [g for g, n in self.target.items() for _ in range(n - len(self.live(g)))]
            self.replacing += len(missing)
            self._in_background(self._start_hosts(refill=missing))
        else:
            await self._start_hosts()
        self.started = True
        self._in_background(self.watch_health())

    async def _start_hosts(self, refill: list[str] | None = None) -> None:
        await asyncio.gather(*(host.node.start() for host in self.hosts))
        if refill is not None:
            for group in refill:
                self._in_background(self._replace(group))
            return
        if (missing := self.target_beyond_room()):
            raise NoRoom(missing)
        await asyncio.gather(*(self.add_te(g) for g, n in self.target.items() for _ in range(n)))

    def _in_background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ hosts and placement

    def add_host(self, host: Host) -> None:
        """A host joins (at start, or a Ray node that came up): groups short of their target refill."""
        self.hosts.append(host)
        host.weights_bytes = self.weights_bytes
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
        return sum(host.room(self.te_cost(group)) for host in self.hosts)

    def live(self, group: str) -> list[TEHandle]:
        return [te for te in self.groups[group] if not te.retiring]

    def target_beyond_room(self, group: str | None = None, instances: int = 0) -> str:
        """Why the target sizes (with `group` set to `instances`) do not fit, or "" if they do."""
        target = {**self.target, **({group: instances} if group else {})}
        need = {g: n - len(self.live(g)) for g, n in target.items() if n > len(self.live(g))}
        free = {h.name: h.memory - h.used() for h in self.hosts}
        fits = {}
        for g, n in need.items():  # greedily, as add_te would place them
            cost, fits[g] = self.te_cost(g), 0
            for name in free:
                k = min(n - fits[g], max(0, free[name] // cost))
                fits[g] += k
                free[name] -= k * cost
            if fits[g] < n:
                cfg = self.engine_cfgs[g]
                hosts = "; ".join(h.describe() for h in self.hosts) or "no live host"
                return (f"{target[g]} {g} TEs do not fit: {len(self.live(g)) + fits[g]} can run. Each new TE commits "
                        f"{cost / GiB:.2f} GiB (KV pool {cfg.kv_cache_gb:g} GiB, runtime and activations"
                        f"{', its own weights' if self.start_mode in ('cold', 'peer') else ''}); hosts: {hosts}. "
                        f"Lower kv_cache_gb or add hosts.")
        return ""

    def _place(self, cost: int, hosts: list[Host] | None = None) -> Host | None:
        """The host (of `hosts`, default all) for a new process of `cost`, None where none fits:
        the fewest TEs first (spread the load), then the most free memory."""
        fitting = [h for h in (self.hosts if hosts is None else hosts) if h.room(cost)]
        return min(fitting, key=lambda h: (len(h.tes), h.used() - h.memory), default=None)

    def add_process(self, proc) -> Host:
        """Place a process that is not a TE (a training task: scheduler/fine_tuning.py; it has
        `id`, `cost`, `set_threads`, `fail`) on a host that can start it, counted there as a TE
        is: its memory committed and a share of the cores. NoRoom if no host has the memory now."""
        host = self._place(proc.cost, [h for h in self.hosts if hasattr(h.node, "launch_training")])
        if host is None:
            raise NoRoom(f"no host has {proc.cost / GiB:.2f} GiB free for {proc.id}: "
                         + ("; ".join(h.describe() for h in self.hosts) or "no live host"))
        host.make_room(proc.cost)
        host.tes.append(proc)
        self.rebalance(host)
        return host

    def remove_process(self, proc, host: Host) -> None:
        host.tes.remove(proc)
        self.rebalance(host)

    def rebalance(self, host: Host) -> None:
        """Share the machine's cores among its TEs again, every base model's (its TE count changed)."""
        if not self.threads_per_te:
            for te in (te for h in host.machine for te in h.tes):
                te.set_threads(host.threads_per_te())

    def donor(self) -> str | None:
        """A running TE's DistFlow weights address, spreading new hosts over the donors."""
        donors = [te.weights_addr for te in self.ready_tes() if te.weights_addr]
        return donors[next(self._rr) % len(donors)] if donors else None

    async def add_te(self, group: str) -> TEHandle:
        t0 = time.perf_counter()
        host = self._place(self.te_cost(group))
        if host is None:
            raise NoRoom(self.target_beyond_room(group, len(self.live(group)) + 1) or f"no room for a {group} TE")
        for peer in host.make_room(self.te_cost(group)):
            self.decide("template", 0, 0, "evict_least_likely",
                        {"evicted": peer.model, "for": host.model,
                         "demand": {h.model: round(h.demand, 3) for h in host.machine}})
        cfg = replace(self.engine_cfgs[group], num_threads=self.threads_per_te or host.threads_per_te(extra=1))
        te = TEHandle(f"te-{next(TE_IDS)}", group, cfg, host, self.te_cost(group), observer=self)
        self.groups[group].append(te)
        host.tes.append(te)
        self.rebalance(host)
        try:
            ready = await te.start(replace(self.launches[group], host=host.address, te_id=te.id),
                                   self.donor() if self.start_mode == "peer" else None)
        except BaseException:  # failed or cancelled mid-start: leave no process behind
            self._forget(te)
            te.kill()
            raise
        self.weights_bytes = host.weights_bytes = ready.weights_bytes or self.weights_bytes
        self.rebalance(host)  # TEs that joined while this one started
        self._max_model_len = self._max_model_len or te.max_model_len  # all TEs share one config
        self._record(te)
        te.ping()  # its first frame from here: it counts itself in service (and waits for a restart)
        self._place_pending(group)
        te.timings_ms["scaler_post"] = 1e3 * (time.perf_counter() - te.t_ready)
        te.timings_ms["total"] = 1e3 * (time.perf_counter() - t0)
        log.info("TE %s ready on %s (pid %d, %s, %d threads): %s", te.id, host.name, te.pid, te.start_mode,
                 te.threads, {k: round(v, 1) for k, v in te.timings_ms.items()})
        return te

    def _forget(self, te: TEHandle) -> None:
        if self.state:
            best_effort(self.state.delete, TERow, te.id)
        if te in self.groups[te.group]:
            self.groups[te.group].remove(te)
        if te in te.host.tes:
            te.host.tes.remove(te)
            self.rebalance(te.host)
        self.trees[te.group].remove_te(te.id)
        for cache_id in self.pins_on(te.id):  # its contexts are lost with it (caches.py rebuilds them)
            self.pin_dropped(cache_id, te.id)

    # ------------------------------------------------------------------ restart (the state dir)

    def _record(self, te: TEHandle) -> None:
        """Keep a serving TE in the state dir, for the next main process to adopt (if the TE
        waits for one: it made a secret)."""
        if self.state and te.secret:
            best_effort(self.state.insert, TERow(te.id, self.model_path, te.group, te.host.name, te.pid, te.secret,
                                                 asdict(te.engine_cfg), te.start_mode,
                                                 self.launches[te.group].main_address), replace=True)

    async def adopt(self, listener: TEListener, wait_s: float = ADOPT_WAIT_S) -> None:
        """After a restart, before `start`: take back the TEs the state dir lists, as they
        reconnect to `listener` within `wait_s` (nothing is forked or loaded), with the context
        caches they pin, and restore the group targets. A TE that does not come back in time
        is killed (a frozen one would never exit) and replaced by `start`."""
        global TE_IDS
        if row := self.state.get(GroupTargetsRow, self.model_path):
            self.target.update(row.target)
            self.by_hand = set(row.by_hand)
        t0 = time.perf_counter()
        rows = self.state.select(TERow, "model = ?", (self.model_path,))
        hosts = {h.name: h for h in self.hosts}
        arrivals = {row.id: listener.expect(row.id, row.secret)[1] for row in rows}
        if arrivals:
            await asyncio.wait(arrivals.values(), timeout=wait_s)
        for row in rows:
            listener.forget(row.id)
            arrived, host = arrivals[row.id], hosts.get(row.host)
            te = TEHandle(row.id, row.group_name, EngineConfig(**row.engine_config), host, self.te_cost(row.group_name),
                          observer=self)
            te.pid, te.start_mode = row.pid, row.start_mode
            try:
                if not arrived.done() or host is None:
                    raise TimeoutError(f"it did not reconnect within {wait_s:g} s")
                ready = await te.adopt(*arrived.result())
            except (RuntimeError, OSError, TimeoutError, ValueError) as e:
                arrived.cancel()
                if te.writer:
                    te.writer.close()
                if host:  # frozen, or too late: it must not linger
                    host.node.kill_stale(row.pid)
                log.warning("TE %s (pid %d) not adopted: %s", row.id, row.pid, e)
                best_effort(self.state.delete, TERow, row.id)
                continue
            self.groups[te.group].append(te)
            host.tes.append(te)
            self.weights_bytes = host.weights_bytes = ready.weights_bytes or self.weights_bytes
            self._max_model_len = self._max_model_len or te.max_model_len
            for cache_id in ready.pinned:
                self.pin_started(cache_id, te.id)
            log.info("TE %s (pid %d) adopted on %s, pinning %d context cache(s)", te.id, te.pid, host.name,
                     len(ready.pinned))
        for host in self.hosts:
            self.rebalance(host)
        if rows:
            log.warning("re-adopted %d of %d TE(s) in %.0f ms", len(self.tes), len(rows), 1e3 * (time.perf_counter() - t0))
        # new TEs are numbered past the adopted ones
        TE_IDS = itertools.count(max([next(TE_IDS), *(int(r.id.removeprefix("te-")) + 1 for r in rows)]))

    # ------------------------------------------------------------------ what TE handles report (TEObserver)

    def on_step(self, te: TEHandle) -> None:
        self.trees[te.group].update(te.id, te.stats.cached, te.stats.evicted)
        self._place_pending(te.group)

    def on_free(self, te: TEHandle) -> None:
        self._place_pending(te.group)

    def on_death(self, te: TEHandle) -> None:
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
        except (RuntimeError, OSError, TimeoutError) as e:  # killed mid-start, its template gone, ...
            log.error("a replacement %s TE failed to start: %s; trying again in %d s", group, e, HEARTBEAT_S)
            await asyncio.sleep(HEARTBEAT_S)
            if not self.closing and len(self.live(group)) < self.target[group]:
                self._refill(group)
        finally:
            self.replacing -= 1

    async def watch_health(self) -> None:
        """The heartbeat: ping every serving TE each second (it answers with its stats between
        steps, and its liveness thread says `Alive` twice a second, even during a long step; any
        frame counts). Fail one that stayed silent past `health_timeout_s` (frozen, or its
        host gone), or that has been in one step for `STEP_BOUND` health timeouts (hung). And
        fail the tasks that waited for a TE past `place_timeout_s`."""
        while not self.closing:
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            self._expire_pending(now)
            for te in self.tes:
                if te.state not in (TEState.READY, TEState.DRAINING):
                    continue
                if now - te.last_heard > self.health_timeout_s:
                    te.fail(f"answered no heartbeat for {now - te.last_heard:.0f} s")
                elif te.busy_s > STEP_BOUND * self.health_timeout_s:
                    te.fail(f"has been in one step for {te.busy_s:.0f} s")
                else:
                    te.ping()

    def decide(self, group: str, before: int, after: int, reason: str, inputs: dict) -> None:
        """Keep a scaling or pre-loading decision with its reason and inputs (`/admin/cluster`, metrics)."""
        self.decisions.append({"t": round(time.time(), 3), "group": group, "from": before, "to": after,
                               "reason": reason, "inputs": inputs})
        self.decision_counts[group, reason] += 1
        log.info("group %s: %d -> %d (%s)", group, before, after, reason)

    def note_autoscaler(self, group: str, state: dict, demand: float | None) -> None:
        """A group's autoscaler's state at its tick; `demand`: the model's predicted arrival rate,
        which orders template evictions on its hosts."""
        self.autoscaler[group] = state
        for host in self.hosts if demand is not None else ():
            host.demand = demand
        self.prewarm()

    def prewarm(self) -> None:
        """Size each host's pool of pre-warmed TEs (scaling/prewarm.py) by prediction: the TEs this
        model's groups are expected to need within a start (the sum of their autoscalers' `need_p`),
        rounded up from a tenth, at least the pool's floor, at most what fits. A pool refills only
        while none of the host's TEs started within `REFILL_AFTER_S` (its forks would queue ahead
        of theirs, then take cores from their first steps)."""
        expected, now = sum(a.get("need_p", 0.0) for a in self.autoscaler.values()), time.perf_counter()
        for host in self.hosts:
            if not isinstance(pool := getattr(host.node, "pool", None), PrewarmPool):
                continue
            room = host.room(max(map(self.te_cost, GROUPS)))
            n = max(pool.floor, min(math.ceil(expected - 0.1), room))
            if n != pool.size:
                self.decide("prewarm", pool.size, n, "predicted", {"expected": round(expected, 3), "room": room})
            pool.resize(n, refill=all(te.state is not TEState.STARTING and now - te.t_ready > REFILL_AFTER_S
                                      for te in host.tes))

    def scale_to(self, group: str, instances: int, reason: str = "admin", inputs: dict | None = None) -> None:
        """Set the group's size: start TEs (as many as fit), or retire idle ones first (busy
        ones drain). The decision is kept with its reason and the inputs that led to it."""
        self.decide(group, self.target[group], instances, reason, inputs or {})
        self.target[group] = instances
        if reason == "admin":
            self.by_hand.add(group)
        if self.state:
            best_effort(self.state.insert, GroupTargetsRow(self.model_path, self.target, sorted(self.by_hand)),
                        replace=True)
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
        """The served context: as the first ready TE reported it, or before any TE (a group
        that starts at zero) as the engine will compute it from the model's metadata."""
        if not self._max_model_len:
            limit = read_model_config(self.model_path).max_position
            self._max_model_len = min(self.engine_cfgs["colocated"].max_model_len or limit, limit)
        return self._max_model_len

    def pd_aware(self, task: Task) -> str:
        """Algorithm 1, first step (dist_sched): the group whose queue the task waits in. The
        decode length is predicted only where the heatmap is asked."""
        fixed = dist_sched.pd_group(self.target, task.cache_id and self.cache_group(), self.heatmap is not None)
        group, why = fixed or dist_sched.pd_aware(
            len(task.prompt_ids), self.predictor.predict(task.prompt_ids, task.params.max_tokens), self.heatmap)
        task.placement = {"pd": why}
        return group

    def learn_decode_lengths(self, tasks: list[Task]) -> None:
        """Finished tasks teach the decode-length predictor, where there is one."""
        for t in tasks if self.predictor else ():
            self.predictor.observe(t.prompt_ids, t.num_output)

    def cache_group(self) -> str:
        """Where context caches are pinned, and their requests run: colocated TEs if the
        cluster has any, else prefill TEs."""
        return "colocated" if self.target["colocated"] else "prefill"

    def admit(self, num_tasks: int) -> None:
        """Refuse work past the bound: tasks beyond what the TEs run at once wait in queues.
        A PD task holds a decode slot from its placement to its end, so decode TEs count.
        Low-priority tasks count for nothing (their JE bounds them)."""
        running_groups = ("colocated", "decode")
        capacity = sum(self.target[g] * self.engine_cfgs[g].max_num_seqs for g in running_groups) + self.max_queued
        held = sum(te.load - te.batch_load for g in running_groups for te in self.groups[g]) + \
            sum(map(len, self.pending.values()))
        if num_tasks and held + num_tasks > capacity:
            raise Overloaded("server is at capacity")

    def submit(self, task: Task) -> None:
        group = self.pd_aware(task)
        task.t_queued = time.monotonic()
        if task.params.low_priority:
            self.batch_pending[group].append(task)
        else:
            self.arrived[group] += 1
            self.pending[group].append(task)
        self._place_pending(group)

    def _choose(self, task: Task, tes: list[TEHandle], group: str, locality: bool) -> tuple[TEHandle, dict]:
        """dist_sched's TE of `tes` (free TEs of `group`) for `task`, and why."""
        by_id, adapter_why = {te.id: te for te in tes}, {}
        if task.adapter:
            ids, adapter_why = dist_sched.adapter_aware(list(by_id), {te.id: te.stats.lora_slots for te in tes},
                                                        task.adapter.digest)
            tes = [by_id[i] for i in ids]
        seed = task.adapter and hash_seed(task.adapter.digest)
        matched = self.trees[group].matched_tokens(task.prompt_ids, [te.id for te in tes], seed) if locality else {}
        te_id, why = dist_sched.choose_te({te.id: te.load for te in tes},
                                          {te.id: te.load for te in self.ready_tes(group)}, matched, self.policy,
                                          self.imbalance, next(self._turns[group]), self.holders(task.cache_id))
        return by_id[te_id], {**why, **adapter_why}

    def _place_pending(self, group: str) -> None:
        """Hand held tasks to TEs with a free batch slot, oldest first, low-priority ones only
        once no other waits. The rest wait here, not in a TE's queue, so a TE that joins later
        (a scale-out) shares the backlog. A PD task needs a free prefill TE and a free decode
        TE; the decode TE hears of it first."""
        group = "prefill" if group == "decode" else group  # a decode slot freed: PD tasks may go
        low = not self.pending[group]
        queue, pd = self.batch_pending[group] if low else self.pending[group], group == "prefill"
        while queue:
            free, free_decode = self.free_tes(group, low), self.free_tes("decode", low) if pd else []
            if not free or (pd and not free_decode):
                for g in () if low else (group, "decode") if pd else (group,):  # wakes the autoscalers now
                    self.work_held[g].set()
                return
            task = queue.popleft()
            te, why = self._choose(task, free, group, locality=True)
            task.placement.update(why, host=te.host.name)
            te.host.last_used = time.monotonic()
            if not pd:
                te.submit(task)
                continue
            ids, cached = dist_sched.decode_candidates(
                {d.id: d.load for d in free_decode}, {d.id for d in free_decode if d.host is te.host},
                self.trees["decode"].matched_tokens(task.prompt_ids, [d.id for d in free_decode],
                                                    task.adapter and hash_seed(task.adapter.digest)))
            decode_te, task.placement["decode"] = self._choose(task, [d for d in free_decode if d.id in ids],
                                                               "decode", locality=False)
            task.placement["decode"].update(host=decode_te.host.name, matched_tokens=cached)
            task.decode = Task(task.job_id, task.index, task.prompt_ids, task.params, events=task.events,
                               adapter=task.adapter)
            decode_te.submit(task.decode)
            te.submit(task, kv_to=decode_te.kv_addr_for(te.host),
                      kv_skip=cached // self.engine_cfgs["decode"].block_size)
        if not low and self.batch_pending[group]:
            self._place_pending(group)

    def _expire_pending(self, now: float) -> None:
        """End the tasks that waited for a TE past `place_timeout_s` with a 503 and why."""
        for group, queue in self.pending.items():
            while queue and now - queue[0].t_queued > self.place_timeout_s:
                queue.popleft().events.put_nowait(TaskEvent([], FinishReason.ERROR, status=503, error=(
                    f"no {group} TE became free within {self.place_timeout_s:g} s: {self._why_waiting(group)}")))

    def _why_waiting(self, group: str) -> str:
        """What keeps `group`'s tasks waiting (for a PD task, the decode group too)."""
        def why(g: str) -> str:
            if ready := self.ready_tes(g):
                return f"the {g} group's {len(ready)} ready TE(s) are busy"
            if live := self.live(g):
                return f"the {g} group's {len(live)} TE(s) are still starting"
            if self.room(g):
                return f"the {g} group has 0 TEs (its target is {self.target[g]})"
            return f"the {g} group has 0 TEs and cannot grow ({self.target_beyond_room(g, 1)})"
        return "; ".join(map(why, ("prefill", "decode") if group == "prefill" else (group,)))

    def resubmit(self, task: Task) -> None:
        """Place a task again after its TE died (held until the refill if no TE is left, at
        most `place_timeout_s`)."""
        if self.closing:
            raise Overloaded("server is shutting down")
        task.retries += 1
        self.abort([task])  # the other half of a PD pair, if it is alive
        # A new id: frames the old attempt's TEs had already sent are dropped, not taken as this one's.
        task.id, task.decode = f"{task.id.split('.')[0]}.{task.retries}", None
        self.submit(task)

    def abort(self, tasks: list[Task]) -> None:
        tasks = tasks + [t.decode for t in tasks if t.decode]
        for queue in (*self.pending.values(), *self.batch_pending.values()):
            for t in tasks:
                if t in queue:
                    queue.remove(t)
        for te in self.tes:
            te.abort([t.id for t in tasks if t.te_id == te.id])

    # ------------------------------------------------------------------ the ID index (context caches)

    def pin_started(self, cache_id: str, te_id: str) -> None:
        """A context's build on `te_id` began: its pinning budget there is taken from now on."""
        self.id_index.setdefault(cache_id, set()).add(te_id)

    def pin_dropped(self, cache_id: str, te_id: str) -> None:
        """`te_id` holds the context no more (its build failed, or the TE is gone)."""
        self.id_index.get(cache_id, set()).discard(te_id)

    def unpin(self, cache_id: str) -> None:
        """The context is deleted or expired: its TEs unpin it."""
        holders = self.id_index.pop(cache_id, set())
        for te in self.tes:
            if te.id in holders:
                te.unpin([cache_id])

    def holders(self, cache_id: str | None) -> set[str]:
        return self.id_index.get(cache_id, set())

    def pins_on(self, te_id: str) -> list[str]:
        return [c for c, holders in self.id_index.items() if te_id in holders]

    def healthy(self) -> bool:
        """False while a dead TE's replacement is starting, or a non-empty group has no TE ready."""
        return self.replacing == 0 and all(self.ready_tes(g) or not self.target[g] for g in self.groups)

    async def shutdown(self) -> None:
        self.closing = True
        if self.state:  # a clean stop: the next main process starts as its flags say
            best_effort(self.state.delete, GroupTargetsRow, self.model_path)
        for t in list(self._background):
            t.cancel()
        for queue in (*self.pending.values(), *self.batch_pending.values()):
            while queue:
                queue.popleft().events.put_nowait(TaskEvent([], FinishReason.ERROR, error="server is shutting down",
                                                            status=503))
        await asyncio.gather(*(te.stop() for te in self.tes), return_exceptions=True)
        await asyncio.gather(*(host.node.stop() for host in self.hosts), return_exceptions=True)

    def to_dict(self) -> dict:
        local = self.hosts[0].node.to_dict() if len(self.hosts) == 1 else {}  # one host: its template, pool
        return {"start_mode": self.start_mode, **local,
                "hosts": [h.to_dict() for h in self.hosts],
                "te_cost_gb": {g: round(self.te_cost(g) / GiB, 3) for g in GROUPS},
                "weights_gb": round(self.weights_bytes / GiB, 3),
                "groups": {name: {"target": self.target[name], "tes": [te.id for te in tes],
                                  "pending": len(self.pending[name]),
                                  "batch_pending": len(self.batch_pending[name]), "engine_config": asdict(self.engine_cfgs[name])}
                           for name, tes in self.groups.items()},
                "heatmap": self.heatmap and asdict(self.heatmap),
                "scaling_decisions": list(self.decisions),
                "autoscaler": self.autoscaler,
                "tes": [te.to_dict() for te in self.tes]}


def weights_estimate(model_path: str) -> int:
    """The weights' size before any TE reported it: the loading-optimized cache if there is
    one (what the template maps), else the model file."""
    try:
        cached = weights_cache_path(model_path)
        return os.path.getsize(cached if cached.exists() else model_path)
    except OSError:
        return 0
