"""Scale-out benchmark: how fast new TEs serve, by start mode, and how far fork scales.

Each part starts `deepflow.py serve` on a free loopback port (tests/server_util.py):

1. timeline: for each start mode (cold: fresh interpreter + model file; preloaded: fresh
   interpreter + mmap'ed cache, the DRAM pre-loading path; fork: the warm template), scale
   a group from zero with one request waiting, and report the TE's five-step timeline and
   the request's time to first token, all ratios against cold in the same run.
2. scale: at default flags but a small KV pool (--kv-cache-gb 0.02), `POST /admin/scale`
   to N TEs for N in --sizes (threads follow the host: cores / TEs, at least one): time
   until all N are ready and each has served one
   request, and the memory of all TE processes (PSS, which splits shared pages among their
   sharers) against N copies of the weights; plus one TE's shared/private split from
   /proc/<pid>/smaps_rollup.

    python bench/scaling.py [--parts timeline,scale] [--sizes 1,8,16,32,64] [--out bench/results/scaling.json]
"""
import argparse
import concurrent.futures
import json
import sys
import time
import urllib.request
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.server_util import Server, wait_until  # noqa: E402

STEPS = ("scaler_pre", "te_pre_load", "te_load", "te_post_load", "scaler_post")
COMMON = ("--max-model-len", "512", "--kv-cache-gb", "0.02", "--threads-per-te", "1")


