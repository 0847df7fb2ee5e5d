"""Known-by-construction cue reliance (medfocus.bench.cue_reliance) on readers whose evidence is known:
the cue-free render differs from the cued one only at the cues, a cue reader is cue-necessary on every
cued positive, a finding reader on none, and the pointing scores read the right boxes."""

from __future__ import annotations

import numpy as np
import pytest

from medfocus.bench.cue_reliance import correlated_cue_box, cue_necessity, retention_by_reliance
from medfocus.evaluation.metrics import cue_pointing
from medfocus.datasets.synthetic import load_synthetic, write_dataset
from medfocus.errors import DataError
from medfocus.io import read_image
from test_bench import ToyAdapter


@pytest.fixture(scope="module")
def twin_worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("cue_twins")
    write_dataset(root / "cued", 12, seed=5, size=128, cue_rate=1.0, counterfactuals=False, imagenome=False, progress=False)
    write_dataset(root / "free", 12, seed=5, size=128, cue_rate=0.0, counterfactuals=False, imagenome=False, progress=False)
    return load_synthetic(root / "cued"), load_synthetic(root / "free")


def _cue_mask(s, shape, pad=0):
    # the recorded box holds every pixel the cue changes (anti-aliased edge and detector blur included)
    m = np.zeros(shape, bool)
    for c in s.meta.get("cues", []):
        x1, y1, x2, y2 = (int(round(v)) for v in c["box"])
        m[max(0, y1 - pad):y2 + pad, max(0, x1 - pad):x2 + pad] = True
    return m


def test_cue_free_render_differs_only_at_the_cues(twin_worlds):
    cued, free = twin_worlds
    assert [(s.meta["image_id"], s.attribute, s.answer) for s in cued] == [(s.meta["image_id"], s.attribute, s.answer) for s in free]
    n_cued = 0
    for a, b in zip(cued, free):
        ia, ib = read_image(a.image_path)[0], read_image(b.image_path)[0]
        diff = ia != ib
        assert not (diff & ~_cue_mask(a, ia.shape)).any(), f"{a.meta['image_id']}: pixels outside the cues differ"
        n_cued += bool(diff.any())
        assert not b.meta.get("cues")
    assert n_cued > 0


class _Reader(ToyAdapter):
    def generate(self, images, questions, *, max_new_tokens=64, batch_size=8):
        return ["Yes." if self._answer(np.asarray(i), q) else "No." for i, q in zip(images, questions)]


class CueReader(_Reader):
    """Says "Yes" iff the asked finding's correlated cue is drawn (pixel-identical to the cued film)."""

    def __init__(self, cued):
        super().__init__()
        self.known = []
        for s in cued:
            box = correlated_cue_box(s)
            if box is not None:
                img = read_image(s.image_path)[0]
                x1, y1, x2, y2 = (int(round(v)) for v in box)
                self.known.append((s.question, img[y1:y2, x1:x2].copy(), (x1, y1, x2, y2)))

    def _answer(self, img, question):
        for q, patch, (x1, y1, x2, y2) in self.known:
            if question.startswith(q) and np.array_equal(img[y1:y2, x1:x2], patch) and patch.std() > 0:
                return True
        return False


class FindingReader(_Reader):
    """Says "Yes" iff the sample's finding is present (reads the truth: a model that needs no cue)."""

    def __init__(self, cued):
        super().__init__()
        self.pos = {s.question for s in cued if s.answer == "Yes"}

    def _answer(self, img, question):
        return any(question.startswith(q) for q in self.pos)


def test_cue_reader_is_cue_necessary_and_finding_reader_is_not(twin_worlds):
    cued, free = twin_worlds
    expected = [s.index for s in cued if s.answer == "Yes" and correlated_cue_box(s) is not None]
    assert expected
    oc = cue_necessity(CueReader(cued), cued, free)
    assert [o.index for o in oc] == expected
    assert all(o.cue_necessary and not o.cue_independent for o in oc)
    oc2 = cue_necessity(FindingReader(cued), cued, free)
    assert all(o.cue_independent and not o.cue_necessary for o in oc2)
    kept = {o.index: k % 2 == 0 for k, o in enumerate(oc)}
    assert retention_by_reliance(oc, kept) == {"cue_necessary": (sum(kept.values()), len(oc)), "cue_independent": (0, 0)}


