"""Concept transfer accuracy on the synthetic world (exact concept masks) and time per image.

For each target film (``generate_case(seed)``, random findings) the 11 concepts are transferred
from the default synthetic reference pool (16 normals) and each box is compared with the tight box
of the exact concept mask (box IoU). Rows:

* ``barycentric x5`` -- the default transfer (debiased barycentric push, 5 passes, 95% densest core);
* ``barycentric x1`` -- the same with a single pass;
* ``plan`` -- the literal recipe: push mask mass through the entropic plan, 75% densest core;
* ``identity`` -- the selected reference's own concept boxes, no transport (what transfer must beat).

Two target sets: the films as generated, and the same films under a random affine perturbation
(scale 0.8-1.1, shift +-20 px, rotation +-5 deg; the masks are warped identically).

    .venv/bin/python benchmarks/concept_transfer.py [--n 24]

Writes ``benchmarks/concept_transfer.md``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from medfocus.concepts import transfer as T
from medfocus.concepts.reference import default_pool
from medfocus.datasets.synthetic import generate_case
from medfocus.types import CONCEPTS

SHORT = {"cardiac silhouette": "heart", "left lung": "L lung", "right lung": "R lung", "mediastinum": "medi.",
         "upper mediastinum": "up. medi.", "left clavicle": "L clav.", "right clavicle": "R clav.",
         "left hilar structures": "L hilum", "right hilar structures": "R hilum",
         "left costophrenic angle": "L CP", "right costophrenic angle": "R CP"}


def box_of(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if ys.size else None


def iou(a, b) -> float:
    if a is None or b is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def perturb(img, masks, rng):
    H, W = img.shape
    M = cv2.getRotationMatrix2D((W / 2, H / 2), rng.uniform(-5, 5), rng.uniform(0.8, 1.1))
    M[0, 2] += rng.uniform(-20, 20)
    M[1, 2] += rng.uniform(-20, 20)
    im = cv2.warpAffine(img, M, (W, H), flags=cv2.INTER_LINEAR, borderValue=0)
    ms = {k: cv2.warpAffine(m.astype(np.uint8) * 255, M, (W, H), flags=cv2.INTER_LINEAR) > 127 for k, m in masks.items()}
    return im, ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pool = default_pool(Path(tempfile.mkdtemp()), n=16)
    rng = np.random.default_rng(0)
    cases = []
    for seed in range(args.n):
        c = generate_case(seed, lesion_size_rule="nih")
        cases.append(("as generated", c.image, c.concept_masks))
    for seed in range(args.n):
        c = generate_case(seed, lesion_size_rule="nih")
        cases.append(("affine-perturbed", *perturb(c.image, c.concept_masks, rng)))

    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    times: dict[str, list[float]] = {"select": [], "transfer_barycentric x5": [], "transfer_barycentric x1": [], "transfer_plan": []}
    for setname, img, masks in cases:
        gt = {c: box_of(masks[c]) for c in CONCEPTS}
        for mode, iters in (("barycentric x5", 5), ("barycentric x1", 1), ("plan", 1)):
            tr = T.transfer_concepts(img, pool, mode=mode.split()[0], iterations=iters)
            times[f"transfer_{mode}"].append(tr.stats["seconds_transfer"])
            if mode == "barycentric x5":
                times["select"].append(tr.stats["seconds_select"])
            r = results.setdefault((setname, mode), {c: [] for c in CONCEPTS})
            for c in CONCEPTS:
                r[c].append(iou(tr.boxes[c], gt[c]))
        ref = pool[pool.ids.index(tr.reference_id)]
        r = results.setdefault((setname, "identity"), {c: [] for c in CONCEPTS})
        for c in CONCEPTS:
            r[c].append(iou(box_of(ref.masks[c]), gt[c]))

    head = "| targets | method | " + " | ".join(SHORT[c] for c in CONCEPTS) + " | mean |"
    lines = ["# Concept transfer on the synthetic world (`benchmarks/concept_transfer.py`)", "",
             f"{args.n} films per set (seeds 0..{args.n - 1}, random findings), default pool of 16 normal references, "
             "epsilon=0.05, lambda=0.1. Box IoU of each transferred concept box vs the tight box of the exact mask "
             "(mean over films).", "", head, "|" + "---|" * (len(CONCEPTS) + 3)]
    for (setname, mode), r in results.items():
        per = [float(np.mean(r[c])) for c in CONCEPTS]
        lines.append(f"| {setname} | {mode} | " + " | ".join(f"{v:.2f}" for v in per) + f" | **{np.mean(per):.3f}** |")
    lines += ["", "Time per image (CPU, 1 thread, median): "
              f"selection over the pool at 14x14 {1e3 * np.median(times['select']):.0f} ms; "
              f"transfer at 56x56: barycentric x5 {1e3 * np.median(times['transfer_barycentric x5']):.0f} ms, "
              f"x1 {1e3 * np.median(times['transfer_barycentric x1']):.0f} ms, "
              f"plan {1e3 * np.median(times['transfer_plan']):.0f} ms.", "",
              "Why the default is not the literal plan push: with epsilon = 0.05 of the 90th-percentile squared distance "
              "the entropic plan spreads each reference cell over a Gaussian of ~7 grid cells (~28 canvas px), so pushed "
              "masks of small concepts (hila, costophrenic angles, clavicles) are mostly blur and their 75% cores are "
              "misplaced. The barycentric push moves each reference cell to the barycentre of its row of the plan, "
              "debiased by the reference->reference plan at the same cost scale (entropic barycentres are pulled towards "
              "the inside of the support, most near its border), then splats the mask there; further passes re-solve from "
              "the moved reference cells and explain the remaining displacement.", ""]
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(Path(args.out), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
