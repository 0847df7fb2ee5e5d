"""MedGround-Bench records: load, validate, write, and join to the dataset loaders by (dataset, index).

Schema (the public ``direct.json`` / ``reasoning.json``: a JSON list; ``.jsonl`` is accepted too)::

    {"model": "qwen2_5_vl_3b", "dataset": "imagenome", "index": 43, "answer": "Yes",
     "prediction_{mode}": "Yes",                          # original image
     "prediction_edited_{mode}": "No",                    # foreground (finding) edited out
     "prediction_edited_kept_{mode}": "Yes",              # background edited, prompt "No {finding}"
     "prediction_edited_kept_normal_{mode}": "Yes",       # background edited, prompt "No abnormality"
     ...extra fields kept verbatim}

``{mode}`` is ``direct`` or ``cot`` (any suffix is accepted; each mode present must have all four
fields). ``index`` names the sample at that position of the dataset loader's output
(:mod:`medfocus.datasets.imagenome`, :mod:`~medfocus.datasets.vindr_cxr`,
:mod:`~medfocus.datasets.padchest_gr`), which :func:`join_records` relies on. Predictions are free
text (``"Yes."``, ``"No\\n"``...): :func:`normalize_yes_no` reads them for the filter check.

One reader for every benchmark file (the public files, ``medfocus bench build`` splits, ``.jsonl``
records): :func:`load_record_dicts` reads the file and checks every record's key (the records as
dicts, verbatim: what ``medfocus attribute --bench`` needs, which does not require the edited-view
predictions) and :func:`load_records` parses the same records into :class:`BenchRecord` with the full
public schema.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from medfocus.datasets import canonical_name
from medfocus.datasets._common import load_json
from medfocus.errors import ConfigError, DataError
from medfocus.io.atomic import atomic_write
from medfocus.io.jsonl import read_jsonl_numbered
from medfocus.types import Sample

__all__ = [
    "BenchRecord",
    "PREDICTION_KINDS",
    "load_record_dicts",
    "load_records",
    "check_record_key",
    "check_sample_index",
    "load_record_dicts_located",
    "prediction_modes",
    "record_dataset",
    "record_modes",
    "parse_record",
    "write_records",
    "join_records",
    "normalize_yes_no",
]

#: kind -> field prefix, longest first (so "prediction_edited_kept_normal_direct" is not read as
#: mode "edited_kept_normal_direct").
PREDICTION_KINDS: dict[str, str] = {
    "kept_normal": "prediction_edited_kept_normal_",
    "kept": "prediction_edited_kept_",
    "edited": "prediction_edited_",
    "original": "prediction_",
}
_CORE = ("model", "dataset", "index", "answer")
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def normalize_yes_no(text: Any) -> str | None:
    """``"Yes"`` / ``"No"`` when the text starts with yes/no (any case, punctuation), else ``None``.

    A minimal reader for the benchmark's stored predictions; the LVLM layer's parser handles free
    generations.
    """
    if text is None:
        return None
    m = _YES_NO.match(str(text).strip())
    if not m:
        return None
    return "Yes" if m.group(1).lower() == "yes" else "No"


@dataclass
class BenchRecord:
    """One MedGround-Bench record.

    Attributes:
        model, dataset, index, answer: the key and the GT answer.
        predictions: ``{mode: {"original", "edited", "kept", "kept_normal"}}`` raw prediction texts.
        extra: every other field, verbatim.
    """

    model: str
    dataset: str
    index: int
    answer: str
    predictions: dict[str, dict[str, str]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def modes(self) -> list[str]:
        return sorted(self.predictions)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.model, self.dataset, self.index)

    def passes_filter(self, mode: str) -> bool:
        """The three-step causal filter: correct on the original, flips when the finding is edited
        out, keeps the answer under both background edits."""
        p = self.predictions[mode]
        ans = normalize_yes_no(self.answer)
        orig, fg = normalize_yes_no(p["original"]), normalize_yes_no(p["edited"])
        kept, kept_n = normalize_yes_no(p["kept"]), normalize_yes_no(p["kept_normal"])
        return ans is not None and orig == ans and fg is not None and fg != ans and kept == ans and kept_n == ans

    def to_dict(self) -> dict[str, Any]:
        """The public schema (inverse of :func:`parse_record`)."""
        d: dict[str, Any] = {"model": self.model, "dataset": self.dataset, "index": self.index, "answer": self.answer}
        for mode in self.modes:
            for kind, prefix in PREDICTION_KINDS.items():
                d[f"{prefix}{mode}"] = self.predictions[mode][kind]
        d.update(self.extra)
        return d


def check_sample_index(idx: Any, *, where: str = "record") -> int:
    """``idx`` when it is a non-negative integer (a sample's position in its dataset loader's output).

    No silent coercion: ``1.7`` is not sample 1, ``"3"`` is not sample 3, ``true`` is not sample 1.
    The one check of a record's ``index`` for benchmark records and result records alike.

    Raises:
        DataError: naming ``where``, the field and what was expected.
    """
    if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
        raise DataError(f"{where}: field 'index' must be a non-negative integer, got {idx!r} ({type(idx).__name__})")
    return idx


def check_record_key(obj: Any, *, where: str = "record") -> None:
    """Check what names a record's sample: an object with ``dataset`` (a non-empty string) and ``index``
    (a non-negative integer, :func:`check_sample_index`).

    Raises:
        DataError: naming ``where``, the field and what was expected.
    """
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected an object (a record), got {type(obj).__name__}")
    for k in ("dataset", "index"):
        if k not in obj:
            raise DataError(f"{where}: missing field {k!r}; a record names its sample by 'dataset' and 'index'")
    check_sample_index(obj["index"], where=where)
    if not isinstance(obj["dataset"], str) or not obj["dataset"]:
        raise DataError(f"{where}: field 'dataset' must be a non-empty string, got {obj['dataset']!r}")


def prediction_modes(obj: Mapping[str, Any]) -> list[str]:
    """The modes of a record: the suffixes of its plain ``prediction_<mode>`` fields, in field order."""
    edited = tuple(PREDICTION_KINDS[x] for x in ("kept_normal", "kept", "edited"))
    return [k[len("prediction_"):] for k in obj if k.startswith("prediction_") and not k.startswith(edited)]


def record_modes(obj: Mapping[str, Any]) -> list[str]:
    """The modes a record is run in: its explicit ``mode`` field when it has one (``{"mode": "cot",
    "prediction_direct": ...}`` is a step-by-step record only), else :func:`prediction_modes`."""
    mode = obj.get("mode")
    return [mode] if mode is not None else prediction_modes(obj)


def _no_mode_message(obj: Mapping[str, Any], where: str) -> str:
    """Why a record names no mode, with the closest expected field for a misspelled one."""
    expected = ["prediction_direct", "prediction_cot", "mode"]
    hints = [f"{k!r} -> {m[0]!r}" for k in obj if k not in expected and k not in _CORE
             for m in [difflib.get_close_matches(str(k), expected, n=1, cutoff=0.75)] if m]
    return (f"{where}: the record names no mode: expected a 'prediction_<mode>' field (e.g. 'prediction_direct', "
            f"'prediction_cot') or a 'mode' field; its fields are {sorted(map(str, obj))}"
            + (f" (misspelled? {', '.join(hints)})" if hints else ""))


def record_dataset(name: str) -> str:
    """The registry key of a record's dataset name: an alias such as ``"vindr-cxr"`` or the public
    benchmark's ``"vindr-cxr-attr"`` resolved by :func:`medfocus.datasets.canonical_name` (the one
    alias table). A name the registry does not know (samples built in Python, e.g. a test world) is
    returned as written: it then matches only samples of exactly that dataset name, and
    ``medfocus attribute`` refuses it because it cannot load such a dataset."""
    try:
        return canonical_name(name)
    except ConfigError:  # not a registered dataset: nothing to resolve
        return name


def parse_record(obj: Mapping[str, Any], *, where: str = "record") -> BenchRecord:
    """Validate one record dict and build a :class:`BenchRecord` (errors name ``where`` and the field).

    ``dataset`` becomes its registry key (:func:`record_dataset`: ``"vindr-cxr"`` -> ``"vindr_cxr"``).

    Raises:
        DataError: the key is invalid (:func:`check_record_key`), a core field is missing, a mode lacks one of its four prediction fields, or an edited-view field has no
            ``prediction_<mode>``.
    """
    check_record_key(obj, where=where)
    for k in _CORE:
        if k not in obj:
            raise DataError(f"{where}: missing field {k!r}; expected {list(_CORE)} and prediction_<mode> fields")
    index = obj["index"]
    preds: dict[str, dict[str, str]] = {mode: {} for mode in prediction_modes(obj)}
    used = set(_CORE)
    if not preds:
        raise DataError(f"{where}: no 'prediction_<mode>' field (e.g. 'prediction_direct')")
    for mode in preds:
        for kind, prefix in PREDICTION_KINDS.items():
            name = f"{prefix}{mode}"
            if name not in obj:
                raise DataError(f"{where}: missing field {name!r} (mode {mode!r} needs all four prediction fields)")
            preds[mode][kind] = obj[name]
            used.add(name)
    extra = {k: v for k, v in obj.items() if k not in used}
    stray = [k for k in extra if k.startswith("prediction_")]
    if stray:
        raise DataError(f"{where}: prediction field(s) {stray} without a matching 'prediction_<mode>' field")
    return BenchRecord(model=str(obj["model"]), dataset=record_dataset(obj["dataset"]), index=index,
                       answer=str(obj["answer"]), predictions=preds, extra=extra)


def load_record_dicts_located(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """``[(where, record), ...]`` of a benchmark file: :func:`load_record_dicts` with each record's
    location (``"benchmark file F record 3"`` or ``"... line 4"``) for errors about it later."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"benchmark file {p} not found: it does not exist (build one with `medfocus bench build`)")
    if p.suffix == ".jsonl":
        objs = [(f"benchmark file {p} line {lineno}", obj) for lineno, obj in read_jsonl_numbered(p)[0]]
    else:
        data = load_json(p)
        if isinstance(data, Mapping) and isinstance(data.get("records"), list):
            data = data["records"]
        if not isinstance(data, list):
            raise DataError(f"benchmark file {p}: expected a JSON list of records (objects), got {type(data).__name__}")
        objs = [(f"benchmark file {p} record {i}", o) for i, o in enumerate(data)]
    for where, obj in objs:  # every key first: a bad index is named before anything else
        check_record_key(obj, where=where)
    out: list[tuple[str, dict[str, Any]]] = []
    seen: dict[tuple, str] = {}
    for where, obj in objs:
        obj = {**obj, "dataset": record_dataset(obj["dataset"])}
        mode = obj.get("mode")
        if mode is not None and (not isinstance(mode, str) or not mode):
            raise DataError(f"{where}: field 'mode' must be a non-empty string (e.g. 'direct', 'cot'), got {mode!r}")
        modes = record_modes(obj)
        if not modes:  # a record no mode would run: never dropped silently
            raise DataError(_no_mode_message(obj, where))
        for m in modes:
            k = (str(obj.get("model")), obj["dataset"], obj["index"], m)
            if k in seen:
                raise DataError(f"{where}: duplicate record (model, dataset, index, mode) = {k} (first at {seen[k]})")
            seen[k] = where
        out.append((where, obj))
    return out


