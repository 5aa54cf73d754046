"""Mirror of torchvision.ops.boxes: box_area, nms, batched_nms, on NumPy arrays.

The automatic mask generator de-duplicates masks by their boxes with
torchvision's ``batched_nms`` (its CPU kernel) and weighs crops by
``box_area``; these are those functions, with torchvision's names,
semantics and float32 arithmetic, so that the kept masks and their order are
the official ones.

Dimension letters: N boxes, K kept boxes.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def _upcast(t: np.ndarray) -> np.ndarray:
    # torchvision's _upcast: floats below float32 go to float32, ints below int32 to int32.
    if np.issubdtype(t.dtype, np.floating):
        return t if t.dtype in (np.float32, np.float64) else t.astype(np.float32)
    return t if t.dtype in (np.int32, np.int64) else t.astype(np.int32)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Mirror of torchvision.ops.boxes.box_area. [N, 4] XYXY -> [N]."""
    boxes = _upcast(np.asarray(boxes))
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Mirror of torchvision.ops.nms (its CPU kernel). -> kept indices [K] int64, by descending score.

    Greedy: visit boxes by descending score (a stable sort, so equal scores go
    by index, as the kernel's ``scores.sort(stable=True, descending=True)``);
    keep a box unless suppressed, and suppress every later box whose IoU with
    it is > iou_threshold. IoU is computed in the boxes' dtype (float32 for SAM)
    with the kernel's exact arithmetic.
    """
    boxes, scores = _check_boxes_scores(boxes, scores)
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[:, c]) for c in range(4))  # [N] each
    areas = (x2 - x1) * (y2 - y1)  # [N]
    order = np.argsort(-scores, kind="stable")  # [N]
    zero = boxes.dtype.type(0)
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in order.tolist():
            if suppressed[i]:
                continue
            keep.append(i)
            w = np.maximum(zero, np.minimum(x2[i], x2) - np.maximum(x1[i], x1))  # [N]
            h = np.maximum(zero, np.minimum(y2[i], y2) - np.maximum(y1[i], y1))  # [N]
            inter = w * h  # [N]
            ovr = inter / (areas[i] + areas - inter)  # [N]
            # NOTE(reference): the kernel compares the float IoU with the double threshold.
            # Marking boxes already visited changes nothing: they were kept or suppressed.
            suppressed |= ovr.astype(np.float64) > float(iou_threshold)
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Mirror of torchvision.ops.boxes.batched_nms. -> kept indices [K] int64, by descending score.

    NMS within each category ``idxs``: boxes only suppress boxes of their own category.
    """
    boxes, scores = _check_boxes_scores(boxes, scores)
    idxs = np.asarray(idxs)
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs: expected shape {scores.shape} (one category per box), got {idxs.shape}")
    # NOTE(reference): torchvision takes a per-category loop above 4000 numbers
    # (1000 boxes) on CPU and the coordinate trick below; both are mirrored
    # because the offsets of the trick round differently in float32.
    if boxes.size > 4000:
        return _batched_nms_vanilla(boxes, scores, idxs, iou_threshold)
    return _batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)


def _batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold) -> np.ndarray:
    # Offset each category so that boxes never overlap across them.
    if boxes.size == 0:
        return np.zeros(0, dtype=np.int64)
    max_coordinate = boxes.max()
    offsets = idxs.astype(boxes.dtype) * (max_coordinate + boxes.dtype.type(1))  # [N]
    boxes_for_nms = boxes + offsets[:, None]  # [N, 4]
    return nms(boxes_for_nms, scores, iou_threshold)


def _batched_nms_vanilla(boxes, scores, idxs, iou_threshold) -> np.ndarray:
    keep_mask = np.zeros(len(scores), dtype=bool)
    for class_id in np.unique(idxs):
        curr_indices = np.flatnonzero(idxs == class_id)
        curr_keep_indices = nms(boxes[curr_indices], scores[curr_indices], iou_threshold)
        keep_mask[curr_indices[curr_keep_indices]] = True
    keep_indices = np.flatnonzero(keep_mask)
    # NOTE(reference): torchvision sorts here with torch's default (unstable) sort,
    # so equal scores may come out in any order; we keep them by index (stable).
    return keep_indices[np.argsort(-scores[keep_indices], kind="stable")]


def _check_boxes_scores(boxes, scores) -> Tuple[np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected [N, 4] XYXY, got shape {boxes.shape}")
    if boxes.dtype not in (np.float32, np.float64):
        raise ValueError(f"boxes: expected float32 or float64 (as torchvision's kernel), got {boxes.dtype}")
    if scores.shape != (len(boxes),):
        raise ValueError(f"scores: expected shape ({len(boxes)},), got {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"scores: expected a float array, got {scores.dtype}")
    return boxes, scores
