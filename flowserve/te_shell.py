"""TE-shell: the process main around one FlowServe engine (one TE).

Its host's node agent starts it (`scaling/node.py`, `scaling/node_agent.py`) with its
socket to the main process as `--fd` (a unix socketpair's end, or a TCP connection from
another host), or the warm template forks it onto that socket (`scaling/template.py`).
The shell loads the engine, says `Ready` (with its start-up timings and DistFlow
addresses), then loops: read commands (`Add`, `Abort`, `Stop`, `Ping`, `Threads`, `Unpin`:
`flowserve/protocol.py`) without blocking while the engine has work, run one engine step,
and send that step's `TokenOut`s plus the engine's `Stats` back in one `Step` frame. A
`Ping` is answered between steps with an empty `Step`: a TE that stops stepping stops
answering, and the main process replaces it. A frame it cannot decode is
logged and answered with `Error`; the TE keeps serving. Single-threaded: the socket is only
touched between steps, so the engine needs no locks.

PD disaggregation: on a prefill TE an `Add` with `kv_to` (a decode TE's DistFlow address)
and `kv_rid` (the request's id there) runs the prompt and first token, then the shell sends
the request's KV blocks there (`flowserve.distflow.KVSender`), frees them whatever
happened, and reports `handoff` (or `error`). A decode TE (`kv_listen` set) gets an `Add`
with `await_kv` first, and starts that request when its KV arrives on the DistFlow
listener, which it polls with the socket.

    python -m flowserve.te_shell --fd N --model PATH --engine-config '{"max_num_seqs": 64, ...}'

Without `--model` it starts pre-warmed (scaling/prewarm.py): runtime imported, device
initialised, waiting for a `Load` command that names the model.
"""
import argparse
import logging
import os
import select
import socket
import sys
import time
from functools import partial

T_START = time.perf_counter()  # before torch is imported: TE-Pre-Load starts here

import torch  # noqa: E402

from flowserve.config import EngineConfig  # noqa: E402
from flowserve.device import pick_device  # noqa: E402
from flowserve.distflow import (  # noqa: E402
    KVSender, accept_kv, dtype_name, fetch_weights, listen_kv, recv_kv, serve_weights)
from flowserve.engine import Engine  # noqa: E402
from flowserve.protocol import (  # noqa: E402
    Abort, Add, BadFrame, Error, FinishReason, KVAck, KVHeader, Load, Message, Ping, Prewarmed, Ready,
    SamplingParams, StartTimings, Step, Stop, Threads, TokenOut, Unpin, decode_config, pack, unpack_frames)

log = logging.getLogger("flowserve.te_shell")


