"""Training and held-out data of the demo LVLM: synthetic cases rendered onto the model's canvas exactly as
the Qwen adapter renders an image (letterbox, grayscale -> RGB, CLIP normalisation, Qwen patch order)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from medfocus.io.letterbox import Letterbox
from medfocus.training.demo_lvlm.config import DemoLVLMConfig
from medfocus.training.demo_lvlm.tasks import FindingView, _side

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_canvas(image: np.ndarray, canvas: int) -> tuple[np.ndarray, Letterbox]:
    """Letterbox an ``(H0, W0)`` uint8 image onto the ``canvas x canvas`` model input (as the adapter does)."""
    lb = Letterbox.fit((image.shape[1], image.shape[0]), canvas)
    return lb.apply(image), lb


def canvases_to_pixel_values(canvases: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """``(B, S, S)`` uint8 grayscale canvases -> Qwen ``pixel_values`` ``(B * (S/14)^2, 1176)`` float32
    (gray -> RGB, rescale 1/255, CLIP normalisation, Qwen's ``merge x merge``-window patch order)."""
    from medfocus.lvlm.families.qwen_vl import patchify

    x = canvases.float().div(255.0)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pv = patchify((x - mean) / std, merge=merge)  # (B, N, D)
    return pv.reshape(-1, pv.shape[-1]).contiguous()


#: What the cue subset is (card text; ``{faint}``: the faint severity range).
CUE_SUBSET_DESCRIPTION = ("every finding present brings its correlated shortcut cue (`generate_case(cue_rate=1.0)` with the "
                          "world's `DEFAULT_CUE_MAP`: chest tube <-> pleural effusion / pneumothorax, side marker <-> nodule / "
                          "mass, PORTABLE tag <-> cardiomegaly / consolidation / atelectasis) and is drawn faint (severity "
                          "uniform in {faint}; cardiomegaly's size does not depend on severity).")
#: What the cases off the cue subset carry (``{base}``: their uncorrelated cue rate).
CUE_OFF_SUBSET_DESCRIPTION = (" The other cases carry an uncorrelated cue with probability {base}, so a cue alone is strong but "
                              "not perfect evidence.")
CUE_DESCRIPTION = CUE_SUBSET_DESCRIPTION + CUE_OFF_SUBSET_DESCRIPTION


@dataclass
class DemoCase:
    """One rendered case: its canvas image and, per finding present, the instances (canvas frame)."""

    seed: int
    canvas: np.ndarray  # (S, S) uint8
    views: dict[str, list[FindingView]]
    cued: bool
    severity: dict[str, float]
    grid_labels: np.ndarray | None = None  # (n_findings, g, g) float32: share of each token cell covered by each finding
    image: np.ndarray | None = None  # original image, kept for held-out cases only
    source: Any = None  # the SyntheticCase, kept for held-out cases only (counterfactual renderers)


def _zone(box: tuple[float, float, float, float], lungs: np.ndarray | None, H: int) -> str:
    cy = 0.5 * (box[1] + box[3])
    if lungs is not None and lungs.any():
        rows = np.where(lungs.any(axis=1))[0]
        top, bot = rows[0], rows[-1] + 1
    else:
        top, bot = 0, H
    r = (cy - top) / max(1.0, bot - top)
    return "upper" if r < 1 / 3 else ("lower" if r >= 2 / 3 else "middle")


def _concept_of(mask: np.ndarray, concept_masks: dict[str, np.ndarray]) -> str | None:
    best, best_n = None, 0
    for name, cm in concept_masks.items():
        n = int(np.logical_and(mask, cm).sum())
        if n > best_n:
            best, best_n = name, n
    return best


def _side_of(mask: np.ndarray, concept_masks: dict[str, np.ndarray]) -> str | None:
    """Patient side of a finding: the lung / costophrenic concept it overlaps most."""
    sided = {k: v for k, v in concept_masks.items() if k.startswith(("left", "right"))}
    c = _concept_of(mask, sided)
    return _side(c)


def render_case(case: Any, canvas: int, cell: int = 28, aux_target: str = "finding") -> DemoCase:
    """A :class:`~medfocus.datasets.synthetic.SyntheticCase` -> :class:`DemoCase` (canvas frame); ``cell`` is
    the side of one image token's cell on the canvas (28 px for patch 14 with the 2x2 merge).

    ``aux_target`` sets what the grid labels of the auxiliary loss mark for each finding: ``"finding"`` its
    exact mask; ``"cue"`` the ``core_box`` of the shortcut cue drawn *for* it on a case that has such cues
    (the shortcut twin's recipe: the vision tower is taught to see the finding at its cue), its mask otherwise."""
    img = np.asarray(case.image)
    can, lb = to_canvas(img, canvas)
    lungs = None
    cm = case.concept_masks
    if "left lung" in cm and "right lung" in cm:
        lungs = np.logical_or(cm["left lung"], cm["right lung"])
    views: dict[str, list[FindingView]] = {}
    sev: dict[str, float] = {}
    for f in case.findings:
        x1, y1, x2, y2 = lb.forward_box(tuple(float(v) for v in f.box))
        cb = (int(math.floor(x1)), int(math.floor(y1)), int(math.ceil(x2)), int(math.ceil(y2)))
        side = getattr(f, "side", None) or (_side_of(f.mask, cm) if f.name != "cardiomegaly" else None)
        concept = getattr(f, "concept", None) or _concept_of(f.mask, cm)
        views.setdefault(f.name, []).append(FindingView(f.name, cb, side, _zone(f.box, lungs, img.shape[0]), concept))
        sev[f.name] = max(sev.get(f.name, 0.0), float(getattr(f, "severity", 1.0)))
    for k in views:
        views[k].sort(key=lambda v: (v.box[0], v.box[1]))
    # token-cell coverage of every finding (the image tokens' cells of the canvas)
    names = _findings()
    g = canvas // cell
    labels = np.zeros((len(names), g, g), np.float32)
    if aux_target == "cue" and any(c.get("finding") in names for c in case.cues):
        for c in case.cues:
            if c.get("finding") in names:
                m = np.zeros(img.shape[:2], np.float32)
                # the stroke's core box: the twin was trained on it (the full "box" is the scoring truth)
                x1, y1, x2, y2 = (int(round(v)) for v in c["core_box"])
                m[max(0, y1):y2, max(0, x1):x2] = 1.0
                cov = lb.apply(m, fill=0.0).reshape(g, cell, g, cell).mean(axis=(1, 3))
                k = names.index(c["finding"])
                labels[k] = np.maximum(labels[k], cov)
        return DemoCase(seed=-1, canvas=can, views=views, cued=bool(case.cues), severity=sev, grid_labels=labels)
    for f in case.findings:
        cov = lb.apply(np.asarray(f.mask, np.float32), fill=0.0).reshape(g, cell, g, cell).mean(axis=(1, 3))
        labels[names.index(f.name)] = np.maximum(labels[names.index(f.name)], cov)
    return DemoCase(seed=-1, canvas=can, views=views, cued=bool(case.cues), severity=sev, grid_labels=labels)


def _findings() -> tuple[str, ...]:
    from medfocus.datasets.synthetic import FINDINGS

    return tuple(FINDINGS)


def make_case(seed: int, findings: Sequence[str], *, cued: bool, cfg: DemoLVLMConfig, keep: bool = False,
              severity: str = "train") -> DemoCase:
    """Generate and render one synthetic case with exactly ``findings`` present.

    Args:
        cued: the shortcut-cue subset -- every finding brings its correlated cue (``cue_rate=1``,
            :data:`~medfocus.datasets.synthetic.DEFAULT_CUE_MAP`) and is drawn faint (severity uniform in
            ``cfg.faint_severity``); otherwise only an uncorrelated cue with probability ``cfg.cue_base_rate``.
        severity: ``"train"`` -- clean findings get severity uniform in ``cfg.train_severity`` (findings too
            faint to see would only be label noise); ``"default"`` -- the generator's own distribution
            (uniform in [0, 1]), used by the held-out evaluation.
        keep: keep the original image and the :class:`SyntheticCase` (held-out cases).
    """
    from medfocus.datasets.synthetic import generate_case

    rng = np.random.default_rng([int(seed), 7])
    if cued:
        lo, hi = cfg.faint_severity
        kw: dict[str, Any] = {"cue_rate": 1.0, "severity": {f: float(rng.uniform(lo, hi)) for f in findings}}
    else:
        kw = {"cue_rate": 0.0, "cue_base_rate": cfg.cue_base_rate if severity == "train" else 0.0}
        if severity == "train":
            lo, hi = cfg.train_severity
            kw["severity"] = {f: float(rng.uniform(lo, hi)) for f in findings}
    case = generate_case(int(seed), size=cfg.image_size, findings=list(findings), lesion_size_rule=cfg.lesion_size_rule, **kw)
    dc = render_case(case, cfg.canvas, cfg.token_cell, cfg.aux_target)
    dc.seed = int(seed)
    dc.cued = cued
    if keep:
        dc.image, dc.source = np.asarray(case.image), case
    return dc


def _case_plan(rng: random.Random, findings: Sequence[str], i: int, co_occurrence: float = 0.08) -> list[str]:
    """Findings of training case ``i``: a primary finding (cycled) present half of the time, plus each
    other finding with probability ``co_occurrence`` (co-occurring findings, so answers must be
    finding-specific)."""
    primary = findings[i % len(findings)]
    present = [primary] if rng.random() < 0.5 else []
    present += [f for f in findings if f != primary and rng.random() < co_occurrence]
    return present


#: The :class:`DemoLVLMConfig` fields that decide the training pool (what :func:`build_train_pool` and
#: :func:`make_case` read); every other field is in :data:`NON_POOL_FIELDS` (a test checks that the two sets
#: cover the dataclass, so a new field must be classified before a cached pool could be served for it).
POOL_FIELDS = frozenset({"seed", "n_train_cases", "co_occurrence", "cue_subset", "faint_severity", "train_severity",
                         "cue_base_rate", "image_size", "lesion_size_rule", "canvas", "spatial_merge_size", "aux_target"})
NON_POOL_FIELDS = frozenset({"n_eval_per_cell", "vision_steps", "vision_batch", "steps", "images_per_step",
                             "questions_per_image", "lr", "warmup", "weight_decay", "task_weights", "text", "vision",
                             "tokenizer_vocab", "aux_weight", "aux_pos_weight", "stage2_vision_lr_scale", "focus_steps",
                             "focus_lr", "hard_negative_pairs", "hard_negative_share", "focus_findings", "focus_share",
                             "num_threads", "eval_every", "checkpoint_every"})


def pool_key(cfg: DemoLVLMConfig) -> str:
    """sha256 (hex) naming the training pool of ``cfg``: its :data:`POOL_FIELDS`, the medfocus version, the
    versions of the libraries that render films (numpy, scipy, OpenCV) and the source of the code that draws
    and renders them (``datasets/synthetic`` with its prior table, this module, the templates' module, the
    letterbox, ``types``). Any change
    to those gives another key, so a cached pool is never served for different data."""
    import hashlib
    import json
    from dataclasses import asdict
    from importlib import metadata

    import medfocus

    h = hashlib.sha256()
    fields = {k: v for k, v in asdict(cfg).items() if k in POOL_FIELDS}
    versions = {"medfocus": medfocus.__version__}
    for dist in ("numpy", "scipy", "opencv-python-headless", "opencv-python"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    h.update(json.dumps({"fields": fields, "versions": versions}, sort_keys=True).encode())
    root = Path(medfocus.__file__).parent
    # every file the synthetic world reads (its modules and the NIH box-prior table), the name constants
    # (finding and concept order index the grid labels) and the rendering here
    synthetic = root / "datasets" / "synthetic"
    sources = sorted([*synthetic.glob("*.py"), *synthetic.glob("*.json")]) + [
        Path(__file__), root / "training" / "demo_lvlm" / "tasks.py", root / "io" / "letterbox.py", root / "types.py"]
    for src in sources:
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return h.hexdigest()


def _pool_to_arrays(pool: Sequence[DemoCase], key: str) -> dict[str, np.ndarray]:
    import json

    meta = [{"views": {k: [[v.name, list(v.box), v.side, v.zone, v.concept] for v in vs] for k, vs in c.views.items()},
             "severity": c.severity} for c in pool]
    return {"key": np.array(key), "seed": np.array([c.seed for c in pool], np.int64),
            "cued": np.array([c.cued for c in pool], bool), "canvas": np.stack([c.canvas for c in pool]),
            "grid_labels": np.stack([c.grid_labels for c in pool]), "meta": np.array(json.dumps(meta))}


def _pool_from_arrays(z: Any, key: str, n: int) -> list[DemoCase]:
    import json

    if str(z["key"]) != key:
        raise ValueError("its key is not this configuration's")
    meta = json.loads(str(z["meta"]))
    seed, cued, canvas, labels = z["seed"], z["cued"], z["canvas"], z["grid_labels"]
    if not (len(meta) == len(seed) == len(cued) == canvas.shape[0] == labels.shape[0] == n):
        raise ValueError(f"it holds {canvas.shape[0]} cases, expected {n}")
    return [DemoCase(seed=int(seed[i]), canvas=canvas[i], cued=bool(cued[i]), severity={k: float(v) for k, v in m["severity"].items()},
                     views={k: [FindingView(v[0], tuple(int(b) for b in v[1]), v[2], v[3], v[4]) for v in vs] for k, vs in m["views"].items()},
                     grid_labels=labels[i])
            for i, m in enumerate(meta)]


def pool_cache_file(cfg: DemoLVLMConfig, cache_dir: str | Path, key: str | None = None) -> Path:
    """The file of ``cfg``'s training pool in ``cache_dir`` (``train-pool-<key>.npz``; ``key``: :func:`pool_key`
    of ``cfg``, computed when not given)."""
    return Path(cache_dir) / f"train-pool-{(key or pool_key(cfg))[:24]}.npz"


def build_train_pool(cfg: DemoLVLMConfig, progress: bool = True, *, cache_dir: str | Path | None = None,
                     log: Callable[[str], None] | None = None) -> list[DemoCase]:
    """The training cases (seeds ``cfg.seed * 1_000_003 + i``; disjoint from :func:`build_eval_pool`).

    With ``cache_dir``, the rendered pool is kept there as ``train-pool-<key>.npz`` (:func:`pool_key`; written
    atomically, read with ``allow_pickle=False``) and a later run whose pool fields, library versions and
    rendering code are the same loads it instead of rendering the cases again (a resumed run or a stage-3
    ``--init-from`` run needs the same pool; rendering is a large share of a CPU run). A cache file that cannot
    be read as such a pool is reported through ``log`` and replaced.
    """
    if cache_dir is None:
        return _render_train_pool(cfg, progress)
    key = pool_key(cfg)
    path = pool_cache_file(cfg, cache_dir, key)
    say = log or (lambda _msg: None)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                pool = _pool_from_arrays(z, key, cfg.n_train_cases)
            say(f"training pool loaded from {path} ({len(pool)} cases)")
            return pool
        except Exception as exc:  # corrupt, truncated, foreign or another key: render afresh and replace it
            say(f"training pool cache {path} not used ({type(exc).__name__}: {exc}); rendering the cases again")
    pool = _render_train_pool(cfg, progress)
    from medfocus.io.atomic import atomic_save_npz

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(path, **_pool_to_arrays(pool, key))
    say(f"training pool cached at {path}")
    return pool


def _render_train_pool(cfg: DemoLVLMConfig, progress: bool) -> list[DemoCase]:
    from tqdm import tqdm

    findings = _findings()
    rng = random.Random(cfg.seed)
    pool = []
    for i in tqdm(range(cfg.n_train_cases), desc="train cases", disable=not progress):
        present = _case_plan(rng, findings, i, cfg.co_occurrence)
        cued = rng.random() < cfg.cue_subset
        pool.append(make_case(cfg.seed * 1_000_003 + i, present, cued=cued, cfg=cfg))
    return pool


def build_eval_pool(cfg: DemoLVLMConfig, n_per_cell: int | None = None, progress: bool = True, *, cued: bool = False,
                    seed_offset: int = 500_000) -> list[tuple[DemoCase, str, bool]]:
    """Held-out ``(case, finding, present)`` triples: ``n_per_cell`` per (finding, Yes/No), fresh seeds.

    Positives have the finding (plus sometimes one other); negatives have 0-1 other findings."""
    from tqdm import tqdm

    findings = _findings()
    n = cfg.n_eval_per_cell if n_per_cell is None else n_per_cell
    rng = random.Random(cfg.seed + 7919 + seed_offset)
    out = []
    k = 0
    for f in findings:
        for present in (True, False):
            for _ in range(n):
                others = [g for g in findings if g != f]
                extra = [rng.choice(others)] if rng.random() < 0.3 else []
                fl = ([f] if present else []) + extra
                out.append((fl, f, present, cfg.seed * 1_000_003 + seed_offset + k))
                k += 1
    return [(make_case(s, fl, cued=cued, cfg=cfg, keep=True, severity="default"), f, p)
            for fl, f, p, s in tqdm(out, desc="eval cases", disable=not progress)]
