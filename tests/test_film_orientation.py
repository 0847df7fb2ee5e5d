"""Which patient side is where on a film, and films the model cannot see (new-user trial 2, items 4 and 11).

Known answers: the real RG1 film says ``PatientOrientation L\\F`` (standard display) and keeps the R-left /
L-right markers; the same film mirrored and stored with ``R\\F`` gets L-left / R-right markers and MedFocus'
"left lung" is then the lung on the image's *left* (checked on a synthetic film whose exact masks are known);
pixels and boxes always stay in the stored frame. A JPEG with EXIF Orientation 6 warns; a 1 x 1 px film and a
7744 x 10 strip are refused and an all-black film warned about, naming the file and its size.
"""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image

from medfocus.errors import DataError, DataWarning
from medfocus.io import CONVENTIONAL_ORIENTATION, FilmOrientation, read_image, read_image_size, read_orientation
from medfocus.io.letterbox import check_film_content


@pytest.fixture(scope="module")
def rg1(shared_data):
    p = shared_data / "real_cxr" / "dicom" / "RG1_UNCR.dcm"
    if not p.is_file():
        pytest.skip(f"real DICOM film not found at {p}")
    return p


def _with_orientation(src, out, value, mirror=False):
    """A copy of ``src`` with ``PatientOrientation = value`` (``None`` deletes it), its pixels mirrored left-right
    when ``mirror`` (as a film stored with the patient's right on the image's right)."""
    ds = pydicom.dcmread(src)
    if mirror:
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    if value is None:
        del ds.PatientOrientation
    else:
        ds.PatientOrientation = value
    ds.save_as(out)
    return out


def _quiet_read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return read_image(path)


# ---- reading PatientOrientation --------------------------------------------------------------------------
def test_real_film_keeps_the_standard_markers(rg1):
    o = read_orientation(rg1)
    assert (o.row, o.column, o.from_header, o.value) == ("L", "F", True, "L\\F")
    assert o.markers == ("R", "L") and not o.mirrored and o.sides_known
    _quiet_read(rg1)  # the standard display: no warning


def test_mirrored_copy_is_labelled_from_its_header_and_keeps_its_pixels(rg1, tmp_path):
    flipped = _with_orientation(rg1, tmp_path / "rg1_RF.dcm", ["R", "F"], mirror=True)
    o = read_orientation(flipped)
    assert o.mirrored and o.markers == ("L", "R") and o.path == str(flipped)
    assert "mirrored" in o.describe() and "R\\F" in o.describe()
    a, size_a = _quiet_read(rg1)
    b, size_b = _quiet_read(flipped)
    assert size_a == size_b == read_image_size(flipped)
    np.testing.assert_array_equal(b, a[:, ::-1])  # read as stored: never flipped back (boxes keep their frame)


def test_films_without_the_tag_keep_the_convention(rg1, tmp_path):
    assert read_orientation(_with_orientation(rg1, tmp_path / "none.dcm", None)) == CONVENTIONAL_ORIENTATION
    png = tmp_path / "film.png"
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(png)
    o = read_orientation(png)
    assert o == CONVENTIONAL_ORIENTATION and o.markers == ("R", "L") and not o.from_header
    assert "convention" in o.describe()


@pytest.mark.parametrize("value,expected", [
    (["L", "H"], r"upside down"),
    (["A", "F"], r"do not run left/right"),
    (["F", "L"], r"do not run left/right"),
    (["X", "F"], r"is not two patient directions.*L\\F is assumed"),
    (["L", "R"], r"names the same axis twice"),
])
def test_unusual_orientations_warn_naming_the_file_and_value(rg1, tmp_path, value, expected):
    p = _with_orientation(rg1, tmp_path / "odd.dcm", value)
    with pytest.warns(DataWarning, match=rf"odd\.dcm: PatientOrientation = '{value[0]}\\\\{value[1]}'.*{expected}"):
        read_image(p)


def test_orientation_letters_follow_the_principal_direction():
    o = FilmOrientation("R", "F", True, "RA\\FL")
    assert o.mirrored and o.markers == ("L", "R")
    assert FilmOrientation("P", "F").markers == ("A", "P") and not FilmOrientation("P", "F").sides_known


# ---- EXIF orientation ---------------------------------------------------------------------------------------
def test_exif_rotated_jpeg_warns_and_is_read_in_its_stored_frame(tmp_path):
    arr = np.tile(np.arange(60, dtype=np.uint8)[None, :] * 4, (40, 1))  # 60 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "exif6.jpeg"
    Image.fromarray(arr).save(p, exif=exif, quality=95)
    with pytest.warns(DataWarning, match=r"exif6\.jpeg: EXIF Orientation = 6: .*90 degrees clockwise.*stored frame \(60 x 40 px"):
        img, size = read_image(p)
    assert img.shape == (40, 60) and size == (60, 40) == read_image_size(p)
    exif[0x0112] = 1
    Image.fromarray(arr).save(tmp_path / "exif1.jpeg", exif=exif)
    _quiet_read(tmp_path / "exif1.jpeg")


