"""Faults and hostile input against the real server: a TE killed mid-stream, an overload
burst, fuzzing from the server's own OpenAPI description, a client that stops reading.
docs/RELIABILITY.md lists each fault with the test here that shows it."""
import asyncio
import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from flowserve.config import EngineConfig, default_model_path
from flowserve.protocol import SamplingParams
from flowserve.tokenizer import Tokenizer
from scheduler.caches import ContextCaches
from scheduler.cluster import Cluster
from scheduler.je import JobExecutor
from scheduler.job import Job, Task
from scheduler.metrics import Metrics
from scheduler.api import APIError
from tests.server_util import Server, async_wait_until, data_lines, pid_alive, rss_mb, wait_until


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


async def test_te_crash():
    """SIGKILL a TE: a task that had sent nothing is retried elsewhere unseen, a started
    stream ends at once with an error event, the group is refilled, /health says degraded
    while it is short."""
    with Server("--num-tes", "2", "--max-model-len", "1024", "--policy", "load") as s:  # placement by load alone
        url = s.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as http:
            short = {"messages": ask("What is the capital of France?"), "max_tokens": 12, "temperature": 0}
            async with http.post(url, json=short) as r:
                expected = (await r.json())["choices"][0]["message"]["content"]

            stream = await http.post(url, json={"messages": ask("Count to 1000."), "max_tokens": 900,
                                                "temperature": 0, "ignore_eos": True, "stream": True})
            await data_lines(stream, 3)
            tes = s.get("/admin/cluster")["tes"]
            busy = next(te for te in tes if te["tasks"] == 1)
            idle = next(te for te in tes if te["tasks"] == 0)

            # The idle TE is frozen, so the next request (least loaded: it goes there) can
            # produce no token before that TE is killed.
            os.kill(idle["pid"], signal.SIGSTOP)
            pending = asyncio.create_task(http.post(url, json=short))
            await async_wait_until(lambda: any(te["tasks"] for te in s.get("/admin/cluster")["tes"]
                                               if te["id"] == idle["id"]))
            os.kill(idle["pid"], signal.SIGKILL)
            async with await pending as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["message"]["content"] == expected
            job = next(j for j in s.get("/admin/cluster")["recent_jobs"] if j["tasks"][0]["retries"])
            assert job["state"] == "finished" and job["tasks"][0]["te"] != idle["id"]

            t0 = time.monotonic()
            os.kill(busy["pid"], signal.SIGKILL)
            rest = await data_lines(stream, timeout=10)
            assert time.monotonic() - t0 < 5
            assert rest[-1] == "[DONE]" and "error" in orjson.loads(rest[-2])
            stream.close()

            health = await http.get(s.url + "/health")
            assert health.status == 503 and (await health.json())["status"] == "degraded"
            await async_wait_until(lambda: [te["state"] for te in s.get("/admin/cluster")["tes"]] == ["ready"] * 2)
            assert s.get("/health")["status"] == "ok"
            tes = s.get("/admin/cluster")["tes"]
            assert {te["pid"] for te in tes}.isdisjoint({idle["pid"], busy["pid"]})
            # gone, not only dead: the template reaps its exited forks within a second
            await async_wait_until(lambda: not pid_alive(idle["pid"]) and not pid_alive(busy["pid"]), timeout=5)
            async with http.post(url, json=short) as r:
                assert (await r.json())["choices"][0]["message"]["content"] == expected


async def test_a_task_no_te_can_take_ends_with_503_and_why():
    """A group at zero that cannot grow (here: no host at all) holds a task at most
    `place_timeout_s`, then the request ends with a 503 that says why, not a silent wait."""
    cluster = Cluster("model", {"colocated": (0, EngineConfig())}, place_timeout_s=0.5)
    await cluster.start()
    je = JobExecutor(cluster, Tokenizer.load(default_model_path()), "m", Metrics({"m": cluster}),
                     ContextCaches(cluster, 0.5))
    job = Job("chat", "m")
    job.tasks.append(Task(job.id, 0, [1, 2, 3], SamplingParams(max_tokens=4)))
    try:
        t0 = time.monotonic()
        je.start(job, [])
        with pytest.raises(APIError) as e:
            async with asyncio.timeout(5):
                async for _ in je.stream(job):
                    pass
        assert 0.5 <= time.monotonic() - t0 < 3  # the bound, checked each heartbeat
        assert e.value.status == 503 and e.value.message.startswith(
            "no colocated TE became free within 0.5 s: the colocated group has 0 TEs and cannot grow (")
        assert "no live host" in e.value.message and not cluster.pending["colocated"]
    finally:
        await cluster.shutdown()


