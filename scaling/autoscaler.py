"""The autoscaler: one per TE group (colocated, prefill, decode) of each base model.

Every `interval_s`, or at once when the cluster has to hold one of the group's tasks,
`autoscale` reads the group from the cluster (`scheduler/cluster.py`), the model's recent
latencies (`scheduler/metrics.py`) and the other groups' wants on the machine (`Board`) into
plain numbers (`Signals`), asks its policy's decision function for the group's size, and
sets it with `cluster.scale_to`, which keeps the decision with its inputs and reason
(`/admin/cluster`, and the counter `deepflow:scaling_decisions_total`). New TEs fork from
the warm template in well under a second, so a policy can react to load instead of
over-provisioning for it.

Three policies (`serve --autoscaler`, default `queue`); `kpa` and `capacity` share `decide`:
- `capacity`. A group's demand is its concurrency: tasks held for it plus tasks on its TEs.
  A burst (a TE's worth of arrivals within the panic window asking for `panic_ratio` times
  the size, or any demand at zero TEs) gets batch slots for all of it in one decision, held
  for a stable window: every task gets a slot, so none waits a whole generation for one
  (TTFT). Otherwise the demand's peak over the stable window sets the size (a TE leaves only
  after a window without the work for it: a TE started again is not free on a CPU, its
  first steps fault its pages in, its adapters load again), growing only within the group's
  fair share of the host's cores (`fair_share`): TEs past the cores split the same cores
  (each runs cores / TEs threads), so a backlog on busy cores gets no more TEs, nor do the
  arrivals expected while a TE starts, nor SLO misses. (On a CPU shared with other tenants
  that assumption did not hold: docs/BENCHMARKS.md section 13.) Keep-alive: without work
  for `idle_s` a group keeps one TE while its model's long-run arrival rate makes an
  arrival within the next `idle_s` likely (`p_next`, Poisson, >= `prewarm_p`), and
  otherwise scales to zero.
- `kpa`, after Knative's KPA: the same windows on the demand plus the expected arrivals,
  with TEs at `target_util` of their slots, an SLO miss while work waits adds a TE, and
  keep-alive to zero. No notion of the cores: on a CPU host it over-provisions
  (docs/BENCHMARKS.md section 13).
- `queue` (the first baseline): one TE more while tasks are held or more than
  `waiting_per_te` sequences wait per ready TE and no TE is starting; one fewer after
  `idle_s` without work.
All stay between `min_tes` and `max_tes` and ask only for what fits (`room`), so a full
host never makes them retry a start that cannot succeed. Fair between models (what it
means): every group with work gets a TE, before any gets a second, while memory lasts; the
cores are split max-min fairly among the groups that want them (none gets less than an
equal share unless it wants less, and what it leaves goes to the others); and while a
group with work has no TE and no room, every other group with more than one TE gives one
back (`fair`), so no model starves another.
"""
import asyncio
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field

PD_LATENCY = {"colocated": ("ttft", "tpot"), "prefill": ("ttft",), "decode": ("tpot",)}


@dataclass
class ScalePolicy:
    min_tes: int
    max_tes: int | None         # None: as many as the hosts fit
    kind: str = "queue"         # capacity | kpa | queue
    waiting_per_te: int = 4     # queue: scale out past this many waiting sequences per TE
    idle_s: float = 30.0        # keep-alive: no work this long, then down to min_tes (capacity: or 1, if predicted)
    interval_s: float = 0.25
    target_util: float = 0.7    # kpa: share of a TE's batch slots it should carry (capacity: all of them)
    stable_s: float = 6.0       # window whose mean demand sets the size
    panic_s: float = 1.0        # window whose peak demand may start a panic
    panic_ratio: float = 2.0    # panic when the peak wants this many times the size
    start_s: float = 0.5        # a TE's start, over which arrivals are anticipated
    rate_tau_s: float = 2.0     # time constant of the arrival-rate EWMA that sizes
    predict_tau_s: float = 30.0  # capacity: time constant of the long-run rate that predicts the next arrival
    prewarm_p: float = 0.5      # capacity: keep a TE past the keep-alive while p_next is at least this
    slo_ttft_s: float = 0.0     # 0: no TTFT target
    slo_tpot_s: float = 0.0     # 0: no TPOT target
    slo_goal: float = 0.95      # share of recent requests that must meet the targets


