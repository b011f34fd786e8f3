"""RTC, the Relational Tensor Cache: the engine's KV-cache manager (PAPER.md section 2).

The KV cache is a pool of fixed-size blocks (`flowserve.model.ModelRunner` owns the tensors;
this module owns only their bookkeeping). Each sequence has a block table. Full blocks
whose K/V have been computed are indexed by a chain hash of their tokens (the hash of a
block covers every token before it too), so a new prompt can reuse the longest cached
prefix: MatchByPrefixToken. Blocks nobody references stay cached and are evicted least
recently used first when a new block is needed.

Explicit context caching (`POST /v1/caches`, scheduler/caches.py) adds a second index: a
cache id names the full blocks of a context's prompt, pinned (a reference of their own, so
no eviction takes them) until the main process unpins them at the TTL's end or a DELETE.
A request that names the id starts from those blocks: MatchByID.

API, in the paper's words: `match_by_prefix_token`, `match_by_id`, `alloc_blocks` (AllocBlocks
for a prefill chunk, AppendBlock for a decode step: both grow a block table),
`cache_full_blocks` (index what was just computed), `pin`, `unpin`, `free`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the batcher, which holds sequences, imports the RTC
    from flowserve.batcher import Sequence


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None       # set while the block is in the prefix index
    token_ids: tuple[int, ...] = ()


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    # Ints only, so every process computes the same value (the scheduler's prompt tree mirrors
    # TEs' caches by these hashes; Python 3.11 hashes None by its address, which differs).
    return hash((-1 if parent is None else parent, tokens))


def prefix_blocks(token_ids: list[int], block_size: int):
    """(chain hash, tokens) of each full block a prompt may take from a prefix cache, in order:
    every full block but one that would leave no token to compute (the last token's logits are
    what the next token is sampled from). The RTC and the scheduler's prompt tree both walk
    prompts with this, so dist_sched predicts exactly the hits a TE will have."""
    parent = None
    for start in range(0, len(token_ids) - block_size, block_size):
        tokens = tuple(token_ids[start:start + block_size])
        parent = chain_hash(parent, tokens)
        yield parent, tokens


class RTC:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks, least recently used first. Cached ones keep their hash until
        # they are reused for something else.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_index: dict[int, int] = {}   # chain hash -> block id
        self.id_index: dict[str, tuple[list[int], tuple[int, ...]]] = {}  # cache id -> pinned blocks, their tokens
        self.prefix_queries = 0                  # prompt tokens looked up
        self.prefix_hits = 0                     # of which served from the cache
        # Blocks indexed and evicted since the last `drain_cache_events`: the TE reports them
        # so the scheduler's global prompt tree (`PromptTree` in scheduler/cluster.py) mirrors this cache.
        self.cached_events: list[int] = []
        self.evicted_events: list[int] = []

    @property
    def num_blocks_total(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a sequence (cached-but-idle blocks count as free)."""
        return 1.0 - len(self.free_blocks) / len(self.blocks)

    def match_by_prefix_token(self, token_ids: list[int]) -> list[int]:
        """Block ids holding the longest cached prefix of `token_ids` (`prefix_blocks`)."""
        matched = []
        for h, tokens in prefix_blocks(token_ids, self.block_size):
            block_id = self.prefix_index.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break  # verified against the tokens: a hash collision is a miss, not a wrong answer
            matched.append(block_id)
        return matched

    def match_by_id(self, cache_id: str, token_ids: list[int]) -> list[int]:
        """The blocks pinned under `cache_id` that hold a prefix of `token_ids`, as many as
        `prefix_blocks` would take."""
        blocks, tokens = self.id_index.get(cache_id, ([], ()))
        bs, matched = self.block_size, []
        for i, block_id in enumerate(blocks[:(len(token_ids) - 1) // bs]):
            if tuple(token_ids[i * bs:(i + 1) * bs]) != tokens[i * bs:(i + 1) * bs]:
                break
            matched.append(block_id)
        return matched

    def pin(self, cache_id: str, seq: Sequence) -> None:
        """Keep the computed full blocks of `seq`'s prompt under `cache_id` until `unpin`."""
        self.unpin(cache_id)  # a context rebuilt on this TE replaces its older pin
        n = seq.num_prompt // self.block_size
        for block_id in seq.block_ids[:n]:
            self._ref(block_id)
        self.id_index[cache_id] = (seq.block_ids[:n], tuple(seq.token_ids[:n * self.block_size]))

    def unpin(self, cache_id: str) -> bool:
        """Drop a context's pin; its blocks stay in the prefix cache until evicted."""
        blocks, _ = self.id_index.pop(cache_id, ([], ()))
        for block_id in blocks:
            self._unref(block_id)
        return bool(blocks)

    @property
    def num_pinned(self) -> int:
        return sum(len(blocks) for blocks, _ in self.id_index.values())

    def count_prefix_lookup(self, num_prompt: int, num_hit: int) -> None:
        """A sequence's first admission: `num_hit` of its `num_prompt` tokens came from the cache."""
        self.prefix_queries += num_prompt
        self.prefix_hits += num_hit

    def attach_prefix(self, seq: Sequence) -> None:
        """Start a sequence from its cached prefix: the longer of what the prefix index and,
        for a request on a context cache, the id index hold."""
        matched = self.match_by_prefix_token(seq.token_ids)
        if seq.cache_id is not None:
            matched = max(matched, self.match_by_id(seq.cache_id, seq.token_ids), key=len)
        for block_id in matched:
            self._ref(block_id)
        seq.block_ids = list(matched)
        seq.block_hashes = [h for h, _ in islice(prefix_blocks(seq.token_ids, self.block_size), len(matched))]
        seq.num_computed = len(matched) * self.block_size

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_ids))

    def alloc_blocks(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold `num_new_tokens` more tokens; False if the pool is short."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free_blocks):
            return False
        for _ in range(need):
            block_id, _ = self.free_blocks.popitem(last=False)  # least recently used
            block = self.blocks[block_id]
            if block.hash is not None:  # evict it from the prefix index
                del self.prefix_index[block.hash]
                self.evicted_events.append(block.hash)
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            seq.block_ids.append(block_id)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Index every block that is now full of computed tokens whose ids are known: with async
        scheduling a token still being sampled may be computed already (`Sequence.num_pending`)."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), min(seq.num_computed, len(seq.token_ids)) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_ids[i]]
            if h not in self.prefix_index:  # an identical block computed elsewhere stays the indexed one
                self.prefix_index[h] = block.id
                block.hash, block.token_ids = h, tokens
                self.cached_events.append(h)

    def drain_cache_events(self) -> tuple[list[int], list[int]]:
        """Chain hashes of the blocks indexed and evicted since the last call."""
        events = self.cached_events, self.evicted_events
        self.cached_events, self.evicted_events = [], []
        return events

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; cached blocks go to the LRU tail, others to the head."""
        for block_id in reversed(seq.block_ids):
            self._unref(block_id)
        seq.block_ids, seq.block_hashes, seq.num_computed = [], [], 0

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_blocks[block_id] = None
            if block.hash is None:
                self.free_blocks.move_to_end(block_id, last=False)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1
