"""DistFlow's KV path, three ratios, each measured side by side in one run (the variants
interleaved, several repeats, medians):

1. LinkCluster, set-up saved per transfer: one small transfer (header, one layer, trailer,
   ack) on a link dialled for it (connect + accept + the first frame round trip) against
   the same on a link kept open, over `unix` and `tcp`, to a real `KVReceiver`.
2. Layer by layer against by request: real TE-shell processes (the bench plays the main
   process), two prefill TEs that differ only in `kv_layerwise`, one decode TE. Per
   request: from the prefill TE's first token (the prefill's end) to the decode TE's first
   token, and the handoff time the prefill TE reports (prefill end to ack).
3. Partial sends on a shared-system-prompt workload: requests sharing a ~500-token system
   prompt, each sent alternately with the `kv_skip` the cluster would give it (from a
   `PromptTree` fed by the decode TE's cache events, as `scheduler/cluster.py` does) and
   with none: bytes sent, and handoff time.

    python bench/distflow_links.py [--parts 1 2 3] [--tokens 512] [--repeats 5] [--threads 1]
"""
import argparse
import mmap
import os
import random
import secrets
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DEEPFLOW_CACHE", str(ROOT / ".venv" / "deepflow-cache"))
os.environ.setdefault("DEEPFLOW_DISTFLOW_SECRET", secrets.token_hex(32))  # before distflow reads it
from flowserve import distflow  # noqa: E402
from flowserve.config import EngineConfig, TELaunch, default_model_path  # noqa: E402
from flowserve.distflow import KVReceiver, accept_kv, dial_kv, listen_kv  # noqa: E402
from flowserve.protocol import (  # noqa: E402
    Add, FinishReason, KVAck, KVHeader, KVTrailer, Ready, SamplingParams, Step, Stop, encode_config, expect, pack,
    recv_frame, unpack_frames)
from scheduler.dist_sched import PromptTree  # noqa: E402

SHAPE = [1, 2, 1, 1, 16, 64]  # one layer, one block of one head: 8 KiB, so the set-up dominates


def median_ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


# ---------------------------------------------------------------------------- 1. link set-up

def ack_every_transfer(listener: socket.socket) -> None:
    """A decode TE's side of the links, without an engine: accept, take each transfer, ack."""
    links: list[KVReceiver] = []
    while True:
        ready, _, _ = select.select([listener, *links], [], [])
        if listener in ready:
            links.append(KVReceiver(accept_kv(listener)))
        for link in [link for link in links if link in ready]:
            try:
                for event in link.pump():
                    if isinstance(event, KVTrailer):
                        link.reply(KVAck(True))
            except ConnectionError:
                links.remove(link)
                link.close()


def small_transfer(conn: socket.socket, memfd: int) -> None:
    """One transfer of SHAPE as `KVSender` sends it: header, the layer, trailer; then the ack."""
    frame = pack(KVHeader("bench", [1], 0, SHAPE, "float32", secret=distflow.SECRET))
    if conn.family == socket.AF_UNIX:
        socket.send_fds(conn, [frame], [memfd])
        conn.sendall(b"L")
    else:
        conn.sendall(frame + bytes(distflow.nbytes(SHAPE, distflow.torch_dtype("float32"))))
    conn.sendall(pack(KVTrailer(0)))
    if expect(recv_frame(conn, bytearray()), KVAck) is None:
        raise ConnectionError("no ack")


def link_setup(repeats: int) -> None:
    print("## 1. LinkCluster: set-up saved per transfer\n")
    print("| transport | new link per transfer, µs | kept link, µs | set-up saved, µs | ratio |\n|---|---:|---:|---:|---:|")
    memfd = os.memfd_create("bench", os.MFD_CLOEXEC)
    os.ftruncate(memfd, mmap.PAGESIZE * 4)
    for transport in ("unix", "tcp"):
        [(listener, address)] = listen_kv(transport, "127.0.0.1")
        threading.Thread(target=ack_every_transfer, args=(listener,), daemon=True).start()
        kept = dial_kv(address, 5)
        fresh, reused = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with dial_kv(address, 5) as conn:
                small_transfer(conn, memfd)
            t1 = time.perf_counter()
            small_transfer(kept, memfd)
            t2 = time.perf_counter()
            fresh.append(t1 - t0)
            reused.append(t2 - t1)
        kept.close()
        a, b = median_ms(fresh) * 1e3, median_ms(reused) * 1e3
        print(f"| {transport} | {a:.0f} | {b:.0f} | {a - b:.0f} | {a / b:.2f} |", flush=True)
    os.close(memfd)
    print()


