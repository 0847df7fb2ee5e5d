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
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from medfocus.datasets._common import load_json
from medfocus.errors import DataError
from medfocus.io.atomic import atomic_write
from medfocus.io.jsonl import read_jsonl_numbered
from medfocus.types import Sample

__all__ = [
    "BenchRecord",
    "PREDICTION_KINDS",
    "load_records",
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


def parse_record(obj: Mapping[str, Any], *, where: str = "record") -> BenchRecord:
    """Validate one record dict and build a :class:`BenchRecord` (errors name ``where`` and the field)."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    for k in _CORE:
        if k not in obj:
            raise DataError(f"{where}: missing field {k!r}; expected {list(_CORE)} and prediction_<mode> fields")
    try:
        index = int(obj["index"])
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: field 'index' must be an integer, got {obj['index']!r}") from exc
    if isinstance(obj["index"], float) and not float(obj["index"]).is_integer():
        raise DataError(f"{where}: field 'index' must be an integer, got {obj['index']!r}")
    preds: dict[str, dict[str, str]] = {}
    used = set(_CORE)
    # Modes are the suffixes of the plain "prediction_<mode>" fields.
    for k in obj:
        if not k.startswith("prediction_"):
            continue
        if any(k.startswith(PREDICTION_KINDS[x]) for x in ("kept_normal", "kept", "edited")):
            continue
        preds[k[len("prediction_"):]] = {}
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
    return BenchRecord(model=str(obj["model"]), dataset=str(obj["dataset"]), index=index, answer=str(obj["answer"]),
                       predictions=preds, extra=extra)


def _record_objects(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """``[(where, object), ...]`` of a records file: a JSON list (or ``{"records": [...]}``), or JSON
    lines read by :mod:`medfocus.io.jsonl` (an interrupted last line is ignored)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"benchmark file {p} not found: it does not exist (build one with `medfocus bench build`)")
    if p.suffix == ".jsonl":
        return [(f"{p} line {lineno}", obj) for lineno, obj in read_jsonl_numbered(p)[0]]
    data = load_json(p)
    if isinstance(data, Mapping) and isinstance(data.get("records"), list):
        data = data["records"]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"{p} record #{i}", o) for i, o in enumerate(data)]


def load_records(path: str | os.PathLike) -> list[BenchRecord]:
    """Load records from a JSON list (``direct.json`` / ``reasoning.json``) or a JSONL file.

    Raises:
        DataError: missing file, invalid JSON, or an invalid record (naming the file, record number
            and field); duplicate ``(model, dataset, index, mode)`` keys.
    """
    objs = _record_objects(path)
    records = [parse_record(o, where=w) for w, o in objs]
    seen: dict[tuple, str] = {}
    for (w, _), r in zip(objs, records):
        for mode in r.modes:
            k = r.key + (mode,)
            if k in seen:
                raise DataError(f"{w}: duplicate record {k} (first at {seen[k]})")
            seen[k] = w
    return records


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
