"""Fast twin of modeling/transformer.py: the two-way transformer as fused passes
over blocks of image rows, with the cross-attentions' products reassociated.

Dimension letters as in modeling/transformer.py; R rows of a block of image
locations.

SAM's two cross-attentions pair a few tokens (T, about 5-10) with every image
location (HW = 4096). The functions below compute exactly Attention.forward
(same mathematics, different association of the products) with the
projections moved to the token side, so the [HW, C] image side meets two
[C, h*T]-sized products instead of two [C, I] projections, and no [HW, I]
array is ever split into heads. Each is split into its token-side part
(small) and its image-side part (on rows of image locations), which the fused
passes of :func:`forward_rows` run block by block. A different association:
equal within the tolerances (tests/test_fast_vs_reference.py).

With one image shared by every prompt, layer 1 reads its keys through layer
0's step (4) and norm4 (the chain, at the end of this file): its image-side
products shrink from 256 terms a row to 16 + 57. When the keys themselves are
not wanted (the mask decoder), both norms' statistics and the final attention
are read the same way (the deep chain), and no [HW, C] row of keys is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ..kernels import ops as ref_ops
from ..modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from . import derives, implements, ops, threads


class AttentionDerived(NamedTuple):
    """An Attention's weights transposed, C-contiguous (the fast path's token-side
    projections run on a few rows, where BLAS reads these a third faster)."""
    q_t: np.ndarray  # [C, I]
    k_t: np.ndarray  # [C, I]
    v_t: np.ndarray  # [C, I]
    out_t: np.ndarray  # [I, C]


@derives(Attention)
def attention_derived(attn: Attention) -> AttentionDerived:
    return AttentionDerived(*(np.ascontiguousarray(lin.weight.T)
                              for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj)))


def _proj(linear, weight_t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """linear(x) on a few rows, reading the kept weight.T: [..., in] -> [..., out]."""
    return ops.linear(x, linear.weight, linear.bias, weight_t)


def _scaled_heads(attn: Attention, linear, weight_t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """linear(x) [B, T, C] split into heads and divided by sqrt(D) -> [B, h, T, D], C-contiguous.
    NOTE(reference): the logits are divided by sqrt(D); done here on the small
    side (D = 16 in SAM's cross-attentions: a power of two, so exactly the same)."""
    b, t, _ = x.shape
    nh, d = attn.num_heads, attn.internal_dim // attn.num_heads
    xh = _proj(linear, weight_t, x).reshape(b, t, nh, d).transpose(0, 2, 1, 3)  # -> [B, h, T, D]
    return np.ascontiguousarray(xh / x.dtype.type(math.sqrt(d)))


def _per_head(xh: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each head's rows of xh [B, h, T, D] times that head's D rows of w [I, X] -> [B, h*T, X]."""
    b, nh, t, d = xh.shape
    return (xh @ w.reshape(nh, d, -1)).reshape(b, nh * t, -1)  # [B, h, T, D] @ [h, D, X]


@implements(Attention)
def attention(self: Attention, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Replaces Attention.forward in its own association (the decoder's self-attention
    on the tokens, and any direct call): the projections read the kept weight.T
    and the softmax is fast ops.softmax_ in place, so equal within the tolerances."""
    d = self.derived
    q = ref_ops.separate_heads(_proj(self.q_proj, d.q_t, q), self.num_heads)  # [B, Nq, C] -> [B, h, Nq, D]
    k = ref_ops.separate_heads(_proj(self.k_proj, d.k_t, k), self.num_heads)  # [B, Nk, C] -> [B, h, Nk, D]
    v = ref_ops.separate_heads(_proj(self.v_proj, d.v_t, v), self.num_heads)  # [B, Nk, C] -> [B, h, Nk, D]
    attn = q @ k.swapaxes(-1, -2)  # [B, h, Nq, D] @ [B, h, D, Nk] -> [B, h, Nq, Nk]
    attn /= q.dtype.type(math.sqrt(q.shape[-1]))
    ops.softmax_(attn, axis=-1)
    out = ref_ops.recombine_heads(attn @ v)  # [B, h, Nq, D] -> [B, Nq, I]
    return _proj(self.out_proj, d.out_t, out)  # -> [B, Nq, C]


# ---------------------------------------------------------------------------
# Tokens attending to the image (steps (2) and the final attention)
# ---------------------------------------------------------------------------
def to_image_logit_weights(attn: Attention, q: np.ndarray) -> np.ndarray:
    """Tokens attending to the image, token side: q [B, T, C] -> qk [B, h*T, C],
    so that the logits against image rows k_n are qk @ k_n (for each head h,
    then softmax over n).

    Per head h, with q_h = q W_q^h + b_q^h:
        q_h . (k_n W_k^h + b_k^h) = (q_h W_k^h^T) . k_n + q_h . b_k^h
    and the last term is the same for every n, so softmax over n drops it.
    """
    return _per_head(_scaled_heads(attn, attn.q_proj, attn.derived.q_t, q), attn.k_proj.weight)  # -> [B, h*T, C]


def to_image_output(attn: Attention, pv: np.ndarray, t: int) -> np.ndarray:
    """Tokens attending to the image, after the image side: pv [B, h*T, C], the
    softmax-weighted sums of the image rows v_n (value inputs) -> [B, T, C].

    sum_n p_n (v_n W_v^h + b_v^h) = (sum_n p_n v_n) W_v^h + b_v^h   (sum_n p_n = 1).
    """
    b, _, c = pv.shape
    nh, d = attn.num_heads, attn.internal_dim // attn.num_heads
    wv = attn.v_proj.weight.reshape(nh, d, c)  # [I, C] -> [h, D, C]
    out = pv.reshape(b, nh, t, c) @ wv.transpose(0, 2, 1)  # [B, h, T, C] @ [h, C, D] -> [B, h, T, D]
    out += attn.v_proj.bias.reshape(nh, 1, d)
    out = ref_ops.recombine_heads(out)  # -> [B, T, I]
    return _proj(attn.out_proj, attn.derived.out_t, out)  # -> [B, T, C]


def attend_to_image(attn: Attention, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """attn(q, k, v) for tokens attending to the image, whole (no fused pass):
    q [B, T, C]; k, v [Bk, HW, C] with Bk = B or 1 (one image for every prompt) -> [B, T, C]."""
    b, t, c = q.shape
    bk, hw, _ = k.shape
    qk = to_image_logit_weights(attn, q)  # -> [B, h*T, C]
    if bk == 1:
        logits = (qk.reshape(-1, c) @ k[0].T).reshape(b, -1, hw)  # [B*h*T, C] @ [C, HW] -> [B, h*T, HW]
        p = ops.softmax_(logits, axis=-1)
        pv = (p.reshape(-1, hw) @ v[0]).reshape(b, -1, c)  # [B*h*T, HW] @ [HW, C] -> [B, h*T, C]
    else:  # one product per prompt (a batched matmul with a transposed operand is slower)
        logits = np.empty(qk.shape[:2] + (hw,), dtype=qk.dtype)
        for i in range(b):
            np.matmul(qk[i], k[i].T, out=logits[i])  # [h*T, C] @ [C, HW] -> [h*T, HW]
        pv = ops.softmax_(logits, axis=-1) @ v  # [B, h*T, HW] @ [B, HW, C] -> [B, h*T, C]
    return to_image_output(attn, pv, t)


# ---------------------------------------------------------------------------
# The image attending to the tokens (step (4))
# ---------------------------------------------------------------------------
def from_image_token_side(attn: Attention, k: np.ndarray, v: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image attending to the tokens, token side: k, v [B, T, C] ->
    kq [B, h*T, C], kb [B, h*T, 1], vo [B, h*T, C], so that for an image row
    q_n the logits are kq @ q_n + kb (softmax over T within each head) and the
    output is sum over (h, t) of p_(h,t) vo_(h,t).

    Per head h, with k_h = k W_k^h + b_k^h and v_h = v W_v^h + b_v^h:
        (q_n W_q^h + b_q^h) . k_h,t = q_n . (W_q^h^T k_h,t) + b_q^h . k_h,t
        (sum_t p_h,t v_h,t) W_o^h = sum_t p_h,t (v_h,t W_o^h)
    and b_o is spread as b_o / h over every (h, t) row (each head's p sums to 1).
    """
    ks = _scaled_heads(attn, attn.k_proj, attn.derived.k_t, k)  # -> [B, h, T, D]
    return (*_from_image_keys(attn, ks), from_image_values(attn, v))


def _from_image_keys(attn: Attention, ks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """kq [B, h*T, C], kb [B, h*T, 1] of from_image_token_side from ks = k_proj(k) / sqrt(D) per head."""
    return _per_head(ks, attn.q_proj.weight), _per_head(ks, attn.q_proj.bias[:, None])


def value_heads(attn: Attention, v: np.ndarray) -> np.ndarray:
    """v_proj(v) split into heads: v [B, T, C] -> [B, h, T, D]."""
    b, t, _ = v.shape
    nh, d = attn.num_heads, attn.internal_dim // attn.num_heads
    return _proj(attn.v_proj, attn.derived.v_t, v).reshape(b, t, nh, d).transpose(0, 2, 1, 3)


def from_image_values(attn: Attention, v: np.ndarray, vh: Optional[np.ndarray] = None) -> np.ndarray:
    """The value side of from_image_token_side: v [B, T, C] -> vo [B, h*T, C],
    out_proj applied to each head's projected values (``vh``: value_heads(attn, v)
    when the caller has them), b_o / h on each row."""
    b, t, c = v.shape
    nh, d = attn.num_heads, attn.internal_dim // attn.num_heads
    vh = value_heads(attn, v) if vh is None else vh  # -> [B, h, T, D]
    wo = attn.derived.out_t.reshape(nh, d, -1)  # [I, C] -> [h, D, C]
    vo = vh @ wo  # [B, h, T, D] @ [h, D, C] -> [B, h, T, C]
    vo += attn.out_proj.bias / v.dtype.type(nh)
    return vo.reshape(b, nh * t, -1)


def from_image_rows(attn: Attention, q: np.ndarray, kq: np.ndarray, kb: np.ndarray, vo: np.ndarray,
                    out: Optional[np.ndarray] = None, keep: Optional[np.ndarray] = None) -> np.ndarray:
    """The image attending to the tokens, image side, for one prompt: image rows
    q [R, C] and that prompt's kq, kb, vo ([h*T, C], [h*T, 1], [h*T, C]) -> [R, C]
    (written into ``out`` when given; ``keep``: see from_image_logits)."""
    r, ht = q.shape[0], kq.shape[0]
    rows_first = np.matmul(q, kq.T, out=threads.scratch("decoder.step4_rows", (r, ht), q.dtype))
    # [R, C] @ [C, h*T] -> [R, h*T]: the image rows as the product's long side, 1.3x as
    # fast as kq @ q.T; then + kb as it is turned to image rows along the long axis
    logits = np.add(rows_first.T, kb, out=threads.scratch("decoder.step4_logits", (ht, r), q.dtype))  # [h*T, R]
    return from_image_logits(attn, logits, vo, out, keep)


def from_image_logits(attn: Attention, logits: np.ndarray, vo: np.ndarray,
                      out: Optional[np.ndarray] = None, keep: Optional[np.ndarray] = None) -> np.ndarray:
    """The rest of from_image_rows, from one prompt's logits [h*T, R] (or
    [h, T, R]), in place: softmax over T within each head, then the sum of
    vo's rows [h*T, C] they weight -> [R, C] (written into ``out`` when given).
    ``keep``: an [h*T, R'] array (R' <= R) given the weights of the first R' rows."""
    p = from_image_weights(attn, logits)
    if keep is not None:
        keep[...] = p[:, :keep.shape[1]]
    return np.matmul(p.T, vo, out=out)  # [R, h*T] @ [h*T, C] -> [R, C]


def from_image_weights(attn: Attention, logits: np.ndarray) -> np.ndarray:
    """Softmax over T within each head, in place: logits [h*T, R] (or [h, T, R]) -> [h*T, R]."""
    r = logits.shape[-1]
    return ops.softmax_(logits.reshape(attn.num_heads, -1, r), axis=1).reshape(-1, r)


def attend_from_image(attn: Attention, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """attn(q, k, v) for the image attending to the tokens, whole: q [Bq, HW, C]
    with Bq = B or 1; k, v [B, T, C] -> [B, HW, C]."""
    kq, kb, vo = from_image_token_side(attn, k, v)
    b, bq = k.shape[0], q.shape[0]
    return np.stack([from_image_rows(attn, q[i if bq > 1 else 0], kq[i], kb[i], vo[i]) for i in range(b)])


# ---------------------------------------------------------------------------
# The transformer: fused passes over blocks of image rows
# ---------------------------------------------------------------------------
# Image rows per block of a fused pass. Half of a 64x64 embedding, one block
# per thread for one prompt: fewer, longer NumPy calls, so the two threads
# seldom wait for each other's GIL hand-over (about 5 us each on this kind
# of machine), which costs more here than a block's arrays outgrowing L2.
# Measured against 512 (alternated in one process, 20 rounds, medians): one
# prompt 47.7 against 51.0 ms, SamOnnxModel 48.2 against 52.2, 16 prompts
# 585 against 677.
ROWS = 2048


class Layer0Projections(NamedTuple):
    """Layer 0's image-side projections, per head, image locations along the last
    axis, kept with one image: K = k_proj(src + pe), V = v_proj(src) of step (2),
    Q = q_proj(src + pe) / sqrt(D) of step (4), each [h, D, HW] and read-only.
    ``weights``: the derived values of the two attentions they were computed
    with (renewed by every load_state_dict, so a reload renews these too)."""
    k_t: np.ndarray
    v_t: np.ndarray
    q4_t: np.ndarray
    weights: Tuple[AttentionDerived, AttentionDerived]


class ChainProjections(NamedTuple):
    """Layer 1's step (2) image-side products, taken back through layer 0's
    norm4 (see _chain_block), kept with one image, read-only. With g the
    norm4's weight, W_k, W_v layer 1's to_image k_proj and v_proj weights:

        s_t  [h, D, HW]: (src * g) @ W_k^T, per head, locations last
        e_t  [h, D, HW]: pe @ W_k^T
        v    [h, HW, D]: (src * g) @ W_v^T, per head, locations first
        wv_g [C, I]: diag(g) W_v^T (float64, rounded once)

    and for layer 1's step (4) (_ChainStep4), with W_q its q_proj weight:

        s4_t [h, D, HW]: (src * g) @ W_q^T;   e4_t [h, D, HW]: pe @ W_q^T

    ``weights``: the derived values and norm4 they were made with."""
    s_t: np.ndarray
    e_t: np.ndarray
    v: np.ndarray
    wv_g: np.ndarray
    s4_t: np.ndarray
    e4_t: np.ndarray
    weights: tuple


@dataclass
class PerImage:
    """The transformer's work kept with one image shared by every prompt (held by
    fast/mask_decoder.py's ImageRows): layer 0's projections, computed on first
    use, layer 1's step (2) products through layer 0's norm4 (ChainProjections),
    the deep chain's (DeepProjections), and the upscaling's product of the image
    rows (fast/mask_decoder.py, upscaling_image_side): (the derived values it
    was made with, the product)."""
    layer0: Optional[Layer0Projections] = None
    upscaling: Optional[Tuple[object, np.ndarray]] = None
    chain: Optional[ChainProjections] = None
    deep: Optional["DeepProjections"] = None


@dataclass
class Step4Record:
    """What every layer's step (4) computes on the first ``rows`` image rows of
    each prompt, kept for the upscaling (fast/mask_decoder.py, upscaled_masks)
    and, when it holds every row, read by layer 1 (_chain_block, _ChainStep4):

        weights [L, B, h*T + 1, rows]: the softmax weights of each image row
            over the (head, token) pairs, then norm4's mean of the row;
        rstd [L, B, rows]: norm4's 1 / sqrt(var + eps) of the row;
        values: per layer, the token side vo [B, h*T, C] (from_image_values).

    Row by row, step (4) and norm4 of layer i turn keys_i into
        keys_(i+1) = (keys_i + p_i^T vo_i - mean_i) * rstd_i * w_i + b_i,
    so these and the image rows give the keys after the last layer, and any
    product of them, without reading the keys themselves."""
    weights: np.ndarray
    rstd: np.ndarray
    values: list

    @property
    def rows(self) -> int:
        """The image rows recorded, from the first."""
        return self.weights.shape[-1]

    @staticmethod
    def empty(transformer: TwoWayTransformer, b: int, t: int, rows: int, dtype,
              work=None) -> "Step4Record":
        """A record for ``b`` prompts of ``t`` tokens, ``rows`` image rows; its
        arrays from ``work`` (threads.WorkArrays) when given."""
        heads = {layer.cross_attn_image_to_token.num_heads for layer in transformer.layers}
        if len(heads) != 1:
            raise ValueError(f"Step4Record: every layer's step (4) must have the same number of heads, got {heads}")
        shapes = {"weights": (len(transformer.layers), b, heads.pop() * t + 1, rows),
                  "rstd": (len(transformer.layers), b, rows)}
        arrays = {k: np.empty(v, dtype) if work is None else work.get(f"step4.{k}", v, dtype)
                  for k, v in shapes.items()}
        return Step4Record(arrays["weights"], arrays["rstd"], [None] * len(transformer.layers))


@implements(TwoWayTransformer)
def two_way_transformer(self: TwoWayTransformer, image_embedding: np.ndarray, image_pe: np.ndarray,
                        point_embedding: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Replaces TwoWayTransformer.forward: the image sides as rows, then
    :func:`forward_rows` (within the tolerances). The fused passes read one PE
    for every prompt, as the official decoder builds it (repeat_interleave);
    PEs that differ between prompts go to the reference forward."""
    if image_pe.shape[0] > 1 and not np.array_equal(image_pe, np.broadcast_to(image_pe[:1], image_pe.shape)):
        return TwoWayTransformer.forward(self, image_embedding, image_pe, point_embedding)
    bs, c, h, w = image_embedding.shape
    image_embedding = image_embedding.reshape(bs, c, h * w).transpose(0, 2, 1)  # -> [B, HW, C]
    image_pe = image_pe.reshape(image_pe.shape[0], c, h * w).transpose(0, 2, 1)  # -> [B, HW, C]
    with threads.single_threaded_blas():  # the passes bring their own threads
        return forward_rows(self, image_embedding, image_pe, point_embedding)


def forward_rows(self: TwoWayTransformer, image_embedding: np.ndarray, image_pe: np.ndarray,
                 point_embedding: np.ndarray, per_image: Optional[PerImage] = None,
                 keys_out: Optional[np.ndarray] = None, record: Optional[Step4Record] = None,
                 keys_wanted: bool = True, final_tokens: Optional[Union[int, Sequence[int]]] = None
                 ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """TwoWayTransformer.forward on image locations as rows: image_embedding,
    image_pe [1 or B, HW, C] (only the first PE is read: the official PE is
    repeated per prompt), point_embedding [B, T, C] -> (queries [B, T, C], keys
    [B, HW, C]), with the image side in one pass over its rows per layer.

    A batch of 1 on the image side means one image shared by every prompt: it
    stays [1, HW, C] until the first layer's image-to-token attention makes one
    copy per prompt (official repeat_interleave's it up front).

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

    With one image for every prompt and a ``per_image`` record, layer 0's
    image-side projections, which do not depend on the prompt, are computed
    once per image and kept there (official association: k_proj, v_proj of
    step (2) and q_proj of step (4) on the image rows), and pass 0 becomes
    a small computation on them: see _layer0_cached. Editing a weight array
    in place (rather than loading weights) does not renew them.

    ``keys_out``: a C-contiguous [B, HW, C] array to hold the keys returned
    (else a new one is made; depth 0 returns a copy of the image side).
    ``record``: a Step4Record for these prompts, filled as the passes run
    (the same computation: it only keeps copies of what step (4) computes;
    with the deep chain, below, it is what step (4) computes, the norms'
    statistics taken from it rather than from rows of keys).
    With one image for every prompt, a ``per_image`` record, a Step4Record
    of every row and CHAIN_MIN_PROMPTS prompts or more (or the image's chain
    products already made), layer 1's step (2) and step (4) read layer 0's
    record and products of the image rows kept per image instead of layer 1's
    keys (_chain_block, _ChainStep4: a fifth of the multiply-adds, within the
    tolerances); the keys are still made, for norm4 and the passes after,
    unless they are not wanted and there are two layers (SAM's): then both
    norm4's statistics and the final attention come from the record as well,
    and no row of keys is made (_Deep, the deep chain).
    ``keys_wanted``: False returns None for the keys: the last pass then
    keeps each block's keys in this thread's work array, not in [B, HW, C]
    memory (the upscaling reads the record instead: fast/mask_decoder.py).
    ``final_tokens``: the final attention runs for these tokens only (indices
    into T, increasing; or a number n, the first n), and the queries returned are those [B, T', C]: each
    token's attention to the image and its norm_final_attn read no other
    token, so theirs are the same computations (the mask decoder reads the
    IoU token and the mask tokens it returns, never the prompts' own).
    """
    bk, hw, c = image_embedding.shape
    b, t, _ = point_embedding.shape
    dtype = point_embedding.dtype
    final = slice(None) if final_tokens is None else _token_index(final_tokens, t)  # the final attention's tokens
    rows = min(hw, ROWS)
    nblocks = -(-hw // rows)
    pe = image_pe[0]  # [HW, C]
    keys = image_embedding  # [1 or B, HW, C]: not written; the first step (4) makes [B, HW, C]
    queries = point_embedding
    step4 = None  # (_Step4 or _Layer0Step4, norm4, layer) of the layer whose step (4) the next pass runs
    chain = None  # layer 1's token side through layer 0's record (_ChainTokens), when it runs that way
    deep = None  # both norms and the final attention through the record (_Deep), when they run that way
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
            attn_out, step4 = _layer0_cached(layer, queries, point_embedding, image_embedding[0], pe, per_image)
        else:
            q = queries + point_embedding
            if i == len(self.layers):
                q = q[:, final]  # -> [B, T', C]
                if deep is not None:
                    deep.set_final(to_image, q)
            if (i == 1 < len(self.layers) and cached and record is not None and record.rows == hw
                    and (b >= CHAIN_MIN_PROMPTS or _chain_kept(layer, self.layers[0].norm4, per_image))):
                chain = _chain_tokens(to_image, self.layers[0].norm4, q, record.values[0],
                                      _chain_projections(layer, self.layers[0].norm4, image_embedding[0], pe,
                                                         per_image))
                if not keys_wanted and len(self.layers) == 2:  # no keys made: see _Deep
                    deep = _Deep(self, _deep_projections(self, image_embedding[0], pe, per_image), step4[0], record)
            out_keys = keys
            if step4 is not None and (deep is not None or (i == len(self.layers) and not keys_wanted)):
                out_keys = None  # the last step (4), or every one in the deep chain: no keys are kept
            elif step4 is not None and keys is image_embedding:  # the first step (4): keys become per prompt
                out_keys = np.empty((b, hw, c), dtype) if keys_out is None else keys_out
            attn_out = _pass(to_image, q, step4, keys, out_keys, pe, rows, nblocks, q.shape[1], record,
                             chain if i == 1 else None, deep)
            keys = out_keys
        if i < len(self.layers):
            queries = layer.norm2(queries + attn_out)
            # (3) MLP on the tokens
            queries = layer.norm3(queries + layer.mlp(queries))
            # (4), token side; the image side runs in the next pass
            # NOTE(reference): q and k swap roles: the image locations are the queries.
            if i == 0 and cached:  # step (4) on the image rows' q_proj kept per image
                step4[0].set_tokens(queries + point_embedding, queries)
            elif chain is not None:  # layer 1's step (4) from the record too: see _ChainStep4
                step4 = (_ChainStep4(layer.cross_attn_image_to_token, self.layers[0].norm4, queries + point_embedding,
                                     queries, record, chain.kept), layer.norm4, i)
                if deep is not None:
                    deep.set_layer1(step4[0])
            else:
                step4 = (_Step4(layer.cross_attn_image_to_token, queries + point_embedding, queries), layer.norm4, i)
            if record is not None:
                record.values[i] = step4[0].vo
        else:
            queries = self.norm_final_attn(queries[:, final] + attn_out)
    if not keys_wanted:
        return queries, None
    if keys is image_embedding:  # no step (4) ran (depth 0): the keys are the image embedding itself
        keys = np.broadcast_to(image_embedding, (b, hw, c)).copy()
    return queries, keys


def _pass(to_image: Attention, q: np.ndarray, step4, keys: np.ndarray, new_keys: np.ndarray,
          pe: np.ndarray, rows: int, nblocks: int, t: int, record: Optional[Step4Record] = None,
          chain: Optional["_ChainTokens"] = None, deep: Optional["_Deep"] = None) -> np.ndarray:
    """One fused pass over the image rows: the pending step (4) (if any) from
    keys into new_keys (may be keys; None: into work arrays), then step (2) of ``to_image`` for the
    tokens q [B, T, C] -> [B, T, C] (from the record and the image rows when
    ``chain`` is given: see _chain_block). With ``deep``, step (4) writes only
    the record, and without a chain this is the final attention from it (_Deep)."""
    b, c = q.shape[0], pe.shape[1]
    hw = pe.shape[0]
    final_deep = deep is not None and chain is None  # the final attention (its token side: _Deep.set_final)
    qk = to_image_logit_weights(to_image, q) if chain is None and not final_deep else None  # -> [B, h*T, C]
    ht = q.shape[1] * to_image.num_heads
    width = chain.width if chain is not None else deep.width if final_deep else c  # a block's value sums' columns
    m_parts = np.empty((nblocks, b, ht), q.dtype)  # per block: max logit,
    l_parts = np.empty((nblocks, b, ht), q.dtype)  # sum of exp(logit - max),
    o_parts = np.empty((nblocks, b, ht, width), q.dtype)  # exp-weighted sum of value rows
    wide = None if step4 is None else ops.wide_rows(step4[1].weight, step4[1].bias)  # norm4's, for every block

    def work(start, stop):
        for j in range(start, stop):
            _block(j * rows, min(hw, (j + 1) * rows), j, qk, step4, keys, new_keys, pe, m_parts, l_parts, o_parts,
                   record, chain, wide, deep)

    threads.parallel_rows(work, nblocks, threads=threads.row_threads())
    big = m_parts.max(axis=0)  # [B, h*T]
    w = np.exp(m_parts - big)  # [n, B, h*T]
    total = np.einsum("nbk,nbk->bk", w, l_parts)  # [B, h*T]
    pv = np.einsum("nbk,nbkc->bkc", w, o_parts)  # [B, h*T, C] (or [B, h*T, D + h0*T0 + 1])
    pv /= total[..., None]
    if chain is not None:
        return _record_output(to_image, pv, chain.y, chain.shift, t)  # -> [B, T, C]
    if final_deep:
        return _record_output(to_image, pv, deep.yf, deep.shift, t)  # -> [B, T, C]
    return to_image_output(to_image, pv, t)  # -> [B, T, C]


def _block(lo, hi, j, qk, step4, keys, new_keys, pe, m_parts, l_parts, o_parts, record=None, chain=None,
           wide=None, deep=None) -> None:
    """Image rows [lo, hi), block j, of a fused pass (see forward_rows): keys
    [1 or B, HW, C] in, new_keys [B, HW, C] out when the pass runs a step (4),
    and its rows below record.rows kept in ``record`` (Step4Record).
    ``wide``: norm4's weight and bias as ops.wide_rows, made once per pass.
    Its [R, C] and [h*T, R] temporaries are this thread's work arrays
    (threads.scratch): the same every call, so no fresh pages to fault in."""
    b, ht = m_parts.shape[1:]
    pe_blk = pe[lo:hi]  # [R, C]
    shape, dtype = pe_blk.shape, pe.dtype
    shared = keys is not None and keys.shape[0] == 1  # one image for every prompt
    k_rows_in = None  # keys + PE of these rows: computed once for every prompt when the image is shared

    def key_rows(residual):
        nonlocal k_rows_in
        if k_rows_in is None or not shared:
            k_rows_in = np.add(residual, pe_blk, out=threads.scratch("decoder.key_rows", shape, dtype))
        return k_rows_in

    for p in range(b):
        if deep is not None:  # step (4) writes the record only, then step (2) from it: see _Deep
            step, _, layer = step4
            record.weights[layer, p, :-1, lo:hi] = step.weights(p, lo, hi)
            if layer == 0:
                deep.stats0(p, lo, hi)
                _chain_block(chain, record, p, lo, hi, j, m_parts, l_parts, o_parts)
            else:
                deep.final_block(deep.stats1(p, lo, hi), p, lo, hi, j, m_parts, l_parts, o_parts)
            continue
        residual = keys[0 if shared else p, lo:hi]  # [R, C]
        if step4 is not None:
            # (4) of the previous layer: the image rows attend to the tokens, then norm4
            step, norm, layer = step4
            keep = stats = None
            if record is not None and lo < record.rows:  # these rows' weights and norm4's statistics
                kept = record.weights[layer, p, :, lo:min(hi, record.rows)]  # [h*T + 1, R']
                keep, stats = kept[:-1], (kept[-1], record.rstd[layer, p, lo:min(hi, record.rows)])
            attn_out = step(p, lo, hi, key_rows(residual) if step.needs_key_rows else None,
                            out=threads.scratch("decoder.step4", shape, dtype), keep=keep)  # -> [R, C]
            v_rows = threads.scratch("decoder.keys", shape, dtype) if new_keys is None else new_keys[p, lo:hi]
            ops.layer_norm_rows(attn_out, norm.weight, norm.bias, norm.eps, out=v_rows, add=residual, stats=stats,
                                wide=wide)
            if chain is not None:  # step (2) from the record just written: see _chain_block
                _chain_block(chain, record, p, lo, hi, j, m_parts, l_parts, o_parts)
                continue
            k_rows = np.add(v_rows, pe_blk, out=attn_out)  # into step (4)'s work array, read by now
        else:
            v_rows, k_rows = residual, key_rows(residual)
        # (2) the tokens attend to these rows: this block's part of the softmax over HW,
        # the logits with the rows along the first axis (the product with the image
        # rows as its long side runs 1.4x faster than [h*T, C] @ [C, R])
        logits = np.matmul(k_rows, qk[p].T, out=threads.scratch("decoder.logits", (hi - lo, ht), dtype))
        # [R, C] @ [C, h*T] -> [R, h*T]
        m = ops.column_max(logits)  # [h*T]
        ops.exp_below_max_(logits, m)
        np.matmul(ops.ones(hi - lo, dtype), logits, out=l_parts[j, p])  # [R] @ [R, h*T]: the sums over the rows
        np.matmul(logits.T, v_rows, out=o_parts[j, p])  # [h*T, R] @ [R, C] -> [h*T, C]
        m_parts[j, p] = m


def _token_index(tokens: Union[int, Sequence[int]], t: int):
    """forward_rows' final_tokens (or their number n, the first n) as an index
    into T: a slice when they are the first ones (a view), else the list (a
    copy of a few rows)."""
    tokens = list(range(tokens)) if isinstance(tokens, (int, np.integer)) else [int(i) for i in tokens]
    if tokens != sorted(set(tokens)) or not tokens or tokens[0] < 0 or tokens[-1] >= t:
        raise ValueError(f"final_tokens: expected increasing token indices below {t}, got {tokens}")
    return slice(0, len(tokens)) if tokens == list(range(len(tokens))) else tokens


def _layer0_cached(layer: TwoWayAttentionBlock, queries: np.ndarray, point_embedding: np.ndarray,
                   src: np.ndarray, pe: np.ndarray, per_image: PerImage):
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
    kept = per_image.layer0
    if kept is None or kept.weights[0] is not to_image.derived or kept.weights[1] is not from_image.derived:
        kept = per_image.layer0 = _layer0_projections(layer, src, pe)

    # step (2): the tokens attend to the image
    b, t, c = queries.shape
    nh, d = to_image.num_heads, to_image.internal_dim // to_image.num_heads
    hw = src.shape[0]
    qh = _proj(to_image.q_proj, to_image.derived.q_t, queries + point_embedding)
    qh = qh.reshape(b, t, nh, d).transpose(0, 2, 1, 3)  # [B, T, I] -> [B, h, T, D]
    # NOTE(reference): the logits are divided by sqrt(D); here q is multiplied by
    # log2(e) / sqrt(D), so that the softmax's exponentials are powers of two
    qh = qh * queries.dtype.type(math.log2(math.e) / math.sqrt(d))
    out = np.empty((b, nh, t, d), queries.dtype)
    v_rows = kept.v_t.transpose(0, 2, 1)  # [h, D, HW] -> [h, HW, D]

    def work(start, stop):  # one prompt at a time, every head, spread over threads
        for p in range(start, stop):
            attn = np.matmul(qh[p], kept.k_t, out=threads.scratch("decoder.layer0", (nh, t, hw), qh.dtype))
            # [h, T, D] @ [h, D, HW] -> [h, T, HW]
            sums = ops.exp2_sums_(attn)  # the softmax over HW, not yet divided by its sums: [h, T]
            np.matmul(attn, v_rows, out=out[p])  # [h, T, HW] @ [h, HW, D] -> [h, T, D]
            out[p] /= sums[..., None]

    threads.parallel_rows(work, b, threads=threads.row_threads())
    attn_out = _proj(to_image.out_proj, to_image.derived.out_t, ref_ops.recombine_heads(out))  # -> [B, T, C]
    return attn_out, (_Layer0Step4(from_image, kept.q4_t), layer.norm4, 0)  # its token side after steps (2)-(3)


def _layer0_projections(layer: TwoWayAttentionBlock, src: np.ndarray, pe: np.ndarray) -> Layer0Projections:
    """Layer 0's image-side projections (see Layer0Projections), computed as
    W @ x^T from blocks of image rows x [R, C], a block of locations per thread."""
    to_image, from_image = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    hw = src.shape[0]
    k_t = np.empty((to_image.internal_dim, hw), src.dtype)
    v_t = np.empty((to_image.internal_dim, hw), src.dtype)
    q4_t = np.empty((from_image.internal_dim, hw), src.dtype)
    scale = src.dtype.type(math.sqrt(from_image.internal_dim // from_image.num_heads))

    def block(lo, hi):  # blocks of 512 locations, fixed whatever the number of threads
        k = src[lo:hi] + pe[lo:hi]  # [R, C]
        np.matmul(to_image.k_proj.weight, k.T, out=k_t[:, lo:hi])  # [I, C] @ [C, R] -> [I, R]
        k_t[:, lo:hi] += to_image.k_proj.bias[:, None]
        np.matmul(to_image.v_proj.weight, src[lo:hi].T, out=v_t[:, lo:hi])
        v_t[:, lo:hi] += to_image.v_proj.bias[:, None]
        np.matmul(from_image.q_proj.weight, k.T, out=q4_t[:, lo:hi])
        q4_t[:, lo:hi] += from_image.q_proj.bias[:, None]
        q4_t[:, lo:hi] /= scale  # NOTE(reference): logits / sqrt(D): exact for D = 16

    threads.parallel_blocks(block, hw, 512, threads=threads.row_threads())
    out = []
    for x, a in ((k_t, to_image), (v_t, to_image), (q4_t, from_image)):
        x = x.reshape(a.num_heads, -1, hw)  # [I, HW] -> [h, D, HW]
        x.flags.writeable = False
        out.append(x)
    return Layer0Projections(*out, weights=(to_image.derived, from_image.derived))


class _Step4:
    """A layer's step (4), the image attending to the tokens, for the next fused
    pass: the token side computed once, then called per (prompt, block of rows)
    with the rows' keys + PE."""

    needs_key_rows = True

    def __init__(self, attn: Attention, q: np.ndarray, v: np.ndarray) -> None:
        self.attn = attn
        self.kq, self.kb, self.vo = from_image_token_side(attn, q, v)  # k = q (queries + PE), v (queries)

    def __call__(self, p: int, lo: int, hi: int, k_rows: np.ndarray, out: Optional[np.ndarray] = None,
                 keep: Optional[np.ndarray] = None) -> np.ndarray:
        return from_image_rows(self.attn, k_rows, self.kq[p], self.kb[p], self.vo[p], out, keep)  # -> [R, C]


class _RecordStep4:
    """A step (4) whose logits come from kept products, not the rows' keys
    (_Layer0Step4, _ChainStep4): its ``logits(p, lo, hi)``, then the softmax
    over T (``weights``, all the deep chain reads) and the values they weight
    (called as _Step4)."""

    needs_key_rows = False

    def _set_values(self, v: np.ndarray) -> None:
        """The token side's values, v [B, T, C]: vh [B, h, T, D] and vo [B, h*T, C]."""
        self.vh = value_heads(self.attn, v)
        self.vo = from_image_values(self.attn, v, self.vh)

    def weights(self, p: int, lo: int, hi: int) -> np.ndarray:
        """Prompt p's softmax weights on rows [lo, hi) -> [h*T, R] (see _Deep)."""
        return from_image_weights(self.attn, self.logits(p, lo, hi))

    def __call__(self, p: int, lo: int, hi: int, k_rows: None, out: Optional[np.ndarray] = None,
                 keep: Optional[np.ndarray] = None) -> np.ndarray:
        return from_image_logits(self.attn, self.logits(p, lo, hi), self.vo[p], out, keep)  # -> [R, C]


class _Layer0Step4(_RecordStep4):
    """Layer 0's step (4) with the image rows' q_proj kept per image (see
    _layer0_cached): called per (prompt, block of rows); the rows' keys are not needed."""

    def __init__(self, attn: Attention, q4_t: np.ndarray) -> None:
        self.attn = attn
        self.q4_t = q4_t  # [h, D, HW], scaled by 1/sqrt(D)
        self.kh = self.vh = self.vo = None

    def set_tokens(self, q: np.ndarray, v: np.ndarray) -> None:
        """Token side: k = q (queries + PE), v (queries), both [B, T, C]."""
        a = self.attn
        b, t, c = q.shape
        nh, d = a.num_heads, a.internal_dim // a.num_heads
        self.kh = _proj(a.k_proj, a.derived.k_t, q).reshape(b, t, nh, d).transpose(0, 2, 1, 3)  # -> [B, h, T, D]
        self._set_values(v)

    def logits(self, p: int, lo: int, hi: int) -> np.ndarray:
        """Prompt p's logits on rows [lo, hi) -> [h, T, R]."""
        return self.kh[p] @ self.q4_t[:, :, lo:hi]  # [h, T, D] @ [h, D, R] -> [h, T, R]


# ---------------------------------------------------------------------------
# Layer 1's step (2) through layer 0's norm4 (the chain)
# ---------------------------------------------------------------------------
# Pass 1 makes layer 1's keys row by row from layer 0's step (4) and norm4:
#     keys1 = (x0 - mean0) * rstd0 * g + b,   x0 = src + p0^T vo0,
# with p0 the row's h0*T0 softmax weights (kept in the Step4Record, with mean0
# and rstd0, for every row when the record covers them all). Layer 1's step (2)
# then reads keys1 twice, each a product with C = 256 terms a row: the logits
# (keys1 + pe) . qk_j and the value sums sum_r e_jr keys1_r. Each qk_j lies in
# its head's D = 16 rows of W_k (qk_j = q_j W_k^h / sqrt(D)), and only each
# head's D columns of W_v read the value sums. So, per image, (src * g) W_k^T,
# pe W_k^T and (src * g) W_v^T (ChainProjections), and per row:
#     (keys1 + pe) . qk_j = rstd0 * (S_h . q_j + [p0; mean0] . Z_j) + E_h . q_j + b . qk_j
#     Z = [vo0 diag(g) qk^T; -g . qk_j]    ([h0*T0 + 1, h*T] per prompt)
# (b . qk_j is the same for every row: the softmax over rows drops it), and
#     sum_r e_jr keys1_r W_v^h^T = (e * rstd0)_j V_h + ((e * rstd0)_j [p0; mean0]^T) Y_h + (sum_r e_jr) b W_v^h^T
#     Y = [vo0 diag(g) W_v^T; -g W_v^T]   ([h0*T0 + 1, I] per prompt)
# The products per row shrink from 2 x 256 x h*T to 2 x (D + h0*T0 + 1) x h*T
# multiply-adds (D per head): 117M against 24M a prompt for MobileSAM. The same
# mathematics in another association, within the tolerances.
# Prompts in one call from which the chain pays for its per-image products
# (_chain_projections: 10-17 ms for a 64x64 embedding on 2 threads, once per
# image; the deep chain's, below, about 18 ms more where it runs) on that
# call alone, each prompt saving about 1 ms (about 4 with the deep chain): a
# batch of the generator (64) makes them; a single click does not, and uses
# them once made.
CHAIN_MIN_PROMPTS = 16


class _ChainTokens(NamedTuple):
    """The token side of _chain_block for a batch of prompts (see above)."""
    qs: np.ndarray  # [B, h, T, D]: q_proj(q) / sqrt(D)
    z_t: np.ndarray  # [B, h*T, h0*T0 + 1]: Z^T
    y: np.ndarray  # [B, h0*T0 + 1, I]: Y
    shift: np.ndarray  # [I]: b W_v^T + b_v
    kept: ChainProjections

    @property
    def width(self) -> int:
        """Columns of a block's value sums: D, then h0*T0 + 1."""
        return self.qs.shape[-1] + self.z_t.shape[-1]


def _chain_kept(layer: TwoWayAttentionBlock, norm, per_image: PerImage) -> bool:
    """Whether per_image holds ChainProjections made with these weights."""
    kept = per_image.chain
    return (kept is not None and kept.weights[0] is layer.cross_attn_token_to_image.derived
            and kept.weights[1] is layer.cross_attn_image_to_token.derived and kept.weights[2] is norm.weight)


def _chain_projections(layer: TwoWayAttentionBlock, norm, src: np.ndarray, pe: np.ndarray,
                       per_image: PerImage) -> ChainProjections:
    """ChainProjections for layer 1 (``layer``) and layer 0's ``norm`` (norm4),
    kept in per_image for those weights."""
    attn, attn4 = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    if _chain_kept(layer, norm, per_image):
        return per_image.chain
    hw, c = src.shape
    g = np.asarray(norm.weight, np.float64)[:, None]
    wk_g, wv_g, wq_g = ((g * np.asarray(w, np.float64).T).astype(src.dtype)  # [C, I]: diag(g) W^T
                        for w in (attn.k_proj.weight, attn.v_proj.weight, attn4.q_proj.weight))
    # as W @ x^T, locations last (as _layer0_projections): s_t, e_t, s4_t, e4_t; v as x @ W^T
    products_t = [(src, wk_g.T), (pe, attn.k_proj.weight), (src, wq_g.T), (pe, attn4.q_proj.weight)]
    out_t = [np.empty((w.shape[0], hw), src.dtype) for _, w in products_t]
    v = np.empty((hw, attn.internal_dim), src.dtype)

    def block(lo, hi):  # blocks of 512 locations, fixed whatever the number of threads
        for (x, w), y in zip(products_t, out_t):
            np.matmul(w, x[lo:hi].T, out=y[:, lo:hi])  # [I, C] @ [C, R] -> [I, R]
        np.matmul(src[lo:hi], wv_g, out=v[lo:hi])  # [R, C] @ [C, I] -> [R, I]

    threads.parallel_blocks(block, hw, 512, threads=threads.row_threads())
    s_t, e_t, s4_t, e4_t = (y.reshape(a.num_heads, -1, hw)  # [I, HW] -> [h, D, HW]
                            for y, a in zip(out_t, (attn, attn, attn4, attn4)))
    v = np.ascontiguousarray(v.reshape(hw, attn.num_heads, -1).transpose(1, 0, 2))  # -> [h, HW, D]
    arrays = [s_t, e_t, v, wv_g, s4_t, e4_t]
    for x in arrays:
        x.flags.writeable = False
    kept = per_image.chain = ChainProjections(*arrays, weights=(attn.derived, attn4.derived, norm.weight))
    return kept


def _chain_tokens(attn: Attention, norm, q: np.ndarray, vo0: np.ndarray, kept: ChainProjections) -> _ChainTokens:
    """The token side of _chain_block: q [B, T, C] (queries + PE), vo0 [B, h0*T0, C]
    (layer 0's step (4) values, Step4Record.values[0])."""
    b, ht0 = vo0.shape[:2]
    qs = _scaled_heads(attn, attn.q_proj, attn.derived.q_t, q)  # -> [B, h, T, D]
    z_t = _through_norm(_per_head(qs, attn.k_proj.weight), norm, vo0)  # qk [B, h*T, C] -> Z^T
    y = np.empty((b, ht0 + 1, attn.internal_dim), q.dtype)
    np.matmul(vo0, kept.wv_g, out=y[:, :ht0])  # [B, h0*T0, C] @ [C, I]
    y[:, ht0] = -kept.wv_g.sum(axis=0)  # the mean's row: -g W_v^T
    shift = norm.bias @ attn.v_proj.weight.T + attn.v_proj.bias  # [I]: b W_v^T, then v_proj's bias
    return _ChainTokens(qs, z_t, y, shift, kept)


def _through_norm(w: np.ndarray, norm, vo0: np.ndarray) -> np.ndarray:
    """The [p0; mean0] side of rows of layer 1's keys (see above): w [B, h*T, C]
    (qk or kq, the token side the keys meet) -> [B, h*T, h0*T0 + 1]:
    [vo0 diag(g) w^T; -g . w]^T, with g layer 0's norm4 weight and vo0 [B, h0*T0, C]."""
    b, ht, _ = w.shape
    ht0 = vo0.shape[1]
    z_t = np.empty((b, ht, ht0 + 1), w.dtype)
    np.matmul(w * norm.weight, vo0.transpose(0, 2, 1), out=z_t[:, :, :ht0])  # [B, h*T, C] @ [B, C, h0*T0]
    z_t[:, :, ht0] = -(w @ norm.weight)  # the mean's column
    return z_t


def _chain_logits(z_t: np.ndarray, xs: np.ndarray, s_t: np.ndarray, e_t: np.ndarray, record: Step4Record,
                  p: int, lo: int, hi: int, key: str) -> np.ndarray:
    """rstd0 * (S_h . x_j + [p0; mean0] . Z_j) + E_h . x_j on rows [lo, hi) of
    prompt p (see above): z_t [h*T, h0*T0 + 1] and xs [h, T, D] the prompt's,
    s_t, e_t [h, D, HW] the image's -> [h*T, R], this thread's work array ``key``."""
    nh, t, _ = xs.shape
    r, ht = hi - lo, nh * t
    logits = np.matmul(z_t, record.weights[0, p, :, lo:hi], out=threads.scratch(key, (ht, r), xs.dtype))
    # [h*T, h0*T0 + 1] @ [h0*T0 + 1, R] -> [h*T, R]
    per_head = threads.scratch("decoder.chain_heads", (nh, t, r), xs.dtype)
    logits += np.matmul(xs, s_t[:, :, lo:hi], out=per_head).reshape(ht, r)  # [h, T, D] @ [h, D, R]
    ops.row_op(np.multiply, logits, record.rstd[0, p, lo:hi], logits)
    logits += np.matmul(xs, e_t[:, :, lo:hi], out=per_head).reshape(ht, r)
    return logits


def _chain_block(chain: _ChainTokens, record: Step4Record, p: int, lo: int, hi: int, j: int,
                 m_parts: np.ndarray, l_parts: np.ndarray, o_parts: np.ndarray) -> None:
    """Layer 1's step (2) on image rows [lo, hi) of prompt p, block j, from
    layer 0's record (see above): this block's max, sums and value sums, as
    _block's, the value sums [h*T, D + h0*T0 + 1] (each head's D columns, then
    the weights' products with [p0; mean0])."""
    kept, qs = chain.kept, chain.qs[p]  # [h, T, D]
    nh, t, d = qs.shape
    r = hi - lo
    p0 = record.weights[0, p, :, lo:hi]  # [h0*T0 + 1, R]: the softmax weights, then mean0
    rstd0 = record.rstd[0, p, lo:hi]  # [R]
    logits = _chain_logits(chain.z_t[p], qs, kept.s_t, kept.e_t, record, p, lo, hi, "decoder.chain_logits")
    m = logits.max(axis=1)  # [h*T]
    ops.exp_below_max_(logits, m[:, None])  # -> e
    np.matmul(logits, ops.ones(r, qs.dtype), out=l_parts[j, p])  # [h*T, R] @ [R]: the sums over the rows
    ops.row_op(np.multiply, logits, rstd0, logits)  # -> e * rstd0
    o = o_parts[j, p]  # [h*T, D + h0*T0 + 1]
    np.matmul(logits.reshape(nh, t, r), kept.v[:, lo:hi], out=o[:, :d].reshape(nh, t, d))  # [h, T, R] @ [h, R, D]
    np.matmul(logits, p0.T, out=o[:, d:])  # [h*T, R] @ [R, h0*T0 + 1]
    m_parts[j, p] = m


def _record_output(attn: Attention, pv: np.ndarray, y: np.ndarray, shift: np.ndarray, t: int) -> np.ndarray:
    """to_image_output from value sums taken through a record (_chain_block's,
    _Deep.final_block's): pv [B, h*T, D + K], each head's D projected columns,
    then K weights of the rows y [B, K, I] (projected, per head) -> [B, T, C]."""
    b = pv.shape[0]
    nh, d = attn.num_heads, attn.internal_dim // attn.num_heads
    out = pv[:, :, :d].reshape(b, nh, t, d).copy()  # [B, h, T, D]
    y = y.reshape(b, -1, nh, d).transpose(0, 2, 1, 3)  # [B, K, I] -> [B, h, K, D]
    out += pv[:, :, d:].reshape(b, nh, t, -1) @ y  # [B, h, T, K] @ [B, h, K, D]
    out += shift.reshape(nh, 1, d)
    out = ref_ops.recombine_heads(out)  # -> [B, T, I]
    return _proj(attn.out_proj, attn.derived.out_t, out)  # -> [B, T, C]


class _ChainStep4(_RecordStep4):
    """Layer 1's step (4), the image attending to the tokens, its logits from
    layer 0's record and the image rows (as _chain_block's; called as _Step4,
    the rows' keys not needed). Per row r and (head, token) j, with kq, kb as
    from_image_token_side gives them (kq_j in its head's D rows of W_q):

        (keys1_r + pe_r) . kq_j + kb_j
            = rstd0_r * (S4_h . k_j + [p0; mean0]_r . Z4_j) + E4_h . k_j + (b . kq_j + kb_j)
        Z4 = [vo0 diag(g) kq^T; -g . kq_j],  k_j = k_proj(tokens) / sqrt(D)

    (b . kq_j + kb_j differs between tokens: the softmax over them keeps it).
    Then from_image_logits as _Step4. 2 x 256 x h*T multiply-adds a row
    become (D + h0*T0 + 1) x h*T: 29M against 9M a block of 2048 rows."""

    def __init__(self, attn: Attention, norm, q: np.ndarray, v: np.ndarray, record: Step4Record,
                 kept: ChainProjections) -> None:
        self.attn, self.record, self.kept = attn, record, kept
        self.ks = _scaled_heads(attn, attn.k_proj, attn.derived.k_t, q)  # -> [B, h, T, D]
        kq, kb = _from_image_keys(attn, self.ks)  # -> [B, h*T, C], [B, h*T, 1]
        self.z_t = _through_norm(kq, norm, record.values[0])  # -> [B, h*T, h0*T0 + 1]
        self.shift = (kq @ norm.bias)[..., None] + kb  # [B, h*T, 1]
        self._set_values(v)

    def logits(self, p: int, lo: int, hi: int) -> np.ndarray:
        """Prompt p's logits on rows [lo, hi) -> [h*T, R]."""
        logits = _chain_logits(self.z_t[p], self.ks[p], self.kept.s4_t, self.kept.e4_t, self.record, p, lo, hi,
                               "decoder.chain4_logits")  # -> [h*T, R]
        logits += self.shift[p]
        return logits


# ---------------------------------------------------------------------------
# Both norms and the final attention from the record (the deep chain)
# ---------------------------------------------------------------------------
# With the chain running, layer 1's steps (2) and (4) read layer 0's record,
# not the keys. Only two things still read rows of keys [R, C]: each layer's
# norm4, for its statistics (the record's mean and rstd), and the final
# attention. Both can be taken from the record too, so that in a transformer
# of two layers no row of keys is made at all (with every row recorded and
# the keys not wanted: the mask decoder's upscaling reads the record).
#
# Layer 0's norm4 reads x0 = src + P0 V0 (P0 a row's h0*T0 softmax weights,
# V0 = vo0 the prompt's values). With sc = src - mean(src) and V0c the rows
# of V0 less their means, x0 - mean0 = sc + P0 V0c, so
#     mean0 = mean(src) + P0 . mean(V0)
#     |x0 - mean0|^2 = |sc|^2 + P0 . (2 sc V0^T + K0 P0),   K0 = V0c V0c^T
# (sc . V0c_j = sc . V0_j: sc is centred). Each V0_j = vh_j W_o^h + b_o / h
# (vh_j the head's D projected values), so sc . V0_j = vh_j . (W_o^h sc^T)
# + sc . b_o / h: D + 1 terms against a projection of the image rows kept
# per image (DeepProjections.s0).
#
# Layer 1's norm4 reads x1 = keys1 + P1 V1 with keys1 = rstd0 (x0 - mean0) g0 + b0:
#     x1 = rstd0 (src g0) + Q B,   Q = [rstd0 P0, rstd0 mean0, P1, 1]   (a row's, h0*T0 + h*T + 2)
#                                  B = [V0 g0; -g0; V1; b0]             (the prompt's, [h0*T0 + h*T + 2, C])
# and with t = src g0 - mean(src g0) (per image) and Bc = B less its rows' means,
#     mean1 = rstd0 mean(src g0) + Q . mean(B)
#     |x1 - mean1|^2 = rstd0^2 |t|^2 + Q . (2 rstd0 t B^T + K1 Q),   K1 = Bc Bc^T
# where t B^T takes products with kept projections of t as above (t0, t1,
# t_rows). The final attention reads keys2 = rstd1 (x1 - mean1) g1 + b1, and
# x1 - mean1 = rstd0 t + Q Bc, so for its token j (qk_j = q_j W_k^h / sqrt(D),
# as to_image_logit_weights) and values
#     (keys2 + pe) . qk_j = rstd1 (rstd0 q_j . W_k^h (t g1)^T + Q . Bc (g1 qk_j)) + q_j . W_k^h pe^T
#     sum_r e_jr keys2_r W_v^h^T = (e rstd1 rstd0)_j (t g1) W_v^h^T + ((e rstd1)_j Q) (Bc g1 W_v^h^T)
#                                  + (sum_r e_jr) b1 W_v^h^T
# (b1 . qk_j is the same for every row: the softmax drops it). Per row and
# prompt the [C]-wide products (58M multiply-adds a norm, 2 x 34M for the
# final attention on 4 tokens) become products of D + 1 and of h0*T0 + h*T + 2
# terms, and the normalisations' passes over [R, C] rows go. The same
# mathematics in another association: within the tolerances
# (tests/test_fast_vs_reference.py); the variance is a sum of squares taken
# apart, whose rounding is that of its terms (checked there on MobileSAM's
# weights against the reference's two-pass variance).


class DeepProjections(NamedTuple):
    """The image rows' part of the deep chain (see above), kept per image, read-only
    (locations last; ``2 *`` folds the factor of the cross terms in, exactly):

        src_mean, src_sq [HW]: mean(src), |sc|^2
        s0 [h0, D + 1, HW]: 2 W_o0^h sc^T, then 2 sc . b_o0 / h0
        t_mean, t_sq [HW]: mean(src g0), |t|^2
        t0 [h0, D + 1, HW]: 2 W_o0^h (t g0)^T, then 2 (t g0) . b_o0 / h0
        t1 [h, D + 1, HW]: 2 W_o1^h t^T, then 2 t . b_o1 / h
        t_rows [2, HW]: -2 t . g0, 2 t . b0
        tk, ek [h, D, HW]: W_k^h (t g1)^T, W_k^h pe^T (the final attention's k_proj)
        tv [h, HW, D]: (t g1) W_v^h^T (its v_proj)

    W_oi the out_proj of layer i's step (4), g_i and b_i its norm4's weight and
    bias. ``weights``: the derived values and norms they were made with."""
    src_mean: np.ndarray
    src_sq: np.ndarray
    s0: np.ndarray
    t_mean: np.ndarray
    t_sq: np.ndarray
    t0: np.ndarray
    t1: np.ndarray
    t_rows: np.ndarray
    tk: np.ndarray
    ek: np.ndarray
    tv: np.ndarray
    weights: tuple


def _deep_weights(self: TwoWayTransformer) -> tuple:
    l0, l1 = self.layers
    return (l0.cross_attn_image_to_token.derived, l1.cross_attn_image_to_token.derived,
            self.final_attn_token_to_image.derived, l0.norm4.weight, l0.norm4.bias, l1.norm4.weight)


def _deep_projections(self: TwoWayTransformer, src: np.ndarray, pe: np.ndarray,
                      per_image: PerImage) -> DeepProjections:
    """DeepProjections of the image rows src, pe [HW, C], kept in per_image for these
    weights. The centring and the squares in float64, rounded once; the products
    in src's dtype, blocks of 512 locations over threads."""
    weights = _deep_weights(self)
    kept = per_image.deep
    if kept is not None and all(a is b for a, b in zip(kept.weights, weights)):
        return kept
    l0, l1 = self.layers
    a0, a1, fin = l0.cross_attn_image_to_token, l1.cross_attn_image_to_token, self.final_attn_token_to_image
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    dt = src.dtype
    hw = src.shape[0]
    g0, b0, g1 = f64(l0.norm4.weight), f64(l0.norm4.bias), f64(l1.norm4.weight)
    h0, h1, hf = a0.num_heads, a1.num_heads, fin.num_heads
    d0, d1, df = (a.internal_dim // a.num_heads for a in (a0, a1, fin))
    src_mean, src_sq, t_mean, t_sq = (np.empty(hw, dt) for _ in range(4))
    s0, t0 = (np.empty((h0, d0 + 1, hw), dt) for _ in range(2))
    t1 = np.empty((h1, d1 + 1, hw), dt)
    t_rows = np.empty((2, hw), dt)
    tk, ek = (np.empty((hf * df, hw), dt) for _ in range(2))
    tv = np.empty((hw, hf * df), dt)
    two = dt.type(2)

    def block(lo, hi):  # blocks of 512 locations, fixed whatever the number of threads
        x = f64(src[lo:hi])  # [R, C]
        sc = x - x.mean(axis=1, keepdims=True)
        y = x * g0
        t = y - y.mean(axis=1, keepdims=True)
        src_mean[lo:hi], src_sq[lo:hi] = x.mean(axis=1), np.einsum("rc,rc->r", sc, sc)
        t_mean[lo:hi], t_sq[lo:hi] = y.mean(axis=1), np.einsum("rc,rc->r", t, t)
        t_rows[0, lo:hi], t_rows[1, lo:hi] = -2 * (t @ g0), 2 * (t @ b0)
        s0[:, d0, lo:hi] = 2 * (sc @ f64(a0.out_proj.bias)) / h0
        t0[:, d0, lo:hi] = 2 * ((t * g0) @ f64(a0.out_proj.bias)) / h0
        t1[:, d1, lo:hi] = 2 * (t @ f64(a1.out_proj.bias)) / h1
        sc, tg0, t, tg1 = (np.asarray(a, dt) for a in (sc, t * g0, t, t * g1))
        for a, z, out, d in ((a0, sc, s0, d0), (a0, tg0, t0, d0), (a1, t, t1, d1)):
            prod = a.derived.out_t @ z.T  # [I, C] @ [C, R] -> [I, R]
            out[:, :d, lo:hi] = prod.reshape(a.num_heads, d, -1)
            out[:, :d, lo:hi] *= two
        np.matmul(fin.k_proj.weight, tg1.T, out=tk[:, lo:hi])  # [I, C] @ [C, R] -> [I, R]
        np.matmul(fin.k_proj.weight, pe[lo:hi].T, out=ek[:, lo:hi])
        np.matmul(tg1, fin.derived.v_t, out=tv[lo:hi])  # [R, C] @ [C, I] -> [R, I]

    threads.parallel_blocks(block, hw, 512, threads=threads.row_threads())
    tk, ek = (x.reshape(hf, df, hw) for x in (tk, ek))  # [I, HW] -> [h, D, HW]
    tv = np.ascontiguousarray(tv.reshape(hw, hf, df).transpose(1, 0, 2))  # -> [h, HW, D]
    arrays = [src_mean, src_sq, s0, t_mean, t_sq, t0, t1, t_rows, tk, ek, tv]
    for x in arrays:
        x.flags.writeable = False
    kept = per_image.deep = DeepProjections(*arrays, weights=weights)
    return kept


def _augmented(vh: np.ndarray) -> np.ndarray:
    """vh [B, h, T, D] with a column of ones -> [B, h, T, D + 1] (meets the projections' last row)."""
    out = np.empty(vh.shape[:-1] + (vh.shape[-1] + 1,), vh.dtype)
    out[..., :-1] = vh
    out[..., -1] = 1
    return out


def _rstd(sq: np.ndarray, c: int, eps: float, out: np.ndarray) -> None:
    """1 / sqrt(sq / c + eps) into ``out``, as layer_norm_rows (sq a row's sum of squares
    about its mean, taken apart: never below 0 but by rounding, so clamped there)."""
    dt = sq.dtype.type
    np.maximum(sq, 0, out=sq)
    sq *= dt(1.0 / c)
    sq += dt(eps)
    np.sqrt(sq, out=sq)
    np.divide(1, sq, out=out)


class _Deep:
    """The token side of the deep chain for a batch of prompts (see above),
    built as the layers run: layer 0's step (4) (here), layer 1's (set_layer1),
    the final attention's queries (set_final). Its block methods write the
    record's mean and rstd of both norms and the final attention's block parts."""

    def __init__(self, transformer: TwoWayTransformer, kept: DeepProjections, step0: "_Layer0Step4",
                 record: Step4Record) -> None:
        self.transformer, self.kept, self.record = transformer, kept, record
        self.c = step0.vo.shape[-1]
        self.vh0 = _augmented(step0.vh)  # [B, h0, T0, D + 1]
        vo0 = step0.vo  # [B, h0*T0, C]
        self.v0_mean = vo0 @ ops.ones(self.c, vo0.dtype) / vo0.dtype.type(self.c)  # [B, h0*T0]
        v0c = vo0 - self.v0_mean[..., None]
        self.k0 = v0c @ v0c.transpose(0, 2, 1)  # [B, h0*T0, h0*T0]
        self.vo0 = vo0

    def set_layer1(self, step1: "_ChainStep4") -> None:
        """Layer 1's step (4) token side: B, its means, Bc and K1."""
        l0 = self.transformer.layers[0]
        vo1 = step1.vo  # [B, h*T, C]
        b, ht0, c = self.vo0.shape
        ht1 = vo1.shape[1]
        dt = vo1.dtype
        rows = np.empty((b, ht0 + ht1 + 2, c), dt)  # B = [V0 g0; -g0; V1; b0]
        np.multiply(self.vo0, l0.norm4.weight, out=rows[:, :ht0])
        rows[:, ht0] = -l0.norm4.weight
        rows[:, ht0 + 1:-1] = vo1
        rows[:, -1] = l0.norm4.bias
        self.b_mean = rows @ ops.ones(c, dt) / dt.type(c)  # [B, M]
        rows -= self.b_mean[..., None]  # -> Bc
        self.bc = rows
        self.k1 = rows @ rows.transpose(0, 2, 1)  # [B, M, M]
        self.vh1 = _augmented(step1.vh)  # [B, h, T, D + 1]

    def set_final(self, attn: Attention, q: np.ndarray) -> None:
        """The final attention's token side, q [B, T', C] (queries + PE)."""
        g1 = self.transformer.layers[1].norm4
        self.qs = _scaled_heads(attn, attn.q_proj, attn.derived.q_t, q)  # -> [B, h, T', D]
        qk = _per_head(self.qs, attn.k_proj.weight)  # -> [B, h*T', C]
        self.zf_t = (qk * g1.weight) @ self.bc.transpose(0, 2, 1)  # [B, h*T', C] @ [B, C, M] -> [B, h*T', M]
        self.yf = self.bc @ (g1.weight[:, None] * attn.derived.v_t)  # [B, M, C] @ [C, I] -> [B, M, I]
        self.shift = g1.bias @ attn.derived.v_t + attn.v_proj.bias  # [I]: b1 W_v^T, then v_proj's bias

    @property
    def width(self) -> int:
        """Columns of the final attention's block value sums: D, then M."""
        return self.qs.shape[-1] + self.bc.shape[1]

    def stats0(self, p: int, lo: int, hi: int) -> None:
        """Layer 0's norm4 statistics on rows [lo, hi) of prompt p, from its softmax
        weights in the record, into the record."""
        kept, record = self.kept, self.record
        w = record.weights[0, p, :-1, lo:hi]  # [h0*T0, R]
        ht, r = w.shape
        z = np.matmul(self.k0[p], w, out=threads.scratch("deep.z0", (ht, r), w.dtype))  # K0 P0
        vh = self.vh0[p]  # [h0, T0, D + 1]
        z += np.matmul(vh, kept.s0[:, :, lo:hi], out=threads.scratch("deep.x0", vh.shape[:2] + (r,), w.dtype)
                       ).reshape(ht, r)  # + 2 sc V0^T
        z *= w
        sq = ops.ones(ht, w.dtype) @ z  # [R]
        sq += kept.src_sq[lo:hi]
        record.weights[0, p, -1, lo:hi] = kept.src_mean[lo:hi] + self.v0_mean[p] @ w
        _rstd(sq, self.c, self.transformer.layers[0].norm4.eps, record.rstd[0, p, lo:hi])

    def stats1(self, p: int, lo: int, hi: int) -> np.ndarray:
        """Layer 1's norm4 statistics on rows [lo, hi) of prompt p into the record
        -> Q [M, R] (this thread's work array, for final_block)."""
        kept, record = self.kept, self.record
        n0 = record.weights.shape[2]  # h0*T0 + 1
        m = self.bc.shape[1]
        r = hi - lo
        dt = record.weights.dtype
        rstd0 = record.rstd[0, p, lo:hi]
        q = threads.scratch("deep.q", (m, r), dt)
        np.multiply(record.weights[0, p, :, lo:hi], rstd0, out=q[:n0])
        q[n0:-1] = record.weights[1, p, :-1, lo:hi]
        q[-1] = 1
        x = threads.scratch("deep.x1", (m, r), dt)  # 2 t B^T
        vh0, vh1 = self.vh0[p], self.vh1[p]
        np.matmul(vh0, kept.t0[:, :, lo:hi], out=x[:n0 - 1].reshape(vh0.shape[:2] + (r,)))
        x[n0 - 1] = kept.t_rows[0, lo:hi]
        np.matmul(vh1, kept.t1[:, :, lo:hi], out=x[n0:-1].reshape(vh1.shape[:2] + (r,)))
        x[-1] = kept.t_rows[1, lo:hi]
        x *= rstd0
        z = np.matmul(self.k1[p], q, out=threads.scratch("deep.z1", (m, r), dt))  # K1 Q
        z += x
        z *= q
        sq = ops.ones(m, dt) @ z  # [R]
        sq += rstd0 * rstd0 * kept.t_sq[lo:hi]
        record.weights[1, p, -1, lo:hi] = rstd0 * kept.t_mean[lo:hi] + self.b_mean[p] @ q
        _rstd(sq, self.c, self.transformer.layers[1].norm4.eps, record.rstd[1, p, lo:hi])
        return q

    def final_block(self, q: np.ndarray, p: int, lo: int, hi: int, j: int, m_parts: np.ndarray,
                    l_parts: np.ndarray, o_parts: np.ndarray) -> None:
        """The final attention on rows [lo, hi) of prompt p, block j: its max, sums and
        value sums ([h*T', D + M]: each head's D columns, then the weights' products with Q)."""
        kept, record = self.kept, self.record
        rstd0, rstd1 = record.rstd[0, p, lo:hi], record.rstd[1, p, lo:hi]
        qs = self.qs[p]  # [h, T', D]
        nh, t, d = qs.shape
        r, ht = hi - lo, nh * t
        per_head = threads.scratch("deep.heads", (nh, t, r), qs.dtype)
        logits = np.matmul(qs, kept.tk[:, :, lo:hi], out=threads.scratch("deep.logits", (nh, t, r), qs.dtype))
        logits = logits.reshape(ht, r)  # [h, T', D] @ [h, D, R] -> [h*T', R]
        logits *= rstd0
        logits += np.matmul(self.zf_t[p], q, out=per_head.reshape(ht, r))  # [h*T', M] @ [M, R]
        logits *= rstd1
        logits += np.matmul(qs, kept.ek[:, :, lo:hi], out=per_head).reshape(ht, r)
        mx = logits.max(axis=1)  # [h*T']
        ops.exp_below_max_(logits, mx[:, None])  # -> e
        np.matmul(logits, ops.ones(r, qs.dtype), out=l_parts[j, p])  # the sums over the rows
        logits *= rstd1
        o = o_parts[j, p]  # [h*T', D + M]
        np.matmul(logits, q.T, out=o[:, d:])  # [h*T', R] @ [R, M]
        logits *= rstd0
        np.matmul(logits.reshape(nh, t, r), kept.tv[:, lo:hi], out=o[:, :d].reshape(nh, t, d))  # [h, R, D]
        m_parts[j, p] = mx
