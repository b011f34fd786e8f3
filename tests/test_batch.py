"""Files and batches on a real server: a batch's lines answer as the same requests do alone,
bad lines land in the error file, cancel stops it, uploads are checked, and a batch survives
SIGKILL of the main process with each custom_id answered exactly once."""
import asyncio
import json
import os
import signal
import sqlite3
import time

import aiohttp
import openai

from tests.server_util import Server, wait_until

FLAGS = ("--max-model-len", "1024", "--kv-cache-gb", "0.2", "--max-file-bytes", "50000")


def chat(text: str, n: int = 8) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": n, "temperature": 0}


def completion(text: str, n: int = 8) -> dict:
    return {"prompt": text, "max_tokens": n, "temperature": 0}


def line(custom_id: str, url: str, body: dict, method: str = "POST") -> dict:
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def upload(s: Server, data: bytes, purpose: str = "batch") -> tuple[int, dict]:
    """POST /v1/files as a form (purpose first or last); the status and the answer."""
    async def post():
        form = aiohttp.FormData()
        form.add_field("file", data, filename="in.jsonl")
        form.add_field("purpose", purpose)
        async with aiohttp.ClientSession() as c, c.post(s.url + "/v1/files", data=form) as r:
            return r.status, await r.json()
    return asyncio.run(post())


def wait_batch(client: openai.OpenAI, batch_id: str, statuses=("completed", "failed", "cancelled", "expired"),
               timeout: float = 300):
    deadline = time.monotonic() + timeout
    while (b := client.batches.retrieve(batch_id)).status not in statuses:
        assert time.monotonic() < deadline, f"batch still {b.status}: {b.request_counts}"
        time.sleep(0.25)
    return b


