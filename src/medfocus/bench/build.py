"""Benchmark building: counterfactual edits + the three-step filter, resumable, per split.

Output layout under ``out_dir`` (one *split* = one (model, dataset, mode)):

``<model>/<dataset>/<mode>.json``
    the kept samples, a JSON list in the public MedGround-Bench schema (``model``, ``dataset``,
    ``index``, ``answer``, ``prediction_{mode}``, ``prediction_edited_{mode}``,
    ``prediction_edited_kept_{mode}``, ``prediction_edited_kept_normal_{mode}``) plus our fields
    ``mode``, ``editor``, ``attribute``, ``question`` (full, with the mode suffix), ``boxes``
    (original pixels, half-open), ``image_size`` and ``sample_fingerprint`` (the identity of the sample the
    answers were given to, :func:`make_record`). Loadable by :mod:`medfocus.datasets.medground`.
``<model>/<dataset>/<mode>.log.jsonl``
    one line per evaluated sample (kept or not): raw generations, parsed answers, gate outcomes,
    error, the sample's fingerprint. Appended and fsynced sample by sample — this is what makes a killed
    run resumable: a rerun skips every sample already in the log whose fingerprint matches (a truncated
    last line is ignored and redone; see "Samples" below for a changed one).
``<model>/<dataset>/<mode>.negatives.json``
    only with ``include_negatives``: the "No" samples, original answer only (edited fields null).
``retention.csv`` / ``retention.md``
    retention per (model, dataset, mode, editor) and per gate, recomputed from every log under
    ``out_dir`` (so successive runs for other models/modes accumulate into one table).

Generation cache (original view only). ``cache_dir`` (default ``out_dir/edits``) also holds
``<cache_dir>/generations/<model>/<dataset>/<mode>.jsonl``: the answer on the *original* image, one
line per ``(model_name, dataset, index, mode, question, max_new_tokens, image_sha256)``, appended and
fsynced like the split log (a truncated last line is ignored). The original view does not depend on the
editor, so building the same split with a second editor (oracle vs inpaint, radedit vs inpaint) under the
same ``cache_dir`` generates only the three edited views per sample. This is sound because
:meth:`~medfocus.lvlm.adapter.LVLMAdapter.generate` is greedy, hence deterministic for a given
model, image and question (up to the last-bit numerics of batched GPU kernels, which can already
differ between two runs with other batch compositions). The key holds the model *name* and its weight
fingerprint (:func:`medfocus.lvlm.loading.model_identity`) and the film's SHA-256: an overwritten film,
a row inserted into the data (indices shift) or another data root under the same ``(dataset, index)``
misses and is answered again; entries written before the hash was recorded are never served. Pass
``cache_generations=False`` for an adapter that samples.

Samples. ``(dataset, index)`` does not identify a sample, so nothing is served by it alone. Every film is
hashed once per run (:func:`split_fingerprints`, before anything is generated); every log row stores its
sample's fingerprint (:func:`split_fingerprint`) and a rerun refuses rows of changed samples before any
generation (:func:`changed_rows`; ``overwrite`` recomputes them); the edit cache
(:class:`~medfocus.editing.base.EditCache`) is keyed by the film's hash, the edit mask, the finding and
the editor's per-sample inputs; a film rewritten during the run is an error row, never cached. The
records file is rewritten from the whole log, so the log's rows outside a ``--limit`` / ``--shard``
selection are judged against the whole dataset as loaded too (:func:`outside_fingerprints`), and a row no
loaded sample can judge is left out of the records (:func:`write_split`); each record keeps its sample's
identity, which ``medfocus attribute --bench`` checks against the sample it finds at ``(dataset, index)``.

Negatives. The paper filters positives only (a "No" sample has no box to edit). With
``include_negatives=True`` the "No" samples are answered on the original image and written to the
separate negatives file for analysis (e.g. false-positive rates); they never enter the benchmark
split or the positive retention numbers.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence, TYPE_CHECKING

import numpy as np

from medfocus.bench.filter import GATES, RECORD_FIELDS, VIEWS, FilterResult, ParseFn, apply_filter
from medfocus.editing.base import EDIT_KINDS, EditCache, Editor, edit_mask, edit_prompt
from medfocus.errors import ConfigError, DataError, DataWarning
from medfocus.io.atomic import atomic_write_json, atomic_write_text
from medfocus.io.fingerprint import (FINGERPRINT_FIELD, changed_samples_error, describe_sample_conflicts, file_sha256,
                                     fingerprint_differences, merge_differences, sample_fingerprint, sample_identity)
from medfocus.io.jsonl import append_jsonl, read_latest, trim_partial_tail
from medfocus.io.letterbox import check_film_content, model_canvas
from medfocus.io.locks import acquire_lock, remove_orphaned_tmp
from medfocus.io.paths import safe_filename
from medfocus.types import Sample

if TYPE_CHECKING:  # annotations only: the adapter interface lives in the LVLM layer
    from medfocus.lvlm.adapter import LVLMAdapter

#: Default generation budget per mode (a reasoning chain needs room; a direct answer does not).
DEFAULT_MAX_NEW_TOKENS = {"direct": 16, "cot": 256}


def slug(name: str) -> str:
    """File-system-safe form of a model/dataset name (a model may be given as a path)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip().rstrip("/"))
    return safe_filename(s.strip("_") or "unnamed")  # the one sanitiser: no "..", no leading dot


def split_paths(out_dir: str | os.PathLike[str], model: str, dataset: str, mode: str) -> dict[str, Path]:
    """Paths of one split's files (see module docstring)."""
    d = Path(out_dir) / slug(model) / slug(dataset)
    m = safe_filename(mode)
    return {"records": d / f"{m}.json", "log": d / f"{m}.log.jsonl", "negatives": d / f"{m}.negatives.json"}


class SplitSettingsError(ConfigError):
    """A split's logged rows were generated with other settings (another model's weights, another generation
    budget, ...): a split holds one setting (:func:`check_split_settings`). Its own type, so a caller that owns
    the output folder (``medfocus demo``) can name its way out."""


