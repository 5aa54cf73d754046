"""Fast twin of automatic_mask_generator.py: SamAutomaticMaskGenerator._process_batch,
exact pruning in bounded memory.

The official batch step decodes every prompt of the batch to all its masks,
upscales all of them to the photo's size ([N*C, H, W] float32: 34 GiB for a
batch of 64 prompts on an 8000x6000 photo), and only then filters them by
predicted IoU, by stability, thresholds them, finds boxes, drops masks at
crop edges and encodes the rest. This twin gives the same MaskData (the same
masks in the same order, every field equal bit for bit) and skips the work
that cannot change it:

1. IoU first (decode_iou_first): the predicted IoUs come from the
   transformer's IoU token, before any upscaling. The transformer and the
   IoU head run on the whole batch as the decoder runs them; the upscaling and
   the mask product run only for prompts with a mask whose predicted IoU
   passes ``pred_iou_thresh``. The upscaling is per prompt, so a kept
   prompt's low-res masks are the same numbers the whole batch would give.
2. Only the rows read: the masks at photo size read the low-res masks'
   rows of the crop (Sam.postprocess_masks crops the padding away: a 3:2
   photo fills 683 of the 1024 rows), so the upscaling runs on the image
   rows those need (low_res_rows_read) and no further.
3. Photo size per small group: only masks that passed the IoU filter are
   resized to the photo, a group at a time (as many as the memory limit
   allows), and never as float logits of the whole photo: the two bilinear
   resizes run as the separable map of ``Sam.postprocess_masks``
   (kernels/resize.upscale_crop_resize), block of output rows by block, and
   each block is counted for the stability score and thresholded at once
   (masks_at_photo_size). The same matrix products as upscale_crop_resize
   (per mask and per block), so the same bits.
4. Survivors only: boxes, the crop-edge filter, uncropping and RLE run on the
   masks that passed the stability filter, one mask at a time, the masks
   spread over the threads (rle_of_mask: the same counts as mask_to_rle,
   found without a transposed copy).
5. The same memory every batch (threads.WorkArrays): the batch's large arrays (the
   transformer's per-prompt image rows, the kept prompts' low-res masks, a
   group's masks and width pass) are made once per generate() and reused by
   every batch, then dropped after its last batch. Fresh memory is not free:
   every 4 KB page is faulted in and zeroed by the kernel, and dog.jpg's 16
   batches faulted in about 5 GB this way (a third of the system's time in
   clear_page, as much as 10 s of a 30 s run on a virtual machine).

Memory: working_memory() estimates the peak of a batch (the process's base,
the photo, the arrays the batches share if they do, the decoder's batch, one
group of masks at photo size, one RLE). memory_plan() shares the arrays when
that fits within the generator's ``memory_limit`` (every photo up to about
20 MP with the default limit) and chooses the group size; a photo whose
smallest working set (a group of one, nothing shared) does not fit is refused
before any work starts (check_memory).

Dimension letters:
  N  prompts in the batch   C  masks per prompt (3)   M  masks kept
  G  masks in a group       h, w  crop (the predictor's image)   H, W  photo
  S  the encoder's square input (1024)   Hr  low-res rows read
"""

from __future__ import annotations

import math
from copy import deepcopy
from typing import Callable, Optional, Tuple

import numpy as np

from ..automatic_mask_generator import (DEFAULT_MEMORY_LIMIT, PhotoTooLargeError, SamAutomaticMaskGenerator,
                                        too_large_message)
from ..kernels.resize import _axis_plan, upscale_crop_resize
from ..utils.amg import MaskData, batch_iterator, batched_mask_to_box, is_box_near_crop_edge, uncrop_masks
from ..kernels.checks import check_decoder_inputs
from . import implementation, implements, mask_decoder as fast_decoder, processes, threads