def by_custom_id(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    out = [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
    ids = [x["custom_id"] for x in out]
    assert len(ids) == len(set(ids)), f"a custom_id answered twice: {sorted(ids)}"
    return {x["custom_id"]: x for x in out}


def texts(body: dict) -> list[str]:
    return [c["message"]["content"] if "message" in c else c["text"] for c in body["choices"]]


def test_batch_lines_answer_as_requests_alone_bad_lines_error_and_cancel():
    good = [line("chat-0", "/v1/chat/completions", chat("Name a color.")),
            line("comp-0", "/v1/completions", completion("The capital of France is")),
            line("chat-1", "/v1/chat/completions", {**chat("Count to five.", 12), "n": 2, "seed": 1, "temperature": 0}),
            line("comp-1", "/v1/completions", completion("1, 2, 3,", 6))]
    bad = [line("empty", "/v1/chat/completions", {"messages": [], "max_tokens": 4}),
           line("no-model", "/v1/completions", {**completion("x"), "model": "nope"}),
           line("too-long", "/v1/completions", completion("hello " * 1100)),
           line("stream", "/v1/completions", {**completion("x"), "stream": True}),
           line("url", "/v1/embeddings", {"input": "x"}),
           line("method", "/v1/completions", completion("x"), method="GET")]
    with Server(*FLAGS) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        f = client.files.create(file=("in.jsonl", jsonl(good[:2] + bad + good[2:])), purpose="batch")
        assert (f.purpose, f.bytes, client.files.retrieve(f.id).filename) == ("batch", len(jsonl(good[:2] + bad + good[2:])), "in.jsonl")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"run": "test"})
        assert b.status == "validating" and b.metadata == {"run": "test"}
        b = wait_batch(client, b.id)
        assert b.status == "completed" and b.completed_at and b.in_progress_at
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (10, 4, 6)
        outputs, errors = by_custom_id(client, b.output_file_id), by_custom_id(client, b.error_file_id)
        assert set(outputs) == {x["custom_id"] for x in good} and set(errors) == {x["custom_id"] for x in bad}
        for x in good:  # the same request alone, over HTTP: the same greedy text
            status, alone = s.post(x["url"], x["body"])
            out = outputs[x["custom_id"]]
            assert status == 200 and out["response"]["status_code"] == 200 and out["error"] is None
            assert texts(out["response"]["body"]) == texts(alone), x["custom_id"]
            usage = out["response"]["body"]["usage"]
            assert (usage["prompt_tokens"], usage["completion_tokens"]) == (alone["usage"]["prompt_tokens"],
                                                                            alone["usage"]["completion_tokens"])
        for x in bad[:4]:  # what the HTTP request gets, in the error file
            status, alone = s.post(x["url"], x["body"]) if not x["body"].get("stream") else (400, None)
            err = errors[x["custom_id"]]["response"]
            assert err["status_code"] == status and status in (400, 404)
            if alone:
                assert err["body"] == alone, x["custom_id"]
        assert errors["url"]["response"]["body"]["error"]["param"] == "url"
        assert errors["method"]["response"]["body"]["error"]["param"] == "method"

        # cancel: running lines stop, the counts are what the files hold, and nothing runs on
        many = [line(f"long-{i}", "/v1/completions", {**completion(f"Story {i}:", 4 if i < 4 else 300),
                                                      "ignore_eos": True}) for i in range(40)]
        f = client.files.create(file=("many.jsonl", jsonl(many)), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        wait_until(lambda: client.batches.retrieve(b.id).request_counts.completed >= 2, 120)
        cancelled = client.batches.cancel(b.id)
        assert cancelled.status in ("cancelling", "cancelled")
        b = wait_batch(client, b.id, ("cancelled",), 60)
        done = by_custom_id(client, b.output_file_id) | by_custom_id(client, b.error_file_id)
        assert b.request_counts.total == 40 and 2 <= b.request_counts.completed + b.request_counts.failed == len(done) < 40
        assert b.cancelled_at and b.cancelling_at
        cluster = s.get("/admin/cluster")
        assert all(te["tasks"] == 0 for te in cluster["tes"]) and cluster["groups"]["colocated"]["batch_pending"] == 0
        time.sleep(1)
        assert client.batches.retrieve(b.id).request_counts == b.request_counts
        assert [x.id for x in client.batches.list(limit=2).data] == [b.id, client.batches.list().data[1].id]


def test_uploads_and_batch_inputs_are_checked():
    with Server(*FLAGS) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        status, err = upload(s, b'{"a": 1}\n' * 6000)
        assert status == 413 and err["error"]["code"] == "request_too_large"
        status, err = upload(s, b'{"a": 1}\n', purpose="assistants")
        assert status == 400 and err["error"]["param"] == "purpose"
        status, err = upload(s, b'{"custom_id": "a"}\n{"custom_id": "b", "bo')  # truncated
        assert status == 400 and "line 2" in err["error"]["message"]
        assert upload(s, b"[1, 2]\n")[0] == 400
        assert upload(s, b'{"custom_id": "a"}\n', purpose="batch")[0] == 200  # the purpose after the file
        client.files.delete(client.files.list().data[0].id)
        assert not client.files.list().data  # nothing refused was kept
        assert s.status("/v1/files/file-nope") == 404 and s.status("/v1/files/file-nope/content") == 404
        status, err = s.post("/v1/batches", {"input_file_id": "file-nope", "endpoint": "/v1/completions",
                                             "completion_window": "24h"})
        assert status == 404 and err["error"]["param"] == "file_id"

        tune = client.files.create(file=("t.jsonl", b'{"messages": []}\n'), purpose="fine-tune")
        status, err = s.post("/v1/batches", {"input_file_id": tune.id, "endpoint": "/v1/completions",
                                             "completion_window": "24h"})
        assert status == 400 and err["error"]["param"] == "input_file_id"
        status, err = s.post("/v1/batches", {"input_file_id": tune.id, "endpoint": "/v1/embeddings",
                                             "completion_window": "24h"})
        assert status == 400 and err["error"]["param"] == "endpoint"
        dup = client.files.create(file=("d.jsonl", jsonl([line("a", "/v1/completions", completion("x"))] * 2)),
                                  purpose="batch")
        b = wait_batch(client, client.batches.create(input_file_id=dup.id, endpoint="/v1/completions",
                                                     completion_window="24h").id)
        assert b.status == "failed" and b.errors.data[0].code == "duplicate_custom_id" and b.errors.data[0].line == 2
        assert client.files.content(dup.id).content == jsonl([line("a", "/v1/completions", completion("x"))] * 2)
        assert client.files.delete(dup.id).deleted and s.status(f"/v1/files/{dup.id}") == 404
        assert s.status("/v1/batches/batch_nope") == 404
        assert s.post("/v1/batches/batch_nope/cancel", {})[0] == 404


def test_a_batch_survives_sigkill_of_the_main_process(tmp_path):
    lines = [line(f"req-{i}", "/v1/completions" if i % 2 else "/v1/chat/completions",
                  completion(f"Fact {i}:", 24) if i % 2 else chat(f"Say {i}.", 24)) for i in range(24)]
    flags = (*FLAGS, "--state-dir", str(tmp_path), "--max-num-seqs", "4")
    s = Server(*flags)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        wait_until(lambda: client.batches.retrieve(b.id).request_counts.completed >= 6, 300)
        os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait()
    finally:
        s.stop()
        try:  # the TEs it left, if any
            os.killpg(s.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    with sqlite3.connect(tmp_path / "state.db") as db:
        before = dict(db.execute("SELECT custom_id, result FROM batch_lines WHERE batch_id = ?", (b.id,)))
    assert 6 <= len(before) < len(lines), "the kill should come mid-batch"

    with Server(*flags) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        b = wait_batch(client, b.id)
        assert b.status == "completed" and b.request_counts.completed == len(lines) and b.request_counts.failed == 0
        out = by_custom_id(client, b.output_file_id)  # each custom_id once
        assert sorted(out) == sorted(x["custom_id"] for x in lines)
        for custom_id, result in before.items():  # answered before the kill: not run again
            assert out[custom_id] == json.loads(result)
