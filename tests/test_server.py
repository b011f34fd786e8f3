"""The real server, end to end over HTTP: the official openai client, the SSE wire format,
bad input, client disconnects, concurrency, the main process's footprint, and shutdown."""
import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.server_util import Server, async_wait_until, data_lines, pid_alive, rss_mb, wait_until

MODEL = "smollm2"


@pytest.fixture(scope="module")
def server():
    with Server("--served-model-name", MODEL, "--max-model-len", "2048", "--api-key", "sekrit") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sekrit", max_retries=0)


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def check_envelope(bodies: list, kind: str, since: float) -> None:
    """OpenAI's fields around the choices: one id for all of a stream's chunks, the served
    model's name, the creation second, the object type."""
    assert len({b.id for b in bodies}) == 1, {b.id for b in bodies}
    assert bodies[0].id.startswith("chatcmpl-" if kind.startswith("chat") else "cmpl-")
    assert {b.object for b in bodies} == {kind} and {b.model for b in bodies} == {MODEL}
    assert len({b.created for b in bodies}) == 1 and int(since) <= bodies[0].created <= time.time()


def test_openai_client_chat_stream_and_completion(client):
    t0 = time.time()
    r = client.chat.completions.create(model=MODEL, messages=ask("What is the capital of France?"),
                                       temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    check_envelope([r], "chat.completion", t0)

    chunks = list(client.chat.completions.create(model=MODEL, messages=ask("What is the capital of France?"),
                                                 temperature=0, max_tokens=30, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    check_envelope(chunks, "chat.completion.chunk", t0)
    assert chunks[0].id != r.id  # an id per request
    # the same prompt again: its prefix is in the TE's cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0

    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert len(c.choices[0].text) > 0
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8
    assert c.usage.total_tokens == c.usage.prompt_tokens + 8 and c.usage.prompt_tokens == 5
    check_envelope([c], "text_completion", t0)
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
    assert chunks[-1].usage.total_tokens == c.usage.total_tokens
    check_envelope(chunks, "text_completion", t0)
    assert chunks[0].id not in (c.id, r.id)


def test_non_ascii_text_streams_as_it_answers(client, tokenizer):
    """CJK, accents and emoji in and out: the stream, cut into tokens that split characters,
    reads as the whole answer, and the prompt is counted as our tokenizer counts it
    (tests/test_tokenizer.py holds that tokenizer to transformers')."""
    prompt = "東京は日本の首都です。Ça, c'est très joli 🎉! 北京是"
    body = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**body)
    text = whole.choices[0].text
    assert any(ord(ch) > 127 for ch in text), text  # the answer itself is not plain ASCII
    assert "\ufffd" not in text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**body, stream=True))
    assert streamed == text
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_n_choices_and_seed(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("Tell me a story."), n=3, max_tokens=12,
                                       temperature=0.8, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 3  # n samples, not one copied n times
    again = client.chat.completions.create(model=MODEL, messages=ask("Tell me a story."), max_tokens=12,
                                           temperature=0.8, seed=7)
    assert again.choices[0].message.content == r.choices[0].message.content


def test_temperature_and_top_p_change_the_answer(client):
    """Seeded samples are reproducible; greedy ignores the seed; at one seed a different
    temperature samples differently; a tiny top_p leaves only the most likely token, so it
    gives the greedy answer whatever the temperature."""
    def complete(**sampling) -> str:
        return client.completions.create(model=MODEL, prompt="My favourite animal is", max_tokens=16,
                                         extra_body={"ignore_eos": True}, **sampling).choices[0].text
    greedy = complete(temperature=0, seed=1)
    assert complete(temperature=0, seed=2) == greedy
    hot = complete(temperature=1.5, seed=1)
    assert hot == complete(temperature=1.5, seed=1)
    assert hot != greedy
    assert complete(temperature=0.7, seed=1) != hot
    assert complete(temperature=1.5, seed=1, top_p=0.01) == greedy


def test_stop_string(client):
    """A stop string from the middle of the greedy answer ends it there: the text before it,
    exactly, without it, streamed or not."""
    body = dict(model=MODEL, prompt="The three primary colors are", max_tokens=24, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**body).choices[0].text
    middle = len(full) // 2
    stop = full[middle:middle + 4]
    before = full[:full.index(stop)]
    assert len(before) >= 8, (full, stop)
    cut = client.completions.create(**body, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == before
    assert cut.usage.completion_tokens < 24
    chunks = list(client.completions.create(**body, stop=["never appears", stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == before
    assert chunks[-1].choices[0].finish_reason == "stop"


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
AUTH = {"Authorization": "Bearer sekrit", "Content-Type": "application/json"}
BAD = [  # (name, path, raw body or dict, headers, status, param)
    ("malformed json", "/v1/chat/completions", b"{not json", AUTH, 400, None),
    ("invalid utf-8", "/v1/chat/completions", b'{"messages": "\xff\xfe"}', AUTH, 400, None),
    ("top level array", "/v1/chat/completions", b"[1, 2]", AUTH, 400, None),
    ("empty body", "/v1/chat/completions", b"", AUTH, 400, None),
    ("messages missing", "/v1/chat/completions", {"model": MODEL}, AUTH, 400, "messages"),
    ("messages empty", "/v1/chat/completions", {**GOOD, "messages": []}, AUTH, 400, "messages"),
    ("messages wrong type", "/v1/chat/completions", {**GOOD, "messages": "hi"}, AUTH, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, AUTH, 400, None),
    ("content wrong type", "/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": 5}]}, AUTH, 400, None),
    ("negative max_tokens", "/v1/chat/completions", {**GOOD, "max_tokens": -1}, AUTH, 400, "max_tokens"),
    ("max_tokens string", "/v1/chat/completions", {**GOOD, "max_tokens": "10"}, AUTH, 400, "max_tokens"),
    ("max_tokens over context", "/v1/chat/completions", {**GOOD, "max_tokens": 5000}, AUTH, 400, "max_tokens"),
    ("temperature 5", "/v1/chat/completions", {**GOOD, "temperature": 5}, AUTH, 400, "temperature"),
    ("top_p 0", "/v1/chat/completions", {**GOOD, "top_p": 0}, AUTH, 400, "top_p"),
    ("n 0", "/v1/chat/completions", {**GOOD, "n": 0}, AUTH, 400, "n"),
    ("n too large", "/v1/chat/completions", {**GOOD, "n": 1000}, AUTH, 400, "n"),
    ("stream not bool", "/v1/chat/completions", {**GOOD, "stream": "yes"}, AUTH, 400, "stream"),
    ("stop wrong type", "/v1/chat/completions", {**GOOD, "stop": 3}, AUTH, 400, "stop"),
    ("top_logprobs", "/v1/chat/completions", {**GOOD, "logprobs": True, "top_logprobs": 21}, AUTH, 400, "top_logprobs"),
    ("presence penalty", "/v1/chat/completions", {**GOOD, "presence_penalty": 2.5}, AUTH, 400, "presence_penalty"),
    ("unknown model", "/v1/chat/completions", {**GOOD, "model": "gpt-9"}, AUTH, 404, "model"),
    ("missing auth", "/v1/chat/completions", GOOD, {"Content-Type": "application/json"}, 401, None),
    ("wrong auth", "/v1/chat/completions", GOOD, {**AUTH, "Authorization": "Bearer nope"}, 401, None),
    ("key without its scheme", "/v1/chat/completions", GOOD, {**AUTH, "Authorization": "sekrit"}, 401, None),
    ("oversized body", "/v1/chat/completions", b"{" + b" " * (5 << 20) + b"}", AUTH, 413, None),
    ("prompt over context", "/v1/chat/completions",
     {**GOOD, "messages": [{"role": "user", "content": "hello " * 3000}]}, AUTH, 400, "messages"),
    ("too many messages", "/v1/chat/completions",
     {**GOOD, "messages": [{"role": "user", "content": "x"}] * 257}, AUTH, 400, "messages"),
    ("too many stop strings", "/v1/chat/completions", {**GOOD, "stop": ["x"] * 17}, AUTH, 400, "stop"),
    ("completion prompt missing", "/v1/completions", {"model": MODEL}, AUTH, 400, "prompt"),
    ("completion token out of vocab", "/v1/completions", {"model": MODEL, "prompt": [10**9]}, AUTH, 400, "prompt"),
    ("unknown route", "/v1/nothing", GOOD, AUTH, 404, None),
]


@pytest.mark.parametrize("name,path,body,headers,status,param", BAD, ids=[b[0] for b in BAD])
async def test_bad_input_gets_openai_error(server, name, path, body, headers, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(server.url + path, data=raw, headers=headers) as r:
            assert r.status == status, await r.text()
            assert r.content_type == "application/json"
            err = (await r.json())["error"]
            assert err["message"] and err["type"] and "Traceback" not in err["message"]
            if param:
                assert err["param"] == param
        async with s.post(server.url + "/v1/chat/completions", json=GOOD, headers=AUTH) as r:
            assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"]


async def test_browsers_may_call_it(server):
    """CORS: a preflight needs no key; every answer, a stream's too, names the allowed origin;
    the key's scheme is case-insensitive, as HTTP's are."""
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with aiohttp.ClientSession() as s:
        async with s.options(server.url + "/v1/chat/completions", headers=preflight) as r:
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        headers = {**AUTH, "Authorization": "bearer sekrit", "Origin": "http://app.example"}
        async with s.post(server.url + "/v1/chat/completions", json={**GOOD, "stream": True}, headers=headers) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
            assert (await r.read()).endswith(b"data: [DONE]\n\n")


async def stream_text(session, url, body) -> tuple[str, str]:
    text, finish = "", None
    async with session.post(url + "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH) as r:
        assert r.status == 200
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                text += c["delta"].get("content", "")
                finish = c["finish_reason"] or finish
    return text, finish


async def test_client_disconnect_frees_blocks(server):
    """A client that goes away mid-stream: its task is aborted in the TE long before its
    max_tokens, and the TE's KV blocks go back to what they were."""
    base = server.get("/admin/cluster")["tes"][0]["kv_usage"]
    async with aiohttp.ClientSession() as s:
        body = {**GOOD, "max_tokens": 1500, "stream": True, "ignore_eos": True}
        async with s.post(server.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            await data_lines(r, 4)
            te = server.get("/admin/cluster")["tes"][0]
            assert te["running"] == 1 and te["kv_usage"] > base
        # leaving the block closed the connection mid-stream

    def freed():
        te = server.get("/admin/cluster")["tes"][0]
        return te["running"] == 0 and te["kv_usage"] <= base
    await async_wait_until(freed, 5)
    job = server.get("/admin/cluster")["recent_jobs"][0]
    assert job["state"] == "aborted" and job["tasks"][0]["state"] == "aborted", job
    assert 3 <= job["tasks"][0]["output_tokens"] < 1000  # stopped where the client left, not run out


async def test_32_concurrent_streams_match_alone(server):
    prompts = [f"Write one sentence about the number {i}." for i in range(32)]
    bodies = [{**GOOD, "messages": ask(p), "max_tokens": 16, "temperature": 0} for p in prompts]
    async with aiohttp.ClientSession() as s:
        alone = [await stream_text(s, server.url, b) for b in bodies]
        together = await asyncio.gather(*(stream_text(s, server.url, b) for b in bodies))
    assert together == alone


DRAIN_S, SHORT = 5, 6  # a drain timeout, and a stream that finishes well within it


@contextlib.contextmanager
def frozen(pid: int):
    """SIGSTOP `pid` for the block."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def stream_body(max_tokens: int) -> dict:
    return {"model": MODEL, "messages": ask("Count to a thousand."), "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
async def test_signal_drains_streams_and_leaves_no_process(how):
    """SIGTERM to the server, or Ctrl-C (SIGINT to the terminal's whole process group, which
    only the main process acts on), starts a drain: new requests get 503, streams that can
    finish within the drain timeout finish in full, one that cannot ends with an error event
    at the timeout, not before. The TE is frozen until the drain has begun, so every stream
    is in flight when the signal arrives. Then the server exits 0, leaving no process."""
    # one torch thread: a TE that keeps its pace on a busy machine
    with Server("--served-model-name", MODEL, "--drain-timeout", str(DRAIN_S), "--threads-per-te", "1") as s:
        cluster = s.get("/admin/cluster")
        te_pid = cluster["tes"][0]["pid"]
        pids = [te_pid, cluster["template_pid"]]
        url = s.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as http:
            with frozen(te_pid):
                short = [await http.post(url, json=stream_body(SHORT)) for _ in range(2)]
                long = await http.post(url, json=stream_body(1500))
                await async_wait_until(lambda: s.get("/admin/cluster")["tes"][0]["tasks"] == 3, 10)
                t0 = time.monotonic()
                if how == "sigterm":
                    s.proc.send_signal(signal.SIGTERM)
                else:
                    os.killpg(s.proc.pid, signal.SIGINT)
                await async_wait_until(lambda: s.status("/health") == 503, 5)
                async with http.post(url, json=stream_body(4)) as r:
                    assert r.status == 503
            for r in short:
                *events, done = await data_lines(r, timeout=DRAIN_S + 10)
                assert done == "[DONE]"
                *_, last, usage = map(json.loads, events)
                assert last["choices"][0]["finish_reason"] == "length" and usage["usage"]["completion_tokens"] == SHORT
            *_, error, done = await data_lines(long, timeout=DRAIN_S + 10)
            assert done == "[DONE]" and "error" in json.loads(error)
            assert DRAIN_S <= time.monotonic() - t0 < DRAIN_S + 3
        assert s.proc.wait(30) == 0
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10)


def scrape(server: Server) -> dict[str, float]:
    """/metrics as {sample name with its labels but the model's: value}."""
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL) == client.models.list().data[0]
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.models.retrieve("nope")
    assert server.get("/health")["status"] == "ok"
    before = scrape(server)
    prompt = "Once upon a time " * 20
    usages = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, extra_body={"ignore_eos": True},
                                        temperature=0).usage for _ in range(2)]  # the second hits the prefix cache
    stopped = client.completions.create(model=MODEL, prompt="Count: 1, 2,", max_tokens=16, stop=[","],
                                        temperature=0)
    assert stopped.choices[0].finish_reason == "stop"
    wait_until(lambda: scrape(server)["deepflow:num_requests_running"] == 0, 10)
    after = scrape(server)

    def moved(name: str) -> float:
        return after.get(f"deepflow:{name}", 0) - before.get(f"deepflow:{name}", 0)
    assert moved("e2e_request_latency_seconds_count") == 3
    assert moved("time_to_first_token_seconds_count") == 3
    assert moved("time_per_output_token_seconds_count") == 2 + (stopped.usage.completion_tokens > 1)
    assert moved("request_success_total{finished_reason=length}") == 2
    assert moved("request_success_total{finished_reason=stop}") == 1
    prompt_tokens = 2 * usages[0].prompt_tokens + stopped.usage.prompt_tokens
    assert moved("prompt_tokens_total") == prompt_tokens
    assert moved("generation_tokens_total") == 6 + stopped.usage.completion_tokens
    assert moved("prefix_cache_queries_total") == prompt_tokens
    assert moved("prefix_cache_hits_total") == sum(u.prompt_tokens_details.cached_tokens for u in usages) + \
        stopped.usage.prompt_tokens_details.cached_tokens
    assert usages[1].prompt_tokens_details.cached_tokens >= usages[0].prompt_tokens // 16 * 16 - 16 > 0
    # latencies fall in the buckets they took
    e2e = after["deepflow:e2e_request_latency_seconds_sum"] - before.get("deepflow:e2e_request_latency_seconds_sum", 0)
    assert 0 < e2e < 60
    assert after["deepflow:kv_cache_usage_perc"] == 0 and after["deepflow:num_requests_waiting"] == 0
    ready = [te for te in server.get("/admin/cluster")["tes"] if te["state"] == "ready"]  # the autoscaler may add one
    assert after["deepflow:num_tes_ready"] == len(ready) >= 1
    te = server.get("/admin/cluster")["tes"][0]
    steps = {k.split("step=")[1].split(",")[0]: v for k, v in after.items()
             if k.startswith("deepflow:te_start_step_milliseconds") and k.endswith(f"te={te['id']}}}")}
    assert steps == te["timeline_ms"] and len(steps) == 6 and all(v > 0 for v in steps.values()), steps


def test_main_process_has_not_loaded_torch(server, client):
    """The main process only schedules: torch, and its memory, stay in the TEs; and the default
    (local) backend never loads Ray."""
    client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=2)

    def libs(pid: int, name: str) -> list[str]:
        return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if name in line]
    assert libs(server.get("/admin/cluster")["tes"][0]["pid"], "libtorch")  # what the check looks for is there
    assert libs(server.proc.pid, "libtorch") == []
    assert libs(server.proc.pid, "_raylet") == [] and libs(server.proc.pid, "msgspec")  # (msgspec: the check works)
    assert rss_mb(server.proc.pid) < 200
