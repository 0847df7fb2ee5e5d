"""Write / read a synthetic dataset on disk in the real VinDr-CXR layout, plus an exact-ground-truth manifest.

Layout written by :func:`write_dataset` under ``out_dir``::

    vindr-cxr/1.0.0/annotations/annotations_test.csv   real VinDr columns: image_id,class_name,class_id,
                                                        rad_id,x_min,y_min,x_max,y_max ("No finding" rows
                                                        with empty boxes for normal films)
    vindr-cxr/1.0.0/test/<image_id>.dicom               DICOM (DX, MONOCHROME2, 8-bit) written with pydicom
    chest-imagenome/1.0.0/regions.csv                   ImaGenome-style region table: image_id, bbox_name
                                                        (the 11 concepts), x1,y1,x2,y2 (original pixels),
                                                        width, height
    chest-imagenome/1.0.0/gold_dataset/gold_object_attribute_with_coordinates.txt
                                                        the ImaGenome gold-table columns (tab-separated) for
                                                        the findings: patient_id, study_id, image_id (.dcm),
                                                        bbox (region = concept), label_name (our finding
                                                        name), categoryID "anatomicalfinding", relation 1,
                                                        coord_original "[x1, y1, x2, y2]"
    mimic-cxr-jpg/2.1.0/files/p<PP>/p<patient>/s<study>/<image_id>.jpg
                                                        JPEG copies (quality 95, lossy) so the real ImaGenome
                                                        loader reads the folder too (``imagenome=True``)
    images/<image_id>.png                               the same image as 8-bit PNG
    masks/<image_id>/<concept_slug>.png                 the 11 exact concept masks (uint8 0/255)
    masks/<image_id>/finding_<finding_slug>.png         exact finding masks
    counterfactuals/<image_id>/<finding_slug>_<kind>.png  kind in foreground/background/background_normal
    manifest.json                                       everything above + cues + the sample list; per film
                                                        ``cues_dropped`` (drawn cues that found no clear spot)
                                                        and their totals in ``cue_placement``; the
                                                        world's ``lesion_size_rule`` (how nodule and mass
                                                        sizes were drawn)

The folder holds one dataset and nothing else: :func:`write_dataset` refuses a non-empty folder unless
``overwrite`` (then only a folder it wrote before, with its manifest), builds the new dataset under a
temporary name next to it and swaps it in only when complete (:func:`medfocus.io.atomic.atomic_directory`),
so no film of an earlier run stays behind and a failed run leaves the old folder as it was.

Boxes are half-open pixel edges (a finding over columns 3..5 has x_min = 3, x_max = 6). VinDr has one
joint "Nodule/Mass" class, so a film with both a nodule and a mass gives one VinDr sample with two boxes
but two synthetic samples (``load_synthetic``).

Samples (:func:`load_synthetic`): for each image (in order) its positives (one per finding, answer
``"Yes"``, boxes = [finding box]) then its negatives (answer ``"No"``, no boxes). Negatives are balanced
per question: for each finding, as many negatives as positives, drawn (seeded) from the films that do not
show it. ``Sample.meta`` holds ``image_id``, ``case_seed``, ``root`` (absolute dataset folder),
``counterfactuals`` (positives), ``cues``, ``concept_masks``, ``finding_masks``, ``vindr_class``.
Paths inside the manifest are relative to the dataset folder; :func:`load_synthetic` makes them absolute.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from medfocus.datasets.synthetic import GENERATOR_VERSION
from medfocus.datasets.synthetic.case import generate_case
from medfocus.datasets.synthetic.findings import DEFAULT_LESION_SIZE_RULE, FINDINGS, LESION_SIZE_RULES, VINDR_CLASS
from medfocus.errors import ConfigError, DataError, DataWarning
from medfocus.io.atomic import atomic_directory, atomic_write_text
from medfocus.io.paths import resolve_inside
from medfocus.types import CONCEPTS, Sample, concept_slug, question_stem

MANIFEST = "manifest.json"
VINDR_DIR = Path("vindr-cxr") / "1.0.0"
SPLIT = "test"
CF_KINDS = ("foreground", "background", "background_normal")
RAD_ID = "R1"  # VinDr radiologist ids look like R1..R17


def case_seed(seed: int, i: int) -> int:
    """Seed of the ``i``-th film of a dataset with master ``seed`` (distinct for ``i < 100000``)."""
    return int(seed) * 100_000 + int(i)


def image_id_for(seed: int, i: int) -> str:
    """A VinDr-like 32-hex image id, deterministic in ``(seed, i)``."""
    return hashlib.md5(f"medfocus-synthetic/{seed}/{i}".encode()).hexdigest()


def _write_png(path: Path, arr: np.ndarray) -> str:
    from medfocus.io.writers import write_png

    write_png(path, arr)
    return str(path)


#: ``ImageComments`` of every synthetic DICOM: how a film is recognised as synthetic outside the dataset layout.
SYNTHETIC_MARK = "medfocus synthetic phantom"


def _write_dicom(path: Path, image: np.ndarray, image_id: str) -> None:
    """DICOM via the Foundations writer, with UIDs and dates derived from the image id (same bytes per seed)."""
    import pydicom
    from pydicom.uid import generate_uid

    from medfocus.io.writers import write_dicom

    uid = lambda k: generate_uid(entropy_srcs=[image_id, k])  # noqa: E731
    write_dicom(
        path,
        image,
        "MONOCHROME2",
        SOPInstanceUID=uid("sop"),
        StudyInstanceUID=uid("study"),
        SeriesInstanceUID=uid("series"),
        StudyDate="20000101",
        ContentDate="20000101",
        PatientID=image_id[:16],
        PatientName="Synthetic^Phantom",
        ImageComments=SYNTHETIC_MARK,
        WindowCenter=128,
        WindowWidth=256,
    )
    # The writer draws the file-meta instance UID at random; make it match the dataset's.
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def _render_one(args: tuple[str, int, int, int, float, float, bool, bool, str]) -> dict[str, Any]:
    """Generate film ``i`` and write its files; returns its manifest entry (paths relative to ``out``)."""
    out_s, seed, i, size, cue_rate, cue_base_rate, counterfactuals, imagenome, size_rule = args
    out = Path(out_s)
    cs = case_seed(seed, i)
    iid = image_id_for(seed, i)
    case = generate_case(cs, size=size, cue_rate=cue_rate, cue_base_rate=cue_base_rate, lesion_size_rule=size_rule)
    rel = lambda p: str(Path(p).relative_to(out))  # noqa: E731
    dicom = out / VINDR_DIR / SPLIT / f"{iid}.dicom"
    _write_dicom(dicom, case.image, iid)
    png = Path(_write_png(out / "images" / f"{iid}.png", case.image))
    # MIMIC-style ids for the ImaGenome copy (8-digit patient / study ids, unique per film).
    mimic_ids = (10_000_000 + i, 50_000_000 + i)
    if imagenome:
        from PIL import Image

        jpg = out / "mimic-cxr-jpg" / "2.1.0" / "files" / f"p{str(mimic_ids[0])[:2]}" / f"p{mimic_ids[0]}" / f"s{mimic_ids[1]}" / f"{iid}.jpg"
        jpg.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(case.image).save(jpg, format="JPEG", quality=95)
    cmasks = {}
    for c in CONCEPTS:
        p = _write_png(out / "masks" / iid / f"{concept_slug(c)}.png", case.concept_masks[c].astype(np.uint8) * 255)
        cmasks[c] = rel(p)
    finds = []
    for f in case.findings:
        slug = concept_slug(f.name)
        mp = _write_png(out / "masks" / iid / f"finding_{slug}.png", f.mask.astype(np.uint8) * 255)
        cfs = {}
        if counterfactuals:
            for kind in CF_KINDS:
                img = getattr(case, kind)(f.name)
                cfs[kind] = rel(_write_png(out / "counterfactuals" / iid / f"{slug}_{kind}.png", img))
        finds.append(
            {
                "name": f.name,
                "box": [float(v) for v in f.box],
                "severity": round(float(f.severity), 4),
                "side": f.side,
                "concept": f.concept,
                "mask": rel(mp),
                "counterfactuals": cfs,
                "spec": f.spec.to_dict() if f.spec is not None else None,
            }
        )
    regions = {c: _box_of(case.concept_masks[c]) for c in CONCEPTS}
    return {
        "image_id": iid,
        "case_seed": cs,
        "dicom": rel(dicom),
        "png": rel(png),
        "mimic_ids": list(mimic_ids),
        "size": [size, size],
        "findings": finds,
        "cues": [{**c, "box": [float(v) for v in c["box"]]} for c in case.cues],
        "cues_dropped": list(case.cues_dropped),
        "concept_masks": cmasks,
        "regions": regions,
    }


def _box_of(mask: np.ndarray) -> list[float] | None:
    from medfocus.datasets.synthetic.phantom import mask_box

    b = mask_box(mask)
    return None if b is None else [float(v) for v in b]


def _samples_from_images(images: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Positives + per-question balanced negatives, in stable order (see module docstring)."""
    rng = np.random.default_rng([int(seed), 99])
    neg_of: dict[int, list[str]] = {k: [] for k in range(len(images))}
    for name in FINDINGS:
        pos = sum(1 for im in images for f in im["findings"] if f["name"] == name)
        cand = [k for k, im in enumerate(images) if all(f["name"] != name for f in im["findings"])]
        if pos == 0 or not cand:
            continue
        pick = rng.choice(len(cand), size=min(pos, len(cand)), replace=False)
        for j in sorted(int(p) for p in pick):
            neg_of[cand[j]].append(name)
    out: list[dict[str, Any]] = []
    for k, im in enumerate(images):
        fmasks = {f["name"]: f["mask"] for f in im["findings"]}
        base_meta = {
            "image_id": im["image_id"],
            "case_seed": im["case_seed"],
            "png": im["png"],
            "cues": im["cues"],
            "concept_masks": im["concept_masks"],
            "finding_masks": fmasks,
            "findings_present": [f["name"] for f in im["findings"]],
        }
        for f in im["findings"]:
            meta = dict(base_meta, counterfactuals=f["counterfactuals"], finding_mask=f["mask"],
                        severity=f["severity"], vindr_class=VINDR_CLASS[f["name"]][0])
            out.append({"image_path": im["dicom"], "attribute": f["name"], "answer": "Yes", "boxes": [f["box"]],
                        "image_size": im["size"], "concept": f["concept"], "meta": meta})
        for name in sorted(neg_of[k], key=FINDINGS.index):
            meta = dict(base_meta, counterfactuals={}, vindr_class=VINDR_CLASS[name][0])
            out.append({"image_path": im["dicom"], "attribute": name, "answer": "No", "boxes": [],
                        "image_size": im["size"], "concept": None, "meta": meta})
    for idx, s in enumerate(out):
        s["index"] = idx
        s["dataset"] = "synthetic"
        s["question"] = question_stem(s["attribute"])
    return out