# ---- MedFocus' left/right concepts ----------------------------------------------------------------------------
def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _tight(mask) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_mirrored_film_locates_the_patients_structures(tmp_path):
    """A synthetic film stored mirrored: with its orientation, every concept (exact masks known) is found where
    the patient's structure is on the stored film -- "left lung" on the image's left and the cardiac silhouette,
    which lies to the patient's left, mirrored with it -- exactly the mirror of the unmirrored film's transfer.
    Without the orientation (the L\\F convention), the lungs are named the other way round."""
    synthetic = pytest.importorskip("medfocus.datasets.synthetic")
    from medfocus.concepts import transfer as T
    from medfocus.concepts.reference import default_pool

    pool = default_pool(tmp_path, n=4)
    case = synthetic.generate_case(3)
    img = np.ascontiguousarray(case.image[:, ::-1])
    masks = {c: m[:, ::-1] for c, m in case.concept_masks.items()}  # the patient's structures, stored mirrored
    W = img.shape[1]
    mirrored = FilmOrientation("R", "F", True, "R\\F", "m.dcm")
    cache = T.TransferCache(tmp_path / "tc")
    upright = T.transfer_concepts(case.image, pool, cache=cache)
    tr = T.transfer_concepts(img, pool, orientation=mirrored, cache=cache)  # served from the upright film's entry
    assert tr.stats.get("cached") is not False
    plain = T.transfer_concepts(img, pool, cache=None)  # the stored pixels taken as L\\F
    for c in ("left lung", "right lung", "cardiac silhouette"):
        assert _box_iou(tr.boxes[c], _tight(masks[c])) >= 0.5, (c, tr.boxes[c], _tight(masks[c]))
    for side in ("left", "right"):
        assert _box_iou(plain.boxes[f"{side} lung"], _tight(masks[f"{side} lung"])) < 0.2
    assert (tr.boxes["left lung"][0] + tr.boxes["left lung"][2]) / 2 < W / 2  # patient's left on the image's left
    heart = _tight(masks["cardiac silhouette"])
    assert (heart[0] + heart[2]) / 2 < W / 2 and (tr.boxes["cardiac silhouette"][0] + tr.boxes["cardiac silhouette"][2]) / 2 < W / 2
    for c, b in upright.boxes.items():  # exactly the upright transfer, mirrored
        assert tuple(tr.boxes[c]) == (W - b[2], b[1], W - b[0], b[3]), c
        np.testing.assert_array_equal(tr.soft_masks[c], upright.soft_masks[c][:, ::-1])
    np.testing.assert_array_equal(tr.grid_masses, upright.grid_masses[..., ::-1])
    assert "mirrored" in tr.sides and "convention" in plain.sides and "convention" in upright.sides
    with pytest.raises(DataError, match=r"lat\.dcm: PatientOrientation = 'A\\\\F'.*cannot be named"):
        T.transfer_concepts(img, pool, orientation=FilmOrientation("A", "F", True, "A\\F", "lat.dcm"), cache=None)


def test_grounding_reads_image_sides_on_a_mirrored_film():
    from medfocus.concepts.grounding import ground_phrase

    assert ground_phrase("opacity in the lung on the left of the image") == "right lung"
    assert ground_phrase("opacity in the lung on the left of the image", mirrored=True) == "left lung"
    assert ground_phrase("left lower lobe opacity", mirrored=True) == "left lung"  # patient sides never flip


# ---- viewer markers --------------------------------------------------------------------------------------------
def test_viewer_markers_follow_the_film(rg1, tmp_path):
    from medfocus.report.viewer import sample_view

    flipped = _with_orientation(rg1, tmp_path / "rg1_RF.dcm", ["R", "F"], mirror=True)

    def rec(film):
        return {"model": "demo", "dataset": "files", "index": 0, "mode": "direct", "method": "gradcam", "image_path": str(film),
                "question": "q", "answer": "Yes", "error": None, "pred_boxes": [[1, 1, 9, 9]]}

    assert sample_view([rec(rg1)])["markers"] == ["R", "L"]
    view = sample_view([rec(flipped)])
    assert view["markers"] == ["L", "R"] and "mirrored" in view["orientation"]


