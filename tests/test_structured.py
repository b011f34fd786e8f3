"""Structured outputs (`response_format`): every answer is JSON that validates against its
schema (the `jsonschema` package), streamed or not, on chat and completions, colocated and
through a prefill + decode pair; without the schema the same prompts mostly give no JSON;
a schema the grammar library cannot compile is a 400 naming `response_format`."""
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch

from flowserve.grammar import Grammars
from flowserve.protocol import SamplingParams
from flowserve.sampler import constrain
from flowserve.sequence import Sequence
from tests.server_util import Server
from tests.test_engine import make_engine
from tests.test_pd import PDPair

openai = pytest.importorskip("openai")

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SCHEMAS = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age", "occupation"],
               "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                              "occupation": NAME}},
    "review": {"type": "object", "additionalProperties": False, "required": ["sentiment", "stars"],
               "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                              "stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]}}},
    "list": {"type": "object", "additionalProperties": False, "required": ["topic", "items"],
             "properties": {"topic": NAME,
                            "items": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}}},
    "place": {"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"type": "object", "additionalProperties": False,
                                      "required": ["name", "country", "location"],
                                      "properties": {"name": NAME, "country": NAME,
                                                     "location": {"type": "object", "additionalProperties": False,
                                                                  "required": ["lat", "lon"],
                                                                  "properties": {"lat": {"type": "integer"},
                                                                                 "lon": {"type": "integer"}}}}}}},
    "recipe": {"$defs": {"step": {"type": "object", "additionalProperties": False, "required": ["action", "minutes"],
                                  "properties": {"action": NAME,
                                                 "minutes": {"type": "integer", "minimum": 1, "maximum": 60}}}},
               "type": "object", "additionalProperties": False, "required": ["dish", "steps", "difficulty"],
               "properties": {"dish": NAME, "difficulty": {"enum": ["easy", "medium", "hard"]},
                              "steps": {"type": "array", "items": {"$ref": "#/$defs/step"},
                                        "minItems": 1, "maxItems": 3}}},
}
PROMPTS = {
    "person": ["Describe a famous scientist.", "Who is Sherlock Holmes?", "Tell me about a chef you admire.",
               "Invent a character for a short story."],
    "review": ["Review this: the food was cold and the waiter was rude.", "I loved the movie, best of the year!",
               "The hotel was fine, nothing special.", "What do you think of a phone whose battery died in a day?"],
    "list": ["List some fruits.", "Name a few programming languages.", "What should I pack for a beach trip?",
             "Give me ideas for a rainy day."],
    "place": ["Where is the Eiffel Tower?", "Tell me about Tokyo.", "Describe the capital of Brazil.",
              "Which city hosts the Colosseum?"],
    "recipe": ["How do I make pancakes?", "How to boil an egg?", "Explain how to cook rice.",
               "How do I make a cup of tea?"],
}
CASES = [(name, prompt) for name, prompts in PROMPTS.items() for prompt in prompts]  # 20
MAX_TOKENS = 200  # room for any of these grammars to finish


def response_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def server():
    with Server("--served-model-name", "m", "--max-model-len", "1024") as s:
        yield s


def chat(server: Server, prompt: str, **body) -> dict:
    status, answer = server.post("/v1/chat/completions", {"model": "m", "messages": messages(prompt), "temperature": 0,
                                                          "max_tokens": MAX_TOKENS, **body})
    assert status == 200, answer
    return answer["choices"][0]


def streamed_chat(server: Server, prompt: str, **body) -> tuple[str, str]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    text, finish = "", None
    for c in client.chat.completions.create(model="m", messages=messages(prompt), temperature=0, max_tokens=MAX_TOKENS,
                                            stream=True, **body):
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
    return text, finish


def test_answers_match_their_schemas_streamed_or_not(server):
    with ThreadPoolExecutor(len(CASES) * 2) as pool:  # one batch: rows with and without grammars side by side
        whole = [pool.submit(chat, server, p, response_format=response_format(n)) for n, p in CASES]
        streamed = [pool.submit(streamed_chat, server, p, response_format=response_format(n)) for n, p in CASES]
        free = [pool.submit(chat, server, p) for _, p in CASES]
        whole, streamed, free = [[f.result() for f in fs] for fs in (whole, streamed, free)]
    for (name, prompt), choice, (text, finish) in zip(CASES, whole, streamed):
        content = choice["message"]["content"]
        assert choice["finish_reason"] == "stop", (prompt, content)
        jsonschema.validate(json.loads(content), SCHEMAS[name])
        assert (text, finish) == (content, "stop")  # greedy: the stream says the same
    # the constraint did the work: left free, the model mostly answers in prose
    assert sum(parses(c["message"]["content"]) for c in free) <= len(CASES) // 4