def test_cue_necessity_refuses_unmatched_films(twin_worlds, tmp_path):
    cued, _ = twin_worlds
    write_dataset(tmp_path / "other", 12, seed=6, size=128, cue_rate=0.0, counterfactuals=False, imagenome=False, progress=False)
    with pytest.raises(DataError, match="no cue-free counterpart"):
        cue_necessity(FindingReader(cued), cued, load_synthetic(tmp_path / "other"))


def test_cue_pointing_known_boxes():
    hm = np.zeros((100, 100), np.float32)
    hm[10:20, 10:20] = 1.0  # cue
    hm[60:70, 60:70] = 3.0  # finding: the maximum
    r = cue_pointing(hm, (10, 10, 20, 20), [(60, 60, 70, 70)])
    assert r == {"cue_hit": 0.0, "finding_hit": 1.0, "cue_energy": pytest.approx(0.25), "finding_energy": pytest.approx(0.75)}


def test_cue_records_that_predate_whole_cue_boxes_are_refused_or_rewritten(twin_worlds, tmp_path):
    """A record without ``core_box`` was written when ``box`` was only the stroke's core: scoring against it
    would be wrong, so it is refused with the fix; the shortcut runner's own folders are written again."""
    import dataclasses
    import json

    from medfocus.runner.shortcut import write_cue_twins

    cued, _ = twin_worlds
    s = next(s for s in cued if correlated_cue_box(s) is not None)
    old = dataclasses.replace(s, meta={**s.meta, "cues": [{k: v for k, v in c.items() if k != "core_box"} for c in s.meta["cues"]]})
    with pytest.raises(DataError, match="medfocus synth"):
        correlated_cue_box(old)

    first, _ = write_cue_twins(tmp_path, 4, seed=5, size=128)
    boxes = [c["box"] for t in first for c in t.meta.get("cues") or []]
    assert boxes
    man = tmp_path / "cued" / "manifest.json"
    m = json.loads(man.read_text())
    for im in m["images"]:
        for c in im["cues"]:
            del c["core_box"]
            c["box"] = [0.0, 0.0, 1.0, 1.0]
    man.write_text(json.dumps(m))
    again, _ = write_cue_twins(tmp_path, 4, seed=5, size=128)
    assert [c["box"] for t in again for c in t.meta.get("cues") or []] == boxes


def test_cue_twins_are_rewritten_when_their_settings_change(tmp_path):
    """The shortcut step's films are reused only when their manifest records the requested settings: a rerun
    with another film count, seed or lesion size rule measures new films, never the old ones (it used to reuse
    any folder with a manifest, so `medfocus demo --shortcut-films 20` after a default run measured 48 films)."""
    import json

    from medfocus.datasets.synthetic.dataset import written_settings
    from medfocus.runner.shortcut import write_cue_twins

    cued, free = write_cue_twins(tmp_path, 4, seed=5, size=64)
    stamp = (tmp_path / "cued" / "manifest.json").stat().st_mtime_ns
    assert written_settings(tmp_path / "cued")["lesion_size_rule"] == "fleischner"  # the default world, resolved
    again, _ = write_cue_twins(tmp_path, 4, seed=5, size=64)  # same settings: reused as written
    assert (tmp_path / "cued" / "manifest.json").stat().st_mtime_ns == stamp and len(again) == len(cued)
    fewer, fewer_free = write_cue_twins(tmp_path, 2, seed=5, size=64)
    assert {s.meta["image_id"] for s in fewer} < {s.meta["image_id"] for s in cued}
    assert written_settings(tmp_path / "free")["n"] == 2 and len(fewer_free) == len(fewer)
    write_cue_twins(tmp_path, 2, seed=5, size=64, lesion_size_rule="nih")
    assert {written_settings(tmp_path / d)["lesion_size_rule"] for d in ("cued", "free")} == {"nih"}
    # a manifest written before the rule existed holds the nih world
    man = tmp_path / "cued" / "manifest.json"
    m = json.loads(man.read_text())
    del m["lesion_size_rule"]
    man.write_text(json.dumps(m))
    assert written_settings(tmp_path / "cued")["lesion_size_rule"] == "nih"
    assert written_settings(tmp_path / "absent") is None
