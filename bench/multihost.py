"""Multi-host benchmark (`--backend ray`): what a TE on another host costs, against one on the
main process's host, in one run, ratios measured side by side (the machine is shared and noisy).

Hosts are network namespaces of this machine (tests/netns_cluster.py: each its own address,
its own Ray node); the server runs inside host 0, as in tests/test_multihost.py. One server
serves all three parts:

1. remote vs local TE: hosts 0 and 1 (warm DRAM cache), `--num-tes 2 --policy rr`, so one TE
   on each host. Sequential streaming completions (a ~100-token prompt made unique per request
   so no prefix is cached, 64 tokens, greedy, ignore_eos) alternate between them; the TE that
   served each comes from /admin/cluster. TTFT = time to the first content chunk; TPOT =
   (last chunk - first chunk) / (tokens - 1). Medians per TE, and remote / local.
2. N TEs made ready on a fresh host (its DEEPFLOW_CACHE an empty temp dir: no weights in its
   DRAM), from `hosts.join(i)` to N TEs ready there, when its template gets the weights
   (b) from the model file (no TE runs when it joins: `weights_from` = "cache"; converts the
   GGUF, which this machine's page cache already holds: a best case for a real fresh host), or
   (a) broadcast over TCP from a running TE (every TE is a weights donor with Ray). Hosts 0 and
   1 fit one TE each (DEEPFLOW_HOST_MEMORY_GB), so the TEs of a scale-out go to the fresh host
   (placement takes the host with the fewest TEs, then the most free memory). The template
   phase (its process start, from /proc, to ready) excludes the server's 3-s node poll.
3. Ray's own footprint per host, idle, with the server, agents, templates and TEs up: PSS
   (/proc/PID/smaps_rollup) and CPU % of one core over 10 s of Ray's processes (raylet,
   gcs_server, agents, log_monitor, workers such as ray::NodeAgent), our own excluded.

    python bench/multihost.py        # root (ip netns); a few minutes; writes bench/results/multihost.json
"""
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DEEPFLOW_CACHE", str(ROOT / ".venv" / "deepflow-cache"))  # the warm cache
from flowserve.config import EngineConfig, default_model_path  # noqa: E402
from scheduler.cluster import weights_estimate  # noqa: E402
from scaling.hosts import GiB, te_bytes  # noqa: E402
from tests.netns_cluster import NetnsCluster, can_create_namespaces  # noqa: E402
from tests.server_util import Server, wait_until  # noqa: E402

KV_GB, N_FRESH, REQUESTS, WARMUPS = 0.2, 4, 20, 2
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
        "quickly and cheaply. Within decades, printing shops spread across Europe, and the number of books in "
        "circulation grew from thousands to millions. Pamphlets, newspapers and scientific journals followed, "
        "literacy rose, and ideas could travel faster than ever. Write a short essay about its consequences "
        "for religion, science and politics:")
OURS = ("scaling.template", "flowserve.te_shell", "deepflow.py")   # not Ray's: templates, TEs, server
TICK = os.sysconf("SC_CLK_TCK")


def cluster(s: Server) -> dict:
    return s.get("/admin/cluster")


