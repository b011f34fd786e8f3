#!/usr/bin/env bash
# Locality-aware vs round-robin placement (docs/BENCHMARKS.md section 5): two colocated TEs,
# one thread each, shared-prefix workload (8 system prompts of 750 words, 64 users, 16-word
# questions, 32 output tokens, Poisson 0.5 req/s, 64 requests, seed 3), for a KV budget per
# TE that holds all 8 prompts (0.3 GB) and one that holds about 4 (0.15 GB). One server per
# run, one run after the other, each on 127.0.0.1:$PORT (default 8096).
#   bench/locality.sh [serve_bench args]    e.g. --num-prompts 24 --request-rate 0.25: shorter
# Results in bench/results/locality-<KV>GB-<policy>.json: serve_bench's JSON plus a "server"
# entry (policy, KV budget, prefix-cache hit rate from /metrics). bench/plots.py draws them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT=${PORT:-8096}
URL=http://127.0.0.1:$PORT
BENCH=(--workload shared-prefix --num-prefixes 8 --prefix-len 750 --num-users 64 --input-len 16
       --output-len 32 --num-prompts 64 --request-rate 0.5 --seed 3 --skip-test-request)

wait_up() {  # url pid log: until the server answers, or it has exited
    for _ in $(seq 180); do
        curl -sf "$1" >/dev/null && return
        kill -0 "$2" 2>/dev/null || { echo "the server exited, see $3"; exit 1; }
        sleep 1
    done
    echo "no server at $1"; exit 1
}

add_server_entry() {  # result.json policy kv: record the server's set-up and prefix-cache hit rate
    curl -s "$URL/metrics" | $PY -c '
import json, sys
path, policy, kv = sys.argv[1:]
counts = {}
for line in sys.stdin:
    for name in ("prefix_cache_hits", "prefix_cache_queries"):
        if line.startswith(f"deepflow:{name}_total"):
            counts[name] = float(line.split()[-1])
hit_rate = counts["prefix_cache_hits"] / max(counts["prefix_cache_queries"], 1)
record = json.load(open(path))
record["server"] = {"policy": policy, "kv_cache_gb": float(kv), "prefix_cache_hit_rate": hit_rate}
json.dump(record, open(path, "w"), indent=1)
print(f"prefix-cache hit rate (tokens): {hit_rate:.0%}")' "$@"
}

run() {  # policy kv [serve_bench args]
    local policy=$1 kv=$2 out=bench/results/locality-${2}GB-$1.json log=/tmp/locality-$1-$2.log; shift 2
    $PY deepflow.py serve --host 127.0.0.1 --port "$PORT" --num-tes 2 --threads-per-te 1 --policy "$policy" \
        --kv-cache-gb "$kv" --max-model-len 2048 >"$log" 2>&1 & pid=$!
    wait_up "$URL/health" $pid "$log"
    echo "== --policy $policy --kv-cache-gb $kv"
    $PY bench/serve_bench.py --base-url "$URL" "${BENCH[@]}" "$@" --save-result "$out" |
        grep -E "Output token throughput|TTFT"
    add_server_entry "$out" "$policy" "$kv"
    kill -TERM $pid; wait $pid; pid=
}

pid=  # the running server, stopped on the way out if a run fails
trap '[ -n "$pid" ] && kill -TERM $pid' EXIT

mkdir -p bench/results
for kv in 0.3 0.15; do
    for policy in rr locality; do
        run $policy $kv "$@"
    done
done
