"""``load_lvlm``: registry name, local folder or HF id -> family adapter.

Uses ``AutoModelForImageTextToText`` / ``AutoProcessor`` (transformers 5.x; folders written by 4.57
load too). Defaults: bfloat16 on CUDA, float32 on CPU; with several GPUs and no explicit device the
model is sharded with ``device_map="auto"``. The attention implementation is left to transformers
(SDPA) unless given; methods that need attention weights switch to eager temporarily through
:meth:`~medfocus.lvlm.adapter.LVLMAdapter.eager_attention`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from medfocus.errors import ConfigError, ModelError
from medfocus.io.fingerprint import file_sha256
from medfocus.lvlm.adapter import LVLMAdapter
from medfocus.lvlm.registry import (MODEL_TYPE_TO_FAMILY, SHIPPED_DEMOS, ModelEntry, get_entry, is_shipped_demo, list_models,
                                    registry_origin)

QWEN_DEFAULT_CANVAS = 448


def _how_to_provide(name: str, hf_id: str) -> str:
    return (
        f"Model {name!r} ({hf_id}) could not be loaded: its weights are not available locally and cannot be "
        f"downloaded (offline, or a gated repository). Download it once where you have access "
        f"(e.g. `huggingface-cli download {hf_id} --local-dir /path/to/{hf_id.split('/')[-1]}`, after accepting "
        f"the licence on its hub page if it is gated), then pass the folder instead of the name: "
        f"`load_lvlm('/path/to/{hf_id.split('/')[-1]}')` / `--model /path/to/...`, or add it to your model registry "
        f"YAML ($MEDFOCUS_MODELS) as `{name}: {{hf_id: /path/to/..., family: ...}}`."
    )


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def downloads_allowed() -> bool:
    """Whether medfocus may download model weights from the Hugging Face hub: only when the user says so
    explicitly, by setting ``HF_HUB_OFFLINE`` to a false value (``0``, ``false``, ``no``, ``off``) with
    ``TRANSFORMERS_OFFLINE`` not set to a true one. Unset means no: a hub id must then be in the local cache
    (a missing model fails at once, not after transformers' network retries)."""
    hub = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    tf = os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower()
    return hub in _FALSE and tf not in _TRUE


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder that hub ids are looked up in (``$HF_HUB_CACHE`` / ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_snapshot(hf_id: str) -> Path | None:
    """The local Hugging Face cache snapshot of hub id ``hf_id`` when it holds a complete model (a
    ``config.json`` and weight files, every shard of a sharded checkpoint's index), else ``None``. No network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hf_id, "config.json")
    except Exception:  # a malformed id or no hub client: nothing cached under it
        return None
    if not isinstance(cached, str):
        return None
    snap = Path(cached).parent
    return snap if _folder_problem(snap) is None else None


def _folder_problem(folder: Path) -> str | None:
    """What a model folder lacks (``config.json``, weight files, shards named by a ``*.index.json``), or ``None``."""
    if not (folder / "config.json").is_file():
        return "has no config.json (not a transformers model folder)"
    files = [f for f in folder.iterdir() if f.is_file()]
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        return f"has no weight files ({', '.join(WEIGHT_SUFFIXES)})"
    for index in (f for f in files if f.name.endswith(".index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return f"has an unreadable {index.name}"
        missing = sorted(sh for sh in shards if not (folder / sh).is_file())
        if missing:
            return f"lacks {len(missing)} weight shard(s) named in {index.name} (e.g. {missing[0]})"
    return None


def local_availability(path: str) -> str | None:
    """Why a model source (folder or hub id) cannot be loaded without the network, in a few words (what
    ``medfocus models --check`` prints), or ``None`` when it can: a local folder with a config and its
    weights, or a complete snapshot in the Hugging Face cache. The reasons: ``folder ... has no config.json
    (not a transformers model folder)`` (or what else the folder lacks), ``folder ... does not exist`` (a
    source written as a path), ``not available locally`` (a hub id with no complete cached snapshot)."""
    local = Path(path).expanduser()
    if local.is_dir():
        problem = _folder_problem(local)
        return f"folder {problem}" if problem else None
    if _looks_like_path(path):
        return "folder does not exist"
    return None if cached_snapshot(path) is not None else "not available locally"


def available_locally(path: str) -> bool:
    """Whether a model source (folder or hub id) can be loaded without the network (:func:`local_availability`
    is ``None``)."""
    return local_availability(path) is None


def not_available_locally(name: str, hf_id: str) -> str:
    """The error text for a hub model with no local copy while downloads are off (what ``medfocus models
    --check`` reports as "not available locally"): where it was looked for and the three ways to provide it."""
    local = hf_id.split("/")[-1]
    return (f"model {name!r} ({hf_id}) is not available locally: it is not a local folder and the Hugging Face cache "
            f"{hf_cache_dir()} holds no complete snapshot of it, and medfocus does not download weights unless allowed. "
            f"Provide it in one of three ways: download it where you have access (`huggingface-cli download {hf_id} "
            f"--local-dir /path/to/{local}`, after accepting the licence on its hub page if it is gated) and pass the "
            f"folder (`--model /path/to/{local}`, `load_lvlm('/path/to/{local}')`, or a $MEDFOCUS_MODELS entry `{name}: {{hf_id: /path/to/{local}}}`); "
            f"or fill the Hugging Face cache (`huggingface-cli download {hf_id}`; $HF_HOME / $HF_HUB_CACHE say where it "
            f"is); or allow the download with HF_HUB_OFFLINE=0 (needs the hub to be reachable).")


def _no_shipped_weights(name: str, path: str) -> str:
    """The error text for a shipped demo model whose folder has no weights (a source checkout without them)."""
    return (f"the {name} model has no weights at {path} yet; build them with "
            f"`medfocus train-demo --preset {SHIPPED_DEMOS[name]} --out {path}`")


def _looks_like_path(path: str) -> bool:
    """A model source written as a filesystem path (``/x``, ``./x``, ``~/x``), never a hub id."""
    return path.startswith((".", "/", "~"))


def _local_problem(name: str, path: str, entry: ModelEntry | None) -> str | None:
    """Why a model source that is (or is declared as) a local folder cannot be loaded, or ``None`` when it
    is not one or is complete. A shipped demo without weights gets the ``train-demo`` advice; a folder
    that a user or runtime registry entry names (including one that reuses ``demo``) is named with that
    entry, so the message points at the file to fix, not at training a model into the user's folder."""
    local = Path(path).expanduser()
    if is_shipped_demo(entry) and not (local / "config.json").is_file():
        return _no_shipped_weights(entry.name, path)
    origin = registry_origin(entry.name) if entry is not None else None
    who = f"model {name!r} ({origin})" if origin else f"model {name!r}"
    if local.is_dir():
        problem = _folder_problem(local)
        return f"{who}: folder {local} {problem}" if problem else None
    if origin and _looks_like_path(path):
        return (f"{who}: hf_id {path} is not an existing folder (a local model folder must exist; "
                f"a Hugging Face id has the form 'owner/name')")
    return None


def resolve(name_or_path: str | os.PathLike) -> tuple[str, str, ModelEntry | None]:
    """``(display name, path or hub id, registry entry or None)``."""
    s = str(name_or_path)
    entry = get_entry(s)
    if entry is not None:
        return s, entry.hf_id, entry
    return s, s, None


def _hints(path: str) -> dict[str, Any]:
    p = Path(path) / "medfocus.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{p}: invalid JSON ({exc})") from exc
    return {}


def _configured_canvas(entry: ModelEntry | None, hints: dict[str, Any]) -> Any:
    """The canvas a registry entry or a folder's ``medfocus.json`` sets (``None``: the family's default)."""
    return (entry.canvas if entry else None) or hints.get("canvas")


def known_canvas(name_or_path: str | os.PathLike) -> tuple[int, int] | None:
    """``(canvas_w, canvas_h)`` that :func:`load_lvlm` (without its ``canvas`` argument) gives this model, when
    it is known without loading anything: a ``qwen_vl`` model named so by its registry entry or its folder's
    ``medfocus.json`` (canvas: the entry's, the folder's, or the family default). ``None`` otherwise (Gemma 3
    and LLaVA take theirs from the processor; a family read from ``config.json`` is known only when loading),
    so a check that needs the canvas waits for the load.

    Raises:
        ModelError: the folder's ``medfocus.json`` is not valid JSON.
    """
    name, path, entry = resolve(name_or_path)
    hints = _hints(path) if Path(path).is_dir() else {}
    if ((entry.family if entry and entry.family else None) or hints.get("family")) != "qwen_vl":
        return None
    c = _configured_canvas(entry, hints) or QWEN_DEFAULT_CANVAS
    return (int(c), int(c)) if isinstance(c, int) else (int(c[0]), int(c[1]))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_model(name_or_path: str | os.PathLike) -> str:
    """Fail fast, without loading anything or touching the network: is ``name_or_path`` a model that
    :func:`load_lvlm` can load?

    Checks that the name is a registry entry, an existing folder or an ``owner/name`` hub id; that a
    local folder holds a ``config.json`` and weight files; and that a hub id has a complete snapshot in
    the local Hugging Face cache (:func:`cached_snapshot`) unless downloads are explicitly allowed
    (:func:`downloads_allowed`, ``HF_HUB_OFFLINE=0``).

    Returns:
        the resolved source (folder or hub id).
    Raises:
        ModelError: naming the model and what is missing (and how to provide it).
        ConfigError: ``$MEDFOCUS_MODELS`` names a file that does not exist; or the user registry file is
            invalid and the name is not a built-in model.
    """
    from medfocus.lvlm.registry import registry_problem

    name, path, entry = resolve(name_or_path)
    if entry is None:
        problem = registry_problem()
        if problem:
            raise ConfigError(f"model {name!r} is not a built-in model, and the user model registry cannot be used: {problem}")
    problem = _local_problem(name, path, entry)
    if problem:
        raise ModelError(problem)
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local)
    if entry is None and ("/" not in path or _looks_like_path(path)):
        raise ModelError(f"unknown model {name!r}: not a registry name ({', '.join(sorted(list_models()))}), "
                         f"not an existing folder, and not an HF id of the form 'owner/name'")
    if not downloads_allowed() and cached_snapshot(path) is None:
        raise ModelError(not_available_locally(name, path))
    return path