async def test_overload_burst_is_bounded():
    """10x the capacity at once: the excess gets 429 with Retry-After, every admitted request
    completes in full, and the main process's memory does not grow with the burst."""
    capacity = 8
    with Server("--max-num-seqs", "4", "--max-queued", "4", "--max-model-len", "512") as s:
        url = s.url + "/v1/completions"
        body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}

        async def one(http):
            async with http.post(url, json=body) as r:
                return r.status, r.headers.get("Retry-After"), await r.json()

        async def burst():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                return await asyncio.gather(*(one(http) for _ in range(10 * capacity)))

        rss = [rss_mb(s.proc.pid)]
        for _ in range(3):
            results = await burst()
            rss.append(rss_mb(s.proc.pid))
            ok = [b for st, _, b in results if st == 200]
            refused = [(ra, b) for st, ra, b in results if st == 429]
            assert len(ok) + len(refused) == len(results)
            assert capacity <= len(ok) < len(results) and refused
            assert all(b["usage"]["completion_tokens"] == 8 for b in ok)
            assert all(ra == "1" and b["error"]["type"] == "rate_limit_error" for ra, b in refused)
        # the first burst warms up allocators and caches; later ones must not add to it
        assert rss[-1] - rss[1] < 20, rss
        assert s.get("/admin/cluster")["tes"][0]["running"] == 0


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def small_send_buffers():
    """This thread, and the processes it starts, in a fresh network namespace whose TCP send
    buffers stop at 16 KiB: the default 4 MiB would take in a whole long stream, so a client
    that stops reading would never hold the server back. Skips where namespaces cannot be made."""
    from tests.netns_cluster import can_create_namespaces
    if reason := can_create_namespaces():
        pytest.skip(f"cannot create network namespaces: {reason}")
    name = f"dfslow{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sh", "-c",
                        "ip link set lo up && sysctl -qw net.ipv4.tcp_wmem='4096 16384 16384'"], check=True)
        with open("/proc/thread-self/ns/net") as home, open(f"/var/run/netns/{name}") as ns:
            assert libc.setns(ns.fileno(), CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
            try:
                yield
            finally:
                assert libc.setns(home.fileno(), CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_slow_reader_does_not_stall_others():
    """A client that stops reading a long stream (16 choices): once the socket buffers are
    full, the server's writes to it wait (aiohttp back-pressure), so its job stays open after
    the TE generated every token, while other clients are served; when it reads again, it
    gets the whole stream, and the job ends."""
    with small_send_buffers(), Server("--max-model-len", "512") as s:
        slow = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
        slow.sock = socket.socket()
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sock.connect(("127.0.0.1", s.port))
        body = {"messages": ask("Write a long story."), "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                "stream": True, "n": 16}  # ~800 chunks, ~160 KB: twice what the buffers hold
        slow.request("POST", "/v1/chat/completions", orjson.dumps(body), {"Content-Type": "application/json"})

        def job() -> dict:
            return next(j for j in s.get("/admin/cluster")["recent_jobs"] if len(j["tasks"]) == 16)
        wait_until(lambda: all(t["state"] == "finished" for t in job()["tasks"]), 120)
        time.sleep(1)
        assert job()["state"] == "running" and s.get("/admin/cluster")["active"] == 1  # held back

        status, other = s.post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8,
                                                   "temperature": 0, "ignore_eos": True}, timeout=60)
        assert status == 200 and other["usage"]["completion_tokens"] == 8
        assert job()["state"] == "running"

        events = [line[6:] for line in slow.getresponse().read().decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        texts, finishes = [""] * 16, [None] * 16
        for chunk in map(orjson.loads, events[:-1]):
            c = chunk["choices"][0]
            texts[c["index"]] += c["delta"].get("content") or ""
            finishes[c["index"]] = c["finish_reason"] or finishes[c["index"]]
        assert finishes == ["length"] * 16 and len(set(texts)) == 1 and len(texts[0]) > 100  # greedy: one text
        wait_until(lambda: job()["state"] == "finished", 10)
        slow.close()


def test_openapi_fuzzing_finds_no_server_error(tmp_path, monkeypatch):
    """schemathesis generates valid and invalid requests from GET /openapi.json: at least
    1,000 of them, no 5xx, no hang, every answer's body valid against its documented schema,
    a fifth of the generation requests and some of every list route's 2xx (so the success
    bodies are checked, not only errors).
    The server runs a tiny random-weight model with a short context, so that the valid
    requests, which generate tokens, stay quick (~1 min in all)."""
    from tests.tiny_model import write_tiny_model
    model = write_tiny_model(tmp_path / "tiny")
    monkeypatch.setenv("DEEPFLOW_CACHE", str(tmp_path / "cache"))  # the server's weight cache
    with Server("--model", str(model), "--max-model-len", "48", "--kv-cache-gb", "0.01",
                "--threads-per-te", "1") as s:  # 2 torch threads on 2 busy cores spin: 10x slower
        spec = s.get("/openapi.json")
        assert spec["openapi"] == "3.1.0" and "/v1/chat/completions" in spec["paths"]
        report, har = tmp_path / "report.json", tmp_path / "report.har"
        run = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", s.url + "/openapi.json",
             "--checks", "not_a_server_error,response_schema_conformance",
             "--max-examples", "250", "--request-timeout", "60",
             "--phases", "coverage,fuzzing", "--workers", "1",
             "--exclude-path", "/admin/scale",  # valid bodies would start up to 256 TEs
             "--generation-deterministic", "--suppress-health-check", "all", "--no-color",
             "--report", "json,har", "--report-json-path", str(report), "--report-har-path", str(har)],
            check=False, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        cases = orjson.loads(report.read_bytes())["test_cases"]
        assert cases["generated"] >= 1000 and cases["with_failures"] == cases["errored"] == 0, cases
        by_path = defaultdict(Counter)
        for e in orjson.loads(har.read_bytes())["log"]["entries"]:
            by_path[urlsplit(e["request"]["url"]).path][e["response"]["status"]] += 1
        statuses = sum(by_path.values(), Counter())
        assert statuses.total() >= 1000 and not [s for s in statuses if s >= 500], statuses
        generated = by_path["/v1/chat/completions"] + by_path["/v1/completions"]
        assert generated[200] >= 0.2 * generated.total(), generated  # success bodies checked, not only errors
        for listed in ("/v1/models", "/v1/caches", "/v1/files", "/v1/batches", "/v1/fine_tuning/jobs"):
            assert by_path[listed][200] > 0, (listed, by_path[listed])
        assert s.get("/health")["status"] == "ok"


async def test_second_sigterm_ends_the_drain_at_once():
    """The drain would wait 120 s; a second SIGTERM ends the streams with an error event now,
    and the server still exits 0 leaving no TE, template or pre-warmed process behind."""
    with Server("--drain-timeout", "120", "--max-model-len", "1024") as s:
        cluster = s.get("/admin/cluster")
        pids = [te["pid"] for te in cluster["tes"]] + [cluster["template_pid"]]
        body = {"messages": ask("Count to a thousand."), "max_tokens": 900, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as http:
            streams = [await http.post(s.url + "/v1/chat/completions", json=body) for _ in range(2)]
            for r in streams:
                await data_lines(r, 3)
            s.proc.send_signal(signal.SIGTERM)
            await async_wait_until(lambda: s.status("/health") == 503, 10)  # the drain has begun
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            for r in streams:
                rest = await data_lines(r, timeout=20)
                assert rest[-1] == "[DONE]" and "error" in orjson.loads(rest[-2])
            assert time.monotonic() - t0 < 10
        assert s.proc.wait(30) == 0
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10)


LIVENESS = """
import sys, time
from flowserve.te_shell import Liveness
def send(msg):
    raise BrokenPipeError  # the main process is gone
live = Liveness(send, [], grace_s=0.0, interval_s=0.05)
live.busy_since = time.monotonic() if sys.argv[1] == "stuck" else None
live.start()
time.sleep(1.5)
"""


@pytest.mark.parametrize("main_thread, rc", [("stuck", 1), ("idle", 0)])
def test_a_te_stuck_in_a_step_ends_once_the_main_process_is_gone(main_thread, rc):
    """Nobody else would end a TE whose main thread is stuck (a hung executor) after the main
    process died: its liveness thread does, past the grace; an idle TE's main thread rejoins."""
    done = subprocess.run([sys.executable, "-c", LIVENESS, main_thread], timeout=30)
    assert done.returncode == rc
