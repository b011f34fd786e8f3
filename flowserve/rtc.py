"""RTC, the Relational Tensor Cache: the engine's KV-cache manager (PAPER.md section 2).

The KV cache is a pool of fixed-size blocks (`flowserve.model.ModelRunner` owns the tensors;
this module owns only their bookkeeping). Each sequence has a block table. Full blocks
whose K/V have been computed are indexed by a chain hash of their tokens (the hash of a
block covers every token before it too, and a sequence's LoRA adapter: its chain starts from
the adapter's digest), so a new prompt can reuse the longest cached prefix computed with the
same weights: MatchByPrefixToken. Blocks nobody references stay cached and are evicted least
recently used first when a new block is needed.

Explicit context caching (`POST /v1/caches`, scheduler/caches.py) adds a second index: a
cache id names the full blocks of a context's prompt, pinned (a reference of their own, so
no eviction takes them) until the main process unpins them at the TTL's end or a DELETE.
A request that names the id starts from those blocks: MatchByID.

A DRAM tier (`EngineConfig.dram_kv_gb`) extends the device pool with a host-memory one, with
its own LRU and index by the same chain hashes. A cached block about to be evicted from the
device is first copied there (Copy); a prefix lookup that runs past the device's blocks goes
on in DRAM, and brings those blocks back into fresh device blocks (Populate) when the cost
model (`CostModel`, rates measured at engine start) says copying beats recomputing them. A
preempted sequence's blocks are swapped out to DRAM, held there for it, and populated back
when it is admitted again (`swap_out`, `swap_in`). The RTC only decides: it queues each
move (`drain_moves`), and the engine has `ModelRunner` copy the bytes before the next
forward. The cache events describe the device tier only: the scheduler's prompt tree
predicts device hits, and a populated block is indexed (and reported) again.

API, in the paper's words: `match_by_prefix_token`, `match_by_id`, `alloc_blocks` (AllocBlocks
for a prefill chunk, AppendBlock for a decode step: both grow a block table),
`cache_full_blocks` (index what was just computed), `pin`, `unpin`, `free`; with a DRAM tier
the Copy and Populate inside `alloc_blocks` and `attach_prefix`, and `swap_out`, `swap_in`.
"""
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice

from flowserve.sequence import Sequence


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None       # set while the block is in the prefix index
    token_ids: tuple[int, ...] = ()


@dataclass
class CostModel:
    """Fetch or recompute (PAPER.md section 2): the rates `Engine.calibrate` measured, and the
    bytes of one block (all layers' K and V)."""
    block_bytes: int
    copy_bytes_per_s: float       # device -> DRAM -> device, averaged over both directions
    prefill_tokens_per_s: float

    def copy_beats_recompute(self, num_blocks: int, num_tokens: int, copies: int = 1) -> bool:
        """Whether `copies` copies of `num_blocks` blocks take less time than a prefill of `num_tokens`."""
        return copies * num_blocks * self.block_bytes / self.copy_bytes_per_s < num_tokens / self.prefill_tokens_per_s


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    # Ints only, so every process computes the same value (the scheduler's prompt tree mirrors
    # TEs' caches by these hashes; Python 3.11 hashes None by its address, which differs).
    return hash((-1 if parent is None else parent, tokens))


def prefix_blocks(token_ids: list[int], block_size: int, seed: int | None = None):
    """(chain hash, tokens) of each full block a prompt may take from a prefix cache, in order:
    every full block but one that would leave no token to compute (the last token's logits are
    what the next token is sampled from). The RTC and the scheduler's prompt tree both walk
    prompts with this, so dist_sched predicts exactly the hits a TE will have. `seed` starts
    the chain: a LoRA adapter's (`flowserve.lora.hash_seed`), None for the base model, so KV
    computed with different weights never matches."""
    parent = seed
    for start in range(0, len(token_ids) - block_size, block_size):
        tokens = tuple(token_ids[start:start + block_size])
        parent = chain_hash(parent, tokens)
        yield parent, tokens


def lookup(index: dict[int, int], blocks: list[Block], h: int, tokens: tuple[int, ...]) -> int | None:
    """The block indexed under chain hash `h`, verified against its tokens: a hash collision is
    a miss, not a wrong answer."""
    block_id = index.get(h)
    return block_id if block_id is not None and blocks[block_id].token_ids == tokens else None


