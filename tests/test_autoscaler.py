"""The autoscaler's decisions on plain numbers (a burst from zero, keep-alive and its
prediction, room, fair shares, PD groups, reasons), per-model SLOs from the --cluster file,
and against the real server: an empty cluster serves its first request, a group scales to
zero after its keep-alive and back on demand, PD groups grow under load."""
import asyncio
import time
import urllib.request

import aiohttp
import pytest

from scaling.autoscaler import Board, ScalePolicy, ScaleState, Signals, decide, decide_queue, fair_share
from tests.server_util import Server, wait_until


def sig(now: float, size: int = 0, **kw) -> Signals:
    base = dict(ready=size, starting=0, arrivals=0, held=0, running=0, waiting=0, slots=4, room=100)
    return Signals(now, size, **{**base, **kw})


def test_burst_from_zero_starts_what_it_needs_in_one_decision():
    p, st = ScalePolicy(min_tes=0, max_tes=None, kind="capacity"), ScaleState()
    d = decide(p, st, sig(0.0, arrivals=32, held=32, share=2))
    # 32 tasks on 4 slots per TE: 8 TEs at once, a slot for every held task; the arrivals
    # expected while they start would only add compute, past the 2 cores' share
    assert (d.size, d.reason) == (8, "burst"), d
    assert d.inputs["held"] == 32 and d.inputs["demand_peak"] == 32 and d.inputs["share"] == 2
    # the kpa policy sizes for 70% of the slots and the expected arrivals: more
    assert decide(ScalePolicy(0, None, kind="kpa"), ScaleState(), sig(0.0, arrivals=32, held=32)).size >= 12
    # the queue-depth baseline starts one
    assert decide_queue(p, ScaleState(), sig(0.0, arrivals=32, held=32)).size == 1


def test_expected_arrivals_get_compute_only_within_the_share():
    p = ScalePolicy(min_tes=0, max_tes=None, kind="capacity")
    # 3 running on a 4-slot TE, 8 req/s arriving: a TE more for what comes while it starts...
    assert decide(p, ScaleState(rate=8.0), sig(0.0, size=1, running=3, arrivals=2, share=2)).size == 2
    # ...unless the group's share of the cores is one TE
    assert decide(p, ScaleState(rate=8.0), sig(0.0, size=1, running=3, arrivals=2, share=1)).size == 1


def test_never_asks_beyond_room_nor_past_max():
    p = ScalePolicy(min_tes=0, max_tes=None, kind="capacity")
    d = decide(p, ScaleState(), sig(0.0, arrivals=32, held=32, room=3, share=2))
    assert d.size == 3 and d.reason == "burst+room" and d.want == 8, d
    # full and above what fits already: the target is left alone, no retry of a start that cannot fit
    assert decide(p, ScaleState(), sig(0.0, size=5, ready=3, held=40, room=0)).size == 5
    assert decide(ScalePolicy(min_tes=0, max_tes=2, kind="capacity"), ScaleState(), sig(0.0, held=32)).size == 2
    assert decide_queue(p, ScaleState(), sig(0.0, size=2, ready=2, held=9, room=0)).size == 2


@pytest.mark.parametrize("kind", ["capacity", "kpa"])
def test_keep_alive_then_zero_and_back_on_demand(kind):
    p, st = ScalePolicy(min_tes=0, max_tes=None, idle_s=5.0, kind=kind), ScaleState()
    size, sizes = decide(p, st, sig(0.0, size=2, running=3)).size, []
    for t in (1.0, 3.0, 4.9):  # no work, within the keep-alive: one TE stays
        size = decide(p, st, sig(t, size=size)).size
        sizes.append(size)
    assert sizes[-1] == 1 and min(sizes) == 1, sizes
    d = decide(p, st, sig(12.0, size=1))
    assert (d.size, d.reason) == (0, "keep_alive"), d  # one request in 12 s: p_next over 5 s is low
    d = decide(p, st, sig(13.0, size=0, arrivals=1, held=1))
    assert (d.size, d.reason) == (1, "burst"), d


