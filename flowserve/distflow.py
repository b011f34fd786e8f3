"""DistFlow: tensors move TE to TE, never through the main process (PAPER.md sections 4, 6).

Weights path, the paper's "NPU-fork" as a path that also works across hosts: a TE started
with `serve_weights` listens on a TCP port (reported in its `Ready` frame); a pre-warmed TE
told to load `weights_from` that address connects, reads one `WeightsHeader` frame (the
model config, then each tensor's name, dtype and shape) and receives the raw bytes of every
tensor straight into its own buffers. On one host the warm template's fork is faster.

KV path, for PD disaggregation: a decode TE listens (`listen_kv`); when a prefill TE has
computed a prompt and its first token, it sends that request's KV blocks (`KVSender`): a
`KVHeader` frame (request id, tokens, tensor shape), then the payload, then it waits for
the decode TE's `KVAck` before freeing its blocks. Two transports behind one address format:
- `unix:` (one host): the payload is gathered once into an anonymous memfd whose file
  descriptor travels as SCM_RIGHTS over an abstract unix socket; the decode TE maps it and
  copies straight into its KV cache. Nothing is named on disk, so nothing leaks when a TE
  dies, and the listener only accepts peers running as the same user (SO_PEERCRED).
- `tcp:` (any hosts): the raw bytes follow the header on the stream.
Plain bytes and `flowserve/protocol.py` frames on both paths, no pickle. Listeners bind
their host's address, so a peer of another host can reach them: a fetcher opens with a
`Hello` and a KV sender's header carries a secret, the cluster's DistFlow secret that
every TE and template inherits from the main process (`DEEPFLOW_DISTFLOW_SECRET`), and a
peer without it gets nothing and gives nothing.
"""
import hmac
import logging
import mmap
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import msgspec
import torch

from flowserve.config import ModelConfig
from flowserve.protocol import BadFrame, Hello, KVAck, KVHeader, TensorSpec, WeightsHeader, expect, pack, recv_frame

log = logging.getLogger("flowserve.distflow")
SOCKET_BUFFER = 16 << 20  # kernel buffers far above the defaults: fewer, larger copies per transfer
STAGING_STEP = 16 << 20   # a KV sender's staging buffer grows in steps of this
HELLO_TIMEOUT_S = 5
SECRET = bytes.fromhex(os.environ.get("DEEPFLOW_DISTFLOW_SECRET", ""))


def _check_secret(given: bytes, what: str) -> None:
    if not hmac.compare_digest(given, SECRET):
        raise ConnectionError(f"{what} without the cluster's DistFlow secret")


def _raw(t: torch.Tensor) -> memoryview:
    """A tensor's bytes, whatever its dtype (numpy has no bfloat16, so go through uint8)."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def torch_dtype(name: str) -> torch.dtype:
    """A dtype named in a frame, checked: a peer names data, not arbitrary attributes."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nbytes(shape: list[int], dtype: torch.dtype) -> int:
    return dtype.itemsize * int(torch.Size(shape).numel())


def serve_weights(cfg: ModelConfig, tensors: dict[str, torch.Tensor], host: str) -> str:
    """Listen on a free port of `host` and send the weights to every peer that connects, each
    in its own daemon thread: one donor feeds many new TEs at once, and socket sends release
    the GIL, so the TE's step loop keeps running. Returns the address, `host:port`."""
    listener = socket.create_server((host, 0))
    cpu = {name: t.cpu() for name, t in tensors.items()}  # no copy on a CPU TE
    header = pack(WeightsHeader(cfg, [TensorSpec(n, dtype_name(t.dtype), list(t.shape)) for n, t in cpu.items()]))

    def send(conn: socket.socket, peer) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        with conn:
            t0 = time.perf_counter()
            try:
                conn.settimeout(HELLO_TIMEOUT_S)
                hello = expect(recv_frame(conn, bytearray()), Hello)
                _check_secret(hello.secret if hello else b"?", "a weights fetch")
                conn.settimeout(None)
                conn.sendall(header)
                for t in cpu.values():
                    conn.sendall(_raw(t))
            except (OSError, BadFrame) as e:
                log.warning("weights to %s failed: %s", peer, e)
                return
            log.info("sent weights to %s in %.3f s", peer, time.perf_counter() - t0)

    def loop() -> None:
        while True:
            threading.Thread(target=send, args=listener.accept(), name="distflow-weights-send", daemon=True).start()

    threading.Thread(target=loop, name="distflow-weights", daemon=True).start()
    return f"{host}:{listener.getsockname()[1]}"


