"""DistFlow: tensors move TE to TE, never through the main process (PAPER.md sections 4, 6).

Weights path, the paper's "NPU-fork" as a path that also works across hosts: a TE started
with `serve_weights` listens on a TCP port (reported in its `Ready` frame); a pre-warmed TE
told to load `weights_from` that address connects, reads one `WeightsHeader` frame (the
model config, then each tensor's name, dtype and shape) and receives the raw bytes of every
tensor straight into its own buffers. On one host the warm template's fork is faster.

KV path, for PD disaggregation. Control plane, LinkCluster: a decode TE listens
(`listen_kv`); a prefill TE dials each decode TE once and keeps that link for every transfer
after (`KVSender`: a thread per link), and the decode TE keeps the links it accepted in its
select set, reading each without blocking (`KVReceiver`). Data plane, one transfer per
request, in order on its link: a `KVHeader` (request id, prompt, payload shape, the
`kv_skip` leading blocks left out because the decode TE caches them), the payload layer by
layer, a `KVTrailer` (the first token, and a seeded request's generator state), then the
decode TE's `KVAck`, after which the prefill TE frees the blocks. A prefill TE starts a
transfer while it computes the prompt's last chunk (each layer goes out once the forward has
written it) or after that step; the trailer waits for the token either way. Two transports
behind one address format:
- `unix:` (one host): the link's staging memfd travels with each header as SCM_RIGHTS and the
  decode TE maps it; each layer is then a one-byte mark (written: copy it). Nothing is named on
  disk, so nothing leaks when a TE dies, and the listener only accepts peers running as the same
  user (SO_PEERCRED).
- `tcp:` (any hosts): each layer's raw bytes follow the header on the stream.
Plain bytes and `flowserve/protocol.py` frames on both paths, no pickle. Listeners bind
their host's address, so a peer of another host can reach them: a fetcher opens with a
`Hello` and every KV header (each transfer, not just a link's first) carries a secret, the
cluster's DistFlow secret that every TE and template inherits from the main process
(`DEEPFLOW_DISTFLOW_SECRET`), and a peer without it gets nothing and gives nothing.
"""
import array
import contextlib
import hmac
import logging
import mmap
import os
import secrets
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec
import torch

from flowserve.config import ModelConfig
from flowserve.protocol import (
    BadFrame, Hello, KVAck, KVHeader, KVTrailer, Message, TensorSpec, WeightsHeader, expect, pack, pop_frame,
    recv_frame, unpack_frames)

log = logging.getLogger("flowserve.distflow")
SOCKET_BUFFER = 16 << 20  # kernel buffers far above the defaults: fewer, larger copies per transfer
STAGING_STEP = 16 << 20   # a KV sender's staging buffer grows in steps of this
HELLO_TIMEOUT_S = 5
SECRET = bytes.fromhex(os.environ.get("DEEPFLOW_DISTFLOW_SECRET", ""))
FD = array.array("i")  # a file descriptor, as SCM_RIGHTS carries it


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


def tcp_listener(host: str, ports: str = "") -> socket.socket:
    """A TCP listener on `host`: on the first free port of `ports` ("LO-HI", pinned so that a
    firewall can name them), or on any free port when `ports` is empty."""
    lo, _, hi = ports.partition("-")
    for port in range(int(lo), int(hi) + 1) if ports else (0,):
        try:
            return socket.create_server((host, port))
        except OSError:  # taken (another TE of this host): the next one
            continue
    raise OSError(f"no free DistFlow port in {ports} on {host}")


def serve_weights(cfg: ModelConfig, tensors: dict[str, torch.Tensor], host: str, ports: str = "") -> str:
    """Listen on a free port of `host` (of `ports`, if given) and send the weights to every peer that connects, each
    in its own daemon thread: one donor feeds many new TEs at once, and socket sends release
    the GIL, so the TE's step loop keeps running. Returns the address, `host:port`."""
    listener = tcp_listener(host, ports)
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