def test_a_model_likely_to_be_needed_keeps_a_te_past_the_keep_alive():
    """Past the keep-alive a popular model (its long-run rate makes an arrival within the next
    keep-alive likely) keeps one TE, a rare one goes to zero; both decisions say why."""
    p = ScalePolicy(min_tes=0, max_tes=None, kind="capacity", idle_s=5.0)
    hot, rare = ScaleState(rate_long=1.0), ScaleState(rate_long=0.05)
    for st in (hot, rare):
        decide(p, st, sig(0.0, size=1, running=1))
    h, r = decide(p, hot, sig(6.0, size=1)), decide(p, rare, sig(6.0, size=1))
    assert (h.size, h.reason, r.size, r.reason) == (1, "predicted", 0, "keep_alive"), (h, r)
    assert h.inputs["p_next"] > 0.5 > r.inputs["p_next"]
    later = decide(p, hot, sig(300.0, size=1))  # its rate decays without arrivals: zero in the end
    assert (later.size, later.reason) == (0, "keep_alive"), later


def test_stable_load_sizes_and_shrinks_after_the_panic():
    p, st = ScalePolicy(min_tes=1, max_tes=None, kind="capacity", stable_s=4.0, panic_s=1.0), ScaleState()
    assert decide(p, st, sig(0.0, size=1, running=20, arrivals=20)).size >= 5
    for t in range(1, 12):  # load falls to 8 running tasks: two TEs' worth once the stable window passes
        d = decide(p, st, sig(float(t), size=8, running=8))
    assert d.size == 2 and d.reason == "load", d


def test_ttft_slo_misses_add_a_te_while_work_waits_within_the_share():
    p = ScalePolicy(min_tes=1, max_tes=None, kind="capacity", slo_ttft_s=1.0, panic_ratio=10)
    d = decide(p, ScaleState(), sig(0.0, size=2, running=8, waiting=2, ttft_met=0.5, share=4))
    assert (d.size, d.reason) == (3, "slo_ttft"), d
    assert decide(p, ScaleState(), sig(0.0, size=2, running=8, waiting=2, ttft_met=1.0, share=4)).size == 2
    # the group holds its share of the cores already: another TE would split the same cores
    assert decide(p, ScaleState(), sig(0.0, size=2, running=8, waiting=2, ttft_met=0.5, share=2)).size == 2
    # kpa: a held task past half the TTFT SLO is a panic, whatever the mean says
    kpa = ScalePolicy(min_tes=1, max_tes=None, slo_ttft_s=1.0, panic_ratio=10, kind="kpa", target_util=1.0)
    slow, fresh = (decide(kpa, ScaleState(), sig(0.0, size=2, running=8, held=4, oldest_wait_s=w)) for w in (0.6, 0.1))
    assert (slow.size, slow.reason, fresh.reason) == (3, "burst", "load"), (slow, fresh)


def test_a_backlog_is_not_a_burst_and_load_waits_a_window_to_shrink():
    """capacity: tasks piling up at a steady arrival rate (cores saturated) keep the group at
    its share of the cores; a TE's worth of arrivals within the panic window is a burst, which
    gets slots for all and holds them a stable window; then the window's peak."""
    p = ScalePolicy(min_tes=0, max_tes=None, kind="capacity", stable_s=4.0)
    backlog, burst = ScaleState(), ScaleState()
    b = decide(p, backlog, sig(0.0, size=2, running=16, held=12, arrivals=2, share=2))
    u = decide(p, burst, sig(0.0, size=2, running=16, held=12, arrivals=12, share=2))
    assert (b.size, b.reason, u.size, u.reason) == (2, "load", 7, "burst"), (b, u)
    sizes = [decide(p, burst, sig(t, size=7, running=12, share=2)).size for t in (1.0, 2.0, 3.0, 4.5, 9.0)]
    assert sizes == [7, 7, 7, 3, 3], sizes  # then what 12 tasks need: the share of 2 caps growth, not this


def test_fair_share_of_the_cores():
    assert fair_share({"a": 5, "b": 1, "c": 3}, 6) == {"a": 3, "b": 1, "c": 2}  # b leaves its part to a and c
    assert fair_share({"a": 5, "b": 5, "c": 5}, 2) == {"a": 1, "b": 1, "c": 1}  # every group with work gets one
    assert fair_share({"a": 0, "b": 9}, 4) == {"a": 0, "b": 4}
    board = Board(wants={("m", "colocated"): 6, ("tiny", "colocated"): 1})
    assert board.share(("m", "colocated"), 4) == 3 and board.share(("tiny", "colocated"), 4) == 2


