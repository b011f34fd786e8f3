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
"""
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flowserve import kernels
from flowserve.batcher import Sequence
from flowserve.config import EngineConfig, ModelConfig


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
                 cpu_kernels: bool = True, packed: dict[str, torch.Tensor] | None = None):
        self.cfg = cfg
        self.w = {k: v.to(device) for k, v in weights.items()}
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

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.packed is not None and x.shape[0] < MKL_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed[name], None, "none", [], "")
        return F.linear(x, self.linears[name])

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Add `delta` to the residual stream `h` (in place) and return RMSNorm(h) * weight."""
        if self.kernels:
            out = torch.empty_like(h)
            torch.ops.deepflow.add_rms_norm_(h, delta, weight, out, self.cfg.rms_norm_eps)
            return out
        h += delta
        return F.rms_norm(h, (self.cfg.hidden_size,), weight, self.cfg.rms_norm_eps)

    def mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        gate_up = self.linear(x, p + "w_gate_up")
        if self.kernels:
            act = torch.empty(x.shape[0], gate_up.shape[1] // 2, dtype=x.dtype, device=x.device)
            torch.ops.deepflow.silu_mul(act, gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return self.linear(act, p + "w_down")

    @torch.inference_mode()
    def forward(self, step: StepInput, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Logits [R, vocab] for `step.logits_rows`; writes this step's K/V into kv_cache."""
        cfg, w = self.cfg, self.w
        h = F.embedding(step.input_ids, w["embed"])  # the residual stream
        x = F.rms_norm(h, (cfg.hidden_size,), w["layers.0.attn_norm"], cfg.rms_norm_eps)
        if not self.kernels:  # the kernel reads the tables by position itself
            cos, sin = self.cos[step.positions], self.sin[step.positions]
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            qkv = self.linear(x, p + "wqkv")
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
            o = self.attention(q, k_cache, v_cache, step)
            x = self.add_norm(h, self.linear(o, p + "wo"), w[p + "ffn_norm"])
            last = i + 1 == cfg.num_layers  # the next norm: the next layer's, or the final one
            x = self.add_norm(h, self.mlp(x, p), w["norm"] if last else w[f"layers.{i + 1}.attn_norm"])
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
            v = gather_blocks(v_cache, bt)
            qd = q[:n].view(n, kvh, group, d).transpose(0, 1)  # the group's query heads share K/V
            mask = torch.arange(k.shape[2], device=q.device)[None, :] < step.decode_lens[:, None]
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

log = logging.getLogger("flowserve.model")


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, mcfg: ModelConfig, ecfg: EngineConfig, weights: dict[str, torch.Tensor],
                 device: torch.device, dtype: torch.dtype, packed: dict[str, torch.Tensor] | None = None):
        self.device, self.block_size = device, ecfg.block_size
        self.model = Llama(mcfg, weights, device, ecfg.cpu_kernels, packed)
        self.num_blocks = ecfg.num_kv_blocks or max(
            1, int(ecfg.kv_cache_gb * 2**30) // kv_block_bytes(mcfg, ecfg.block_size, dtype))
        shape = (mcfg.num_kv_heads, self.num_blocks, ecfg.block_size, mcfg.head_dim)
        self.kv_cache = [(torch.zeros(shape, dtype=dtype, device=device),
                          torch.zeros(shape, dtype=dtype, device=device)) for _ in range(mcfg.num_layers)]
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", self.num_blocks, ecfg.block_size,
                 self.num_blocks * kv_block_bytes(mcfg, ecfg.block_size, dtype) / 2**30)

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

    def run(self, step: list[tuple[Sequence, int]], in_flight: tuple[list[Sequence], torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, list[Sequence]]:
        """Forward one step. Returns logits [R, vocab] and the R sequences they belong to.
        `in_flight` (async scheduling): the step still computing, as its sampled sequences and
        their tokens on the device. A decode whose input token is one of those (`num_pending`)
        takes it there: building this step waits for nothing."""
        # Single-token work (decodes) first, as one batch; then prefill chunks one by one.
        step = sorted(step, key=lambda item: item[1] > 1)
        ids, pos, slots, rows, sampled = [], [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        in_flight_row = {id(seq): i for i, seq in enumerate(in_flight[0])} if in_flight else {}
        pending_rows, pending_from = [], []  # rows whose input token is in flight, and its index there
        bs = self.block_size
        for seq, n in step:
            start, end = seq.num_computed, seq.num_computed + n
            row0 = len(ids)
            ids += seq.token_ids[start:end]
            if end > len(seq.token_ids):  # the last input token is still being sampled
                pending_rows.append(len(ids))
                pending_from.append(in_flight_row[id(seq)])
                ids.append(0)
            pos += range(start, end)
            slots += [seq.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
            if n == 1:
                decode_tables.append(seq.block_ids[:-(-end // bs)])
                decode_lens.append(end)
            else:
                prefills.append(PrefillChunk(row0, n, end, torch.tensor(seq.block_ids[:-(-end // bs)])))
            if end == len(seq.token_ids) + seq.num_pending:
                rows.append(len(ids) - 1)
                sampled.append(seq)
        table, lens = None, None
        if decode_tables:
            width = max(map(len, decode_tables))
            table = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables])
            lens = torch.tensor(decode_lens)
        dev = self.device
        to = (lambda t: None if t is None else t.to(dev, non_blocking=True))
        input_ids = to(torch.tensor(ids))
        if pending_rows:
            input_ids[to(torch.tensor(pending_rows))] = in_flight[1][to(torch.tensor(pending_from))]
        inp = StepInput(
            input_ids=input_ids, positions=to(torch.tensor(pos)),
            slot_mapping=to(torch.tensor(slots)), num_decodes=len(decode_tables),
            decode_block_tables=to(table), decode_lens=to(lens),
            prefills=[PrefillChunk(c.start, c.num_tokens, c.context_len, to(c.block_ids)) for c in prefills],
            logits_rows=to(torch.tensor(rows, dtype=torch.long)))
        return self.model.forward(inp, self.kv_cache), sampled
