"""The demo LVLM's training: losses, the two-stage loop with resumable checkpoints under ``--out``, and
:func:`train_demo`, which writes the loadable folder."""

from __future__ import annotations

import math
import pickle
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from medfocus.io.atomic import atomic_directory, atomic_write
from medfocus.training.demo_lvlm.card import model_card
from medfocus.training.demo_lvlm.config import DemoLVLMConfig, config_from_dict
from medfocus.training.demo_lvlm.data import DemoCase, _findings, build_eval_pool, build_train_pool, canvases_to_pixel_values
from medfocus.training.demo_lvlm.evaluate import direct_margin, evaluate_and_write_card
from medfocus.training.demo_lvlm.model import Encoder, build_model, build_tokenizer, folder_size, save_folder
from medfocus.training.demo_lvlm.tasks import target_text, task_question

def sequence_loss(model, enc: Encoder, canvases: torch.Tensor, items: Sequence[tuple[int, str, str]], grid: int,
                  aux: tuple[torch.nn.Module, torch.Tensor, float] | None = None) -> torch.Tensor:
    """Mean answer-token cross-entropy for ``items = [(image_index, question, answer), ...]``.

    Each of the ``B_img`` canvases is encoded by the vision tower once; its image-token embeddings are
    shared by every sequence that asks about it (passed as ``mm_encoder_outputs``).

    The answer loss is the mean token cross-entropy of each sequence, averaged over sequences.

    ``aux = (head, labels, weight)`` adds ``weight x`` a training-only loss on the image-token embeddings:
    a linear ``head`` predicts, per token, which findings cover that token cell (``labels``: ``(B_img,
    n_findings, g, g)`` coverage in [0, 1]) and, averaged over the tokens, which findings the image has
    (binary cross-entropies). The head is not part of the shipped model; it gives the vision tower a
    direct signal from the start (otherwise a from-scratch LVLM spends hundreds of steps answering from
    the text prior alone) and makes the evidence local.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    B_img = canvases.shape[0]
    pv = canvases_to_pixel_values(canvases, model.config.vision_config.spatial_merge_size)
    thw = torch.tensor([[1, grid, grid]] * B_img)
    feats = model.model.get_image_features(pv, thw)
    per_image = list(feats.pooler_output)
    ids, att, mm, loss_mask = enc.batch([(q, a) for _, q, a in items])
    pooled = [per_image[i] for i, _, _ in items]
    out = model.model(input_ids=ids, attention_mask=att, mm_token_type_ids=mm,
                      image_grid_thw=torch.tensor([[1, grid, grid]] * len(items)),
                      mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=pooled)})
    h = out.last_hidden_state  # (B, L, H)
    tgt_mask = loss_mask[:, 1:]
    hs = h[:, :-1][tgt_mask]  # (N_ans, H): hidden states that predict answer tokens
    logits = model.lm_head(hs)
    tok_loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][tgt_mask], reduction="none")
    # mean per sequence, then over sequences: a one-token "Yes"/"No" weighs as much as a long rationale
    seq_of = torch.arange(len(items))[:, None].expand_as(tgt_mask)[tgt_mask]
    n_tok = tgt_mask.sum(1).clamp(min=1).float()
    loss = (torch.zeros(len(items)).index_add(0, seq_of, tok_loss) / n_tok).mean()
    if aux is not None:
        head, labels, weight, pos_weight = aux
        loss = loss + weight * aux_loss(head, torch.stack(per_image), labels, pos_weight)
    return loss


def aux_loss(head: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Training-only finding loss on image-token embeddings ``emb`` ``(B, g*g, H)`` (row-major grid).

    ``head`` maps each token to ``2 * n_findings`` logits: per-cell "this finding covers the cell"
    (target: coverage > 5%) and, averaged over the tokens, "the image has this finding"."""
    n_f = labels.shape[1]
    pred = head(emb)
    cell = pred[..., :n_f].transpose(1, 2).reshape(labels.shape)
    glob = pred[..., n_f:].mean(dim=1)  # mean over tokens: what near-uniform attention reads
    present = (labels.flatten(2).amax(dim=2) > 0).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    pw = torch.tensor(pos_weight)
    return bce(cell, (labels > 0.05).float(), pos_weight=2 * pw) + bce(glob, present, pos_weight=pw)