@dataclass
class Signals:
    """One group at one tick, as plain numbers."""
    now: float
    size: int                # the group's target size
    ready: int               # TEs serving
    starting: int            # TEs not ready yet
    arrivals: int            # tasks submitted to the group since the last tick
    held: int                # tasks the cluster holds for lack of a free TE of the group
    running: int             # tasks on the group's TEs (those queued in their batchers included)
    waiting: int             # sequences queued in the TEs' batchers
    slots: int               # batch slots per TE (max_num_seqs)
    room: int                # how many more TEs of the group fit on the hosts
    oldest_wait_s: float = 0.0               # the longest a held task has waited
    ttft_met: float | None = None            # share of recent first tokens within the TTFT SLO
    tpot_met: float | None = None            # same for TPOT
    retiring: int = 0        # TEs of the group draining before they stop
    share: int = 1 << 20     # capacity: the group's fair share of the hosts' cores, in TEs
    peer_starved: bool = False  # another group on the machine has work, no TE and no room


@dataclass
class ScaleState:
    """What a decision function remembers between ticks."""
    t: float | None = None
    rate: float = 0.0                        # arrivals per second, EWMA (rate_tau_s)
    rate_long: float = 0.0                   # same, predict_tau_s: how likely the model is needed
    samples: deque = field(default_factory=deque)  # (time, demand, arrivals) over the stable window
    panic_until: float = -math.inf
    busy_t: float = field(default_factory=time.monotonic)  # when the group last had work


@dataclass
class Decision:
    size: int
    reason: str
    inputs: dict
    want: int = 0            # the size before the shares and bounds (what the group asks of the Board)


def ewma(value: float, sample: float, dt: float, tau: float) -> float:
    return value + (1 - math.exp(-dt / tau)) * (sample - value)


def p_next(rate: float, horizon_s: float, free: int = 0) -> float:
    """Probability of more than `free` arrivals within `horizon_s` at a Poisson `rate`."""
    mean = rate * horizon_s
    term = below = math.exp(-mean)
    for k in range(1, free + 1):
        term *= mean / k
        below += term
    return max(0.0, 1 - below)


def observe(p: ScalePolicy, st: ScaleState, s: Signals) -> None:
    """Update the arrival-rate EWMAs with the tick's arrivals."""
    dt = s.now - st.t if st.t is not None else p.interval_s
    st.t = s.now
    if dt > 0:
        st.rate = ewma(st.rate, s.arrivals / dt, dt, p.rate_tau_s)
        st.rate_long = ewma(st.rate_long, s.arrivals / dt, dt, p.predict_tau_s)


