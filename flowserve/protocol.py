"""Every message between DeepFlow's processes, defined once, and the one place they are framed.

- main process -> TE (`scheduler/te.py` -> `flowserve/te_shell.py`): `Add`, `Abort`, `Stop`,
  `Ping` (the heartbeat, answered by an empty `Step`), `Threads` (its host's TE count changed),
  `Unpin` (context caches), `Load` (to a pre-warmed TE); TE -> main: `Prewarmed`, `Ready`, then
  one `Step` per engine step (a `TokenOut` per request that moved, and the engine's `Stats`),
  and `Alive` twice a second from its liveness thread. On another host the TE's socket is TCP,
  and its first frame is `Hello`, carrying the secret the main process handed its node agent
  (`scaling/node_agent.py`). A TE that outlived the main process reconnects over TCP
  (`dial_main`) with `Hello` (the secret it made at start and reported in its `Ready`) and its
  `Ready` again, saying what it holds; the new main process's first `Ping` tells it that it was
  adopted.
- main process <-> warm template (`scaling/template.py`): `Fork`; `TemplateReady`, `Forked`.
- TP master <-> its executors (`flowserve/tp.py`, `flowserve/executor.py`): `ExecStart`,
  then `ExecStep`, `ExecKV`, `ExecLora`, `Threads`, each answered by `ExecDone` (but `Threads`).
- TE -> TE (DistFlow, `flowserve/distflow.py`), on a link that carries many transfers:
  `KVHeader`, the KV layer by layer, `KVTrailer` (the first token), answered by `KVAck`;
  `WeightsHeader` + every tensor's bytes.
- Whoever gets a frame it cannot decode answers `Error` and carries on.

A frame is a 4-byte big-endian length and a msgpack-encoded msgspec Struct tagged by its `op`.
msgspec decodes straight into the typed struct, checking every field, ~30x faster than
dataclasses + orjson on a step frame (bench/wire_frame.py). Never pickle: a socket is a
trust boundary. Torch-free: the main process imports it too.
"""
import asyncio
import socket
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Union

import msgspec

from flowserve.config import EngineConfig, ModelConfig, TELaunch

HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20


class FinishReason(str, Enum):
    """Why a request stopped in a TE. OpenAI clients see stop and length; abort, handoff (a
    prefill TE passed the request on to a decode TE) and error stay inside DeepFlow."""
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    HANDOFF = "handoff"
    ERROR = "error"


@dataclass
class SamplingParams:
    temperature: float = 1.0   # 0: greedy
    top_p: float = 1.0
    top_k: int = -1            # -1: off
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0               # EOS and stop_token_ids masked until this many are generated
    presence_penalty: float = 0.0     # OpenAI's: logit -= presence * (count > 0) + frequency * count,
    frequency_penalty: float = 0.0    # counting the generated tokens
    repetition_penalty: float = 1.0   # vLLM's: tokens of prompt and output, logit / it if > 0 else * it
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None       # each generated token's logprob and this many top ones (None: none)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions' echo)
    json_schema: str | None = None    # the output must match this JSON Schema (its text; `flowserve/grammar.py`)
    low_priority: bool = False        # batch work: yields to the others (flowserve/batcher.py), preempted first


class Message(msgspec.Struct, tag_field="op", forbid_unknown_fields=True):
    """A frame's body; each kind names its `op` tag (its name on the wire)."""


class Adapter(msgspec.Struct):
    """The LoRA adapter a request runs with (`flowserve/lora.py`): its name (for messages), the
    PEFT directory a TE reads it from, and its content digest (`LoraSpec.digest`), which names
    it in a TE's slots and seeds its prefix cache's hashes. A TE refuses files whose content
    no longer matches the digest."""
    name: str
    path: str
    digest: str


