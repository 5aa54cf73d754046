"""Mirror of segment_anything/utils/onnx.py: SamOnnxModel, the single call that
web demos make against the official ONNX export, on NumPy arrays.

Dimension letters:
    B  batch (1 in the official export)   N  points (clicks, box corners, padding)
    M  mask tokens (4)    H, W  original image size     S  encoder input size (1024)
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .amg import calculate_stability_score
from ..kernels.checks import check_array
from ..kernels.resize import upscale_crop_resize
from ..modeling.sam import Sam


class SamOnnxModel:
    """Mirror of utils/onnx.py: SamOnnxModel.

    ``model(image_embeddings, point_coords, point_labels, mask_input,
    has_mask_input, orig_im_size)`` returns ``(masks, iou_predictions,
    low_res_masks)``, or with ``return_extra_metrics`` ``(masks,
    iou_predictions, stability_scores, areas, low_res_masks)``, exactly as the
    official export. Point labels: -1 padding, 0 background, 1 foreground,
    2 box top-left, 3 box bottom-right; coordinates in the 1024 input frame.
    """

    def __init__(self, model: Sam, return_single_mask: bool, use_stability_score: bool = False,
                 return_extra_metrics: bool = False) -> None:
        self.model = model
        self.mask_decoder = model.mask_decoder
        self.img_size = model.image_encoder.img_size
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.stability_score_offset = 1.0
        self.return_extra_metrics = return_extra_metrics

    @staticmethod
    def resize_longest_image_size(input_image_size: np.ndarray, longest_side: int) -> np.ndarray:
        """[2] (H, W) -> the resized (h, w), computed in float32 as the export does.

        NOTE(reference): float32 here, unlike ResizeLongestSide.get_preprocess_shape
        (Python floats); the two can differ by one pixel at exact .5 cases.
        """
        size = input_image_size.astype(np.float32)
        scale = np.float32(longest_side) / np.max(size)
        return np.floor(scale * size + np.float32(0.5)).astype(np.int64)

    def _embed_points(self, point_coords: np.ndarray, point_labels: np.ndarray) -> np.ndarray:
        """[B, N, 2], [B, N] -> [B, N, C]. Box corners arrive as points labelled 2 and 3."""
        pe = self.model.prompt_encoder
        point_coords = point_coords + 0.5  # NOTE(reference): shift to the centre of the pixel
        point_coords = point_coords / self.img_size
        point_embedding = pe.pe_layer._pe_encoding(point_coords)  # -> [B, N, C]
        labels = point_labels[..., None]  # -> [B, N, 1], broadcast over C
        # NOTE(reference): masks by multiplication instead of indexing, so the
        # export has no control flow; the result equals PromptEncoder._embed_points.
        point_embedding = point_embedding * (labels != -1)
        point_embedding = point_embedding + pe.not_a_point_embed.weight * (labels == -1)
        for i in range(pe.num_point_embeddings):
            point_embedding = point_embedding + pe.point_embeddings[i].weight * (labels == i)
        return point_embedding

    def _embed_masks(self, input_mask: np.ndarray, has_mask_input: np.ndarray) -> np.ndarray:
        """[B, 1, 256, 256], [1] -> [B, C, 64, 64]: the mask embedding, or no_mask_embed."""
        pe = self.model.prompt_encoder
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)  # [1, C, 1, 1]
        # The export blends both without control flow; with has_mask_input exactly
        # 0 or 1 the blend is exactly one side (0 * finite = 0, x + 0 = x), so the
        # other side need not be computed. The broadcast no-mask embedding also
        # lets the decoder share the image side across calls on one image.
        if has_mask_input[0] == 0:
            return np.broadcast_to(no_mask, (input_mask.shape[0], pe.embed_dim) + pe.image_embedding_size)
        if has_mask_input[0] == 1:
            return pe.mask_downscaling(input_mask)
        mask_embedding = has_mask_input * pe.mask_downscaling(input_mask)
        return mask_embedding + (1 - has_mask_input) * no_mask

    def mask_postprocessing(self, masks: np.ndarray, orig_im_size: np.ndarray) -> np.ndarray:
        """[B, M, 256, 256] -> [B, M, H, W]: upscale to S, crop the padding, resize to H, W
        (two bilinear resizes, run as one separable map: see resize.upscale_crop_resize)."""
        prepadded_size = self.resize_longest_image_size(orig_im_size, self.img_size)
        h, w = orig_im_size.astype(np.int64)
        # [B, M, 256, 256] -> [B, M, S, S] -> crop [..., :h', :w'] -> [B, M, H, W]
        return upscale_crop_resize(masks, (self.img_size, self.img_size),
                                   (int(prepadded_size[0]), int(prepadded_size[1])), (int(h), int(w)))

    def select_masks(self, masks: np.ndarray, iou_preds: np.ndarray, num_points: int
                     ) -> Tuple[np.ndarray, np.ndarray]:
        """Pick one mask per prompt: [B, M, ...], [B, M] -> [B, 1, ...], [B, 1].

        NOTE(reference): with 3 or more points (padding included) token 0, the
        single-mask output, wins by a margin of 1000; with fewer, it loses by 500
        and the best of the three multimask candidates by IoU is taken.
        """
        score_reweight = np.array([[1000] + [0] * (self.mask_decoder.num_mask_tokens - 1)], dtype=iou_preds.dtype)
        score = iou_preds + (num_points - 2.5) * score_reweight
        best_idx = np.argmax(score, axis=1)  # -> [B]
        rows = np.arange(masks.shape[0])
        return masks[rows, best_idx][:, None], iou_preds[rows, best_idx][:, None]

    def _check(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size):
        pe = self.model.prompt_encoder
        dtype = pe.dtype
        # NaN and inf in the embedding: checked by the decoder, once per image
        emb = check_array("image_embeddings", image_embeddings, (1, pe.embed_dim) + pe.image_embedding_size,
                          finite=False)
        coords = check_array("point_coords", point_coords, (1, "N", 2))
        labels = check_array("point_labels", point_labels, (1, coords.shape[1]))
        if not np.all(np.isin(labels, (-1, 0, 1, 2, 3))):
            raise ValueError(f"point_labels: expected values in -1, 0, 1, 2, 3, got {np.unique(labels).tolist()}")
        mask = check_array("mask_input", mask_input, (1, 1) + pe.mask_input_size)
        has = check_array("has_mask_input", has_mask_input, (1,))
        size = check_array("orig_im_size", orig_im_size, (2,))
        if np.any(size < 1):
            raise ValueError(f"orig_im_size: expected (H, W) >= 1, got {size.tolist()}")
        # copy=False: the same embedding array on every call lets the decoder's
        # per-image cache recognise it
        return (emb.astype(dtype, copy=False), coords.astype(dtype), labels.astype(dtype),
                mask.astype(dtype, copy=False), has.astype(dtype), size.astype(np.float32))

    def __call__(self, image_embeddings: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray,
                 mask_input: np.ndarray, has_mask_input: np.ndarray, orig_im_size: np.ndarray):
        (image_embeddings, point_coords, point_labels, mask_input, has_mask_input,
         orig_im_size) = self._check(image_embeddings, point_coords, point_labels, mask_input,
                                     has_mask_input, orig_im_size)
        sparse_embedding = self._embed_points(point_coords, point_labels)  # -> [1, N, C]
        dense_embedding = self._embed_masks(mask_input, has_mask_input)  # -> [1, C, 64, 64]
        masks, scores = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_embedding,
            dense_prompt_embeddings=dense_embedding,
        )  # -> [1, M, 256, 256], [1, M]
        if self.use_stability_score:
            scores = calculate_stability_score(masks, self.model.mask_threshold, self.stability_score_offset)
        if self.return_single_mask:
            masks, scores = self.select_masks(masks, scores, point_coords.shape[1])
        upscaled_masks = self.mask_postprocessing(masks, orig_im_size)
        if self.return_extra_metrics:
            stability_scores = calculate_stability_score(upscaled_masks, self.model.mask_threshold,
                                                         self.stability_score_offset)
            areas = (upscaled_masks > self.model.mask_threshold).sum(-1).sum(-1)
            return upscaled_masks, scores, stability_scores, areas, masks
        return upscaled_masks, scores, masks
