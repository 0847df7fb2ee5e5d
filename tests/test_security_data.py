"""Reads outside the data root (issue 13, item 4): an image id from a data file that leaves the data
root (``..`` segments, an absolute path) is refused with an error naming the field; with
``--allow-outside-root`` it is read with a warning."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from medfocus.datasets.nih_cxr8 import load_nih_cxr8
from medfocus.datasets.padchest_gr import load_padchest_gr
from medfocus.datasets.vindr_cxr import load_vindr_cxr
from medfocus.errors import DataError
from medfocus.io import write_dicom, write_png, write_png16
from medfocus.io.paths import allow_outside_root, resolve_inside


def test_resolve_inside_payloads(tmp_path):
    root = tmp_path / "root"
    assert resolve_inside(root, "a/b.png") == root / "a" / "b.png"
    assert resolve_inside(root, "a/../b.png") == root / "b.png"  # stays inside: fine
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd", "a/../../root2/x.png", "..", str(tmp_path / "x.png")):
        with pytest.raises(DataError, match="outside the data root"):
            resolve_inside(root, bad, what="image_id")
    with allow_outside_root():
        assert resolve_inside(root, "../x.png") == tmp_path / "x.png"
    with pytest.raises(DataError):  # the opt-in ends with its block
        resolve_inside(root, "../x.png")


@pytest.fixture()
def secret(tmp_path):
    """A readable image outside the data root that a crafted id points at."""
    p = tmp_path / "outside" / "secret.png"
    write_png(p, np.full((20, 20), 7, np.uint8))
    return p


def test_padchest_image_id_outside_root(tmp_path, secret, caplog):
    root = tmp_path / "root"
    root.mkdir()
    write_png16(root / "PadChest_GR" / "ok.png", np.ones((20, 20), np.uint16))
    for image_id in ("../../outside/secret.png", str(secret)):
        studies = [{"ImageID": image_id, "StudyID": "S1", "findings": [
            {"abnormal": True, "labels": ["nodule"], "boxes": [[0.1, 0.1, 0.5, 0.5]], "extra_boxes": [], "locations": []}]}]
        (root / "filtered_studies.json").write_text(json.dumps(studies))
        with pytest.raises(DataError, match="'ImageID'.*outside the data root"):
            load_padchest_gr(root)
    with caplog.at_level(logging.WARNING), allow_outside_root():
        samples = load_padchest_gr(root)
    assert samples[0].image_path == str(secret) and "allowed by --allow-outside-root" in caplog.text


def test_vindr_image_id_outside_root(tmp_path, secret):
    base = tmp_path / "root" / "vindr-cxr" / "1.0.0"
    (base / "annotations").mkdir(parents=True)
    write_dicom(tmp_path / "outside" / "x.dicom", np.ones((16, 16), np.uint16))
    with open(base / "annotations" / "annotations_test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("image_id", "rad_ID", "class_name", "x_min", "y_min", "x_max", "y_max"))
        w.writerow(("../../../outside/x", "R1", "Nodule/Mass", 1, 1, 5, 5))
    with pytest.raises(DataError, match="image_id '../../../outside/x'.*outside the data root"):
        load_vindr_cxr(tmp_path / "root")


def test_nih_absolute_image_index(tmp_path, secret):
    base = tmp_path / "root" / "nih-chestxray8"
    base.mkdir(parents=True)
    (base / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" f"{secret},Nodule,1,1,5,5,,\n")
    (base / "images").mkdir()
    with pytest.raises(DataError, match="'Image Index'.*outside the data root"):
        load_nih_cxr8(tmp_path / "root")


def test_cli_flag_allows_with_warning(tmp_path, secret, monkeypatch):
    """`attribute --allow-outside-root` turns the refusal into a warning for the loaders it calls."""
    import medfocus.commands.attribute as attr_cmd
    from click.testing import CliRunner

    from medfocus.cli import main

    seen = []

    def load_samples(ds, root, rescale_boxes=False):
        try:
            seen.append(resolve_inside(tmp_path / "root", "../outside/secret.png"))
        except DataError as exc:
            raise exc
        return []

    monkeypatch.setattr(attr_cmd, "load_samples", load_samples)
    args = ["attribute", "--dataset", "synthetic", "--model", "demo", "--method", "occlusion", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "outside the data root" in r.output and "--allow-outside-root" in r.output
    r = CliRunner().invoke(main, [*args, "--allow-outside-root"])
    assert seen == [secret] and "outside the data root" not in r.output


TRAVERSALS = ["../../escaped", "/etc/escaped", "..", ".", "a/../../escaped", "..\\..\\escaped", "\x00", ""]


def test_every_path_built_from_fields_stays_inside(tmp_path):
    """Issue 13 item 3: record/data fields that reach a file name (model, dataset, mode, method, editor,
    kind) cannot leave the folder the file is written into."""
    from medfocus.bench.build import GenerationCache, split_paths
    from medfocus.editing.base import EditCache
    from medfocus.runner.store import ResultStore

    out = (tmp_path / "out").resolve()

    def inside(p):
        return out in Path(p).resolve().parents

    for t in TRAVERSALS:
        for p in split_paths(out, t, t, t).values():
            assert inside(p), (t, p)
        assert inside(GenerationCache(out, t, t, t).path), t
        assert inside(EditCache(out).path(t, 1, t, t, "prompt", 0)), t
        with ResultStore(out / "p.jsonl") as st:
            assert inside(st.heatmap_path((t, t, 0, t, t))), t
