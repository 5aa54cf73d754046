"""Mirror of segment_anything/modeling/transformer.py: the two-way transformer.

Dimension letters:
    B  prompts in the batch   T  tokens (5 output tokens + sparse prompts)
    HW  image locations (64*64 = 4096)   C  embedding_dim (256)
    I  internal dim of an attention = C / downsample_rate     h  heads (8)   D = I / h
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from . import nn, ops
from .common import MLPBlock
from .nn import LayerNorm, Linear, Module, ModuleList, ReLU


class Attention(Module):
    """Mirror of transformer.py: Attention.

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

    def forward(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        q = self.q_proj(q)  # [B, Nq, C] -> [B, Nq, I]
        k = self.k_proj(k)  # [B, Nk, C] -> [B, Nk, I]
        v = self.v_proj(v)  # [B, Nk, C] -> [B, Nk, I]
        q = ops.separate_heads(q, self.num_heads)  # -> [B, h, Nq, D]
        k = ops.separate_heads(k, self.num_heads)  # -> [B, h, Nk, D]
        v = ops.separate_heads(v, self.num_heads)  # -> [B, h, Nk, D]
        out = ops.scaled_dot_product_attention(q, k, v)  # -> [B, h, Nq, D]
        out = ops.recombine_heads(out)  # -> [B, Nq, I]
        return self.out_proj(out)  # -> [B, Nq, C]

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, internal_dim={self.internal_dim}, num_heads={self.num_heads}"

    # The two cross-attentions of SAM pair a few tokens (T, about 5-10) with every
    # image location (HW = 4096). The two methods below compute exactly forward()
    # (same mathematics, different association of the products) with the
    # projections moved to the token side, so the [HW, C] image side meets two
    # [C, h*T]-sized products instead of two [C, I] projections, and no [HW, I]
    # array is ever split into heads.

    def attend_to_image(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """forward(q, k, v) for tokens attending to the image: q [B, T, C]; k, v
        [Bk, HW, C] with Bk = B or 1 (one image shared by every prompt) -> [B, T, C].

        Per head h, with q_h = q W_q^h + b_q^h:
            q_h . (k_n W_k^h + b_k^h) = (q_h W_k^h^T) . k_n + q_h . b_k^h
        and the last term is the same for every n, so softmax over n drops it;
            sum_n p_n (v_n W_v^h + b_v^h) = (sum_n p_n v_n) W_v^h + b_v^h   (sum_n p_n = 1).
        """
        b, t, c = q.shape
        bk, hw, _ = k.shape
        nh, d = self.num_heads, self.internal_dim // self.num_heads
        qh = self.q_proj(q).reshape(b, t, nh, d).transpose(0, 2, 1, 3)  # [B, T, I] -> [B, h, T, D]
        qk = qh @ self.k_proj.weight.reshape(nh, d, c)  # [B, h, T, D] @ [h, D, C] -> [B, h, T, C]
        # NOTE(reference): the logits are divided by sqrt(D); done here on the small
        # side (D = 16 in SAM's cross-attentions: a power of two, so exactly the same).
        qk /= qk.dtype.type(math.sqrt(d))
        if bk == 1:
            attn = qk.reshape(b * nh * t, c) @ k[0].T  # [B*h*T, C] @ [C, HW] -> [B*h*T, HW]
            attn = attn.reshape(b, nh * t, hw)  # -> [B, h*T, HW]
        else:  # one product per prompt (a batched matmul with a transposed operand is slower)
            qk = qk.reshape(b, nh * t, c)  # -> [B, h*T, C]
            attn = np.empty((b, nh * t, hw), dtype=qk.dtype)
            for i in range(b):
                np.matmul(qk[i], k[i].T, out=attn[i])  # [h*T, C] @ [C, HW] -> [h*T, HW]
        attn = ops.softmax(attn, axis=-1)
        if bk == 1:
            pv = attn.reshape(b * nh * t, hw) @ v[0]  # [B*h*T, HW] @ [HW, C] -> [B*h*T, C]
        else:
            pv = attn @ v  # [B, h*T, HW] @ [B, HW, C] -> [B, h*T, C]
        wv = self.v_proj.weight.reshape(nh, d, c)  # [I, C] -> [h, D, C]
        out = pv.reshape(b, nh, t, c) @ wv.transpose(0, 2, 1)  # [B, h, T, C] @ [h, C, D] -> [B, h, T, D]
        out += self.v_proj.bias.reshape(nh, 1, d)
        out = ops.recombine_heads(out)  # -> [B, T, I]
        return self.out_proj(out)  # -> [B, T, C]

    def attend_from_image(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """forward(q, k, v) for the image attending to the tokens: q [Bq, HW, C] with
        Bq = B or 1; k, v [B, T, C] -> [B, HW, C].

        Per head h, with k_h = k W_k^h + b_k^h and v_h = v W_v^h + b_v^h:
            (q_n W_q^h + b_q^h) . k_h,t = q_n . (W_q^h^T k_h,t) + b_q^h . k_h,t
            (sum_t p_h,t v_h,t) W_o^h = sum_t p_h,t (v_h,t W_o^h)
        and b_o is spread as b_o / h over every (h, t) row (each head's p sums to 1).
        """
        b, t, c = k.shape
        bq, hw, _ = q.shape
        nh, d = self.num_heads, self.internal_dim // self.num_heads
        scale = q.dtype.type(math.sqrt(d))
        kh = self.k_proj(k).reshape(b, t, nh, d).transpose(0, 2, 3, 1)  # [B, T, I] -> [B, h, D, T]
        wq = self.q_proj.weight.reshape(nh, d, c).transpose(0, 2, 1)  # [I, C] -> [h, C, D]
        kq = (wq @ kh).transpose(0, 2, 1, 3).reshape(b, c, nh * t)  # [B, h, C, T] -> [B, C, h*T]
        kq /= scale  # NOTE(reference): logits / sqrt(D), on the small side (exact for D = 16)
        kb = (self.q_proj.bias.reshape(nh, 1, d) @ kh).reshape(b, 1, nh * t)  # [B, h, 1, T] -> [B, 1, h*T]
        kb /= scale
        attn = q @ kq  # [Bq, HW, C] @ [B, C, h*T] -> [B, HW, h*T]
        attn += kb
        attn = ops.softmax(attn.reshape(b, hw, nh, t), axis=-1)  # over T within each head
        vh = self.v_proj(v).reshape(b, t, nh, d).transpose(0, 2, 1, 3)  # [B, T, I] -> [B, h, T, D]
        wo = self.out_proj.weight.T.reshape(nh, d, c)  # [C, I] -> [I, C] -> [h, D, C]
        vo = (vh @ wo).reshape(b, nh * t, c)  # [B, h, T, C] -> [B, h*T, C]
        vo += self.out_proj.bias / q.dtype.type(nh)
        return attn.reshape(b, hw, nh * t) @ vo  # [B, HW, h*T] @ [B, h*T, C] -> [B, HW, C]



class TwoWayAttentionBlock(Module):
    """Mirror of transformer.py: TwoWayAttentionBlock.

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
        # queries [B, T, C], keys [B, HW, C], query_pe [B, T, C], key_pe [B, HW, C]
        # (1) self-attention of the tokens
        if self.skip_first_layer_pe:
            # NOTE(reference): in layer 0 the queries *are* the prompt embeddings,
            # so no PE is added, and the attention output replaces the queries
            # instead of being added to them (no residual).
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            attn_out = self.self_attn(q=q, k=q, v=queries)
            queries = queries + attn_out
        queries = self.norm1(queries)

        # (2) tokens attend to the image
        q = queries + query_pe
        k = keys + key_pe  # [Bk, HW, C]; also step (4)'s queries: keys do not change in between
        attn_out = self.cross_attn_token_to_image.attend_to_image(q=q, k=k, v=keys)  # -> [B, T, C]
        queries = queries + attn_out
        queries = self.norm2(queries)

        # (3) MLP on the tokens
        mlp_out = self.mlp(queries)
        queries = queries + mlp_out
        queries = self.norm3(queries)

        # (4) the image attends to the tokens
        q = queries + query_pe
        # NOTE(reference): q and k swap roles: the image locations are the queries.
        attn_out = self.cross_attn_image_to_token.attend_from_image(q=k, k=q, v=queries)  # -> [B, HW, C]
        if keys.shape[0] == attn_out.shape[0] and nn._hook is None:
            # fused norm4(keys + attn_out), in place; a trace takes the module path below
            keys = ops.layer_norm(attn_out, self.norm4.weight, self.norm4.bias, self.norm4.eps,
                                  out=attn_out, add=keys)
        else:  # (layer 0: one image for every prompt, [1, HW, C] -> [B, HW, C])
            attn_out += keys
            keys = self.norm4(attn_out)
        return queries, keys

    def extra_repr(self) -> str:
        return f"skip_first_layer_pe={self.skip_first_layer_pe}"


class TwoWayTransformer(Module):
    """Mirror of transformer.py: TwoWayTransformer (depth 2 in SAM), then a final
    token-to-image attention and LayerNorm."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, activation=ReLU,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.depth, self.embedding_dim, self.num_heads, self.mlp_dim = depth, embedding_dim, num_heads, mlp_dim
        self.layers = ModuleList(
            TwoWayAttentionBlock(embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                                 activation=activation, attention_downsample_rate=attention_downsample_rate,
                                 skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = LayerNorm(embedding_dim)

    def forward(self, image_embedding: np.ndarray, image_pe: np.ndarray,
                point_embedding: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """image_embedding, image_pe [B, C, H, W]; point_embedding [B, T, C]
        -> (queries [B, T, C], keys [B, HW, C])."""
        bs, c, h, w = image_embedding.shape
        image_embedding = image_embedding.reshape(bs, c, h * w).transpose(0, 2, 1)  # -> [B, HW, C]
        image_pe = image_pe.reshape(image_pe.shape[0], c, h * w).transpose(0, 2, 1)  # -> [B, HW, C]
        return self.forward_rows(image_embedding, image_pe, point_embedding)

    def forward_rows(self, image_embedding: np.ndarray, image_pe: np.ndarray,
                     point_embedding: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """forward() on image locations as rows: image_embedding, image_pe [1 or B, HW, C].

        A batch of 1 on the image side means one image shared by every prompt: it
        stays [1, HW, C] until the first layer's image-to-token attention makes one
        copy per prompt (official repeat_interleave's it up front)."""
        queries = point_embedding
        keys = image_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe)

        q = queries + point_embedding
        k = keys + image_pe
        attn_out = self.final_attn_token_to_image.attend_to_image(q=q, k=k, v=keys)  # -> [B, T, C]
        queries = queries + attn_out
        queries = self.norm_final_attn(queries)
        return queries, keys
