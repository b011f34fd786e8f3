"""TE-shell: the process main around one FlowServe engine (one TE).

Its host's node agent starts it (`scaling/node.py`, `scaling/node_agent.py`) with its
socket to the main process as `--fd` (a unix socketpair's end, or a TCP connection from
another host), or the warm template forks it onto that socket (`scaling/template.py`).
The shell loads the engine, says `Ready` (with its start-up timings and DistFlow
addresses), then loops: read commands (`Add`, `Abort`, `Stop`, `Ping`, `Threads`, `Unpin`:
`flowserve/protocol.py`) without blocking while the engine has work, run one engine step,
and send that step's `TokenOut`s plus the engine's `Stats` back in one `Step` frame. A
`Ping` is answered between steps with an empty `Step` (fresh stats). Liveness does not wait
for steps: a thread of its own (`Liveness`) sends `Alive` twice a second with how long the
current step or command has run, so a long prefill or a slow adapter read is told apart from
a frozen process, which sends nothing. A frame it cannot decode is logged and answered with
`Error`; the TE keeps serving.

When the main process dies (EOF, or a reset), the TE exits, unless it was started with an
adoption grace (`TELaunch.adopt_grace_s`, `serve --adopt-grace-s`): then it drops its requests
(their clients were the dead process's), keeps its context caches' pinned blocks, and dials the
main process's TE listener (`TELaunch.main_address`) with backoff until a restarted main process
adopts it (`rejoin`: `Hello` with the secret it made at start, then its `Ready` again, with the
caches it pins), or the grace is over and it exits. The engine runs on one thread and needs no
locks; socket writes take a lock, since the liveness thread writes too.

PD disaggregation: on a prefill TE an `Add` with `kv_to` (a decode TE's DistFlow address)
and `kv_rid` (the request's id there) runs the prompt and first token, and the shell sends
the request's KV blocks there (`flowserve.distflow.KVSender`, over a link kept per decode
TE), all but the `kv_skip` leading ones the decode TE caches. With `kv_layerwise` the
transfer starts with the step that computes the prompt's last chunk, each layer sent as the
forward writes it; else once that step is over. The first token follows (the trailer) once
sampled. Once the decode TE acks, or the transfer failed, the shell frees the blocks and
reports `handoff` (or `error`). A decode TE (`kv_listen` set) gets an `Add` with `await_kv`
first; it keeps the links prefill TEs open in its select set, writes each layer between its
steps as it lands, and starts the request when the trailer lands.

    python -m flowserve.te_shell --fd N --model PATH --engine-config '{"max_num_seqs": 64, ...}' \
        --launch '{"kv_listen": "unix", ...}'

Without `--model` it starts pre-warmed (scaling/prewarm.py): runtime imported, device
initialised, waiting for a `Load` command that names the model.
"""
import argparse
import logging
import os
import secrets
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

T_START = time.perf_counter()  # before torch is imported: TE-Pre-Load starts here

import msgspec  # noqa: E402
import torch  # noqa: E402

from flowserve.config import EngineConfig, TELaunch  # noqa: E402
from flowserve.device import pick_device  # noqa: E402
from flowserve.sequence import SeqStatus, Sequence  # noqa: E402
from flowserve.distflow import (  # noqa: E402
    KVReceiver, KVSender, KVTransfer, accept_kv, dtype_name, fetch_weights, listen_kv, serve_weights)
from flowserve.engine import Engine  # noqa: E402
from flowserve.tp import ExecutorLost  # noqa: E402
from flowserve.protocol import (  # noqa: E402
    Abort, Add, Alive, BadFrame, Error, FinishReason, Hello, KVAck, KVHeader, KVTrailer, Load, Message, Ping,
    Prewarmed, Ready, SamplingParams, StartTimings, Step, Stop, Threads, TokenOut, Unpin, decode_config, dial_main,
    pack, recv_frame, unpack_frames)

log = logging.getLogger("flowserve.te_shell")
REJOIN_BACKOFF_S = (0.02, 0.2)  # first and longest wait between dials of a restarting main process


