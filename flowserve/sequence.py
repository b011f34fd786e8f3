"""A request inside the engine: its tokens, its sampling parameters, its place in the KV cache.

Created by `flowserve.engine.Engine.add_request`, moved between the waiting and running
queues by `flowserve.batcher`, given blocks by `flowserve.rtc`, and read by
`flowserve.model_runner` to build each step's input.
"""
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # SamplingParams crosses to the main process, which never loads torch
    import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0   # 0: greedy
    top_p: float = 1.0
    top_k: int = -1            # -1: off
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]          # prompt, then generated tokens
    num_prompt: int
    params: SamplingParams
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0         # leading tokens whose K/V are in the cache
    num_cached: int | None = None  # prompt tokens the prefix cache served at first admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of full, computed blocks
    generator: "torch.Generator | None" = None
    handoff: bool = False         # prefill-only (PD): after the first token its blocks go to a decode TE

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]
