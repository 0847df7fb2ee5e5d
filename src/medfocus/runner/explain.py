"""Explain any chest X-ray: every attribution method on the user's own films, and the interactive viewer.

``explain(["film.dcm"], finding="cardiomegaly", out="runs/x")`` reads each film (DICOM / PNG / JPEG /
TIFF, no dataset layout), asks the model the paper's question about the finding (or the user's own
question) in the chosen mode, takes the model's own greedy answer (or the ``answer`` given), runs every
selected attribution method on it through the experiment runner, and writes

* ``OUT/predictions.jsonl`` + ``OUT/predictions_heatmaps/`` -- the normal record schema (dataset
  ``"files"``, index = position of the film in the list, per-token maps stored), and
* ``OUT/explain.html`` -- the self-contained viewer (:mod:`medfocus.report.viewer`),
* ``OUT/explain.json`` -- the run's settings (a rerun with the same settings resumes; a rerun asking
  for a subset of the stored methods, everything else the same, is served from the stored records
  without the model and leaves ``explain.json`` as it is; other settings in the same folder are
  refused unless ``overwrite``, which replaces the stored run and recomputes everything).

The films have no ground truth: records carry ``gt_answer: null`` and the expert boxes only when given.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medfocus.errors import ConfigError, DataError
from medfocus.types import SUFFIXES, Box, Sample, question_stem

log = logging.getLogger(__name__)

#: Dataset key of explained films in the records.
DATASET = "files"

DEMO_NOTE = ("The demo model was trained only on the synthetic chest X-ray world: its answers on real films "
             "mean nothing. What a real film checks is the pipeline: reading the file, the letterbox geometry, "
             "every method's map in original pixels and the anatomy transfer.")


@dataclass
class ExplainResult:
    """What :func:`explain` produced.

    Attributes:
        out: the output folder.
        html: the viewer, ``out/explain.html``.
        records: the result records (one per film and method; ``heatmap_path`` absolute).
        answers: per film (in input order), ``{"image", "label", "answer", "answer_parsed", "answer_source"}``
            (``label``: :func:`film_labels`, the name the viewer shows).
        summary: the runner's :class:`~medfocus.runner.grid.RunSummary`.
        warnings: the records' reference-pool warnings, once each.
        served_from: the stored run's methods (sorted) when this run asked for a subset of them and was
            served from its records (:func:`stored_subset`); ``None`` otherwise.
    """

    out: Path
    html: Path
    records: list[dict[str, Any]]
    answers: list[dict[str, Any]]
    summary: Any = None
    warnings: list[str] = field(default_factory=list)
    served_from: list[str] | None = None

    def record(self, image: int, method: str) -> dict[str, Any]:
        """The record of film ``image`` (its position in the input) and ``method``; ``KeyError`` when absent."""
        for r in self.records:
            if int(r["index"]) == image and r["method"] == method:
                return r
        raise KeyError((image, method))

    def heatmap(self, image: int, method: str) -> np.ndarray | None:
        """The ``(H0, W0)`` float32 map of film ``image`` and ``method`` (``None``: failed or box-only)."""
        r = self.record(image, method)
        if not r.get("heatmap_path"):
            return None
        with np.load(r["heatmap_path"]) as z:
            return z["heatmap"] if "heatmap" in z.files else None


def film_labels(paths: Sequence[str | Path]) -> list[str]:
    """One label per film for the CLI lines and the viewer: the file name, or, where several films share it,
    the shortest path suffix that tells them apart (``a/film.png``, ``b/film.png``); the same file given
    twice gets its position on the command line (``film.png #0``, ``film.png #2``)."""
    parts = [Path(p).parts for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = [Path(*pp[-d:]).as_posix() for pp, d in zip(parts, depth)]
        clash = [i for i, lab in enumerate(labels) if labels.count(lab) > 1 and depth[i] < len(parts[i])]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    return [f"{Path(p).name} #{i}" if labels.count(lab) > 1 else lab for i, (p, lab) in enumerate(zip(paths, labels))]


def parse_box(spec: str) -> Box:
    """``"x1,y1,x2,y2"`` -> a box (half-open pixel edges, original image)."""
    parts = [p.strip() for p in str(spec).split(",")]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(np.isfinite(vals)):
        raise ConfigError(f"--box {spec!r}: expected four numbers x1,y1,x2,y2 (pixel edges of the original image)")
    return (vals[0], vals[1], vals[2], vals[3])


def _is_synthetic_film(path: Path) -> bool:
    """A DICOM written by the synthetic world (its ``ImageComments`` mark)."""
    from medfocus.io.reader import is_dicom

    if not is_dicom(path):
        return False
    import pydicom

    from medfocus.datasets.synthetic.dataset import SYNTHETIC_MARK

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # unreadable header: read_image reports the real problem
        return False
    return str(getattr(ds, "ImageComments", "")) == SYNTHETIC_MARK


def _stem_of(question: str, mode: str) -> str:
    """A user's question without the mode's instruction (it is appended by the runner)."""
    q = question.strip()
    suffix = SUFFIXES[mode].strip()
    if q.endswith(suffix):
        q = q[: -len(suffix)].strip()
    return q


def result_params(params: Any) -> Any:
    """The ``{method: {name: value}}`` overrides of an explain spec that can change results: without each
    method's result-neutral settings (:func:`~medfocus.attribution.base.method_runtime_settings`, the list
    ``attribute``'s rerun check skips too, e.g. ``batch_size``) and without values equal to the method's
    default (``grid=8`` given is the run without it); methods left with nothing are dropped. Anything but a
    mapping of mappings is returned unchanged (a malformed stored spec then differs)."""
    from medfocus.attribution.base import list_methods, method_runtime_settings

    if not isinstance(params, Mapping) or not all(isinstance(p, Mapping) for p in params.values()):
        return params
    registry = list_methods()
    out: dict[str, dict[str, Any]] = {}
    for m, p in params.items():
        neutral, defaults = method_runtime_settings(m), registry.get(m, {})
        kept = {k: v for k, v in p.items() if k not in neutral and not (k in defaults and _json_equal(v, defaults[k]))}
        if kept:
            out[m] = kept
    return out


def _json_equal(value: Any, default: Any) -> bool:
    try:
        return json.loads(json.dumps(default)) == value
    except (TypeError, ValueError):  # a default that is no JSON value (a tensor): never equal to a given one
        return False


def restrict_to_methods(stored: Mapping[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """The stored explain spec as if only ``methods`` had been run: its ``methods`` and ``params`` cut to them."""
    old_params = stored.get("params") if isinstance(stored.get("params"), dict) else {}
    return dict(stored, methods=list(methods), params={m: p for m, p in old_params.items() if m in methods})


def spec_differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between a stored ``explain.json`` and this run, e.g. ``["methods: ['gradcam'] -> ['rise']",
    "film 0: image /x/film.jpeg (sha256 ab12.., 5120 bytes) -> /x/film.jpeg (sha256 cd34.., 4960 bytes)"]``.

    Parameters are compared as :func:`result_params` (a setting that cannot change results, or a default
    given explicitly, is no difference). Films are compared by their sample fingerprints
    (:func:`medfocus.io.fingerprint.sample_fingerprint`); an ``explain.json`` written before they were
    recorded is one difference (its films cannot be verified)."""
    from medfocus.io.fingerprint import fingerprint_differences

    stored = dict(stored, params=result_params(stored.get("params") or {}))
    now = dict(now, params=result_params(now.get("params") or {}))
    diffs = [f"{k}: {stored.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}"
             for k in sorted((set(stored) | set(now)) - {"samples"}) if stored.get(k) != now.get(k)]
    old_fps, new_fps = stored.get("samples"), now.get("samples") or []
    if not isinstance(old_fps, list):
        diffs.append("films: explain.json records no film fingerprints (written before they were recorded): "
                     "the films behind its maps cannot be verified")
        return diffs
    for i, fp in enumerate(new_fps):
        if i < len(old_fps):
            # the question, answer and boxes are compared above as settings; here the film files
            diffs += [f"film {i}: {d}" for d in fingerprint_differences(old_fps[i], fp) if d.startswith("image ")]
    return diffs


def stored_subset(stored: Mapping[str, Any], now: Mapping[str, Any]) -> bool:
    """Whether the run ``now`` asks for a subset of the methods of the ``stored`` explain.json (in any
    order) with everything else identical: the same films (fingerprints), question, mode, answer, model,
    seed, boxes, and the same parameters for each method asked for. Such a run is the stored run
    restricted to those methods, so its records are the stored ones.

    Both specs as JSON values (lists, not tuples)."""
    methods = now.get("methods")
    old_methods = stored.get("methods")
    if not isinstance(methods, list) or not isinstance(old_methods, list) or not set(methods) <= set(old_methods):
        return False
    return not spec_differences(restrict_to_methods(stored, methods), now)


def explain(
    images: Sequence[str | Path],
    *,
    out: str | Path,
    finding: str | None = None,
    question: str | None = None,
    mode: str = "direct",
    answer: str | None = None,
    model: str = "demo",
    methods: Sequence[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    boxes: Sequence[Box] = (),
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    load_model: Callable[[str], Any] | None = None,
    title: str | None = None,
    notify: Callable[[str], None] | None = None,
) -> ExplainResult:
    """Explain the model's answer about each film with every selected attribution method.

    Args:
        images: film paths (DICOM, PNG, JPEG, TIFF).
        out: output folder (records, heatmaps, ``explain.html``).
        finding: ask the paper's question ``"Is there evidence of {finding} in the image?"``; or
        question: ask this question instead (the mode's instruction is appended unless already there).
        mode: ``"direct"`` or ``"cot"`` (step-by-step: the whole generated rationale is explained).
        answer: explain this answer text instead of the model's own greedy answer.
        model: LVLM registry name or folder (default: the shipped demo model).
        methods: registered method names (default: all).
        params: ``{method: {name: value}}`` overrides of the methods' defaults.
        boxes: expert boxes ``(x1, y1, x2, y2)`` in original pixels (one film only).
        seed: run seed. device: torch device. progress: tqdm bars.
        overwrite: replace the explain run stored in ``out``, whatever its settings: every film and method is
            recomputed (also with the same settings; without it, those are resumed or served from the store).
        load_model: ``name -> adapter`` (default :func:`medfocus.lvlm.load_lvlm` on ``device``).
        title: the viewer's title.
        notify: called with lines for the user before the model loads (a film given more than once, explained
            once; the perturbation methods' forward passes per film,
            :func:`~medfocus.attribution.base.forward_pass_note`); the CLI prints them.
    Returns:
        :class:`ExplainResult`.
    Raises:
        ConfigError: inconsistent settings (both or neither of finding/question, unknown method or
            parameter, boxes with several films or outside the film, ``out`` holding another run).
        DataError: a film is missing or unreadable (checked before the model is loaded).
        ModelError: the model cannot be loaded (checked without the network first, :func:`check_model`).
        ConfigError: also a layer / head index the loaded model does not have, or a perturbation grid finer
            than a film's content on its canvas (before any film runs).
    """
    from medfocus.attribution import get_method, list_methods
    from medfocus.attribution.base import forward_pass_note
    from medfocus.io import read_image
    from medfocus.report.viewer import build_viewer
    from medfocus.runner.grid import WorkItem, check_films_before_load, load_checked, run_grid
    from medfocus.runner.store import ResultStore, load_results

    # ---- validate everything before the model loads
    if (finding is None) == (question is None):
        raise ConfigError("give exactly one of --finding NAME or --question TEXT")
    if finding is not None and not str(finding).strip():
        raise ConfigError("--finding is empty")
    if question is not None and not str(question).strip():
        raise ConfigError("--question is empty")
    if mode not in ("direct", "cot"):
        raise ConfigError(f"--mode must be 'direct' or 'cot', got {mode!r}")
    if answer is not None and not str(answer).strip():
        raise ConfigError("--answer is empty")
    if not images:
        raise ConfigError("no image given")
    registry = list_methods()
    methods = list(methods) if methods else list(registry)
    unknown = [m for m in methods if m not in registry]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; available: {sorted(registry)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"a method is selected twice: {methods}")
    params = {str(k): dict(v) for k, v in (params or {}).items()}
    stray = sorted(set(params) - set(methods))
    if stray:
        raise ConfigError(f"--param given for method(s) not selected: {stray}")
    for m, p in params.items():
        bad = sorted(set(p) - set(registry[m])) if registry[m] else []
        if bad:
            raise ConfigError(f"method {m!r}: unknown parameter(s) {bad}; accepted: {sorted(registry[m])}")
    # absolute from the start: the film is read again later by that name, and a warning about it is said once
    paths = [Path(p).resolve() for p in images]
    repeated = sorted({str(p) for p in paths if paths.count(p) > 1})
    if repeated:  # one film, one set of records: a repeat would only spend the time twice
        paths = list(dict.fromkeys(paths))
        if notify is not None:
            notify(f"note: film(s) given more than once, explained once: {', '.join(repeated)}")
    boxes = [tuple(float(v) for v in b) for b in boxes]
    if boxes and len(paths) != 1:
        raise ConfigError("--box applies to a single film; give one image with expert boxes")
    samples: list[Sample] = []
    synthetic: list[bool] = []
    attribute = str(finding).strip() if finding is not None else str(question).strip()
    stem = question_stem(attribute) if finding is not None else _stem_of(str(question), mode)
    from medfocus.evaluation.records import RELATIVE_UNIT_MIN_SIDE

    for i, p in enumerate(paths):
        img, (w0, h0) = read_image(p)  # DataError naming the file when missing/unreadable
        for b in boxes:
            if not (0 <= b[0] < b[2] <= w0 and 0 <= b[1] < b[3] <= h0):
                raise ConfigError(f"--box {','.join(f'{v:g}' for v in b)}: must satisfy 0 <= x1 < x2 <= {w0} and "
                                  f"0 <= y1 < y2 <= {h0} (the film {p.name} is {w0}x{h0} px)")
        if boxes and min(w0, h0) >= RELATIVE_UNIT_MIN_SIDE and all(v <= 1.0 for b in boxes for v in b):
            # the rule evaluate applies to predicted boxes: on a real film, a box inside the one-pixel corner
            # is relative (0-1) coordinates given as pixels, never an expert's region
            raise ConfigError(f"--box {' '.join(','.join(f'{v:g}' for v in b) for b in boxes)}: every value is within "
                              f"[0, 1], which on the {w0}x{h0} px film {p.name} is its one-pixel corner; give pixel edges "
                              f"(e.g. {','.join(f'{v * d:g}' for v, d in zip(boxes[0], (w0, h0, w0, h0)))} if these "
                              "are fractions of the width and height)")
        samples.append(Sample(dataset=DATASET, index=i, image_path=str(p.resolve()), attribute=attribute, question=stem,
                              answer=None, boxes=list(boxes), image_size=(w0, h0), meta={"file": p.name}))
        synthetic.append(_is_synthetic_film(p))

    items = [WorkItem(model, DATASET, mode, s, answer=answer, answer_source="given" if answer else "model",
                      synthetic=syn, extra={"file": s.meta["file"]}) for s, syn in zip(samples, synthetic)]
    out = Path(out)
    # the films' content is part of the run's identity: a film overwritten at the same path is another run
    spec = {"images": [s.image_path for s in samples], "question": stem, "mode": mode, "answer": answer, "model": model,
            "methods": methods, "params": params, "boxes": [list(b) for b in boxes], "seed": seed,
            "samples": [it.fingerprint() for it in items]}
    spec_path = out / "explain.json"
    store_path = out / "predictions.jsonl"
    replace = False
    served_from: list[str] | None = None
    if spec_path.is_file():
        old = json.loads(spec_path.read_text(encoding="utf-8"))
        now = json.loads(json.dumps(spec))
        diffs = spec_differences(old, now)
        if overwrite:
            # --overwrite replaces what the folder holds, whatever it is: every film and method is
            # recomputed (same settings included), never served from the store
            replace = True
        elif diffs and stored_subset(old, now):
            # The stored run restricted to these methods: serve its records (resuming any it lacks) and
            # keep explain.json whole, so a later rerun with all its methods still resumes.
            served_from = sorted(old["methods"])
        elif diffs:
            if set(methods) <= set(old.get("methods") or []):
                # a subset of the stored methods is allowed: name only what else differs
                diffs = spec_differences(restrict_to_methods(old, methods), now)
            more = sorted(set(methods) - set(old.get("methods") or []))
            how = (f"\nThe stored run has methods {sorted(old.get('methods') or [])}: a rerun asking for any of them "
                   f"with the same settings is served from it; for {more} use another --out, or --overwrite to "
                   "replace the run (recomputes every method).") if more else \
                "\nUse another --out, or --overwrite to replace it (recomputes every film and method)."
            raise ConfigError(f"{out} holds an explain run with other settings or films ({spec_path}; stored -> now):\n"
                              + "\n".join(f"  {d}" for d in diffs) + how)
    elif store_path.exists():
        raise ConfigError(f"{store_path} exists but was not written by `medfocus explain`; use an empty --out folder")

    method_objs = {m: get_method(m, **params.get(m, {})) for m in methods}  # each setting's type and range
    cost = forward_pass_note(method_objs, unit="film")
    if cost is not None and served_from is None and notify is not None:
        notify(cost)  # before the model loads: a costly setting shows before the wait
    loader = load_model
    if loader is None:
        def loader(name: str) -> Any:
            from medfocus.lvlm import load_lvlm

            return load_lvlm(name, device=device)

    fresh = replace or not spec_path.is_file()
    films = {s.image_path: s.image_size for s in samples}
    if fresh:
        # A new run: the model, then the settings that depend on it (layer / head indices), before --out is
        # touched, so a model that cannot be loaded or an index it does not have leaves no explain.json
        # behind. (A resumed run loads the model only if something is left to compute: run_grid checks then.)
        if load_model is None:
            from medfocus.lvlm.loading import check_model

            check_model(model)  # a name, folder or hub id that cannot be loaded without the network: one error now
            check_films_before_load(model, method_objs.values(), films)  # where the canvas is known unloaded
        adapter = load_checked(loader, model, method_objs.values(), films=films)
        loader = lambda _name: adapter  # noqa: E731

    if replace:
        for name in ("predictions.jsonl", "explain.html", "explain.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "predictions_heatmaps", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    from medfocus.io.atomic import atomic_write_json

    if served_from is None:
        atomic_write_json(spec_path, spec)

    with ResultStore(store_path) as store:
        summary = run_grid(items, {m: params.get(m, {}) for m in methods}, store, load_model=loader,
                           make_method=lambda name, _params: method_objs[name], seed=seed, save_token_maps=True,
                           progress=progress)
    records = [r for r in load_results(store_path) if r["dataset"] == DATASET and r["method"] in methods]
    labels = film_labels([it.sample.image_path for it in items])  # two films named film.png are told apart
    answers = []
    for it, label in zip(items, labels):
        rs = [r for r in records if int(r["index"]) == it.index]
        answers.append({"image": it.sample.image_path, "label": label, "answer": rs[0].get("answer") if rs else None,
                        "answer_parsed": rs[0].get("answer_parsed") if rs else None, "answer_source": it.answer_source})
    warnings = sorted({r["reference_pool_warning"] for r in records if r.get("reference_pool_warning")})
    notes = []
    if Path(str(model)).name == "demo" or str(model) == "demo":
        notes.append(DEMO_NOTE)
    from medfocus.attribution.base import BASELINES

    html = build_viewer(records, out / "explain.html", base_dir=out, notes=notes, method_order=[*BASELINES, "medfocus"],
                        labels={(model, DATASET, it.index, mode): label for it, label in zip(items, labels)},
                        title=title or f"medfocus explain · {attribute} · {model}")
    if summary.errors:
        log.warning("%d of %d records failed (see their 'error' field and the viewer's cost table)", summary.errors, summary.total)
    return ExplainResult(out=out, html=html, records=records, answers=answers, summary=summary, warnings=warnings,
                         served_from=served_from)
