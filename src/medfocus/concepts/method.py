"""MedFocus: concept-based causal attribution.

Usage::

    from medfocus.concepts import MedFocus, default_pool
    mf = MedFocus(adapter, default_pool())
    res = mf.attribute(image, question)            # answer=None: the model's own (greedy) answer
    res.concept, res.box, res.ranking()[:3], res.heatmap.shape

Pipeline (see :mod:`medfocus.concepts.transfer` and :mod:`medfocus.concepts.intervention`):
select the nearest normal reference by unbalanced OT, transfer its 11 concept masks, hide each
concept (and the 4 bilateral unions) in the model input, score all variants in one teacher-forced
pass, and rank concepts by the log-probability the answer loses. The spatial heatmap is
``sum_c delta_c * soft_mask_c`` over the 15 variants (a union's soft mask is the max of its two
sides), in nats of answer log-probability (not normalised: a map whose largest value is 5e-6 nats says
that nothing mattered, and a viewer's colour bar shows that; the heatmap metrics -- quantile boxes,
pointing game, deletion order -- do not depend on the scale, so MedFocus is evaluated with the same
metrics as the baselines); its boxes are those of the winning concept (the full image on fallback).

It is also the 11th method of the attribution registry, ``get_method("medfocus")``
(:class:`MedFocusMethod`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np

from medfocus.concepts import uot
from medfocus.concepts.intervention import (MASK_THRESHOLD, REGIONS, RULES, TAU, decide, intervention_keep, intervention_result, intervention_rows,
                                            nested_winner, variant_boxes)
from medfocus.concepts.reference import SELECT_GRID, TRANSFER_GRID, ReferencePool, cached_pool, default_pool
from medfocus.concepts.transfer import DEFAULT_ITERATIONS, ConceptTransfer, TransferCache, transfer_concepts
from medfocus.attribution import _common
from medfocus.attribution.base import PerturbationMethod, boolean, choice, either, integer, number, obj, optional, path_like
from medfocus.errors import ConfigError
from medfocus.lvlm.scoring import score_chat
from medfocus.types import BILATERAL, Box

if TYPE_CHECKING:  # annotations only: the adapter interface lives in the LVLM layer
    from medfocus.lvlm.adapter import LVLMAdapter

log = logging.getLogger(__name__)

@dataclass
class MedFocusResult:
    """Everything :meth:`MedFocus.attribute` finds for one (image, question, answer).

    Attributes:
        answer: the explained answer (generated when none was given).
        concept: the winning variant (a concept, a bilateral union, or ``"whole image"``).
        box: its enclosing box in original pixels (the full image on fallback).
        boxes: the winner's box(es) (two for a bilateral union).
        fallback: whether the whole-image rule fired (``exp(-max delta) >= tau``).
        deltas: variant -> delta (nats), for the 15 variants.
        token_deltas: variant -> ``(T,)`` per-token drops.
        answer_tokens: the ``T`` scored answer tokens.
        logp_original: ``(T,)`` answer-token log-probs on the original image.
        concept_boxes: concept -> box (original pixels), the 11 concepts.
        soft_masks: concept -> ``(H0, W0)`` float32 soft mask.
        heatmap: ``(H0, W0)`` float32 delta-weighted soft masks, in nats (not normalised; zeros when no delta is positive).
        reference_id: reference image used for the transfer.
        sides: the film orientation the concepts were located for (a mirrored film is transferred in the
            standard display, :mod:`medfocus.concepts.transfer`, "Patient sides").
        refine: box refinement actually applied (``"none"`` or ``"medsam"``).
        tau: fallback threshold used.
        region: what each variant hid (``"box"`` or ``"mask"``).
        rule: how the winner was chosen (``"argmax"`` or ``"nested"``).
        nested_checks: the ``"nested"`` rule's tests ``{"container", "inner", "delta_rest", "accepted"}``.
        seconds: ``{"generate", "transfer", "intervention", "total"}`` wall-clock seconds.
        passes: ``{"generate": g, "forward": n}`` model passes (``n = 16`` variant inputs incl. the
            original, plus one per check of the ``"nested"`` rule).
        transfer_stats: solver / cache statistics of the concept transfer.
    """

    answer: str
    concept: str
    box: Box
    boxes: list[Box]
    fallback: bool
    deltas: dict[str, float]
    token_deltas: dict[str, np.ndarray]
    answer_tokens: list[str]
    logp_original: np.ndarray
    concept_boxes: dict[str, Box]
    soft_masks: dict[str, np.ndarray]
    heatmap: np.ndarray
    reference_id: str
    tau: float
    refine: str = "none"
    sides: str = ""
    region: str = "box"
    rule: str = "argmax"
    nested_checks: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)
    transfer_stats: dict[str, Any] = field(default_factory=dict)

    def ranking(self) -> list[tuple[str, float]]:
        """Variants sorted by decreasing delta."""
        return sorted(self.deltas.items(), key=lambda kv: -kv[1])

    def variant_soft_mask(self, name: str) -> np.ndarray:
        """Soft mask of a concept or a bilateral union (max of the two sides)."""
        if name in BILATERAL:
            l, r = BILATERAL[name]
            return np.maximum(self.soft_masks[l], self.soft_masks[r])
        return self.soft_masks[name]

    def token_heatmaps(self) -> np.ndarray:
        """``(T, H0, W0)`` per-token maps ``sum_c token_delta_c[t] * soft_mask_c`` (unnormalised)."""
        names = list(self.deltas)
        masks = np.stack([self.variant_soft_mask(n) for n in names])  # (K, H, W)
        td = np.stack([self.token_deltas[n] for n in names])  # (K, T)
        return np.tensordot(td.T, masks, axes=1).astype(np.float32)

    def to_attribution(self, n_forward: int | None = None) -> Any:
        """The registry's :class:`~medfocus.attribution.base.Attribution` (same type as the baselines)."""
        from medfocus.attribution.base import Attribution

        T = len(self.answer_tokens)
        H, W = self.heatmap.shape
        # the one memory bound of per-token maps at original resolution, shared with the baselines
        tok = self.token_heatmaps() if T * H * W <= _common.MAX_TOKEN_MAP_FLOATS else None
        fti = _final_token_index(self.answer_tokens)
        extras: dict[str, Any] = {
            "concept": self.concept, "box": list(self.box), "fallback": self.fallback, "tau": self.tau,
            "deltas": dict(self.deltas), "ranking": [n for n, _ in self.ranking()],
            "token_deltas": np.stack([self.token_deltas[n] for n in self.deltas]).astype(np.float32),
            "variant_names": list(self.deltas), "answer_tokens": list(self.answer_tokens), "answer": self.answer,
            "concept_boxes": {c: list(b) for c, b in self.concept_boxes.items()},
            "reference_id": self.reference_id, "sides": self.sides, "refine": self.refine, "region": self.region, "rule": self.rule, "nested_checks": list(self.nested_checks), "seconds_detail": dict(self.seconds), "passes": dict(self.passes),
            "final_token_index": fti,
            # (11, H, W) uint8 on the image the method ran on (the work frame above the working-resolution cap):
            # where each concept's soft mask is >= 0.5 (what region="mask" hides), for display.
            "concept_masks": np.stack([self.soft_masks[c] >= MASK_THRESHOLD for c in self.soft_masks]).astype(np.uint8),
            "concept_mask_names": list(self.soft_masks),
        }
        if tok is not None and T:
            extras["final_token_heatmap"] = tok[fti]
        return Attribution(heatmap=self.heatmap, boxes=list(self.boxes), token_heatmaps=tok,
                           n_forward=self.passes.get("forward", 0) if n_forward is None else n_forward,
                           seconds=self.seconds.get("total", 0.0), extras=extras)


