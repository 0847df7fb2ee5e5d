"""``medfocus synth`` and ``medfocus synth-reference``: write the synthetic chest X-ray world to disk."""

from __future__ import annotations

from pathlib import Path

import click

_EPILOG = """\b
Examples:
  medfocus synth --out data/synth --n 200 --seed 0 --preview data/synth/preview.png
  medfocus synth --out data/cued --n 1000 --cue-rate 0.8 --cue-base-rate 0.05 --workers 2
  medfocus synth --out data/nih --n 200 --lesion-size-rule nih     # the world of releases before 2026-12
  medfocus synth-reference --out data/reference --n 16

\b
The dataset folder is readable as `--dataset synthetic` (manifest.json: positives, balanced
negatives, exact masks, oracle counterfactuals, cues), as `--dataset vindr_cxr`
(vindr-cxr/1.0.0/annotations/annotations_test.csv + DICOM files) and as `--dataset imagenome`
(chest-imagenome/1.0.0/gold_dataset/... + mimic-cxr-jpg/2.1.0/files/... JPEG copies).
"""


@click.command(name="synth", epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--n", "n", default=200, show_default=True, type=click.IntRange(1, 99_999), help="Number of films.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Master seed (same seed -> same files).")
@click.option("--size", default=256, show_default=True, type=click.IntRange(64, 2048), help="Image side in pixels.")
@click.option("--cue-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Probability that a finding brings its correlated shortcut cue.")
@click.option("--cue-base-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Probability of one uncorrelated cue per film (normals included).")
@click.option("--lesion-size-rule", type=click.Choice(["nih", "fleischner"]), default="fleischner", show_default=True,
              help="How nodule and mass sizes are drawn: 'fleischner' (the NIH ChestX-ray8 box priors conditioned on the "
                   "radiological definition: nodule <= 3 cm < mass on a 35 cm field) or 'nih' (the priors as they are: "
                   "nodule and mass sizes overlap, so a small mass and a large nodule can look the same).")
@click.option("--no-counterfactuals", is_flag=True, help="Skip rendering the oracle counterfactual PNGs.")
@click.option("--no-imagenome-jpeg", is_flag=True, help="Skip the JPEG copies read by the ImaGenome loader.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Rendering processes.")
@click.option("--overwrite", is_flag=True,
              help="Replace the dataset already in --out (written by synth) as a whole, once the new one is complete "
                   "(default: a non-empty --out is refused, so no film of an earlier run stays mixed in).")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None, show_default="no contact sheet",
              help="Also write a contact sheet (PNG) of the first 16 films with their boxes.")
def synth(out_dir: Path, n: int, seed: int, size: int, cue_rate: float, cue_base_rate: float, lesion_size_rule: str,
          no_counterfactuals: bool, no_imagenome_jpeg: bool, workers: int, overwrite: bool, preview: Path | None) -> None:
    """Write a synthetic chest X-ray dataset (VinDr-CXR layout) with exact ground truth."""
    from medfocus.datasets.synthetic.dataset import case_seed, load_synthetic, write_dataset

    path = write_dataset(out_dir, n, seed=seed, size=size, cue_rate=cue_rate, cue_base_rate=cue_base_rate,
                         lesion_size_rule=lesion_size_rule, counterfactuals=not no_counterfactuals, imagenome=not no_imagenome_jpeg, workers=workers,
                         overwrite=overwrite)
    samples = load_synthetic(out_dir)
    pos = sum(s.answer == "Yes" for s in samples)
    click.echo(f"wrote {n} films, {len(samples)} samples ({pos} positive, {len(samples) - pos} negative) -> {path}")
    if len(samples) - pos < pos:  # negatives come from films without the finding: too few films to balance
        click.echo(f"Warning: {pos - (len(samples) - pos)} positives have no balanced negative (too few films without "
                   "their finding); raise --n for a balanced yes/no set", err=True)
    if preview is not None:
        from medfocus.datasets.synthetic.case import generate_case
        from medfocus.datasets.synthetic.preview import contact_sheet

        cases = [generate_case(case_seed(seed, i), size=size, cue_rate=cue_rate, cue_base_rate=cue_base_rate,
                               lesion_size_rule=lesion_size_rule)
                 for i in range(min(n, 16))]
        click.echo(f"preview -> {contact_sheet(cases, preview)}")


@click.command(name="synth-reference", context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  medfocus synth-reference --out data/reference --n 16
  medfocus attribute ... --method medfocus --param medfocus.pool=data/reference
""")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--n", "n", default=16, show_default=True, type=click.IntRange(1), help="Number of normal films.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed.")
@click.option("--size", default=256, show_default=True, type=click.IntRange(64, 2048), help="Image side in pixels.")
def synth_reference(out_dir: Path, n: int, seed: int, size: int) -> None:
    """Write a reference pool of normal synthetic X-rays with 11 concept masks.

    \b
    Layout: images/<id>.png + masks/<id>/<concept_slug>.png (uint8 0/255) + reference.json.
    """
    from medfocus.datasets.synthetic.reference import write_reference_pool

    out = write_reference_pool(out_dir, n=n, seed=seed, size=size)
    click.echo(f"wrote {n} normal reference films with 11 concept masks -> {out}")
