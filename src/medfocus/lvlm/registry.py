"""Registry of LVLMs (timm-style): name -> :class:`ModelEntry`.

Built-in entries are the paper's six models, LLaVA-1.5 and the shipped ``demo`` model. Users add
entries in a YAML file -- ``$MEDFOCUS_MODELS`` (a path) or ``~/.config/medfocus/models.yaml`` -- of the
form::

    models:
      my_qwen:
        hf_id: /data/weights/Qwen2.5-VL-3B-Instruct   # local folder or HF id
        family: qwen_vl          # optional; otherwise read from config.json's model_type
        canvas: 448              # optional model-input side in pixels
        description: my copy of Qwen2.5-VL-3B
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfocus.errors import ConfigError
from medfocus.registry import LazyRegistry

#: config.json ``model_type`` -> adapter family.
MODEL_TYPE_TO_FAMILY: dict[str, str] = {
    "qwen2_5_vl": "qwen_vl",
    "qwen2_vl": "qwen_vl",
    "gemma3": "gemma3",
    "llava": "llava",
}
FAMILIES = ("qwen_vl", "gemma3", "llava")

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        name: registry key.
        hf_id: HF hub id or local folder.
        family: adapter family (``qwen_vl``, ``gemma3``, ``llava``).
        canvas: model-input canvas side in pixels, or ``None`` for the family default
            (Qwen: 448; Gemma 3 / LLaVA: the vision tower's ``image_size``).
        description: one line for ``medfocus models``.
        gated: the hub repo needs an accepted licence (login) before download.
        extra: free-form options kept verbatim.
    """

    name: str
    hf_id: str
    family: str
    canvas: int | None = None
    description: str = ""
    gated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_BUILTIN: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry("qwen2_5_vl_3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen_vl", 448, "Qwen2.5-VL 3B Instruct"),
        ModelEntry("qwen2_5_vl_7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen_vl", 448, "Qwen2.5-VL 7B Instruct"),
        ModelEntry("gemma3_4b", "google/gemma-3-4b-it", "gemma3", None, "Gemma 3 4B instruction-tuned", gated=True),
        ModelEntry("gemma3_12b", "google/gemma-3-12b-it", "gemma3", None, "Gemma 3 12B instruction-tuned", gated=True),
        ModelEntry("medgemma_4b", "google/medgemma-4b-it", "gemma3", None, "MedGemma 4B instruction-tuned", gated=True),
        ModelEntry("medgemma1_5_4b", "google/medgemma-1.5-4b-it", "gemma3", None, "MedGemma 1.5 4B instruction-tuned", gated=True),
        ModelEntry("llava1_5_7b", "llava-hf/llava-1.5-7b-hf", "llava", None, "LLaVA-1.5 7B (llava-hf conversion)"),
        ModelEntry("demo", str(DEMO_DIR), "qwen_vl", None, "shipped demo CXR-VQA model (Qwen2.5-VL architecture, synthetic world)"),
    )
}

_USER: LazyRegistry[ModelEntry] = LazyRegistry("model")


def user_registry_path() -> Path:
    """Where user entries are read from: ``$MEDFOCUS_MODELS`` or ``~/.config/medfocus/models.yaml``."""
    env = os.environ.get("MEDFOCUS_MODELS")
    return Path(env) if env else Path.home() / ".config" / "medfocus" / "models.yaml"


def load_user_entries(path: str | Path) -> dict[str, ModelEntry]:
    """Parse a user YAML registry file (see module docstring); entries are validated."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"model registry {p}: cannot read YAML ({exc})") from exc
    models = data.get("models", data) if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ConfigError(f"model registry {p}: expected a mapping 'models: {{name: {{hf_id: ..., family: ...}}}}'")
    out: dict[str, ModelEntry] = {}
    for name, spec in models.items():
        if not isinstance(spec, dict) or not spec.get("hf_id"):
            raise ConfigError(f"model registry {p}: entry {name!r} needs at least 'hf_id' (a local folder or HF id)")
        fam = spec.get("family")
        if fam is not None and fam not in FAMILIES:
            raise ConfigError(f"model registry {p}: entry {name!r}: family {fam!r} is not one of {FAMILIES}")
        canvas = spec.get("canvas")
        known = {"hf_id", "family", "canvas", "description", "gated"}
        out[str(name)] = ModelEntry(str(name), str(spec["hf_id"]), fam or "", int(canvas) if canvas else None,
                                    str(spec.get("description", "")), bool(spec.get("gated", False)),
                                    {k: v for k, v in spec.items() if k not in known})
    return out


def register(entry: ModelEntry, *, overwrite: bool = False) -> None:
    """Add a model entry at runtime.

    Raises:
        ConfigError: the name is taken (built-in, user file or runtime) and ``overwrite`` is false.
    """
    # The same refusal rule as every registry, checked against everything already visible.
    LazyRegistry("model", list_models()).register(entry.name, entry, overwrite=overwrite)
    _USER.register(entry.name, entry, overwrite=True)


def list_models() -> dict[str, ModelEntry]:
    """All entries: built-ins, then the user YAML file (which may override), then runtime ones."""
    out = dict(_BUILTIN)
    p = user_registry_path()
    if p.is_file():
        out.update(load_user_entries(p))
    out.update(_USER)
    return out


def get_entry(name: str) -> ModelEntry | None:
    """The entry named ``name``, or ``None``."""
    return list_models().get(name)