def _final_token_index(tokens: list[str]) -> int:
    """Index of the final yes/no token (the attribution package's rule, one home)."""
    from types import SimpleNamespace

    from medfocus.attribution._common import final_token_index

    return final_token_index(SimpleNamespace(answer_tokens=tokens, n_answer_tokens=len(tokens))) if tokens else 0


class MedFocus:
    """Concept-based causal attribution for one LVLM.

    Args:
        adapter: the :class:`~medfocus.lvlm.adapter.LVLMAdapter`.
        pool: reference pool (default: :func:`~medfocus.concepts.reference.default_pool`).
        baseline: ``"zero"`` or ``"mean"`` replacement of hidden concepts.
        region: ``"box"`` (hide each concept's box, the paper's recipe) or ``"mask"`` (hide its soft
            mask ``>= 0.5``; see :mod:`medfocus.concepts.intervention`).
        rule: winner rule, ``"argmax"`` (the paper) or ``"nested"`` (argmax, then a causal test that
            moves the answer from a container to a concept nested in it; see
            :mod:`medfocus.concepts.intervention`).
        tau: whole-image fallback threshold (0.75).
        refine: ``"none"`` or ``"medsam"`` box refinement.
        refiner: a :class:`~medfocus.concepts.refine.MedSAMRefiner` or checkpoint path (``refine="medsam"``).
        select_grid, transfer_grid, core, mode, iterations, epsilon, lam: transfer settings (14, 56, mode
            default core, ``"barycentric"``, 5, 0.05, 0.1; see :func:`~medfocus.concepts.transfer.transfer_concepts`).
        cache: ``True`` (default cache dir), a directory, or ``False``/``None`` (no transfer cache).
        batch_size: variants per forward pass. max_new_tokens: for generating a missing answer.
        device: device of the OT solver (default: CPU, see :func:`medfocus.concepts.uot.auto_device`).
    """

    def __init__(self, adapter: LVLMAdapter, pool: ReferencePool | str | Path | None = None, *, baseline: str = "zero",
                 region: str = "box", rule: str = "argmax", tau: float = TAU, refine: str = "none", refiner: Any = None, select_grid: int = SELECT_GRID,
                 transfer_grid: int = TRANSFER_GRID, core: float | None = None, mode: str = "barycentric",
                 iterations: int = DEFAULT_ITERATIONS, epsilon: float = uot.EPSILON,
                 lam: float = uot.LAMBDA, cache: bool | str | Path | None = True, batch_size: int = 16,
                 max_new_tokens: int = 128, device: str | None = None) -> None:
        if baseline not in ("zero", "mean"):
            raise ConfigError(f"MedFocus baseline must be 'zero' or 'mean', got {baseline!r}")
        if region not in REGIONS:
            raise ConfigError(f"MedFocus region must be one of {REGIONS}, got {region!r}")
        if rule not in RULES:
            raise ConfigError(f"MedFocus rule must be one of {RULES}, got {rule!r}")
        if refine not in ("none", "medsam"):
            raise ConfigError(f"MedFocus refine must be 'none' or 'medsam', got {refine!r}")
        if not 0.0 < tau <= 1.0:
            raise ConfigError(f"MedFocus tau must be in (0, 1], got {tau}")
        self.adapter = adapter
        self.pool = pool if isinstance(pool, ReferencePool) else (ReferencePool.load(pool) if pool is not None else default_pool())
        self.baseline, self.region, self.rule = baseline, region, rule
        self.tau, self.refine, self.refiner = float(tau), refine, refiner
        self.transfer_kw = {"select_grid": select_grid, "transfer_grid": transfer_grid, "core": core, "mode": mode, "iterations": iterations,
                            "epsilon": epsilon, "lam": lam, "device": device}
        if cache is True:
            self.cache: TransferCache | None = TransferCache()
        elif cache:
            self.cache = TransferCache(cache)
        else:
            self.cache = None
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)

    def transfer(self, image: np.ndarray, orientation: Any = None) -> ConceptTransfer:
        """Concept boxes and soft masks for ``image`` (cached per image), left/right named for the film's
        ``orientation`` (:class:`~medfocus.io.reader.FilmOrientation`; ``None``: the convention ``L\\F``)."""
        return transfer_concepts(image, self.pool, refine=self.refine, refiner=self.refiner, cache=self.cache,
                                 orientation=orientation, **self.transfer_kw)

    def attribute(self, image: np.ndarray, question: str, answer: str | None = None, *, chat: Any = None,
                  orientation: Any = None) -> MedFocusResult:
        """Attribute ``answer`` (or the model's own answer when ``None``) to a concept.

        Args:
            image: ``(H0, W0)`` uint8 grayscale image.
            question: full question (mode suffix included).
            answer: the answer to explain (teacher-forced).
            chat: ``adapter.prepare(image, question, answer)`` when the caller has it already (a sample
                prepared once for every method); ``None`` prepares here.
            orientation: the film's :class:`~medfocus.io.reader.FilmOrientation`
                (:func:`~medfocus.io.reader.read_orientation`; ``None``: the display convention ``L\\F``): on a
                film stored mirrored the concepts are located in the standard display and mirrored back
                (:mod:`medfocus.concepts.transfer`, "Patient sides").
        Raises:
            DataError: an ``orientation`` whose rows do not run left/right (sides cannot be named).
        """
        pl = self.plan(image, question, answer, chat=chat, orientation=orientation)
        t0 = time.perf_counter()
        logp = score_chat(self.adapter, pl.chat, pl.rows, batch_size=self.batch_size).float().cpu().numpy()
        return self.finish(pl, logp, score_seconds=time.perf_counter() - t0)

    def plan(self, image: np.ndarray, question: str, answer: str | None = None, *, chat: Any = None,
             orientation: Any = None) -> "MedFocusPlan":
        """Everything before the intervention rows are scored: the answer (generated when ``None``), the
        concept transfer (sides named for ``orientation``, see :meth:`attribute`), the prepared chat and the
        ``(16, *layout)`` rows (original + 15 variants)."""
        img = np.asarray(image)
        if img.ndim != 2:
            raise ConfigError(f"MedFocus needs a 2-D (H, W) grayscale image, got shape {img.shape}")
        t0 = time.perf_counter()
        n_gen = 0
        if answer is None:
            answer = self.adapter.generate([img], [question], max_new_tokens=self.max_new_tokens)[0]
            n_gen = 1
        if not answer or not str(answer).strip():
            raise ConfigError(f"MedFocus: empty answer to explain for question {question!r}")
        t1 = time.perf_counter()
        tr = self.transfer(img, orientation)
        t2 = time.perf_counter()
        if chat is None:
            chat = self.adapter.prepare(img, question, answer)
        if chat.answer_span is None or chat.n_answer_tokens <= 0:
            raise ConfigError(f"MedFocus: the answer {answer!r} produced no scored tokens")
        names, keep = intervention_keep(self.adapter, chat, tr.boxes, region=self.region, soft_masks=tr.soft_masks)
        rows = intervention_rows(self.adapter, chat, keep, self.baseline)
        t3 = time.perf_counter()
        return MedFocusPlan(image=img, question=question, answer=str(answer), chat=chat, transfer=tr, names=names, keep=keep, rows=rows,
                            n_generate=n_gen, seconds={"generate": t1 - t0, "transfer": t2 - t1, "rows": t3 - t2})

    def finish(self, pl: "MedFocusPlan", logp: np.ndarray, score_seconds: float = 0.0) -> MedFocusResult:
        """The result from the ``(16, T)`` answer-token log-probs of ``pl.rows`` (winner rule, nested checks,
        heatmap). ``score_seconds``: the time scoring the rows took (reported in ``seconds``)."""
        t0 = time.perf_counter()
        img, tr, chat = pl.image, pl.transfer, pl.chat
        iv = intervention_result(pl.names, np.asarray(logp), pl.keep)
        winner, fallback = decide(iv.names, iv.deltas, self.tau)
        checks: list[Any] = []
        n_nested = 0
        if self.rule == "nested" and not fallback:
            winner, checks, n_nested = nested_winner(self.adapter, chat, iv, winner, tau=self.tau, baseline=self.baseline,
                                                     batch_size=self.batch_size)
        t1 = time.perf_counter()
        H0, W0 = img.shape
        if fallback:
            boxes: list[Box] = [(0.0, 0.0, float(W0), float(H0))]
        else:
            boxes = variant_boxes(tr.boxes)[winner]
        box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
        res = MedFocusResult(
            answer=pl.answer, concept=winner, box=box, boxes=list(boxes), fallback=fallback,
            deltas={n: float(d) for n, d in zip(iv.names, iv.deltas)},
            token_deltas={n: iv.token_deltas[i].astype(np.float32) for i, n in enumerate(iv.names)},
            answer_tokens=list(chat.answer_tokens), logp_original=iv.logp_original.astype(np.float32),
            concept_boxes=dict(tr.boxes), soft_masks=dict(tr.soft_masks), heatmap=np.zeros((H0, W0), np.float32),
            reference_id=tr.reference_id, tau=self.tau, refine=tr.refine, sides=tr.sides, region=self.region, rule=self.rule,
            nested_checks=[asdict(c) for c in checks], transfer_stats=dict(tr.stats),
        )
        hm = np.zeros((H0, W0), np.float32)
        for n, d in res.deltas.items():
            if d > 0:
                hm += np.float32(d) * res.variant_soft_mask(n)
        res.heatmap = hm  # nats, like the per-token maps: never stretched to look like a finding when nothing mattered
        t2 = time.perf_counter()
        sec = pl.seconds
        intervention = sec["rows"] + score_seconds + (t1 - t0)
        res.seconds = {"generate": sec["generate"], "transfer": sec["transfer"], "intervention": intervention,
                       "total": sec["generate"] + sec["transfer"] + intervention + (t2 - t1)}
        res.passes = {"generate": pl.n_generate, "forward": iv.n_forward + n_nested}
        return res


