"""Log probabilities, penalties and logit_bias: the sampler's processors against small reference
implementations of their definitions, logprobs against HF transformers on the same GGUF, and
the OpenAI shapes through the real server (and the official openai client)."""
import json

import pytest
import torch

from flowserve.config import EngineConfig
from flowserve.engine import Engine
from flowserve.protocol import SamplingParams
from flowserve.sampler import process
from flowserve.sequence import Sequence
from tests.server_util import Server

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

V = 50
EOS = [7]


def reference(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """The processors as defined, one token at a time (vLLM's order: bias, min_tokens, penalties)."""
    p, out = seq.params, logits.clone()
    for t, b in p.logit_bias.items():
        out[t] += b
    if len(seq.token_ids) + seq.num_pending - seq.num_prompt < p.min_tokens:
        for t in p.stop_token_ids + ([] if p.ignore_eos else EOS):
            out[t] = float("-inf")
    generated = seq.token_ids[seq.num_prompt:]
    for t in set(seq.token_ids):
        if p.repetition_penalty != 1.0:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(generated):
        out[t] -= p.frequency_penalty * generated.count(t) + p.presence_penalty
    return out


def seq_of(tokens: list[int], num_prompt: int, **params) -> Sequence:
    return Sequence("s", list(tokens), num_prompt, SamplingParams(**params))


@pytest.mark.parametrize("params", [
    {"presence_penalty": 1.5}, {"frequency_penalty": 0.7}, {"frequency_penalty": -2.0, "presence_penalty": 2.0},
    {"repetition_penalty": 1.8}, {"repetition_penalty": 0.5}, {"logit_bias": {3: 100.0, 9: -42.5}},
    {"min_tokens": 5, "stop_token_ids": [11]}, {"min_tokens": 5, "ignore_eos": True, "stop_token_ids": [11]},
    {"min_tokens": 2},  # already 3 generated: nothing masked
])
def test_processors_match_their_definitions(params):
    torch.manual_seed(0)
    logits = torch.randn(3, V) * 3
    plain = [seq_of([1, 2, 3, 4], 2), seq_of([5, 6], 1)]
    seq = seq_of([1, 2, 3, 4, 4, 20, 4], 4, **params)
    got = process(logits, [plain[0], seq, plain[1]], EOS, None)
    torch.testing.assert_close(got[1], reference(logits[1], seq), rtol=0, atol=1e-6)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])  # rows without any: untouched
    assert process(logits, plain, EOS, None) is logits                          # no row with any: no work


def test_penalties_count_the_token_in_flight():
    """Async scheduling: the last token is still on the device when the next step samples."""
    torch.manual_seed(1)
    logits = torch.randn(1, V)
    seq = seq_of([1, 2, 30], 2, frequency_penalty=1.0, presence_penalty=0.5)
    seq.num_pending = 1
    got = process(logits, [seq], EOS, ([seq_of([0], 1), seq], torch.tensor([9, 30])))
    done = seq_of([1, 2, 30, 30], 2, frequency_penalty=1.0, presence_penalty=0.5)
    torch.testing.assert_close(got[0], reference(logits[0], done), rtol=0, atol=1e-6)


def test_logit_bias_and_min_tokens_steer_generation(model_path, weights):
    eng = Engine(model_path, EngineConfig(num_kv_blocks=64), weights=weights)
    eos = eng.model_cfg.eos_token_ids[0]
    forced, other = eng.generate([[1, 504, 3458], [1, 504, 3458]], [
        SamplingParams(temperature=0, max_tokens=4, logit_bias={eos: 100.0}, min_tokens=3),
        SamplingParams(temperature=0, max_tokens=4)])
    assert len(forced) == 3 and eos not in forced  # EOS held off for 3 tokens, then chosen (and not emitted)
    assert other == eng.generate([[1, 504, 3458]], SamplingParams(temperature=0, max_tokens=4))[0]


# ---------------------------------------------------------------------------- logprobs

@pytest.fixture(scope="module")
def hf_model(model_path):
    from pathlib import Path
    p = Path(model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return model.eval()


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the reference logits at every position of `ids`."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_matches(ref_row: torch.Tensor, token: int, logprob: float, top: list[tuple[int, float]]):
    assert abs(ref_row[token].item() - logprob) < 1e-4
    for t, lp in top:
        assert abs(ref_row[t].item() - lp) < 1e-4
    assert [t for t, _ in top][:1] == [int(ref_row.argmax())]


def test_engine_logprobs_match_reference(model_path, weights, hf_model):
    eng = Engine(model_path, EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=8), weights=weights)
    prompt = [1, 504, 3458, 282, 4649, 314, 253, 1345, 1165, 30, 216]  # two prefill chunks
    eng.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=5, logprobs=4, prompt_logprobs=2))
    outs = []
    while eng.has_work():
        outs += eng.step()
    tokens = [t for o in outs for t in o.token_ids]
    lps = [lp for o in outs for lp in o.logprobs]
    ref = hf_logprobs(hf_model, prompt + tokens)
    assert len(lps) == len(tokens) == 5
    for i, (t, lp) in enumerate(zip(tokens, lps)):
        assert_matches(ref[len(prompt) - 1 + i], t, lp.logprob, list(zip(lp.top_ids, lp.top_logprobs)))
        assert len(lp.top_ids) == 4
    plps = outs[0].prompt_logprobs
    assert len(plps) == len(prompt) and plps[0] is None
    for i in range(1, len(prompt)):
        row = ref[i - 1]
        assert abs(row[prompt[i]].item() - plps[i].logprob) < 1e-4
        assert len(plps[i].top_ids) == 2 and abs(row.max().item() - plps[i].top_logprobs[0]) < 1e-4


