"""The demo box-prompted segmenter: a tiny genuine ``SamModel`` trained on the synthetic world.

MedFocus refines transferred concept boxes with MedSAM (:mod:`medfocus.concepts.refine`). MedSAM's
weights cannot be fetched offline, so the embedded default ships a stand-in with the same
architecture and the same code path: a ``SamModel`` (ViT image encoder, prompt encoder, two-way
mask decoder; ~1 M parameters, 256-px input) trained here on synthetic films with exact concept
masks. It is loaded with ``MedSAMRefiner.from_pretrained(SYNTHETIC_SAM_DIR)`` -- exactly as the real
checkpoint -- and selected with ``refine="medsam", medsam="demo"``.

What it learns. The prompts are the boxes MedFocus will actually give it: half are the boxes the OT
transfer (:func:`medfocus.concepts.transfer.transfer_concepts`, no refinement) finds on the
training film, half are the exact concept boxes jittered (shifted by up to ``jitter`` of their size
and rescaled by ``scale_range``). The target of a box is the exact mask of its concept. A third of
the films have cardiomegaly (an enlarged heart whose transferred box, taken from a normal
reference, covers only its centre), so the segmenter learns to return the whole structure the
box points at, not the box. Loss: binary cross-entropy + soft Dice on SAM's ``64 x 64``
low-resolution logits (targets: area-averaged exact masks).

Training seeds start at :attr:`DemoSamConfig.seed_base` (3,000,000), disjoint from the demo LVLM's
and the tests' seeds. ``medfocus train-demo-sam --out DIR`` writes the folder; the shipped one is
``src/medfocus/concepts/synthetic_sam`` (:data:`medfocus.concepts.refine.SYNTHETIC_SAM_DIR`) with its
``MODEL_CARD.md`` (held-out IoU table).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medfocus.io.atomic import atomic_directory
from medfocus.types import Box, CONCEPTS

@dataclass
class DemoSamConfig:
    """Everything that determines the demo segmenter (recorded in its model card).

    Attributes:
        n_train, n_val: synthetic films for training / held-out evaluation.
        size: film side (px); also the SAM input side (no resizing).
        p_cardiomegaly: share of training films with an enlarged heart.
        p_transferred: share of prompts that are OT-transferred boxes (the rest: jittered exact boxes).
        jitter: largest shift of a jittered box, as a fraction of its width/height.
        scale_range: range of the factor a jittered box's width/height is multiplied by.
        steps, batch, lr, warmup, weight_decay: optimisation (AdamW, linear warm-up, cosine decay).
        hidden, layers, heads, patch, embed: encoder width/depth/heads, patch size, embedding channels.
        seed, seed_base: RNG seed; first film seed.
        num_threads: torch CPU threads.
    """

    n_train: int = 1200
    n_val: int = 96
    size: int = 256
    p_cardiomegaly: float = 0.35
    p_transferred: float = 0.5
    jitter: float = 0.15
    scale_range: tuple[float, float] = (0.55, 1.3)
    steps: int = 5000
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    hidden: int = 96
    layers: int = 4
    heads: int = 4
    patch: int = 16
    embed: int = 64
    seed: int = 0
    seed_base: int = 3_000_000
    num_threads: int = 2


def build_demo_sam(cfg: DemoSamConfig) -> tuple[Any, Any]:
    """A random-initialised ``SamModel`` and its ``SamProcessor`` (torchvision-free PIL processor)
    for ``cfg.size``-pixel inputs. Returns ``(model, processor)``."""
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    g = cfg.size // cfg.patch
    torch.manual_seed(cfg.seed)
    sc = SamConfig(
        vision_config=dict(hidden_size=cfg.hidden, output_channels=cfg.embed, num_hidden_layers=cfg.layers,
                           num_attention_heads=cfg.heads, image_size=cfg.size, patch_size=cfg.patch,
                           window_size=g // 2, global_attn_indexes=list(range(1, cfg.layers, 2)),
                           mlp_dim=4 * cfg.hidden, num_pos_feats=cfg.embed // 2),
        prompt_encoder_config=dict(hidden_size=cfg.embed, image_size=cfg.size, patch_size=cfg.patch, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=cfg.embed, mlp_dim=2 * cfg.embed, num_attention_heads=4,
                                 iou_head_hidden_dim=cfg.embed),
    )
    proc = SamProcessor(image_processor=SamImageProcessorPil(size={"longest_edge": cfg.size},
                                                             pad_size={"height": cfg.size, "width": cfg.size}))
    return SamModel(sc), proc


def _normalise(images: torch.Tensor, processor: Any) -> torch.Tensor:
    """``(B, S, S)`` uint8 films -> ``(B, 3, S, S)`` pixel values, as the processor makes them for a
    film that already has the input size (rescale to [0, 1], per-channel mean/std; no resize, no pad)."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(ip.image_std, dtype=torch.float32)[None, :, None, None]
    x = images.float()[:, None].expand(-1, 3, -1, -1) / 255.0
    return (x - mean) / std


