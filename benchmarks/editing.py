"""Counterfactual editors on the synthetic world: speed and closeness to the exact counterfactual.

For the positives of a small synthetic dataset (256 px), every CPU editor makes the foreground edit
("No {finding}" inside the GT boxes) and the background edit (outside them). Reported per editor:
  * seconds per edit (mean, one process);
  * foreground MAE: mean absolute grey-level difference to the oracle's exact "finding absent"
    render, inside the boxes (lower = closer to the true healthy tissue);
  * background MAE: the same for the background edit against the oracle "background" render,
    outside the boxes (the oracle redraws anatomy there, so any editor differs; it measures how
    far the edit moves the image from a plausible redraw).
A "no edit" row gives the distance of the unedited image for scale. Prints a table and writes editing.md next to this script. RadEdit needs GPU weights and is not run.

    python benchmarks/editing.py [--n 24] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24, help="films to generate")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from medfocus.datasets.synthetic import write_reference_pool
    from medfocus.datasets.synthetic.dataset import load_synthetic, write_dataset
    from medfocus.editing import edit_mask, edit_prompt, get_editor
    from medfocus.io import read_image

    tmp = Path(tempfile.mkdtemp(prefix="medfocus_editing_bench_"))
    write_dataset(tmp / "data", n=args.n, seed=11, size=args.size, cue_rate=0.3, progress=False, lesion_size_rule="nih")
    pool = write_reference_pool(tmp / "ref", n=16, seed=5, size=args.size)
    samples = [s for s in load_synthetic(tmp / "data") if s.answer == "Yes"]
    oracle = get_editor("oracle")
    editors = {
        "inpaint (Telea)": get_editor("inpaint", method="telea"),
        "inpaint (Navier-Stokes)": get_editor("inpaint", method="ns"),
        "transplant (affine)": get_editor("transplant", reference_dir=pool, aligner="affine"),
        "transplant (auto: affine vs UOT)": get_editor("transplant", reference_dir=pool, aligner="auto"),
        "oracle": oracle,
    }
    for e in editors.values():
        e.prepare()

    class _NoEdit:  # reference row: the unedited image
        seed = 0

        @staticmethod
        def edit(image, mask, prompt, *, sample=None, kind=None):
            return image.copy()

    editors = {"no edit (reference)": _NoEdit(), **editors}
    rows = []
    for name, ed in editors.items():
        times, fg_mae, bg_mae = [], [], []
        for s in samples:
            img, _ = read_image(s.image_path)
            for kind, store in (("foreground", fg_mae), ("background", bg_mae)):
                m = edit_mask(kind, s.boxes, s.image_size)
                t0 = time.perf_counter()
                out = ed.edit(img, m, edit_prompt(kind, s.attribute), sample=s, kind=kind)
                times.append(time.perf_counter() - t0)
                ref = oracle.edit(img, m, edit_prompt(kind, s.attribute), sample=s, kind=kind)
                store.append(float(np.abs(out[m].astype(float) - ref[m].astype(float)).mean()))
        rows.append((name, np.mean(times), np.mean(fg_mae), np.mean(bg_mae)))

    head = "| editor | s / edit | foreground MAE vs oracle | background MAE vs oracle |\n|---|---|---|---|\n"
    body = "".join(f"| {n} | {t:.3f} | {f:.1f} | {b:.1f} |\n" for n, t, f, b in rows)
    md = (f"# Counterfactual editors on the synthetic world\n\n{len(samples)} positives ({args.n} films, "
          f"{args.size} px), foreground + background edit each; one process, 1 torch thread; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.\n\n" + head + body)
    print(md)
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(Path(__file__).with_name("editing.md"), md)


if __name__ == "__main__":
    main()
