"""Explicit context caching (`/v1/caches`, `cache_id`): pinned blocks found by ID, the same
answers as the conversation sent whole to an engine that never saw the context (on the
server, a request sent whole would read the pinned blocks through the prefix cache, i.e.
the KV under test), TTL and DELETE unpinning, a cache rebuilt after its TE dies, and the errors."""
import os
import signal
import time

import pytest

from flowserve.sequence import Sequence
from flowserve.config import EngineConfig
from flowserve.engine import Engine
from flowserve.protocol import SamplingParams
from flowserve.rtc import RTC
from flowserve.tokenizer import Detokenizer
from tests.server_util import Server, wait_until

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def test_rtc_pin_survives_eviction_and_matches_by_id():
    rtc = RTC(num_blocks=6, block_size=4)
    ctx = Sequence("ctx", list(range(10)), 10, SamplingParams())
    rtc.attach_prefix(ctx)
    assert rtc.alloc_blocks(ctx, 10)
    ctx.num_computed = 10
    rtc.cache_full_blocks(ctx)
    rtc.pin("c", ctx)
    pinned = ctx.block_ids[:2]
    rtc.free(ctx)
    assert rtc.num_pinned == 2 and rtc.num_free == 4
    other = Sequence("o", list(range(100, 116)), 16, SamplingParams())
    rtc.attach_prefix(other)
    assert rtc.alloc_blocks(other, 16)  # takes every unpinned block: the pinned ones stay
    rtc.free(other)
    assert rtc.match_by_id("c", list(range(12))) == pinned
    assert rtc.match_by_id("c", list(range(8))) == pinned[:1]        # one token left to compute
    assert rtc.match_by_id("c", [0, 1, 2, 3, 9, 9, 9, 9, 9]) == pinned[:1]  # verified, not trusted
    assert rtc.unpin("c") and rtc.num_pinned == 0 and rtc.num_free == 6


def test_engine_pinned_context_gives_same_tokens(model_path, weights, tokenizer):
    """A pinned context is reused by ID after other work evicted every unpinned block, and the
    tokens are the uncached engine's."""
    cfg = EngineConfig(num_kv_blocks=24)
    context = tokenizer.encode("You are a terse assistant who answers in French. " * 8)
    prompt = context + tokenizer.encode(" Question: what colour is the sky?")
    expected = Engine(model_path, cfg, weights=weights).generate([prompt], GREEDY)[0]

    engine = Engine(model_path, cfg, weights=weights)
    engine.add_request("pin", context, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), pin="c1")
    while engine.has_work():
        engine.step()
    blocks = len(context) // 16
    assert engine.rtc.num_pinned == blocks
    engine.generate([tokenizer.encode("Unrelated filler text to evict the cache. " * 20)], GREEDY)
    engine.add_request("q", prompt, GREEDY, cache_id="c1")
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert [t for o in outs for t in o.token_ids] == expected
    assert outs[0].num_cached == blocks * 16
    engine.rtc.unpin("c1")
    assert engine.rtc.num_free == engine.rtc.num_blocks_total


SYSTEM = ("You are the assistant of a small bakery in Lyon. The bakery opens at seven, closes at "
          "seven, and sells croissants, baguettes, pain au chocolat and tarts. ") * 6


def chat(s: Server, messages: list[dict], **kw) -> dict:
    code, body = s.post("/v1/chat/completions", {"messages": messages, "max_tokens": 16, **kw})
    assert code == 200, body
    return body


def te_pins(s: Server) -> dict[str, int]:
    return {te["id"]: te["pinned_blocks"] for te in s.get("/admin/cluster")["tes"]}


@pytest.fixture(scope="module")
def fresh(model_path, weights, tokenizer):
    """`fresh(prompt, **sampling)`: the text of an in-process engine that computes the whole
    prompt itself, the reference for an answer on a context cache."""
    engine = Engine(model_path, EngineConfig(kv_cache_gb=0.05), weights=weights)

    def answer(prompt: str | list[dict], max_tokens: int = 16, **sampling) -> str:
        text = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(prompt)
        ids = tokenizer.encode(text)
        out = engine.generate([ids], SamplingParams(max_tokens=max_tokens, **sampling))[0]
        return Detokenizer(tokenizer, ids).push(out)
    return answer


@pytest.fixture(scope="module")
def server():
    with Server("--max-model-len", "1024", "--kv-cache-gb", "0.05", "--cache-budget", "0.5") as s:
        yield s


def test_cache_id_answers_as_the_whole_conversation(server, fresh):
    s = server
    code, cache = s.post("/v1/caches", {"messages": [{"role": "system", "content": SYSTEM}], "ttl_seconds": 600})
    assert code == 200, cache
    assert cache["object"] == "context_cache" and cache["tokens"] > 200
    assert cache["expires_at"] - cache["created"] == 600
    assert s.get(f"/v1/caches/{cache['id']}") == cache
    assert cache["id"] in [c["id"] for c in s.get("/v1/caches")["data"]]
    assert max(te_pins(s).values()) == cache["tokens"] // 16

    user = [{"role": "user", "content": "When do you open?"}]
    whole = [{"role": "system", "content": SYSTEM}] + user
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "seed": 11}):
        with_cache = chat(s, user, cache_id=cache["id"], **sampling)
        sent_whole = chat(s, whole, **sampling)
        expected = fresh(whole, **sampling)
        assert with_cache["choices"][0]["message"] == {"role": "assistant", "content": expected}
        assert sent_whole["choices"][0]["message"]["content"] == expected
        assert with_cache["usage"]["prompt_tokens"] == sent_whole["usage"]["prompt_tokens"]
        assert with_cache["usage"]["prompt_tokens_details"]["cached_tokens"] == cache["tokens"] // 16 * 16

    job = s.get("/admin/cluster")["recent_jobs"][1]  # the seeded request on the cache
    assert job["tasks"][0]["placement"]["policy"] == "context_cache"

    code, gone = s.delete(f"/v1/caches/{cache['id']}")
    assert code == 200 and gone == {"id": cache["id"], "object": "context_cache.deleted", "deleted": True}
    wait_until(lambda: set(te_pins(s).values()) == {0}, timeout=10)
    assert s.status(f"/v1/caches/{cache['id']}") == 404
    code, err = s.post("/v1/chat/completions", {"messages": user, "cache_id": cache["id"], "max_tokens": 4})
    assert code == 404 and err["error"]["param"] == "cache_id"


