"""Chaos: random seeded faults under load from the openai client, then invariants (Jepsen-style).

Starts `deepflow.py serve` (or uses --base-url with --server-pid), records the greedy answers
to a few prompts, then for --seconds runs --concurrency openai clients (streamed chats,
completions) while a seeded injector hits a random process every ~--gap-s seconds:

- `te_kill` / `te_stop`: SIGKILL, or SIGSTOP (and SIGCONT after a while, or never), of a TE
- `executor_kill` / `executor_stop`: the same for a TP executor (a TE's child; --tensor-parallel-size > 1)
- `template_kill` / `template_stop`: the same for a host's warm template
- with --main-every-s S: `main_kill`, SIGKILL of the main process, started again at once on
  the same --state-dir (its TEs wait for it, `--adopt-grace-s`); requests cut by it end with a
  connection error, which counts as an error, not a broken invariant
- with --disk-full: `disk_full`, the state dir (a 16 MiB tmpfs) filled up for 3-15 s
- with --hosts N (`--backend ray` over N network namespaces, tests/netns_cluster.py; root):
  `agent_kill` / `agent_stop` of a node agent, and `link_cut`: a host other than the main
  process's loses its link for 5-20 s

Afterwards, once the cluster has settled, it checks the invariants:

- every request was answered or ended with an error (a 429/503, an error event in the stream),
  none hung past --bound-s, no 5xx other than 503, no stream that stopped without a finish_reason
- no leaked process: every pid the server ever ran (TEs, executors, templates) is either one of
  its current processes or gone, and the server has no other child
- no leaked KV block or pin: every TE has 0 blocks in use and 0 pinned once idle (/admin/cluster)
- the same greedy answers as before the faults
- a batch (`BATCH_LINES` greedy completion lines, created before the faults and run at low
  priority through them) ends completed with every `custom_id` exactly once in its output and
  error files

    python bench/chaos.py --seconds 300 --seed 1 [--gap-s 3] [--concurrency 8] [--tiny] [-- serve flags...]

--tiny serves a tiny random-weight model (tests/tiny_model.py) with --tensor-parallel-size 2, so
that faults, not compute, set the pace, and every TE has an executor to hit.

tests/test_chaos.py runs the same, shorter. The figures of a run go to docs/RELIABILITY.md.
"""
import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.netns_cluster import NetnsCluster  # noqa: E402
from tests.server_util import Server, children, free_port, pid_alive  # noqa: E402
from tests.tiny_model import write_tiny_model  # noqa: E402

PROMPTS = ["The capital of France is", "Count to ten: one, two,", "def fibonacci(n):"]
MODEL = [""]  # the served model's name, asked once
BATCH_LINES = 24
WORDS = ["cat", "river", "seven", "blue", "machine", "story", "cloud", "engine"]


@dataclass
class Chaos:
    """One run: what was sent and how it ended, what was injected, and every pid seen."""
    outcomes: Counter = field(default_factory=Counter)
    bugs: list[str] = field(default_factory=list)
    longest_s: float = 0.0
    faults: list[dict] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)


class Main:
    """The main process under test. `crash()` SIGKILLs it and starts it again with the same
    flags (its --state-dir, --te-port, --adopt-grace-s): the TEs wait and are re-adopted."""

    def __init__(self, *flags: str, **server_kwargs):
        self.flags, self.kwargs = flags, server_kwargs
        self.server = Server(*flags, **server_kwargs)
        self.windows: list[tuple[float, float]] = []   # (killed, serving again)
        self.crashing = False
        self.clients: dict[str, openai.AsyncOpenAI] = {}

    def __enter__(self) -> "Main":
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)

    def get(self, path: str) -> dict:
        return self.server.get(path)

    def client(self, bound_s: float) -> openai.AsyncOpenAI:
        url = self.server.url
        if url not in self.clients:
            self.clients[url] = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                                   timeout=bound_s)
        return self.clients[url]

    def crash(self) -> None:
        killed = time.monotonic()
        os.kill(self.server.proc.pid, signal.SIGKILL)
        self.server.stop()
        self.server = Server(*self.flags, **self.kwargs)
        self.windows.append((killed, time.monotonic()))

    def was_down(self, t0: float, t1: float) -> bool:
        """Did [t0, t1] overlap a crash, or is one under way (no window recorded yet)?"""
        return any(killed <= t1 and t0 <= ready for killed, ready in self.windows) or self.crashing


