"""The Llama-family decoder (Llama 2/3, SmolLM2, ...) in plain torch, over a paged KV cache,
and `ModelRunner`, which owns the model and the KV-cache tensors of one TE.

From the batcher's list of (sequence, new tokens) the runner builds one flat step of tokens
from many sequences (`StepInput`: token ids, positions, KV slots, block tables): decode
tokens first, then prefill chunks. Every matmul runs on
all tokens at once; only attention looks at sequences: all decodes in one batched gather
over their block tables, each prefill chunk on its own with a causal mask offset by the
tokens already in the cache. Output is the final hidden state of the rows that need a
next token (sequences whose known tokens are now all computed), projected to logits.

Weights come from `flowserve.weights` already fused (wqkv, w_gate_up) and in the HF
(half-split) RoPE layout.

Two paths compute the same thing. The plain torch one runs on every device and is the
reference. On the CPU in float32 a fast path replaces some of its pieces, each one inside
the method that names it (`linear`, `add_norm`, `mlp`, `attention`, the RoPE in `forward`):
oneDNN-packed weights for the matmuls (`pack_linears`) and the C++ kernels of
`flowserve.kernels`. tests/test_kernels.py holds each to its reference.

LoRA (`flowserve/lora_slots.py`): each target linear adds, to the rows of a step that run with
an adapter, their adapter's delta, all adapters at once (`LoraStacks.apply`, inside `linear`,
so both paths apply it); the step's plan names each sequence's slot (`StepPlan.lora`).

Tensor parallelism (`flowserve/tp.py`): a TP executor's `Llama` holds one rank's shard
(`shard_weights`: heads, a slice of the MLP and of the vocabulary) and sums the ranks'
partial results where Megatron's split needs it (`Llama.reduce`, torch.distributed). The
step's inputs are first planned as plain lists (`plan_step`), the form a TP master sends its
executors, then made tensors on the device (`step_input`).
"""
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flowserve import kernels
from flowserve.sequence import Sequence
from flowserve.config import EngineConfig, ModelConfig
from flowserve.lora_slots import LoraBatch, LoraStacks, LoraWeights, lora_batch
from flowserve.protocol import Adapter, PrefillPlan, StepPlan


PACK_BATCH = 32  # oneDNN picks the packed layout for this many rows; all row counts work
MKL_ROWS = 1024  # from this many rows MKL's sgemm on the plain weights beats oneDNN's packed ones


@dataclass
class PrefillChunk:
    start: int              # first row of this chunk in the flat step
    num_tokens: int
    context_len: int        # tokens in the cache for this sequence once the chunk is written
    block_ids: torch.Tensor  # [num_blocks] the sequence's block table


@dataclass
class StepInput:
    input_ids: torch.Tensor      # [T]
    positions: torch.Tensor      # [T]
    slot_mapping: torch.Tensor   # [T] flat KV slot (block * block_size + offset) per token
    num_decodes: int             # rows 0..num_decodes-1 are decode tokens, one per sequence
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks], padded with 0
    decode_lens: torch.Tensor | None          # [num_decodes] tokens in the cache per decode (this one included)
    prefills: list[PrefillChunk]
    logits_rows: torch.Tensor    # [R] rows whose next token is sampled
    lora: LoraBatch | None = None  # the rows with a LoRA adapter, grouped by slot


def rope_tables(cfg: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_position, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim/2]. Half-split (HF) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention with a boolean keep-mask. Plain matmuls: for a handful of query
    rows per KV head they beat SDPA on CPU, and they run on every backend."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