def test_json_object_and_completions(server):
    for prompt in ("Describe a cat.", "What is the weather like?"):
        choice = chat(server, prompt, response_format={"type": "json_object"})
        assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["message"]["content"]), dict)
    assert chat(server, "Say hi.", response_format={"type": "text"}, max_tokens=5)["finish_reason"] == "length"
    status, body = server.post("/v1/completions", {"model": "m", "prompt": "A list of colors:", "temperature": 0,
                                                   "max_tokens": MAX_TOKENS, "response_format": response_format("list")})
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop", body
    jsonschema.validate(json.loads(body["choices"][0]["text"]), SCHEMAS["list"])


@pytest.mark.parametrize("path,schema,problem", [
    ("chat/completions", {"type": "foo"}, "foo"),
    ("completions", {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ("chat/completions", {"type": "string", "pattern": "(("}, "regex"),
    ("completions", {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, ""),  # no value satisfies it
])
def test_a_schema_that_does_not_compile_is_a_400(server, path, schema, problem):
    body = {"model": "m", "max_tokens": 5, "response_format": {"type": "json_schema",
                                                              "json_schema": {"name": "bad", "schema": schema}}}
    body |= {"messages": messages("hi")} if path.startswith("chat") else {"prompt": "hi"}
    status, answer = server.post(f"/v1/{path}", body)
    assert status == 400 and answer["error"]["param"] == "response_format", answer
    assert problem in answer["error"]["message"]
    assert chat(server, "hi", max_tokens=2)["finish_reason"] == "length"  # every TE still serves


def test_the_mask_allows_exactly_what_the_grammar_accepts(tokenizer):
    vocab = tokenizer.vocab_size
    grammars = Grammars(tokenizer.backend.to_str(), vocab, [tokenizer.backend.token_to_id(tokenizer.eos_token)])
    free, bound = Sequence("a", [1], 1, SamplingParams()), Sequence("b", [1], 1, SamplingParams())
    bound.grammar = grammars.new(json.dumps(SCHEMAS["review"]))
    bound.grammar.catch_up(tokenizer.encode('{"sentiment": "'))
    logits = torch.randn(2, vocab)
    got = constrain(logits, [free, bound])
    assert torch.equal(got[0], logits[0]) and constrain(logits, [free]) is logits  # no grammar: untouched, no work
    allowed = got[1].isfinite().nonzero().flatten().tolist()
    assert torch.equal(got[1][allowed], logits[1][allowed])
    texts = {tokenizer.decode([t]) for t in allowed}
    assert {"pos", "neg", "neutral"} & texts and all("positive".startswith(t) or "negative".startswith(t)
                                                      or "neutral".startswith(t) for t in texts), texts


def test_async_scheduling_pd_and_tp_give_the_same_json(model_path, weights, tokenizer):
    """The mask depends on the token before: async scheduling (that token still in flight) and a
    decode TE (the first token from the prefill TE) continue the matcher to the same answer; a
    TP master masks the logits its executors gather."""
    cases = CASES[::4]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(messages(p))) for _, p in cases]
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, json_schema=json.dumps(SCHEMAS[n])) for n, _ in cases]
    colocated = make_engine(model_path, weights, kv_cache_gb=0.2).generate(prompts, params)
    for (name, _), tokens in zip(cases, colocated):
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMAS[name])
    assert make_engine(model_path, weights, kv_cache_gb=0.2, async_scheduling=True).generate(prompts, params) == colocated
    with PDPair(make_engine(model_path, weights, kv_cache_gb=0.2), make_engine(model_path, weights, kv_cache_gb=0.2)) as pair:
        assert pair.run(prompts, params)[0] == colocated
    tp = make_engine(model_path, weights, kv_cache_gb=0.2, tensor_parallel_size=3)
    try:
        assert tp.generate(prompts, params) == colocated
    finally:
        tp.close()