class Liveness(threading.Thread):
    """Sends `Alive` each `interval_s`, whatever the main thread is doing (a torch op releases
    the GIL; pure Python yields it every few milliseconds). A TE whose TP executor is stopped
    or gone is frozen as a whole (its master waits on it): then it falls silent too. If the
    main process stays gone past the adoption grace while the main thread is stuck in a step
    (waiting on a stopped executor, say), nothing else would ever end this TE: it exits."""

    def __init__(self, send: Callable[[Message], None], executors: list[int], grace_s: float,
                 interval_s: float = 0.5):
        super().__init__(daemon=True, name="liveness")
        self.send, self.executors, self.interval_s = send, executors, interval_s
        self.grace_s = max(grace_s, 2 * interval_s)
        self.busy_since: float | None = None   # set by the main thread around each step and command
        self.stopped = threading.Event()

    def run(self) -> None:
        lost = None  # since when sends to the main process fail
        while not self.stopped.wait(self.interval_s):
            since = self.busy_since
            try:
                if all(running(pid) for pid in self.executors):
                    self.send(Alive(0.0 if since is None else time.monotonic() - since))
                lost = None
            except OSError:  # the main process is gone; the main thread notices too (and may reconnect)
                lost = lost or time.monotonic()
                if since is not None and time.monotonic() - lost > self.grace_s:
                    log.warning("the main process is gone and this TE is stuck in a step: it ends")
                    os._exit(1)


