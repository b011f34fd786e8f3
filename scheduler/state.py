"""The state store: what must survive a restart of the main process, in SQLite (the standard
library's sqlite3, WAL) under `--state-dir`.

This module alone owns the schema. `MIGRATIONS` is a numbered list of SQL scripts, applied in
order on open, each in one transaction with `PRAGMA user_version` set to its number, so a
state dir written by an older version is brought up to date and a migration never runs
twice. A new table is a new script APPENDED to the list (never edit one that has shipped) and
a dataclass below whose fields are its columns: `StateStore.insert/get/select/update/delete`
map rows to and from such dataclasses (a dict or list field is stored as JSON text).

Who writes what: uploaded files (scheduler/files.py: rows here, bytes under `files/`), batches
and each of their lines' results as it finishes (scheduler/batch.py); serving TEs, group
targets, context caches and DistFlow secrets, for a restarted main process to re-adopt
(scheduler/cluster.py, scheduler/caches.py, deepflow.py); fine-tuning jobs, their events and
checkpoints (scheduler/fine_tuning.py). The writes are one small row each: in WAL mode with
synchronous=NORMAL a commit is an append to the log without fsync, tens of microseconds, so
the event loop calls them directly; what can take long (file bytes, a batch's output file)
runs in a thread (`asyncio.to_thread`), which the lock makes safe.
SIGKILL loses nothing committed; a power cut may lose the last commits (synchronous=NORMAL).

One server per state dir: the store holds an exclusive lock on `lock` (released by the OS
when the process dies, however it dies), and a second server on the same dir refuses to start.
"""
import asyncio
import fcntl
import json
import logging
import sqlite3
import threading
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from flowserve.config import cache_dir
from scheduler.api import APIError

MIGRATIONS: list[str] = [
    # 1: OpenAI files and batches (scheduler/files.py, scheduler/batch.py)
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL);
    CREATE TABLE batches (
        id TEXT PRIMARY KEY, input_file_id TEXT NOT NULL, endpoint TEXT NOT NULL,
        completion_window TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL, metadata TEXT, total INTEGER NOT NULL DEFAULT 0, errors TEXT,
        output_file_id TEXT, error_file_id TEXT, in_progress_at INTEGER, finalizing_at INTEGER,
        completed_at INTEGER, failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER,
        cancelled_at INTEGER);
    CREATE TABLE batch_lines (
        batch_id TEXT NOT NULL REFERENCES batches(id) ON DELETE CASCADE, line INTEGER NOT NULL,
        custom_id TEXT NOT NULL, ok INTEGER NOT NULL, result TEXT NOT NULL,
        PRIMARY KEY (batch_id, line));
    """,
    # 2: what a restarted main process re-adopts (scheduler/cluster.py, scheduler/caches.py)
    """
    CREATE TABLE tes (
        id TEXT PRIMARY KEY, model TEXT NOT NULL, group_name TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
        secret BLOB NOT NULL, engine_config TEXT NOT NULL, start_mode TEXT NOT NULL, main_address TEXT NOT NULL);
    CREATE TABLE group_targets (id TEXT PRIMARY KEY, target TEXT NOT NULL, by_hand TEXT NOT NULL);
    CREATE TABLE context_caches (
        id TEXT PRIMARY KEY, model TEXT NOT NULL, kind TEXT NOT NULL, context TEXT NOT NULL, token_ids TEXT NOT NULL,
        blocks INTEGER NOT NULL, ttl_s INTEGER NOT NULL, created REAL NOT NULL);
    CREATE TABLE secrets (id TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 3: fine-tuning jobs, their events and checkpoints (scheduler/fine_tuning.py)
    """
    CREATE TABLE fine_tuning_jobs (
        id TEXT PRIMARY KEY, model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
        suffix TEXT, hyperparameters TEXT NOT NULL, seed INTEGER NOT NULL, status TEXT NOT NULL,
        created_at INTEGER NOT NULL, finished_at INTEGER, fine_tuned_model TEXT, trained_tokens INTEGER,
        error TEXT, adapter_path TEXT);
    CREATE TABLE fine_tuning_events (
        id TEXT PRIMARY KEY, job_id TEXT NOT NULL REFERENCES fine_tuning_jobs(id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT);
    CREATE TABLE fine_tuning_checkpoints (
        id TEXT PRIMARY KEY, job_id TEXT NOT NULL REFERENCES fine_tuning_jobs(id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL, step_number INTEGER NOT NULL, metrics TEXT NOT NULL,
        fine_tuned_model_checkpoint TEXT NOT NULL);
    """,
    # 4: a fine-tuning job's metadata, as OpenAI's
    """
    ALTER TABLE fine_tuning_jobs ADD COLUMN metadata TEXT;
    """,
]


