"""Many models on one pool (scheduler/models.py), end to end: one real server with the default
model, a second base model (the tiny HF model, starting at zero TEs) and LoRA adapters
(tests/lora_util.py). An adapter answers as the in-process engine does with it and unlike its
base; adapters and the base mix in one batch with each row's own answer; a reload under the
same name changes the answer and reuses none of the old KV; the second base scales from zero
and back while the first keeps serving; every bad adapter is a 400 that says why."""
import asyncio
import shutil
import subprocess
import sys

import aiohttp
import pytest

from flowserve.config import EngineConfig, read_model_config
from flowserve.engine import Engine
from flowserve.lora import read_lora
from flowserve.protocol import Adapter, SamplingParams
from flowserve.tokenizer import Detokenizer
from tests.lora_util import write_adapter
from tests.server_util import ROOT, Server, async_wait_until
from tests.tiny_model import write_tiny_model

QUESTIONS = ["What is the capital of France?", "Name three colors.", "Why is the sky blue?"]
IDLE_S = 3


def ask(q: str, model: str | None, **extra) -> dict:
    return {"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 12,
            **({"model": model} if model else {}), **extra}


@pytest.fixture(scope="module")
def pool(tmp_path_factory, model_path):
    """The server and the adapters' directories: a1..a3 over the default model (a3 on q and v
    only), and bad ones for the 400s."""
    root = tmp_path_factory.mktemp("models")
    cfg = read_model_config(model_path)
    dirs = {f"a{i}": write_adapter(root / f"a{i}", cfg, i) for i in (1, 2)}
    dirs["a3"] = write_adapter(root / "a3", cfg, 3, targets=["q_proj", "v_proj"], alpha=32)
    dirs["new"] = write_adapter(root / "new", cfg, 9)
    tiny = write_tiny_model(root / "tiny")
    dirs["rank16"] = write_adapter(root / "rank16", cfg, 5, rank=16)
    dirs["tiny_shapes"] = write_adapter(root / "tiny_shapes", read_model_config(str(tiny)), 6)
    dirs["no_such_module"] = write_adapter(root / "no_such_module", cfg, 7, config={"target_modules": ["lm_head"]})
    dirs["dora"] = write_adapter(root / "dora", cfg, 8, config={"use_dora": True})
    (root / "malformed").mkdir()
    (root / "malformed" / "adapter_config.json").write_text("{not json")
    shutil.copy(dirs["a1"] / "adapter_model.safetensors", root / "malformed")
    dirs["malformed"] = root / "malformed"
    with Server("--model", f"smol={model_path}", "--model", f"tiny={tiny}", "--lora-modules", f"a1={dirs['a1']}",
                "--lora-modules", f"a3={dirs['a3']}", "--max-lora-rank", "8", "--max-loras", "4",
                "--scale-in-idle-s", str(IDLE_S), "--kv-cache-gb", "0.25") as server:
        yield server, dirs


async def chat(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict]:
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        return r.status, await r.json()


async def post(http: aiohttp.ClientSession, url: str, path: str, body: dict) -> tuple[int, dict]:
    async with http.post(url + path, json=body) as r:
        return r.status, await r.json()


def text(body: dict) -> str:
    return body["choices"][0]["message"]["content"]


async def test_models_lists_bases_and_adapters(pool):
    server, dirs = pool
    async with aiohttp.ClientSession() as http, http.get(server.url + "/v1/models") as r:
        cards = {c["id"]: c for c in (await r.json())["data"]}
    assert list(cards)[:2] == ["smol", "tiny"] and cards["smol"]["parent"] is None
    assert cards["a1"]["parent"] == "smol" and cards["a1"]["root"] == str(dirs["a1"])
    assert cards["a3"]["parent"] == "smol"


