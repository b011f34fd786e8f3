"""DistFlow, weights path: a running TE streams its weights to a new TE over TCP.

This is the paper's "NPU-fork" (PAPER.md section 6) as a path that also works across
hosts: a TE started with `serve_weights` listens on a TCP port (reported in its `ready`
frame); a pre-warmed TE told to load `weights_from` that address connects, reads one
header frame (the model config, then each tensor's name, dtype and shape) and receives the
raw bytes of every tensor straight into its own buffers. Plain bytes and JSON, no pickle.
On one host the warm template's fork is faster; this path needs no shared memory.
"""
import logging
import socket
import threading
import time
from dataclasses import asdict

import torch

from flowserve.config import ModelConfig
from flowserve.wire import pack, recv_frame

log = logging.getLogger("flowserve.distflow")
SOCKET_BUFFER = 16 << 20  # kernel buffers far above the defaults: fewer, larger copies per transfer


def _raw(t: torch.Tensor) -> memoryview:
    """A tensor's bytes, whatever its dtype (numpy has no bfloat16, so go through uint8)."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def serve_weights(cfg: ModelConfig, tensors: dict[str, torch.Tensor], host: str = "127.0.0.1") -> int:
    """Listen on a free port of `host`; send the weights to every peer that connects (a daemon
    thread: socket sends release the GIL, so the TE's step loop keeps running). Returns the port."""
    listener = socket.create_server((host, 0))
    cpu = {name: t.cpu() for name, t in tensors.items()}  # no copy on a CPU TE
    header = pack({"config": asdict(cfg), "tensors": [[n, str(t.dtype).removeprefix("torch."), list(t.shape)]
                                                      for n, t in cpu.items()]})

    def loop() -> None:
        while True:
            conn, peer = listener.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            with conn:
                t0 = time.perf_counter()
                try:
                    conn.sendall(header)
                    for t in cpu.values():
                        conn.sendall(_raw(t))
                except OSError as e:
                    log.warning("weights to %s failed: %s", peer, e)
                    continue
                log.info("sent weights to %s in %.3f s", peer, time.perf_counter() - t0)

    threading.Thread(target=loop, name="distflow-weights", daemon=True).start()
    return listener.getsockname()[1]


def fetch_weights(address: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Receive a model's config and tensors from `host:port` (a TE's `serve_weights`)."""
    host, port = address.rsplit(":", 1)
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)  # before connect: sets the TCP window
        conn.connect((host, int(port)))
        buf = bytearray()
        head = recv_frame(conn, buf)
        if head is None:
            raise ConnectionError("weights peer closed before its header")
        tensors = {}
        for name, dtype, shape in head["tensors"]:
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            view, got = _raw(t), 0
            take = min(len(buf), len(view))  # bytes that came with the header's last read
            view[:take], got = buf[:take], take
            del buf[:take]
            while got < len(view):
                n = conn.recv_into(view[got:])
                if not n:
                    raise ConnectionError(f"weights peer closed during {name}")
                got += n
            tensors[name] = t
    return ModelConfig(**head["config"]), tensors