def _jitter(box: Box, rng: random.Random, cfg: DemoSamConfig) -> Box:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2 + rng.uniform(-cfg.jitter, cfg.jitter) * w
    cy = (y1 + y2) / 2 + rng.uniform(-cfg.jitter, cfg.jitter) * h
    w *= rng.uniform(*cfg.scale_range)
    h *= rng.uniform(*cfg.scale_range)
    s = cfg.size
    return (max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(float(s), cx + w / 2), min(float(s), cy + h / 2))


@dataclass
class SamData:
    """Films, targets and prompts. ``images (N, S, S)`` uint8; ``targets (N, 11, S/4, S/4)`` float
    (area-averaged exact masks); ``masks (N, 11, S, S)`` bool (kept for the held-out set only, else
    ``None``); ``exact`` / ``transferred`` ``(N, 11, 4)`` float boxes (exact: NaN for an empty mask)."""

    images: np.ndarray
    targets: np.ndarray
    masks: np.ndarray | None
    exact: np.ndarray
    transferred: np.ndarray
    seeds: list[int]


def build_data(cfg: DemoSamConfig, n: int, seed0: int, *, keep_masks: bool = False, progress: bool = True) -> SamData:
    """Generate ``n`` films from seed ``seed0`` (cardiomegaly with probability ``cfg.p_cardiomegaly``,
    otherwise the synthetic world's random findings) with their exact masks and OT-transferred boxes."""
    from tqdm.auto import tqdm

    from medfocus.concepts.reference import default_pool
    from medfocus.concepts.transfer import transfer_concepts
    from medfocus.datasets.synthetic import FINDINGS, generate_case
    from medfocus.datasets.synthetic.phantom import mask_box

    pool = default_pool()
    rng = random.Random(seed0)
    S, q = cfg.size, cfg.size // 4
    imgs = np.zeros((n, S, S), np.uint8)
    tg = np.zeros((n, len(CONCEPTS), q, q), np.float32)
    ms = np.zeros((n, len(CONCEPTS), S, S), bool) if keep_masks else None
    ex = np.full((n, len(CONCEPTS), 4), np.nan, np.float32)
    trb = np.zeros((n, len(CONCEPTS), 4), np.float32)
    seeds = []
    others = [f for f in FINDINGS if f != "cardiomegaly"]
    for i in tqdm(range(n), desc="segmenter films", disable=not progress):
        s = seed0 + i
        if rng.random() < cfg.p_cardiomegaly:
            fl = ["cardiomegaly"] + ([rng.choice(others)] if rng.random() < 0.3 else [])
            case = generate_case(s, size=S, findings=fl, lesion_size_rule="nih")
        else:
            # the rule the shipped segmenter was trained in, written out: its recipe must not change with the default
            case = generate_case(s, size=S, lesion_size_rule="nih")
        imgs[i] = case.image
        for k, c in enumerate(CONCEPTS):
            m = case.concept_masks[c]
            tg[i, k] = m.reshape(q, 4, q, 4).mean((1, 3))
            if ms is not None:
                ms[i, k] = m
            b = mask_box(m)
            if b is not None:
                ex[i, k] = b
        tr = transfer_concepts(case.image, pool, cache=None)
        trb[i] = [tr.boxes[c] for c in CONCEPTS]
        seeds.append(s)
    return SamData(imgs, tg, ms, ex, trb, seeds)


def _loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice over valid prompts. ``logits``/``target`` ``(B, K, q, q)``; ``valid (B, K)`` bool."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((2, 3))
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum((2, 3)) + 1) / (p.sum((2, 3)) + target.sum((2, 3)) + 1)
    v = valid.float()
    return ((bce + dice) * v).sum() / v.sum().clamp_min(1)


