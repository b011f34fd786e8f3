"""DeepFlow across hosts (`--backend ray`), each host a network namespace with its own address
(tests/netns_cluster.py), so anything that binds or advertises loopback fails here. The main
process runs on host 0, the Ray head's; a node agent per host starts its TEs.

Without namespaces (not root, no iproute2) those tests skip with the reason; the variant on
`ray.cluster_utils.Cluster` (every node on one address) runs anyway.
"""
import asyncio
import os
import signal
import time
from collections import Counter

import aiohttp
import orjson
import pytest

from flowserve.config import cache_dir
from tests.conftest import PROMPT
from tests.netns_cluster import NetnsCluster, _alive, can_create_namespaces
from tests.server_util import Server, data_lines, running, wait_until

COMMON = ("--backend", "ray", "--kv-cache-gb", "0.1", "--max-model-len", "512", "--health-timeout-s", "3")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Three hosts; Ray runs on the first two, the third joins when a test says so. Host 2's
    DRAM cache is empty: it must get the weights from running TEs."""
    if reason := can_create_namespaces():
        pytest.skip(f"cannot create network namespaces: {reason}")
    warm, fresh = str(cache_dir()), str(tmp_path_factory.mktemp("fresh-host-cache"))
    env = {i: {"DEEPFLOW_CACHE": cache, "DEEPFLOW_HOST_MEMORY_GB": "3"} for i, cache in enumerate([warm, warm, fresh])}
    cluster = NetnsCluster(3, prefix="dft", subnet="10.78.0", env_per_host=env, gcs_port=6390)
    try:
        cluster.up(started=2)
        yield cluster
    finally:
        cluster.down()


def serve_on(hosts: NetnsCluster, *args: str) -> Server:
    return Server(*COMMON, "--ray-address", hosts.head_address, *args, env=hosts.driver_env(), host=hosts.hosts[0],
                  prefix=("ip", "netns", "exec", hosts.namespace(0)))


def ready(s: Server) -> list[dict]:
    return [te for te in s.get("/admin/cluster")["tes"] if te["state"] == "ready"]


async def stream(http: aiohttp.ClientSession, s: Server) -> aiohttp.ClientResponse:
    body = {"prompt": "Count to 1000:", "max_tokens": 200, "ignore_eos": True, "temperature": 0, "stream": True}
    r = await http.post(s.url + "/v1/completions", json=body)
    await data_lines(r, 2)
    return r


async def test_colocated_over_hosts_agent_loss_and_a_fresh_host(hosts, engine_greedy_reference):
    with serve_on(hosts, "--num-tes", "2", "--policy", "rr") as s:
        cluster = s.get("/admin/cluster")
        assert {h["address"] for h in cluster["hosts"]} == set(hosts.hosts[:2])
        assert {te["host"] for te in cluster["tes"]} == set(hosts.hosts[:2])  # one TE per host
        for _ in range(2):  # round-robin: one on each host, the same greedy text
            assert s.post("/v1/completions", PROMPT)[1]["choices"][0]["text"] == engine_greedy_reference
        served = {t["te"] for job in s.get("/admin/cluster")["recent_jobs"][:2] for t in job["tasks"]}
        assert served == {te["id"] for te in cluster["tes"]}

        # The node agent of host 1 dies (SIGKILL) mid-stream: its stream ends with an error
        # event and [DONE] at once, the other host's stream finishes, the group refills on host 0.
        async with aiohttp.ClientSession() as http:
            streams = [await stream(http, s), await stream(http, s)]
            by_host = {te["host"]: te for te in ready(s)}
            assert all(te["tasks"] == 1 for te in by_host.values())  # one stream on each host
            lost = next(h for h in s.get("/admin/cluster")["hosts"] if h["address"] == hosts.hosts[1])
            os.kill(lost["agent_pid"], signal.SIGKILL)
            ends = await asyncio.gather(*(data_lines(r, timeout=60) for r in streams))
            last = [orjson.loads(e[-2]) for e in ends]
            assert all(e[-1] == "[DONE]" for e in ends)
            assert sorted("error" if "error" in c else c["choices"][0]["finish_reason"] for c in last) == \
                ["error", "length"]
        wait_until(lambda: len(ready(s)) == 2 and by_host[hosts.hosts[1]]["id"] not in {te["id"] for te in ready(s)},
                   60)

        # A fresh host joins: its template gets the weights from a running TE, not a model file.
        hosts.join(2)
        wait_until(lambda: any(h["address"] == hosts.hosts[2] for h in s.get("/admin/cluster")["hosts"]), 60)
        fresh = next(h for h in s.get("/admin/cluster")["hosts"] if h["address"] == hosts.hosts[2])
        assert fresh["weights_from"].startswith(hosts.hosts[0] + ":")

        # From zero to four TEs over the three hosts (host 1 back with a new agent); all give
        # the reference text.
        wait_until(lambda: len(s.get("/admin/cluster")["hosts"]) == 3, 30)
        assert s.post("/admin/scale", {"group": "colocated", "instances": 0})[0] == 200
        wait_until(lambda: not s.get("/admin/cluster")["tes"], 30)
        assert s.post("/admin/scale", {"group": "colocated", "instances": 4})[0] == 200
        wait_until(lambda: len(ready(s)) == 4, 60)
        assert sorted(Counter(te["host"] for te in ready(s)).values()) == [1, 1, 2]
        for _ in range(4):
            assert s.post("/v1/completions", PROMPT)[1]["choices"][0]["text"] == engine_greedy_reference


def test_a_host_cut_off_or_whose_agent_died_comes_back(hosts, engine_greedy_reference):
    """A host's cable is pulled for 15 s, later its node agent is killed: each time it is a host
    again within 10 s (of the cable plugged back, of the kill), with no manual step; the TE
    it had is killed first, and a new TE goes there."""
    with serve_on(hosts, "--num-tes", "2") as s:
        # a TE off the head host (where the two TEs go depends on which hosts joined first)
        victim, stale = next((te["host"], te["pid"]) for te in ready(s) if te["host"] != hosts.hosts[0])
        i = hosts.hosts.index(victim)

        def host() -> dict | None:
            return next((h for h in s.get("/admin/cluster")["hosts"] if h["address"] == victim), None)

        before = host()
        hosts.set_link(i, up=False)
        try:
            cut = time.monotonic()
            wait_until(lambda: host() is None, 10)  # lost past the health bound (3 s)
            wait_until(lambda: len(ready(s)) == 2, 30)  # refilled elsewhere
            time.sleep(max(0.0, cut + 15 - time.monotonic()))
        finally:
            hosts.set_link(i, up=True)
        healed = time.monotonic()
        wait_until(lambda: host() is not None, 10)
        print(f"host again {time.monotonic() - healed:.1f} s after its link came back")
        assert host()["agent_pid"] != before["agent_pid"]
        wait_until(lambda: not _alive(stale), 5)

        assert s.post("/admin/scale", {"group": "colocated", "instances": 3})[0] == 200
        wait_until(lambda: len(ready(s)) == 3, 60)
        assert [te["host"] for te in ready(s)].count(victim) == 1  # the host with the fewest TEs
        for _ in range(3):
            assert s.post("/v1/completions", PROMPT)[1]["choices"][0]["text"] == engine_greedy_reference

        others = [h["template_pid"] for h in s.get("/admin/cluster")["hosts"] if h["address"] != victim]
        agent = host()["agent_pid"]
        os.kill(agent, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: (h := host()) is not None and h["agent_pid"] != agent, 10)
        print(f"host again {time.monotonic() - killed:.1f} s after its agent was killed")
        assert all(_alive(pid) for pid in others)  # reaping kills only what the lost host ran
        wait_until(lambda: len(ready(s)) == 3, 60)


def test_pd_pair_across_hosts(hosts, engine_greedy_reference):
    """A prefill TE and a decode TE on different hosts: the KV crosses over TCP and the text is
    the colocated text. Every port DeepFlow opens is the one its flag pins."""
    with serve_on(hosts, "--num-tes", "0", "--prefill-tes", "1", "--decode-tes", "1", "--te-port", "7450",
                  "--distflow-ports", "7460-7461") as s:
        tes = {te["group"]: te for te in ready(s)}
        assert f"TEs connect to {hosts.hosts[0]}:7450" in s.output()
        ports = {int(a.rsplit(":", 1)[1]) for te in tes.values() for a in [te["weights_addr"], *te["kv_addrs"]]
                 if not a.startswith("unix:")}
        assert ports == {7460, 7461}  # prefill: weights; decode: weights and KV (on another host)
        assert tes["prefill"]["host"] != tes["decode"]["host"]
        assert s.post("/v1/completions", PROMPT)[1]["choices"][0]["text"] == engine_greedy_reference
        [task] = s.get("/admin/cluster")["recent_jobs"][0]["tasks"]
        placement = task["placement"]
        assert placement["host"] == tes["prefill"]["host"] and placement["decode"]["host"] == tes["decode"]["host"]
        assert placement["kv_transfer_ms"] > 0


async def test_ray_cluster_utils_nodes_on_one_address(monkeypatch, engine_greedy_reference):
    """Ray's own test cluster (no namespaces needed): two nodes, one TE on each, taken from
    each node agent's pool of pre-warmed TEs (`--start-mode preloaded`)."""
    from ray.cluster_utils import Cluster
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the same mode for the nodes and the server's driver
    ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray_cluster.add_node(num_cpus=1)
        with Server(*COMMON, "--ray-address", ray_cluster.address, "--num-tes", "2", "--policy", "rr",
                    "--start-mode", "preloaded") as s:
            names = [h["name"] for h in s.get("/admin/cluster")["hosts"]]
            assert len(set(names)) == 2 and {te["host"] for te in ready(s)} == set(names)
            assert all(te["start_mode"] == "preloaded" and not te["fresh_interpreter"] for te in ready(s))
            for _ in range(2):
                assert s.post("/v1/completions", PROMPT)[1]["choices"][0]["text"] == engine_greedy_reference
    finally:
        ray_cluster.shutdown()