def server_pids(cluster: dict) -> dict[str, list[int]]:
    """The processes the server runs now, by kind."""
    tes = [te["pid"] for te in cluster["tes"] if te["pid"] and te["state"] != "dead"]
    return {"te": tes, "executor": [c for pid in tes for c in children(pid)],
            "template": [h["template_pid"] for h in cluster["hosts"] if h.get("template_pid")],
            "agent": [h["agent_pid"] for h in cluster["hosts"] if h.get("agent_pid")]}


async def greedy(client: openai.AsyncOpenAI) -> list[str]:
    answers = []
    for prompt in PROMPTS:
        r = await client.completions.create(model=MODEL[0], prompt=prompt, max_tokens=16, temperature=0)
        answers.append(r.choices[0].text)
    return answers


async def one_request(client: openai.AsyncOpenAI, rng: random.Random) -> str:
    """Send one random request; 'ok' or 'error:<why>'; raises on what breaks an invariant."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 120)))
    max_tokens, temperature = rng.randint(4, 64), rng.choice([0, 0.8])
    try:
        if rng.random() < 0.7:
            stream = await client.chat.completions.create(
                model=MODEL[0], messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=temperature, stream=True)
            finish = None
            async for chunk in stream:
                finish = chunk.choices[0].finish_reason if chunk.choices else finish
            if finish is None:
                raise AssertionError("a stream ended without a finish_reason or an error")
        else:
            r = await client.completions.create(model=MODEL[0], prompt=prompt, max_tokens=max_tokens,
                                                temperature=temperature)
            assert r.choices[0].finish_reason in ("stop", "length"), r
        return "ok"
    except openai.APIStatusError as e:
        if e.status_code in (429, 503):
            return f"error:{e.status_code}"
        raise AssertionError(f"HTTP {e.status_code}: {e.message}") from None
    except openai.APIError as e:  # an error event in the stream
        if isinstance(e, openai.APIConnectionError):
            raise AssertionError(f"connection: {e}") from None
        return "error:event"


async def load(main: Main, rng: random.Random, stop_at: float, bound_s: float, run: Chaos) -> None:
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(bound_s):
                run.outcomes[await one_request(main.client(bound_s), rng)] += 1
        except TimeoutError:
            run.bugs.append(f"a request hung past {bound_s} s")
        except AssertionError as e:
            if str(e).startswith("connection") and main.was_down(t0, time.monotonic()):
                run.outcomes["error:connection"] += 1  # the main process died under it: the client retries
                await asyncio.sleep(0.2)
            else:
                run.bugs.append(str(e))
        run.longest_s = max(run.longest_s, time.monotonic() - t0)


async def cut_link(hosts: NetnsCluster, i: int, seconds: float) -> None:
    hosts.set_link(i, up=False)
    try:
        await asyncio.sleep(seconds)
    finally:
        hosts.set_link(i, up=True)


async def fill_disk(state_dir: str, seconds: float) -> None:
    """Fill the file system under the state dir (a small tmpfs) for `seconds`, then free it."""
    filler = Path(state_dir) / "chaos-filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:  # ENOSPC: full
            pass
    try:
        await asyncio.sleep(seconds)
    finally:
        filler.unlink()


async def inject(main: Main, rng: random.Random, stop_at: float, gap_s: float, health_s: float, run: Chaos,
                 hosts: NetnsCluster | None = None, main_every_s: float = 0, disk: str | None = None) -> None:
    """Hit a random process of a random kind every ~gap_s seconds; a SIGSTOP is followed by a
    SIGCONT within 2 health timeouts, or (a third of them) never. With `hosts`, a host's link
    may be cut instead (one at a time, never the main process's); with `main_every_s`, the
    main process may be killed and restarted (at most that often); with `disk` (the state dir
    on a small tmpfs), its disk may fill up for a while."""
    cuts: list[asyncio.Task] = []
    last_crash = time.monotonic()
    while (now := time.monotonic()) < stop_at:
        await asyncio.sleep(min(rng.expovariate(1 / gap_s), stop_at - now))
        try:
            pids = server_pids(await asyncio.to_thread(main.get, "/admin/cluster"))
        except OSError:
            continue
        run.seen.update(p for kind in pids.values() for p in kind)
        kinds = [k for k in sorted(pids) if pids[k]] + (["link"] if hosts and all(c.done() for c in cuts) else []) \
            + (["main"] if main_every_s and time.monotonic() - last_crash > main_every_s else []) \
            + (["disk"] if disk and all(c.done() for c in cuts) else [])
        if not kinds or time.monotonic() >= stop_at:
            continue
        kind = rng.choice(kinds)
        if kind == "main":
            run.faults.append({"t": round(time.monotonic() - run.started, 1), "fault": "main_kill",
                               "pid": main.server.proc.pid})
            main.crashing = True
            try:
                await asyncio.to_thread(main.crash)
            finally:
                main.crashing, last_crash = False, time.monotonic()
            continue
        if kind == "disk":
            seconds = round(rng.uniform(3, 15), 1)
            run.faults.append({"t": round(time.monotonic() - run.started, 1), "fault": "disk_full", "seconds": seconds})
            cuts.append(asyncio.create_task(fill_disk(disk, seconds)))
            continue
        if kind == "link":
            i, seconds = rng.randrange(1, hosts.n), round(rng.uniform(5, 20), 1)
            run.faults.append({"t": round(time.monotonic() - run.started, 1), "fault": "link_cut", "host": i,
                               "seconds": seconds})
            cuts.append(asyncio.create_task(cut_link(hosts, i, seconds)))
            continue
        pid, sig = rng.choice(pids[kind]), rng.choice(["kill", "stop"])
        fault = {"t": round(time.monotonic() - run.started, 1), "fault": f"{kind}_{sig}", "pid": pid}
        try:
            os.kill(pid, signal.SIGKILL if sig == "kill" else signal.SIGSTOP)
        except ProcessLookupError:
            continue
        if sig == "stop" and rng.random() < 2 / 3:
            fault["cont_after_s"] = round(rng.uniform(0.2, 2 * health_s), 1)
            asyncio.get_running_loop().call_later(fault["cont_after_s"], resume, pid)
        run.faults.append(fault)
    await asyncio.gather(*cuts)


def resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def settled(get, n_hosts: int) -> bool:
    """Every host back with its template up, every group at its target, every TE ready and
    idle, the server healthy."""
    try:
        health, cluster = get("/health"), get("/admin/cluster")
    except OSError:
        return False
    groups = cluster["groups"].values()
    templates = cluster["start_mode"] != "fork" or all(h.get("template_pid") for h in cluster["hosts"])
    return health["status"] == "ok" and len(cluster["hosts"]) == n_hosts and templates and \
        all(len(g["tes"]) == g["target"] for g in groups) and \
        all(te["state"] == "ready" and te["tasks"] == 0 for te in cluster["tes"])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "(gone)"


async def start_batch(client: openai.AsyncOpenAI) -> str:
    """A batch of greedy completion lines, to run beside the load and through the faults."""
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL[0], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8, "temperature": 0}}
             for i in range(BATCH_LINES)]
    upload = await client.files.create(file=("chaos.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()),
                                       purpose="batch")
    batch = await client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    return batch.id


async def batch_outcome(main: Main, bound_s: float, batch_id: str, wait_s: float = 120) -> tuple[str, list[str]]:
    """The batch's status once it has ended (or after `wait_s`), and the custom ids in its
    output and error files."""
    deadline = time.monotonic() + wait_s
    while True:
        client = main.client(bound_s)  # the main process's address changes when it restarts
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled") or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    ids = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            text = (await client.files.content(file_id)).text
            ids += [json.loads(line)["custom_id"] for line in text.splitlines() if line]
    return batch.status, ids


def invariants(main: Main, run: Chaos, before: list[str], after: list[str],
               batch: tuple[str, list[str]]) -> dict[str, bool]:
    cluster = main.get("/admin/cluster")
    now = server_pids(cluster)
    current = {p for kind in now.values() for p in kind}
    run.seen.update(current)
    leaked = sorted(p for p in run.seen - current if pid_alive(p)) + \
        sorted(set(children(main.server.proc.pid)) - current)
    kv = {te["id"]: (te["kv_usage"], te["pinned_blocks"]) for te in cluster["tes"]}
    return {"no_request_hung_or_broke": not run.bugs,
            "every_request_answered_or_ended_with_an_error": sum(run.outcomes.values()) > 0 and not run.bugs,
            "no_leaked_process": not leaked,
            "no_leaked_kv_block_or_pin": all(u == 0 and p == 0 for u, p in kv.values()),
            "same_greedy_answers": before == after,
            "batch_lines_exactly_once": batch[0] == "completed" and
            sorted(batch[1]) == sorted(f"line-{i}" for i in range(BATCH_LINES)),
            "_details": {"leaked": {pid: cmdline(pid) for pid in leaked}, "kv": kv, "batch_status": batch[0]}}


async def chaos(main: Main, seconds: float, seed: int, gap_s: float, concurrency: int, bound_s: float,
                health_s: float, hosts: NetnsCluster | None = None, main_every_s: float = 0,
                disk: str | None = None) -> dict:
    """Run load and faults for `seconds`, let the cluster settle, check the invariants."""
    rng = random.Random(seed)
    MODEL[0] = (await main.client(bound_s).models.list()).data[0].id
    before = await greedy(main.client(bound_s))
    batch_id = await start_batch(main.client(bound_s))
    run = Chaos()
    stop_at = time.monotonic() + seconds
    await asyncio.gather(inject(main, random.Random(rng.random()), stop_at, gap_s, health_s, run, hosts, main_every_s, disk),
                         *(load(main, random.Random(rng.random()), stop_at, bound_s, run) for _ in range(concurrency)))
    t0 = time.monotonic()
    while not await asyncio.to_thread(settled, main.get, hosts.n if hosts else 1):
        if time.monotonic() - t0 > 60:
            run.bugs.append("the cluster did not settle within 60 s of the last fault")
            break
        await asyncio.sleep(0.5)
    settle_s = time.monotonic() - t0
    await asyncio.sleep(2)  # the TEs' next stats (blocks in use) reach /admin/cluster
    after = await greedy(main.client(bound_s))
    checks = invariants(main, run, before, after, await batch_outcome(main, bound_s, batch_id))
    return {"seed": seed, "seconds": seconds, "faults": len(run.faults), "fault_kinds": dict(Counter(
        f["fault"] for f in run.faults)), "requests": sum(run.outcomes.values()) + len(run.bugs),
        "outcomes": dict(run.outcomes), "bugs": run.bugs[:20], "longest_request_s": round(run.longest_s, 1),
        "bound_s": bound_s, "settle_s": round(settle_s, 1), "invariants": checks, "fault_log": run.faults}


def serve_and_run(flags: list[str], args: argparse.Namespace) -> dict:
    state_dir = tempfile.mkdtemp(prefix="chaos-state-")
    if args.disk_full:  # a file system of its own, small enough to fill
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", state_dir], check=True)
    flags += ["--state-dir", state_dir]
    if args.main_every_s:  # restartable: its state dir, TE port and grace stay the same
        flags += ["--te-port", str(free_port()), "--adopt-grace-s", "30"]
    try:
        return serve_and_run_on(flags, args, state_dir if args.disk_full else None)
    finally:
        if args.disk_full:
            subprocess.run(["umount", state_dir], check=False)


def serve_and_run_on(flags: list[str], args: argparse.Namespace, disk: str | None) -> dict:
    def run(main: Main, hosts: NetnsCluster | None = None) -> dict:
        return asyncio.run(chaos(main, args.seconds, args.seed, args.gap_s, args.concurrency, args.bound_s,
                                 args.health_timeout_s, hosts, args.main_every_s, disk))

    if not args.hosts:
        with Main(*flags) as main:
            return run(main)
    env = {i: {"DEEPFLOW_HOST_MEMORY_GB": "3"} for i in range(args.hosts)}
    with NetnsCluster(args.hosts, prefix="dfc", subnet="10.81.0", env_per_host=env, gcs_port=6410) as hosts:
        with Main(*flags, "--backend", "ray", "--ray-address", hosts.head_address, env=hosts.driver_env(),
                  host=hosts.hosts[0], prefix=("ip", "netns", "exec", hosts.namespace(0))) as main:
            return run(main, hosts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gap-s", type=float, default=3.0, help="mean time between faults")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--bound-s", type=float, default=60, help="no request may take longer")
    ap.add_argument("--health-timeout-s", type=float, default=3)
    ap.add_argument("--num-tes", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a tiny random-weight model, TP=2")
    ap.add_argument("--hosts", type=int, default=0, help="--backend ray over this many namespaces (root)")
    ap.add_argument("--main-every-s", type=float, default=0,
                    help="also kill and restart the main process, at most this often (0: never)")
    ap.add_argument("--disk-full", action="store_true", help="the state dir on a 16 MiB tmpfs that fills up (root)")
    ap.add_argument("--out", default="")
    ap.add_argument("serve", nargs="*", help="extra serve flags (after --)")
    args = ap.parse_args()
    flags = ["--health-timeout-s", str(args.health_timeout_s), "--num-tes", str(args.num_tes), *args.serve]
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            flags += ["--model", str(write_tiny_model(Path(tmp) / "tiny")), "--tensor-parallel-size", "2",
                      "--kv-cache-gb", "0.05"]
        report = serve_and_run(flags, args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
