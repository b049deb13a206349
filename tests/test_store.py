"""The gallery database: round trips, and saving never loses earlier analyses (concurrent
writers, a crash between writes, refused imports, a damaged file)."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from backend.errors import UserInputError
from backend.storage.store import Store, import_graph

ROOT = Path(__file__).resolve().parents[1]
RESULT = json.dumps({"values": [1.0, 2.5], "tokens": ["a", "b"]})


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "gallery.sqlite")


def save(store: Store, title: str, **kwargs) -> int:
    return store.save("circuit", title, "smollm2", "When Mary and John", RESULT, **kwargs)


def test_round_trip_search_rename_delete(store):
    first = save(store, "IOI circuit", notes="name movers", labels={"a23.h3": "name mover"},
                 supernodes=[["movers", "a23.h3"]], settings={"page": "circuit", "url": {"cn": "300"}})
    second = store.save("graph", "France", "gemma3-270m", "The capital of France is", RESULT)
    saved = store.get(first)
    assert (saved.title, saved.notes, saved.labels, saved.supernodes) == (
        "IOI circuit", "name movers", {"a23.h3": "name mover"}, [["movers", "a23.h3"]])
    assert saved.result == RESULT and saved.settings["url"] == {"cn": "300"}
    assert [s.id for s in store.search("france")] == [second]  # prompt, case-insensitive
    assert [s.id for s in store.search("gemma")] == [second]  # model
    assert [s.id for s in store.search("movers")] == [first]  # notes
    assert [s.id for s in store.search("", kind="circuit")] == [first]
    store.rename(first, "IOI, EAP")
    assert store.get(first).title == "IOI, EAP" and store.get(first).result == RESULT
    store.delete(second)
    with pytest.raises(UserInputError, match="No saved analysis"):
        store.get(second)
    with pytest.raises(UserInputError, match="title"):
        store.rename(first, "  ")
    with pytest.raises(UserInputError, match="not valid JSON"):
        store.save("circuit", "broken", "m", "p", "{")


def test_wal_mode_and_same_source_replaces(store):
    with store._connect() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    a = save(store, "one", source="batch:x:0:lens")
    b = save(store, "two", source="batch:x:0:lens")
    assert a == b and store.count() == 1 and store.get(a).title == "two"


def test_concurrent_saves_from_threads_and_processes(store):
    earlier = [save(store, f"earlier {i}") for i in range(3)]
    errors: list[Exception] = []

    def writer(k: int) -> None:
        try:
            for i in range(10):
                save(store, f"thread {k} #{i}")
        except Exception as exc:
            errors.append(exc)

    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from backend.storage.store import Store; "
        f"s = Store({str(store.path)!r})\n"
        "for i in range(10): s.save('graph', f'process {sys.argv[1]} #{i}', 'm', 'p', '{}')"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, str(k)]) for k in range(2)]
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p.wait(timeout=120) == 0 for p in processes)
    assert not errors
    assert store.count() == 3 + 80 + 20 and store.integrity() == "ok"
    assert [store.get(i).title for i in earlier] == ["earlier 0", "earlier 1", "earlier 2"]


def test_a_crash_between_writes_loses_nothing_saved(store):
    first = save(store, "kept")
    script = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from backend.storage.store import Store
s = Store({str(store.path)!r})
s.save("graph", "second, committed", "m", "p", "{{}}")
with s._transaction() as conn:
    conn.execute("INSERT INTO analyses (kind, title, model, prompt, result, created, updated) "
                 "VALUES ('graph', 'torn', 'm', 'p', '{{}}', 0, 0)")
    os._exit(1)  # the process dies before the commit
"""
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 1
    reopened = Store(store.path)
    assert reopened.integrity() == "ok"
    assert [s.title for s in reopened.search()] == ["second, committed", "kept"]
    assert reopened.get(first).result == RESULT


def test_refused_imports_leave_the_database_as_it_was(store, monkeypatch):
    save(store, "kept")
    bad_node = {"metadata": {"prompt_tokens": ["a"]}, "nodes": [{"node_id": "x"}], "links": []}
    with pytest.raises(UserInputError, match=r"nodes\[0\]"):
        import_graph(store, json.dumps(bad_node))
    with pytest.raises(UserInputError, match="not JSON"):
        import_graph(store, b"\x80\x81 definitely not json")
    monkeypatch.setattr("backend.graphs.neuronpedia.MAX_IMPORT_BYTES", 100)
    with pytest.raises(UserInputError, match="limit"):
        import_graph(store, json.dumps({"metadata": {"prompt_tokens": ["a"] * 100}, "nodes": [], "links": []}))
    assert store.count() == 1 and store.integrity() == "ok"


def test_a_valid_import_is_saved_and_reads_back_identically(store, tiny_llama):
    from backend.graphs.attribution import attribution_graph
    from backend.graphs.neuronpedia import to_graph_json, view_from_graph

    exported = to_graph_json(view_from_graph(attribution_graph(tiny_llama, "a b c", max_nodes=5)))
    analysis = import_graph(store, json.dumps(exported), "tiny")
    assert json.loads(store.get(analysis).result) == exported


def test_a_damaged_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "gallery.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserInputError, match="cannot be opened"):
        Store(path)
    assert path.read_bytes() == b"this is not a database" * 100
