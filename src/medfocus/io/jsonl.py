"""The one reader (and appender) of JSON-lines files: result stores, prediction files, split logs,
generation caches, benchmark ``.jsonl`` records.

Rules, the same for every consumer:

* one JSON object per line; blank lines are skipped;
* every append is one ``write`` of ``json + "\\n"``, flushed and ``fsync``-ed (:func:`append_jsonl`),
  so a kill can only leave an *unterminated* last line. That tail is an interrupted append: it is
  ignored (and :func:`trim_partial_tail` cuts it before the next append), and the record it held
  counts as not written;
* a *complete* line (ending in a newline) that is not a JSON object can only come from an edit or
  corruption, never from a kill: it raises :class:`~medfocus.errors.DataError` naming the file and
  line, wherever it is;
* when records carry a key, the last record per key wins (:func:`latest_by_key`): a retried record
  supersedes the error it replaces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Callable, Hashable, Iterable, Iterator, TypeVar

from medfocus.errors import DataError

__all__ = [
    "NotJSONLinesError",
    "read_jsonl",
    "read_jsonl_numbered",
    "iter_jsonl",
    "latest_by_key",
    "read_latest",
    "append_jsonl",
    "trim_partial_tail",
]

K = TypeVar("K", bound=Hashable)


class NotJSONLinesError(DataError):
    """The file is one JSON document (a list or an object over one or more lines), not JSON lines: valid JSON in
    the wrong layout (a benchmark split where prediction records are expected, say), not a damaged file.
    Callers that know which file is usually mistaken for theirs catch this type to say so."""


def read_jsonl_numbered(path: str | os.PathLike[str]) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """Read a JSON-lines file: ``([(line_number, record), ...], valid_bytes)`` in file order.

    ``valid_bytes`` is the length of the prefix made of complete lines (everything but an
    interrupted, unterminated tail). A missing file reads as ``([], 0)``.

    Raises:
        DataError: a complete line that is not valid JSON, not UTF-8, or not an object (naming the
            file and line).
    """
    p = Path(path)
    if not p.is_file():
        return [], 0
    data = p.read_bytes()
    out: list[tuple[int, dict[str, Any]]] = []
    pos = 0
    lineno = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        lineno += 1
        if nl < 0:  # unterminated tail: an append interrupted by a kill
            return out, pos
        raw = data[pos:nl]
        pos = nl + 1
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{p} line {lineno}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                            "JSON-lines files are UTF-8") from None
        try:
            rec = json.loads(text)
        except ValueError as exc:
            _refuse_one_document(p, data, out)
            raise DataError(f"{p} line {lineno}: not a valid JSON record ({exc})") from None
        except RecursionError:
            raise DataError(f"{p} line {lineno}: JSON nested too deeply to be a record") from None
        if not isinstance(rec, dict):
            _refuse_one_document(p, data, out)
            raise DataError(f"{p} line {lineno}: expected a JSON object, got {type(rec).__name__}")
        out.append((lineno, rec))
    return out, pos


def _refuse_one_document(p: Path, data: bytes, read_so_far: list) -> None:
    """Raise :class:`NotJSONLinesError` when the first record fails and the whole of ``data`` parses as one JSON
    document (a list or an object, e.g. a benchmark split): valid JSON in the wrong layout, said as such instead
    of pointing at "corrupt" data. Returns when that is not the case (the caller's line error follows)."""
    if read_so_far:
        return
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return
    what = (f"a list of {len(doc)} items" if isinstance(doc, list) else
            f"an object with keys {sorted(doc)[:5]}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}")
    raise NotJSONLinesError(f"{p} is one JSON document ({what}), not JSON lines (one JSON object per line)") from None


def read_jsonl(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """``(records, valid_bytes)`` of a JSON-lines file (see :func:`read_jsonl_numbered`)."""
    numbered, valid = read_jsonl_numbered(path)
    return [rec for _, rec in numbered], valid


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file in file order (duplicates included)."""
    yield from read_jsonl(path)[0]


def latest_by_key(records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], K]) -> dict[K, dict[str, Any]]:
    """``{key(record): record}`` where a later record replaces an earlier one with the same key.

    The dict keeps the position of a key's first appearance (file order of first sight).
    """
    out: dict[K, dict[str, Any]] = {}
    for rec in records:
        out[key(rec)] = rec
    return out


def read_latest(path: str | os.PathLike[str], key: Callable[[dict[str, Any]], K]) -> dict[K, dict[str, Any]]:
    """The records of a JSON-lines file by key, the last per key winning (:func:`latest_by_key`).

    Raises:
        DataError: a damaged line, or a record whose key cannot be computed (a missing or malformed
            key field), naming the file and line.
    """
    numbered, _ = read_jsonl_numbered(path)
    out: dict[K, dict[str, Any]] = {}
    for lineno, rec in numbered:
        try:
            k = key(rec)
        except DataError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path} line {lineno}: missing or malformed key field ({type(exc).__name__}: {exc})") from None
        out[k] = rec
    return out


def trim_partial_tail(path: str | os.PathLike[str]) -> None:
    """Cut an interrupted (unterminated) last line off a JSON-lines file so that the next append
    starts on a fresh line. Raises :class:`DataError` for damage other than an interrupted tail."""
    p = Path(path)
    _, valid = read_jsonl(p)
    if p.is_file() and valid != p.stat().st_size:
        with open(p, "r+b") as fh:
            fh.truncate(valid)
            fh.flush()
            os.fsync(fh.fileno())


def append_jsonl(target: str | os.PathLike[str] | IO[bytes], record: dict[str, Any], **dumps_kw: Any) -> None:
    """Append one record as one line, flushed and ``fsync``-ed before returning (so a record reported
    as written survives a kill).

    Args:
        target: a path (opened in append mode for this one record) or a file already open in ``"ab"``.
        record: a JSON-serialisable mapping.
        **dumps_kw: passed to ``json.dumps`` (e.g. ``separators``, ``allow_nan=False``).
    """
    line = (json.dumps(record, **dumps_kw) + "\n").encode("utf-8")
    if isinstance(target, (str, os.PathLike)):
        p = Path(target)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        return
    target.write(line)
    target.flush()
    os.fsync(target.fileno())