_FULL_HASH_BYTES = 64 * 2**20
#: Tokenizer files of a Hugging Face model folder (``also`` of :func:`weights_fingerprint`): they
#: change the token ids, hence a text encoder's output, without touching its weights.
TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model",
                   "*.tiktoken")


def model_identity(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a model's weights, computed without loading it (stored in every result record,
    so a rerun against changed weights under the same name is not mistaken for the same work).

    Returns:
        ``{"name", "source", "family", "canvas", "fingerprint"}``; ``fingerprint`` is
        :func:`weights_fingerprint` of the resolved folder or hub id.
    """
    name, path, entry = resolve(name_or_path)
    return {"name": name, "source": path, "family": entry.family if entry else None,
            "canvas": entry.canvas if entry else None, "fingerprint": weights_fingerprint(path)}


def weights_fingerprint(path: str | os.PathLike, subfolder: str | None = None, *, also: Sequence[str] = ()) -> str | None:
    """Fingerprint of the weights at ``path`` (``/subfolder``: a component of a multi-model repository,
    e.g. a diffusion pipeline's ``unet``), without loading them.

    For a local folder: a SHA-1 over ``config.json``, every weight file and every file matching one of
    the ``also`` glob patterns (other files that change the model's output, e.g. :data:`TOKENIZER_FILES`
    or a processor config) -- each file's name, size and *whole* content: a file up to 64 MiB (the
    demo models) by its bytes, a larger one by the SHA-256 of all its bytes
    (:func:`medfocus.io.fingerprint.file_sha256`, streamed in chunks, with a progress bar from 256 MiB).
    Every byte counts: a fine-tune that keeps the file sizes (a LoRA merged into middle layers, one
    tensor edited) is another fingerprint, and so is a copy with preserved modification times
    (``cp -p``, ``rsync -t``, an unpacked archive) of other bytes; touching a file is not. (Before,
    a file over 64 MiB counted by its size and first and last MiB only, so records and caches of such
    weights carry another fingerprint now: a rerun into their ``--out`` is refused as other weights.)

    Cost: a large file is read once per change, at about the disk's read speed (minutes for a
    15-25 GB checkpoint on a slow disk); its digest is then memoized per process and in
    ``<cache>/file_sha256.json`` (``$MEDFOCUS_CACHE`` or ``~/.cache/medfocus``), keyed on the resolved
    path, size, modification and change time, inode and device. The change time (ctime) is set by
    every write and cannot be set back by ``touch``/``cp -p``/``rsync -t``, so other bytes with a
    restored size and modification time miss the memo and are hashed again.

    With ``also=()`` the value is that of earlier versions for folders whose files are all up to 64 MiB
    (it is stored in result records). For a hub id: the revision of the cached snapshot holding
    ``[subfolder/]config.json`` (a revision pins every file of the repository, ``also`` included);
    ``None`` when it is not cached (or ``path`` is neither), since nothing then identifies the weights.

    Raises:
        ModelError: a file of the folder cannot be read (naming it).
    """
    import hashlib

    local = Path(path).expanduser() / (subfolder or "")
    if local.is_dir():
        h = hashlib.sha1()
        files = sorted(f for f in local.iterdir() if f.is_file() and (
            f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES or any(f.match(p) for p in also)))
        for f in files:
            try:
                if f.stat().st_size <= _FULL_HASH_BYTES:
                    data = f.read_bytes()
                    h.update(f"{f.name}\0{len(data)}\0".encode())
                    h.update(data)
                    continue
                got = file_sha256(f, persist=True)
            except OSError as exc:
                raise ModelError(f"cannot fingerprint the weights in {local}: {f.name}: {exc}") from exc
            if got is None:
                raise ModelError(f"cannot fingerprint the weights in {local}: {f.name} is not a readable file")
            h.update(f"{f.name}\0{got[0]}\0sha256:{got[1]}".encode())
        return h.hexdigest() if files else None
    config = f"{subfolder}/config.json" if subfolder else "config.json"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(path), config)
    except Exception:  # noqa: BLE001 - not a hub id, or no hub client: nothing more to identify it by
        return None
    # snapshots/<revision>/[subfolder/]config.json
    return Path(cached).parents[len(Path(config).parts) - 1].name if isinstance(cached, str) else None


def module_weights_digest(module: torch.nn.Module) -> str:
    """SHA-1 (hex) over a loaded module's parameters and buffers -- names, dtypes, shapes and values --
    for weights that have no files to fingerprint (:func:`weights_fingerprint`), e.g. a model built in
    memory or handed over already loaded."""
    import hashlib

    h = hashlib.sha1()
    for key, t in sorted(module.state_dict().items()):
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}\0{flat.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_lvlm(name_or_path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
              attn_implementation: str | None = None, *, canvas: int | tuple[int, int] | None = None) -> LVLMAdapter:
    """Load a model + processor and wrap it in its family adapter.

    Args:
        name_or_path: registry name (``medfocus models``), a local model folder, or an HF hub id whose
            config's ``model_type`` maps to a supported family (qwen2_5_vl, qwen2_vl, gemma3, llava).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA if available (all GPUs via
            ``device_map="auto"`` when there are several), else CPU.
        dtype: default ``torch.bfloat16`` on CUDA, ``torch.float32`` on CPU.
        attn_implementation: e.g. ``"eager"`` or ``"sdpa"``; default: transformers' choice.
        canvas: model-input side (int) or ``(w, h)``; overrides the registry/folder default.
    Returns:
        An :class:`~medfocus.lvlm.adapter.LVLMAdapter` (model in eval mode).
    Raises:
        ModelError: unknown name, unsupported family, or weights not available (the message says how
            to provide a local folder).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from medfocus.lvlm.families.qwen_vl import register_processors

    name, path, entry = resolve(name_or_path)
    is_local = Path(path).is_dir()
    if entry is None and not is_local and ("/" not in path or path.startswith((".", "/", "~"))):
        raise ModelError(f"unknown model {name!r}: not a registry name ({', '.join(sorted(list_models()))}), "
                         f"not an existing folder, and not an HF id of the form 'owner/name'")
    problem = _local_problem(name, path, entry)
    if problem:
        raise ModelError(problem)
    # A hub id is read from the local cache only, unless downloads are explicitly allowed (HF_HUB_OFFLINE=0):
    # without a local copy that is one clear error now, not transformers' network retries.
    local_only = not downloads_allowed()
    if not is_local and local_only and cached_snapshot(path) is None:
        raise ModelError(not_available_locally(name, path))
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelError(_how_to_provide(name, path) + f" [{type(exc).__name__}: {str(exc).splitlines()[0][:200]}]") from exc
    hints = _hints(path) if is_local else {}
    family = (entry.family if entry and entry.family else None) or hints.get("family") or MODEL_TYPE_TO_FAMILY.get(config.model_type)
    if family is None:
        raise ModelError(f"{name}: config model_type {config.model_type!r} is not a supported family "
                         f"(supported model types: {sorted(MODEL_TYPE_TO_FAMILY)})")

    dev = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    multi = device is None and dev.type == "cuda" and torch.cuda.device_count() > 1
    if multi:
        kwargs["device_map"] = "auto"
    register_processors()
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=local_only, **kwargs)
        if family == "qwen_vl":
            # Hub folders name ``Qwen2_5_VLProcessor``, whose video half needs torchvision: load ours directly.
            from medfocus.lvlm.families.qwen_vl import QwenVLImageProcessor

            processor = QwenVLImageProcessor.from_pretrained(path, local_files_only=local_only)
        else:
            processor = AutoProcessor.from_pretrained(path, local_files_only=local_only)
    except OSError as exc:
        raise ModelError(_how_to_provide(name, path) + f" [{type(exc).__name__}: {str(exc).splitlines()[0][:200]}]") from exc
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ModelError(f"{name}: AutoProcessor returned {type(processor).__name__}, not a multimodal processor "
                         f"(is preprocessor_config.json missing from {path}?)")
    if not multi:
        model = model.to(dev)
    model.eval()

    if canvas is None:
        canvas = _configured_canvas(entry, hints)
    if family == "qwen_vl":
        from medfocus.lvlm.families.qwen_vl import QwenVLAdapter

        c = canvas or QWEN_DEFAULT_CANVAS
        adapter: LVLMAdapter = QwenVLAdapter(model, processor, name, (c, c) if isinstance(c, int) else tuple(c))
    elif family == "gemma3":
        from medfocus.lvlm.families.gemma3 import Gemma3Adapter

        adapter = Gemma3Adapter(model, processor, name)
    elif family == "llava":
        from medfocus.lvlm.families.llava import LlavaAdapter

        adapter = LlavaAdapter(model, processor, name)
    else:
        raise ModelError(f"{name}: unsupported family {family!r}")
    return adapter