# ---------------------------------------------------------------------------- TE-shell processes

class TE:
    """A TE-shell process on a socketpair; this bench is its main process."""

    def __init__(self, cfg: EngineConfig, launch: TELaunch = TELaunch()):
        self.sock, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowserve.te_shell", "--fd", str(theirs.fileno()), "--model", default_model_path(),
             "--engine-config", encode_config(cfg), "--launch", encode_config(launch)], pass_fds=[theirs.fileno()], cwd=ROOT)
        theirs.close()
        self.buf = bytearray()
        self.ready: Ready = expect(recv_frame(self.sock, self.buf), Ready)

    def send(self, msg) -> None:
        self.sock.sendall(pack(msg))

    def frames(self) -> list:
        self.buf += self.sock.recv(1 << 20)
        return unpack_frames(self.buf)

    def stop(self) -> None:
        self.send(Stop())
        self.proc.wait(30)


def one_request(prefill: TE, decode: TE, address: str, rid: str, prompt: list[int], kv_skip: int = 0,
                tree: PromptTree | None = None) -> dict:
    """Run one PD request with max_tokens 2: times of the prefill TE's first token and the
    decode TE's first token (as this process reads them), and the prefill TE's handoff."""
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    t_submit = time.perf_counter()
    decode.send(Add(rid, prompt, params, await_kv=True))
    prefill.send(Add(rid, prompt, params, kv_to=address, kv_rid=rid, kv_skip=kv_skip))
    out: dict = {"submit": t_submit}
    while len(out) < 5:
        ready, _, _ = select.select([prefill.sock, decode.sock], [], [], 120)
        assert ready, f"stuck: {out}"
        now = time.perf_counter()
        for te in (prefill, decode):
            if te.sock not in ready:
                continue
            for step in te.frames():
                if not isinstance(step, Step):
                    continue
                if te is decode and tree is not None:  # the cluster's mirror of the decode TE's cache
                    tree.update("decode", step.stats.cached, step.stats.evicted)
                for o in step.outs:
                    if o.rid != rid:
                        continue
                    assert o.finish is not FinishReason.ERROR, step.error
                    if te is prefill and o.token_ids:
                        out["prefill_end"] = now
                    elif te is prefill and o.finish is FinishReason.HANDOFF:
                        out["kv_ms"], out["kv_bytes"] = step.kv_ms, step.kv_bytes
                    elif te is decode and o.token_ids:
                        out["first_decode"] = now
    return out


