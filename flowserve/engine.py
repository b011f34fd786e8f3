"""FlowServe engine: the microkernel step loop of one TE.

The engine wires independent modules and calls them in order, once per step:
batcher (what runs) -> RTC (blocks) -> model runner (forward) -> RTC (index the blocks now
full) -> `sample` (next tokens, below) -> finish checks (RTC frees finished sequences). It
sees token ids only; tokenization and detokenization live with the caller (the JE in the main process, or
`deepflow.py generate`). Its API: `add_request`, `abort`, `step` (a `TokenOut` per request
that got a token or finished: the same struct the TE-shell sends, `flowserve/protocol.py`),
`generate`, `stats`.

PD disaggregation adds two entries. On a prefill TE a request added with `handoff=True`
stops after its first token with its blocks still held, in `handoffs`, until the TE-shell
has sent them to a decode TE (`flowserve.distflow`) and calls `release`. On the decode TE,
`add_prefilled` starts a request from those blocks: its prompt is not computed again.
"""
import logging
import time
from collections.abc import Iterable

import torch

from flowserve.batcher import Batcher, SeqStatus, Sequence
from flowserve.config import EngineConfig, ModelConfig
from flowserve.device import compute_dtype, pick_device
from flowserve.model import ModelRunner
from flowserve.protocol import FinishReason, SamplingParams, Stats, TokenOut
from flowserve.rtc import RTC
from flowserve.weights import load_weights

log = logging.getLogger("flowserve.engine")


class Engine:
    def __init__(self, model_path: str | None, cfg: EngineConfig | None = None,
                 weights: tuple[ModelConfig, dict[str, torch.Tensor]] | None = None):
        self.cfg = cfg = cfg or EngineConfig()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = pick_device(cfg.device)
        self.dtype = compute_dtype(self.device)
        t0 = time.perf_counter()
        self.model_cfg, tensors = weights or load_weights(model_path, self.dtype, cfg.use_weight_cache)
        tensors = {k: v.to(self.dtype) for k, v in tensors.items()}  # no copy when it already matches
        self.load_seconds = time.perf_counter() - t0
        self.max_model_len = min(cfg.max_model_len or self.model_cfg.max_position, self.model_cfg.max_position)
        self.runner = ModelRunner(self.model_cfg, cfg, tensors, self.device, self.dtype)
        self.rtc = RTC(self.runner.num_blocks, cfg.block_size)
        self.batcher = Batcher(cfg, self.rtc)
        self.seqs: dict[str, Sequence] = {}
        self.handoffs: list[Sequence] = []   # prefilled, blocks held for DistFlow

    # ------------------------------------------------------------------ API

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    handoff: bool = False) -> None:
        if request_id in self.seqs:
            raise ValueError(f"request {request_id!r} already exists")
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a context of {self.max_model_len}")
        longest = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        if -(-longest // self.cfg.block_size) > self.rtc.num_blocks_total:
            raise ValueError(f"{longest} tokens do not fit in the KV cache ({self.rtc.num_blocks_total} blocks)")
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), params, handoff=handoff)
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        self.seqs[request_id] = seq
        self.batcher.add(seq)

    def add_prefilled(self, request_id: str, token_ids: list[int], num_prompt: int, params: SamplingParams,
                      kv: torch.Tensor, arrived: Iterable[int], num_cached: int,
                      rng_state: torch.Tensor | None = None) -> None:
        """Continue a request a prefill TE started: `token_ids` is its prompt and first token,
        `kv` the prompt's K/V blocks (`ModelRunner.kv_shape`), whose layers are whole as
        `arrived` yields their indices (each is written while the next one is still on its
        way), `rng_state` its seeded generator's state after the first token (so a seeded
        request draws what it would have drawn colocated). Without free blocks for the KV it
        waits and recomputes its prompt here instead: slower, same tokens."""
        self.add_request(request_id, token_ids, params)
        seq = self.seqs[request_id]
        seq.num_prompt, seq.num_cached = num_prompt, num_cached
        if seq.generator is not None and rng_state is not None:
            seq.generator.set_state(rng_state)
        admitted = self.batcher.admit_prefilled(seq)
        for layer in arrived:  # all of it is taken either way: the sender waits for the ack after the last byte
            if admitted:
                self.runner.write_kv(seq.block_ids, kv, layer)
        if admitted:
            self.rtc.cache_full_blocks(seq)

    def release(self, seq: Sequence) -> None:
        """A handed-off sequence's blocks are with the decode TE (or the transfer failed): free them."""
        self.rtc.free(seq)
        seq.status = SeqStatus.FINISHED

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks. False if it is unknown or already finished."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.batcher.finish(seq)
        return True

    def has_work(self) -> bool:
        return bool(self.batcher.waiting or self.batcher.running)

    def step(self) -> list[TokenOut]:
        """Run one batch. Returns an output for every sequence that got a token or finished."""
        work = self.batcher.schedule()
        if not work:
            return []
        logits, sampled = self.runner.run(work)
        for seq, n in work:
            seq.num_computed += n
            self.rtc.cache_full_blocks(seq)  # before any finish frees them: a finished prompt is reusable too
        new_tokens = sample(logits, sampled) if sampled else []
        outputs = []
        for seq, token in zip(sampled, new_tokens):
            seq.token_ids.append(token)
            reason = self.finish_reason(seq, token)
            if reason:
                self.batcher.finish(seq)
                del self.seqs[seq.request_id]
            elif seq.handoff:  # prefill done: keep the blocks for the decode TE
                self.batcher.hand_off(seq)
                del self.seqs[seq.request_id]
                self.handoffs.append(seq)
            emitted = [] if reason is FinishReason.STOP else [token]
            outputs.append(TokenOut(seq.request_id, emitted, reason, seq.num_cached or 0))
        return outputs

    def finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.model_cfg.eos_token_ids):
            return FinishReason.STOP
        if len(seq.output_ids) >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion together; returns each one's generated token ids."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params):
            self.add_request(rid, prompt, p)
        out: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_work():
            for o in self.step():
                out[o.rid] += o.token_ids
        return [out[rid] for rid in ids]

    def stats(self) -> Stats:
        """The engine's figures, with the cache events since the last call (which it drains)."""
        cached, evicted = self.rtc.drain_cache_events()
        return Stats(running=len(self.batcher.running), waiting=len(self.batcher.waiting),
                     kv_usage=self.rtc.usage, kv_blocks_total=self.rtc.num_blocks_total,
                     kv_blocks_free=self.rtc.num_free, prefix_queries=self.rtc.prefix_queries,
                     prefix_hits=self.rtc.prefix_hits, preemptions=self.batcher.num_preemptions,
                     threads=torch.get_num_threads(), cached=cached, evicted=evicted)


# ---------------------------------------------------------------------------- the sampler
# Greedy rows are one batched argmax. Sampled rows apply temperature, top-k and top-p, then
# draw with the sequence's own torch.Generator when it has a seed, so a seeded request gives
# the same tokens whatever else shares its batch.

def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [len(seqs), vocab] float. Returns one token id per sequence."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.temperature > 0 and p.top_k != 1:
            tokens[row] = sample_row(logits[row].float(), p.temperature, p.top_k, p.top_p, seq.generator)
    return tokens


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> int:
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the ones before it already cover top_p; the first always stays
        drop = (probs.cumsum(dim=-1) - probs) > top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
