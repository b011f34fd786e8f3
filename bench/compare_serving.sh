#!/usr/bin/env bash
# One run, one workload, three servers one after the other on the same machine:
# DeepFlow-py, llama-server and llama-cpp-python (built by bench/peers.sh build), then the
# ratios. Random prompts of 128 words, 128 output tokens, 32 concurrent streams, seed 1.
#   bench/compare_serving.sh            results in bench/results/compare-*.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BENCH=(--workload random --input-len 128 --output-len 128 --max-concurrency 32 --seed 1)

wait_up() { for _ in $(seq 180); do curl -sf "$1" >/dev/null && return; sleep 1; done; echo "no server at $1"; exit 1; }

run() {  # name url health-path prompts extra-args... ; the server is already starting
    local name=$1 url=$2 health=$3 n=$4; shift 4
    wait_up "$url$health"
    $PY bench/serve_bench.py --base-url "$url" "${BENCH[@]}" --num-prompts "$n" "$@" \
        --save-result "bench/results/compare-$name.json" | grep -E "Output token throughput|Mean TTFT|Mean TPOT"
}

$PY deepflow.py serve --port 8090 --max-model-len 2048 >/tmp/compare-deepflow.log 2>&1 & pid=$!
run deepflow http://127.0.0.1:8090 /health 64; kill -TERM $pid; wait $pid
PORT=8081 bench/peers.sh run-llama-server >/tmp/compare-llama-server.log 2>&1 & pid=$!
run llama-server http://127.0.0.1:8081 /health 64; kill $pid; wait $pid || true
# one request at a time: 32 prompts take as long as 64 do elsewhere; no ignore_eos there
PORT=8082 bench/peers.sh run-lcp >/tmp/compare-lcp.log 2>&1 & pid=$!
run llama-cpp-python http://127.0.0.1:8082 /v1/models 32 --min-tokens; kill $pid; wait $pid || true

$PY - <<'PY'
import json
r = {n: json.load(open(f"bench/results/compare-{n}.json")) for n in ("deepflow", "llama-server", "llama-cpp-python")}
m = {n: d["metrics"] for n, d in r.items()}
for n in ("llama-server", "llama-cpp-python"):
    print(f"deepflow / {n}: output tok/s {m['deepflow']['output_throughput'] / m[n]['output_throughput']:.2f}x, "
          f"mean TTFT {m[n]['ttft_ms']['mean'] / m['deepflow']['ttft_ms']['mean']:.2f}x lower")
PY
