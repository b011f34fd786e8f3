"""The state store (scheduler/state.py): migrations run once and in order, rows survive a
reopen, and one server owns a state dir at a time."""
import pytest

from scheduler import state
from scheduler.state import BatchLineRow, BatchRow, FileRow, StateDirBusy, StateStore


def test_rows_survive_reopen_and_migrations_run_once(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    assert store.version == len(state.MIGRATIONS)
    store.insert(FileRow("file-1", "batch", "in.jsonl", 12, 100))
    store.insert(BatchRow("batch-1", "file-1", "/v1/completions", "24h", "validating", 100, 86500,
                          metadata={"k": "v"}))
    store.insert(BatchLineRow("batch-1", 0, "a", True, '{"x": 1}'))
    store.update(BatchRow, "batch-1", status="in_progress", in_progress_at=101)
    store.close()

    # a later version appends a migration: it runs on the next open, once
    monkeypatch.setattr(state, "MIGRATIONS", [*state.MIGRATIONS, "CREATE TABLE extra (id TEXT PRIMARY KEY);"])
    store = StateStore(tmp_path)
    assert store.version == len(state.MIGRATIONS)
    assert store.execute("SELECT count(*) FROM extra")[0][0] == 0
    batch = store.get(BatchRow, "batch-1")
    assert (batch.status, batch.in_progress_at, batch.metadata, batch.errors) == ("in_progress", 101, {"k": "v"}, None)
    assert store.select(BatchLineRow, "batch_id = ?", ("batch-1",)) == [BatchLineRow("batch-1", 0, "a", True, '{"x": 1}')]
    assert store.get(FileRow, "file-1").filename == "in.jsonl"
    assert store.delete(FileRow, "file-1") and store.get(FileRow, "file-1") is None
    store.close()
    StateStore(tmp_path).close()  # reopening migrates nothing again (a second CREATE TABLE would fail)


def test_a_failed_migration_leaves_the_version(tmp_path, monkeypatch):
    StateStore(tmp_path).close()
    monkeypatch.setattr(state, "MIGRATIONS", [*state.MIGRATIONS, "CREATE TABLE t (id TEXT); NOT SQL;"])
    with pytest.raises(Exception):
        StateStore(tmp_path)
    monkeypatch.setattr(state, "MIGRATIONS", state.MIGRATIONS[:-1])
    store = StateStore(tmp_path)  # the failed one released the dir, and its half-run script left nothing
    assert store.version == len(state.MIGRATIONS)
    assert not store.execute("SELECT name FROM sqlite_master WHERE name = 't'")
    store.close()


def test_one_server_per_state_dir(tmp_path):
    store = StateStore(tmp_path)
    with pytest.raises(StateDirBusy):
        StateStore(tmp_path)
    store.close()
    StateStore(tmp_path).close()


def test_pages_run_newest_first_after_a_cursor(tmp_path):
    """The list endpoints' pagination (files, batches, fine-tuning jobs, events, checkpoints):
    newest first, ties broken by id, `after` a row's id, a filter kept across pages."""
    store = StateStore(str(tmp_path))
    for i in range(5):
        store.insert(FileRow(f"file-{i}", "batch" if i % 2 else "fine-tune", "x", 1, 100 + i // 2))
    ids = lambda page: ([r.id for r in page[0]], page[1])  # noqa: E731
    assert ids(store.page(FileRow, 2, None)) == (["file-4", "file-3"], True)
    assert ids(store.page(FileRow, 2, "file-3")) == (["file-2", "file-1"], True)
    assert ids(store.page(FileRow, 2, "file-1")) == (["file-0"], False)
    assert ids(store.page(FileRow, 1, "file-3", where="purpose = ?", params=("batch",))) == (["file-1"], False)
