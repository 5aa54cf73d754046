"""Drawing masks, points and boxes over a photo, in NumPy (for the command line).

What the official notebooks draw with matplotlib (``show_mask``,
``show_points``, ``show_box``, ``show_anns``), drawn here into the pixels of
an [H, W, 3] uint8 RGB image so that it can be saved as a PNG.

Coordinates are the ones SAM takes: x, y in pixels of the original photo,
pixel (column x, row y) covering [x, x+1) x [y, y+1).

Dimension letters: H, W image height and width, M masks, N points.
"""

from __future__ import annotations

import colorsys
from typing import Optional, Sequence, Tuple

import numpy as np

Color = Tuple[int, int, int]

# NOTE(reference): the notebooks' show_mask colour, [30/255, 144/255, 255/255] at alpha 0.6.
MASK_COLOR: Color = (30, 144, 255)
MASK_ALPHA = 0.6
# NOTE(reference): show_points draws label 1 in matplotlib's "green" and label 0
# in "red", with a white edge; show_box draws a "green" rectangle, lw=2.
POSITIVE_COLOR: Color = (0, 128, 0)
NEGATIVE_COLOR: Color = (255, 0, 0)
BOX_COLOR: Color = (0, 128, 0)
OUTLINE_COLOR: Color = (255, 255, 255)
# NOTE(reference): show_anns draws every mask at alpha 0.35.
ANNS_ALPHA = 0.35


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected [H, W, 3] uint8, got {image.dtype} of shape {image.shape}")
    return image


def marker_size(image_shape: Sequence[int]) -> Tuple[int, int]:
    """(disc radius, line thickness) in pixels, growing with the photo."""
    longest = max(image_shape[0], image_shape[1])
    return max(4, round(longest / 150)), max(2, round(longest / 600))


def tint(image: np.ndarray, mask: np.ndarray, color: Color = MASK_COLOR, alpha: float = MASK_ALPHA) -> np.ndarray:
    """A copy of ``image`` with ``color`` blended in at ``alpha`` where ``mask``
    is True: [H, W, 3] uint8, [H, W] bool -> [H, W, 3] uint8."""
    image = _check_image(image)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask: expected shape {image.shape[:2]} (the image's), got {mask.shape}")
    out = image.copy()
    pixels = image[mask].astype(np.float32)  # [H, W, 3] -> [P, 3], P = pixels in the mask
    blended = pixels * (1 - alpha) + np.asarray(color, np.float32) * alpha  # [P, 3]
    out[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def overlay_masks(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = ANNS_ALPHA) -> np.ndarray:
    """Every mask tinted in its own colour, largest first so that small masks
    stay visible on top (as the notebooks' show_anns sorts by area).

    Colours are hues spaced by the golden ratio, so neighbours in the list
    differ and a run is reproducible (the notebooks pick random colours).
    """
    out = _check_image(image).copy()
    order = sorted(range(len(masks)), key=lambda i: -int(np.count_nonzero(masks[i])))
    for i, color in zip(order, mask_colors(len(order))):
        out = tint(out, masks[i], color, alpha)
    return out


def mask_colors(n: int) -> list:
    """The colours overlay_masks gives its n masks, in drawing order (largest
    mask first): hues spaced by the golden ratio, saturation 0.85."""
    return [tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb((rank * 0.618033988749895) % 1.0, 0.85, 1.0))
            for rank in range(n)]


def _disc(image: np.ndarray, x: float, y: float, radius: float, color: Color) -> None:
    """Paint the pixels within ``radius`` of (x, y) in place."""
    h, w = image.shape[:2]
    r = int(np.ceil(radius))
    x0, x1 = max(int(np.floor(x)) - r, 0), min(int(np.ceil(x)) + r + 1, w)
    y0, y1 = max(int(np.floor(y)) - r, 0), min(int(np.ceil(y)) + r + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    cols = np.arange(x0, x1) - x  # [w']
    rows = np.arange(y0, y1) - y  # [h']
    inside = rows[:, None] ** 2 + cols[None, :] ** 2 <= radius ** 2  # [h', w']
    image[y0:y1, x0:x1][inside] = color


def draw_points(image: np.ndarray, coords: np.ndarray, labels: np.ndarray,
                radius: Optional[int] = None) -> np.ndarray:
    """A copy of ``image`` with each point drawn as a disc with a white outline:
    green for label 1, red for label 0. Points labelled -1 ("not a point")
    are not drawn, as in the notebooks' show_points."""
    out = _check_image(image).copy()
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)  # [N, 2] (x, y)
    labels = np.asarray(labels).reshape(-1)  # [N]
    if labels.shape[0] != coords.shape[0]:
        raise ValueError(f"labels: expected {coords.shape[0]} labels (one per point), got {labels.shape[0]}")
    radius = marker_size(out.shape)[0] if radius is None else radius
    outline = max(1, radius // 4)
    for (x, y), label in zip(coords, labels):
        if label not in (0, 1):
            continue
        _disc(out, x, y, radius + outline, OUTLINE_COLOR)
        _disc(out, x, y, radius, POSITIVE_COLOR if label == 1 else NEGATIVE_COLOR)
    return out


def draw_box(image: np.ndarray, box: Sequence[float], color: Color = BOX_COLOR,
             thickness: Optional[int] = None) -> np.ndarray:
    """A copy of ``image`` with the rectangle (x0, y0, x1, y1) drawn, lines
    ``thickness`` pixels wide, centred on the box's edges."""
    out = _check_image(image).copy()
    h, w = out.shape[:2]
    thickness = marker_size(out.shape)[1] if thickness is None else thickness
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    lo, hi = thickness // 2, thickness - thickness // 2

    def fill(ya: int, yb: int, xa: int, xb: int) -> None:
        ya, yb, xa, xb = max(ya, 0), min(yb, h), max(xa, 0), min(xb, w)
        if ya < yb and xa < xb:
            out[ya:yb, xa:xb] = color

    fill(y0 - lo, y0 + hi, x0 - lo, x1 + hi)  # top
    fill(y1 - lo, y1 + hi, x0 - lo, x1 + hi)  # bottom
    fill(y0 - lo, y1 + hi, x0 - lo, x0 + hi)  # left
    fill(y0 - lo, y1 + hi, x1 - lo, x1 + hi)  # right
    return out


def prompt_overlay(image: np.ndarray, mask: Optional[np.ndarray], coords: Optional[np.ndarray] = None,
                   labels: Optional[np.ndarray] = None, box: Optional[Sequence[float]] = None) -> np.ndarray:
    """The ``segment`` picture: the mask tinted over the photo, then the box,
    then the points (as the notebooks draw show_mask, show_box, show_points)."""
    out = _check_image(image)
    if mask is not None:
        out = tint(out, mask)
    if box is not None:
        out = draw_box(out, box)
    if coords is not None and len(coords):
        out = draw_points(out, coords, labels)
    return out
