"""Sampler: the next token of each sequence from its logits row.

Greedy rows are one batched argmax. Sampled rows apply temperature, top-k and top-p, then
draw with the sequence's own torch.Generator when it has a seed, so a seeded request gives
the same tokens whatever else shares its batch.
"""
import torch

from flowserve.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [len(seqs), vocab] float. Returns one token id per sequence."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.temperature > 0 and p.top_k != 1:
            tokens[row] = sample_row(logits[row].float(), p.temperature, p.top_k, p.top_p, seq.generator)
    return tokens


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> int:
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the ones before it already cover top_p; the first always stays
        drop = (probs.cumsum(dim=-1) - probs) > top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