def load_record_dicts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a benchmark file as dicts, each with a checked key and mode.

    Reads a JSON list (the public ``direct.json`` / ``reasoning.json``, a ``medfocus bench build``
    split), ``{"records": [...]}``, or JSON lines (``.jsonl``, read by :mod:`medfocus.io.jsonl`: an
    interrupted last line is ignored). Every record must name its sample (:func:`check_record_key`;
    ``dataset`` is returned as its registry key, :func:`record_dataset`, every other field verbatim)
    and at least one mode (:func:`record_modes`: a ``mode`` field, which takes priority, or a
    ``prediction_<mode>`` field); the prediction fields themselves are not required here
    (:func:`load_records` checks the full schema).

    Raises:
        DataError: missing file, not UTF-8, not valid JSON, JSON nested too deeply, not a list of
            objects, an invalid ``dataset`` / ``index`` / ``mode``, a record naming
            no mode (naming the file, record and the fields expected), or two records for one
            ``(model, dataset, index, mode)``.
    """
    return [obj for _, obj in load_record_dicts_located(path)]


def load_records(path: str | os.PathLike) -> list[BenchRecord]:
    """The records of a benchmark file in the full public schema, in file order.

    The same reading and checks as :func:`load_record_dicts`, then every record parsed by
    :func:`parse_record`.

    Raises:
        DataError: everything :func:`load_record_dicts` raises, and a record that lacks a field of
            the public schema (naming the file, record number or line, and field).
    """
    return [parse_record(obj, where=where) for where, obj in load_record_dicts_located(path)]


def write_records(records: Iterable[BenchRecord | Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write records in the public schema: a JSON list (``.json``) or JSON lines (``.jsonl``); atomic."""
    p = Path(path)
    dicts = [r.to_dict() if isinstance(r, BenchRecord) else dict(r) for r in records]
    with atomic_write(p, "w") as fh:
        if p.suffix == ".jsonl":
            for d in dicts:
                fh.write(json.dumps(d) + "\n")
        else:
            json.dump(dicts, fh, indent=1)
    return p


