"""Mirror of segment_anything/utils/amg.py, on NumPy arrays.

Every function has the official name and semantics: ``mask_to_rle`` (alias
``mask_to_rle_pytorch``) works on arrays where the official takes tensors,
and ``remove_small_regions`` calls npsam's stand-in for OpenCV's labelling
(``npsam.kernels.connected_components``). The torchvision box ops the
generator calls are in ``npsam.kernels.nms``.

Dimension letters:
  B  masks in a batch        H, W  mask height and width
  N  boxes, points or runs   C  masks per point (the official channel dim)
  L  crop layers
"""

from __future__ import annotations

import math
from copy import deepcopy
from itertools import product
from typing import Any, Dict, Generator, ItemsView, List, Tuple

import numpy as np

from .. import fast

class MaskData:
    """Mirror of utils/amg.py: MaskData (masks and their data, batched).

    Values are NumPy arrays or lists; ``filter`` takes a boolean mask or an
    index array, ``cat`` concatenates along the first axis.
    """

    def __init__(self, **kwargs) -> None:
        for k, v in kwargs.items():
            _check_stat(k, v)
        self._stats = dict(**kwargs)

    def __setitem__(self, key: str, item: Any) -> None:
        _check_stat(key, item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: np.ndarray) -> None:
        keep = np.asarray(keep)
        if keep.dtype != bool and not np.issubdtype(keep.dtype, np.integer):
            raise ValueError(f"keep: expected a boolean mask or integer indices, got dtype {keep.dtype}")
        for k, v in self._stats.items():
            if v is None:
                self._stats[k] = None
            elif isinstance(v, np.ndarray):
                self._stats[k] = v[keep]
            elif isinstance(v, list) and keep.dtype == bool:
                self._stats[k] = [a for i, a in enumerate(v) if keep[i]]
            else:  # list, integer indices
                self._stats[k] = [v[i] for i in keep]

    @fast.dispatch  # the fast twin copies RLE records without deepcopy's walk over every count
    def cat(self, new_stats: "MaskData") -> None:
        self._cat(new_stats, deepcopy)

    def _cat(self, new_stats: "MaskData", copy) -> None:
        """The official cat, with the official deepcopy given as ``copy``."""
        for k, v in new_stats.items():
            if k not in self._stats or self._stats[k] is None:
                self._stats[k] = copy(v)
            elif isinstance(v, np.ndarray):
                self._stats[k] = _cat_like_torch(self._stats[k], v)
            else:  # list
                self._stats[k] = self._stats[k] + copy(v)

    def to_numpy(self) -> None:
        """NOTE(reference): moves torch tensors to NumPy; every value here is one already."""


def _cat_like_torch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """torch.cat([a, b]) on arrays (where the official MaskData holds tensors).

    NOTE(reference): torch.cat promotes float32 with int64 to float32 (NumPy
    would give float64) and skips 1-D empty tensors when matching shapes; the
    generator relies on both (a batch with no masks has float32 boxes [0, 4];
    a crop with no masks has crop_boxes ``torch.tensor([])``, float32 [0]).
    """
    floats = [x.dtype for x in (a, b) if np.issubdtype(x.dtype, np.floating)]
    dtype = np.result_type(*floats) if floats else np.result_type(a, b)
    parts = [x for x in (a, b) if not (x.ndim == 1 and x.size == 0)]
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts, axis=0).astype(dtype, copy=False)


def _check_stat(key: str, value: Any) -> None:
    if not isinstance(value, (list, np.ndarray)):
        raise ValueError(f"MaskData[{key!r}]: expected a list or np.ndarray, got {type(value).__name__}")


def is_box_near_crop_edge(
    boxes: np.ndarray, crop_box: List[int], orig_box: List[int], atol: float = 20.0
) -> np.ndarray:
    """Mirror of utils/amg.py: is_box_near_crop_edge. [N, 4] -> [N] bool.

    Filter masks at the edge of a crop, but not at the edge of the original image.
    """
    crop_box_f = np.asarray(crop_box, dtype=np.float32)
    orig_box_f = np.asarray(orig_box, dtype=np.float32)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).astype(np.float32)
    # NOTE(reference): torch.isclose(rtol=0) in float32: |a - b| <= float32(atol) (or a == b).
    near_crop_edge = _isclose_f32(boxes, crop_box_f[None, :], atol)  # [N, 4]
    near_image_edge = _isclose_f32(boxes, orig_box_f[None, :], atol)  # [N, 4]
    near_crop_edge = np.logical_and(near_crop_edge, ~near_image_edge)
    return np.any(near_crop_edge, axis=1)  # [N, 4] -> [N]