class Add(Message, tag="add"):
    """Run a request. `kv_to` (prefill TE): after its first token, send its KV to that decode
    TE's DistFlow address, where it is `kv_rid`. `await_kv` (decode TE): start it when its
    KV arrives. `cache_id`, `pin`: explicit context caching (`flowserve.rtc`)."""
    rid: str
    prompt: list[int]
    params: SamplingParams
    kv_to: str | None = None
    kv_rid: str | None = None
    kv_skip: int = 0                  # with kv_to: leading blocks the decode TE caches, not sent (whole blocks)
    await_kv: bool = False
    cache_id: str | None = None       # its prompt starts with this context cache's (MatchByID)
    pin: str | None = None            # a context cache's build: pin the prompt's blocks under this id
    adapter: Adapter | None = None    # a LoRA adapter (None: the base model)


class Abort(Message, tag="abort"):
    rids: list[str]


class Stop(Message, tag="stop"):
    pass


class Ping(Message, tag="ping"):
    pass


class Alive(Message, tag="alive"):
    """TE -> main process, twice a second from a thread of its own (`flowserve.te_shell.Liveness`),
    even while a long step runs: the process is alive, and has been in its current step (or
    command) for `busy_s` seconds (0: between steps). Only a frozen process falls silent."""
    busy_s: float


class Unpin(Message, tag="unpin"):
    """Release these context caches' pinned blocks (TTL ended, or deleted); answered by a `Step`."""
    cache_ids: list[str]


class Threads(Message, tag="threads"):
    """Use `n` torch threads: the host's cores are shared by however many TEs it runs now."""
    n: int


class Hello(Message, tag="hello"):
    """The first frame on a TE's TCP connection to the main process (who it is, and the
    secret made for its start), or on a weights fetch from a DistFlow donor (`te_id`
    "weights", the cluster's DistFlow secret)."""
    te_id: str
    secret: bytes


class Load(Message, tag="load"):
    """To a pre-warmed TE: become a TE of `model`, weights streamed from `weights_from` if set."""
    model: str
    engine_config: EngineConfig
    launch: TELaunch
    weights_from: str | None = None


class Stats(msgspec.Struct):
    """An engine's figures, and the prefix-cache blocks (chain hashes) its RTC indexed and
    evicted since the last report, which the scheduler's prompt tree mirrors."""
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    threads: int = 0
    cached: list[int] = []
    evicted: list[int] = []
    pinned_blocks: int = 0            # held by context caches
    # The RTC's DRAM tier: its pool, its cost model's rates (measured at start), and since start
    # the blocks copied there (evictions, swap-outs), copied back (Populate, swap-ins), found
    # there but left to recompute, and the preemptions that swapped instead of recomputing.
    dram_blocks_total: int = 0
    dram_blocks_free: int = 0
    copy_bytes_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    dram_copied: int = 0
    dram_populated: int = 0
    dram_recomputed: int = 0
    swaps: int = 0
    # LoRA: the digests of the adapters in this TE's slots (None: an empty slot), and since start
    # the adapters read from disk and copied into a slot, and the time those copies took.
    lora_slots: list[str | None] = []
    lora_disk_loads: int = 0
    lora_slot_loads: int = 0
    lora_slot_load_ms: float = 0.0


class TokenLogprob(msgspec.Struct, array_like=True):
    """A token's log probability (`flowserve/sampler.py`), and the most likely tokens at its
    position with theirs, best first."""
    logprob: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class TokenOut(msgspec.Struct, array_like=True):
    """One request's step: new tokens (not the stop/EOS token that ended it), why it finished
    (None while running), and the prompt tokens its prefix cache served. With
    `SamplingParams.logprobs`, one `TokenLogprob` per new token; with `prompt_logprobs`, once
    (with the first token) one per prompt token, the first None (nothing comes before it)."""
    rid: str
    token_ids: list[int]
    finish: FinishReason | None = None
    num_cached: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class StartTimings(msgspec.Struct):
    """A TE's own share of its start (PAPER.md section 4), in ms."""
    te_pre_load: float
    te_load: float
    te_post_load: float


class Prewarmed(Message, tag="prewarmed"):
    pid: int


class Ready(Message, tag="ready"):
    pid: int
    stats: Stats
    max_model_len: int
    timings_ms: StartTimings
    weights_bytes: int = 0            # its weights' size: a host counts them once while shared
    weights_addr: str | None = None   # DistFlow: where it streams its weights
    kv_addrs: list[str] = []          # DistFlow: where a decode TE takes KV (unix on its host, tcp)
    secret: bytes = b""               # what it proves itself with when it reconnects to a restarted main process
    pinned: list[str] = []            # the context caches it pins (when it reconnects)


