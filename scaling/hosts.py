"""Hosts: where TEs start, and what each one costs there.

A `Host` is one machine (or, in the tests, one network namespace): its address, its cores,
the memory TEs may use, the TEs on it, and its node agent, which starts TEs there (the
local backend's `scaling.node.LocalNode`, or a Ray actor through `scaling.ray_backend.
RayNode`). The local backend is a cluster of one host (`scaling.node.local_host`).

A TE's cost is known before it starts (`te_bytes`): its KV pool and its RTC's DRAM tier
(allocated and zeroed at start, so the memory is really committed), its runtime's private
pages and its activations, and its own copy of the weights when it does not share the
host's (a cold start reads the model file; a peer start receives a copy). The weights a
host's template maps count once per host. Placement (`scheduler/cluster.py`) only starts
a TE where it fits; threads follow the host's cores divided among its TEs, re-balanced as
that count changes.
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
    name: str
    address: str                 # what its TEs bind and advertise (DistFlow listeners)
    cores: int
    memory: int                  # bytes its TEs may commit
    node: object                 # its node agent: launch(), kill(), stop(), to_dict()
    tes: list = field(default_factory=list)   # TEHandles placed here, starting ones included
    alive: bool = True

    def used(self, weights_bytes: int) -> int:
        return weights_bytes + sum(te.cost for te in self.tes)

    def room(self, cost: int, weights_bytes: int) -> int:
        """How many more TEs of `cost` fit here."""
        return max(0, (self.memory - self.used(weights_bytes)) // cost) if self.alive else 0

    def threads_per_te(self, extra: int = 0) -> int:
        return max(1, self.cores // max(1, len(self.tes) + extra))

    def describe(self, weights_bytes: int) -> str:
        return (f"{self.name}: {self.cores} cores, {self.memory / GiB:.1f} GiB for TEs, "
                f"{len(self.tes)} TE(s) and the weights use {self.used(weights_bytes) / GiB:.1f} GiB")

    def to_dict(self, weights_bytes: int) -> dict:
        return {"name": self.name, "address": self.address, "alive": self.alive, "cores": self.cores,
                "memory_gb": round(self.memory / GiB, 2), "used_gb": round(self.used(weights_bytes) / GiB, 2),
                "tes": [te.id for te in self.tes], "threads_per_te": self.threads_per_te(), **self.node.to_dict()}
