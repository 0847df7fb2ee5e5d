"""Validity of the shipped demo model on fresh seeds: the numbers the README and the model card quote.

Writes ``benchmarks/validity.md``. Run: ``PYTHONPATH=src .venv/bin/python benchmarks/validity.py``
(``--films``, ``--cue-per-cell``, ``--sanity-films`` set the sample sizes; ``--help``).

What it measures, all through the public path (``load_lvlm("demo")`` + the adapter's greedy
generation, answers read by ``parse_yes_no``):

1. **Accuracy on ``medfocus synth`` default data** (what ``medfocus demo`` uses: ``write_dataset`` with
   the CLI's defaults, 256 px, no cues): per mode (direct, step-by-step) and per finding, Wilson 95%
   intervals; the **false-"yes" rate** on negatives whose film carries a *different* finding, and on
   normal films.
2. **Accuracy under the model card's own protocol** (``build_eval_pool``: 1/2 positives per finding,
   generator's severity distribution) on fresh seeds.
3. **Cue reliance**: share of positives answered "Yes" that flip to "No" under the background edit
   (``SyntheticCase.background``: everything outside the finding redrawn, cues removed), on the card's
   cue subset and on clean films, Wilson intervals.
4. **Weight-randomisation sanity check** (Adebayo et al. 2018) as a distribution over films: per film,
   Spearman correlation of 16x16 cell means between a method's map on the demo model and on a copy with
   every weight re-drawn (``randomize_weights``, seed 11); median with a bootstrap 95% interval, and
   the share of films failing (rho >= 0.5) with a Wilson interval.
5. **Trivial baselines**: the trained model's maps of (4), scored against the exact finding boxes and
   compared with the best trivial baseline (``compare_to_baselines``, paired bootstrap).

Seeds (disjoint from training, tests and the other benchmarks). Training uses case seeds 0-19999
(``seed * 1_000_003 + i``, seed 0; the shortcut twin 0-2999); the card's held-out pools use offsets 321_000-900_000 (+ k < 1000);
tests and benchmarks write datasets with master seeds <= 11 (case seeds ``master * 100_000 + i`` <
1_200_000) and the demo uses master seeds 0 and 1. Here: synthetic dataset master seed
:data:`SYNTH_SEED` (case seeds 2_000_000_000 + i), card-protocol pools at offsets
:data:`CLEAN_OFFSET` and :data:`CUED_OFFSET` (case seeds 1.5e9 + k and 1.6e9 + k). Nothing else in the
repository uses seeds >= 10_000_000 but ``benchmarks/shortcut.py`` (master seed 30_000: case seeds
3_000_000_000 + i).

Sample sizes: a Wilson 95% interval of +-3 points at an accuracy near 0.8 needs about 700 answers per
mode (``--films 320`` gives ~690 samples); cue reliance near 0.1 needs ~380 "yes" positives for +-3
points (``--cue-per-cell 60``). The file records the sizes actually used and the machine load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "validity.md"

#: master seed of the ``medfocus synth`` dataset written here (case seeds 2_000_000_000 + i).
SYNTH_SEED = 20_000
#: ``build_eval_pool`` offsets of the card-protocol pools (case seeds offset + k).
CLEAN_OFFSET = 1_500_000_000
CUED_OFFSET = 1_600_000_000
#: seed of the weight re-draw of the sanity check (as in ``benchmarks/methods.py``).
RANDOM_WEIGHTS_SEED = 11
SANITY_METHODS = ("rise", "gradcam", "occlusion", "integrated_gradients", "attention_rollout")
FAIL_AT = 0.5


def _pct(k: int, n: int) -> str:
    from medfocus.evaluation import format_proportion

    return format_proportion(k, n)


def _cells(hm: np.ndarray, n: int = 16) -> np.ndarray:
    H, W = hm.shape
    ys = np.linspace(0, H, n + 1).astype(int)
    xs = np.linspace(0, W, n + 1).astype(int)
    return np.array([[hm[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean() for j in range(n)] for i in range(n)])


def _median_ci(values: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    v = np.asarray([x for x in values if x == x], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, v.size, size=(n_boot, v.size))], axis=1)
    return float(np.median(v)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def synth_samples(root: Path, films: int, lesion_size_rule: str | None = None) -> list:
    """``medfocus synth`` default data (CLI defaults: 256 px, cue rates 0) at :data:`SYNTH_SEED`, in the world
    of ``lesion_size_rule`` (None: the CLI's default)."""
    from medfocus.datasets.synthetic import load_synthetic, write_dataset

    kw = {} if lesion_size_rule is None else {"lesion_size_rule": lesion_size_rule}
    write_dataset(root, films, seed=SYNTH_SEED, counterfactuals=False, imagenome=False, progress=True, **kw)
    return load_synthetic(root)


def accuracy_on_synth(adapter, samples: list, modes=("direct", "cot")) -> tuple[list[str], dict]:
    """Accuracy per mode / finding and false-yes rates; returns (markdown lines, raw answers)."""
    from PIL import Image

    from medfocus.lvlm.answers import parse_yes_no as parse_answer
    from medfocus.training.demo_lvlm import task_question

    images = [np.asarray(Image.open(s.meta["png"])) for s in samples]
    lines: list[str] = []
    answers: dict[str, list] = {}
    findings = sorted({s.attribute for s in samples}, key=lambda f: [s.attribute for s in samples].index(f))
    for mode in modes:
        t0 = time.time()
        outs = adapter.generate(images, [task_question(s.attribute, mode) for s in samples], max_new_tokens=48, batch_size=16)
        answers[mode] = [parse_answer(o) for o in outs]
        print(f"[accuracy] {mode}: {len(samples)} answers in {time.time() - t0:.0f}s", flush=True)
    ok = {m: [a == s.answer for a, s in zip(answers[m], samples)] for m in modes}
    lines += ["| finding | positives | negatives | " + " | ".join(f"{m} accuracy" for m in modes) + " |",
              "|---|---:|---:|" + "---|" * len(modes)]
    for f in findings + ["**all**"]:
        idx = [i for i, s in enumerate(samples) if f == "**all**" or s.attribute == f]
        npos = sum(samples[i].answer == "Yes" for i in idx)
        lines.append(f"| {f} | {npos} | {len(idx) - npos} | "
                     + " | ".join(_pct(sum(ok[m][i] for i in idx), len(idx)) for m in modes) + " |")
    lines += ["", "False \"yes\" on negatives (the asked finding absent), by what the film carries:", "",
              "| finding asked | film carries another finding: " + " | ".join(f"{m}" for m in modes)
              + " | normal film: " + " | ".join(f"{m}" for m in modes) + " |",
              "|---|" + "---|" * (2 * len(modes))]
    for f in findings + ["**all**"]:
        neg = [i for i, s in enumerate(samples) if s.answer == "No" and (f == "**all**" or s.attribute == f)]
        other = [i for i in neg if samples[i].meta.get("findings_present")]
        normal = [i for i in neg if not samples[i].meta.get("findings_present")]
        cells = [_pct(sum(answers[m][i] == "Yes" for i in other), len(other)) for m in modes]
        cells += [_pct(sum(answers[m][i] == "Yes" for i in normal), len(normal)) for m in modes]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    unparsed = {m: sum(a is None for a in answers[m]) for m in modes}
    lines += ["", "Unparsed answers (counted wrong): " + ", ".join(f"{m} {k}" for m, k in unparsed.items()) + "."]
    return lines, answers


def card_protocol(adapter, per_cell: int, cfg) -> list[str]:
    """The model card's protocol on fresh seeds: accuracy (clean pool) and cue reliance (cued vs clean);
    the pools are rendered as the model's training recipe ``cfg`` (a ``DemoLVLMConfig``) says."""
    from medfocus.training import demo_lvlm as D

    gen = D.adapter_generate_fn(adapter)
    clean = D.build_eval_pool(cfg, n_per_cell=per_cell, progress=True, seed_offset=CLEAN_OFFSET)
    cued = D.build_eval_pool(cfg, n_per_cell=per_cell, progress=True, cued=True, seed_offset=CUED_OFFSET)
    t0 = time.time()
    res = D.evaluate_generation(gen, clean)
    rel = D.evaluate_cue_reliance(gen, cued, clean)
    print(f"[card protocol] {time.time() - t0:.0f}s: {res['overall']} {rel}", flush=True)
    lines = [f"Fresh pools of the card's protocol: {per_cell} positives and {per_cell} negatives per finding "
             f"({len(clean)} films, no cues) for accuracy; {per_cell} cued positives per finding for cue reliance.", "",
             "| quantity | direct | step-by-step |", "|---|---|---|"]
    cnt = {m: (sum(r["correct"] for r in res["per_finding"][m].values()), sum(r["n"] for r in res["per_finding"][m].values()))
           for m in ("direct", "cot")}
    lines.append(f"| held-out accuracy (clean pool) | {_pct(*cnt['direct'])} | {_pct(*cnt['cot'])} |")
    lines += ["", "Cue reliance (direct mode): positives answered \"Yes\" whose answer flips to \"No\" under the background "
              "edit (everything outside the finding redrawn, cues removed).", "",
              "| subset | positives | answered Yes | flip rate among Yes |", "|---|---:|---:|---|"]
    for name in ("cued", "clean"):
        r = rel.get(name)
        if r:
            lines.append(f"| {name} | {r['n_pos']} | {r['yes']} | {_pct(r['flip_on_background_edit'], r['yes'])} |")
    return lines


def sanity_and_baselines(adapter, samples: list, answers: dict, n_films: int, model: str = "demo") -> list[str]:
    """Per-film weight-randomisation check of :data:`SANITY_METHODS` and the trivial-baseline comparison."""
    import torch
    from PIL import Image
    from scipy.stats import spearmanr
    from tqdm import tqdm

    from medfocus.attribution import get_method
    from medfocus.attribution.testing import randomize_weights
    from medfocus.evaluation import evaluate_records
    from medfocus.evaluation.baselines import baselines_markdown, compare_to_baselines, trivial_baseline_records
    from medfocus.training.demo_lvlm import task_question
    from medfocus.lvlm.loading import load_lvlm

    from medfocus.runner.demo import round_robin

    # films: positives answered "Yes" in direct mode, round-robin over findings (lowest index first)
    yes = [i for i, s in enumerate(samples) if s.answer == "Yes" and answers["direct"][i] == "Yes"]
    chosen = round_robin(yes, lambda i: samples[i].attribute, n_films)
    rnd = load_lvlm(model, device="cpu")
    with torch.no_grad():
        randomize_weights(rnd.model, seed=RANDOM_WEIGHTS_SEED)
    rho: dict[str, list[float]] = {m: [] for m in SANITY_METHODS}
    records = []
    for i in tqdm(chosen, desc="sanity films", unit="film"):
        s = samples[i]
        img = np.asarray(Image.open(s.meta["png"]))
        q = task_question(s.attribute, "direct")
        for meth in SANITY_METHODS:
            hm = np.asarray(get_method(meth).attribute(adapter, img, q, "Yes").heatmap, dtype=np.float32)
            hr = np.asarray(get_method(meth).attribute(rnd, img, q, "Yes").heatmap, dtype=np.float32)
            a, b = _cells(hm).ravel(), _cells(hr).ravel()
            rho[meth].append(float(spearmanr(a, b).statistic) if a.std() > 0 and b.std() > 0 else float("nan"))
            records.append({"model": model, "dataset": "synthetic", "mode": "direct", "method": meth, "index": int(s.index),
                            "attribute": s.attribute, "gt_boxes": [list(map(float, bx)) for bx in s.boxes],
                            "image_size": list(s.image_size), "heatmap": hm, "error": None})
    lines = [f"{len(chosen)} films (positives the model answers \"Yes\" in direct mode, round-robin over findings); "
             f"per film, Spearman rho of 16x16 cell means between the map on the demo model and on a copy with every "
             f"weight re-drawn (seed {RANDOM_WEIGHTS_SEED}). Lower is better; a film fails at rho >= {FAIL_AT}. "
             "Median with a bootstrap 95% interval (2000 resamples); failing share with a Wilson interval; nan = a "
             "constant map (left out).", "",
             "| method | films | median rho [95% CI] | min - max | films failing |", "|---|---:|---|---|---|"]
    for meth in SANITY_METHODS:
        v = [x for x in rho[meth] if x == x]
        med, lo, hi = _median_ci(v)
        fails = sum(x >= FAIL_AT for x in v)
        rng_s = f"{min(v):.2f} - {max(v):.2f}" if v else "n/a"
        lines.append(f"| {meth} | {len(v)} | {med:.2f} [{lo:.2f}, {hi:.2f}] | {rng_s} | {_pct(fails, len(v))} |")
    metrics = evaluate_records(records + trivial_baseline_records(records, seed=0))
    comp = compare_to_baselines(metrics, ("iou",))
    means = metrics[metrics["error"].isna()].groupby("method")["iou"].agg(["mean", "count"])
    lines += ["", "### Localisation against the trivial baselines", "",
              f"The trained model's maps above, scored against the exact finding boxes (IoU, evaluation protocol of "
              f"`medfocus evaluate`), on the same {len(chosen)} films. These films are *not* filtered by the causal "
              "filter (positives answered \"Yes\"), and the image-blind finding prior is leave-one-out over these films "
              "only, so read the comparison as indicative at this n.", "",
              "| method | mean IoU (x100) | n |", "|---|---:|---:|"]
    lines += [f"| {m} | {100 * r['mean']:.1f} | {int(r['count'])} |" for m, r in means.iterrows()]
    lines += ["", baselines_markdown(comp)]
    return lines


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--films", type=int, default=320, help="synthetic films for the accuracy table (~2.15 samples each)")
    ap.add_argument("--cue-per-cell", type=int, default=60, help="card-protocol pool size per (finding, answer)")
    ap.add_argument("--sanity-films", type=int, default=14, help="films of the sanity check (>= 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--model", default="demo",
                    help="the demo model to measure: 'demo' (the shipped one, whose figures the README quotes) or a "
                         "train-demo --out folder (a candidate, before it is shipped)")
    from medfocus.datasets.synthetic.findings import DEFAULT_LESION_SIZE_RULE, LESION_SIZE_RULES

    ap.add_argument("--lesion-size-rule", choices=LESION_SIZE_RULES, default=None,
                    help="the synthetic world of section 1 (medfocus synth --lesion-size-rule); default: the one the "
                         "model was trained in (its recipe's lesion_size_rule)")
    ap.add_argument("--no-sanity", action="store_true",
                    help="skip section 3 (sanity check and trivial baselines): accuracy and cue reliance only")
    a = ap.parse_args(argv)
    if a.films < 1 or a.cue_per_cell < 1 or a.sanity_films < 10:
        ap.error("--films and --cue-per-cell must be >= 1 and --sanity-films >= 10")
    import torch

    from medfocus.lvlm.loading import load_lvlm
    from medfocus.lvlm.registry import DEMO_DIR

    folder = DEMO_DIR if a.model == "demo" else Path(a.model)
    if not (folder / "medfocus.json").is_file():
        ap.error(f"--model {a.model}: not a train-demo folder (no medfocus.json)")
    import json

    from medfocus.training.demo_lvlm import config_from_dict

    recipe = config_from_dict(json.loads((folder / "medfocus.json").read_text())["demo"]["config"])
    trained_rule = recipe.lesion_size_rule  # a recipe from before the rule has the field's default, "nih"
    rule = a.lesion_size_rule or trained_rule
    torch.set_num_threads(a.threads)
    t_start = time.time()
    load0 = os.getloadavg()
    adapter = load_lvlm(a.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        samples = synth_samples(Path(tmp) / "synth", a.films, rule)
        acc_lines, answers = accuracy_on_synth(adapter, samples)
        card_lines = card_protocol(adapter, a.cue_per_cell, recipe)
        sanity_lines = (["Skipped (`--no-sanity`)."] if a.no_sanity else
                        sanity_and_baselines(adapter, samples, answers, a.sanity_films, a.model))
    load1 = os.getloadavg()
    minutes = (time.time() - t_start) / 60
    md = "\n".join([
        "# Validity of the demo model on fresh seeds",
        "",
        *([] if a.model == "demo" else [f"**Model measured: `{a.model}`** (a candidate, not the shipped `demo`).", ""]),
        f"Written by `benchmarks/validity.py --films {a.films} --cue-per-cell {a.cue_per_cell} --sanity-films "
        f"{a.sanity_films} --threads {a.threads}" + ("" if a.model == "demo" else f" --model {a.model}")
        + (f" --lesion-size-rule {a.lesion_size_rule}" if a.lesion_size_rule else "")
        + (" --no-sanity" if a.no_sanity else "") + f"` in {minutes:.1f} min on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"1-minute load average {load0[0]:.1f} at the start and {load1[0]:.1f} at the end (the machine was shared). "
        "Every interval is 95%: Wilson for proportions, bootstrap for medians and paired differences.",
        "",
        f"Seeds (disjoint from training, tests and the other benchmarks; see the script's docstring): synthetic "
        f"dataset master seed {SYNTH_SEED} (case seeds {SYNTH_SEED * 100_000:,} + i), card-protocol pools at case seeds "
        f"{CLEAN_OFFSET:,} + k (clean) and {CUED_OFFSET:,} + k (cued).",
        "",
        f"Sample sizes: about 700 answers per mode give +-3 points on an accuracy near 80% (`--films 320`); this run "
        f"used {len(samples)} samples from {a.films} films"
        + (" — smaller than that design, so the intervals are wider than +-3 points." if len(samples) < 690 else "."),
        "",
        (f"## 1. Accuracy on `medfocus synth` default data ({a.films} films, {len(samples)} samples)"
         if rule == DEFAULT_LESION_SIZE_RULE else
         f"## 1. Accuracy on `medfocus synth --lesion-size-rule {rule}` data ({a.films} films, {len(samples)} samples)"),
        "",
        f"Synthetic world: lesion size rule `{rule}` (the model was trained with `{trained_rule}`)."
        + ("" if rule == DEFAULT_LESION_SIZE_RULE else " Every setting but that rule is the `medfocus synth` default."),
        "",
        *acc_lines,
        "",
        "## 2. The model card's protocol on fresh seeds",
        "",
        *card_lines,
        "",
        "## 3. Weight-randomisation sanity check over films",
        "",
        *sanity_lines,
        "",
    ])
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(a.out, md, encoding="utf-8")
    print(md)
    return md


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
