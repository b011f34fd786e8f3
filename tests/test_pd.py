"""PD disaggregation: a prefill TE computes the prompt and first token, DistFlow moves the
KV blocks to a decode TE, which continues. Engine level first (two engines, each served by
a real TE-shell in a thread, and a real transfer over both transports), then the real
server."""
import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import aiohttp
import orjson
import pytest
from openai import OpenAI

from flowserve.config import EngineConfig
from flowserve.distflow import listen_kv
from flowserve.engine import Engine
from flowserve.protocol import Abort, Add, FinishReason, SamplingParams, Step, Stop, pack, unpack_frames
from flowserve.te_shell import TEShell
from scheduler.cluster import GROUPS, Cluster
from scheduler.job import Task
from scheduler.pd_policy import Heatmap
from tests.server_util import ROOT, Server, async_wait_until, data_lines
from tests.test_engine import GREEDY, assert_no_leak, make_engine, random_prompts


class PDPair:
    """A prefill and a decode engine, each served by a TE-shell in a thread of this process
    as it would be in a TE process, and the test as the main process: it sends `Add`s and
    reads the `Step`s back. Use as a context manager: on exit both shells stop, and neither
    engine may hold a block."""

    def __init__(self, prefill: Engine, decode: Engine, transport: str = "unix"):
        self.engines = prefill, decode
        [(listener, self.address)] = listen_kv(transport, "127.0.0.1")
        self.socks, self.shells, self.threads = [], [], []
        for engine, listeners in ((prefill, []), (decode, [listener])):
            ours, theirs = socket.socketpair()
            shell = TEShell(theirs, engine, listeners)
            self.socks.append(ours)
            self.shells.append(shell)
            self.threads.append(threading.Thread(target=shell.run, daemon=True))
        self.bufs = [bytearray(), bytearray()]
        self.n = 0
        for t in self.threads:
            t.start()

    def __enter__(self) -> "PDPair":
        return self

    def __exit__(self, *exc) -> None:
        for sock, t, shell in zip(self.socks, self.threads, self.shells):
            sock.sendall(pack(Stop()))
            t.join(30)
            assert not t.is_alive()
            sock.close()
            shell.sock.close()
        for listener in self.shells[1].kv_listeners:
            listener.close()
        if exc[0] is None:
            for engine in self.engines:
                assert_no_leak(engine)

    def run(self, prompts, params, kv_skip: int | list[int] = 0) -> tuple[list[list[int]], list[Step]]:
        """Each prompt's tokens (the first from the prefill TE, the rest from the decode TE),
        and the prefill TE's `Step` that reported its handoff."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        skips = kv_skip if isinstance(kv_skip, list) else [kv_skip] * len(prompts)
        rids = [f"r{self.n + i}" for i in range(len(prompts))]
        self.n += len(prompts)
        for rid, p, sp in zip(rids, prompts, params):  # the decode TE hears first, as from the cluster
            self.socks[1].sendall(pack(Add(rid, p, sp, await_kv=True)))
        for rid, p, sp, skip in zip(rids, prompts, params, skips):
            self.socks[0].sendall(pack(Add(rid, p, sp, kv_to=self.address, kv_rid=rid, kv_skip=skip)))
        tokens = {rid: [] for rid in rids}
        handoffs, open_ = {}, {rid: 2 for rid in rids}  # each waits for its prefill's and its decode's end
        deadline = time.monotonic() + 120
        while any(open_.values()):
            assert time.monotonic() < deadline, f"stuck: {open_}"
            ready, _, _ = select.select(self.socks, [], [], 1)
            for side, sock in enumerate(self.socks):
                if sock not in ready:
                    continue
                self.bufs[side] += sock.recv(1 << 20)
                for step in unpack_frames(self.bufs[side]):
                    for out in step.outs if isinstance(step, Step) else ():  # (not the TE's `Alive`s)
                        if out.rid not in tokens:
                            continue  # another request of the engine's (a test's own)
                        assert out.finish is not FinishReason.ERROR, step.error
                        tokens[out.rid] += out.token_ids
                        if out.finish is FinishReason.HANDOFF:
                            handoffs[out.rid] = step
                        if out.finish is not None:
                            open_[out.rid] -= 1
                        if side == 0 and out.finish in (FinishReason.STOP, FinishReason.LENGTH):
                            self.socks[1].sendall(pack(Abort([out.rid])))  # ended at its first token
                            open_[out.rid] -= 1
        return [tokens[rid] for rid in rids], [handoffs.get(rid) for rid in rids]


def disaggregated(prefill, decode, prompts, params, transport="unix") -> list[list[int]]:
    """Each prompt's tokens: the first from `prefill`, the rest from `decode`."""
    with PDPair(prefill, decode, transport) as pair:
        return pair.run(prompts, params)[0]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("layerwise", [True, False])
