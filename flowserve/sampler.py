"""The sampler: one engine step's logits -> the next token of each row, and the log
probabilities of the rows that ask for them. The engine (`flowserve/engine.py`) calls `sample`
at launch, with the logits its model runner returned, and copies what comes back to the host
with the tokens; nothing here waits for the device.

Per row, in this order (vLLM's):
0. structured outputs: a row whose sequence has a grammar (`flowserve/grammar.py`) keeps only
   the logits of the tokens its bitmask allows, the others -inf, so no processor revives them.
1. logits processors: `logit_bias` added; EOS and `stop_token_ids` masked while fewer than
   `min_tokens` are generated; `repetition_penalty` (tokens of prompt and output: positive
   logits divided by it, negative ones multiplied); `frequency_penalty` * count and
   `presence_penalty` * (count > 0) subtracted, counting the output's tokens (OpenAI's).
2. log probabilities, of these processed logits (vLLM's "processed_logprobs" mode: after
   penalties and bias, before temperature, top-k and top-p).
3. greedy rows: one batched argmax; sampled rows: temperature, top-k, top-p, then a draw with
   the sequence's own torch.Generator when it has a seed, so a seeded request gives the same
   tokens whatever else shares its batch.

Rows that use none of 0, 1 and 2 cost nothing: the tensors are built only when some row of the
step uses them, for those rows only. With async scheduling a sequence's last token may still
be on the device (sampled by the step in flight, not in `token_ids` yet): its count is added
there, from that step's token tensor, so penalties are exact without waiting for it.
"""
from dataclasses import dataclass

import torch

from flowserve.protocol import SamplingParams, TokenLogprob
from flowserve.sequence import Sequence

GREEDY_BELOW = 1e-5  # a lower temperature samples as greedy (vLLM's eps): dividing by it would overflow

@dataclass
class StepLogprobs:
    """The log probabilities of a step's rows that asked (`rows`), on the device until resolved."""
    rows: list[int]
    chosen: torch.Tensor          # [len(rows)] the sampled token's
    top_ids: torch.Tensor         # [len(rows), k], k the most any of them asked for
    top_logprobs: torch.Tensor

    def to_host(self) -> "StepLogprobs":
        cpu = lambda t: t.to("cpu", non_blocking=True)  # noqa: E731
        return StepLogprobs(self.rows, cpu(self.chosen), cpu(self.top_ids), cpu(self.top_logprobs))

    def entries(self, ks: list[int]) -> list[TokenLogprob]:
        """One `TokenLogprob` per row (after `to_host` has landed), each with its own `ks[i]` alternatives."""
        return [TokenLogprob(lp, ids[:k], lps[:k]) for lp, ids, lps, k in
                zip(self.chosen.tolist(), self.top_ids.tolist(), self.top_logprobs.tolist(), ks)]


def processed(p: SamplingParams) -> bool:
    """Whether a row's logits go through a processor (min_tokens aside: it depends on the step)."""
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 or p.logit_bias)


