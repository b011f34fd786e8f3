"""How well the decode-length predictor (scheduler/pd_policy.py) picks the heatmap column.

Workload: chat requests of four kinds answered for real by the default model (greedy,
max_tokens 256): short questions ("What is the capital of X?"), stories ("Write a short
story about X."), lists ("List ten facts about X.") and one-sentence summaries of 100-900
words of text. Shuffled with a seed and split: the predictor learns from the first
`--train` fraction (as serve does, from finished requests) and predicts the rest.

Reported per prompt-length bucket and overall, for the predictor and for the no-history
guess (max_tokens): the column accuracy (predicted and true decode length fall in the same
decode/prefill ratio column of the profile-pd grid, i.e. the PD-aware step sees the right
cell), the length-bucket accuracy (same 128-token bucket of decode length, the paper's
classifier buckets), and the mean absolute error in tokens.

    python bench/pd_predictor.py [--per-kind 30] [--seed 0]
"""
import argparse
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DEEPFLOW_CACHE", str(ROOT / ".venv" / "deepflow-cache"))
from flowserve.config import EngineConfig, default_model_path  # noqa: E402
from flowserve.engine import Engine  # noqa: E402
from flowserve.protocol import SamplingParams  # noqa: E402
from flowserve.tokenizer import Tokenizer  # noqa: E402
from scheduler.pd_policy import DecodeLengthPredictor, Heatmap  # noqa: E402

TOPICS = ["France", "Japan", "Brazil", "Egypt", "Canada", "Kenya", "Norway", "Peru", "India", "Italy",
          "the moon", "volcanoes", "bees", "the ocean", "trains", "chess", "coffee", "rain", "music", "bridges"]
WORDS = ("the river town market bread morning light old road farmer winter harbour ship stone bell "
         "garden school letter window mountain field lamp evening road clock bridge story").split()


def workload(per_kind: int, rng: random.Random) -> list[str]:
    prompts = []
    for i in range(per_kind):
        topic = TOPICS[i % len(TOPICS)]
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(100, 900)))
        prompts += [f"What is the capital of {topic}?", f"Write a short story about {topic}.",
                    f"List ten facts about {topic}.", f"Summarize this text in one sentence: {text}"]
    rng.shuffle(prompts)
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-kind", type=int, default=30)
    ap.add_argument("--train", type=float, default=0.5)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = default_model_path()
    tok = Tokenizer.load(model)
    engine = Engine(model, EngineConfig(kv_cache_gb=1.0, max_num_seqs=32))
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
               for p in workload(args.per_kind, random.Random(args.seed))]
    outputs = []
    for i in range(0, len(prompts), 32):
        outputs += engine.generate(prompts[i:i + 32], SamplingParams(temperature=0, max_tokens=args.max_tokens))
    pairs = [(len(p), len(o)) for p, o in zip(prompts, outputs)]
    split = int(len(pairs) * args.train)
    predictor = DecodeLengthPredictor()
    for p, o in zip(prompts[:split], outputs[:split]):
        predictor.observe(p, len(o))
    grid = Heatmap([1], [1 / 32, 1 / 8, 1 / 2], [[0] * 3], [[0] * 3])  # profile-pd's default columns

    def column(p: int, o: int) -> int:
        return grid.cell(p, o)[1]

    def scores(p: int, guess: int, o: int) -> tuple[bool, bool, int]:
        return column(p, guess) == column(p, o), guess // 128 == o // 128, abs(guess - o)

    by_bucket: dict[int, list[tuple]] = {}
    for ids, (p, o) in zip(prompts[split:], pairs[split:]):
        by_bucket.setdefault((p - 1).bit_length(), []).append(
            scores(p, predictor.predict(ids, args.max_tokens), o) + scores(p, args.max_tokens, o))
    print(f"{len(pairs)} requests ({split} to learn from, {len(pairs) - split} held out), max_tokens "
          f"{args.max_tokens}, columns = decode/prefill ratio {grid.ratios}; each cell: predictor / max_tokens\n")
    print("| prompt tokens | held out | column accuracy | length-bucket accuracy | mean abs. error (tokens) |")
    print("|---|---:|---:|---:|---:|")
    rows = sorted(by_bucket.items())
    for b, r in rows + [(None, [x for _, rs in rows for x in rs])]:
        label = "all" if b is None else f"{2 ** (b - 1) + 1}-{2 ** b}"
        n = len(r)
        mean = [sum(x[k] for x in r) / n for k in range(6)]
        print(f"| {label} | {n} | {mean[0]:.0%} / {mean[3]:.0%} | {mean[1]:.0%} / {mean[4]:.0%} | "
              f"{mean[2]:.0f} / {mean[5]:.0f} |")


if __name__ == "__main__":
    main()
