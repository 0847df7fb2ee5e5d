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

Working resolution: on an image whose longer side exceeds the cap (:func:`medfocus.io.letterbox.work_side`,
default 2048 px, ``$MEDFOCUS_WORK_SIDE``), :meth:`Method.attribute` runs the method in the image's
:class:`~medfocus.io.letterbox.WorkFrame` -- the model input is still letterboxed from the original image,
but every image-sized array (maps, masks, box indicators) is built at the capped size -- and brings the
result to original pixels once (:meth:`Method.to_original_frame`: boxes scaled exactly, maps upsampled
bilinearly; ``extras["work_size"]`` records the frame used). Images within the cap are untouched.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import numpy as np

from medfocus.errors import ConfigError
from medfocus.registry import LazyRegistry
from medfocus.types import Box

if TYPE_CHECKING:  # annotations only: the adapter interface lives in the LVLM layer
    from medfocus.lvlm.adapter import LVLMAdapter


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
            ``"layer"`` (the layer(s) used), ``"answer_tokens"``, ``"work_size"`` (``[w, h]`` of the reduced
            work frame the method ran in, only for an image above the working-resolution cap).
    """

    heatmap: np.ndarray | None
    boxes: list[Box] | None = None
    token_heatmaps: np.ndarray | None = None
    n_forward: int = 0
    n_backward: int = 0
    seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)


class Counter:
    """Pass counter handed to a method's ``_attribute`` (see the module docstring's convention); it also
    carries the :class:`~medfocus.attribution._common.PreparedSample` the method may reuse (``None``:
    the method prepares its own inputs) and the film's :class:`~medfocus.io.reader.FilmOrientation`
    (``None``: the display convention ``L\\F``), which names the patient's sides for the methods that name
    anatomy (MedFocus, the anatomy detector of ``prompting_medsam``)."""

    def __init__(self, prepared: Any = None, orientation: Any = None) -> None:
        self.n_forward = 0
        self.n_backward = 0
        self.prepared = prepared
        self.orientation = orientation


# ---- settings validation -------------------------------------------------------------------------
class InvalidSetting(Exception):
    """Raised by a :class:`Param` check for a value it does not accept; :class:`Method` turns it into a
    :class:`~medfocus.errors.ConfigError` naming the method, the setting and what was expected."""


@dataclass(frozen=True)
class Param:
    """What one method setting accepts; :meth:`check` returns the value or raises (no coercion).

    Build with :func:`integer`, :func:`number`, :func:`choice`, :func:`boolean`, :func:`text`,
    :func:`int_list`, combined with :func:`either` / :func:`optional`.

    Attributes:
        expected: human-readable description used in error messages (e.g. ``"an integer >= 1"``).
        check: ``value -> value``; raises :class:`InvalidSetting` when the value is not accepted.
    """

    expected: str
    check: Callable[[Any], Any]


def _is_int(v: Any) -> bool:
    import numpy as _np

    return isinstance(v, (int, _np.integer)) and not isinstance(v, (bool, _np.bool_))


def integer(lo: int | None = None, hi: int | None = None) -> Param:
    """An integer (``bool`` and floats such as ``2.0`` or ``2.5`` are refused) in ``[lo, hi]``."""
    rng = " ".join(x for x in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "") if x)

    def check(v: Any) -> Any:
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise InvalidSetting
        return int(v)

    return Param(f"an integer{(' ' + rng) if rng else ''}", check)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Param:
    """A finite real number (int or float, not ``bool``) in the given interval."""
    lo_s = "" if lo is None else f"{'(' if lo_open else '['}{lo}"
    hi_s = "" if hi is None else f"{hi}{')' if hi_open else ']'}"
    rng = f" in {lo_s or '(-inf'}, {hi_s or 'inf)'}" if (lo is not None or hi is not None) else ""

    def check(v: Any) -> Any:
        if isinstance(v, bool) or not (_is_int(v) or isinstance(v, float)) or not math.isfinite(float(v)):
            raise InvalidSetting
        x = float(v)
        if lo is not None and (x <= lo if lo_open else x < lo):
            raise InvalidSetting
        if hi is not None and (x >= hi if hi_open else x > hi):
            raise InvalidSetting
        return x

    return Param(f"a number{rng}", check)


def choice(*options: str) -> Param:
    """One of the given strings."""

    def check(v: Any) -> Any:
        if not isinstance(v, str) or v not in options:
            raise InvalidSetting
        return v

    return Param("one of " + ", ".join(repr(o) for o in options), check)


def boolean() -> Param:
    """``true`` or ``false`` (not 0/1, not a string)."""

    def check(v: Any) -> Any:
        if not isinstance(v, bool):
            raise InvalidSetting
        return v

    return Param("true or false", check)


def text(nonempty: bool = True) -> Param:
    """A string (non-empty by default)."""

    def check(v: Any) -> Any:
        if not isinstance(v, str) or (nonempty and not v.strip()):
            raise InvalidSetting
        return v

    return Param("a non-empty string" if nonempty else "a string", check)


def int_list() -> Param:
    """A non-empty list of integers."""

    def check(v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or not v or not all(_is_int(x) for x in v):
            raise InvalidSetting
        return [int(x) for x in v]

    return Param("a non-empty list of integers", check)


def path_like() -> Param:
    """A non-empty string or an ``os.PathLike`` (kept as given)."""
    import os

    def check(v: Any) -> Any:
        if isinstance(v, os.PathLike) or (isinstance(v, str) and v.strip()):
            return v
        raise InvalidSetting

    return Param("a path (non-empty string)", check)


def obj(expected: str, accept: Callable[[Any], bool]) -> Param:
    """A Python object for programmatic use (e.g. a loaded detector), accepted when ``accept(v)``."""

    def check(v: Any) -> Any:
        if isinstance(v, (str, bool, int, float)) or v is None or not accept(v):
            raise InvalidSetting
        return v

    return Param(expected, check)


def either(*params: Param) -> Param:
    """Accepts what any of ``params`` accepts (first match wins)."""

    def check(v: Any) -> Any:
        for p in params:
            try:
                return p.check(v)
            except InvalidSetting:
                continue
        raise InvalidSetting

    return Param(" or ".join(p.expected for p in params), check)


def _none(v: Any) -> Any:
    if v is not None:
        raise InvalidSetting
    return v


def optional(param: Param) -> Param:
    """``null`` (None) or what ``param`` accepts."""
    return either(Param("null", _none), param)


def describe(value: Any) -> str:
    """``'abc' (str)`` -- a value and its type for error messages."""
    return f"{value!r} ({type(value).__name__})"


class Method:
    """Base class of an attribution method.

    Subclasses set :attr:`name`, :attr:`defaults` (the paper's settings) and :attr:`spec` (what each
    setting accepts) and implement :meth:`_attribute`. Parameters given to the constructor override the
    defaults and are validated *here*, before any model is touched: an unknown name, a value of the
    wrong type (``grid="abc"``, ``grid=2.5``, ``final_token=1``) or out of range (``grid=0``,
    ``p_keep=2``) is a :class:`~medfocus.errors.ConfigError` naming the setting, the expected type and
    the value given. Cross-setting rules go in :meth:`_validate`. Settings without a spec entry (third-
    party methods) are passed through unchecked.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: One line: the exact source of what is computed (paper + equation, or public implementation) and
    #: how it deviates from the MedFocus paper's public code. The class docstring gives the details; the
    #: README's method table and the report's results table show this line.
    source: ClassVar[str] = ""
    spec: ClassVar[dict[str, Param]] = {}
    #: Settings that do not change the result (only speed/memory or where a cache lives): stored in
    #: records but not compared when a rerun is checked against stored results.
    runtime_settings: ClassVar[frozenset[str]] = frozenset({"batch_size", "cache"})
    #: Extras that carry image-frame geometry, by kind: ``"map"`` (an ``(H, W)`` map), ``"box"`` (one box),
    #: ``"boxes"`` (a list of boxes), ``"box_map"`` (``{name: box}``). :meth:`to_original_frame` brings them
    #: from the work frame to original pixels; a method adding such an extra declares it here.
    frame_extras: ClassVar[dict[str, str]] = {"final_token_heatmap": "map"}
    #: Whether the method explains a given answer (so needs it prepared); the prompting methods only ask.
    needs_answer: ClassVar[bool] = True
    #: Whether the method makes one map per answer token (``token_heatmaps``: attention rows, perturbation
    #: scores per token) -- True -- or attributes the whole answer at once (one target, the answer's
    #: log-likelihood; the prompting methods: no answer target at all) -- False. ``None``: not declared
    #: (a third-party method). The viewer says so where a method has no per-token strip.
    per_token_maps: ClassVar[bool | None] = None

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ConfigError(f"method {self.name!r}: unknown parameter(s) {unknown}; accepted: {sorted(self.defaults)}")
        merged = {**self.defaults, **params}
        for key in params:
            p = self.spec.get(key)
            if p is None:
                continue
            try:
                merged[key] = p.check(params[key])
            except InvalidSetting:
                raise ConfigError(f"method {self.name!r}: parameter {key!r} expects {p.expected}, "
                                  f"got {describe(params[key])}") from None
        self.params: dict[str, Any] = merged
        self._validate()

    def _validate(self) -> None:
        """Rules between settings (override; raise :class:`ConfigError`). Runs at the end of ``__init__``."""

    def check_params(self, adapter: Any) -> None:
        """Check the settings that depend on the model (a decoder-layer or attention-head index), once it is
        loaded and before any sample is attributed: :func:`medfocus.runner.grid.load_checked` (``attribute``,
        ``explain`` and the demo) calls it right after loading each model, and methods that read such a
        setting call it before their pass. Default: nothing depends on the model.

        Raises:
            ConfigError: naming the method, the setting, the value and the valid range for this model.
        """

    def check_images(self, adapter: Any, films: Mapping[str, tuple[int, int]]) -> None:
        """Check the settings that depend on the model *and* the films to be attributed (a perturbation grid
        finer than a film's content on the model's canvas), once the model is loaded and before any sample
        runs: :func:`medfocus.runner.grid.load_checked` calls it with ``films`` = ``{image path: (width,
        height)}`` in original pixels. Default: nothing depends on the films.

        Raises:
            ConfigError: naming the method, the setting, the value, the limit and the film(s) that set it.
        """

    def forward_passes(self) -> tuple[int, str] | None:
        """``(n, how)``: the forward passes one sample costs and how that follows from the settings
        (``(65, "1 + 8x8 grid cells")``), for methods whose cost the settings fix and a user chooses (the
        perturbation methods); ``None`` otherwise. Printed before a run so a costly setting shows up front."""
        return None

    def settings(self) -> dict[str, Any]:
        """The full resolved settings (defaults + overrides) as JSON-friendly values; what a result
        record stores so that a rerun with different settings is never mistaken for the same work."""
        out: dict[str, Any] = {}
        for k in sorted(self.params):
            v = self.params[k]
            if hasattr(v, "detach") or hasattr(v, "__array__"):  # a tensor baseline: identify it by content
                import hashlib

                arr = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
                v = {"array_sha1": hashlib.sha1(arr.tobytes()).hexdigest(), "shape": list(arr.shape), "dtype": str(arr.dtype)}
            elif v is not None and not isinstance(v, (str, bool, int, float, list, tuple, dict)):
                v = f"<{type(v).__module__}.{type(v).__qualname__}>"  # a loaded object: identified by its type
            out[k] = v
        from medfocus.io.letterbox import DEFAULT_WORK_SIDE, work_side

        side = work_side()
        if side != DEFAULT_WORK_SIDE:  # a non-default working resolution changes the maps of films above it
            out["work_side"] = side or 0
        return out

    @property
    def uses_synthetic_pool(self) -> bool:
        """Whether this configuration transfers concepts from the default *synthetic* reference pool (MedFocus,
        ``prompting_medsam``'s anatomy detector); the runner warns when that meets a real film."""
        return False

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    #: The shared pass this method can read when it runs with others (:func:`medfocus.attribution.suite.attribute_many`):
    #: ``"forward"`` (one teacher-forced forward on the unperturbed image, with attentions / gradients as
    #: declared by ``_forward_needs``), ``"perturbation"`` (rows of image variants scored in one queue of
    #: full batches, planned by ``_score_plan``), or ``None``: the method runs alone (it still reuses the
    #: sample's prepared inputs).
    shared_pass: ClassVar[str | None] = None

    def attribute(self, adapter: Any, image: np.ndarray, question: str, answer: str, *, prepared: Any = None,
                  orientation: Any = None) -> Attribution:
        """Attribute ``answer`` to the pixels of ``image``.

        Args:
            adapter: a :class:`~medfocus.lvlm.adapter.LVLMAdapter`.
            image: ``(H0, W0)`` uint8 grayscale image.
            question: full question (mode suffix included).
            answer: the answer text to explain (teacher-forced), e.g. the model's own generated answer.
            prepared: a :class:`~medfocus.attribution._common.PreparedSample` of exactly these inputs
                (:func:`~medfocus.attribution._common.prepare_sample`), shared by the methods of a sample;
                ``None`` prepares here.
            orientation: the film's :class:`~medfocus.io.reader.FilmOrientation`
                (:func:`~medfocus.io.reader.read_orientation`; ``None``: the display convention ``L\\F``). Pixels,
                maps and boxes stay in the stored frame; it only names the patient's left/right (concepts).
        Returns:
            :class:`Attribution` with maps in original-image pixels and pass counters. Above the
            working-resolution cap the method runs in the image's work frame (module docstring).
        Raises:
            ConfigError: a non-2-D image, a ``prepared`` sample of other inputs, or a bad ``$MEDFOCUS_WORK_SIDE``.
        """
        from medfocus.io.letterbox import WorkFrame

        img = np.asarray(image)
        if img.ndim != 2:
            raise ConfigError(f"method {self.name!r}: image must be a 2-D (H, W) grayscale array, got shape {img.shape}")
        if prepared is not None and not prepared.matches(adapter, img, question, answer):
            raise ConfigError(f"method {self.name!r}: the prepared sample is for another (adapter, image, question, answer)")
        frame = WorkFrame.of((img.shape[1], img.shape[0]))
        t0 = time.perf_counter()
        if frame.identity:
            counter = Counter(prepared, orientation)
            res = self._attribute(adapter, img, question, answer, counter)
        else:
            work = self._prepared_for(adapter, img, question, answer, prepared).in_work_frame(frame)
            counter = Counter(work, orientation)
            res = self.to_original_frame(self._attribute(adapter, work.image, question, answer, counter), frame, work.chat.geometry)
        res.seconds = time.perf_counter() - t0
        res.n_forward = counter.n_forward
        res.n_backward = counter.n_backward
        return res

    def _attribute(self, adapter: LVLMAdapter, image: np.ndarray, question: str, answer: str, counter: Counter) -> Attribution:
        raise NotImplementedError

    def _prepared_for(self, adapter: Any, image: np.ndarray, question: str, answer: str, prepared: Any) -> Any:
        """The sample's :class:`~medfocus.attribution._common.PreparedSample` (``prepared``, or made here). A
        method that does not need the answer (:attr:`needs_answer`) gets the chat of the question alone when
        the answer cannot be prepared (it reads only the geometry and the model's image from it)."""
        from medfocus.attribution._common import PreparedSample, prepare_sample

        if prepared is not None:
            return prepared
        try:
            return prepare_sample(adapter, image, question, answer, self.name)
        except ConfigError:
            if self.needs_answer:
                raise
            return PreparedSample(adapter, image, question, answer, adapter.prepare(image, question))

    def to_original_frame(self, res: Attribution, frame: Any, geometry: Any = None) -> Attribution:
        """Bring a result computed in ``frame`` (a :class:`~medfocus.io.letterbox.WorkFrame`) to original
        pixels, in place: boxes (``boxes`` and the box extras of :attr:`frame_extras`) scaled exactly,
        ``heatmap`` and map extras upsampled once (:meth:`_heatmap_to_original`), per-token maps upsampled
        when ``T * H0 * W0`` stays within :data:`~medfocus.attribution._common.MAX_TOKEN_MAP_FLOATS` (else
        ``token_heatmaps`` is ``None`` and, when ``geometry`` -- the work frame's letterbox -- is given and
        the method kept none, ``extras["token_maps_lowres"]`` holds them on the canvas). Records
        ``extras["work_size"]``. An identity frame returns ``res`` unchanged."""
        from medfocus.attribution._common import MAX_TOKEN_MAP_FLOATS

        if frame.identity:
            return res
        ex = res.extras
        if res.boxes is not None:
            res.boxes = [frame.box_to_original(b) for b in res.boxes]
        for key, kind in self.frame_extras.items():
            v = ex.get(key)
            if v is None or kind == "map":
                continue
            if kind == "box":
                ex[key] = list(frame.box_to_original(v))
            elif kind == "boxes":
                ex[key] = [frame.box_to_original(b) for b in v]
            elif kind == "box_map":
                ex[key] = {k: list(frame.box_to_original(b)) for k, b in v.items()}
            else:
                raise ConfigError(f"method {self.name!r}: frame_extras[{key!r}] has unknown kind {kind!r}")
        work_heat, tok = res.heatmap, res.token_heatmaps
        if work_heat is not None:
            res.heatmap = self._heatmap_to_original(res, frame)
        up_tok = None
        if tok is not None:
            tok = np.asarray(tok)
            if tok.shape[0] * frame.orig_h * frame.orig_w <= MAX_TOKEN_MAP_FLOATS:
                up_tok = np.empty((tok.shape[0], frame.orig_h, frame.orig_w), np.float32)
                for t in range(tok.shape[0]):
                    frame.upsample(tok[t], out=up_tok[t])
                res.token_heatmaps = up_tok
            else:
                res.token_heatmaps = None
                if geometry is not None and "token_maps_lowres" not in ex:
                    ex["token_maps_lowres"] = np.stack([geometry.map_to_canvas(m) for m in tok])
        for key, kind in self.frame_extras.items():
            v = ex.get(key)
            if kind != "map" or v is None:
                continue
            if v is work_heat:  # the same map (a one-token answer): the same upsampled array
                ex[key] = res.heatmap
                continue
            v = np.asarray(v)
            # one of the per-token maps (MedFocus' final-token map): a view of the upsampled one, no copy
            same = [t for t in range(len(tok)) if np.shares_memory(v, tok[t]) and np.array_equal(v, tok[t])] if up_tok is not None else []
            ex[key] = up_tok[same[0]] if same else frame.upsample(v)
        ex["work_size"] = [frame.work_w, frame.work_h]
        return res

    def _heatmap_to_original(self, res: Attribution, frame: Any) -> np.ndarray:
        """The work-frame ``res.heatmap`` in original pixels (called after the boxes were converted): upsampled
        once (bilinear). Methods whose map is drawn from their boxes redraw it at the original size instead."""
        return frame.upsample(np.asarray(res.heatmap))