def test_main_process_restart_readopts_every_hosts_tes(hosts, engine_greedy_reference, tmp_path):
    """SIGKILL of the main process: every host's node agent (a detached actor), template and
    TEs wait for the grace; a main process started again on the same state dir and TE port
    re-adopts them all: same agents, same TE pids, the same greedy text."""
    args = ("--num-tes", "2", "--policy", "rr", "--state-dir", str(tmp_path), "--te-port", "7451")
    first = serve_on(hosts, *args)
    try:
        before = {te["id"]: (te["host"], te["pid"]) for te in ready(first)}
        agents = {h["address"]: h["agent_pid"] for h in first.get("/admin/cluster")["hosts"]}
        assert len({host for host, _ in before.values()}) == 2
        os.kill(first.proc.pid, signal.SIGKILL)
    finally:
        first.stop()
    with serve_on(hosts, *args) as second:
        cluster = second.get("/admin/cluster")
        assert {te["id"]: (te["host"], te["pid"]) for te in ready(second)} == before
        assert all(te["adopted"] for te in cluster["tes"])
        assert {h["address"]: h["agent_pid"] for h in cluster["hosts"]} == agents
        for _ in range(2):  # round-robin: both adopted TEs
            assert second.post("/v1/completions", PROMPT)[1]["choices"][0]["text"] == engine_greedy_reference


def test_without_a_main_process_every_host_stops_after_the_grace(hosts, tmp_path):
    """No main process comes back: past the grace each node agent stops its template and TEs
    and exits; nothing is left on any host."""
    s = serve_on(hosts, "--num-tes", "2", "--policy", "rr", "--state-dir", str(tmp_path), "--adopt-grace-s", "3")
    try:
        cluster = s.get("/admin/cluster")
        pids = [te["pid"] for te in cluster["tes"]] + [p for h in cluster["hosts"]
                                                     for p in (h["agent_pid"], h["template_pid"])]
        os.kill(s.proc.pid, signal.SIGKILL)
    finally:
        s.stop()
    wait_until(lambda: not any(running(pid) for pid in pids), timeout=30)