async def test_adapter_answers_as_the_engine_does_and_unlike_its_base(pool, model_path, weights, tokenizer):
    """Greedy through the server = the in-process engine with the same adapter (whose
    agreement with transformers + peft tests/test_lora.py shows), and differs from the base."""
    server, dirs = pool
    adapter = Adapter("a1", str(dirs["a1"]), read_lora(str(dirs["a1"]), weights[0], 64).digest)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    engine = Engine(model_path, EngineConfig(kv_cache_gb=0.1), weights=weights)
    ref = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12), adapters=[adapter] * len(prompts))
    async with aiohttp.ClientSession() as http:
        for q, prompt, ids in zip(QUESTIONS, prompts, ref):
            (s1, lora), (s2, base) = await chat(http, server.url, ask(q, "a1")), await chat(http, server.url, ask(q, None))
            assert s1 == s2 == 200
            assert text(lora) == Detokenizer(tokenizer, prompt).push(ids)
            assert text(lora) != text(base)
            assert lora["model"] == "a1" and base["model"] == "smol"


async def test_one_batch_mixes_adapters_and_the_base(pool):
    """Requests for a1, a3, the base and a1 again, concurrently (one TE: one step holds them
    all) and alone: each gets the answer it gets alone."""
    server, _ = pool
    mix = [(QUESTIONS[0], "a1"), (QUESTIONS[1], "a3"), (QUESTIONS[2], None), (QUESTIONS[1], "a1"),
           (QUESTIONS[0], "smol")]
    async with aiohttp.ClientSession() as http:
        alone = [text((await chat(http, server.url, ask(q, m)))[1]) for q, m in mix]
        together = await asyncio.gather(*(chat(http, server.url, ask(q, m)) for q, m in mix))
    assert [text(b) for _, b in together] == alone
    assert alone[0] != alone[4]  # a1 and the base differ on the same question


async def test_load_unload_reload_under_the_same_name(pool):
    """A run-time adapter answers; unloaded, new requests get 404; loaded again under the same
    name with other weights it answers differently, and its first request reuses no KV."""
    server, dirs = pool
    q = ask(QUESTIONS[2], "live")
    async with aiohttp.ClientSession() as http:
        status, card = await post(http, server.url, "/v1/load_lora_adapter",
                                  {"lora_name": "live", "lora_path": str(dirs["a2"])})
        assert status == 200 and card["id"] == "live" and card["parent"] == "smol"
        first = text((await chat(http, server.url, q))[1])
        again = (await chat(http, server.url, q))[1]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # its own KV is reused
        assert (await post(http, server.url, "/v1/unload_lora_adapter", {"lora_name": "live"}))[0] == 200
        status, body = await chat(http, server.url, q)
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, _ = await post(http, server.url, "/v1/load_lora_adapter",
                               {"lora_name": "live", "lora_path": str(dirs["new"])})
        assert status == 200
        status, body = await chat(http, server.url, q)
        assert status == 200 and text(body) != first
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


