"""RTC bookkeeping without a model: prefix matching, LRU eviction, reference counts."""
from flowserve.sequence import Sequence
from flowserve.protocol import SamplingParams
from flowserve.rtc import RTC


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), len(tokens), SamplingParams())


def run_prefill(rtc: RTC, s: Sequence) -> None:
    rtc.attach_prefix(s)
    assert rtc.alloc_blocks(s, s.num_uncomputed)
    s.num_computed = len(s.token_ids)
    rtc.cache_full_blocks(s)


def test_prefix_match_shares_blocks_and_leaves_one_token():
    rtc = RTC(num_blocks=8, block_size=4)
    a = seq(range(10))
    run_prefill(rtc, a)
    assert len(rtc.prefix_index) == 2          # two full blocks; the partial third is not indexed
    b = seq(list(range(8)) + [99])
    rtc.attach_prefix(b)
    assert b.block_ids == a.block_ids[:2] and b.num_computed == 8
    assert rtc.blocks[a.block_ids[0]].ref_count == 2
    c = seq(range(8))                          # fully cached prompt: the last block is recomputed
    rtc.attach_prefix(c)
    assert c.num_computed == 4


def test_lru_eviction_and_no_leak():
    rtc = RTC(num_blocks=4, block_size=4)
    a = seq(range(8), "a")
    run_prefill(rtc, a)
    rtc.free(a)
    assert rtc.num_free == 4 and len(rtc.prefix_index) == 2   # cached, yet free
    b = seq(range(100, 112), "b")                              # needs 3 blocks: evicts one cached
    run_prefill(rtc, b)
    assert len(rtc.match_by_prefix_token(list(range(9)))) == 1  # a's first block survived the LRU
    rtc.free(b)
    assert rtc.num_free == 4 and all(blk.ref_count == 0 for blk in rtc.blocks)


def test_alloc_fails_cleanly_when_short():
    rtc = RTC(num_blocks=2, block_size=4)
    s = seq(range(12))
    assert not rtc.alloc_blocks(s, 12)
    assert s.block_ids == [] and rtc.num_free == 2
