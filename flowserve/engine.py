"""FlowServe engine: the microkernel step loop of one TE.

The engine wires independent modules and calls them in order, once per step: batcher (what runs)
-> RTC (blocks) -> model runner (forward) -> RTC (index the blocks now full) -> `sample` (next
tokens and the logprobs asked for, `flowserve/sampler.py`) -> finish checks (RTC frees finished
sequences). It sees token ids only; tokenization and detokenization live with the caller (the JE
in the main process, or `deepflow.py generate`). Its API: `add_request`, `abort`, `step` (a
`TokenOut` per request that got a token or finished: the same struct the TE-shell sends,
`flowserve/protocol.py`), `generate`, `stats`.

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

Log probabilities: a request with `SamplingParams.logprobs` gets them in its `TokenOut`s, copied
to the host with the tokens; one with `prompt_logprobs` (completions' echo) also gets its
prompt's, from logits of every prompt position that the forward returns after the sampled rows
(`model.prompt_rows`). Such a request bypasses the prefix cache until they are sent (a cached
prefix has no logits), and tensor parallelism refuses it (its arena holds one row per sequence).

Structured outputs (`SamplingParams.json_schema`): the sequence gets a grammar matcher
(`flowserve/grammar.py`, compiled once per schema with the model's tokenizer, read from
`model_path`), the sampler masks its row to the tokens the grammar allows, the matcher consumes
each token as it resolves, and the sequence stops (finish "stop", the token kept) once the
grammar is complete. Its mask needs the token before: with async scheduling, a launch whose
rows have a grammar and a token still in flight waits for that step's copy before sampling;
its forward is enqueued by then, so the device stays busy. On a PD decode TE the matcher
starts from the prefill TE's first token the same way, and a TP master samples as any engine.

PD disaggregation. On a prefill TE a request added with `handoff=True` stops after its first
token with its blocks still held (`take_handoffs`), until the TE-shell has sent them to a decode
TE (`flowserve.distflow`, reading them with `read_kv`) and calls `release`; given
`stream_handoffs`, the step that computes such a request's last prompt chunk tells the TE-shell
as each layer's K/V is written, so the transfer overlaps the rest of the forward. On the decode
TE a transfer's header makes a sequence that holds blocks for the KV (`add_prefilled`: the
cached prefix the sender skipped, fresh blocks for the rest), each layer is written as it lands
(`write_prefilled`), and the first token starts it (`start_prefilled`): its prompt is not
computed again.

With a DRAM tier (`EngineConfig.dram_kv_gb`) the engine measures the RTC's cost model at
start (`calibrate`), and after each scheduling carries out the block copies the RTC decided
(`move_kv`: Copy to DRAM, Populate back). They go on the device's one stream ahead of the
step's forward, so a populated block is whole before a step reads it, and an evicted one is
copied before a step overwrites it, with async scheduling too.

LoRA (`flowserve/lora.py`, `flowserve/lora_slots.py`): a request may name an adapter
(`add_request(adapter=...)`, a `protocol.Adapter`: name, path, content digest). The engine
reads and checks it into host memory at once (a bad one raises ValueError), the batcher
admits the sequence once its adapter has a device slot (`acquire_lora`; with every slot in use
by other adapters' sequences it waits), and it lets go of the slot when it finishes. Its
prefix-cache hashes start from the adapter's digest, so only KV computed with the same weights
is shared. One step mixes rows of any adapters and the base in one forward.

With tensor parallelism (`EngineConfig.tensor_parallel_size` > 1) the engine is the master
of its TE: its runner is a `flowserve.tp.TPRunner`, the same interface over executor
processes that hold the model's shards, and it samples on the host from the logits they
gather; the batcher, the RTC and everything above stay as they are.
"""
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowserve.batcher import Batcher
from flowserve.config import EngineConfig, ModelConfig
from flowserve.device import compute_dtype, pick_device
from flowserve.grammar import Grammar, Grammars
from flowserve.lora import hash_seed
from flowserve.lora_slots import LoraCache
from flowserve.model import ModelRunner, kv_block_bytes, prompt_rows
from flowserve.protocol import Adapter, FinishReason, SamplingParams, Stats, TokenOut
from flowserve.rtc import RTC, CostModel
from flowserve.sampler import StepLogprobs, logprobs_of, sample
from flowserve.sequence import SeqStatus, Sequence
from flowserve.tokenizer import Tokenizer
from flowserve.tp import TPRunner
from flowserve.weights import load_weights

