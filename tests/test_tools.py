"""Tool calling: scheduler/tools.py's rendering, call schema, parsing and streaming on plain
strings, the request's validation (scheduler/api.py), and the official openai client against
the real server: a named or required tool_choice (enforced by the grammar, flowserve/grammar.py),
`auto` parsed from the model's text, a tool result continuing the conversation, streamed calls."""
import json

import jsonschema
import pytest

from flowserve.config import default_model_path
from flowserve.tokenizer import Tokenizer
from scheduler.api import APIError, parse_chat
from scheduler.tools import ToolCallStream, ToolPlan, hermes_messages, parse_calls
from tests.server_util import Server

openai = pytest.importorskip("openai")

WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "Get the local time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"],
                       "additionalProperties": False}}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
NAMES = {"get_weather", "get_time"}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def call_turn(city: str, call_id: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}]}


# --- parsing and rendering, on strings -----------------------------------------------------

@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>', "", [("get_time", '{"tz": "UTC"}')]),
    ('Let me look.\n<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}',   # the last one cut off by EOS
     "Let me look.", [("get_time", '{"tz": "UTC"}'), ("get_weather", '{"city": "Oslo"}')]),
    (' {"name": "get_time", "parameters": {"tz": "CET"}} ', "", [("get_time", '{"tz": "CET"}')]),   # bare, Llama 3.1's key
    ('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]', "",
     [("get_time", "{}"), ("get_weather", '{"city": "Rome"}')]),                                     # required's list
    ("The weather is fine.", "The weather is fine.", []),
    ('{"answer": 42}', '{"answer": 42}', []),                                                          # JSON, not a call
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "get_time", "arguments": {"tz": </tool_call>', '<tool_call>{"name": "get_time", "arguments": {"tz": </tool_call>', []),
    ('<tool_call>{"name": "get_time", "arguments": "UTC"}</tool_call>', '<tool_call>{"name": "get_time", "arguments": "UTC"}</tool_call>', []),
    ("[]", "[]", []),
    ('[{"name": "get_time", "arguments": {}}, {"name": "get_time", "argu', "",                        # cut off
     [("get_time", "{}")]),
    ('[{"name": "get_time", "argu', '[{"name": "get_time", "argu', []),
])
def test_parse_calls(text, content, calls):
    assert parse_calls(text, NAMES) == (content, calls)


def stream(plan: ToolPlan, pieces: list[str]) -> tuple[list[str], list]:
    s = ToolCallStream(plan)
    out = [s.push(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return [c for c, _ in out], [d for _, ds in out for d in ds]


def test_stream_auto_sends_text_at_once_and_holds_what_may_be_a_call():
    plan = ToolPlan([WEATHER, TIME], "auto")
    contents, calls = stream(plan, ["Sure", ", one moment. <tool", '_call>{"name": "get_time", ', '"arguments": {"tz": "UTC"}}',
                                    "</tool_call>"])
    assert contents == ["Sure", ", one moment. ", "", "", ""] and len(calls) == 1
    assert (calls[0].index, calls[0].name, calls[0].arguments) == (0, "get_time", '{"tz": "UTC"}')
    assert calls[0].id.startswith("call_")
    # "<" that does not grow into <tool_call> is sent with the next piece; a plain answer streams whole
    assert stream(plan, ["a <", "b", " c"]) == (["a ", "<b", " c"], [])
    # a JSON value as the first thing said is held to the end: here it is no call, so it is text
    assert stream(plan, ["  ", '{"a"', ": 1}"]) == (["", "", '  {"a": 1}'], [])


def test_stream_parallel_calls_and_their_limit():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert [d.index for d in stream(ToolPlan([TIME], "auto"), [text])[1]] == [0, 1]
    assert [d.index for d in stream(ToolPlan([TIME], "auto", parallel=False), [text])[1]] == [0]


def test_stream_named_call_is_its_arguments_as_they_come():
    contents, calls = stream(ToolPlan([WEATHER, TIME], "named", "get_weather"), ['{"city"', ': "Oslo"}', ""])
    assert contents == ["", "", ""]
    assert [(d.index, d.name, d.arguments) for d in calls] == [
        (0, "get_weather", ""), (0, None, '{"city"'), (0, None, ': "Oslo"}')]
    assert calls[0].id and not any(d.id for d in calls[1:])


def test_call_schemas_accept_the_calls_and_nothing_else():
    named = ToolPlan([WEATHER, TIME], "named", "get_weather").schema()
    assert named == WEATHER["parameters"]
    required = ToolPlan([WEATHER, TIME], "required", parallel=False).schema()
    jsonschema.validate([{"name": "get_time", "arguments": {"tz": "UTC"}}], required)
    for bad in ([], [{"name": "get_time", "arguments": {"city": "Oslo"}}], [{"name": "ls", "arguments": {}}],
                [{"name": "get_time", "arguments": {"tz": "UTC"}}] * 2):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    jsonschema.validate([{"name": "get_time", "arguments": {"tz": "UTC"}}] * 2, ToolPlan([TIME], "required").schema())
    assert ToolPlan([TIME], "auto").schema() is None


def test_a_function_without_parameters_takes_no_arguments():
    schema = ToolPlan([{"name": "now"}], "named", "now").schema()
    jsonschema.validate({}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"city": "Paris"}, schema)


def test_hermes_rendering_for_a_template_without_tools():
    tok = Tokenizer.load(default_model_path())
    assert not tok.template_takes_tools   # SmolLM2's ChatML template knows no tools
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Rome and Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
                    {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_call_id": "a", "content": "sunny"},
                {"role": "tool", "tool_call_id": "b", "content": "rain"}]
    prompt = tok.apply_chat_template(hermes_messages(messages, TOOLS))
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\nYou are a function calling AI model.")
    assert json.dumps(TOOLS[0]) in prompt and json.dumps(TOOLS[1]) in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>') in prompt
    assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n") in prompt
    assert hermes_messages(messages[:2], None) == messages[:2]   # no tools, no calls: as is


def test_a_template_with_tools_renders_them_itself():
    tok = Tokenizer(None, "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                          "{% for m in messages %}{{ m.role }}:{{ m.tool_calls[0].function.arguments.city if m.tool_calls else m.content }};{% endfor %}")
    assert tok.template_takes_tools
    messages = parse_chat({"messages": [{"role": "user", "content": "hi"}, call_turn("Rome", "c1")], "tools": TOOLS}).messages
    assert tok.apply_chat_template(messages, tools=TOOLS) == "[get_weather][get_time]user:hi;assistant:Rome;"


def test_requests_with_tools():
    req = parse_chat({"messages": [{"role": "user", "content": "hi"}, call_turn("Rome", "c1"),
                                   {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "tools": TOOLS})
    assert req.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome", "unit": "celsius"}
    assert req.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    assert req.tool_plan.mode == "auto" and req.to_sampling_params(9).json_schema is None
    named = parse_chat({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": NAMED})
    assert json.loads(named.to_sampling_params(9).json_schema) == WEATHER["parameters"]
    assert parse_chat({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": "none"}).tool_plan is None
    with pytest.raises(APIError) as e:   # the grammar could not enforce these arguments
        parse_chat({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]})
    assert (e.value.status, e.value.param) == (400, "tools[0].function.parameters")


# --- the real server, through the official client ------------------------------------------

@pytest.fixture(scope="module")
def client():
    with Server("--served-model-name", "m", "--max-model-len", "2048") as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def ask(client, **kw):
    return client.chat.completions.create(**{"model": "m", "tools": TOOLS, "temperature": 0, "max_tokens": 120, **kw})


def test_required_calls_cut_off_by_max_tokens_are_still_calls(client):
    """The small model repeats its call until `max_tokens`; the whole calls are returned."""
    r = ask(client, messages=ASK, tools=[{"type": "function", "function": {"name": "now"}}], tool_choice="required",
            max_tokens=30)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "length" and not msg.content and msg.tool_calls
    assert all(c.function.name == "now" and c.function.arguments == "{}" for c in msg.tool_calls)


@pytest.mark.parametrize("choice,function", [(NAMED, WEATHER), ("required", None)])
def test_enforced_tool_choice_returns_valid_calls(client, choice, function):
    r = ask(client, messages=ASK, tool_choice=choice, parallel_tool_calls=False)
    msg, declared = r.choices[0].message, {f["name"]: f for f in (WEATHER, TIME)}
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == (function or declared[call.function.name])["name"]
    jsonschema.validate(json.loads(call.function.arguments), declared[call.function.name]["parameters"])


def test_streamed_named_call_equals_the_whole_one(client):
    whole = ask(client, messages=ASK, tool_choice=NAMED).choices[0].message.tool_calls[0]
    chunks = list(ask(client, messages=ASK, tool_choice=NAMED, stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    first, rest = deltas[0], deltas[1:]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function", "get_weather", "")
    assert first.id.startswith("call_") and rest and all(d.id is None and d.function.name is None for d in rest)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with client.chat.completions.stream(model="m", tools=TOOLS, temperature=0, max_tokens=120, messages=ASK,
                                        tool_choice=NAMED) as s:   # the client's own accumulation
        streamed = s.get_final_completion().choices[0].message.tool_calls[0]
    assert (streamed.function.name, streamed.function.arguments) == (whole.function.name, whole.function.arguments)
    assert "".join(d.function.arguments for d in rest) == whole.function.arguments


def test_auto_calls_a_tool_when_the_conversation_shows_how(client):
    """The 135M model does not call tools from the system prompt alone; one earlier call in the
    conversation (as an agent's history has) makes it reliable under greedy decoding."""
    history = [{"role": "user", "content": "What is the weather in Rome?"}, call_turn("Rome", "call_1")]
    r = ask(client, messages=history + ASK)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls and len(calls) == 1
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments)["city"] == "Paris"


def test_tool_result_continues_the_conversation(client):
    messages = ASK + [call_turn("Paris", "call_7"),
                      {"role": "tool", "tool_call_id": "call_7", "content": '{"temperature": 18, "sky": "cloudy"}'}]
    r = ask(client, messages=messages)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.strip()


def test_no_call_is_a_plain_answer(client):
    for choice in ("auto", "none"):
        r = ask(client, messages=[{"role": "user", "content": "Say hello."}], tool_choice=choice, max_tokens=20)
        assert not r.choices[0].message.tool_calls and r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("tools,choice,param", [
    ([{"type": "function", "function": {"name": "get weather"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "get_weather()"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, "tools[0].function.name"),
    (TOOLS, {"type": "function", "function": {"name": "get_news"}}, "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_are_400_with_the_param(client, tools, choice, param):
    kw = {k: v for k, v in (("tools", tools), ("tool_choice", choice)) if v is not None}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, **kw)
    assert e.value.status_code == 400 and e.value.param == param