def test_disaggregated_tokens_equal_colocated(model_path, weights, transport, layerwise):
    prompts = random_prompts(4, 20, 200, seed=3)
    colocated = make_engine(model_path, weights).generate(prompts, GREEDY)
    prefill, decode = make_engine(model_path, weights, kv_layerwise=layerwise), make_engine(model_path, weights)
    assert disaggregated(prefill, decode, prompts, GREEDY, transport) == colocated


def test_seeded_sampling_continues_across_the_handoff(model_path, weights):
    """The seeded generator's state travels with the KV: the decode TE draws what a colocated
    TE would have drawn."""
    prompts = random_prompts(2, 30, 90, seed=5)
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=16, ignore_eos=True) for s in (7, 8)]
    colocated = make_engine(model_path, weights).generate(prompts, params)
    prefill, decode = make_engine(model_path, weights), make_engine(model_path, weights)
    assert disaggregated(prefill, decode, prompts, params) == colocated


def test_decode_engine_without_free_blocks_recomputes_the_prompt(model_path, weights):
    """KV that arrives while the decode TE's pool is full is dropped; the request waits and
    recomputes its prompt there: same tokens, nothing leaked."""
    prompts = random_prompts(2, 100, 160, seed=9)
    colocated = make_engine(model_path, weights).generate(prompts, GREEDY)
    prefill, decode = make_engine(model_path, weights), make_engine(model_path, weights, num_kv_blocks=24)
    hog = [1] * (16 * 18)  # holds 18 of the decode engine's 24 blocks, then all 24, for 96 steps
    decode.add_request("hog", hog, SamplingParams(temperature=0, max_tokens=96, ignore_eos=True))
    decode.step()
    assert decode.rtc.num_free < 9  # too few for either prompt's KV (9 and 10 blocks)
    admitted, admit = [], decode.batcher.admit_prefilled
    decode.batcher.admit_prefilled = lambda seq: admitted.append(admit(seq)) or admitted[-1]
    assert disaggregated(prefill, decode, prompts, GREEDY) == colocated
    assert admitted == [False, False]  # both recomputed their prompts


# ---------------------------------------------------------------------------- dist_sched's PD-aware step

# Disaggregated is faster only for long prompts with short outputs (the cell [1024, 0.03]).
HEATMAP = Heatmap(prefill_lens=[64, 1024], ratios=[0.03, 1.0],
                  colocated_ms=[[100, 100], [100, 100]], disagg_ms=[[200, 200], [50, 200]], setup="test")


def test_dist_sched_follows_the_heatmap():
    groups = {g: (1, EngineConfig()) for g in GROUPS}
    cluster = Cluster("model", groups, heatmap=HEATMAP)
    greedy = SamplingParams(temperature=0, max_tokens=16)
    long_short = Task("j", 0, list(range(900)), greedy)
    short_long = Task("j", 0, list(range(80)), SamplingParams(temperature=0, max_tokens=200))
    assert cluster.pd_aware(long_short) == "prefill"
    assert long_short.placement["pd"] == {"choice": "disaggregated", "predicted_output": 16, "cell": [1024, 0.03],
                                          "colocated_ms": 100, "disagg_ms": 50}
    assert cluster.pd_aware(short_long) == "colocated"
    # Without history the predictor assumes max_tokens; then it learns from finished requests.
    long_long = Task("j", 0, list(range(900)), SamplingParams(temperature=0, max_tokens=900))
    assert cluster.pd_aware(long_long) == "colocated"
    for _ in range(5):
        cluster.predictor.observe(list(range(900)), 20)
        cluster.predictor.observe(list(range(1000, 1080)), 300)
    assert cluster.pd_aware(long_long) == "prefill" and long_long.placement["pd"]["predicted_output"] == 20
    assert cluster.predictor.predict(list(range(1000, 1070)), 500) == 300  # the similar prompts, not the others
    # A cluster of one kind has no choice to make.
    only_pd = Cluster("model", {"prefill": (1, EngineConfig()), "decode": (1, EngineConfig())})
    assert only_pd.pd_aware(short_long) == "prefill"


def test_heatmap_round_trip_and_table(tmp_path):
    HEATMAP.save(tmp_path / "h.json")
    assert Heatmap.load(tmp_path / "h.json") == HEATMAP
    table = HEATMAP.table()
    assert "+100% (100/50)" in table and "-50% (100/200)" in table