def _isclose_f32(a: np.ndarray, b: np.ndarray, atol: float) -> np.ndarray:
    return (a == b) | (np.abs(a - b) <= np.float32(atol))


def box_xyxy_to_xywh(box_xyxy: np.ndarray) -> np.ndarray:
    """Mirror of utils/amg.py: box_xyxy_to_xywh, for one box [4].

    NOTE(reference): indexes [2] and [3] on the first axis, so it is meant for a
    single box (on an [N, 4] array it would change rows 2 and 3).
    """
    box_xywh = deepcopy(box_xyxy)
    box_xywh[2] = box_xywh[2] - box_xywh[0]
    box_xywh[3] = box_xywh[3] - box_xywh[1]
    return box_xywh


def batch_iterator(batch_size: int, *args) -> Generator[List[Any], None, None]:
    """Mirror of utils/amg.py: batch_iterator."""
    if not (len(args) > 0 and all(len(a) == len(args[0]) for a in args)):
        raise ValueError(
            f"args: batched iteration needs inputs of one length, got lengths {[len(a) for a in args]}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
    n_batches = len(args[0]) // batch_size + int(len(args[0]) % batch_size != 0)
    for b in range(n_batches):
        yield [arg[b * batch_size : (b + 1) * batch_size] for arg in args]


def mask_to_rle(tensor: np.ndarray) -> List[Dict[str, Any]]:
    """Mirror of utils/amg.py: mask_to_rle_pytorch. [B, H, W] bool -> B uncompressed RLEs.

    Counts are in Fortran (column-major) order and start with the number of zeros.
    """
    if tensor.ndim != 3:
        raise ValueError(f"tensor: expected masks [B, H, W], got shape {tensor.shape}")
    # Put in fortran order and flatten h,w
    b, h, w = tensor.shape
    tensor = tensor.transpose(0, 2, 1).reshape(b, h * w)  # [B, H, W] -> [B, W*H]

    # Compute change indices
    diff = tensor[:, 1:] ^ tensor[:, :-1]  # [B, W*H-1]
    rows, cols = np.nonzero(diff)  # row-major, so grouped by mask
    per_mask = np.split(cols, np.cumsum(np.bincount(rows, minlength=b))[:-1])  # B x [changes]

    # Encode run length
    out = []
    for i in range(b):
        cur_idxs = np.concatenate([[0], per_mask[i] + 1, [h * w]])
        btw_idxs = cur_idxs[1:] - cur_idxs[:-1]
        counts = [] if tensor[i, 0] == 0 else [0]
        counts.extend(btw_idxs.tolist())
        out.append({"size": [h, w], "counts": counts})
    return out


mask_to_rle_pytorch = mask_to_rle  # the official name


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """Mirror of utils/amg.py: rle_to_mask. Uncompressed RLE -> [H, W] bool."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"rle: counts sum to {int(counts.sum())}, expected size {h}*{w} = {h * w}")
    # Runs alternate False, True, False, ... (vectorised form of the official loop).
    parity = np.arange(len(counts)) % 2 == 1  # [runs]
    mask = np.repeat(parity, counts)  # [runs] -> [W*H]
    mask = mask.reshape(w, h)
    return mask.transpose()  # Put in C order: [W, H] -> [H, W]


def area_from_rle(rle: Dict[str, Any]) -> int:
    """Mirror of utils/amg.py: area_from_rle."""
    return sum(rle["counts"][1::2])


def calculate_stability_score(
    masks: np.ndarray, mask_threshold: float, threshold_offset: float
) -> np.ndarray:
    """Mirror of utils/amg.py: calculate_stability_score. [..., H, W] logits -> [...] float32.

    The IoU between the masks thresholded at high and low values.
    """
    high = np.asarray(mask_threshold + threshold_offset, dtype=masks.dtype)
    low = np.asarray(mask_threshold - threshold_offset, dtype=masks.dtype)
    # One mask is always contained inside the other.
    # NOTE(reference): counted in int16 per row, then int32 per mask (the official
    # "save memory" casts), and int32 / int32 is true division in torch's default float32.
    intersections = (masks > high).sum(-1, dtype=np.int16).sum(-1, dtype=np.int32)  # [..., H, W] -> [...]
    unions = (masks > low).sum(-1, dtype=np.int16).sum(-1, dtype=np.int32)  # [..., H, W] -> [...]
    with np.errstate(invalid="ignore", divide="ignore"):
        return intersections.astype(np.float32) / unions.astype(np.float32)


def build_point_grid(n_per_side: int) -> np.ndarray:
    """Mirror of utils/amg.py: build_point_grid. -> [n_per_side**2, 2] in [0,1]x[0,1]."""
    if n_per_side < 1:
        raise ValueError(f"n_per_side: expected a positive number of points per side, got {n_per_side}")
    offset = 1 / (2 * n_per_side)
    points_one_side = np.linspace(offset, 1 - offset, n_per_side)
    points_x = np.tile(points_one_side[None, :], (n_per_side, 1))  # [n, n]
    points_y = np.tile(points_one_side[:, None], (1, n_per_side))  # [n, n]
    points = np.stack([points_x, points_y], axis=-1).reshape(-1, 2)  # [n, n, 2] -> [n*n, 2]
    return points


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """Mirror of utils/amg.py: build_all_layer_point_grids. -> L+1 grids."""
    points_by_layer = []
    for i in range(n_layers + 1):
        n_points = int(n_per_side / (scale_per_layer**i))
        points_by_layer.append(build_point_grid(n_points))
    return points_by_layer


def generate_crop_boxes(
    im_size: Tuple[int, ...], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """Mirror of utils/amg.py: generate_crop_boxes. Layer i has (2**i)**2 XYXY boxes."""
    crop_boxes, layer_idxs = [], []
    im_h, im_w = im_size
    short_side = min(im_h, im_w)

    # Original image
    crop_boxes.append([0, 0, im_w, im_h])
    layer_idxs.append(0)

    def crop_len(orig_len, n_crops, overlap):
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))

        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)

        crop_box_x0 = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        crop_box_y0 = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]

        # NOTE(reference): the official comment says XYWH; the boxes are XYXY, x-major order.
        for x0, y0 in product(crop_box_x0, crop_box_y0):
            box = [x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)]
            crop_boxes.append(box)
            layer_idxs.append(i_layer + 1)

    return crop_boxes, layer_idxs


def _offset_like(values: np.ndarray, offset: List[int]) -> np.ndarray:
    # torch adds an int64 offset tensor: a float tensor keeps its dtype, an int one goes to int64.
    dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.int64
    return np.asarray([offset], dtype=dtype)  # [1, k]


def uncrop_boxes_xyxy(boxes: np.ndarray, crop_box: List[int]) -> np.ndarray:
    """Mirror of utils/amg.py: uncrop_boxes_xyxy. [N, 4] or [B, C, 4]."""
    x0, y0, _, _ = crop_box
    offset = _offset_like(boxes, [x0, y0, x0, y0])  # [1, 4]
    # Check if boxes has a channel dimension
    if len(boxes.shape) == 3:
        offset = offset[:, None, :]  # [1, 4] -> [1, 1, 4]
    return boxes + offset


def uncrop_points(points: np.ndarray, crop_box: List[int]) -> np.ndarray:
    """Mirror of utils/amg.py: uncrop_points. [N, 2] or [B, C, 2]."""
    x0, y0, _, _ = crop_box
    offset = _offset_like(points, [x0, y0])  # [1, 2]
    # Check if points has a channel dimension
    if len(points.shape) == 3:
        offset = offset[:, None, :]  # [1, 2] -> [1, 1, 2]
    return points + offset


def uncrop_masks(masks: np.ndarray, crop_box: List[int], orig_h: int, orig_w: int) -> np.ndarray:
    """Mirror of utils/amg.py: uncrop_masks. [..., h, w] -> [..., orig_h, orig_w], zero padded."""
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    # Coordinate transform masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    pad = [(0, 0)] * (masks.ndim - 2) + [(y0, pad_y - y0), (x0, pad_x - x0)]
    return np.pad(masks, pad, constant_values=0)  # [..., h, w] -> [..., orig_h, orig_w]


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Mirror of utils/amg.py: remove_small_regions. [H, W] bool -> ([H, W] bool, changed).

    Removes small disconnected regions and holes in a mask. Returns the
    mask and an indicator of if the mask has been modified.
    """
    # NOTE(reference): the official imports cv2 here; npsam's stand-in labels components itself.
    from ..kernels import connected_components as cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode: expected 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working_mask = (correct_holes ^ mask).astype(np.uint8)  # [H, W]
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working_mask, 8)
    sizes = stats[:, -1][1:]  # Row 0 is background label
    small_regions = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if len(small_regions) == 0:
        return mask, False
    fill_labels = [0] + small_regions
    if not correct_holes:
        # NOTE(reference): the official `[i for i in range(n_labels) if i not in fill_labels]`, as a set difference
        fill_labels = sorted(set(range(n_labels)) - set(fill_labels))
        # If every region is below threshold, keep largest
        if len(fill_labels) == 0:
            fill_labels = [int(np.argmax(sizes)) + 1]
    mask = np.isin(regions, fill_labels)  # [H, W]
    return mask, True


