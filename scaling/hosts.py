"""Hosts: where TEs start, and what each one costs there.

A `Host` is one machine (or, in the tests, one network namespace): its address, its cores,
the memory TEs may use, the TEs on it, and its node agent, which starts TEs there (the
local backend's `scaling.node.LocalNode`, or a Ray actor through `scaling.ray_backend.
RayNode`). The local backend is a cluster of one host (`scaling.node.local_host`).

A TE's cost is known before it starts (`te_bytes`): its KV pool and its RTC's DRAM tier
(allocated and zeroed at start, so the memory is really committed), its runtime's private
pages and its activations, and its own copy of the weights when it does not share the
host's (a cold start reads the model file; a peer start receives a copy). The weights a
host's template maps count once per host. A training task (flowserve/train.py) counts among
a host's TEs (`train_bytes`), so serving and training share its memory and cores. Placement
(`scheduler/cluster.py`) only starts a TE where it fits; threads follow the host's cores
divided among its TEs, re-balanced as that count changes.
"""
import os
import secrets
from dataclasses import dataclass, field

from flowserve.config import EngineConfig

GiB, MiB = 1 << 30, 1 << 20
# Measured on SmolLM2-135M (docs/BENCHMARKS.md section 8): besides its KV pool, a forked TE
# owns ~5 MiB at rest and ~35 MiB after a 600-token prompt; a fresh interpreter's own
# anonymous memory (torch's runtime) is ~175 MiB. A 512-token step peaks ~80 MiB above rest.
RUNTIME_BYTES = {"fork": 32 * MiB, "other": 192 * MiB}
ACTIVATION_BYTES_PER_TOKEN = 160 << 10
# A training task (flowserve/train.py, SmolLM2-135M, float32): the activations autograd keeps,
# ~3.4 MiB per token of a step's batch (measured at 4x48 to 4x512 tokens); the weights are the
# host's (the same mmap'ed cache as the template's), the LoRA factors and their Adam state ~30 MiB.
TRAIN_BYTES_PER_TOKEN = 3584 << 10
HEADROOM = 0.9  # of the memory available at registration: the page cache and the OS keep the rest


def te_bytes(cfg: EngineConfig, start_mode: str, weights_bytes: int) -> int:
    """Memory one TE of `cfg` commits on its host, besides the weights the host shares. A TP
    TE (flowserve/tp.py) adds its executors, forks of its master: each its runtime pages, and
    between them a copy of the fused column-parallel weights (wqkv, w_gate_up: their shards
    are not slices of one piece), ~1/4 of `weights_bytes` when that counts the packed linears
    the template made for the shards too (fork); in the other modes they also pack their
    shards themselves, and `weights_bytes` counts the weights alone: ~3/2 of it in all
    (measured on SmolLM2-135M by bench/tp.py)."""
    own_weights = weights_bytes if start_mode in ("cold", "peer") else 0
    runtime = RUNTIME_BYTES["fork" if start_mode == "fork" else "other"]
    if cfg.tensor_parallel_size > 1:
        runtime += cfg.tensor_parallel_size * RUNTIME_BYTES["fork"]
        own_weights += weights_bytes // 4 if start_mode == "fork" else 3 * weights_bytes // 2
    kv = int(cfg.kv_cache_gb * GiB) + int(cfg.dram_kv_gb * GiB)
    return kv + runtime + cfg.max_num_batched_tokens * ACTIVATION_BYTES_PER_TOKEN + own_weights


def train_bytes(tokens_per_step: int) -> int:
    """Memory a training task commits on its host: a fresh interpreter's runtime, the LoRA
    state and the activations of its largest step."""
    return RUNTIME_BYTES["other"] + 32 * MiB + tokens_per_step * TRAIN_BYTES_PER_TOKEN


def secret_env() -> dict[str, str]:
    """A new deployment's DistFlow secret, for the environment of every TE and template it
    starts on any host: DistFlow peers must show it (flowserve/distflow.py)."""
    return {"DEEPFLOW_DISTFLOW_SECRET": secrets.token_hex(32)}


