"""Model runner: owns the model and the KV-cache tensors of one TE, and runs one step.

From the batcher's list of (sequence, new tokens) it builds the flat `StepInput` the model
takes (token ids, positions, KV slots, block tables), runs the forward pass and returns the
logits of the sequences whose prompt+output is now fully computed, i.e. those that get a
next token this step.
"""
import logging

import torch

from flowserve.config import EngineConfig, ModelConfig
from flowserve.model import Llama, PrefillChunk, StepInput
from flowserve.sequence import Sequence

log = logging.getLogger("flowserve.model_runner")


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, mcfg: ModelConfig, ecfg: EngineConfig, weights: dict[str, torch.Tensor],
                 device: torch.device, dtype: torch.dtype):
        self.device, self.block_size = device, ecfg.block_size
        self.model = Llama(mcfg, weights, device)
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

    def read_kv(self, block_ids: list[int], out: torch.Tensor) -> None:
        """Copy the K/V of `block_ids` into `out` (host memory, `kv_shape(len(block_ids))`)."""
        idx = torch.tensor(block_ids, device=self.device)
        for layer, kv in enumerate(self.kv_cache):
            for i in (0, 1):
                out[layer, i].copy_(kv[i].index_select(1, idx))

    def write_kv(self, block_ids: list[int], kv_in: torch.Tensor) -> None:
        """The inverse of `read_kv`: fill `block_ids` from a received payload."""
        idx = torch.tensor(block_ids, device=self.device)
        for layer, kv in enumerate(self.kv_cache):
            for i in (0, 1):
                kv[i].index_copy_(1, idx, kv_in[layer, i].to(self.device, kv[i].dtype))

    def run(self, step: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Forward one step. Returns logits [R, vocab] and the R sequences they belong to."""
        # Single-token work (decodes) first, as one batch; then prefill chunks one by one.
        step = sorted(step, key=lambda item: item[1] > 1)
        ids, pos, slots, rows, sampled = [], [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        bs = self.block_size
        for seq, n in step:
            start, end = seq.num_computed, seq.num_computed + n
            row0 = len(ids)
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            slots += [seq.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
            if n == 1:
                decode_tables.append(seq.block_ids[:-(-end // bs)])
                decode_lens.append(end)
            else:
                prefills.append(PrefillChunk(row0, n, end, torch.tensor(seq.block_ids[:-(-end // bs)])))
            if end == len(seq.token_ids):
                rows.append(len(ids) - 1)
                sampled.append(seq)
        table, mask = None, None
        if decode_tables:
            width = max(map(len, decode_tables))
            table = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables])
            mask = torch.arange(width * bs)[None, :] < torch.tensor(decode_lens)[:, None]
        dev = self.device
        to = (lambda t: None if t is None else t.to(dev, non_blocking=True))
        inp = StepInput(
            input_ids=to(torch.tensor(ids)), positions=to(torch.tensor(pos)),
            slot_mapping=to(torch.tensor(slots)), num_decodes=len(decode_tables),
            decode_block_tables=to(table), decode_mask=to(mask),
            prefills=[PrefillChunk(c.start, c.num_tokens, c.context_len, to(c.block_ids)) for c in prefills],
            logits_rows=to(torch.tensor(rows, dtype=torch.long)))
        return self.model.forward(inp, self.kv_cache), sampled
