"""LoRA in a TE: adapters in device slots, a step's rows grouped by slot, and the tiers behind
the slots (host memory, then disk).

Weights (`load_lora`): a checked PEFT adapter (`flowserve.lora`) made ready for the fused
linears of `flowserve.model`: per layer and fused linear, the A of every module it targets
stacked ([R, in], R the sum of their ranks) and B block-diagonal ([R, out], each module's B
in its slice of the fused output, the scale folded in): one pair of matmuls per fused
linear, x @ A.T @ B.

Device slots (`LoraStacks`, in `Llama`): per fused linear one tensor per factor, all slots
stacked ([slots, R, in]: a transposed view multiplies ~2x faster than [slots, in, R] for
rank-8 factors; [slots, R, out]), R growing to the widest adapter loaded; a slot's
unused columns are zero. A step's rows with an adapter (`LoraBatch`, from the plan's
segments) are grouped by slot once per step, padded to the largest group: each target
linear then adds y[rows] += (x[rows] @ A_slot) @ B_slot for all slots at once, with one
gather, two batched matmuls and one index_add (`LoraStacks.apply`), not a forward per
adapter. A step with no adapter rows costs nothing.

Tiers (`LoraCache`, in the engine): up to `max_loras` adapters in slots, keyed by content
digest; a slot a running or waiting sequence uses (`acquire` to `release`) is never evicted;
behind them an LRU of host copies (`max_cpu_loras`, plus any a sequence still needs), then
the disk. `prepare` (at `Engine.add_request`) reads and checks the adapter into host memory,
so a bad one fails its request at once; `acquire` (at admission) copies it into a slot, or
says the sequence must wait for one.
"""
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors

from flowserve.config import ModelConfig
from flowserve.lora import MODULES, LoraSpec, fused_slices, module_shape, read_files, read_lora
from flowserve.protocol import Adapter

log = logging.getLogger("flowserve.lora")
LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # "layers.{i}.{fused}" -> (A [R, in], B [R, out])


def load_lora(adapter: Adapter, cfg: ModelConfig, max_rank: int, dtype: torch.dtype) -> LoraWeights:
    """Read, check and fuse the adapter at `adapter.path` (host memory, `dtype`). ValueError if
    it is bad (`flowserve.lora.read_lora`) or its content is not the digest it was named by."""
    files = read_files(adapter.path)
    spec = read_lora(adapter.path, cfg, max_rank, files)
    if adapter.digest and spec.digest != adapter.digest:
        raise ValueError(f"LoRA adapter {adapter.name!r}: the files at {adapter.path!r} changed since it was "
                         f"registered (digest {spec.digest[:12]}, expected {adapter.digest[:12]})")
    return fuse_lora(spec, load_safetensors(files[1]), cfg, dtype)


