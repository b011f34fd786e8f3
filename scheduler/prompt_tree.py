"""The global prompt tree: which TE holds which prompt prefix (PAPER.md section 3).

Each TE's RTC indexes full KV blocks by a chain hash (`flowserve.rtc.chain_hash`): a
block's hash covers its tokens and, through its parent's hash, every token before it. A
chain hash therefore names one node of a radix tree over token ids at block granularity,
and a map from chain hash to the TEs holding that block *is* that tree, stored flat. TEs
report the blocks they index and evict with every step (`Stats.cached`, `Stats.evicted`
in `flowserve/protocol.py`), so the tree mirrors their caches without asking them.
`dist_sched` asks it for the longest cached prefix of a prompt on each TE, walking the
prompt with the RTC's own `prefix_blocks`.
"""
from flowserve.rtc import prefix_blocks


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
        """For each TE, how many leading tokens of `token_ids` its RTC would reuse."""
        matched = dict.fromkeys(te_ids, 0)
        alive = set(te_ids)
        for i, (h, _) in enumerate(prefix_blocks(token_ids, self.block_size)):
            alive &= self.holders.get(h, set())
            if not alive:
                break
            for te in alive:
                matched[te] = (i + 1) * self.block_size
        return matched
