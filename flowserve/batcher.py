"""Batcher: which sequences run in the next step, and with how many tokens each.

Continuous batching under a per-step token budget (`max_num_batched_tokens`) and a
sequence cap (`max_num_seqs`), first come first served. Running sequences go first: a
decode costs one token, an unfinished prefill takes the next chunk that fits the budget,
so long prompts are split (chunked prefill) and share steps with decodes. Waiting
sequences are admitted while budget, blocks and the cap allow, starting from their cached
prefix in the RTC. When the KV pool runs out, the newest running sequence is preempted:
its blocks are freed and it is recomputed later (its prefix is often still cached), or, with
a DRAM tier where the cost model says copying beats recomputing, swapped out to DRAM and
populated back when it is admitted again.

Low-priority sequences (batch work, `SamplingParams.low_priority`) fill idle capacity: they
wait behind every other sequence, are admitted only when none of those waits or runs, and
yield while one does: they stay in the batch with their blocks but compute nothing, unless
nothing else can run. They are the first preempted, for blocks or for a batch slot.

With async scheduling (`flowserve.engine`) the batcher plans a step while the one before is
still computing: a sequence's token being sampled there counts as uncomputed (`num_pending`),
so its decode is scheduled before the token is known; one whose token being sampled is its
last here leaves the batch at once (`retire`).
"""
from collections import deque
from collections.abc import Callable

from flowserve.config import EngineConfig
from flowserve.rtc import RTC
from flowserve.sequence import SeqStatus, Sequence


class Batcher:
    def __init__(self, cfg: EngineConfig, rtc: RTC, acquire_lora: Callable[[Sequence], bool] | None = None):
        """`acquire_lora`: gives a sequence a slot for its LoRA adapter; False: none is free, it waits."""
        self.cfg = cfg
        self.rtc = rtc
        self.acquire_lora = acquire_lora
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # oldest first
        self.num_preemptions = 0
        self.num_swaps = 0                  # of which swapped out to DRAM

    def add(self, seq: Sequence, front: bool = False) -> None:
        """Queue `seq`: behind its own priority's sequences (`front`: before them), always
        behind every waiting sequence that is not low priority."""
        if not seq.params.low_priority:
            self.waiting.insert(0 if front else self._first_low(), seq)
        else:
            self.waiting.insert(self._first_low(), seq) if front else self.waiting.append(seq)

    def _first_low(self) -> int:
        return next((i for i, s in enumerate(self.waiting) if s.params.low_priority), len(self.waiting))

    def _newest_low(self) -> Sequence | None:
        """The running sequence preempted first: the newest low-priority one."""
        return next((s for s in reversed(self.running) if s.params.low_priority), None)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The step's work: (sequence, number of new tokens to compute)."""
        budget = self.cfg.max_num_batched_tokens
        step: list[tuple[Sequence, int]] = []
        preempted = False
        urgent = any(not s.params.low_priority for s in (*self.running, *self.waiting))
        yielded = []  # low-priority sequences that compute nothing this step
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted below by an older sequence in this same loop
            n = min(seq.num_uncomputed, budget)
            if n == 0:
                continue
            if urgent and seq.params.low_priority:
                yielded.append(seq)
                continue
            while not self.rtc.alloc_blocks(seq, n):
                victim = self._newest_low() or self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                step.append((seq, n))
                budget -= n
        # Admitting new work right after preempting would only thrash; low-priority work waits
        # for the others to finish, which may take its batch slots and blocks.
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if seq.params.low_priority and urgent:
                break
            if not self._room(seq, lambda: len(self.running) < self.cfg.max_num_seqs):
                break
            if seq.adapter is not None and not self.acquire_lora(seq):
                break
            if seq.dram_ids:  # swapped out by a preemption: its blocks come back from DRAM
                n = min(seq.num_uncomputed, budget)
                if not self._room(seq, lambda: self.rtc.swap_in(seq, n)):
                    break
            else:
                self.rtc.attach_prefix(seq)
                n = min(seq.num_uncomputed, budget)
                if not self._room(seq, lambda: self.rtc.alloc_blocks(seq, n)):
                    self.rtc.free(seq)
                    break
            if seq.num_cached is None:  # first admission: what the prefix cache saved
                seq.num_cached = seq.num_computed
                self.rtc.count_prefix_lookup(seq.num_prompt, seq.num_computed)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            step.append((seq, n))
            budget -= n
        if not step:  # what they yield to cannot run (e.g. it waits for a LoRA slot): they go on
            for seq in yielded:
                n = min(seq.num_uncomputed, budget)
                if seq.status is SeqStatus.RUNNING and n and self.rtc.alloc_blocks(seq, n):
                    step.append((seq, n))
                    budget -= n
        return step

    def _room(self, seq: Sequence, fits: Callable[[], bool]) -> bool:
        """`fits()`, after preempting as many low-priority sequences as it takes if `seq` is
        not one; False if it still does not fit."""
        while not fits():
            victim = self._newest_low()
            if seq.params.low_priority or victim is None:
                return False
            self.preempt(victim)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Swap the blocks out to DRAM where the RTC finds that pays, else free them to
        recompute later; requeue at the front."""
        self.running.remove(seq)
        if self.rtc.swap_out(seq):
            self.num_swaps += 1
        else:
            self.rtc.free(seq)
        seq.status = SeqStatus.WAITING
        self.add(seq, front=True)
        self.num_preemptions += 1

    def admit_prefilled(self, seq: Sequence) -> bool:
        """Run a landed sequence whose prompt K/V came from elsewhere (a prefill TE) into its
        blocks: straight into the running batch. Without those blocks (the KV was dropped) or
        a free slot it waits instead, to recompute its prompt here. True if it runs."""
        if seq.block_ids and len(self.running) < self.cfg.max_num_seqs:
            seq.num_computed = seq.num_prompt
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            return True
        self.rtc.free(seq)
        seq.status = SeqStatus.WAITING
        self.add(seq)
        return False

    def retire(self, seq: Sequence) -> None:
        """The token being sampled for a running sequence is its last here (a length limit, or a
        prefill-only sequence's first token): it leaves the batch now, so no later step computes
        it, and keeps its blocks until the engine finishes it or hands it off."""
        self.running.remove(seq)
        seq.status = SeqStatus.ENDING

    def finish(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.rtc.free(seq)
        seq.status = SeqStatus.FINISHED
