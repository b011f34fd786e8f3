"""A main-process restart: the main process is SIGKILLed, its TEs wait for a new one
(`--adopt-grace-s`), and a main process started again on the same `--state-dir` re-adopts
them (same pids, nothing forked or loaded), with their context caches and group targets; a
stream open at the crash ends, a request in the window is refused at once, and TEs whose
grace runs out exit without leaving a process. Also the pinned ports (`--te-port`,
`--distflow-ports`)."""
import http.client
import os
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from deepflow import ServeConfig
from flowserve.distflow import tcp_listener
from flowserve.protocol import Hello, Stop, pack, recv_frame
from tests.server_util import Server, free_port, running, wait_until

SYSTEM = ("You are the baker of a small shop in Lyon. You answer in one short sentence, always name the price "
          "in euros, and never talk about anything but bread, cakes and tarts. We open at seven.")
USER = [{"role": "user", "content": "Do you sell tarts?"}]


def chat(s: Server, cache_id: str) -> dict:
    code, body = s.post("/v1/chat/completions", {"messages": USER, "max_tokens": 12, "temperature": 0,
                                                 "cache_id": cache_id})
    assert code == 200, body
    return body


def crash(s: Server) -> None:
    """SIGKILL the main process, as a crash would."""
    os.kill(s.proc.pid, signal.SIGKILL)
    assert s.stop() == -signal.SIGKILL


def test_restart_readopts_tes_with_their_caches(tmp_path):
    args = ("--num-tes", "3", "--max-model-len", "1024", "--state-dir", str(tmp_path), "--te-port", str(free_port()))
    first = Server(*args)
    try:
        code, cache = first.post("/v1/caches", {"messages": [{"role": "system", "content": SYSTEM}]})
        assert code == 200, cache
        before = chat(first, cache["id"])
        cluster = first.get("/admin/cluster")
        pids = {te["id"]: te["pid"] for te in cluster["tes"]}
        [holder] = [c["holders"] for c in cluster["context_caches"]]
        # a stream open at the crash: it ends (the client sees the connection go), it does not hang
        conn = http.client.HTTPConnection("127.0.0.1", first.port, timeout=10)
        conn.request("POST", "/v1/completions", '{"prompt": "Once upon a time", "max_tokens": 400, "stream": true}',
                     {"Content-Type": "application/json"})
        stream = conn.getresponse()
        assert stream.readline().startswith(b"data: ")
    except BaseException:
        first.stop()
        raise
    crash(first)
    with pytest.raises(http.client.IncompleteRead):
        stream.read()
    t0 = time.monotonic()
    with pytest.raises(urllib.error.URLError):  # the restart window: refused at once, no hang
        urllib.request.urlopen(first.url + "/v1/models", timeout=5)
    assert time.monotonic() - t0 < 1
    assert all(running(pid) for pid in pids.values()), "the TEs wait for a restarted main process"
    wait_until(lambda: not running(cluster["template_pid"]), timeout=10)  # it exits with its main process

    with Server(*args) as second:
        after = second.get("/admin/cluster")
        assert {te["id"]: te["pid"] for te in after["tes"]} == pids
        assert all(te["adopted"] for te in after["tes"])
        assert [c["holders"] for c in after["context_caches"]] == [holder]  # still pinned there, not rebuilt
        with socket.create_connection(("127.0.0.1", int(args[-1]))) as stray:  # a TE this process does not know
            stray.sendall(pack(Hello("te-99", b"\0" * 32)))
            assert isinstance(recv_frame(stray, bytearray()), Stop)  # is told to stop, not left waiting
        again = chat(second, cache["id"])
        assert again["choices"][0]["message"] == before["choices"][0]["message"]
        assert again["usage"]["prompt_tokens_details"] == before["usage"]["prompt_tokens_details"]
        # new TEs are numbered past the adopted ones (the new template forks them)
        assert second.post("/admin/scale", {"instances": 4})[0] == 200
        wait_until(lambda: second.get("/health")["status"] == "ok" and len(second.get("/admin/cluster")["tes"]) == 4,
                   timeout=120)
        assert {te["id"] for te in second.get("/admin/cluster")["tes"]} == {*pids, "te-3"}
    assert not any(running(pid) for pid in pids.values()), "a clean stop stops adopted TEs too"


def test_a_frozen_te_is_not_adopted_but_killed_and_replaced(tmp_path):
    args = ("--num-tes", "2", "--state-dir", str(tmp_path))
    first = Server(*args)
    try:
        frozen, live = first.get("/admin/cluster")["tes"]
        os.kill(frozen["pid"], signal.SIGSTOP)
    except BaseException:
        first.stop()
        raise
    crash(first)
    with Server(*args) as second:
        wait_until(lambda: not running(frozen["pid"]), timeout=5)
        wait_until(lambda: second.get("/health")["status"] == "ok", timeout=120)
        tes = second.get("/admin/cluster")["tes"]
        assert [(te["id"], te["pid"], te["adopted"]) for te in tes] == [(live["id"], live["pid"], True),
                                                                        ("te-2", tes[1]["pid"], False)]


def test_grace_expiry_leaves_no_process(tmp_path):
    s = Server("--num-tes", "2", "--state-dir", str(tmp_path), "--adopt-grace-s", "2")
    try:
        cluster = s.get("/admin/cluster")
    except BaseException:
        s.stop()
        raise
    crash(s)
    pids = [te["pid"] for te in cluster["tes"]] + [cluster["template_pid"]]
    time.sleep(1)
    assert any(running(pid) for pid in pids[:-1]), "TEs wait out their grace"
    wait_until(lambda: not any(running(pid) for pid in pids), timeout=10)


def test_without_grace_tes_exit_with_the_main_process(tmp_path):
    s = Server("--num-tes", "1", "--state-dir", str(tmp_path), "--adopt-grace-s", "0")
    try:
        pids = [te["pid"] for te in s.get("/admin/cluster")["tes"]]
    except BaseException:
        s.stop()
        raise
    crash(s)
    wait_until(lambda: not any(running(pid) for pid in pids), timeout=5)


def free_pair() -> int:
    """A free port whose next one is free too (the range under test)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def test_distflow_ports_are_taken_from_the_range():
    port = free_pair()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))  # another process's port: skipped
        with tcp_listener("127.0.0.1", f"{port}-{port + 1}") as listener:
            assert listener.getsockname()[1] == port + 1
            with pytest.raises(OSError, match="no free DistFlow port"):
                tcp_listener("127.0.0.1", f"{port}-{port + 1}")
    for bad in ("7000", "7100-7000", "a-b"):
        with pytest.raises(ValueError, match="LO-HI"):
            ServeConfig(distflow_ports=bad)
