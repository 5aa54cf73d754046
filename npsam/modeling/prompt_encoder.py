"""Mirror of segment_anything/modeling/prompt_encoder.py.

Its fast twin (the dense PE computed once per loaded weights) is
npsam/fast/prompt_encoder.py.

Dimension letters:
    B  prompts in the batch     N  points per prompt     C  embed_dim (256)
    H, W  image embedding size (64, 64)                  P  num_pos_feats = C/2
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .. import fast
from ..kernels.checks import check_array, check_same
from .common import LayerNorm2d
from ..kernels.nn import GELU, Conv2d, Embedding, Module, ModuleList, Sequential


class PositionEmbeddingRandom(Module):
    """Mirror of modeling/prompt_encoder.py: PositionEmbeddingRandom.forward (random Fourier features).

    The buffer ``positional_encoding_gaussian_matrix`` [2, P] is part of the
    official state_dict.
    """

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        # NOTE(reference): scale only multiplies the random init; the loaded buffer is used as is.
        self.num_pos_feats = num_pos_feats
        self.register_parameter("positional_encoding_gaussian_matrix", (2, num_pos_feats))

    def _pe_encoding(self, coords: np.ndarray) -> np.ndarray:
        """Positionally encode points normalised to [0, 1]: [..., 2] -> [..., 2P]."""
        gauss = self.positional_encoding_gaussian_matrix
        coords = 2 * coords - 1
        coords = coords @ gauss  # [..., 2] @ [2, P] -> [..., P]
        coords = gauss.dtype.type(2 * np.pi) * coords
        return np.concatenate([np.sin(coords), np.cos(coords)], axis=-1)  # -> [..., 2P]

    def forward(self, size: Tuple[int, int]) -> np.ndarray:
        """Encoding of a grid of pixel centres: -> [2P, h, w]."""
        h, w = size
        dtype = self.positional_encoding_gaussian_matrix.dtype
        # NOTE(reference): official builds ones((h, w)).cumsum(dim) - 0.5, i.e. the
        # pixel centres i + 0.5, exactly; and hard-codes float32 (npsam follows
        # the model's dtype, which is the same in float32).
        y_embed = (np.arange(h, dtype=dtype) + dtype.type(0.5)) / dtype.type(h)  # [h]
        x_embed = (np.arange(w, dtype=dtype) + dtype.type(0.5)) / dtype.type(w)  # [w]
        grid = np.empty((h, w, 2), dtype=dtype)
        grid[..., 0] = x_embed[None, :]
        grid[..., 1] = y_embed[:, None]
        pe = self._pe_encoding(grid)  # [h, w, 2] -> [h, w, 2P]
        return pe.transpose(2, 0, 1)  # -> [2P, h, w], a view, as official pe.permute(2, 0, 1)

    def forward_with_coords(self, coords_input: np.ndarray, image_size: Tuple[int, int]) -> np.ndarray:
        """Encode points in pixels of ``image_size`` (H, W): [B, N, 2] -> [B, N, 2P]."""
        dtype = self.positional_encoding_gaussian_matrix.dtype
        coords = np.array(coords_input, dtype=dtype)  # a copy, as official .clone()
        coords[:, :, 0] = coords[:, :, 0] / dtype.type(image_size[1])  # x by width
        coords[:, :, 1] = coords[:, :, 1] / dtype.type(image_size[0])  # y by height
        return self._pe_encoding(coords)

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}"


class PromptEncoder(Module):
    """Mirror of modeling/prompt_encoder.py: PromptEncoder.forward.

    Points and box corners become sparse embeddings [B, N, C] (a positional
    encoding plus a learned embedding per kind); a mask input becomes a dense
    embedding [B, C, H, W], or the learned ``no_mask_embed`` everywhere.
    """

    def __init__(self, embed_dim: int, image_embedding_size: Tuple[int, int],
                 input_image_size: Tuple[int, int], mask_in_chans: int, activation=GELU) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        self.num_point_embeddings = 4  # pos/neg point + 2 box corners
        self.point_embeddings = ModuleList(Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = Embedding(1, embed_dim)

        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = Sequential([
            Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        ])
        # NOTE(numerics): the mask path is small (16 x 64 x 64 values per prompt at
        # most) and its rounding errors reach every image location through the
        # dense embedding, so its GELUs are evaluated in float64 and rounded.
        for i in (2, 5):
            if isinstance(self.mask_downscaling[i], GELU):
                self.mask_downscaling[i].precise = True
        self.no_mask_embed = Embedding(1, embed_dim)

    @property
    def dtype(self):
        return self.pe_layer.positional_encoding_gaussian_matrix.dtype

    @fast.dispatch
    def get_dense_pe(self) -> np.ndarray:
        """Positional encoding of every image-embedding location: [1, C, H, W]. As
        official, a permuted view of an [H, W, C] array, not C-contiguous."""
        return self.pe_layer(self.image_embedding_size)[None]  # [C, H, W] -> [1, C, H, W]

    def _embed_points(self, points: np.ndarray, labels: np.ndarray, pad: bool) -> np.ndarray:
        """Embeds point prompts: [B, N, 2], [B, N] -> [B, N(+1), C]."""
        points = points + 0.5  # NOTE(reference): shift to the centre of the pixel
        if pad:
            # NOTE(reference): without a box, a padding point (0, 0) with label -1
            # is appended, so the decoder always sees at least one "not a point".
            b = points.shape[0]
            points = np.concatenate([points, np.zeros((b, 1, 2), points.dtype)], axis=1)  # -> [B, N+1, 2]
            labels = np.concatenate([labels, -np.ones((b, 1), labels.dtype)], axis=1)  # -> [B, N+1]
        point_embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)  # -> [B, N, C]
        # NOTE(reference): label -1 zeroes the positional encoding before
        # not_a_point_embed is added; labels 0/1 add to it.
        point_embedding[labels == -1] = 0.0
        point_embedding[labels == -1] += self.not_a_point_embed.weight[0]
        point_embedding[labels == 0] += self.point_embeddings[0].weight[0]
        point_embedding[labels == 1] += self.point_embeddings[1].weight[0]
        return point_embedding

    def _embed_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Embeds box prompts: [B, 4] -> [B, 2, C] (top-left and bottom-right corners)."""
        boxes = boxes + 0.5  # NOTE(reference): shift to the centre of the pixel
        coords = boxes.reshape(-1, 2, 2)  # [B, 4] -> [B, 2, 2]
        corner_embedding = self.pe_layer.forward_with_coords(coords, self.input_image_size)  # -> [B, 2, C]
        corner_embedding[:, 0, :] += self.point_embeddings[2].weight[0]
        corner_embedding[:, 1, :] += self.point_embeddings[3].weight[0]
        return corner_embedding

    def _embed_masks(self, masks: np.ndarray) -> np.ndarray:
        """Embeds mask inputs: [B, 1, 4H, 4W] -> [B, C, H, W]."""
        return self.mask_downscaling(masks)

    def _check(self, points, boxes, masks):
        dtype = self.dtype
        if points is not None:
            if not (isinstance(points, (tuple, list)) and len(points) == 2):
                raise ValueError(f"points: expected a tuple (coords [B, N, 2], labels [B, N]), got {type(points).__name__}")
            coords = check_array("points[0] (coords)", points[0], ("B", "N", 2))
            labels = check_array("points[1] (labels)", points[1], ("B", "N"))
            if labels.shape != coords.shape[:2]:
                raise ValueError(
                    f"points[1] (labels): expected shape {list(coords.shape[:2])} to match coords "
                    f"{list(coords.shape)}, got {list(labels.shape)}")
            if labels.size and not np.all(np.isin(labels, (-1, 0, 1))):
                bad = labels[~np.isin(labels, (-1, 0, 1))].ravel()[0].item()
                raise ValueError(f"points[1] (labels): expected values -1 (padding), 0 (background) or 1 "
                                 f"(foreground), got {bad!r}")
            points = (coords.astype(dtype), labels.astype(np.int64))
        if boxes is not None:
            boxes = check_array("boxes", boxes, ("B", 4)).astype(dtype)
        if masks is not None:
            masks = check_array("masks", masks, ("B", 1) + self.mask_input_size).astype(dtype)
        sizes = [("points", None if points is None else points[0].shape[0]),
                 ("boxes", None if boxes is None else boxes.shape[0]),
                 ("masks", None if masks is None else masks.shape[0])]
        given = [(n, s) for n, s in sizes if s is not None]
        for (n1, s1), (n2, s2) in zip(given, given[1:]):
            check_same(n1, s1, n2, s2, "batch size")
        return points, boxes, masks

    def forward(self, points: Optional[Tuple[np.ndarray, np.ndarray]], boxes: Optional[np.ndarray],
                masks: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Sparse [B, N, C] and dense [B, C, H, W] embeddings of the prompts."""
        points, boxes, masks = self._check(points, boxes, masks)
        # NOTE(reference): the batch size comes from points, else boxes, else masks, else 1.
        bs = next((x.shape[0] for x in (points and points[0], boxes, masks) if x is not None), 1)
        sparse_embeddings = np.empty((bs, 0, self.embed_dim), dtype=self.dtype)
        if points is not None:
            coords, labels = points
            point_embeddings = self._embed_points(coords, labels, pad=(boxes is None))
            sparse_embeddings = np.concatenate([sparse_embeddings, point_embeddings], axis=1)  # -> [B, N, C]
        if boxes is not None:
            box_embeddings = self._embed_boxes(boxes)
            sparse_embeddings = np.concatenate([sparse_embeddings, box_embeddings], axis=1)  # -> [B, N+2, C]
        if masks is not None:
            dense_embeddings = self._embed_masks(masks)  # -> [B, C, H, W]
        else:
            # NOTE(reference): official expands (a view, no copy); so does broadcast_to.
            dense_embeddings = np.broadcast_to(
                self.no_mask_embed.weight.reshape(1, -1, 1, 1),
                (bs, self.embed_dim) + self.image_embedding_size)  # [1, C, 1, 1] -> [B, C, H, W]
        return sparse_embeddings, dense_embeddings