class Step(Message, tag="step"):
    outs: list[TokenOut]
    stats: Stats
    error: str | None = None          # with an ERROR finish: what went wrong
    kv_ms: float | None = None        # with a HANDOFF finish: prefill end (first token) to the decode TE's ack
    kv_bytes: int | None = None       # with a HANDOFF finish: the KV payload bytes sent


class Fork(Message, tag="fork"):
    """Fork a TE; its socket comes along as SCM_RIGHTS (a socketpair's end, or a TCP
    connection to the main process that a node agent opened)."""
    te_id: str
    engine_config: EngineConfig
    launch: TELaunch


class Forked(Message, tag="forked"):
    te_id: str
    pid: int


class TemplateReady(Message, tag="template_ready"):
    pid: int
    load_ms: float


class KVHeader(Message, tag="kv_header"):
    """Opens one request's KV transfer: its payload (`ModelRunner.kv_shape` of the blocks past
    `kv_skip`) follows layer by layer, as bytes (tcp) or as a one-byte mark per layer of the
    memfd that came with this frame (unix); then a `KVTrailer`."""
    rid: str                          # the request's id on the decode TE
    token_ids: list[int]              # its prompt
    num_cached: int
    shape: list[int]
    dtype: str                        # a torch dtype's name, e.g. "float32"
    kv_skip: int = 0                  # leading blocks not sent: the decode TE's own cache holds them
    adapter_digest: str = ""          # the LoRA adapter the KV was computed with ("": the base)
    secret: bytes = b""               # the cluster's DistFlow secret, checked on every transfer


class KVTrailer(Message, tag="kv_trailer"):
    """Closes a KV transfer, once the prefill TE has sampled the request's first token."""
    token_id: int | None              # None: the request ended on the prefill TE (a stop, an abort): drop it
    rng_state: bytes | None = None    # a seeded request's generator, after the first token


class KVAck(Message, tag="kv_ack"):
    ok: bool
    error: str | None = None
    send_all: bool = False            # the decode TE lost the prefix it was to keep: send every block


class TensorSpec(msgspec.Struct, array_like=True):
    name: str
    dtype: str
    shape: list[int]


class WeightsHeader(Message, tag="weights_header"):
    config: ModelConfig
    tensors: list[TensorSpec]         # their bytes follow, in this order


class Error(Message, tag="error"):
    message: str


class PrefillPlan(msgspec.Struct, array_like=True):
    start: int                        # its first row in the step
    num_tokens: int
    context_len: int                  # the sequence's tokens in the cache once this chunk is written
    block_ids: list[int]


class StepPlan(msgspec.Struct, array_like=True):
    """One engine step's inputs as plain lists (`flowserve.model.plan_step`): what a model
    runner turns into tensors (`StepInput`), and what a TP master sends its executors."""
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    decode_block_tables: list[list[int]]   # one per decode row (rows 0..len-1), unpadded
    decode_lens: list[int]
    prefills: list[PrefillPlan]
    logits_rows: list[int]
    lora: list[list[int]] = []             # [slot, first row, rows] per sequence with a LoRA adapter


class ExecStart(Message, tag="exec_start"):
    """TP master -> an executor it started (`flowserve/tp.py`), its first frame: its rank,
    and where the others and the shared arena are (file descriptors it inherited)."""
    rank: int
    world: int
    master_pid: int
    store_port: int                   # the torch.distributed rendezvous (a TCPStore on 127.0.0.1)
    store_fd: int                     # rank 0 serves the store on this listening socket; -1 elsewhere
    arena_fd: int                     # memfd: the logits rows, and one layer's KV on its way in or out
    max_rows: int
    max_blocks: int
    threads: int
    engine_config: EngineConfig       # num_kv_blocks: the master's count
    dtype: str
    model: str | None = None          # a spawned executor maps this model's weights (a forked one has them)


class ExecStep(Message, tag="exec_step"):
    """TP master -> every executor: run this step, each rank writing its vocabulary slice of
    the logits into the arena."""
    plan: StepPlan


