"""Fine-tuning (issue 25): what fits on this CPU, and how soon a finished job's model answers.

- `steps`: the training step of flowserve/train.py (LoRA rank 8 on every projection of
  SmolLM2-135M, float32, in process, one thread) at two batch shapes (examples x tokens): CPU
  seconds and wall seconds of a step after one warm-up step, trained tokens a CPU second, and
  peak memory growth (ru_maxrss).
- `deploy`: through a real server (`deepflow.py serve`, started here by tests/server_util.py),
  `--repeats` small jobs (8 chat examples, 2 steps each); for each, the client polls the job
  every 5 ms and, the moment it reads `succeeded`, streams a chat request to its
  `ft:...` model: milliseconds from that poll to the first token (the adapter goes from disk
  into a TE slot on this request), and then the base model's first token for scale (a new
  prompt, no prefix-cache hit, as the adapter's). Goal <= 200 ms.

    .venv/bin/python bench/fine_tuning.py [--only steps,deploy] [--repeats 3]

Prints one JSON object of figures.
"""
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = [(4, 64), (4, 256)]


def steps() -> dict:
    import torch

    from flowserve.config import default_model_path
    from flowserve.train import LoraTrainer, TrainSpec
    from flowserve.weights import load_weights
    torch.set_num_threads(1)  # CPU seconds on one thread: a figure the other jobs on the machine barely move
    cfg, weights = load_weights(default_model_path())
    for t in weights.values():
        t.sum()  # the mmap'ed weights resident before the baseline
    out = {}
    for bsz, tokens in SHAPES:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        trainer = LoraTrainer(cfg, weights, TrainSpec("", batch_size=bsz))
        opt = torch.optim.AdamW(trainer.params(), lr=1e-3)
        batch = [(list(range(1000, 1000 + tokens)), [0] * (tokens // 2) + [1] * (tokens - tokens // 2))] * bsz
        for _ in range(2):  # the first warms up; the second is timed
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _ = trainer.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - t0
        out[f"{bsz}x{tokens}"] = {"cpu_s": round(cpu_s, 2), "wall_s": round(wall_s, 2),
                                  "tokens_per_cpu_s": round(bsz * tokens / cpu_s),
                                  "peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024}
        print(f"{bsz}x{tokens}: {out[f'{bsz}x{tokens}']}", file=sys.stderr, flush=True)
    return out


def deploy(repeats: int) -> dict:
    import openai

    from tests.server_util import Server
    questions = ["What is the capital of France?", "Name a color.", "How do birds fly?", "What is 2+2?",
                 "Tell me a joke.", "Why is the sky blue?", "What is water?", "Who wrote Hamlet?", "Hi!"]
    data = "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Arr!"}]})
                   + "\n" for q in questions).encode()
    ms, base_ms = [], []  # the base model's first token just after each, for scale
    with Server("--kv-cache-gb", "0.25", "--max-lora-rank", "8") as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        f = c.files.create(file=("b.jsonl", data), purpose="fine-tune")
        for _ in range(repeats):
            job = c.fine_tuning.jobs.create(model="SmolLM2-135M-Instruct.Q4_1", training_file=f.id,
                                            hyperparameters={"n_epochs": 1, "batch_size": 4})
            while (job := c.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.005)
            assert job.status == "succeeded", job
            ms.append(first_token_ms(c, job.fine_tuned_model, f"Hello {len(ms)}"))
            base_ms.append(first_token_ms(c, "SmolLM2-135M-Instruct.Q4_1", f"Hello again {len(ms)}"))
    return {"success_to_first_token_ms": [round(m) for m in ms], "median_ms": round(statistics.median(ms)),
            "base_first_token_ms": [round(m) for m in base_ms]}


def first_token_ms(c, model: str, text: str) -> float:
    """A streamed chat request's first content token, in milliseconds from now."""
    t0 = time.perf_counter()
    stream = c.chat.completions.create(model=model, stream=True, max_tokens=4,
                                       messages=[{"role": "user", "content": text}])
    next(s for s in stream if s.choices and s.choices[0].delta.content)
    stream.close()
    return 1e3 * (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="steps,deploy")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    only = args.only.split(",")
    figures = {}
    if "steps" in only:
        figures["steps"] = steps()
    if "deploy" in only:
        figures["deploy"] = deploy(args.repeats)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