def coco_encode_rle(uncompressed_rle: Dict[str, Any]) -> Dict[str, Any]:
    """Mirror of utils/amg.py: coco_encode_rle (needs pycocotools)."""
    try:
        from pycocotools import mask as mask_utils  # type: ignore
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            'output_mode="coco_rle" needs pycocotools: pip install "npsam[coco]"'
        ) from e

    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")  # Necessary to serialize with json
    return rle


def batched_mask_to_box(masks: np.ndarray) -> np.ndarray:
    """Mirror of utils/amg.py: batched_mask_to_box. [..., H, W] bool -> [..., 4] int64 XYXY.

    Returns [0, 0, 0, 0] for an empty mask.
    """
    # NOTE(reference): empty input gives float32 zeros (torch.zeros' default dtype).
    if masks.size == 0:
        return np.zeros((*masks.shape[:-2], 4), dtype=np.float32)

    # Normalize shape to CxHxW
    shape = masks.shape
    h, w = shape[-2:]
    if len(shape) > 2:
        masks = masks.reshape(-1, h, w)  # [..., H, W] -> [B, H, W]
    else:
        masks = masks[None]  # [H, W] -> [1, H, W]

    # Get top and bottom edges
    in_height = np.max(masks, axis=-1)  # [B, H, W] -> [B, H]
    in_height_coords = in_height * np.arange(h, dtype=np.int64)[None, :]  # [B, H]
    bottom_edges = np.max(in_height_coords, axis=-1)  # [B, H] -> [B]
    in_height_coords = in_height_coords + h * (~in_height)
    top_edges = np.min(in_height_coords, axis=-1)  # [B, H] -> [B]

    # Get left and right edges
    in_width = np.max(masks, axis=-2)  # [B, H, W] -> [B, W]
    in_width_coords = in_width * np.arange(w, dtype=np.int64)[None, :]  # [B, W]
    right_edges = np.max(in_width_coords, axis=-1)  # [B, W] -> [B]
    in_width_coords = in_width_coords + w * (~in_width)
    left_edges = np.min(in_width_coords, axis=-1)  # [B, W] -> [B]

    # If the mask is empty the right edge will be to the left of the left edge.
    # Replace these boxes with [0, 0, 0, 0]
    empty_filter = (right_edges < left_edges) | (bottom_edges < top_edges)  # [B]
    out = np.stack([left_edges, top_edges, right_edges, bottom_edges], axis=-1)  # [B, 4]
    out = out * (~empty_filter)[:, None]

    # Return to original shape
    if len(shape) > 2:
        out = out.reshape(*shape[:-2], 4)  # [B, 4] -> [..., 4]
    else:
        out = out[0]  # [1, 4] -> [4]
    return out