# What the process holds anyway (the interpreter, NumPy, the model's weights,
# the fast layer's work arrays, the image encoder's run on its 1024 input).
# Measured peaks above the estimate: an 8000x6000 photo with every mask kept
# 859 MiB (38 MiB above it with 300 MiB here), dog.jpg at the defaults 843 MiB
# in its decoding phase (109 MiB above it with 350): 450.
BASE_BYTES = 450 << 20
# The photo (RGB uint8), held throughout, and the copies the predictor's
# set_image makes of a crop while it resizes it (contiguous, PIL's).
PHOTO_BYTES_PER_PIXEL = 3
SET_IMAGE_BYTES_PER_PIXEL = 6
# A decoder batch at its peak, per prompt. Of it, the transformer's per-prompt
# image rows (64 x 64 x 256 float32) are shared by the batches, held from the
# first to the last, and so is what each layer's step (4) keeps for the
# upscaling (transformer.Step4Record: 2 layers x (8 heads x 7 tokens + 1)
# x 64 x 64 float32, with norm4's 1 / std per row); the rest is the batch's
# own. After it, the kept prompts' low-res masks (3 x 256 x 256 float32),
# shared too. Measured on MobileSAM and dog.jpg, two batches of 64 prompts:
# the peak rose by 404 MiB when the record held the 172 of 256 rows the
# upscaling reads; it holds every row since layer 1 reads it too
# (transformer._chain_block), 33 MiB more: about 437, where this model counts
# 436 (BASE_BYTES's margin covers it: dog.jpg's whole run peaks at 800 MiB).
DECODER_BYTES_PER_PROMPT = 5 << 20
KEYS_BYTES_PER_PROMPT = 64 * 64 * 256 * 4
STEP4_RECORD_BYTES_PER_PROMPT = 2 * (8 * 7 + 2) * 64 * 64 * 4
LOW_RES_BYTES_PER_PROMPT = 3 * 256 * 256 * 4
# Per mask of a group: its thresholded mask (1 byte per pixel) and its rows of
# the width pass (4 bytes per photo column and low-res row read, at most 256),
# shared; and, in each thread, a block of 64 rows of logits (4 bytes) and
# two of comparisons (1 byte each) per photo column, during the masks phase.
# (truck.jpg's peak, 1052 MiB, passed the 1 GiB bound when the blocks were left out.)
MASK_BYTES_PER_PIXEL = 1
MASK_BYTES_PER_COLUMN = 4 * 256
BLOCK_BYTES_PER_COLUMN = threads.NUM_THREADS * 64 * (4 + 1 + 1)
# One mask at a time: its uncropped copy (crops only) and the RLE's
# transposed copy and changes.
RLE_BYTES_PER_PIXEL = 3


# A worker process (fast/processes.py) shares the parent's pages until one of
# them writes to a page; its own are its batches' arrays (as the parent's,
# counted below) and the pages of the parent's heap it writes to. Measured on
# dog.jpg, a worker forked after the embedding: 559 MiB of its own at its
# end, where its batches are counted 519 MiB (with a group of 74 masks).
WORKER_BASE_BYTES = 100 << 20
# Fewest masks per group with which workers run: smaller groups resize masks
# to the photo's size a few at a time, which costs what a worker gains.
WORKER_MIN_GROUP = 3


