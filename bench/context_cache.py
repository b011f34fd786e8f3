"""Context caching benchmark: time to first token of a chat request on a ~1k-token context
cache (`cache_id`) against the same request sent whole on a context no TE has seen.

One server (one TE, `deepflow.py serve` on a free loopback port). Each round makes a fresh
context (a long system prompt with the round's number in front, so no round shares a
prefix with another), creates a cache of it (POST /v1/caches), then, interleaved, sends
the question on the cache and the question on another fresh context sent whole, both
streaming; TTFT is the time to the first content chunk. A third request checks the pin:
after filler traffic that evicts every unpinned block, the cached context still answers
as fast. Median over rounds, ratios from the same run.

    python bench/context_cache.py [--rounds 5] [--out bench/results/context_cache.json]
"""
import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.server_util import Server  # noqa: E402

FACTS = ("The Lyon bakery opens at seven and closes at seven. It sells croissants, baguettes, "
         "pain au chocolat, fruit tarts and rye loaves; orders over twelve items need a day's notice. ")
QUESTION = [{"role": "user", "content": "When does the bakery open?"}]


def system(tag: str) -> list[dict]:
    return [{"role": "system", "content": f"Context {tag}. " + FACTS * 22}]  # ~1k tokens


def ttft(url: str, body: dict) -> float:
    """Seconds to the first content chunk of a streamed chat completion (then read to the end)."""
    req = urllib.request.Request(url + "/v1/chat/completions",
                                 json.dumps({**body, "stream": True, "max_tokens": 8, "temperature": 0}).encode(),
                                 {"Content-Type": "application/json"})
    t0, first = time.perf_counter(), None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if first is None and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter() - t0
    return first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/results/context_cache.json")
    args = ap.parse_args()
    rows = []
    with Server("--max-model-len", "2048", "--kv-cache-gb", "0.12", "--max-tes", "1") as s:
        ttft(s.url, {"messages": QUESTION})  # warm-up
        for i in range(args.rounds):
            code, cache = s.post("/v1/caches", {"messages": system(f"cached-{i}")})
            assert code == 200, cache
            cached = ttft(s.url, {"messages": QUESTION, "cache_id": cache["id"]})
            whole = ttft(s.url, {"messages": system(f"fresh-{i}") + QUESTION})
            for j in range(3):  # ~3.5k tokens of other contexts: more than the unpinned blocks
                ttft(s.url, {"messages": system(f"filler-{i}-{j}") + QUESTION})
            after = ttft(s.url, {"messages": QUESTION, "cache_id": cache["id"]})
            rows.append({"tokens": cache["tokens"], "cached_s": cached, "whole_s": whole, "after_eviction_s": after})
            print(f"round {i}: {cache['tokens']} cached tokens: TTFT {1e3 * cached:.0f} ms on the cache, "
                  f"{1e3 * whole:.0f} ms sent whole, {1e3 * after:.0f} ms on the cache after eviction traffic",
                  flush=True)
            s.delete(f"/v1/caches/{cache['id']}")
    med = {k: statistics.median(r[k] for r in rows) for k in ("cached_s", "whole_s", "after_eviction_s")}
    result = {"rounds": rows, "median": med, "ratio_whole_over_cached": med["whole_s"] / med["cached_s"],
              "ratio_whole_over_after_eviction": med["whole_s"] / med["after_eviction_s"]}
    print(f"median TTFT: {1e3 * med['cached_s']:.0f} ms on the cache vs {1e3 * med['whole_s']:.0f} ms sent whole "
          f"= {result['ratio_whole_over_cached']:.1f}x lower; after eviction traffic "
          f"{result['ratio_whole_over_after_eviction']:.1f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