def join_records(
    records: Iterable[BenchRecord],
    samples: Sequence[Sample] | Mapping[str, Sequence[Sample]],
    *,
    on_missing: str = "error",
    check_answer: bool = True,
) -> list[tuple[BenchRecord, Sample]]:
    """Pair each record with the sample it names: ``samples_of(record.dataset)[record.index]``.

    Args:
        records: benchmark records.
        samples: a list of samples (any datasets mixed; keyed by ``(sample.dataset, sample.index)``)
            or ``{dataset: list of samples}``.
        on_missing: ``"error"`` (default) or ``"skip"`` for records whose sample is not loaded.
        check_answer: raise when a record's answer differs from the sample's answer.

    Returns:
        ``[(record, sample), ...]`` in record order.

    Raises:
        DataError: a record names a sample that does not exist (unless ``on_missing="skip"``) or
            whose answer disagrees (with ``check_answer``).
    """
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    table: dict[tuple[str, int], Sample] = {}
    if isinstance(samples, Mapping):
        for ds, lst in samples.items():
            for s in lst:
                table[(str(ds), int(s.index))] = s
    else:
        for s in samples:
            table[(s.dataset, int(s.index))] = s
    loaded = sorted({d for d, _ in table})
    out = []
    for r in records:
        s = table.get((r.dataset, r.index))
        if s is None:
            if on_missing == "skip":
                continue
            n = sum(1 for d, _ in table if d == r.dataset)
            raise DataError(
                f"record {r.model}/{r.dataset}#{r.index}: no such sample (loaded datasets {loaded}; "
                f"{n} samples of {r.dataset!r}); the index must be the position in that dataset's loader output"
            )
        if check_answer and normalize_yes_no(r.answer) != s.answer:
            raise DataError(f"record {r.model}/{r.dataset}#{r.index}: answer {r.answer!r} but the sample's answer is {s.answer!r}")
        out.append((r, s))
    return out