def stream(s: Server, i: int) -> dict:
    """One streaming completion; its TTFT, TPOT and the TE that served it."""
    body = {"prompt": f"Request {i}. {TEXT}", "max_tokens": 64, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(s.url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    first = last = usage = None
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
    te = cluster(s)["recent_jobs"][0]["tasks"][0]["te"]  # sequential: the latest job is this one
    return {"te": te, "ttft_ms": 1e3 * (first - t0), "tpot_ms": 1e3 * (last - first) / (usage["completion_tokens"] - 1),
            "prompt_tokens": usage["prompt_tokens"]}


def remote_vs_local(s: Server, hosts: NetnsCluster) -> dict:
    tes = {te["id"]: te for te in cluster(s)["tes"]}
    where = {te["host"]: te["id"] for te in tes.values()}
    assert set(where) == set(hosts.hosts[:2]), f"expected a TE on each of hosts 0 and 1: {where}"
    runs = [stream(s, i) for i in range(2 * (WARMUPS + REQUESTS))][2 * WARMUPS:]
    out = {}
    for name, host in (("local", hosts.hosts[0]), ("remote", hosts.hosts[1])):
        mine = [r for r in runs if r["te"] == where[host]]
        out[name] = {"host": host, "te": where[host], "threads": tes[where[host]]["threads"], "n": len(mine),
                     "ttft_ms": statistics.median(r["ttft_ms"] for r in mine),
                     "tpot_ms": statistics.median(r["tpot_ms"] for r in mine),
                     "tpot_ms_min_max": [min(r["tpot_ms"] for r in mine), max(r["tpot_ms"] for r in mine)]}
    out["ratio"] = {k: out["remote"][k] / out["local"][k] for k in ("ttft_ms", "tpot_ms")}
    out["prompt_tokens"] = runs[0]["prompt_tokens"]
    out["runs"] = runs
    return out


def boot_s(pid: int) -> float:
    """When a process started, in CLOCK_BOOTTIME seconds (10 ms resolution)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) / TICK


def fresh_host(s: Server, hosts: NetnsCluster, i: int, instances: int) -> dict:
    """Host i joins; POST /admin/scale to `instances` once its template is ready; until N_FRESH
    TEs are ready on it. Times on CLOCK_BOOTTIME, the clock of /proc/PID/stat's start time."""
    addr = hosts.hosts[i]

    def now() -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def entry() -> dict | None:
        return next((h for h in cluster(s)["hosts"] if h["address"] == addr), None)

    def ready() -> list[dict]:
        return [te for te in cluster(s)["tes"] if te["host"] == addr and te["state"] == "ready"]
    t0 = now()
    hosts.join(i)
    t_registered = now()
    wait_until(entry, 120, 0.1)
    t_listed, host = now(), entry()
    assert s.post("/admin/scale", {"group": "colocated", "instances": instances})[0] == 200
    wait_until(lambda: len(ready()) >= N_FRESH and all(te["state"] == "ready" for te in cluster(s)["tes"]), 120, 0.1)
    t_ready, tes = now(), ready()
    assert len(tes) == N_FRESH, f"{len(tes)} TEs on the fresh host, expected {N_FRESH}"
    t_template = boot_s(host["template_pid"])
    return {"host": addr, "weights_from": host["weights_from"], "registered_s": t_registered - t0,
            "adopted_s": t_template - t_registered, "template_s": t_listed - t_template,
            "tes_s": t_ready - t_listed, "total_s": t_ready - t0,
            "te_timeline_ms": [te["timeline_ms"] for te in tes]}


def ray_footprint(hosts: NetnsCluster, window_s: float = 10.0) -> list[dict]:
    """Per host: Ray's processes (by cmdline), their PSS, and their CPU over `window_s`."""
    def cmd(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            return ""

    def cpu_s(pid):
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / TICK
        except OSError:
            return None
    procs = {}
    for i in range(hosts.n):
        for pid in map(int, os.popen(f"ip netns pids {hosts.namespace(i)}").read().split()):
            c = cmd(pid)
            if c and not any(o in c for o in OURS):
                procs[pid] = (i, c)
    before, t0 = {pid: cpu_s(pid) for pid in procs}, time.monotonic()
    time.sleep(window_s)
    after, elapsed = {pid: cpu_s(pid) for pid in procs}, time.monotonic() - t0
    rows = [{"host": hosts.hosts[i], "processes": [], "pss_mb": 0.0, "rss_mb": 0.0, "cpu_pct": 0.0} for i in range(hosts.n)]
    for pid, (i, c) in procs.items():
        if after[pid] is None or before[pid] is None:
            continue
        try:
            mem = {ln.split(":")[0]: int(ln.split()[1]) / 1024
                   for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]}
        except OSError:  # gone meanwhile
            continue
        cpu = 100 * (after[pid] - before[pid]) / elapsed
        name = c.split()[0] if c.startswith("ray::") else next(
            (k for k in ("gcs_server", "raylet", "dashboard/agent.py", "runtime_env/agent", "log_monitor",
                         "monitor.py", "dashboard.py", "default_worker") if k in c), c[:60])
        rows[i]["processes"].append({"pid": pid, "name": name, "pss_mb": round(mem["Pss"], 1),
                                     "rss_mb": round(mem["Rss"], 1), "cpu_pct": round(cpu, 2)})
        rows[i]["pss_mb"] += mem["Pss"]
        rows[i]["rss_mb"] += mem["Rss"]
        rows[i]["cpu_pct"] += cpu
    return rows


def main() -> None:
    if why := can_create_namespaces():
        sys.exit(f"cannot create network namespaces: {why}")
    model = default_model_path()
    weights, cost = weights_estimate(model), te_bytes(EngineConfig(kv_cache_gb=KV_GB), "fork", weights_estimate(model))
    small_gb = (weights + 1.5 * cost) / GiB  # the weights and exactly one TE
    warm, fresh = os.environ["DEEPFLOW_CACHE"], [tempfile.mkdtemp(prefix="dfb-fresh-") for _ in range(2)]
    env = {i: {"DEEPFLOW_CACHE": cache, "DEEPFLOW_HOST_MEMORY_GB": f"{gb:.3f}"}
           for i, (cache, gb) in enumerate([(warm, small_gb), (warm, small_gb), (fresh[0], 4), (fresh[1], 4)])}
    hosts = NetnsCluster(4, prefix="dfb", subnet="10.79.0", env_per_host=env, gcs_port=6395)
    flags = ("--backend", "ray", "--ray-address", hosts.head_address, "--num-tes", "2", "--policy", "rr",
             "--kv-cache-gb", str(KV_GB), "--max-model-len", "1024")
    try:
        hosts.up(started=2)
        with Server(*flags, env=hosts.driver_env(), host=hosts.hosts[0],
                    prefix=("ip", "netns", "exec", hosts.namespace(0))) as s:
            te_rate = remote_vs_local(s, hosts)
            # (b) first: it needs no TE running when the host joins.
            assert s.post("/admin/scale", {"group": "colocated", "instances": 0})[0] == 200
            wait_until(lambda: not cluster(s)["tes"], 60)
            # hosts 0 and 1 refill their one TE each (forks from their warm templates) beside N on host 2
            model_file = fresh_host(s, hosts, 2, N_FRESH + 2)
            broadcast = fresh_host(s, hosts, 3, N_FRESH + 2 + N_FRESH)
            time.sleep(2)
            footprint = ray_footprint(hosts)
            log = [ln for ln in s.output().splitlines() if "template on" in ln]
    finally:
        hosts.down()
        for d in fresh:
            shutil.rmtree(d, ignore_errors=True)

    print("`python bench/multihost.py`\n")
    print(f"1. Remote vs local TE ({te_rate['prompt_tokens']}-token prompts, 64 tokens, {REQUESTS} requests per TE "
          f"after {WARMUPS} warm-ups, medians)\n")
    print("| TE | host | threads | TTFT (ms) | TPOT (ms) | TPOT min..max (ms) |\n|---|---|---:|---:|---:|---:|")
    for k in ("local", "remote"):
        r = te_rate[k]
        print(f"| {k} ({r['te']}) | {r['host']} | {r['threads']} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} | "
              f"{r['tpot_ms_min_max'][0]:.2f}..{r['tpot_ms_min_max'][1]:.2f} |")
    print(f"| remote / local | | | {te_rate['ratio']['ttft_ms']:.3f} | {te_rate['ratio']['tpot_ms']:.3f} | |")
    print(f"\n2. {N_FRESH} TEs ready on a fresh host (seconds from `join`)\n")
    print("| weights | from | join: Ray node registered | -> template process started | -> template ready "
          "(host listed) | -> all TEs ready | total |\n|---|---|---:|---:|---:|---:|---:|")
    for name, r in (("model file", model_file), ("broadcast", broadcast)):
        print(f"| {name} | {r['weights_from']} | {r['registered_s']:.2f} | {r['adopted_s']:.2f} | "
              f"{r['template_s']:.2f} | {r['tes_s']:.2f} | {r['total_s']:.2f} |")
    ratio = {k: model_file[k] / broadcast[k] for k in ("template_s", "total_s")}
    print(f"| model file / broadcast | | | | {ratio['template_s']:.2f} | | {ratio['total_s']:.2f} |")
    print("\n3. Ray's own processes per host (idle, server + agents + templates + TEs up; 10 s)\n")
    print("| host | Ray processes | PSS (MiB) | RSS (MiB) | CPU (% of one core) |\n|---|---|---:|---:|---:|")
    for r in footprint:
        names = ", ".join(sorted(p["name"] for p in r["processes"]))
        print(f"| {r['host']} | {names} | {r['pss_mb']:.0f} | {r['rss_mb']:.0f} | {r['cpu_pct']:.1f} |")
    out = ROOT / "bench" / "results" / "multihost.json"
    out.write_text(json.dumps({"remote_vs_local": te_rate, "fresh_host": {
        "n_tes": N_FRESH, "model_file": model_file, "broadcast": broadcast, "ratio_model_file_over_broadcast": ratio,
        "server_log": log}, "ray_footprint": footprint, "flags": flags, "small_host_gb": small_gb}, indent=2))
    print(f"\nwritten to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