#: What MedFocus' spatial heatmap holds (a result record's ``settings["heatmap_units"]``).
HEATMAP_UNITS = "nats: sum over concepts of max(delta, 0) x soft mask"


@dataclass
class MedFocusPlan:
    """:meth:`MedFocus.plan`'s output: one sample's work up to the intervention rows.

    Attributes:
        image: the ``(H0, W0)`` image. question, answer: the explained question and answer.
        chat: its prepared inputs. transfer: the concept transfer.
        names: the 15 variant names. keep: ``(15, canvas_h, canvas_w)`` keep masks.
        rows: ``(16, *layout)`` model inputs, the original first.
        n_generate: answers generated (0 or 1). seconds: ``{"generate", "transfer", "rows"}``.
    """

    image: np.ndarray
    question: str
    answer: str
    chat: Any
    transfer: ConceptTransfer
    names: list[str]
    keep: Any
    rows: Any
    n_generate: int
    seconds: dict[str, float]


# ---- registry entry ---------------------------------------------------------------------------------
def _pool_for(path: str | None) -> ReferencePool:
    return cached_pool(path)


class MedFocusMethod(PerturbationMethod):
    """MedFocus behind the attribution registry (``get_method("medfocus", ...)``).

    ``attribute(adapter, image, question, answer)`` returns an
    :class:`~medfocus.attribution.base.Attribution`: ``heatmap`` = delta-weighted concept soft masks,
    ``boxes`` = the winning concept's box(es), ``token_heatmaps`` = per-token maps, and ``extras``
    with the concept ranking, deltas, per-token drops, concept boxes, reference and fallback flag.
    ``n_forward`` counts the 16 scored inputs (15 variants + original), plus one per check of the
    ``"nested"`` rule.

    Source: the MedFocus paper's method (UOT reference selection and concept transfer, concept
    intervention, answer log-probability drop). Deviation from its public code: the transfer mode
    (``mode="barycentric"`` by default; README "Transfer"); the other defaults are the paper's recipe.
    """

    name = "medfocus"
    per_token_maps = True  # the concept variants are scored per answer token (token_deltas)
    source = "the MedFocus paper's concept intervention; deviation: barycentric UOT transfer by default (README 'Transfer')"
    defaults = {"pool": None, "baseline": "zero", "region": "box", "rule": "argmax", "tau": TAU, "refine": "none", "select_grid": SELECT_GRID,
                "transfer_grid": TRANSFER_GRID, "core": None, "mode": "barycentric", "iterations": DEFAULT_ITERATIONS,
                "epsilon": uot.EPSILON,
                "lam": uot.LAMBDA, "cache": True, "batch_size": 16, "medsam": None}

    spec = {"pool": optional(path_like()), "baseline": choice("zero", "mean"), "region": choice(*REGIONS), "rule": choice(*RULES),
            "tau": number(0, 1, lo_open=True), "refine": choice("none", "medsam"), "select_grid": integer(1),
            "transfer_grid": integer(1), "core": optional(number(0, 1, lo_open=True)), "mode": choice("barycentric", "plan"),
            "iterations": integer(1), "epsilon": number(0, lo_open=True), "lam": number(0, lo_open=True),
            "cache": either(boolean(), path_like()), "batch_size": integer(1),
            "medsam": optional(either(path_like(), obj("a MedSAMRefiner or (model, processor)",
                                                        lambda v: (isinstance(v, tuple) and len(v) == 2) or hasattr(v, "segment"))))}

    #: image-frame extras (boxes converted, maps upsampled above the working-resolution cap). ``concept_masks``
    #: stays in the work frame: ``(11, h, w)`` uint8 display masks, ``(h, w)`` the work size (``extras["work_size"]``;
    #: the image's own size within the cap), same extent as the image.
    frame_extras = {"final_token_heatmap": "map", "box": "box", "concept_boxes": "box_map"}

    def settings(self) -> dict[str, Any]:
        """The resolved settings plus ``pool_fingerprint``, the content hash of the reference pool that
        ``pool`` names (a changed pool under the same path is a different setting)."""
        out = super().settings()
        out["pool_fingerprint"] = _pool_for(str(self.params["pool"]) if self.params.get("pool") else None).fingerprint
        # recorded so that a store written when the map was normalised to max 1 is not served as this map
        out["heatmap_units"] = HEATMAP_UNITS
        return out

    @property
    def uses_synthetic_pool(self) -> bool:
        """``pool=None`` is the default synthetic pool."""
        return not self.params.get("pool")

    def _medfocus(self, adapter: Any) -> MedFocus:
        p = dict(self.params)
        pool = _pool_for(str(p.pop("pool")) if p.get("pool") else None)
        p.pop("pool", None)
        p["refiner"] = p.pop("medsam")  # checkpoint name/path of MedSAM (default: the hub id, local cache only)
        return MedFocus(adapter, pool, **p)

    def _score_plan(self, adapter: Any, image: np.ndarray, chat: Any, counter: Any) -> Any:
        """The 16 intervention rows as a :class:`~medfocus.attribution.passes.ScorePlan`; its ``finish``
        runs the winner rule (and the nested rule's own dependent passes, counted here)."""
        from medfocus.attribution.passes import ScorePlan

        mf = self._medfocus(adapter)
        pl = mf.plan(image, chat.question, chat.answer, chat=chat, orientation=counter.orientation)
        n_rows = int(pl.rows.shape[0])
        counter.n_forward += n_rows

        def finish(logp: Any) -> Any:
            res = mf.finish(pl, np.asarray(logp))
            counter.n_forward += res.passes["forward"] - n_rows  # the nested rule's checks
            return res.to_attribution()

        return ScorePlan(n_rows, lambda i, j: pl.rows[i:j], finish, mf.batch_size)