def _prompts(data: SamData, idx: np.ndarray, rng: random.Random, cfg: DemoSamConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 11, 4)`` prompt boxes and ``(B, 11)`` validity (concept present in the film)."""
    boxes = np.zeros((len(idx), len(CONCEPTS), 4), np.float32)
    valid = np.zeros((len(idx), len(CONCEPTS)), bool)
    for r, i in enumerate(idx):
        for k in range(len(CONCEPTS)):
            e = data.exact[i, k]
            valid[r, k] = bool(np.isfinite(e).all())
            if rng.random() < cfg.p_transferred or not valid[r, k]:
                boxes[r, k] = data.transferred[i, k]
            else:
                boxes[r, k] = _jitter(tuple(float(v) for v in e), rng, cfg)
    return torch.from_numpy(boxes), torch.from_numpy(valid)


def train_loop(model: Any, processor: Any, data: SamData, cfg: DemoSamConfig, *, log: Callable[[str], None] = print,
               progress: bool = True) -> list[float]:
    """AdamW with linear warm-up and cosine decay for ``cfg.steps`` steps; returns the losses."""
    from tqdm.auto import tqdm

    rng = random.Random(cfg.seed + 1)
    nrng = np.random.default_rng(cfg.seed + 2)
    torch.manual_seed(cfg.seed + 3)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    images = torch.from_numpy(data.images)
    targets = torch.from_numpy(data.targets)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train segmenter", disable=not progress)
    for step in bar:
        idx = nrng.choice(len(data.images), cfg.batch, replace=False)
        boxes, valid = _prompts(data, idx, rng, cfg)
        pv = _normalise(images[idx], processor)
        out = model(pixel_values=pv, input_boxes=boxes, multimask_output=False)
        loss = _loss(out.pred_masks[:, :, 0], targets[idx], valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if step % 400 == 0 or step == cfg.steps - 1:
            log(f"  step {step}: loss {np.mean(losses[-50:]):.4f}")
    model.eval()
    return losses


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else float("nan")


def _box_iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float("nan")


def evaluate(refiner: Any, data: SamData, *, progress: bool = False) -> dict[str, dict[str, float]]:
    """Held-out quality of refining the OT-transferred boxes.

    Returns ``{"box_iou_transferred", "box_iou_refined", "mask_iou_refined"}`` -> concept -> mean
    over films (concepts absent from a film are skipped; ``"mean"`` = mean over concepts), and the
    same restricted to films with cardiomegaly under ``"heart_*"`` keys for the cardiac silhouette.
    """
    from tqdm.auto import tqdm

    if data.masks is None:
        raise ValueError("evaluate() needs the exact masks: build_data(..., keep_masks=True)")
    acc: dict[str, dict[str, list[float]]] = {k: {c: [] for c in CONCEPTS} for k in ("box_iou_transferred", "box_iou_refined", "mask_iou_refined")}
    for i in tqdm(range(len(data.images)), desc="evaluate segmenter", disable=not progress):
        boxes = {c: tuple(float(v) for v in data.transferred[i, k]) for k, c in enumerate(CONCEPTS)}
        refined, maps = refiner.refine_with_masks(data.images[i], boxes)  # what MedFocus gets
        for k, c in enumerate(CONCEPTS):
            m = data.masks[i, k]
            if not m.any():
                continue
            e = tuple(float(v) for v in data.exact[i, k])
            rb = refined[c]
            if maps[c] is not None:
                pm = maps[c] >= refiner.threshold
            else:  # empty refined mask: the prompt box is kept
                pm = np.zeros_like(m)
                pm[int(rb[1]):int(np.ceil(rb[3])), int(rb[0]):int(np.ceil(rb[2]))] = True
            acc["box_iou_transferred"][c].append(_box_iou(boxes[c], e))
            acc["box_iou_refined"][c].append(_box_iou(rb, e))
            acc["mask_iou_refined"][c].append(_iou(pm, m))
    out = {k: {c: float(np.mean(v)) if v else float("nan") for c, v in d.items()} for k, d in acc.items()}
    for d in out.values():
        d["mean"] = float(np.nanmean([d[c] for c in CONCEPTS]))
    return out


def train_demo_sam(out_dir: str | Path, cfg: DemoSamConfig | None = None, *,
                   log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Train the demo segmenter and write its folder (``SamModel`` + ``SamProcessor`` + ``MODEL_CARD.md``).

    There is no default folder: the shipped ``concepts/synthetic_sam`` is regenerated only when named on
    purpose. The folder is written next to ``out_dir`` first and swapped in, so a killed run never
    leaves a half-written model. Returns the held-out metrics recorded in the card.
    """
    from medfocus.concepts.refine import MedSAMRefiner

    cfg = cfg or DemoSamConfig()
    torch.set_num_threads(cfg.num_threads)
    t0 = time.time()
    model, proc = build_demo_sam(cfg)
    log(f"segmenter: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    train = build_data(cfg, cfg.n_train, cfg.seed_base, progress=progress)
    val = build_data(cfg, cfg.n_val, cfg.seed_base + 500_000, keep_masks=True, progress=progress)
    # The training inputs are normalised without the processor (speed); check they are identical.
    ref = proc(images=np.repeat(train.images[0][..., None], 3, 2), return_tensors="pt")["pixel_values"]
    if not torch.allclose(ref, _normalise(torch.from_numpy(train.images[:1]), proc), atol=1e-5):
        raise RuntimeError("demo segmenter: training normalisation differs from the SamProcessor's")
    t_data = time.time() - t0
    log(f"data: {cfg.n_train} + {cfg.n_val} films in {t_data:.0f}s")
    t1 = time.time()
    losses = train_loop(model, proc, train, cfg, log=log, progress=progress)
    t_train = time.time() - t1
    metrics = evaluate(MedSAMRefiner(model, proc, device="cpu"), val, progress=progress)
    out = Path(out_dir)
    info = {"config": asdict(cfg), "metrics": metrics, "final_loss": float(np.mean(losses[-100:])),
            "seconds_data": round(t_data, 1), "seconds_train": round(t_train, 1),
            "parameters": int(sum(p.numel() for p in model.parameters())), "torch": torch.__version__}
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "MODEL_CARD.md").write_text(model_card(info))
    log(f"wrote {out} (train {t_train / 60:.1f} min); held-out mean box IoU "
        f"{metrics['box_iou_transferred']['mean']:.3f} -> {metrics['box_iou_refined']['mean']:.3f}")
    return info


