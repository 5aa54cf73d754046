"""Mirror of segment_anything/modeling/mask_decoder.py: MaskDecoder, MLP.

The official computation in the official order (its fast twin, with the
image kept per image and the upscaling as one pass over pixel rows, is
npsam/fast/mask_decoder.py).

Dimension letters:
    B  prompts in the batch     T  tokens = 1 IoU token + M mask tokens + sparse prompts
    M  mask tokens (num_multimask_outputs + 1 = 4)      C  transformer_dim (256)
    H, W  image embedding size (64)    4H, 4W  upscaled size (256)
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .. import fast
from ..kernels import ops
from ..kernels.checks import check_bool, check_decoder_inputs, check_finite
from ..kernels.nn import GELU, ConvTranspose2d, Embedding, Linear, Module, ModuleList, Sequential
from .common import LayerNorm2d


class MaskDecoder(Module):
    """Mirror of modeling/mask_decoder.py: MaskDecoder.forward, MaskDecoder.predict_masks.

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
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: np.ndarray, image_pe: np.ndarray, sparse_prompt_embeddings: np.ndarray,
                dense_prompt_embeddings: np.ndarray, multimask_output: bool) -> Tuple[np.ndarray, np.ndarray]:
        """image_embeddings, image_pe [1, C, H, W]; sparse [B, N, C]; dense [B, C, H, W]
        -> masks [B, 3 or 1, 4H, 4W] (logits), iou_pred [B, 3 or 1]."""
        multimask_output = check_bool("multimask_output", multimask_output)
        args = check_decoder_inputs(self.transformer_dim, self.iou_token.weight.dtype, image_embeddings, image_pe,
                                    sparse_prompt_embeddings, dense_prompt_embeddings)
        masks, iou_pred = self.predict_masks(*args)
        # NOTE(reference): multimask returns tokens 1..3; single-mask returns token 0.
        if multimask_output:
            mask_slice = slice(1, None)
        else:
            mask_slice = slice(0, 1)
        masks = masks[:, mask_slice, :, :]
        iou_pred = iou_pred[:, mask_slice]
        return masks, iou_pred

    @fast.dispatch
    def predict_masks(self, image_embeddings: np.ndarray, image_pe: np.ndarray, sparse_prompt_embeddings: np.ndarray,
                      dense_prompt_embeddings: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """All M masks and IoU predictions: -> [B, M, 4H, 4W], [B, M]."""
        check_finite("image_embeddings", image_embeddings)
        check_finite("image_pe", image_pe)
        output_tokens = np.concatenate([self.iou_token.weight, self.mask_tokens.weight], axis=0)  # -> [1+M, C]
        output_tokens = np.broadcast_to(output_tokens[None], (sparse_prompt_embeddings.shape[0],) + output_tokens.shape)
        tokens = np.concatenate((output_tokens, sparse_prompt_embeddings), axis=1)  # -> [B, T, C]

        # Expand per-image data in batch direction to be per-mask
        src = np.repeat(image_embeddings, tokens.shape[0], axis=0)  # [1, C, H, W] -> [B, C, H, W]
        src = src + dense_prompt_embeddings
        pos_src = np.repeat(image_pe, tokens.shape[0], axis=0)  # -> [B, C, H, W]
        b, c, h, w = src.shape

        # Run the transformer
        hs, src = self.transformer(src, pos_src, tokens)  # -> [B, T, C], [B, HW, C]
        iou_token_out = hs[:, 0, :]  # -> [B, C]
        mask_tokens_out = hs[:, 1:(1 + self.num_mask_tokens), :]  # -> [B, M, C]

        # Upscale mask embeddings and predict masks using the mask tokens
        src = src.transpose(0, 2, 1).reshape(b, c, h, w)  # [B, HW, C] -> [B, C, H, W]
        upscaled_embedding = self.output_upscaling(src)  # -> [B, C/8, 4H, 4W]
        hyper_in_list = [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(self.num_mask_tokens)]
        hyper_in = np.stack(hyper_in_list, axis=1)  # M x [B, C/8] -> [B, M, C/8]
        b, c, h, w = upscaled_embedding.shape
        masks = (hyper_in @ upscaled_embedding.reshape(b, c, h * w)).reshape(b, -1, h, w)  # -> [B, M, 4H, 4W]

        # Generate mask quality predictions
        iou_pred = self.iou_prediction_head(iou_token_out)  # [B, C] -> [B, M]
        return masks, iou_pred


class MLP(Module):
    """Mirror of modeling/mask_decoder.py: MLP.forward (Linear layers, ReLU between, optional sigmoid)."""

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
