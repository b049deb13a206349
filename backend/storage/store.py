"""Saved analyses: one SQLite file (WAL mode) shared by every session and the batch CLI.

Besides, users' labels of units (neurons, features) live in ``unit_labels``.

Each row keeps a computed result (its JSON, exactly what the page drew) with a title,
notes, node labels and supernodes, so the gallery reopens it without recomputing. Every
write is one transaction: a crash mid-way, a concurrent writer or a refused import leaves
the earlier rows as they were. Nothing read back is executed or unpickled: results are JSON.

Path: ``CIRCUITSCOPE_DB``, default ``$XDG_DATA_HOME/circuitscope/gallery.sqlite``
(``~/.local/share/...``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import UserInputError

KINDS = ("graph", "circuit", "patching", "paths", "lens", "inspect")
MAX_RESULT_BYTES = 50_000_000
MAX_TITLE = 200
MAX_NOTES = 20_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS analyses (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    notes TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    labels TEXT NOT NULL DEFAULT '{}',
    supernodes TEXT NOT NULL DEFAULT '[]',
    result TEXT NOT NULL,
    source TEXT UNIQUE,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS analyses_updated ON analyses (updated);
CREATE TABLE IF NOT EXISTS unit_labels (
    model TEXT NOT NULL,
    unit TEXT NOT NULL,
    label TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (model, unit)
);
"""
MAX_UNIT_LABEL = 200


def default_path() -> Path:
    if os.environ.get("CIRCUITSCOPE_DB"):
        return Path(os.environ["CIRCUITSCOPE_DB"]).expanduser()
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "circuitscope" / "gallery.sqlite"


@dataclass
class Saved:
    id: int
    kind: str
    title: str
    notes: str
    model: str
    prompt: str
    settings: dict
    labels: dict
    supernodes: list
    result: str  # the result's JSON text
    created: float
    updated: float
    source: str | None = None

    def result_dict(self) -> dict:
        return json.loads(self.result)


