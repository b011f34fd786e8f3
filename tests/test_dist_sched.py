"""dist_sched (Algorithm 1) on plain data: the prompt tree, locality against load, round-robin,
context-cache holders, the PD-aware choice from a heatmap, decode candidates, and the reason
recorded for each. No TE, no socket, no event loop."""
from flowserve.config import EngineConfig
from flowserve.protocol import SamplingParams
from flowserve.rtc import chain_hash
from scheduler import dist_sched
from scheduler.cluster import GROUPS, Cluster
from scheduler.dist_sched import PromptTree
from scheduler.job import Task
from scheduler.pd_policy import Heatmap

# Disaggregated is faster only for long prompts with short outputs (the cell [1024, 0.03]).
HEATMAP = Heatmap(prefill_lens=[64, 1024], ratios=[0.03, 1.0],
                  colocated_ms=[[100, 100], [100, 100]], disagg_ms=[[200, 200], [50, 200]], setup="test")


def test_prompt_tree_mirrors_cached_blocks():
    tree, bs = PromptTree(block_size=4), 4
    prompt = list(range(13))
    h1 = chain_hash(None, tuple(prompt[0:4]))
    h2 = chain_hash(h1, tuple(prompt[4:8]))
    tree.update("te-0", [h1, h2], [])
    tree.update("te-1", [h1], [])
    assert tree.matched_tokens(prompt, ["te-0", "te-1", "te-2"]) == {"te-0": 2 * bs, "te-1": bs, "te-2": 0}
    assert tree.matched_tokens(prompt[:8], ["te-0"]) == {"te-0": bs}  # one token is always left to compute
    tree.update("te-0", [], [h1])
    assert tree.matched_tokens(prompt, ["te-0", "te-1"]) == {"te-0": 0, "te-1": bs}
    tree.remove_te("te-1")
    assert tree.holders == {h2: {"te-0"}}


def choose(free, matched, policy="locality", turn=0, holders=frozenset(), loads=None):
    return dist_sched.choose_te(free, loads or free, matched, policy, imbalance=4, turn=turn, holders=holders)


def test_locality_wins_while_loads_are_balanced():
    te, why = choose({"a": 0, "b": 3}, {"a": 0, "b": 64})
    assert te == "b"  # busier, but within the imbalance: the cached prefix wins
    assert why == {"policy": "locality", "balanced": True, "matched_tokens": 64, "loads": {"a": 0, "b": 3}}
    # equal prefixes: the less loaded of them
    assert choose({"a": 2, "b": 1, "c": 0}, {"a": 32, "b": 32, "c": 0})[0] == "b"


def test_load_wins_when_imbalanced():
    te, why = choose({"a": 0, "b": 5}, {"a": 0, "b": 64})
    assert te == "a" and why["policy"] == "load" and not why["balanced"] and why["matched_tokens"] == 0
    # imbalance counts every ready TE, not only the free ones
    assert choose({"a": 1, "b": 2}, {"a": 0, "b": 64}, loads={"a": 1, "b": 2, "full": 9})[0] == "a"
    # the "load" baseline never looks at prefixes; no prompt to compute (decode TEs): neither
    assert choose({"a": 1, "b": 0}, {"a": 64, "b": 0}, policy="load")[0] == "b"
    assert choose({"a": 1, "b": 0}, {})[0] == "b"


def test_ties_and_rr_go_round():
    assert [choose({"a": 0, "b": 0}, {"a": 0, "b": 0}, turn=t)[0] for t in range(4)] == ["a", "b", "a", "b"]
    picks = [choose({"a": 9, "b": 0, "c": 0}, {"a": 64, "b": 0, "c": 0}, policy="rr", turn=t) for t in range(3)]
    assert [te for te, _ in picks] == ["a", "b", "c"] and picks[0][1]["policy"] == "rr"


def test_context_cache_holders_come_first():
    te, why = choose({"a": 0, "b": 2, "c": 1}, {"a": 64, "b": 0, "c": 0}, holders={"b", "c", "gone"})
    assert te == "c" and why["policy"] == "context_cache"  # the least loaded holder, over any prefix
    assert choose({"a": 0}, {"a": 0}, holders={"b"})[0] == "a"  # no holder free: as any request


def test_pd_choice_from_the_heatmap():
    targets = {"colocated": 1, "prefill": 1, "decode": 1}
    assert dist_sched.pd_group(targets, None, has_heatmap=True) is None  # the heatmap decides
    assert dist_sched.pd_aware(900, 16, HEATMAP) == ("prefill", {
        "choice": "disaggregated", "predicted_output": 16, "cell": [1024, 0.03], "colocated_ms": 100, "disagg_ms": 50})
    assert dist_sched.pd_aware(900, 900, HEATMAP)[0] == "colocated"  # a long output: colocated
    assert dist_sched.pd_aware(80, 2, HEATMAP)[0] == "colocated"     # a short prompt: colocated
    # nothing to choose
    assert dist_sched.pd_group(targets, "prefill", True) == ("prefill", {"choice": "disaggregated",
                                                                        "why": "context cache"})
    assert dist_sched.pd_group({**targets, "colocated": 0}, None, False)[0] == "prefill"
    assert dist_sched.pd_group({**targets, "decode": 0}, None, False) == ("colocated", {"choice": "colocated",
                                                                                       "why": "only kind"})
    assert dist_sched.pd_group(targets, None, False) == ("colocated", {"choice": "colocated", "why": "no PD heatmap"})


def test_decode_candidates():
    free = {"d0": 0, "d1": 0, "d2": 0, "d3": 1}
    # the longest cached prefix among the least loaded, and its length
    assert dist_sched.decode_candidates(free, set(), {"d1": 32, "d2": 64, "d3": 128}) == (["d2"], 64)
    assert dist_sched.decode_candidates(free, set(), {}) == (["d0", "d1", "d2"], 0)
    # a free decode TE on the prefill TE's host first (shared memory), even a busier one
    assert dist_sched.decode_candidates(free, {"d3"}, {"d2": 64}) == (["d3"], 0)
    assert dist_sched.decode_candidates(free, {"elsewhere"}, {"d2": 64}) == (["d2"], 64)


def test_the_cluster_feeds_the_predictor_only_beside_a_heatmap():
    greedy = SamplingParams(temperature=0, max_tokens=900)
    long_long = Task("j", 0, list(range(900)), greedy)
    colocated = Cluster("model", {"colocated": (1, EngineConfig())})
    colocated.learn_decode_lengths([long_long])
    assert colocated.predictor is None and colocated.pd_aware(long_long) == "colocated"

    mixed = Cluster("model", {g: (1, EngineConfig()) for g in GROUPS}, heatmap=HEATMAP)
    assert mixed.pd_aware(long_long) == "colocated"  # no history: max_tokens, a long output
    long_long.num_output = 20
    mixed.learn_decode_lengths([long_long] * 5)
    assert mixed.pd_aware(long_long) == "prefill" and long_long.placement["pd"]["predicted_output"] == 20

