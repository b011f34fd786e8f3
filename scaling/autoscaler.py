"""The autoscaler: one per TE group (colocated, prefill, decode) of each base model.

Every `interval_s`, or at once when the cluster has to hold one of the group's tasks,
`autoscale` reads the group from the cluster (`scheduler/cluster.py`) and the model's
recent latencies (`scheduler/metrics.py`) into plain numbers (`Signals`), asks its
policy's decision function for the group's size, and sets it with `cluster.scale_to`,
which keeps the decision with its inputs and reason (`/admin/cluster`, and the counter
`deepflow:scaling_decisions_total`). New TEs fork from the warm template in well under a
second, so the policy reacts to load instead of over-provisioning for it.

Two policies (`serve --autoscaler`):
- `slo` (`decide`), after Knative's KPA. The group's demand is its concurrency (tasks held
  for it plus tasks on its TEs) plus the arrivals expected while a TE starts (an EWMA of
  the arrival rate times `start_s`); a TE should carry `target_util` of its batch slots.
  The demand's mean over the stable window sets the size. Its peak over the panic window,
  when it asks for `panic_ratio` times the size or more (a burst; any demand on a group at
  zero), or a held task that has waited half the TTFT SLO, starts a panic: the group grows
  at once to what the peak needs, in one decision, and does not shrink until a stable
  window passes without panic. Recent TTFT (prefill, colocated) or TPOT (decode,
  colocated) SLO misses while work waits add a TE. A group without work for the
  keep-alive `idle_s` goes to `min_tes` (0: scale to zero); before that it keeps one TE.
  PD groups each follow their own load, so the prefill:decode split follows the traffic.
- `queue` (`decide_queue`, the baseline before it): one TE more while tasks are held or
  more than `waiting_per_te` sequences wait per ready TE and no TE is starting; one fewer
  after `idle_s` without work.
Both stay between `min_tes` and `max_tes` and ask only for what fits (`room`), so a full
host never makes them retry a start that cannot succeed.
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
    kind: str = "slo"           # slo | queue
    waiting_per_te: int = 4     # queue: scale out past this many waiting sequences per TE
    idle_s: float = 30.0        # keep-alive: no work this long, then down to min_tes
    interval_s: float = 0.25
    target_util: float = 0.7    # slo: share of a TE's batch slots it should carry
    stable_s: float = 6.0       # slo: window whose mean demand sets the size
    panic_s: float = 1.0        # slo: window whose peak demand may start a panic
    panic_ratio: float = 2.0    # slo: panic when the peak wants this many times the size
    start_s: float = 0.5        # slo: a TE's start, over which arrivals are anticipated
    rate_tau_s: float = 2.0     # slo: time constant of the arrival-rate EWMA
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


@dataclass
class ScaleState:
    """What a decision function remembers between ticks."""
    t: float | None = None
    rate: float = 0.0                        # arrivals per second, EWMA
    samples: deque = field(default_factory=deque)  # (time, demand) over the stable window
    panic_until: float = -math.inf
    busy_t: float = field(default_factory=time.monotonic)  # when the group last had work


@dataclass
class Decision:
    size: int
    reason: str
    inputs: dict


def decide(p: ScalePolicy, st: ScaleState, s: Signals) -> Decision:
    """The `slo` policy's size for the group (KPA-like stable and panic windows, SLOs, keep-alive)."""
    dt = s.now - st.t if st.t is not None else p.interval_s
    st.t = s.now
    if dt > 0:
        st.rate += (1 - math.exp(-dt / p.rate_tau_s)) * (s.arrivals / dt - st.rate)
    concurrency = s.held + s.running
    demand = concurrency + st.rate * p.start_s
    st.samples.append((s.now, demand))
    while st.samples[0][0] < s.now - p.stable_s:
        st.samples.popleft()
    per_te = max(1.0, p.target_util * s.slots)
    stable = sum(d for _, d in st.samples) / len(st.samples)
    peak = max(d for t, d in st.samples if t >= s.now - p.panic_s)
    want_stable, want_panic = math.ceil(stable / per_te - 0.01), math.ceil(peak / per_te - 0.01)
    if concurrency or s.arrivals:
        st.busy_t = s.now
    slow_queue = p.slo_ttft_s and s.held and s.oldest_wait_s > p.slo_ttft_s / 2
    if (want_panic > s.size and want_panic >= p.panic_ratio * s.size) or slow_queue:
        st.panic_until = s.now + p.stable_s
    if s.now < st.panic_until:
        size, reason = max(s.size, want_panic, 1 if concurrency else 0), "burst"
    else:
        size, reason = want_stable, "load"
    missed = [k for k, met in (("ttft", s.ttft_met), ("tpot", s.tpot_met)) if met is not None and met < p.slo_goal]
    if missed and (s.held or s.waiting) and not s.starting and size <= s.size < concurrency:
        size, reason = s.size + 1, f"slo_{missed[0]}"
    if s.now - st.busy_t >= p.idle_s:
        size, reason = 0, "keep_alive"
    elif size < 1 and s.size:
        size = 1  # within the keep-alive a group keeps a TE
    inputs = {**asdict(s), "rate": round(st.rate, 2), "demand_stable": round(stable, 2),
              "demand_peak": round(peak, 2), "per_te": per_te}
    return bounded(p, s, size, reason, inputs)


def decide_queue(p: ScalePolicy, st: ScaleState, s: Signals) -> Decision:
    """The `queue` policy's size: one TE at a time on queue depth, one fewer after `idle_s` idle."""
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


def bounded(p: ScalePolicy, s: Signals, size: int, reason: str, inputs: dict) -> Decision:
    """`size` within min_tes..max_tes and what fits on the hosts (the reason says which bound)."""
    if p.max_tes is not None and size > p.max_tes:
        size, reason = p.max_tes, f"{reason}+max"
    fits = s.ready + s.starting + s.room
    if size > fits:  # never past what fits; a target already above it is left as it is
        size, reason = max(fits, min(s.size, size)), f"{reason}+room"
    if size < p.min_tes:
        size, reason = max(min(p.min_tes, fits), min(s.size, p.min_tes)), "min"
    return Decision(size, reason, inputs)


DECIDE = {"slo": decide, "queue": decide_queue}


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
                   now - held[0].t_queued if held else 0.0, met.get("ttft"), met.get("tpot"))


async def autoscale(cluster, group: str, policy: ScalePolicy, latencies: deque | None = None) -> None:
    """Size `group` of `cluster` until it closes (`latencies`: the model's, from its metrics)."""
    source = "prefill" if group == "decode" else group  # PD tasks arrive at prefill's queue
    state, counted, wake = ScaleState(), cluster.arrived[source], cluster.work_held[group]
    while not cluster.closing:
        try:
            await asyncio.wait_for(wake.wait(), policy.interval_s)
        except TimeoutError:
            pass
        wake.clear()
        arrived = cluster.arrived[source]
        s = signals(cluster, group, latencies, policy, arrived - counted)
        counted = arrived
        d = DECIDE[policy.kind](policy, state, s)
        if d.size != s.size:
            cluster.scale_to(group, d.size, d.reason, d.inputs)
