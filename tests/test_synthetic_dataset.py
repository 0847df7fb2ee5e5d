"""Synthetic dataset on disk: VinDr layout read by the real loader, manifest, negatives, CLI, reference pool."""

from __future__ import annotations

import json
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medfocus.datasets.synthetic import generate_case, load_synthetic, write_dataset, write_reference_pool
from medfocus.datasets.synthetic.dataset import case_seed
from medfocus.types import CONCEPTS, concept_slug

N, SEED, S = 10, 3, 128


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, N, seed=SEED, size=S, cue_rate=0.5, progress=False)
    return root


def test_vindr_loader_reads_generated_dataset(synth_root):
    from medfocus.datasets import load_dataset

    vindr = load_dataset("vindr_cxr", synth_root)
    man = json.loads((synth_root / "manifest.json").read_text())
    expected: dict[tuple[str, str], list] = {}
    for im in man["images"]:
        for f in im["findings"]:
            from medfocus.datasets.synthetic.findings import VINDR_CLASS

            expected.setdefault((im["image_id"], VINDR_CLASS[f["name"]][0]), []).append(tuple(f["box"]))
    got = {(s.meta["image_id"], s.meta["class_name"]): sorted(s.boxes) for s in vindr}
    assert got == {k: sorted(v) for k, v in expected.items()}
    assert len(vindr) > 0 and all(s.image_size == (S, S) for s in vindr)


def test_manifest_samples_and_images(synth_root):
    from medfocus.io import read_image

    samples = load_synthetic(synth_root)
    assert [s.index for s in samples] == list(range(len(samples)))
    assert all(s.dataset == "synthetic" for s in samples)
    pos = [s for s in samples if s.answer == "Yes"]
    neg = [s for s in samples if s.answer == "No"]
    # Negatives balanced per question, and really absent from their film.
    assert Counter(s.attribute for s in pos) == Counter(s.attribute for s in neg)
    for s in neg:
        assert s.attribute not in s.meta["findings_present"] and s.boxes == []
    # The DICOM holds exactly the regenerated film; boxes / masks are exact.
    for s in pos[:6]:
        img, size = read_image(s.image_path)
        i = int(s.meta["case_seed"]) - case_seed(SEED, 0)
        case = generate_case(case_seed(SEED, i), size=S, cue_rate=0.5)
        assert size == (S, S) and np.array_equal(img, case.image)
        f = case.finding(s.attribute)
        assert s.boxes == [f.box]
        fm = np.asarray(Image.open(s.meta["finding_mask"])) > 0
        assert np.array_equal(fm, f.mask)
        for c in CONCEPTS:
            cm = np.asarray(Image.open(s.meta["concept_masks"][c])) > 0
            assert np.array_equal(cm, case.concept_masks[c]), c
        # Counterfactual PNGs: background identical inside the box; foreground equals the renderer.
        x1, y1, x2, y2 = (int(v) for v in f.box)
        bg = np.asarray(Image.open(s.meta["counterfactuals"]["background"]))
        assert np.array_equal(bg[y1:y2, x1:x2], img[y1:y2, x1:x2])
        fg = np.asarray(Image.open(s.meta["counterfactuals"]["foreground"]))
        assert np.array_equal(fg, case.foreground(s.attribute))
        assert s.meta["cues"] == [{**q, "box": [float(v) for v in q["box"]]} for q in case.cues]


def test_imagenome_loader_reads_generated_dataset(synth_root):
    import pandas as pd

    from medfocus.datasets import load_dataset
    from medfocus.io import read_image

    reg = pd.read_csv(synth_root / "chest-imagenome" / "1.0.0" / "regions.csv")
    assert set(reg["bbox_name"]) == set(CONCEPTS)
    man = json.loads((synth_root / "manifest.json").read_text())
    expected = {(im["image_id"] + ".dcm", f["name"]): ([tuple(f["box"])], f["concept"]) for im in man["images"] for f in im["findings"]}
    got = load_dataset("imagenome", synth_root)
    assert {(s.meta["image_id"], s.attribute): (s.boxes, s.concept) for s in got} == expected
    img, size = read_image(got[0].image_path)  # the JPEG copy: lossy but the same film
    ref, _ = read_image(synth_root / man["images"][0]["dicom"])
    assert size == (S, S)
    iid = got[0].meta["image_id"][:-4]
    ref = np.asarray(Image.open(synth_root / "images" / f"{iid}.png")).astype(int)
    assert np.abs(img.astype(int) - ref).mean() < 3