def fuse_lora(spec: LoraSpec, tensors: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> LoraWeights:
    by_part = {spec.tensors[k]: t for k, t in tensors.items()}
    first_row = fused_slices(cfg)
    out: LoraWeights = {}
    for layer in range(cfg.num_layers):
        for fused in dict.fromkeys(MODULES.values()):
            parts = [m for m, f in MODULES.items() if f == fused and (layer, m, "A") in by_part]
            if not parts:
                continue
            width = sum(module_shape(cfg, m)[0] for m, f in MODULES.items() if f == fused)
            a = torch.cat([by_part[layer, m, "A"].float() for m in parts])  # [R, in]
            b = torch.zeros(len(parts) * spec.rank, width)
            for j, m in enumerate(parts):
                rows = module_shape(cfg, m)[0]
                b[j * spec.rank:(j + 1) * spec.rank, first_row[m]:first_row[m] + rows] = \
                    by_part[layer, m, "B"].float().T * spec.scale
            out[f"layers.{layer}.{fused}"] = (a.to(dtype).contiguous(), b.to(dtype))
    return out


@dataclass
class LoraBatch:
    """A step's adapter rows grouped by slot (slots 0..num_slots-1), each group padded to the
    largest: `rows` [num_slots * width] indexes the step's rows (padding: row 0), `pad`
    [num_slots, width, 1] is True where a row is padding (its delta is zeroed)."""
    num_slots: int
    rows: torch.Tensor
    pad: torch.Tensor


def lora_batch(segments: list[list[int]], device: torch.device) -> LoraBatch | None:
    """From a plan's segments ([slot, first row, rows] per sequence with an adapter)."""
    if not segments:
        return None
    groups: dict[int, list[int]] = {}
    for slot, first, n in segments:
        groups.setdefault(slot, []).extend(range(first, first + n))
    num_slots, width = max(groups) + 1, max(map(len, groups.values()))
    rows = [0] * (num_slots * width)
    pad = [[True] * width for _ in range(num_slots)]
    for slot, members in groups.items():
        rows[slot * width:slot * width + len(members)] = members
        pad[slot][:len(members)] = [False] * len(members)
    return LoraBatch(num_slots, torch.tensor(rows).to(device, non_blocking=True),
                     torch.tensor(pad)[..., None].to(device, non_blocking=True))


class LoraStacks:
    """The device slots of one model (one TP rank's shard): every slot's A and B, stacked per
    fused linear, created for a linear when the first adapter that targets it is loaded."""

    def __init__(self, num_slots: int, device: torch.device, dtype: torch.dtype):
        self.num_slots, self.device, self.dtype = num_slots, device, dtype
        self.a: dict[str, torch.Tensor] = {}  # name -> [slots, R, in]
        self.b: dict[str, torch.Tensor] = {}  # name -> [slots, R, out]

    def set(self, slot: int, weights: LoraWeights) -> None:
        """Put an adapter into `slot` (a copy to the device), replacing what it held."""
        for name in self.a:
            self.a[name][slot].zero_()
            self.b[name][slot].zero_()
        for name, (a, b) in weights.items():
            rank = a.shape[0]
            if name not in self.a or self.a[name].shape[1] < rank:
                self.grow(name, a.shape[1], b.shape[1], rank)
            self.a[name][slot, :rank].copy_(a, non_blocking=True)
            self.b[name][slot, :rank].copy_(b, non_blocking=True)

    def grow(self, name: str, d_in: int, d_out: int, rank: int) -> None:
        a = torch.zeros(self.num_slots, rank, d_in, dtype=self.dtype, device=self.device)
        b = torch.zeros(self.num_slots, rank, d_out, dtype=self.dtype, device=self.device)
        if name in self.a:
            old = self.a[name].shape[1]
            a[:, :old], b[:, :old] = self.a[name], self.b[name]
        self.a[name], self.b[name] = a, b

    def apply(self, x: torch.Tensor, y: torch.Tensor, name: str, batch: LoraBatch) -> None:
        """y[rows] += (x[rows] @ A_slot) @ B_slot for each adapter row, in place."""
        a = self.a.get(name)
        if a is None:
            return
        s = batch.num_slots
        xg = x.index_select(0, batch.rows).view(s, -1, x.shape[1])
        t = torch.bmm(xg, a[:s].transpose(1, 2)).masked_fill_(batch.pad, 0)
        y.index_add_(0, batch.rows, torch.bmm(t, self.b[name][:s]).view(-1, y.shape[1]))


@dataclass
class HostLora:
    adapter: Adapter
    weights: LoraWeights
    users: int = 0                # sequences added with it and not yet finished


class LoraCache:
    """Which adapter each device slot holds, and the host-memory tier behind them.
    `load(slot, adapter, weights)` puts an adapter into a slot (the model runner's `load_lora`)."""

    def __init__(self, num_slots: int, max_rank: int, max_host: int, cfg: ModelConfig, dtype: torch.dtype,
                 load: Callable[[int, Adapter, LoraWeights], None]):
        self.max_rank, self.max_host, self.cfg, self.dtype, self.load = max_rank, max_host, cfg, dtype, load
        self.slots: list[str | None] = [None] * num_slots   # digest held
        self.refs = [0] * num_slots                          # sequences using each slot
        self.idle: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_slots))  # refs 0, LRU first
        self.host: OrderedDict[str, HostLora] = OrderedDict()  # digest -> host copy, LRU first
        self.disk_loads = 0         # adapters read from disk
        self.slot_loads = 0         # adapters copied into a slot
        self.slot_load_s = 0.0      # time spent on those copies

    def prepare(self, adapter: Adapter) -> None:
        """A new sequence will run with `adapter`: have it in host memory (read from disk and
        checked if it is in no tier), held there until the sequence finishes. ValueError if bad."""
        entry = self.host.get(adapter.digest)
        if entry is None:
            t0 = time.perf_counter()
            entry = HostLora(adapter, load_lora(adapter, self.cfg, self.max_rank, self.dtype))
            self.disk_loads += 1
            log.info("LoRA %s (%s) read from disk in %.1f ms", adapter.name, adapter.digest[:12],
                     1e3 * (time.perf_counter() - t0))
            self.host[adapter.digest] = entry
        self.host.move_to_end(adapter.digest)
        entry.users += 1
        self.trim()

    def acquire(self, digest: str) -> int | None:
        """A slot holding the adapter, referenced until `release`: the one that holds it, or the
        least recently used idle one, loaded now. None if every slot is in use: wait."""
        if digest in self.slots:
            slot = self.slots.index(digest)
        elif self.idle:
            slot = next(iter(self.idle))
            entry = self.host[digest]
            t0 = time.perf_counter()
            self.load(slot, entry.adapter, entry.weights)
            self.slot_load_s += time.perf_counter() - t0
            self.slot_loads += 1
            self.slots[slot] = digest
        else:
            return None
        self.idle.pop(slot, None)
        self.refs[slot] += 1
        return slot

    def release(self, digest: str, slot: int | None) -> None:
        """A sequence with this adapter finished (`slot`: the one it held, if any)."""
        if slot is not None:
            self.refs[slot] -= 1
            if self.refs[slot] == 0:
                self.idle[slot] = None  # most recently used: evicted last
        self.host[digest].users -= 1
        self.trim()

    def stats(self) -> dict:
        """Its part of the engine's `Stats`."""
        return dict(lora_slots=list(self.slots), lora_disk_loads=self.disk_loads, lora_slot_loads=self.slot_loads,
                    lora_slot_load_ms=1e3 * self.slot_load_s)

    def trim(self) -> None:
        """Drop the least recently used host copies nobody waits for, past `max_host`."""
        spare = [d for d, e in self.host.items() if e.users == 0]
        for digest in spare[:max(0, len(self.host) - self.max_host)]:
            del self.host[digest]