@pytest.fixture(scope="module")
def server():
    with Server("--served-model-name", "m", "--max-model-len", "1024") as s:
        yield s


def test_chat_logprobs_match_reference(server, hf_model, tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    status, body = server.post("/v1/chat/completions", {"model": "m", "messages": messages, "temperature": 0,
                                                          "max_tokens": 6, "logprobs": True, "top_logprobs": 3})
    assert status == 200, body
    content = body["choices"][0]["logprobs"]["content"]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
    for entry in content:  # greedy: the reference's argmax at each step is the token chosen
        ref = hf_logprobs(hf_model, ids)[-1]
        token = int(ref.argmax())
        assert entry["token"] == tokenizer.token_text(token) and entry["bytes"] == list(entry["token"].encode())
        assert abs(entry["logprob"] - ref[token].item()) < 1e-4
        top = ref.topk(3)
        assert [e["token"] for e in entry["top_logprobs"]] == [tokenizer.token_text(t) for t in top.indices.tolist()]
        assert all(abs(e["logprob"] - x) < 1e-4 for e, x in zip(entry["top_logprobs"], top.values.tolist()))
        ids.append(token)
    assert "".join(e["token"] for e in content).startswith(body["choices"][0]["message"]["content"])

    # the same through the stream: each chunk carries its tokens' logprobs
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    stream = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=6,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e["token"], round(e["logprob"], 4)) for e in content]
    whole = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=2)
    assert len(whole.choices[0].logprobs.content[0].top_logprobs) == 2


def test_completion_logprobs_and_echo(server, hf_model, tokenizer):
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    status, body = server.post("/v1/completions", {"model": "m", "prompt": prompt, "temperature": 0,
                                                    "max_tokens": 4, "logprobs": 2, "echo": True})
    assert status == 200, body
    choice, lp = body["choices"][0], body["choices"][0]["logprobs"]
    assert choice["text"].startswith(prompt)
    assert lp["tokens"][:len(ids)] == [tokenizer.token_text(t) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(ids) + 4 and lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    full = ids + [int(hf_logprobs(hf_model, ids)[-1].argmax())]
    ref = hf_logprobs(hf_model, full)
    for i in range(1, len(full)):  # the prompt's tokens, then the first generated one
        assert abs(lp["token_logprobs"][i] - ref[i - 1][full[i]].item()) < 1e-4
        assert len(lp["top_logprobs"][i]) <= 2
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    c = client.completions.create(model="m", prompt=prompt, max_tokens=3, temperature=0, logprobs=1)
    assert len(c.choices[0].logprobs.tokens) == 3 and c.choices[0].logprobs.token_logprobs[0] < 0


def test_logit_bias_through_the_server(server, tokenizer):
    token = tokenizer.encode(" blue")[0]
    status, body = server.post("/v1/completions", {"model": "m", "prompt": "Hi", "temperature": 0, "max_tokens": 3,
                                                    "logit_bias": {str(token): 100}, "frequency_penalty": 0.5})
    assert status == 200 and body["choices"][0]["text"] == " blue" * 3


@pytest.mark.parametrize("path,field,value,param", [
    ("chat", "top_logprobs", 21, "top_logprobs"),
    ("completions", "logprobs", 6, "logprobs"),
    ("chat", "logit_bias", {"abc": 1}, "logit_bias"),
    ("chat", "logit_bias", {"99999999": 1}, "logit_bias"),
    ("completions", "logit_bias", {"5": 101}, "logit_bias"),
    ("chat", "presence_penalty", 2.5, "presence_penalty"),
    ("completions", "frequency_penalty", -3, "frequency_penalty"),
    ("chat", "repetition_penalty", 0, "repetition_penalty"),
    ("completions", "repetition_penalty", 5e-324, "repetition_penalty"),  # would make logits infinite
])
def test_bad_values_are_400_with_the_param(server, path, field, value, param):
    body = {"model": "m", "max_tokens": 2, field: value}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if path == "chat" else {"prompt": "hi"})
    status, err = server.post("/v1/chat/completions" if path == "chat" else "/v1/completions", body)
    assert status == 400 and err["error"]["param"] == param, json.dumps(err)


def test_extreme_but_valid_sampling_values_answer_and_keep_the_te(server):
    """A denormal temperature is greedy (no inf - inf in the softmax); the smallest repetition
    penalty keeps logits finite: both answer 200, and the TE that served them is the same."""
    pids = [te["pid"] for te in server.get("/admin/cluster")["tes"]]
    body = {"model": "m", "prompt": "The three primary colors are", "max_tokens": 6}
    greedy = server.post("/v1/completions", {**body, "temperature": 0})[1]["choices"][0]["text"]
    status, tiny = server.post("/v1/completions", {**body, "temperature": 5e-324, "seed": 1})
    assert status == 200 and tiny["choices"][0]["text"] == greedy
    status, _ = server.post("/v1/completions", {**body, "temperature": 1, "repetition_penalty": 0.01, "seed": 2})
    assert status == 200 and [te["pid"] for te in server.get("/admin/cluster")["tes"]] == pids