def layerwise_vs_by_request(tokens: int, repeats: int, threads: int) -> None:
    print(f"## 2. Layer by layer vs by request: {tokens}-token prompts, max_tokens 2, {threads} thread(s) per TE\n")
    cfg = EngineConfig(num_threads=threads, kv_cache_gb=1.0)
    decode = TE(EngineConfig(num_threads=threads, kv_cache_gb=1.0), TELaunch(kv_listen="unix,tcp"))
    prefills = {mode: TE(EngineConfig(**{**cfg.__dict__, "kv_layerwise": mode == "layer by layer"}))
                for mode in ("layer by layer", "by request")}
    addresses = {a.split(":")[0]: a for a in decode.ready.kv_addrs}
    rng = random.Random(0)
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for i in range(repeats + 1):  # the first round warms every link and staging buffer up
            for transport in ("unix", "tcp"):
                for mode, prefill in prefills.items():
                    prompt = [rng.randrange(100, 40000) for _ in range(tokens)]  # no prefix hits anywhere
                    r = one_request(prefill, decode, addresses[transport], f"{mode}-{transport}-{i}", prompt)
                    if i:
                        results.setdefault((transport, mode), []).append(r)
    finally:
        for te in (decode, *prefills.values()):
            te.stop()
    print("| transport | handoff | prefill end -> first decode token, ms | prefill end -> ack, ms | "
          "submit -> prefill end, ms | KV MB |\n|---|---|---:|---:|---:|---:|")
    gaps = {}
    for (transport, mode), rs in results.items():
        gaps[transport, mode] = statistics.median(r["first_decode"] - r["prefill_end"] for r in rs)
        print(f"| {transport} | {mode} | {1e3 * gaps[transport, mode]:.1f} | "
              f"{statistics.median(r['kv_ms'] for r in rs):.1f} | "
              f"{median_ms([r['prefill_end'] - r['submit'] for r in rs]):.0f} | {rs[0]['kv_bytes'] / 1e6:.1f} |")
    for transport in ("unix", "tcp"):
        print(f"\n{transport}: by request / layer by layer = "
              f"{gaps[transport, 'by request'] / gaps[transport, 'layer by layer']:.2f}x", end="")
    print("\n", flush=True)


def partial_sends(repeats: int, threads: int) -> None:
    n = 2 * repeats
    print(f"## 3. Partial sends: {n} requests sharing a ~500-token system prompt, alternately with and without "
          "kv_skip\n")
    cfg = EngineConfig(num_threads=threads, kv_cache_gb=1.0)
    decode = TE(EngineConfig(num_threads=threads, kv_cache_gb=1.0), TELaunch(kv_listen="unix"))
    prefill = TE(cfg)
    tree, rng = PromptTree(cfg.block_size), random.Random(1)
    system = [rng.randrange(100, 40000) for _ in range(500)]
    results: dict[str, list[dict]] = {"kv_skip": [], "whole": []}
    try:
        one_request(prefill, decode, decode.ready.kv_addrs[0], "warm", system + [7] * 30, tree=tree)
        for i in range(n):
            prompt = system + [rng.randrange(100, 40000) for _ in range(rng.randrange(20, 60))]
            mode = "kv_skip" if i % 2 == 0 else "whole"
            skip = tree.matched_tokens(prompt, ["decode"])["decode"] // cfg.block_size if mode == "kv_skip" else 0
            r = one_request(prefill, decode, decode.ready.kv_addrs[0], f"p{i}", prompt, skip, tree)
            r["blocks"], r["skip"] = -(-len(prompt) // cfg.block_size), skip
            results[mode].append(r)
    finally:
        decode.stop()
        prefill.stop()
    print("| sends | requests | blocks skipped (median) | KV bytes sent | prefill end -> ack, ms | "
          "prefill end -> first decode token, ms |\n|---|---:|---:|---:|---:|---:|")
    sent = {}
    for mode, rs in results.items():
        sent[mode] = sum(r["kv_bytes"] for r in rs)
        print(f"| {mode} | {len(rs)} | {statistics.median(r['skip'] for r in rs):.0f} of "
              f"{statistics.median(r['blocks'] for r in rs):.0f} | {sent[mode] / 1e6:.1f} MB | "
              f"{statistics.median(r['kv_ms'] for r in rs):.1f} | "
              f"{median_ms([r['first_decode'] - r['prefill_end'] for r in rs]):.1f} |")
    print(f"\nbytes sent, whole / kv_skip: {sent['whole'] / sent['kv_skip']:.1f}x "
          f"({1 - sent['kv_skip'] / sent['whole']:.0%} saved)\n", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--tokens", type=int, default=512, help="part 2: prompt length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--setup-repeats", type=int, default=500, help="part 1: transfers per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per TE")
    args = ap.parse_args()
    if 1 in args.parts:
        link_setup(args.setup_repeats)
    if 2 in args.parts:
        layerwise_vs_by_request(args.tokens, args.repeats, args.threads)
    if 3 in args.parts:
        partial_sends(args.repeats, args.threads)


if __name__ == "__main__":
    main()
