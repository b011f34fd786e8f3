"""Tensor parallelism: a TE as a master and N executor processes (flowserve/tp.py,
flowserve/executor.py). The real model at TP=3 against TP=1 (the same greedy tokens, logits
within float32 summation error, prefix caching and chunked prefill too), a tiny random model
at TP=2 (logits, the KV heads split and joined again, nothing leaked), the TP sizes refused,
then the real server: a PD pair of TP TEs, an executor killed or frozen mid-stream."""
import os
import signal
import subprocess
import sys

import aiohttp
import orjson
import pytest
import torch

from flowserve.config import EngineConfig
from flowserve.engine import Engine
from flowserve.protocol import SamplingParams
from tests.conftest import PROMPT
from tests.server_util import ROOT, Server, async_wait_until, children, data_lines, pid_alive
from tests.test_engine import GREEDY, assert_no_leak, random_prompts

SHORT = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
             "List three colors."]


def first_logits(eng: Engine, prompts: list[list[int]]) -> torch.Tensor:
    """The logits rows of one prefill step of `prompts`, then of one decode step (each row's
    next input token set to 42, so that both engines decode the same inputs); the requests
    are aborted after."""
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, GREEDY)
    work = eng.batcher.schedule()
    prefill = eng.runner.run(work)[0].clone()  # a TP runner's rows are a view of its arena
    for seq, n in work:
        seq.num_computed += n
        seq.token_ids.append(42)
    decode = eng.runner.run(eng.batcher.schedule())[0].clone()
    for i in range(len(prompts)):
        eng.abort(str(i))
    return torch.cat([prefill, decode])


