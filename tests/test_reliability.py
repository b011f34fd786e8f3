"""Faults and hostile input against the real server: a TE killed mid-stream, an overload
burst, fuzzing from the server's own OpenAPI description, a client that stops reading.
docs/RELIABILITY.md lists each fault with the test here that shows it."""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import aiohttp
import orjson

from tests.server_util import Server, pid_alive


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def data_lines(resp: aiohttp.ClientResponse, count: int | None = None, timeout: float = 60) -> list[str]:
    """The next `count` SSE data payloads (all until the stream ends when None)."""
    out = []
    async with asyncio.timeout(timeout):
        while count is None or len(out) < count:
            line = await resp.content.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                out.append(line[6:].strip().decode())
    return out


async def wait_for(check, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


async def test_te_crash():
    """SIGKILL a TE: a task that had sent nothing is retried elsewhere unseen, a started
    stream ends at once with an error event, the group is refilled, /health says degraded
    while it is short."""
    s = Server("--num-tes", "2", "--max-model-len", "1024", "--policy", "load")  # placement by load alone
    try:
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
            await wait_for(lambda: any(te["tasks"] for te in s.get("/admin/cluster")["tes"] if te["id"] == idle["id"]))
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
            await wait_for(lambda: len([te for te in s.get("/admin/cluster")["tes"] if te["state"] == "ready"]) == 2)
            assert s.get("/health")["status"] == "ok"
            tes = s.get("/admin/cluster")["tes"]
            assert {te["pid"] for te in tes}.isdisjoint({idle["pid"], busy["pid"]})
            assert not pid_alive(idle["pid"]) and not pid_alive(busy["pid"])
            async with http.post(url, json=short) as r:
                assert (await r.json())["choices"][0]["message"]["content"] == expected
    finally:
        assert s.stop() == 0


async def test_overload_burst_is_bounded():
    """10x the capacity at once: the excess gets 429 with Retry-After, every admitted request
    completes in full, and the main process's memory does not grow with the burst."""
    s = Server("--max-num-seqs", "4", "--max-queued", "4", "--max-model-len", "512")
    capacity = 8
    try:
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
    finally:
        assert s.stop() == 0


def test_slow_reader_does_not_stall_others():
    """A client that stops reading its stream: other requests are still answered, and its
    abandoned connection is aborted (its task leaves the TE) once it goes away."""
    s = Server("--max-model-len", "2048")
    try:
        body = orjson.dumps({"messages": ask("Write a long story."), "max_tokens": 1500, "temperature": 0,
                             "ignore_eos": True, "stream": True, "n": 4})
        slow = socket.create_connection(("127.0.0.1", s.port))
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(2)
        req = urllib.request.Request(s.url + "/v1/completions", orjson.dumps(
            {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
            {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert orjson.loads(r.read())["usage"]["completion_tokens"] > 0
        slow.close()
        deadline = time.monotonic() + 30
        while s.get("/admin/cluster")["tes"][0]["tasks"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.get("/admin/cluster")["tes"][0]["tasks"] == 0
    finally:
        assert s.stop() == 0


def test_openapi_fuzzing_finds_no_server_error():
    """schemathesis generates valid and invalid requests from GET /openapi.json: no 5xx, no hang."""
    s = Server("--max-model-len", "96")
    try:
        spec = s.get("/openapi.json")
        assert spec["openapi"].startswith("3.") and "/v1/chat/completions" in spec["paths"]
        run = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", s.url + "/openapi.json",
             "--checks", "not_a_server_error", "--max-examples", "10", "--request-timeout", "60",
             "--phases", "coverage,fuzzing", "--workers", "1",
             "--generation-deterministic", "--suppress-health-check", "all", "--no-color"],
            check=False, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert s.get("/health")["status"] == "ok"
    finally:
        assert s.stop() == 0


async def test_second_sigterm_ends_the_drain_at_once():
    """The drain would wait 120 s; a second SIGTERM ends the streams with an error event now,
    and the server still exits 0 leaving no TE, template or pre-warmed process behind."""
    s = Server("--drain-timeout", "120", "--max-model-len", "1024")
    cluster = s.get("/admin/cluster")
    pids = [te["pid"] for te in cluster["tes"]] + [cluster["template_pid"]]
    body = {"messages": ask("Count to a thousand."), "max_tokens": 900, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as http:
        streams = [await http.post(s.url + "/v1/chat/completions", json=body) for _ in range(2)]
        for r in streams:
            await data_lines(r, 3)
        s.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        for r in streams:
            rest = await data_lines(r, timeout=20)
            assert rest[-1] == "[DONE]" and "error" in orjson.loads(rest[-2])
        assert time.monotonic() - t0 < 10
    assert s.proc.wait(30) == 0
    await asyncio.sleep(0.5)
    assert not any(pid_alive(p) for p in pids)
