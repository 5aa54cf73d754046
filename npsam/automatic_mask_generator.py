"""Mirror of segment_anything/automatic_mask_generator.py: SamAutomaticMaskGenerator.

A grid of single-point prompts over the image (and, optionally, over crops of
it) goes through the predictor in batches; masks are filtered by predicted
IoU, stability and crop edges, de-duplicated by box NMS (within each crop,
then between crops), optionally cleaned of small islands and holes, and
returned as records.

Dimension letters:
  N  points (prompts)   C  masks per point (3, multimask)   M  masks kept
  H, W  original image  h, w  crop
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import fast
from .kernels.nms import batched_nms, box_area  # NOTE(reference): torchvision.ops.boxes
from .utils.amg import (
    MaskData,
    area_from_rle,
    batch_iterator,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# The default bound on a generate() call's memory (the process's, and its worker
# processes' on the fast path), in bytes: room for two processes on photos up
# to about 1 MP (fast/automatic_mask_generator.py, plan_processes).
DEFAULT_MEMORY_LIMIT = 3 << 29  # 1.5 GiB


class PhotoTooLargeError(ValueError):
    """A photo that cannot be segmented within the generator's memory_limit."""


def too_large_message(photo_size, need: int, points_per_batch: int, memory_limit: int) -> str:
    h, w = photo_size
    return (f"image: a {w}x{h} photo needs about {need / 2**30:.2f} GiB to segment with points_per_batch="
            f"{points_per_batch}, more than memory_limit={memory_limit / 2**30:.2f} GiB; raise memory_limit "
            f"(npsam everything --memory-limit GIB), lower points_per_batch, or downscale the photo")