def logprobs_of(logits: torch.Tensor, targets: torch.Tensor, k: int) -> StepLogprobs:
    """log_softmax of `logits` rows: the `targets`' and the top `k` of each row."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    top = lsm.topk(k, dim=-1) if k else (lsm[:, :0], lsm[:, :0].long())
    return StepLogprobs([], lsm.gather(1, targets[:, None])[:, 0], top[1], top[0])


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int],
           in_flight: tuple[list[Sequence], torch.Tensor] | None = None
           ) -> tuple[torch.Tensor, StepLogprobs | None]:
    """logits: [len(seqs), vocab]. Returns one token id per sequence, on the logits' device, and
    the log probabilities of the rows whose `params.logprobs` is set (None if none is).
    `in_flight` (async scheduling): the step still computing, its sequences and tokens."""
    logits = process(constrain(logits, seqs), seqs, eos_ids, in_flight)
    tokens = logits.argmax(dim=-1)
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.temperature >= GREEDY_BELOW and p.top_k != 1:
            tokens[row] = sample_row(logits[row].float(), p.temperature, p.top_k, p.top_p, seq.generator)
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if not rows:
        return tokens, None
    idx = torch.tensor(rows).to(logits.device, non_blocking=True)
    lp = logprobs_of(logits[idx], tokens[idx], max(seqs[i].params.logprobs for i in rows))
    lp.rows = rows
    return tokens, lp


# [byte, bit]: 0 where the bit is set (allowed), -inf where not
BYTE_BIAS = torch.where((torch.arange(256)[:, None] >> torch.arange(8)) & 1 == 1, 0.0, float("-inf"))


def constrain(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The logits with each grammar row's disallowed tokens at -inf (step 0); the same tensor when
    no row has a grammar. A finished grammar's row (a row async scheduling discards) is left alone."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None and not s.grammar.done]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[-1]
    words = (vocab + 31) // 32
    mask = torch.empty(len(rows), words, dtype=torch.int32, pin_memory=dev.type == "cuda")
    for r, i in enumerate(rows):
        seqs[i].grammar.fill(mask[r].data_ptr(), words * 4)
    # little-endian words: byte j's bit k is token 8j + k; one lookup per byte gives its 8 tokens' bias
    nbytes = mask.view(torch.uint8).to(dev, non_blocking=True).flatten().long()
    bias = BYTE_BIAS.to(dev).index_select(0, nbytes).view(len(rows), -1)[:, :vocab]
    if len(rows) == len(seqs):
        return logits.float() + bias
    idx = torch.tensor(rows).to(dev, non_blocking=True)
    return logits.float().index_copy(0, idx, logits[idx].float().add_(bias))


def process(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int],
            in_flight: tuple[list[Sequence], torch.Tensor] | None) -> torch.Tensor:
    """The logits after each row's processors (the module docstring's step 1); the same tensor
    when no row has any."""
    rows = [i for i, s in enumerate(seqs) if processed(s.params) or s.params.min_tokens > generated(s)]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[-1]
    tensor = lambda values, dtype=torch.long: torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)  # noqa: E731
    idx = tensor(rows)
    sub = logits[idx].float()
    ps = [seqs[i].params for i in rows]

    bias = [(r, t, b) for r, p in enumerate(ps) for t, b in p.logit_bias.items() if t < vocab]
    if bias:
        r, t, b = zip(*bias)
        sub.index_put_((tensor(r), tensor(t)), tensor(b, torch.float32), accumulate=True)

    masked = [(r, t) for r, i in enumerate(rows) if ps[r].min_tokens > generated(seqs[i])
              for t in ps[r].stop_token_ids + ([] if ps[r].ignore_eos else eos_ids) if t < vocab]
    if masked:
        r, t = zip(*masked)
        sub.index_put_((tensor(r), tensor(t)), torch.tensor(float("-inf"), device=dev))

    if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in ps):
        counts = torch.zeros_like(sub)
        pairs = [(r, t) for r, i in enumerate(rows) for t in seqs[i].token_ids[seqs[i].num_prompt:]]
        if pairs:
            r, t = zip(*pairs)
            counts.index_put_((tensor(r), tensor(t)), torch.ones(len(pairs), device=dev), accumulate=True)
        if in_flight is not None:  # the token still being sampled by the step in flight
            pos = {id(s): j for j, s in enumerate(in_flight[0])}
            pend = [(r, pos[id(seqs[i])]) for r, i in enumerate(rows) if seqs[i].num_pending and id(seqs[i]) in pos]
            if pend:
                r, j = zip(*pend)
                counts.index_put_((tensor(r), in_flight[1][tensor(j)]), torch.ones(len(pend), device=dev),
                                  accumulate=True)
        rep = tensor([p.repetition_penalty for p in ps], torch.float32)[:, None]
        if (rep != 1).any():
            seen = counts > 0
            prompts = [(r, t) for r, i in enumerate(rows) for t in seqs[i].token_ids[:seqs[i].num_prompt]]
            r, t = zip(*prompts)
            seen[tensor(r), tensor(t)] = True
            sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        freq = tensor([p.frequency_penalty for p in ps], torch.float32)[:, None]
        pres = tensor([p.presence_penalty for p in ps], torch.float32)[:, None]
        sub = sub - freq * counts - pres * (counts > 0)
    return logits.float().index_copy(0, idx, sub)


def generated(seq: Sequence) -> int:
    """Tokens `seq` has generated, the one in flight included."""
    return len(seq.token_ids) + seq.num_pending - seq.num_prompt


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the ones before it already cover top_p; the first always stays
        drop = (probs.cumsum(dim=-1) - probs) > top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