def first_token_ms(s: Server) -> float:
    """Stream one request; ms until the first content chunk."""
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    req = urllib.request.Request(s.url + "/v1/completions", orjson.dumps(body), {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: {") and orjson.loads(line[6:])["choices"][0]["text"]:
                return 1e3 * (time.perf_counter() - t0)
    raise RuntimeError("no token")


def smaps(pid: int) -> dict:
    """kB figures of /proc/<pid>/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        out[key] = int(value.split()[0])
    return out


def timeline(mode: str) -> dict:
    s = Server("--start-mode", mode, "--min-tes", "0", "--max-tes", "1", "--scale-in-idle-s", "2", *COMMON)
    try:
        wait_until(lambda: not s.get("/admin/cluster")["tes"], 600)
        ttft = first_token_ms(s)  # arrives at zero TEs: held until the scale-out is ready
        te = s.get("/admin/cluster")["tes"][0]
        t0 = time.perf_counter()
        s.post("/v1/completions", {"prompt": "Hello", "max_tokens": 1, "temperature": 0})
        first_request_ms = 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        s.post("/v1/completions", {"prompt": "Hello", "max_tokens": 1, "temperature": 0})
        return {"mode": mode, "first_token_ms": ttft, **te["timeline_ms"], "request_1_ms": first_request_ms,
                "request_2_ms": 1e3 * (time.perf_counter() - t0)}
    finally:
        s.stop()


def peer_timeline(weight_bytes: int) -> dict:
    """A second TE that receives its weights from the running first one over TCP (DistFlow)."""
    s = Server("--start-mode", "peer", *COMMON)
    try:
        wait_until(lambda: s.get("/admin/cluster")["prewarmed_ready"] == 1)
        s.post("/admin/scale", {"group": "colocated", "instances": 2})
        wait_until(lambda: sum(te["state"] == "ready" for te in s.get("/admin/cluster")["tes"]) == 2)
        te = next(te for te in s.get("/admin/cluster")["tes"] if te["start_mode"] == "peer")
        return {"mode": "peer", **te["timeline_ms"],
                "weights_gb_per_s": weight_bytes / 1e9 / (te["timeline_ms"]["te_load"] / 1e3)}
    finally:
        s.stop()


def scale(n: int, weight_bytes: int) -> dict:
    s = Server("--kv-cache-gb", "0.02")
    try:
        s.post("/admin/scale", {"group": "colocated", "instances": 0})
        wait_until(lambda: not s.get("/admin/cluster")["tes"], 600)
        t0 = time.perf_counter()
        s.post("/admin/scale", {"group": "colocated", "instances": n})
        wait_until(lambda: sum(te["state"] == "ready" for te in s.get("/admin/cluster")["tes"]) == n)
        ready_s = time.perf_counter() - t0
        # one request per TE: dist_sched gives each new request to an idle TE
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda i: s.post("/v1/completions", {"prompt": f"Hi {i}", "max_tokens": 1}), range(n)))
        served_s = time.perf_counter() - t0
        cluster = s.get("/admin/cluster")
        pids = [te["pid"] for te in cluster["tes"]]
        served_by = {task["te"] for job in cluster["recent_jobs"][:n] for task in job["tasks"]}
        pss_mb = sum(smaps(pid)["Pss"] for pid in pids + [cluster["template_pid"]]) / 1024
        one = smaps(pids[0])
        return {"tes": n, "ready_s": ready_s, "ready_and_served_s": served_s, "tes_that_served": len(served_by),
                "pss_total_mb": pss_mb, "n_x_weights_mb": n * weight_bytes / 2**20,
                "one_te_shared_mb": (one["Shared_Clean"] + one["Shared_Dirty"]) / 1024,
                "one_te_private_mb": (one["Private_Clean"] + one["Private_Dirty"]) / 1024,
                "threads_per_te": sorted({te["threads"] for te in cluster["tes"]}),
                "mean_timeline_ms": {k: sum(te["timeline_ms"][k] for te in cluster["tes"]) / n for k in STEPS}}
    finally:
        s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,8,16,32,64")
    ap.add_argument("--modes", default="cold,preloaded,fork")  # then peer, which needs a running TE
    ap.add_argument("--parts", default="timeline,scale")
    ap.add_argument("--out", default="bench/results/scaling.json")
    args = ap.parse_args()
    from flowserve.config import default_model_path
    from flowserve.weights import load_weights
    weight_bytes = sum(t.numel() * t.element_size() for t in load_weights(default_model_path())[1].values())

    rows, scaled = [], []
    if "timeline" in args.parts:
        rows = timeline_table(args.modes.split(","), weight_bytes)
    if "scale" in args.parts:
        scaled = [scale(int(n), weight_bytes) for n in args.sizes.split(",") if n]
        print("\n| TEs | all ready (s) | ready + each served one request (s) | TEs that served | threads per TE "
              "| PSS of TEs + template (MB) | N x weights (MB) | one TE shared / private (MB) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in scaled:
        print(f"| {r['tes']} | {r['ready_s']:.2f} | {r['ready_and_served_s']:.2f} | {r['tes_that_served']} | "
              f"{r['threads_per_te']} | {r['pss_total_mb']:.0f} | {r['n_x_weights_mb']:.0f} | "
              f"{r['one_te_shared_mb']:.0f} / {r['one_te_private_mb']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"timeline": rows, "scale": scaled}, indent=2))


def timeline_table(modes: list[str], weight_bytes: int) -> list[dict]:
    rows = [timeline(m) for m in modes]
    cold = next((r for r in rows if r["mode"] == "cold"), rows[0])
    print("| start mode | " + " | ".join(STEPS) + " | first token at zero TEs (ms) | vs cold "
          "| then a 1-token request, twice (ms) |")
    print("|---|" + "---:|" * (len(STEPS) + 3))
    for r in rows:
        print(f"| {r['mode']} | " + " | ".join(f"{r[k]:.0f}" for k in STEPS) +
              f" | {r['first_token_ms']:.0f} | {cold['first_token_ms'] / r['first_token_ms']:.1f}x faster "
              f"| {r['request_1_ms']:.0f}, {r['request_2_ms']:.0f} |")

    peer = peer_timeline(weight_bytes)
    print("| peer (a 2nd TE, weights streamed from the 1st over TCP) | " +
          " | ".join(f"{peer[k]:.0f}" for k in STEPS) +
          f" | | | TE-Load at {peer['weights_gb_per_s']:.2f} GB/s of weights |")
    rows.append(peer)
    return rows


if __name__ == "__main__":
    main()
