"""The fast layer of modeling/image_encoder.py (the ViT image encoder).

Each function here is registered against the reference ``forward`` it
replaces (:func:`npsam.fast.implements`) and says why its result is the same.
What makes them faster than the reference:

- **Attention**: q, k and v stay strided views of the qkv projection (the
  reference copies them into [3, B*h, N, D]); the [G, N, N] attention map is
  never held whole but taken a block of query rows (or a few windows) at a
  time, the blocks spread over worker threads with BLAS on one thread in each;
  the softmax runs in place; the output is written straight into the layout
  ``proj`` reads.
- **Block**: the residual sums in place, and the MLP on the tokens as one
  [B*H*W, C] matrix with BLAS single-threaded, so that MLPBlock's fused row
  pass (the fast layer of modeling/common.py) brings its own threads.
- **PatchEmbed**: its output copied once into token order ([B, H, W, C] in C
  order), which every later step reads.

Dimension letters: as in modeling/image_encoder.py (B, H, W, C, h, D, N, G, M,
q_h, q_w, k_h, k_w); A batches of maps (images or windows), Nk keys.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from . import implements, ops, threads
from ..modeling.image_encoder import Attention, Block, PatchEmbed, get_rel_pos, window_partition, window_unpartition

# At most this many attention logits per thread exist at once (4 MB in
# float32). The global blocks of ViT-B at 1024x1024 would otherwise hold
# 12 x 4096 x 4096 logits (805 MB) plus as much again for the softmax. A global
# block's attention is 7-13% faster in chunks of 1M logits than of 4M (the
# softmax's passes stay nearer the cores); 256K makes its products slower.
ATTENTION_CHUNK_ELEMENTS = 1 << 20


@implements(PatchEmbed)
def patch_embed_forward(self: PatchEmbed, x: np.ndarray) -> np.ndarray:
    """Replaces PatchEmbed.forward: the same values (bit for bit), copied into
    C order once instead of returned as a transposed view."""
    x = self.proj(x)  # [B, 3, S, S] -> [B, C, H, W]
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # -> [B, H, W, C]


@implements(Block)
def block_forward(self: Block, x: np.ndarray) -> np.ndarray:
    """Replaces Block.forward. The same operations in the same order; the two
    residual sums are written into the fresh attention and MLP outputs (a sum
    is commutative, so bit for bit the same), and the MLP reads the tokens as
    one [B*H*W, C] matrix (np.matmul runs one GEMM per leading index, so
    [B, H, W, C] @ [C, M] would be B*H small products)."""
    shortcut = x  # [B, H, W, C]
    x = self.norm1(x)
    if self.window_size > 0:
        H, W = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, self.window_size)  # -> [B*nW, ws, ws, C]
    x = self.attn(x)  # a fresh array
    if self.window_size > 0:
        x = window_unpartition(x, self.window_size, pad_hw, (H, W))  # -> [B, H, W, C], a fresh array
    x += shortcut  # reference: x = shortcut + x
    with threads.single_threaded_blas():  # MLPBlock's fused row pass brings its own threads
        y = self.mlp(self.norm2(x).reshape(-1, x.shape[-1]))  # [BHW, C] -> [BHW, M] -> [BHW, C]
    y = y.reshape(x.shape)  # -> [B, H, W, C]
    y += x  # reference: x = x + self.mlp(self.norm2(x))
    return y


@implements(Attention)
def attention_forward(self: Attention, x: np.ndarray) -> np.ndarray:
    """Replaces Attention.forward (x [B, H, W, C] -> [B, H, W, C]).

    The same products, each over the same reduction as the reference's (q @ k^T
    over D, attn @ v over N): q, k and v are views of the qkv projection, not
    copies; the relative position terms are added to each block of logits (in
    the reference's order, rel_h then rel_w); the softmax divides the [n, D]
    product by the row sums rather than the [n, Nk] probabilities (the same
    mathematics, D/Nk as many divisions; rounding differs by an ulp or so) and
    clamps exponents far below the row maximum (see ops.exp_below_max_). Within
    the encoder tolerances of the reference, not bit for bit.
    """
    B, H, W, _ = x.shape
    h = self.num_heads
    qkv = self.qkv(x.reshape(B * H * W, -1))  # [B*N, C] -> [B*N, 3C] (one GEMM, see block_forward)
    q, k, v = qkv.reshape(B, H * W, 3, h, -1).transpose(2, 0, 3, 1, 4)  # -> 3 x [B, h, N, D], views
    # NOTE(reference): q is scaled before the product, (q * scale) @ k^T, and the
    # relative position terms use the unscaled q.
    q_scaled = q * q.dtype.type(self.scale)  # [B, h, N, D]
    rel_h = rel_w = None
    if self.use_rel_pos:
        rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
    # The output written straight in the layout proj reads: [B, N, h, D] = [B*N, C]
    out = np.empty((B, H * W, h, q.shape[-1]), dtype=q.dtype)
    with threads.single_threaded_blas():  # its steps bring their own threads; the projections keep BLAS's
        attention(q_scaled, k, v, rel_h, rel_w, ATTENTION_CHUNK_ELEMENTS, out=out.transpose(0, 2, 1, 3))  # -> view
    return self.proj(out.reshape(B * H * W, -1)).reshape(B, H, W, -1)  # [B*N, C] -> [B, H, W, C]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, rel_h: Optional[np.ndarray] = None,
              rel_w: Optional[np.ndarray] = None, chunk_elements: int = ATTENTION_CHUNK_ELEMENTS,
              out: Optional[np.ndarray] = None) -> np.ndarray:
    """softmax(q @ k^T + rel_h + rel_w) @ v, a block of query rows at a time.

    The rest of Attention.forward: ``attn = q @ k^T``, ``add_decomposed_rel_pos``,
    ``attn.softmax(dim=-1)``, ``attn @ v``. q [A, M, N, D] (already scaled), k, v
    [A, M, Nk, D]; rel_h [A, M, q_h, q_w, k_h] and rel_w [A, M, q_h, q_w, k_w]
    from :func:`decomposed_rel_pos` (N = q_h * q_w), or None. Any of them may be
    strided views (the matrix products take them as they are). Returns
    [A, M, N, D], written into ``out`` when given.

    Windowed blocks take several windows' maps per step; global ones take whole
    rows of the token grid of one map, so at most ``chunk_elements`` logits exist.
    """
    A, M, N, D = q.shape  # A batches (images or windows) of M maps (heads)
    Nk = k.shape[2]
    q_w = rel_h.shape[3] if rel_h is not None else 1
    kT = k.transpose(0, 1, 3, 2)  # [A, M, Nk, D] -> [A, M, D, Nk]
    if out is None:
        out = np.empty((A, M, N, v.shape[3]), dtype=q.dtype)
    # A step: ta batches x tm maps x tn query rows, at most chunk_elements logits
    if N * Nk > chunk_elements:  # whole grid rows (q_w queries each) of one map, so the rel-pos terms slice cleanly
        ta, tm, tn = 1, 1, max(1, chunk_elements // (Nk * q_w)) * q_w
    elif M * N * Nk > chunk_elements:
        ta, tm, tn = 1, chunk_elements // (N * Nk), N
    else:
        ta, tm, tn = chunk_elements // (M * N * Nk), M, N
    steps_m, steps_n = -(-M // tm), -(-N // tn)

    def work(start, stop):
        for step in range(start, stop):
            a0, rest = divmod(step, steps_m * steps_n)
            m0, n0 = divmod(rest, steps_n)
            a0, m0, n0 = a0 * ta, m0 * tm, n0 * tn
            a, m, n = slice(a0, a0 + ta), slice(m0, m0 + tm), slice(n0, min(N, n0 + tn))
            attn = q[a, m, n] @ kT[a, m]  # [a, m, n, D] @ [a, m, D, Nk] -> [a, m, n, Nk]
            if rel_h is not None:
                rows = slice(n.start // q_w, n.stop // q_w)
                add_rel_pos_(attn, rel_h[a, m, rows], rel_w[a, m, rows])
            # softmax(dim=-1), in place
            ops.exp_below_max_(attn, attn.max(axis=-1, keepdims=True))  # minus the row max, no subnormals
            denom = attn.sum(axis=-1, keepdims=True)  # [a, m, n, Nk] -> [a, m, n, 1]
            # Dividing the [n, D] product rather than the [n, Nk] probabilities:
            # the same mathematics, D/Nk as many divisions (rounding differs by an ulp or so).
            o = np.matmul(attn, v[a, m], out=out[a, m, n])  # [a, m, n, Nk] @ [a, m, Nk, D] -> [a, m, n, D]
            o /= denom

    # steps over threads (BLAS single-threaded inside, see threads.single_threaded_blas)
    threads.parallel_rows(work, -(-A // ta) * steps_m * steps_n,
                          threads=threads.row_threads() if threads.blas_is_single() else 1)
    return out


def decomposed_rel_pos(q: np.ndarray, rel_pos_h: np.ndarray, rel_pos_w: np.ndarray,
                       q_size: Tuple[int, int], k_size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """The first half of add_decomposed_rel_pos: the two relative position terms,
    not yet added (the reference's rel_h and rel_w, by the same products).

    q [..., q_h*q_w, D] (any leading axes: [G, N, D] or [B, h, N, D]) ->
    rel_h [..., q_h, q_w, k_h], rel_w [..., q_h, q_w, k_w].
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)  # -> [q_h, k_h, D]
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)  # -> [q_w, k_w, D]

    r_q = q.reshape(q.shape[:-2] + (q_h, q_w, q.shape[-1]))  # [..., N, D] -> [..., q_h, q_w, D]
    rel_h = r_q @ Rh.transpose(0, 2, 1)  # [..., q_h, q_w, D] @ [q_h, D, k_h] -> [..., q_h, q_w, k_h]
    rel_w = r_q.swapaxes(-3, -2) @ Rw.transpose(0, 2, 1)  # [..., q_w, q_h, D] @ [q_w, D, k_w] -> [..., q_w, q_h, k_w]
    return rel_h, rel_w.swapaxes(-3, -2)  # -> [..., q_h, q_w, k_w]


def add_rel_pos_(attn: np.ndarray, rel_h: np.ndarray, rel_w: np.ndarray) -> np.ndarray:
    """The second half of add_decomposed_rel_pos, in place, for a block of n_h
    query rows of the grid: attn [..., n_h*q_w, k_h*k_w], rel_h [..., n_h, q_w, k_h],
    rel_w [..., n_h, q_w, k_w]; attn[..., (i, j), (y, x)] += rel_h[..., i, j, y],
    then += rel_w[..., i, j, x] (the reference's order: bit for bit its sums)."""
    n_h, q_w, k_h = rel_h.shape[-3:]
    k_w = rel_w.shape[-1]
    view = attn.reshape(attn.shape[:-2] + (n_h, q_w, k_h, k_w))  # [..., n, Nk] -> [..., n_h, q_w, k_h, k_w] (a view)
    view += rel_h[..., None]
    view += rel_w[..., None, :]
    return attn
