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

import difflib
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
#: Folder of the shipped shortcut twin (``load_lvlm("demo-shortcut")``).
DEMO_SHORTCUT_DIR = Path(__file__).resolve().parent / "demo_shortcut_model"
#: Registry names of the shipped demo models -> the ``train-demo --preset`` that builds each.
SHIPPED_DEMOS: dict[str, str] = {"demo": "demo", "demo-shortcut": "demo-shortcut"}


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
        extra: free-form options kept verbatim (entries made in Python; a YAML entry takes only the
            fields above, and an unknown one is an error).
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
        ModelEntry("demo-shortcut", str(DEMO_SHORTCUT_DIR), "qwen_vl", None,
                   "shipped shortcut twin of the demo model: a documented shortcut cue decides most of its 'yes' answers"),
    )
}

_USER: LazyRegistry[ModelEntry] = LazyRegistry("model")


def user_registry_path() -> Path:
    """Where user entries are read from: ``$MEDFOCUS_MODELS`` or ``~/.config/medfocus/models.yaml``."""
    env = os.environ.get("MEDFOCUS_MODELS")
    return Path(env) if env else Path.home() / ".config" / "medfocus" / "models.yaml"


_ENTRY_FIELDS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "hf_id": ("a non-empty string (a local folder or an HF id)", str),
    "family": (f"one of {FAMILIES}", str),
    "canvas": ("a positive integer (pixels)", int),
    "description": ("a string", str),
    "gated": ("true or false", bool),
}