@dataclass
class Store:
    path: Path = field(default_factory=default_path)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise UserInputError(f"The gallery database {self.path} cannot be opened: {exc}.") from exc

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection per operation (safe across threads and processes)."""
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write; a database error (locked too long, disk full) becomes a plain
        message and nothing of this write is kept."""
        try:
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise UserInputError(f"The gallery database could not be written ({exc}); nothing was changed.") from exc

    # ------------------------------------------------------------ writes

    def save(self, kind: str, title: str, model: str, prompt: str, result_json: str, *, notes: str = "",
             settings: dict | None = None, labels: dict | None = None, supernodes: list | None = None,
             source: str | None = None) -> int:
        """Insert one analysis (or replace the one with the same ``source``); returns its id."""
        _check_fields(kind, title, notes, result_json)
        now = time.time()
        row = (kind, title.strip(), notes, model, prompt, json.dumps(settings or {}), json.dumps(labels or {}),
               json.dumps(supernodes or []), result_json, source, now, now)
        with self._transaction() as conn:
            if source is not None:
                existing = conn.execute("SELECT id FROM analyses WHERE source = ?", (source,)).fetchone()
                if existing:
                    conn.execute(
                        "UPDATE analyses SET kind=?, title=?, notes=?, model=?, prompt=?, settings=?, labels=?, "
                        "supernodes=?, result=?, updated=? WHERE id=?", row[:9] + (now, existing[0]))
                    return int(existing[0])
            cursor = conn.execute(
                "INSERT INTO analyses (kind, title, notes, model, prompt, settings, labels, supernodes, result, "
                "source, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            assert cursor.lastrowid is not None  # an INSERT always sets it
            return cursor.lastrowid

    def rename(self, analysis_id: int, title: str) -> None:
        _check_title(title)
        self._update(analysis_id, "title", title.strip())

    def annotate(self, analysis_id: int, notes: str | None = None, labels: dict | None = None,
                 supernodes: list | None = None) -> None:
        if notes is not None:
            if len(notes) > MAX_NOTES:
                raise UserInputError(f"Notes are limited to {MAX_NOTES} characters.")
            self._update(analysis_id, "notes", notes)
        if labels is not None:
            self._update(analysis_id, "labels", json.dumps(labels))
        if supernodes is not None:
            self._update(analysis_id, "supernodes", json.dumps(supernodes))

    def delete(self, analysis_id: int) -> None:
        with self._transaction() as conn:
            if conn.execute("DELETE FROM analyses WHERE id = ?", (analysis_id,)).rowcount == 0:
                raise UserInputError(f"No saved analysis #{analysis_id}.")

    def _update(self, analysis_id: int, column: str, value) -> None:
        with self._transaction() as conn:
            changed = conn.execute(f"UPDATE analyses SET {column} = ?, updated = ? WHERE id = ?",
                                   (value, time.time(), analysis_id)).rowcount
            if changed == 0:
                raise UserInputError(f"No saved analysis #{analysis_id}.")

    def set_unit_label(self, model: str, unit: str, label: str) -> None:
        """Keep the user's label of ``unit`` ("L3/N45") of ``model`` (a weight fingerprint key);
        an empty label removes it (the automatic label shows again)."""
        label = label.strip()
        if len(label) > MAX_UNIT_LABEL:
            raise UserInputError(f"Labels are limited to {MAX_UNIT_LABEL} characters.")
        with self._transaction() as conn:
            if label:
                conn.execute("INSERT INTO unit_labels (model, unit, label, updated) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (model, unit) DO UPDATE SET label = excluded.label, "
                             "updated = excluded.updated", (model, unit, label, time.time()))
            else:
                conn.execute("DELETE FROM unit_labels WHERE model = ? AND unit = ?", (model, unit))

    def unit_labels(self, model: str) -> dict[str, str]:
        """Every edited unit label of ``model``: {unit: label}."""
        with self._connect() as conn:
            rows = conn.execute("SELECT unit, label FROM unit_labels WHERE model = ?", (model,)).fetchall()
        return dict(rows)

    # ------------------------------------------------------------ reads

    def get(self, analysis_id: int) -> Saved:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM analyses WHERE id = ?", (analysis_id,)).fetchone()
        if row is None:
            raise UserInputError(f"No saved analysis #{analysis_id}: it may have been deleted.")
        return _saved(row)

    def sources(self, prefix: str) -> set[str]:
        """The sources of the rows whose source starts with ``prefix`` (e.g. "example:")."""
        with self._connect() as conn:
            rows = conn.execute("SELECT source FROM analyses WHERE source LIKE ?", (prefix + "%",)).fetchall()
        return {row[0] for row in rows}

    def search(self, text: str = "", kind: str | None = None, limit: int = 200) -> list[Saved]:
        """Newest first; ``text`` matches title, model, prompt or notes (case-insensitive).
        The listing leaves ``result`` empty (it can be megabytes): ``get`` reads it."""
        pattern = f"%{text.strip()}%"
        listed = _COLUMNS.replace("result", "'' AS result")
        query = (f"SELECT {listed} FROM analyses WHERE (title LIKE ? OR model LIKE ? OR prompt LIKE ? "
                 "OR notes LIKE ?)")
        args: list = [pattern] * 4
        if kind:
            query += " AND kind = ?"
            args.append(kind)
        query += " ORDER BY updated DESC, id DESC LIMIT ?"
        with self._connect() as conn:
            return [_saved(row) for row in conn.execute(query, (*args, limit)).fetchall()]

    def count(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM analyses").fetchone()[0])

    def integrity(self) -> str:
        with self._connect() as conn:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


_COLUMNS = "id, kind, title, notes, model, prompt, settings, labels, supernodes, result, created, updated, source"


def _saved(row) -> Saved:
    (id_, kind, title, notes, model, prompt, settings, labels, supernodes, result, created, updated, source) = row
    return Saved(id_, kind, title, notes, model, prompt, json.loads(settings), json.loads(labels),
                 json.loads(supernodes), result, created, updated, source)


def _check_title(title: str) -> None:
    if not title.strip():
        raise UserInputError("Give the analysis a title.")
    if len(title) > MAX_TITLE:
        raise UserInputError(f"Titles are limited to {MAX_TITLE} characters.")


def _check_fields(kind: str, title: str, notes: str, result_json: str) -> None:
    if kind not in KINDS:
        raise UserInputError(f"Unknown analysis kind '{kind}'; one of {', '.join(KINDS)}.")
    _check_title(title)
    if len(notes) > MAX_NOTES:
        raise UserInputError(f"Notes are limited to {MAX_NOTES} characters.")
    if len(result_json.encode()) > MAX_RESULT_BYTES:
        raise UserInputError(f"The result is over {MAX_RESULT_BYTES / 1e6:.0f} MB; it is not saved.")
    try:
        json.loads(result_json)
    except ValueError as exc:
        raise UserInputError(f"The result is not valid JSON ({exc}); it is not saved.") from exc


def import_graph(store: Store, raw: bytes | str, title: str = "") -> int:
    """Validate a circuit-tracer / Neuronpedia graph file and save it; a bad file raises
    UserInputError naming its first error and writes nothing."""
    from backend.graphs.neuronpedia import parse_graph_json, to_graph_json

    view = parse_graph_json(raw)
    prompt = "".join(view.tokens)
    return store.save("graph", title or f"Imported graph: {prompt[:60]}", view.metadata.get("scan") or "imported",
                      prompt, json.dumps(to_graph_json(view)), settings={"page": "graph", "imported": True})