def listen_kv(transports: str, host: str, ports: str = "") -> list[tuple[socket.socket, str]]:
    """A decode TE's KV listeners and the addresses prefill TEs send to, one per transport in
    `transports` ("unix", "tcp" or both, comma-separated): `unix:NAME` for TEs of its host
    (abstract sockets live in the host's network namespace), `tcp:HOST:PORT` for any (a port
    of `ports`, if given)."""
    out = []
    for transport in transports.split(","):
        if transport == "tcp":
            listener = tcp_listener(host, ports)
            out.append((listener, f"tcp:{host}:{listener.getsockname()[1]}"))
            continue
        name = f"deepflow-kv-{os.getpid()}-{secrets.token_hex(4)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("\0" + name)  # abstract namespace: no file to clean up
        listener.listen()
        out.append((listener, "unix:" + name))
    return out


def accept_kv(listener: socket.socket) -> socket.socket | None:
    """The next link, or None (and the connection closed) if its peer runs as another user."""
    conn, _ = listener.accept()
    if conn.family == socket.AF_UNIX:
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            conn.close()
            return None
    else:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # acks are small: no Nagle wait
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return conn


def dial_kv(address: str, timeout: float) -> socket.socket:
    """A link to the decode TE listening at `address` (`listen_kv`)."""
    kind, _, where = address.partition(":")
    if kind == "unix":
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout)
        try:
            conn.connect("\0" + where)
        except OSError:
            conn.close()
            raise
        return conn
    host, port = where.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a trailer goes out at once
    return conn


@dataclass(eq=False)
class KVTransfer:
    """One request's KV on its way from a prefill TE to a decode TE (`KVSender.start`): a
    `KVHeader`, then each layer's K/V of the blocks past `head.kv_skip` once the forward has
    computed it (`ready`), the `KVTrailer` once the first token is known, then the decode
    TE's `KVAck`. Its link's thread fills in the outcome."""
    request_id: str                   # the prefill TE's id for it
    address: str                      # the decode TE's DistFlow address
    head: KVHeader                    # its shape: `ModelRunner.kv_shape` of the blocks sent
    read: Callable[[int, torch.Tensor, int], None]  # read(first block, payload, layer): from the KV cache
    num_blocks: int                   # the prompt's blocks, those skipped included
    ready: int = 0                    # layers whose K/V are computed
    trailer: KVTrailer | None = None
    t_trailer: float = 0.0            # when the trailer was known: the prefill's end
    retried: bool = False             # sent again on a new link after its link broke (once at most)
    error: str | None = None          # the outcome: None once the decode TE has the KV
    nbytes: int = 0                   # payload bytes sent
    handoff_s: float = 0.0            # from the prefill's end to the decode TE's ack


