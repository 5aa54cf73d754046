"""Mirror of segment_anything/modeling/mask_decoder.py: MaskDecoder, MLP.

Dimension letters:
    B  prompts in the batch     T  tokens = 1 IoU token + M mask tokens + sparse prompts
    M  mask tokens (num_multimask_outputs + 1 = 4)      C  transformer_dim (256)
    H, W  image embedding size (64)    4H, 4W  upscaled size (256)
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from . import ops
from .checks import check_array, check_bool, check_same
from .common import LayerNorm2d
from .nn import GELU, ConvTranspose2d, Embedding, Linear, Module, ModuleList, Sequential


class MLP(Module):
    """Mirror of mask_decoder.py: MLP (Linear layers, ReLU between, optional sigmoid)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 sigmoid_output: bool = False) -> None:
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = ModuleList(Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: np.ndarray) -> np.ndarray:
        for i, layer in enumerate(self.layers):
            x = ops.relu(layer(x)) if i < self.num_layers - 1 else layer(x)  # [..., in] -> [..., out]
        if self.sigmoid_output:
            x = ops.sigmoid(x)
        return x


class MaskDecoder(Module):
    """Mirror of mask_decoder.py: MaskDecoder.

    Output tokens (one for IoU, M for masks) and the prompt tokens run through
    the two-way transformer with the image embedding; the image side is then
    upscaled 4x, and each mask token, through its own hypernetwork MLP, becomes
    the weights of a per-pixel dot product with the upscaled embedding.
    """

    def __init__(self, *, transformer_dim: int, transformer: Module, num_multimask_outputs: int = 3,
                 activation=GELU, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = Embedding(1, transformer_dim)
        # NOTE(reference): one mask token more than the multimask outputs: token 0
        # is the single-mask output, tokens 1..3 the three candidates.
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = Embedding(self.num_mask_tokens, transformer_dim)
        # NOTE(reference): Sequential indexes 0..4 with the GELUs at 2 and 4, so the
        # state_dict has output_upscaling.0, .1 (LayerNorm2d) and .3.
        self.output_upscaling = Sequential([
            ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        ])
        self.output_hypernetworks_mlps = ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def _check(self, image_embeddings, image_pe, sparse, dense):
        c = self.transformer_dim
        dtype = self.iou_token.weight.dtype
        emb = check_array("image_embeddings", image_embeddings, (1, c, "H", "W"))
        h, w = emb.shape[2:]
        pe = check_array("image_pe", image_pe, (1, c, h, w))
        sparse = check_array("sparse_prompt_embeddings", sparse, ("B", "N", c))
        b = sparse.shape[0]
        dense = check_array("dense_prompt_embeddings", dense, ("B", c, h, w))
        if dense.shape[0] != 1:
            check_same("sparse_prompt_embeddings", b, "dense_prompt_embeddings", dense.shape[0], "batch size")
        return emb.astype(dtype, copy=False), pe.astype(dtype, copy=False), \
            sparse.astype(dtype, copy=False), dense.astype(dtype, copy=False)

    def forward(self, image_embeddings: np.ndarray, image_pe: np.ndarray, sparse_prompt_embeddings: np.ndarray,
                dense_prompt_embeddings: np.ndarray, multimask_output: bool) -> Tuple[np.ndarray, np.ndarray]:
        """-> masks [B, 3 or 1, 4H, 4W] (logits), iou_pred [B, 3 or 1]."""
        multimask_output = check_bool("multimask_output", multimask_output)
        args = self._check(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        masks, iou_pred = self.predict_masks(*args)
        # NOTE(reference): multimask returns tokens 1..3; single-mask returns token 0.
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def predict_masks(self, image_embeddings: np.ndarray, image_pe: np.ndarray, sparse_prompt_embeddings: np.ndarray,
                      dense_prompt_embeddings: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """All M masks and IoU predictions: -> [B, M, 4H, 4W], [B, M]."""
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = np.concatenate([self.iou_token.weight, self.mask_tokens.weight], axis=0)  # -> [1+M, C]
        output_tokens = np.broadcast_to(output_tokens[None], (b,) + output_tokens.shape)  # -> [B, 1+M, C]
        tokens = np.concatenate([output_tokens, sparse_prompt_embeddings], axis=1)  # -> [B, T, C]

        # NOTE(reference): official repeat_interleave's the (batch-1) image
        # embedding once per prompt; adding the dense embedding makes the copies.
        src = image_embeddings + dense_prompt_embeddings  # [1, C, H, W] + [B, C, H, W] -> [B, C, H, W]
        src = np.broadcast_to(src, (b,) + src.shape[1:])
        pos_src = np.broadcast_to(image_pe, (b,) + image_pe.shape[1:])  # [1, C, H, W] -> [B, C, H, W]
        _, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)  # -> [B, T, C], [B, HW, C]
        iou_token_out = hs[:, 0, :]  # -> [B, C]
        mask_tokens_out = hs[:, 1:(1 + self.num_mask_tokens), :]  # -> [B, M, C]

        src = src.transpose(0, 2, 1).reshape(b, c, h, w)  # [B, HW, C] -> [B, C, H, W]
        upscaled_embedding = self.output_upscaling(src)  # -> [B, C/8, 4H, 4W]
        hyper_in = np.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(self.num_mask_tokens)],
            axis=1)  # M x [B, C/8] -> [B, M, C/8]
        b, c8, h4, w4 = upscaled_embedding.shape
        masks = hyper_in @ upscaled_embedding.reshape(b, c8, h4 * w4)  # [B, M, C/8] @ [B, C/8, 16HW] -> [B, M, 16HW]
        masks = masks.reshape(b, -1, h4, w4)  # -> [B, M, 4H, 4W]

        iou_pred = self.iou_prediction_head(iou_token_out)  # [B, C] -> [B, M]
        return masks, iou_pred
