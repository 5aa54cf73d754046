"""Mirror of segment_anything/predictor.py: SamPredictor, on NumPy arrays.

Dimension letters:
    H, W  original image size    h, w  resized input size (longest side 1024)
    B  prompts in a batch        N  points per prompt      C  masks per prompt (3 or 1)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from .kernels.checks import check_array, check_bool
from .io.image_io import check_image
from .modeling.sam import Sam
from .utils.transforms import ResizeLongestSide


class SamPredictor:
    """Mirror of predictor.py: SamPredictor.

    Computes the image embedding once (``set_image``), then predicts masks for
    any number of prompts (``predict``). Beyond the official API:
    ``set_embedding`` (decoder-only use with an embedding computed elsewhere)
    and ``predict_batch`` accepting prompts with different numbers of points.
    """

    def __init__(self, sam_model: Sam) -> None:
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    # -- the image ----------------------------------------------------------
    def set_image(self, image: np.ndarray, image_format: str = "RGB",
                  progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Embed an HxWx3 uint8 image (RGB, or BGR with image_format="BGR")."""
        self.model.require_image_encoder()
        # check_image validates and reverses BGR, as official (`image[..., ::-1]`)
        image = check_image(image, image_format)
        input_image = self.transform.apply_image(image)  # [H, W, 3] -> [h, w, 3] uint8 (PIL bilinear)
        input_image = input_image.transpose(2, 0, 1)[None]  # -> [1, 3, h, w]
        self.set_torch_image(input_image, image.shape[:2], progress=progress)

    def set_torch_image(self, transformed_image: np.ndarray, original_image_size: Tuple[int, int],
                        progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Embed an already-resized image [1, 3, h, w] (max(h, w) == 1024). The name
        is the official one; the input is a NumPy array."""
        self.model.require_image_encoder()
        size = self.model.image_encoder.img_size
        x = check_array("transformed_image", transformed_image, (1, 3, None, None))
        if max(x.shape[2:]) != size:
            raise ValueError(f"transformed_image: expected its longest side to be {size}, got {list(x.shape)}")
        self.reset_image()
        self.original_size = tuple(int(s) for s in original_image_size)
        self.input_size = tuple(int(s) for s in x.shape[-2:])
        input_image = self.model.preprocess(x.astype(self.model.dtype))  # -> [1, 3, 1024, 1024]
        self.features = self.model.image_encoder(input_image, progress=progress)  # -> [1, 256, 64, 64]
        self.is_image_set = True

    def set_embedding(self, embedding: np.ndarray, original_size: Tuple[int, int]) -> None:
        """Use an image embedding computed elsewhere (decoder-only use).

        ``embedding`` [1, 256, 64, 64] must come from the same image encoder
        weights; ``original_size`` is the photo's (H, W).
        """
        pe = self.model.prompt_encoder
        emb = check_array("embedding", embedding, (1, pe.embed_dim) + pe.image_embedding_size)
        if not (isinstance(original_size, (tuple, list, np.ndarray)) and len(original_size) == 2
                and all(int(s) == s and s > 0 for s in original_size)):
            raise ValueError(f"original_size: expected (H, W), two positive integers, got {original_size!r}")
        self.reset_image()
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = self.transform.get_preprocess_shape(*self.original_size, self.transform.target_length)
        self.features = emb.astype(self.model.dtype)
        self.is_image_set = True

    def get_image_embedding(self) -> np.ndarray:
        """The [1, 256, 64, 64] embedding of the current image."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None

    # -- prompts -------------------------------------------------------------
    def predict(self, point_coords: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
                box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
                multimask_output: bool = True, return_logits: bool = False
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt, in original-image pixel coordinates.

        point_coords [N, 2] (x, y), point_labels [N] (1 foreground, 0 background),
        box [4] (x0, y0, x1, y1), mask_input [1, 256, 256] (low-res logits of a
        previous call). Returns masks [C, H, W] (bool, or logits with
        return_logits), scores [C], low-res logits [C, 256, 256].
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        coords = labels = boxes = masks = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels: expected labels [N] to go with point_coords, got None")
            coords = check_array("point_coords", point_coords, ("N", 2))
            labels = check_array("point_labels", point_labels, (coords.shape[0],))
            coords = self.transform.apply_coords(coords, self.original_size)[None]  # -> [1, N, 2]
            labels = labels[None]  # -> [1, N]
        elif point_labels is not None:
            raise ValueError("point_coords: expected points [N, 2] to go with point_labels, got None")
        if box is not None:
            box = check_array("box", box, (4,)) if np.ndim(box) == 1 else check_array("box", box, (1, 4))
            boxes = self.transform.apply_boxes(box, self.original_size).reshape(1, 4)  # -> [1, 4]
        if mask_input is not None:
            masks = check_array("mask_input", mask_input, (1,) + self.model.prompt_encoder.mask_input_size)[None]
        masks_out, iou, low_res = self.predict_batch(coords, labels, boxes, masks, multimask_output, return_logits)
        return masks_out[0], iou[0], low_res[0]

    def predict_batch(self, point_coords=None, point_labels=None, boxes: Optional[np.ndarray] = None,
                      mask_input: Optional[np.ndarray] = None, multimask_output: bool = True,
                      return_logits: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Many prompts against one embedding, with the semantics of the official
        ``predict_torch``: coordinates already transformed to the 1024 input frame
        (``self.transform.apply_coords``), point_coords [B, N, 2], point_labels
        [B, N], boxes [B, 4], mask_input [B, 1, 256, 256].

        point_coords may also be a list of [N_i, 2] arrays with point_labels a list
        of [N_i] arrays: prompts with different numbers of points are padded to
        the longest with label -1 (the padding the official code itself uses).
        A padded prompt is not bit-identical to the same prompt run alone: the
        extra "not a point" tokens take part in the attention.

        Returns masks [B, C, H, W], iou_predictions [B, C], low-res logits [B, C, 256, 256].
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        multimask_output = check_bool("multimask_output", multimask_output)
        return_logits = check_bool("return_logits", return_logits)
        if isinstance(point_coords, (list, tuple)):
            point_coords, point_labels = pad_points(point_coords, point_labels)
        points = None if point_coords is None else (point_coords, point_labels)
        if point_coords is None and point_labels is not None:
            raise ValueError("point_coords: expected points [B, N, 2] to go with point_labels, got None")

        sparse_embeddings, dense_embeddings = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_res_masks, iou_predictions = self.model.mask_decoder(
            image_embeddings=self.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_embeddings,
            dense_prompt_embeddings=dense_embeddings,
            multimask_output=multimask_output,
        )  # -> [B, C, 256, 256], [B, C]
        masks = self.model.postprocess_masks(low_res_masks, self.input_size, self.original_size)  # -> [B, C, H, W]
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou_predictions, low_res_masks

    # NOTE(reference): the official name; here it takes and returns NumPy arrays.
    predict_torch = predict_batch


def pad_points(point_coords: Sequence[np.ndarray], point_labels: Sequence[np.ndarray]
               ) -> Tuple[np.ndarray, np.ndarray]:
    """Stack prompts of N_i points into [B, max N_i, 2] and [B, max N_i], padding
    with the point (0, 0) and label -1 ("not a point")."""
    if point_labels is None or len(point_labels) != len(point_coords):
        raise ValueError(f"point_labels: expected a list of {len(point_coords)} label arrays to match point_coords, "
                         f"got {None if point_labels is None else len(point_labels)}")
    if len(point_coords) == 0:
        raise ValueError("point_coords: expected at least one prompt, got an empty list")
    coords = [check_array(f"point_coords[{i}]", c, ("N", 2)) for i, c in enumerate(point_coords)]
    labels = [check_array(f"point_labels[{i}]", l, (coords[i].shape[0],)) for i, l in enumerate(point_labels)]
    n = max(c.shape[0] for c in coords)
    out_c = np.zeros((len(coords), n, 2), dtype=np.float64)
    out_l = -np.ones((len(coords), n), dtype=np.int64)
    for i, (c, l) in enumerate(zip(coords, labels)):
        out_c[i, : len(c)] = c
        out_l[i, : len(l)] = l
    return out_c, out_l
