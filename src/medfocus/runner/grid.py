"""The experiment grid: models x datasets x modes x methods over a benchmark split.

A run is a list of :class:`WorkItem` (one per model, dataset, sample and mode) crossed with a list
of attribution methods. :func:`run_grid` executes it against a :class:`~medfocus.runner.store.ResultStore`:

* each model is loaded **once** (items are grouped by model) and released before the next;
* each method object is built **once per run**, so its caches (e.g. MedFocus concept transfers, which
  do not depend on the model) are shared across models, modes and methods;
* each image is read once per work item, prepared once (one processor call) and given to every method,
  and the item's methods share their passes (:func:`medfocus.attribution.suite.attribute_many`: one
  forward for the attention / gradient methods, full batches for the perturbation methods;
  each record keeps the passes its method needs and notes what it shared in ``shared_pass``);
* keys already in the store are skipped (resume); a sample whose attribution raises is recorded with
  its error and the run continues;
* the global RNGs are re-seeded per key from ``seed`` and the key, so a result does not depend on the
  order, the shard or whether the run was resumed (a method's numbers do not depend on which other
  methods shared its passes).

Sharding: :func:`shard_of` assigns every ``(model, dataset, index, mode)`` to one of ``n`` shards by a
stable hash, so ``n`` machines (or a Slurm array) running ``--shard i/n`` for ``i = 0..n-1`` cover
every item exactly once; all methods of one sample land on the same shard (shared caches).
Merge the shard files with :func:`medfocus.runner.store.merge_stores`.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from medfocus.errors import ConfigError, DataError, MedfocusError, ModelError
from medfocus.io.fingerprint import (FINGERPRINT_FIELD, IDENTITY_FIELDS, changed_samples_error, describe_sample_conflicts,
                                     fingerprint_differences, sample_fingerprint)
from medfocus.io.letterbox import check_film_content, model_canvas
from medfocus.runner.store import Key, ResultStore, to_jsonable
from medfocus.types import Sample

log = logging.getLogger(__name__)

#: Extras arrays with more elements than this go into the record's ``.npz`` instead of the JSON line.
MAX_INLINE_ARRAY = 256

#: Where an attributed answer comes from (:class:`WorkItem`'s ``answer_source``).
ANSWER_SOURCES: tuple[str, ...] = ("split", "split_other_model", "given", "model", "ground_truth")

#: ``save_token_maps``: a stack of per-token maps with more values than this is stored area-averaged to a
#: longer side of :data:`LOWRES_TOKEN_SIDE` px as ``token_heatmaps_lowres`` instead of ``token_heatmaps``.
MAX_TOKEN_MAP_VALUES = 16_000_000
LOWRES_TOKEN_SIDE = 256


@dataclass(frozen=True)
class WorkItem:
    """One (model, dataset, sample, mode) cell of the grid; every method runs on it.

    Attributes:
        model: registry name or path of the LVLM (what the model loader receives).
        dataset: dataset key of the sample.
        mode: output mode (``"direct"`` / ``"cot"``); selects the question suffix.
        sample: the benchmark sample (image path, finding, GT boxes).
        answer: the answer text to attribute (teacher-forced), normally the model's own prediction on
            the original image as recorded by the causal filter; ``None``: see ``answer_source``.
        answer_source: where ``answer`` comes from, stored in every record: ``"split"`` (the causal filter's
            record of the model's answer), ``"split_other_model"`` (a split's recorded answer of another
            model, attributed under this one on purpose: ``--relabel-split-model``), ``"given"`` (a caller's
            explicit text), ``"model"`` (``answer`` is ``None`` and :func:`run_grid` generates the model's greedy answer on the image, with the mode's
            token budget, before the methods run) or ``"ground_truth"`` (``sample.answer`` is attributed,
            whatever the model says; an explicit choice). Default: ``"given"`` with an answer, else ``"model"``.
        synthetic: whether the film comes from the synthetic world (``None``: ``dataset == "synthetic"``); a
            method using the default synthetic reference pool on a non-synthetic film gets a warning.
        extra: copied verbatim into every result record (e.g. the benchmark split's editor).
        split_sample: for an item of a benchmark split (:func:`items_from_benchmark`), what its record says
            about the sample its answer was given to: ``{"where": "benchmark file F record 3", "stored":
            {field: value}}`` (fields of :data:`~medfocus.io.fingerprint.IDENTITY_FIELDS`), checked against the
            sample loaded now by :func:`check_split_items`; ``None`` otherwise.
    """

    model: str
    dataset: str
    mode: str
    sample: Sample
    answer: str | None = None
    answer_source: str | None = None
    synthetic: bool | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    split_sample: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.answer_source is None:  # default: the given text, else the model's own answer
            object.__setattr__(self, "answer_source", "given" if self.answer else "model")
        if self.answer_source not in ANSWER_SOURCES:
            raise ConfigError(f"WorkItem.answer_source must be one of {ANSWER_SOURCES}, got {self.answer_source!r}")
        if self.answer_source == "ground_truth" and self.sample.answer is None:
            raise ConfigError(f"sample {self.dataset}#{self.sample.index} has no ground-truth answer to attribute")
        if self.answer is None and self.answer_source in ("split", "split_other_model", "given"):
            raise ConfigError(f"WorkItem with answer_source={self.answer_source!r} needs an answer text")

    @property
    def index(self) -> int:
        return int(self.sample.index)

    def key(self, method: str) -> Key:
        return (self.model, self.dataset, self.index, self.mode, method)

    @property
    def question(self) -> str:
        return self.sample.question_for(self.mode)

    @property
    def answer_text(self) -> str | None:
        """The text to attribute; ``None`` while a model answer is still to be generated."""
        if self.answer:
            return self.answer
        return self.sample.answer if self.answer_source == "ground_truth" else None

    @property
    def is_synthetic(self) -> bool:
        return self.dataset == "synthetic" if self.synthetic is None else bool(self.synthetic)

    def fingerprint(self, root: str | Path | None = None) -> dict[str, Any]:
        """The item's :func:`~medfocus.io.fingerprint.sample_fingerprint` (image path relative to ``root``
        when under it; the answer text only when it is fixed before the run)."""
        s = self.sample
        return sample_fingerprint(s.image_path, finding=s.attribute, gt_answer=s.answer, gt_boxes=s.boxes,
                                  question=self.question, answer=self.answer_text, answer_source=self.answer_source,
                                  root=root)


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` -> ``(0, 1)``."""
    if spec is None:
        return (0, 1)
    if isinstance(spec, tuple):
        i, n = spec
    else:
        parts = str(spec).split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}")
        i, n = int(parts[0]), int(parts[1])
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {i}/{n}: need n >= 1 and 0 <= i < n")
    return (i, n)


def shard_of(model: str, dataset: str, index: int, mode: str, n: int) -> int:
    """Stable shard number in ``[0, n)`` of a work item (sha1 of its key; independent of run order)."""
    digest = hashlib.sha1(f"{model}|{dataset}|{int(index)}|{mode}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def item_seed(seed: int, key: Key) -> int:
    """Per-key seed in ``[0, 2**31)`` derived from the run seed (order/shard independent)."""
    digest = hashlib.sha1(("|".join(map(str, key)) + f"#{int(seed)}").encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def select_items(items: Sequence[WorkItem], *, limit: int | None = None, shard: str | tuple[int, int] | None = None) -> list[WorkItem]:
    """Apply ``--limit`` then ``--shard``.

    ``limit`` keeps the first ``limit`` samples (by index) of every (model, dataset, mode) cell, so
    the shards of a limited run still partition the same limited set.
    """
    i, n = parse_shard(shard)
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {limit}")
    cells: dict[tuple[str, str, str], list[WorkItem]] = {}
    for it in items:
        cells.setdefault((it.model, it.dataset, it.mode), []).append(it)
    out: list[WorkItem] = []
    for cell_key in cells:  # keep the caller's cell order
        cell = sorted(cells[cell_key], key=lambda it: it.index)
        seen: set[int] = set()
        uniq = []
        for it in cell:
            if it.index in seen:
                raise DataError(f"duplicate sample index {it.index} in cell {cell_key}")
            seen.add(it.index)
            uniq.append(it)
        if limit is not None:
            uniq = uniq[:limit]
        out.extend(it for it in uniq if shard_of(it.model, it.dataset, it.index, it.mode, n) == i)
    return out


def items_from_benchmark(
    records: Iterable[Mapping[str, Any]],
    samples: Sequence[Sample],
    *,
    mode: str,
    model: str | None = None,
    extra: Mapping[str, Any] | None = None,
    raw_answers: Mapping[tuple[str, str, int], str] | None = None,
    relabel: bool = False,
    where: Sequence[str] | None = None,
    data_root: str | None = None,
) -> list[WorkItem]:
    """Work items of one benchmark split (records in the MedGround-Bench schema).

    A record names a sample by ``(dataset, index)`` (the dataset name or an alias, resolved by
    :func:`medfocus.datasets.medground.record_dataset`). The attributed answer is what the model itself
    generated on the original image: its full text from ``raw_answers[(model, dataset, index)]``
    (e.g. :func:`raw_answers_for_split`; for step-by-step mode this is the whole rationale), else the
    record's ``prediction_{mode}`` (the public schema stores the parsed Yes/No there), else the
    ground-truth answer (``answer_source="ground_truth"``). Records of other models are skipped when
    ``model`` is given (the record's ``model`` field is used otherwise).

    Args:
        relabel: take every record (of any model) as work of ``model``, an explicit choice
            (``medfocus attribute --relabel-split-model``): an answer the split recorded is then
            ``answer_source="split_other_model"`` and each record keeps ``split_model`` (the model the
            split names, ``None`` when it names none), so it never reads as ``model``'s own answer.
        where: ``where[i]`` names ``records[i]`` in errors (e.g. ``"benchmark file F record 3"``).
        data_root: the data root the samples were loaded from, named in errors.

    ``(dataset, index)`` does not identify a sample (an overwritten film, a row inserted into the
    annotations, another ``--data-root``), so every item keeps what its record says about the sample its
    answer was given to (:attr:`WorkItem.split_sample`, :func:`split_record_identity`), and
    :func:`check_split_items` (the ``attribute`` command before any model loads; :func:`run_grid`) refuses
    items whose sample is not that one.

    Raises:
        DataError: a record names a sample that ``samples`` does not contain (naming the record, its
            index, the dataset's size and the data root), or holds a malformed ``sample_fingerprint``.
        ConfigError: ``relabel`` without ``model``.
    """
    from medfocus.datasets.medground import check_sample_index, record_dataset

    if relabel and model is None:
        raise ConfigError("items_from_benchmark(relabel=True) needs the model the records are relabelled to")
    by_key = {(s.dataset, int(s.index)): s for s in samples}
    sizes: dict[str, int] = {}
    for s in samples:
        sizes[s.dataset] = sizes.get(s.dataset, 0) + 1
    items: list[WorkItem] = []
    for i, rec in enumerate(records):
        rec_model = str(rec.get("model", model or ""))
        if model is not None and not relabel and rec.get("model") not in (None, model):
            continue
        loc = where[i] if where is not None else f"benchmark record {rec.get('dataset')!r}#{rec.get('index')!r}"
        key = (record_dataset(str(rec["dataset"])), check_sample_index(rec["index"], where=loc))
        sample = by_key.get(key)
        if sample is None:
            n = sizes.get(key[0], 0)
            root = f" under data root {data_root}" if data_root else ""
            raise DataError(f"{loc}: index {key[1]} is out of range for dataset {key[0]!r}, which has {n} samples{root}"
                            + (f" (indices 0..{n - 1})" if n else "")
                            + "; the index is the sample's position in the dataset loader's output (wrong --data-root, "
                              "or a split built on other data?)")
        pred = rec.get(f"prediction_{mode}")
        raw = (raw_answers or {}).get((str(rec.get("model", model)), key[0], key[1]))
        if isinstance(raw, str) and raw.strip():
            answer: str | None = raw.strip()
        else:
            answer = pred.strip() if isinstance(pred, str) and pred.strip() else None
        ex = dict(extra or {})
        if "editor" in rec:
            ex.setdefault("editor", rec["editor"])
        source = "split" if answer else "ground_truth"
        if relabel:
            ex["split_model"] = rec.get("model")
            if answer and rec.get("model") != model:
                source = "split_other_model"
        stored = split_record_identity(rec, where=loc)
        items.append(WorkItem(model=model or rec_model, dataset=sample.dataset, mode=mode, sample=sample, answer=answer,
                              answer_source=source, extra=ex,
                              split_sample={"where": loc, "stored": stored} if stored else None))
    return items


def _as_boxes(value: Any) -> Any:
    """A record's ``boxes`` as the fingerprint stores them (lists of floats); a malformed value as it is
    (it then differs from the sample's boxes and is reported, never coerced)."""
    try:
        return [[float(v) for v in b] for b in value]
    except (TypeError, ValueError):
        return value


def split_record_identity(record: Mapping[str, Any], *, where: str = "benchmark record") -> dict[str, Any]:
    """What a benchmark record says about the sample its answers were given to, as fingerprint fields
    (:data:`~medfocus.io.fingerprint.IDENTITY_FIELDS`).

    A record written by ``bench build`` carries ``sample_fingerprint`` (the film's path, size and SHA-256,
    finding, ground-truth answer, boxes, question: :func:`medfocus.bench.build.make_record`): those fields.
    A record without it (the public MedGround-Bench schema: ``answer`` only; a split written before
    records carried it) gives what it does hold: ``answer`` as ``gt_answer`` (read by
    :func:`~medfocus.datasets.medground.normalize_yes_no`, as :func:`~medfocus.datasets.medground.join_records`
    does), ``attribute`` as ``finding``, ``question``, ``boxes`` as ``gt_boxes``; empty when it holds none.

    Raises:
        DataError: ``sample_fingerprint`` is present but not an object (naming ``where``).
    """
    from medfocus.datasets.medground import normalize_yes_no

    fp = record.get(FINGERPRINT_FIELD)
    if fp is not None:
        if not isinstance(fp, Mapping):
            raise DataError(f"{where}: field {FINGERPRINT_FIELD!r} must be an object with {list(IDENTITY_FIELDS)}, "
                            f"got {type(fp).__name__}")
        return {k: fp[k] for k in IDENTITY_FIELDS if k in fp}
    out: dict[str, Any] = {}
    if record.get("answer") is not None:
        out["gt_answer"] = normalize_yes_no(record["answer"]) or record["answer"]
    if record.get("attribute") is not None:
        out["finding"] = record["attribute"]
    if record.get("question") is not None:
        out["question"] = record["question"]
    if record.get("boxes") is not None:
        out["gt_boxes"] = _as_boxes(record["boxes"])
    return out


def check_split_items(items: Sequence[WorkItem], *, data_root: str | Path | None = None,
                      fingerprints: Mapping[tuple, Mapping[str, Any]] | None = None) -> None:
    """Refuse items of a benchmark split whose record was built on another sample than the one now at its
    ``(dataset, index)``: the split's answer is the model's answer to the film the split was built on, and
    attributing it on another film would credit the model with an answer it never gave to that film.

    Compares each item's :attr:`WorkItem.split_sample` (the fields its record holds) with the item's
    current :meth:`WorkItem.fingerprint`, field by field (the film by size and SHA-256, wherever it lies:
    the same bytes under a moved data root are the same film;
    :func:`~medfocus.io.fingerprint.fingerprint_differences`). Items without ``split_sample`` pass.
    ``fingerprints``: the items' fingerprints when already computed (:func:`run_grid`); otherwise each
    film is hashed here (once per process: :func:`~medfocus.io.fingerprint.file_sha256` caches it, so the
    run that follows does not read it again).

    Raises:
        DataError: naming the split file(s), every such record (model, dataset, index, mode, where) and what
            changed (stored -> now), and the remedies (rebuild the split with ``medfocus bench build``, or
            point ``--data-root`` at the data it was built on).
    """
    checked = [it for it in items if it.split_sample]
    if not checked:
        return
    fps = fingerprints if fingerprints is not None else _fingerprints(checked, data_root, progress=False)
    conflicts: dict[tuple, list[str]] = {}
    files: set[str] = set()  # the split files of the refused records
    for it in checked:
        stored = it.split_sample["stored"]
        diffs = fingerprint_differences(stored, fps[it.key("")[:4]], fields=[k for k in stored if k != "image"])
        if diffs:
            conflicts.setdefault((*it.key("")[:4], tuple(diffs)), []).append(str(it.split_sample["where"]))
            if it.extra.get("bench_file"):
                files.add(str(it.extra["bench_file"]))
    if not conflicts:
        return
    root = f" under data root {data_root}" if data_root else ""
    n = sum(len(v) for v in conflicts.values())
    which = f"{n} benchmark records" if n > 1 else "a benchmark record"
    raise DataError(f"{which}{' of ' + ', '.join(sorted(files)) if files else ''} {'were' if n > 1 else 'was'} built on "
                    f"{'other samples than the ones' if n > 1 else 'another sample than the one'} now at "
                    f"{'their' if n > 1 else 'its'} (dataset, index){root} "
                    "(stored in the record -> now):\n" + describe_sample_conflicts(conflicts) +
                    "\nA split's answers are the model's answers to the films it was built on; nothing was attributed. "
                    "Rebuild the split on this data with `medfocus bench build`, or point --data-root at the data "
                    "it was built on.")


def raw_answers_for_split(records_path: str | Path) -> dict[tuple[str, str, int], str]:
    """The model's full generated answers on the original images of a benchmark split, from the split
    log ``<mode>.log.jsonl`` that ``medfocus bench build`` writes next to ``<mode>.json``
    (``{(model, dataset, index): text}``; empty when there is no log, e.g. the public MedGround files)."""
    p = Path(records_path)
    log = p.with_name(p.stem + ".log.jsonl")
    if not log.is_file():
        return {}
    from medfocus.bench import read_log

    out: dict[tuple[str, str, int], str] = {}
    for (m, ds, idx), row in read_log(log).items():
        text = (row.get("raw") or {}).get("original")
        if isinstance(text, str) and text.strip():
            out[(str(m), str(ds), int(idx))] = text
    return out


def _read_image(path: str) -> np.ndarray:
    """``(H, W)`` uint8 image via :func:`medfocus.io.read_image`."""
    from medfocus.io import read_image

    img, _ = read_image(path)
    return img


class StoredSettingsError(ConfigError):
    """A result store holds results of the same keys computed with other method settings or another model
    (:func:`run_grid` refuses to serve or mix them); callers with their own way out (``medfocus demo --fresh``)
    catch this type."""


def _read_film(it: WorkItem, read_image: Callable[[str], np.ndarray], adapter: Any
               ) -> tuple[np.ndarray | None, Any, str | None, list[str]]:
    """Read and check one item's film: ``(image, orientation, error, warnings)``.

    ``error`` (a record's ``error`` text) when the film cannot be read, is not 2-D, differs in size from the
    ``image_size`` its dataset records (the frame of its expert boxes), or holds nothing the model can see
    (:func:`~medfocus.io.letterbox.check_film_content`). ``warnings``: the :class:`~medfocus.errors.DataWarning`
    messages reading and checking it raised (an all-black film, an EXIF rotation, a DICOM fallback), each once;
    they are shown as usual and also returned, so that the records keep them."""
    import warnings

    from medfocus.errors import DataWarning

    image, orientation, err = None, None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)  # also when an earlier read already showed it
        try:
            image = read_image(it.sample.image_path)
            if image.ndim != 2:
                raise DataError(f"{it.sample.image_path}: expected a 2-D grayscale image, got shape {image.shape}")
            W, H = it.sample.image_size
            if image.shape != (H, W):
                # the expert boxes and every saved map are in the recorded frame: a film of another
                # size would be scored against boxes drawn for a different image
                raise DataError(f"{it.sample.image_path}: the film is {image.shape[1]}x{image.shape[0]} (WxH) but "
                                f"dataset {it.dataset!r} sample #{it.index} records image_size [{W}, {H}], the frame "
                                "of its expert boxes; reload the dataset from the films")
            orientation = _film_orientation(it.sample.image_path)
        except Exception as exc:
            err = f"image read failed: {type(exc).__name__}: {exc}"
        if err is None:  # a film the model cannot see is refused before the model runs on it
            try:
                check_film_content(image, it.sample.image_path, *model_canvas(adapter))
            except DataError as exc:
                err = f"film refused: {exc}"
    for w in caught:  # re-issued under the caller's filters (the CLI shows each message once per command)
        try:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        except Warning as exc:  # a filter that makes warnings errors: the film's error, as when it was raised inside
            err = err or f"image read failed: {type(exc).__name__}: {exc}"
    return image, orientation, err, list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, DataWarning)))


def _film_orientation(path: str) -> Any:
    """The film's :class:`~medfocus.io.reader.FilmOrientation` (DICOM ``PatientOrientation``; the display
    convention for other formats, whose files are not opened again)."""
    from medfocus.io.reader import CONVENTIONAL_ORIENTATION, is_dicom, read_orientation

    return read_orientation(path) if is_dicom(path) else CONVENTIONAL_ORIENTATION


def _default_loader(name: str) -> Any:
    from medfocus.lvlm import load_lvlm

    return load_lvlm(name)


def _default_factory(name: str, params: Mapping[str, Any]) -> Any:
    from medfocus.attribution import get_method

    return get_method(name, **dict(params))


def _default_identity(name: str) -> dict[str, Any]:
    from medfocus.lvlm.loading import model_identity

    try:
        return model_identity(name)
    except Exception as exc:  # an unresolvable name: identified by the name alone (the load will fail loudly)
        log.debug("no identity for model %s: %s", name, exc)
        return {"name": name, "source": name, "fingerprint": None}


def _fingerprints(items: Sequence[WorkItem], root: str | Path | None, progress: bool) -> dict[tuple, dict[str, Any]]:
    """``{(model, dataset, index, mode): fingerprint}`` of every item (each film file hashed once)."""
    it_iter: Iterable[WorkItem] = items
    if progress:
        from tqdm.auto import tqdm

        # shown only when hashing takes a while (a large run's films on a slow disk)
        it_iter = tqdm(items, desc="fingerprint films", unit="sample", delay=2.0, leave=False, dynamic_ncols=True)
    return {it.key("")[:4]: to_jsonable(it.fingerprint(root)) for it in it_iter}


