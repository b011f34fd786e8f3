"""OpenAI's Files (`/v1/files`): uploads kept under the state dir, for batches and fine-tuning.

A file is a row of the state store (scheduler/state.py `FileRow`) and its bytes under the state
dir's `files/`. An upload streams into a temporary file there (`receive`), refused with 413
past `max_bytes`; to be kept (`keep`) with purpose `batch` or `fine-tune` it must be JSONL,
every non-blank line a JSON object: a truncated or corrupt upload gets a 400 naming its first
bad line, and nothing is stored. Only then is it renamed to its id and its row written, so a
crash mid-upload leaves only a temporary file, removed at the next start. The batch JE
(scheduler/batch.py) reads its input here and writes its output and error files (purpose
`batch_output`) with `add`. The HTTP frontend (deepflow.py) reads the multipart body.
"""
import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from scheduler.api import APIError, FileObject, invalid
from scheduler.state import FileRow, StateStore

PURPOSES = ("batch", "fine-tune")   # what clients upload; batch_output is the batch JE's


def file_object(row: FileRow) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                      purpose=row.purpose)


def check_jsonl(path: Path) -> None:
    """400 naming the first line that is not a JSON object (blank lines are skipped)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ok = isinstance(orjson.loads(line), dict)
            except orjson.JSONDecodeError as e:
                raise invalid(f"line {number} of the file is not valid JSON ({e}); a JSONL file has one JSON "
                              f"object per line", "file") from None
            if not ok:
                raise invalid(f"line {number} of the file is not a JSON object", "file")


def jsonl_lines(path: Path) -> list[bytes]:
    """The non-blank lines of a checked JSONL file."""
    with open(path, "rb") as f:
        return [line for line in f if line.strip()]


@dataclass
class Upload:
    """An upload's bytes, received but not yet kept."""
    path: Path
    filename: str
    size: int


class Files:
    def __init__(self, store: StateStore, max_bytes: int):
        self.store, self.max_bytes = store, max_bytes
        for tmp in store.subdir("files").glob(".*"):  # uploads and writes a crash cut short
            tmp.unlink()

    async def receive(self, chunks: AsyncIterator[bytes], filename: str) -> Upload:
        """Stream an upload's bytes into a temporary file: 413 past `max_bytes`. The caller
        `keep`s it or removes `Upload.path`."""
        path = self.store.file_path(f".upload-{uuid.uuid4().hex}")
        size = 0
        with open(path, "wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    f.close()
                    path.unlink()
                    raise APIError(413, f"the file exceeds {self.max_bytes} bytes (--max-file-bytes)", "file")
                f.write(chunk)
        return Upload(path, filename, size)

    async def keep(self, upload: Upload, purpose: str | None) -> FileRow:
        """A received upload becomes a file: 400 for a purpose or JSONL that is wrong."""
        if purpose not in PURPOSES:
            raise invalid(f"'purpose' must be one of {', '.join(PURPOSES)}, got {purpose!r:.40}", "purpose")
        if not upload.size:
            raise invalid("the file is empty", "file")
        await asyncio.to_thread(check_jsonl, upload.path)
        row = FileRow(f"file-{uuid.uuid4().hex[:24]}", purpose, upload.filename, upload.size, int(time.time()))
        os.replace(upload.path, self.store.file_path(row.id))
        self.store.insert(row)
        return row

    def add(self, file_id: str, data: bytes, filename: str, purpose: str) -> FileRow:
        """Write a file the server made (a batch's output), under an id of its choosing; again
        with the same id replaces it (a batch finalized twice, across a crash). Blocks: run it
        in a thread."""
        tmp = self.store.file_path(f".write-{file_id}")
        tmp.write_bytes(data)
        os.replace(tmp, self.store.file_path(file_id))
        row = FileRow(file_id, purpose, filename, len(data), int(time.time()))
        self.store.insert(row, replace=True)
        return row

    def get(self, file_id: str) -> FileRow:
        return self.store.need(FileRow, file_id, "File object", "file_id")

    def page(self, purpose: str | None, limit: int, after: str | None) -> tuple[list[FileRow], bool]:
        """The newest first, `limit` of them after the file `after`; and whether more follow."""
        return self.store.page(FileRow, limit, after, where="purpose = ?" if purpose else "",
                               params=(purpose,) if purpose else ())

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        self.store.delete(FileRow, file_id)
        self.store.file_path(file_id).unlink(missing_ok=True)

    def path(self, file_id: str) -> Path:
        return self.store.file_path(self.get(file_id).id)
