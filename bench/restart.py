"""Main-process restart against a cold start of the same cluster, in one run (issue 26).

The cluster is `deepflow.py serve --num-tes N` on this host, or with `--hosts H` (root) on H
hosts made of network namespaces (tests/netns_cluster.py, `--backend ray`, the server in
host 0, TEs spread over the hosts). First a cold start (a fresh
--state-dir: template, N forked TEs); then, `--restarts` times, its main process is
SIGKILLed and started again with the same --state-dir, HTTP port and TE port, and re-adopts
the TEs. For each start: seconds from launching the process to the first answered request
(a 4-token greedy chat, tried every 20 ms), and for each restart, whether all N TEs came
back with their pids unchanged, and how long its adoption took inside the new process (the
server log's "re-adopted" line; the rest is the interpreter's start, imports and the
tokenizer), and the CPU seconds the new main process used until then: on a busy machine
the wall time is longer by the wait for a core. Goal: serving within 2 s of the restart with 8 TEs.

    .venv/bin/python bench/restart.py [--tes 8] [--restarts 3] [--hosts 2] [--json OUT]
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.netns_cluster import NetnsCluster  # noqa: E402
from tests.server_util import free_port  # noqa: E402

CHAT = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4, "temperature": 0}).encode()


def answered(url: str) -> bool:
    req = urllib.request.Request(url + "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def start(args: list[str], url: str, log, prefix: list[str], env: dict) -> tuple[subprocess.Popen, float]:
    """Launch the server (under `prefix`, e.g. `ip netns exec NS`, which execs); return it and
    the seconds until it answered a request."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*prefix, sys.executable, str(ROOT / "deepflow.py"), "--log-level", "info", "serve",
                             *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **env})
    while not answered(url):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
        time.sleep(0.02)
    return proc, time.perf_counter() - t0


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) `pid` has used: on an idle machine its start takes about this long."""
    with open(f"/proc/{pid}/stat") as f:
        utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def tes(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url + "/admin/cluster", timeout=10) as r:
        return {te["id"]: (te["host"], te["pid"]) for te in json.loads(r.read())["tes"] if te["state"] == "ready"}


def measure(opts: argparse.Namespace, address: str, prefix: list[str], env: dict, extra: list[str]) -> dict:
    """A cold start, then `opts.restarts` SIGKILLs and restarts; the figures."""
    port = free_port()
    url = f"http://{address}:{port}"
    with tempfile.TemporaryDirectory(prefix="deepflow-restart-") as state:
        args = ["--port", str(port), "--num-tes", str(opts.tes), "--kv-cache-gb", opts.kv_cache_gb,
                "--state-dir", state, "--te-port", str(free_port()), *extra]
        log = open(Path(state) / "server.log", "w")
        proc, cold_s = start(args, url, log, prefix, env)
        try:
            before, restarts, adopted, adopt_ms, cpu = tes(url), [], [], [], []
            print(f"cold start: {cold_s:.2f} s to the first answer, {len(before)} TEs on "
                  f"{len({host for host, _ in before.values()})} host(s) (load average {os.getloadavg()[0]:.1f})",
                  flush=True)
            for i in range(opts.restarts):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                proc, seconds = start(args, url, log, prefix, env)
                restarts.append(seconds)
                cpu.append(cpu_s(proc.pid))
                adopted.append(tes(url) == before)
                adopt_ms.append(float(re.findall(r"re-adopted \d+ of \d+ TE\(s\) in (\d+) ms",
                                                 (Path(state) / "server.log").read_text())[-1]))
                print(f"restart {i + 1}: {seconds:.2f} s to the first answer (adoption {adopt_ms[-1]:.0f} ms, "
                      f"{cpu[-1]:.2f} CPU s), all {len(before)} TEs adopted with their pids: {adopted[-1]} "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    median = statistics.median(restarts)
    return {"tes": opts.tes, "hosts": opts.hosts, "cold_start_s": round(cold_s, 2),
            "restart_s": [round(s, 2) for s in restarts], "restart_median_s": round(median, 2),
            "all_adopted": all(adopted), "adoption_ms": adopt_ms, "restart_cpu_s": cpu,
            "speedup": round(cold_s / median, 1), "load_average": round(os.getloadavg()[0], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tes", type=int, default=8)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--kv-cache-gb", default="0.25", help="per TE: N of them must fit in this host's memory")
    ap.add_argument("--hosts", type=int, default=1, help="more than 1: hosts as network namespaces (root)")
    ap.add_argument("--json", help="also write the figures here")
    opts = ap.parse_args()
    if opts.hosts == 1:
        out = measure(opts, "127.0.0.1", [], {}, [])
    else:
        hosts = NetnsCluster(opts.hosts, prefix="dfr", subnet="10.80.0", gcs_port=6397)
        try:
            hosts.up()
            out = measure(opts, hosts.hosts[0], ["ip", "netns", "exec", hosts.namespace(0)], hosts.driver_env(),
                          ["--backend", "ray", "--ray-address", hosts.head_address, "--host", hosts.hosts[0]])
        finally:
            hosts.down()
    print(json.dumps(out))
    if opts.json:
        Path(opts.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