def test_completion_cache_and_ttl_expiry(server, fresh):
    s = server
    prompt = "Once upon a time, in a valley between two rivers, there lived " * 8
    code, cache = s.post("/v1/caches", {"prompt": prompt, "ttl_seconds": 600})
    assert code == 200, cache
    own = "a fox who"
    code, a = s.post("/v1/completions", {"prompt": own, "cache_id": cache["id"], "max_tokens": 12, "temperature": 0})
    code, b = s.post("/v1/completions", {"prompt": prompt + own, "max_tokens": 12, "temperature": 0})
    assert a["choices"][0]["text"] == b["choices"][0]["text"] == fresh(prompt + own, 12, temperature=0)
    assert a["usage"]["prompt_tokens_details"]["cached_tokens"] >= cache["tokens"] // 16 * 16 - 16
    code, err = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                "cache_id": cache["id"], "max_tokens": 4})
    assert code == 400 and "/v1/completions" in err["error"]["message"]
    assert s.delete(f"/v1/caches/{cache['id']}")[0] == 200

    code, short = s.post("/v1/caches", {"prompt": prompt, "ttl_seconds": 2})
    assert code == 200 and short["expires_at"] - short["created"] == 2
    wait_until(lambda: s.status(f"/v1/caches/{short['id']}") == 404, timeout=10)
    wait_until(lambda: set(te_pins(s).values()) == {0}, timeout=5)


def test_cache_errors(server):
    s = server
    assert s.post("/v1/caches", {"messages": [{"role": "user", "content": "x"}], "prompt": "y"})[0] == 400
    assert s.post("/v1/caches", {"prompt": "y", "ttl_seconds": 0})[0] == 400
    assert s.post("/v1/caches", {"prompt": "y", "model": "other"})[0] == 404
    assert s.status("/v1/caches/cache-unknown") == 404
    assert s.delete("/v1/caches/cache-unknown")[0] == 404
    # The budget is half the TE's blocks: one context past it, then two that fill it.
    blocks = s.get("/admin/cluster")["tes"][0]["kv_blocks_total"] // 2
    assert blocks < 40
    too_big = list(range(1000, 1000 + (blocks + 2) * 16))
    code, err = s.post("/v1/caches", {"prompt": too_big})
    assert code == 507 and "pin at most" in err["error"]["message"], err
    first = s.post("/v1/caches", {"prompt": list(range(1000, 1000 + 20 * 16))})
    assert first[0] == 200
    code, err = s.post("/v1/caches", {"prompt": list(range(2000, 2000 + 20 * 16))})
    assert code == 507 and "budget is full" in err["error"]["message"]
    assert s.delete(f"/v1/caches/{first[1]['id']}")[0] == 200


def test_cache_rebuilt_after_its_te_dies(fresh):
    with Server("--max-model-len", "1024") as s:
        code, cache = s.post("/v1/caches", {"messages": [{"role": "system", "content": SYSTEM}]})
        assert code == 200
        user = [{"role": "user", "content": "Do you sell tarts?"}]
        before = chat(s, user, cache_id=cache["id"], temperature=0)
        expected = fresh([{"role": "system", "content": SYSTEM}] + user, temperature=0)
        assert before["choices"][0]["message"]["content"] == expected
        te = s.get("/admin/cluster")["tes"][0]
        os.kill(te["pid"], signal.SIGKILL)
        t0 = time.monotonic()

        def rebuilt() -> bool:
            caches = s.get("/admin/cluster")["context_caches"]
            return bool(caches and caches[0]["holders"] and caches[0]["holders"][0] != te["id"])
        wait_until(rebuilt, timeout=60)
        after = chat(s, user, cache_id=cache["id"], temperature=0)
        assert after["choices"][0]["message"] == before["choices"][0]["message"]
        assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == cache["tokens"] // 16 * 16
        assert time.monotonic() - t0 < 60


def test_cache_on_a_pd_pair(fresh):
    """Disaggregated: the context is pinned on the prefill TE, whose handoff carries the whole prompt's KV."""
    with Server("--num-tes", "0", "--prefill-tes", "1", "--decode-tes", "1", "--max-model-len", "1024") as s:
        code, cache = s.post("/v1/caches", {"messages": [{"role": "system", "content": SYSTEM}]})
        assert code == 200
        user = [{"role": "user", "content": "What do you sell?"}]
        on_cache = chat(s, user, cache_id=cache["id"], temperature=0)
        expected = fresh([{"role": "system", "content": SYSTEM}] + user, temperature=0)
        assert on_cache["choices"][0]["message"]["content"] == expected
        assert on_cache["usage"]["prompt_tokens_details"]["cached_tokens"] == cache["tokens"] // 16 * 16
        prefill = next(te for te in s.get("/admin/cluster")["tes"] if te["group"] == "prefill")
        assert prefill["pinned_blocks"] == cache["tokens"] // 16
