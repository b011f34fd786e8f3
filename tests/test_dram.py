"""The RTC's DRAM tier: Copy on eviction, Populate on a prefix hit in DRAM, swap preemption.

The bookkeeping first, on the RTC alone (which blocks move where, in which batches, what a
lookup finds), then the real default model: tokens populated from DRAM, or swapped out and
back, are exactly those recomputed, greedy and seeded, with async scheduling too; the cost
model's choice is what happens; nothing is leaked on either tier."""
import pytest
import torch

from flowserve.engine import Engine
from flowserve.protocol import SamplingParams
from flowserve.rtc import RTC, CostModel
from tests.test_engine import assert_no_leak, make_engine, random_prompts
from tests.test_rtc import run_prefill, seq

COPY = CostModel(block_bytes=1000, copy_bytes_per_s=1e9, prefill_tokens_per_s=1e3)       # copying pays
RECOMPUTE = CostModel(block_bytes=1000, copy_bytes_per_s=1e3, prefill_tokens_per_s=1e9)  # it never does


def dram_rtc(num_blocks: int, num_dram: int, cost: CostModel = COPY) -> RTC:
    rtc = RTC(num_blocks, block_size=4, num_dram_blocks=num_dram, cost=cost)
    return rtc


def assert_dram_consistent(rtc: RTC) -> None:
    """Nothing referenced or queued; the DRAM index and its blocks agree."""
    assert rtc.num_dram_free == len(rtc.dram_blocks) and all(b.ref_count == 0 for b in rtc.dram_blocks)
    assert all(rtc.dram_blocks[d].hash == h for h, d in rtc.dram_index.items())
    assert sum(b.hash is not None for b in rtc.dram_blocks) == len(rtc.dram_index)
    assert not rtc.moves


def assert_no_dram_leak(engine: Engine) -> None:
    assert_no_leak(engine)
    assert_dram_consistent(engine.rtc)


# ---------------------------------------------------------------------------- bookkeeping

def test_evicted_blocks_are_copied_then_populated_back():
    rtc = dram_rtc(num_blocks=4, num_dram=4)
    a = seq(range(9), "a")
    run_prefill(rtc, a)
    a_blocks = a.block_ids[:2]
    rtc.free(a)
    b = seq(range(100, 116), "b")           # four blocks: evicts a's two cached ones
    run_prefill(rtc, b)
    [(to_dram, src, dram_ids)] = rtc.drain_moves()
    assert to_dram and sorted(src) == sorted(a_blocks)
    assert rtc.match_by_prefix_token(list(range(9))) == []  # gone from the device...
    rtc.free(b)
    c = seq(list(range(8)) + [99], "c")
    rtc.attach_prefix(c)                    # ...found in DRAM, populated back
    assert c.num_computed == 8 and rtc.dram_populated == 2
    (out, _, _), (into, src, dst) = rtc.drain_moves()  # Copies of b's blocks first, then the Populate
    assert out and not into and sorted(src) == sorted(dram_ids) and dst == c.block_ids
    assert rtc.match_by_prefix_token(list(range(9))) == c.block_ids  # indexed on the device again
    rtc.free(c)
    d = seq(range(200, 216), "d")           # evicts c's blocks: DRAM holds them already, no copy
    run_prefill(rtc, d)
    assert [len(src) for _, src, _ in rtc.drain_moves()] == [2]  # b's other two blocks only
    rtc.free(d)
    assert rtc.num_free == 4
    assert_dram_consistent(rtc)


def test_moves_batch_by_direction_and_never_write_a_block_twice():
    rtc = dram_rtc(num_blocks=4, num_dram=4)
    rtc.moves = [(True, 0, 2), (True, 1, 3), (False, 2, 1), (True, 0, 3), (True, 1, 3)]
    assert rtc.drain_moves() == [(True, [0, 1], [2, 3]), (False, [2], [1]), (True, [0], [3]), (True, [1], [3])]
    assert rtc.drain_moves() == []


def test_recompute_when_the_cost_model_says_so():
    rtc = dram_rtc(num_blocks=3, num_dram=4, cost=RECOMPUTE)
    a = seq(range(9), "a")
    run_prefill(rtc, a)
    rtc.free(a)
    b = seq(range(100, 109), "b")
    run_prefill(rtc, b)                     # evicts a's blocks: no copy, it would never pay
    assert rtc.drain_moves() == [] and rtc.dram_copied == 0
    rtc.free(b)
    rtc.cost = COPY
    a = seq(range(9), "a")
    run_prefill(rtc, a)                     # evicts b's blocks: copied
    rtc.free(a)
    assert rtc.dram_copied == 2
    rtc.drain_moves()
    rtc.cost = RECOMPUTE
    again = seq(range(100, 109), "again")
    rtc.attach_prefix(again)
    assert again.num_computed == 0 and rtc.dram_recomputed == 2 and rtc.drain_moves() == []
    rtc.free(again)
    assert_dram_consistent(rtc)


