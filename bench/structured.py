"""Structured outputs in one engine: decode throughput of 32 rows constrained by a JSON Schema
against 32 free rows, same engine, runs alternated (the median of `--runs` each), and the
grammar's own cost per row per step: the bitmask filled by llguidance, applied to the logits,
and the token consumed by the matcher (`flowserve/grammar.py`, `sampler.constrain`), timed
around those calls. The schema (an array of at least 64 small objects, strings, integers and an
enum) keeps every row in its grammar for all the timed steps.

    .venv/bin/python bench/structured.py [--rows 32] [--steps 32] [--runs 3] [--device auto]
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lora import alternated, decode_tokens_per_s, sampling_bench  # noqa: E402
from flowserve import grammar, sampler  # noqa: E402
from flowserve.protocol import SamplingParams  # noqa: E402

SCHEMA = {"type": "array", "minItems": 64, "items": {
    "type": "object", "required": ["name", "count", "kind"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "maxLength": 16}, "count": {"type": "integer"},
                   "kind": {"enum": ["fruit", "tool", "animal"]}}}}


class Timer:
    """Seconds spent in the wrapped functions, and how many grammar rows they served."""
    def __init__(self):
        self.seconds, self.rows = 0.0, 0

    def per_row_us(self, rows: int) -> float:
        return 1e6 * self.seconds / rows

    def wrap(self, fn, count_rows: bool = False):
        def timed(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            self.seconds += time.perf_counter() - t0
            if count_rows:
                self.rows += sum(s.grammar is not None and not s.grammar.done for s in args[1])
            return out
        return timed


def main() -> None:
    args, eng, prompts = sampling_bench(argparse.ArgumentParser())
    free = SamplingParams(temperature=0, max_tokens=args.steps + 4, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.steps + 4, json_schema=json.dumps(SCHEMA))
    decode_tokens_per_s(eng, prompts, [None] * args.rows, 4, constrained)  # warm-up, and the schema compiled
    mask, fill, consume = Timer(), Timer(), Timer()  # constrain: the mask filled (fill), and applied
    sampler.constrain = mask.wrap(sampler.constrain, count_rows=True)
    grammar.Grammar.fill = fill.wrap(grammar.Grammar.fill)
    grammar.Grammar.catch_up = consume.wrap(grammar.Grammar.catch_up)
    rates = alternated(eng, prompts, {"free": free, "json_schema": constrained}, args.steps, args.runs)
    base, js = rates["free"], rates["json_schema"]
    print(f"device {eng.device}, {args.rows} rows, {args.steps} decode steps, median of {args.runs} runs")
    print(f"free:        {base:8.1f} tokens/s")
    print(f"json_schema: {js:8.1f} tokens/s   ratio {js / base:.3f}x")
    rows = mask.rows
    print(f"grammar cost per row per step: {mask.per_row_us(rows) + consume.per_row_us(rows):.0f} us = "
          f"mask filled {fill.per_row_us(rows):.0f} + applied {mask.per_row_us(rows) - fill.per_row_us(rows):.0f} "
          f"+ token consumed {consume.per_row_us(rows):.0f} (over {rows} row-steps)")
    step_us = 1e6 * args.rows / js  # a constrained step's wall time
    share = args.rows * (mask.per_row_us(rows) + consume.per_row_us(rows)) / step_us
    print(f"grammar share of a constrained step: {100 * share:.1f}% (ratio it explains: {1 - share:.3f}x)")


if __name__ == "__main__":
    main()