class ForwardMethod(Method):
    """A method that reads one forward pass on the unperturbed image (``shared_pass = "forward"``).

    Subclasses implement ``_forward_needs(adapter) -> ForwardNeeds`` (validating their settings) and
    ``_from_forward(adapter, chat, fp) -> Attribution``; alone, :meth:`_attribute` runs the pass for their
    needs only (:func:`medfocus.attribution.passes.run_forward_pass`), in a suite one merged pass serves
    several methods."""

    shared_pass: ClassVar[str | None] = "forward"

    def _forward_needs(self, adapter: Any) -> Any:
        raise NotImplementedError

    def _from_forward(self, adapter: Any, chat: Any, fp: Any) -> Attribution:
        raise NotImplementedError

    def _attribute(self, adapter: Any, image: np.ndarray, question: str, answer: str, counter: Counter) -> Attribution:
        from medfocus.attribution._common import prepare_answer
        from medfocus.attribution.passes import run_forward_pass

        chat = prepare_answer(adapter, image, question, answer, self.name, counter)
        needs = self._forward_needs(adapter)
        fp = run_forward_pass(adapter, chat, needs)
        nf, nb = needs.passes(chat.n_answer_tokens)
        counter.n_forward += nf
        counter.n_backward += nb
        return self._from_forward(adapter, chat, fp)


class PerturbationMethod(Method):
    """A method whose passes are rows of image variants (``shared_pass = "perturbation"``).

    Subclasses implement ``_score_plan(adapter, image, chat, counter) -> ScorePlan`` (``image`` the original
    ``(H0, W0)`` image, ``chat`` its prepared inputs; counting its rows in ``counter``); alone, :meth:`_attribute` scores that plan's rows, in a suite the rows of several plans
    share one queue, each plan in full batches (:func:`medfocus.attribution.passes.run_score_plans`)."""

    shared_pass: ClassVar[str | None] = "perturbation"

    def _score_plan(self, adapter: Any, image: np.ndarray, chat: Any, counter: Counter) -> Any:
        raise NotImplementedError

    def _plan_for(self, adapter: Any, image: np.ndarray, question: str, answer: str, counter: Counter) -> tuple[Any, Any]:
        """``(chat, plan)`` for one sample (the chat from ``counter.prepared`` when given)."""
        from medfocus.attribution._common import prepare_answer

        chat = prepare_answer(adapter, image, question, answer, self.name, counter)
        return chat, self._score_plan(adapter, image, chat, counter)

    def _attribute(self, adapter: Any, image: np.ndarray, question: str, answer: str, counter: Counter) -> Attribution:
        from medfocus.attribution.passes import run_score_plans

        chat, plan = self._plan_for(adapter, image, question, answer, counter)
        (logp,) = run_score_plans(adapter, chat, [plan])
        return plan.finish(logp)