def probe() -> dict:
    """This machine's cores and the memory TEs may use (`DEEPFLOW_HOST_MEMORY_GB` overrides:
    hosts that are namespaces of one machine must split its memory)."""
    if "DEEPFLOW_HOST_MEMORY_GB" in os.environ:
        memory = int(float(os.environ["DEEPFLOW_HOST_MEMORY_GB"]) * GiB)
    else:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        memory = int(kb * 1024 * HEADROOM)
    return {"cores": len(os.sched_getaffinity(0)), "memory": memory}


@dataclass(eq=False)
class Host:
    """One base model's view of a machine: its node agent there and its TEs. The hosts of
    every base model on one machine (`machine`, this one included) share its cores and memory,
    and each holds its model's weights in DRAM once (`weights_bytes`, while `weights_resident`)."""
    name: str
    address: str                 # what its TEs bind and advertise (DistFlow listeners)
    cores: int
    memory: int                  # bytes its TEs may commit
    node: object                 # its node agent: launch(), kill(), kill_stale(), stop(), to_dict()
    tes: list = field(default_factory=list)   # TEHandles placed here, starting ones included
    alive: bool = True
    machine: list = field(default_factory=list)  # every base model's Host on this machine
    weights_bytes: int = 0       # its model's weights in DRAM (the cluster learns them)
    weights_resident: bool = True  # False once its template was evicted for another model's TEs
    last_used: float = 0.0       # monotonic time a task was last placed here
    demand: float = 0.0          # its model's long-run arrival rate (its autoscaler's): which template leaves first
    model: str = ""              # the base model's name, for the decisions that name it

    def __post_init__(self):
        self.machine.append(self)

    def used(self) -> int:
        return sum(h.weights_bytes * h.weights_resident + sum(te.cost for te in h.tes) for h in self.machine)

    def room(self, cost: int) -> int:
        """How many more TEs of `cost` fit here, counting what evicting idle models would free."""
        free = self.memory - self.used() + sum(h.weights_bytes for h in self._evictable())
        return max(0, free // cost) if self.alive else 0

    def threads_per_te(self, extra: int = 0) -> int:
        return max(1, self.cores // max(1, sum(len(h.tes) for h in self.machine) + extra))

    def _evictable(self) -> list["Host"]:
        """The machine's other models with no TE here whose template holds their weights, the
        least likely to be needed first: the lowest predicted arrival rate (`demand`; the chance
        of an arrival within any horizon grows with it), then the least recently used."""
        return sorted((h for h in self.machine if h is not self and h.weights_resident and not h.tes
                       and hasattr(h.node, "evict")), key=lambda h: (h.demand, h.last_used))

    def make_room(self, cost: int) -> list["Host"]:
        """Before a TE of `cost` starts here (and this model's weights come back to DRAM if they
        had left): evict idle models' templates, the least likely to be needed first, until it
        fits; return those evicted. An evicted template starts again with its model's next TE."""
        self.weights_resident, evicted = True, []
        for peer in self._evictable():
            if self.memory - self.used() >= cost:
                break
            peer.node.evict()
            peer.weights_resident = False
            evicted.append(peer)
        return evicted

    def describe(self) -> str:
        return (f"{self.name}: {self.cores} cores, {self.memory / GiB:.1f} GiB for TEs, "
                f"{len(self.tes)} TE(s) and the weights use {self.used() / GiB:.1f} GiB")

    def to_dict(self) -> dict:
        return {"name": self.name, "address": self.address, "alive": self.alive, "cores": self.cores,
                "memory_gb": round(self.memory / GiB, 2), "used_gb": round(self.used() / GiB, 2),
                "weights_resident": self.weights_resident, "tes": [te.id for te in self.tes],
                "threads_per_te": self.threads_per_te(), **self.node.to_dict()}