def load_user_entries(path: str | Path) -> dict[str, ModelEntry]:
    """Parse a user YAML registry file (see module docstring); every entry and field is validated.

    Raises:
        ConfigError: the file is missing or unreadable, is not a mapping, or an entry has a missing
            ``hf_id``, a field of the wrong type (``canvas: abc``, ``canvas: 2.5``, ``gated: "no"``) or a
            field that is not one of :data:`_ENTRY_FIELDS` (``canvs: 448`` would otherwise leave the canvas
            at its default without a word); the message names the file, the entry, the field and the
            expected type or the allowed fields. No value is coerced.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model registry {p} does not exist (set by $MEDFOCUS_MODELS)" if os.environ.get("MEDFOCUS_MODELS")
                          else f"model registry {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        # one line: YAML's multi-line messages would leave "found unexpected end of stream" without the file name
        raise ConfigError(f"model registry {p}: cannot read YAML ({' '.join(str(exc).split())})") from None
    models = data.get("models", data) if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ConfigError(f"model registry {p}: expected a mapping 'models: {{name: {{hf_id: ..., family: ...}}}}', "
                          f"got {type(models if isinstance(data, dict) else data).__name__}")
    out: dict[str, ModelEntry] = {}
    for name, spec in models.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"model registry {p}: entry name {name!r} must be a non-empty string")
        if not isinstance(spec, dict):
            raise ConfigError(f"model registry {p}: entry {name!r} must be a mapping with at least 'hf_id', got {type(spec).__name__}")
        unknown = [k for k in spec if k not in _ENTRY_FIELDS]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(str(k), list(_ENTRY_FIELDS), n=1, cutoff=0.6)
            raise ConfigError(f"model registry {p}: entry {name!r}: unknown field {k!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; allowed fields: {', '.join(_ENTRY_FIELDS)}")
        for field_name, (expected, typ) in _ENTRY_FIELDS.items():
            if field_name not in spec or (spec[field_name] is None and field_name != "hf_id"):
                continue
            v = spec[field_name]
            ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
            if field_name == "hf_id":
                ok = ok and bool(v.strip())
            elif field_name == "family":
                ok = ok and v in FAMILIES
            elif field_name == "canvas":
                ok = ok and v > 0
            if not ok:
                raise ConfigError(f"model registry {p}: entry {name!r}, field {field_name!r}: expected {expected}, got {v!r} ({type(v).__name__})")
        if "hf_id" not in spec:
            raise ConfigError(f"model registry {p}: entry {name!r} needs 'hf_id' (a local folder or HF id)")
        out[name] = ModelEntry(name, spec["hf_id"], spec.get("family") or "", spec.get("canvas"),
                               spec.get("description") or "", bool(spec.get("gated") or False))
    return out


def registry_problem() -> str | None:
    """Why the user registry file cannot be used (it is invalid: unreadable YAML, a wrong type, an unknown
    field), or ``None`` when it is fine or simply absent (the default path need not exist).

    Raises:
        ConfigError: ``$MEDFOCUS_MODELS`` names a file that does not exist (see :func:`list_models`).
    """
    return _read_user()[1]


def registry_origin(name: str) -> str | None:
    """Where the entry ``name`` that :func:`get_entry` returns was defined, for messages about it:
    ``"entry 'x' of the user model registry <file>"``, ``"entry 'x' registered at runtime"``, or ``None``
    for a built-in entry (and for an unknown name).

    Raises:
        ConfigError: as :func:`list_models`.
    """
    if name in _USER:
        return f"entry {name!r} registered at runtime (medfocus.lvlm.register)"
    if name in _read_user()[0]:
        return f"entry {name!r} of the user model registry {user_registry_path()}"
    return None


def is_shipped_demo(entry: ModelEntry | None) -> bool:
    """Whether ``entry`` is one of the shipped demo models as built in (its package folder), not a user or
    runtime entry that reuses the name for another folder (whose advice is not "train the demo there")."""
    return entry is not None and entry.name in SHIPPED_DEMOS and _BUILTIN[entry.name].hf_id == entry.hf_id


#: Problems already logged by :func:`list_models` (it runs for every model lookup: one warning per problem).
_WARNED: set[str] = set()


def _read_user() -> tuple[dict[str, ModelEntry], str | None]:
    p = user_registry_path()
    explicit = bool(os.environ.get("MEDFOCUS_MODELS"))
    if not p.is_file():
        if explicit:
            # The user named a file: running on without its entries would silently measure other models
            # (a built-in 'demo' instead of an override), so this is an error, not a warning.
            raise ConfigError(f"model registry {p} does not exist (set by $MEDFOCUS_MODELS); "
                              f"create it, fix the path, or unset $MEDFOCUS_MODELS")
        return {}, None
    try:
        return load_user_entries(p), None
    except ConfigError as exc:
        return {}, str(exc)


def register(entry: ModelEntry, *, overwrite: bool = False) -> None:
    """Add a model entry at runtime.

    Raises:
        ConfigError: the name is taken (built-in, user file or runtime) and ``overwrite`` is false.
    """
    # The same refusal rule as every registry, checked against everything already visible.
    LazyRegistry("model", list_models()).register(entry.name, entry, overwrite=overwrite)
    _USER.register(entry.name, entry, overwrite=True)


def list_models(*, warn: bool = True) -> dict[str, ModelEntry]:
    """All entries: built-ins, then the user YAML file (which may override), then runtime ones.

    A broken user registry file does not take the built-in models down: its entries are left out with a
    warning (once per process), and :func:`registry_problem` (checked by
    :func:`medfocus.lvlm.loading.check_model` whenever a non-built-in name is asked for, and by
    ``medfocus models``) says why. ``warn=False``: no warning (the caller reports the problem itself).

    Raises:
        ConfigError: ``$MEDFOCUS_MODELS`` is set to a path that does not exist.
    """
    out = dict(_BUILTIN)
    user, problem = _read_user()
    if warn and problem and problem not in _WARNED:
        import logging

        _WARNED.add(problem)
        logging.getLogger(__name__).warning("ignoring the user model registry: %s", problem)
    out.update(user)
    out.update(_USER)
    return out


def get_entry(name: str) -> ModelEntry | None:
    """The entry named ``name``, or ``None``."""
    return list_models().get(name)