def read_log(path: str | os.PathLike[str]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Rows of a split log by ``(model, dataset, index)``; later rows win; an interrupted last line
    (a kill mid-append) is ignored (:mod:`medfocus.io.jsonl`)."""
    return read_latest(path, lambda r: (r["model"], r["dataset"], int(r["index"])))


class GenerationCache:
    """Answers on the *original* image of one split, shared by every editor (module docstring).

    File: ``root/generations/<model slug>/<dataset slug>/<mode>.jsonl``, one JSON line per entry
    ``{"model", "dataset", "index", "mode", "question", "max_new_tokens", "image_sha256", "text",
    "model_fingerprint"}``; later lines win, an interrupted last line (a kill mid-write) is ignored and
    cut off before the next append. Keyed by ``(model_name, dataset, index, mode, question,
    max_new_tokens, image_sha256)`` plus the model's weight ``fingerprint``: an entry of other weights
    under the same name, or of another film under the same ``(dataset, index)`` (an overwritten film, a
    shifted index, another data root), is not reused; entries written before the film's hash was
    recorded are never served. Sound only because generation is greedy (deterministic).
    """

    def __init__(self, root: str | os.PathLike[str], model: str, dataset: str, mode: str, *, fingerprint: str | None = None):
        self.model, self.dataset, self.mode, self.fingerprint = model, dataset, mode, fingerprint
        self.path = Path(root) / "generations" / slug(model) / slug(dataset) / f"{safe_filename(mode)}.jsonl"
        self._entries: dict[tuple[str, str, int, str, str, int, str], str] = {}
        rows = read_latest(self.path, lambda r: (r["model"], r["dataset"], int(r["index"]), r["mode"], r["question"],
                                                 int(r["max_new_tokens"]), r.get("image_sha256")))
        for key, r in rows.items():
            # Answers of other weights under the same name (a retrained model) are not reused, nor
            # entries that do not say which film they answered (written before the hash was recorded).
            if isinstance(r.get("text"), str) and r.get("model_fingerprint") == fingerprint and key[-1]:
                self._entries[key] = r["text"]

    def _key(self, index: int, question: str, max_new_tokens: int, image_sha256: str) -> tuple[str, str, int, str, str, int, str]:
        return (self.model, self.dataset, int(index), self.mode, question, int(max_new_tokens), image_sha256)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, index: int, question: str, max_new_tokens: int, image_sha256: str | None) -> str | None:
        """Cached answer on the original film whose file has SHA-256 ``image_sha256``, or None (always
        None for an unknown hash)."""
        if not image_sha256:
            return None
        return self._entries.get(self._key(index, question, max_new_tokens, image_sha256))

    def put_many(self, entries: Sequence[tuple[int, str, int, str, str]]) -> None:
        """Append ``(index, question, max_new_tokens, image_sha256, text)`` entries (one flush + fsync).

        Raises:
            ConfigError: an entry without the film's hash (it could be served for another film).
        """
        if not entries:
            return
        if any(not e[3] for e in entries):
            raise ConfigError("GenerationCache.put_many: every entry needs the film's sha256")
        trim_partial_tail(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as fh:
            for index, question, mnt, sha, text in entries:
                append_jsonl(fh, {"model": self.model, "dataset": self.dataset, "index": int(index), "mode": self.mode,
                                  "question": question, "max_new_tokens": int(mnt), "image_sha256": sha, "text": text,
                                  "model_fingerprint": self.fingerprint})
                self._entries[self._key(index, question, mnt, sha)] = text


def make_record(row: dict[str, Any]) -> dict[str, Any]:
    """MedGround-Bench record (+ our extra fields) from a log row.

    The record keeps the identity of the sample its answers were given to, ``sample_fingerprint``
    (:func:`~medfocus.io.fingerprint.sample_identity` of the row's fingerprint: the film's path relative to
    the data root, its size and SHA-256, finding, ground-truth answer, boxes, question), which
    ``medfocus attribute --bench`` compares with the sample now at ``(dataset, index)``
    (:func:`medfocus.runner.grid.check_split_items`). A row written before fingerprints were recorded gives
    a record without it."""
    mode = row["mode"]
    rec: dict[str, Any] = {"model": row["model"], "dataset": row["dataset"], "index": row["index"], "answer": row["answer"]}
    for view, field in RECORD_FIELDS.items():
        rec[field.format(mode=mode)] = row["parsed"].get(view) if row.get("parsed") else None
    for k in ("mode", "editor", "attribute", "question", "boxes", "image_size"):
        rec[k] = row.get(k)
    identity = sample_identity(row.get(FINGERPRINT_FIELD))
    if identity is not None:
        rec[FINGERPRINT_FIELD] = identity
    return rec


def _load_image(sample: Sample) -> np.ndarray:
    from medfocus.io import read_image

    img, _ = read_image(sample.image_path)
    return img


def _base_row(sample: Sample, model_name: str, mode: str, editor: Editor | None) -> dict[str, Any]:
    return {"model": model_name, "dataset": sample.dataset, "index": int(sample.index), "mode": mode,
            "editor": editor.cache_id if editor is not None else None, "answer": sample.answer,
            "attribute": sample.attribute, "question": sample.question_for(mode),
            "boxes": [list(b) for b in sample.boxes], "image_size": list(sample.image_size), "error": None}


def _load_checked(sample: Sample, fingerprint: dict[str, Any]) -> np.ndarray:
    """The sample's film, checked to be the file fingerprinted when the run started (a stat when it is
    unchanged, :func:`~medfocus.io.fingerprint.file_sha256`): an answer or edit is never stored under
    the hash of a film that was rewritten during the run."""
    img = _load_image(sample)
    h = file_sha256(sample.image_path)
    if h is None or h[1] != fingerprint.get("image_sha256"):
        now = "missing" if h is None else f"sha256 {h[1][:12]}"
        raise DataError(f"sample {sample.dataset}#{sample.index}: film {sample.image_path} changed during the run "
                        f"(sha256 {str(fingerprint.get('image_sha256'))[:12]} when the run started, {now} now); rerun")
    return img


def _prepare_views(sample: Sample, editor: Editor, cache: EditCache, fingerprint: dict[str, Any]) -> list[np.ndarray]:
    """The four images of the filter: original + the three cached edits (the original is always
    loaded: the edits are made from it). ``fingerprint``: the sample's :func:`split_fingerprint` (its
    film hash and edit inputs key the edit cache)."""
    if not sample.boxes:
        raise DataError(f"sample {sample.dataset}#{sample.index} ({sample.attribute!r}) is positive but has no boxes to edit")
    img = _load_checked(sample, fingerprint)
    size = (img.shape[1], img.shape[0])
    if tuple(sample.image_size) != size:
        raise DataError(f"sample {sample.dataset}#{sample.index}: image {sample.image_path} is {size[0]}x{size[1]}, "
                        f"the sample says {sample.image_size[0]}x{sample.image_size[1]}")
    views = [img]
    for kind in EDIT_KINDS:
        mask = edit_mask(kind, sample.boxes, size)
        views.append(cache.get_or_edit(editor, img, mask, sample=sample, kind=kind, prompt=edit_prompt(kind, sample.attribute),
                                       film_sha256=fingerprint["image_sha256"], sample_inputs=fingerprint.get("edit_inputs")))
    return views


def split_fingerprint(sample: Sample, mode: str, editor: Editor | None, data_root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What identifies a split-log row's sample (stored as its ``sample_fingerprint``).

    :func:`medfocus.io.fingerprint.sample_fingerprint` of the film (path relative to ``data_root`` when
    under it, size, SHA-256), finding, answer, boxes and the full question of ``mode``; the answers are
    the model's (``answer_source`` ``"model"``). A positive sample also records ``edit_inputs``, the
    editor's per-sample inputs (:meth:`~medfocus.editing.base.Editor.sample_inputs`, e.g. the oracle's
    counterfactual renders). The film hash is cached per process, so a film is read once per run.
    """
    fp = sample_fingerprint(sample.image_path, finding=sample.attribute, gt_answer=sample.answer, gt_boxes=sample.boxes,
                            question=sample.question_for(mode), answer=None, answer_source="model", root=data_root)
    if sample.answer == "Yes" and editor is not None:
        fp["edit_inputs"] = dict(editor.sample_inputs(sample))
    return fp


