"""Mirror of OpenCV's ``cv2.connectedComponentsWithStats`` for binary images,
8-connectivity: the labelling ``remove_small_regions`` (utils/amg.py) calls.

Components are found on horizontal runs of each row: a run touches a run of
the next row when their column ranges overlap or meet diagonally, and
union-find over runs (vectorised hooking and pointer jumping) joins them.
They are then numbered as OpenCV numbers them, so that label order (and so
"the first largest" component) is OpenCV's: its 8-connectivity algorithms
(BBDT / Spaghetti) scan 2x2 pixel blocks and keep the smallest provisional
label, so labels follow each component's first 2x2 block in block-raster order.

Dimension letters: H, W image; N runs; E touching pairs of runs; L labels
(label 0 is every zero pixel, as in OpenCV).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

# Columns of stats, as cv2.CC_STAT_LEFT, _TOP, _WIDTH, _HEIGHT, _AREA
CC_STAT_LEFT, CC_STAT_TOP, CC_STAT_WIDTH, CC_STAT_HEIGHT, CC_STAT_AREA = range(5)


def connectedComponentsWithStats(image: np.ndarray, connectivity: int = 8
                                 ) -> Tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Mirror of cv2.connectedComponentsWithStats(image, connectivity=8) for a
    binary [H, W] image (nonzero is foreground).

    -> (n_labels, labels [H, W] int32, stats [L, 5] int32 (left, top, width,
    height, area), centroids [L, 2] float64 (x, y)). Label 0 is the
    background (every zero pixel); 1.. are the components in OpenCV's order.
    """
    # NOTE(reference): SAM calls it with connectivity 8 only; 4 is not implemented.
    assert connectivity == 8, "only 8-connectivity (what SAM uses) is implemented"
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image: expected a binary [H, W] image, got shape {image.shape}")
    h, w = image.shape
    runs = _label_runs_8(image != 0)
    n = runs.n_components
    lengths = runs.ends - runs.starts  # [N]
    stats = np.zeros((n + 1, 5), dtype=np.int64)  # [L, 5]
    centroids = np.zeros((n + 1, 2), dtype=np.float64)  # [L, 2]
    stats[1:, CC_STAT_AREA] = np.bincount(runs.component, weights=lengths, minlength=n).astype(np.int64)
    left = np.full(n, w, dtype=np.int64)
    np.minimum.at(left, runs.component, runs.starts)
    right = np.zeros(n, dtype=np.int64)
    np.maximum.at(right, runs.component, runs.ends)
    top = np.full(n, h, dtype=np.int64)
    np.minimum.at(top, runs.component, runs.rows)
    bottom = np.zeros(n, dtype=np.int64)
    np.maximum.at(bottom, runs.component, runs.rows + 1)
    stats[1:, CC_STAT_LEFT], stats[1:, CC_STAT_WIDTH] = left, right - left
    stats[1:, CC_STAT_TOP], stats[1:, CC_STAT_HEIGHT] = top, bottom - top
    # sums of x and y over each run's pixels: length * (start + end - 1) / 2 and length * row
    sum_x = np.bincount(runs.component, weights=lengths * (runs.starts + runs.ends - 1) / 2, minlength=n)
    sum_y = np.bincount(runs.component, weights=lengths * runs.rows, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids[1:, 0] = sum_x / stats[1:, CC_STAT_AREA]
        centroids[1:, 1] = sum_y / stats[1:, CC_STAT_AREA]
    # the background, label 0: every other pixel
    background = image == 0  # [H, W]
    stats[0, CC_STAT_AREA] = int(np.count_nonzero(background))
    if stats[0, CC_STAT_AREA]:
        rows_any, cols_any = np.flatnonzero(background.any(axis=1)), np.flatnonzero(background.any(axis=0))
        stats[0, :4] = [cols_any[0], rows_any[0], cols_any[-1] + 1 - cols_any[0], rows_any[-1] + 1 - rows_any[0]]
        ys, xs = np.arange(h), np.arange(w)
        centroids[0] = [(background.sum(axis=0) @ xs) / stats[0, CC_STAT_AREA],
                        (background.sum(axis=1) @ ys) / stats[0, CC_STAT_AREA]]
    else:  # NOTE(reference): what OpenCV reports for an empty label 0 (its unset accumulators)
        stats[0, :4] = [-1, np.iinfo(np.int32).max, 0, 0]
        centroids[0] = np.nan
    return n + 1, runs.labels(), stats.astype(np.int32), centroids


class _Runs:
    """Horizontal runs of a binary image and their 8-connected components."""

    def __init__(self, shape, rows, starts, ends, component):
        self.shape = shape
        self.rows, self.starts, self.ends = rows, starts, ends  # [N] each, exclusive ends
        self.component = component  # [N] label - 1 of each run, in OpenCV's order
        self.n_components = int(component.max()) + 1 if len(component) else 0

    def labels(self) -> np.ndarray:
        """[H, W] int32: each run's label (component + 1), 0 elsewhere."""
        h, w = self.shape
        label = (self.component + 1).astype(np.int32)  # [N]
        delta = np.zeros(h * w + 1, dtype=np.int32)
        delta[self.rows * w + self.starts] += label  # starts are distinct
        delta[self.rows * w + self.ends] -= label  # ends are distinct; runs never overlap
        return np.cumsum(delta[:-1], dtype=np.int32).reshape(h, w)  # [H*W] -> [H, W]


def _label_runs_8(image: np.ndarray) -> _Runs:
    h, w = image.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = image
    edges = np.diff(padded, axis=1)  # [H, W+1]: +1 where a run starts, -1 one past its end
    rows, starts = np.nonzero(edges == 1)  # [N] each, row-major order
    _, ends = np.nonzero(edges == -1)  # [N], exclusive ends
    n = len(rows)
    if n == 0:
        return _Runs((h, w), rows, starts, ends, np.zeros(0, dtype=np.int64))

    # Runs a (row r) and b (row r+1) touch with 8-connectivity iff b.start <= a.end and a.start <= b.end
    # (exclusive ends). Keys row*K + column keep rows apart (K > W), so one
    # sorted search finds, for each run, the contiguous range of runs it touches in the next row.
    k = w + 2
    start_key = rows * k + starts  # [N], increasing
    end_key = rows * k + ends  # [N], increasing
    lo = np.searchsorted(end_key, (rows + 1) * k + starts, side="left")  # [N]
    hi = np.searchsorted(start_key, (rows + 1) * k + ends, side="right")  # [N]
    n_touch = np.maximum(hi - lo, 0)  # [N]
    src = np.repeat(np.arange(n), n_touch)  # [E]
    first = np.cumsum(n_touch) - n_touch  # [N]
    dst = lo[src] + (np.arange(len(src)) - first[src])  # [E]

    root = _union_find(n, src, dst)  # [N], smallest run index of each component
    is_root = root == np.arange(n)
    raster_label = (np.cumsum(is_root) - 1)[root]  # [N] components in raster order of first run

    # Renumber as cv2 does: by each component's first 2x2 block (block row, block column).
    block_key = (rows // 2) * (w // 2 + 1) + starts // 2  # [N]
    n_comp = int(is_root.sum())
    first_block = np.full(n_comp, np.iinfo(np.int64).max)
    np.minimum.at(first_block, raster_label, block_key)  # [components]
    cv2_rank = np.empty(n_comp, dtype=np.int64)
    cv2_rank[np.argsort(first_block, kind="stable")] = np.arange(n_comp)
    return _Runs((h, w), rows, starts, ends, cv2_rank[raster_label])


def _union_find(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Roots of the graph on n nodes with edges (src, dst); each root is its tree's smallest node.

    Every round hooks each root onto the smallest root it touches (so no cycles)
    and then jumps pointers until every tree is a star; settled edges are dropped.
    """
    parent = np.arange(n)
    while len(src):
        pu, pv = parent[src], parent[dst]  # roots: parent is all stars here
        open_ = pu != pv
        src, dst, pu, pv = src[open_], dst[open_], pu[open_], pv[open_]
        if not len(src):
            break
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent
