"""Log probabilities in one engine: decode throughput of 32 rows that ask for `logprobs` with
5 top alternatives against 32 rows that do not, same engine, runs alternated (the median of
`--runs` each). The TE's share of the cost: log_softmax and top-k of the rows that ask, and
their copy to the host with the tokens; the JE's formatting is not in it.

    .venv/bin/python bench/logprobs.py [--rows 32] [--top 5] [--steps 32] [--runs 3] [--device auto]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lora import alternated, decode_tokens_per_s, sampling_bench  # noqa: E402
from flowserve.protocol import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=5)
    args, eng, prompts = sampling_bench(ap)
    plain = SamplingParams(temperature=0, max_tokens=args.steps + 4, ignore_eos=True)
    scored = SamplingParams(temperature=0, max_tokens=args.steps + 4, ignore_eos=True, logprobs=args.top)
    decode_tokens_per_s(eng, prompts, [None] * args.rows, 4, scored)  # warm-up
    rates = alternated(eng, prompts, {"plain": plain, "logprobs": scored}, args.steps, args.runs)
    base, lp = rates["plain"], rates["logprobs"]
    print(f"device {eng.device}, {args.rows} rows, {args.steps} decode steps, median of {args.runs} runs")
    print(f"without logprobs: {base:8.1f} tokens/s")
    print(f"logprobs, top {args.top}: {lp:8.1f} tokens/s   ratio {lp / base:.3f}x")


if __name__ == "__main__":
    main()
