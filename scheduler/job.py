"""Request -> job -> task (PAPER.md section 1): the units of work the scheduler moves.

An HTTP request triggers one Job (chat or completion). A Job is made of Tasks, one per
choice (`n`). On a PD-colocated TE a task is the whole generation. Disaggregated, a choice
is two tasks: the prefill task (prompt and first token, on a prefill TE) and its `decode`
task (the rest, on a decode TE), which share one event queue, so the JE (scheduler/je.py)
reads one stream of `TaskEvent`s either way. The cluster (scheduler/cluster.py) places
tasks, the TE handles (scheduler/te.py) fill their event queues. The states are explicit
so `/admin/cluster` can show where every job is and where it ran.
"""
import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum

from flowserve.protocol import Adapter, FinishReason, SamplingParams, TokenLogprob
from scheduler.tools import ToolPlan


class Overloaded(Exception):
    """The cluster holds as much work as it may: the request gets a 429."""


class State(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"


_ids = itertools.count()


@dataclass
class LogprobEntry:
    """A token's log probability as a client sees it: the token's text, its offset in the
    choice's text, and the top alternatives (`top` None: a prompt's first token, which nothing
    predicts, `logprob` None too)."""
    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None
    offset: int


@dataclass
class TaskEvent:
    """What a TE (or the cluster, for a task it could not place) reported for one task."""
    token_ids: list[int]
    finish_reason: FinishReason | None
    num_cached: int = 0
    error: str | None = None
    engine_lost: bool = False  # a TE died or a KV transfer failed: the task may be placed again if it sent nothing yet
    status: int = 400          # an error's HTTP status (503 where engine_lost)
    logprobs: list[TokenLogprob] | None = None                # one per token_ids entry, if asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, with the first token (echo)


@dataclass
class Task:
    job_id: str
    index: int                     # the choice index this task produces
    prompt_ids: list[int]
    params: SamplingParams
    id: str = field(default_factory=lambda: f"task-{next(_ids)}")
    state: State = State.QUEUED
    te_id: str | None = None
    retries: int = 0               # times it was placed again after its TE died
    placement: dict = field(default_factory=dict)  # why dist_sched chose its TE
    num_output: int = 0
    num_cached: int = 0
    finish_reason: FinishReason | None = None
    t_queued: float = 0.0          # when it last joined a pending queue (the placement bound)
    t_first_token: float | None = None
    t_done: float | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)
    decode: "Task | None" = None   # disaggregated: the task that continues on a decode TE
    cache_id: str | None = None    # its prompt starts with this context cache's
    pin: str | None = None         # a context cache's build (scheduler/caches.py)
    adapter: Adapter | None = None  # the LoRA adapter it runs with (scheduler/models.py)

    def to_dict(self) -> dict:
        return {"id": self.id, "index": self.index, "state": self.state.value, "te": self.te_id,
                "decode_te": self.decode and self.decode.te_id, "retries": self.retries, "placement": self.placement,
                "adapter": self.adapter and self.adapter.name, "prompt_tokens": len(self.prompt_ids),
                "cached_tokens": self.num_cached, "output_tokens": self.num_output, "finish_reason": self.finish_reason}


@dataclass
class Job:
    kind: str                      # chat | completion
    model: str
    echo: bool = False             # completions: the prompt's text (and logprobs) comes first
    tools: ToolPlan | None = None  # chat: the tools its answers may call
    tasks: list[Task] = field(default_factory=list)
    id: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex[:24]}")  # unique across restarts, as OpenAI's ids
    state: State = State.QUEUED
    created: float = field(default_factory=time.time)
    t_arrival: float = field(default_factory=time.monotonic)
    error: str | None = None
    out: asyncio.Queue | None = field(default=None, repr=False)      # deltas from the JE's workers
    workers: list[asyncio.Task] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "state": self.state.value, "created": self.created,
                "error": self.error, "tasks": [t.to_dict() for t in self.tasks]}