# ---------------------------------------------------------------------------- the real server

def completion(s: Server, prompt: str, max_tokens: int, **sampling) -> dict:
    status, body = s.post("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                               "ignore_eos": True, **sampling})
    assert status == 200, body
    return body


def job_record(s: Server, index: int = 0) -> dict:
    return s.get("/admin/cluster")["recent_jobs"][index]["tasks"][0]


def tes(s: Server) -> list[dict]:
    return s.get("/admin/cluster")["tes"]


def te_group(s: Server) -> dict[str, str]:
    return {te["id"]: te["group"] for te in tes(s)}


def test_server_places_by_heatmap_with_identical_greedy_tokens(tmp_path):
    """One cluster with both kinds: a long prompt asking for a long answer runs colocated,
    the same prompt with a short answer runs disaggregated; greedy tokens are identical, and
    so are seeded samples."""
    HEATMAP.save(tmp_path / "heatmap.json")
    with Server("--num-tes", "1", "--prefill-tes", "1", "--decode-tes", "1", "--pd-heatmap", str(tmp_path / "heatmap.json"),
                "--max-model-len", "2048", "--kv-cache-gb", "0.2") as s:
        prompt = " ".join(f"Item {i} of the inventory is a crate of apples." for i in range(60))  # ~700 tokens
        long = completion(s, prompt, 300)
        rec = job_record(s)
        assert rec["placement"]["pd"]["choice"] == "colocated" and te_group(s)[rec["te"]] == "colocated"
        seeded = {"temperature": 0.9, "seed": 11}
        long_seeded = completion(s, prompt, 200, **seeded)  # predicted: min(200, the 300 just seen)
        assert job_record(s)["placement"]["pd"]["choice"] == "colocated"
        short = completion(s, prompt, 12)
        rec = job_record(s)
        groups = te_group(s)
        assert rec["placement"]["pd"]["choice"] == "disaggregated" and rec["placement"]["pd"]["cell"] == [1024, 0.03]
        assert groups[rec["te"]] == "prefill" and groups[rec["decode_te"]] == "decode"
        assert 0 < rec["placement"]["kv_transfer_ms"] < 5000
        assert short["usage"]["completion_tokens"] == 12 and short["choices"][0]["finish_reason"] == "length"
        assert long["choices"][0]["text"].startswith(short["choices"][0]["text"]) and short["choices"][0]["text"]
        # streamed through both TEs: the same text, chunk by chunk
        client = OpenAI(base_url=s.url + "/v1", api_key="none")
        chunks = client.completions.create(model=None, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in chunks) == short["choices"][0]["text"]
        again = job_record(s)["placement"]
        assert again["pd"]["choice"] == "disaggregated"
        # the decode TE cached the prompt: only the blocks past what it holds were sent
        assert again["decode"]["matched_tokens"] > 0 and rec["placement"]["decode"]["matched_tokens"] == 0
        assert 0 < again["kv_transfer_bytes"] < rec["placement"]["kv_transfer_bytes"]
        # seeded sampling too: the generator's state travels with the KV
        short_seeded = completion(s, prompt, 12, **seeded)
        assert job_record(s)["placement"]["pd"]["choice"] == "disaggregated"
        assert long_seeded["choices"][0]["text"].startswith(short_seeded["choices"][0]["text"])
        tes = s.get("/admin/cluster")["tes"]
        assert all(te["tasks"] == 0 and te["kv_usage"] == 0 for te in tes)  # no block held anywhere
        with urllib.request.urlopen(s.url + "/metrics") as r:
            count = next(line for line in r.read().decode().splitlines()
                         if line.startswith("deepflow:kv_transfer_seconds_count"))
        assert float(count.split()[-1]) == 3  # the disaggregated requests


async def test_decode_te_killed_during_transfer():
    """The decode TE freezes, the prefill TE sends the first token and starts the KV transfer,
    then the decode TE is killed: the client's stream ends with an error event, the prefill
    TE holds no block, the decode TE is replaced and serves the next request. Then the
    prefill TE dies before a first token: the client never notices."""
    with Server("--num-tes", "0", "--prefill-tes", "1", "--decode-tes", "1", "--kv-timeout-s", "60",
                "--max-model-len", "1024", "--kv-cache-gb", "0.2") as s:
        # n choices and stop strings: two pairs; each choice ends exactly where the first of the
        # stop strings (one from the middle of each choice's full answer) appears in it
        ask = {"messages": [{"role": "user", "content": "Name two colors."}], "n": 2, "seed": 1, "temperature": 0.9,
               "max_tokens": 40, "ignore_eos": True}
        status, full = s.post("/v1/chat/completions", ask)
        assert status == 200, full
        texts = [c["message"]["content"] for c in full["choices"]]
        assert texts[0] != texts[1] and all(len(t) > 40 for t in texts), texts
        stops = [t[len(t) // 2:len(t) // 2 + 4] for t in texts]
        status, two = s.post("/v1/chat/completions", {**ask, "stop": stops})
        assert status == 200 and [c["finish_reason"] for c in two["choices"]] == ["stop", "stop"], two
        cut = [t[:min(t.index(x) for x in stops if x in t)] for t in texts]
        assert [c["message"]["content"] for c in two["choices"]] == cut and all(cut), (texts, stops)
        await async_wait_until(lambda: all(te["tasks"] == 0 and te["kv_usage"] == 0 for te in tes(s)), 10)

        decode = next(te for te in tes(s) if te["group"] == "decode")
        os.kill(decode["pid"], signal.SIGSTOP)
        body = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
                "max_tokens": 200, "temperature": 0, "stream": True}
        async with aiohttp.ClientSession() as http:
            async with http.post(s.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                first = await data_lines(r, 2)  # the role chunk, then the prefill TE's first token
                assert orjson.loads(first[1])["choices"][0]["delta"]["content"]
                # the prefill TE holds the request's blocks for the transfer to the frozen decode TE
                await async_wait_until(lambda: any(te["kv_usage"] for te in tes(s) if te["group"] == "prefill"), 10)
                os.kill(decode["pid"], signal.SIGKILL)
                t0 = time.monotonic()
                rest = await data_lines(r, timeout=10)
            assert time.monotonic() - t0 < 5
            error = orjson.loads(rest[-2])["error"]  # either side may notice first
            assert rest[-1] == "[DONE]" and ("decode TE" in error["message"] or "engine" in error["message"])
            await async_wait_until(lambda: all(te["kv_usage"] == 0 and te["tasks"] == 0
                                               for te in tes(s) if te["group"] == "prefill"), 10)
            await async_wait_until(lambda: [te["state"] for te in tes(s)] == ["ready", "ready"])
            async with http.post(s.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 8}) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 8
            assert job_record(s)["decode_te"] not in (None, decode["id"])  # the replacement

            # The prefill TE dies before the first token: the pair is placed again, unseen.
            prefill_pid = next(te["pid"] for te in tes(s) if te["group"] == "prefill")
            os.kill(prefill_pid, signal.SIGSTOP)
            answer = asyncio.create_task(http.post(s.url + "/v1/chat/completions",
                                                   json={**body, "stream": False, "max_tokens": 8}))
            await async_wait_until(lambda: any(te["tasks"] for te in tes(s) if te["pid"] == prefill_pid))
            os.kill(prefill_pid, signal.SIGKILL)
            async with await answer as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 8
            assert job_record(s)["retries"] == 1
            assert all(te["tasks"] == 0 and te["kv_usage"] == 0 for te in tes(s))


def test_cluster_shape_from_flags_and_toml(tmp_path):
    from tests.test_config import shape
    toml = tmp_path / "cluster.toml"
    toml.write_text("[colocated]\ninstances = 0\n[prefill]\ninstances = 1\n[decode]\ninstances = 2\nkv_cache_gb = 2.5\n")
    got = shape("--num-tes", "1", "--cluster", str(toml))
    assert {g: n for g, (n, _) in got.items()} == {"colocated": 0, "prefill": 1, "decode": 2}
    assert got["decode"][1].kv_cache_gb == 2.5 and got["prefill"][1].kv_cache_gb == 1.0
    for bad in ("[decode]\ninstances = 1\n",                 # prefill without decode and vice versa
                "[decoder]\ninstances = 1\n",                # no such group
                "[decode]\ninstances = 1\nkv_listen = 'x'\n"):  # not a setting a user may set
        toml.write_text("[prefill]\ninstances = 0\n" + bad)
        with pytest.raises(SystemExit):
            shape("--cluster", str(toml))


def test_profile_pd_saves_and_shows_a_heatmap(tmp_path):
    out = tmp_path / "heatmap.json"
    cmd = [sys.executable, str(ROOT / "deepflow.py"), "profile-pd", "--prefill-lens", "32", "64", "--ratios", "0.25",
           "--burst", "1", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    heatmap = Heatmap.load(out)
    assert heatmap.prefill_lens == [32, 64] and len(heatmap.colocated_ms) == 2
    assert all(ms > 0 for row in heatmap.colocated_ms + heatmap.disagg_ms for ms in row)
    shown = subprocess.run(cmd[:3] + ["--show", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0 and heatmap.table() in shown.stdout
