"""The autoscaler's decisions on plain numbers (a burst from zero, keep-alive, room, PD
groups, reasons), and against the real server: an empty cluster serves its first request,
and a group scales to zero after its keep-alive and back on demand."""
import asyncio
import time

import aiohttp

from scaling.autoscaler import ScalePolicy, ScaleState, Signals, decide, decide_queue
from tests.server_util import Server, wait_until


def sig(now: float, size: int = 0, **kw) -> Signals:
    base = dict(ready=size, starting=0, arrivals=0, held=0, running=0, waiting=0, slots=4, room=100)
    return Signals(now, size, **{**base, **kw})


def test_burst_from_zero_starts_what_it_needs_in_one_decision():
    p, st = ScalePolicy(min_tes=0, max_tes=None), ScaleState()
    d = decide(p, st, sig(0.0, arrivals=32, held=32))
    # 32 tasks at 70% of 4 slots per TE: 12 TEs now (plus the arrivals expected while they start)
    assert d.size >= 12 and d.reason == "burst", d
    assert d.inputs["held"] == 32 and d.inputs["demand_peak"] >= 32
    # the queue-depth baseline starts one
    assert decide_queue(p, ScaleState(), sig(0.0, arrivals=32, held=32)).size == 1


def test_never_asks_beyond_room_nor_past_max():
    p = ScalePolicy(min_tes=0, max_tes=None)
    d = decide(p, ScaleState(), sig(0.0, arrivals=32, held=32, room=3))
    assert d.size == 3 and d.reason == "burst+room", d
    # full and above what fits already: the target is left alone, no retry of a start that cannot fit
    assert decide(p, ScaleState(), sig(0.0, size=5, ready=3, held=40, room=0)).size == 5
    assert decide(ScalePolicy(min_tes=0, max_tes=2), ScaleState(), sig(0.0, held=32)).size == 2


def test_keep_alive_then_zero_and_back_on_demand():
    p, st = ScalePolicy(min_tes=0, max_tes=None, idle_s=5.0), ScaleState()
    size, sizes = decide(p, st, sig(0.0, size=2, running=3)).size, []
    for t in (1.0, 3.0, 4.9):  # no work, within the keep-alive: one TE stays
        size = decide(p, st, sig(t, size=size)).size
        sizes.append(size)
    assert sizes[-1] == 1 and min(sizes) == 1, sizes
    d = decide(p, st, sig(12.0, size=1))
    assert (d.size, d.reason) == (0, "keep_alive"), d
    d = decide(p, st, sig(13.0, size=0, arrivals=1, held=1))
    assert (d.size, d.reason) == (1, "burst"), d


def test_stable_load_sizes_and_shrinks_after_the_panic():
    p, st = ScalePolicy(min_tes=1, max_tes=None, stable_s=4.0, panic_s=1.0), ScaleState()
    assert decide(p, st, sig(0.0, size=1, running=20, arrivals=20)).size >= 8
    for t in range(1, 12):  # load falls to 4 running tasks: two TEs' worth once the stable window passes
        d = decide(p, st, sig(float(t), size=8, running=4))
    assert d.size == 2 and d.reason == "load", d


def test_ttft_slo_misses_add_a_te_while_work_waits():
    p = ScalePolicy(min_tes=1, max_tes=None, slo_ttft_s=1.0, target_util=1.0, panic_ratio=10)
    st = ScaleState()
    d = decide(p, st, sig(0.0, size=2, running=8, waiting=2, ttft_met=0.5))
    assert (d.size, d.reason) == (3, "slo_ttft"), d
    d = decide(p, ScaleState(), sig(0.0, size=2, running=8, waiting=2, ttft_met=1.0))
    assert d.size == 2, d
    # a held task past half the TTFT SLO is a panic, whatever the mean says
    slow, fresh = (decide(p, ScaleState(), sig(0.0, size=2, running=8, held=4, oldest_wait_s=w)) for w in (0.6, 0.1))
    assert (slow.size, slow.reason, fresh.reason) == (3, "burst", "load"), (slow, fresh)


def test_pd_groups_each_follow_their_load():
    """Prefill and decode decide apart: long prompts with short answers grow prefill, the
    decode group keeps what its running tasks need."""
    p = ScalePolicy(min_tes=1, max_tes=None)
    prefill = decide(p, ScaleState(), sig(0.0, size=1, arrivals=24, held=24, running=4))
    decode = decide(p, ScaleState(), sig(0.0, size=1, running=4))
    assert prefill.size > decode.size >= 1 and prefill.reason == "burst", (prefill, decode)


async def test_empty_cluster_serves_then_scales_to_zero_and_back():
    with Server("--autoscaler", "slo", "--num-tes", "0", "--min-tes", "0", "--scale-in-idle-s", "2", "--max-num-seqs", "4",
                "--max-model-len", "512", "--kv-cache-gb", "0.05") as s:
        assert s.get("/admin/cluster")["tes"] == []

        async def burst(n: int) -> list[int]:
            async with aiohttp.ClientSession() as http:
                async def one(i):
                    body = {"prompt": f"Request {i}: once upon a time", "max_tokens": 8, "temperature": 0}
                    async with http.post(s.url + "/v1/completions", json=body) as r:
                        return r.status
                return await asyncio.gather(*(one(i) for i in range(n)))

        assert await burst(1) == [200]  # the first request starts the first TE
        wait_until(lambda: not s.get("/admin/cluster")["tes"], 30)  # keep-alive over: zero
        t0 = time.monotonic()
        assert await burst(12) == [200] * 12
        cluster = s.get("/admin/cluster")
        outs = [d for d in cluster["scaling_decisions"] if d["to"] > d["from"] and d["t"] > time.time()
                - (time.monotonic() - t0) - 1]
        # 12 requests on 4 slots per TE: several TEs asked for within one tick of the first decision (the
        # first request may wake the autoscaler before the others arrive), not one TE per tick
        first_tick = [d for d in outs if d["t"] - outs[0]["t"] < 0.25]
        assert outs and outs[0]["from"] == 0 and max(d["to"] for d in first_tick) >= 3, outs
        assert all(d["reason"].startswith("burst") for d in first_tick), outs
        assert {"held", "rate", "room"} <= set(outs[0]["inputs"])
        metrics = (await asyncio.to_thread(lambda: __import__("urllib.request").request.urlopen(
            s.url + "/metrics").read().decode()))
        assert 'deepflow:scaling_decisions_total{group="colocated"' in metrics and "keep_alive" in metrics
        assert "deepflow:ttft_slo_attainment" in metrics
