"""Unit tests for scheduler/api.py: OpenAI request parsing and validation, the response
bodies as they go on the wire, and the OpenAPI document generated from its models (no server)."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

import deepflow
from flowserve.protocol import FinishReason, SamplingParams
from scheduler.api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    FineTuningRequest,
    chunk,
    first_chunks,
    full_response,
    invalid,
    model_not_found,
    parse,
    parse_chat,
    parse_completion,
    parse_json,
    parse_scale,
    usage_chunk,
)
from scheduler.openapi import openapi
from tests.server_util import ROOT

HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f"}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def chat(**kw) -> dict:
    return {"model": "m", "messages": HI, **kw}


# (endpoint parser, body, expected param). Every one must be a 400 with a message.
BAD = [
    (parse_chat, [1, 2], None),
    (parse_chat, "hello", None),
    (parse_chat, {"model": "m"}, "messages"),
    (parse_chat, {"messages": []}, "messages"),
    (parse_chat, {"messages": "hi"}, "messages"),
    (parse_chat, {"messages": HI * 257}, "messages"),
    (parse_chat, {"messages": ["hi"]}, "messages[0]"),
    (parse_chat, {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    (parse_chat, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    (parse_chat, {"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages[0].tool_call_id"),
    (parse_chat, {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, "messages[0].tool_calls"),
    (parse_chat, {"messages": [{"role": "system", "content": None, "tool_calls": None}]}, "messages[0].content"),  # fuzzing found a 500
    (parse_chat, {"messages": [{"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "f", "arguments": "{oops"}}]}]}, "messages[0].tool_calls"),
    (parse_chat, {"messages": [{"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "f", "arguments": {"a": 1}}}]}]}, "messages[0].tool_calls[0]"),
    (parse_chat, {"messages": [{"content": "x"}]}, "messages[0].role"),
    (parse_chat, {"messages": [{"role": "user"}]}, "messages[0].content"),
    (parse_chat, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (parse_chat, {"messages": [*HI, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[1].content[0]"),
    (parse_chat, {"messages": [{"role": "assistant", "content": None,
                                "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls[0]"),
    (parse_chat, chat(model=3), "model"),
    (parse_chat, chat(max_tokens=0), "max_tokens"),
    (parse_chat, chat(max_tokens=True), "max_tokens"),
    (parse_chat, chat(max_tokens=2.5), "max_tokens"),
    (parse_chat, chat(max_tokens=1_000_001), "max_tokens"),
    (parse_chat, chat(max_tokens=10, max_completion_tokens=-1), "max_completion_tokens"),
    (parse_chat, chat(temperature=2.5), "temperature"),
    (parse_chat, chat(temperature=-0.1), "temperature"),
    (parse_chat, chat(temperature="1"), "temperature"),
    (parse_chat, chat(temperature=False), "temperature"),
    (parse_chat, chat(temperature=float("nan")), "temperature"),
    (parse_chat, chat(top_p=0), "top_p"),
    (parse_chat, chat(top_p=1.01), "top_p"),
    (parse_chat, chat(top_k=-2), "top_k"),
    (parse_chat, chat(top_k=1.5), "top_k"),
    (parse_chat, chat(n=0), "n"),
    (parse_chat, chat(n=17), "n"),
    (parse_chat, chat(seed=True), "seed"),
    (parse_chat, chat(seed=2**63), "seed"),
    (parse_chat, chat(stop=5), "stop"),
    (parse_chat, chat(stop=""), "stop"),
    (parse_chat, chat(stop=["a", ""]), "stop"),
    (parse_chat, chat(stop=["a", 1]), "stop"),
    (parse_chat, chat(stop=["s"] * 17), "stop"),
    (parse_chat, chat(stream="true"), "stream"),
    (parse_chat, chat(stream_options={"include_usage": True}), "stream_options"),
    (parse_chat, chat(stream=False, stream_options={}), "stream_options"),
    (parse_chat, chat(stream=True, stream_options=[]), "stream_options"),
    (parse_chat, chat(stream=True, stream_options={"include_usage": 1}),
     "stream_options.include_usage"),
    (parse_chat, chat(user=7), "user"),
    (parse_chat, chat(ignore_eos="yes"), "ignore_eos"),
    (parse_chat, chat(stop_token_ids=[1, -1]), "stop_token_ids"),
    (parse_chat, chat(stop_token_ids=[True]), "stop_token_ids"),
    (parse_chat, chat(stop_token_ids=3), "stop_token_ids"),
    (parse_chat, chat(presence_penalty=2.5), "presence_penalty"),
    (parse_chat, chat(frequency_penalty=-3), "frequency_penalty"),
    (parse_chat, chat(logprobs=1), "logprobs"),
    (parse_chat, chat(top_logprobs=21), "top_logprobs"),
    (parse_chat, chat(logit_bias={"50256": -101}), "logit_bias"),
    (parse_chat, chat(tools=[{"type": "function", "function": {"name": "get weather"}}]), "tools[0].function.name"),
    (parse_chat, chat(tools=[{"type": "function", "function": {"name": "f" * 65}}]), "tools[0].function.name"),
    (parse_chat, chat(tools=[{"type": "function", "function": {"name": ""}}]), "tools[0].function.name"),
    (parse_chat, chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools[0].type"),
    (parse_chat, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
     "tools[0].function.parameters"),
    (parse_chat, chat(tools=[TOOL, TOOL]), "tools"),
    (parse_chat, chat(tool_choice="auto"), "tool_choice"),
    (parse_chat, chat(tools=[TOOL], tool_choice="always"), "tool_choice"),
    (parse_chat, chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
    (parse_chat, chat(tools=[TOOL], parallel_tool_calls="no"), "parallel_tool_calls"),
    (parse_chat, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
     "response_format"),
    (parse_chat, chat(functions=[{"name": "f"}]), "functions"),
    (parse_completion, {"model": "m"}, "prompt"),
    (parse_completion, {"prompt": ""}, "prompt"),
    (parse_completion, {"prompt": []}, "prompt"),
    (parse_completion, {"prompt": [[]]}, "prompt"),
    (parse_completion, {"prompt": 42}, "prompt"),
    (parse_completion, {"prompt": ["a", "b"]}, "prompt"),
    (parse_completion, {"prompt": [[1, 2], [3]]}, "prompt"),
    (parse_completion, {"prompt": [1, "a"]}, "prompt"),
    (parse_completion, {"prompt": [1, -2]}, "prompt"),
    (parse_completion, {"prompt": [1, True]}, "prompt"),
    (parse_completion, {"prompt": "x", "echo": "yes"}, "echo"),
    (parse_completion, {"prompt": "x", "best_of": 2}, "best_of"),
    (parse_completion, {"prompt": "x", "suffix": "end"}, "suffix"),
    (parse_completion, {"prompt": "x", "logprobs": 6}, "logprobs"),
    (parse_completion, {"prompt": "x", "max_tokens": -5}, "max_tokens"),
    (parse_scale, [], None),
    (parse_scale, {"group": "colocated"}, "instances"),
    (parse_scale, {"instances": 257}, "instances"),
    (parse_scale, {"instances": True}, "instances"),
    (parse_scale, {"instances": 1.0}, "instances"),
    (parse_scale, {"group": 1, "instances": 1}, "group"),
]


@pytest.mark.parametrize("parse,body,param", BAD,
                         ids=[f"{i}-{p or 'body'}" for i, (_, _, p) in enumerate(BAD)])
def test_bad_bodies_are_400(parse, body, param):
    with pytest.raises(APIError) as e:
        parse(body)
    err = e.value
    assert err.status == 400
    assert err.param == param
    assert err.message and isinstance(err.message, str)
    assert err.body().model_dump() == {"error": {"message": err.message, "type": "invalid_request_error",
                                                 "param": param, "code": None}}


def test_fine_tuning_suffix_is_supported_so_its_error_says_the_rule():
    with pytest.raises(APIError) as e:
        parse(FineTuningRequest, {"model": "m", "training_file": "file-1", "suffix": "x" * 65})
    assert e.value.param == "suffix" and "not supported" not in e.value.message and "64" in e.value.message


def test_response_ids_are_not_reused_by_the_next_server_process():
    """A completion's id is "chatcmpl-" + its job's id: a restarted server must not hand out the same ones."""
    def first_id() -> str:
        return subprocess.run([sys.executable, "-c", "from scheduler.job import Job; print(Job('chat', 'm').id)"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert first_id() != first_id()


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe{}", b"{\"a\": ", b"[1, 2]", b"\"s\"", b"null",
                                 b"{\"a\": NaN}"])
def test_parse_json_rejects(raw):
    with pytest.raises(APIError) as e:
        parse_json(raw)
    assert e.value.status == 400 and e.value.message


def test_parse_json_messages_say_what_is_wrong():
    with pytest.raises(APIError, match="UTF-8"):
        parse_json(b"{\"a\": \"\xff\"}")
    with pytest.raises(APIError, match="JSON"):
        parse_json(b"{oops}")
    assert parse_json(b"{\"a\": [1, \"\xc3\xa9\"]}") == {"a": [1, "\u00e9"]}


def test_chat_minimal_defaults():
    req = parse_chat({"messages": HI})
    assert req == ChatRequest(messages=HI) and req.model is None
    assert req.to_sampling_params(100) == SamplingParams(max_tokens=100) and req.ignored_fields == []
    assert req.max_new_tokens is None and req.n == 1 and req.stop_strings == [] and not req.stream


def test_chat_full_body():
    body = {
        "model": "smollm2",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "text", "text": "b"}], "name": "bob"},
            {"role": "assistant", "content": None},
            {"role": "assistant"},
            {"role": "user", "content": ""},
        ],
        "max_tokens": 100, "max_completion_tokens": 7,
        "temperature": 0, "top_p": 0.5, "top_k": 0, "n": 2, "seed": -3,
        "stop": "\n\n", "stop_token_ids": [2, 0], "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": 1},
        "user": "u1",
        "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "logit_bias": {},
        "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
        "top_logprobs": None, "metadata": {"k": "v"}, "store": False,
    }
    req = parse_chat(body)
    assert req.model == "smollm2"
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": ""},
    ]
    assert req.max_new_tokens == 7 and req.n == 2 and req.stop_strings == ["\n\n"]
    assert [req.to_sampling_params(7, i) for i in range(2)] == [SamplingParams(
        temperature=0.0, top_p=0.5, top_k=-1, seed=seed, max_tokens=7, stop_token_ids=[2, 0], ignore_eos=True)
        for seed in (-3, -2)]  # n choices from one seed differ
    assert isinstance(req.to_sampling_params(7).temperature, float)
    assert req.stream and req.include_usage and req.user == "u1"
    assert req.ignored_fields == ["metadata", "store"]


def test_max_tokens_alone_and_nulls_mean_default():
    req = parse_chat(chat(max_tokens=5, max_completion_tokens=None, temperature=None,
                          stop=None, stream_options=None, seed=None))
    assert req.max_new_tokens == 5 and req.to_sampling_params(5) == SamplingParams(max_tokens=5)
    assert req.stop_strings == [] and not req.include_usage


def test_streaming_without_usage_option():
    req = parse_chat(chat(stream=True))
    assert req.stream and not req.include_usage


def test_chat_lists_prompt_as_ignored():
    assert parse_chat(chat(prompt="x", echo=True)).ignored_fields == ["prompt", "echo"]


def test_completion_text_and_defaults():
    req = parse_completion({"model": "m", "prompt": "Once upon", "echo": False, "best_of": 1})
    assert req == CompletionRequest(model="m", prompt="Once upon", echo=False, best_of=1)
    assert req.max_new_tokens == 16 and req.to_sampling_params(16) == SamplingParams(max_tokens=16)
    assert req.ignored_fields == []


@pytest.mark.parametrize("prompt,expected", [
    ([1, 2, 3], [1, 2, 3]),
    (["one prompt"], "one prompt"),
    ([[5, 6]], [5, 6]),
])
def test_completion_prompt_forms(prompt, expected):
    req = parse_completion({"prompt": prompt, "max_tokens": 3, "stop": ["x", "y"]})
    assert req.prompt == expected
    assert req.max_new_tokens == 3 and req.stop_strings == ["x", "y"]


def test_completion_lists_messages_as_ignored():
    req = parse_completion({"prompt": "p", "messages": HI, "stream": True,
                            "stream_options": {"include_usage": False}})
    assert req.ignored_fields == ["messages"] and req.stream and not req.include_usage


def test_parsing_does_not_share_mutable_defaults():
    a = parse_chat(chat())
    a.stop_strings.append("zzz")
    a.to_sampling_params(5).stop_token_ids.append(1)
    b = parse_chat(chat())
    assert a.stop_strings == b.stop_strings == [] and b.to_sampling_params(5).stop_token_ids == []


def test_error_kinds():
    assert invalid("bad", "x").body().model_dump() == {"error": {
        "message": "bad", "type": "invalid_request_error", "param": "x", "code": None}}
    e = model_not_found("gpt-9")
    assert (e.status, e.type, e.param, e.code) == (404, "invalid_request_error", "model",
                                                   "model_not_found")
    assert "gpt-9" in e.message
    assert APIError(404, "no such route").code == "not_found"
    kinds = {s: (APIError(s, "m").type, APIError(s, "m").code) for s in (401, 413, 429, 503)}
    assert kinds == {401: ("authentication_error", "invalid_api_key"),
                     413: ("invalid_request_error", "request_too_large"),
                     429: ("rate_limit_error", "rate_limit_exceeded"),
                     503: ("server_error", "service_unavailable")}
    assert str(APIError(500, "boom")) == "boom"


def test_scale_body():
    req = parse_scale({"instances": 0})
    assert (req.group, req.instances) == ("colocated", 0)
    req = parse_scale({"group": "decode", "instances": 256, "note": "x"})
    assert (req.group, req.instances) == ("decode", 256)


@pytest.mark.parametrize("auth", [True, False])
def test_openapi_document(auth):
    doc = openapi("m", 96, auth)
    assert doc["openapi"] == "3.1.0" and "96" in doc["info"]["description"]
    ops = {(method.upper(), path): op for path, item in doc["paths"].items() for method, op in item.items()}
    app = deepflow.build_app(None, None, None, None, None, deepflow.Frontend(None, 1, "*"))
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    assert set(ops) == routes and len(routes) == 31     # every route the server has, and only those
    for (method, path), op in ops.items():
        guarded = path.startswith("/v1/") or (method, path) == ("POST", "/admin/scale")
        assert ("security" in op) == ("401" in op["responses"]) == (auth and guarded), path
        assert "503" in op["responses"] or not guarded, path    # draining
    body = ops["POST", "/admin/scale"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ScaleRequest"}
    assert ops["GET", "/health"]["responses"].keys() == {"200", "503"}
    assert "text/plain" in ops["GET", "/metrics"]["responses"]["200"]["content"]
    text, schemas = json.dumps(doc), doc["components"]["schemas"]
    assert "$defs" not in text and ("securitySchemes" in doc["components"]) == auth
    refs = {r.split('"')[0] for r in text.split('"#/components/schemas/')[1:]}
    assert refs <= schemas.keys() and {"ErrorResponse", "ChatMessage", "ChatRequest", "CompletionRequest",
                                           "ChatCompletion", "Completion", "Usage", "ModelList"} <= refs
    chat = schemas["ChatRequest"]
    assert chat["required"] == ["messages"] and chat["properties"]["n"]["maximum"] == 16
    ok = ops["POST", "/v1/chat/completions"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert "text/event-stream" in ok and "$ref" in json.dumps(ops["GET", "/v1/models"]["responses"]["200"])


def _job(kind: str, n: int = 1):
    return SimpleNamespace(kind=kind, id="job-7", created=1700000000.5, model="m",
                           tasks=[SimpleNamespace(index=i) for i in range(n)])


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}
HEAD = b'"created":1700000000,"model":"m"'


def test_chat_bodies_on_the_wire():
    """OpenAI's shapes byte for byte: `logprobs` null, a delta holds only what it has, a chunk
    has `usage` only when asked, and every chunk of one stream has the same id."""
    job = _job("chat", n=2)
    events = [*first_chunks(job), chunk(job, 1, "Hi", None), chunk(job, 1, "", FinishReason.STOP),
              usage_chunk(job, USAGE)]
    wire = [e.model_dump_json().encode() for e in events]
    head = b'{"id":"chatcmpl-job-7","object":"chat.completion.chunk",' + HEAD
    assert wire == [
        head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}',
        head + b',"choices":[{"index":1,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}',
        head + b',"choices":[{"index":1,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}',
        head + b',"choices":[{"index":1,"delta":{},"logprobs":null,"finish_reason":"stop"}]}',
        head + b',"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,'
               b'"prompt_tokens_details":{"cached_tokens":0}}}']
    whole = full_response(job, ["a", "b\u00e9"], [FinishReason.STOP, FinishReason.LENGTH], USAGE)
    assert whole.model_dump() == {
        "id": "chatcmpl-job-7", "object": "chat.completion", "created": 1700000000, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a"}, "logprobs": None,
                     "finish_reason": "stop"},
                    {"index": 1, "message": {"role": "assistant", "content": "b\u00e9"}, "logprobs": None,
                     "finish_reason": "length"}],
        "usage": USAGE}


def test_completion_bodies_on_the_wire():
    job = _job("completion")
    head = b'{"id":"cmpl-job-7","object":"text_completion",' + HEAD
    assert first_chunks(job) == []
    assert [e.model_dump_json().encode() for e in (chunk(job, 0, "Hi", None), chunk(job, 0, "", FinishReason.LENGTH))] == [
        head + b',"choices":[{"index":0,"text":"Hi","logprobs":null,"finish_reason":null}]}',
        head + b',"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"length"}]}']
    assert full_response(job, ["Hi"], ["stop"], USAGE).model_dump_json().encode() == (
        head + b',"choices":[{"index":0,"text":"Hi","logprobs":null,"finish_reason":"stop"}],"usage":'
               b'{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":0}}}')


def test_fine_tuning_metadata_is_kept_within_openai_limits():
    ok = {"model": "m", "training_file": "file-1", "metadata": {"team": "pirates"}}
    assert parse(FineTuningRequest, ok).metadata == {"team": "pirates"}
    with pytest.raises(APIError) as e:
        parse(FineTuningRequest, {**ok, "metadata": {str(i): "v" for i in range(17)}})
    assert e.value.param == "metadata"