def working_memory(points_per_batch: int, photo_size: Tuple[int, int], group: int, pooled: bool = False,
                   crops: bool = False, processes: int = 1) -> int:
    """Estimated peak bytes of generate() with ``group`` masks per group: the
    process's base and the photo, plus the largest of three phases (embedding
    a crop; decoding a batch; the batch's masks at photo size, a group at a
    time, and one mask's RLE). ``pooled``: the batches share their large
    arrays (threads.WorkArrays), held from the first batch to the last, so through the
    embedding of every crop after the first (``crops``) too. ``processes``:
    the batches run in this process and processes - 1 workers forked after the
    embedding, each with its own batch phases and WORKER_BASE_BYTES."""
    h, w = (int(s) for s in photo_size)
    held = BASE_BYTES + PHOTO_BYTES_PER_PIXEL * h * w
    embed = SET_IMAGE_BYTES_PER_PIXEL * h * w
    decode = (DECODER_BYTES_PER_PROMPT + STEP4_RECORD_BYTES_PER_PROMPT) * points_per_batch
    low_res = LOW_RES_BYTES_PER_PROMPT * points_per_batch
    group_masks = group * (MASK_BYTES_PER_PIXEL * h * w + MASK_BYTES_PER_COLUMN * w)
    masks = RLE_BYTES_PER_PIXEL * h * w + group * BLOCK_BYTES_PER_COLUMN * w
    workers = processes - 1
    if not pooled:
        batch = max(decode, low_res + group_masks + masks)
        return held + max(embed, batch + workers * (WORKER_BASE_BYTES + batch))
    shared = (KEYS_BYTES_PER_PROMPT + STEP4_RECORD_BYTES_PER_PROMPT) * points_per_batch + low_res + group_masks
    decode -= (KEYS_BYTES_PER_PROMPT + STEP4_RECORD_BYTES_PER_PROMPT) * points_per_batch  # shared
    batch = max(shared + decode, shared + masks)
    return held + max(embed + (shared if crops else 0), batch + workers * (WORKER_BASE_BYTES + batch))


def memory_plan(points_per_batch: int, photo_size: Tuple[int, int], memory_limit: int,
                crops: bool = False, processes: int = 1) -> Tuple[bool, int]:
    """(pooled, group): shared work arrays when they fit within the limit
    with a group of at least one mask, and the most masks per group (at least
    1, at most a batch's masks) whose working_memory stays within it. A photo
    too large for pooling (about 20 MP with the default limit) makes its
    arrays batch by batch, as the official code does."""
    for pooled in (True, False):
        lo, hi = 1, 3 * points_per_batch
        while lo < hi:  # working_memory grows with the group
            mid = (lo + hi + 1) // 2
            if working_memory(points_per_batch, photo_size, mid, pooled, crops, processes) <= memory_limit:
                lo = mid
            else:
                hi = mid - 1
        if not pooled or working_memory(points_per_batch, photo_size, lo, pooled, crops, processes) <= memory_limit:
            return pooled, lo
    raise AssertionError("unreachable")


def group_size(points_per_batch: int, photo_size: Tuple[int, int], memory_limit: int, crops: bool = False,
               processes: int = 1) -> int:
    """The group of memory_plan."""
    return memory_plan(points_per_batch, photo_size, memory_limit, crops, processes)[1]


def plan_processes(self: SamAutomaticMaskGenerator, photo_size: Tuple[int, int], batches: int) -> int:
    """The processes that run a crop's batches (fast/processes.py): ``processes``
    (None: NPSAM_NUM_THREADS), at most one per batch, 1 where workers cannot
    be forked, and no more than fit within memory_limit with the batches'
    shared arrays and groups of at least WORKER_MIN_GROUP masks (less costs
    more than a worker gains: fresh memory every batch, or masks resized to
    the photo's size a few at a time)."""
    wanted = threads.NUM_THREADS if self.processes is None else self.processes
    n = min(wanted, batches) if processes.available() else 1
    limit = DEFAULT_MEMORY_LIMIT if self.memory_limit is None else self.memory_limit
    crops = self.crop_n_layers > 0
    while n > 1:
        pooled, group = memory_plan(self.points_per_batch, photo_size, limit, crops, n)
        if pooled and group >= WORKER_MIN_GROUP:
            break
        n -= 1
    return max(1, n)


def _batch_work(self: SamAutomaticMaskGenerator) -> threads.WorkArrays:
    """The work arrays the generator's batches share: made by the first batch
    of a generate() call, dropped after its last (see process_batch)."""
    work = self.__dict__.get("_batch_work")
    if work is None or getattr(self, "_batches_done", 0) == 0:
        self.__dict__.pop("_batch_work", None)
        work = self.__dict__["_batch_work"] = threads.WorkArrays()
    return work


@implements(SamAutomaticMaskGenerator, "check_memory")
def check_memory(self: SamAutomaticMaskGenerator, photo_size: Tuple[int, int]) -> None:
    """Replaces SamAutomaticMaskGenerator.check_memory (the official logic's
    estimate, which holds whole batches at photo size) with this twin's: a
    group of one mask must fit in memory_limit."""
    limit = DEFAULT_MEMORY_LIMIT if self.memory_limit is None else self.memory_limit
    need = working_memory(self.points_per_batch, photo_size, 1)  # nothing shared (see memory_plan)
    if need > limit:
        raise PhotoTooLargeError(too_large_message(photo_size, need, self.points_per_batch, limit))


@implements(SamAutomaticMaskGenerator, "_batches")
def batches(self: SamAutomaticMaskGenerator, points_for_image: np.ndarray, im_size: Tuple[int, ...], crop_box,
            orig_size: Tuple[int, ...]) -> list:
    """Replaces SamAutomaticMaskGenerator._batches: the same _process_batch calls,
    run by plan_processes(...) processes, this one and workers forked now that
    the crop's embedding is made (fast/processes.py: threads of one process
    hand the GIL to each other between the batches' many short NumPy calls;
    processes do not). Their MaskData come back in the official order, and each
    is the same computation in whichever process ran it (on one thread: any
    number of threads gives the same bits), so the records are the same.
    Progress counts each batch as it arrives."""
    points = [p for (p,) in batch_iterator(self.points_per_batch, points_for_image)]
    n = plan_processes(self, orig_size, len(points))

    def batch(i):
        return self._process_batch(points[i], im_size, crop_box, orig_size)

    def done(i):
        self._batches_done += 1
        if self.progress is not None:
            self.progress(self._batches_done, self._batches_total)

    def in_worker():  # the worker's batches share one set of work arrays, kept until it exits
        self._batches_done, self._batches_total = max(1, self._batches_done), math.inf

    self._processes = n  # process_batch plans its memory for this many
    try:
        results = processes.ordered_map(batch, len(points), n, done, in_worker)
    finally:
        self._processes = 1
    if self._batches_done >= self._batches_total:  # generate()'s last batch ran in a worker
        self.__dict__.pop("_batch_work", None)
    return results


@implements(SamAutomaticMaskGenerator, "_process_batch")
def process_batch(self: SamAutomaticMaskGenerator, points: np.ndarray, im_size: Tuple[int, ...],
                  crop_box, orig_size: Tuple[int, ...]) -> MaskData:
    """Replaces SamAutomaticMaskGenerator._process_batch: the same MaskData
    (iou_preds, points, stability_score, boxes, rles; same order, same bits),
    with pruned work (see the module docstring). Equal because every value
    kept is computed by the same products as the official path computes it,
    and every value skipped belongs to a mask the official path drops."""
    limit = DEFAULT_MEMORY_LIMIT if self.memory_limit is None else self.memory_limit
    pooled, group = memory_plan(self.points_per_batch, orig_size, limit, self.crop_n_layers > 0,
                                getattr(self, "_processes", 1))
    work = _batch_work(self) if pooled else None
    try:
        with threads.no_huge_pages():  # (see there: a batch makes many large arrays)
            return _process_batch(self, points, im_size, crop_box, orig_size, group, work)
    finally:
        if getattr(self, "_batches_done", 0) + 1 >= getattr(self, "_batches_total", 0):
            self.__dict__.pop("_batch_work", None)  # generate()'s last batch (or a call outside it)