def assert_close_logits(tp: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 2e-5 of the logits' largest magnitude (SmolLM2 at TP=3: 2.2e-6 seen), and the
    same argmax: float32 sums the ranks' partial products (the all-reduce) in another order
    than one matmul does."""
    assert tp.shape == ref.shape
    assert (tp - ref).abs().max() / ref.abs().max() < 2e-5
    assert torch.equal(tp.argmax(-1), ref.argmax(-1))


# ---------------------------------------------------------------------------- engine level

@pytest.fixture(scope="module")
def engines(model_path, weights):
    """TP=1 and TP=3 engines of the real model; the TP=3 one's executors are spawned
    (this test process may have run multi-threaded torch already: it cannot fork them)."""
    cfg = EngineConfig(kv_cache_gb=0.1)
    tp3 = Engine(model_path, EngineConfig(kv_cache_gb=0.1, tensor_parallel_size=3), weights=weights)
    yield Engine(model_path, cfg, weights=weights), tp3
    tp3.runner.close()
    assert not any(pid_alive(pid) for pid in tp3.runner.pids)


def test_tp3_greedy_tokens_and_logits_equal_tp1(engines, tokenizer):
    tp1, tp3 = engines
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    assert_close_logits(first_logits(tp3, prompts), first_logits(tp1, prompts))
    params = SamplingParams(temperature=0, max_tokens=24)
    assert tp3.generate(prompts, params) == tp1.generate(prompts, params)
    assert_no_leak(tp3)


def test_tp3_prefix_cache_and_chunked_prefill(engines):
    """A prompt whose prefix the RTC caches, computed in 48-token chunks: the executors'
    caches hold what the master's block tables say."""
    tp1, tp3 = engines
    prompts = random_prompts(2, 60, 100, seed=4)
    prompts.append(prompts[0][:64] + prompts[1][:20])
    for eng in engines:
        eng.cfg.max_num_batched_tokens = 48
    try:
        out = [[eng.generate([p], SHORT)[0] for p in prompts] for eng in engines]
    finally:
        for eng in engines:
            eng.cfg.max_num_batched_tokens = 2048
    assert out[0] == out[1]
    assert tp3.rtc.prefix_hits > 0
    assert_no_leak(tp3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_model import write_tiny_model
    root = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPFLOW_CACHE", str(root / "cache"))  # its own weight cache, which the executors map
        yield str(write_tiny_model(root / "model"))


def test_tiny_tp2_logits_kv_heads_and_no_leak(tiny):
    """TP=2 on a tiny random model (4 heads, 2 KV heads): logits close to TP=1; a request's KV
    read from the two executors (each its KV head) equals TP=1's, and written back into
    other blocks it reads the same; no block leaked."""
    cfg = dict(num_kv_blocks=64, block_size=4)
    tp1 = Engine(tiny, EngineConfig(**cfg))
    tp2 = Engine(tiny, EngineConfig(**cfg, tensor_parallel_size=2))
    try:
        prompts = random_prompts(3, 5, 40, seed=6)
        assert_close_logits(first_logits(tp2, prompts), first_logits(tp1, prompts))
        assert tp2.runner.kv_shape(3) == tp1.runner.kv_shape(3)
        kv = {}
        for name, eng in (("tp1", tp1), ("tp2", tp2)):
            eng.add_request("r", prompts[0], GREEDY)
            work = eng.batcher.schedule()
            eng.runner.run(work)  # the prompt's K/V, in the same blocks in both engines
            blocks = list(work[0][0].block_ids)
            out = torch.zeros(eng.runner.kv_shape(len(blocks)))
            for layer in range(2):
                eng.runner.read_kv(blocks, out, layer)
            kv[name] = out
            back, spare = torch.zeros_like(out), list(range(64 - len(blocks), 64))
            for layer in range(2):
                eng.runner.write_kv(spare, out, layer)
                eng.runner.read_kv(spare, back, layer)
            assert torch.equal(back, out)
            eng.abort("r")
            assert_no_leak(eng)
        scale = kv["tp1"].abs().max()
        assert 0 < scale and (kv["tp2"] - kv["tp1"]).abs().max() / scale < 2e-5
    finally:
        tp2.runner.close()


def test_refused_sizes(tiny):
    with pytest.raises(ValueError, match="does not split"):
        Engine(tiny, EngineConfig(num_kv_blocks=8, tensor_parallel_size=3))  # 2 KV heads
    with pytest.raises(ValueError, match="DRAM"):
        EngineConfig(tensor_parallel_size=2, dram_kv_gb=1.0)
    run = subprocess.run([sys.executable, str(ROOT / "deepflow.py"), "serve", "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode != 0
    assert "tensor_parallel_size 2 does not split" in run.stderr and "use one of [1, 3]" in run.stderr


# ---------------------------------------------------------------------------- the server

def test_tp_prefill_and_decode_tes_give_the_colocated_text(tmp_path, engine_greedy_reference):
    """A PD pair of TP=3 TEs: the prefill TE's three executors each send their KV head, the
    decode TE's three each take theirs; the text is the in-process TP=1 engine's."""
    toml = tmp_path / "cluster.toml"
    toml.write_text("[prefill]\ninstances = 1\ntensor_parallel_size = 3\n"
                    "[decode]\ninstances = 1\ntensor_parallel_size = 3\n")
    with Server("--num-tes", "0", "--cluster", str(toml), "--max-model-len", "512", "--kv-cache-gb", "0.2") as s:
        status, body = s.post("/v1/completions", PROMPT)
        assert status == 200 and body["choices"][0]["text"] == engine_greedy_reference
        job = s.get("/admin/cluster")["recent_jobs"][0]
        assert job["tasks"][0]["placement"]["kv_transfer_ms"] > 0  # it went through the decode TE
        tes = s.get("/admin/cluster")["tes"]
        assert sorted(te["group"] for te in tes) == ["decode", "prefill"]
        assert all(len(children(te["pid"])) == 3 for te in tes)


async def test_executor_killed_or_frozen_mid_stream_ends_its_te():
    """SIGKILL one executor of a TP=3 TE while it streams: the stream ends with an error
    event and [DONE], the TE is replaced (a new master and executors, which serve), and no
    process of the old TE is left. Then SIGSTOP one of the new TE's executors: its master
    waits on it, answers no heartbeat, and goes the same way (its executors with it)."""
    with Server("--tensor-parallel-size", "3", "--max-model-len", "1024", "--kv-cache-gb", "0.2",
                "--health-timeout-s", "5") as s:
        url = s.url + "/v1/chat/completions"
        long = {"messages": [{"role": "user", "content": "Count to 1000."}], "max_tokens": 900, "ignore_eos": True,
                "stream": True}
        short = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12,
                 "temperature": 0}
        async with aiohttp.ClientSession() as http:
            for fault in (signal.SIGKILL, signal.SIGSTOP):
                [te] = s.get("/admin/cluster")["tes"]
                executors = children(te["pid"])
                assert len(executors) == 3
                stream = await http.post(url, json=long)
                await data_lines(stream, 3)
                os.kill(executors[1], fault)
                rest = await data_lines(stream, timeout=30)
                assert rest[-1] == "[DONE]" and "error" in orjson.loads(rest[-2])
                stream.close()
                await async_wait_until(lambda: [(t["state"], t["pid"] != te["pid"])
                                                for t in s.get("/admin/cluster")["tes"]] == [("ready", True)], 60)
                [new] = s.get("/admin/cluster")["tes"]
                assert len(children(new["pid"])) == 3
                async with http.post(url, json=short) as r:
                    assert "Paris" in (await r.json())["choices"][0]["message"]["content"]
                await async_wait_until(lambda: not any(pid_alive(p) for p in [te["pid"], *executors]), 10)