class Llama:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 cpu_kernels: bool = True, packed: dict[str, torch.Tensor] | None = None,
                 rank: int = 0, world: int = 1, max_loras: int = 0):
        """`weights`: the whole model's. With tensor parallelism over `world` ranks this holds
        rank `rank`'s shard of them (`shard_weights`), `self.cfg` is the shape of its share
        (its heads, its slice of the MLP), and the forward sums the ranks' partial results."""
        self.rank, self.world = rank, world
        self.vocab_start = rank * -(-cfg.vocab_size // world)  # the first id of its slice of the vocabulary
        self.w = {k: v.to(device) for k, v in shard_weights(cfg, weights, rank, world).items()}
        self.cfg = cfg = cfg if world == 1 else replace(
            cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
            intermediate_size=cfg.intermediate_size // world)
        # the weights the matmuls use, by name (views of self.w; the head may be the embedding)
        self.linears = {k: v for k, v in self.w.items() if k.endswith(("wqkv", "wo", "w_gate_up", "w_down"))}
        self.linears["lm_head"] = self.w.get("lm_head", self.w["embed"])
        self.cos, self.sin = rope_tables(cfg, device)
        self.scale = cfg.head_dim ** -0.5
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        fast = cpu_kernels and device.type == "cpu" and self.w["embed"].dtype == torch.float32
        self.packed = (packed or pack_linears(self.linears)) if fast and torch.backends.mkldnn.is_available() else None
        self.kernels = fast and kernels.available()
        self.lora = LoraStacks(max_loras, device, self.w["embed"].dtype) if max_loras else None

    def linear(self, x: torch.Tensor, name: str, lora: LoraBatch | None = None) -> torch.Tensor:
        """x @ W^T, plus each LoRA row's adapter delta (`lora`: the step's, None for the head)."""
        if self.packed is not None and x.shape[0] < MKL_ROWS:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed[name], None, "none", [], "")
        else:
            y = F.linear(x, self.linears[name])
        if lora is not None:
            self.lora.apply(x, y, name, lora)
        return y

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's start. Vocabulary-parallel: a rank looks up the ids of its
        slice of the table and leaves zeros for the others; the sum over ranks is exact."""
        table = self.w["embed"]
        if self.world == 1:
            return F.embedding(ids, table)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= table.shape[0])
        return self.reduce(F.embedding(local.clamp(0, table.shape[0] - 1), table).masked_fill_(outside[:, None], 0))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor parallelism: make whole, on every rank, what each holds a part of (the
        output of a row-parallel matmul, a vocabulary-parallel lookup): an in-place all-reduce."""
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Add `delta` to the residual stream `h` (in place) and return RMSNorm(h) * weight."""
        if self.kernels:
            out = torch.empty_like(h)
            torch.ops.deepflow.add_rms_norm_(h, delta, weight, out, self.cfg.rms_norm_eps)
            return out
        h += delta
        return F.rms_norm(h, (self.cfg.hidden_size,), weight, self.cfg.rms_norm_eps)

    def mlp(self, x: torch.Tensor, p: str, lora: LoraBatch | None = None) -> torch.Tensor:
        gate_up = self.linear(x, p + "w_gate_up", lora)
        if self.kernels:
            act = torch.empty(x.shape[0], gate_up.shape[1] // 2, dtype=x.dtype, device=x.device)
            torch.ops.deepflow.silu_mul(act, gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return self.reduce(self.linear(act, p + "w_down", lora))

    @torch.inference_mode()
    def forward(self, step: StepInput, kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
                on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits [R, vocab] for `step.logits_rows` (with tensor parallelism, this rank's slice
        of the vocabulary); writes this step's K/V into kv_cache.
        `on_layer(i)` runs once layer i's K/V are written (PD: DistFlow sends them meanwhile)."""
        cfg, w, lora = self.cfg, self.w, step.lora
        h = self.embed(step.input_ids)  # the residual stream
        x = F.rms_norm(h, (cfg.hidden_size,), w["layers.0.attn_norm"], cfg.rms_norm_eps)
        if not self.kernels:  # the kernel reads the tables by position itself
            cos, sin = self.cos[step.positions], self.sin[step.positions]
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            qkv = self.linear(x, p + "wqkv", lora)
            if self.kernels:  # rotate q and k where they lie, in the fused projection's output
                torch.ops.deepflow.rope_(qkv, step.positions, self.cos, self.sin,
                                         cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(-1, cfg.num_heads, cfg.head_dim)
            k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
            if not self.kernels:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
            k_cache, v_cache = kv_cache[i]
            # cache layout [kv_heads, num_blocks, block_size, head_dim]: a gather by block id
            # yields each sequence's keys contiguous per head, ready for a batched matmul.
            k_cache.flatten(1, 2).index_copy_(1, step.slot_mapping, k.transpose(0, 1))
            v_cache.flatten(1, 2).index_copy_(1, step.slot_mapping, v.transpose(0, 1))
            if on_layer is not None:
                on_layer(i)
            o = self.attention(q, k_cache, v_cache, step)
            x = self.add_norm(h, self.reduce(self.linear(o, p + "wo", lora)), w[p + "ffn_norm"])
            last = i + 1 == cfg.num_layers  # the next norm: the next layer's, or the final one
            x = self.add_norm(h, self.mlp(x, p, lora), w["norm"] if last else w[f"layers.{i + 1}.attn_norm"])
        return self.linear(x[step.logits_rows], "lm_head")

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  step: StepInput) -> torch.Tensor:
        cfg = self.cfg
        kvh, group, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        n = step.num_decodes
        if n and self.kernels:
            torch.ops.deepflow.paged_decode_attention(out[:n], q[:n], k_cache, v_cache, step.decode_block_tables,
                                                      step.decode_lens, self.scale)
        elif n:  # the reference: gather each sequence's blocks, then batched matmuls
            bt = step.decode_block_tables
            k = gather_blocks(k_cache, bt)           # [kvh, B, L, d]
            mask = torch.arange(k.shape[2], device=q.device)[None, :] < step.decode_lens[:, None]
            # slots past a decode's length were never written (the pool is not zeroed): a masked
            # score weighs 0, but 0 * NaN is NaN
            v = gather_blocks(v_cache, bt).masked_fill_(~mask[None, :, :, None], 0)
            qd = q[:n].view(n, kvh, group, d).transpose(0, 1)  # the group's query heads share K/V
            o = attend(qd, k, v, mask[None, :, None, :], self.scale)
            out[:n] = o.transpose(0, 1).reshape(n, cfg.num_heads, d)
        for c in step.prefills:
            k = gather_blocks(k_cache, c.block_ids[None])[:, 0, :c.context_len]  # [kvh, L, d]
            v = gather_blocks(v_cache, c.block_ids[None])[:, 0, :c.context_len]
            qc = q[c.start:c.start + c.num_tokens]
            first = c.context_len - c.num_tokens  # tokens of this sequence cached before the chunk
            if self.kernels:  # torch's fused CPU attention: 1.7-2.4x the matmuls' speed at 170-512 tokens
                mask = causal_mask(first, c.context_len, q.device) if first else None
                o = F.scaled_dot_product_attention(qc.transpose(0, 1)[None], k[None], v[None], scale=self.scale,
                                                   attn_mask=mask, is_causal=not first, enable_gqa=True)
                out[c.start:c.start + c.num_tokens] = o[0].transpose(0, 1)
            else:
                qp = qc.view(c.num_tokens, kvh, group, d).permute(1, 2, 0, 3)
                o = attend(qp, k[:, None], v[:, None], causal_mask(first, c.context_len, q.device), self.scale)
                out[c.start:c.start + c.num_tokens] = o.permute(2, 0, 1, 3).reshape(c.num_tokens, cfg.num_heads, d)
        return out.view(-1, self.q_size)


def causal_mask(first: int, length: int, device: torch.device) -> torch.Tensor:
    """[length - first, length] keep-mask: query row i (position first + i) sees keys 0..first + i."""
    return torch.arange(length, device=device)[None, :] <= torch.arange(first, length, device=device)[:, None]


def shard_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], rank: int,
                  world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s share of the weights for tensor parallelism over `world` ranks (Megatron's
    split). Column-parallel, output rows split: wqkv (the rank's query heads and their KV
    heads) and w_gate_up (its slice of the MLP). Row-parallel, input columns split, the
    outputs summed over ranks: wo and w_down. Vocabulary-parallel, by rows: the embedding and
    the head. Norms whole. A slice of one weight is a view of its pages; wqkv and w_gate_up
    fuse parts whose slices lie apart, so their shards are copies."""
    if world == 1:
        return weights
    d, kv = cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q_rows, kv_rows, mlp_rows = cfg.num_heads * d // world, kv // world, cfg.intermediate_size // world
    vocab_rows = -(-cfg.vocab_size // world)  # the last rank's slice may be shorter

    def part(t: torch.Tensor, rows: int) -> torch.Tensor:
        return t[rank * rows:(rank + 1) * rows]

    out = {}
    for name, t in weights.items():
        if name.endswith("wqkv"):
            q, k, v = t.split([cfg.num_heads * d, kv, kv])
            out[name] = torch.cat([part(q, q_rows), part(k, kv_rows), part(v, kv_rows)])
        elif name.endswith("w_gate_up"):
            gate, up = t.chunk(2)
            out[name] = torch.cat([part(gate, mlp_rows), part(up, mlp_rows)])
        elif name.endswith(("wo", "w_down")):
            out[name] = part(t.T, q_rows if name.endswith("wo") else mlp_rows).T
        elif name in ("embed", "lm_head"):
            out[name] = part(t, vocab_rows)
        else:
            out[name] = t
    return out


def shard_lora(cfg: ModelConfig, weights: LoraWeights, rank: int, world: int) -> LoraWeights:
    """Rank `rank`'s share of an adapter (`flowserve.lora_slots`: A [R, in], B [R, out]), split
    as `shard_weights` splits the base: a column-parallel linear's B by its output columns, a
    row-parallel one's A by its input rows, the other factor whole. A row-parallel linear's
    delta is then a partial sum, all-reduced with the base's."""
    if world == 1:
        return weights
    out = {}
    for name, (a, b) in weights.items():
        if name.endswith(("wqkv", "w_gate_up")):
            b = shard_weights(cfg, {name: b.T}, rank, world)[name].T
        else:
            a = shard_weights(cfg, {name: a}, rank, world)[name]
        out[name] = (a, b)
    return out


