"""FlowServe engine: the microkernel step loop of one TE.

The engine wires independent modules and calls them in order, once per step:
batcher (what runs) -> RTC (blocks) -> model runner (forward) -> RTC (index the blocks now
full) -> `sample` (next tokens, below) -> finish checks (RTC frees finished sequences). It
sees token ids only; tokenization and detokenization live with the caller (the JE in the main process, or
`deepflow.py generate`). Its API: `add_request`, `abort`, `step` (a `TokenOut` per request
that got a token or finished: the same struct the TE-shell sends, `flowserve/protocol.py`),
`generate`, `stats`.

Each step is launched, then resolved. Launch: the forward and the sampling are enqueued on the
device, the sampled tokens stay there, and a copy of them to host memory is started. Resolve:
wait for that copy, append the tokens, run the finish checks. Synchronous scheduling resolves
a step right after launching it. Async scheduling (`EngineConfig.async_scheduling`, on by
default where the device computes asynchronously: CUDA, NPU) resolves step N only after it has
scheduled and launched step N+1, so the host prepares N+1 and emits N's tokens while the device
computes; a decode in N+1 reads its input token, sampled by N, on the device. The tokens are
the same in both modes: N+1 never computes a sequence that N's token surely ends (by length,
or a prefill-only sequence's first token); a row computed after a stop token nobody could
foresee is discarded.

PD disaggregation adds two entries. On a prefill TE a request added with `handoff=True`
stops after its first token with its blocks still held, in `handoffs`, until the TE-shell
has sent them to a decode TE (`flowserve.distflow`) and calls `release`. On the decode TE,
`add_prefilled` starts a request from those blocks: its prompt is not computed again.
"""
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from flowserve.batcher import Batcher, SeqStatus, Sequence
from flowserve.config import EngineConfig, ModelConfig
from flowserve.device import compute_dtype, pick_device
from flowserve.model import ModelRunner
from flowserve.protocol import FinishReason, SamplingParams, Stats, TokenOut
from flowserve.rtc import RTC
from flowserve.weights import load_weights

log = logging.getLogger("flowserve.engine")


@dataclass
class InFlight:
    """A launched step: its forward and sampling are enqueued on the device."""
    seqs: list[Sequence]          # the sequences that get a token, one per row of `tokens`
    tokens: torch.Tensor          # on the device: the next step's decodes read their input here
    host: torch.Tensor            # the copy in host memory, whole once `copied` has fired
    copied: torch.Event | None    # None on the CPU, where the step has run already


