"""A `Sequence` is a request inside the engine: its tokens, sampling parameters and block
table, and where it stands (`SeqStatus`). `Engine.add_request` creates it, the batcher
(`flowserve/batcher.py`) moves it between its queues, the RTC (`flowserve/rtc.py`) gives it
blocks, the model runner reads it to build each step's input.
"""
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from flowserve.protocol import Adapter, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    import torch

    from flowserve.grammar import Grammar


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    ENDING = "ending"      # its last token here is being sampled: out of the batch, blocks still held
    LANDING = "landing"    # PD decode TE: its prompt's K/V are arriving; out of the batch, blocks held
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]          # prompt, then generated tokens
    num_prompt: int
    params: SamplingParams
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0         # leading tokens whose K/V are in the cache (or enqueued: a pending one's too)
    num_pending: int = 0          # tokens sampled by a step in flight, not yet in token_ids
    num_cached: int | None = None  # prompt tokens the prefix cache served at first admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of full, computed blocks
    generator: "torch.Generator | None" = None
    handoff: bool = False         # prefill-only (PD): after the first token its blocks go to a decode TE
    cache_id: str | None = None   # a context cache its prompt starts with (MatchByID)
    pin_id: str | None = None     # when it finishes, pin its prompt's blocks as this context cache
    dram_ids: list[int] = field(default_factory=list)  # swapped out: DRAM blocks holding its first num_computed tokens
    adapter: Adapter | None = None  # its LoRA adapter (None: the base model)
    lora_slot: int | None = None    # the device slot holding its adapter, from admission until it finishes
    hash_seed: int | None = None    # its prefix-cache chain hashes start here (`flowserve.lora.hash_seed`)
    # `params.prompt_logprobs`: its prompt's, gathered as prefill chunks resolve, until sent (then None)
    prompt_logprobs: "list[TokenLogprob | None] | None" = None
    grammar: "Grammar | None" = None  # `params.json_schema`'s matcher (`flowserve/grammar.py`)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed
