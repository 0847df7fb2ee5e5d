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
from medfocus.training.demo_lvlm.config import RUN_FIELDS, DemoLVLMConfig, config_from_dict, preset_config
from medfocus.training.demo_lvlm.data import (DemoCase, _findings, build_eval_pool, build_train_pool, canvases_to_pixel_values,
                                              pool_cache_file)
from medfocus.training.demo_lvlm.evaluate import direct_margin, evaluate_and_write_card
from medfocus.training.demo_lvlm.model import Encoder, build_model, build_tokenizer, folder_size, save_folder
from medfocus.training.demo_lvlm.tasks import target_text, task_question


class TrainClock:
    """Training seconds of a run across the processes that resumed it: each checkpoint records the seconds spent
    up to it, and a resumed stage continues from that count, so the model card's training time is the whole run's,
    not the last process's. ``partial`` is set when a resumed checkpoint recorded no time (written before the
    checkpoints carried it): :meth:`total` then counts this process only."""

    def __init__(self) -> None:
        self._start = time.time()
        self._before = 0.0
        self.partial = False

    def resumed(self, seconds: float | None) -> None:
        """A stage resumed from a checkpoint that recorded ``seconds`` (None: not recorded)."""
        self._start = time.time()
        if seconds is None:
            self._before, self.partial = 0.0, True
        else:
            self._before = float(seconds)

    def total(self) -> float:
        """Training seconds so far, the earlier processes' included (this process's only when ``partial``)."""
        return self._before + (time.time() - self._start)


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
                    eval_fn: Callable[[int, torch.nn.Module], None] | None = None,
                    checkpoint: str | Path | None = None, clock: TrainClock | None = None) -> list[float]:
    """Stage 1: the vision tower (with the merger) and the auxiliary head alone, ``cfg.vision_steps`` steps of
    ``cfg.vision_batch`` images (no text: cheap, so many more images per second than stage 2).

    ``eval_fn(step, head)`` is called every ``cfg.eval_every`` steps (a held-out check of what the vision
    tower alone can tell; see :func:`presence_accuracy`). With ``checkpoint`` and ``cfg.checkpoint_every``,
    the state is saved there (as stage 1) every ``checkpoint_every`` steps and a restarted run of the same
    config resumes from it: stage 1 is most of a 12x12 recipe's time (about 85 of 130 minutes)."""
    grid = cfg.canvas // 14
    params = list(model.model.visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    ck = Path(checkpoint) if checkpoint is not None else None
    losses, start = _resume(ck, cfg, model, head, opt, rng, log, stage=1, clock=clock)
    t0 = time.time()
    for step in range(start, cfg.vision_steps):
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
        if ck is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.vision_steps:
            _save_checkpoint(ck, cfg, model, head, opt, rng, losses, step + 1, stage=1, clock=clock)
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
                  cfg: DemoLVLMConfig, partners: dict[str, tuple[str, ...]] | None = None,
                  focus_slots: int = 0) -> list[tuple[int, str, str]]:
    """``(slot, question, answer)`` for the step's images: each image gets ``questions_per_image``
    questions; each question's answer is Yes or No with probability 1/2 (when the image allows it).

    With ``partners`` (stage 3, :func:`hard_negative_partners`), a "no" question on an image carrying a finding
    whose look-alike is absent asks about that look-alike with probability ``cfg.hard_negative_share``. The
    extra random draw is made only then, so without ``partners`` the draws are exactly stage 2's. On the first
    ``focus_slots`` images (stage 3's positive focus, drawn to carry one of ``cfg.focus_findings``), a "yes"
    question asks about one of those findings."""
    tasks = list(cfg.task_weights)
    weights = [cfg.task_weights[t] for t in tasks]
    items = []
    for slot, ci in enumerate(case_ids):
        c = pool[ci]
        present = [f for f in findings if f in c.views]
        if slot < focus_slots:
            present = [f for f in present if f in cfg.focus_findings] or present
        absent = [f for f in findings if f not in c.views]
        hard = sorted({p for g in present for p in partners.get(g, ()) if p in absent}) if partners else []
        for _ in range(cfg.questions_per_image):
            want_yes = rng.random() < 0.5
            asks_absent = not ((want_yes and present) or not absent)
            f = rng.choice(absent) if asks_absent else rng.choice(present)
            if asks_absent and hard and rng.random() < cfg.hard_negative_share:
                f = rng.choice(hard)
            task = rng.choices(tasks, weights)[0]
            items.append((slot, task_question(f, task), target_text(f, task, c.views.get(f, []))))
    return items


