"""Several attribution methods on one sample at the cost of the passes they need together.

:func:`attribute_many` prepares the sample once (one processor call; :class:`PreparedSample`) and groups the
methods by the pass they declare (:attr:`Method.shared_pass`):

* ``"forward"`` methods (attention head / rollout / relevance, gradient-weighted attention, Grad-CAM,
  Grad-CAM++) read one forward on the unperturbed image -- eager with attentions when any of them needs
  them, with one backward (+ one for the final answer token) when any needs gradients
  (:func:`~medfocus.attribution.passes.run_forward_pass`). A method whose needs cannot merge with the
  group's (e.g. Grad-CAM on a middle layer next to gradient-weighted attention) gets a forward of its own.
* ``"perturbation"`` methods (occlusion, RISE, MedFocus) plan their image variants first and score them in
  one queue, each method's rows in near-equal full batches (:func:`~medfocus.attribution.passes.run_score_plans`).
* every other method (integrated gradients, the prompting methods, any method registered later that
  declares no shared pass) runs alone, reusing the prepared sample.

Each result keeps the ``n_forward`` / ``n_backward`` the method needs (what it costs alone), its
``seconds`` are its own work plus its share of the shared pass (split equally for the forward pass, by rows
for the queue), and ``extras["shared_pass"]`` says what was shared: ``{"kind", "methods", "n_forward",
"n_backward"}`` (the passes actually run for the whole group; no timing in it, so records stay
reproducible -- a method's ``seconds`` holds its share). Maps equal the single-method
maps bit for bit (``tests/test_attribution_suite.py``).

Above the working-resolution cap (:class:`~medfocus.io.letterbox.WorkFrame`) the shared methods run on the
sample in its work frame and each result is brought to original pixels once, as
:meth:`Method.attribute` does alone (same maps).
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medfocus.attribution._common import PreparedSample, prepare_sample
from medfocus.attribution.base import Counter, Method
from medfocus.attribution.passes import ForwardNeeds, merge_needs, run_forward_pass, run_score_plans
from medfocus.errors import ConfigError
from medfocus.io.letterbox import WorkFrame


def _kind(method: Any) -> str | None:
    kind = getattr(method, "shared_pass", None)
    return kind if kind in ("forward", "perturbation") else None


def _accepts_prepared(method: Any) -> bool:
    return isinstance(method, Method)


def _group_forward(adapter: Any, members: list[tuple[str, Any, ForwardNeeds]]) -> list[list[tuple[str, Any, ForwardNeeds]]]:
    """Greedy partition into groups whose needs merge (in the given order)."""
    groups: list[list[tuple[str, Any, ForwardNeeds]]] = []
    for m in members:
        for g in groups:
            try:
                merge_needs(adapter, [x[2] for x in g] + [m[2]])
            except ValueError:
                continue
            g.append(m)
            break
        else:
            groups.append([m])
    return groups


def attribute_many(adapter: Any, image: np.ndarray, question: str, answer: str,
                   methods: Mapping[str, Any] | Sequence[Any], *, prepared: PreparedSample | None = None,
                   errors: str = "raise", before_method: Callable[[str], None] | None = None,
                   orientation: Any = None) -> dict[str, Any]:
    """Run ``methods`` on one ``(image, question, answer)``, sharing the sample's preparation and passes.

    Args:
        adapter: a :class:`~medfocus.lvlm.adapter.LVLMAdapter`.
        image: ``(H0, W0)`` uint8 grayscale image.
        question: full question (mode suffix included).
        answer: the teacher-forced answer text to explain.
        methods: ``{name: method object}`` or a sequence of method objects (keyed by their ``name``). Objects
            that are not :class:`~medfocus.attribution.base.Method` instances only need
            ``attribute(adapter, image, question, answer)`` and run alone.
        prepared: the sample's :func:`~medfocus.attribution._common.prepare_sample` (``None``: prepared here).
        errors: ``"raise"`` (the first failure propagates) or ``"return"`` (a failed method's entry is the
            exception; a failure of a shared pass is the entry of every method reading it).
        before_method: called with a method's name before each piece of that method's own work (e.g. to
            re-seed the global RNGs per method, as the runner does).
        orientation: the film's :class:`~medfocus.io.reader.FilmOrientation` (``None``: the display convention
            ``L\\F``), handed to every :class:`~medfocus.attribution.base.Method` (it names the patient's sides).
    Returns:
        ``{name: Attribution}`` in the order of ``methods`` (or exceptions, with ``errors="return"``).
    Raises:
        ConfigError: duplicate names, a bad ``errors`` value, a non-2-D image, a ``prepared`` sample of other
            inputs, or (``errors="raise"``) whatever a method raises.
    """
    if errors not in ("raise", "return"):
        raise ConfigError(f"attribute_many: errors must be 'raise' or 'return', got {errors!r}")
    if isinstance(methods, Mapping):
        named = [(str(k), v) for k, v in methods.items()]
    else:
        named = [(str(getattr(m, "name", type(m).__name__)), m) for m in methods]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"attribute_many: duplicate method names {names}")
    img = np.asarray(image)
    if img.ndim != 2:
        raise ConfigError(f"attribute_many: image must be a 2-D (H, W) grayscale array, got shape {img.shape}")
    frame = WorkFrame.of((img.shape[1], img.shape[0]))  # a bad $MEDFOCUS_WORK_SIDE fails here, before any pass
    results: dict[str, Any] = {}
    own_seconds: dict[str, float] = {n: 0.0 for n in names}

    def fail(name: str, exc: BaseException) -> None:
        if errors == "raise" or isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        results[name] = exc

    def mark(name: str) -> None:
        if before_method is not None:
            before_method(name)

    shared = [(n, m) for n, m in named if _kind(m) is not None and _accepts_prepared(m)]
    if prepared is None and any(_accepts_prepared(m) for _, m in named):
        t0 = time.perf_counter()
        try:
            prepared = prepare_sample(adapter, img, question, answer)
        except Exception as exc:
            # The shared passes need it: their methods get the error; the others run alone and prepare (or
            # not: the prompting methods need no answer) for themselves, as they would without a suite.
            if errors == "raise" and shared:
                raise
            for n, _ in shared:
                results[n] = exc
            shared = []
        else:
            prep_share = (time.perf_counter() - t0) / max(1, sum(_accepts_prepared(m) for _, m in named))
            for n, m in named:
                if _accepts_prepared(m):
                    own_seconds[n] += prep_share
    elif prepared is not None and not prepared.matches(adapter, img, question, answer):
        raise ConfigError("attribute_many: the prepared sample is for another (adapter, image, question, answer)")
    # the shared methods work in the image's work frame (the sample itself within the cap): same model input
    work = prepared.in_work_frame(frame) if prepared is not None else None
    wimg = work.image if work is not None else img
    chat = work.chat if work is not None else None
    counters = {n: Counter(work, orientation) for n, _ in shared}
    notes: dict[str, dict[str, Any]] = {}

    # ---- forward methods: one merged pass per compatible group --------------------------------------
    fwd: list[tuple[str, Any, ForwardNeeds]] = []
    for n, m in shared:
        if _kind(m) != "forward":
            continue
        mark(n)
        t0 = time.perf_counter()
        try:
            fwd.append((n, m, m._forward_needs(adapter)))
        except Exception as exc:
            fail(n, exc)
        own_seconds[n] += time.perf_counter() - t0
    for group in _group_forward(adapter, fwd):
        needs = merge_needs(adapter, [x[2] for x in group])
        t0 = time.perf_counter()
        try:
            fp = run_forward_pass(adapter, chat, needs)
        except Exception as exc:
            for n, _, _ in group:
                fail(n, exc)
            continue
        pass_s = time.perf_counter() - t0
        gnames = [x[0] for x in group]
        for n, m, nd in group:
            mark(n)
            t1 = time.perf_counter()
            try:
                res = m.to_original_frame(m._from_forward(adapter, chat, fp), frame, chat.geometry)
            except Exception as exc:
                fail(n, exc)
                continue
            nf, nb = nd.passes(chat.n_answer_tokens)
            counters[n].n_forward += nf
            counters[n].n_backward += nb
            own_seconds[n] += time.perf_counter() - t1 + pass_s / len(group)
            results[n] = res
            if len(group) > 1:
                notes[n] = {"kind": "forward", "methods": gnames, "n_forward": fp.n_forward, "n_backward": fp.n_backward}

    # ---- perturbation methods: planned first, then one queue (each plan in full batches) --------------------------------------------
    plans: list[tuple[str, Any]] = []
    for n, m in shared:
        if _kind(m) != "perturbation":
            continue
        mark(n)
        t0 = time.perf_counter()
        try:
            plans.append((n, m._score_plan(adapter, wimg, chat, counters[n])))
        except Exception as exc:
            fail(n, exc)
        own_seconds[n] += time.perf_counter() - t0
    if plans:
        t0 = time.perf_counter()
        try:
            logps = run_score_plans(adapter, chat, [p for _, p in plans])
        except Exception as exc:
            logps = None
            for n, _ in plans:
                fail(n, exc)
        pass_s = time.perf_counter() - t0
        if logps is not None:
            rows = sum(p.n for _, p in plans)
            pnames = [n for n, _ in plans]
            m_of = dict(shared)
            for (n, p), lp in zip(plans, logps):
                mark(n)
                t1 = time.perf_counter()
                try:
                    res = m_of[n].to_original_frame(p.finish(lp), frame, chat.geometry)
                except Exception as exc:
                    fail(n, exc)
                    continue
                own_seconds[n] += time.perf_counter() - t1 + pass_s * p.n / rows
                results[n] = res
                if len(plans) > 1:
                    notes[n] = {"kind": "perturbation", "methods": pnames, "n_forward": rows, "n_backward": 0}

    for n, res in list(results.items()):
        if not isinstance(res, BaseException):
            res.n_forward = counters[n].n_forward
            res.n_backward = counters[n].n_backward
            res.seconds = own_seconds[n]
            if n in notes:
                res.extras["shared_pass"] = notes[n]

    # ---- everything else alone (with the prepared sample when it takes one) ----------------------------
    done = set(results) | {n for n, _ in shared}
    for n, m in named:
        if n in done:
            continue
        mark(n)
        t0 = time.perf_counter()
        try:
            res = (m.attribute(adapter, img, question, answer, prepared=prepared, orientation=orientation) if _accepts_prepared(m)
                   else m.attribute(adapter, img, question, answer))
        except Exception as exc:
            fail(n, exc)
            continue
        if _accepts_prepared(m):
            res.seconds = own_seconds[n] + (time.perf_counter() - t0)
        results[n] = res
    return {n: results[n] for n in names if n in results}


def format_exception(exc: BaseException, limit: int = 6) -> str:
    """The last ``limit`` lines of ``exc``'s traceback (for result records)."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-limit:])
