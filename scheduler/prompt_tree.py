"""The global prompt tree: which TE holds which prompt prefix (PAPER.md section 3).

Each TE's RTC indexes full KV blocks by a chain hash (`flowserve.rtc.chain_hash`): a
block's hash covers its tokens and, through its parent's hash, every token before it. A
chain hash therefore names one node of a radix tree over token ids at block granularity,
and a map from chain hash to the TEs holding that block *is* that tree, stored flat. TEs
report the blocks they index and evict with every step (`stats["cached"]`,
`stats["evicted"]`), so the tree mirrors their caches without asking them. `dist_sched`
asks it for the longest cached prefix of a prompt on each TE.
"""
from flowserve.rtc import chain_hash


class PromptTree:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.holders: dict[int, set[str]] = {}   # chain hash -> ids of the TEs that cache that block

    def update(self, te_id: str, cached: list[int], evicted: list[int]) -> None:
        for h in evicted:
            tes = self.holders.get(h)
            if tes:
                tes.discard(te_id)
                if not tes:
                    del self.holders[h]
        for h in cached:
            self.holders.setdefault(h, set()).add(te_id)

    def remove_te(self, te_id: str) -> None:
        self.update(te_id, [], [h for h, tes in self.holders.items() if te_id in tes])

    def matched_tokens(self, token_ids: list[int], te_ids: list[str]) -> dict[str, int]:
        """For each TE, how many leading tokens of `token_ids` it holds in full cached blocks
        (as its RTC would reuse them: at least one token is always left to compute)."""
        matched = dict.fromkeys(te_ids, 0)
        alive, parent, bs = set(te_ids), None, self.block_size
        for start in range(0, len(token_ids) - bs, bs):
            parent = chain_hash(parent, tuple(token_ids[start:start + bs]))
            alive &= self.holders.get(parent, set())
            if not alive:
                break
            for te in alive:
                matched[te] = start + bs
        return matched