class Engine:
    def __init__(self, model_path: str | None, cfg: EngineConfig | None = None,
                 weights: tuple[ModelConfig, dict[str, torch.Tensor]] | None = None,
                 packed: dict[str, torch.Tensor] | None = None):
        self.cfg = cfg = cfg or EngineConfig()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = pick_device(cfg.device)
        self.dtype = compute_dtype(self.device, cfg.dtype)
        t0 = time.perf_counter()
        self.model_cfg, tensors = weights or load_weights(model_path, self.dtype, cfg.use_weight_cache)
        tensors = {k: v.to(self.dtype) for k, v in tensors.items()}  # no copy when it already matches
        self.load_seconds = time.perf_counter() - t0
        self.max_model_len = min(cfg.max_model_len or self.model_cfg.max_position, self.model_cfg.max_position)
        self.runner = ModelRunner(self.model_cfg, cfg, tensors, self.device, self.dtype, packed)
        self.rtc = RTC(self.runner.num_blocks, cfg.block_size)
        self.batcher = Batcher(cfg, self.rtc)
        self.seqs: dict[str, Sequence] = {}
        self.handoffs: list[Sequence] = []   # prefilled, blocks held for DistFlow
        auto = self.device.type != "cpu"  # a CPU computes in this thread: nothing to overlap with
        self.async_scheduling = auto if cfg.async_scheduling is None else cfg.async_scheduling
        self.in_flight: InFlight | None = None  # async scheduling: the step launched, not yet resolved

    # ------------------------------------------------------------------ API

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    handoff: bool = False, cache_id: str | None = None, pin: str | None = None) -> None:
        """`cache_id`: the prompt starts with that context cache's (MatchByID). `pin`: once
        finished, keep the prompt's blocks pinned as that context cache (`RTC.pin`)."""
        if request_id in self.seqs:
            raise ValueError(f"request {request_id!r} already exists")
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a context of {self.max_model_len}")
        longest = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        if -(-longest // self.cfg.block_size) > self.rtc.num_blocks_total:
            raise ValueError(f"{longest} tokens do not fit in the KV cache ({self.rtc.num_blocks_total} blocks)")
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), params, handoff=handoff,
                       cache_id=cache_id, pin_id=pin)
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
        """Stop a request and free its blocks. False if it is unknown or already finished.
        A step in flight may still compute it: its row is skipped when that step resolves, and
        its blocks may be reused at once, since any step that writes them is enqueued after."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.batcher.finish(seq)
        return True

    def has_work(self) -> bool:
        return bool(self.batcher.waiting or self.batcher.running or self.in_flight)

    def step(self) -> list[TokenOut]:
        """Run one batch. Returns an output for every sequence that got a token or finished:
        with async scheduling, those of the batch launched by the call before (a last call,
        with nothing left to launch, resolves the last batch)."""
        work = self.batcher.schedule()
        launched = self.launch(work) if work else None
        if not self.async_scheduling:
            return self.resolve(launched) if launched else []
        previous, self.in_flight = self.in_flight, launched
        return self.resolve(previous) if previous else []

    def launch(self, work: list[tuple[Sequence, int]]) -> InFlight:
        """Enqueue a step's forward and sampling, and the copy of its tokens to the host."""
        flight = self.in_flight
        logits, sampled = self.runner.run(work, flight and (flight.seqs, flight.tokens))
        for seq, n in work:
            seq.num_computed += n
            self.rtc.cache_full_blocks(seq)  # before any finish frees them: a finished prompt is reusable too
        tokens = sample(logits, sampled)
        for seq in sampled:
            seq.num_pending += 1
            if seq.handoff or self.at_length(seq, len(seq.token_ids) + seq.num_pending):
                self.batcher.retire(seq)  # no later step may compute past this token
        host = tokens.to("cpu", non_blocking=True)  # from CUDA into pinned memory: an async copy
        copied = None
        if self.device.type != "cpu":
            copied = torch.Event(self.device)
            copied.record()
        return InFlight(sampled, tokens, host, copied)

    def resolve(self, step: InFlight) -> list[TokenOut]:
        """Append a launched step's tokens and run the finish checks. Waits for that step's
        copy only, not for a step launched after it."""
        if step.copied is not None:
            step.copied.synchronize()
        outputs = []
        for seq, token in zip(step.seqs, step.host.tolist()):
            seq.num_pending -= 1
            if seq.status is SeqStatus.FINISHED:
                # Aborted, or stopped by its token of the step before (async scheduling): this
                # row is discarded. Its blocks are free already; the device computes this step
                # before any later one that reuses them (one stream, in launch order).
                continue
            seq.token_ids.append(token)  # valid even if it was preempted meanwhile: it recomputes later
            self.rtc.cache_full_blocks(seq)  # a block that ends with this token may be computed already
            reason = self.finish_reason(seq, token)
            if reason:
                if seq.pin_id is not None:
                    self.rtc.pin(seq.pin_id, seq)
                self.batcher.finish(seq)
                del self.seqs[seq.request_id]
            elif seq.handoff:  # prefill done: keep the blocks for the decode TE
                del self.seqs[seq.request_id]
                self.handoffs.append(seq)
            emitted = [] if reason is FinishReason.STOP else [token]
            outputs.append(TokenOut(seq.request_id, emitted, reason, seq.num_cached or 0))
        return outputs

    def finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.model_cfg.eos_token_ids):
            return FinishReason.STOP
        if self.at_length(seq, len(seq.token_ids)):
            return FinishReason.LENGTH
        return None

    def at_length(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `num_tokens` (prompt included) is as long as `seq` may grow."""
        return num_tokens - seq.num_prompt >= seq.params.max_tokens or num_tokens >= self.max_model_len

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
                     threads=torch.get_num_threads(), cached=cached, evicted=evicted,
                     pinned_blocks=self.rtc.num_pinned)


# ---------------------------------------------------------------------------- the sampler
# Greedy rows are one batched argmax. Sampled rows apply temperature, top-k and top-p, then
# draw with the sequence's own torch.Generator when it has a seed, so a seeded request gives
# the same tokens whatever else shares its batch. Nothing here waits for the device: the
# tokens stay there, for the next step's input (async scheduling).

def sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits: [len(seqs), vocab] float. Returns one token id per sequence, on the logits' device."""
    tokens = logits.argmax(dim=-1)
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.temperature > 0 and p.top_k != 1:
            tokens[row] = sample_row(logits[row].float(), p.temperature, p.top_k, p.top_p, seq.generator)
    return tokens


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the ones before it already cover top_p; the first always stays
        drop = (probs.cumsum(dim=-1) - probs) > top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