def decide(p: ScalePolicy, st: ScaleState, s: Signals) -> Decision:
    """The `capacity` or `kpa` policy's size for the group (module docstring)."""
    observe(p, st, s)
    capacity = p.kind == "capacity"
    concurrency = s.held + s.running
    ahead = st.rate * p.start_s
    demand = concurrency if capacity else concurrency + ahead
    st.samples.append((s.now, demand, s.arrivals))
    while st.samples[0][0] < s.now - p.stable_s:
        st.samples.popleft()
    per_te = s.slots if capacity else max(1.0, p.target_util * s.slots)
    stable = max(d for _, d, _ in st.samples) if capacity else sum(d for _, d, _ in st.samples) / len(st.samples)
    peak = max(d for t, d, _ in st.samples if t >= s.now - p.panic_s)
    want_stable, want_panic = math.ceil(stable / per_te - 0.01), math.ceil(peak / per_te - 0.01)
    if concurrency or s.arrivals:
        st.busy_t = s.now
    # capacity: a burst is a TE's worth of arrivals within the panic window (or any at zero
    # TEs), not a backlog grown on busy cores, which more TEs splitting them would not serve sooner
    arrived = sum(a for t, _, a in st.samples if t >= s.now - p.panic_s)
    sudden = not capacity or not s.size or arrived >= s.slots
    slow_queue = p.slo_ttft_s and s.held and s.oldest_wait_s > p.slo_ttft_s / 2 and not capacity
    if (want_panic > s.size and want_panic >= p.panic_ratio * s.size and sudden) or slow_queue:
        st.panic_until = s.now + p.stable_s
    compute = s.share if capacity else math.inf  # capacity: TEs past the share only split its cores
    if s.now < st.panic_until:
        size, reason = max(s.size, want_panic, 1 if concurrency else 0), "burst"
    else:
        # the share caps growth; shrinking waits for the work to go (shares move as other
        # models come and go, and a TE retired then started again is paid twice)
        size, reason = min(want_stable, max(compute, s.size, 1)), "load"
    if capacity and ahead and size < min(compute, math.ceil((peak + ahead) / per_te - 0.01)):
        size, reason = min(compute, math.ceil((peak + ahead) / per_te - 0.01)), f"{reason}+ahead"
    missed = [k for k, met in (("ttft", s.ttft_met), ("tpot", s.tpot_met)) if met is not None and met < p.slo_goal]
    if (missed and (s.held or s.waiting) and not s.starting and size <= s.size < concurrency
            and s.size < compute):
        size, reason = s.size + 1, f"slo_{missed[0]}"
    p_need = p_next(st.rate_long, p.idle_s)
    if s.now - st.busy_t >= p.idle_s:
        keep = capacity and p_need >= p.prewarm_p and s.size > 0
        size, reason = (1, "predicted") if keep else (0, "keep_alive")
    elif size < 1 and s.size:
        size = 1  # within the keep-alive a group keeps a TE
    want = size
    if s.peer_starved and s.size > 1 and size >= s.size and not s.retiring:
        size, reason = s.size - 1, "fair"  # a TE back for a group with work and no room
    inputs = {**asdict(s), "rate": round(st.rate, 2), "rate_long": round(st.rate_long, 3),
              "p_next": round(p_need, 3), "demand_stable": round(stable, 2), "demand_peak": round(peak, 2),
              "per_te": per_te}
    return bounded(p, s, size, reason, inputs, want)


def decide_queue(p: ScalePolicy, st: ScaleState, s: Signals) -> Decision:
    """The `queue` policy's size: one TE at a time on queue depth, one fewer after `idle_s` idle."""
    observe(p, st, s)  # its rates only predict (pre-warmed TEs)
    if s.held or s.running:
        st.busy_t = s.now
    inputs = asdict(s)
    if s.size < p.min_tes:
        return bounded(p, s, s.size + 1, "min", inputs)
    if not s.starting and (s.held or s.waiting > p.waiting_per_te * s.ready):
        return bounded(p, s, s.size + 1, "queue", inputs)
    if s.size > p.min_tes and s.now - st.busy_t > p.idle_s:
        st.busy_t = s.now
        return bounded(p, s, s.size - 1, "keep_alive", inputs)
    return bounded(p, s, s.size, "hold", inputs)


def bounded(p: ScalePolicy, s: Signals, size: int, reason: str, inputs: dict, want: int | None = None) -> Decision:
    """`size` within min_tes..max_tes and what fits on the hosts (the reason says which bound)."""
    want = size if want is None else want
    if p.max_tes is not None and size > p.max_tes:
        size, reason = p.max_tes, f"{reason}+max"
    fits = s.ready + s.starting + s.room
    if size > fits:  # never past what fits; a target already above it is left as it is
        size, reason = max(fits, min(s.size, size)), f"{reason}+room"
    if size < p.min_tes:
        size, reason = max(min(p.min_tes, fits), min(s.size, p.min_tes)), "min"
    return Decision(size, reason, inputs, want)


DECIDE = {"capacity": decide, "kpa": decide, "queue": decide_queue}


def fair_share(wants: dict, capacity: int) -> dict:
    """Max-min fair split of `capacity` TEs among the groups that want some (`wants`, in TEs):
    one each first, even past `capacity` (no group with work starves), then one at a time to
    those still short, in turn, until `capacity` is spent."""
    share = {k: int(w > 0) for k, w in wants.items()}
    left = capacity - sum(share.values())
    while left > 0 and (short := [k for k in sorted(wants, key=str) if share[k] < wants[k]]):
        for k in short[:left]:
            share[k] += 1
        left -= len(short[:left])
    return share


