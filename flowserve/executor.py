"""A TP executor: one SPMD process of a tensor-parallel TE, holding one shard of the model
(PAPER.md section 2: a master drives one executor per device).

Its master (`flowserve/tp.py`, in the TE process) starts it, forked (it then holds the
weights already, and maybe its shard's packed linears, made by the warm template) or
spawned (`python -m flowserve.executor --fd N`: it maps the model's loading-optimized
cache itself), with a socket to the master (its link) and the TE's arena (`Arena`, shared
memory). The first frame on the link is `ExecStart`. The executor joins its peers in a
torch.distributed group (gloo on CPU, NCCL on CUDA, HCCL on Ascend), builds its
`ModelRunner` (its shard of the weights, its KV heads' share of the cache), answers
`ExecDone`, then serves the master's commands until the link closes:
- `ExecStep`: the forward of the step on its shard, in lockstep with the other ranks, which
  all-reduce where the model says (`Llama.reduce`); then it writes its vocabulary slice of
  the logits rows into the arena;
- `ExecKV`: one layer of KV between its cache and its heads' slice of the arena (PD);
- `ExecLora`: read a LoRA adapter from its path and put its shard into a slot;
- `Threads`: its share of its TE's threads (no answer).
It dies with its master (PR_SET_PDEATHSIG); an error ends it, and so its TE.

    python -m flowserve.executor --fd N      (spawned by flowserve.tp.TPRunner)
"""
import argparse
import ctypes
import logging
import mmap
import os
import signal
import socket
import stat
import sys

import torch
import torch.distributed as dist

from flowserve.config import ModelConfig
from flowserve.device import pick_device
from flowserve.model import ModelRunner, step_input
from flowserve.lora_slots import load_lora
from flowserve.protocol import (BadFrame, ExecDone, ExecKV, ExecLora, ExecStart, ExecStep, Threads, expect, pack,
                                recv_frame)
from flowserve.weights import load_weights

log = logging.getLogger("flowserve.executor")
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
PR_SET_PDEATHSIG = 1


class Arena:
    """The shared memory of one TP TE, a memfd the master and its executors map: the logits
    rows of a step, each rank writing its vocabulary slice, then one layer of a request's KV
    on its way out of the caches or into them, each rank its KV heads' slice."""

    def __init__(self, fd: int, mcfg: ModelConfig, max_rows: int, max_blocks: int, block_size: int,
                 dtype: torch.dtype):
        self.kv_head = (mcfg.num_kv_heads, block_size, mcfg.head_dim)
        self.dtype, self.logits_bytes = dtype, max_rows * mcfg.vocab_size * 4
        self.mem = mmap.mmap(fd, self.nbytes(mcfg, max_rows, max_blocks, block_size, dtype), flags=mmap.MAP_SHARED)
        self.logits = torch.frombuffer(self.mem, dtype=torch.float32, count=max_rows * mcfg.vocab_size
                                       ).view(max_rows, mcfg.vocab_size)

    @staticmethod
    def nbytes(mcfg: ModelConfig, max_rows: int, max_blocks: int, block_size: int, dtype: torch.dtype) -> int:
        logits = max_rows * mcfg.vocab_size * 4  # float32, whatever the model computes in
        return logits + 2 * mcfg.num_kv_heads * max_blocks * block_size * mcfg.head_dim * dtype.itemsize

    def kv(self, num_blocks: int) -> torch.Tensor:
        """One layer of `num_blocks` blocks, every KV head: [K/V, heads, blocks, block, dim]."""
        heads, bs, dim = self.kv_head
        count = 2 * heads * num_blocks * bs * dim
        return torch.frombuffer(self.mem, dtype=self.dtype, count=count, offset=self.logits_bytes
                                ).view(2, heads, num_blocks, bs, dim)


def executor_device(name: str, rank: int) -> torch.device:
    """The TE's device kind; on an accelerator, one device per rank."""
    device = pick_device(name)
    if device.type == "cpu":
        return device
    device = torch.device(device.type, rank)
    getattr(torch, device.type).set_device(device)
    return device