def fetch_weights(address: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Receive a model's config and tensors from `host:port` (a TE's `serve_weights`)."""
    host, port = address.rsplit(":", 1)
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)  # before connect: sets the TCP window
        conn.connect((host, int(port)))
        conn.sendall(pack(Hello("weights", SECRET)))
        buf = bytearray()
        head = expect(recv_frame(conn, buf), WeightsHeader)
        if head is None:
            raise ConnectionError("weights peer closed before its header")
        specs = [(t.name, t.shape, torch_dtype(t.dtype)) for t in head.tensors]
        # All in one shared-memory file: a template that received them forks TEs that share
        # these pages the way they share a page-cache mapping (a fork copies the page tables
        # of private memory; of shared mappings it copies none).
        sizes = [-(-nbytes(shape, dtype) // 64) * 64 for _, shape, dtype in specs]
        fd = os.memfd_create("deepflow-weights", os.MFD_CLOEXEC)
        os.ftruncate(fd, sum(sizes))
        arena = mmap.mmap(fd, sum(sizes), flags=mmap.MAP_SHARED)
        os.close(fd)  # the mapping keeps the memory
        tensors, offset = {}, 0
        for (name, shape, dtype), size in zip(specs, sizes):
            tensors[name] = _recv_into(conn, buf, _tensor_on(arena, shape, dtype, nbytes(shape, dtype), offset))
            offset += size
    return head.config, tensors


def _recv_into(conn: socket.socket, buf: bytearray, t: torch.Tensor) -> torch.Tensor:
    """Fill `t` with raw bytes from `conn`: first whatever `buf` already holds past the header."""
    view = _raw(t)
    got = min(len(buf), len(view))
    view[:got] = buf[:got]
    del buf[:got]
    while got < len(view):
        n = conn.recv_into(view[got:])
        if not n:
            raise ConnectionError("peer closed mid-tensor")
        got += n
    return t


# ---------------------------------------------------------------------------- KV path

def listen_kv(transports: str, host: str) -> list[tuple[socket.socket, str]]:
    """A decode TE's KV listeners and the addresses prefill TEs send to, one per transport in
    `transports` ("unix", "tcp" or both, comma-separated): `unix:NAME` for TEs of its host
    (abstract sockets live in the host's network namespace), `tcp:HOST:PORT` for any."""
    out = []
    for transport in transports.split(","):
        if transport == "tcp":
            listener = socket.create_server((host, 0))
            out.append((listener, f"tcp:{host}:{listener.getsockname()[1]}"))
            continue
        name = f"deepflow-kv-{os.getpid()}-{secrets.token_hex(4)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("\0" + name)  # abstract namespace: no file to clean up
        listener.listen()
        out.append((listener, "unix:" + name))
    return out


def accept_kv(listener: socket.socket) -> socket.socket | None:
    """The next sender, or None (and the connection closed) if it runs as another user."""
    conn, _ = listener.accept()
    if conn.family == socket.AF_UNIX:
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            conn.close()
            return None
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return conn


class KVSender:
    """A prefill TE's sending side. The payload is staged in one memfd-backed buffer that is
    kept and reused (grown when a larger request comes): fresh shared pages cost more to
    fault in and zero than the copy itself. One transfer at a time: the TE-shell's loop is
    single-threaded, and the buffer is free again once the decode TE has acked."""

    def __init__(self):
        self.fd, self.buffer = -1, None

    def _staging(self, nbytes: int) -> mmap.mmap:
        if self.buffer is None or len(self.buffer) < nbytes:
            self.close()
            size = -(-nbytes // STAGING_STEP) * STAGING_STEP
            self.fd = os.memfd_create("deepflow-kv", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self.buffer = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        return self.buffer

    def close(self) -> None:
        if self.buffer is not None:
            self.buffer.close()
            os.close(self.fd)
            self.fd, self.buffer = -1, None

    def send(self, address: str, head: KVHeader, fill: Callable[[torch.Tensor, int], None], timeout: float) -> None:
        """Send one request's KV to the decode TE at `address`: `fill(payload, layer)` writes
        one layer of the payload (`head.shape`, `head.dtype`: layers first) into the buffer
        it is given. Over TCP each layer goes out as soon as it is written, so reading the
        next overlaps with the transfer (and, on the decode side, with writing the last).
        Returns once the decode TE has it in its cache; raises OSError (ConnectionError,
        TimeoutError) if it does not."""
        kind, _, where = address.partition(":")
        dtype = torch_dtype(head.dtype)
        size, layers = nbytes(head.shape, dtype), head.shape[0]
        header = pack(msgspec.structs.replace(head, secret=SECRET))
        staging = self._staging(size)
        payload = _tensor_on(staging, head.shape, dtype, size)
        if kind == "unix":
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(timeout)
            conn.connect("\0" + where)
        else:
            host, port = where.rsplit(":", 1)
            conn = socket.create_connection((host, int(port)), timeout)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        with conn:
            if kind == "unix":  # the decode TE maps the same pages: nothing is copied in between
                for layer in range(layers):
                    fill(payload, layer)
                socket.send_fds(conn, [header], [self.fd])
            else:
                conn.sendall(header)
                per_layer = size // layers
                with memoryview(staging) as view:
                    for layer in range(layers):
                        fill(payload, layer)
                        conn.sendall(view[layer * per_layer:(layer + 1) * per_layer])
            ack = expect(recv_frame(conn, bytearray()), KVAck)
        if ack is None or not ack.ok:
            raise ConnectionError(ack.error if ack else "decode TE closed the connection before its ack")


def recv_kv(conn: socket.socket, timeout: float,
            landing: bytearray | None = None) -> tuple[KVHeader, torch.Tensor, Iterator[int]]:
    """Receive one request's KV from a prefill TE: its header, the payload tensor (for
    `unix:` a view of the sender's memfd, unmapped when the tensor is freed; for `tcp:` in
    `landing` if given, valid until the next call), and an iterator that yields each layer's
    index once that layer is whole (over TCP it reads the layer from `conn` first: consume it
    all before acking). The caller acks."""
    conn.settimeout(timeout)
    buf, fds = bytearray(), []
    if conn.family == socket.AF_UNIX:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 1)
        buf += data
    try:
        head = expect(recv_frame(conn, buf), KVHeader)
        if head is None:
            raise ConnectionError("prefill TE closed before its KV header")
        _check_secret(head.secret, "a KV transfer")
        dtype = torch_dtype(head.dtype)
        size = nbytes(head.shape, dtype)
        if conn.family != socket.AF_UNIX:
            if landing is None:
                kv = torch.empty(head.shape, dtype=dtype)
            else:
                landing.extend(bytes(max(0, size - len(landing))))  # kept: its pages are already faulted in
                kv = _tensor_on(landing, head.shape, dtype, size)
            return head, kv, _layers_arriving(conn, buf, kv)
        if not fds:
            raise ConnectionError("KV header came without its memfd")
        mapped = mmap.mmap(fds[0], size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        return head, _tensor_on(mapped, head.shape, dtype, size), iter(range(head.shape[0]))
    finally:
        for fd in fds:
            os.close(fd)  # a mapping outlives its descriptor


def _layers_arriving(conn: socket.socket, buf: bytearray, kv: torch.Tensor) -> Iterator[int]:
    for layer in range(kv.shape[0]):
        _recv_into(conn, buf, kv[layer])
        yield layer


def _tensor_on(mem, shape: list[int], dtype: torch.dtype, nbytes: int, offset: int = 0) -> torch.Tensor:
    """A tensor over `nbytes` of a writable buffer (an mmap, a bytearray), from `offset`."""
    return torch.frombuffer(mem, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)

