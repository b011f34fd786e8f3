"""The local backend as a cluster of one host: capacity, threads per TE, and health checks,
against the real server at default flags."""
import os
import re
import signal
import time

import aiohttp
import orjson

from tests.server_util import Server, async_wait_until, data_lines, pid_alive, wait_until

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8,
        "temperature": 0}


def ready_tes(s: Server) -> list[dict]:
    return [te for te in s.get("/admin/cluster")["tes"] if te["state"] == "ready"]


def test_scale_beyond_capacity_is_refused_and_what_fits_rebalances_threads():
    cores = len(os.sched_getaffinity(0))
    # Default flags (1 GiB of KV per TE) on a host whose TEs may use 5 GiB: a few fit, not 64.
    with Server(env={"DEEPFLOW_HOST_MEMORY_GB": "5"}) as s:
        [first] = ready_tes(s)
        assert first["threads"] == cores
        status, answer = s.post("/v1/chat/completions", CHAT)
        assert status == 200
        expected = answer["choices"][0]["message"]["content"]

        status, err = s.post("/admin/scale", {"group": "colocated", "instances": 64})
        assert status == 409 and err["error"]["code"] == "insufficient_capacity" and err["error"]["param"] == "instances"
        fits = int(re.search(r"(\d+) can run", err["error"]["message"]).group(1))
        assert 2 <= fits < 64 and "KV pool 1 GiB" in err["error"]["message"]
        # the refusal left the serving TE alone
        assert [(te["id"], te["pid"]) for te in ready_tes(s)] == [(first["id"], first["pid"])]
        assert s.get("/admin/cluster")["groups"]["colocated"]["target"] == 1

        assert s.post("/admin/scale", {"group": "colocated", "instances": fits}) == (
            200, {"group": "colocated", "instances": fits})
        want = max(1, cores // fits)
        wait_until(lambda: len(tes := ready_tes(s)) == fits and all(te["threads"] == want for te in tes), 120)
        assert s.post("/admin/scale", {"group": "colocated", "instances": fits + 1})[0] == 409
        status, answer = s.post("/v1/chat/completions", CHAT)
        assert status == 200 and answer["choices"][0]["message"]["content"] == expected

        assert s.post("/admin/scale", {"group": "colocated", "instances": 1})[0] == 200
        wait_until(lambda: len(tes := ready_tes(s)) == 1 and tes[0]["threads"] == cores, 60)
        [host] = s.get("/admin/cluster")["hosts"]
        assert host["name"] == "local" and host["memory_gb"] == 5 and host["tes"] == [ready_tes(s)[0]["id"]]


async def test_a_step_longer_than_the_health_timeout_is_not_a_death():
    """Liveness does not wait for steps: with a 2 s health timeout, a prompt whose prefill
    takes one multi-second step (4,000 tokens in one chunk) is answered by the TE it started
    on, which its liveness thread kept alive meanwhile (`busy_s` says how long the step ran)."""
    with Server("--health-timeout-s", "2", "--max-num-batched-tokens", "4096", "--max-model-len", "4608",
                "--kv-cache-gb", "0.25") as s:
        [te] = ready_tes(s)
        prompt = "Count the apples: " + "apple " * 3990
        t0 = time.monotonic()
        status, body = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
        took = time.monotonic() - t0
        assert status == 200 and body["usage"]["prompt_tokens"] > 3990, body
        assert took > 3, f"the prefill took {took:.1f} s: too short to show anything"
        assert [t["pid"] for t in ready_tes(s)] == [te["pid"]]  # the same TE, never replaced


async def test_stopped_te_is_detected_and_replaced():
    """A TE that stops answering (SIGSTOP: as a deadlock or a wedged device would) is killed
    after the health bound: its stream ends with an error event and [DONE], a new TE takes
    its place, and the next request is served."""
    bound = 3
    with Server("--num-tes", "2", "--health-timeout-s", str(bound), "--policy", "load") as s:
        url = s.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as http:
            stream = await http.post(url, json={**CHAT, "max_tokens": 900, "ignore_eos": True, "stream": True})
            await data_lines(stream, 3)
            busy = next(te for te in s.get("/admin/cluster")["tes"] if te["tasks"] == 1)
            os.kill(busy["pid"], signal.SIGSTOP)
            t0 = time.monotonic()
            rest = await data_lines(stream, timeout=bound + 10)
            assert time.monotonic() - t0 < bound + 2.5  # the bound plus one heartbeat, and slack
            assert rest[-1] == "[DONE]" and "error" in orjson.loads(rest[-2])
            stream.close()

            await async_wait_until(lambda: len(ready_tes(s)) == 2, 60)
            assert busy["pid"] not in {te["pid"] for te in ready_tes(s)}
            await async_wait_until(lambda: not pid_alive(busy["pid"]), 5)  # killed (and reaped by the template)
            for _ in range(2):  # both TEs serve
                async with http.post(url, json=CHAT) as r:
                    assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"]
