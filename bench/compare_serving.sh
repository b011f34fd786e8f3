#!/usr/bin/env bash
# One run, one workload, the servers one after the other on the same machine: DeepFlow-py
# and llama-server (built by `bench/peers.sh build-llama-server`), then the ratios. With
# PEERS="llama-server llama-cpp-python", llama-cpp-python too (bench/peers.sh build).
# Random prompts of 128 words, 128 output tokens, 32 concurrent streams, seed 1. For
# DeepFlow it also prints the main process's CPU seconds per output token (the serving
# path's own cost: HTTP, JE, detokenization; the TE is a separate process).
#   bench/compare_serving.sh [extra deepflow serve flags]   results in bench/results/compare-*.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BENCH=(--workload random --input-len 128 --output-len 128 --max-concurrency 32 --seed 1)
PEERS=${PEERS-llama-server}

wait_up() { for _ in $(seq 180); do curl -sf "$1" >/dev/null && return; sleep 1; done; echo "no server at $1"; exit 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run() {  # name url health-path prompts extra-args... ; the server is already starting
    local name=$1 url=$2 health=$3 n=$4; shift 4
    wait_up "$url$health"
    $PY bench/serve_bench.py --base-url "$url" "${BENCH[@]}" --num-prompts "$n" "$@" \
        --save-result "bench/results/compare-$name.json" | grep -E "Output token throughput|Mean TTFT|Mean TPOT"
}

# --max-tes 1: one TE, as llama-server is one process (the autoscaler would add TEs)
$PY deepflow.py serve --port 8090 --max-model-len 2048 --max-tes 1 "$@" >/tmp/compare-deepflow.log 2>&1 & pid=$!
wait_up http://127.0.0.1:8090/health
t0=$(cpu_ticks $pid)
run deepflow http://127.0.0.1:8090 /health 64
echo "$(( $(cpu_ticks $pid) - t0 ))" > bench/results/compare-deepflow.cpu_ticks
kill -TERM $pid; wait $pid
if [[ " $PEERS " == *" llama-server "* ]]; then
    PORT=8081 bench/peers.sh run-llama-server >/tmp/compare-llama-server.log 2>&1 & pid=$!
    run llama-server http://127.0.0.1:8081 /health 64; kill $pid; wait $pid || true
fi
if [[ " $PEERS " == *" llama-cpp-python "* ]]; then
    # one request at a time: 32 prompts take as long as 64 do elsewhere; no ignore_eos there
    PORT=8082 bench/peers.sh run-lcp >/tmp/compare-lcp.log 2>&1 & pid=$!
    run llama-cpp-python http://127.0.0.1:8082 /v1/models 32 --min-tokens; kill $pid; wait $pid || true
fi

PEERS="$PEERS" $PY - <<'PY'
import json, os
ticks = int(open("bench/results/compare-deepflow.cpu_ticks").read()) / os.sysconf("SC_CLK_TCK")
m = {n: json.load(open(f"bench/results/compare-{n}.json"))["metrics"] for n in ["deepflow", *os.environ["PEERS"].split()]}
d = m["deepflow"]
print(f"deepflow main process: {ticks:.1f} CPU s for {d['total_output_tokens']} output tokens, "
      f"{1e3 * ticks / d['total_output_tokens']:.2f} CPU ms per output token")
for n in os.environ["PEERS"].split():
    print(f"deepflow / {n}: output tok/s {d['output_throughput'] / m[n]['output_throughput']:.2f}x, "
          f"mean TTFT {m[n]['ttft_ms']['mean'] / d['ttft_ms']['mean']:.2f}x lower")
PY
