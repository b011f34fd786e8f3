"""The batch JE: OpenAI's Batch API (`/v1/batches`) over the cluster that serves HTTP requests,
as low-priority work that fills idle capacity.

A batch names an uploaded JSONL file (scheduler/files.py, purpose batch) whose lines are
`{"custom_id", "method": "POST", "url", "body": {...}}`, url /v1/chat/completions or
/v1/completions (OpenAI wants every line's to be the batch's `endpoint`; here they may mix).
It moves through OpenAI's statuses: `validating` (every line has a custom_id, unique; else
`failed` with `errors`) -> `in_progress` -> `finalizing` -> `completed` (or `cancelling` ->
`cancelled`, `expired` past its 24 h window). In progress, each line becomes a job of its model's JE (scheduler/je.py) exactly
as the HTTP request would (`parse_chat`/`parse_completion`, `chat_job`/`completion_job`), so a
bad line gets the error that request would get, in the error file. Its tasks are low priority
(`SamplingParams.low_priority`): the cluster places them only while no other task waits and
the TE's batcher pauses them while an interactive sequence waits or computes its prompt
(scheduler/cluster.py, flowserve/batcher.py), and the autoscaler starts no TE for them
unless nothing else runs (scaling/autoscaler.py). At most `window` lines run at once.

Each line's result (OpenAI's output line `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`) is a row of the state store (scheduler/state.py) as soon as
it finishes. So a restart of the main process, however it ended, resumes a batch where it
stood: the lines with a row are not run again, and the output and error files, written from
the rows in input order when the batch finalizes, hold every custom_id exactly once.
"""
import asyncio
import logging
import time
import uuid

import orjson

from scheduler.api import (BATCH_ENDPOINTS, APIError, BatchObject, BatchRequest, ChatCompletion, Completion,
                           RequestCounts, invalid, parse_chat, parse_completion)
from scheduler.files import Files, jsonl_lines
from scheduler.models import Models
from scheduler.state import BatchLineRow, BatchRow, Resumable, StateStore

log = logging.getLogger("deepflow.batch")

WINDOW_S = 24 * 3600           # completion_window "24h", the only one OpenAI offers
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")  # a run resumes these at start


def batch_object(row: BatchRow, counts: RequestCounts) -> BatchObject:
    fields = {k: v for k, v in vars(row).items() if k != "total"}
    return BatchObject(**fields, request_counts=counts)


def result_line(row: BatchRow, line: int, custom_id: str, status: int, body: bytes) -> str:
    """OpenAI's batch output line; `body` the response's (or error's) JSON."""
    return orjson.dumps({"id": f"batch_req_{row.id.removeprefix('batch_')}_{line}", "custom_id": custom_id,
                         "response": {"status_code": status, "request_id": f"{row.id}-{line}",
                                      "body": orjson.Fragment(body)}, "error": None}).decode()