class KVSender:
    """A prefill TE's sending side, DistFlow's LinkCluster: one persistent link per decode TE,
    dialled for its first transfer and reused for every one after, so the connection, the
    peer check and the staging memfd are set up once. Each link has a thread: transfers to
    different decode TEs go at once, those to one go in order, each right after the one
    before (acks are read as they come, not waited for in between). A link that broke is
    dialled again, and what it had not had acked sent again, once per transfer; a decode TE
    that cannot be dialled fails the transfers to it, and only those. The TE-shell's loop
    hands transfers over (`start`, `layer_done`, `finish`) and takes them back once acked
    or failed (`completed`, when `wake` is readable): it never waits on a peer, and socket
    sends release the GIL."""

    def __init__(self):
        self.cond = threading.Condition()   # guards the links, their queues and the transfers' progress
        self.links: dict[str, _Link] = {}
        self.done: list[KVTransfer] = []
        self.wake, self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def start(self, t: KVTransfer, timeout: float) -> None:
        with self.cond:
            link = self.links.get(t.address)
            if link is None:
                link = self.links[t.address] = _Link(self, t.address, timeout)
            link.queue.append(t)
            link.poke()  # under the lock: a link's thread closes its pipe only once out of the links
            self.cond.notify_all()

    def layer_done(self, transfers: list[KVTransfer], layer: int) -> None:
        """The forward has written `layer`'s K/V: those transfers may send it."""
        with self.cond:
            for t in transfers:
                t.ready = layer + 1
            self.cond.notify_all()

    def finish(self, t: KVTransfer, trailer: KVTrailer) -> None:
        with self.cond:
            t.trailer, t.t_trailer = trailer, time.perf_counter()
            self.cond.notify_all()

    def completed(self) -> list[KVTransfer]:
        """The transfers acked or failed since the last call."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake, 1 << 16)
        with self.cond:
            done, self.done = self.done, []
        return done

    def close(self) -> None:
        with self.cond:
            links = list(self.links.values())
            for link in links:
                link.closed = True
                link.poke()
            self.cond.notify_all()
        for link in links:
            if (conn := link.conn) is not None:  # a thread blocked on a frozen peer returns now
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            link.thread.join()
        os.close(self.wake)
        os.close(self._wake)


class _Link:
    """One link of a `KVSender`: its socket, staging memfd, queue and thread."""

    def __init__(self, sender: KVSender, address: str, timeout: float):
        self.sender, self.cond, self.address, self.timeout = sender, sender.cond, address, timeout
        self.queue: deque[KVTransfer] = deque()    # to send, in order
        self.unacked: deque[KVTransfer] = deque()  # sent on this link, acks to come in the same order
        self.conn: socket.socket | None = None
        self.acks = bytearray()
        self.spare: list[tuple[int, mmap.mmap]] = []  # staging memfds, kept between transfers
        self.lent: dict[KVTransfer, tuple[int, mmap.mmap]] = {}
        self.closed = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # a transfer queued (or closed)
        self.thread = threading.Thread(target=self.run, name="distflow-link", daemon=True)
        self.thread.start()

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"\0")

    def run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue or self.unacked or self.closed)
                if self.closed:
                    break
                t = self.queue.popleft() if self.queue else None
            try:
                if t is not None:
                    self.push(t)
                else:
                    self.pull()
            except (OSError, ValueError) as e:  # BadFrame is a ValueError
                self.broke(e, t)
            with self.cond:
                if self.conn is None and not self.queue and not self.unacked:
                    if self.sender.links.get(self.address) is self:  # failed: the next transfer dials afresh
                        del self.sender.links[self.address]
                    break
        self.hang_up()
        for fd, buffer in self.spare + list(self.lent.values()):
            buffer.close()
            os.close(fd)
        os.close(self.wake_r)
        os.close(self.wake_w)

    def push(self, t: KVTransfer) -> None:
        """Send one transfer: header, each layer once computed, trailer once known."""
        if self.conn is None:
            self.conn = dial_kv(self.address, self.timeout)
        self.unacked.append(t)
        conn, unix, head = self.conn, self.conn.family == socket.AF_UNIX, t.head
        dtype = torch_dtype(head.dtype)
        size, layers = nbytes(head.shape, dtype), head.shape[0]
        fd, staging = self.stage(t, size)
        payload = _tensor_on(staging, head.shape, dtype, size)
        frame = pack(msgspec.structs.replace(head, secret=SECRET))
        if unix:  # the decode TE maps these very pages: per layer, a one-byte mark says it is there
            socket.send_fds(conn, [frame], [fd])
        else:
            conn.sendall(frame)
        per_layer = size // layers
        with memoryview(staging) as view:
            for layer in range(layers):
                self.wait(lambda: t.ready > layer)
                t.read(head.kv_skip, payload, layer)
                conn.sendall(b"L" if unix else view[layer * per_layer:(layer + 1) * per_layer])
        del payload
        self.wait(lambda: t.trailer is not None)
        conn.sendall(pack(t.trailer))
        t.nbytes += size
        if not unix:
            self.unstage(t)  # the bytes are on their way

    def pull(self) -> None:
        """Take the next ack (the oldest transfer's), or return when a transfer is queued."""
        while not (acks := unpack_frames(self.acks, 1)):
            ready, _, _ = select.select([self.conn, self.wake_r], [], [], self.timeout)
            if not ready:
                raise TimeoutError(f"no ack from the decode TE in {self.timeout:g} s")
            if self.wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_r, 1 << 10)
                if self.queue or self.closed:
                    return
                continue
            data = self.conn.recv(1 << 16)
            if not data:
                raise ConnectionError("the decode TE closed the link")
            self.acks += data
        ack = expect(acks[0], KVAck)  # a BadFrame is not one either: the stream is lost
        t = self.unacked.popleft()
        self.unstage(t)
        if ack.send_all and t.head.kv_skip:  # the decode TE no longer caches what it was to keep
            shape = [*t.head.shape[:3], t.num_blocks, *t.head.shape[4:]]  # [layers, K/V, heads, blocks, ...]
            t.head = msgspec.structs.replace(t.head, shape=shape, kv_skip=0)
            with self.cond:
                self.queue.appendleft(t)
            return
        t.error = None if ack.ok else ack.error or "refused"
        t.handoff_s = time.perf_counter() - t.t_trailer
        self.complete(t)

    def broke(self, e: Exception, t: KVTransfer | None) -> None:
        """The link failed: hang up; what it had not had acked goes again on a new link,
        once, unless the peer froze (a timeout) or this sender is closing."""
        self.hang_up()
        lost = list(self.unacked) + ([t] if t is not None and t not in self.unacked else [])
        self.unacked.clear()
        for u in lost:
            self.unstage(u)
        again = [u for u in lost if not (u.retried or self.closed or isinstance(e, TimeoutError))]
        for u in again:
            u.retried = True
        with self.cond:
            self.queue.extendleft(reversed(again))
        for u in lost:
            if u not in again:
                u.error = str(e) or type(e).__name__
                self.complete(u)

    def complete(self, t: KVTransfer) -> None:
        """Hand `t` back to the TE-shell, once its trailer is known (one that failed at once
        waits for it): its prefill is over, so its blocks may be freed."""
        with self.cond:
            self.cond.wait_for(lambda: t.trailer is not None or self.closed)
            self.sender.done.append(t)
        with contextlib.suppress(BlockingIOError):
            os.write(self.sender._wake, b"\0")

    def wait(self, until: Callable[[], bool]) -> None:
        with self.cond:
            self.cond.wait_for(lambda: until() or self.closed)
        if self.closed:
            raise ConnectionError("KV sender closed")

    def stage(self, t: KVTransfer, nbytes: int) -> tuple[int, mmap.mmap]:
        """A memfd-backed buffer for `t`'s payload: a spare one that fits, else a new one
        (fresh shared pages cost more to fault in and zero than the copy itself). Over unix
        the decode TE reads it until it acks `t`, so each transfer sent and not acked has its
        own; over tcp it is spare again once the bytes are sent."""
        fits = [b for b in self.spare if len(b[1]) >= nbytes]
        if fits:
            buf = min(fits, key=lambda b: len(b[1]))
            self.spare.remove(buf)
        else:
            for fd, buffer in self.spare:  # all too small
                buffer.close()
                os.close(fd)
            self.spare.clear()
            size = -(-nbytes // STAGING_STEP) * STAGING_STEP
            fd = os.memfd_create("deepflow-kv", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            buf = fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self.lent[t] = buf
        return buf

    def unstage(self, t: KVTransfer) -> None:
        if (buf := self.lent.pop(t, None)) is not None:
            self.spare.append(buf)

    def hang_up(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self.acks.clear()


class KVReceiver:
    """A decode TE's end of one link from a prefill TE. The transfers it carries come one
    after another and are read without blocking as their bytes come (`pump`), between the
    TE's steps, so its decodes go on while a prefill TE's forward sends layer by layer. Over
    tcp a payload lands in a buffer kept between transfers (its pages stay faulted in); over
    unix it is the sender's memfd, mapped."""

    def __init__(self, conn: socket.socket):
        self.conn, self.unix = conn, conn.family == socket.AF_UNIX
        self.buf, self.fds = bytearray(), deque()
        self.landing = torch.empty(0, dtype=torch.uint8)
        self.head: KVHeader | None = None    # the transfer coming in, if one is
        self.kv: torch.Tensor | None = None  # its payload, `head.shape`
        self.layer = 0                        # its layers whole in `kv`
        self.got = 0                          # bytes of the next one (tcp)
        self.served = 0                       # transfers this link carried

    def fileno(self) -> int:
        return self.conn.fileno()

    def pump(self) -> Iterator[KVHeader | int | KVTrailer]:
        """What has come, in order: a transfer's `KVHeader` (`kv` then holds its payload),
        each layer's index once that layer is whole in `kv`, its `KVTrailer` (then answer
        with `reply`). Returns when it needs bytes that have not come. Raises ConnectionError
        at EOF or for a peer without the cluster's secret, BadFrame for a frame out of place."""
        while True:
            if self.head is not None and self.layer < self.head.shape[0]:
                if not self._layer():
                    return
                self.layer += 1
                yield self.layer - 1
                continue
            msg = self._frame()
            if msg is None:
                return
            if self.head is None:
                self._open(expect(msg, KVHeader))
                yield self.head
            else:
                trailer = expect(msg, KVTrailer)
                self.head = self.kv = None
                self.served += 1
                yield trailer

    def reply(self, ack: KVAck) -> None:
        self.conn.sendall(pack(ack))

    def close(self) -> None:
        self.conn.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.head = self.kv = None

    def _open(self, head: KVHeader) -> None:
        _check_secret(head.secret, "a KV transfer")
        dtype = torch_dtype(head.dtype)
        size = nbytes(head.shape, dtype)
        if self.unix:
            if not self.fds:
                raise ConnectionError("KV header came without its memfd")
            fd = self.fds.popleft()
            try:
                mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            finally:
                os.close(fd)  # a mapping outlives its descriptor; it goes with the last tensor over it
            self.kv = _tensor_on(mapped, head.shape, dtype, size)
        else:
            if self.landing.numel() < size:
                self.landing = torch.empty(size, dtype=torch.uint8)
            self.kv = self.landing[:size].view(dtype).view(head.shape)
        self.head, self.layer, self.got = head, 0, 0

    def _layer(self) -> bool:
        """Whether the next layer is whole now."""
        if self.unix:  # its one-byte mark: the sender has written it into the memfd
            if not self.buf and not self._read():
                return False
            del self.buf[:1]
            return True
        view = _raw(self.kv[self.layer])
        n = min(len(self.buf), len(view) - self.got)
        view[self.got:self.got + n] = self.buf[:n]
        del self.buf[:n]
        self.got += n
        while self.got < len(view):
            try:
                n = self.conn.recv_into(view[self.got:], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            if not n:
                raise ConnectionError("prefill TE closed the link mid-transfer")
            self.got += n
        self.got = 0
        return True

    def _frame(self) -> Message | None:
        while (msg := pop_frame(self.buf)) is None:
            if not self._read():
                return None
        return msg

    def _read(self) -> bool:
        """Take whatever bytes (and, over unix, memfds) have come; False if none had."""
        try:
            if self.unix:  # (socket.recv_fds drops its flags)
                data, ancillary, _, _ = self.conn.recvmsg(1 << 16, socket.CMSG_SPACE(4 * FD.itemsize),
                                                          socket.MSG_DONTWAIT)
                for level, kind, fds in ancillary:
                    if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                        self.fds.extend(array.array("i", fds[:len(fds) - len(fds) % FD.itemsize]))
            else:
                data = self.conn.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if not data:
            raise ConnectionError("prefill TE closed the link")
        self.buf += data
        return True


def _tensor_on(mem, shape: list[int], dtype: torch.dtype, nbytes: int, offset: int = 0) -> torch.Tensor:
    """A tensor over `nbytes` of a writable buffer (an mmap, a bytearray), from `offset`."""
    return torch.frombuffer(mem, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)