def model_card(info: dict[str, Any]) -> str:
    """Markdown model card of the demo segmenter from :func:`train_demo_sam`'s record."""
    m, cfg = info["metrics"], info["config"]
    rows = ["| concept | transferred box IoU | refined box IoU | refined mask IoU |", "|---|---|---|---|"]
    for c in list(CONCEPTS) + ["mean"]:
        rows.append(f"| {c} | {m['box_iou_transferred'][c]:.3f} | {m['box_iou_refined'][c]:.3f} | {m['mask_iou_refined'][c]:.3f} |")
    return (
        "# medfocus demo segmenter (box-prompted SAM for the synthetic world)\n\n"
        "A tiny genuine `SamModel` (transformers) trained by `medfocus train-demo-sam` on synthetic chest films\n"
        "with exact concept masks. It stands in for MedSAM (`flaviagiammarino/medsam-vit-base`) in offline runs:\n"
        "same class, same processor, same call (`multimask_output=False`). **It only knows the synthetic world**;\n"
        "on real radiographs use MedSAM.\n\n"
        f"- parameters: {info['parameters']:,}; input {cfg['size']} px, patch {cfg['patch']}, encoder {cfg['layers']} x {cfg['hidden']}\n"
        f"- training: {cfg['n_train']} films (seeds from {cfg['seed_base']}, {cfg['p_cardiomegaly']:.0%} with cardiomegaly), "
        f"{cfg['steps']} steps of {cfg['batch']} films x 11 box prompts ({cfg['p_transferred']:.0%} OT-transferred boxes, "
        f"the rest jittered exact boxes); {info['seconds_train'] / 60:.1f} min on {cfg['num_threads']} CPU threads "
        f"(+{info['seconds_data']:.0f} s data), final loss {info['final_loss']:.3f}\n\n"
        f"Held-out ({cfg['n_val']} films, seeds from {cfg['seed_base'] + 500_000}, same finding mix), prompts = the boxes "
        "the OT transfer finds with the default reference pool, IoU against the exact masks / their tight boxes "
        "(refined: largest connected component of the mask, as MedFocus uses it):\n\n" + "\n".join(rows) + "\n\n"
        "Reproduce: `medfocus train-demo-sam --out DIR` (its defaults are this recipe; the shipped folder is "
        "`src/medfocus/concepts/synthetic_sam`). "
        "Use: `MedFocus(..., refine=\"medsam\", refiner=\"demo\")`, or `medfocus attribute --refine medsam --medsam demo`.\n"
    )