def pretrain_vision(model, head: torch.nn.Module, canvases: torch.Tensor, labels: torch.Tensor, cfg: DemoLVLMConfig,
                    rng: random.Random, log: Callable[[str], None] = print,
                    eval_fn: Callable[[int, torch.nn.Module], None] | None = None) -> list[float]:
    """Stage 1: the vision tower (with the merger) and the auxiliary head alone, ``cfg.vision_steps`` steps of
    ``cfg.vision_batch`` images (no text: cheap, so many more images per second than stage 2).

    ``eval_fn(step, head)`` is called every ``cfg.eval_every`` steps (a held-out check of what the vision
    tower alone can tell; see :func:`presence_accuracy`)."""
    grid = cfg.canvas // 14
    params = list(model.model.visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    losses: list[float] = []
    t0 = time.time()
    for step in range(cfg.vision_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        ids = rng.sample(range(len(canvases)), cfg.vision_batch)
        feats = model.model.get_image_features(canvases_to_pixel_values(canvases[ids], cfg.spatial_merge_size), torch.tensor([[1, grid, grid]] * len(ids)))
        loss = aux_loss(head, torch.stack(list(feats.pooler_output)), labels[ids], cfg.aux_pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log(f"vision step {step + 1}/{cfg.vision_steps} aux loss {np.mean(losses[-50:]):.4f} {time.time() - t0:.0f}s")
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            model.eval()
            eval_fn(step + 1, head)
            model.train()
    return losses


@torch.no_grad()
def presence_accuracy(model, head: torch.nn.Module, cases: Sequence[DemoCase], asked: Sequence[str], present: Sequence[bool],
                      cfg: DemoLVLMConfig, batch: int = 32) -> dict[str, float]:
    """Held-out accuracy of the auxiliary head's image-level call ("the image has finding f": the token-mean
    logit > 0) for ``(case, asked finding, present)`` triples, overall (``"all"``) and per finding.

    A training-time diagnostic of stage 1: roughly the ceiling of what the LM can read from the image tokens
    (the head is linear on them), so a recipe whose vision tower cannot tell the findings apart is seen
    before stage 2 is paid for."""
    findings = _findings()
    grid = cfg.canvas // 14
    calls = []
    for s in range(0, len(cases), batch):
        can = torch.from_numpy(np.stack([c.canvas for c in cases[s : s + batch]]))
        thw = torch.tensor([[1, grid, grid]] * len(can))
        emb = torch.stack(list(model.model.get_image_features(canvases_to_pixel_values(can, cfg.spatial_merge_size), thw).pooler_output))
        glob = head(emb)[..., len(findings):].mean(dim=1)  # (B, n_findings)
        calls.append(glob.numpy() > 0)
    said = np.concatenate(calls)[np.arange(len(cases)), [findings.index(f) for f in asked]]
    ok = said == np.asarray(present, bool)
    out = {"all": float(ok.mean())}
    out.update({f: float(ok[[a == f for a in asked]].mean()) for f in findings if f in asked})
    return out


def _sample_items(rng: random.Random, case_ids: Sequence[int], pool: Sequence[DemoCase], findings: Sequence[str],
                  cfg: DemoLVLMConfig) -> list[tuple[int, str, str]]:
    """``(slot, question, answer)`` for the step's images: each image gets ``questions_per_image``
    questions; each question's answer is Yes or No with probability 1/2 (when the image allows it)."""
    tasks = list(cfg.task_weights)
    weights = [cfg.task_weights[t] for t in tasks]
    items = []
    for slot, ci in enumerate(case_ids):
        c = pool[ci]
        present = [f for f in findings if f in c.views]
        absent = [f for f in findings if f not in c.views]
        for _ in range(cfg.questions_per_image):
            want_yes = rng.random() < 0.5
            f = rng.choice(present) if (want_yes and present) or not absent else rng.choice(absent)
            task = rng.choices(tasks, weights)[0]
            items.append((slot, task_question(f, task), target_text(f, task, c.views.get(f, []))))
    return items


def _lr_at(step: int, cfg: DemoLVLMConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train_loop(model, enc: Encoder, pool: Sequence[DemoCase], cfg: DemoLVLMConfig, *, log: Callable[[str], None] = print,
               eval_fn: Callable[[int], None] | None = None, checkpoint: str | Path | None = None,
               vision_eval_fn: Callable[[int, torch.nn.Module], None] | None = None) -> list[float]:
    """AdamW + linear warm-up + cosine decay over ``cfg.steps`` steps; returns the per-step losses.

    With ``checkpoint`` and ``cfg.checkpoint_every``, the model, optimiser and sampler states are saved
    there atomically every ``checkpoint_every`` steps, and a run restarted with the same config resumes
    from it (same batches, same result as an uninterrupted run).
    """
    findings = _findings()
    grid = cfg.canvas // 14
    rng = random.Random(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 2)
    canvases = torch.from_numpy(np.stack([c.canvas for c in pool]))
    labels = torch.from_numpy(np.stack([c.grid_labels for c in pool])) if cfg.aux_weight else None
    head = torch.nn.Linear(model.config.text_config.hidden_size, 2 * len(findings)) if cfg.aux_weight else None
    named = list(model.named_parameters())
    split = cfg.stage2_vision_lr_scale != 1.0  # (one group per decay class otherwise, as the shipped recipes were trained)
    groups = []
    for scale, part in ([(1.0, named)] if not split else
                        [(1.0, [(n, p) for n, p in named if ".visual." not in f".{n}"]),
                         (cfg.stage2_vision_lr_scale, [(n, p) for n, p in named if ".visual." in f".{n}"])]):
        decay = [p for n, p in part if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in part if not (p.dim() >= 2 and "embed" not in n)]
        groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": scale},
                   {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "weight_decay": 0.0, "lr_scale": 1.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    losses: list[float] = []
    start = 0
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None and ck.is_file():
        state = load_checkpoint(ck)
        if state["config"] != asdict(cfg):
            log(f"checkpoint {ck} is of another configuration: starting afresh (it will be overwritten)")
        else:
            model.load_state_dict(state["model"])
            if head is not None:
                head.load_state_dict(state["head"])
            opt.load_state_dict(state["opt"])
            rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            losses, start = list(state["losses"]), int(state["step"])
            log(f"resumed from {ck} at step {start}")
    if start == 0 and cfg.vision_steps and head is not None:
        pretrain_vision(model, head, canvases, labels, cfg, rng, log, vision_eval_fn)
    t0 = time.time()
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg) * g.get("lr_scale", 1.0)
        ids = rng.sample(range(len(pool)), cfg.images_per_step)
        items = _sample_items(rng, ids, pool, findings, cfg)
        aux = (head, labels[ids], cfg.aux_weight, cfg.aux_pos_weight) if head is not None else None
        loss = sequence_loss(model, enc, canvases[ids], items, grid, aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0 or step == 0:
            recent = np.mean(losses[-25:])
            log(f"step {step + 1}/{cfg.steps} loss {recent:.4f} lr {_lr_at(step, cfg):.2e} {time.time() - t0:.0f}s")
        if ck is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            with atomic_write(ck, "wb") as fh:
                torch.save({"config": asdict(cfg), "model": model.state_dict(), "head": head.state_dict() if head is not None else None,
                            "opt": opt.state_dict(), "rng": rng.getstate(),
                            "torch_rng": torch.get_rng_state(), "losses": losses, "step": step + 1}, fh)
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            model.eval()
            eval_fn(step + 1)
            model.train()
    model.eval()
    return losses


def train_demo(out_dir: str | Path, cfg: DemoLVLMConfig | None = None, *, log: Callable[[str], None] = print,
                progress: bool = True, evaluate: bool = True) -> dict[str, Any]:
    """Train the demo model and write its folder (+ ``MODEL_CARD.md``) to ``out_dir``.

    There is no default folder: the shipped ``lvlm/demo_model`` is regenerated only when named on purpose.
    The resumable checkpoint lives under ``out_dir`` (:func:`checkpoint_path`); the folder is built under
    a temporary name and swapped in (:func:`medfocus.io.atomic.atomic_directory`), so a killed run
    never leaves a half-written model behind (and the swap removes the checkpoint). Returns the metrics
    recorded in the card.

    Raises:
        ConfigError: a field of ``cfg`` out of range (:meth:`DemoLVLMConfig.validate`), before any work.
    """
    cfg = (cfg or DemoLVLMConfig()).validate()  # every field checked before any work
    torch.set_num_threads(cfg.num_threads)
    out = Path(out_dir)
    t_start = time.time()
    findings = _findings()
    tok = build_tokenizer(findings, cfg.canvas, cfg.tokenizer_vocab)
    model = build_model(cfg, tok)
    enc = Encoder(tok, cfg.token_grid ** 2)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocab {len(tok)}")
    t0 = time.time()
    pool = build_train_pool(cfg, progress=progress)
    t_data = time.time() - t0
    log(f"{len(pool)} training cases in {t_data:.0f}s ({sum(c.cued for c in pool)} on the cue subset)")
    quick = build_eval_pool(cfg, n_per_cell=12, progress=False, seed_offset=900_000) if cfg.eval_every else []

    def vision_eval(step: int, head: torch.nn.Module) -> None:
        acc = presence_accuracy(model, head, [c for c, _, _ in quick], [f for _, f, _ in quick], [p for _, _, p in quick], cfg)
        log(f"  [vision step {step}] auxiliary head's held-out presence accuracy {acc.pop('all'):.3f} on {len(quick)}: "
            f"{ {f: round(v, 2) for f, v in acc.items()} }")

    def quick_eval(step: int) -> None:
        m = direct_margin(model, enc, [c for c, _, _ in quick], [f for _, f, _ in quick], cfg.canvas // 14)
        ok = (m > 0) == np.array([p for _, _, p in quick])
        per = {f: round(float(np.mean([o for o, (_, g, _) in zip(ok, quick) if g == f])), 2) for f in findings}
        log(f"  [eval step {step}] direct teacher-forced held-out accuracy {ok.mean():.3f} on {len(quick)} "
            f"(margin mean {m.mean():+.2f} sd {m.std():.2f}): {per}")

    t0 = time.time()
    ck = checkpoint_path(out)
    losses = train_loop(model, enc, pool, cfg, log=log, eval_fn=quick_eval, checkpoint=ck if cfg.checkpoint_every else None,
                        vision_eval_fn=vision_eval if cfg.eval_every else None)
    t_train = time.time() - t0
    del pool
    extra = {"train_seconds": round(t_train, 1), "data_seconds": round(t_data, 1), "final_loss": float(np.mean(losses[-25:])),
             "n_parameters": int(sum(p.numel() for p in model.parameters()))}
    with atomic_directory(out) as tmp:  # replaces out, checkpoint included
        save_folder(model, tok, cfg, tmp, extra)
        (tmp / "MODEL_CARD.md").write_text(model_card(cfg, {**extra, "vocab": len(tok)}, out))
    log(f"wrote {out} ({folder_size(out) / 1e6:.1f} MB) in {time.time() - t_start:.0f}s")
    metrics: dict[str, Any] = dict(extra)
    if evaluate:
        try:
            metrics = evaluate_and_write_card(out, log=log, progress=progress)
        except Exception as exc:  # keep the trained weights; the card says evaluation is missing
            log(f"held-out evaluation failed ({type(exc).__name__}: {exc}); rerun it with "
                f"`python -m medfocus.training.demo_lvlm {out}`")
    return metrics


def save_from_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, log: Callable[[str], None] = print,
                         evaluate: bool = True) -> dict[str, Any]:
    """Write a loadable folder from a stage-2 checkpoint of an unfinished run (its card says where it stopped).

    Raises:
        ModelError: the checkpoint is not a readable ``train-demo`` checkpoint (see :func:`load_checkpoint`).
    """
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    tok = build_tokenizer(_findings(), cfg.canvas, cfg.tokenizer_vocab)
    model = build_model(cfg, tok)
    model.load_state_dict(state["model"])
    model.eval()
    out = Path(out_dir)
    extra = {"final_loss": float(np.mean(state["losses"][-25:])), "n_parameters": int(sum(p.numel() for p in model.parameters())),
             "stopped_at": int(state["step"])}
    with atomic_directory(out) as tmp:
        save_folder(model, tok, cfg, tmp, extra)
        (tmp / "MODEL_CARD.md").write_text(model_card(cfg, {**extra, "vocab": len(tok)}, out))
    log(f"wrote {out} from {checkpoint} (step {state['step']})")
    return evaluate_and_write_card(out, log=log) if evaluate else extra


#: The fields of a ``train-demo`` checkpoint (what :func:`train_loop` saves).
CHECKPOINT_KEYS = frozenset({"config", "model", "head", "opt", "rng", "torch_rng", "losses", "step"})


def checkpoint_path(out_dir: str | Path) -> Path:
    """Where ``train_demo`` keeps the resumable checkpoint of a run writing ``out_dir``: inside that folder
    (``<out>/.checkpoint/train_state.pt``), which the user chose and owns, never a predictable path in
    the shared temp folder that another local user could plant a file at. Publishing the trained folder
    replaces ``out_dir`` whole, so the checkpoint disappears with the run that needed it."""
    return Path(out_dir) / ".checkpoint" / "train_state.pt"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``train-demo`` checkpoint safely: ``torch.load(weights_only=True)`` (tensors, numbers,
    strings and containers only -- a pickle that would run code is refused, never executed).

    Raises:
        ModelError: the file cannot be read as such a checkpoint (foreign, corrupt or truncated),
            naming it and saying how to proceed.
    """
    from medfocus.errors import ModelError

    p = Path(path)
    try:
        state = torch.load(p, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:  # objects other than tensors/containers: refused, nothing was executed
        raise ModelError(f"checkpoint {p} holds objects other than tensors and plain data (not a train-demo "
                         "checkpoint, possibly planted); it was not loaded -- delete it to start afresh") from None
    except Exception as exc:  # RuntimeError/EOFError/OSError: corrupt or truncated
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"checkpoint {p} is not a readable train-demo checkpoint ({type(exc).__name__}: {reason}); "
                         "delete it to start afresh") from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ModelError(f"checkpoint {p} is not a train-demo checkpoint (expected fields {sorted(CHECKPOINT_KEYS)}, got {got}); "
                         "delete it to start afresh")
    return state