def test_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(a, 3, seed=9, size=64, progress=False)
    write_dataset(b, 3, seed=9, size=64, progress=False, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_reference_pool(tmp_path):
    out = write_reference_pool(tmp_path / "ref", n=2, seed=0, size=64)
    ids = json.loads((out / "reference.json").read_text())["ids"]
    assert ids == ["ref0000", "ref0001"]
    for rid in ids:
        img = np.asarray(Image.open(out / "images" / f"{rid}.png"))
        assert img.shape == (64, 64) and img.dtype == np.uint8
        for c in CONCEPTS:
            m = np.asarray(Image.open(out / "masks" / rid / f"{concept_slug(c)}.png"))
            assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255} and (m > 0).any()


def test_cli_synth_and_reference(tmp_path):
    from medfocus.cli import main

    r = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "d"), "--n", "3", "--size", "64",
                                  "--no-counterfactuals", "--preview", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d" / "manifest.json").is_file()
    sheet = Image.open(tmp_path / "p.png")
    assert sheet.size == (3 * 256, 256) and sheet.mode == "RGB"
    r = CliRunner().invoke(main, ["synth-reference", "--out", str(tmp_path / "r"), "--n", "1", "--size", "64"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "masks" / "ref0000" / "left_lung.png").is_file()


def test_dataset_written_to_a_relative_folder_loads_with_absolute_paths(tmp_path, monkeypatch):
    """`medfocus demo` writes to runs/demo/data (relative): every path a Sample carries must still open,
    and the oracle editor must find the exact counterfactuals (regression: they were joined twice)."""
    from medfocus.editing import get_editor
    from medfocus.io import read_image

    monkeypatch.chdir(tmp_path)
    write_dataset("rel/data", n=4, seed=3, size=64)
    samples = load_synthetic("rel/data")
    pos = [s for s in samples if s.answer == "Yes"]
    assert pos
    for s in samples:
        assert Path(s.image_path).is_absolute() and Path(s.image_path).is_file()
        assert Path(s.meta["root"]) == (tmp_path / "rel" / "data").resolve()
    s = pos[0]
    img, _ = read_image(s.image_path)
    for kind, path in s.meta["counterfactuals"].items():
        assert Path(path).is_absolute() and Path(path).is_file(), kind
    edited = get_editor("oracle").edit(img, np.ones_like(img, dtype=bool), f"No {s.attribute}", sample=s, kind="foreground")
    assert np.array_equal(edited, np.asarray(Image.open(s.meta["counterfactuals"]["foreground"])))


# ---- new-user report 3, items 11-13: empty datasets, reruns into a used folder, cues that find no spot ----
_FAST = ["--size", "64", "--no-counterfactuals", "--no-imagenome-jpeg"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_refuses_settings_whose_films_show_no_finding(tmp_path):
    """--n 1 --seed 0 draws one normal film: no finding, so no positive and no negative. Refused (exit 1),
    naming --n, with nothing written; --seed 1 draws a film with three findings: three positives, and a
    warning that they have no balanced negative."""
    from medfocus.cli import main

    out = tmp_path / "d7"
    r = CliRunner().invoke(main, ["synth", "--out", str(out), "--n", "1", "--seed", "0"] + _FAST)
    assert r.exit_code == 1, r.output
    assert "--n 1" in r.output and "0 samples" in r.output and "raise --n" in r.output
    assert not out.exists() and not list(tmp_path.iterdir())  # no temporary folder left either
    r = CliRunner().invoke(main, ["synth", "--out", str(out), "--n", "1", "--seed", "1"] + _FAST)
    assert r.exit_code == 0, r.output
    assert "3 samples (3 positive, 0 negative)" in r.stdout
    assert "3 positives have no balanced negative" in r.stderr
    assert [s.answer for s in load_synthetic(out)] == ["Yes"] * 3


def test_synth_rerun_is_refused_and_overwrite_replaces_the_whole_folder(tmp_path):
    from medfocus.cli import main

    out, fresh = tmp_path / "d1", tmp_path / "fresh"
    r = CliRunner().invoke(main, ["synth", "--out", str(out), "--n", "3", "--preview", str(out / "p.png")] + _FAST)
    assert r.exit_code == 0, r.output
    first = _files(out)
    assert "p.png" in first and len([f for f in first if f.startswith("images/")]) == 3
    second = ["--n", "2", "--seed", "1", "--size", "96", "--no-counterfactuals", "--no-imagenome-jpeg"]
    r = CliRunner().invoke(main, ["synth", "--out", str(out)] + second)
    assert r.exit_code == 1, r.output
    assert f"--out {out} is not empty" in r.output and "--overwrite" in r.output
    assert _files(out) == first  # untouched
    r = CliRunner().invoke(main, ["synth", "--out", str(out), "--overwrite"] + second)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["synth", "--out", str(fresh)] + second)
    assert r.exit_code == 0, r.output
    # exactly the files a write into a new folder gives: no 64-px film, mask or contact sheet of the first run
    assert _files(out) == _files(fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d1", "fresh"]  # no temporary or old folder left


def test_synth_overwrite_refuses_a_folder_it_did_not_write(tmp_path):
    from medfocus.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = CliRunner().invoke(main, ["synth", "--out", str(out), "--n", "2", "--seed", "1", "--overwrite"] + _FAST)
    assert r.exit_code == 1, r.output
    assert "--overwrite replaces only a folder written by `medfocus synth`" in r.output and "notes.txt" in r.output
    assert _files(out) == {"notes.txt": b"keep me"}


def test_synth_counts_records_and_warns_about_cues_that_could_not_be_placed(tmp_path):
    """The report's run: at 64 px with --cue-rate 1 film 0918e2... (pleural effusion + pneumothorax, both mapped
    to the tube cue) gets no tube. Every finding's cue that is missing from its film is listed in the film's
    cues_dropped, the manifest's totals agree, and synth warns with the count."""
    import warnings

    from medfocus.cli import main
    from medfocus.datasets.synthetic import DEFAULT_CUE_MAP

    out = tmp_path / "d8"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, ["synth", "--out", str(out), "--n", "6", "--cue-rate", "1", "--cue-base-rate", "1"] + _FAST)
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    missing = []  # (film, finding) whose correlated cue type the film does not carry: --cue-rate 1 asked for all
    for im in man["images"]:
        have = {c["type"] for c in im["cues"]}
        missing += [(im["image_id"], f["name"]) for f in im["findings"] if DEFAULT_CUE_MAP[f["name"]] not in have]
    dropped = [(im["image_id"], c["finding"]) for im in man["images"] for c in im["cues_dropped"] if c["finding"]]
    assert sorted(dropped) == sorted(missing)
    assert {f for i, f in dropped if i.startswith("0918e2")} == {"pleural effusion", "pneumothorax"}
    place = man["cue_placement"]
    assert place["correlated_dropped"] == len(missing) == 3
    assert place["correlated_placed"] + place["uncorrelated_placed"] == sum(len(im["cues"]) for im in man["images"])
    assert place["uncorrelated_dropped"] == sum(c["finding"] is None for im in man["images"] for c in im["cues_dropped"])
    assert f"Warning: {out / 'manifest.json'}: 3 drawn shortcut cues could not be placed" in r.stderr


def test_lesion_size_rule_recorded_in_the_manifest_and_cli_choices_match(tmp_path):
    """``medfocus synth --lesion-size-rule`` reaches the films and the manifest; the CLI's choices are the
    world's rules; an unknown rule is refused by write_dataset before anything is written."""
    from medfocus.cli import main
    from medfocus.commands.synth import synth as synth_cmd
    from medfocus.commands.demo import demo as demo_cmd
    from medfocus.datasets.synthetic.findings import DEFAULT_LESION_SIZE_RULE, LESION_SIZE_RULES
    from medfocus.errors import ConfigError

    # written out in the CLI (its help must not import the world); kept equal to the world's own names here
    opt = next(p for p in synth_cmd.params if p.name == "lesion_size_rule")
    assert tuple(opt.type.choices) == LESION_SIZE_RULES and opt.default == DEFAULT_LESION_SIZE_RULE
    assert tuple(next(p for p in demo_cmd.params if p.name == "lesion_size_rule").type.choices) == LESION_SIZE_RULES
    r = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "d"), "--n", "4", "--size", "64", "--seed", "2",
                                  "--no-counterfactuals", "--no-imagenome-jpeg", "--lesion-size-rule", "nih"])
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert man["lesion_size_rule"] == "nih" != DEFAULT_LESION_SIZE_RULE
    for im in man["images"]:  # the films are the rule's: same bytes as generate_case with it
        case = generate_case(im["case_seed"], size=64, lesion_size_rule="nih")
        assert [f["box"] for f in im["findings"]] == [[float(v) for v in f.box] for f in case.findings]
    with pytest.raises(ConfigError, match="lesion_size_rule"):
        write_dataset(tmp_path / "e", 2, lesion_size_rule="Fleischner", progress=False)
    assert not (tmp_path / "e").exists()
