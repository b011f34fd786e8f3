"""Start `deepflow.py serve` for real, as a subprocess on a free loopback port, and the helpers
the server tests share: waiting on a condition, reading a stream's SSE data lines, process state."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`with Server(*flags) as s:` stops the server however the body ends. The exit code is
    checked only when the body succeeded; when it failed, its own exception propagates with
    the server's log attached as a note. The log file is removed once the server stopped."""

    def __init__(self, *args: str, timeout: float = 180, env: dict | None = None, host: str = "127.0.0.1",
                 prefix: tuple[str, ...] = ()):
        """`prefix`: a command the server runs under, e.g. `ip netns exec NS` (it execs, so the
        pid is the server's); `host`: the address it listens on there."""
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.log_path = Path(f"/tmp/deepflow-test-{self.port}.log")
        self.log = open(self.log_path, "w+")
        if "--state-dir" not in args:  # each server its own state (files, batches), gone with the temp dir
            self.state_dir = tempfile.TemporaryDirectory(prefix="deepflow-state-")
            args = (*args, "--state-dir", self.state_dir.name)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(ROOT / "deepflow.py"), "--log-level", "info", "serve", "--host", host,
             "--port", str(self.port), *args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True)  # its own process group, as under a terminal: tests may signal the group
        try:
            wait_until(self.healthy, timeout, interval=0.25)
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        code = self.stop()
        if exc is not None:
            exc.add_note(f"--- server log (exit code {code}) ---\n{self.output()}")
        else:
            assert code == 0, f"server exited with {code}:\n{self.output()}"

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}")
        try:
            return self.get("/health")["status"] == "ok"
        except OSError:
            return False

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def status(self, path: str) -> int:
        """The HTTP status of GET `path` (an error's too)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def post(self, path: str, body: dict, timeout: float = 600) -> tuple[int, dict]:
        """POST JSON; the status and the JSON answer (an error's body too)."""
        return self.request("POST", path, body, timeout)

    def delete(self, path: str) -> tuple[int, dict]:
        return self.request("DELETE", path)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def output(self) -> str:
        """The server's log so far; all of it once stopped."""
        if not self.log.closed:
            self.log.seek(0)
            self.final_output = self.log.read()
        return self.final_output

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, SIGKILL after `timeout`; the exit code. The log file goes, its text stays in output()."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.output()
            self.log.close()
            self.log_path.unlink(missing_ok=True)
        return self.proc.returncode


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (a TP TE's executors)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def wait_until(check, timeout: float = 60, interval: float = 0.1) -> None:
    """Poll `check()` until it is true; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout} s")
        time.sleep(interval)


async def async_wait_until(check, timeout: float = 60, interval: float = 0.1) -> None:
    """wait_until for async tests: `check` (blocking, e.g. Server.get) runs in a thread."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout} s")
        await asyncio.sleep(interval)


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
