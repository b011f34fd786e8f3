"""dist_sched: Algorithm 1 of the paper (PAPER.md section 3), pure functions over plain data.

    dist_sched(request, TEs):
        TEs = PD_aware(request, TEs)                # colocated or disaggregated? (heatmap)
        if TEs are load-balanced: locality_aware    # the longest cached prefix wins
        else:                     load_aware        # the least loaded wins

The cluster (scheduler/cluster.py) keeps the state, feeding each group's `PromptTree`
from its TEs' steps; for each task it hands these functions plain values (TE ids, loads,
cached prompt tokens, a context cache's holders, the heatmap, a predicted decode length)
and acts on the choice, recording the reason in the task's placement: the group it waits
in (`pd_group`, else `pd_aware`), its TE (`choose_te`), and for a disaggregated task the
decode TE that takes its KV (`decode_candidates`, then `choose_te`).
"""
from flowserve.rtc import prefix_blocks
from scheduler.pd_policy import Heatmap

class PromptTree:
    """The global prompt tree of one TE group: which TE holds which prompt prefix.

    Each TE's RTC indexes full KV blocks by a chain hash (`flowserve.rtc.chain_hash`), which
    covers a block's tokens and, through its parent's hash, every token before it: it names
    one node of a radix tree over token ids, and a map from chain hash to the TEs holding
    that block *is* that tree, stored flat. TEs report the blocks they index and evict with
    every step (`Stats.cached`, `Stats.evicted`), so the tree mirrors their caches.
    """

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

    def matched_tokens(self, token_ids: list[int], te_ids: list[str], seed: int | None = None) -> dict[str, int]:
        """For each TE, how many leading tokens of `token_ids` its RTC would reuse (`seed`: a
        LoRA adapter's, whose KV is its own)."""
        matched = dict.fromkeys(te_ids, 0)
        alive = set(te_ids)
        for i, (h, _) in enumerate(prefix_blocks(token_ids, self.block_size, seed)):
            alive &= self.holders.get(h, set())
            if not alive:
                break
            for te in alive:
                matched[te] = (i + 1) * self.block_size
        return matched


def _pd(group: str, **why) -> dict:
    return {"choice": "disaggregated" if group == "prefill" else "colocated", **why}


def pd_group(targets: dict[str, int], cache_group: str | None, has_heatmap: bool) -> tuple[str, dict] | None:
    """The group a task waits in when there is nothing to choose: its context cache's, the
    only kind of TE the cluster has (`targets`: group sizes; PD tasks wait in "prefill"), or
    colocated where both kinds lack a heatmap. None: the heatmap decides (`pd_aware`)."""
    if cache_group:
        return cache_group, _pd(cache_group, why="context cache")
    has_pd = targets["prefill"] > 0 and targets["decode"] > 0
    if has_pd and targets["colocated"] > 0:
        return None if has_heatmap else ("colocated", _pd("colocated", why="no PD heatmap"))
    group = "prefill" if has_pd else "colocated"
    return group, _pd(group, why="only kind")


def pd_aware(prompt_len: int, predicted_output: int, heatmap: Heatmap) -> tuple[str, dict]:
    """Algorithm 1, first step: colocated or disaggregated ("prefill"), whichever was faster
    in the heatmap's cell at the prompt length and the predicted decode length."""
    disagg, cell = heatmap.choose(prompt_len, predicted_output)
    group = "prefill" if disagg else "colocated"
    return group, _pd(group, predicted_output=predicted_output, **cell)


def _least_loaded(ids: list[str], loads: dict[str, int]) -> list[str]:
    least = min(loads[te] for te in ids)
    return [te for te in ids if loads[te] == least]


def choose_te(free: dict[str, int], loads: dict[str, int], matched: dict[str, int], policy: str,
              imbalance: int, turn: int, holders: set[str] = frozenset()) -> tuple[str, dict]:
    """Algorithm 1, the TE within a group. `free`: the TEs with a free batch slot and their
    loads (tasks); `loads`: every ready TE of the group; `matched`: the prompt tokens each
    free TE caches (empty for decode TEs: no prompt to compute); `holders`: the TEs that pin
    the task's context cache; `turn`: a round-robin count.

    A holder of the context cache first (MatchByID there beats any prefix). Then, while the
    spread of `loads` is at most `imbalance`, the longest cached prefix (locality-aware);
    else the least loaded (load-aware). Ties: least loaded, then round-robin. `policy`
    "load" and "rr" are the baselines."""
    if held := [te for te in free if te in holders]:
        return _least_loaded(held, free)[0], {"policy": "context_cache", "loads": loads}
    ids = list(free)
    if policy == "rr":
        return ids[turn % len(ids)], {"policy": "rr", "loads": loads}
    balanced = max(loads.values()) - min(loads.values()) <= imbalance
    locality = policy == "locality" and balanced and bool(matched)
    if locality:
        best = max(matched.values())
        ids = [te for te in ids if matched[te] == best]
    ids = _least_loaded(ids, free)
    te = ids[turn % len(ids)]
    return te, {"policy": "locality" if locality else "load", "balanced": balanced,
                "matched_tokens": matched.get(te, 0), "loads": loads}


def adapter_aware(free: list[str], slots: dict[str, list[str | None]], digest: str) -> tuple[list[str], dict]:
    """A task with a LoRA adapter: the free TEs that hold it in a slot (`slots`: each TE's,
    by digest), which run it without loading it first; else all of them (the chosen one
    loads it). Then the usual choice among those."""
    held = [te for te in free if digest in slots[te]]
    return held or free, {"adapter": "in a slot" if held else "loaded on first use"}


def decode_candidates(free: dict[str, int], same_host: set[str], matched: dict[str, int]) -> tuple[list[str], int]:
    """A disaggregated task's decode TEs to choose from, of `free` (id -> load): on the
    prefill TE's host (`same_host`) if any is free there (KV through shared memory, not
    TCP); of those the least loaded; of those the ones caching the longest prefix of the
    prompt (`matched`), and that length: the prefill TE sends only the blocks past it."""
    ids = _least_loaded([te for te in free if te in same_host] or list(free), free)
    best = max(matched.get(te, 0) for te in ids)
    return [te for te in ids if matched.get(te, 0) == best], best