class TEShell:
    def __init__(self, sock: socket.socket, engine: Engine, kv_listeners: list[socket.socket] = ()):
        self.sock, self.engine, self.kv_listeners = sock, engine, list(kv_listeners)
        self.buf = bytearray()
        self.kv_to: dict[str, Add] = {}      # prefill side: request id -> its `Add` (where its KV goes)
        self.awaiting: dict[str, Add] = {}   # decode side: request id -> its `Add`, until the KV comes
        self.kv_sender = KVSender()
        self.kv_landing = bytearray()       # decode side: KV over TCP lands here, kept between transfers

    def send(self, msg: Message) -> None:
        self.sock.sendall(pack(msg))

    def handle(self, msg: Message | BadFrame) -> bool:
        """Apply one command; False means stop."""
        match msg:
            case Add(await_kv=True):
                self.awaiting[msg.rid] = msg
            case Add():
                try:
                    self.engine.add_request(msg.rid, msg.prompt, msg.params, handoff=msg.kv_to is not None,
                                            cache_id=msg.cache_id, pin=msg.pin)
                    if msg.kv_to is not None:
                        self.kv_to[msg.rid] = msg
                except ValueError as e:
                    self.report(msg.rid, FinishReason.ERROR, error=str(e))
            case Abort():
                for rid in msg.rids:
                    self.engine.abort(rid)
                    self.awaiting.pop(rid, None)
                    self.kv_to.pop(rid, None)
                self.send(Step([], self.engine.stats()))
            case Unpin():
                for cache_id in msg.cache_ids:
                    self.engine.rtc.unpin(cache_id)
                self.send(Step([], self.engine.stats()))
            case Ping():
                self.send(Step([], self.engine.stats()))
            case Threads():
                torch.set_num_threads(msg.n)
            case Stop():
                return False
            case _:  # undecodable, or not a command: say so, keep serving
                log.error("bad frame from the main process: %s", msg)
                self.send(Error(f"bad frame: {msg}"))
        return True

    def report(self, rid: str, finish: FinishReason, error: str | None = None, kv_ms: float | None = None) -> None:
        self.send(Step([TokenOut(rid, [], finish)], self.engine.stats(), error, kv_ms))

    def poll(self, block: bool) -> bool:
        """Read whatever commands (and, on a decode TE, KV transfers) have arrived; wait for one
        if `block`. False means stop."""
        watch = [self.sock] + self.kv_listeners
        while True:
            ready, _, _ = select.select(watch, [], [], None if block else 0)
            if not ready:
                return True
            if self.sock in ready:  # commands first: a transfer's `add` may be among them
                data = self.sock.recv(1 << 20)
                if not data:
                    return False  # the main process is gone: nothing left to serve
                self.buf += data
                for msg in unpack_frames(self.buf):
                    if not self.handle(msg):
                        return False
            for listener in self.kv_listeners:
                if listener in ready:
                    self.receive_kv(listener)
            block = False

    def receive_kv(self, listener: socket.socket) -> None:
        """Decode side: take one request's KV from a prefill TE, start the request, ack."""
        conn = accept_kv(listener)
        if conn is None:
            return
        timeout = self.engine.cfg.kv_timeout_s
        with conn:
            try:
                head, kv, arrived = recv_kv(conn, timeout, self.kv_landing)
                add = self.awaiting.pop(head.rid, None)
                if add is None:  # aborted meanwhile (or never announced): the sender frees its blocks
                    conn.sendall(pack(KVAck(False, "request unknown to the decode TE")))
                    return
                rng = head.rng_state and torch.frombuffer(bytearray(head.rng_state), dtype=torch.uint8)
                self.engine.add_prefilled(head.rid, head.token_ids, len(add.prompt), add.params, kv, arrived,
                                          head.num_cached, rng)
                del kv
                conn.sendall(pack(KVAck(True)))
            except (OSError, ValueError) as e:  # BadFrame is a ValueError
                log.warning("KV transfer in failed: %s", e)

    def hand_off(self) -> None:
        """Prefill side: send each prefilled request's KV to its decode TE, then free it here."""
        engine = self.engine
        while engine.handoffs:
            seq = engine.handoffs.pop()
            add = self.kv_to.pop(seq.request_id, None)
            error = None
            try:
                if add is None:
                    raise ConnectionError("aborted before its KV was sent")
                t0 = time.perf_counter()
                rng = seq.generator and seq.generator.get_state().numpy().tobytes()
                head = KVHeader(add.kv_rid, seq.token_ids, seq.num_cached, engine.runner.kv_shape(len(seq.block_ids)),
                                dtype_name(engine.dtype), rng)
                self.kv_sender.send(add.kv_to, head, partial(engine.runner.read_kv, seq.block_ids),
                                    engine.cfg.kv_timeout_s)
                ms = 1e3 * (time.perf_counter() - t0)
                log.info("KV of %s (%d tokens) sent in %.1f ms", seq.request_id, seq.num_computed, ms)
            except OSError as e:
                error = f"KV transfer to the decode TE failed: {e}"
                log.warning("%s: %s", seq.request_id, error)
            finally:
                engine.release(seq)
            if error:
                self.report(seq.request_id, FinishReason.ERROR, error=error)
            else:
                self.report(seq.request_id, FinishReason.HANDOFF, kv_ms=ms)

    def run(self) -> None:
        while self.poll(block=not self.engine.has_work()):
            if not self.engine.has_work():
                continue
            outs = self.engine.step()
            if outs:
                self.send(Step(outs, self.engine.stats()))
            self.hand_off()  # after the first tokens went out: the client sees them before the transfer