def die_with(master_pid: int) -> None:
    """Be killed by the kernel when the master dies, however it dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != master_pid:  # it died before the call took effect
        os._exit(0)


def run_executor(link: socket.socket, weights: tuple[ModelConfig, dict[str, torch.Tensor]] | None = None,
                 packed: dict[str, torch.Tensor] | None = None) -> None:
    """Serve one master over `link` until it closes it. `weights`: the whole model's, which a
    forked executor inherited (else it maps `ExecStart.model`); `packed`: its shard's packed
    linears, made by the warm template (`flowserve.model.pack_linears`), else made here."""
    buf = bytearray()
    start = expect(recv_frame(link, buf), ExecStart)
    if start is None:
        return
    die_with(start.master_pid)
    rank, world, cfg = start.rank, start.world, start.engine_config
    torch.set_num_threads(start.threads)
    dtype, device = getattr(torch, start.dtype), executor_device(cfg.device, rank)
    mcfg, tensors = weights or load_weights(start.model, dtype)
    if device.type == "cpu":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks of a TE share its host
    store = dist.TCPStore("127.0.0.1", start.store_port, world, rank == 0, wait_for_workers=False,
                          master_listen_fd=start.store_fd if rank == 0 else None)
    dist.init_process_group(BACKENDS[device.type], store=store, rank=rank, world_size=world)
    runner = ModelRunner(mcfg, cfg, tensors, device, dtype, packed, rank, world)
    arena = Arena(start.arena_fd, mcfg, start.max_rows, start.max_blocks, cfg.block_size, dtype)
    model = runner.model
    vocab = slice(model.vocab_start, model.vocab_start + model.linears["lm_head"].shape[0])
    kv_heads = slice(rank * model.cfg.num_kv_heads, (rank + 1) * model.cfg.num_kv_heads)
    log.info("executor %d/%d ready on %s, %d threads", rank, world, device, start.threads)
    link.sendall(pack(ExecDone()))
    while (msg := recv_frame(link, buf)) is not None:
        match msg:
            case ExecStep(plan=plan):
                logits = model.forward(step_input(plan, device), runner.kv_cache)
                arena.logits[:len(plan.logits_rows), vocab].copy_(logits)
            case ExecKV():
                region = arena.kv(len(msg.block_ids))[:, kv_heads]
                # read_kv and write_kv index their payload by layer; the arena holds one layer
                payload = region.expand(mcfg.num_layers, *region.shape)
                (runner.write_kv if msg.write else runner.read_kv)(msg.block_ids, payload, msg.layer)
            case ExecLora():  # the master read and checked it already: this reads the same bytes
                runner.load_lora(msg.slot, msg.adapter, load_lora(msg.adapter, mcfg, cfg.max_lora_rank, dtype))
            case Threads(n=n):
                torch.set_num_threads(n)
                continue
            case _:
                raise BadFrame(f"executor {rank}: unexpected {msg}")
        link.sendall(pack(ExecDone()))
    dist.destroy_process_group()


def forked_main(link: socket.socket, keep: set[int], weights: tuple[ModelConfig, dict[str, torch.Tensor]],
                packed: dict[str, torch.Tensor] | None) -> None:
    """An executor's life in a child its master forked; never returns to the master's code.
    It first closes the sockets it inherited but `keep`: a copy of the master's socket to the
    main process, or of a sibling's link, would hide that one's death (no EOF at the other end)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd not in keep and stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass  # the listing's own descriptor, closed already
    code = 0
    try:
        run_executor(link, weights, packed)
    except BaseException:
        log.exception("executor failed")
        code = 1
    finally:
        os._exit(code)  # never run the master's cleanup (atexit, finalizers) in a child


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s executor[{os.getpid()}] %(name)s %(levelname)s %(message)s")
    run_executor(socket.socket(fileno=args.fd))


if __name__ == "__main__":
    main()
