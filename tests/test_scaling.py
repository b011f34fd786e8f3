"""Fast scaling against the real server: TEs forked from the warm template answer exactly as
cold-started ones, a group at zero holds requests until a TE is ready, the autoscaler
follows a step in load out and back in, `/admin/scale` sets a size, and a dead template
is restarted while its TEs keep serving."""
import asyncio
import os
import signal

import aiohttp
import pytest

from tests.conftest import PROMPT
from tests.server_util import Server, wait_until

STEPS = ("scaler_pre", "te_pre_load", "te_load", "te_post_load", "scaler_post")


@pytest.mark.parametrize("mode", ["fork", "preloaded", "cold"])
def test_start_modes_give_reference_tokens_and_timeline(mode, engine_greedy_reference):
    with Server("--start-mode", mode, "--max-model-len", "512", "--kv-cache-gb", "0.1") as s:
        status, body = s.post("/v1/completions", PROMPT)
        assert status == 200 and body["choices"][0]["text"] == engine_greedy_reference
        cluster = s.get("/admin/cluster")
        assert cluster["start_mode"] == mode and (cluster["template_pid"] is not None) == (mode == "fork")
        te = cluster["tes"][0]
        assert te["start_mode"] == mode
        t = te["timeline_ms"]
        # Every step took time, and the five make up the whole start. The TE's own steps may
        # overlap Scaler-Pre, no more: a forked or pre-warmed TE's clock starts, and it may
        # load, before the launch's answer (the template's `Forked`) reaches the main process.
        assert all(t[k] > 0 for k in STEPS), t
        steps = sum(t[k] for k in STEPS)
        assert 0.95 * t["total"] <= steps <= t["total"] + t["scaler_pre"] + 0.1, t
        assert t["te_load"] > t["scaler_post"] and t["total"] < 60_000, t


async def test_scale_to_zero_holds_requests_then_scales_out_and_in():
    with Server("--min-tes", "0", "--max-tes", "3", "--scale-in-idle-s", "1", "--scale-out-waiting", "1",
                "--max-num-seqs", "2", "--max-model-len", "512", "--kv-cache-gb", "0.1") as s:
        wait_until(lambda: not s.get("/admin/cluster")["tes"], 30)  # idle: scaled to zero
        assert s.get("/health")["status"] == "ok"

        sizes = []

        async def watch():
            while True:
                sizes.append(len((await asyncio.to_thread(s.get, "/admin/cluster"))["tes"]))
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        async with aiohttp.ClientSession() as http:
            async def one(i):
                body = {"prompt": f"Request {i}: once upon a time", "max_tokens": 48, "temperature": 0,
                        "ignore_eos": True}
                async with http.post(s.url + "/v1/completions", json=body) as r:
                    return r.status, await r.json()
            results = await asyncio.gather(*(one(i) for i in range(12)))
        watcher.cancel()
        assert all(st == 200 and b["usage"]["completion_tokens"] == 48 for st, b in results), results
        assert max(sizes) > 1, sizes  # 12 requests on 2 slots per TE: the group grew
        jobs = s.get("/admin/cluster")["recent_jobs"]
        assert len({j["tasks"][0]["te"] for j in jobs[:12]}) > 1
        wait_until(lambda: not s.get("/admin/cluster")["tes"], 60)  # and went back to zero


def test_admin_scale_and_template_restart():
    with Server("--max-model-len", "512", "--kv-cache-gb", "0.05") as s:
        assert s.post("/admin/scale", {"group": "colocated", "instances": 3}) == (
            200, {"group": "colocated", "instances": 3})
        wait_until(lambda: sum(te["state"] == "ready" for te in s.get("/admin/cluster")["tes"]) == 3)
        assert s.post("/admin/scale", {"group": "nope", "instances": 1})[0] == 400
        assert s.post("/admin/scale", {"instances": -1})[0] == 400
        assert s.post("/admin/scale", {"instances": 1}) == (200, {"group": "colocated", "instances": 1})
        wait_until(lambda: len(s.get("/admin/cluster")["tes"]) == 1)

        before = s.get("/admin/cluster")
        os.kill(before["template_pid"], signal.SIGKILL)
        status, body = s.post("/v1/completions", PROMPT)  # the running TE is not the template's hostage
        assert status == 200 and body["usage"]["completion_tokens"] > 0
        wait_until(lambda: s.get("/admin/cluster")["template_pid"] not in (None, before["template_pid"]))
        assert s.get("/admin/cluster")["tes"][0]["pid"] == before["tes"][0]["pid"]
        assert s.post("/admin/scale", {"instances": 2})[0] == 200  # forks from the new template
        wait_until(lambda: sum(te["state"] == "ready" for te in s.get("/admin/cluster")["tes"]) == 2)
        assert all(te["start_mode"] == "fork" for te in s.get("/admin/cluster")["tes"])
        # and a standby forked from it (scaling/prewarm.py) waits for the next start
        wait_until(lambda: s.get("/admin/cluster")["prewarmed_ready"] == 1, 30)


def test_peer_start_streams_weights_from_a_running_te(engine_greedy_reference):
    """DistFlow's weights path: a pre-warmed TE gets its weights from the running TE over TCP."""
    with Server("--start-mode", "peer", "--max-model-len", "512", "--kv-cache-gb", "0.05") as s:
        first = s.get("/admin/cluster")["tes"][0]
        assert first["start_mode"] == "preloaded"  # nobody to stream from yet
        wait_until(lambda: s.get("/admin/cluster")["prewarmed_ready"] == 1)  # the pool refilled
        assert s.post("/admin/scale", {"instances": 2})[0] == 200
        wait_until(lambda: sum(te["state"] == "ready" for te in s.get("/admin/cluster")["tes"]) == 2)
        assert s.post("/admin/scale", {"instances": 1})[0] == 200  # retires the older, idle TE
        wait_until(lambda: [te["id"] for te in s.get("/admin/cluster")["tes"]] != [first["id"]]
                   and len(s.get("/admin/cluster")["tes"]) == 1)
        te = s.get("/admin/cluster")["tes"][0]
        assert te["start_mode"] == "peer"
        status, body = s.post("/v1/completions", PROMPT)
        assert status == 200 and body["choices"][0]["text"] == engine_greedy_reference
