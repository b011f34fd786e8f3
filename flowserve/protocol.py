"""Every message between DeepFlow's processes, defined once, and the one place they are framed.

- main process -> TE (`scheduler/te.py` -> `flowserve/te_shell.py`): `Add`, `Abort`, `Stop`,
  `Ping` (the heartbeat, answered by an empty `Step`), `Threads` (its host's TE count
  changed), `Unpin` (context caches), `Load` (to a pre-warmed TE); TE -> main: `Prewarmed`, `Ready`, then one `Step`
  per engine step (a `TokenOut` per request that moved, and the engine's `Stats`). On
  another host the TE's socket is TCP, and its first frame is `Hello`, carrying the secret
  the main process handed its node agent (`scaling/node_agent.py`).
- main process <-> warm template (`scaling/template.py`): `Fork`; `TemplateReady`, `Forked`.
- TE -> TE (DistFlow, `flowserve/distflow.py`): `KVHeader` + KV bytes, answered by `KVAck`;
  `WeightsHeader` + every tensor's bytes.
- Whoever gets a frame it cannot decode answers `Error` and carries on.

A frame is a 4-byte big-endian length and a msgpack-encoded msgspec Struct tagged by its `op`.
msgspec decodes straight into the typed struct, checking every field, ~30x faster than
dataclasses + orjson on a step frame (bench/wire_frame.py). Never pickle: a socket is a
trust boundary. Torch-free: the main process imports it too.
"""
import socket
import struct
from dataclasses import dataclass, field
from enum import Enum

import msgspec

from flowserve.config import EngineConfig, ModelConfig

HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20


class Op(str, Enum):
    ADD = "add"
    ABORT = "abort"
    STOP = "stop"
    LOAD = "load"
    PREWARMED = "prewarmed"
    READY = "ready"
    STEP = "step"
    FORK = "fork"
    FORKED = "forked"
    TEMPLATE_READY = "template_ready"
    PING = "ping"
    THREADS = "threads"
    UNPIN = "unpin"
    HELLO = "hello"
    KV_HEADER = "kv_header"
    KV_ACK = "kv_ack"
    WEIGHTS_HEADER = "weights_header"
    ERROR = "error"


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


class Message(msgspec.Struct, tag_field="op", forbid_unknown_fields=True):
    pass


class Add(Message, tag=Op.ADD.value):
    """Run a request. `kv_to` (prefill TE): after its first token, send its KV to that decode
    TE's DistFlow address, where it is `kv_rid`. `await_kv` (decode TE): start it when its
    KV arrives. `cache_id`, `pin`: explicit context caching (`flowserve.rtc`)."""
    rid: str
    prompt: list[int]
    params: SamplingParams
    kv_to: str | None = None
    kv_rid: str | None = None
    await_kv: bool = False
    cache_id: str | None = None       # its prompt starts with this context cache's (MatchByID)
    pin: str | None = None            # a context cache's build: pin the prompt's blocks under this id


class Abort(Message, tag=Op.ABORT.value):
    rids: list[str]


class Stop(Message, tag=Op.STOP.value):
    pass


class Ping(Message, tag=Op.PING.value):
    pass


class Unpin(Message, tag=Op.UNPIN.value):
    """Release these context caches' pinned blocks (TTL ended, or deleted); answered by a `Step`."""
    cache_ids: list[str]


class Threads(Message, tag=Op.THREADS.value):
    """Use `n` torch threads: the host's cores are shared by however many TEs it runs now."""
    n: int


class Hello(Message, tag=Op.HELLO.value):
    """The first frame on a TE's TCP connection to the main process (who it is, and the
    secret made for its start), or on a weights fetch from a DistFlow donor (`te_id`
    "weights", the cluster's DistFlow secret)."""
    te_id: str
    secret: bytes


class Load(Message, tag=Op.LOAD.value):
    """To a pre-warmed TE: become a TE of `model`, weights streamed from `weights_from` if set."""
    model: str
    engine_config: EngineConfig
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