def _process_batch(self: SamAutomaticMaskGenerator, points: np.ndarray, im_size: Tuple[int, ...],
                   crop_box, orig_size: Tuple[int, ...], group: int, work: Optional[threads.WorkArrays]) -> MaskData:
    orig_h, orig_w = orig_size
    predictor, model = self.predictor, self.predictor.model

    # Run model on this batch: IoU first
    transformed_points = predictor.transform.apply_coords(points, im_size)  # [N, 2] float64
    in_points = np.asarray(transformed_points)
    in_labels = np.ones(in_points.shape[0], dtype=np.int32)  # NOTE(reference): torch.int
    if self.pred_iou_thresh > 0.0:
        def keep_masks(iou_preds):  # the official filter on predicted IoU
            return iou_preds > self.pred_iou_thresh
    else:
        keep_masks = None
    img_size = model.image_encoder.img_size
    low_res_height = 4 * predictor.features.shape[2]  # the masks' rows: two 2x upscalings of the embedding's
    rows_read = low_res_rows_read(predictor.input_size, predictor.original_size, img_size, low_res_height)
    iou_preds, low_res, kept = decode_iou_first(
        predictor, in_points[:, None, :], in_labels[:, None], keep_masks, work, rows_read)  # [N, C], [Nk, C, Hr, 256]

    # Serialize predictions, as the official, and filter by predicted IoU
    n, c = iou_preds.shape
    data = MaskData(iou_preds=iou_preds.reshape(-1), points=points.repeat(c, axis=0))  # [N*C], [N*C, 2]
    keep_mask = np.ones(n * c, dtype=bool) if keep_masks is None else keep_masks(data["iou_preds"])
    data.filter(keep_mask)
    flat = np.flatnonzero(keep_mask)  # [M] indices into N*C
    row_of_prompt = np.full(n, -1)
    row_of_prompt[kept] = np.arange(len(kept))
    low_res = low_res.reshape(-1, *low_res.shape[2:])  # [Nk, C, 256, 256] -> [Nk*C, 256, 256]
    low_index = row_of_prompt[flat // c] * c + flat % c  # [M] rows of low_res

    # Photo size, a group at a time; each mask that passes the stability filter
    # gets its box, the crop-edge filter and its RLE at once, so that no more
    # than a group of masks is ever held at photo size
    threshold, offset = model.mask_threshold, self.stability_score_offset
    scores, boxes, near_edge, rles = [], [], [], []
    for g0 in range(0, len(flat), group):
        inter, union, binary = masks_at_photo_size(
            low_res[low_index[g0:g0 + group]], predictor.input_size, predictor.original_size,
            img_size, threshold, offset, work, low_res_height)  # [G], [G], [G, h, w] bool
        # Calculate stability score
        # NOTE(reference): calculate_stability_score: int32 / int32 in torch's default float32
        with np.errstate(invalid="ignore", divide="ignore"):
            score = inter.astype(np.float32) / union.astype(np.float32)  # [G]
        scores.append(score)
        passed = score >= self.stability_score_thresh if self.stability_score_thresh > 0.0 else np.ones(len(score), bool)
        survivors = np.flatnonzero(passed)
        found = [None] * len(survivors)  # (box, near crop edge, RLE or None) per survivor, in order

        def survivor_records(start, stop):  # each mask on its own: spread over the threads
            for j in range(start, stop):
                mask = binary[survivors[j]]  # [h, w]
                # Threshold masks and calculate boxes
                box = batched_mask_to_box(mask)  # [h, w] -> [4] int64
                # Filter boxes that touch crop boundaries
                near = bool(is_box_near_crop_edge(box[None], crop_box, [0, 0, orig_w, orig_h])[0])
                # Compress to RLE
                rle = None if near else rle_of_mask(uncrop_masks(mask[None], crop_box, orig_h, orig_w)[0])
                found[j] = (box, near, rle)

        threads.parallel_rows(survivor_records, len(survivors))
        for box, near, rle in found:
            boxes.append(box)
            near_edge.append(near)
            if not near:
                rles.append(rle)
        del binary

    # The official filters, in order, on the data: the same records
    data["stability_score"] = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)  # [M]
    if self.stability_score_thresh > 0.0:
        keep_mask = data["stability_score"] >= self.stability_score_thresh
        data.filter(keep_mask)
    h, w = predictor.original_size
    # NOTE(reference): batched_mask_to_box of no masks is float32 [0, 4]
    data["boxes"] = np.stack(boxes) if boxes else batched_mask_to_box(np.zeros((0, h, w), dtype=bool))  # [M, 4]
    keep_mask = ~np.asarray(near_edge, dtype=bool)
    if not np.all(keep_mask):
        data.filter(keep_mask)
    data["rles"] = rles
    return data