class SamAutomaticMaskGenerator:
    """Mirror of automatic_mask_generator.py: SamAutomaticMaskGenerator.

    Every official option, with the official defaults (chosen for ViT-H).
    ``progress``, if given, is called as ``progress(done, total)`` after each
    batch of points (total counts the batches of every crop). ``memory_limit``
    (bytes; None: 1.5 GiB on the fast path, no bound on the official logic,
    which holds whole batches at the photo's size) bounds generate()'s
    memory, its worker processes' included: a photo that cannot be segmented
    within it is refused before any work (PhotoTooLargeError).
    ``processes``: on the fast path, the processes that run the batches of
    points (this one and workers forked from it, on Linux): None for one per
    npsam thread (NPSAM_NUM_THREADS) as far as memory_limit allows, 1 for
    this process alone. The records are the same for any number.

    The official logic is below; the fast layer
    (npsam/fast/automatic_mask_generator.py) replaces _process_batch with an
    exact twin that prunes work and bounds memory, and _batches with one that
    runs the batches in worker processes, unless ``with
    npsam.reference():`` is in force.
    """

    def __init__(
        self,
        model,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        progress: Optional[Callable[[int, int], None]] = None,
        memory_limit: Optional[int] = None,
        processes: Optional[int] = None,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError(
                "points_per_side, point_grids: exactly one must be given, got "
                f"points_per_side={points_per_side!r} and point_grids={'None' if point_grids is None else 'a list'}"
            )
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(
                points_per_side,
                crop_n_layers,
                crop_n_points_downscale_factor,
            )
        else:
            self.point_grids = [np.asarray(g) for g in point_grids]
            if len(self.point_grids) < crop_n_layers + 1:
                raise ValueError(
                    f"point_grids: expected one grid per crop layer ({crop_n_layers + 1}), got {len(self.point_grids)}"
                )
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode: expected one of {OUTPUT_MODES}, got {output_mode!r}")
        if output_mode == "coco_rle":
            try:
                from pycocotools import mask as mask_utils  # type: ignore # noqa: F401
            except ImportError as e:
                raise ImportError('output_mode="coco_rle" needs pycocotools: pip install "npsam[coco]"') from e
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch: expected a positive int, got {points_per_batch}")
        if memory_limit is not None and not (isinstance(memory_limit, (int, np.integer)) and memory_limit > 0):
            raise ValueError(f"memory_limit: expected a positive number of bytes, got {memory_limit!r}")
        if processes is not None and not (isinstance(processes, (int, np.integer)) and processes >= 1):
            raise ValueError(f"processes: expected a whole number >= 1 (or None), got {processes!r}")
        # NOTE(reference): the official imports cv2 when min_mask_region_area > 0;
        # remove_small_regions calls npsam's stand-in (kernels/connected_components.py).

        from .predictor import SamPredictor  # imported here: the predictor pulls in the model code

        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.progress = progress
        self.memory_limit = None if memory_limit is None else int(memory_limit)
        self.processes = None if processes is None else int(processes)

    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Masks for the whole image (HWC uint8), as a list of records.

        Each record: segmentation ([H, W] bool, or an RLE dict), area (int),
        bbox (XYWH list), predicted_iou (float), point_coords ([[x, y]]),
        stability_score (float), crop_box (XYWH list).
        """
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
            got = image.shape if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"image: expected an HWC array with 3 channels, got {got}")
        self.check_memory(image.shape[:2])

        # Generate masks
        mask_data = self._generate_masks(image)

        # Filter small disconnected regions and holes in masks
        if self.min_mask_region_area > 0:
            mask_data = self.postprocess_small_regions(
                mask_data,
                self.min_mask_region_area,
                max(self.box_nms_thresh, self.crop_nms_thresh),
            )

        # Encode masks
        if self.output_mode == "coco_rle":
            mask_data["segmentations"] = [coco_encode_rle(rle) for rle in mask_data["rles"]]
        elif self.output_mode == "binary_mask":
            mask_data["segmentations"] = [rle_to_mask(rle) for rle in mask_data["rles"]]
        else:
            mask_data["segmentations"] = mask_data["rles"]

        # Write mask records
        curr_anns = []
        for idx in range(len(mask_data["segmentations"])):
            ann = {
                "segmentation": mask_data["segmentations"][idx],
                "area": area_from_rle(mask_data["rles"][idx]),
                "bbox": box_xyxy_to_xywh(mask_data["boxes"][idx]).tolist(),
                "predicted_iou": mask_data["iou_preds"][idx].item(),
                "point_coords": [mask_data["points"][idx].tolist()],
                "stability_score": mask_data["stability_score"][idx].item(),
                "crop_box": box_xyxy_to_xywh(mask_data["crop_boxes"][idx]).tolist(),
            }
            curr_anns.append(ann)

        return curr_anns

    def check_memory(self, photo_size: Tuple[int, int]) -> None:
        """Raise PhotoTooLargeError, before any work, if a photo of photo_size
        (H, W) cannot be segmented within memory_limit."""
        impl = fast.implementation(self, "check_memory")
        if impl is not None:
            return impl(self, photo_size)
        # NOTE(reference): the official batch holds all its masks at the photo's
        # size: [N*C, H, W] float32 logits, their filtered copy and the bool masks.
        need = 3 * self.points_per_batch * int(photo_size[0]) * int(photo_size[1]) * (4 + 4 + 1)
        if self.memory_limit is not None and need > self.memory_limit:
            raise PhotoTooLargeError(too_large_message(photo_size, need, self.points_per_batch, self.memory_limit))

    def _generate_masks(self, image: np.ndarray) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        self._batches_done = 0
        self._batches_total = sum(
            -(-len(self.point_grids[layer_idx]) // self.points_per_batch) for layer_idx in layer_idxs
        )

        # Iterate over image crops
        data = MaskData()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            crop_data = self._process_crop(image, crop_box, layer_idx, orig_size)
            data.cat(crop_data)

        # Remove duplicate masks between crops
        # NOTE(reference): the official raises IndexError here when no crop kept
        # any mask (box_area of the float32 [0] crop_boxes); we return no masks.
        if len(crop_boxes) > 1 and len(data["rles"]) > 0:
            # Prefer masks from smaller crops
            # NOTE(reference): 1 / (int64 tensor) is computed in torch's default float32.
            scores = np.float32(1) / box_area(data["crop_boxes"]).astype(np.float32)  # [M]
            keep_by_nms = batched_nms(
                data["boxes"].astype(np.float32),
                scores,
                np.zeros(len(data["boxes"]), dtype=np.float32),  # categories
                iou_threshold=self.crop_nms_thresh,
            )
            data.filter(keep_by_nms)

        data.to_numpy()
        return data

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: List[int],
        crop_layer_idx: int,
        orig_size: Tuple[int, ...],
    ) -> MaskData:
        # Crop the image and calculate embeddings
        x0, y0, x1, y1 = crop_box
        cropped_im = image[y0:y1, x0:x1, :]  # [H, W, 3] -> [h, w, 3]
        cropped_im_size = cropped_im.shape[:2]
        self.predictor.set_image(cropped_im)

        # Get points for this crop
        points_scale = np.array(cropped_im_size)[None, ::-1]  # [1, 2] as (w, h)
        points_for_image = self.point_grids[crop_layer_idx] * points_scale  # [N, 2]

        # Generate masks for this crop in batches
        data = MaskData()
        # NOTE(reference): the official loop calls _process_batch here; _batches makes
        # those calls (the fast layer's twin in worker processes) and counts progress
        for batch_data in self._batches(points_for_image, cropped_im_size, crop_box, orig_size):
            data.cat(batch_data)
            del batch_data
        self.predictor.reset_image()

        # Remove duplicates within this crop.
        keep_by_nms = batched_nms(
            data["boxes"].astype(np.float32),
            data["iou_preds"],
            np.zeros(len(data["boxes"]), dtype=np.float32),  # categories
            iou_threshold=self.box_nms_thresh,
        )
        data.filter(keep_by_nms)

        # Return to the original image frame
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        n = len(data["rles"])
        # NOTE(reference): torch.tensor([]) for a crop with no masks is float32 [0], not int64 [0, 4].
        data["crop_boxes"] = np.array([crop_box for _ in range(n)]) if n else np.zeros(0, dtype=np.float32)

        return data

    def _batches(
        self,
        points_for_image: np.ndarray,
        im_size: Tuple[int, ...],
        crop_box: List[int],
        orig_size: Tuple[int, ...],
    ) -> Iterator[MaskData]:
        """The crop's batches of points through _process_batch, their MaskData in
        order, each counted for ``progress`` when it is done."""
        impl = fast.implementation(self, "_batches")  # the same calls, in worker processes
        if impl is not None:
            yield from impl(self, points_for_image, im_size, crop_box, orig_size)
            return
        for (points,) in batch_iterator(self.points_per_batch, points_for_image):
            batch_data = self._process_batch(points, im_size, crop_box, orig_size)
            self._batches_done += 1
            if self.progress is not None:
                self.progress(self._batches_done, self._batches_total)
            yield batch_data

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: Tuple[int, ...],
        crop_box: List[int],
        orig_size: Tuple[int, ...],
    ) -> MaskData:
        impl = fast.implementation(self, "_process_batch")  # the exact, pruned twin
        if impl is not None:
            return impl(self, points, im_size, crop_box, orig_size)
        orig_h, orig_w = orig_size

        # Run model on this batch
        transformed_points = self.predictor.transform.apply_coords(points, im_size)  # [N, 2] float64
        in_points = np.asarray(transformed_points)
        in_labels = np.ones(in_points.shape[0], dtype=np.int32)  # NOTE(reference): torch.int
        masks, iou_preds, _ = self.predictor.predict_batch(
            in_points[:, None, :],  # [N, 2] -> [N, 1, 2]
            in_labels[:, None],  # [N] -> [N, 1]
            multimask_output=True,
            return_logits=True,
        )  # masks [N, C, h', w'] logits at the original size, iou_preds [N, C]

        # Serialize predictions and store in MaskData
        data = MaskData(
            masks=masks.reshape(-1, *masks.shape[2:]),  # [N, C, H, W] -> [N*C, H, W]
            iou_preds=iou_preds.reshape(-1),  # [N, C] -> [N*C]
            points=points.repeat(masks.shape[1], axis=0),  # [N, 2] -> [N*C, 2]
        )
        del masks

        # Filter by predicted IoU
        if self.pred_iou_thresh > 0.0:
            keep_mask = data["iou_preds"] > self.pred_iou_thresh
            data.filter(keep_mask)

        # Calculate stability score
        data["stability_score"] = calculate_stability_score(
            data["masks"], self.predictor.model.mask_threshold, self.stability_score_offset
        )
        if self.stability_score_thresh > 0.0:
            keep_mask = data["stability_score"] >= self.stability_score_thresh
            data.filter(keep_mask)

        # Threshold masks and calculate boxes
        data["masks"] = data["masks"] > self.predictor.model.mask_threshold  # [M, H, W] bool
        data["boxes"] = batched_mask_to_box(data["masks"])  # [M, 4]

        # Filter boxes that touch crop boundaries
        keep_mask = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if not np.all(keep_mask):
            data.filter(keep_mask)

        # Compress to RLE
        data["masks"] = uncrop_masks(data["masks"], crop_box, orig_h, orig_w)  # [M, h, w] -> [M, H, W]
        data["rles"] = mask_to_rle(data["masks"])
        del data["masks"]

        return data

    @staticmethod
    def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Remove small disconnected regions and holes in masks, then rerun box
        NMS to remove any new duplicates. Edits mask_data in place."""
        if len(mask_data["rles"]) == 0:
            return mask_data

        # Filter small disconnected regions and holes
        new_masks = []
        scores = []
        for rle in mask_data["rles"]:
            mask = rle_to_mask(rle)

            mask, changed = remove_small_regions(mask, min_area, mode="holes")
            unchanged = not changed
            mask, changed = remove_small_regions(mask, min_area, mode="islands")
            unchanged = unchanged and not changed

            new_masks.append(mask[None])  # [H, W] -> [1, H, W]
            # Give score=0 to changed masks and score=1 to unchanged masks
            # so NMS will prefer ones that didn't need postprocessing
            scores.append(float(unchanged))

        # Recalculate boxes and remove any new duplicates
        masks = np.concatenate(new_masks, axis=0)  # [M, H, W]
        boxes = batched_mask_to_box(masks)  # [M, 4]
        keep_by_nms = batched_nms(
            boxes.astype(np.float32),
            np.asarray(scores, dtype=np.float32),  # NOTE(reference): torch.as_tensor(list of floats)
            np.zeros(len(boxes), dtype=np.float32),  # categories
            iou_threshold=nms_thresh,
        )

        # Only recalculate RLEs for masks that have changed
        for i_mask in keep_by_nms:
            if scores[i_mask] == 0.0:
                mask_data["rles"][i_mask] = mask_to_rle(masks[i_mask][None])[0]
                mask_data["boxes"][i_mask] = boxes[i_mask]  # update res directly
        mask_data.filter(keep_by_nms)

        return mask_data