class Batches(Resumable[BatchRow]):
    row_type, missing = BatchRow, ("Batch object", "batch_id")

    def __init__(self, store: StateStore, files: Files, models: Models, window: int):
        super().__init__(store)
        self.files, self.models, self.window = files, models, window
        self.inflight: dict[str, set[asyncio.Task]] = {}   # batch id -> its lines running now
        self.cancelling: set[str] = set()

    def create(self, req: BatchRequest) -> BatchRow:
        f = self.files.get(req.input_file_id)
        if f.purpose != "batch":
            raise invalid(f"file {f.id} has purpose {f.purpose!r}; a batch's input file needs purpose 'batch'",
                          "input_file_id")
        now = int(time.time())
        row = BatchRow(f"batch_{uuid.uuid4().hex[:24]}", f.id, req.endpoint, req.completion_window, "validating",
                       now, now + WINDOW_S, req.metadata)
        self.store.insert(row)
        self._start(row.id)
        return row

    def counts(self, row: BatchRow) -> RequestCounts:
        done = dict(self.store.execute("SELECT ok, count(*) FROM batch_lines WHERE batch_id = ? GROUP BY ok",
                                       (row.id,)))
        return RequestCounts(total=row.total, completed=done.get(1, 0), failed=done.get(0, 0))

    def cancel(self, batch_id: str) -> BatchRow:
        """Stop a batch: no line starts any more, the running ones are aborted (they count
        neither completed nor failed), and it finalizes as `cancelled` with what is done."""
        row = self.get(batch_id)
        if row.status in ("cancelling", "cancelled"):
            return row
        if row.status not in ("validating", "in_progress"):
            raise APIError(409, f"cannot cancel a batch whose status is {row.status}", "batch_id")
        self.store.update(BatchRow, batch_id, status="cancelling", cancelling_at=int(time.time()))
        self.cancelling.add(batch_id)
        for t in self.inflight.get(batch_id, ()):
            t.cancel()
        return self.get(batch_id)

    def resume(self) -> None:
        """At start: carry on every batch a previous run of the server left unfinished."""
        for row in self.store.select(BatchRow, f"status IN ({', '.join('?' * len(ACTIVE))})", ACTIVE):
            log.warning("resuming %s (%s)", row.id, row.status)
            if row.status == "cancelling":
                self.cancelling.add(row.id)
            self._start(row.id)

    async def _run(self, batch_id: str) -> None:
        try:
            row = self.get(batch_id)
            if row.status == "validating":
                row = await self._validate(row)
            if row.status == "in_progress":
                await self._run_lines(row)
            if row.status != "failed":
                await self._finalize(self.get(batch_id))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or a lost input file: the batch fails, saying why
            log.exception("batch %s failed", batch_id)
            self.store.update(BatchRow, batch_id, status="failed", failed_at=int(time.time()), errors={
                "object": "list", "data": [{"code": "internal_error", "message": str(e), "param": None, "line": None}]})
        finally:
            self.cancelling.discard(batch_id)

    async def _lines(self, row: BatchRow) -> list[bytes]:
        return await asyncio.to_thread(jsonl_lines, self.files.path(row.input_file_id))

    async def _validate(self, row: BatchRow) -> BatchRow:
        """Every line a request with its own custom_id, or the batch fails with the reasons."""
        lines, seen, errors = await self._lines(row), set(), []
        for number, raw in enumerate(lines, 1):
            custom_id = orjson.loads(raw).get("custom_id")  # a JSON object: the upload checked
            if not isinstance(custom_id, str) or not custom_id:
                errors.append({"code": "missing_custom_id", "message": "custom_id must be a non-empty string",
                               "param": "custom_id", "line": number})
            elif custom_id in seen:
                errors.append({"code": "duplicate_custom_id", "param": "custom_id", "line": number,
                               "message": f"custom_id {custom_id!r:.60} is used by an earlier line"})
            seen.add(custom_id)
        now = int(time.time())
        if errors:
            self.store.update(BatchRow, row.id, status="failed", failed_at=now, total=len(lines),
                              errors={"object": "list", "data": errors[:100]})
        elif row.id in self.cancelling:
            self.store.update(BatchRow, row.id, total=len(lines))
        else:
            self.store.update(BatchRow, row.id, status="in_progress", in_progress_at=now, total=len(lines))
        return self.get(row.id)

    async def _run_lines(self, row: BatchRow) -> None:
        lines = await self._lines(row)
        done = {r[0] for r in self.store.execute("SELECT line FROM batch_lines WHERE batch_id = ?", (row.id,))}
        room = asyncio.Semaphore(self.window)
        running = self.inflight.setdefault(row.id, set())
        try:
            for i in (i for i in range(len(lines)) if i not in done):
                await room.acquire()
                if row.id in self.cancelling or time.time() > row.expires_at:
                    break
                t = asyncio.create_task(self._line(row, i, lines[i]))
                running.add(t)
                t.add_done_callback(lambda t: (running.discard(t), room.release()))
            await asyncio.gather(*running, return_exceptions=True)
        finally:  # cancelled (shutdown): the lines running now are run again by the next start
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            self.inflight.pop(row.id, None)

    async def _line(self, row: BatchRow, i: int, raw: bytes) -> None:
        line = orjson.loads(raw)
        try:
            answer = await self._answer(line)
            status, ok, body = 200, True, answer.model_dump_json().encode()
        except APIError as e:
            status, ok, body = e.status, False, e.body().model_dump_json().encode()
        except Exception:  # a bug: this line fails, the others go on
            log.exception("%s line %d", row.id, i)
            status, ok, body = 500, False, APIError(500, "internal server error").body().model_dump_json().encode()
        self.store.insert(BatchLineRow(row.id, i, line["custom_id"], ok,
                                       result_line(row, i, line["custom_id"], status, body)))

    async def _answer(self, line: dict) -> ChatCompletion | Completion:
        """The line's request, run as the HTTP request would be, at low priority."""
        if line.get("method") != "POST":
            raise invalid(f"method must be POST, got {line.get('method')!r:.20}", "method")
        if line.get("url") not in BATCH_ENDPOINTS:  # OpenAI's must be the batch's endpoint; either serves here
            raise invalid(f"url {line.get('url')!r:.60} is not one of {', '.join(BATCH_ENDPOINTS)}", "url")
        chat = line["url"] == "/v1/chat/completions"
        req = (parse_chat if chat else parse_completion)(line.get("body"))
        if req.stream:
            raise invalid("stream is not available in a batch", "body.stream")
        base, lora = self.models.resolve(req.model)
        adapter = lora and lora.wire
        job = base.je.chat_job(req, adapter) if chat else base.je.completion_job(req, adapter)
        for t in job.tasks:
            t.params.low_priority = True
        base.je.start(job, req.stop_strings)
        return await base.je.complete(job)

    async def _finalize(self, row: BatchRow) -> None:
        """The output and error files from the lines' rows, in input order; then the final status."""
        final = "cancelled" if row.id in self.cancelling or row.status == "cancelling" else \
            "expired" if time.time() > row.expires_at else "completed"
        if final == "completed":
            self.store.update(BatchRow, row.id, status="finalizing", finalizing_at=int(time.time()))
        rows = self.store.select(BatchLineRow, "batch_id = ?", (row.id,), "line")
        ids = {}
        for kind, ok in (("output", True), ("error", False)):
            data = "".join(r.result + "\n" for r in rows if r.ok == ok).encode()
            if data:
                f = await asyncio.to_thread(self.files.add, f"file-{row.id}-{kind}", data, f"{row.id}_{kind}.jsonl",
                                            "batch_output")
                ids[f"{kind}_file_id"] = f.id
        self.store.update(BatchRow, row.id, status=final, **{f"{final}_at": int(time.time())}, **ids)
        log.info("%s %s: %d lines done", row.id, final, len(rows))
