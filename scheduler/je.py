"""The job executors (JEs, PAPER.md section 1): an HTTP request in, its Job run, text out.

The chat JE applies the chat template, the completion JE takes the prompt as is; both
tokenize here in the main process (TEs see token ids only), put a context cache's context
first when the request names one (`cache_id`, scheduler/caches.py), check the prompt against
the context length, and build the Job. `start` submits its tasks to the cluster
(scheduler/cluster.py: `dist_sched` places them), and a worker per task turns the TE's token
events into text with an incremental detokenizer and `StopStrings` (and a chat's tool calls
from that text, scheduler/tools.py); `stream` yields the resulting `Delta`s for the frontend
to format. Whatever ends the job (finish, error, a client that went away), `close` aborts
its unfinished tasks in their TEs.
"""
import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal

from flowserve.protocol import Adapter, FinishReason, TokenLogprob
from flowserve.tokenizer import Detokenizer, Tokenizer
from scheduler.caches import ContextCaches
from scheduler.cluster import Cluster
from scheduler.job import Job, LogprobEntry, Overloaded, State, Task
from scheduler.metrics import Metrics
from scheduler.api import (APIError, CacheRequest, ChatCompletion, ChatRequest, Completion, CompletionRequest,
                           GenerationRequest, full_response, invalid)
from scheduler.tools import CallDelta, ToolCallStream, hermes_messages

log = logging.getLogger("deepflow.je")

MAX_RETRIES = 2  # placements after a TE death, for a task that has sent no token yet


@dataclass
class Delta:
    index: int
    text: str
    finish_reason: FinishReason | Literal["tool_calls"] | None = None
    logprobs: list[LogprobEntry] | None = None   # its tokens' (they may run ahead of the text held back)
    tool_call: CallDelta | None = None           # one fragment a delta, as OpenAI streams them


