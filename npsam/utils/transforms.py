"""Mirror of segment_anything/utils/transforms.py: ResizeLongestSide.

Resizes an image so that its longest side is ``target_length`` (1024 for
SAM), and maps point coordinates and boxes from the original image into the
resized one. Only the NumPy methods are mirrored; the ``_torch`` variants are
not needed here.

Dimension letters:
  H, W original image height and width, h, w resized height and width,
  C channels, N points, B boxes; ``...`` any leading dimensions.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .. import fast
from ..kernels.resize import check_size, pil_resize_bilinear


class ResizeLongestSide:
    """Mirror of segment_anything/utils/transforms.py: ResizeLongestSide.

    Resizes images to longest side ``target_length``, and provides the
    matching transform of coordinates and boxes.
    """

    def __init__(self, target_length: int) -> None:
        if int(target_length) != target_length or target_length < 1:
            raise ValueError(f"target_length must be a positive integer, got {target_length!r}")
        self.target_length = int(target_length)

    @fast.dispatch
    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """Expects an [H, W, C] uint8 image (C = 1 or 3); returns [h, w, C] uint8."""
        image = np.asarray(image)
        if image.ndim != 3:
            raise ValueError(f"image must be [H, W, C] uint8, got shape {image.shape}")
        target_size = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        # NOTE(reference): the official code resizes through PIL,
        # resize(to_pil_image(image), target_size), i.e. Pillow's BILINEAR
        # (antialiased when shrinking), which pil_resize_bilinear reproduces.
        return pil_resize_bilinear(image, target_size)  # [H, W, C] -> [h, w, C]

    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """Expects an array of length 2 in the final dimension (x, y), and the
        original image size as (H, W). Returns float64, as official."""
        coords = np.asarray(coords)
        if coords.ndim < 1 or coords.shape[-1] != 2:
            raise ValueError(f"coords must be [..., 2] (x, y), got shape {coords.shape}")
        old_h, old_w = check_size(original_size, "original_size")
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        # NOTE(reference): deepcopy(coords).astype(float): always a float64
        # copy, whatever the input dtype.
        coords = coords.astype(np.float64)  # [..., 2]
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """Expects an array of boxes [..., 4] (x0, y0, x1, y1) and the original
        image size as (H, W). Returns [B, 4] float64, as official."""
        boxes = np.asarray(boxes)
        if boxes.ndim < 1 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be [..., 4] (x0, y0, x1, y1), got shape {boxes.shape}")
        boxes = self.apply_coords(boxes.reshape(-1, 2, 2), original_size)  # [..., 4] -> [B, 2, 2]
        return boxes.reshape(-1, 4)  # [B, 2, 2] -> [B, 4]

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        """Compute the output size (newh, neww) given the input size and the
        target long side length."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        newh, neww = oldh * scale, oldw * scale
        # NOTE(reference): rounds with int(x + 0.5), in double precision.
        neww = int(neww + 0.5)
        newh = int(newh + 0.5)
        return (newh, neww)
