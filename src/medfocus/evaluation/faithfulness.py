"""Faithfulness of a map to the model: deletion and insertion curves (Petsiuk et al., RISE, BMVC 2018).

Plausibility (IoU, pointing game...) asks whether a map overlaps the expert boxes; faithfulness asks
whether the model *uses* what the map ranks first. Deletion removes the map's top-ranked regions
first and watches the answer's probability fall (low area = faithful); insertion starts from an image
with everything removed, reveals the top-ranked regions first and watches it rise (high area =
faithful).

Protocol (all of it in the family's preprocessed space, no processor call per variant):

* **Unit = image-token cells.** The map (original pixels) is brought onto the model's canvas
  (:meth:`~medfocus.io.Letterbox.map_to_canvas`) and averaged over each cell of the token grid
  ``chat.grid_hw`` (only the cell's image pixels count; cells that are pure letterbox padding are not
  part of the image and are never removed). Cells, not pixels, because (1) a cell is the unit the
  model reads -- removing part of one is a change no token sees whole; (2) half of the methods
  (attention, Grad-CAM, occlusion) have token-resolution maps, for which a pixel ranking would
  mostly be the tie-breaking order; (3) scattered single-pixel deletions are an input the model never
  saw, and would measure that shift rather than the ranking.
* **Order.** Cells sorted by decreasing mean map value; ties broken by a fixed permutation drawn from
  ``numpy.random.default_rng(seed)`` (so a constant map is scored exactly as the random reference
  with the same seed). A map with a non-finite value is an error, never silently cleaned.
* **Steps.** ``steps`` equal fractions: after step ``k`` the first ``round(k N / steps)`` of the ``N``
  image cells are removed (deletion) or revealed (insertion); ``fractions[k]`` is the fraction
  actually moved (equal to ``k / steps`` when ``steps`` divides ``N``).
* **Baseline** (what "removed" means): ``"blur"`` (default) -- the image content Gaussian-blurred with
  ``sigma = blur_sigma x`` the content's longer side (0.05: 22 canvas pixels on Qwen2.5-VL's 448,
  ~1.6 of its 14-px patches; the finding's texture goes, the local brightness stays, so the variant
  stays closer to a radiograph than a black hole); ``"zero"`` -- black; ``"mean"`` -- the image's mean.
* **Score** = the mean answer-token probability under teacher forcing, ``mean_t p(y_t | x)``, scored
  with the batched answer-only scorer :func:`medfocus.lvlm.scoring.score_chat` exactly as the
  perturbation methods score their variants.
* **AUC** by the trapezoid rule over ``fractions`` on ``[0, 1]`` (in probability units, 0..1).

References are scored on the same variants' endpoints: a uniform-random map (the seeded order) and
the expert-box mask (cells ranked by the fraction of their pixels inside the boxes), so a method's
numbers read between "knows nothing" and "knows the expert region".

Cost: ``2 (steps - 1)`` forward passes per map plus 2 shared by every map of one sample (the
original and the all-removed image). For a scheduler that batches many requests
(:func:`plan_curves` + :func:`finish_curves` split the work around the scoring).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medfocus.errors import ConfigError, DataError

__all__ = ["FaithfulnessConfig", "Curves", "FaithfulnessPlan", "BASELINES", "REFERENCES", "cell_index", "cell_scores",
           "cell_order", "curve_auc", "plan_curves", "finish_curves", "faithfulness_curves", "score_keep_masks", "sample_seed",
           "record_faithfulness", "reference_rows", "mean_curves", "REFERENCE_METHODS", "FAITHFULNESS_METRICS"]

#: The per-record faithfulness columns (probability units 0..1; deletion: lower = more faithful).
FAITHFULNESS_METRICS = ("deletion_auc", "insertion_auc")

BASELINES = ("blur", "zero", "mean")
#: Names of the reference maps added to every sample's curves.
REFERENCES = ("random", "expert_box")


@dataclass(frozen=True)
class FaithfulnessConfig:
    """Settings of the deletion/insertion protocol (module docstring).

    Attributes:
        steps: number of equal fractions (>= 1; the curves have ``steps + 1`` points).
        baseline: ``"blur"``, ``"zero"`` or ``"mean"``.
        blur_sigma: Gaussian sigma as a fraction of the image content's longer side on the canvas (> 0).
        seed: tie-breaking / random-reference permutation seed.
        batch_size: variants per forward pass.
    """

    steps: int = 16
    baseline: str = "blur"
    blur_sigma: float = 0.05
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise ConfigError(f"faithfulness: steps must be an integer >= 1, got {self.steps!r}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"faithfulness: baseline must be one of {BASELINES}, got {self.baseline!r}")
        if not (isinstance(self.blur_sigma, (int, float)) and math.isfinite(self.blur_sigma) and self.blur_sigma > 0):
            raise ConfigError(f"faithfulness: blur_sigma must be a positive number, got {self.blur_sigma!r}")
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ConfigError(f"faithfulness: batch_size must be an integer >= 1, got {self.batch_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Curves:
    """Deletion and insertion curves of one map on one sample.

    Attributes:
        fractions: ``(steps + 1,)`` fraction of the image cells removed / revealed, 0 .. 1.
        deletion: ``(steps + 1,)`` score after removing the top ``fractions[k]`` (``[0]`` = original).
        insertion: ``(steps + 1,)`` score after revealing the top ``fractions[k]`` (``[-1]`` = original).
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> float:
        return curve_auc(self.fractions, self.deletion)

    @property
    def insertion_auc(self) -> float:
        return curve_auc(self.fractions, self.insertion)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the AUCs and the three arrays as lists."""
        return {"deletion_auc": self.deletion_auc, "insertion_auc": self.insertion_auc,
                "fractions": [float(v) for v in self.fractions], "deletion": [float(v) for v in self.deletion],
                "insertion": [float(v) for v in self.insertion]}


def curve_auc(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Area under ``values`` over ``fractions`` (trapezoid rule), ``fractions`` from 0 to 1."""
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"curve_auc: need two equal-length 1-D arrays of >= 2 points, got {x.shape} and {y.shape}")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def cell_index(geometry: Any, canvas_size: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """``(canvas_h, canvas_w)`` int array: the token cell (row-major ``r * gw + c``) of every canvas
    pixel, ``-1`` on letterbox padding. Cells split the canvas uniformly (as every family's grid does)."""
    W, H = int(canvas_size[0]), int(canvas_size[1])
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    rows = (np.arange(H) * gh) // H
    cols = (np.arange(W) * gw) // W
    idx = rows[:, None] * gw + cols[None, :]
    content = np.zeros((H, W), dtype=bool)
    rs, cs = geometry.content_slice()
    content[rs, cs] = True
    return np.where(content, idx, -1)


def cell_scores(heatmap: np.ndarray, geometry: Any, cells: np.ndarray, n_cells: int, *, name: str = "map") -> np.ndarray:
    """``(n_cells,)`` mean of an ``(H0, W0)`` original-pixel map over the image pixels of each cell
    (NaN for a cell without image pixels).

    Raises:
        DataError: the map's shape is not the image's, or it holds a non-finite value.
    """
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.shape != (geometry.orig_h, geometry.orig_w):
        raise DataError(f"faithfulness: {name} has shape {hm.shape}; expected the image's {(geometry.orig_h, geometry.orig_w)}")
    if not np.isfinite(hm).all():
        raise DataError(f"faithfulness: {name} holds non-finite values; a map must be finite to be ranked")
    canvas = geometry.map_to_canvas(hm)
    inside = cells >= 0
    sums = np.bincount(cells[inside], weights=canvas[inside].astype(np.float64), minlength=n_cells)
    counts = np.bincount(cells[inside], minlength=n_cells)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def cell_order(scores: np.ndarray, seed: int) -> np.ndarray:
    """Indices of the finite ``scores`` by decreasing value, ties in a fixed seeded random order
    (a permutation of all ``len(scores)`` cells from ``default_rng(seed)``). Values within 1e-6 of the
    scores' range of each other count as tied, so resampling round-off in a flat map is not read as
    a ranking."""
    s = np.asarray(scores, dtype=np.float64)
    tie = np.random.default_rng(int(seed)).permutation(s.size)
    valid = np.flatnonzero(np.isfinite(s))
    v = s[valid]
    span = float(v.max() - v.min()) if v.size else 0.0
    q = np.round((v - v.min()) / span * 1e6) if span > 0 else np.zeros_like(v)
    return valid[np.lexsort((tie[valid], -q))]


@dataclass
class FaithfulnessPlan:
    """The variants of one sample, before scoring.

    ``keep`` is ``(V, n_cells)`` float32: 1 keeps a cell's image, 0 replaces it by the baseline.
    Row 0 is the original, row 1 the all-removed image; ``rows[name] = (deletion_rows, insertion_rows)``,
    each ``steps + 1`` indices into ``keep``.
    """

    keep: np.ndarray
    fractions: np.ndarray
    rows: dict[str, tuple[np.ndarray, np.ndarray]]
    errors: dict[str, str] = field(default_factory=dict)


def plan_curves(maps: Mapping[str, np.ndarray | None], geometry: Any, cells: np.ndarray, n_cells: int, config: FaithfulnessConfig,
                boxes: Sequence[Sequence[float]] | None = None, *, references: bool = True) -> FaithfulnessPlan:
    """Build the keep-masks of every map's deletion and insertion curves (plus the references).

    Args:
        maps: ``{name: (H0, W0) map}``; ``None`` entries are skipped. A map that cannot be ranked
            (wrong shape, non-finite) is reported in ``plan.errors[name]`` and skipped.
        geometry, cells, n_cells: the letterbox and :func:`cell_index` of the prepared chat.
        config: the protocol settings.
        boxes: expert boxes (original pixels, half-open) for the ``"expert_box"`` reference; none
            given -> no such reference.
        references: add the ``"random"`` (and with ``boxes`` the ``"expert_box"``) reference curves.
    """
    image_cells = np.unique(cells[cells >= 0])
    N = int(image_cells.size)
    steps = int(config.steps)
    counts = np.round(np.arange(steps + 1) * N / steps).astype(int)
    fractions = counts / N
    orders: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    for name, m in maps.items():
        if m is None:
            continue
        try:
            orders[name] = cell_order(cell_scores(m, geometry, cells, n_cells, name=f"map {name!r}"), config.seed)
        except DataError as exc:
            errors[name] = str(exc)
    if references:
        rnd = np.zeros(n_cells)
        rnd[np.setdiff1d(np.arange(n_cells), image_cells)] = np.nan
        orders["random"] = cell_order(rnd, config.seed)
    if references and boxes:
        from medfocus.evaluation.boxes import boxes_to_mask

        mask = boxes_to_mask(boxes, (geometry.orig_h, geometry.orig_w)).astype(np.float32)
        orders["expert_box"] = cell_order(cell_scores(mask, geometry, cells, n_cells, name="expert-box mask"), config.seed)

    keep = [np.ones(n_cells, np.float32), np.zeros(n_cells, np.float32)]
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, order in orders.items():
        d_rows, i_rows = [0], [1]
        for k in range(1, steps):
            top = order[: counts[k]]
            d = np.ones(n_cells, np.float32)
            d[top] = 0.0
            ins = np.zeros(n_cells, np.float32)
            ins[top] = 1.0
            d_rows.append(len(keep))
            keep.append(d)
            i_rows.append(len(keep))
            keep.append(ins)
        d_rows.append(1)
        i_rows.append(0)
        rows[name] = (np.array(d_rows), np.array(i_rows))
    return FaithfulnessPlan(keep=np.stack(keep), fractions=fractions, rows=rows, errors=errors)


def finish_curves(plan: FaithfulnessPlan, scores: np.ndarray) -> dict[str, Curves]:
    """Curves from the ``(V,)`` scores of ``plan.keep``'s variants."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (plan.keep.shape[0],):
        raise ValueError(f"finish_curves: expected {plan.keep.shape[0]} scores, got shape {s.shape}")
    return {name: Curves(plan.fractions.copy(), s[d], s[i]) for name, (d, i) in plan.rows.items()}


def _blurred_canvas(image: Any, geometry: Any, sigma_frac: float) -> Any:
    """``(3, H, W)`` normalised canvas image with its content Gaussian-blurred (reflecting at the content
    border, so the letterbox padding does not bleed in); padding unchanged."""
    import torch
    from scipy.ndimage import gaussian_filter

    rs, cs = geometry.content_slice()
    sigma = float(sigma_frac) * max(geometry.new_w, geometry.new_h)
    arr = image.detach().float().cpu().numpy()
    out = arr.copy()
    out[:, rs, cs] = gaussian_filter(arr[:, rs, cs], sigma=(0, sigma, sigma), mode="reflect")
    return torch.from_numpy(out).to(image)


def score_keep_masks(adapter: Any, chat: Any, keep_cells: np.ndarray, cells: np.ndarray, config: FaithfulnessConfig,
                     scorer: Callable[..., Any] | None = None) -> np.ndarray:
    """``(V,)`` mean answer-token probabilities of the ``V`` variants of ``keep_cells`` ``(V, n_cells)``.

    Canvas keep-masks are rendered one batch at a time (letterbox padding always kept) and perturbed
    with :meth:`LVLMAdapter.masked_pixel_values`; ``scorer`` (default
    :func:`medfocus.lvlm.scoring.score_chat`) returns ``(B, T)`` answer-token log-probs.
    """
    import torch

    if scorer is None:
        # evaluation sits below lvlm (README Architecture): the caller supplies the model layer's scorer
        raise ConfigError("faithfulness: pass scorer= (the answer-only scorer, medfocus.lvlm.scoring.score_chat)")
    if config.baseline == "blur":
        base_img = adapter.pixel_values_to_images(chat.inputs["pixel_values"], chat)
        baseline: Any = _blurred_canvas(base_img, chat.geometry, config.blur_sigma)
    else:
        baseline = config.baseline
    cells_t = torch.from_numpy(cells.astype(np.int64))
    pad = cells_t < 0
    idx = cells_t.clamp_min(0)
    out = []
    bs = int(config.batch_size)
    for i in range(0, keep_cells.shape[0], bs):
        k = torch.from_numpy(keep_cells[i : i + bs])
        canvas = k[:, idx]  # (b, H, W)
        canvas[:, pad] = 1.0
        pv = adapter.masked_pixel_values(chat, canvas, baseline)
        logp = torch.as_tensor(scorer(adapter, chat, pv, batch_size=bs)).float().cpu()
        out.append(logp.exp().mean(dim=1))
    return torch.cat(out).numpy().astype(np.float64)


def faithfulness_curves(adapter: Any, image: np.ndarray, question: str, answer: str, maps: Mapping[str, np.ndarray | None], *,
                        boxes: Sequence[Sequence[float]] | None = None, config: FaithfulnessConfig | None = None,
                        scorer: Callable[..., Any] | None = None, references: bool = True,
                        endpoints: tuple[float, float] | None = None) -> tuple[dict[str, Curves], dict[str, str]]:
    """Deletion/insertion curves of several maps of one ``(image, question, answer)`` (module docstring).

    Args:
        adapter: an :class:`~medfocus.lvlm.adapter.LVLMAdapter`.
        image: ``(H0, W0)`` uint8 image.
        question: full question (suffix included); answer: the teacher-forced answer text.
        maps: ``{name: (H0, W0) map}`` in original pixels (``None`` entries skipped).
        boxes: expert boxes for the ``"expert_box"`` reference.
        config: protocol settings (default :class:`FaithfulnessConfig`).
        scorer: ``score_chat``-compatible scorer (:func:`medfocus.lvlm.scoring.score_chat`; required).
        references: also score the reference maps (off when the caller already has them).
        endpoints: ``(original, all removed)`` scores of this ``(image, question, answer)`` under ``config``,
            when the caller has them from another map of the sample (the curves' shared endpoints,
            ``deletion[0]`` and ``deletion[-1]``): not scored again.

    Returns:
        ``(curves, errors)``: ``curves[name]`` for every rankable map plus ``"random"`` (and
        ``"expert_box"`` with boxes); ``errors[name]`` says why a map could not be ranked.

    Raises:
        ConfigError: an empty answer or one that produced no scored tokens.
    """
    cfg = config or FaithfulnessConfig()
    if not answer or not str(answer).strip():
        raise ConfigError(f"faithfulness: an answer text is required (got {answer!r})")
    chat = adapter.prepare(image, question, answer)
    if chat.answer_span is None or chat.n_answer_tokens <= 0:
        raise ConfigError(f"faithfulness: the answer {answer!r} produced no scored tokens")
    gh, gw = chat.grid_hw
    cells = cell_index(chat.geometry, adapter.canvas_size, (gh, gw))
    plan = plan_curves(maps, chat.geometry, cells, gh * gw, cfg, boxes, references=references)
    if endpoints is None:
        scores = score_keep_masks(adapter, chat, plan.keep, cells, cfg, scorer)
    else:  # plan.keep[0] / [1] are the original and the all-removed variant (plan_curves)
        scores = np.concatenate([np.asarray(endpoints, dtype=np.float64),
                                 score_keep_masks(adapter, chat, plan.keep[2:], cells, cfg, scorer)])
    return finish_curves(plan, scores), plan.errors


def sample_seed(seed: int, key: Sequence[Any]) -> int:
    """Per-sample tie-breaking seed from the run's ``seed`` and the sample key ``(model, dataset, index,
    mode)``: stable across processes (CRC-32, not Python's salted ``hash``), the same for every method
    of one sample (so their maps are ranked with the same tie order) and different between samples
    (so the random reference is not one fixed order applied to every image)."""
    import zlib

    return int(zlib.crc32(("|".join(map(str, key)) + f"#{int(seed)}").encode("utf-8")) & 0x7FFFFFFF)


def _nan_to_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def record_faithfulness(adapter: Any, image: np.ndarray, record: Mapping[str, Any], heatmap: np.ndarray, config: FaithfulnessConfig,
                        references: dict[tuple, Any] | None = None, *, scorer: Callable[..., Any] | None = None
                        ) -> dict[str, Any]:
    """The faithfulness fields of one prediction record (what the runner and ``medfocus evaluate
    --faithfulness`` add): ``deletion_auc``, ``insertion_auc`` and ``faithfulness`` (the curves, the
    settings with the sample's seed, the ``random`` / ``expert_box`` reference curves of the sample and
    an ``error``, ``None`` when all went well).

    Args:
        record: needs ``model, dataset, index, mode, question, answer`` and ``gt_boxes``.
        heatmap: the record's ``(H0, W0)`` map.
        references: a cache shared by the records of one run (``{sample key: reference curves}``, and the
            curves' shared endpoints), so the references and the original / all-removed scores are
            computed once per sample, not once per method.
        scorer: the answer-only scorer (:func:`medfocus.lvlm.scoring.score_chat`).

    A failure of the curves themselves (a map that cannot be ranked) is returned in
    ``faithfulness["error"]`` with ``None`` AUCs; model errors propagate.
    """
    key = (record["model"], record["dataset"], int(record["index"]), record["mode"])
    cfg = FaithfulnessConfig(**{**config.to_dict(), "seed": sample_seed(config.seed, key)})
    cache = references if references is not None else {}
    need_refs = key not in cache
    # the original and all-removed scores are every map's curve ends: scored once per sample (and answer)
    ends_key = (*key, "endpoints", str(record["question"]), str(record["answer"]))
    curves, errors = faithfulness_curves(adapter, image, str(record["question"]), str(record["answer"]), {"map": heatmap},
                                         boxes=record.get("gt_boxes") or None, config=cfg, scorer=scorer, references=need_refs,
                                         endpoints=cache.get(ends_key))
    if curves and ends_key not in cache:
        any_curve = next(iter(curves.values()))
        cache[ends_key] = (float(any_curve.deletion[0]), float(any_curve.deletion[-1]))
    if need_refs:
        cache[key] = {name: curves[name].to_dict() for name in REFERENCES if name in curves}
    out: dict[str, Any] = {"settings": cfg.to_dict(), **cache[key], "error": errors.get("map")}
    if "map" in curves:
        c = curves["map"].to_dict()
        out.update(fractions=c["fractions"], deletion=c["deletion"], insertion=c["insertion"])
        return {"deletion_auc": _nan_to_none(c["deletion_auc"]), "insertion_auc": _nan_to_none(c["insertion_auc"]), "faithfulness": out}
    return {"deletion_auc": None, "insertion_auc": None, "faithfulness": out}


#: Method names of the reference rows that :func:`reference_rows` adds to the tables.
REFERENCE_METHODS = {"random": "reference: random map", "expert_box": "reference: expert-box map"}


def reference_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (sample, reference) with its ``deletion_auc`` / ``insertion_auc``, from the
    ``faithfulness`` fields of the records (each sample counted once, whatever its number of methods);
    method names from :data:`REFERENCE_METHODS`."""
    seen: set[tuple] = set()
    rows = []
    for r in records:
        f = r.get("faithfulness")
        if not isinstance(f, Mapping) or r.get("error"):
            continue
        key = (r.get("model"), r.get("dataset"), r.get("mode"), r.get("index"))
        if key in seen:
            continue
        seen.add(key)
        for ref, method in REFERENCE_METHODS.items():
            c = f.get(ref)
            if isinstance(c, Mapping):
                rows.append({"model": key[0], "dataset": key[1], "mode": key[2], "method": method, "index": key[3],
                             "deletion_auc": c.get("deletion_auc"), "insertion_auc": c.get("insertion_auc"),
                             "source": "reference", "error": None})
    return rows


def mean_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{method: {"fractions", "deletion", "insertion", "n"}}``: the mean curves over the records
    (step by step; ``fractions`` nominal ``k / steps``), references included under their
    :data:`REFERENCE_METHODS` names. Records with other step counts than the first are left out."""
    acc: dict[str, dict[str, list]] = {}
    steps = None
    seen: set[tuple] = set()
    for r in records:
        f = r.get("faithfulness")
        if not isinstance(f, Mapping) or r.get("error"):
            continue
        entries = []
        if f.get("deletion") is not None:
            entries.append((str(r.get("method")), f))
        key = (r.get("model"), r.get("dataset"), r.get("mode"), r.get("index"))
        if key not in seen:
            seen.add(key)
            entries += [(REFERENCE_METHODS[ref], f[ref]) for ref in REFERENCE_METHODS if isinstance(f.get(ref), Mapping)]
        for name, c in entries:
            d, i = c.get("deletion"), c.get("insertion")
            if d is None or i is None:
                continue
            steps = steps if steps is not None else len(d) - 1
            if len(d) != steps + 1:
                continue
            a = acc.setdefault(name, {"deletion": [], "insertion": []})
            a["deletion"].append(d)
            a["insertion"].append(i)
    if steps is None:
        return {}
    x = [k / steps for k in range(steps + 1)]
    return {m: {"fractions": x, "deletion": np.mean(a["deletion"], axis=0).tolist(), "insertion": np.mean(a["insertion"], axis=0).tolist(),
                "n": len(a["deletion"])} for m, a in acc.items()}