def _changed_samples(items: Sequence[WorkItem], methods: Iterable[str], get_record: Callable[[Key], Mapping[str, Any] | None],
                     fingerprints: Mapping[tuple, Mapping[str, Any]]) -> Iterable[tuple[WorkItem, str, Mapping[str, Any], tuple[str, ...]]]:
    """``(item, method, stored record, differences)`` for every stored record of ``items`` x ``methods`` whose
    sample fingerprint differs from the item's (or that has none): what a resumed run must not serve."""
    methods = list(methods)
    for it in items:
        now = fingerprints[it.key("")[:4]]
        for m in methods:
            rec = get_record(it.key(m))
            if rec is None:
                continue
            changed = fingerprint_differences(rec.get(FINGERPRINT_FIELD), now)
            if changed:
                yield it, m, rec, tuple(changed)


def _update_film_paths(items: Sequence[WorkItem], methods: Iterable[str], store: ResultStore, stale: set[Key]) -> None:
    """Re-append (same record, new ``image_path``) every stored record that this run serves but whose
    ``image_path`` is not where its film is now: a moved data root (the same bytes under the same name
    relative to the root, checked by the fingerprints before this runs). Otherwise the viewer, the report
    and ``evaluate --faithfulness`` would read the old path: a missing film, or another one put there."""
    methods = list(methods)
    for it in items:
        for m in methods:
            key = it.key(m)
            rec = store.get(key)
            if rec is not None and key not in stale and rec.get("image_path") != it.sample.image_path:
                store.append({**rec, "image_path": it.sample.image_path})


def _changed_samples_error(path: str | Path, conflicts: Mapping[tuple, Sequence[str]]) -> ConfigError:
    return changed_samples_error(path, conflicts, held="results computed", note=" (`medfocus demo`: --fresh starts over)")


def check_stored_samples(items: Sequence[WorkItem], methods: Iterable[str], stores: Iterable[str | Path], *,
                         data_root: str | Path | None = None) -> None:
    """Refuse, before anything starts, stored successful records of ``items`` x ``methods`` in the result
    files ``stores`` (missing ones skipped) that were computed on another sample or carry no fingerprint
    -- the check :func:`run_grid` makes on its own store, for a launcher about to start shard workers.

    Raises:
        ConfigError: naming the file, the sample keys and what changed (as :func:`run_grid`).
    """
    from medfocus.runner.store import load_results, record_key

    methods = list(methods)
    fps: dict[tuple, dict[str, Any]] | None = None
    for path in stores:
        if not Path(path).is_file():
            continue
        recs = {record_key(r): r for r in load_results(path, absolute_paths=False)}
        if fps is None:
            fps = _fingerprints(items, data_root, progress=False)
        conflicts: dict[tuple, list[str]] = {}
        for it, m, rec, changed in _changed_samples(items, methods, recs.get, fps):
            if not rec.get("error"):  # an error record holds no result: the run recomputes it
                conflicts.setdefault((*it.key("")[:4], changed), []).append(m)
        if conflicts:
            raise _changed_samples_error(path, conflicts)