@dataclass
class Board:
    """The machine's groups, every base model's, as their autoscalers last saw them: what each
    wants (TEs) and whether it starves. Shares are read off it (`share`); one per server."""
    wants: dict = field(default_factory=dict)    # (model, group) -> TEs
    starved: dict = field(default_factory=dict)  # (model, group) -> bool

    def share(self, key: tuple[str, str], cores: int) -> int:
        """`key`'s fair share of `cores` if it wanted all of them."""
        return fair_share({**self.wants, key: max(1, cores)}, cores)[key]

    def peer_starved(self, key: tuple[str, str]) -> bool:
        return any(v for k, v in self.starved.items() if k != key)


def signals(cluster, group: str, latencies: deque | None, p: ScalePolicy, arrivals: int) -> Signals:
    """Read `group` of `cluster` (and the model's recent latencies: (time, ttft, tpot)) into Signals."""
    now = time.monotonic()
    live = cluster.live(group)
    ready = [te for te in live if te.state == "ready"]
    source = "prefill" if group == "decode" else group  # a PD task waits for both halves
    held = cluster.pending[source]
    # batch work (low-priority tasks) alone keeps one TE, or starts one from zero; beside other work it asks nothing
    interactive = sum(te.load - te.batch_load for te in live)
    batch_alone = not (held or interactive) and bool(cluster.batch_pending[source] or any(te.batch_load for te in live))
    met = {}
    recent = [x for x in latencies or () if x[0] > now - p.stable_s]
    for k, i, slo in (("ttft", 1, p.slo_ttft_s), ("tpot", 2, p.slo_tpot_s)):
        seen = [x[i] for x in recent if x[i] is not None]
        if slo and seen and k in PD_LATENCY[group]:
            met[k] = sum(v <= slo for v in seen) / len(seen)
    return Signals(now, cluster.target[group], len(ready), len(live) - len(ready), arrivals,
                   len(held) or int(batch_alone and not live), interactive or int(batch_alone),
                   sum(max(0, te.stats.waiting - te.batch_load) for te in ready),
                   cluster.engine_cfgs[group].max_num_seqs, cluster.room(group),
                   now - held[0].t_queued if held else 0.0, met.get("ttft"), met.get("tpot"),
                   len(cluster.groups[group]) - len(live))


async def autoscale(cluster, group: str, policy: ScalePolicy, latencies: deque | None = None,
                    board: Board | None = None, model: str = "") -> None:
    """Size `group` of `cluster` until it closes (`latencies`: the model's, from its metrics;
    `board`: the machine's, shared by every base model's autoscalers; `model`: its name there)."""
    source = "prefill" if group == "decode" else group  # PD tasks arrive at prefill's queue
    state, counted, wake = ScaleState(), cluster.arrived[source], cluster.work_held[group]
    board, key = board or Board(), (model, group)
    while not cluster.closing:
        try:
            await asyncio.wait_for(wake.wait(), policy.interval_s)
        except TimeoutError:
            pass
        wake.clear()
        arrived = cluster.arrived[source]
        s = signals(cluster, group, latencies, policy, arrived - counted)
        counted = arrived
        s.share = board.share(key, sum(h.cores for h in cluster.hosts if h.alive))
        s.peer_starved = board.peer_starved(key)
        d = DECIDE[policy.kind](policy, state, s)
        board.wants[key] = d.want
        board.starved[key] = bool(s.held and not s.ready + s.starting and not s.room)
        # the chance that the next start time brings more arrivals than the group has free slots
        free = max(0, (s.ready + s.starting) * s.slots - s.held - s.running)
        cluster.note_autoscaler(group, {"policy": policy.kind, "want": d.want, "share": s.share,
                                        "rate": round(state.rate, 2), "rate_long": round(state.rate_long, 3),
                                        "p_next": round(p_next(state.rate_long, policy.idle_s), 3),
                                        "need_p": round(p_next(state.rate_long, policy.start_s, free), 3),
                                        "slo_ttft_s": policy.slo_ttft_s, "ttft_met": s.ttft_met,
                                        "slo_tpot_s": policy.slo_tpot_s, "tpot_met": s.tpot_met},
                                state.rate_long if group == source else None)
        if d.size != s.size:
            cluster.scale_to(group, d.size, d.reason, d.inputs)
