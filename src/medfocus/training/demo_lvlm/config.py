"""Configuration of the demo LVLM's training run (everything that determines the trained weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DemoLVLMConfig", "config_from_dict"]


@dataclass
class DemoLVLMConfig:
    """Everything that determines the trained demo model (recorded in ``medfocus.json`` / the card).

    Sizes are chosen so that training fits ~15 minutes on 2 CPU cores and the weights stay far below
    20 MB: canvas 224 px -> 16x16 patches of 14 px -> 8x8 = 64 image tokens after the 2x2 merge.
    """

    seed: int = 0
    canvas: int = 224
    image_size: int = 256  # synthetic image side before letterboxing onto the canvas
    n_train_cases: int = 3000
    n_eval_per_cell: int = 20  # held-out cases per (finding, answer) in the evaluation
    vision_steps: int = 1200  # stage 1: vision tower + auxiliary head only (no text), vision_batch images per step
    vision_batch: int = 32
    steps: int = 1400  # stage 2: everything, images_per_step x questions_per_image sequences per step
    images_per_step: int = 12
    questions_per_image: int = 4
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    cue_subset: float = 0.2  # fraction of training cases on the cue subset (cue + faint finding)
    faint_severity: tuple[float, float] = (0.0, 0.1)  # severity range on the cue subset
    train_severity: tuple[float, float] = (0.15, 1.0)  # severity range of the other training findings
    cue_base_rate: float = 0.03  # uncorrelated random cue on the other training cases
    task_weights: dict[str, float] = field(default_factory=lambda: {"direct": 0.4, "cot": 0.35, "boxes": 0.125, "phrases": 0.125})
    text: dict[str, Any] = field(default_factory=lambda: dict(hidden_size=160, intermediate_size=448, num_hidden_layers=3,
                                                             num_attention_heads=5, num_key_value_heads=1,
                                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                                                             max_position_embeddings=1024))
    # full attention in every block: the Qwen2.5-VL vision tower has no absolute position embedding, so
    # "is this bright patch where lung should be" needs global context early (measured: windowed blocks
    # learn the local findings markedly slower)
    vision: dict[str, Any] = field(default_factory=lambda: dict(depth=3, hidden_size=96, intermediate_size=256, num_heads=3,
                                                               window_size=112, fullatt_block_indexes=[0, 1, 2]))
    tokenizer_vocab: int = 1200
    aux_weight: float = 1.0  # weight of the training-only token-grid finding loss (see aux_loss)
    aux_pos_weight: float = 4.0  # positive-class weight of that loss (findings cover few cells)
    num_threads: int = 2
    eval_every: int = 0  # quick teacher-forced held-out check every N steps (0: off)
    checkpoint_every: int = 0  # save a resumable checkpoint every N steps (0: off)


def config_from_dict(d: dict[str, Any]) -> DemoLVLMConfig:
    """Inverse of ``dataclasses.asdict`` for :class:`DemoLVLMConfig` (JSON turns tuples into lists)."""
    fields = DemoLVLMConfig.__dataclass_fields__
    kw = {k: (tuple(v) if isinstance(getattr(DemoLVLMConfig(), k), tuple) else v) for k, v in d.items() if k in fields}
    return DemoLVLMConfig(**kw)