def hard_negative_partners(pairs: Sequence[Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """``{finding: its look-alikes}`` from symmetric ``pairs`` (``DemoLVLMConfig.hard_negative_pairs``), sorted."""
    out: dict[str, set[str]] = {}
    for a, b in pairs:
        out.setdefault(a, set()).add(b)
        out.setdefault(b, set()).add(a)
    return {f: tuple(sorted(v)) for f, v in sorted(out.items())}


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``peak`` to 5% of it at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def _lr_at(step: int, cfg: DemoLVLMConfig) -> float:
    return _cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)


def _param_groups(model, cfg: DemoLVLMConfig, head: torch.nn.Module | None) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices but embeddings; the vision tower at ``stage2_vision_lr_scale``
    (``lr_scale``) when that is not 1 (one group per decay class otherwise, as the shipped recipes were
    trained); the auxiliary ``head`` undecayed."""
    named = list(model.named_parameters())
    split = cfg.stage2_vision_lr_scale != 1.0
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
    return groups


def _optimizer_step(model, opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One update of stages 2 and 3: backward, gradient norm clipped to 1 over the whole model, step; the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def _resume(ck: Path | None, cfg: DemoLVLMConfig, model, head, opt, rng: random.Random,
            log: Callable[[str], None], stage: int = 2, clock: TrainClock | None = None) -> tuple[list[float], int]:
    """Load the stage-``stage`` checkpoint ``ck`` of this very config into the live objects; ``(losses, next
    step)``, or ``([], 0)`` when there is none or it is of another config or stage (then it is overwritten;
    stages 1 and 2 share the file, so stage 2 finds stage 1's there until its own first save). ``clock``
    continues from the training seconds the checkpoint recorded."""
    if ck is None or not ck.is_file():
        return [], 0
    state = load_checkpoint(ck)
    if state["config"] != asdict(cfg):
        log(f"checkpoint {ck} is of another configuration: starting afresh (it will be overwritten)")
        return [], 0
    if int(state.get("stage", 2)) != stage:
        return [], 0
    model.load_state_dict(state["model"])
    if head is not None:
        head.load_state_dict(state["head"])
    opt.load_state_dict(state["opt"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    if clock is not None:
        clock.resumed(state.get("seconds"))
    log(f"resumed from {ck} at step {int(state['step'])}")
    return list(state["losses"]), int(state["step"])


def _save_checkpoint(ck: Path, cfg: DemoLVLMConfig, model, head, opt, rng: random.Random, losses: list[float],
                     step: int, stage: int, clock: TrainClock | None = None) -> None:
    # "seconds": the run's training time so far (None when not known: no clock, or a resumed checkpoint without it)
    seconds = clock.total() if clock is not None and not clock.partial else None
    with atomic_write(ck, "wb") as fh:
        torch.save({"config": asdict(cfg), "model": model.state_dict(), "head": head.state_dict() if head is not None else None,
                    "opt": opt.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                    "losses": losses, "step": step, "stage": stage, "seconds": seconds}, fh)


def train_loop(model, enc: Encoder, pool: Sequence[DemoCase], cfg: DemoLVLMConfig, *, log: Callable[[str], None] = print,
               eval_fn: Callable[[int], None] | None = None, checkpoint: str | Path | None = None,
               vision_eval_fn: Callable[[int, torch.nn.Module], None] | None = None,
               clock: TrainClock | None = None) -> list[float]:
    """AdamW + linear warm-up + cosine decay over ``cfg.steps`` steps; returns the per-step losses.

    With ``checkpoint`` and ``cfg.checkpoint_every``, the model, optimiser and sampler states are saved
    there atomically every ``checkpoint_every`` steps, and a run restarted with the same config resumes
    from it (same batches, same result as an uninterrupted run); ``clock`` (:class:`TrainClock`) then
    counts the training seconds of the earlier processes too.
    """
    findings = _findings()
    grid = cfg.canvas // 14
    rng = random.Random(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 2)
    canvases = torch.from_numpy(np.stack([c.canvas for c in pool]))
    labels = torch.from_numpy(np.stack([c.grid_labels for c in pool])) if cfg.aux_weight else None
    head = torch.nn.Linear(model.config.text_config.hidden_size, 2 * len(findings)) if cfg.aux_weight else None
    opt = torch.optim.AdamW(_param_groups(model, cfg, head), lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    ck = Path(checkpoint) if checkpoint is not None else None
    losses, start = _resume(ck, cfg, model, head, opt, rng, log, stage=2, clock=clock)
    if start == 0 and cfg.vision_steps and head is not None:
        pretrain_vision(model, head, canvases, labels, cfg, rng, log, vision_eval_fn, checkpoint=ck, clock=clock)
    t0 = time.time()
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg) * g.get("lr_scale", 1.0)
        ids = rng.sample(range(len(pool)), cfg.images_per_step)
        items = _sample_items(rng, ids, pool, findings, cfg)
        aux = (head, labels[ids], cfg.aux_weight, cfg.aux_pos_weight) if head is not None else None
        losses.append(_optimizer_step(model, opt, sequence_loss(model, enc, canvases[ids], items, grid, aux)))
        if (step + 1) % 25 == 0 or step == 0:
            recent = np.mean(losses[-25:])
            log(f"step {step + 1}/{cfg.steps} loss {recent:.4f} lr {_lr_at(step, cfg):.2e} {time.time() - t0:.0f}s")
        # the last step too when stage 3 follows: a run killed in stage 3 then resumes there, not in stage 2
        last = step + 1 == cfg.steps
        if ck is not None and cfg.checkpoint_every and (((step + 1) % cfg.checkpoint_every == 0 and not last)
                                                        or (last and cfg.focus_steps)):
            _save_checkpoint(ck, cfg, model, head, opt, rng, losses, step + 1, stage=2, clock=clock)
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            model.eval()
            eval_fn(step + 1)
            model.train()
    model.eval()
    return losses


def focus_loop(model, enc: Encoder, pool: Sequence[DemoCase], cfg: DemoLVLMConfig, *, log: Callable[[str], None] = print,
               checkpoint: str | Path | None = None, clock: TrainClock | None = None) -> list[float]:
    """Stage 3, "hard-negative focus": ``cfg.focus_steps`` steps on the four tasks (no auxiliary loss) with a
    fresh AdamW at ``cfg.focus_lr`` (warm-up over ``min(cfg.warmup, focus_steps // 10)`` steps, cosine decay
    to 5%), the vision tower at ``stage2_vision_lr_scale``; "no" questions favour the absent look-alike of a
    present finding (:func:`_sample_items` with :func:`hard_negative_partners`), and with ``cfg.focus_findings``
    a share ``cfg.focus_share`` of each step's images carries one of them and is asked about it when the answer
    is "yes". Its random streams are seeded afresh (``seed + 3``, ``seed + 4``), so the stage gives the same
    weights whether it follows stage 2 in one run or starts from that run's saved folder
    (:func:`stage2_weights`). Checkpointed and resumed like :func:`train_loop` (at ``checkpoint``, stage 3).
    Returns the per-step losses.

    Raises:
        ConfigError: ``cfg.focus_findings`` names findings no training case carries.
    """
    findings = _findings()
    grid = cfg.canvas // 14
    rng = random.Random(cfg.seed + 3)
    torch.manual_seed(cfg.seed + 4)
    partners = hard_negative_partners(cfg.hard_negative_pairs)
    canvases = torch.from_numpy(np.stack([c.canvas for c in pool]))
    opt = torch.optim.AdamW(_param_groups(model, cfg, None), lr=cfg.focus_lr, betas=(0.9, 0.98))
    model.train()
    ck = Path(checkpoint) if checkpoint is not None else None
    losses, start = _resume(ck, cfg, model, None, opt, rng, log, stage=3, clock=clock)
    warmup = min(cfg.warmup, cfg.focus_steps // 10)
    focus_ids = [i for i, c in enumerate(pool) if any(f in c.views for f in cfg.focus_findings)]
    if cfg.focus_findings and not focus_ids:
        from medfocus.errors import ConfigError
        raise ConfigError(f"DemoLVLMConfig.focus_findings: no training case carries any of {cfg.focus_findings}")
    n_focus = min(round(cfg.focus_share * cfg.images_per_step), len(focus_ids)) if focus_ids else 0
    t0 = time.time()
    for step in range(start, cfg.focus_steps):
        lr = _cosine_lr(step, cfg.focus_steps, cfg.focus_lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        ids = rng.sample(range(len(pool)), cfg.images_per_step)
        if n_focus:  # focus images first (their slots get the focus questions), the rest uniform without repeats
            chosen = rng.sample(focus_ids, n_focus)
            taken = set(chosen)
            ids = chosen + [i for i in ids if i not in taken][:cfg.images_per_step - n_focus]
        items = _sample_items(rng, ids, pool, findings, cfg, partners, focus_slots=n_focus)
        losses.append(_optimizer_step(model, opt, sequence_loss(model, enc, canvases[ids], items, grid)))
        if (step + 1) % 25 == 0 or step == 0:
            log(f"focus step {step + 1}/{cfg.focus_steps} loss {np.mean(losses[-25:]):.4f} lr {lr:.2e} {time.time() - t0:.0f}s")
        if ck is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.focus_steps:
            _save_checkpoint(ck, cfg, model, None, opt, rng, losses, step + 1, stage=3, clock=clock)
    model.eval()
    return losses


#: Fields that may differ between a stage-3 run and the stage-2 folder it starts from: the run fields but the
#: ones that decide the stage-2 weights (seed, steps, training cases).
_RUN_ONLY = RUN_FIELDS - {"seed", "steps", "n_train_cases"}


def stage2_weights(folder: str | Path, cfg: DemoLVLMConfig) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a finished two-stage ``train-demo`` folder, to run stage 3 of ``cfg`` from (``train-demo
    --init-from``), and the sha256 of its ``model.safetensors`` (recorded in the new card).

    The folder's recipe (its ``medfocus.json``) must equal ``cfg`` in every field but
    :data:`~medfocus.training.demo_lvlm.config.STAGE3_FIELDS` and the run-only ones (threads, checks,
    checkpoints), so the result is what one uninterrupted run of ``cfg`` gives.

    Raises:
        ConfigError: ``folder`` is not a ``train-demo`` folder, is itself a stage-3 (or partial) result, or
            was trained with another recipe (the differing fields are named).
    """
    import json

    from medfocus.errors import ConfigError
    from medfocus.io.fingerprint import file_sha256
    from medfocus.training.demo_lvlm.config import STAGE3_FIELDS

    src = Path(folder)
    meta = src / "medfocus.json"
    weights = src / "model.safetensors"
    try:
        demo = json.loads(meta.read_text())["demo"]
        theirs = config_from_dict(demo["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--init-from {src}: not a train-demo output folder (cannot read the recipe in {meta}: "
                          f"{type(exc).__name__}: {exc}); expected the --out folder of a finished train-demo run") from None
    if not weights.is_file():
        raise ConfigError(f"--init-from {src}: no model.safetensors (expected the --out folder of a finished train-demo run)")
    if theirs.focus_steps or demo.get("init_from") or demo.get("stopped_at"):
        raise ConfigError(f"--init-from {src}: that folder is " + ("already a stage-3 result" if theirs.focus_steps or demo.get("init_from")
                          else f"a partial run (stopped at step {demo.get('stopped_at')})")
                          + "; expected the folder of a finished two-stage run (focus_steps 0)")
    skip = STAGE3_FIELDS | _RUN_ONLY
    mine, other = asdict(cfg), asdict(theirs)
    diff = sorted(k for k in mine if k not in skip and json.loads(json.dumps(mine[k])) != json.loads(json.dumps(other[k])))
    if diff:
        raise ConfigError(f"--init-from {src}: trained with another recipe ({', '.join(f'{k}: {other[k]!r} there, {mine[k]!r} here' for k in diff)}); "
                          "stage 3 must start from the stage-2 result of the same recipe")
    from transformers import Qwen2_5_VLForConditionalGeneration

    digest = file_sha256(weights)[1]  # a regular file (checked above): streamed, never None here
    # through from_pretrained: the saved key names are the checkpoint format's, not necessarily the module's
    state = Qwen2_5_VLForConditionalGeneration.from_pretrained(src).state_dict()
    return state, digest


def train_demo(out_dir: str | Path, cfg: DemoLVLMConfig | None = None, *, log: Callable[[str], None] = print,
                progress: bool = True, evaluate: bool = True, init_from: str | Path | None = None,
                pool_cache: str | Path | None = None) -> dict[str, Any]:
    """Train the demo model and write its folder (+ ``MODEL_CARD.md``) to ``out_dir``.

    There is no default folder: the shipped ``lvlm/demo_model`` is regenerated only when named on purpose.
    Without ``cfg``, the shipped demo's recipe (``preset_config("demo")``: hours of CPU).
    The resumable checkpoint lives under ``out_dir`` (:func:`checkpoint_path`); the folder is built under
    a temporary name and swapped in (:func:`medfocus.io.atomic.atomic_directory`), so a killed run
    never leaves a half-written model behind (and the swap removes the checkpoint). Returns the metrics
    recorded in the card.

    With ``init_from`` (the folder of a finished two-stage run of the same recipe, :func:`stage2_weights`),
    stages 1-2 are loaded from there and only stage 3 (``cfg.focus_steps`` > 0) is trained: the same weights
    as one uninterrupted run of ``cfg``; the card records that folder and its weights' sha256.

    With ``pool_cache`` (a folder), the rendered training cases are kept there and reused by later runs with
    the same data (:func:`~medfocus.training.demo_lvlm.data.build_train_pool`): a resumed run, a stage-3
    ``init_from`` run or another recipe on the same pool skips rendering them again.

    Raises:
        ConfigError: a field of ``cfg`` out of range (:meth:`DemoLVLMConfig.validate`), or an ``init_from``
            that cannot be used (no stage 3 to run, ``out_dir`` itself, or see :func:`stage2_weights`),
            before any work.
    """
    from medfocus.errors import ConfigError

    cfg = (cfg or preset_config("demo")).validate()  # every field checked before any work
    init = None
    if init_from is not None:
        if not cfg.focus_steps:
            raise ConfigError(f"--init-from {init_from}: starting from a stage-2 folder trains stage 3 alone, "
                              "but focus_steps is 0 (give --focus-steps N or a preset with a stage 3)")
        if Path(init_from).resolve() == Path(out_dir).resolve():
            raise ConfigError(f"--out {out_dir} is the --init-from folder: give another --out (the stage-2 folder is kept)")
        init = stage2_weights(init_from, cfg)
    torch.set_num_threads(cfg.num_threads)
    out = Path(out_dir)
    t_start = time.time()
    findings = _findings()
    tok = build_tokenizer(findings, cfg.canvas, cfg.tokenizer_vocab)
    model = build_model(cfg, tok)
    if init is not None:
        model.load_state_dict(init[0])
        log(f"stages 1-2 loaded from {init_from} (model.safetensors sha256 {init[1][:12]}...)")
    enc = Encoder(tok, cfg.token_grid ** 2)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocab {len(tok)}")
    t0 = time.time()
    cache_file = pool_cache_file(cfg, pool_cache) if pool_cache is not None else None
    cached_stamp = cache_file.stat().st_mtime_ns if cache_file is not None and cache_file.is_file() else None
    pool = build_train_pool(cfg, progress=progress, cache_dir=pool_cache, log=log)
    t_data = time.time() - t0
    # loaded, not rendered: the cache file was there and was not replaced (an unreadable one is rendered again)
    from_cache = cached_stamp is not None and cache_file.stat().st_mtime_ns == cached_stamp
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

    clock = TrainClock()
    ck = checkpoint_path(out)
    losses = [] if init is not None else train_loop(
        model, enc, pool, cfg, log=log, eval_fn=quick_eval, checkpoint=ck if cfg.checkpoint_every else None,
        vision_eval_fn=vision_eval if cfg.eval_every else None, clock=clock)
    focus = focus_loop(model, enc, pool, cfg, log=log, checkpoint=checkpoint_path(out, stage=3) if cfg.checkpoint_every else None,
                       clock=clock) if cfg.focus_steps else []
    t_train = clock.total()
    del pool
    extra: dict[str, Any] = {"train_seconds": round(t_train, 1), "data_seconds": round(t_data, 1),
                             "n_parameters": int(sum(p.numel() for p in model.parameters()))}
    if from_cache:  # data_seconds is then the loading time; rendering the cases is not in this run
        extra["data_from_pool_cache"] = True
    if clock.partial:  # resumed from a checkpoint that did not record the time before it
        extra["train_seconds_partial"] = True
    if losses:
        extra["final_loss"] = float(np.mean(losses[-25:]))
    if focus:
        extra["final_focus_loss"] = float(np.mean(focus[-25:]))
    if init is not None:
        extra["init_from"] = {"folder": str(Path(init_from).resolve()), "sha256": init[1]}
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
    """Write a loadable folder from a stage-2 or stage-3 checkpoint of an unfinished run (its card says where it
    stopped).

    Raises:
        ModelError: the checkpoint is not a readable ``train-demo`` checkpoint (see :func:`load_checkpoint`), or
            it was saved in stage 1 (nothing but the vision tower has trained).
    """
    from medfocus.errors import ModelError

    state = load_checkpoint(checkpoint)
    if int(state.get("stage", 2)) == 1:  # only the vision tower has trained: the language model would answer noise
        raise ModelError(f"checkpoint {checkpoint} was saved in stage 1 (vision tower only, step {state['step']} of "
                         f"{state['config'].get('vision_steps')}): there is no model to publish yet; rerun the same "
                         "train-demo command to resume it")
    cfg = config_from_dict(state["config"])
    tok = build_tokenizer(_findings(), cfg.canvas, cfg.tokenizer_vocab)
    model = build_model(cfg, tok)
    model.load_state_dict(state["model"])
    model.eval()
    out = Path(out_dir)
    stage = int(state.get("stage", 2))
    extra = {("final_focus_loss" if stage == 3 else "final_loss"): float(np.mean(state["losses"][-25:])),
             "n_parameters": int(sum(p.numel() for p in model.parameters())), "stopped_at": int(state["step"]), "stopped_stage": stage}
    if state.get("seconds") is not None:  # the training time up to the checkpoint, when it recorded it
        extra["train_seconds"] = round(float(state["seconds"]), 1)
    with atomic_directory(out) as tmp:
        save_folder(model, tok, cfg, tmp, extra)
        (tmp / "MODEL_CARD.md").write_text(model_card(cfg, {**extra, "vocab": len(tok)}, out))
    log(f"wrote {out} from {checkpoint} (step {state['step']})")
    return evaluate_and_write_card(out, log=log) if evaluate else extra


#: The fields of a ``train-demo`` checkpoint (what :func:`train_loop` saves).
CHECKPOINT_KEYS = frozenset({"config", "model", "head", "opt", "rng", "torch_rng", "losses", "step"})


def checkpoint_path(out_dir: str | Path, stage: int = 2) -> Path:
    """Where ``train_demo`` keeps the resumable checkpoint of a run writing ``out_dir``: inside that folder
    (``<out>/.checkpoint/train_state.pt``, stages 1 and 2; stage 3's: ``focus_state.pt``), which the user chose and owns, never
    a predictable path in the shared temp folder that another local user could plant a file at. Publishing
    the trained folder replaces ``out_dir`` whole, so the checkpoint disappears with the run that needed it."""
    return Path(out_dir) / ".checkpoint" / ("focus_state.pt" if stage == 3 else "train_state.pt")


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