class TokenOut(msgspec.Struct, array_like=True):
    """One request's step: new tokens (not the stop/EOS token that ended it), why it finished
    (None while running), and the prompt tokens its prefix cache served."""
    rid: str
    token_ids: list[int]
    finish: FinishReason | None = None
    num_cached: int = 0


class StartTimings(msgspec.Struct):
    """A TE's own share of its start (PAPER.md section 4), in ms."""
    te_pre_load: float
    te_load: float
    te_post_load: float


class Prewarmed(Message, tag=Op.PREWARMED.value):
    pid: int


class Ready(Message, tag=Op.READY.value):
    pid: int
    stats: Stats
    max_model_len: int
    timings_ms: StartTimings
    weights_bytes: int = 0            # its weights' size: a host counts them once while shared
    weights_addr: str | None = None   # DistFlow: where it streams its weights
    kv_addrs: list[str] = []          # DistFlow: where a decode TE takes KV (unix on its host, tcp)


class Step(Message, tag=Op.STEP.value):
    outs: list[TokenOut]
    stats: Stats
    error: str | None = None          # with an ERROR finish: what went wrong
    kv_ms: float | None = None        # with a HANDOFF finish: the KV transfer's time


class Fork(Message, tag=Op.FORK.value):
    """Fork a TE; its socket comes along as SCM_RIGHTS (a socketpair's end, or a TCP
    connection to the main process that a node agent opened)."""
    te_id: str
    engine_config: EngineConfig


class Forked(Message, tag=Op.FORKED.value):
    te_id: str
    pid: int


class TemplateReady(Message, tag=Op.TEMPLATE_READY.value):
    pid: int
    load_ms: float


class KVHeader(Message, tag=Op.KV_HEADER.value):
    """Precedes one request's KV payload (`ModelRunner.kv_shape`), bytes or a memfd."""
    rid: str                          # the request's id on the decode TE
    token_ids: list[int]              # prompt and first token
    num_cached: int
    shape: list[int]
    dtype: str                        # a torch dtype's name, e.g. "float32"
    rng_state: bytes | None = None    # a seeded request's generator, after the first token
    secret: bytes = b""               # the cluster's DistFlow secret: the receiver takes KV only with it


class KVAck(Message, tag=Op.KV_ACK.value):
    ok: bool
    error: str | None = None


class TensorSpec(msgspec.Struct, array_like=True):
    name: str
    dtype: str
    shape: list[int]


class WeightsHeader(Message, tag=Op.WEIGHTS_HEADER.value):
    config: ModelConfig
    tensors: list[TensorSpec]         # their bytes follow, in this order


class Error(Message, tag=Op.ERROR.value):
    message: str


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Add | Abort | Stop | Ping | Threads | Unpin | Hello | Load | Prewarmed | Ready | Step | Fork | Forked
                                   | TemplateReady | KVHeader | KVAck | WeightsHeader | Error)


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


def recv_frame(sock: socket.socket, buf: bytearray) -> Message | None:
    """Block until one whole frame is in `buf` (reading `sock` as needed) and pop it; None at
    EOF, BadFrame if it does not decode. Bytes past it stay in `buf` for the next call."""
    while not (msgs := unpack_frames(buf, 1)):
        data = sock.recv(1 << 16)
        if not data:
            return None
        buf += data
    if isinstance(msgs[0], BadFrame):
        raise msgs[0]
    return msgs[0]


def expect(msg: Message | None, kind: type) -> Message | None:
    """`msg` if it is a `kind` (or None at EOF); else a BadFrame naming what came instead."""
    if msg is not None and not isinstance(msg, kind):
        raise BadFrame(f"expected {kind.__name__}, got {type(msg).__name__}")
    return msg


def encode_config(cfg: EngineConfig) -> str:
    """An EngineConfig as the JSON a fresh TE-shell takes on its command line."""
    return msgspec.json.encode(cfg).decode()


def decode_config(text: str) -> EngineConfig:
    return msgspec.json.decode(text, type=EngineConfig)