class RTC:
    def __init__(self, num_blocks: int, block_size: int, num_dram_blocks: int = 0, cost: CostModel | None = None):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks, least recently used first. Cached ones keep their hash until
        # they are reused for something else.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_index: dict[int, int] = {}   # chain hash -> block id
        # cache id -> pinned blocks, their tokens, the hash seed (LoRA adapter) they were computed with
        self.id_index: dict[str, tuple[list[int], tuple[int, ...], int | None]] = {}
        self.prefix_queries = 0                  # prompt tokens looked up
        self.prefix_hits = 0                     # of which served from the cache
        # Blocks indexed and evicted since the last `drain_cache_events`: the TE reports them
        # so the scheduler's global prompt tree (`PromptTree` in scheduler/cluster.py) mirrors this cache.
        self.cached_events: list[int] = []
        self.evicted_events: list[int] = []
        # The DRAM tier, kept like the device pool; used with a cost model (`Engine.calibrate`).
        self.dram_blocks = [Block(i) for i in range(num_dram_blocks)]
        self.dram_free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_dram_blocks))
        self.dram_index: dict[int, int] = {}     # chain hash -> DRAM block id
        self.cost = cost
        self.moves: list[tuple[bool, int, int]] = []  # (to DRAM, source, destination): `drain_moves`
        self.dram_copied = 0                     # blocks copied to DRAM (Copy, swap-outs)
        self.dram_populated = 0                  # blocks copied back (Populate, swap-ins)
        self.dram_recomputed = 0                 # blocks found in DRAM that the cost model left to recompute

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

    @property
    def num_dram_free(self) -> int:
        return len(self.dram_free)

    def match_by_prefix_token(self, token_ids: list[int], seed: int | None = None) -> list[int]:
        """Block ids holding the longest cached prefix of `token_ids` (`prefix_blocks`) on the device."""
        matched = []
        for h, tokens in prefix_blocks(token_ids, self.block_size, seed):
            block_id = lookup(self.prefix_index, self.blocks, h, tokens)
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def match_by_id(self, cache_id: str, token_ids: list[int], seed: int | None = None) -> list[int]:
        """The blocks pinned under `cache_id` that hold a prefix of `token_ids`, as many as
        `prefix_blocks` would take, if they were computed with the same weights (`seed`)."""
        blocks, tokens, pinned_seed = self.id_index.get(cache_id, ([], (), None))
        if pinned_seed != seed:
            return []
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
        self.id_index[cache_id] = (seq.block_ids[:n], tuple(seq.token_ids[:n * self.block_size]), seq.hash_seed)

    def unpin(self, cache_id: str) -> bool:
        """Drop a context's pin; its blocks stay in the prefix cache until evicted."""
        blocks, _, _ = self.id_index.pop(cache_id, ([], (), None))
        for block_id in blocks:
            self._unref(block_id)
        return bool(blocks)

    @property
    def num_pinned(self) -> int:
        return sum(len(blocks) for blocks, _, _ in self.id_index.values())

    def count_prefix_lookup(self, num_prompt: int, num_hit: int) -> None:
        """A sequence's first admission: `num_hit` of its `num_prompt` tokens came from the cache."""
        self.prefix_queries += num_prompt
        self.prefix_hits += num_hit

    def attach_prefix(self, seq: Sequence) -> None:
        """Start a sequence from its cached prefix: the longer of what the prefix index and,
        for a request on a context cache, the id index hold. None for one that still wants its
        prompt's logprobs (`Sequence.prompt_logprobs`): it computes every position."""
        if seq.prompt_logprobs is not None:  # its prompt's logprobs need every position's logits
            seq.block_ids, seq.block_hashes, seq.num_computed = [], [], 0
            return
        matched = self.match_by_prefix_token(seq.token_ids, seq.hash_seed)
        if seq.cache_id is not None:
            matched = max(matched, self.match_by_id(seq.cache_id, seq.token_ids, seq.hash_seed), key=len)
        for block_id in matched:
            self._ref(block_id)
        seq.block_ids = list(matched)
        seq.block_hashes = [h for h, _ in islice(prefix_blocks(seq.token_ids, self.block_size, seq.hash_seed),
                                                 len(matched))]
        self._populate_prefix(seq)
        seq.num_computed = len(seq.block_ids) * self.block_size

    def _populate_prefix(self, seq: Sequence) -> None:
        """MatchByPrefixToken past the device's blocks: the blocks after them are looked up on
        the device, then in DRAM, and the ones in DRAM are populated into fresh device blocks
        if the cost model says copying them beats recomputing them."""
        if self.cost is None:
            return
        found = []  # the blocks either tier holds, up to the first that neither does
        for h, tokens in islice(prefix_blocks(seq.token_ids, self.block_size, seq.hash_seed), len(seq.block_ids), None):
            on_device = lookup(self.prefix_index, self.blocks, h, tokens) is not None
            if not on_device and lookup(self.dram_index, self.dram_blocks, h, tokens) is None:
                break
            found.append((h, tokens, on_device))
        num_dram = sum(not on_device for *_, on_device in found)
        if not self.cost.copy_beats_recompute(num_dram, num_dram * self.block_size):
            self.dram_recomputed += num_dram
            return
        populated = []  # (DRAM block, device block, hash, tokens)
        for h, tokens, _ in found:  # looked up again: a block taken below may move a later one
            block_id = lookup(self.prefix_index, self.blocks, h, tokens)
            if block_id is not None:
                self._ref(block_id)
            else:
                dram_id = lookup(self.dram_index, self.dram_blocks, h, tokens)
                if dram_id is None or not self.free_blocks:
                    break  # taken by a Copy below, or no device block left: recomputed
                self._ref(dram_id, dram=True)  # held: the Copy of an eviction below cannot take it
                block_id = self._alloc_block()
                populated.append((dram_id, block_id, h, tokens))
            seq.block_ids.append(block_id)
            seq.block_hashes.append(h)
        # Queued after the evictions' Copies, so that all of them make two batches (`drain_moves`).
        for dram_id, block_id, h, tokens in populated:
            self.moves.append((False, dram_id, block_id))
            self._unref(dram_id, dram=True)
            self._index(block_id, h, tokens)
        self.dram_populated += len(populated)

    def alloc_blocks(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold `num_new_tokens` more tokens; False if the pool is short."""
        need = -(-(seq.num_computed + num_new_tokens) // self.block_size) - len(seq.block_ids)
        if need > len(self.free_blocks):
            return False
        for _ in range(need):
            seq.block_ids.append(self._alloc_block())
        return True

    def _alloc_block(self) -> int:
        """Take the least recently used free block. A cached one is evicted from the prefix
        index, copied to the DRAM tier first where it could be populated back (Copy)."""
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            del self.prefix_index[block.hash]
            self.evicted_events.append(block.hash)
            if self.cost is not None and self.cost.copy_beats_recompute(1, self.block_size):
                dram_id = self.dram_index.get(block.hash)
                if dram_id is None and self.dram_free:
                    self._copy_out(block_id, block.hash, block.token_ids)
                elif dram_id in self.dram_free:  # DRAM has it already (populated from there): refresh it
                    self.dram_free.move_to_end(dram_id)
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def _copy_out(self, block_id: int, h: int | None, tokens: tuple[int, ...]) -> int:
        """Queue the copy of a device block into the least recently used free DRAM block, which
        it indexes under `h` (None: a swapped-out block that is not full, or not yet hashed)."""
        dram_id = next(iter(self.dram_free))
        self.dram_free.move_to_end(dram_id)  # still free: most recently used
        block = self.dram_blocks[dram_id]
        if block.hash is not None:
            del self.dram_index[block.hash]
            block.hash, block.token_ids = None, ()
        if h is not None and h not in self.dram_index:
            self.dram_index[h] = dram_id
            block.hash, block.token_ids = h, tokens
        self.moves.append((True, block_id, dram_id))
        self.dram_copied += 1
        return dram_id

    def swap_out(self, seq: Sequence) -> bool:
        """Preempt `seq` by swapping: copy its computed blocks to DRAM, held there for it
        (`Sequence.dram_ids`; its full blocks stay findable by hash too), and free its device
        blocks, keeping its progress for `swap_in`. False, with nothing done, if DRAM lacks
        room or the cost model says recomputing its tokens beats copying them out and back."""
        bs, n = self.block_size, -(-seq.num_computed // self.block_size)
        if (self.cost is None or n > len(self.dram_free)
                or not self.cost.copy_beats_recompute(n, seq.num_computed, copies=2)):
            return False
        dram_ids = []
        for i, block_id in enumerate(seq.block_ids[:n]):
            h = seq.block_hashes[i] if i < len(seq.block_hashes) else None
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            dram_id = None if h is None else lookup(self.dram_index, self.dram_blocks, h, tokens)
            if dram_id is None:
                dram_id = self._copy_out(block_id, h, tokens)
            self._ref(dram_id, dram=True)
            dram_ids.append(dram_id)
        num_computed, hashes = seq.num_computed, seq.block_hashes
        self.free(seq)
        seq.dram_ids, seq.num_computed, seq.block_hashes = dram_ids, num_computed, hashes
        return True

    def swap_in(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Admit a swapped-out sequence again: its blocks still cached on the device are shared,
        the others populated from its DRAM blocks into fresh ones, and the block table grows
        for `num_new_tokens` more tokens. False, with nothing changed, if the pool is short."""
        bs = self.block_size
        tokens = [tuple(seq.token_ids[i * bs:(i + 1) * bs]) for i in range(len(seq.block_hashes))]
        shared = {i: block_id for i, h in enumerate(seq.block_hashes)
                  if (block_id := lookup(self.prefix_index, self.blocks, h, tokens[i])) is not None}
        for block_id in shared.values():
            self._ref(block_id)
        if -(-(seq.num_computed + num_new_tokens) // bs) - len(shared) > len(self.free_blocks):
            for block_id in shared.values():
                self._unref(block_id)
            return False
        seq.block_ids = [shared[i] if i in shared else self._alloc_block() for i in range(len(seq.dram_ids))]
        for i, (dram_id, block_id) in enumerate(zip(seq.dram_ids, seq.block_ids)):
            if i not in shared:  # queued after the evictions' Copies: two batches
                self.moves.append((False, dram_id, block_id))
                self.dram_populated += 1
                if i < len(tokens):
                    self._index(block_id, seq.block_hashes[i], tokens[i])
            self._unref(dram_id, dram=True)
        seq.dram_ids = []
        self.alloc_blocks(seq, num_new_tokens)  # fits: counted above
        return True

    def drain_moves(self) -> list[tuple[bool, list[int], list[int]]]:
        """The copies queued since the last call, as batches to carry out in order: (to DRAM,
        source blocks, destination blocks). A batch goes one way and writes each destination
        once, so a move that must see an earlier one's result is in a later batch."""
        batches: list[tuple[bool, list[int], list[int]]] = []
        for to_dram, src, dst in self.moves:
            if not batches or batches[-1][0] != to_dram or dst in batches[-1][2]:
                batches.append((to_dram, [], []))
            batches[-1][1].append(src)
            batches[-1][2].append(dst)
        self.moves = []
        return batches

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Index every block that is now full of computed tokens whose ids are known: with async
        scheduling a token still being sampled may be computed already (`Sequence.num_pending`)."""
        bs = self.block_size
        # (a swapped-out sequence has its computed tokens in DRAM, and no device block)
        for i in range(len(seq.block_hashes), min(seq.num_computed, len(seq.token_ids), len(seq.block_ids) * bs) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else seq.hash_seed, tokens)
            seq.block_hashes.append(h)
            self._index(seq.block_ids[i], h, tokens)

    def _index(self, block_id: int, h: int, tokens: tuple[int, ...]) -> None:
        if h not in self.prefix_index:  # an identical block computed elsewhere stays the indexed one
            self.prefix_index[h] = block_id
            block = self.blocks[block_id]
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
        for dram_id in seq.dram_ids:  # swapped out, and ended before it came back
            self._unref(dram_id, dram=True)
        seq.block_ids, seq.block_hashes, seq.num_computed, seq.dram_ids = [], [], 0, []

    def _unref(self, block_id: int, dram: bool = False) -> None:
        blocks, free = (self.dram_blocks, self.dram_free) if dram else (self.blocks, self.free_blocks)
        block = blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            free[block_id] = None
            if block.hash is None:
                free.move_to_end(block_id, last=False)

    def _ref(self, block_id: int, dram: bool = False) -> None:
        blocks, free = (self.dram_blocks, self.dram_free) if dram else (self.blocks, self.free_blocks)
        block = blocks[block_id]
        if block.ref_count == 0:
            del free[block_id]
        block.ref_count += 1