def split_fingerprints(samples: Sequence[Sample], mode: str, editor: Editor | None,
                       data_root: str | os.PathLike[str] | None = None, *, progress: bool = False) -> dict[int, dict[str, Any]]:
    """``{index: split_fingerprint}`` of ``samples`` (each film hashed once; a bar when it takes a while)."""
    it: Any = samples
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(samples, desc="fingerprint films", unit="sample", delay=2.0, leave=False, dynamic_ncols=True)
    return {int(s.index): split_fingerprint(s, mode, editor, data_root) for s in it}


def changed_rows(log_path: str | os.PathLike[str], done: dict[Any, dict[str, Any]], fingerprints: dict[int, dict[str, Any]], *,
                 model_name: str, dataset: str, mode: str, overwrite: bool = False,
                 selected: Collection[int] | None = None) -> set[Any]:
    """The logged rows of a split whose sample changed since they were written.

    Compares each row of ``done`` (:func:`read_log`) of a sample in ``fingerprints`` with the sample's
    fingerprint now (:func:`split_fingerprint`); rows without a fingerprint (written before they were
    recorded) count as changed. Rows of samples not in ``fingerprints`` are not judged (see
    :func:`outside_fingerprints` for the rows outside a ``--limit`` / ``--shard`` selection, and
    :func:`write_split`, which leaves unjudged rows out of the records). ``selected``: the indices this run
    recomputes (default: all of ``fingerprints``); the refusal says that ``overwrite`` drops the changed rows
    of the others from the split instead.

    Returns:
        the keys to recompute or drop: changed error rows (they hold no result), and with ``overwrite``
        every changed row.
    Raises:
        ConfigError: a successful row of a changed sample and no ``overwrite``; the message names the
            split log, each index and what changed (stored -> now), and the remedies.
    """
    stale: set[Any] = set()
    conflicts: dict[tuple, list[str]] = {}
    for idx, now in sorted(fingerprints.items()):
        key = (model_name, dataset, idx)
        row = done.get(key)
        if row is None:
            continue
        diffs = fingerprint_differences(row.get(FINGERPRINT_FIELD), now)
        if not diffs:
            continue
        if overwrite or row.get("error"):
            stale.add(key)
        else:
            conflicts[(model_name, dataset, idx, mode, tuple(diffs))] = []
    if conflicts:
        outside = sorted(k[2] for k in conflicts if selected is not None and k[2] not in selected)
        note = (f"; rows of indices outside this run's selection (--limit, --shard: {outside}) are dropped from the "
                "split by --overwrite, and filtered again by a run that selects them") if outside else ""
        raise changed_samples_error(log_path, conflicts, held="rows filtered", note=note)
    return stale


def outside_fingerprints(dataset_samples: Iterable[Sample] | None, logged: Iterable[Any], selected: Collection[int], *,
                         dataset: str, mode: str, editor: Editor | None,
                         data_root: str | os.PathLike[str] | None = None) -> dict[int, dict[str, Any]]:
    """``{index: split_fingerprint}`` of the samples of ``dataset_samples`` (the whole dataset as loaded now)
    that have a row in the split log (``logged``: its keys ``(model, dataset, index)``) but lie outside this
    run's selection ``selected`` (``--limit``, ``--shard``). Those rows are written into the split's records
    too (:func:`write_split`), so they are judged against the current data like the selection's
    (:func:`changed_rows`); only their films are hashed, once each. Empty without ``dataset_samples``."""
    have = {int(k[2]) for k in logged} - set(selected)
    rest = [s for s in dataset_samples or () if s.dataset == dataset and int(s.index) in have]
    return split_fingerprints(rest, mode, editor, data_root)