class ExecKV(Message, tag="exec_kv"):
    """TP master -> every executor: one layer's K/V of `block_ids` between each rank's cache
    and its KV heads' slice of the arena (`write`: arena to cache; else cache to arena)."""
    block_ids: list[int]
    layer: int
    write: bool


class ExecLora(Message, tag="exec_lora"):
    """TP master -> every executor: read this adapter (`flowserve.lora_slots.load_lora`) and
    put its shard into `slot`."""
    slot: int
    adapter: Adapter


class ExecDone(Message, tag="exec_done"):
    """Executor -> master: started, or the last `ExecStep`/`ExecKV` is done."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Union[tuple(Message.__subclasses__())])  # every message above


class BadFrame(ValueError):
    """A frame whose body is not a message we know: the stream itself is still in sync."""


def pack(msg: Message) -> bytes:
    body = _encoder.encode(msg)
    return HEADER.pack(len(body)) + body


def unpack_frames(buf: bytearray, limit: int | None = None) -> list[Message | BadFrame]:
    """Pop every complete frame (at most `limit`) from the front of `buf`. A body that does not
    decode comes back as a `BadFrame`, for the receiver to answer; a length past MAX_FRAME
    means the stream is lost (ValueError)."""
    msgs = []
    while len(buf) >= HEADER.size and (limit is None or len(msgs) < limit):
        (size,) = HEADER.unpack_from(buf)
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
        if len(buf) < HEADER.size + size:
            break
        body = bytes(buf[HEADER.size:HEADER.size + size])
        del buf[:HEADER.size + size]
        try:
            msgs.append(_decoder.decode(body))
        except msgspec.DecodeError as e:
            msgs.append(BadFrame(str(e)))
    return msgs


def pop_frame(buf: bytearray) -> Message | None:
    """The first whole frame in `buf`, popped; None if there is none yet, BadFrame if it does not decode."""
    msgs = unpack_frames(buf, 1)
    if msgs and isinstance(msgs[0], BadFrame):
        raise msgs[0]
    return msgs[0] if msgs else None


def recv_frame(sock: socket.socket, buf: bytearray) -> Message | None:
    """Block until one whole frame is in `buf` (reading `sock` as needed) and pop it; None at
    EOF, BadFrame if it does not decode. Bytes past it stay in `buf` for the next call."""
    while (msg := pop_frame(buf)) is None:
        data = sock.recv(1 << 16)
        if not data:
            return None
        buf += data
    return msg


async def next_frame(reader: asyncio.StreamReader, buf: bytearray) -> Message | None:
    """`recv_frame` on an asyncio stream: the one frame a TE sends before it serves
    (`Prewarmed`, `Ready`), or a TE's `Hello` on another host's connection."""
    while (msg := pop_frame(buf)) is None:
        data = await reader.read(1 << 20)
        if not data:
            return None
        buf += data
    return msg


def expect(msg: Message | None, kind: type) -> Message | None:
    """`msg` if it is a `kind` (or None at EOF); else a BadFrame naming what came instead."""
    if msg is not None and not isinstance(msg, kind):
        raise BadFrame(f"expected {kind.__name__}, got {type(msg).__name__}")
    return msg


def dial_main(address: str, timeout: float = 10) -> socket.socket:
    """A TCP connection to the main process's TE listener (`HOST:PORT`), blocking, for frames.
    If the main process's host vanishes without closing it, the TE notices within ~25 s
    (keepalive probes after 10 s idle, every 5 s, 3 missed) and acts as on EOF."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.setblocking(True)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames, sent at once
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in ((socket.TCP_KEEPIDLE, 10), (socket.TCP_KEEPINTVL, 5), (socket.TCP_KEEPCNT, 3)):
        sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return sock


def encode_config(cfg: EngineConfig | TELaunch) -> str:
    """A config as the JSON a fresh TE-shell takes on its command line (and a node agent by Ray)."""
    return msgspec.json.encode(cfg).decode()


def decode_config(text: str, kind: type = EngineConfig) -> EngineConfig | TELaunch:
    return msgspec.json.decode(text, type=kind)
