"""The demo box-prompted segmenter (tiny SamModel trained on the synthetic world): training code,
the shipped weights, and what refinement does for MedFocus' transferred concepts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medfocus.concepts.refine import SYNTHETIC_SAM_DIR as DEMO_SAM_DIR
from medfocus.training.demo_segmenter import DemoSamConfig, build_data, build_demo_sam, train_demo_sam, train_loop
from medfocus.concepts.refine import MedSAMRefiner, load_medsam, resolve_checkpoint
from medfocus.types import CONCEPTS

synthetic = pytest.importorskip("medfocus.datasets.synthetic")

TINY = dict(n_train=6, n_val=3, size=128, hidden=32, layers=2, heads=2, embed=32, batch=3, warmup=5, num_threads=1)


def _shipped() -> bool:
    return (DEMO_SAM_DIR / "config.json").is_file() and any(DEMO_SAM_DIR.glob("*.safetensors"))


needs_shipped = pytest.mark.skipif(not _shipped(), reason="demo segmenter not built yet (medfocus train-demo-sam)")


def _box_of(m):
    ys, xs = np.nonzero(m)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    i = ix * iy
    return i / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i)


def test_training_data_prompts_and_targets():
    cfg = DemoSamConfig(**TINY)
    d = build_data(cfg, 4, 3_000_000, keep_masks=True, progress=False)
    assert d.images.shape == (4, 128, 128) and d.targets.shape == (4, 11, 32, 32)
    # targets are the exact masks averaged over 4x4 cells; exact boxes are the masks' tight boxes
    for k in range(11):
        m = d.masks[0, k]
        assert d.targets[0, k].sum() * 16 == pytest.approx(m.sum())
        if m.any():
            assert tuple(d.exact[0, k]) == _box_of(m)
    assert np.isfinite(d.transferred).all() and (d.transferred[..., 2] > d.transferred[..., 0]).all()


def test_train_and_reload_tiny(tmp_path):
    cfg = DemoSamConfig(**TINY, steps=30, lr=3e-3)
    info = train_demo_sam(tmp_path / "sam", cfg, log=lambda s: None, progress=False)
    card = (tmp_path / "sam" / "MODEL_CARD.md").read_text()
    assert "refined box IoU" in card and "cardiac silhouette" in card
    rec = json.loads((tmp_path / "sam" / "training.json").read_text())
    assert rec["config"]["steps"] == 30 and set(rec["metrics"]) == {"box_iou_transferred", "box_iou_refined", "mask_iou_refined"}
    assert 0 <= info["metrics"]["mask_iou_refined"]["mean"] <= 1
    ref = MedSAMRefiner.from_pretrained(str(tmp_path / "sam"), device="cpu")
    case = synthetic.generate_case(7, size=128)
    probs = ref.segment(case.image, [(10.0, 10.0, 60.0, 90.0)])
    assert probs.shape == (1, 128, 128)
    assert not (tmp_path / "sam.tmp").exists()


def test_training_lowers_the_loss():
    cfg = DemoSamConfig(**TINY, steps=60, lr=3e-3)
    torch.set_num_threads(1)
    model, proc = build_demo_sam(cfg)
    data = build_data(cfg, cfg.n_train, 3_000_000, progress=False)
    losses = train_loop(model, proc, data, cfg, log=lambda s: None, progress=False)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_demo_name_resolves_to_the_package_folder():
    assert resolve_checkpoint("demo") == str(DEMO_SAM_DIR)
    assert resolve_checkpoint("flaviagiammarino/medsam-vit-base") == "flaviagiammarino/medsam-vit-base"


@needs_shipped
def test_shipped_segmenter_grows_an_enlarged_heart():
    """Held-out severe cardiomegaly: the transferred cardiac box (from a normal reference) covers the
    centre of the heart; the refined box/mask recover the whole heart."""
    from medfocus.concepts.reference import default_pool
    from medfocus.concepts.transfer import transfer_concepts

    ref = load_medsam("demo", device="cpu")
    assert ref is not None
    pool = default_pool()
    before, after, mask_iou = [], [], []
    for seed in range(3):
        case = synthetic.generate_case(100 + seed, findings=["cardiomegaly"], severity=1.0)
        heart = case.concept_masks["cardiac silhouette"]
        plain = transfer_concepts(case.image, pool)
        refined = transfer_concepts(case.image, pool, refine="medsam", refiner=ref)
        assert refined.refine == "medsam"
        before.append(_iou(plain.boxes["cardiac silhouette"], _box_of(heart)))
        after.append(_iou(refined.boxes["cardiac silhouette"], _box_of(heart)))
        m = refined.soft_masks["cardiac silhouette"] >= 0.5
        mask_iou.append((m & heart).sum() / (m | heart).sum())
    assert np.mean(before) < 0.5 < 0.75 < np.mean(after), (before, after)
    assert np.mean(mask_iou) > 0.75, mask_iou


@needs_shipped
def test_shipped_card_matches_the_weights():
    card = (DEMO_SAM_DIR / "MODEL_CARD.md").read_text()
    rec = json.loads((DEMO_SAM_DIR / "training.json").read_text())
    n = sum(p.numel() for p in MedSAMRefiner.from_pretrained("demo", device="cpu").model.parameters())
    assert rec["parameters"] == n and f"{n:,}" in card
    for c in CONCEPTS:
        assert c in card


def test_train_demo_sam_command(tmp_path):
    from click.testing import CliRunner

    from medfocus.cli import main

    out = tmp_path / "sam"
    r = CliRunner().invoke(main, ["train-demo-sam", "--out", str(out), "--films", "3", "--val-films", "2", "--steps", "2",
                                  "--threads", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "held-out mean box IoU" in r.output
    rec = json.loads((out / "training.json").read_text())
    assert (rec["config"]["n_train"], rec["config"]["n_val"], rec["config"]["steps"], rec["config"]["batch"]) == (3, 2, 2, 3)
    assert MedSAMRefiner.from_pretrained(str(out), device="cpu").model.config.vision_config.hidden_size == 96
    r = CliRunner().invoke(main, ["train-demo-sam", "--out", str(out), "--steps", "0"])
    assert r.exit_code != 0 and "--steps" in r.output
    # --threads 0 is refused while parsing (it used to reach torch.set_num_threads' bare error)
    r = CliRunner().invoke(main, ["train-demo-sam", "--out", str(tmp_path / "sam0"), "--threads", "0"])
    assert r.exit_code == 2 and "--threads" in r.output and "x>=1" in r.output and not (tmp_path / "sam0").exists()
