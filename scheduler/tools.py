"""Tool calling (OpenAI's `tools`, `tool_choice`): how a request's tools reach the prompt, what
the grammar enforces, and how a choice's text becomes `tool_calls`. Pure functions over the
dicts that chat templates read and the text the JE detokenizes; no I/O.

scheduler/api.py turns a chat request into a `ToolPlan`; the JE (scheduler/je.py) renders the
prompt with it (the chat template's own tool format, or `hermes_messages` when the template
has none), the grammar enforces `ToolPlan.schema` for `required` and a named function
(SamplingParams.json_schema), and a `ToolCallStream` per choice splits the generated text
into content and `CallDelta`s, the fragments OpenAI streams, which scheduler/api.py shapes.
"""
import json
import re
import uuid
from dataclasses import dataclass
from typing import Literal

CALL_OPEN = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)  # the last may be cut off by the end
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # declared without `parameters`: takes none

# The Hermes / Qwen2.5 convention, for templates that have no tool support of their own.
TOOLS_PROMPT = """You are a function calling AI model. You may call one or more functions to assist with the user query. Here are the available tools:
<tools>
{tools}
</tools>
For each function call, return a JSON object with the function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass
class ToolPlan:
    """A request's tools and how they must be used (`tool_choice` "none" has no plan)."""
    functions: list[dict]                           # {"name", "description"?, "parameters"?} each
    mode: Literal["auto", "required", "named"]
    name: str | None = None                         # named: the function it must call
    parallel: bool = True                           # more than one call per answer

    @property
    def names(self) -> set[str]:
        return {f["name"] for f in self.functions}

    @property
    def prompt_tools(self) -> list[dict]:
        """The tools as chat templates read them (transformers' `tools`)."""
        return [{"type": "function", "function": f} for f in self.functions]

    def schema(self) -> dict | None:
        """The JSON schema whose instances are the answer: a named function's arguments, or
        for `required` a list of {"name", "arguments"} calls (one unless parallel); None: auto."""
        if self.mode == "named":
            return next(f.get("parameters", NO_PARAMETERS) for f in self.functions if f["name"] == self.name)
        if self.mode == "auto":
            return None
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                    "arguments": f.get("parameters", NO_PARAMETERS)},
                  "required": ["name", "arguments"], "additionalProperties": False} for f in self.functions]
        return {"type": "array", "items": {"anyOf": calls}, "minItems": 1} | ({} if self.parallel else {"maxItems": 1})


def hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """A conversation with tools for a template that knows none: the tools in the system prompt
    (after the caller's own), each assistant call as a <tool_call> block in its content, and
    tool results as a user turn of <tool_response> blocks (consecutive results share one)."""
    out = []
    if tools:
        listing = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        system = [m["content"] for m in messages[:1] if m["role"] == "system"]
        out.append({"role": "system", "content": "\n\n".join(system + [listing])})
        messages = messages[len(system):]
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if i and messages[i - 1]["role"] == "tool":
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
        elif m.get("tool_calls"):
            calls = [f"{CALL_OPEN}\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>"
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([m["content"]] if m["content"] else []) + calls)})
        else:
            out.append(m)
    return out


def parse_calls(text: str, names: set[str]) -> tuple[str, list[tuple[str, str]]]:
    """The calls in a model's text, as (name, JSON arguments), and the text around them:
    <tool_call> blocks, or else the whole text as one JSON call or a list of calls
    ({"name", "arguments"}; "parameters" as Llama 3.1 says). A call that does not parse or
    names an undeclared function makes it all text, as is."""
    bodies = _BLOCK.findall(text)
    try:
        values = [json.loads(body) for body in bodies] or [_value(text)]
        calls = [_call(c, names) for v in values for c in (v if isinstance(v, list) else [v])]
    except (ValueError, TypeError, AttributeError):
        return text, []
    if not calls:
        return text, []
    return (_BLOCK.sub("", text).strip() if bodies else ""), calls


def _value(text: str) -> object:
    """The JSON value `text` is; for a list that `max_tokens` cut off (a model repeating its
    calls), its whole items."""
    try:
        return json.loads(text)
    except ValueError:
        text = text.lstrip()
        if not text.startswith("["):
            raise
    items, end, decoder = [], 1, json.JSONDecoder()
    while True:
        end = len(text) - len(text[end:].lstrip(", \n\t\r"))
        try:
            item, end = decoder.raw_decode(text, end)
        except ValueError:
            break
        items.append(item)
    if not items:
        raise ValueError(text)
    return items


def _call(call: dict, names: set[str]) -> tuple[str, str]:
    args = call.get("arguments", call.get("parameters"))
    if call.get("name") not in names or not isinstance(args, dict):
        raise ValueError(call)
    return call["name"], json.dumps(args, ensure_ascii=False)


@dataclass
class CallDelta:
    """A fragment of a choice's `index`-th tool call, as OpenAI streams them: the first has
    the id and name (and maybe no arguments yet), the rest add to its arguments."""
    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """One choice's text -> its content and tool calls, as early as they can be told apart.
    A named function: the text is its arguments (the grammar made them so), streamed as they
    come. Otherwise the text is content until it may start a call (<tool_call>, or a JSON
    value as the first thing said); from there it is held, and parsed when the choice ends."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text, self.sent, self.calls = "", 0, 0

    def push(self, new_text: str, final: bool) -> tuple[str, list[CallDelta]]:
        """The content now safe to send and the call fragments; `final`: the choice ended."""
        if self.plan.mode == "named":
            head = [] if self.calls else [CallDelta(0, "", call_id(), self.plan.name)]
            self.calls = 1
            return "", head + ([CallDelta(0, new_text)] if new_text else [])
        self.text += new_text
        if final:
            content, calls = parse_calls(self.text[self.sent:], self.plan.names)
            calls = calls if self.plan.parallel else calls[:1]
            self.calls = len(calls)
            return content, [CallDelta(i, args, call_id(), name) for i, (name, args) in enumerate(calls)]
        held = self._held()
        content, self.sent = self.text[self.sent:held], held
        return content, []

    def _held(self) -> int:
        """Where the text that may still become a call starts (its length: nowhere)."""
        text, start = self.text, self.text.find(CALL_OPEN, self.sent)
        if start >= 0:
            return start
        if self.sent == 0 and text.lstrip()[:1] in ("", "{", "["):
            return 0
        tail = text.rfind("<", self.sent)
        return tail if tail >= 0 and CALL_OPEN.startswith(text[tail:]) else len(text)
