"""One synthetic chest X-ray with exact ground truth and its counterfactual oracles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfocus.datasets.synthetic.cues import DEFAULT_CUE_MAP, CUE_TYPES, draw_cue
from medfocus.datasets.synthetic.findings import (
    DEFAULT_LESION_SIZE_RULE,
    FINDING_WEIGHTS,
    FINDINGS,
    LESION_SIZE_RULES,
    FindingSpec,
    build_finding,
    cardiomegaly_heart,
    sample_spec,
)
from medfocus.datasets.synthetic.phantom import (
    Anatomy,
    Layer,
    build_geometry,
    compose,
    jitter_anatomy,
    mask_box,
    sample_anatomy,
)
from medfocus.errors import ConfigError
from medfocus.types import Box

# Independent random streams of one case (so e.g. adding a cue never changes the anatomy).
_STREAM_ANATOMY, _STREAM_FINDINGS, _STREAM_CUES, _STREAM_BACKGROUND = 1, 2, 3, 4


@dataclass
class SyntheticFinding:
    """A drawn finding: ``box`` is the half-open pixel bounding box of the exact ``mask`` (H, W) bool."""

    name: str
    box: Box
    mask: np.ndarray
    severity: float
    side: str | None = None
    concept: str | None = None
    spec: FindingSpec | None = None


@dataclass
class SyntheticCase:
    """A generated radiograph with exact masks, findings, cues and counterfactual renderers.

    Attributes:
        seed: generator seed; ``size``: image side (px).
        image: ``(size, size)`` uint8, MONOCHROME2.
        concept_masks: the 11 :data:`medfocus.types.CONCEPTS` -> ``(size, size)`` bool (radiological left = image right).
        findings: drawn findings (at most one per type).
        cues: ``[{"type", "box", "core_box", "text", "finding"}]`` shortcut cues
            (:mod:`~medfocus.datasets.synthetic.cues`: ``box`` holds every pixel the cue changes).
        cues_dropped: ``[{"type", "finding"}]`` cues that were drawn (``cue_rate`` / ``cue_base_rate``)
            but could not be placed clear of the findings and earlier cues, so the film has no cue of
            that type (``finding`` None: the uncorrelated cue). A finding whose cue type another
            finding's cue already placed shares that cue and is not listed.
    """

    seed: int
    size: int
    image: np.ndarray
    concept_masks: dict[str, np.ndarray]
    findings: list[SyntheticFinding]
    cues: list[dict[str, Any]]
    anatomy: Anatomy
    _layers: dict[str, Layer] = field(default_factory=dict, repr=False)
    _cue_alpha: np.ndarray | None = field(default=None, repr=False)
    _heart_wh: tuple[float, float] | None = field(default=None, repr=False)
    cues_dropped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finding_names(self) -> list[str]:
        return [f.name for f in self.findings]

    def finding(self, name: str) -> SyntheticFinding:
        """The drawn finding called ``name`` (:class:`~medfocus.errors.ConfigError` if absent)."""
        for f in self.findings:
            if f.name == name:
                return f
        raise ConfigError(f"synthetic case seed={self.seed} has no finding {name!r}; it has {self.finding_names}")

    # -- counterfactuals -------------------------------------------------------------------------
    def foreground(self, name: str) -> np.ndarray:
        """The same image with finding ``name`` absent (same anatomy, noise, cues and other findings).

        Pixels differ only near the finding (inside a dilation of its box by the rendering PSF).
        """
        self.finding(name)
        heart = None if name == "cardiomegaly" else self._heart_wh
        geo = build_geometry(self.anatomy, self.size, heart)
        layers = [lay for n, lay in self._layers.items() if n != name]
        return compose(geo, layers, self._cue_alpha)

    def background(self, name: str) -> np.ndarray:
        """Finding ``name`` pixel-identical inside its box; anatomy/texture outside re-drawn from another
        random state, the other findings re-drawn on it, shortcut cues removed."""
        return self._background(name, keep_others=True)

    def background_normal(self, name: str) -> np.ndarray:
        """As :meth:`background`, and every other finding outside the box removed too."""
        return self._background(name, keep_others=False)

    def _background(self, name: str, keep_others: bool) -> np.ndarray:
        f = self.finding(name)
        rng = np.random.default_rng([self.seed, _STREAM_BACKGROUND, int(keep_others), FINDINGS.index(name)])
        anat = jitter_anatomy(self.anatomy, rng)
        others = [g for g in self.findings if g.name != name] if keep_others else []
        enlarged = name == "cardiomegaly" or any(g.name == "cardiomegaly" for g in others)
        geo = build_geometry(anat, self.size, self._heart_wh if enlarged else None)
        layers = [build_finding(g.spec, geo)[1] for g in others if g.name != "cardiomegaly" and g.spec is not None]
        new = compose(geo, layers, None)
        return paste_box(self.image, new, f.box)


def paste_box(original: np.ndarray, new: np.ndarray, box: Box, feather: int | None = None) -> np.ndarray:
    """``new`` with ``original`` pasted exactly inside ``box`` and blended in a thin band outside it.

    The band (``feather`` px, default ``size/64``) hides the seam; inside the box the output equals
    ``original`` bit for bit.
    """
    S = original.shape[0]
    feather = max(2, S // 64) if feather is None else int(feather)
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    yy = np.arange(S, dtype=np.float32)[:, None]
    xx = np.arange(S, dtype=np.float32)[None, :]
    dx = np.maximum(np.maximum(x1 - (xx + 0.5), (xx + 0.5) - x2), 0)
    dy = np.maximum(np.maximum(y1 - (yy + 0.5), (yy + 0.5) - y2), 0)
    dist = np.sqrt(dx * dx + dy * dy)
    alpha = np.clip(1.0 - dist / (feather + 1.0), 0.0, 1.0)
    out = np.round(alpha * original.astype(np.float32) + (1 - alpha) * new.astype(np.float32))
    out = np.clip(out, 0, 255).astype(np.uint8)
    out[y1:y2, x1:x2] = original[y1:y2, x1:x2]
    return out


def _concept_for(name: str, side: str | None) -> str:
    if name == "cardiomegaly":
        return "cardiac silhouette"
    if name == "pleural effusion":
        return f"{side} costophrenic angle"
    return f"{side} lung"


def _choose_findings(rng: np.random.Generator, p_normal: float, max_findings: int) -> list[str]:
    if rng.random() < p_normal:
        return []
    k = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    k = max(1, min(k, max_findings))
    w = np.array([FINDING_WEIGHTS[f] for f in FINDINGS], float)
    idx = rng.choice(len(FINDINGS), size=k, replace=False, p=w / w.sum())
    return [FINDINGS[i] for i in sorted(idx)]


def generate_case(
    seed: int,
    size: int = 256,
    findings: list[str] | None = None,
    cue_rate: float = 0.0,
    *,
    cue_base_rate: float = 0.0,
    cue_map: dict[str, str] | None = None,
    severity: float | dict[str, float] | None = None,
    p_normal: float = 0.3,
    max_findings: int = 3,
    lesion_size_rule: str = DEFAULT_LESION_SIZE_RULE,
) -> SyntheticCase:
    """Generate one synthetic frontal chest radiograph, deterministically from ``seed``.

    Args:
        seed: random seed (same seed and arguments -> identical bytes).
        size: image side in pixels (64..2048; 256 default, 1024 like the real datasets).
        findings: finding names to draw (subset of :data:`FINDINGS`, each at most once); ``[]`` gives a
            normal film; ``None`` draws a random set (normal with probability ``p_normal``).
        cue_rate: probability that each drawn finding brings its correlated shortcut cue
            (``cue_map[finding]``), i.e. the cue/finding correlation knob.
        cue_base_rate: probability of one uncorrelated random cue (in normals too), so cues alone are not
            a perfect predictor.
        cue_map: finding -> cue type (default :data:`DEFAULT_CUE_MAP`).
        severity: one value in ``[0, 1]`` for all findings, a per-finding dict, or ``None`` (random).
        p_normal, max_findings: used only when ``findings`` is ``None``.
        lesion_size_rule: how nodule and mass sizes are drawn, one of
            :data:`~medfocus.datasets.synthetic.findings.LESION_SIZE_RULES` (``"nih"``: the NIH box priors, whose
            nodule and mass sizes overlap; ``"fleischner"``: nodule <= 3 cm < mass, the radiological definition).

    Returns:
        A :class:`SyntheticCase`.
    """
    size = int(size)
    if not 64 <= size <= 2048:
        raise ConfigError(f"synthetic image size must be in 64..2048 px, got {size}")
    if not 0.0 <= cue_rate <= 1.0 or not 0.0 <= cue_base_rate <= 1.0:
        raise ConfigError(f"cue_rate / cue_base_rate must lie in [0, 1], got {cue_rate}, {cue_base_rate}")
    if lesion_size_rule not in LESION_SIZE_RULES:
        raise ConfigError(f"lesion_size_rule must be one of {list(LESION_SIZE_RULES)}, got {lesion_size_rule!r}")
    cue_map = dict(DEFAULT_CUE_MAP if cue_map is None else cue_map)
    rng_f = np.random.default_rng([int(seed), _STREAM_FINDINGS])
    if findings is None:
        names = _choose_findings(rng_f, p_normal, max_findings)
    else:
        bad = [f for f in findings if f not in FINDINGS]
        if bad or len(set(findings)) != len(findings):
            raise ConfigError(f"findings must be distinct names from {FINDINGS}, got {findings}")
        names = [f for f in FINDINGS if f in findings]
    anat = sample_anatomy(np.random.default_rng([int(seed), _STREAM_ANATOMY]))

    def sev_of(n: str) -> float | None:
        if isinstance(severity, dict):
            return severity.get(n)
        return severity

    heart_wh = None
    specs: dict[str, FindingSpec] = {}
    if "cardiomegaly" in names:
        sp, _, _ = sample_spec("cardiomegaly", build_geometry(anat, 64), rng_f, sev_of("cardiomegaly"), [])
        heart_wh = cardiomegaly_heart(anat, sp)
        ctr = heart_wh[0] / anat.thorax_width
        sev = float(np.clip((ctr - 0.55) / 0.2, 0, 1))
        specs["cardiomegaly"] = FindingSpec(sp.name, None, sp.cx, sp.cy, heart_wh[0], heart_wh[1], sev, sp.seed)
    geo = build_geometry(anat, size, heart_wh)

    out: list[SyntheticFinding] = []
    layers: dict[str, Layer] = {}
    taken: list[Box] = []
    if "cardiomegaly" in names:
        m = geo.masks["cardiac silhouette"]
        box = mask_box(m)
        sp = specs["cardiomegaly"]
        out.append(SyntheticFinding("cardiomegaly", box, m.copy(), sp.severity, None, "cardiac silhouette", sp))
        taken.append(box)
    for n in names:
        if n == "cardiomegaly":
            continue
        sp, m, lay = sample_spec(n, geo, rng_f, sev_of(n), taken, lesion_size_rule=lesion_size_rule)
        box = mask_box(m)
        out.append(SyntheticFinding(n, box, m, sp.severity, sp.side, _concept_for(n, sp.side), sp))
        layers[n] = lay
        taken.append(box)

    # Shortcut cues (own stream: the same seed with or without cues has the same anatomy/findings).
    rng_c = np.random.default_rng([int(seed), _STREAM_CUES])
    cues: list[dict[str, Any]] = []
    cue_alpha = None
    wanted: list[tuple[str, str | None]] = []
    for f in out:
        if rng_c.random() < cue_rate and f.name in cue_map:
            wanted.append((cue_map[f.name], f.name))
    if rng_c.random() < cue_base_rate:
        wanted.append((CUE_TYPES[int(rng_c.integers(len(CUE_TYPES)))], None))
    seen: set[str] = set()
    for kind, fname in wanted:
        if kind in seen:
            continue
        res = draw_cue(kind, geo, rng_c, taken + [tuple(c["core_box"]) for c in cues])
        if res is None:
            continue
        alpha, rec = res
        rec["finding"] = fname
        cues.append(rec)
        seen.add(kind)
        cue_alpha = alpha if cue_alpha is None else np.maximum(cue_alpha, alpha)
    # A cue that found no clear spot is recorded, not silently missing: the achieved cue rate can
    # fall below the requested one (small films, several findings), and the manifest says by how much.
    dropped = [{"type": kind, "finding": fname} for kind, fname in wanted if kind not in seen]

    image = compose(geo, list(layers.values()), cue_alpha)
    return SyntheticCase(
        seed=int(seed),
        size=size,
        image=image,
        concept_masks={k: v.copy() for k, v in geo.masks.items()},
        findings=out,
        cues=cues,
        anatomy=anat,
        _layers=layers,
        _cue_alpha=cue_alpha,
        _heart_wh=heart_wh,
        cues_dropped=dropped,
    )
