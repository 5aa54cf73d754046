"""Mirror of segment_anything/modeling/transformer.py: the two-way transformer.

The official computation in the official order (its fast twin, with fused
passes over image rows and the cross-attentions' products reassociated, is
npsam/fast/transformer.py).

Dimension letters:
    B  prompts in the batch   T  tokens (5 output tokens + sparse prompts)
    HW  image locations (64*64 = 4096)   C  embedding_dim (256)
    Nq, Nk  query and key tokens of an attention (T or HW)
    I  internal dim of an attention = C / downsample_rate     h  heads (8)   D = I / h
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from ..kernels import ops
from ..kernels.nn import LayerNorm, Linear, Module, ModuleList, ReLU
from .common import MLPBlock


class TwoWayTransformer(Module):
    """Mirror of modeling/transformer.py: TwoWayTransformer.forward (depth 2 in SAM), then a
    final token-to-image attention and LayerNorm."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, activation=ReLU,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.depth, self.embedding_dim, self.num_heads, self.mlp_dim = depth, embedding_dim, num_heads, mlp_dim
        self.layers = ModuleList(
            TwoWayAttentionBlock(embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                                 activation=activation, attention_downsample_rate=attention_downsample_rate,
                                 skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = LayerNorm(embedding_dim)

    def forward(self, image_embedding: np.ndarray, image_pe: np.ndarray,
                point_embedding: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """image_embedding, image_pe [B, C, H, W]; point_embedding [B, T, C]
        -> (queries [B, T, C], keys [B, HW, C])."""
        bs, c, h, w = image_embedding.shape
        image_embedding = image_embedding.reshape(bs, c, h * w).transpose(0, 2, 1)  # -> [B, HW, C]
        image_pe = image_pe.reshape(image_pe.shape[0], c, h * w).transpose(0, 2, 1)  # -> [B, HW, C]

        queries = point_embedding
        keys = image_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe)

        q = queries + point_embedding
        k = keys + image_pe
        attn_out = self.final_attn_token_to_image(q=q, k=k, v=keys)  # -> [B, T, C]
        queries = queries + attn_out
        queries = self.norm_final_attn(queries)
        return queries, keys


class TwoWayAttentionBlock(Module):
    """Mirror of modeling/transformer.py: TwoWayAttentionBlock.forward.

    (1) self-attention of the tokens, (2) tokens attend to the image, (3) MLP on
    the tokens, (4) the image attends to the tokens. Each step adds a residual
    and a LayerNorm (eps 1e-5).
    """

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048, activation=ReLU,
                 attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = LayerNorm(embedding_dim)
        # NOTE(reference): the transformer MLP uses ReLU, while the upscaling uses GELU.
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = LayerNorm(embedding_dim)
        self.norm4 = LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: np.ndarray, keys: np.ndarray, query_pe: np.ndarray,
                key_pe: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """queries, query_pe [B, T, C]; keys, key_pe [B, HW, C] -> (queries, keys)."""
        # (1) self-attention of the tokens
        if self.skip_first_layer_pe:
            # NOTE(reference): in layer 0 the queries *are* the prompt embeddings, so no
            # PE is added, and the attention output replaces the queries (no residual).
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            attn_out = self.self_attn(q=q, k=q, v=queries)
            queries = queries + attn_out
        queries = self.norm1(queries)

        # (2) tokens attend to the image
        q = queries + query_pe
        k = keys + key_pe
        attn_out = self.cross_attn_token_to_image(q=q, k=k, v=keys)  # -> [B, T, C]
        queries = queries + attn_out
        queries = self.norm2(queries)

        # (3) MLP on the tokens
        mlp_out = self.mlp(queries)
        queries = queries + mlp_out
        queries = self.norm3(queries)

        # (4) the image attends to the tokens
        q = queries + query_pe
        k = keys + key_pe
        # NOTE(reference): q and k swap roles: the image locations are the queries.
        attn_out = self.cross_attn_image_to_token(q=k, k=q, v=queries)  # -> [B, HW, C]
        keys = keys + attn_out
        keys = self.norm4(keys)
        return queries, keys

    def extra_repr(self) -> str:
        return f"skip_first_layer_pe={self.skip_first_layer_pe}"


class Attention(Module):
    """Mirror of modeling/transformer.py: Attention.forward.

    Projects q, k, v to ``embedding_dim // downsample_rate`` before splitting
    heads: the cross-attentions use downsample_rate 2, halving their cost.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        assert self.internal_dim % num_heads == 0, "num_heads must divide embedding_dim."
        self.q_proj = Linear(embedding_dim, self.internal_dim)
        self.k_proj = Linear(embedding_dim, self.internal_dim)
        self.v_proj = Linear(embedding_dim, self.internal_dim)
        self.out_proj = Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: np.ndarray, num_heads: int) -> np.ndarray:
        return ops.separate_heads(x, num_heads)  # [B, N, I] -> [B, h, N, D]

    def _recombine_heads(self, x: np.ndarray) -> np.ndarray:
        return ops.recombine_heads(x)  # [B, h, N, D] -> [B, N, I]

    def forward(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        q = self.q_proj(q)  # [B, Nq, C] -> [B, Nq, I]
        k = self.k_proj(k)  # [B, Nk, C] -> [B, Nk, I]
        v = self.v_proj(v)  # [B, Nk, C] -> [B, Nk, I]

        q = self._separate_heads(q, self.num_heads)  # -> [B, h, Nq, D]
        k = self._separate_heads(k, self.num_heads)  # -> [B, h, Nk, D]
        v = self._separate_heads(v, self.num_heads)  # -> [B, h, Nk, D]

        c_per_head = q.shape[-1]
        attn = q @ k.transpose(0, 1, 3, 2)  # [B, h, Nq, D] @ [B, h, D, Nk] -> [B, h, Nq, Nk]
        attn = attn / q.dtype.type(math.sqrt(c_per_head))
        attn = ops.softmax(attn, axis=-1)

        out = attn @ v  # [B, h, Nq, Nk] @ [B, h, Nk, D] -> [B, h, Nq, D]
        out = self._recombine_heads(out)  # -> [B, Nq, I]
        out = self.out_proj(out)  # -> [B, Nq, C]
        return out

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, internal_dim={self.internal_dim}, num_heads={self.num_heads}"
