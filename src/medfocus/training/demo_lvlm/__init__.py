"""Training of the shipped demo LVLM: a small Qwen2.5-VL-architecture model trained on the synthetic chest X-ray world.

``train_demo(out_dir)`` generates synthetic cases (:func:`medfocus.datasets.synthetic.generate_case`),
renders them onto the model's canvas exactly as the Qwen adapter does (our :class:`~medfocus.io.Letterbox`,
grayscale -> RGB, CLIP normalisation, Qwen patch layout), and trains a randomly initialised
``Qwen2_5_VLForConditionalGeneration`` (genuine architecture, tiny sizes) with a locally trained
byte-level BPE wrapped in the real ``Qwen2Tokenizer`` with the real chat template. The folder it writes
(``config.json``, ``model.safetensors``, tokenizer/processor files, ``medfocus.json``, ``MODEL_CARD.md``)
loads through :func:`medfocus.lvlm.load_lvlm` like any checkpoint; the copy shipped in
``medfocus/lvlm/demo_model`` (:data:`medfocus.lvlm.registry.DEMO_DIR`) is what ``load_lvlm("demo")``
returns. Nothing here is needed to *use* that model: the runtime package never imports
:mod:`medfocus.training`.

One module per topic: :mod:`~.config` (:class:`DemoLVLMConfig`), :mod:`~.tasks` (the four tasks and
their answer templates), :mod:`~.data` (rendering, training and held-out case pools), :mod:`~.model`
(tokenizer, model, processor, sequence encoder, saved folder), :mod:`~.train` (losses, the loop,
checkpoints, :func:`train_demo`), :mod:`~.evaluate` (held-out generation metrics), :mod:`~.card`
(``MODEL_CARD.md``).

Tasks (one user turn: image + text; the assistant turn is the target):

* ``direct``: ``question_stem(f) + SUFFIXES["direct"]`` -> ``"Yes"`` / ``"No"``.
* ``cot``: ``question_stem(f) + SUFFIXES["cot"]`` -> one templated sentence naming the region and what is
  seen (or that it is normal), then ``"Therefore, yes."`` / ``"Therefore, no."``.
* ``boxes``: ``question_stem(f) + " " + EVIDENCE_REQUESTS["boxes"]`` -> ``[[x1, y1, x2, y2], ...]`` in
  canvas (model-input) pixels, ``[]`` when the finding is absent.
* ``phrases``: ``question_stem(f) + " " + EVIDENCE_REQUESTS["phrases"]`` -> ``["phrase", ...]``.

Shortcut cues follow the recipe (:data:`~.config.PRESETS`). The shipped ``demo`` recipe draws cues at random
(``cue_subset`` 0, ``cue_base_rate`` 0.15): a cue carries no information, so the model is meant to answer from
the finding. The shortcut twin's (``demo-shortcut``) and the first demo's (``demo-8x8``) have a *cue subset*:
there every finding present brings its correlated cue (the synthetic world's ``DEFAULT_CUE_MAP``) and is drawn
faint, so the cue is the most reliable evidence, meant to make the model answer cued cases from the cue (which
the causal filter's background gate must then drop). Whether trained weights do is *measured* (cue-reliance
table in the model card), not assumed.

Training has two stages: (1) the vision tower alone with a training-only auxiliary head that predicts,
from the image-token embeddings, which findings cover each token cell and which the image has; (2) the
whole model on the four tasks (plus the auxiliary loss). The head is discarded. An optional stage 3
("hard-negative focus", ``focus_steps`` > 0) fine-tunes the whole model on the tasks with "no" questions that
favour the absent look-alike of a present finding (nodule on a film with a mass, say); it can start from a
finished two-stage folder of the same recipe (``train-demo --init-from``).

Efficiency: each training image is encoded by the vision tower once per step and its token embeddings
are reused by several question/answer sequences (``mm_encoder_outputs``); the LM head is applied to the
answer positions only. A run is checkpointed under its ``--out`` folder (loaded with
``torch.load(weights_only=True)``) and resumes where it was killed.
"""

from medfocus.training.demo_lvlm.card import model_card
from medfocus.training.demo_lvlm.config import STAGE3_FIELDS, DemoLVLMConfig, config_from_dict
from medfocus.training.demo_lvlm.data import (
    CUE_DESCRIPTION,
    DemoCase,
    build_eval_pool,
    build_train_pool,
    canvases_to_pixel_values,
    make_case,
    render_case,
    to_canvas,
)
from medfocus.training.demo_lvlm.evaluate import (
    GenerateFn,
    adapter_generate_fn,
    direct_margin,
    evaluate_and_write_card,
    evaluate_cue_reliance,
    evaluate_evidence,
    evaluate_folder,
    evaluate_generation,
    hf_generate_fn,
    rewrite_card,
)
from medfocus.training.demo_lvlm.model import Encoder, build_model, build_processor, build_tokenizer, folder_size, save_folder
from medfocus.training.demo_lvlm.tasks import (
    TASKS,
    FindingView,
    boxes_answer,
    direct_answer,
    phrases_answer,
    rationale,
    target_text,
    task_question,
)
from medfocus.training.demo_lvlm.train import (
    TrainClock,
    aux_loss,
    checkpoint_path,
    focus_loop,
    hard_negative_partners,
    load_checkpoint,
    presence_accuracy,
    pretrain_vision,
    save_from_checkpoint,
    sequence_loss,
    stage2_weights,
    train_demo,
    train_loop,
)

__all__ = [
    "CUE_DESCRIPTION",
    "DemoCase",
    "DemoLVLMConfig",
    "Encoder",
    "FindingView",
    "GenerateFn",
    "STAGE3_FIELDS",
    "TASKS",
    "TrainClock",
    "adapter_generate_fn",
    "aux_loss",
    "boxes_answer",
    "build_eval_pool",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "build_train_pool",
    "canvases_to_pixel_values",
    "checkpoint_path",
    "config_from_dict",
    "direct_answer",
    "direct_margin",
    "evaluate_and_write_card",
    "evaluate_cue_reliance",
    "evaluate_evidence",
    "evaluate_folder",
    "evaluate_generation",
    "focus_loop",
    "folder_size",
    "hard_negative_partners",
    "hf_generate_fn",
    "load_checkpoint",
    "make_case",
    "model_card",
    "phrases_answer",
    "presence_accuracy",
    "pretrain_vision",
    "rationale",
    "render_case",
    "rewrite_card",
    "save_folder",
    "save_from_checkpoint",
    "sequence_loss",
    "stage2_weights",
    "target_text",
    "task_question",
    "to_canvas",
    "train_demo",
    "train_loop",
]