class StateDirBusy(Exception):
    """Another live process holds this state dir."""


# --- the rows ----------------------------------------------------------------------------

@dataclass
class FileRow:
    """An uploaded file; its bytes are `StateStore.file_path(id)`."""
    table: ClassVar[str] = "files"
    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: int


@dataclass
class BatchRow:
    """A batch; its times are Unix seconds (None: not yet), its status OpenAI's."""
    table: ClassVar[str] = "batches"
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    metadata: dict | None = None
    total: int = 0                  # lines in the input file, once validated
    errors: dict | None = None      # OpenAI's {"object": "list", "data": [...]} when the input is refused
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None


@dataclass
class BatchLineRow:
    """One finished line of a batch: its output line (ok) or error line, as JSON text."""
    table: ClassVar[str] = "batch_lines"
    batch_id: str
    line: int
    custom_id: str
    ok: bool
    result: str


@dataclass
class TERow:
    """A serving TE that may outlive the main process: what the next one needs to re-adopt it."""
    table: ClassVar[str] = "tes"
    id: str
    model: str                      # its base model's path
    group_name: str
    host: str                       # its host's name
    pid: int
    secret: bytes                   # what it shows when it reconnects (it made it at start)
    engine_config: dict
    start_mode: str
    main_address: str               # the TE listener it reconnects to


@dataclass
class GroupTargetsRow:
    """A base model's group sizes (`id`: its path), and the groups sized by hand (POST /admin/scale)."""
    table: ClassVar[str] = "group_targets"
    id: str
    target: dict
    by_hand: list


@dataclass
class ContextCacheRow:
    """A context cache's metadata (scheduler/caches.py); which TEs pin it, they say themselves."""
    table: ClassVar[str] = "context_caches"
    id: str
    model: str
    kind: str
    context: list | str
    token_ids: list
    blocks: int
    ttl_s: int
    created: float


@dataclass
class SecretRow:
    """A secret that must outlive the main process (a base model's DistFlow secret: its TEs have it)."""
    table: ClassVar[str] = "secrets"
    id: str
    value: str


@dataclass
class FineTuningJobRow:
    """A fine-tuning job (OpenAI's `fine_tuning.job`); `hyperparameters` as resolved at create."""
    table: ClassVar[str] = "fine_tuning_jobs"
    id: str
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    hyperparameters: dict
    seed: int
    status: str
    created_at: int
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: dict | None = None
    adapter_path: str | None = None  # the deployed adapter (its final checkpoint), registered again at start
    metadata: dict | None = None


@dataclass
class FineTuningEventRow:
    table: ClassVar[str] = "fine_tuning_events"
    id: str
    job_id: str
    created_at: int
    level: str
    message: str
    type: str                       # message | metrics
    data: dict | None = None


@dataclass
class FineTuningCheckpointRow:
    table: ClassVar[str] = "fine_tuning_checkpoints"
    id: str
    job_id: str
    created_at: int
    step_number: int
    metrics: dict
    fine_tuned_model_checkpoint: str


Row = TypeVar("Row")


def _is_json(tp: Any) -> bool:
    """A dict or list column (possibly optional) is stored as JSON text."""
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    return any(typing.get_origin(a) in (dict, list) or a in (dict, list) for a in args)


def _column(cls: type, name: str, value: Any) -> Any:
    f = next(f for f in fields(cls) if f.name == name)
    return json.dumps(value) if value is not None and _is_json(f.type) else value


def _row(cls: type[Row], r: sqlite3.Row) -> Row:
    out = {}
    for f in fields(cls):
        v = r[f.name]
        out[f.name] = json.loads(v) if v is not None and _is_json(f.type) else (bool(v) if f.type is bool else v)
    return cls(**out)


# --- the store -----------------------------------------------------------------------------

