"""The warm template: one process that forks ready-to-serve TEs (PAPER.md section 6).

It imports torch and flowserve and maps the model's weights once, from the
loading-optimized cache (`flowserve.weights`: an mmap'ed safetensors file, so the pages
live in the page cache and every process that maps them shares them), or, on a host
whose DRAM holds no weights yet, receives them from a running TE of another host
(`--weights-from`, DistFlow). Then it waits on a control socket from whoever started it
(the main process, or a node agent on another host). Each `fork` command carries, as
SCM_RIGHTS ancillary data, the TE's socket (a socketpair's end, or a TCP connection to
the main process); the template forks, and the child becomes a TE-shell over that socket
with the weights it already holds: TE-Pre-Load (interpreter start, imports) and most of
TE-Load are gone from the critical path. A TP TE (`tensor_parallel_size` N) forks its N
executors at once (`flowserve/tp.py`), so they hold these pages too, and the packed linears
of their shards, which the template makes at the first fork of a TE of that size.

The template itself never runs a multi-threaded torch op (one intra-op thread; its only
compute is a warm-up request on the CPU) and never touches an accelerator: forking after an OpenMP pool or a
CUDA/NPU context exists breaks the child. A child sets its own thread count and moves the
weights to its device after the fork.

    python -m scaling.template --fd N --model PATH [--weights-from HOST:PORT]
                                                      (started by `scaling.launch.TemplateHandle`)
"""
import argparse
import contextlib
import logging
import os
import select
import socket
import sys
import time

T_START = time.perf_counter()

import torch  # noqa: E402

from flowserve.config import EngineConfig, ModelConfig, TELaunch, check_tensor_parallel  # noqa: E402
from flowserve.engine import Engine  # noqa: E402
from flowserve.model import Llama  # noqa: E402
from flowserve.protocol import Error, Fork, Forked, TemplateReady, pack, unpack_frames  # noqa: E402
from flowserve.distflow import fetch_weights  # noqa: E402
from flowserve.te_shell import serve_engine, wait_for_model, warm_up  # noqa: E402
from flowserve.weights import load_weights  # noqa: E402

log = logging.getLogger("scaling.template")


def child(te_sock: socket.socket, control: socket.socket, cfg: EngineConfig, launch: TELaunch, model: str, weights,
          packed, t_fork: float, standby: bool = False) -> None:
    """Runs in the forked process: become one TE (`standby`: once a `Load` says which), then exit
    without returning to the template loop."""
    control.close()  # else the main process would not see the template's death while TEs live
    code = 0
    try:
        if standby:  # forked ahead of demand (scaling/prewarm.py): its TE's config comes with `Load`
            load, t_fork, te_sock = wait_for_model(te_sock, cfg)
            cfg, launch = load.engine_config, load.launch
        # `model` too: the weights are here, but structured outputs read its tokenizer
        serve_engine(te_sock, cfg, launch, model, weights=weights, packed=packed, t_start=t_fork, warmed_on_cpu=True)
    except SystemExit as e:  # a standby whose pool went away
        code = e.code or 0
    except BaseException:
        log.exception("forked TE failed")
        code = 1
    finally:
        os._exit(code)  # never run the template's cleanup (atexit, finalizers) in a child


def tp_packed(cfg: ModelConfig, tensors: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Each rank's packed linears for tensor parallelism over `size` ranks, made here at the
    first fork of a TE of that size (~1.5 s for SmolLM2-135M at 3): the executors of that TE
    and of every later one share their pages (`flowserve/tp.py` forks them from the TE)."""
    check_tensor_parallel(cfg, size)
    return [Llama(cfg, tensors, torch.device("cpu"), rank=rank, world=size).packed for rank in range(size)]


def run_template(control: socket.socket, model: str, weights_from: str | None = None) -> None:
    torch.set_num_threads(1)
    # mmap'ed from the cache (converting the model on first use), or streamed from a running
    # TE of another host (DistFlow): then the forks share this process's copy.
    cfg, tensors = fetch_weights(weights_from) if weights_from else load_weights(model)
    # Warm the CPU kernels once, here, on one thread: every fork inherits them and skips its
    # own warm-up (TE-Post-Load). A TE on an accelerator still warms up after the fork.
    warm = Engine(None, EngineConfig(device="cpu", num_kv_blocks=4, num_threads=1), weights=(cfg, tensors))
    warm_up(warm)
    # The oneDNN-packed linears (flowserve.model.pack_linears) are made here, once: forks
    # share their pages instead of each packing a private 0.5 GB copy.
    _, packs = warm.weights()
    packed = packs[0] if packs else None
    shards: dict[int, list[dict[str, torch.Tensor]]] = {}  # TP size -> each rank's packed linears
    t_ready = time.perf_counter()
    control.sendall(pack(TemplateReady(os.getpid(), 1e3 * (t_ready - T_START))))
    buf = bytearray()
    while True:
        readable, _, _ = select.select([control], [], [], 1.0)
        with contextlib.suppress(ChildProcessError):  # reap finished TEs so none lingers as a zombie
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        if not readable:
            continue
        data, fds, _, _ = socket.recv_fds(control, 1 << 16, 1)
        fd = fds[0] if fds else None
        if not data:  # the main process is gone (or done). Our TEs follow it, or wait for a
            return    # restarted one to adopt them (which starts its own template)
        buf += data
        for msg in unpack_frames(buf):
            if not isinstance(msg, Fork) or fd is None:
                log.error("bad frame: %s", msg if not isinstance(msg, Fork) else "a fork without its socket")
                control.sendall(pack(Error(f"bad frame: {msg}")))
                continue
            te_sock = socket.socket(fileno=fd)
            size = msg.engine_config.tensor_parallel_size
            if size > 1 and packed is not None and size not in shards:  # on the TE's Scaler-Pre
                try:
                    shards[size] = tp_packed(cfg, tensors, size)
                except ValueError as e:  # a TP size the model does not split into: that TE fails
                    te_sock.close()
                    control.sendall(pack(Error(str(e))))
                    fd = None
                    continue
            t_fork = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                child(te_sock, control, msg.engine_config, msg.launch, model, (cfg, tensors),
                      shards.get(size) if size > 1 else packed, t_fork, standby=not msg.te_id)
            te_sock.close()
            control.sendall(pack(Forked(msg.te_id, pid)))
            fd = None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights-from", help="a running TE's DistFlow weights address (HOST:PORT)")
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s template[{os.getpid()}] %(name)s %(levelname)s %(message)s")
    run_template(socket.socket(fileno=args.fd), args.model, args.weights_from)


if __name__ == "__main__":
    main()