def check_split_samples(samples: Sequence[Sample], out_dirs: Sequence[str | os.PathLike[str]], *, model_name: str,
                        modes: Sequence[str], editor: Editor, data_root: str | os.PathLike[str] | None = None,
                        dataset_samples: Sequence[Sample] | None = None, max_new_tokens: int | None = None,
                        parse: ParseFn | None = None, model_identity: dict[str, Any] | None = None,
                        overwrite: bool = False) -> None:
    """Refuse, before any model loads, what :func:`build_benchmark` would refuse on the split logs under
    ``out_dirs`` (missing ones skipped), in its order -- for ``bench build`` (and its launcher, over the
    shard folders too): another editor (:func:`check_split_editor`), other generation settings
    (:func:`check_split_settings`, with this run's ``max_new_tokens`` / ``parse`` / ``model_identity`` as
    :func:`build_benchmark` takes them), then, unless ``overwrite``, successful rows of changed samples
    (:func:`changed_rows`; rows outside the selection ``samples`` are judged against ``dataset_samples``, the
    whole dataset as loaded now). The editor and settings come first: a changed editor also changes every
    sample's per-editor inputs, and must be named as what it is, not as changed samples that
    ``--overwrite`` would recompute.

    Raises:
        ConfigError: as :func:`check_split_editor`, :func:`check_split_settings` and :func:`changed_rows`.
    """
    datasets = sorted({s.dataset for s in samples})
    if len(datasets) != 1:
        raise ConfigError(f"a benchmark split holds one dataset, got {datasets}")
    if parse is None:
        from medfocus.lvlm.answers import parse_yes_no as parse
    for mode in modes:
        fps: dict[int, dict[str, Any]] | None = None
        gen: dict[str, Any] | None = None
        for out in out_dirs:
            log = split_paths(out, model_name, datasets[0], mode)["log"]
            if not log.is_file():
                continue
            done = read_log(log)
            check_split_editor(log, done, editor)
            if gen is None:
                budget = DEFAULT_MAX_NEW_TOKENS[mode] if max_new_tokens is None else max_new_tokens
                gen = generation_settings(model_name, budget, parse, model_identity)
            for k in check_split_settings(log, done, gen):  # error rows of other settings: recomputed, not judged
                done.pop(k)
            if overwrite:
                continue
            if fps is None:
                fps = split_fingerprints(samples, mode, editor, data_root)
            judged = {**outside_fingerprints(dataset_samples, done, fps, dataset=datasets[0], mode=mode, editor=editor,
                                             data_root=data_root), **fps}
            changed_rows(log, done, judged, model_name=model_name, dataset=datasets[0], mode=mode, selected=fps)


def check_split_editor(log_path: str | os.PathLike[str], done: dict[Any, dict[str, Any]], editor: Editor) -> None:
    """Refuse a split log whose rows were filtered with another editor (or other editor settings, which are
    part of :attr:`~medfocus.editing.base.Editor.cache_id`): a split is built with one editor.

    Raises:
        ConfigError: naming the log, the editor stored and the editor now (``--overwrite`` does not apply:
            the samples did not change, the setting did).
    """
    others = sorted({r["editor"] for r in done.values() if r.get("editor") and r["editor"] != editor.cache_id})
    if others:
        raise ConfigError(f"{log_path} holds samples filtered with other settings: editor: {', '.join(map(repr, others))} "
                          f"(stored) -> {editor.cache_id!r} (now). A split is built with one editor: use another --out "
                          "for this editor (the edit cache can be shared with --cache-dir) to compare editors.")


