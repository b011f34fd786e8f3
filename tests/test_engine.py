"""The FlowServe engine on the real default model: answers, batching, caching, preemption,
sampling. Every comparison is exact token equality against the same prompt run alone."""
import random
from dataclasses import replace

import pytest
import torch

from flowserve.config import EngineConfig
from flowserve.engine import Engine
from flowserve.protocol import SamplingParams
from flowserve.rtc import CostModel
from flowserve.weights import load_weights

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def make_engine(model_path, weights, **kw) -> Engine:
    return Engine(model_path, EngineConfig(**kw), weights=weights)


def assert_no_leak(eng: Engine) -> None:
    assert not eng.has_work()
    assert eng.rtc.num_free == eng.rtc.num_blocks_total
    assert all(b.ref_count == 0 for b in eng.rtc.blocks)


def random_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def engine(model_path, weights):
    return make_engine(model_path, weights)


def alone(engine: Engine, prompts, params=GREEDY) -> list[list[int]]:
    return [engine.generate([p], params)[0] for p in prompts]


def test_capital_of_france(engine, tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = engine.generate([tokenizer.encode(text)], SamplingParams(temperature=0, max_tokens=40))[0]
    assert "Paris" in tokenizer.decode(out)
    assert_no_leak(engine)


def test_batch_invariance_with_chunked_prefill(engine, model_path, weights):
    prompts = random_prompts(16, 20, 120)
    expected = alone(engine, prompts)
    # A 64-token budget splits most prompts across steps and mixes them with decodes.
    batched = make_engine(model_path, weights, max_num_batched_tokens=64)
    assert batched.generate(prompts, GREEDY) == expected
    assert_no_leak(batched)


def test_prefix_cache_hit_gives_identical_output(engine, model_path, weights):
    shared = random_prompts(1, 150, 151, seed=1)[0]
    first, second = shared + [500, 600, 700], shared + [800, 900]
    expected = alone(engine, [second])  # engine has never seen `shared`
    cached = make_engine(model_path, weights)
    cached.generate([first], GREEDY)
    cached.add_request("second", second, GREEDY)
    out, num_cached = [], 0
    while cached.has_work():
        for o in cached.step():
            out += o.token_ids
            num_cached = o.num_cached
    assert num_cached >= 144  # the shared 150 tokens, in whole 16-token blocks
    assert out == expected[0]
    assert cached.rtc.prefix_hits >= 144
    assert_no_leak(cached)


def test_abort_frees_blocks(engine):
    for i, p in enumerate(random_prompts(4, 30, 60, seed=2)):
        engine.add_request(f"abort-{i}", p, SamplingParams(temperature=0, max_tokens=100))
    for _ in range(3):
        engine.step()
    assert engine.rtc.num_free < engine.rtc.num_blocks_total
    for i in range(4):
        assert engine.abort(f"abort-{i}")
    assert not engine.abort("abort-0")
    assert_no_leak(engine)


def test_preemption_completes_with_same_output(engine, model_path, weights):
    prompts = random_prompts(8, 40, 60, seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = alone(engine, prompts, params)
    # 24 blocks of 16 tokens hold about five of these sequences at full length.
    small = make_engine(model_path, weights, num_kv_blocks=24)
    assert small.generate(prompts, params) == expected
    assert small.batcher.num_preemptions > 0
    assert_no_leak(small)


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_an_unzeroed_kv_pool_never_reaches_the_tokens(model_path, weights, cpu_kernels):
    """The KV pool and the DRAM tier are allocated, not zeroed (a TE is ready before their
    pages are faulted in): filled with NaN, chunked prefills, decodes, preemptions, swaps to
    DRAM and back give the tokens of a zeroed pool, on the C++ kernels and on plain torch."""
    prompts = random_prompts(4, 30, 50, seed=3)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    out = []
    for fill in (0.0, float("nan")):
        eng = make_engine(model_path, weights, num_kv_blocks=10, max_num_batched_tokens=32, dram_kv_gb=0.01,
                          cpu_kernels=cpu_kernels)
        eng.rtc.cost = CostModel(eng.rtc.cost.block_bytes, copy_bytes_per_s=1e15, prefill_tokens_per_s=1.0)
        for tensor in (eng.runner.dram, *(t for kv in eng.runner.kv_cache for t in kv)):
            tensor.fill_(fill)
        out.append(eng.generate(prompts, params))
        assert eng.batcher.num_swaps > 0 and eng.rtc.dram_populated > 0
        assert_no_leak(eng)
    assert out[0] == out[1]


def test_sampling_seed_topk_and_stop(engine):
    prompt = random_prompts(1, 30, 31, seed=4)[0]
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    a, b = engine.generate([prompt, prompt], [seeded, seeded])
    assert a == b and len(a) == 16
    other = engine.generate([prompt], SamplingParams(temperature=0.8, seed=99, max_tokens=16, ignore_eos=True))[0]
    assert other != a
    greedy = engine.generate([prompt], GREEDY)[0]
    top1 = engine.generate([prompt], SamplingParams(temperature=1.0, top_k=1, max_tokens=16, ignore_eos=True))[0]
    assert top1 == greedy
    stop_at = greedy[5]
    stopped = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_at]))[0]
    assert stopped == greedy[:greedy.index(stop_at)]
    assert_no_leak(engine)


def test_gguf_and_cached_safetensors_give_identical_logits(model_path, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPFLOW_CACHE", str(tmp_path))
    from_gguf = load_weights(model_path)          # parses + dequantizes, writes the cache
    from_cache = load_weights(model_path)         # mmaps the cache
    assert any(tmp_path.iterdir())
    assert from_gguf[0] == from_cache[0]
    for name, t in from_gguf[1].items():
        assert torch.equal(t, from_cache[1][name]), name
    prompt = random_prompts(1, 40, 41, seed=5)[0]
    a = make_engine(model_path, from_gguf).generate([prompt], GREEDY)
    b = make_engine(model_path, from_cache).generate([prompt], GREEDY)
    assert a == b


def test_low_priority_sequences_yield_and_finish_unchanged(engine, model_path, weights):
    """Batch work (low_priority) pauses while an interactive sequence runs, gives up its batch
    slot to one, and both give what they give alone."""
    prompts = random_prompts(3, 20, 30, seed=5)
    low = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, low_priority=True)
    expected = alone(engine, prompts[:2], replace(low, low_priority=False)) + alone(engine, prompts[2:])
    eng = make_engine(model_path, weights, max_num_seqs=2)
    out: dict[str, list[int]] = {}

    def step() -> list[str]:
        outs = eng.step()
        for o in outs:
            out.setdefault(o.rid, []).extend(o.token_ids)
        return [o.rid for o in outs]

    for i in (0, 1):
        eng.add_request(f"low-{i}", prompts[i], low)
    for _ in range(4):
        step()
    eng.add_request("hi", prompts[2], GREEDY)
    while "hi" in eng.seqs:
        ids = step()
        assert not (len(out.get("hi", [])) > 1 and any(i.startswith("low") for i in ids)), \
            "a low-priority sequence computed while an interactive one ran"
    assert eng.batcher.num_preemptions == 1  # a low-priority sequence's batch slot went to it
    while eng.has_work():
        step()
    assert [out["low-0"], out["low-1"], out["hi"]] == expected
    assert_no_leak(eng)