# ---- registry ------------------------------------------------------------------------------------
#: name -> "module:Class". Modules are imported only when a method is requested, so optional
#: dependencies (the detector of prompting_medsam, MedFocus' OT) cost nothing until used.
_REGISTRY: LazyRegistry[type] = LazyRegistry("attribution method", {
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
})

#: Every built-in method but MedFocus, in table order: the paper's baselines (its "ten" counts the two
#: prompting variants as one family; its "LRP" row is ``lrp_paper``, the rule its public code computes),
#: AttnLRP (``lrp``) and the project's ``attention_flow_residual``.
BASELINES: tuple[str, ...] = tuple(n for n in _REGISTRY if n != "medfocus")


def register_method(name: str, target: str | type, *, overwrite: bool = False) -> None:
    """Add a registry entry: ``target`` is a class or a lazy ``"module:Class"`` string.

    Raises:
        ConfigError: ``name`` is taken and ``overwrite`` is false.
    """
    _REGISTRY.register(name, target, overwrite=overwrite)


def _resolve(name: str) -> type:
    return _REGISTRY.resolve(name)


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


def forward_pass_note(methods: Mapping[str, Any], unit: str = "sample") -> str | None:
    """One line naming the per-``unit`` forward passes of the selected methods that declare them
    (:meth:`Method.forward_passes`), e.g. ``"forward passes per sample: occlusion 65 (1 + 8x8 grid cells),
    rise 64 (n_masks)"``; ``None`` when none does."""
    parts = []
    for name, m in methods.items():
        get = getattr(m, "forward_passes", None)
        cost = get() if callable(get) else None
        if cost is not None:
            parts.append(f"{name} {cost[0]:,} ({cost[1]})")
    return f"forward passes per {unit}: " + ", ".join(parts) if parts else None


