"""OpenAI response bodies and SSE chunks for chat and completion jobs (the outgoing half
of the wire format; `protocol.py` is the incoming half)."""
from scheduler.je import Job


def _choice(kind: str, index: int, text: str | None, finish: str | None, stream: bool, first: bool = False) -> dict:
    if kind == "completion":
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    if stream:
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish}


def _envelope(job: Job, stream: bool, choices: list[dict]) -> dict:
    obj = {("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk",
           ("completion", False): "text_completion", ("completion", True): "text_completion"}[job.kind, stream]
    prefix = "chatcmpl-" if job.kind == "chat" else "cmpl-"
    return {"id": prefix + job.id, "object": obj, "created": int(job.created), "model": job.model,
            "choices": choices}


def first_chunks(job: Job) -> list[dict]:
    """Chat streams open with one role-only chunk per choice."""
    if job.kind != "chat":
        return []
    return [_envelope(job, True, [_choice("chat", t.index, None, None, True, first=True)]) for t in job.tasks]


def chunk(job: Job, index: int, text: str, finish: str | None) -> dict:
    return _envelope(job, True, [_choice(job.kind, index, None if finish else text, finish, True)])


def usage_chunk(job: Job, usage: dict) -> dict:
    return {**_envelope(job, True, []), "usage": usage}


def full_response(job: Job, texts: list[str], finishes: list[str], usage: dict) -> dict:
    choices = [_choice(job.kind, i, texts[i], finishes[i], False) for i in range(len(texts))]
    return {**_envelope(job, False, choices), "usage": usage}