def test_a_group_gives_a_te_back_to_a_starving_model():
    p = ScalePolicy(min_tes=0, max_tes=None, kind="capacity")
    d = decide(p, ScaleState(), sig(0.0, size=3, running=12, room=0, peer_starved=True))
    assert (d.size, d.reason, d.want) == (2, "fair", 3), d
    # not again while that TE drains, nor below one TE
    assert decide(p, ScaleState(), sig(0.0, size=2, running=12, retiring=1, peer_starved=True)).size >= 2
    assert decide(p, ScaleState(), sig(0.0, size=1, running=4, peer_starved=True)).size == 1


def test_pd_groups_each_follow_their_load():
    """Prefill and decode decide apart: long prompts with short answers grow prefill, the
    decode group keeps what its running tasks need."""
    p = ScalePolicy(min_tes=1, max_tes=None, kind="capacity")
    prefill = decide(p, ScaleState(), sig(0.0, size=1, arrivals=24, held=24, running=4))
    decode = decide(p, ScaleState(), sig(0.0, size=1, running=4))
    assert prefill.size > decode.size >= 1 and prefill.reason.startswith("burst"), (prefill, decode)


def test_per_model_slos_from_the_cluster_file(tmp_path):
    import deepflow
    from tests.test_config import configs
    toml = tmp_path / "c.toml"
    toml.write_text("[model.tiny]\nslo_ttft_ms = 250\n[model.tiny.colocated]\nkv_cache_gb = 0.05\n")
    cfg, engine = configs("--cluster", str(toml), "--slo-ttft-ms", "2000", "--slo-tpot-ms", "100")
    assert deepflow.model_slos(cfg, "tiny") == {"slo_ttft_s": 0.25, "slo_tpot_s": 0.1}
    assert deepflow.model_slos(cfg, "smol") == {"slo_ttft_s": 2.0, "slo_tpot_s": 0.1}
    assert deepflow.cluster_shape(cfg, engine, "tiny")["colocated"][1].kv_cache_gb == 0.05
    policies = deepflow.scale_policies(cfg, deepflow.cluster_shape(cfg, engine, "tiny"),
                                       deepflow.model_slos(cfg, "tiny"), first=False)
    assert policies["colocated"].slo_ttft_s == 0.25 and policies["colocated"].kind == "queue"
    toml.write_text("[model.tiny]\nslo_ttft_ms = -1\n")
    with pytest.raises(SystemExit, match="slo_ttft_ms"):
        deepflow.model_slos(configs("--cluster", str(toml))[0], "tiny")


async def completions(url: str, n: int, max_tokens: int = 8) -> list[int]:
    async with aiohttp.ClientSession() as http:
        async def one(i):
            body = {"prompt": f"Request {i}: once upon a time", "max_tokens": max_tokens, "temperature": 0}
            async with http.post(url + "/v1/completions", json=body) as r:
                return r.status
        return await asyncio.gather(*(one(i) for i in range(n)))


async def test_empty_cluster_serves_then_scales_to_zero_and_back():
    with Server("--autoscaler", "capacity", "--num-tes", "0", "--min-tes", "0", "--scale-in-idle-s", "2",
                "--max-num-seqs", "4", "--max-model-len", "512", "--kv-cache-gb", "0.05") as s:
        assert s.get("/admin/cluster")["tes"] == []
        assert await completions(s.url, 1) == [200]  # the first request starts the first TE
        wait_until(lambda: not s.get("/admin/cluster")["tes"], 30)  # keep-alive over: zero
        t0 = time.monotonic()
        assert await completions(s.url, 12) == [200] * 12
        cluster = s.get("/admin/cluster")
        outs = [d for d in cluster["scaling_decisions"] if d["to"] > d["from"] and d["t"] > time.time()
                - (time.monotonic() - t0) - 1]
        # 12 requests on 4 slots per TE: several TEs asked for within one tick of the first decision (the
        # first request may wake the autoscaler before the others arrive), not one TE per tick
        first_tick = [d for d in outs if d["t"] - outs[0]["t"] < 0.25]
        assert outs and outs[0]["from"] == 0 and max(d["to"] for d in first_tick) >= 3, outs
        assert all(d["reason"].startswith("burst") for d in first_tick), outs
        assert {"held", "rate", "room", "share", "p_next"} <= set(outs[0]["inputs"])
        assert cluster["autoscaler"]["colocated"]["policy"] == "capacity"
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(s.url + "/metrics").read().decode())
        assert 'deepflow:scaling_decisions_total{group="colocated"' in metrics and "keep_alive" in metrics
        assert "deepflow:ttft_slo_attainment" in metrics