def _write_tables(out: Path, images: list[dict[str, Any]]) -> None:
    import pandas as pd

    rows = []
    for im in images:
        if not im["findings"]:
            rows.append({"image_id": im["image_id"], "class_name": "No finding", "class_id": 14, "rad_id": RAD_ID,
                         "x_min": None, "y_min": None, "x_max": None, "y_max": None})
        for f in im["findings"]:
            cname, cid = VINDR_CLASS[f["name"]]
            x1, y1, x2, y2 = f["box"]
            rows.append({"image_id": im["image_id"], "class_name": cname, "class_id": cid, "rad_id": RAD_ID,
                         "x_min": x1, "y_min": y1, "x_max": x2, "y_max": y2})
    ann = out / VINDR_DIR / "annotations" / f"annotations_{SPLIT}.csv"
    ann.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]).to_csv(ann, index=False)

    reg, gold = [], []
    ig = out / "chest-imagenome" / "1.0.0"
    for k, im in enumerate(images):
        for c, b in im["regions"].items():
            if b is not None:
                reg.append({"image_id": im["image_id"], "bbox_name": c, "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3],
                            "width": im["size"][0], "height": im["size"][1]})
        for f in im["findings"]:
            x1, y1, x2, y2 = f["box"]
            pid, sid = im["mimic_ids"]
            gold.append({"patient_id": pid, "study_id": sid, "image_id": f"{im['image_id']}.dcm",
                         "bbox": f["concept"], "label_name": f["name"], "categoryID": "anatomicalfinding",
                         "relation": 1, "coord_original": f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}]"})
    (ig / "gold_dataset").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(reg, columns=["image_id", "bbox_name", "x1", "y1", "x2", "y2", "width", "height"]).to_csv(ig / "regions.csv", index=False)
    pd.DataFrame(gold, columns=["patient_id", "study_id", "image_id", "bbox", "label_name", "categoryID", "relation", "coord_original"]).to_csv(
        ig / "gold_dataset" / "gold_object_attribute_with_coordinates.txt", sep="\t", index=False)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that holds anything but (with ``overwrite``) an earlier synthetic dataset."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    if not overwrite:
        raise DataError(f"--out {out} is not empty ({len(entries)} entries: {shown}); a synthetic dataset gets a folder "
                        "of its own, so files of an earlier run never mix with the new films: choose a new --out, or "
                        "pass --overwrite to replace the folder (the old one is removed once the new one is complete)")
    try:
        fmt = json.loads((out / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != "medfocus-synthetic":
        raise DataError(f"--overwrite replaces only a folder written by `medfocus synth` (with its {MANIFEST}); "
                        f"--out {out} holds other files ({shown}): remove them yourself or choose a new --out")


def cue_placement(images: list[dict[str, Any]]) -> dict[str, int]:
    """Totals of the drawn cues over a manifest's ``images``: ``correlated_placed`` / ``correlated_dropped``
    (a finding's own cue; one placed cue may serve two findings mapped to its type) and
    ``uncorrelated_placed`` / ``uncorrelated_dropped`` (``cue_base_rate``)."""
    placed = [c for im in images for c in im["cues"]]
    dropped = [c for im in images for c in im.get("cues_dropped") or []]
    return {"correlated_placed": sum(c.get("finding") is not None for c in placed),
            "correlated_dropped": sum(c.get("finding") is not None for c in dropped),
            "uncorrelated_placed": sum(c.get("finding") is None for c in placed),
            "uncorrelated_dropped": sum(c.get("finding") is None for c in dropped)}


def write_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    size: int = 256,
    cue_rate: float = 0.0,
    *,
    cue_base_rate: float = 0.0,
    lesion_size_rule: str = DEFAULT_LESION_SIZE_RULE,
    counterfactuals: bool = True,
    imagenome: bool = True,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Generate ``n`` films and write them in the VinDr-CXR layout with a manifest (see module docstring).

    Args:
        out_dir: output folder: absent or empty, or (``overwrite``) a folder this function wrote before,
            which is replaced as a whole once the new dataset is complete.
        n: number of films (a film may carry several findings; normals ~30 %).
        seed: master seed; film ``i`` uses :func:`case_seed` ``(seed, i)`` so the output is identical for
            any ``workers``.
        size: image side in pixels.
        cue_rate, cue_base_rate: shortcut-cue correlation knobs (see :func:`generate_case`).
        lesion_size_rule: how nodule and mass sizes are drawn (:data:`~medfocus.datasets.synthetic.findings.LESION_SIZE_RULES`;
            see :func:`generate_case`); recorded in the manifest.
        counterfactuals: also render the three oracle counterfactuals of every positive.
        imagenome: also write the JPEG copies the ImaGenome loader reads (the gold/region tables are
            always written).
        workers: processes used to render.
        progress: show a tqdm bar.
        overwrite: replace an existing dataset folder (see ``out_dir``).

    Returns:
        Path of ``manifest.json``.

    Raises:
        DataError: ``n < 1``; ``out_dir`` not empty (without ``overwrite``) or, with it, not a folder
            this function wrote; films that show no finding at all (the dataset would hold no sample:
            nothing is written).
        ConfigError: an unknown ``lesion_size_rule`` (before anything is written).

    Warns:
        DataWarning: drawn cues that could not be placed (counted in the manifest's ``cue_placement``).
    """
    if n < 1:
        raise DataError(f"write_dataset: n must be >= 1, got {n}")
    if lesion_size_rule not in LESION_SIZE_RULES:
        raise ConfigError(f"write_dataset: lesion_size_rule must be one of {list(LESION_SIZE_RULES)}, got {lesion_size_rule!r}")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    from tqdm.auto import tqdm

    with atomic_directory(out) as tmp:
        jobs = [(str(tmp), int(seed), i, int(size), float(cue_rate), float(cue_base_rate), bool(counterfactuals),
                 bool(imagenome), lesion_size_rule) for i in range(n)]
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as ex:
                images = list(tqdm(ex.map(_render_one, jobs, chunksize=8), total=n, disable=not progress, desc="synth"))
        else:
            images = [_render_one(j) for j in tqdm(jobs, disable=not progress, desc="synth")]
        samples = _samples_from_images(images, seed)
        if not samples:  # every sample is a finding's positive or its negative: no finding, no sample
            raise DataError(f"--n {n} (--seed {seed}): none of the {n} films shows a finding, so the dataset would hold "
                            "0 samples (each sample is a finding's positive or one of its balanced negatives); about "
                            f"30 % of films are normal: raise --n or change --seed (nothing was written to {out})")
        _write_tables(tmp, images)
        _write_manifest(tmp, images, samples, seed=seed, n=n, size=size, cue_rate=cue_rate, cue_base_rate=cue_base_rate,
                        lesion_size_rule=lesion_size_rule)
    placement = cue_placement(images)
    lost = placement["correlated_dropped"] + placement["uncorrelated_dropped"]
    if lost:
        placed = placement["correlated_placed"] + placement["uncorrelated_placed"]
        warnings.warn(f"{out / MANIFEST}: {lost} drawn shortcut cues could not be placed clear of the findings and were "
                      f"left out ({placement['correlated_dropped']} correlated with a finding, "
                      f"{placement['uncorrelated_dropped']} uncorrelated; {placed} placed), so the films carry fewer "
                      "cues than --cue-rate / --cue-base-rate ask; each film's 'cues_dropped' and the totals in 'cue_placement' record them",
                      DataWarning, stacklevel=2)
    return out / MANIFEST


def _write_manifest(out: Path, images: list[dict[str, Any]], samples: list[dict[str, Any]], *, seed: int, n: int,
                    size: int, cue_rate: float, cue_base_rate: float, lesion_size_rule: str) -> None:
    manifest = {
        "format": "medfocus-synthetic",
        "version": 1,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "n": int(n),
        "size": int(size),
        "cue_rate": float(cue_rate),
        "cue_base_rate": float(cue_base_rate),
        "lesion_size_rule": lesion_size_rule,
        "cue_placement": cue_placement(images),
        "findings": list(FINDINGS),
        "concepts": list(CONCEPTS),
        "vindr_annotations": str(VINDR_DIR / "annotations" / f"annotations_{SPLIT}.csv"),
        "vindr_split": SPLIT,
        "images": images,
        "samples": samples,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))  # a manifest on disk is always complete


def _abs(root: Path, p: Any) -> Any:
    if isinstance(p, str):
        return str(resolve_inside(root, p, what="manifest path"))
    if isinstance(p, dict):
        return {k: _abs(root, v) for k, v in p.items()}
    return p


def written_settings(root: str | os.PathLike) -> dict[str, Any] | None:
    """The :func:`write_dataset` arguments a dataset folder was written with (``n``, ``seed``, ``size``,
    ``cue_rate``, ``cue_base_rate``, ``lesion_size_rule``), from its manifest; ``None`` when the folder holds
    no readable synthetic manifest. A manifest older than the lesion size rule was written under ``"nih"``,
    the only rule then. For callers that reuse a folder only when it holds what they would write."""
    mpath = Path(root) / MANIFEST
    try:
        man = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(man, dict) or man.get("format") != "medfocus-synthetic":
        return None
    return {"n": man.get("n"), "seed": man.get("seed"), "size": man.get("size"), "cue_rate": man.get("cue_rate"),
            "cue_base_rate": man.get("cue_base_rate"), "lesion_size_rule": man.get("lesion_size_rule", "nih")}


def load_synthetic(root: str | os.PathLike, **_: Any) -> list[Sample]:
    """Read a :func:`write_dataset` folder as samples (positives + balanced negatives, stable index).

    Paths in ``meta`` (``counterfactuals``, ``concept_masks``, ``finding_masks``, ``finding_mask``, ``png``)
    are absolute; ``meta["root"]`` is the dataset folder. Boxes are clipped to each film's header size
    (``meta["provenance"]`` holds the counts, as for the real loaders).

    Raises:
        DataError: missing or foreign manifest, a missing film, or a manifest ``image_size`` that
            differs from the film's header.
    """
    root = Path(root)
    mpath = root / MANIFEST if root.is_dir() else root
    # Absolute from here on: Sample paths must not depend on the working directory of later steps.
    root = mpath.parent.resolve()
    if not mpath.is_file():
        raise DataError(f"{mpath}: synthetic manifest not found; create one with `medfocus synth --out {root} --n N`")
    try:
        man = json.loads(mpath.read_text())
    except ValueError as exc:
        raise DataError(f"{mpath}: not valid JSON ({exc})") from exc
    if man.get("format") != "medfocus-synthetic" or "samples" not in man:
        raise DataError(f"{mpath}: not a medfocus synthetic manifest (field 'format' must be 'medfocus-synthetic')")
    from medfocus.datasets._common import BoxClipLog, SizeCache

    sizes = SizeCache()
    clip_log = BoxClipLog("synthetic")
    out = []
    for k, d in enumerate(man["samples"]):
        d = dict(d)
        d["image_path"] = str(resolve_inside(root, d["image_path"], what=f"{mpath} sample #{k} image_path"))
        meta = dict(d.get("meta") or {})
        for key in ("counterfactuals", "concept_masks", "finding_masks", "finding_mask", "png"):
            if key in meta:
                meta[key] = _abs(root, meta[key])
        meta["root"] = str(root)
        # Expert boxes are clipped to the film as its DICOM header gives it, like every loader's.
        size = sizes(Path(d["image_path"]))
        if tuple(d.get("image_size") or ()) != size:
            raise DataError(f"{mpath} sample #{k}: image_size {d.get('image_size')} differs from the "
                            f"{size[0]}x{size[1]} of {d['image_path']}")
        d["boxes"], meta["provenance"] = clip_log.clip([tuple(b) for b in d.get("boxes") or []], size,
                                                       where=f"{mpath} sample #{k}", what=str(d.get("attribute")))
        d["meta"] = meta
        out.append(Sample.from_dict(d))
    return clip_log.finish(out)