def running(pid: int) -> bool:
    """The process exists and is not stopped (SIGSTOP, a debugger): /proc's state letter."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "TtZX"
    except OSError:
        return False


class TEShell:
    def __init__(self, sock: socket.socket, engine: Engine, kv_listeners: list[socket.socket] = (),
                 launch: TELaunch = TELaunch()):
        self.sock, self.engine, self.kv_listeners, self.launch = sock, engine, list(kv_listeners), launch
        self.ready: Ready | None = None  # as sent at start: sent again (updated) on reconnecting
        self.known = False  # the main process has sent it a frame: it took this TE into service
        self.write_lock = threading.Lock()
        self.liveness = Liveness(self.send, engine.executor_pids(), launch.adopt_grace_s)
        self.buf = bytearray()
        self.kv_to: dict[str, Add] = {}      # prefill side: request id -> its `Add` (where its KV goes)
        self.sending: dict[str, tuple[Sequence, KVTransfer]] = {}  # prefill side: transfers not yet acked
        self.kv_sender = KVSender()
        self.awaiting: dict[str, Add] = {}   # decode side: request id -> its `Add`, until the KV comes
        self.kv_links: list[KVReceiver] = []  # decode side: links from prefill TEs
        self.landing: dict[KVReceiver, tuple[Add | None, Sequence | None]] = {}  # a link's transfer in progress
        self.executors = engine.executor_pidfds()  # TP: readable once an executor has exited

    def send(self, msg: Message) -> None:
        with self.write_lock:
            if self.sock is not None:  # None while it waits for a restarted main process
                self.sock.sendall(pack(msg))

    def handle(self, msg: Message | BadFrame) -> bool:
        """Apply one command; False means stop."""
        match msg:
            case Add(await_kv=True):
                self.awaiting[msg.rid] = msg
            case Add():
                try:
                    self.engine.add_request(msg.rid, msg.prompt, msg.params, handoff=msg.kv_to is not None,
                                            cache_id=msg.cache_id, pin=msg.pin, adapter=msg.adapter)
                    if msg.kv_to is not None:
                        self.kv_to[msg.rid] = msg
                except ValueError as e:
                    self.report(msg.rid, FinishReason.ERROR, error=str(e))
            case Abort():
                for rid in msg.rids:
                    self.engine.abort(rid)
                    self.awaiting.pop(rid, None)
                    self.kv_to.pop(rid, None)
                self.hand_off()  # a transfer started for one of them waits for no token
                self.send(Step([], self.engine.stats()))
            case Unpin():
                for cache_id in msg.cache_ids:
                    self.engine.unpin(cache_id)
                self.send(Step([], self.engine.stats()))
            case Ping():
                self.send(Step([], self.engine.stats()))
            case Threads():
                self.engine.set_threads(msg.n)
            case Stop():
                return False
            case _:  # undecodable, or not a command: say so, keep serving
                log.error("bad frame from the main process: %s", msg)
                self.send(Error(f"bad frame: {msg}"))
        return True

    def report(self, rid: str, finish: FinishReason, error: str | None = None, kv_ms: float | None = None,
               kv_bytes: int | None = None) -> None:
        self.send(Step([TokenOut(rid, [], finish)], self.engine.stats(), error, kv_ms, kv_bytes))

    def poll(self, block: bool) -> bool:
        """Read whatever commands, KV transfers (decode side) and finished transfers (prefill
        side) have come; wait for one if `block`. False means stop."""
        while True:
            watch = [self.sock, self.kv_sender.wake, *self.kv_listeners, *self.kv_links, *self.executors]
            ready, _, _ = select.select(watch, [], [], None if block else 0)
            if not ready:
                return True
            if any(fd in ready for fd in self.executors):
                log.error("a TP executor exited: the TE ends")
                return False
            if self.sock in ready:  # commands first: a transfer's `add` may be among them
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ConnectionResetError("the main process closed its socket")
                self.buf += data
                self.known = True
                self.liveness.busy_since = time.monotonic()  # an `Add` may read an adapter from disk
                try:
                    if not all(self.handle(msg) for msg in unpack_frames(self.buf)):
                        return False
                finally:
                    self.liveness.busy_since = None
            if self.kv_sender.wake in ready:
                self.collect()
            for listener in self.kv_listeners:
                if listener in ready and (conn := accept_kv(listener)):
                    self.kv_links.append(KVReceiver(conn))
            for link in list(self.kv_links):
                if link in ready:
                    self.receive_kv(link)
            block = False

    # ------------------------------------------------------------------ decode side

    def receive_kv(self, link: KVReceiver) -> None:
        """Take what has come on a link: a transfer's header makes the request's sequence
        (blocks for its KV), each layer is written as it lands, the trailer starts it."""
        try:
            for event in link.pump():
                match event:
                    case KVHeader():
                        self.landing[link] = self.begin_landing(event)
                    case KVTrailer():
                        self.land(link, event)
                    case int():
                        add, seq = self.landing[link]
                        if seq is not None:
                            self.engine.write_prefilled(seq, link.kv, event, link.head.kv_skip)
        except (OSError, ValueError) as e:  # BadFrame is a ValueError
            # A transfer cut short frees its blocks and stays awaited: its sender dials again.
            landing = self.landing.pop(link, None)
            log.log(logging.WARNING if landing else logging.INFO, "KV link closed: %s", e)
            if landing and landing[1] is not None:
                self.engine.abort(landing[1].request_id)
            self.kv_links.remove(link)
            link.close()

    def begin_landing(self, head: KVHeader) -> tuple[Add | None, Sequence | None]:
        """A transfer's header: its request's `Add` (None: aborted meanwhile, or never
        announced) and the sequence holding blocks for its KV (None: the decode TE lost the
        prefix the sender skips)."""
        add = self.awaiting.get(head.rid)
        if add is None:
            return None, None
        try:
            if head.adapter_digest != (add.adapter.digest if add.adapter else ""):
                raise ValueError("the KV was computed with another LoRA adapter than the request names")
            return add, self.engine.add_prefilled(head.rid, head.token_ids, add.params, head.num_cached, head.kv_skip,
                                                  add.adapter)
        except ValueError as e:  # it cannot run here (a shorter context than the prefill TE's)
            del self.awaiting[head.rid]
            self.report(head.rid, FinishReason.ERROR, error=str(e))
            return None, None

    def land(self, link: KVReceiver, trailer: KVTrailer) -> None:
        """A transfer's trailer: start its request (or not), and ack."""
        add, seq = self.landing.pop(link)
        if add is not None and seq is None:  # the prefix it was to keep is gone: it waits for all of it
            link.reply(KVAck(False, "the decode TE lost the prefix", send_all=True))
            return
        if seq is None or seq.status is SeqStatus.FINISHED or trailer.token_id is None:
            if seq is not None:
                self.engine.abort(seq.request_id)  # no-op once aborted
            link.reply(KVAck(False, "request unknown to the decode TE"))
            return
        del self.awaiting[seq.request_id]
        rng = trailer.rng_state and torch.frombuffer(bytearray(trailer.rng_state), dtype=torch.uint8)
        self.engine.start_prefilled(seq, trailer.token_id, rng)
        link.reply(KVAck(True))

    # ------------------------------------------------------------------ prefill side

    def stream_handoffs(self, seqs: list[Sequence]) -> Callable[[int], None] | None:
        """Engine hook (`kv_layerwise`): the step about to run computes the last prompt chunk
        of `seqs`. Their transfers start now; the forward tells them as each layer is written."""
        transfers = [t for seq in seqs if (t := self.start_transfer(seq, ready=0))]
        return partial(self.kv_sender.layer_done, transfers) if transfers else None

    def start_transfer(self, seq: Sequence, ready: int) -> KVTransfer | None:
        """Send `seq`'s KV (`ready` of its layers computed) to its decode TE. None: aborted."""
        add = self.kv_to.pop(seq.request_id, None)
        if add is None:
            return None
        engine, blocks = self.engine, list(seq.block_ids)  # a copy: an abort empties the sequence's
        skip = min(add.kv_skip, len(blocks) - 1)
        head = KVHeader(add.kv_rid, seq.token_ids[:seq.num_prompt], seq.num_cached or 0,
                        engine.kv_shape(len(blocks) - skip), dtype_name(engine.dtype), skip,
                        seq.adapter.digest if seq.adapter else "")
        t = KVTransfer(seq.request_id, add.kv_to, head,
                       lambda first, out, layer: engine.read_kv(blocks[first:], out, layer), len(blocks), ready)
        self.sending[seq.request_id] = seq, t
        self.kv_sender.start(t, engine.cfg.kv_timeout_s)
        return t

    def hand_off(self) -> None:
        """After a step: each request it prefilled has its first token, the last thing its
        transfer waits for (one not started yet starts now, all its layers ready)."""
        engine, layers = self.engine, self.engine.model_cfg.num_layers
        for seq in engine.take_handoffs():
            if seq.request_id not in self.sending and not self.start_transfer(seq, ready=layers):
                engine.release(seq)  # aborted before its KV was sent
                continue
            rng = seq.generator and seq.generator.get_state().numpy().tobytes()
            self.kv_sender.finish(self.sending[seq.request_id][1], KVTrailer(seq.token_ids[-1], rng))
        for seq, t in self.sending.values():
            if t.trailer is None and seq.status is SeqStatus.FINISHED:  # ended here (a stop token, an abort)
                self.kv_sender.finish(t, KVTrailer(None))

    def collect(self) -> None:
        """Free the blocks of each transfer acked or failed, and report it."""
        for t in self.kv_sender.completed():
            seq, _ = self.sending.pop(t.request_id)
            self.engine.release(seq)
            if t.trailer.token_id is None:
                continue  # ended here: reported already
            if t.error:
                error = f"KV transfer to the decode TE failed: {t.error}"
                log.warning("%s: %s", seq.request_id, error)
                self.report(seq.request_id, FinishReason.ERROR, error=error)
            else:
                log.info("KV of %s (%d bytes) handed off %.1f ms after its prefill", seq.request_id, t.nbytes,
                         1e3 * t.handoff_s)
                self.report(seq.request_id, FinishReason.HANDOFF, kv_ms=1e3 * t.handoff_s, kv_bytes=t.nbytes)

    def run(self) -> None:
        """Serve until told to stop, or until the main process is gone (TimeoutError: its host
        vanished, per TCP keepalive) and no restarted one adopts this TE within its grace."""
        self.liveness.start()
        try:
            while True:
                try:
                    return self.serve()
                except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:
                    if not self.rejoin(e):
                        return
        finally:
            self.liveness.stopped.set()
            self.kv_sender.close()
            for link in self.kv_links:
                link.close()

    def serve(self) -> None:
        while self.poll(block=not self.engine.has_work()):
            if not self.engine.has_work():
                continue
            self.liveness.busy_since = time.monotonic()
            outs = self.engine.step(self.stream_handoffs if self.engine.cfg.kv_layerwise else None)
            self.liveness.busy_since = None
            self.hand_off()
            if outs:
                self.send(Step(outs, self.engine.stats()))
            self.collect()  # after the first tokens went out: a handoff is never reported before them

    def rejoin(self, why: Exception) -> bool:
        """The main process is gone. Without an adoption grace, or if it never took this TE into
        service (it died, or gave up on it, during the start): False, the TE ends. Else drop
        every request (pinned context caches stay), then dial the main process's TE listener
        with backoff until a restarted main process adopts this TE (True) or the grace is over."""
        launch = self.launch
        if not (launch.adopt_grace_s > 0 and launch.main_address and self.known):
            return False
        with self.write_lock:
            self.sock.close()
            self.sock = None
        for rid in list(self.engine.seqs):
            self.engine.abort(rid)
        self.awaiting.clear()
        self.kv_to.clear()
        self.buf.clear()
        deadline, wait = time.monotonic() + launch.adopt_grace_s, REJOIN_BACKOFF_S[0]
        log.warning("the main process is gone (%s): waiting up to %.0f s for a restarted one at %s", why,
                    launch.adopt_grace_s, launch.main_address)
        while time.monotonic() < deadline:
            sock = None
            try:
                sock = dial_main(launch.main_address, timeout=1)
                ready = msgspec.structs.replace(self.ready, stats=self.engine.stats(),
                                                pinned=list(self.engine.rtc.id_index))
                sock.sendall(pack(Hello(launch.te_id, self.ready.secret)) + pack(ready))
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                first = recv_frame(sock, self.buf)  # `Ping`: adopted; `Stop`: unknown there; None: not yet
                sock.settimeout(None)
            except (OSError, ValueError):  # nobody listens yet, or it went away again
                first = None
            if isinstance(first, Stop):
                log.warning("the main process at %s does not know this TE: it ends", launch.main_address)
                sock.close()
                return False
            if first is not None:
                self.buf[:0] = pack(first)  # served by the loop, like any command
                with self.write_lock:
                    self.sock = sock
                log.warning("adopted by the main process at %s", launch.main_address)
                return True
            if sock:
                sock.close()
            self.buf.clear()
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            wait = min(2 * wait, REJOIN_BACKOFF_S[1])
        log.warning("no main process came back within %.0f s: the TE ends", launch.adopt_grace_s)
        return False