class StopStrings:
    """Cuts a choice's text at the first of its stop strings. A stop string may arrive split
    over several tokens, so the tail that could still grow into one is held back until the
    next text shows it does not (or the text ends)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1
        self.text, self.sent = "", 0

    def push(self, new_text: str, final: bool = False) -> tuple[str, bool]:
        """The text now safe to send, and whether a stop string ended the choice. `final`:
        no more text comes, so nothing is held back."""
        self.text += new_text
        # Text before `sent - hold` was already searched in full; a match starts at `sent` or later.
        found = [i for i in (self.text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0]
        if found:
            self.text, final = self.text[:min(found)], True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out, bool(found)


class JobExecutor:
    def __init__(self, cluster: Cluster, tokenizer: Tokenizer, model_name: str, metrics: Metrics,
                 caches: ContextCaches):
        self.cluster, self.tok, self.model_name, self.metrics = cluster, tokenizer, model_name, metrics
        self.caches = caches
        self.active: dict[str, Job] = {}
        self.recent: deque[Job] = deque(maxlen=64)

    def chat_job(self, req: ChatRequest, adapter: Adapter | None = None) -> Job:
        """A chat request on a context cache is the cached messages, then its own: the same
        conversation as sent whole, tokenized whole."""
        cache = req.cache_id and self.caches.get(req.cache_id, "chat")
        messages = cache.context + req.messages if cache else req.messages
        tools = req.tool_plan and req.tool_plan.prompt_tools
        job = self._job("chat", self.tok.encode(self._template(messages, "messages", tools=tools)), req, "messages",
                        cache and cache.id, adapter)
        job.tools = req.tool_plan
        return job

    def completion_job(self, req: CompletionRequest, adapter: Adapter | None = None) -> Job:
        """A completion on a context cache prompts with the cached prompt, then its own (the
        texts joined, or the token ids, where either is ids)."""
        cache = req.cache_id and self.caches.get(req.cache_id, "completion")
        if cache and isinstance(cache.context, str) and isinstance(req.prompt, str):
            prompt = self._prompt_ids(cache.context + req.prompt)
        else:
            prompt = (cache.token_ids if cache else []) + self._prompt_ids(req.prompt)
        job = self._job("completion", prompt, req, "prompt", cache and cache.id, adapter)
        job.echo = req.echo
        return job

    def context_tokens(self, req: CacheRequest) -> tuple[str, list[dict] | str | list[int], list[int]]:
        """A context cache's kind (the endpoint it prefixes), context and token ids: chat
        messages templated without the assistant's turn, as they start a longer conversation."""
        if req.messages is not None:
            kind, context, prompt = "chat", req.messages, self.tok.encode(
                self._template(req.messages, "messages", add_generation_prompt=False))
        else:
            kind, context, prompt = "completion", req.prompt, self._prompt_ids(req.prompt)
        self._check_length(prompt, "messages" if kind == "chat" else "prompt")
        return kind, context, prompt

    def _template(self, messages: list[dict], param: str, add_generation_prompt: bool = True,
                  tools: list[dict] | None = None) -> str:
        """The conversation as the model's template shows it, tools and calls included (in
        scheduler/tools.py's Hermes format when the template has none of its own)."""
        if not self.tok.template_takes_tools:
            messages, tools = hermes_messages(messages, tools), None
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt, tools)
        except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
            raise invalid(f"chat template rejected the messages: {e}", param) from e

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tok.encode(prompt)
        if max(prompt) >= self.tok.vocab_size:
            raise invalid(f"token id {max(prompt)} is outside the vocabulary ({self.tok.vocab_size})", "prompt")
        return prompt

    def _check_length(self, prompt: list[int], param: str) -> None:
        limit = self.cluster.max_model_len
        if not prompt:
            raise invalid("the prompt is empty", param)
        if len(prompt) >= limit:
            raise invalid(f"This model's maximum context length is {limit} tokens. However, your "
                          f"request has {len(prompt)} prompt tokens.", param)

    def _job(self, kind: str, prompt: list[int], req: GenerationRequest, param: str, cache_id: str | None,
             adapter: Adapter | None) -> Job:
        self._check_length(prompt, param)
        limit = self.cluster.max_model_len
        if req.logit_bias and max(req.logit_bias) >= self.tok.vocab_size:
            raise invalid(f"token id {max(req.logit_bias)} is outside the vocabulary ({self.tok.vocab_size})",
                          "logit_bias")
        max_tokens = req.max_new_tokens or limit - len(prompt)
        if len(prompt) + max_tokens > limit:
            raise invalid(f"max_tokens={max_tokens} plus {len(prompt)} prompt tokens exceeds the "
                          f"context length of {limit}", "max_tokens")
        job = Job(kind, adapter.name if adapter else self.model_name)
        job.tasks = [Task(job.id, i, prompt, req.to_sampling_params(max_tokens, i), cache_id=cache_id, adapter=adapter)
                     for i in range(req.n)]
        return job

    def start(self, job: Job, stop: list[str]) -> None:
        """Admit the job and place its tasks on TEs; raises APIError 429 when at capacity."""
        try:
            self.cluster.admit(len(job.tasks))
        except Overloaded as e:
            raise APIError(429, f"{e}; retry shortly") from e
        self.active[job.id] = job
        self.recent.append(job)
        job.state = State.RUNNING
        job.out = asyncio.Queue()
        for task in job.tasks:
            self.cluster.submit(task)
        job.workers = [asyncio.create_task(self._choice(job, t, stop, job.out)) for t in job.tasks]

    async def stream(self, job: Job) -> AsyncIterator[Delta]:
        """The job's deltas until every choice has finished. Closing it early (a client
        that went away) aborts what is still running."""
        try:
            done = 0
            while done < len(job.tasks):
                item = await job.out.get()
                if isinstance(item, APIError):
                    raise item
                done += item.finish_reason is not None
                yield item
            job.state = State.FINISHED
            self.metrics.job_done(job, self.model_name)
            self.cluster.learn_decode_lengths(job.tasks)
        except APIError as e:
            job.state, job.error = State.FAILED, e.message
            raise
        finally:
            self.close(job)

    async def complete(self, job: Job) -> ChatCompletion | Completion:
        """A started job's whole answer, once every choice has finished."""
        texts, finishes = [""] * len(job.tasks), [""] * len(job.tasks)
        logprobs = [[] if t.params.logprobs is not None else None for t in job.tasks]
        calls: list[list[CallDelta]] = [[] for _ in job.tasks]
        async with aclosing(self.stream(job)) as deltas:
            async for d in deltas:
                texts[d.index] += d.text
                finishes[d.index] = d.finish_reason or finishes[d.index]
                calls[d.index] += [d.tool_call] if d.tool_call else []
                if d.logprobs:
                    logprobs[d.index] += d.logprobs
        return full_response(job, texts, finishes, self.usage(job), logprobs, calls)

    def close(self, job: Job) -> None:
        for w in job.workers:
            w.cancel()
        unfinished = [t for t in job.tasks if t.state in (State.QUEUED, State.RUNNING)]
        for t in unfinished:
            t.state = State.ABORTED
        self.cluster.abort(unfinished)
        if job.state is State.RUNNING:
            job.state = State.ABORTED
        self.active.pop(job.id, None)

    def fail_all(self, message: str) -> None:
        """End every active job with an error (used when a drain times out)."""
        for job in self.active.values():
            job.out.put_nowait(APIError(503, message))

    async def _choice(self, job: Job, task: Task, stop: list[str], out: asyncio.Queue) -> None:
        """One choice: the TE's token events for `task` -> text (and tool call) `Delta`s on `out`."""
        detok, stops = Detokenizer(self.tok, task.prompt_ids), StopStrings(stop)
        calls = job.tools and ToolCallStream(job.tools)
        offset, echoed = 0, not job.echo  # offset: characters before the next token (completions' text_offset)
        while True:
            ev = await task.events.get()
            if ev.engine_lost and task.num_output == 0 and self._retry(task):
                continue
            if ev.finish_reason is FinishReason.ERROR:
                task.state = State.FAILED
                out.put_nowait(APIError(503 if ev.engine_lost else ev.status, ev.error or "engine error"))
                return
            if ev.token_ids and task.t_first_token is None:
                task.t_first_token = time.monotonic()
            task.num_output += len(ev.token_ids)
            task.num_cached = ev.num_cached
            if not echoed:  # completions' echo: the prompt first, with its logprobs if asked
                echoed = True
                entries, offset = self._logprobs(task.prompt_ids, ev.prompt_logprobs, offset)
                out.put_nowait(Delta(task.index, self.tok.decode(task.prompt_ids), logprobs=entries))
            entries, offset = self._logprobs(ev.token_ids, ev.logprobs, offset)
            text, stopped = stops.push(detok.push(ev.token_ids), final=ev.finish_reason is not None)
            text, fragments = calls.push(text, final=stopped or ev.finish_reason is not None) if calls else (text, [])
            if text or entries or fragments:
                out.put_nowait(Delta(task.index, text, logprobs=entries, tool_call=fragments[0] if fragments else None))
            for f in fragments[1:]:
                out.put_nowait(Delta(task.index, "", tool_call=f))
            if stopped or ev.finish_reason:
                if stopped and not ev.finish_reason:  # the TE is still generating
                    self.cluster.abort([task])
                task.state, task.t_done = State.FINISHED, time.monotonic()
                task.finish_reason = FinishReason.STOP if stopped else ev.finish_reason
                called = calls and calls.calls and task.finish_reason is FinishReason.STOP
                out.put_nowait(Delta(task.index, "", "tool_calls" if called else task.finish_reason))
                return

    def _logprobs(self, ids: list[int], lps: list[TokenLogprob | None] | None, offset: int
                  ) -> tuple[list[LogprobEntry] | None, int]:
        """The TE's logprobs of `ids` (None if not asked) as the client sees them, and the offset past them."""
        if lps is None:
            return None, offset
        entries = []
        for token_id, lp in zip(ids, lps):
            text = self.tok.token_text(token_id)
            top = None if lp is None else [(self.tok.token_text(i), x) for i, x in zip(lp.top_ids, lp.top_logprobs)]
            entries.append(LogprobEntry(text, None if lp is None else lp.logprob, top, offset))
            offset += len(text)
        return entries, offset

    def _retry(self, task: Task) -> bool:
        """A task whose TE was lost before it sent a token: place it again, unseen by the
        client. False when it has been retried enough or nothing can take it."""
        if task.retries >= MAX_RETRIES:
            return False
        try:
            self.cluster.resubmit(task)
            return True
        except Overloaded:
            return False

    def usage(self, job: Job) -> dict:
        prompt, completion = len(job.tasks[0].prompt_ids), sum(t.num_output for t in job.tasks)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": job.tasks[0].num_cached}}

    def to_dict(self) -> dict:
        return {"active": len(self.active), "context_caches": self.caches.to_dict(),
                "recent_jobs": [j.to_dict() for j in reversed(self.recent)]}