def method_runtime_settings(name: str) -> frozenset[str]:
    """The settings of a registered method that cannot change its results (:attr:`Method.runtime_settings`:
    speed, memory, where a cache lives), the one list every rerun check skips (``attribute``'s record check
    in :func:`medfocus.runner.grid.run_grid`, ``explain``'s ``explain.json`` check); empty for a method that
    is not registered or whose module cannot be imported (then every setting counts)."""
    if name not in _REGISTRY:
        return frozenset()
    try:
        return frozenset(getattr(_resolve(name), "runtime_settings", ()))
    except ConfigError:
        return frozenset()


def method_answer_scope(name: str) -> str | None:
    """What a registered method's map covers: ``"per_token"`` (one map per answer token,
    :attr:`Method.per_token_maps`), ``"whole_answer"`` (the whole answer at once), ``"no_answer"`` (it does
    not attribute an answer: :attr:`Method.needs_answer` false, the prompting methods); ``None`` for a
    method that does not declare it, is not registered, or whose module cannot be imported."""
    if name not in _REGISTRY:
        return None
    try:
        cls = _resolve(name)
    except ConfigError:
        return None
    if getattr(cls, "needs_answer", True) is False:
        return "no_answer"
    v = getattr(cls, "per_token_maps", None)
    return None if not isinstance(v, bool) else "per_token" if v else "whole_answer"


def list_methods() -> dict[str, dict[str, Any]]:
    """``{name: defaults}`` for every registered method, in registration (table) order. A lazy entry
    whose module cannot be imported (yet) is listed with ``{}``."""
    out: dict[str, dict[str, Any]] = {}
    for name in _REGISTRY:
        try:
            out[name] = dict(getattr(_resolve(name), "defaults", {}))
        except ConfigError:
            out[name] = {}
    return out
