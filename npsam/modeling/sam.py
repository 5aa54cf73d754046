"""Mirror of segment_anything/modeling/sam.py: Sam (forward, preprocess, postprocess_masks).

Dimension letters:
    B  batch    C  channels    H, W  image height/width    h, w  input size after resize
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from .. import fast
from ..kernels.nn import Module, WeightsMissingError

# NOTE(reference): Sam's defaults, in RGB, for pixel values 0..255.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(Module):
    """Mirror of modeling/sam.py: Sam. Holds the three modules and the image normalisation."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, image_encoder: Module, prompt_encoder: Module, mask_decoder: Module,
                 pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD, model_type: str = "") -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.model_type = model_type
        # Buffers of the official state_dict ([3, 1, 1]); a checkpoint may omit them.
        self.register_parameter("pixel_mean", (3, 1, 1), optional=True)
        self.register_parameter("pixel_std", (3, 1, 1), optional=True)
        self._params["pixel_mean"] = np.asarray(pixel_mean, dtype=np.float32).reshape(3, 1, 1)
        self._params["pixel_std"] = np.asarray(pixel_std, dtype=np.float32).reshape(3, 1, 1)

    @property
    def dtype(self):
        """The compute dtype: that of the loaded weights (any part may be absent)."""
        for part in (self.prompt_encoder, self.mask_decoder, self.image_encoder):
            for arr in part.state_dict().values():
                if arr.dtype.kind == "f":
                    return arr.dtype
        raise WeightsMissingError("this model has no weights loaded")

    @property
    def has_image_encoder(self) -> bool:
        return self.image_encoder.is_loaded()

    def require_image_encoder(self) -> None:
        if not self.has_image_encoder:
            raise WeightsMissingError(
                "this model has no image encoder weights (it was loaded from a decoder-only checkpoint); "
                "load a checkpoint with image_encoder.* keys, or pass an image embedding computed elsewhere "
                "(SamPredictor.set_embedding)")

    def forward(self, batched_input: List[Dict[str, Any]], multimask_output: bool) -> List[Dict[str, np.ndarray]]:
        """Mirror of modeling/sam.py: Sam.forward. Each record: "image" [3, h, w] (resized,
        not normalised), "original_size" (H, W), optional "point_coords" [B, N, 2] and
        "point_labels" [B, N], "boxes" [B, 4], "mask_inputs" [B, 1, 256, 256]
        -> per record "masks" [B, C, H, W] bool, "iou_predictions" [B, C],
        "low_res_logits" [B, C, 256, 256] (C = 3 or 1)."""
        self.require_image_encoder()
        input_images = np.stack([self.preprocess(x["image"]) for x in batched_input], axis=0)  # -> [N, 3, S, S]
        image_embeddings = self.image_encoder(input_images)  # -> [N, C, S/16, S/16]

        outputs = []
        for image_record, curr_embedding in zip(batched_input, image_embeddings):
            if "point_coords" in image_record:
                points = (image_record["point_coords"], image_record["point_labels"])
            else:
                points = None
            sparse_embeddings, dense_embeddings = self.prompt_encoder(
                points=points, boxes=image_record.get("boxes", None), masks=image_record.get("mask_inputs", None))
            low_res_masks, iou_predictions = self.mask_decoder(
                image_embeddings=curr_embedding[None], image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse_embeddings, dense_prompt_embeddings=dense_embeddings,
                multimask_output=multimask_output)
            masks = self.postprocess_masks(low_res_masks, input_size=image_record["image"].shape[-2:],
                                           original_size=image_record["original_size"])
            masks = masks > self.mask_threshold
            outputs.append({"masks": masks, "iou_predictions": iou_predictions, "low_res_logits": low_res_masks})
        return outputs

    # What code written for segment_anything calls on the model (every official
    # notebook does sam.to(device=...)): npsam runs on the CPU, for inference only.
    def to(self, *args, **kwargs) -> "Sam":
        """No-op: npsam has one device, the CPU; the dtype is chosen when loading."""
        return self

    def eval(self) -> "Sam":
        """No-op: npsam is always in inference mode."""
        return self

    def train(self, mode: bool = True) -> "Sam":
        """``train(False)`` is eval(); ``train(True)`` raises: npsam does inference only."""
        if mode:
            raise NotImplementedError("Sam.train(True): npsam does inference only (no gradients, no dropout)")
        return self

    @fast.dispatch
    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """Normalize pixel values and pad to a square input: [B, 3, h, w] -> [B, 3, S, S]."""
        x = (x - self.pixel_mean.astype(self.dtype)) / self.pixel_std.astype(self.dtype)
        h, w = x.shape[-2:]
        size = self.image_encoder.img_size
        # NOTE(reference): zero padding at the bottom and right, after normalisation.
        return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, size - h), (0, size - w)])

    def postprocess_masks(self, masks: np.ndarray, input_size: Tuple[int, ...],
                          original_size: Tuple[int, ...]) -> np.ndarray:
        """Remove padding and upscale masks to the original image size:
        [B, C, 256, 256] -> [B, C, H, W].

        NOTE(reference): two bilinear resizes (align_corners=False): first to the
        square encoder input (1024), then, after cropping the padding, to the
        original size. They run as one separable map (resize.upscale_crop_resize):
        the same mathematics, never building the [B, C, S, S] intermediate.
        """
        from ..kernels.resize import upscale_crop_resize

        size = self.image_encoder.img_size
        # [B, C, 256, 256] -> [B, C, S, S] -> crop [..., :h, :w] -> [B, C, H, W]
        return upscale_crop_resize(masks, (size, size), (int(input_size[0]), int(input_size[1])),
                                   tuple(original_size))