def warm_up(engine: Engine) -> None:
    """One dummy request (a prefill and a decode step), so the first real one runs at full speed."""
    engine.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=2))


def serve_engine(sock: socket.socket, cfg: EngineConfig, model: str | None = None, weights=None,
                 weights_from: str | None = None, t_start: float = T_START, warmed_on_cpu: bool = False,
                 packed: dict | None = None) -> None:
    """Build the engine (from `model`; from `weights` a warm template already holds; or from
    the weights a running TE streams from `weights_from`), warm it up, say `ready` with the
    TE's start-up timeline, and serve until told to stop. `t_start` is when this TE began:
    process start, the fork (scaling/template.py), or the `load` command (pre-warmed).
    `warmed_on_cpu`: the process already ran a CPU warm-up before it was forked, `packed`
    holds the linears it packed then (`flowserve.model.pack_linears`)."""
    t_pre = time.perf_counter()
    if weights_from:
        weights = fetch_weights(weights_from)
    engine = Engine(model, cfg, weights=weights, packed=packed)
    weights_addr = serve_weights(engine.model_cfg, engine.runner.model.w, cfg.host) if cfg.serve_weights else None
    kv = listen_kv(cfg.kv_listen, cfg.host) if cfg.kv_listen else []
    t_loaded = time.perf_counter()
    if not (warmed_on_cpu and engine.device.type == "cpu"):
        warm_up(engine)
    t_warm = time.perf_counter()
    shell = TEShell(sock, engine, [listener for listener, _ in kv])
    timings = StartTimings(1e3 * (t_pre - t_start), 1e3 * (t_loaded - t_pre), 1e3 * (t_warm - t_loaded))
    model = engine.runner.model  # its weights, and their oneDNN-packed copy where it has one
    weights_bytes = sum(t.numel() * t.element_size() for t in [*model.w.values(), *(model.packed or {}).values()])
    shell.send(Ready(os.getpid(), engine.stats(), engine.max_model_len, timings, weights_bytes, weights_addr,
                     [addr for _, addr in kv]))
    try:
        shell.run()
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the main process is gone (TimeoutError: its host vanished, per TCP keepalive)
    log.info("TE %d exiting", os.getpid())


def wait_for_model(sock: socket.socket, cfg: EngineConfig) -> tuple[Load, float, socket.socket]:
    """Pre-warmed: the runtime is imported; initialise the device, say so, and wait for a
    `Load` command (the model, and maybe a TE to stream the weights from). Returns it, when
    it came, and the socket to serve on: this one, or the one that came with the `Load`
    (SCM_RIGHTS) when a node agent pre-warmed this TE and hands it a TCP connection to the
    main process."""
    torch.zeros(1, device=pick_device(cfg.device))
    sock.sendall(pack(Prewarmed(os.getpid())))
    buf, fds = bytearray(), []
    while True:
        msgs = unpack_frames(buf, 1)
        if not msgs:
            data, more, _, _ = socket.recv_fds(sock, 1 << 16, 1)
            if not data:
                sys.exit(0)  # whoever started us is gone
            buf += data
            fds += more
            continue
        if isinstance(msgs[0], Load):
            break
        log.error("bad frame while pre-warmed: %s", msgs[0])
        sock.sendall(pack(Error(f"bad frame: {msgs[0]}")))
    if fds:
        sock.close()
        sock = socket.socket(fileno=fds[0])
    return msgs[0], time.perf_counter(), sock


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--model", help="without one, start pre-warmed and wait for a `load` command")
    ap.add_argument("--engine-config", default="{}", help="EngineConfig as JSON")
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s te[{os.getpid()}] %(name)s %(levelname)s %(message)s")
    sock, cfg = socket.socket(fileno=args.fd), decode_config(args.engine_config)
    if args.model:
        serve_engine(sock, cfg, model=args.model)
    else:
        load, t_start, sock = wait_for_model(sock, cfg)  # the group it joins decides its engine config
        serve_engine(sock, load.engine_config, model=load.model, weights_from=load.weights_from, t_start=t_start)


if __name__ == "__main__":
    main()
