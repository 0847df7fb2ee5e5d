"""Letterbox geometry: resize the longer side to fit, pad (centred) to a fixed canvas.

The mapping is exact on pixel *edges*: the original image's edge ``x = 0`` maps to ``pad_x`` and its
edge ``x = W`` maps to ``pad_x + new_w``. Points and boxes map forward and back without loss
(up to floating-point rounding), which is what lets every heatmap return to original pixels.

Working resolution (:class:`WorkFrame`): attribution methods build their image-sized arrays (heatmaps,
MedFocus' concept masks, box indicators) on the original image scaled so that its longer side is at most
:func:`work_side` pixels (default :data:`DEFAULT_WORK_SIDE` = 2048, ``$MEDFOCUS_WORK_SIDE`` overrides it,
``0`` = no cap); the result is upsampled once to the original size. An image within the cap *is* its own
work frame (nothing changes), so only films above it pay one resampling, and their memory no longer
grows with the film's size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from medfocus.errors import ConfigError
from medfocus.types import Box

#: Default cap of the working resolution (longer side, pixels). The model input is always letterboxed from
#: the original image (the cap changes no model input); the cap lies well above the model canvases in use
#: (336-896 px) and the concept-transfer canvas (224 px), so the maps keep every detail the model resolves.
DEFAULT_WORK_SIDE = 2048


@dataclass(frozen=True)
class Letterbox:
    """Geometry of letterboxing an ``orig_w x orig_h`` image onto an ``out_w x out_h`` canvas.

    Build it with :meth:`fit`. ``scale_x``/``scale_y`` differ from each other only by the rounding of
    the resized size to whole pixels.
    """

    orig_w: int
    orig_h: int
    out_w: int
    out_h: int
    new_w: int
    new_h: int
    pad_x: int
    pad_y: int

    @classmethod
    def fit(cls, orig_size: tuple[int, int], out_size: int | tuple[int, int]) -> "Letterbox":
        """Geometry for ``orig_size = (W, H)`` onto a canvas of ``S x S`` (int) or ``(out_w, out_h)``."""
        W, H = int(orig_size[0]), int(orig_size[1])
        if W <= 0 or H <= 0:
            raise ValueError(f"image size must be positive, got {orig_size}")
        ow, oh = (out_size, out_size) if isinstance(out_size, int) else (int(out_size[0]), int(out_size[1]))
        scale = min(ow / W, oh / H)
        new_w = max(1, min(ow, int(round(W * scale))))
        new_h = max(1, min(oh, int(round(H * scale))))
        return cls(W, H, ow, oh, new_w, new_h, (ow - new_w) // 2, (oh - new_h) // 2)

    @property
    def scale_x(self) -> float:
        return self.new_w / self.orig_w

    @property
    def scale_y(self) -> float:
        return self.new_h / self.orig_h

    # ---- points and boxes -------------------------------------------------------------------
    def forward_points(self, xy: np.ndarray) -> np.ndarray:
        """Map ``(N, 2)`` points (x, y) from original to letterboxed pixels."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return np.stack([xy[:, 0] * self.scale_x + self.pad_x, xy[:, 1] * self.scale_y + self.pad_y], axis=1)

    def inverse_points(self, xy: np.ndarray) -> np.ndarray:
        """Map ``(N, 2)`` points (x, y) from letterboxed back to original pixels."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return np.stack([(xy[:, 0] - self.pad_x) / self.scale_x, (xy[:, 1] - self.pad_y) / self.scale_y], axis=1)

    def forward_box(self, box: Box) -> Box:
        """Original-pixel box -> letterboxed-pixel box (half-open edges)."""
        p = self.forward_points(np.array([[box[0], box[1]], [box[2], box[3]]]))
        return (float(p[0, 0]), float(p[0, 1]), float(p[1, 0]), float(p[1, 1]))

    def inverse_box(self, box: Box, clip: bool = True) -> Box:
        """Letterboxed-pixel box -> original-pixel box; ``clip`` keeps it inside the image."""
        p = self.inverse_points(np.array([[box[0], box[1]], [box[2], box[3]]]))
        x1, y1, x2, y2 = float(p[0, 0]), float(p[0, 1]), float(p[1, 0]), float(p[1, 1])
        if clip:
            x1, x2 = (min(max(v, 0.0), float(self.orig_w)) for v in (x1, x2))
            y1, y2 = (min(max(v, 0.0), float(self.orig_h)) for v in (y1, y2))
        return (x1, y1, x2, y2)

    # ---- images and maps ----------------------------------------------------------------------
    def apply(self, image: np.ndarray, fill: float = 0) -> np.ndarray:
        """Letterbox an ``(H, W)`` or ``(H, W, C)`` uint8/float image; padding is ``fill``."""
        img = np.asarray(image)
        if img.shape[0] != self.orig_h or img.shape[1] != self.orig_w:
            raise ValueError(f"image shape {img.shape[:2]} does not match letterbox source {(self.orig_h, self.orig_w)}")
        resized = _resize(img, self.new_w, self.new_h)
        out = np.full((self.out_h, self.out_w) + img.shape[2:], fill, dtype=resized.dtype)
        out[self.pad_y : self.pad_y + self.new_h, self.pad_x : self.pad_x + self.new_w] = resized
        return out

    def content_slice(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices of the canvas occupied by the image (not padding)."""
        return slice(self.pad_y, self.pad_y + self.new_h), slice(self.pad_x, self.pad_x + self.new_w)

    def map_to_original(self, heatmap: np.ndarray) -> np.ndarray:
        """Bring a heatmap defined on the canvas (any resolution with the canvas' aspect ratio,
        e.g. a token grid) back to an ``(orig_h, orig_w)`` float32 map: upsample to canvas pixels
        (nearest for coarse grids keeps cell edges exact), crop the padding, resize to the original."""
        hm = np.asarray(heatmap, dtype=np.float32)
        if hm.shape != (self.out_h, self.out_w):
            hm = _resize_nearest_canvas(hm, self.out_w, self.out_h)
        rs, cs = self.content_slice()
        crop = hm[rs, cs]
        return _resize(crop, self.orig_w, self.orig_h).astype(np.float32)

    def map_to_canvas(self, heatmap: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`map_to_original` for ``(orig_h, orig_w)`` maps (padding = 0)."""
        return self.apply(np.asarray(heatmap, dtype=np.float32), fill=0.0)


def content_extent(film_size: tuple[int, int], canvas_size: tuple[int, int]) -> tuple[float, float]:
    """Exact ``(width, height)`` in canvas pixels (before rounding) of a ``film_size = (W, H)`` film
    letterboxed onto a ``canvas_size = (canvas_w, canvas_h)`` canvas (the scale :meth:`Letterbox.fit` uses)."""
    W, H = int(film_size[0]), int(film_size[1])
    scale = min(canvas_size[0] / W, canvas_size[1] / H)
    return W * scale, H * scale


def content_below_one_token(film_size: tuple[int, int], canvas_size: tuple[int, int],
                            token_grid: tuple[int, int]) -> list[str]:
    """Which of ``"width"`` / ``"height"`` of a film's letterboxed content (:func:`content_extent`) is less
    than one image token cell (``canvas / token_grid``, ``token_grid = (gh, gw)``): a film the model cannot
    see in that direction (:func:`check_film_content` refuses it). Empty when it covers at least one token."""
    cw, ch = content_extent(film_size, canvas_size)
    cell_w, cell_h = canvas_size[0] / token_grid[1], canvas_size[1] / token_grid[0]
    return [name for name, content, cell in (("width", cw, cell_w), ("height", ch, cell_h)) if content < cell]


def check_film_content(image: np.ndarray, where: str, canvas_size: tuple[int, int] | None,
                       token_grid: tuple[int, int] | None) -> None:
    """Refuse a film the model cannot see, warn about one without content -- before the model runs.

    The model sees the film letterboxed onto its ``canvas_size = (canvas_w, canvas_h)`` canvas, cut into a
    ``token_grid = (gh, gw)`` grid of image tokens (one token cell = ``canvas_w / gw x canvas_h / gh`` px).
    ``None`` for either (a stand-in model that declares no canvas) checks only for a constant film.

    Raises:
        DataError: naming ``where`` (the file) and the film's size, when its content on the canvas is smaller
            than one token cell in width or height (e.g. a 7744 x 10 strip: 0.3 canvas px high, under one token
            row), or when the film has fewer pixels than the tokens its content spans in a direction (e.g. a
            1 x 1 px film upsampled over 8 x 8 tokens: every token sees the same interpolated pixel).
    Warns:
        DataWarning: naming ``where``, when every pixel has the same value (an all-black film): the answer
            and every attribution map on it say nothing about anatomy.
    """
    import warnings

    from medfocus.errors import DataError, DataWarning

    img = np.asarray(image)
    H, W = int(img.shape[0]), int(img.shape[1])
    size = f"{where}: film is {W} x {H} px"
    if img.size and img.min() == img.max():
        warnings.warn(f"{size} and every pixel has the value {img.flat[0]}: it holds no image, so the model's answer "
                      "and every attribution map on it say nothing about anatomy", DataWarning, stacklevel=2)
    if canvas_size is None or token_grid is None:
        return
    ow, oh = int(canvas_size[0]), int(canvas_size[1])
    gh, gw = int(token_grid[0]), int(token_grid[1])
    cell_w, cell_h = ow / gw, oh / gh
    cw, ch = content_extent((W, H), (ow, oh))
    below = content_below_one_token((W, H), (ow, oh), (gh, gw))
    if below:
        raise DataError(f"{size}; letterboxed onto the model's {ow} x {oh} canvas its content is {cw:.1f} x {ch:.1f} "
                        f"px, its {below[0]} less than one image token ({cell_w:g} x {cell_h:g} px): the model cannot see "
                        "the film, so no answer or map on it would mean anything")
    tok_w, tok_h = cw / cell_w, ch / cell_h
    if W < tok_w or H < tok_h:
        raise DataError(f"{size}, fewer pixels than the {tok_w:.0f} x {tok_h:.0f} image tokens its content spans on the "
                        f"model's {ow} x {oh} canvas: every token would see interpolated copies of a few pixels, so no "
                        "answer or map on it would mean anything")


def model_canvas(adapter: object) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """``(canvas_size, token_grid)`` of an :class:`~medfocus.lvlm.adapter.LVLMAdapter` for
    :func:`check_film_content`; ``(None, None)`` for a stand-in that declares no canvas (then only a constant
    film is caught)."""
    canvas = getattr(adapter, "canvas_size", None)
    grid = getattr(adapter, "token_grid", None)
    if canvas is None or not callable(grid):
        return None, None
    return canvas, grid()


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Bilinear (area-aware for downsampling) resize keeping dtype; works for 2-D and 3-D arrays."""
    if img.shape[1] == w and img.shape[0] == h:
        return img.copy()
    if img.dtype == np.uint8:
        pil = Image.fromarray(img)
        return np.asarray(pil.resize((w, h), Image.BILINEAR, reducing_gap=None))
    arr = img.astype(np.float32)
    if arr.ndim == 2:
        return np.asarray(Image.fromarray(arr, mode="F").resize((w, h), Image.BILINEAR))
    return np.stack([np.asarray(Image.fromarray(arr[..., c], mode="F").resize((w, h), Image.BILINEAR)) for c in range(arr.shape[2])], axis=-1)


def _resize_nearest_canvas(hm: np.ndarray, w: int, h: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a coarse grid to ``(h, w)`` with exact cell edges."""
    gh, gw = hm.shape
    rows = np.minimum((np.arange(h) + 0.5) * gh / h, gh - 1e-9).astype(np.int64)
    cols = np.minimum((np.arange(w) + 0.5) * gw / w, gw - 1e-9).astype(np.int64)
    return hm[rows][:, cols]


# ---- working resolution ---------------------------------------------------------------------------------
def work_side() -> int | None:
    """The working-resolution cap in force (longer side, pixels): ``$MEDFOCUS_WORK_SIDE`` (an integer;
    ``0`` = no cap) or :data:`DEFAULT_WORK_SIDE`.

    Raises:
        ConfigError: the variable is not an integer >= 0.
    """
    from medfocus.io.env import env_pixels

    return env_pixels("MEDFOCUS_WORK_SIDE", DEFAULT_WORK_SIDE, ConfigError, "no cap")


@dataclass(frozen=True)
class WorkFrame:
    """The frame in which a method builds image-sized arrays for an ``orig_w x orig_h`` image: the image
    scaled (each axis on its own, to whole pixels) so that its longer side is at most the cap.

    A point ``(x, y)`` of the work frame is ``(x * sx, y * sy)`` in the original (pixel *edges* map to
    edges, as in :class:`Letterbox`), so boxes convert exactly; maps are upsampled once, bilinearly.
    Build with :meth:`of`.
    """

    orig_w: int
    orig_h: int
    work_w: int
    work_h: int

    @classmethod
    def of(cls, orig_size: tuple[int, int], side: int | None | str = "env") -> "WorkFrame":
        """The work frame of an image of ``orig_size = (W, H)`` under the cap ``side`` (default: :func:`work_side`;
        ``None``: no cap)."""
        W, H = int(orig_size[0]), int(orig_size[1])
        if W <= 0 or H <= 0:
            raise ValueError(f"image size must be positive, got {orig_size}")
        cap = work_side() if side == "env" else side
        if cap is None or max(W, H) <= int(cap):
            return cls(W, H, W, H)
        s = int(cap) / max(W, H)
        return cls(W, H, max(1, min(int(cap), int(round(W * s)))), max(1, min(int(cap), int(round(H * s)))))

    @property
    def identity(self) -> bool:
        """Whether the work frame is the original frame (the image is within the cap)."""
        return self.work_w == self.orig_w and self.work_h == self.orig_h

    @property
    def sx(self) -> float:
        """Original pixels per work pixel along x."""
        return self.orig_w / self.work_w

    @property
    def sy(self) -> float:
        """Original pixels per work pixel along y."""
        return self.orig_h / self.work_h

    def downsample(self, image: np.ndarray) -> np.ndarray:
        """The ``(orig_h, orig_w)`` image resampled to ``(work_h, work_w)`` (area-aware bilinear, dtype kept)."""
        img = np.asarray(image)
        if img.shape[:2] != (self.orig_h, self.orig_w):
            raise ValueError(f"image shape {img.shape[:2]} does not match the work frame's source {(self.orig_h, self.orig_w)}")
        return _resize(img, self.work_w, self.work_h)

    def upsample(self, heatmap: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """A ``(work_h, work_w)`` map -> ``(orig_h, orig_w)`` float32 (bilinear, pixel centres at half
        integers as :meth:`Letterbox.map_to_original`), allocating only the result (or writing ``out``)."""
        import cv2

        hm = np.ascontiguousarray(heatmap, dtype=np.float32)
        if hm.shape != (self.work_h, self.work_w):
            raise ValueError(f"map shape {hm.shape} does not match the work frame {(self.work_h, self.work_w)}")
        if self.identity:
            if out is not None:
                out[...] = hm
                return out
            return hm.copy()
        if out is not None:
            return cv2.resize(hm, (self.orig_w, self.orig_h), dst=out, interpolation=cv2.INTER_LINEAR)
        return cv2.resize(hm, (self.orig_w, self.orig_h), interpolation=cv2.INTER_LINEAR)

    def box_to_original(self, box: Box) -> Box:
        """A work-frame box -> the same box in original pixels (half-open edges scale exactly)."""
        x1, y1, x2, y2 = (float(v) for v in box)
        return (x1 * self.sx, y1 * self.sy, x2 * self.sx, y2 * self.sy)

    def geometry(self, geo: Letterbox) -> Letterbox:
        """The letterbox ``geo`` of the *original* image (the model's input) re-expressed for work-frame
        pixels: the same canvas placement (``new_w``, ``pad_x``, ...; the model input is unchanged), with the
        work size as its source. Points, boxes and maps of the work frame then map to and from the canvas
        exactly as the corresponding original pixels do."""
        if (geo.orig_w, geo.orig_h) != (self.orig_w, self.orig_h):
            raise ValueError(f"letterbox source {(geo.orig_w, geo.orig_h)} is not this work frame's image {(self.orig_w, self.orig_h)}")
        return replace(geo, orig_w=self.work_w, orig_h=self.work_h)
