#!/usr/bin/env bash
# Colocated-only vs PD clusters on one workload, one run, the servers one after the other:
#   colocated  2 colocated TEs
#   mix        1 colocated + 1 prefill + 1 decode TE, PD-aware dist_sched with this machine's
#              heatmap (bench/results/pd_heatmap.json from `deepflow.py profile-pd --out ...`)
#   pd         1 prefill + 1 decode TE
# One thread per TE. Shared-prefix workload of section 5 (8 system prompts of 750 words, 64
# users, 32 output tokens, Poisson 0.5 req/s, 64 requests, seed 3).
#   bench/pd_serving.sh            results in bench/results/pd-*.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BENCH=(--workload shared-prefix --num-prefixes 8 --prefix-len 750 --num-users 64 --input-len 16
       --output-len 32 --num-prompts 64 --request-rate 0.5 --seed 3 --skip-test-request)
COMMON=(--max-model-len 2048 --kv-cache-gb 0.3 --threads-per-te 1)

wait_up() { for _ in $(seq 180); do curl -sf "$1" >/dev/null && return; sleep 1; done; echo "no server at $1"; exit 1; }

run() {  # name serve-args...
    local name=$1; shift
    $PY deepflow.py serve --port 8097 "${COMMON[@]}" "$@" >"/tmp/pd-$name.log" 2>&1 & local pid=$!
    wait_up http://127.0.0.1:8097/health
    echo "== $name: $*"
    $PY bench/serve_bench.py --base-url http://127.0.0.1:8097 "${BENCH[@]}" \
        --save-result "bench/results/pd-$name.json" | grep -E "Output token throughput|TTFT|TPOT"
    curl -s http://127.0.0.1:8097/admin/cluster | $PY -c '
import json, sys
jobs = json.load(sys.stdin)["recent_jobs"]
modes = [j["tasks"][0]["placement"]["pd"]["choice"] for j in jobs]
print("last", len(jobs), "jobs:", modes.count("disaggregated"), "disaggregated,", modes.count("colocated"), "colocated")'
    kill -TERM $pid; wait $pid
}

run colocated --num-tes 2
run mix --num-tes 1 --prefill-tes 1 --decode-tes 1 --pd-heatmap bench/results/pd_heatmap.json
run pd --num-tes 0 --prefill-tes 1 --decode-tes 1