def generation_settings(model_name: str, max_new_tokens: int, parse: ParseFn,
                        model_identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a split's answers depend on besides the editor (whose ``cache_id`` holds its settings):
    the generation budget, the answer parser and the model's identity (source + weight fingerprint,
    :func:`medfocus.lvlm.loading.model_identity`; computed from ``model_name`` when not given)."""
    if model_identity is None:
        try:
            from medfocus.lvlm.loading import model_identity as _identity

            model_identity = _identity(model_name)
        except Exception:  # not a resolvable name (a test adapter): identified by the name alone
            model_identity = {"source": model_name, "fingerprint": None}
    return {"max_new_tokens": int(max_new_tokens),
            "parser": f"{getattr(parse, '__module__', '')}.{getattr(parse, '__qualname__', repr(parse))}",
            "model_source": model_identity.get("source"), "model_fingerprint": model_identity.get("fingerprint")}


def check_split_settings(log_path: Path, done: dict[Any, dict[str, Any]], settings: dict[str, Any]) -> set[Any]:
    """Compare the logged rows of a split with this run's generation settings.

    Returns:
        the keys of *error* rows logged with other settings (to recompute: a corrected rerun is not
        shadowed by the failed one).
    Raises:
        SplitSettingsError: successful rows were generated with other settings (or before settings were
            logged); the message names each differing setting. A split holds one setting.
    """
    stale, diffs = set(), {}
    for k, row in done.items():
        old = row.get("generation")
        if old == settings:
            continue
        if row.get("error"):
            stale.add(k)
            continue
        if old is None:
            d = ("generation settings: not recorded (a row written before they were logged)",)
        else:
            d = tuple(f"{f}: {old.get(f)!r} (stored) -> {settings.get(f)!r} (now)" for f in sorted(set(old) | set(settings))
                      if old.get(f) != settings.get(f))
        diffs[d] = diffs.get(d, 0) + 1
    if diffs:
        lines = [f"  {n} sample{'s' if n > 1 else ''}: {'; '.join(d)}" for d, n in diffs.items()]
        raise SplitSettingsError(f"{log_path} holds samples filtered with other generation settings:\n" + "\n".join(lines) +
                          "\nA split is built with one setting: use another --out for the new settings.")
    return stale


def build_benchmark(
    adapter: LVLMAdapter,
    samples: Sequence[Sample],
    *,
    mode: str,
    editor: Editor,
    out_dir: str | os.PathLike[str],
    model_name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    include_negatives: bool = False,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    samples_per_step: int | None = None,
    parse: ParseFn | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    cache_generations: bool = True,
    model_identity: dict[str, Any] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    dataset_samples: Sequence[Sample] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Filter ``samples`` for one model and mode; write the split, its log and the retention table.

    Args:
        adapter: an :class:`~medfocus.lvlm.adapter.LVLMAdapter` (only ``generate`` is used).
        samples: samples of one dataset (positives are filtered; negatives skipped unless
            ``include_negatives``).
        mode: ``"direct"`` or ``"cot"`` (the question gets the paper's suffix for that mode).
        editor: a counterfactual editor (:func:`medfocus.editing.get_editor`).
        out_dir: output folder (layout in the module docstring).
        model_name: name written in the records (registry name, e.g. ``qwen2_5_vl_3b``).
        cache_dir: edit cache (default ``out_dir/edits``); shared by every model using the editor.
            Also holds the original-view generation cache (``cache_dir/generations``), shared by
            every editor: pass the same ``cache_dir`` when building a split with several editors.
        max_new_tokens: generation budget, >= 1 (None: 16 direct, 256 cot).
        batch_size: images per ``adapter.generate`` batch, >= 1.
        samples_per_step: samples generated together, >= 1 (4 images each; default ``max(1, batch_size // 4)``);
            the log is written after each step.
        parse: answer parser (default :func:`medfocus.lvlm.answers.parse_yes_no`).
        retry_errors: redo samples whose logged row has an error (default: keep them as errors).
        cache_generations: reuse / store the answer on the original image in the generation cache
            (module docstring; sound for greedy generation only).
        model_identity: the model's identity (default :func:`medfocus.lvlm.loading.model_identity`
            of ``model_name``), logged with every row.
        data_root: the dataset root; the rows' sample fingerprints store image paths relative to it
            (so the same films under a moved root resume).
        overwrite: recompute logged rows whose sample changed (or that carry no fingerprint) instead
            of refusing them (such rows outside ``samples`` are dropped from the split, with a warning).
        dataset_samples: the whole dataset as loaded now, when ``samples`` is a selection of it
            (``--limit``, ``--shard``; default ``samples``): the log's rows of samples outside the
            selection are judged against it too (see "Samples" below).

    Settings: every log row records the generation settings (:func:`generation_settings`); a rerun
    with other settings refuses (:func:`check_split_settings`) as a rerun with another editor does.
    Samples: every log row records its sample's fingerprint (:func:`split_fingerprint`: film path,
    size and SHA-256, finding, answer, boxes, question, the editor's per-sample inputs). A rerun whose
    sample under a logged key changed (a film overwritten in place, a row inserted into the data
    shifting the indices, another data root) refuses before any generation, naming the log, the
    indices and what changed (:func:`changed_rows`), unless ``overwrite``, which drops those rows
    from the log and recomputes them; a changed sample's error row is recomputed without asking. The
    edit and generation caches are keyed by the film's hash (module docstring), so a changed film is
    never served an old edit or answer.
    The records file is rewritten from the whole log, so a row of a sample outside ``samples`` (an earlier
    run's ``--limit 4`` under this run's ``--limit 2``) is judged as well, against ``dataset_samples``
    (only those films are hashed): a changed one is refused like a selected one (``overwrite`` drops it
    from the log; a run that selects it filters it again). A row no loaded sample can judge (its index is
    past the end of ``dataset_samples``, or ``dataset_samples`` was not given) stays in the log but is left
    out of the records, with a :class:`~medfocus.errors.DataWarning` naming it (:func:`write_split`).
    Every record carries its sample's identity (:func:`make_record`).
    The split is locked for the run (``<split log>.lock``, the same per-output lock as
    ``medfocus attribute``), and temporary files a killed write left in its folder are removed.
    Returns:
        ``(records, retention)``: the kept records of the whole split (including samples done by
        earlier runs) and the split's retention row (see :func:`retention_row`).
    """
    if mode not in ("direct", "cot"):
        raise ConfigError(f"bench mode must be 'direct' or 'cot', got {mode!r}")
    if not samples:
        raise DataError("no samples to filter")
    datasets = sorted({s.dataset for s in samples})
    if len(datasets) != 1:
        raise ConfigError(f"build_benchmark works on one dataset at a time, got {datasets}")
    dataset = datasets[0]
    if parse is None:
        from medfocus.lvlm.answers import parse_yes_no as parse
    # None means "the mode's default"; 0 or less is an error, never swapped for the default
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("samples_per_step", samples_per_step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS[mode] if max_new_tokens is None else max_new_tokens
    step = max(1, batch_size // len(VIEWS)) if samples_per_step is None else samples_per_step
    paths = split_paths(out_dir, model_name, dataset, mode)
    cache_root = Path(cache_dir) if cache_dir is not None else Path(out_dir) / "edits"
    cache = EditCache(cache_root)
    # Original-view answers shared across editors. Sound because generation is greedy, i.e. a
    # deterministic function of (model, image, question, max_new_tokens); the model is keyed by name and
    # weight fingerprint, so a retrained model under the same name regenerates, and the image by the
    # film's SHA-256, so another film under the same (dataset, index) does too.
    gen = generation_settings(model_name, max_new_tokens, parse, model_identity)
    gen_cache = GenerationCache(cache_root, model_name, dataset, mode, fingerprint=gen["model_fingerprint"]) if cache_generations else None

    editor.prepare()  # missing weights / reference pool: fail now, not once per sample
    # Every film hashed once, before anything is generated: the resume check and both caches use it.
    fingerprints = split_fingerprints(samples, mode, editor, data_root, progress=progress)
    lock = acquire_lock(paths["log"], "benchmark split")
    try:
        return _build_locked(adapter, samples, mode=mode, editor=editor, out_dir=out_dir, model_name=model_name,
                             include_negatives=include_negatives, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             step=step, parse=parse, retry_errors=retry_errors, progress=progress, paths=paths,
                             cache=cache, gen_cache=gen_cache, dataset=dataset, gen=gen, fingerprints=fingerprints,
                             overwrite=overwrite, dataset_samples=dataset_samples, data_root=data_root)
    finally:
        if lock is not None:
            lock.close()


def _build_locked(adapter: LVLMAdapter, samples: Sequence[Sample], *, mode: str, editor: Editor, out_dir: Any, model_name: str,
                  include_negatives: bool, max_new_tokens: int, batch_size: int, step: int, parse: ParseFn,
                  retry_errors: bool, progress: bool, paths: dict[str, Path], cache: EditCache,
                  gen_cache: "GenerationCache | None", dataset: str, gen: dict[str, Any], fingerprints: dict[int, dict[str, Any]],
                  overwrite: bool, dataset_samples: Sequence[Sample] | None,
                  data_root: str | os.PathLike[str] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The body of :func:`build_benchmark`, run while the split's lock is held."""
    for name in ("records", "log", "negatives"):
        remove_orphaned_tmp(paths[name].parent, paths[name].name)
    trim_partial_tail(paths["log"])
    done = read_log(paths["log"])
    check_split_editor(paths["log"], done, editor)  # first, as check_split_samples does before the model loads
    for k in check_split_settings(paths["log"], done, gen):
        done.pop(k)
    # rows outside the selection go into the records too: judged against the data loaded now as well
    judged = {**outside_fingerprints(dataset_samples, done, fingerprints, dataset=dataset, mode=mode, editor=editor,
                                     data_root=data_root), **fingerprints}
    stale = changed_rows(paths["log"], done, judged, model_name=model_name, dataset=dataset, mode=mode,
                         overwrite=overwrite, selected=fingerprints)
    if stale:  # rows of other samples leave the log (and so the split's records) before they are recomputed
        for k in stale:
            done.pop(k)
        _drop_log_rows(paths["log"], stale)
        dropped = sorted(k[2] for k in stale if k[2] not in fingerprints)
        if dropped:
            warnings.warn(f"{paths['log']}: the rows of indices {dropped} were filtered on samples that changed since "
                          "and lie outside this run's selection (--limit, --shard): dropped from the split, not "
                          "recomputed; a run that selects them filters them again", DataWarning, stacklevel=3)
    if retry_errors:
        done = {k: r for k, r in done.items() if r.get("error") is None}
    todo = [s for s in samples if (s.answer == "Yes" or include_negatives) and (model_name, dataset, int(s.index)) not in done]

    from tqdm.auto import tqdm

    canvas = model_canvas(adapter)
    bar = tqdm(total=len(todo), desc=f"bench {slug(model_name)}/{dataset}/{mode}", unit="sample", disable=not progress)
    for start in range(0, len(todo), step):
        chunk = todo[start:start + step]
        rows, images, questions, owners = [], [], [], []
        cached: dict[int, str] = {}  # row -> original-view answer from the generation cache
        for s in chunk:
            row = _base_row(s, model_name, mode, editor if s.answer == "Yes" else None)
            row["generation"] = gen
            row["kind"] = "positive" if s.answer == "Yes" else "negative"
            fp = fingerprints[int(s.index)]
            row[FINGERPRINT_FIELD] = fp
            try:
                views = _prepare_views(s, editor, cache, fp) if s.answer == "Yes" else [_load_checked(s, fp)]
                check_film_content(views[0], s.image_path, *canvas)  # a film the model cannot see: an error row
            except Exception as exc:  # noqa: BLE001 - one failing sample must not stop the run
                row["error"] = f"{type(exc).__name__}: {exc}"
                views = []
            rows.append(row)
            hit = gen_cache.get(s.index, row["question"], max_new_tokens, fp["image_sha256"]) if gen_cache is not None and views else None
            if hit is not None:
                cached[len(rows) - 1] = hit
                views = views[1:]  # views[0] is the original: answered already
            for v in views:
                images.append(v)
                questions.append(row["question"])
                owners.append(len(rows) - 1)
        texts = _generate_isolating_errors(adapter, images, questions, owners, rows, max_new_tokens, batch_size)
        per_row: dict[int, list[str]] = {i: [t] for i, t in cached.items()}
        for o, t in zip(owners, texts):
            if t is not None:
                per_row.setdefault(o, []).append(t)
        if gen_cache is not None:  # only answers generated now, by a successful generation
            gen_cache.put_many([(int(chunk[i].index), row["question"], max_new_tokens, row[FINGERPRINT_FIELD]["image_sha256"],
                                 per_row[i][0])
                                for i, row in enumerate(rows)
                                if row["error"] is None and i not in cached and per_row.get(i)])
        for i, row in enumerate(rows):
            if row["error"] is None:
                _fill_outcome(row, per_row.get(i, []), parse)
            append_jsonl(paths["log"], row)
        bar.update(len(chunk))
    bar.close()

    records, split_rows = write_split(out_dir, model_name, dataset, mode, include_negatives=include_negatives,
                                      judged=judged)
    write_retention(out_dir)
    return records, retention_row(split_rows)


def _write_log(log_path: Path, rows: dict[Any, dict[str, Any]]) -> None:
    """Write a split log atomically: one line per ``(model, dataset, index)`` key, in index order."""
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for _, r in sorted(rows.items(), key=lambda kv: kv[0][2])))


def _drop_log_rows(log_path: Path, keys: set[Any]) -> None:
    """Rewrite a split log without the rows of ``keys``."""
    _write_log(log_path, {k: r for k, r in read_log(log_path).items() if k not in keys})


def write_split(out_dir: str | os.PathLike[str], model_name: str, dataset: str, mode: str, *,
                include_negatives: bool = False,
                judged: Collection[int] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Re)write a split's records (and negatives) from its log; returns ``(records, log rows)``.

    The log is the source of truth: the records are the kept positives in index order, each carrying its
    sample's identity (:func:`make_record`).

    Args:
        judged: the indices whose rows were judged against the current data by the caller
            (:func:`changed_rows`: :func:`build_benchmark` judges its selection and every logged sample of
            the dataset loaded now). A row of any other index cannot be vouched for: it stays in the log but
            is left out of the records (and negatives), with a :class:`~medfocus.errors.DataWarning` naming
            the log and the indices. ``None`` (the merge of shard logs, :func:`merge_split_logs`, which has no
            data to judge against): every row is written, as judged by the shard run that wrote it; records
            still carry their sample's identity, which ``attribute --bench`` checks.
    """
    paths = split_paths(out_dir, model_name, dataset, mode)
    all_rows = read_log(paths["log"])
    split_rows = sorted((r for r in all_rows.values() if r.get("model") == model_name and r.get("dataset") == dataset),
                        key=lambda r: r["index"])
    written = split_rows
    if judged is not None:
        unjudged = sorted(int(r["index"]) for r in split_rows if int(r["index"]) not in judged)
        if unjudged:
            warnings.warn(f"{paths['log']}: the rows of indices {unjudged} name samples that are not in the data loaded "
                          "now (past the end of the dataset, or outside the samples given), so they could not be "
                          f"checked against their films: left out of {paths['records']} (kept in the log). Rebuild "
                          "with the data they were filtered on to write them back.", DataWarning, stacklevel=3)
            written = [r for r in split_rows if int(r["index"]) in judged]
    records = [make_record(r) for r in written if r.get("kind", "positive") == "positive" and r.get("kept")]
    atomic_write_json(paths["records"], records)
    if include_negatives:
        neg = [make_record(r) for r in written if r.get("kind") == "negative" and r.get("error") is None]
        atomic_write_json(paths["negatives"], neg)
    return records, split_rows


def merge_split_logs(shard_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                     overwrite: bool = False) -> list[str]:
    """Merge the split logs of bench shard folders (``bench build --shard i/n``) into ``out_dir``.

    Every ``<model>/<dataset>/<mode>.log.jsonl`` under a shard folder is combined with the log of the
    same split in ``out_dir`` (rows keyed by ``(model, dataset, index)``; a row without error wins over
    one with an error, otherwise the later shard wins), written atomically, then the split's records
    and the retention table are rewritten from it. Idempotent. Returns a line per merged split.

    Rows of one key filtered on different samples (their ``sample_fingerprint`` differs, or one of them
    has none) are never combined silently: without ``overwrite`` the merge refuses before writing
    anything, naming them; with ``overwrite`` (a run started with ``--overwrite`` recomputed them) the
    shard row replaces the row in ``out_dir``. An error row in ``out_dir`` of another sample is replaced
    without asking (it holds no result).

    Raises:
        ConfigError: two shards filtered the same split with different editors, or rows of different
            samples under one key (see above).
    """
    out = Path(out_dir)
    splits: dict[Path, list[Path]] = {}
    for d in shard_dirs:
        d = Path(d)
        for log in sorted(d.glob("*/*/*.log.jsonl")):
            splits.setdefault(log.relative_to(d), []).append(log)
    plans = []
    for rel, logs in sorted(splits.items()):
        target = out / rel
        merged = read_log(target)
        from_shards: dict[Any, dict[str, Any]] = {}
        conflicts: dict[tuple, list[str]] = {}
        mode = rel.name[: -len(".log.jsonl")]
        for log in logs:
            for k, row in read_log(log).items():
                prev = from_shards.get(k)
                diffs = _row_sample_differences(prev, row) if prev is not None else []
                if diffs:
                    conflicts[(*k, mode, tuple(f"two shard folders disagree: {d}" for d in diffs))] = []
                if prev is not None and prev.get("error") is None and row.get("error") is not None:
                    continue
                from_shards[k] = row
        for k, row in from_shards.items():
            prev = merged.get(k)
            diffs = _row_sample_differences(prev, row) if prev is not None else []
            if prev is None or (diffs and (overwrite or prev.get("error"))):
                merged[k] = row
            elif diffs:
                conflicts[(*k, mode, tuple(diffs))] = []
            elif not (prev.get("error") is None and row.get("error") is not None):
                merged[k] = row
        if conflicts:
            raise ConfigError(f"merging into {target} would combine rows filtered on different samples under one key "
                              "(merged -> shard):\n" + describe_sample_conflicts(conflicts) + "\nRerun the merge with "
                              "--overwrite to let the shard rows replace those in the merged log (when the shards were "
                              "recomputed on the current data), or merge into another folder.")
        editors = sorted({r["editor"] for r in merged.values() if r.get("editor")})
        if len(editors) > 1:
            raise ConfigError(f"{target}: the shards filtered this split with different editors {editors}")
        plans.append((rel, target, logs, merged, mode))
    written = []
    for rel, target, logs, merged, mode in plans:  # nothing is written before every split was checked
        _write_log(target, merged)
        rows = list(merged.values())
        model_name, dataset = rows[0]["model"], rows[0]["dataset"]
        records, _ = write_split(out, model_name, dataset, mode,
                                 include_negatives=any(r.get("kind") == "negative" for r in rows))
        written.append(f"{split_paths(out, model_name, dataset, mode)['records']} ({len(records)} kept of "
                       f"{len(rows)} samples from {len(logs)} shards)")
    if written:
        write_retention(out)
    return written


def _row_sample_differences(kept: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Sample differences between two split-log rows of one key (:func:`~medfocus.io.fingerprint.merge_differences`)."""
    return merge_differences(kept.get(FINGERPRINT_FIELD), new.get(FINGERPRINT_FIELD), new_name="the shard row")


def _generate_isolating_errors(adapter: LVLMAdapter, images: list[np.ndarray], questions: list[str], owners: list[int],
                               rows: list[dict[str, Any]], max_new_tokens: int, batch_size: int) -> list[str | None]:
    """Generate for the whole step; if that fails, per sample, so that one bad sample only marks
    its own row as an error. Returns one text (or None for failed samples) per image."""
    if not images:
        return []
    try:
        out = list(adapter.generate(images, questions, max_new_tokens=max_new_tokens, batch_size=batch_size))
        if len(out) != len(images):
            raise RuntimeError(f"adapter.generate returned {len(out)} answers for {len(images)} images")
        return out
    except Exception:  # noqa: BLE001 - retry per sample to find the culprit
        pass
    texts: list[str | None] = [None] * len(images)
    for r in sorted(set(owners)):
        idx = [i for i, o in enumerate(owners) if o == r]
        try:
            out = list(adapter.generate([images[i] for i in idx], [questions[i] for i in idx],
                                        max_new_tokens=max_new_tokens, batch_size=batch_size))
            if len(out) != len(idx):
                raise RuntimeError(f"adapter.generate returned {len(out)} answers for {len(idx)} images")
            for i, t in zip(idx, out):
                texts[i] = t
        except Exception as exc:  # noqa: BLE001
            rows[r]["error"] = f"generation failed: {type(exc).__name__}: {exc}"
    return texts


def _fill_outcome(row: dict[str, Any], texts: list[str], parse: ParseFn) -> None:
    if row["kind"] == "negative":
        p = parse(texts[0])
        row["raw"] = {"original": texts[0]}
        row["parsed"] = {"original": p}
        row["correct"] = p == row["answer"]
        row["kept"] = False
        return
    raw = dict(zip(VIEWS, texts))
    res: FilterResult = apply_filter(row["answer"], {v: parse(t) for v, t in raw.items()})
    row["raw"] = raw
    row["parsed"] = res.parsed
    row["gates"] = res.gates
    row["failed_gate"] = res.failed_gate
    row["unparseable"] = res.unparseable
    row["kept"] = res.kept


# ---- retention --------------------------------------------------------------------------------
RETENTION_COLUMNS = ["model", "dataset", "mode", "editor", "n", "errors", "failed_correct", "failed_flip",
                     "failed_background", "kept", "retention_pct", "unparseable_correct", "unparseable_flip",
                     "unparseable_background", "negatives", "negatives_correct", "negatives_errors"]


def retention_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Retention of one split from its log rows.

    ``n`` counts positives; ``errors + failed_correct + failed_flip + failed_background + kept == n``
    (each sample is charged to the first gate it fails); ``unparseable_<gate>`` counts the failures of
    that gate caused by an unreadable answer (already included in ``failed_<gate>``). ``negatives``: the
    "No" samples answered without error (``--include-negatives``), ``negatives_correct`` those answered
    "No", ``negatives_errors`` those whose generation failed (not in ``negatives``).
    """
    pos = [r for r in rows if r.get("kind", "positive") == "positive"]
    neg_all = [r for r in rows if r.get("kind") == "negative"]
    neg = [r for r in neg_all if r.get("error") is None]
    first = rows[0] if rows else {}
    out: dict[str, Any] = {"model": first.get("model"), "dataset": first.get("dataset"), "mode": first.get("mode"),
                           "editor": next((r.get("editor") for r in pos if r.get("editor")), None), "n": len(pos)}
    ok = [r for r in pos if r.get("error") is None]
    out["errors"] = len(pos) - len(ok)
    for g in GATES:
        out[f"failed_{g}"] = sum(1 for r in ok if r.get("failed_gate") == g)
    out["kept"] = sum(1 for r in ok if r.get("kept"))
    out["retention_pct"] = round(100.0 * out["kept"] / len(pos), 1) if pos else 0.0
    for g in GATES:
        out[f"unparseable_{g}"] = sum(1 for r in ok if r.get("failed_gate") == g and r.get("unparseable"))
    out["negatives"] = len(neg)
    out["negatives_correct"] = sum(1 for r in neg if r.get("correct"))
    out["negatives_errors"] = len(neg_all) - len(neg)
    return out


def retention_table(out_dir: str | os.PathLike[str]) -> "Any":
    """pandas DataFrame of :func:`retention_row` for every split log under ``out_dir``."""
    import pandas as pd

    rows = []
    for log in sorted(Path(out_dir).glob("*/*/*.log.jsonl")):
        split = list(read_log(log).values())
        by_split: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for r in split:
            by_split.setdefault((r["model"], r["dataset"], r.get("mode")), []).append(r)
        rows += [retention_row(v) for _, v in sorted(by_split.items())]
    return pd.DataFrame(rows, columns=RETENTION_COLUMNS)


def retention_markdown(df: "Any") -> str:
    """Markdown table of a retention DataFrame (:func:`retention_table`): what ``retention.md`` holds and
    ``bench build`` / ``bench retention`` print. The last column is the "No" samples
    (``--include-negatives``): ``correct/n`` answered "No" of those answered, ``(+k errors)`` when some
    failed, ``-`` when the split answered none."""
    cols = ["model", "dataset", "mode", "editor", "n", "errors", "failed_correct", "failed_flip", "failed_background",
            "kept", "retention_pct"]
    head = ["model", "dataset", "mode", "editor", "n", "errors", "✗ correct", "✗ flip", "✗ background", "kept",
            "retention %", "unparseable (correct/flip/bg)", "negatives (correct/n)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in df.iterrows():
        vals = [str(r[c]) for c in cols]
        vals.append(f"{r['unparseable_correct']}/{r['unparseable_flip']}/{r['unparseable_background']}")
        vals.append(_negatives_cell(int(r["negatives_correct"]), int(r["negatives"]), int(r.get("negatives_errors", 0))))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _negatives_cell(correct: int, n: int, errors: int) -> str:
    """``correct/n`` of a split's "No" samples, ``(+k errors)`` for failed ones, ``-`` when none was run."""
    if n == 0 and errors == 0:
        return "-"
    return f"{correct}/{n}" + (f" (+{errors} error{'s' if errors != 1 else ''})" if errors else "")


def write_retention(out_dir: str | os.PathLike[str]) -> str:
    """Write ``retention.csv`` and ``retention.md`` under ``out_dir``; return the Markdown.

    Raises:
        DataError: ``out_dir`` holds no split log with a row (``<model>/<dataset>/<mode>.log.jsonl``): an
            empty table would read as a measured retention; nothing is written.
    """
    df = retention_table(out_dir)
    if df.empty:
        raise DataError(f"{out_dir}: no bench logs here (<model>/<dataset>/<mode>.log.jsonl with at least one row), so "
                        "there is no retention to compute; nothing written. Give the --out folder of `medfocus bench build`.")
    md = retention_markdown(df)
    atomic_write_text(Path(out_dir) / "retention.csv", df.to_csv(index=False))
    atomic_write_text(Path(out_dir) / "retention.md", md)
    return md
