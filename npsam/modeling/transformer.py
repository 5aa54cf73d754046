"""Mirror of segment_anything/modeling/transformer.py: the two-way transformer.

Dimension letters:
    B  prompts in the batch   T  tokens (5 output tokens + sparse prompts)
    HW  image locations (64*64 = 4096)   C  embedding_dim (256)
    I  internal dim of an attention = C / downsample_rate     h  heads (8)   D = I / h
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from ..kernels import nn
from ..fast import threads
from ..kernels import ops
from .common import MLPBlock
from ..kernels.nn import LayerNorm, Linear, Module, ModuleList, ReLU


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
    # image location (HW = 4096). The methods below compute exactly forward()
    # (same mathematics, different association of the products) with the
    # projections moved to the token side, so the [HW, C] image side meets two
    # [C, h*T]-sized products instead of two [C, I] projections, and no [HW, I]
    # array is ever split into heads. Each is split into its token-side part
    # (small) and its image-side part (on rows of image locations), which the
    # fused passes of TwoWayTransformer run block by block.

    def to_image_logit_weights(self, q: np.ndarray) -> np.ndarray:
        """Tokens attending to the image, token side: q [B, T, C] -> qk [B, h*T, C],
        so that the logits against image rows k_n are qk @ k_n (for each head h,
        then softmax over n).

        Per head h, with q_h = q W_q^h + b_q^h:
            q_h . (k_n W_k^h + b_k^h) = (q_h W_k^h^T) . k_n + q_h . b_k^h
        and the last term is the same for every n, so softmax over n drops it.
        """
        b, t, c = q.shape
        nh, d = self.num_heads, self.internal_dim // self.num_heads
        qh = self.q_proj(q).reshape(b, t, nh, d).transpose(0, 2, 1, 3)  # [B, T, I] -> [B, h, T, D]
        qk = qh @ self.k_proj.weight.reshape(nh, d, c)  # [B, h, T, D] @ [h, D, C] -> [B, h, T, C]
        # NOTE(reference): the logits are divided by sqrt(D); done here on the small
        # side (D = 16 in SAM's cross-attentions: a power of two, so exactly the same).
        qk /= qk.dtype.type(math.sqrt(d))
        return qk.reshape(b, nh * t, c)  # -> [B, h*T, C]

    def to_image_output(self, pv: np.ndarray, t: int) -> np.ndarray:
        """Tokens attending to the image, after the image side: pv [B, h*T, C], the
        softmax-weighted sums of the image rows v_n (value inputs) -> [B, T, C].

        sum_n p_n (v_n W_v^h + b_v^h) = (sum_n p_n v_n) W_v^h + b_v^h   (sum_n p_n = 1).
        """
        b, _, c = pv.shape
        nh, d = self.num_heads, self.internal_dim // self.num_heads
        wv = self.v_proj.weight.reshape(nh, d, c)  # [I, C] -> [h, D, C]
        out = pv.reshape(b, nh, t, c) @ wv.transpose(0, 2, 1)  # [B, h, T, C] @ [h, C, D] -> [B, h, T, D]
        out += self.v_proj.bias.reshape(nh, 1, d)
        out = ops.recombine_heads(out)  # -> [B, T, I]
        return self.out_proj(out)  # -> [B, T, C]

    def from_image_token_side(self, k: np.ndarray, v: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The image attending to the tokens, token side: k, v [B, T, C] ->
        kq [B, h*T, C], kb [B, h*T, 1], vo [B, h*T, C], so that for an image row
        q_n the logits are kq @ q_n + kb (softmax over T within each head) and the
        output is sum over (h, t) of p_(h,t) vo_(h,t).

        Per head h, with k_h = k W_k^h + b_k^h and v_h = v W_v^h + b_v^h:
            (q_n W_q^h + b_q^h) . k_h,t = q_n . (W_q^h^T k_h,t) + b_q^h . k_h,t
            (sum_t p_h,t v_h,t) W_o^h = sum_t p_h,t (v_h,t W_o^h)
        and b_o is spread as b_o / h over every (h, t) row (each head's p sums to 1).
        """
        b, t, c = k.shape
        nh, d = self.num_heads, self.internal_dim // self.num_heads
        scale = k.dtype.type(math.sqrt(d))
        kh = self.k_proj(k).reshape(b, t, nh, d).transpose(0, 2, 1, 3)  # [B, T, I] -> [B, h, T, D]
        kq = kh @ self.q_proj.weight.reshape(nh, d, c)  # [B, h, T, D] @ [h, D, C] -> [B, h, T, C]
        kq /= scale  # NOTE(reference): logits / sqrt(D), on the small side (exact for D = 16)
        kb = kh @ self.q_proj.bias.reshape(nh, d, 1)  # [B, h, T, D] @ [h, D, 1] -> [B, h, T, 1]
        kb /= scale
        return kq.reshape(b, nh * t, c), kb.reshape(b, nh * t, 1), self.from_image_values(v)

    def from_image_values(self, v: np.ndarray) -> np.ndarray:
        """The value side of from_image_token_side: v [B, T, C] -> vo [B, h*T, C],
        out_proj applied to each head's projected values, b_o / h on each row."""
        b, t, c = v.shape
        nh, d = self.num_heads, self.internal_dim // self.num_heads
        vh = self.v_proj(v).reshape(b, t, nh, d).transpose(0, 2, 1, 3)  # [B, T, I] -> [B, h, T, D]
        wo = self.out_proj.weight.T.reshape(nh, d, -1)  # [C, I] -> [I, C] -> [h, D, C]
        vo = vh @ wo  # [B, h, T, D] @ [h, D, C] -> [B, h, T, C]
        vo += self.out_proj.bias / v.dtype.type(nh)
        return vo.reshape(b, nh * t, -1)

    def from_image_rows(self, q: np.ndarray, kq: np.ndarray, kb: np.ndarray, vo: np.ndarray,
                        out: Optional[np.ndarray] = None) -> np.ndarray:
        """The image attending to the tokens, image side, for one prompt: image rows
        q [R, C] and that prompt's kq, kb, vo ([h*T, C], [h*T, 1], [h*T, C]) -> [R, C]
        (written into ``out`` when given)."""
        attn = kq @ q.T  # [h*T, C] @ [C, R] -> [h*T, R]: image rows along the long axis
        attn += kb
        return self.from_image_logits(attn, vo, out)

    def from_image_logits(self, attn: np.ndarray, vo: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The rest of from_image_rows, from one prompt's logits [h*T, R] (or
        [h, T, R]), in place: softmax over T within each head, then the sum of
        vo's rows [h*T, C] they weight -> [R, C] (written into ``out`` when given)."""
        r = attn.shape[-1]
        attn = ops.softmax_(attn.reshape(self.num_heads, -1, r), axis=1)  # over T within each head
        return np.matmul(attn.reshape(-1, r).T, vo, out=out)  # [R, h*T] @ [h*T, C] -> [R, C]

    def attend_to_image(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """forward(q, k, v) for tokens attending to the image: q [B, T, C]; k, v
        [Bk, HW, C] with Bk = B or 1 (one image shared by every prompt) -> [B, T, C]."""
        b, t, c = q.shape
        bk, hw, _ = k.shape
        qk = self.to_image_logit_weights(q)  # -> [B, h*T, C]
        if bk == 1:
            attn = (qk.reshape(-1, c) @ k[0].T).reshape(b, -1, hw)  # [B*h*T, C] @ [C, HW] -> [B, h*T, HW]
            attn = ops.softmax(attn, axis=-1)
            pv = (attn.reshape(-1, hw) @ v[0]).reshape(b, -1, c)  # [B*h*T, HW] @ [HW, C] -> [B, h*T, C]
        else:  # one product per prompt (a batched matmul with a transposed operand is slower)
            attn = np.empty(qk.shape[:2] + (hw,), dtype=qk.dtype)
            for i in range(b):
                np.matmul(qk[i], k[i].T, out=attn[i])  # [h*T, C] @ [C, HW] -> [h*T, HW]
            attn = ops.softmax(attn, axis=-1)
            pv = attn @ v  # [B, h*T, HW] @ [B, HW, C] -> [B, h*T, C]
        return self.to_image_output(pv, t)

    def attend_from_image(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """forward(q, k, v) for the image attending to the tokens: q [Bq, HW, C] with
        Bq = B or 1; k, v [B, T, C] -> [B, HW, C]."""
        kq, kb, vo = self.from_image_token_side(k, v)
        b, bq = k.shape[0], q.shape[0]
        return np.stack([self.from_image_rows(q[i if bq > 1 else 0], kq[i], kb[i], vo[i]) for i in range(b)])


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
        attn_out += keys  # (layer 0: one image for every prompt, [1, HW, C] -> [B, HW, C])
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

    def forward_rows(self, image_embedding: np.ndarray, image_pe: np.ndarray, point_embedding: np.ndarray,
                     per_image: Optional[dict] = None) -> Tuple[np.ndarray, np.ndarray]:
        """forward() on image locations as rows: image_embedding, image_pe [1 or B, HW, C].

        A batch of 1 on the image side means one image shared by every prompt: it
        stays [1, HW, C] until the first layer's image-to-token attention makes one
        copy per prompt (official repeat_interleave's it up front). ``per_image``:
        a dict kept by the caller with that image (see forward_fused).

        Runs the fused passes below; while a trace is open, the layers run as
        modules instead so that every submodule is recorded.
        """
        if nn._hook is not None:
            return self.forward_layers(image_embedding, image_pe, point_embedding)
        return self.forward_fused(image_embedding, image_pe, point_embedding, per_image)

    def forward_layers(self, image_embedding: np.ndarray, image_pe: np.ndarray,
                       point_embedding: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """forward_rows, layer by layer as the official forward() does."""
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

    def forward_fused(self, image_embedding: np.ndarray, image_pe: np.ndarray, point_embedding: np.ndarray,
                      per_image: Optional[dict] = None) -> Tuple[np.ndarray, np.ndarray]:
        """forward_rows with the image side in one pass over its rows per layer.

        In every layer the token side (a few rows) and the image side (HW rows)
        meet twice: (2) tokens attend to the image, a softmax over all HW rows;
        (4) the image attends to the tokens, row by row. Between them only the
        token side changes. So each pass over blocks of image rows does layer
        L-1's step (4) and norm4 on the block, then layer L's step (2) for it
        (or the final attention's), while the block is in cache:

            pass 0:  k = keys + pe;  partial softmax sums of step (2), layer 0
            pass 1:  keys = norm4(keys + step (4) of layer 0);  k = keys + pe;  step (2) of layer 1
            pass 2:  keys = norm4(keys + step (4) of layer 1);  k = keys + pe;  final attention

        The softmax over HW is assembled from per-block parts: each block keeps
        its max m_j, its sum l_j of exp(logit - m_j) and its exp-weighted sum of
        values o_j; with M = max_j m_j the whole is sum_j exp(m_j - M) o_j /
        sum_j exp(m_j - M) l_j (as flash attention does). Blocks are fixed by
        ROWS, not by the number of threads, so threads change nothing.
        Blocks are spread over threads; BLAS runs single-threaded inside.

        With one image for every prompt and a ``per_image`` dict, layer 0's
        image-side projections, which do not depend on the prompt, are computed
        once per image and kept there (official association: k_proj, v_proj of
        step (2) and q_proj of step (4) on the image rows), and pass 0 becomes
        a small computation on them: see _layer0_cached. They are keyed on the
        identity of the weight arrays they come from, so load_state_dict (which
        stores new arrays) renews them; editing a weight array in place does not.
        """
        bk, hw, c = image_embedding.shape
        b, t, _ = point_embedding.shape
        dtype = point_embedding.dtype
        rows = min(hw, self.ROWS)
        nblocks = -(-hw // rows)
        pe = image_pe[0]  # [HW, C]
        keys = image_embedding  # [1 or B, HW, C]: not written; the first step (4) makes [B, HW, C]
        queries = point_embedding
        step4 = None  # (_Step4 or _Layer0Step4, norm4) of the layer whose step (4) the next pass runs
        cached = per_image is not None and bk == 1 and len(self.layers) > 0
        for i in range(len(self.layers) + 1):
            if i < len(self.layers):
                layer = self.layers[i]
                # (1) self-attention of the tokens
                if layer.skip_first_layer_pe:  # NOTE(reference): layer 0: no PE, no residual
                    queries = layer.self_attn(q=queries, k=queries, v=queries)
                else:
                    q = queries + point_embedding
                    queries = queries + layer.self_attn(q=q, k=q, v=queries)
                queries = layer.norm1(queries)
                to_image = layer.cross_attn_token_to_image
            else:
                to_image = self.final_attn_token_to_image
            if i == 0 and cached:
                attn_out, step4 = self._layer0_cached(layer, queries, point_embedding, image_embedding[0], pe,
                                                      per_image)
            else:
                out_keys = keys
                if step4 is not None and keys is image_embedding:  # the first step (4): keys become per prompt
                    out_keys = np.empty((b, hw, c), dtype)
                attn_out = self._pass(to_image, queries + point_embedding, step4, keys, out_keys, pe, rows, nblocks, t)
                keys = out_keys
            if i < len(self.layers):
                queries = layer.norm2(queries + attn_out)
                # (3) MLP on the tokens
                queries = layer.norm3(queries + layer.mlp(queries))
                # (4), token side; the image side runs in the next pass
                # NOTE(reference): q and k swap roles: the image locations are the queries.
                from_image = layer.cross_attn_image_to_token
                if i == 0 and cached:  # step (4) on the image rows' q_proj kept per image
                    step4[0].set_tokens(queries + point_embedding, queries)
                else:
                    step4 = (_Step4(from_image, queries + point_embedding, queries), layer.norm4)
            else:
                queries = self.norm_final_attn(queries + attn_out)
        if keys is image_embedding:  # no step (4) ran (depth 0): the keys are the image embedding itself
            keys = np.broadcast_to(image_embedding, (b, hw, c)).copy()
        return queries, keys

    # Image rows per block of a fused pass. Half of a 64x64 embedding, one block
    # per thread for one prompt: fewer, longer NumPy calls, so the two threads
    # seldom wait for each other's GIL hand-over (about 5 us each on this kind
    # of machine), which costs more here than a block's arrays outgrowing L2.
    # Measured against 512 (alternated in one process, 20 rounds, medians): one
    # prompt 47.7 against 51.0 ms, SamOnnxModel 48.2 against 52.2, 16 prompts
    # 585 against 677.
    ROWS = 2048

    def _pass(self, to_image: Attention, q: np.ndarray, step4, keys: np.ndarray, new_keys: np.ndarray,
              pe: np.ndarray, rows: int, nblocks: int, t: int) -> np.ndarray:
        """One fused pass over the image rows: the pending step (4) (if any) from
        keys into new_keys (may be keys), then step (2) of ``to_image`` for the
        tokens q [B, T, C] -> [B, T, C]."""
        b, c = q.shape[0], pe.shape[1]
        hw = pe.shape[0]
        qk = to_image.to_image_logit_weights(q)  # -> [B, h*T, C]
        ht = qk.shape[1]
        m_parts = np.empty((nblocks, b, ht), q.dtype)  # per block: max logit,
        l_parts = np.empty((nblocks, b, ht), q.dtype)  # sum of exp(logit - max),
        o_parts = np.empty((nblocks, b, ht, c), q.dtype)  # exp-weighted sum of value rows

        def work(start, stop):
            for j in range(start, stop):
                self._block(j * rows, min(hw, (j + 1) * rows), j, qk, step4, keys, new_keys, pe,
                            m_parts, l_parts, o_parts)

        threads.parallel_rows(work, nblocks, threads=threads.row_threads())
        big = m_parts.max(axis=0)  # [B, h*T]
        w = np.exp(m_parts - big)  # [n, B, h*T]
        total = np.einsum("nbk,nbk->bk", w, l_parts)  # [B, h*T]
        pv = np.einsum("nbk,nbkc->bkc", w, o_parts)  # [B, h*T, C]
        pv /= total[..., None]
        return to_image.to_image_output(pv, t)  # -> [B, T, C]

    @staticmethod
    def _block(lo, hi, j, qk, step4, keys, new_keys, pe, m_parts, l_parts, o_parts) -> None:
        """Image rows [lo, hi), block j, of a fused pass (see forward_fused): keys
        [1 or B, HW, C] in, new_keys [B, HW, C] out when the pass runs a step (4).
        Its [R, C] and [h*T, R] temporaries are this thread's work arrays
        (threads.scratch): the same every call, so no fresh pages to fault in."""
        b, ht = qk.shape[:2]
        pe_blk = pe[lo:hi]  # [R, C]
        shape, dtype = pe_blk.shape, pe.dtype
        shared = keys.shape[0] == 1  # one image for every prompt
        k_rows_in = None  # keys + PE of these rows: computed once for every prompt when the image is shared

        def key_rows(residual):
            nonlocal k_rows_in
            if k_rows_in is None or not shared:
                k_rows_in = np.add(residual, pe_blk, out=threads.scratch("decoder.key_rows", shape, dtype))
            return k_rows_in

        for p in range(b):
            residual = keys[0 if shared else p, lo:hi]  # [R, C]
            if step4 is not None:
                # (4) of the previous layer: the image rows attend to the tokens, then norm4
                step, norm = step4
                attn_out = step(p, lo, hi, key_rows(residual) if step.needs_key_rows else None,
                                out=threads.scratch("decoder.step4", shape, dtype))  # -> [R, C]
                v_rows = ops.layer_norm_rows(attn_out, norm.weight, norm.bias, norm.eps, out=new_keys[p, lo:hi],
                                             add=residual)
                k_rows = np.add(v_rows, pe_blk, out=attn_out)  # into step (4)'s work array, read by now
            else:
                v_rows, k_rows = residual, key_rows(residual)
            # (2) the tokens attend to these rows: this block's part of the softmax over HW
            logits = np.matmul(qk[p], k_rows.T, out=threads.scratch("decoder.logits", (ht, hi - lo), dtype))
            # [h*T, C] @ [C, R] -> [h*T, R]
            m = logits.max(axis=1)  # [h*T]
            ops.exp_below_max_(logits, m[:, None])
            l_parts[j, p] = logits.sum(axis=1)
            np.matmul(logits, v_rows, out=o_parts[j, p])  # [h*T, R] @ [R, C] -> [h*T, C]
            m_parts[j, p] = m

    def _layer0_cached(self, layer: "TwoWayAttentionBlock", queries: np.ndarray, point_embedding: np.ndarray,
                       src: np.ndarray, pe: np.ndarray, per_image: dict):
        """Layer 0's step (2), and the token side of its step (4), on the image
        side's projections kept per image: src, pe [HW, C] -> (attn_out [B, T, C],
        step4 for the next pass). The official association, with the prompt-
        independent products done once:

            step (2): K = k_proj(src + pe), V = v_proj(src) per head;
                      softmax(q_h K_h^T / sqrt(D)) V_h, for q = q_proj(queries + PE)
            step (4): Q = q_proj(src + pe) / sqrt(D) per head (the image rows are
                      the queries); softmax over T of Q_h k_h^T, k = k_proj(tokens),
                      then the value side as in from_image_token_side.
        """
        to_image, from_image = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        weights = tuple(m._params.get(n) for m in (to_image.k_proj, to_image.v_proj, from_image.q_proj)
                        for n in ("weight", "bias"))
        entry = per_image.get("layer0")
        if entry is None or len(entry[0]) != len(weights) or any(a is not b for a, b in zip(entry[0], weights)):
            entry = per_image["layer0"] = (weights,) + self._layer0_projections(layer, src, pe, per_image)
        _, k_t, v_t, q4_t = entry

        # step (2): the tokens attend to the image
        b, t, c = queries.shape
        nh, d = to_image.num_heads, to_image.internal_dim // to_image.num_heads
        qh = to_image.q_proj(queries + point_embedding).reshape(b, t, nh, d).transpose(0, 2, 1, 3)  # -> [B, h, T, D]
        out = np.empty((b, nh, t, d), queries.dtype)
        scale = queries.dtype.type(math.sqrt(d))

        def work(start, stop):  # one (prompt, head) at a time, spread over threads
            for i in range(start, stop):
                p, hd = divmod(i, nh)
                attn = qh[p, hd] @ k_t[hd]  # [T, D] @ [D, HW] -> [T, HW]
                attn /= scale
                ops.softmax_(attn, axis=1)  # over HW
                np.matmul(attn, v_t[hd].T, out=out[p, hd])  # [T, HW] @ [HW, D] -> [T, D]

        threads.parallel_rows(work, b * nh, threads=threads.row_threads())
        attn_out = to_image.out_proj(ops.recombine_heads(out))  # -> [B, T, I] -> [B, T, C]
        return attn_out, (_Layer0Step4(layer, q4_t), layer.norm4)  # its token side after steps (2)-(3)

    @staticmethod
    def _layer0_projections(layer: "TwoWayAttentionBlock", src: np.ndarray, pe: np.ndarray, per_image: dict):
        """The image side's projections of layer 0, per head, image locations along
        the last axis: K = k_proj(src + pe), V = v_proj(src), Q = q_proj(src + pe) /
        sqrt(D) of step (4), each [h, D, HW]. Computed as W @ x^T from blocks of
        image rows x [R, C], a block of locations per thread."""
        to_image, from_image = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        hw = src.shape[0]
        k_t = np.empty((to_image.internal_dim, hw), src.dtype)
        v_t = np.empty((to_image.internal_dim, hw), src.dtype)
        q4_t = np.empty((from_image.internal_dim, hw), src.dtype)
        scale = src.dtype.type(math.sqrt(from_image.internal_dim // from_image.num_heads))

        def work(start, stop):
            for lo, hi in threads.blocks(start, stop, 512):
                k = src[lo:hi] + pe[lo:hi]  # [R, C]
                np.matmul(to_image.k_proj.weight, k.T, out=k_t[:, lo:hi])  # [I, C] @ [C, R] -> [I, R]
                k_t[:, lo:hi] += to_image.k_proj.bias[:, None]
                np.matmul(to_image.v_proj.weight, src[lo:hi].T, out=v_t[:, lo:hi])
                v_t[:, lo:hi] += to_image.v_proj.bias[:, None]
                np.matmul(from_image.q_proj.weight, k.T, out=q4_t[:, lo:hi])
                q4_t[:, lo:hi] += from_image.q_proj.bias[:, None]
                q4_t[:, lo:hi] /= scale  # NOTE(reference): logits / sqrt(D): exact for D = 16

        threads.parallel_rows(work, hw, min_rows=512, threads=threads.row_threads())
        out = []
        for x, a in ((k_t, to_image), (v_t, to_image), (q4_t, from_image)):
            x = x.reshape(a.num_heads, -1, hw)  # [I, HW] -> [h, D, HW]
            x.flags.writeable = False
            out.append(x)
        return tuple(out)


class _Step4:
    """A layer's step (4), the image attending to the tokens, for the next fused
    pass: the token side computed once, then called per (prompt, block of rows)
    with the rows' keys + PE."""

    needs_key_rows = True

    def __init__(self, attn: Attention, q: np.ndarray, v: np.ndarray) -> None:
        self.attn = attn
        self.kq, self.kb, self.vo = attn.from_image_token_side(q, v)  # k = q (queries + PE), v (queries)

    def __call__(self, p: int, lo: int, hi: int, k_rows: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        return self.attn.from_image_rows(k_rows, self.kq[p], self.kb[p], self.vo[p], out)  # -> [R, C]


class _Layer0Step4:
    """Layer 0's step (4) with the image rows' q_proj kept per image (see
    TwoWayTransformer._layer0_cached): called per (prompt, block of rows); the
    rows' keys are not needed."""

    needs_key_rows = False

    def __init__(self, layer: TwoWayAttentionBlock, q4_t: np.ndarray) -> None:
        self.attn = layer.cross_attn_image_to_token
        self.q4_t = q4_t  # [h, D, HW], scaled by 1/sqrt(D)
        self.kh = self.vo = None

    def set_tokens(self, q: np.ndarray, v: np.ndarray) -> None:
        """Token side: k = q (queries + PE), v (queries), both [B, T, C]."""
        a = self.attn
        b, t, c = q.shape
        nh, d = a.num_heads, a.internal_dim // a.num_heads
        self.kh = a.k_proj(q).reshape(b, t, nh, d).transpose(0, 2, 1, 3)  # [B, T, I] -> [B, h, T, D]
        self.vo = a.from_image_values(v)  # -> [B, h*T, C]

    def __call__(self, p: int, lo: int, hi: int, k_rows: None, out: Optional[np.ndarray] = None) -> np.ndarray:
        attn = self.kh[p] @ self.q4_t[:, :, lo:hi]  # [h, T, D] @ [h, D, R] -> [h, T, R]
        return self.attn.from_image_logits(attn, self.vo[p], out)  # -> [R, C]
