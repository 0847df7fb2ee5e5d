"""The common interface of the attribution methods: result type, method base class, registry.

Usage (Captum-like method objects, timm-like registry)::

    from medfocus.attribution import get_method, list_methods
    method = get_method("occlusion", grid=8)
    res = method.attribute(adapter, image, question, answer)
    res.heatmap          # (H0, W0) float32 in original-image pixels
    res.n_forward, res.n_backward, res.seconds

Counting convention: ``n_forward`` is the number of *model inputs* run forward (a batch of ``B``
perturbed images counts ``B``), ``n_backward`` the number of backward passes (one per input item
whose gradient is taken, so integrated gradients with 24 steps counts 24 forwards and 24 backwards,
whether or not they are batched). This is what the speed floor in ``benchmarks/methods.py`` uses.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from medfocus.errors import ConfigError
from medfocus.types import Box


@dataclass
class Attribution:
    """What every method returns.

    Attributes:
        heatmap: ``(H0, W0)`` float32 map in original-image pixels (larger = more important), or
            ``None`` for methods that only give boxes.
        boxes: boxes in original-image pixels (half-open edges) for prompting methods, else ``None``.
        token_heatmaps: ``(T, H0, W0)`` per-answer-token maps when the method gets them (cheaply), else ``None``
            (also ``None`` above 256 MB of maps; then ``extras["token_maps_lowres"]`` holds them on the
            token grid / canvas).
        n_forward: model inputs run forward (see module docstring).
        n_backward: backward passes.
        seconds: wall-clock seconds of :meth:`Method.attribute`.
        extras: method-specific outputs, always JSON-friendly scalars/strings or numpy arrays. Common keys:
            ``"final_token_heatmap"`` ``(H0, W0)`` (map for the final yes/no token of a multi-token,
            e.g. step-by-step, answer), ``"final_token_index"``, ``"grid_map"`` (map on the token grid),
            ``"layer"`` (the layer(s) used), ``"answer_tokens"``.
    """

    heatmap: np.ndarray | None
    boxes: list[Box] | None = None
    token_heatmaps: np.ndarray | None = None
    n_forward: int = 0
    n_backward: int = 0
    seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)


class Counter:
    """Pass counter handed to a method's ``_attribute`` (see the module docstring's convention)."""

    def __init__(self) -> None:
        self.n_forward = 0
        self.n_backward = 0


class Method:
    """Base class of an attribution method.

    Subclasses set :attr:`name` and :attr:`defaults` (the paper's settings) and implement
    :meth:`_attribute`. Parameters given to the constructor override the defaults; unknown names are
    a :class:`~medfocus.errors.ConfigError`.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: One line: the exact source of what is computed (paper + equation, or public implementation) and
    #: how it deviates from the MedFocus paper's public code. The class docstring gives the details; the
    #: README's method table and the report's results table show this line.
    source: ClassVar[str] = ""

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ConfigError(f"method {self.name!r}: unknown parameter(s) {unknown}; accepted: {sorted(self.defaults)}")
        self.params: dict[str, Any] = {**self.defaults, **params}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def attribute(self, adapter: Any, image: np.ndarray, question: str, answer: str) -> Attribution:
        """Attribute ``answer`` to the pixels of ``image``.

        Args:
            adapter: a :class:`~medfocus.lvlm.adapter.LVLMAdapter`.
            image: ``(H0, W0)`` uint8 grayscale image.
            question: full question (mode suffix included).
            answer: the answer text to explain (teacher-forced), e.g. the model's own generated answer.
        Returns:
            :class:`Attribution` with maps in original-image pixels and pass counters.
        """
        img = np.asarray(image)
        if img.ndim != 2:
            raise ConfigError(f"method {self.name!r}: image must be a 2-D (H, W) grayscale array, got shape {img.shape}")
        counter = Counter()
        t0 = time.perf_counter()
        res = self._attribute(adapter, img, question, answer, counter)
        res.seconds = time.perf_counter() - t0
        res.n_forward = counter.n_forward
        res.n_backward = counter.n_backward
        return res

    def _attribute(self, adapter: Any, image: np.ndarray, question: str, answer: str, counter: Counter) -> Attribution:
        raise NotImplementedError


# ---- registry ------------------------------------------------------------------------------------
#: name -> "module:Class". Modules are imported only when a method is requested, so optional
#: dependencies (the detector of prompting_medsam, MedFocus' OT) cost nothing until used.
_REGISTRY: dict[str, str] = {
    "attention_head": "medfocus.attribution.attention:AttentionHead",
    "attention_rollout": "medfocus.attribution.attention:AttentionRollout",
    "lrp": "medfocus.attribution.lrp:AttnLRP",
    "lrp_paper": "medfocus.attribution.attention:LRPPaper",
    "attention_flow_residual": "medfocus.attribution.attention:AttentionFlowResidual",
    "grad_weighted_attention": "medfocus.attribution.attention:GradWeightedAttention",
    "gradcam": "medfocus.attribution.gradients:GradCAM",
    "gradcampp": "medfocus.attribution.gradients:GradCAMPlusPlus",
    "integrated_gradients": "medfocus.attribution.gradients:IntegratedGradients",
    "occlusion": "medfocus.attribution.perturbation:Occlusion",
    "rise": "medfocus.attribution.perturbation:RISE",
    "prompting": "medfocus.attribution.prompting:Prompting",
    "prompting_medsam": "medfocus.attribution.prompting:PromptingMedSAM",
    "medfocus": "medfocus.concepts.method:MedFocusMethod",
}

#: Every built-in method but MedFocus, in table order: the paper's baselines (its "ten" counts the two
#: prompting variants as one family; its "LRP" row is ``lrp_paper``, the rule its public code computes),
#: AttnLRP (``lrp``) and the project's ``attention_flow_residual``.
BASELINES: tuple[str, ...] = tuple(n for n in _REGISTRY if n != "medfocus")


def register_method(name: str, target: str | type) -> None:
    """Add (or replace) a registry entry: ``target`` is a class or a lazy ``"module:Class"`` string."""
    _REGISTRY[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def _resolve(name: str) -> type:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown attribution method {name!r}; available: {sorted(_REGISTRY)}")
    mod_name, _, cls_name = _REGISTRY[name].partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:  # e.g. MedFocus not installed in this build
        raise ConfigError(f"attribution method {name!r} could not be imported from {mod_name}: {exc}") from exc
    try:
        return getattr(mod, cls_name)
    except AttributeError as exc:
        raise ConfigError(f"attribution method {name!r}: {mod_name} has no {cls_name}") from exc


def get_method(name: str, **params: Any) -> Any:
    """Instantiate a registered method with the paper's defaults overridden by ``params``."""
    return _resolve(name)(**params)


def method_source(name: str) -> str:
    """The ``source`` line of a registered method (what it computes, from where, deviations); ``""`` for a
    method that does not declare one, is not registered, or whose module cannot be imported."""
    if name not in _REGISTRY:
        return ""
    try:
        return str(getattr(_resolve(name), "source", ""))
    except ConfigError:
        return ""


def list_methods() -> dict[str, dict[str, Any]]:
    """``{name: defaults}`` for every registered method. A lazy entry whose module cannot be imported
    (yet) is listed with ``{}``."""
    out: dict[str, dict[str, Any]] = {}
    for name in _REGISTRY:
        try:
            out[name] = dict(getattr(_resolve(name), "defaults", {}))
        except ConfigError:
            out[name] = {}
    return out