@dataclass
class StateStore:
    """The open database under `dir` (created if new), migrated to the latest schema."""
    dir: Path
    db: sqlite3.Connection = field(init=False, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.dir = Path(self.dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._dir_lock = open(self.dir / "lock", "w")
        try:
            fcntl.flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._dir_lock.close()
            raise StateDirBusy(f"another server uses the state dir {self.dir}; give another --state-dir") from None
        # isolation_level None: each statement commits on its own unless inside BEGIN ... COMMIT
        self.db = sqlite3.connect(self.dir / "state.db", isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        try:
            for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = ON", "busy_timeout = 5000"):
                self.db.execute(f"PRAGMA {pragma}")
            self.migrate()
        except BaseException:
            self.close()
            raise

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> None:
        """Apply the migrations this database has not seen, each atomically with its number."""
        if self.version > len(MIGRATIONS):
            raise RuntimeError(f"{self.dir}: schema version {self.version} is newer than this code's "
                               f"({len(MIGRATIONS)}); run the newer DeepFlow or give another --state-dir")
        for number, script in enumerate(MIGRATIONS[self.version:], self.version + 1):
            try:
                self.db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
            except sqlite3.Error:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self.db.close()
        self._dir_lock.close()

    def subdir(self, name: str) -> Path:
        """A folder of the state dir for bytes that do not belong in rows (files, checkpoints)."""
        path = self.dir / name
        path.mkdir(exist_ok=True)
        return path

    def file_path(self, file_id: str) -> Path:
        return self.subdir("files") / file_id

    # ---------------------------------------------------------------- rows

    def execute(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, params).fetchall()

    def insert(self, row: Any, replace: bool = False) -> None:
        cls = type(row)
        names = [f.name for f in fields(cls)]
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        self.execute(f"{verb} INTO {cls.table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                     tuple(_column(cls, n, getattr(row, n)) for n in names))

    def select(self, cls: type[Row], where: str = "", params: tuple = (), order: str = "",
               limit: int | None = None) -> list[Row]:
        """Rows of `cls`'s table: `where` and `order` are SQL fragments (`params` fill the ?s)."""
        sql = f"SELECT * FROM {cls.table}" + (f" WHERE {where}" if where else "") + \
            (f" ORDER BY {order}" if order else "") + (f" LIMIT {int(limit)}" if limit is not None else "")
        return [_row(cls, r) for r in self.execute(sql, params)]

    def page(self, cls: type[Row], limit: int, after: str | None, key: str = "created_at, id",
             where: str = "", params: tuple = ()) -> tuple[list[Row], bool]:
        """A list endpoint's page: `limit` rows of `cls` (those `where` allows), newest first by
        `key` (its columns), after the row whose id is `after`; and whether more follow."""
        if after:
            cursor = f"({key}) < (SELECT {key} FROM {cls.table} WHERE id = ?)"
            where, params = " AND ".join(filter(None, (where, cursor))), (*params, after)
        rows = self.select(cls, where, params, ", ".join(f"{k.strip()} DESC" for k in key.split(",")), limit + 1)
        return rows[:limit], len(rows) > limit

    def get(self, cls: type[Row], id: str) -> Row | None:
        rows = self.select(cls, "id = ?", (id,))
        return rows[0] if rows else None

    def need(self, cls: type[Row], id: str, what: str, param: str) -> Row:
        """The row `id` of `cls`, or the 404 a client gets for it (`what`: OpenAI's name of the object)."""
        if (row := self.get(cls, id)) is None:
            raise APIError(404, f"No such {what}: {id}", param)
        return row

    def update(self, cls: type, id: str, **changes: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in changes)
        self.execute(f"UPDATE {cls.table} SET {sets} WHERE id = ?",
                     (*(_column(cls, k, v) for k, v in changes.items()), id))

    def delete(self, cls: type, id: str) -> bool:
        with self.lock:
            return self.db.execute(f"DELETE FROM {cls.table} WHERE id = ?", (id,)).rowcount > 0


class Resumable(Generic[Row]):
    """The shape of the batch and fine-tuning JEs: each of their objects is a row of `row_type`
    (`missing`: `need`'s words for an unknown id) and, while active, an asyncio task (`_run`).
    At shutdown `stop` cancels the runs before the cluster stops (so nothing is recorded as
    failed for it) and leaves their rows as they are, for the next start to resume."""
    row_type: ClassVar[type]
    missing: ClassVar[tuple[str, str]]

    def __init__(self, store: StateStore):
        self.store = store
        self.runs: dict[str, asyncio.Task] = {}

    def get(self, id: str) -> Row:
        return self.store.need(self.row_type, id, *self.missing)

    def page(self, limit: int, after: str | None) -> tuple[list[Row], bool]:
        """The newest first, `limit` of them after the one `after`; and whether more follow."""
        return self.store.page(self.row_type, limit, after)

    def _start(self, id: str) -> None:
        self.runs[id] = asyncio.create_task(self._run(id))
        self.runs[id].add_done_callback(lambda _: self.runs.pop(id, None))

    async def stop(self) -> None:
        for run in self.runs.values():
            run.cancel()
        await asyncio.gather(*self.runs.values(), return_exceptions=True)


def best_effort(write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """A write that only a later restart needs (re-adoption records): if it fails (the disk
    is full), serving goes on and the error is logged; that restart will miss this change.
    Found by bench/chaos.py --disk-full: the error used to end the cluster's health loop."""
    try:
        write(*args, **kwargs)
    except sqlite3.Error as e:
        logging.getLogger("deepflow.state").error("state not saved (%s): a restart will not see this change", e)


def default_state_dir() -> str:
    return str(cache_dir() / "state")