def warm_up(engine: Engine) -> None:
    """One dummy request (a prefill and a decode step), so the first real one runs at full speed."""
    engine.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=2))


def serve_engine(sock: socket.socket, cfg: EngineConfig, launch: TELaunch, model: str | None = None, weights=None,
                 weights_from: str | None = None, t_start: float = T_START, warmed_on_cpu: bool = False,
                 packed: dict | list | None = None) -> None:
    """Build the engine (from `model`; from `weights` a warm template already holds; or from
    the weights a running TE streams from `weights_from`), warm it up, say `ready` with the
    TE's start-up timeline, and serve until told to stop. `t_start` is when this TE began:
    process start, the fork (scaling/template.py), or the `load` command (pre-warmed).
    `warmed_on_cpu`: the process already ran a CPU warm-up before it was forked, `packed`
    holds the linears it packed then (`flowserve.model.pack_linears`; one per rank for a TP
    TE). A TP TE forks its executors here (`flowserve/tp.py`): in each start mode this
    process has run no multi-threaded torch op yet."""
    t_pre = time.perf_counter()
    if weights_from:
        weights = fetch_weights(weights_from)
    engine = Engine(model, cfg, weights=weights, packed=packed, fork_executors=True,
                    use_weight_cache=launch.use_weight_cache)
    tensors, packs = engine.weights()
    weights_addr = serve_weights(engine.model_cfg, tensors, launch.host, launch.ports) \
        if launch.serve_weights else None
    kv = listen_kv(launch.kv_listen, launch.host, launch.ports) if launch.kv_listen else []
    t_loaded = time.perf_counter()
    if engine.tp or not (warmed_on_cpu and engine.device.type == "cpu"):  # TP executors warm up their shapes
        warm_up(engine)
    t_warm = time.perf_counter()
    torch.seed()  # unseeded sampling: each TE its own stream, not the one every fork inherits from the template
    shell = TEShell(sock, engine, [listener for listener, _ in kv], launch)
    timings = StartTimings(1e3 * (t_pre - t_start), 1e3 * (t_loaded - t_pre), 1e3 * (t_warm - t_loaded))
    weights_bytes = sum(t.numel() * t.element_size()
                        for t in [*tensors.values(), *(t for p in packs for t in p.values())])
    shell.ready = Ready(os.getpid(), engine.stats(), engine.max_model_len, timings, weights_bytes, weights_addr,
                        [addr for _, addr in kv], secrets.token_bytes(32) if launch.adopt_grace_s else b"")
    shell.send(shell.ready)
    try:
        shell.run()
    except ExecutorLost as e:
        log.error("%s: the TE ends", e)
    finally:
        engine.close()
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
    ap.add_argument("--launch", default="{}", help="TELaunch as JSON")
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s te[{os.getpid()}] %(name)s %(levelname)s %(message)s")
    sock, cfg = socket.socket(fileno=args.fd), decode_config(args.engine_config)
    if args.model:
        serve_engine(sock, cfg, decode_config(args.launch, TELaunch), model=args.model)
    else:
        load, t_start, sock = wait_for_model(sock, cfg)  # the group it joins decides its engine config
        serve_engine(sock, load.engine_config, load.launch, model=load.model, weights_from=load.weights_from,
                     t_start=t_start)


if __name__ == "__main__":
    main()