async def test_prefill_and_decode_groups_scale_under_pd_load():
    with Server("--autoscaler", "capacity", "--prefill-tes", "1", "--decode-tes", "1", "--max-num-seqs", "2", "--max-model-len", "512",
                "--kv-cache-gb", "0.05", "--scale-in-idle-s", "2") as s:
        assert await completions(s.url, 8, max_tokens=16) == [200] * 8
        grown = {g: max([d["to"] for d in s.get("/admin/cluster")["scaling_decisions"] if d["group"] == g] or [1])
                 for g in ("prefill", "decode")}
        assert grown["prefill"] >= 2 and grown["decode"] >= 2, grown  # 8 tasks on 2 slots per TE
        wait_until(lambda: s.get("/admin/cluster")["groups"]["decode"]["target"] == 1, 30)  # back to one each
        assert s.get("/admin/cluster")["groups"]["prefill"]["target"] == 1


def test_the_template_least_likely_to_be_needed_leaves_first():
    """Two idle models' templates, 6 bytes each, on a 20-byte machine: a TE of 4 for the third
    evicts the one with the lower predicted arrival rate, though it was used more recently,
    and says which left."""
    from scaling.hosts import Host

    class Node:
        evicted = 0

        def evict(self):
            self.evicted += 1

    machine: list[Host] = []
    a, rare, hot = (Host(n, "127.0.0.1", 2, 20, Node(), machine=machine, weights_bytes=6, last_used=t, demand=r,
                         model=n) for n, t, r in (("a", 3.0, 0.0), ("rare", 2.0, 0.01), ("hot", 1.0, 0.5)))
    assert a.make_room(4) == [rare] and not rare.weights_resident and hot.weights_resident


def test_pre_warmed_tes_follow_the_predicted_need_within_room():
    """A host keeps its pool's floor of pre-warmed TEs while the model is unlikely to need a new
    TE within a start, as many as its groups' chances add up to when it is likely, never more
    than fit, and each change is a decision with its inputs."""
    from flowserve.config import EngineConfig
    from scaling.autoscaler import p_next
    from scaling.hosts import Host
    from scaling.prewarm import PrewarmPool
    from scheduler.cluster import Cluster

    assert p_next(2.0, 0.5) == pytest.approx(1 - 2.718281828 ** -1) and p_next(2.0, 0.5, free=8) < 1e-5

    class Node:
        pool = PrewarmPool(1, EngineConfig(), template=lambda: None)  # its template is down: none starts

    cluster = Cluster("/nonexistent.gguf", {"colocated": (0, EngineConfig())})
    cost = max(map(cluster.te_cost, ("colocated", "prefill", "decode")))
    cluster.hosts.append(Host("h", "127.0.0.1", 2, 2 * cost, Node()))  # two TEs fit
    pool = Node.pool
    cluster.note_autoscaler("colocated", {"need_p": 0.05}, 0.0)
    assert pool.size == 1 and not cluster.decisions  # the floor
    cluster.note_autoscaler("colocated", {"need_p": 0.9}, 1.0)
    cluster.note_autoscaler("prefill", {"need_p": 0.6}, None)
    assert pool.size == 2 and cluster.decisions[-1]["reason"] == "predicted"
    assert cluster.decisions[-1]["group"] == "prewarm" and cluster.decisions[-1]["inputs"]["expected"] == 1.5
    cluster.note_autoscaler("decode", {"need_p": 1.0}, None)
    assert pool.size == 2  # 2.5 expected, 2 fit
    for g in ("colocated", "prefill", "decode"):
        cluster.note_autoscaler(g, {"need_p": 0.0}, 0.0)
    assert pool.size == 1 and cluster.decisions[-1]["to"] == 1