def test_gallery_markers_follow_the_film(rg1, tmp_path):
    import matplotlib.pyplot as plt

    from medfocus.report import figures
    from medfocus.report.html import _film_markers

    flipped = _with_orientation(rg1, tmp_path / "rg1_RF.dcm", ["R", "F"], mirror=True)
    assert _film_markers({"image_path": str(rg1)}) == ("R", "L")
    assert _film_markers({"image_path": str(flipped)}) == ("L", "R")
    img = np.zeros((40, 60), np.uint8)
    for markers in (("R", "L"), ("L", "R")):
        fig = figures.make_sample_gallery_row(img, [], [{"method": "gradcam", "heatmap": None, "pred_boxes": []}], markers=markers)
        try:
            for ax in fig.axes[:2]:  # the film and the method panel: image-left letter first
                left = [t.get_text() for t in ax.texts if t.get_position()[0] < 0.5]
                right = [t.get_text() for t in ax.texts if t.get_position()[0] > 0.5]
                assert (left, right) == ([markers[0]], [markers[1]])
        finally:
            plt.close(fig)


# ---- films the model cannot see -------------------------------------------------------------------------------
CANVAS, GRID = (224, 224), (8, 8)  # the demo model: 224-px canvas, 28-px token cells


@pytest.mark.parametrize("shape,match", [
    ((1, 1), r"tiny\.png: film is 1 x 1 px, fewer pixels than the 8 x 8 image tokens"),
    ((10, 7744), r"tiny\.png: film is 7744 x 10 px; .* content is 224\.0 x 0\.3 px, its height less than one image token \(28 x 28 px\)"),
    ((1000, 20), r"tiny\.png: film is 20 x 1000 px; .* content is 4\.5 x 224\.0 px, its width less than one image token"),
])
def test_films_under_one_token_cell_are_refused(shape, match):
    img = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    with pytest.raises(DataError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # a 1 x 1 film is also constant
        check_film_content(img, "/x/tiny.png", CANVAS, GRID)


def test_constant_film_warns_and_real_sizes_pass():
    with pytest.warns(DataWarning, match=r"black\.png: film is 300 x 200 px and every pixel has the value 0"):
        check_film_content(np.zeros((200, 300), np.uint8), "/x/black.png", CANVAS, GRID)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        img = np.random.default_rng(1).integers(0, 255, (592, 968), dtype=np.uint8)
        check_film_content(img, "/x/ok.png", CANVAS, GRID)
        check_film_content(img[:, :120], "/x/narrow.png", CANVAS, GRID)  # 120 x 592 -> 45 px wide: 1.6 tokens


def test_runner_refuses_a_tiny_film_before_the_model_runs(tmp_path):
    """Through run_grid with the toy adapter (32-px canvas, 8 x 8 tokens): the 1 x 1 film is an error record
    naming the file and size, and the model never generated an answer for it."""
    from medfocus.attribution.testing import ToyAdapter
    from medfocus.runner.grid import WorkItem, run_grid
    from medfocus.runner.store import ResultStore, read_jsonl
    from medfocus.types import Sample

    adapter = ToyAdapter()
    assert adapter.token_grid() == (8, 8)
    np.save(tmp_path / "tiny.npy", np.full((1, 1), 200, np.uint8))
    sample = Sample("synthetic", 0, str(tmp_path / "tiny.npy"), "cardiomegaly", "Is there evidence of cardiomegaly in the image?",
                    "Yes", [(0.0, 0.0, 1.0, 1.0)], (1, 1))
    calls = []
    adapter.generate = lambda *a, **k: calls.append(1) or ["Yes"]
    with ResultStore(tmp_path / "pred.jsonl") as st, warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        summ = run_grid([WorkItem("toy", "synthetic", "direct", sample)], {"gradcam": {}}, st, load_model=lambda _n: adapter,
                        read_image=np.load, progress=False, release_model=False)
    (rec,) = read_jsonl(tmp_path / "pred.jsonl")[0]
    assert summ.errors == 1 and calls == []
    assert rec["error"].startswith("film refused: ") and "tiny.npy: film is 1 x 1 px" in rec["error"]


@pytest.mark.parametrize("fam", ["qwen_vl", "gemma3", "llava"])
def test_token_grid_from_the_config_matches_the_processed_inputs(tiny_adapters, fam):
    from medfocus.lvlm.adapter import LVLMAdapter

    a = tiny_adapters[fam]
    cw, ch = a.canvas_size
    grid = a.prepare(np.zeros((ch, cw), np.uint8), "Is there evidence of nodule in the image?").grid_hw
    assert a.token_grid() == tuple(grid)
    assert LVLMAdapter.token_grid(a) == tuple(grid)  # the generic default (one processor call) agrees


def test_benchmark_build_refuses_films_the_model_cannot_see(tmp_path):
    """The causal filter runs the same check before generating: a model whose 64 x 64 canvas has 64 x 64 tokens
    cannot see 48 x 48 films without upsampling every pixel over several tokens -> an error row per sample, no
    answer generated."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_bench import PLAN, ToyAdapter, make_toy_world

    from medfocus.bench import build_benchmark, read_log, split_paths
    from medfocus.editing import get_editor

    samples = make_toy_world(tmp_path / "data", PLAN[:2])
    adapter = ToyAdapter()
    adapter.canvas_size, adapter.token_grid = (64, 64), lambda: (64, 64)
    _, ret = build_benchmark(adapter, samples, mode="direct", editor=get_editor("oracle"), out_dir=tmp_path / "out",
                             model_name="toy", progress=False)
    assert ret["errors"] == 2 and adapter.n_images == 0
    row = read_log(split_paths(tmp_path / "out", "toy", "toy", "direct")["log"])[("toy", "toy", 0)]
    assert "0.png: film is 48 x 48 px, fewer pixels than the 64 x 64 image tokens" in row["error"]


def test_film_warnings_are_kept_in_the_records_and_shown_by_the_viewer(tmp_path):
    """An all-black film warns once on the console and its records keep the warning (``film_warnings``),
    which the viewer shows on the film's section; a normal film's records carry none."""
    from medfocus.attribution.testing import ToyAdapter
    from medfocus.report.viewer import sample_view
    from medfocus.runner.grid import WorkItem, run_grid
    from medfocus.runner.store import ResultStore, load_results
    from medfocus.types import Sample

    adapter = ToyAdapter()
    films = {"black": np.zeros((64, 64), np.uint8), "film": np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)}
    items = []
    for i, (name, arr) in enumerate(films.items()):
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
        s = Sample("synthetic", i, str(tmp_path / f"{name}.png"), "cardiomegaly", "Is there evidence of cardiomegaly in the image?",
                   "Yes", [(8.0, 8.0, 40.0, 40.0)], (64, 64))
        items.append(WorkItem("toy", "synthetic", "direct", s, answer_source="ground_truth"))
    with ResultStore(tmp_path / "pred.jsonl") as st, pytest.warns(DataWarning) as caught:
        run_grid(items, {"occlusion": {"grid": 4}, "gradcam": {}}, st, load_model=lambda _n: adapter, progress=False,
                 release_model=False)
    msgs = [str(w.message) for w in caught if "black.png" in str(w.message)]
    assert msgs and all("every pixel has the value 0" in m for m in msgs)
    recs = load_results(tmp_path / "pred.jsonl")
    by = {(r["index"], r["method"]): r for r in recs}
    for m in ("occlusion", "gradcam"):
        (w,) = by[(0, m)]["film_warnings"]
        assert "black.png: film is 64 x 64 px and every pixel has the value 0" in w
        assert by[(1, m)]["film_warnings"] == []
    view = sample_view([r for r in recs if r["index"] == 0], tmp_path)
    assert any("every pixel has the value 0" in w for w in view["warnings"])
    assert not any("value 0" in w for w in sample_view([r for r in recs if r["index"] == 1], tmp_path)["warnings"])


def test_the_cli_shows_each_data_warning_once_per_command():
    """A film read by several steps warns in each; the console gets the message once."""
    import warnings as _w

    import click
    from click.testing import CliRunner

    from medfocus.cli import LazyGroup

    grp = LazyGroup(name="m")

    @grp.command("warn")
    def warn_cmd() -> None:
        for _ in range(3):
            with _w.catch_warnings():
                _w.simplefilter("always", DataWarning)
                _w.warn("/x/exif6.jpeg: EXIF Orientation = 6", DataWarning, stacklevel=1)
        _w.warn("/x/other.png: another", DataWarning, stacklevel=1)
        click.echo("done")

    grp.list_commands = lambda ctx: ["warn"]
    grp.get_command = lambda ctx, name: warn_cmd if name == "warn" else None
    res = CliRunner().invoke(grp, ["warn"])
    assert res.exit_code == 0, res.output
    assert res.output.count("Warning: /x/exif6.jpeg: EXIF Orientation = 6") == 1
    assert res.output.count("Warning: /x/other.png: another") == 1


def test_an_interrupted_command_says_what_is_kept_and_exits_130():
    """Ctrl-C is not click's bare "Aborted!" with status 1 (which the README reserves for a refused run)."""
    from click.testing import CliRunner

    from medfocus.cli import INTERRUPTED, LazyGroup

    grp = LazyGroup(name="m")

    @grp.command("work")
    def work() -> None:
        raise KeyboardInterrupt

    grp.get_command = lambda ctx, name: work if name == "work" else None
    res = CliRunner().invoke(grp, ["work"])
    assert res.exit_code == INTERRUPTED == 130
    assert "Interrupted: every result written before the interrupt is kept; rerun the same command" in res.output
    assert "Aborted!" not in res.output