def pack_linears(linears: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The linear weights (`Llama.linears`) in oneDNN's blocked layout, for a float32 step
    on the CPU: its GEMMs at decode batch sizes run ~1.6x faster than MKL's on the plain
    layout. A copy (~0.54 GB for SmolLM2-135M): the warm template packs once before it
    forks, so its TEs share the pages."""
    return {k: torch.ops.mkldnn._reorder_linear_weight(v, PACK_BATCH) for k, v in linears.items()}


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[kvh, num_blocks, block_size, d] cache, [B, nb] block ids -> [kvh, B, nb * block_size, d]."""
    kvh, _, block_size, d = cache.shape
    b, nb = block_tables.shape
    return cache.index_select(1, block_tables.reshape(-1)).view(kvh, b, nb * block_size, d)


# ---------------------------------------------------------------------------- the runner

def runs(ids: list[int]) -> list[list[int]]:
    """[index in `ids`, first id, length] of each stretch of consecutive ids: one copy each."""
    out: list[list[int]] = []
    for i, block_id in enumerate(ids):
        if out and out[-1][1] + out[-1][2] == block_id:
            out[-1][2] += 1
        else:
            out.append([i, block_id, 1])
    return out


log = logging.getLogger("flowserve.model")


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * dtype.itemsize


def num_kv_blocks(mcfg: ModelConfig, ecfg: EngineConfig, dtype: torch.dtype) -> int:
    """The KV pool's size in blocks: `num_kv_blocks`, else as many as `kv_cache_gb` holds."""
    return ecfg.num_kv_blocks or max(1, int(ecfg.kv_cache_gb * 2**30) // kv_block_bytes(mcfg, ecfg.block_size, dtype))


def prompt_rows(step: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int, int]]:
    """(sequence, first position, count) of the prompt positions whose logits a step returns
    besides the sampled rows, in their order after them: each position's logits score the
    next prompt token (`SamplingParams.prompt_logprobs`, once per position)."""
    rows = []
    for seq, n in sorted(step, key=lambda item: item[1] > 1):
        if seq.prompt_logprobs is not None:
            first = max(seq.num_computed, len(seq.prompt_logprobs) - 1)
            last = min(seq.num_computed + n, seq.num_prompt - 1)
            if last > first:
                rows.append((seq, first, last - first))
    return rows


def plan_step(step: list[tuple[Sequence, int]], block_size: int, in_flight: list[Sequence] | None = None
              ) -> tuple[StepPlan, list[Sequence], list[tuple[int, int]]]:
    """The flat inputs of one step of (sequence, new tokens) work. Returns them, the
    sequences that get a token (one per logits row), and (row, index in `in_flight`) for
    each input token that the step in flight is still sampling (async scheduling; the plan
    holds 0 there). The logits rows of `prompt_rows(step)` follow the sampled ones."""
    # Single-token work (decodes) first, as one batch; then prefill chunks one by one.
    extra = prompt_rows(step)
    step = sorted(step, key=lambda item: item[1] > 1)
    plan = StepPlan([], [], [], [], [], [], [], [])
    ids, sampled, pending = plan.input_ids, [], []
    in_flight_row = {id(seq): i for i, seq in enumerate(in_flight)} if in_flight else {}
    row_of = {}  # a sequence's row of position 0, were it in the step
    bs = block_size
    for seq, n in step:
        start, end = seq.num_computed, seq.num_computed + n
        row0 = len(ids)
        ids += seq.token_ids[start:end]
        if end > len(seq.token_ids):  # the last input token is still being sampled
            pending.append((len(ids), in_flight_row[id(seq)]))
            ids.append(0)
        plan.positions.extend(range(start, end))
        plan.slot_mapping.extend(seq.block_ids[p // bs] * bs + p % bs for p in range(start, end))
        if n == 1:
            plan.decode_block_tables.append(seq.block_ids[:-(-end // bs)])
            plan.decode_lens.append(end)
        else:
            plan.prefills.append(PrefillPlan(row0, n, end, seq.block_ids[:-(-end // bs)]))
        if seq.lora_slot is not None:
            plan.lora.append([seq.lora_slot, row0, len(ids) - row0])
        if end == len(seq.token_ids) + seq.num_pending:
            plan.logits_rows.append(len(ids) - 1)
            sampled.append(seq)
        row_of[id(seq)] = row0 - start
    for seq, first, count in extra:
        plan.logits_rows.extend(range(row_of[id(seq)] + first, row_of[id(seq)] + first + count))
    return plan, sampled, pending


def step_input(plan: StepPlan, device: torch.device) -> StepInput:
    """A plan's lists as tensors on `device` (copies from host memory that nothing waits for)."""
    def to(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

    table, lens = None, None
    if plan.decode_block_tables:
        width = max(map(len, plan.decode_block_tables))
        table = to([t + [0] * (width - len(t)) for t in plan.decode_block_tables])
        lens = to(plan.decode_lens)
    return StepInput(
        input_ids=to(plan.input_ids), positions=to(plan.positions), slot_mapping=to(plan.slot_mapping),
        num_decodes=len(plan.decode_block_tables), decode_block_tables=table, decode_lens=lens,
        prefills=[PrefillChunk(c.start, c.num_tokens, c.context_len, to(c.block_ids)) for c in plan.prefills],
        logits_rows=to(plan.logits_rows), lora=lora_batch(plan.lora, device))


class ModelRunner:
    def __init__(self, mcfg: ModelConfig, ecfg: EngineConfig, weights: dict[str, torch.Tensor],
                 device: torch.device, dtype: torch.dtype, packed: dict[str, torch.Tensor] | None = None,
                 rank: int = 0, world: int = 1):
        """`rank`, `world`: a TP executor's (`flowserve/executor.py`): its shard of the model
        and its KV heads' share of the cache."""
        self.device, self.block_size, self.mcfg = device, ecfg.block_size, mcfg
        self.model = Llama(mcfg, weights, device, ecfg.cpu_kernels, packed, rank, world, ecfg.max_loras)
        self.num_blocks = num_kv_blocks(mcfg, ecfg, dtype)
        local = self.model.cfg
        shape = (local.num_kv_heads, self.num_blocks, ecfg.block_size, mcfg.head_dim)
        # Allocated, not touched (TE-Post-Load): the TE is ready before the pool's pages are
        # faulted in, each then on its first write. Attention reads a slot only once written,
        # but for the tail of a decode's last block and its block table's padding, which it
        # masks (`Llama.attention`): garbage there, even NaN, never reaches an output.
        self.kv_cache = [(torch.empty(shape, dtype=dtype, device=device),
                          torch.empty(shape, dtype=dtype, device=device)) for _ in range(mcfg.num_layers)]
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", self.num_blocks, ecfg.block_size,
                 self.num_blocks * kv_block_bytes(local, ecfg.block_size, dtype) / 2**30)

    def load_lora(self, slot: int, adapter: Adapter, weights: LoraWeights) -> None:
        """Put an adapter's weights (`flowserve.lora_slots.load_lora`, whole) into a device slot,
        this rank's shard of them with tensor parallelism."""
        self.model.lora.set(slot, shard_lora(self.mcfg, weights, self.model.rank, self.model.world))

    def kv_shape(self, num_blocks: int) -> list[int]:
        """Shape of the KV of `num_blocks` blocks as DistFlow moves it: [layers, K/V, heads, blocks, block, dim]."""
        heads, _, bs, dim = self.kv_cache[0][0].shape
        return [len(self.kv_cache), 2, heads, num_blocks, bs, dim]

    def read_kv(self, block_ids: list[int], out: torch.Tensor, layer: int) -> None:
        """Copy one layer's K/V of `block_ids` into `out[layer]` (`out`: host memory,
        `kv_shape(len(block_ids))`). One layer at a time: DistFlow sends each as the next is read."""
        idx = torch.tensor(block_ids, device=self.device)
        kv = self.kv_cache[layer]
        for i in (0, 1):  # on the CPU straight into the payload; from a device, gathered there first
            if out.device == kv[i].device:
                torch.index_select(kv[i], 1, idx, out=out[layer, i])
            else:
                out[layer, i].copy_(kv[i].index_select(1, idx))

    def write_kv(self, block_ids: list[int], kv_in: torch.Tensor, layer: int) -> None:
        """The inverse of `read_kv`: fill one layer of `block_ids` from a received payload."""
        idx = torch.tensor(block_ids, device=self.device)
        kv = self.kv_cache[layer]
        for i in (0, 1):
            kv[i].index_copy_(1, idx, kv_in[layer, i].to(self.device, kv[i].dtype))

    def alloc_dram(self, gb: float) -> int:
        """The RTC's DRAM tier (`EngineConfig.dram_kv_gb`): `self.dram`, host memory of `gb`
        GiB in blocks; returns how many. A block's K/V of every layer lie in one piece
        ([layers * K/V, heads, block, dim]), so one copy moves it; pinned where the device is
        not the CPU, so those copies run asynchronously. Not zeroed: a DRAM block is populated
        only after a copy wrote it."""
        heads, _, bs, dim = self.kv_cache[0][0].shape
        dtype = self.kv_cache[0][0].dtype
        num_blocks = max(1, int(gb * 2**30) // kv_block_bytes(self.model.cfg, bs, dtype))
        self.dram = torch.empty((num_blocks, 2 * len(self.kv_cache), heads, bs, dim), dtype=dtype,
                                pin_memory=self.device.type != "cpu")
        log.info("DRAM KV tier: %d blocks (%.2f GiB)", num_blocks, self.dram.nbytes / 2**30)
        return num_blocks

    def copy_to_dram(self, device_ids: list[int], dram_ids: list[int]) -> None:
        """Copy: the K/V of device blocks into DRAM blocks, every layer. Enqueued on the
        device's one stream, after the steps that wrote those blocks and before any that
        reuses them, so nothing waits; on the CPU done at once."""
        idx = torch.tensor(device_ids).to(self.device, non_blocking=True)
        staged = torch.stack([c.index_select(1, idx).transpose(0, 1) for kv in self.kv_cache for c in kv], dim=1)
        for i, first, n in runs(dram_ids):
            self.dram[first:first + n].copy_(staged[i:i + n], non_blocking=True)

    def populate(self, dram_ids: list[int], device_ids: list[int]) -> None:
        """Populate: the inverse of `copy_to_dram`, enqueued before the forward that reads the
        blocks (the device runs its stream in order: a step starts once the copy has landed)."""
        staged = torch.empty((len(dram_ids), *self.dram.shape[1:]), dtype=self.dram.dtype, device=self.device)
        for i, first, n in runs(dram_ids):
            staged[i:i + n].copy_(self.dram[first:first + n], non_blocking=True)
        idx = torch.tensor(device_ids).to(self.device, non_blocking=True)
        for j, cache in enumerate(c for kv in self.kv_cache for c in kv):
            cache.index_copy_(1, idx, staged[:, j].transpose(0, 1))

    def run(self, step: list[tuple[Sequence, int]], in_flight: tuple[list[Sequence], torch.Tensor] | None = None,
            on_layer: Callable[[int], None] | None = None) -> tuple[torch.Tensor, list[Sequence]]:
        """Forward one step. Returns logits [R, vocab] and the R sequences they belong to.
        `in_flight` (async scheduling): the step still computing, as its sampled sequences and
        their tokens on the device. A decode whose input token is one of those (`num_pending`)
        takes it there: building this step waits for nothing."""
        plan, sampled, pending = plan_step(step, self.block_size, in_flight and in_flight[0])
        inp = step_input(plan, self.device)
        if pending:
            rows, src = (torch.tensor(ix).to(self.device, non_blocking=True) for ix in zip(*pending))
            inp.input_ids[rows] = in_flight[1][src]
        return self.model.forward(inp, self.kv_cache, on_layer), sampled
