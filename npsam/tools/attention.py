"""Where SAM's output tokens look: the token-to-image attention of the mask
decoder's two-way transformer, read from a trace (npsam.tools.trace).

    with trace(sam.mask_decoder, inputs=True) as t:
        masks, scores, logits = predictor.predict(point_coords, point_labels)
    for name, attn in decoder_attention(sam.mask_decoder, t):   # attn [B, T, HW]
        heat = attention_heat(attn[0, 2])                         # mask token 1 -> [64, 64] in [0, 1]

Each ``TwoWayAttentionBlock`` has a ``cross_attn_token_to_image`` (the tokens
as queries, the image embedding as keys), and the transformer ends with
``final_attn_token_to_image``. The trace keeps the q and k each of them was
called with; the attention weights are recomputed from those with the
module's own projections, as the official ``Attention.forward`` computes
them (``attn = q @ k.T / sqrt(D)``, softmax over the image locations), and
averaged over the heads. Used by ``scripts/make_figures.py`` (docs/attention.png)
and ``npsam serve`` ("what SAM looks at").

NOTE(reference): the tokens are [iou_token, mask_tokens 0..3, prompt tokens...]:
mask token 0 makes the single-mask output, mask tokens 1..3 the three
multimask candidates (MaskDecoder.predict_masks concatenates them in this order).

Dimension letters: B prompts, T tokens, HW image locations (64*64), h heads,
D channels per head, C embedding_dim, gh, gw the embedding grid (64, 64).
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

from .. import fast
from ..kernels import ops

# NOTE(reference): the output tokens' order in MaskDecoder.predict_masks.
OUTPUT_TOKENS = ("IoU token", "mask token 0 (single mask)", "mask token 1", "mask token 2", "mask token 3")


def token_attention(attn_module, q: np.ndarray, k: np.ndarray, heads: bool = False) -> np.ndarray:
    """softmax(q_proj(q) k_proj(k)^T / sqrt(D)) of one transformer Attention,
    averaged over its heads: q [B, T, C], k [B, HW, C] -> [B, T, HW]
    (``heads=True``: each head's, [B, h, T, HW])."""
    h = attn_module.num_heads
    with fast.reference():
        qp = ops.separate_heads(attn_module.q_proj(q), h)  # [B, T, C] -> [B, T, I] -> [B, h, T, D]
        kp = ops.separate_heads(attn_module.k_proj(k), h)  # [B, HW, C] -> [B, HW, I] -> [B, h, HW, D]
    # NOTE(reference): Attention.forward divides the product by sqrt(D), then softmaxes.
    logits = qp @ kp.transpose(0, 1, 3, 2)  # -> [B, h, T, HW]
    logits = logits / logits.dtype.type(np.sqrt(qp.shape[-1]))
    attn = ops.softmax(logits, axis=-1)  # [B, h, T, HW]
    return attn if heads else attn.mean(axis=1)  # -> [B, T, HW]


def token_to_image_layers(mask_decoder) -> List[Tuple[str, object]]:
    """(official path, Attention module) of every token-to-image attention of
    the decoder's transformer, in the order they run."""
    transformer = mask_decoder.transformer
    layers = [(f"{mask_decoder.name}.transformer.layers.{i}.cross_attn_token_to_image", layer.cross_attn_token_to_image)
              for i, layer in enumerate(transformer.layers)]
    return layers + [(f"{mask_decoder.name}.transformer.final_attn_token_to_image", transformer.final_attn_token_to_image)]


def decoder_attention(mask_decoder, recorded) -> List[Tuple[str, np.ndarray]]:
    """(official path, attention [B, T, HW]) of each token-to-image attention
    in a trace taken with ``inputs=True`` around one decoder call."""
    out = []
    for name, module in token_to_image_layers(mask_decoder):
        record = recorded[name]
        if record.inputs is None:
            raise ValueError("recorded: expected a trace taken with inputs=True (it keeps each call's q, k, v)")
        q, k = record.inputs[0], record.inputs[1]  # the q= and k= arguments: [B, T, C], [B, HW, C]
        out.append((name, token_attention(module, q, k)))
    return out


def attention_heat(weights: np.ndarray, grid: Tuple[int, int] = (64, 64)) -> np.ndarray:
    """One token's attention [HW] -> [gh, gw] in [0, 1]: divided by its maximum,
    then square-rooted so that weak but wide attention stays visible."""
    heat = np.asarray(weights, dtype=np.float64).reshape(grid)  # [HW] -> [gh, gw]
    top = heat.max()
    return np.sqrt(heat / top) if top > 0 else heat