def decode_iou_first(predictor, point_coords: np.ndarray, point_labels: np.ndarray,
                     keep_masks: Optional[Callable[[np.ndarray], np.ndarray]], work: Optional[threads.WorkArrays] = None,
                     rows_read: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """predictor.predict_batch's decoder step (multimask output), IoU first:
    -> iou_predictions [N, C], low-res logits [Nk, C, Hr, 256] of the kept
    prompts, kept [Nk] (prompt indices, increasing). With ``work``, the
    transformer's image rows and the low-res logits are its arrays.
    ``rows_read``: the low-res rows needed, from the top; Hr is that rounded
    up to the upscaling's blocks (all 256 rows when None, or without the
    fast decoder).

    A prompt is kept when keep_masks(iou) (on its flattened [C] predictions)
    keeps any of its masks (all prompts when keep_masks is None). The prompt
    encoder, the transformer, the hypernetworks and the IoU head run on the
    whole batch as the decoder runs them; the upscaling and the mask product,
    per prompt in the fast decoder, run for the kept prompts only. So every
    value returned is the decoder's own, bit for bit (tested against
    predict_batch).
    """
    model = predictor.model
    decoder = model.mask_decoder
    sparse, dense = model.prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
    image_pe = model.prompt_encoder.get_dense_pe()
    if not _runs_fast_decoder(decoder):  # no fast decoder to split: the whole decoder, then select
        low_res, iou_preds = decoder(image_embeddings=predictor.features, image_pe=image_pe,
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=True)  # -> [N, C, 256, 256], [N, C]
        kept = _kept_prompts(iou_preds, keep_masks)
        return iou_preds, low_res[kept], kept
    args = check_decoder_inputs(decoder.transformer_dim, decoder.iou_token.weight.dtype, predictor.features,
                                image_pe, sparse, dense)
    rows = None if rows_read is None else -(-rows_read // 4)  # image rows: 4 low-res rows each
    # NOTE(reference): MaskDecoder.forward with multimask_output=True keeps tokens 1..3
    # (its fast twin makes only those, and so does this call: the same bits)
    low_res, iou_preds, kept = fast_decoder.decode(decoder, *args, fast_decoder.returned_masks(decoder, True),
                                                   lambda iou: _kept_prompts(iou, keep_masks), work, rows)
    return iou_preds, low_res, kept  # [N, C], [Nk, C, Hr, 256], [Nk]


def low_res_rows_read(input_size: Tuple[int, int], original_size: Tuple[int, int], img_size: int,
                      low_res_height: int) -> int:
    """How many low-res rows, from the top, Sam.postprocess_masks reads to make
    masks of original_size from a crop of input_size: the rest lie in the
    padding the crop removes (their weights in the separable map are 0)."""
    _, blocks_h = _axis_plan(low_res_height, img_size, int(input_size[0]), int(original_size[0]), np.float32)
    return max(b[3] for b in blocks_h)


def _kept_prompts(iou_preds: np.ndarray, keep_masks) -> np.ndarray:
    n, c = iou_preds.shape
    if keep_masks is None:
        return np.arange(n)
    return np.flatnonzero(keep_masks(iou_preds.reshape(-1)).reshape(n, c).any(axis=1))


def _runs_fast_decoder(decoder) -> bool:
    """Whether ``decoder`` runs the fast layer's MaskDecoder (fast/mask_decoder.py),
    whose decode decode_iou_first calls in parts; else it runs whole."""
    return (implementation(decoder) is fast_decoder.mask_decoder
            and implementation(decoder, "predict_masks") is fast_decoder.predict_masks)


def masks_at_photo_size(low_res: np.ndarray, input_size: Tuple[int, int], original_size: Tuple[int, int],
                        img_size: int, mask_threshold: float, offset: float, work: Optional[threads.WorkArrays] = None,
                        low_res_height: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sam.postprocess_masks of low-res logits [G, 256, 256], then the stability
    counts and the threshold, without keeping the logits at photo size:
    -> intersections [G] int32 (pixels > threshold + offset), unions [G] int32
    (pixels > threshold - offset), masks [G, h, w] bool (pixels > threshold).

    The resize is upscale_crop_resize's separable map with its products, block
    by block (the width pass as there, then each block of 64 output rows of
    the height pass), so each block's logits are the bits upscale_crop_resize
    gives; each block is counted and thresholded while in cache.
    NOTE(reference): calculate_stability_score counts in int16 per row, then
    int32 per mask: so do these counts. Logits that upscale_crop_resize would
    not map (non-finite, near the overflow threshold) take it whole. With
    ``work``, the masks and the width pass are its arrays.
    ``low_res_height``: low_res holds the first rows of masks this high (at
    least the rows read, low_res_rows_read); None: it holds them whole.
    """
    work = threads.WorkArrays() if work is None else work
    x = np.ascontiguousarray(low_res)
    g, hx, wl = x.shape
    hl = hx if low_res_height is None else int(low_res_height)
    dtype = x.dtype
    high = np.asarray(mask_threshold + offset, dtype=dtype)
    low = np.asarray(mask_threshold - offset, dtype=dtype)
    limit = np.finfo(dtype).max / 4
    (h, w) = (int(original_size[0]), int(original_size[1]))
    crop = (int(input_size[0]), int(input_size[1]))
    binary = work.get("binary", (g, h, w), bool)  # [G, h, w]
    inter_rows = np.empty((g, h), dtype=np.int16)  # [G, h]
    union_rows = np.empty((g, h), dtype=np.int16)
    a_h, blocks_h = _axis_plan(hl, img_size, crop[0], h, dtype)  # [h, Hl]
    a_w, blocks_w = _axis_plan(wl, img_size, crop[1], w, dtype)  # [w, Wl]
    r0, r1 = min(b[2] for b in blocks_h), max(b[3] for b in blocks_h)  # the input rows any output reads
    if hx < r1:
        raise ValueError(f"low_res: expected at least the {r1} rows read of {hl}, got {hx}")
    xs = x[:, r0:r1]  # [G, Hr, Wl]
    if x.size == 0:
        pass
    elif not (-limit < xs.min() and xs.max() < limit):  # as upscale_crop_resize: the two resizes, whole
        # NOTE(reference): upscale_crop_resize decides on every row; the rows not
        # read, absent here, are finite for finite weights (the logits come from
        # layer-normed rows), and the two resizes never read them (zeros here)
        whole = np.zeros((g, hl, wl), dtype)
        whole[:, :hx] = x
        full = upscale_crop_resize(whole[:, None], (img_size, img_size), crop, (h, w))[:, 0]  # [G, h, w]
        np.greater(full, mask_threshold, out=binary)
        inter_rows[...] = (full > high).sum(-1, dtype=np.int16)
        union_rows[...] = (full > low).sum(-1, dtype=np.int16)
    else:
        z = work.get("width", (g, r1 - r0, w), dtype)  # [G, Hr, w]

        def width(start, stop):  # as upscale_crop_resize's width pass
            for o0, o1, i0, i1 in blocks_w[start:stop]:
                # [G, Hr, K] @ [K, o] -> [G, Hr, o]
                np.matmul(xs[:, :, i0:i1], a_w[o0:o1, i0:i1].T, out=z[:, :, o0:o1])

        def height(start, stop):  # as its height pass, each block counted and thresholded here
            for o0, o1, i0, i1 in blocks_h[start:stop]:
                out = threads.scratch("everything.rows", (g, o1 - o0, w), dtype)  # [G, o, w]
                # [o, K] @ [G, K, w] -> [G, o, w]
                np.matmul(a_h[o0:o1, i0:i1], z[:, i0 - r0:i1 - r0], out=out)
                np.greater(out, mask_threshold, out=binary[:, o0:o1])
                inter_rows[:, o0:o1] = (out > high).sum(-1, dtype=np.int16)
                union_rows[:, o0:o1] = (out > low).sum(-1, dtype=np.int16)

        with threads.single_threaded_blas():
            threads.parallel_rows(width, len(blocks_w), threads=threads.row_threads())
            threads.parallel_rows(height, len(blocks_h), threads=threads.row_threads())
    intersections = inter_rows.sum(-1, dtype=np.int32)  # [G, h] -> [G]
    unions = union_rows.sum(-1, dtype=np.int32)  # [G, h] -> [G]
    return intersections, unions, binary


# ---------------------------------------------------------------------------
# RLE and MaskData.cat
# ---------------------------------------------------------------------------
def rle_of_mask(mask: np.ndarray) -> dict:
    """Stands for utils/amg.mask_to_rle on one mask [H, W] bool: the same
    uncompressed RLE (the same counts, in column-major order), 7x faster on a
    1800x1200 photo (0.7 against 5.4 ms).

    mask_to_rle transposes the mask to column-major order and finds every
    change between neighbours of that order. The same changes, found in place:
    a change between rows r-1 and r of column c sits at c*H + r - 1, and one
    between the last pixel of column c-1 and the first of column c at c*H - 1.
    Sorted, they are mask_to_rle's change indices, so the counts are equal.
    """
    h, w = mask.shape
    m = mask.view(np.uint8)
    r, c = np.divmod(_flatnonzero_sparse(m[1:] != m[:-1]), w)  # [H-1, W] changes down a column
    changes = np.concatenate([c * h + r, (np.flatnonzero(m[0, 1:] != m[-1, :-1]) + 1) * h - 1])
    changes.sort()
    cur_idxs = np.concatenate([[0], changes + 1, [h * w]])
    counts = [] if m[0, 0] == 0 else [0]
    counts.extend(np.diff(cur_idxs).tolist())
    return {"size": [h, w], "counts": counts}


def _flatnonzero_sparse(x: np.ndarray) -> np.ndarray:
    """np.flatnonzero of a C-contiguous bool array with few Trues (a mask's
    edges): the 8-byte words that hold any first, then the bytes within them
    (np.nonzero over every byte takes 1.6 ns a byte)."""
    flat = x.reshape(-1)
    n8 = flat.size - flat.size % 8
    words = np.flatnonzero(flat[:n8].view(np.uint64))  # [K] words holding a True
    r, c = np.nonzero(flat[:n8].reshape(-1, 8)[words])
    return np.concatenate([words[r] * 8 + c, np.flatnonzero(flat[n8:]) + n8])


@implements(MaskData, "cat")
def mask_data_cat(self: MaskData, new_stats: MaskData) -> None:
    """Replaces MaskData.cat: the official loop (MaskData._cat) with RLE records
    (dicts of a size and a list of counts, the generator's lists) copied as
    deepcopy would copy them (new dicts and lists, the same int objects)
    without deepcopy's walk over every count: 3 s of truck.jpg's run. Any
    other item is deep-copied."""
    self._cat(new_stats, _copy)


def _copy(v):
    """deepcopy(v), with each RLE record of a list (a size and counts, lists of
    plain ints: immutable, so shared as deepcopy shares them) copied as new
    lists in a new dict."""
    if not isinstance(v, list):
        return deepcopy(v)
    return [{"size": list(item["size"]), "counts": list(item["counts"])} if _is_rle(item) else deepcopy(item)
            for item in v]


def _is_rle(item) -> bool:
    return (type(item) is dict and item.keys() == {"size", "counts"}
            and all(type(part) is list and set(map(type, part)) <= {int} for part in item.values()))
