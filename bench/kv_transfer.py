"""DistFlow KV path alone: one request's KV blocks from a prefill engine to a decode engine
in another process, for growing prompt lengths, over both transports.

Each transfer is what a prefill TE does after the first token (`flowserve.te_shell.
TEShell.hand_off`): gather the blocks out of its KV cache into the payload
(`ModelRunner.read_kv`), send it (`flowserve.distflow.KVSender`), and wait for the decode
side's ack, which comes after it has written the blocks into its own KV cache
(`ModelRunner.write_kv`). The time is that whole round; GB/s = payload bytes / time. The
first transfer of each size also grows the sender's staging buffer (shown apart).
The receiver is this script run with `receive TRANSPORT` (the real model's engine, KV
pool large enough for the largest size). Transports: `unix` (memfd, one host), `tcp`
(loopback), and `netns`: TCP to a receiver in a network namespace of its own, over a veth
pair and a bridge (tests/netns_cluster.py), as between two hosts; needs root.

    python bench/kv_transfer.py [--transports unix tcp netns] [--tokens 256 1024 4096 16384] [--repeats 5]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DEEPFLOW_CACHE", str(ROOT / ".venv" / "deepflow-cache"))
from flowserve.config import EngineConfig, default_model_path  # noqa: E402
from flowserve.distflow import KVSender, accept_kv, dtype_name, listen_kv, recv_kv  # noqa: E402
from flowserve.engine import Engine  # noqa: E402
from flowserve.model import kv_block_bytes  # noqa: E402
from flowserve.protocol import KVAck, KVHeader, pack  # noqa: E402
from tests.netns_cluster import NetnsCluster  # noqa: E402

KV_GB = 1.0


def engine() -> Engine:
    return Engine(default_model_path(), EngineConfig(kv_cache_gb=KV_GB, num_threads=1))


def receive(transport: str, host: str) -> None:
    runner = engine().runner
    [(listener, address)] = listen_kv(transport, host)
    print(address, flush=True)
    while conn := accept_kv(listener):
        with conn:
            head, kv = recv_kv(conn, 60)
            runner.write_kv(list(range(kv.shape[3])), kv)
            del kv
            conn.sendall(pack(KVAck(True)))


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
        sender = KVSender()
        try:
            address = peer.stdout.readline().strip()
            for tokens in args.tokens:
                blocks = list(range(-(-tokens // bs)))
                shape = runner.kv_shape(len(blocks))
                nbytes = kv_block_bytes(eng.model_cfg, bs, eng.dtype) * len(blocks)
                times = []
                for _ in range(args.repeats + 1):
                    t0 = time.perf_counter()
                    head = KVHeader("bench", [], 0, shape, dtype_name(eng.dtype))
                    sender.send(address, head, lambda out: runner.read_kv(blocks, out), 60)
                    times.append(time.perf_counter() - t0)
                first, times = times[0], times[1:]
                med = statistics.median(times)
                print(f"| {transport} | {tokens} | {nbytes / 1e6:.1f} | {1e3 * first:.1f} | {1e3 * med:.1f} | "
                      f"{nbytes / med / 1e9:.2f} "
                      f"| {nbytes / min(times) / 1e9:.2f} |", flush=True)
        finally:
            sender.close()
            peer.kill()
            peer.wait()
            if hosts:
                hosts.down()


if __name__ == "__main__":
    main()
