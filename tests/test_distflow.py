"""DistFlow's KV path between a prefill and a decode TE-shell (`tests.test_pd.PDPair`): KV sent
layer by layer during the prefill's forward, partial sends past what the decode TE caches,
and LinkCluster's persistent links. Every comparison is exact token equality against the
colocated engine, and every pair ends with both engines' blocks all free."""
import socket
import time

import pytest

from flowserve.config import EngineConfig
from flowserve.engine import Engine
from flowserve.model import kv_block_bytes
from flowserve.protocol import SamplingParams
from tests.test_engine import GREEDY, make_engine, random_prompts
from tests.test_pd import PDPair

SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)
SMALL = dict(kv_cache_gb=0.1)  # ~2,300 tokens: room enough, and light on a shared machine


@pytest.fixture(scope="module")
def colocated(model_path, weights) -> Engine:
    return make_engine(model_path, weights, **SMALL)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from tests.tiny_model import write_tiny_model
    return str(write_tiny_model(tmp_path_factory.mktemp("distflow") / "tiny"))


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_layer_by_layer_during_the_forward_gives_the_colocated_tokens(model_path, weights, colocated, transport):
    """Each layer's K/V leave while the forward computes the later ones; greedy and seeded
    requests continue on the decode TE exactly as colocated."""
    prompts = random_prompts(2, 300, 400, seed=21)
    params = [GREEDY, SEEDED]
    expected = [colocated.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    prefill = make_engine(model_path, weights, kv_layerwise=True, **SMALL)
    reads, forwards = [], []  # when each layer was read for sending; each forward's end
    read_kv, run = prefill.runner.read_kv, prefill.runner.run
    prefill.runner.read_kv = lambda *a: (reads.append(time.perf_counter()), read_kv(*a))[1]

    def timed_run(work, in_flight=None, on_layer=None):
        out = run(work, in_flight, on_layer)
        forwards.append((on_layer is not None, time.perf_counter()))
        return out
    prefill.runner.run = timed_run
    with PDPair(prefill, make_engine(model_path, weights, **SMALL), transport) as pair:
        t0 = time.perf_counter()
        tokens, handoffs = pair.run(prompts, params)
        wall_ms = 1e3 * (time.perf_counter() - t0)
    assert tokens == expected
    per_block = kv_block_bytes(prefill.model_cfg, 16, prefill.dtype)
    assert [h.kv_bytes for h in handoffs] == [-(-len(p) // 16) * per_block for p in prompts]  # every block, once
    assert all(0 < h.kv_ms < wall_ms for h in handoffs), (handoffs, wall_ms)
    streamed = [end for hooked, end in forwards if hooked]
    assert streamed and reads[0] < streamed[0]  # sending began before that forward was over
    assert len(reads) == 2 * prefill.model_cfg.num_layers


def test_partial_sends_skip_the_blocks_the_decode_te_caches(model_path, weights, colocated):
    """Requests sharing a ~500-token system prompt: once the decode TE caches it, the prefill
    TE sends only the blocks past it. Same tokens; the bytes sent are the blocks not skipped.
    All of it over one link, dialled once."""
    system = random_prompts(1, 500, 501, seed=22)[0]
    prompts = [system + tail for tail in random_prompts(3, 20, 40, seed=23)]
    expected = colocated.generate(prompts, GREEDY)
    prefill, decode = make_engine(model_path, weights, **SMALL), make_engine(model_path, weights, **SMALL)
    per_block, bs = kv_block_bytes(prefill.model_cfg, 16, prefill.dtype), 16
    blocks = [-(-len(p) // bs) for p in prompts]
    with PDPair(prefill, decode) as pair:
        first, [h0] = pair.run(prompts[:1], GREEDY)
        skips = [len(decode.rtc.match_by_prefix_token(p)) for p in prompts[1:]]  # what the prompt tree says
        assert skips == [len(system) // bs] * 2
        rest, handoffs = pair.run(prompts[1:], GREEDY, kv_skip=skips)
        assert first + rest == expected
        assert h0.kv_bytes == blocks[0] * per_block
        assert [h.kv_bytes for h in handoffs] == [(n - k) * per_block for n, k in zip(blocks[1:], skips)]
        [link] = pair.shells[1].kv_links
        assert link.served == 3 and len(pair.shells[0].kv_sender.links) == 1


def test_a_prefix_the_decode_te_lost_is_sent_whole(model_path, weights, colocated):
    """Told to skip blocks the decode TE does not hold (evicted since placement), the decode
    TE asks for all of them: the prefill TE sends them again, whole, on the same link."""
    prompt = random_prompts(1, 200, 201, seed=24)[0]
    prefill, decode = make_engine(model_path, weights, **SMALL), make_engine(model_path, weights, **SMALL)
    per_block, n = kv_block_bytes(prefill.model_cfg, 16, prefill.dtype), -(-len(prompt) // 16)
    with PDPair(prefill, decode) as pair:
        tokens, [handoff] = pair.run([prompt], GREEDY, kv_skip=5)
    assert tokens == colocated.generate([prompt], GREEDY)
    assert handoff.kv_bytes == (n - 5) * per_block + n * per_block  # the partial send, then the whole one


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_one_link_serves_every_transfer_and_a_broken_one_is_dialled_again(tiny, transport):
    prompts = random_prompts(6, 30, 90, seed=25)
    expected = Engine(tiny, EngineConfig(kv_cache_gb=0.05)).generate(prompts, GREEDY)
    prefill, decode = (Engine(tiny, EngineConfig(kv_cache_gb=0.05)) for _ in range(2))
    with PDPair(prefill, decode, transport) as pair:
        tokens = [pair.run([p], GREEDY)[0][0] for p in prompts[:4]]
        [link] = pair.shells[1].kv_links
        assert link.served == 4
        link.conn.shutdown(socket.SHUT_RDWR)  # the link breaks between two transfers
        deadline = time.monotonic() + 10
        while pair.shells[1].kv_links and time.monotonic() < deadline:
            time.sleep(0.01)
        tokens += [pair.run([p], GREEDY)[0][0] for p in prompts[4:]]
        assert tokens == expected
        [again] = pair.shells[1].kv_links  # the sender dialled again, once
        assert again is not link and again.served == 2


def test_a_request_that_ends_at_its_first_token_abandons_its_transfer(tiny):
    """Layer by layer, a transfer starts before the first token is known; if that token ends
    the request on the prefill TE, the trailer says so and the decode TE drops the KV."""
    prompts = random_prompts(2, 40, 60, seed=26)
    params = [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), GREEDY]
    expected = Engine(tiny, EngineConfig(kv_cache_gb=0.05)).generate(prompts, params)
    prefill, decode = (Engine(tiny, EngineConfig(kv_cache_gb=0.05)) for _ in range(2))
    with PDPair(prefill, decode) as pair:
        tokens, handoffs = pair.run(prompts, params)
        assert tokens == expected and handoffs[0] is None and handoffs[1] is not None
        assert pair.shells[1].kv_links[0].served == 2