def test_swap_out_and_in():
    rtc = dram_rtc(num_blocks=4, num_dram=4)
    s = seq(range(10), "s")
    run_prefill(rtc, s)                     # two full blocks and a partial one
    device_blocks = list(s.block_ids)
    assert rtc.swap_out(s)
    [(to_dram, src, dram_ids)] = rtc.drain_moves()
    assert to_dram and src == device_blocks and s.dram_ids == dram_ids
    assert s.num_computed == 10 and s.block_ids == [] and rtc.num_free == 4
    assert rtc.num_dram_free == 1           # held for it
    # Back at once: the full blocks are still cached on the device and are shared, the partial
    # one (freed to the LRU head) is populated.
    assert rtc.swap_in(s, 1)
    [(to_dram, src, dst)] = rtc.drain_moves()
    assert not to_dram and src == dram_ids[2:] and s.block_ids[:2] == device_blocks[:2] and dst == s.block_ids[2:]
    assert s.num_computed == 10 and len(s.block_ids) == 3 and s.dram_ids == []
    s.num_computed = 11
    rtc.cache_full_blocks(s)
    assert rtc.swap_out(s)
    rtc.drain_moves()
    other = seq(range(100, 116), "other")   # takes the whole device pool
    run_prefill(rtc, other)
    assert not rtc.swap_in(s, 1)            # the pool is short: nothing changes
    assert s.block_ids == [] and len(s.dram_ids) == 3 and rtc.num_free == 0
    rtc.free(other)
    rtc.drain_moves()
    assert rtc.swap_in(s, 1)                # everything comes back from DRAM now
    [(to_dram, src, dst)] = rtc.drain_moves()[-1:]
    assert not to_dram and len(src) == 3 and dst == s.block_ids[:3]
    rtc.free(s)
    assert rtc.num_free == 4
    assert_dram_consistent(rtc)


def test_a_swapped_out_sequence_that_ends_frees_its_dram_blocks():
    rtc = dram_rtc(num_blocks=4, num_dram=4)
    s = seq(range(6), "s")
    run_prefill(rtc, s)
    assert rtc.swap_out(s)
    rtc.drain_moves()
    rtc.free(s)                             # aborted while waiting
    assert s.dram_ids == [] and s.num_computed == 0
    assert_dram_consistent(rtc)


def test_no_swap_without_room_or_payoff():
    for rtc in dram_rtc(num_blocks=4, num_dram=2), dram_rtc(num_blocks=4, num_dram=4, cost=RECOMPUTE):
        s = seq(range(10), "s")             # three blocks: two fit in DRAM
        run_prefill(rtc, s)
        assert not rtc.swap_out(s)
        assert s.num_computed == 10 and len(s.block_ids) == 3 and rtc.moves == []


# ---------------------------------------------------------------------------- the real model

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
DRAM = dict(dram_kv_gb=0.05)  # ~70 blocks of SmolLM2's 720 KiB


def test_copy_and_populate_move_the_bytes_exactly(model_path, weights):
    engine = make_engine(model_path, weights, num_kv_blocks=16, **DRAM)
    runner = engine.runner
    assert engine.rtc.cost.copy_bytes_per_s > 0 and engine.rtc.cost.prefill_tokens_per_s > 0
    for k, v in runner.kv_cache:
        k.normal_(), v.normal_()
    src, dram, dst = [3, 7, 8, 1], [5, 6, 7, 20], [0, 12, 2, 9]  # runs of consecutive ids, and not
    runner.copy_to_dram(src, dram)
    runner.populate(dram, dst)
    for k, v in runner.kv_cache:
        for c in k, v:
            assert torch.equal(c[:, dst], c[:, src])


@pytest.fixture(scope="module")
def evicted_prefix():
    """A prompt that shares 150 tokens with one computed before, and two others in between
    whose blocks evict the shared prefix from a 24-block pool."""
    shared, b, c = random_prompts(3, 150, 151, seed=1)
    return [shared + [500, 600], b, c, shared + [800, 900, 1000]]


