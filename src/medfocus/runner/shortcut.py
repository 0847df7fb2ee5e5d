"""The shortcut twin against the demo model: known cue reliance and the causal filter's effect, with intervals.

Composes :mod:`medfocus.bench.cue_reliance` (which answers a cue decided, by ablating only the cues),
:func:`medfocus.bench.build_benchmark` (the causal filter) and Wilson intervals
(:func:`medfocus.evaluation.wilson_interval`). Used by the demo (``shortcut.md`` in its folder) and by
``benchmarks/shortcut.py`` (the published figures, at larger n).

The data are the same synthetic films rendered twice (:func:`write_cue_twins`): with every finding's
correlated cue (``cue_rate=1``, exact counterfactuals for the oracle editor) and without cues
(``cue_rate=0``); the cues have their own random stream, so the two renders differ only at the cues.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from medfocus.bench.cue_reliance import CueOutcome
from medfocus.types import Sample

__all__ = ["ShortcutResult", "measure_shortcut", "shortcut_markdown", "write_cue_twins"]


@dataclass
class ShortcutResult:
    """One model's cue reliance and filter retention on the cued / cue-free films.

    Attributes:
        model: model name.
        outcomes: per cued positive (:func:`~medfocus.bench.cue_reliance.cue_necessity`).
        retention: ``{"cue_necessary": (kept, n), "cue_independent": (kept, n)}`` on the cued films.
        clean: ``(kept, n)``: correct positives of the cue-free films that the filter kept.
    """

    model: str
    outcomes: list[CueOutcome]
    retention: dict[str, tuple[int, int]]
    clean: tuple[int, int]

    @property
    def cue_necessary_share(self) -> tuple[int, int]:
        """``(cue-necessary, correct cued positives)``."""
        yes = [o for o in self.outcomes if o.correct]
        return sum(o.cue_necessary for o in yes), len(yes)


def write_cue_twins(root: str | Path, n: int, seed: int, *, size: int = 256, lesion_size_rule: str | None = None,
                    workers: int = 1, progress: bool = False) -> tuple[list[Sample], list[Sample]]:
    """Write ``n`` synthetic films twice under ``root`` (``cued/``: every finding with its correlated cue;
    ``free/``: no cues) and load both. A folder already written is reused only when its manifest records
    these settings (``n``, ``seed``, ``size``, the cue rate and ``lesion_size_rule``; ``None``: the writer's
    default) and its cue records have whole-cue boxes (``core_box``); otherwise it is written again, so a
    rerun with other settings never measures the old films. Returns ``(cued_samples, cue_free_samples)``,
    matched by film and finding."""
    from medfocus.datasets.synthetic import load_synthetic, write_dataset
    from medfocus.datasets.synthetic.cues import predates_whole_cue_boxes
    from medfocus.datasets.synthetic.dataset import written_settings
    from medfocus.datasets.synthetic.findings import DEFAULT_LESION_SIZE_RULE

    root = Path(root)
    rule = lesion_size_rule or DEFAULT_LESION_SIZE_RULE
    loaded = []
    for name, rate in (("cued", 1.0), ("free", 0.0)):
        want = {"n": n, "seed": seed, "size": size, "cue_rate": rate, "cue_base_rate": 0.0, "lesion_size_rule": rule}
        samples = load_synthetic(root / name) if written_settings(root / name) == want else None
        if samples is None or any(predates_whole_cue_boxes(c) for s in samples for c in s.meta.get("cues") or []):
            write_dataset(root / name, n, seed=seed, size=size, cue_rate=rate, lesion_size_rule=rule, imagenome=False,
                          workers=workers, progress=progress, overwrite=True)
            samples = load_synthetic(root / name)
        loaded.append(samples)
    return loaded[0], loaded[1]


def _kept_by_index(adapter: Any, samples: Sequence[Sample], out: Path, model: str, progress: bool) -> dict[int, dict]:
    from medfocus.bench import build_benchmark, read_log, split_paths
    from medfocus.editing import get_editor

    build_benchmark(adapter, samples, mode="direct", editor=get_editor("oracle"), out_dir=out, model_name=model,
                    progress=progress)
    log = read_log(split_paths(out, model, "synthetic", "direct")["log"])
    return {int(r["index"]): r for r in log.values() if r.get("kind", "positive") == "positive"}


def measure_shortcut(adapter: Any, model: str, cued: Sequence[Sample], free: Sequence[Sample], out_dir: str | Path,
                     *, progress: bool = False) -> ShortcutResult:
    """Cue reliance of ``model`` (direct mode) and the oracle causal filter on both renders.

    Args:
        adapter: the model's :class:`~medfocus.lvlm.adapter.LVLMAdapter`.
        model: its name (records, bench folders).
        cued, free: :func:`write_cue_twins`.
        out_dir: where the two benchmark splits go (``<out_dir>/cued``, ``<out_dir>/free``; resumable).

    Returns:
        A :class:`ShortcutResult`.
    """
    from medfocus.bench.cue_reliance import cue_necessity, retention_by_reliance

    out = Path(out_dir)
    outcomes = cue_necessity(adapter, cued, free, mode="direct")
    on_cued = _kept_by_index(adapter, cued, out / "cued", model, progress)
    on_free = _kept_by_index(adapter, free, out / "free", model, progress)
    correct = [r for r in on_free.values() if r.get("error") is None and (r.get("gates") or {}).get("correct")]
    return ShortcutResult(model, outcomes, retention_by_reliance(outcomes, {i: bool(r.get("kept")) for i, r in on_cued.items()}),
                          (sum(bool(r.get("kept")) for r in correct), len(correct)))


def shortcut_markdown(results: Sequence[ShortcutResult]) -> str:
    """Two Markdown tables: each model's cue-necessary share, and the causal filter's retention of its
    cue-necessary, cue-independent and clean samples (Wilson 95% intervals)."""
    from medfocus.evaluation import format_proportion as _pct

    lines = ["Cue reliance, known by construction: of the cued positives a model answers \"Yes\", the share whose answer "
             "flips to \"No\" when only the cues are removed (cue-necessary).", "",
             "| model | cued positives | answered Yes | cue-necessary share |", "|---|---:|---:|---|"]
    for r in results:
        k, n = r.cue_necessary_share
        lines.append(f"| {r.model} | {len(r.outcomes)} | {n} | {_pct(k, n)} |")
    lines += ["", "The causal filter (oracle editor, direct mode): the share it keeps of the cue-necessary and cue-independent "
              "answers above, and of the correct positives on the same films without cues.", "",
              "| model | cue-necessary kept | cue-independent kept | cue-free films: correct positives kept |",
              "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.model} | {_pct(*r.retention['cue_necessary'])} | {_pct(*r.retention['cue_independent'])} | "
                     f"{_pct(*r.clean)} |")
    return "\n".join(lines) + "\n"
