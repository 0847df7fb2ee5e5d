"""Small fake adapter / methods / samples for the runner tests (no real model needed).

Also used by the subprocess of the kill-and-resume test, hence a module of its own. It holds no tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfocus.types import Sample, question_stem


@dataclass
class FakeAttribution:
    heatmap: np.ndarray | None
    boxes: list | None = None
    token_heatmaps: np.ndarray | None = None
    n_forward: int = 1
    n_backward: int = 0
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)


class FakeAdapter:
    def __init__(self, name: str) -> None:
        self.name = name
        self.family = "fake"


class HotBoxMethod:
    """Heat exactly on the first GT box (parsed from the question's sample registry)."""

    def __init__(self, boxes_by_image: dict[int, list], delay: float = 0.0) -> None:
        self.boxes_by_image = boxes_by_image
        self.delay = delay

    def attribute(self, adapter: Any, image: np.ndarray, question: str, answer: str) -> FakeAttribution:
        if self.delay:
            time.sleep(self.delay)
        key = int(image[0, 0])  # the fake images carry their sample index in pixel (0, 0)
        h = np.zeros(image.shape, np.float32)
        x1, y1, x2, y2 = (int(v) for v in self.boxes_by_image[key][0])
        h[y1:y2, x1:x2] = 1.0
        return FakeAttribution(h, token_heatmaps=np.stack([h, h * 0.5]), extras={"ranking": {"a": 1.0}, "big": np.ones((40, 40))})


class RandomMethod:
    """Heatmap from the global numpy RNG: shows whether per-key seeding makes results order-independent."""

    def attribute(self, adapter: Any, image: np.ndarray, question: str, answer: str) -> FakeAttribution:
        return FakeAttribution(np.random.rand(*image.shape).astype(np.float32), extras={"draw": float(np.random.rand())})


class BoomMethod:
    """Raises on the sample whose index is 3."""

    def attribute(self, adapter: Any, image: np.ndarray, question: str, answer: str) -> FakeAttribution:
        if int(image[0, 0]) == 3:
            raise ValueError("synthetic failure on sample 3")
        return FakeAttribution(None, boxes=[(0, 0, 4, 4)])


def make_samples(root: Path, n: int, size: int = 32, dataset: str = "synthetic") -> tuple[list[Sample], dict[int, list]]:
    root.mkdir(parents=True, exist_ok=True)
    samples, boxes = [], {}
    for i in range(n):
        img = np.full((size, size), 10, np.uint8)
        img[0, 0] = i
        path = root / f"img{i}.npy"
        np.save(path, img)
        b = [(2 + i % 5, 3, 12 + i % 5, 15)]
        boxes[i] = b
        samples.append(Sample(dataset, i, str(path), "nodule", question_stem("nodule"), "Yes", b, (size, size)))
    return samples, boxes


def read_npy(path: str) -> np.ndarray:
    return np.load(path)


def simple_boxes(heat: np.ndarray) -> list:
    ys, xs = np.nonzero(heat >= heat.max() * 0.99) if heat.max() > 0 else ([], [])
    if len(xs) == 0:
        return []
    return [[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]]


def make_factory(boxes: dict[int, list], delay: float = 0.0):
    def factory(name: str, params: Any) -> Any:
        if name == "hot":
            return HotBoxMethod(boxes, delay=delay)
        if name == "random":
            return RandomMethod()
        if name == "boom":
            return BoomMethod()
        raise KeyError(f"unknown fake method {name}")

    return factory