def test_populate_from_dram_gives_the_recomputed_tokens(model_path, weights, evicted_prefix):
    recompute = make_engine(model_path, weights, num_kv_blocks=24)
    expected = [recompute.generate([p], GREEDY)[0] for p in evicted_prefix]
    engine = make_engine(model_path, weights, num_kv_blocks=24, **DRAM)
    out = [engine.generate([p], GREEDY)[0] for p in evicted_prefix]
    assert out == expected
    stats = engine.stats()
    assert stats.dram_populated > 0 and stats.dram_copied >= stats.dram_populated
    assert stats.prefix_hits == recompute.rtc.prefix_hits + 16 * stats.dram_populated  # counted as cached
    assert stats.copy_bytes_per_s > 0 and stats.prefill_tokens_per_s > 0 and stats.dram_blocks_total > 0
    assert_no_dram_leak(engine)
    # Where the cost model says recompute, nothing goes to DRAM and the same tokens come out.
    engine = make_engine(model_path, weights, num_kv_blocks=24, **DRAM)
    engine.rtc.cost = CostModel(engine.rtc.cost.block_bytes, copy_bytes_per_s=1.0, prefill_tokens_per_s=1e9)
    assert [engine.generate([p], GREEDY)[0] for p in evicted_prefix] == expected
    assert engine.rtc.dram_copied == engine.rtc.dram_populated == 0
    assert engine.rtc.prefix_hits == recompute.rtc.prefix_hits
    assert_no_dram_leak(engine)


# Six sequences that grow to ~4-5 blocks each in a 16-block pool: preempted over and over.
PREEMPT_PROMPTS = random_prompts(6, 30, 50, seed=3)
PREEMPT_PARAMS = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                  SamplingParams(temperature=0.9, seed=1, max_tokens=20, ignore_eos=True)] * 3


@pytest.fixture(scope="module")
def recompute_preemption(model_path, weights):
    engine = make_engine(model_path, weights, num_kv_blocks=16)
    out = engine.generate(PREEMPT_PROMPTS, PREEMPT_PARAMS)
    assert engine.batcher.num_preemptions > 0
    return out


@pytest.mark.parametrize("cost", ["measured", "recompute"])
def test_swap_preemption_gives_the_recomputed_tokens(model_path, weights, recompute_preemption, cost):
    engine = make_engine(model_path, weights, num_kv_blocks=16, **DRAM)
    if cost == "recompute":
        engine.rtc.cost = CostModel(engine.rtc.cost.block_bytes, copy_bytes_per_s=1.0, prefill_tokens_per_s=1e9)
    assert engine.generate(PREEMPT_PROMPTS, PREEMPT_PARAMS) == recompute_preemption
    stats = engine.stats()
    assert stats.preemptions > 0
    if cost == "measured":
        assert stats.swaps > 0 and stats.dram_populated > 0
    else:
        assert stats.swaps == stats.dram_copied == stats.dram_populated == 0
    assert_no_dram_leak(engine)


def test_swap_with_async_scheduling(model_path, weights):
    # As tests/test_async.py: three blocks each at admission, a fourth each while decoding, ten
    # in the pool. Seeded: a pending token lost to a preemption and drawn again would differ.
    prompts = [p[:n] for p, n in zip(random_prompts(3, 46, 47, seed=3), (46, 45, 44))]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=6, ignore_eos=True) for s in range(3)]
    expected = make_engine(model_path, weights, async_scheduling=False, num_kv_blocks=10).generate(prompts, params)
    engine = make_engine(model_path, weights, async_scheduling=True, num_kv_blocks=10, **DRAM)
    pending = []
    swap_out = engine.rtc.swap_out
    engine.rtc.swap_out = lambda seq: (pending.append(seq.num_pending), swap_out(seq))[1]
    assert engine.generate(prompts, params) == expected
    assert engine.batcher.num_swaps > 0 and any(pending)  # swapped while its token was being sampled
    assert_no_dram_leak(engine)


def test_no_dram_tier_by_default(model_path, weights):
    engine = make_engine(model_path, weights, num_kv_blocks=16)
    assert engine.rtc.cost is None  # nothing measured at start, nothing ever copied
    stats = engine.stats()
    assert stats.dram_blocks_total == 0 and stats.copy_bytes_per_s == stats.prefill_tokens_per_s == 0.0


def test_the_host_counts_the_dram_tier():
    from flowserve.config import EngineConfig
    from scaling.hosts import GiB, te_bytes
    assert te_bytes(EngineConfig(dram_kv_gb=2.0), "fork", 0) - te_bytes(EngineConfig(), "fork", 0) == 2 * GiB
