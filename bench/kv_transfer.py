"""DistFlow KV path alone: one request's KV blocks from a prefill engine to a decode engine
in another process, for growing prompt lengths, over both transports.

Each transfer is what a prefill TE does after the first token when it sends by request
(`EngineConfig.kv_layerwise` off; `flowserve.te_shell.TEShell.hand_off`): gather the blocks
out of its KV cache into the payload (`ModelRunner.read_kv`), send it over its link to the
decode TE (`flowserve.distflow.KVSender`), and wait for the decode side's ack, which comes
after it has written the blocks into its own KV cache (`ModelRunner.write_kv`). The time is
that whole round; GB/s = payload bytes / time. The first transfer of each size also grows
the sender's staging buffer (and the very first dials the link: shown apart).
The receiver is this script run with `receive TRANSPORT` (the real model's engine, KV
pool large enough for the largest size). Transports: `unix` (memfd, one host), `tcp`
(loopback), and `netns`: TCP to a receiver in a network namespace of its own, over a veth
pair and a bridge (tests/netns_cluster.py), as between two hosts; needs root.

    python bench/kv_transfer.py [--transports unix tcp netns] [--tokens 256 1024 4096 16384] [--repeats 5]
"""
import argparse
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DEEPFLOW_CACHE", str(ROOT / ".venv" / "deepflow-cache"))
from flowserve.config import EngineConfig, default_model_path  # noqa: E402
from flowserve.distflow import (  # noqa: E402
    SOCKET_BUFFER, KVReceiver, KVSender, KVTransfer, accept_kv, dtype_name, listen_kv)
from flowserve.engine import Engine  # noqa: E402
from flowserve.model import kv_block_bytes  # noqa: E402
from flowserve.protocol import KVAck, KVHeader, KVTrailer  # noqa: E402
from tests.netns_cluster import NetnsCluster  # noqa: E402

KV_GB = 1.0


def engine() -> Engine:
    return Engine(default_model_path(), EngineConfig(kv_cache_gb=KV_GB, num_threads=1))


def sink(host: str) -> None:
    """The raw-TCP baseline's receiver: for each connection, an 8-byte length, then that many
    bytes (into a buffer kept across connections, as a decode TE's KV cache is), then one
    byte back."""
    listener = socket.create_server((host, 0))
    print(f"tcp:{host}:{listener.getsockname()[1]}", flush=True)
    buffer = bytearray()
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            size, got = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big"), 0
            buffer.extend(bytes(max(0, size - len(buffer))))
            view = memoryview(buffer)[:size]
            while got < size:
                got += conn.recv_into(view[got:])
            conn.sendall(b"k")


def raw_tcp(address: str, payload: bytes) -> float:
    """Seconds to push `payload` through a plain TCP stream to `sink` and hear back."""
    host, port = address.removeprefix("tcp:").rsplit(":", 1)
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port))) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        conn.sendall(len(payload).to_bytes(8, "big"))
        conn.sendall(payload)
        conn.recv(1)
    return time.perf_counter() - t0


def receive(transport: str, host: str) -> None:
    if transport == "sink":
        return sink(host)
    runner = engine().runner
    [(listener, address)] = listen_kv(transport, host)
    print(address, flush=True)
    links: list[KVReceiver] = []
    while True:  # a decode TE's loop, without the engine steps: each layer into the KV cache as it lands
        ready, _, _ = select.select([listener, *links], [], [])
        if listener in ready:
            links.append(KVReceiver(accept_kv(listener)))
        for link in links:
            if link in ready:
                try:
                    for event in link.pump():
                        if isinstance(event, int):
                            runner.write_kv(list(range(link.head.shape[3])), link.kv, event)
                        elif isinstance(event, KVTrailer):
                            link.reply(KVAck(True))
                except ConnectionError:  # the sender is done
                    return


def send(sender: KVSender, address: str, head: KVHeader, read) -> float:
    """Seconds for one transfer by request: all its layers ready, its trailer known."""
    t = KVTransfer("bench", address, head, read, head.shape[3], ready=head.shape[0])
    t0 = time.perf_counter()
    sender.start(t, 60)
    sender.finish(t, KVTrailer(0))
    while not sender.completed():
        select.select([sender.wake], [], [], 60)
    if t.error:
        raise ConnectionError(t.error)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("role", nargs="?", default="send", choices=["send", "receive"])
    ap.add_argument("transport", nargs="?", default="unix")
    ap.add_argument("--host", default="127.0.0.1", help="receive: the address to listen on")
    ap.add_argument("--transports", nargs="+", default=["unix", "tcp"], choices=["unix", "tcp", "netns"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.role == "receive":
        return receive(args.transport, args.host)
    eng = engine()
    runner, bs = eng.runner, eng.cfg.block_size
    print(f"KV per token: {kv_block_bytes(eng.model_cfg, 1, eng.dtype)} bytes ({eng.dtype}); "
          f"{args.repeats} transfers per size, median and best\n")
    print("| transport | prompt tokens | KV MB | first ms | median ms | median GB/s | best GB/s |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for transport in args.transports:
        hosts = None
        receiver = [sys.executable, __file__, "receive", transport]
        if transport == "netns":
            hosts = NetnsCluster(1, prefix="dfkv", subnet="10.80.0").up(started=0)
            receiver = ["ip", "netns", "exec", hosts.namespace(0), *receiver[:-1], "tcp", "--host", hosts.hosts[0]]
        peer = subprocess.Popen(receiver, stdout=subprocess.PIPE, text=True)
        baseline = None
        if transport != "unix":  # the same path without DistFlow: a plain stream of the largest payload
            baseline = subprocess.Popen([*receiver[:receiver.index("receive") + 1], "sink", "--host",
                                         hosts.hosts[0] if hosts else "127.0.0.1"], stdout=subprocess.PIPE, text=True)
        sender = KVSender()
        try:
            address = peer.stdout.readline().strip()
            for tokens in args.tokens:  # then the baseline, at the largest size
                blocks = list(range(-(-tokens // bs)))
                shape = runner.kv_shape(len(blocks))
                nbytes = kv_block_bytes(eng.model_cfg, bs, eng.dtype) * len(blocks)
                times = []
                for _ in range(args.repeats + 1):
                    head = KVHeader("bench", [], 0, shape, dtype_name(eng.dtype))
                    times.append(send(sender, address, head,
                                      lambda first, out, layer: runner.read_kv(blocks[first:], out, layer)))
                first, times = times[0], times[1:]
                med = statistics.median(times)
                print(f"| {transport} | {tokens} | {nbytes / 1e6:.1f} | {1e3 * first:.1f} | {1e3 * med:.1f} | "
                      f"{nbytes / med / 1e9:.2f} "
                      f"| {nbytes / min(times) / 1e9:.2f} |", flush=True)
            if baseline:  # nbytes: the largest size's
                sink_address, payload = baseline.stdout.readline().strip(), bytes(nbytes)
                times = [raw_tcp(sink_address, payload) for _ in range(args.repeats + 1)][1:]
                med = statistics.median(times)
                print(f"| {transport}, plain TCP stream (baseline) | | {nbytes / 1e6:.1f} | | {1e3 * med:.1f} | "
                      f"{nbytes / med / 1e9:.2f} | {nbytes / min(times) / 1e9:.2f} |", flush=True)
        finally:
            sender.close()
            for p in (peer, baseline):
                if p:
                    p.kill()
                    p.wait()
            if hosts:
                hosts.down()


if __name__ == "__main__":
    main()