def _method_settings(method: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    get = getattr(method, "settings", None)
    return to_jsonable(get() if callable(get) else dict(params))


def settings_differences(record: Mapping[str, Any], settings: Mapping[str, Any], identity: Mapping[str, Any],
                         ignore: Sequence[str] = ()) -> list[str]:
    """What differs between a stored record and this run: ``["grid: 2 (stored) -> 4 (now)", ...]``.

    Compares the record's ``settings`` (the method's full resolved settings, minus ``ignore``: settings
    that do not change results, such as ``batch_size``) and its ``model_identity`` (source and weight
    fingerprint). A record without ``settings`` (written before they were recorded) differs."""
    if "settings" not in record:
        return ["settings: not recorded (a record written before settings were stored)"]
    old, diffs = record.get("settings") or {}, []
    for k in sorted(set(old) | set(settings)):
        if k in ignore:
            continue
        a, b = old.get(k, "<unset>"), settings.get(k, "<unset>")
        if a != b:
            diffs.append(f"{k}: {a!r} (stored) -> {b!r} (now)")
    old_id = record.get("model_identity") or {}
    for k in ("source", "fingerprint"):
        if old_id.get(k) != identity.get(k):
            diffs.append(f"model {k}: {old_id.get(k)!r} (stored) -> {identity.get(k)!r} (now)")
    return diffs


def _default_boxes(heatmap: np.ndarray) -> list:
    from medfocus.evaluation import heatmap_to_boxes

    return [list(b) for b in heatmap_to_boxes(heatmap)]


def _split_extras(extras: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Small extras stay in the JSON record; big arrays go to the ``.npz`` as ``extra_<name>``."""
    inline: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for k, v in (extras or {}).items():
        if hasattr(v, "detach") and hasattr(v, "cpu"):
            v = v.detach().cpu().numpy()
        if isinstance(v, np.ndarray) and v.size > MAX_INLINE_ARRAY:
            arrays[f"extra_{k}"] = v
        else:
            inline[str(k)] = to_jsonable(v)
    return inline, arrays


def _parse(text: str | None) -> str | None:
    """The yes/no a text says (:func:`medfocus.lvlm.parse_yes_no`), ``None`` when it says neither."""
    if not text:
        return None
    from medfocus.lvlm.answers import parse_yes_no

    return parse_yes_no(text)


def _generate(adapter: Any, image: np.ndarray, it: WorkItem) -> dict[str, Any]:
    """The model's greedy answer to the item's question (mode's token budget, :func:`medfocus.lvlm.generate_answers`).

    Raises:
        DataError: the model generated nothing to attribute.
    """
    from medfocus.lvlm.generation import generate_answers

    g = generate_answers(adapter, [image], [it.sample.question], it.mode)[0]
    text = (g.text or "").strip()
    if not text:
        raise DataError(f"the model generated an empty answer to {it.question!r}; nothing to attribute")
    return {"text": text, "parsed": g.answer}


def _token_map_arrays(tok: np.ndarray, to_original: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-token maps as stored: float16 ``token_heatmaps`` ``(T, H0, W0)`` in original pixels, or, above
    :data:`MAX_TOKEN_MAP_VALUES` values, ``token_heatmaps_lowres`` ``(T, h, w)``: the same frame
    area-averaged to a longer side of :data:`LOWRES_TOKEN_SIDE` px (a step-by-step rationale on a 2000-px
    film would otherwise take GBs). ``to_original`` maps each ``tok[t]`` (token grid / canvas) to original
    pixels first, one token at a time (then ``tok`` is the method's ``token_maps_lowres``)."""
    import cv2

    if len(tok) == 0:
        return {}
    conv = to_original or (lambda m: m)
    first = np.asarray(conv(tok[0]), np.float32)
    H, W = first.shape
    if len(tok) * H * W <= MAX_TOKEN_MAP_VALUES:
        return {"token_heatmaps": np.stack([first] + [conv(t) for t in tok[1:]]).astype(np.float16)}
    s = LOWRES_TOKEN_SIDE / max(H, W)
    w, h = max(1, round(W * s)), max(1, round(H * s))
    small = lambda m: cv2.resize(np.nan_to_num(np.asarray(m, np.float32)), (w, h), interpolation=cv2.INTER_AREA)  # noqa: E731
    return {"token_heatmaps_lowres": np.stack([small(first)] + [small(conv(t)) for t in tok[1:]]).astype(np.float16)}


def _seed_everything(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    try:
        import torch

        torch.manual_seed(s)
    except ImportError:  # pragma: no cover
        pass


def load_checked(load_model: Callable[[str], Any], name: str, methods: Iterable[Any],
                 films: Mapping[str, tuple[int, int]] | None = None) -> Any:
    """Load model ``name`` with ``load_model`` and check the methods' model-dependent settings against it
    (:meth:`~medfocus.attribution.base.Method.check_params`: layer / head indices) and against the ``films``
    to attribute (``{image path: (width, height)}``, :meth:`~medfocus.attribution.base.Method.check_images`:
    a perturbation grid finer than a film's content on the canvas), before any sample runs.
    The one place ``attribute``, ``explain`` and the demo do this.

    Raises:
        ModelError: the model could not be loaded (a loader's own :class:`MedfocusError` passes unchanged).
        ConfigError: a setting the model does not have (naming method, setting, value and valid range).
    """
    try:
        adapter = load_model(name)
    except MedfocusError:
        raise
    except Exception as exc:
        raise ModelError(f"model {name!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
    for m in methods:
        check = getattr(m, "check_params", None)  # third-party method objects may not have the hook
        if check is not None:
            check(adapter)
        check_films = getattr(m, "check_images", None)
        if check_films is not None and films:
            check_films(adapter, films)
    return adapter


def check_films_before_load(name: str, methods: Iterable[Any], films: Mapping[str, tuple[int, int]]) -> None:
    """The film-dependent settings (:meth:`~medfocus.attribution.base.Method.check_images`: a perturbation
    grid finer than a film's content on the canvas) checked *before* model ``name`` loads, where its canvas is
    known without loading (:func:`medfocus.lvlm.loading.known_canvas`); otherwise :func:`load_checked` checks
    them right after the load.

    Raises:
        ConfigError: as :meth:`~medfocus.attribution.base.Method.check_images`.
    """
    from types import SimpleNamespace

    from medfocus.lvlm.loading import known_canvas

    canvas = known_canvas(name) if films else None
    if canvas is None:
        return
    model = SimpleNamespace(name=name, canvas_size=canvas)  # all check_images reads of an adapter
    for m in methods:
        check = getattr(m, "check_images", None)
        if check is not None:
            check(model, films)


#: Exit status of ``medfocus attribute`` / ``explain`` when no record of the run holds a result
#: (:attr:`RunSummary.all_failed`); 1 is a refused run, 2 a usage error.
EXIT_ALL_FAILED = 3


@dataclass
class RunSummary:
    """What :func:`run_grid` did."""

    total: int = 0
    skipped: int = 0
    done: int = 0
    errors: int = 0
    seconds: float = 0.0
    error_keys: list[Key] = field(default_factory=list)
    #: requested keys whose record in the store holds a result (no error) when the run ends, served or computed
    succeeded: int = 0

    @property
    def all_failed(self) -> bool:
        """Nothing of the run holds a result: keys were requested and every one's record carries an error
        (computed now or served from the store). The CLI exits with :data:`EXIT_ALL_FAILED` then."""
        return self.total > 0 and self.succeeded == 0

    def __str__(self) -> str:
        return (
            f"{self.done} computed, {self.skipped} already in the store, {self.errors} errors "
            f"(of {self.total}) in {self.seconds:.1f}s"
        )


def run_grid(
    items: Sequence[WorkItem],
    methods: Sequence[str] | Mapping[str, Mapping[str, Any]],
    store: ResultStore,
    *,
    load_model: Callable[[str], Any] | None = None,
    make_method: Callable[[str, Mapping[str, Any]], Any] | None = None,
    read_image: Callable[[str], np.ndarray] | None = None,
    heatmap_to_boxes: Callable[[np.ndarray], list] | None = None,
    seed: int = 0,
    retry_errors: bool = False,
    save_heatmaps: bool = True,
    save_token_maps: bool = False,
    progress: bool = True,
    release_model: bool = True,
    identify_model: Callable[[str], Mapping[str, Any]] | None = None,
    faithfulness: Any | None = None,
    data_root: str | Path | None = None,
    overwrite: bool = False,
) -> RunSummary:
    """Run every method on every work item, appending one record per key to ``store``.

    Args:
        items: work items (already limited/sharded, see :func:`select_items`).
        methods: method names, or ``{name: params}`` passed to the method factory.
        store: the result store; keys it already holds are skipped (resume).
        load_model: ``name -> LVLMAdapter`` (default :func:`medfocus.lvlm.load_lvlm`), called once per model.
        make_method: ``(name, params) -> method`` (default :func:`medfocus.attribution.get_method`), called
            once per method for the whole run.
        read_image: ``path -> (H, W) uint8`` (default :func:`medfocus.io.read_image`).
        heatmap_to_boxes: ``(H, W) heatmap -> boxes`` (default :func:`medfocus.evaluation.heatmap_to_boxes`
            with its defaults), stored as ``heatmap_boxes`` (display); ``pred_boxes`` is set only for methods
            that return boxes (or when heatmaps are not saved), so the evaluation derives boxes from the
            heatmap with its own parameters.
        seed: run seed; RNGs are re-seeded per key with :func:`item_seed`.
        retry_errors: recompute keys whose stored record has an error (the new record supersedes it).
        save_heatmaps: write each heatmap to a compressed ``.npz`` (key ``heatmap``, float32 ``(H0, W0)``).
        save_token_maps: also store per-answer-token maps (``token_heatmaps``, float16 ``(T, H0, W0)``; above
            :data:`MAX_TOKEN_MAP_VALUES` values ``token_heatmaps_lowres``, see :func:`_token_map_arrays`).
        progress: show a tqdm bar with ETA.
        release_model: drop the model after its group (frees memory before the next model loads).
        faithfulness: a :class:`medfocus.evaluation.faithfulness.FaithfulnessConfig` to add deletion /
            insertion curves (``deletion_auc``, ``insertion_auc``, ``faithfulness``) to every record with a
            heatmap; ``None`` (default) skips them. The references are scored once per sample.
        identify_model: ``name -> identity`` of a model's weights without loading it (default
            :func:`medfocus.lvlm.loading.model_identity`).
        data_root: the dataset root; fingerprints store image paths relative to it (so the same films under
            a moved root still resume).
        overwrite: recompute stored records whose sample changed (or that carry no fingerprint) instead of
            refusing; the new records supersede them.

    Settings are part of a result's identity. Every record stores ``settings`` (the method's full
    resolved settings, :meth:`~medfocus.attribution.base.Method.settings`) and ``model_identity``.
    Before anything runs, the stored records of the requested keys are compared with this run: a
    successful record computed with other settings or other weights makes the run **refuse** with a
    :class:`ConfigError` naming the differing settings (write the new settings to a new ``--out``; a
    store holds one setting per method and model), and an *error* record computed with other settings
    is recomputed (a corrected rerun supersedes it). Settings listed in the method's
    ``runtime_settings`` (``batch_size``, ``cache``) do not change results and are not compared.

    The sample is part of a result's identity too: every record stores ``sample_fingerprint``
    (:meth:`WorkItem.fingerprint`: image path, size and SHA-256 of the file, finding, expert boxes,
    question, answer text and source). A stored successful record whose fingerprint differs from the
    current sample's (an index that now names another film, another ``--data-root``, a film overwritten
    in place, changed boxes) or that has no fingerprint makes the run **refuse** before any model loads
    (:class:`ConfigError` naming the samples and what changed), unless ``overwrite``, which recomputes
    them; an *error* record of another sample is recomputed.

    Returns:
        a :class:`RunSummary`.

    Items with ``answer_source="model"`` get the model's greedy answer generated once (before their
    methods); ``answer`` is then that text and ``answer_parsed`` its yes/no. A method that uses the default
    synthetic reference pool (``uses_synthetic_pool``) on a film that is not synthetic gets the record field
    ``reference_pool_warning`` and the run one warning (printed above the progress bar, else logged).

    Record fields: ``model, dataset, index, mode, method, attribute, question, answer, answer_source,
    answer_parsed, gt_answer, gt_boxes, image_size, image_path, sample_fingerprint, pred_boxes, unparseable, heatmap_boxes,
    heatmap_path, has_heatmap, n_forward, n_backward, seconds, wall_seconds, seed, extras, shared_pass, error,
    traceback, settings, model_identity`` (+ ``deletion_auc, insertion_auc, faithfulness`` with ``faithfulness``) plus the
    item's ``extra`` mapping (``unparseable``: the method's box text could not be read, :mod:`medfocus.lvlm.box_text`).
    """
    from medfocus.attribution.suite import attribute_many, format_exception

    method_params: dict[str, dict[str, Any]]
    if isinstance(methods, Mapping):
        method_params = {str(k): dict(v or {}) for k, v in methods.items()}
    else:
        method_params = {str(m): {} for m in methods}
    if not method_params:
        raise ConfigError("no attribution method selected")
    load_model = load_model or _default_loader
    make_method = make_method or _default_factory
    read_image = read_image or _read_image
    to_boxes = heatmap_to_boxes or _default_boxes

    # Every method is built (and so its settings validated) before any model loads: a bad setting is
    # one ConfigError now, not an error record on every sample after minutes of model loading.
    method_objs: dict[str, Any] = {}
    for name in method_params:
        try:
            method_objs[name] = make_method(name, method_params[name])
        except MedfocusError:
            raise
        except Exception as exc:
            raise ConfigError(f"method {name!r} could not be built: {type(exc).__name__}: {exc}") from exc

    settings = {m: _method_settings(method_objs[m], method_params[m]) for m in method_params}
    ignore = {m: tuple(getattr(method_objs[m], "runtime_settings", ())) for m in method_params}
    identify = identify_model or _default_identity
    identities = {name: to_jsonable(dict(identify(name))) for name in dict.fromkeys(it.model for it in items)}
    fingerprints = _fingerprints(items, data_root, progress)
    check_split_items(items, data_root=data_root, fingerprints=fingerprints)  # before any model loads
    stale: set[Key] = set()  # error records of other settings or samples (and, with overwrite, changed samples): recomputed
    conflicts: dict[tuple[str, str, tuple[str, ...]], int] = {}
    sample_conflicts: dict[tuple, list[str]] = {}
    for it, m, rec, changed in _changed_samples(items, method_params, store.get, fingerprints):
        if overwrite or rec.get("error"):
            stale.add(it.key(m))
        else:
            sample_conflicts.setdefault((*it.key("")[:4], changed), []).append(m)
    for it in items:
        for m in method_params:
            rec = store.get(it.key(m))
            if rec is None:
                continue
            diffs = settings_differences(rec, settings[m], identities[it.model], ignore[m])
            if not diffs:
                continue
            if rec.get("error"):
                stale.add(it.key(m))
            else:
                conflicts[(it.model, m, tuple(diffs))] = conflicts.get((it.model, m, tuple(diffs)), 0) + 1
    if conflicts:
        lines = [f"  model {mo!r}, method {m!r} ({n} record{'s' if n > 1 else ''}): {'; '.join(d)}"
                 for (mo, m, d), n in sorted(conflicts.items())]
        raise StoredSettingsError(f"{store.path} already holds results computed with other settings:\n" + "\n".join(lines) +
                          "\nA result store keeps one setting per method and model; write this run to a new --out "
                          "(or move the old results away).")
    if sample_conflicts:
        raise _changed_samples_error(store.path, sample_conflicts)
    _update_film_paths(items, method_params, store, stale)

    def is_done(key: Key) -> bool:
        return key not in stale and store.is_done(key, retry_errors=retry_errors)

    summary = RunSummary(total=len(items) * len(method_params))
    t_start = time.perf_counter()
    todo = [it for it in items if any(not is_done(it.key(m)) for m in method_params)]
    summary.skipped = sum(is_done(it.key(m)) for it in items for m in method_params)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=summary.total, initial=summary.skipped, desc="attribute", unit="run", dynamic_ncols=True)

    faith_refs: dict[tuple, Any] = {}  # reference curves and curve ends, once per sample

    def get_method_obj(name: str) -> Any:
        return method_objs[name]

    # Group by model, keeping first-appearance order.
    groups: dict[str, list[WorkItem]] = {}
    for it in todo:
        groups.setdefault(it.model, []).append(it)

    answers: dict[tuple, dict[str, Any]] = {}  # generated answers, per item key (without the method)
    film_warnings: dict[tuple, list[str]] = {}  # what reading and checking each film warned about
    warned_pool: set[str] = set()

    def record_base(it: WorkItem, method: str) -> dict[str, Any]:
        gen = answers.get(it.key("")[:4], {})
        return {
            "model": it.model,
            "dataset": it.dataset,
            "index": it.index,
            "mode": it.mode,
            "method": method,
            "attribute": it.sample.attribute,
            "question": it.question,
            "answer": gen.get("text", it.answer_text),
            "answer_source": it.answer_source,
            "answer_parsed": gen.get("parsed", _parse(gen.get("text", it.answer_text))),
            "gt_answer": it.sample.answer,
            "gt_boxes": [list(b) for b in it.sample.boxes],
            "image_size": list(it.sample.image_size),
            "image_path": it.sample.image_path,
            FINGERPRINT_FIELD: fingerprints[it.key("")[:4]],
            # kept with the results (the viewer shows them), not only printed once on a console nobody kept
            "film_warnings": film_warnings.get(it.key("")[:4], []),
            **dict(it.extra),
            "settings": settings[method],
            "model_identity": identities[it.model],
        }

    def write_error(it: WorkItem, method: str, err: str, tb: str | None, wall: float, announce: bool = False) -> None:
        if announce:  # the film named too: a key's index says nothing to someone looking for the file
            if bar is not None:
                bar.write(f"[error] {it.key(method)} ({it.sample.image_path}): {err}")
            else:
                log.warning("error on %s (%s): %s", it.key(method), it.sample.image_path, err)
        rec = record_base(it, method)
        rec.update(pred_boxes=None, heatmap_path=None, extras={}, error=err, traceback=tb, wall_seconds=wall)
        store.append(rec)
        summary.errors += 1
        summary.error_keys.append(it.key(method))

    try:
        for model_name, group in groups.items():
            if bar is not None:
                bar.set_description(f"load {model_name}")
            # A model that cannot be loaded fails the run (non-zero exit), it is not a failing sample: no
            # error records, which a rerun without --retry-errors would serve as "already in the store".
            adapter = load_checked(load_model, model_name, method_objs.values(),
                                   films={it.sample.image_path: tuple(it.sample.image_size) for it in group})
            for it in group:
                pending = [m for m in method_params if not is_done(it.key(m))]
                if not pending:
                    continue
                image, orientation, img_err, film_warnings[it.key("")[:4]] = _read_film(it, read_image, adapter)
                if img_err is None and it.answer_text is None:  # the model's own answer, generated once per item
                    try:
                        if bar is not None:
                            bar.set_description(f"{model_name} {it.mode} generate")
                        answers[it.key("")[:4]] = _generate(adapter, image, it)
                    except Exception as exc:
                        img_err = f"answer generation failed: {type(exc).__name__}: {exc}"
                if img_err is not None:
                    for m in pending:  # a refused film is said once on the console (its records all carry it)
                        write_error(it, m, img_err, None, 0.0, announce=img_err.startswith("film refused") and m == pending[0])
                        if bar is not None:
                            bar.update(1)
                    continue
                objs = {m: get_method_obj(m) for m in pending}
                seeds = {m: item_seed(seed, it.key(m)) for m in objs}
                if bar is not None:
                    bar.set_description(f"{model_name} {it.mode} {len(objs)} methods")
                # One prepared sample and shared passes for all the item's methods; the global RNGs are
                # re-seeded per key before each piece of a method's own work, as when methods ran one by one.
                text = answers[it.key("")[:4]]["text"] if it.answer_text is None else it.answer_text
                results = attribute_many(adapter, image, it.question, text, objs, errors="return", orientation=orientation,
                                         before_method=lambda m: _seed_everything(seeds[m])) if objs else {}
                for m, res in results.items():
                    key = it.key(m)
                    t0 = time.perf_counter()
                    if isinstance(res, (KeyboardInterrupt, SystemExit)):
                        raise res
                    if isinstance(res, BaseException):
                        write_error(it, m, f"{type(res).__name__}: {res}", format_exception(res), 0.0, announce=True)
                        if bar is not None:
                            bar.update(1)
                        continue
                    s = seeds[m]
                    own = float(getattr(res, "seconds", 0.0) or 0.0)
                    try:
                        rec = record_base(it, m)
                        if getattr(objs[m], "uses_synthetic_pool", False) and not it.is_synthetic:
                            from medfocus.concepts.reference import SYNTHETIC_POOL_WARNING

                            rec["reference_pool_warning"] = SYNTHETIC_POOL_WARNING
                            if not warned_pool:  # once per run; every affected record carries the field
                                warned_pool.add(m)
                                msg = (f"{m} on films that are not from the synthetic world (dataset {it.dataset!r}, first "
                                       f"{Path(it.sample.image_path).name}): {SYNTHETIC_POOL_WARNING}")
                                if bar is not None:
                                    bar.write(f"[warning] {msg}")
                                else:
                                    log.warning("%s", msg)
                        arrays: dict[str, np.ndarray] = {}
                        heat = getattr(res, "heatmap", None)
                        if heat is not None:
                            heat = np.asarray(heat, dtype=np.float32)
                            if heat.shape != image.shape:
                                raise DataError(f"method {m!r} returned a heatmap of shape {heat.shape}; expected the image's {image.shape}")
                            arrays["heatmap"] = heat
                        boxes = getattr(res, "boxes", None)
                        heat_boxes = None
                        if boxes is not None:  # box-producing methods (prompting, MedFocus): the boxes are the prediction
                            pred = [list(map(float, b)) for b in boxes]
                        elif heat is not None:
                            # Heatmap methods: the evaluation derives boxes from the stored heatmap with *its*
                            # parameters (so `medfocus evaluate --q ...` applies); the default-parameter boxes are
                            # kept for display as heatmap_boxes, and are the prediction when no heatmap is saved.
                            heat_boxes = to_boxes(heat)
                            pred = None if save_heatmaps else heat_boxes
                        else:
                            pred = []
                        tok = getattr(res, "token_heatmaps", None)
                        low = (getattr(res, "extras", None) or {}).get("token_maps_lowres")
                        if save_token_maps and tok is not None:
                            arrays.update(_token_map_arrays(np.asarray(tok, dtype=np.float32)))
                        elif save_token_maps and low is not None and hasattr(adapter, "prepare"):
                            # the method kept them on the token grid / canvas (too big in original pixels):
                            # bring them to the film's frame one at a time, at the stored low resolution
                            chat = adapter.prepare(image, it.question, text)
                            arrays.update(_token_map_arrays(np.asarray(low), to_original=lambda m: adapter.grid_to_original(m, chat)))
                        extras = dict(getattr(res, "extras", None) or {})
                        # what the method shared depends on which methods ran with it (a resumed item may run
                        # fewer): a top-level field like the timings, not part of the result's extras
                        shared_note = extras.pop("shared_pass", None)
                        inline, big = _split_extras(extras)
                        arrays.update(big)
                        rec.update(
                            pred_boxes=pred,
                            # box text no rule could read (prompting): not an empty prediction
                            unparseable=inline.get("box_text") == "unparseable",
                            heatmap_boxes=heat_boxes,
                            heatmap_path=store.save_arrays(key, **arrays) if (save_heatmaps and arrays) else None,
                            n_forward=int(getattr(res, "n_forward", 0) or 0),
                            n_backward=int(getattr(res, "n_backward", 0) or 0),
                            seconds=own,
                            wall_seconds=own + time.perf_counter() - t0,
                            seed=s,
                            extras=inline,
                            shared_pass=to_jsonable(shared_note),
                            error=None,
                            traceback=None,
                        )
                        rec["has_heatmap"] = heat is not None
                        if faithfulness is not None and heat is not None:
                            from medfocus.evaluation.faithfulness import record_faithfulness
                            from medfocus.lvlm.scoring import score_chat

                            rec.update(record_faithfulness(adapter, image, rec, heat, faithfulness, faith_refs, scorer=score_chat))
                        store.append(rec)
                        summary.done += 1
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as exc:
                        write_error(it, m, f"{type(exc).__name__}: {exc}", format_exception(exc), own + time.perf_counter() - t0, announce=True)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(errors=summary.errors)
            if release_model:
                adapter = None
                gc.collect()
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - t_start
    summary.succeeded = sum(1 for it in items for m in method_params
                            if (rec := store.get(it.key(m))) is not None and not rec.get("error"))
    return summary
