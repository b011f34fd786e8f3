"""The main process's cost, side by side for two checkouts: time from `deepflow.py serve` to a
healthy server (template up, one TE forked and warm), and the main process's RSS after it
answered one chat request. Runs alternate between the checkouts, so both see the same
machine.

    git worktree add /tmp/deepflow-before <commit>
    .venv/bin/python bench/frontend.py /tmp/deepflow-before . --runs 3
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def loads_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def one_run(checkout: str) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "deepflow.py", "serve", "--port", str(port)], cwd=checkout,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except OSError:
                time.sleep(0.05)
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                raise RuntimeError(f"{checkout}: server did not become healthy")
        healthy_s = time.perf_counter() - t0
        body = json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=60).read()
        return {"healthy_s": healthy_s, "rss_mb": rss_mb(proc.pid), "torch": loads_torch(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkouts", nargs="+", help="directories holding a deepflow.py")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {c: [] for c in args.checkouts}
    for _ in range(args.runs):
        for c in args.checkouts:
            results[c].append(one_run(c))
    print("| checkout | time to healthy, s (median) | main-process RSS, MB (median) | torch loaded |\n|---|---:|---:|---|")
    for c, runs in results.items():
        print(f"| {os.path.abspath(c)} | {statistics.median(r['healthy_s'] for r in runs):.2f} "
              f"| {statistics.median(r['rss_mb'] for r in runs):.0f} | {any(r['torch'] for r in runs)} |")


if __name__ == "__main__":
    main()