@pytest.mark.parametrize("name,path_key,param,says", [
    ("x1", None, "lora_path", "is not a directory"),
    ("x2", "malformed", "lora_path", "malformed adapter_config.json"),
    ("x3", "rank16", "lora_path", "rank 16 is above max_lora_rank 8"),
    ("x4", "no_such_module", "lora_path", "target modules the base does not have"),
    ("x5", "tiny_shapes", "lora_path", "the base needs"),
    ("x6", "dora", "lora_path", "unsupported PEFT features"),
    ("smol", "a2", "lora_name", "taken by a base model"),
    ("a1", "a2", "lora_name", "taken by a LoRA adapter"),
])
async def test_bad_adapters_are_400_and_change_nothing(pool, name, path_key, param, says):
    server, dirs = pool
    path = str(dirs[path_key]) if path_key else "/no/such/adapter"
    async with aiohttp.ClientSession() as http:
        status, body = await post(http, server.url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        assert status == 400 and body["error"]["param"] == param and says in body["error"]["message"], body
        async with http.get(server.url + "/v1/models") as r:
            ids = [c["id"] for c in (await r.json())["data"]]
        assert not any(i.startswith("x") for i in ids) and ids.count(name) <= 1
        status, body = await post(http, server.url, "/v1/unload_lora_adapter", {"lora_name": "never-loaded"})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        assert (await chat(http, server.url, ask(QUESTIONS[0], "a1")))[0] == 200  # still serving


async def test_second_base_scales_from_zero_and_back(pool):
    """The tiny model has no TE until its first request, which a TE forked from its own
    template answers; after its idle time it is back at zero, while smol kept its TE."""
    server, _ = pool

    def tes() -> dict[str, int]:
        return {m: len(v["tes"]) for m, v in server.get("/admin/cluster")["models"].items()}

    async with aiohttp.ClientSession() as http:
        await async_wait_until(lambda: tes()["tiny"] == 0, 30)
        status, body = await chat(http, server.url, ask("Hello", "tiny", max_tokens=4, ignore_eos=True))
        assert status == 200 and body["model"] == "tiny" and body["usage"]["completion_tokens"] == 4
        assert tes()["tiny"] == 1
        assert (await chat(http, server.url, ask(QUESTIONS[0], None)))[0] == 200
        await async_wait_until(lambda: tes()["tiny"] == 0, 4 * IDLE_S + 10)
        assert tes()["smol"] == 1
        status, body = await chat(http, server.url, ask("Hello again", "tiny", max_tokens=4))
        assert status == 200  # and from zero once more


async def test_adapter_across_a_pd_pair(pool):
    """Disaggregated, the decode TE continues with the adapter the prefill TE computed the KV
    with: the same answers as colocated, for the adapter and the base in one burst."""
    colocated, dirs = pool
    mix = [(QUESTIONS[0], "a1"), (QUESTIONS[0], None), (QUESTIONS[2], "a1")]
    async with aiohttp.ClientSession() as http:
        want = [text((await chat(http, colocated.url, ask(q, m)))[1]) for q, m in mix]
        with Server("--prefill-tes", "1", "--decode-tes", "1", "--lora-modules", f"a1={dirs['a1']}",
                    "--kv-cache-gb", "0.25") as pd:
            got = await asyncio.gather(*(chat(http, pd.url, ask(q, m)) for q, m in mix))
            placements = [t["placement"] for j in pd.get("/admin/cluster")["recent_jobs"] for t in j["tasks"]]
    assert [text(b) for _, b in got] == want
    assert all(p["pd"]["choice"] == "disaggregated" and p["decode"]["host"] for p in placements)


class FakeNode:
    def __init__(self):
        self.evicted = 0

    def evict(self):
        self.evicted += 1


class FakeTE:
    cost = 4


def test_bases_share_a_machine_and_the_idle_least_recently_used_template_leaves():
    """Three base models' hosts on one 20-byte machine, weights 6 each (18 in DRAM): a TE of 4
    fits only once an idle model's weights leave, the least recently used first; a model with
    a TE keeps its weights; the evicted one counts again once its next TE comes."""
    from scaling.hosts import Host
    machine: list[Host] = []
    a, b, c = (Host(n, "127.0.0.1", 2, 20, FakeNode(), machine=machine, weights_bytes=6, last_used=t)
               for n, t in (("a", 3.0), ("b", 1.0), ("c", 2.0)))
    assert a.used() == 18 and a.room(4) == (20 - 18 + 6 + 6) // 4  # b's and c's weights can leave
    a.make_room(4)
    assert (b.node.evicted, c.node.evicted) == (1, 0) and not b.weights_resident  # b: least recently used
    a.tes.append(FakeTE())
    a.make_room(4)  # 4 bytes are free: nothing leaves
    assert a.used() == 16 and c.node.evicted == 0
    a.tes.append(FakeTE())
    assert a.used() == 20 and a.threads_per_te() == 1  # two TEs share the machine's 2 cores
    a.make_room(4)
    assert c.node.evicted == 1 and a.used() == 14
    b.make_room(4)  # b's next TE: its weights come back
    assert b.weights_resident and b.used() == 20 and b.room(4) == 0
    assert a.node.evicted == 0  # a holds TEs: never evicted


def test_a_bad_adapter_on_the_command_line_ends_serve_before_anything_starts(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "deepflow.py"), "serve", "--port", "0",
                           "--lora-modules", f"bad={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--lora-modules bad=" in proc.stderr and "is not a directory" in proc.stderr