log = logging.getLogger("flowserve.engine")


@dataclass
class InFlight:
    """A launched step: its forward and sampling are enqueued on the device."""
    seqs: list[Sequence]          # the sequences that get a token, one per row of `tokens`
    tokens: torch.Tensor          # on the device: the next step's decodes read their input here
    host: torch.Tensor            # the copy in host memory, whole once `copied` has fired
    copied: torch.Event | None    # None on the CPU, where the step has run already
    logprobs: StepLogprobs | None = None  # in host memory, for the rows that asked (`flowserve/sampler.py`)
    prompt: list[tuple[Sequence, int, StepLogprobs]] | None = None  # prompt logprobs from a first position


class Engine:
    def __init__(self, model_path: str | None, cfg: EngineConfig | None = None,
                 weights: tuple[ModelConfig, dict[str, torch.Tensor]] | None = None,
                 packed: dict[str, torch.Tensor] | list[dict[str, torch.Tensor] | None] | None = None,
                 fork_executors: bool = False, use_weight_cache: bool = True):
        """`packed`: the oneDNN-packed linears a warm template made (`pack_linears`), one per
        rank with tensor parallelism. `fork_executors` (tensor parallelism): this process has
        run no multi-threaded torch op (a TE-shell), so it may fork its executors
        (`flowserve/tp.py`); else they are spawned. `use_weight_cache` (`TELaunch`): False
        reads and converts the model file (the cold baseline)."""
        self.cfg = cfg = cfg or EngineConfig()
        self.model_path = model_path
        self.tp = cfg.tensor_parallel_size > 1
        if self.tp and fork_executors:
            torch.set_num_threads(1)  # a master only samples; and a child forked after an OpenMP pool started hangs
        elif cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = pick_device(cfg.device)
        self.dtype = compute_dtype(self.device, cfg.dtype)
        self.model_cfg, tensors = weights or load_weights(model_path, self.dtype, use_weight_cache)
        tensors = {k: v.to(self.dtype) for k, v in tensors.items()}  # no copy when it already matches
        self.max_model_len = min(cfg.max_model_len or self.model_cfg.max_position, self.model_cfg.max_position)
        if self.tp:  # a master: its executors hold the model, and it samples on the host
            self.runner = TPRunner(self.model_cfg, cfg, tensors, self.dtype, model_path, packed, fork_executors)
            self.device = torch.device("cpu")
        else:
            self.runner = ModelRunner(self.model_cfg, cfg, tensors, self.device, self.dtype, packed)
        num_dram = self.runner.alloc_dram(cfg.dram_kv_gb) if cfg.dram_kv_gb > 0 else 0
        self.rtc = RTC(self.runner.num_blocks, cfg.block_size, num_dram, self.calibrate(num_dram) if num_dram else None)
        self.lora = LoraCache(cfg.max_loras, cfg.max_lora_rank, cfg.max_cpu_loras, self.model_cfg, self.dtype,
                              self.runner.load_lora) if cfg.max_loras else None
        self.batcher = Batcher(cfg, self.rtc, self.acquire_lora)
        self.seqs: dict[str, Sequence] = {}
        self.handoffs: list[Sequence] = []   # prefilled, blocks held for DistFlow until `take_handoffs`
        auto = self.device.type != "cpu"  # a CPU computes in this thread: nothing to overlap with
        self.async_scheduling = auto if cfg.async_scheduling is None else cfg.async_scheduling
        self.in_flight: InFlight | None = None  # async scheduling: the step launched, not yet resolved
        self.grammars: Grammars | None = None   # made at the first request with a JSON schema

    # ------------------------------------------------------------------ API

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    handoff: bool = False, cache_id: str | None = None, pin: str | None = None,
                    adapter: Adapter | None = None) -> None:
        """`cache_id`: the prompt starts with that context cache's (MatchByID). `pin`: once
        finished, keep the prompt's blocks pinned as that context cache (`RTC.pin`).
        `adapter`: run it with that LoRA adapter, read from its path now (into host memory,
        unless a tier holds it: ValueError if it is bad), into a slot once admitted."""
        self.batcher.add(self.new_sequence(request_id, prompt_ids, params, handoff, cache_id, pin, adapter))

    def new_sequence(self, request_id: str, prompt_ids: list[int], params: SamplingParams, handoff: bool = False,
                     cache_id: str | None = None, pin: str | None = None, adapter: Adapter | None = None) -> Sequence:
        """A request's sequence, checked and registered; not in the batcher yet."""
        if request_id in self.seqs:
            raise ValueError(f"request {request_id!r} already exists")
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a context of {self.max_model_len}")
        longest = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        if -(-longest // self.cfg.block_size) > self.rtc.num_blocks_total:
            raise ValueError(f"{longest} tokens do not fit in the KV cache ({self.rtc.num_blocks_total} blocks)")
        if params.prompt_logprobs is not None and self.tp:
            raise ValueError("prompt logprobs (echo with logprobs) are not supported with tensor parallelism")
        if adapter is not None:
            if self.lora is None:
                raise ValueError(f"LoRA adapter {adapter.name!r}: this TE holds no adapters (max_loras 0)")
            self.lora.prepare(adapter)
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), params, handoff=handoff,
                       cache_id=cache_id, pin_id=pin, adapter=adapter,
                       hash_seed=None if adapter is None else hash_seed(adapter.digest))
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]
        if params.json_schema is not None:
            seq.grammar = self.grammar(params.json_schema)
        self.seqs[request_id] = seq
        return seq

    def grammar(self, schema: str) -> Grammar:
        """A matcher for `schema`, with the model's tokenizer; ValueError if either is unusable."""
        if self.grammars is None:
            if self.model_path is None:
                raise ValueError("structured outputs need the model's tokenizer: this TE has no model path")
            tok = Tokenizer.load(self.model_path)
            if tok.is_sentencepiece:
                raise ValueError("structured outputs need a `tokenizers` tokenizer, not sentencepiece")
            self.grammars = Grammars(tok.backend.to_str(), self.model_cfg.vocab_size, self.model_cfg.eos_token_ids)
        return self.grammars.new(schema)

    def add_prefilled(self, request_id: str, prompt_ids: list[int], params: SamplingParams, num_cached: int,
                      kv_skip: int = 0, adapter: Adapter | None = None) -> Sequence | None:
        """Decode TE, a KV transfer's header: the sequence whose prompt K/V a prefill TE is
        sending, out of the batch until `start_prefilled`, holding blocks for them: its cached
        prefix (at least the `kv_skip` blocks the sender leaves out) and fresh ones for the
        rest. None if the RTC no longer holds those `kv_skip` blocks (evicted since placement):
        the sender must send them all. Without enough free blocks it holds none: the KV is
        dropped and the prompt recomputed here (slower, same tokens). `adapter`: the LoRA
        adapter the prefill TE computed the KV with."""
        seq = self.new_sequence(request_id, prompt_ids, params, adapter=adapter)
        seq.status, seq.num_cached = SeqStatus.LANDING, num_cached
        seq.prompt_logprobs = None  # the prefill TE scored the prompt
        self.rtc.attach_prefix(seq)
        if seq.num_computed < kv_skip * self.cfg.block_size:
            self.abort(request_id)
            return None
        if not self.rtc.alloc_blocks(seq, seq.num_prompt - seq.num_computed):
            self.rtc.free(seq)
        self.move_kv()  # a block it took may have to reach DRAM before its KV overwrites it
        return seq

    def write_prefilled(self, seq: Sequence, kv: torch.Tensor, layer: int, kv_skip: int) -> None:
        """One layer of a transfer's payload (`kv`: the blocks from `kv_skip` on) into the
        blocks of `seq` past its cached prefix."""
        if seq.block_ids:  # none: dropped for want of blocks, or aborted meanwhile
            held = seq.num_computed // self.cfg.block_size
            self.runner.write_kv(seq.block_ids[held:], kv.narrow(3, held - kv_skip, len(seq.block_ids) - held), layer)

    def start_prefilled(self, seq: Sequence, token: int, rng_state: torch.Tensor | None = None) -> None:
        """A transfer's trailer: `seq` goes on from its first token, `token`, and its seeded
        generator from `rng_state` (so it draws what it would have drawn colocated)."""
        seq.token_ids.append(token)
        if seq.grammar is not None:
            seq.grammar.catch_up(seq.token_ids[seq.num_prompt:])
        if seq.generator is not None and rng_state is not None:
            seq.generator.set_state(rng_state)
        if seq.adapter is not None and seq.block_ids and not self.acquire_lora(seq):
            self.rtc.free(seq)  # no slot for its adapter: it waits for one, and recomputes its prompt then
        if self.batcher.admit_prefilled(seq):
            self.rtc.cache_full_blocks(seq)

    def kv_shape(self, num_blocks: int) -> list[int]:
        """Shape of the KV of `num_blocks` blocks as DistFlow moves it (`ModelRunner.kv_shape`)."""
        return self.runner.kv_shape(num_blocks)

    def read_kv(self, block_ids: list[int], out: torch.Tensor, layer: int) -> None:
        """One layer's K/V of `block_ids` into `out[layer]`, for DistFlow to send (thread-safe)."""
        self.runner.read_kv(block_ids, out, layer)

    def take_handoffs(self) -> list[Sequence]:
        """The sequences prefilled since the last call, their blocks held until `release`."""
        taken, self.handoffs = self.handoffs, []
        return taken

    def release(self, seq: Sequence) -> None:
        """A handed-off sequence's blocks are with the decode TE (or the transfer failed): free them."""
        if seq.status is not SeqStatus.FINISHED:  # a finished one let go of its adapter already
            self.release_lora(seq)
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
        self.release_lora(seq)
        return True

    def acquire_lora(self, seq: Sequence) -> bool:
        """The batcher's admission: a slot for `seq`'s adapter, held until it finishes. False:
        every slot is used by other sequences' adapters; it waits."""
        if seq.lora_slot is None:
            seq.lora_slot = self.lora.acquire(seq.adapter.digest)
        return seq.lora_slot is not None

    def release_lora(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.lora.release(seq.adapter.digest, seq.lora_slot)
            seq.lora_slot = None

    def unpin(self, cache_id: str) -> None:
        self.rtc.unpin(cache_id)

    def weights(self) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """The weights it holds (a TP master: the whole model's, mapped), which it may serve to
        new TEs, and the oneDNN-packed linears it shares (a TP master: its executors')."""
        if self.tp:
            return self.runner.weights, self.runner.packed
        return self.runner.model.w, [self.runner.model.packed] if self.runner.model.packed else []

    def executor_pidfds(self) -> list[int]:
        """TP: its executors' pidfds, each readable once that executor has exited."""
        return self.runner.pidfds if self.tp else []

    def executor_pids(self) -> list[int]:
        return self.runner.pids if self.tp else []

    def close(self) -> None:
        """TP: stop the executors (EOF on their links) and reap them."""
        if self.tp:
            self.runner.close()

    def set_threads(self, n: int) -> None:
        """Use `n` torch threads (its host's cores, shared among its TEs); a TP master, which
        only samples, hands them to its executors."""
        if self.tp:
            self.runner.set_threads(n)
        else:
            torch.set_num_threads(n)

    def has_work(self) -> bool:
        return bool(self.batcher.waiting or self.batcher.running or self.in_flight)

    def step(self, stream_handoffs: Callable[[list[Sequence]], Callable[[int], None] | None] | None = None
             ) -> list[TokenOut]:
        """Run one batch. Returns an output for every sequence that got a token or finished:
        with async scheduling, those of the batch launched by the call before (a last call,
        with nothing left to launch, resolves the last batch). `stream_handoffs` (PD, layer by
        layer: the TE-shell's): called with the sequences whose last prompt chunk this step
        computes, before its forward; returns what the forward calls as each layer is written."""
        work = self.batcher.schedule()
        self.move_kv()
        launched = self.launch(work, stream_handoffs) if work else None
        if not self.async_scheduling:
            return self.resolve(launched) if launched else []
        previous, self.in_flight = self.in_flight, launched
        return self.resolve(previous) if previous else []

    def launch(self, work: list[tuple[Sequence, int]], stream_handoffs=None) -> InFlight:
        """Enqueue a step's forward and sampling, and the copy of its tokens to the host."""
        flight = self.in_flight
        on_layer = None
        if stream_handoffs is not None:
            ending = [seq for seq, n in work if seq.handoff and seq.num_computed + n == len(seq.token_ids)]
            on_layer = stream_handoffs(ending) if ending else None
        scored = prompt_rows(work)
        logits, sampled = self.runner.run(work, flight and (flight.seqs, flight.tokens), on_layer)
        prompt = self.prompt_logprobs(logits[len(sampled):], scored) if scored else None
        for seq, n in work:
            seq.num_computed += n
            self.rtc.cache_full_blocks(seq)  # before any finish frees them: a finished prompt is reusable too
        if flight is not None:
            self.catch_up(flight, sampled)
        tokens, logprobs = sample(logits[:len(sampled)], sampled, self.model_cfg.eos_token_ids,
                                  flight and (flight.seqs, flight.tokens))
        for seq in sampled:
            seq.num_pending += 1
            if seq.handoff or self.at_length(seq, len(seq.token_ids) + seq.num_pending):
                self.batcher.retire(seq)  # no later step may compute past this token
        host = tokens.to("cpu", non_blocking=True)  # from CUDA into pinned memory: an async copy
        logprobs = logprobs and logprobs.to_host()
        copied = None
        if self.device.type != "cpu":
            copied = torch.Event(self.device)
            copied.record()
        return InFlight(sampled, tokens, host, copied, logprobs, prompt)

    def catch_up(self, flight: InFlight, seqs: list[Sequence]) -> None:
        """Async scheduling: the matchers of `seqs` whose last token `flight` is still sampling
        consume it, once that step's copy has landed (their masks depend on it)."""
        behind = [seq for seq in seqs if seq.grammar is not None and seq.num_pending]
        if not behind:
            return
        if flight.copied is not None:
            flight.copied.synchronize()
        pending = dict(zip(map(id, flight.seqs), flight.host.tolist()))
        for seq in behind:
            seq.grammar.catch_up(seq.token_ids[seq.num_prompt:] + [pending[id(seq)]])

    def prompt_logprobs(self, logits: torch.Tensor, scored: list[tuple[Sequence, int, int]]
                        ) -> list[tuple[Sequence, int, StepLogprobs]]:
        """Logprobs of the prompt tokens that `scored`'s positions (`prompt_rows`) predict, raw
        (no penalties apply to a prompt), on their way to host memory."""
        out, row = [], 0
        for seq, first, count in scored:
            targets = torch.tensor(seq.token_ids[first + 1:first + 1 + count]).to(logits.device, non_blocking=True)
            out.append((seq, first, logprobs_of(logits[row:row + count], targets, seq.params.prompt_logprobs).to_host()))
            row += count
        return out

    def resolve(self, step: InFlight) -> list[TokenOut]:
        """Append a launched step's tokens and run the finish checks. Waits for that step's
        copy only, not for a step launched after it."""
        if step.copied is not None:
            step.copied.synchronize()
        for seq, first, lp in step.prompt or ():
            if seq.prompt_logprobs is not None:  # a recomputed chunk (preempted) overwrites the same entries
                seq.prompt_logprobs[first + 1:first + 1 + len(lp.chosen)] = lp.entries([seq.params.prompt_logprobs] * len(lp.chosen))
        lps = dict(zip(step.logprobs.rows, step.logprobs.entries([step.seqs[r].params.logprobs for r in step.logprobs.rows]))) \
            if step.logprobs else {}
        outputs = []
        for row, (seq, token) in enumerate(zip(step.seqs, step.host.tolist())):
            seq.num_pending -= 1
            if seq.status is SeqStatus.FINISHED:
                # Aborted, or stopped by its token of the step before (async scheduling): this
                # row is discarded. Its blocks are free already; the device computes this step
                # before any later one that reuses them (one stream, in launch order).
                continue
            seq.token_ids.append(token)  # valid even if it was preempted meanwhile: it recomputes later
            if seq.grammar is not None:
                seq.grammar.catch_up(seq.token_ids[seq.num_prompt:])
            self.rtc.cache_full_blocks(seq)  # a block that ends with this token may be computed already
            reason = self.finish_reason(seq, token)
            if reason:
                if seq.pin_id is not None:
                    self.rtc.pin(seq.pin_id, seq)
                self.batcher.finish(seq)
                self.release_lora(seq)
                del self.seqs[seq.request_id]
            elif seq.handoff:  # prefill done: keep the blocks for the decode TE
                del self.seqs[seq.request_id]
                self.handoffs.append(seq)
            emitted = [] if self.is_stop_token(seq, token) else [token]
            out = TokenOut(seq.request_id, emitted, reason, seq.num_cached or 0)
            if row in lps:
                out.logprobs = [lps[row]] if emitted else []
            if seq.prompt_logprobs is not None:
                out.prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
            outputs.append(out)
        return outputs

    def finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if self.is_stop_token(seq, token) or (seq.grammar is not None and seq.grammar.done):
            return FinishReason.STOP
        if self.at_length(seq, len(seq.token_ids)):
            return FinishReason.LENGTH
        return None

    def is_stop_token(self, seq: Sequence, token: int) -> bool:
        """`token` ends `seq` and is not part of its text (EOS, or one of its stop_token_ids)."""
        p = seq.params
        return token in p.stop_token_ids or (not p.ignore_eos and token in self.model_cfg.eos_token_ids)

    def at_length(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `num_tokens` (prompt included) is as long as `seq` may grow."""
        return num_tokens - seq.num_prompt >= seq.params.max_tokens or num_tokens >= self.max_model_len

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[Adapter | None] | None = None) -> list[list[int]]:
        """Run prompts to completion together (each with its LoRA adapter from `adapters`, if
        given); returns each one's generated token ids."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt, p, adapter in zip(ids, prompts, params, adapters or [None] * len(prompts)):
            self.add_request(rid, prompt, p, adapter=adapter)
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
                     pinned_blocks=self.rtc.num_pinned, dram_blocks_total=len(self.rtc.dram_blocks),
                     dram_blocks_free=self.rtc.num_dram_free,
                     copy_bytes_per_s=self.rtc.cost.copy_bytes_per_s if self.rtc.cost else 0.0,
                     prefill_tokens_per_s=self.rtc.cost.prefill_tokens_per_s if self.rtc.cost else 0.0,
                     dram_copied=self.rtc.dram_copied, dram_populated=self.rtc.dram_populated,
                     dram_recomputed=self.rtc.dram_recomputed, swaps=self.batcher.num_swaps,
                     **(self.lora.stats() if self.lora else {}))

    # ------------------------------------------------------------------ the DRAM tier

    def move_kv(self) -> None:
        """Carry out the block copies the RTC queued, in its order: ahead of anything enqueued
        later (the next forward, a DistFlow write), so ahead of whatever reuses those blocks."""
        for to_dram, src, dst in self.rtc.drain_moves():
            if to_dram:
                self.runner.copy_to_dram(src, dst)
            else:
                self.runner.populate(src, dst)

    def calibrate(self, num_dram: int) -> CostModel:
        """The RTC's cost model, measured once (~0.2 s on this repo's CPU): copy bytes/s, a few
        blocks copied to DRAM and back, and prefill tokens/s, one prefill chunk, each after a
        smaller untimed run (the first creates kernels). Nothing is cached yet: the blocks it
        writes hold nothing."""
        runner, bs = self.runner, self.cfg.block_size
        blocks = list(range(min(8, runner.num_blocks, num_dram)))
        tokens = min(64, self.cfg.max_num_batched_tokens, runner.num_blocks * bs)

        def seconds(num_tokens: int, num_blocks: int) -> tuple[float, float]:
            seq = Sequence("calibrate", [0] * num_tokens, num_tokens, SamplingParams(),
                           block_ids=list(range(-(-num_tokens // bs))))
            t0 = time.perf_counter()
            runner.run([(seq, num_tokens)])
            self.wait()
            t1 = time.perf_counter()
            runner.copy_to_dram(blocks[:num_blocks], blocks[:num_blocks])
            runner.populate(blocks[:num_blocks], blocks[:num_blocks])
            self.wait()
            return t1 - t0, time.perf_counter() - t1

        seconds(min(bs, tokens), 1)
        prefill, copy = seconds(tokens, len(blocks))
        block_bytes = kv_block_bytes(self.model_cfg, bs, self.dtype)
        cost = CostModel(block_bytes, 2 * len(blocks) * block_bytes / copy, tokens / prefill)
        log.info("DRAM tier cost model: copy %.2f GB/s, prefill %.0f tokens/s", cost.copy_bytes_per_s / 1e9,
                 cost.prefill_tokens_per_s)
        return cost

    def wait(self) -> None:
        """Return once the device has run everything enqueued so far."""
        if self.device.type != "cpu":
            done = torch.Event(self.device)
            done.record()
            done.synchronize()
