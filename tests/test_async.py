"""Async scheduling (the engine launches step N+1 before it resolves step N) gives exactly the
tokens of synchronous scheduling, on the real default model, on the CPU, where the engine
runs it on request. The engines trace the steps they launch, so a test also sees what was
computed: no row past a length limit or a prefill-only sequence's first token, and a row for
an unforeseeable stop token computed, then discarded."""
import pytest

from flowserve.engine import Engine
from flowserve.protocol import SamplingParams
from tests.test_engine import assert_no_leak, make_engine, random_prompts
from tests.test_pd import disaggregated

# A 32-token budget chunks the prompts; a 64-token context ends the longest ones early.
CFG = dict(max_num_batched_tokens=32, max_model_len=64, kv_cache_gb=0.05)
PROMPTS = [p[:n] for p, n in zip(random_prompts(6, 60, 61, seed=11), (12, 40, 28, 58, 44, 55))]
LENGTHS = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 3, 5, 8, 10, 12)]


def traced(engine: Engine) -> Engine:
    """Make `engine` record each step it launches in `engine.steps`: (prompt length, first
    position, tokens, tokens pending) of every sequence in it."""
    engine.steps = []
    run = engine.runner.run

    def tracing(work, *args):
        engine.steps.append([(seq.num_prompt, seq.num_computed, n, seq.num_pending) for seq, n in work])
        return run(work, *args)
    engine.runner.run = tracing
    return engine


def generate(engine: Engine, prompts, params) -> tuple[list[list[int]], list]:
    """`engine.generate`, and the steps it launched for it."""
    engine.steps = []
    return engine.generate(prompts, params), engine.steps


@pytest.fixture(scope="module")
def sync_engine(model_path, weights) -> Engine:
    return traced(make_engine(model_path, weights, async_scheduling=False, **CFG))


@pytest.fixture(scope="module")
def async_engine(model_path, weights) -> Engine:
    return traced(make_engine(model_path, weights, async_scheduling=True, **CFG))


@pytest.fixture(scope="module")
def reference(sync_engine):
    """PROMPTS with LENGTHS, scheduled synchronously: tokens and steps."""
    return generate(sync_engine, PROMPTS, LENGTHS)


def test_same_tokens_and_steps_with_chunked_prefill_and_length_limits(sync_engine, async_engine, reference):
    # First in this file: both engines start with empty prefix caches, so their steps compare.
    tokens, steps = reference
    assert any(len(p) + len(t) == CFG["max_model_len"] for p, t in zip(PROMPTS, tokens))  # a context-length finish
    out, async_steps = generate(async_engine, PROMPTS, LENGTHS)
    assert async_engine.async_scheduling and out == tokens
    # The same batches: a sequence whose pending token ends it by length is not scheduled again.
    assert [[row[:3] for row in step] for step in async_steps] == [[row[:3] for row in step] for step in steps]
    assert any(row[3] for step in async_steps for row in step)  # decodes took their input token on the device
    # The same blocks in the prefix index, among them two completed by a token that was still being
    # sampled (positions 31 and 47): the prompt of 28 ends there, the prompt of 44 goes on.
    assert set(async_engine.rtc.prefix_index) == set(sync_engine.rtc.prefix_index)
    assert_no_leak(async_engine)


def stop_rows(steps, prompts, tokens) -> int:
    """Rows that compute a sequence's stop token (which ends it, so is never an input)."""
    stops = {(len(p), len(p) + len(t)) for p, t in zip(prompts, tokens)}
    return sum((row[0], row[1]) in stops for step in steps for row in step)


def test_stop_and_eos_mid_batch(sync_engine, async_engine, tokenizer, reference):
    # Random prompts stop at a token they generate; a chat prompt ends by EOS.
    chat = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    prompts = PROMPTS[3:] + [chat]
    params = [SamplingParams(temperature=0, max_tokens=p.max_tokens, ignore_eos=True, stop_token_ids=[t[2]])
              for p, t in zip(LENGTHS[3:], reference[0][3:])] + [SamplingParams(temperature=0, max_tokens=16)]
    expected, steps = generate(sync_engine, prompts, params)
    assert len(expected[-1]) < 16 and stop_rows(steps, prompts, expected) == 0
    out, async_steps = generate(async_engine, prompts, params)
    assert out == expected
    assert stop_rows(async_steps, prompts, expected) > 0  # computed before the stop was known, then discarded
    assert_no_leak(async_engine)


def test_preemption_with_pending_tokens(model_path, weights):
    # Three blocks each at admission; each needs a fourth while it decodes, and the pool has ten.
    prompts = [p[:n] for p, n in zip(random_prompts(3, 46, 47, seed=3), (46, 45, 44))]
    # Seeded: a pending token lost to a preemption and drawn again would draw differently.
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=6, ignore_eos=True) for s in range(3)]
    expected = make_engine(model_path, weights, async_scheduling=False, num_kv_blocks=10).generate(prompts, params)
    engine = make_engine(model_path, weights, async_scheduling=True, num_kv_blocks=10)
    pending = []
    preempt = engine.batcher.preempt
    engine.batcher.preempt = lambda seq: (pending.append(seq.num_pending), preempt(seq))
    assert engine.generate(prompts, params) == expected
    assert any(pending)  # preempted while its token was being sampled: appended, then recomputed
    assert_no_leak(engine)


def test_seeded_sampling(sync_engine, async_engine):
    prompts = random_prompts(3, 10, 30, seed=4)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=40, seed=8, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=9, max_tokens=6, stop_token_ids=[13, 28]),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    prompts.append(prompts[0])
    expected, _ = generate(sync_engine, prompts, params)
    assert expected[0] != expected[3]  # it did sample, not take the argmax
    assert generate(async_engine, prompts, params)[0] == expected
    assert_no_leak(async_engine)


def test_disaggregated(model_path, weights, sync_engine, async_engine):
    """A prefill TE and a decode TE (`async_engine`), both scheduling asynchronously."""
    prompts = random_prompts(3, 20, 40, seed=5)
    params = [LENGTHS[2], SamplingParams(temperature=0.9, seed=3, max_tokens=6, ignore_eos=True), LENGTHS[3]]
    expected, _ = generate(sync_engine, prompts, params)
    prefill = traced(make_engine(model_path, weights, async_scheduling=True, **CFG))
    assert disaggregated(prefill, async_engine, prompts, params) == expected
    assert sum(row[2] for step in prefill.steps for row in step) == sum(map(len, prompts))  # no first token computed


def test_abort_while_in_flight_frees_blocks(async_engine):
    engine = async_engine
    keep, drop = random_prompts(2, 8, 16, seed=6)  # both prompts fit in one step
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("keep", keep, params)
    engine.add_request("drop", drop, params)
    assert engine.step() == []  # launched, not resolved yet
    out = {o.rid: o.token_ids for o in engine.step()}  # launches the decodes, resolves the prefill
    assert engine.in_flight is not None and set(out) == {"keep", "drop"}
    held = engine.rtc.num_free
    assert engine.abort("drop")
    assert engine.rtc.num_free > held  # at once, while a step computing it is in flight
    while engine.has_work():
        for o in engine.step():
            assert o.rid == "keep"  # the aborted row of the step in flight is skipped
            out["keep"] += o.token_ids
    assert_no_leak(engine)
    assert out["keep"] == engine.generate([keep], params)[0]
