"""The seams between processes: `flowserve/protocol.py` frames survive garbage on both ends of a
TE's socket, DistFlow peers need the cluster's secret, and the JE's `StopStrings` cuts text
exactly at a stop string."""
import asyncio
import select
import socket
import threading
from unittest.mock import Mock

import msgspec
import pytest
import torch

from flowserve import distflow
from flowserve.config import EngineConfig, ModelConfig
from flowserve.engine import Engine
from flowserve.protocol import (
    HEADER, Add, Alive, Error, FinishReason, Hello, KVHeader, Ready, SamplingParams, Stats, StartTimings, Step, Stop, TokenOut,
    pack, recv_frame, unpack_frames)
from flowserve.te_shell import TEShell
from scaling.hosts import Host
from scheduler.je import StopStrings
from scheduler.job import Task
from scheduler.te import TEHandle, TEState


def raw_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


BAD_FRAMES = [
    raw_frame(b"\xc1"),                                                       # not msgpack
    raw_frame(msgspec.msgpack.encode({"op": "launch_missiles"})),             # unknown op
    raw_frame(msgspec.msgpack.encode({"op": "add", "rid": "r", "prompt": "not ids",
                                      "params": {}})),                        # wrong field type
    pack(Ready(1, Stats(), 10, StartTimings(0, 0, 0))),                        # a TE's message, not a command
]


def test_te_answers_bad_frames_with_errors_and_keeps_serving(model_path, weights):
    engine = Engine(model_path, EngineConfig(num_kv_blocks=16), weights=weights)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    expected = engine.generate([[1, 2, 3]], params)[0]
    ours, theirs = socket.socketpair()
    shell = threading.Thread(target=TEShell(theirs, engine).run)
    shell.start()
    try:
        for frame in BAD_FRAMES:
            ours.sendall(frame)
        ours.sendall(pack(Add("r1", [1, 2, 3], params)))
        buf, errors, tokens, finish = bytearray(), [], [], None
        while finish is None:
            msg = recv_frame(ours, buf)
            if isinstance(msg, Error):
                errors.append(msg.message)
            elif not isinstance(msg, Alive):  # the TE's liveness thread speaks too
                assert isinstance(msg, Step)
                for out in msg.outs:
                    tokens += out.token_ids
                    finish = out.finish
        assert len(errors) == len(BAD_FRAMES) and all(e.startswith("bad frame") for e in errors)
        assert finish is FinishReason.LENGTH and tokens == expected
    finally:
        ours.sendall(pack(Stop()))
        shell.join(10)
        ours.close()
    assert not shell.is_alive()


async def test_main_process_answers_bad_frames_and_keeps_reading():
    te = TEHandle("te-x", "colocated", EngineConfig(), Host("local", "127.0.0.1", 1, 1 << 30, node=None), cost=0,
                  observer=Mock())
    ours, theirs = socket.socketpair()
    reader, te.writer = await asyncio.open_unix_connection(sock=ours)
    te.state = TEState.READY
    task = Task("job", 0, [1, 2], SamplingParams())
    te.tasks[task.id] = task
    te.reader_task = asyncio.create_task(te._read_loop(reader, bytearray()))
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    for frame in BAD_FRAMES[:2] + [pack(Step([TokenOut(task.id, [7], FinishReason.LENGTH)], Stats(running=1)))]:
        await loop.sock_sendall(theirs, frame)
    ev = await asyncio.wait_for(task.events.get(), 5)
    assert ev.token_ids == [7] and ev.finish_reason is FinishReason.LENGTH and te.stats.running == 1
    buf = bytearray()
    while len(answers := unpack_frames(buf)) < 2 and (data := await loop.sock_recv(theirs, 1 << 16)):
        buf += data
    assert [type(a) for a in answers] == [Error, Error]
    theirs.close()  # EOF: the TE is gone
    await asyncio.wait_for(te.reader_task, 5)
    assert te.state is TEState.DEAD


@pytest.mark.parametrize("stops,pieces,expected,stopped", [
    ([], ["Hello", " world"], ["Hello", " world"], False),
    (["\n\n"], ["one\n", "\ntwo"], ["one", ""], True),            # split over two tokens: cut, nothing leaks
    (["STOP"], ["aST", "OP b"], ["", "a"], True),                 # "aST" might begin "STOP"
    (["STOP"], ["aST", "Ox"], ["", "aSTOx"], False),               # held back, then released
    (["ab", "b"], ["xab"], ["x"], True),                           # the earliest match wins
])
def test_stop_strings(stops, pieces, expected, stopped):
    s = StopStrings(stops)
    out = [s.push(p)[0] for p in pieces[:-1]]
    last, hit = s.push(pieces[-1], final=True)
    assert out + [last] == expected and hit == stopped


def test_stop_strings_hold_back_until_final():
    s = StopStrings(["END"])
    assert s.push("abcEN") == ("abc", False)
    assert s.push("", final=True) == ("EN", False)


def test_distflow_peers_without_the_cluster_secret_get_nothing_and_give_nothing(monkeypatch):
    """DistFlow listeners bind the host's address: a weights fetch or a KV transfer counts only
    with the cluster's secret, which every TE inherits from the main process."""
    monkeypatch.setattr(distflow, "SECRET", b"s" * 32)
    cfg = ModelConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                      head_dim=4)
    address = distflow.serve_weights(cfg, {"w": torch.arange(4.0)}, "127.0.0.1")
    assert torch.equal(distflow.fetch_weights(address)[1]["w"], torch.arange(4.0))  # with the secret
    host, port = address.split(":")
    with socket.create_connection((host, int(port))) as peer:
        peer.sendall(pack(Hello("weights", b"guess")))
        assert recv_frame(peer, bytearray()) is None  # closed before any header

    [(listener, kv_address)] = distflow.listen_kv("tcp", "127.0.0.1")
    with listener, socket.create_connection(("127.0.0.1", int(kv_address.rsplit(":", 1)[1]))) as peer:
        peer.sendall(pack(KVHeader("r", [1], 0, [1], "float32", secret=b"guess")) + b"\0" * 4)
        with distflow.accept_kv(listener) as conn, pytest.raises(ConnectionError, match="secret"):
            select.select([conn], [], [], 5)
            list(distflow.KVReceiver(conn).pump())
