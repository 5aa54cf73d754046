"""Fast twin of modeling/mask_decoder.py: MaskDecoder.predict_masks with the
image kept per image, the transformer's fused passes (fast/transformer.py)
and the upscaling as one pass over pixel rows; MaskDecoder.forward for the
masks it returns only; MLP.forward on kept transposed weights.

Dimension letters as in modeling/mask_decoder.py; O1, O2 the upscaling's
channels (C/4, C/8); R pixels of a block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np

from ..kernels import ops as ref_ops
from ..kernels.checks import check_bool, check_decoder_inputs, check_finite
from ..modeling.mask_decoder import MLP, MaskDecoder
from . import derives, implements, ops, threads
from .transformer import PerImage, Step4Record, forward_rows


class MLPDerived(NamedTuple):
    """Each layer's weight transposed, C-contiguous: the heads run on a few rows."""
    weights_t: Tuple[np.ndarray, ...]  # [in, out] per layer


@derives(MLP)
def mlp_derived(mlp: MLP) -> MLPDerived:
    return MLPDerived(tuple(np.ascontiguousarray(layer.weight.T) for layer in mlp.layers))


@implements(MLP)
def mlp(self: MLP, x: np.ndarray) -> np.ndarray:
    """Replaces MLP.forward: the same layers, each reading its kept weight.T, ReLU
    in place (a fresh array): within the tolerances (BLAS's order by layout)."""
    for i, (layer, w_t) in enumerate(zip(self.layers, self.derived.weights_t)):
        x = ops.linear(x, layer.weight, layer.bias, w_t)  # [..., in] -> [..., out]
        if i < self.num_layers - 1:
            np.maximum(x, 0, out=x)
    return ref_ops.sigmoid(x) if self.sigmoid_output else x


class UpscalingDerived(NamedTuple):
    """The transposed convolutions' weights as matrices (see upscaled_masks).

    w1c [C, 2*2*O1], columns (i, j, O1), and b1c [O1], centred for LayerNorm2d,
    which subtracts each output pixel's mean over its O1 channels: that mean is
    linear in the input, so subtracting each input channel's mean over O1 from
    its weights (and the bias's mean from the bias) gives x - mean(x) in the
    product itself, computed in float64 and rounded once. Same mathematics,
    within the tolerances; it saves LayerNorm2d's two passes for the mean.
    w2 [O1, 2*2*O2], columns (k, l, O2).

    The chain: the first product, keys @ w1c + b1c, taken back through each
    layer's step (4) and norm4 (see upscaled_masks), computed in float64 and
    rounded once. With W_L = w1c and, for layer i, norm4's weight g_i and bias b_i:

        chain_weights[i]    W_i = diag(g_i) W_(i+1)        [C, 2*2*O1]
        chain_mean_rows[i]  -1^T W_i                       [2*2*O1]: the row for norm4's mean
        chain_shifts[i]     b_(i-1) W_i / h (0 for i = 0)  [2*2*O1]: added to each of the h*T
                            rows of vo_i W_i (each head's softmax weights sum to 1)
        chain_bias          b_(L-1) W_L + b1c              [2*2*O1]

    No chain (empty tuples) for a transformer without layers, or whose
    layers' steps (4) differ in heads.
    """
    w1c: np.ndarray
    b1c: np.ndarray
    w2: np.ndarray
    chain_weights: Tuple[np.ndarray, ...]
    chain_mean_rows: Tuple[np.ndarray, ...]
    chain_shifts: Tuple[np.ndarray, ...]
    chain_bias: np.ndarray


@derives(MaskDecoder)
def upscaling_weights(self: MaskDecoder) -> UpscalingDerived:
    conv1, conv2 = self.output_upscaling[0], self.output_upscaling[3]
    c, o1 = conv1.in_channels, conv1.out_channels
    dt = conv1.weight.dtype
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    w1 = conv1.weight.transpose(0, 2, 3, 1).reshape(c, 4, o1).astype(np.float64)  # (C, O1, 2, 2) -> [C, 2*2, O1]
    w1 -= w1.mean(axis=2, keepdims=True)
    w1 = w1.reshape(c, 4 * o1)
    b1 = f64(conv1.bias)
    b1c = b1 - b1.mean()
    w2 = conv2.weight.transpose(0, 2, 3, 1).reshape(o1, -1)  # (O1, O2, 2, 2) -> [O1, 2*2*O2]
    layers = list(self.transformer.layers)
    if len({layer.cross_attn_image_to_token.num_heads for layer in layers}) > 1:
        layers = []  # no chain: a Step4Record holds one h*T for every layer (the upscaling reads the keys)
    weights = [None] * len(layers)
    w = w1  # W_L
    for i in reversed(range(len(layers))):
        w = weights[i] = f64(layers[i].norm4.weight)[:, None] * w  # W_i = diag(g_i) W_(i+1)
    shifts = [np.zeros(4 * o1)] + [f64(layers[i - 1].norm4.bias) @ weights[i]
                                   / layers[i].cross_attn_image_to_token.num_heads for i in range(1, len(layers))]
    bias = (f64(layers[-1].norm4.bias) @ w1 if layers else 0) + np.tile(b1c, 4)  # b1c on each output pixel
    cast = lambda a: np.ascontiguousarray(a, dtype=dt)  # noqa: E731
    return UpscalingDerived(cast(w1), cast(b1c), np.ascontiguousarray(w2),
                            tuple(cast(x) for x in weights), tuple(cast(-x.sum(axis=0)) for x in weights),
                            tuple(cast(x) for x in shifts), cast(bias))


@dataclass
class ImageRows:
    """One image, kept by the decoder across calls (see image_rows): the arrays it
    was given (held, so their identities cannot be reused), the dense no-mask
    embedding, copies of writeable inputs, and what the transformer reads:
    src = image + dense and the PE, as read-only rows [1, HW, C]."""
    image_embeddings: np.ndarray
    image_pe: np.ndarray
    dense: np.ndarray  # [C]
    embeddings_copy: Optional[np.ndarray]  # None when image_embeddings is read-only
    pe_copy: Optional[np.ndarray]
    src: np.ndarray
    pos_src: np.ndarray
    transformer: PerImage = field(default_factory=PerImage)

    def answers(self, image_embeddings: np.ndarray, image_pe: np.ndarray, dense: np.ndarray) -> bool:
        """True if these are the arrays kept here, with the same contents."""
        return (self.image_embeddings is image_embeddings and self.image_pe is image_pe
                and np.array_equal(self.dense, dense)
                and (self.pe_copy is None or ops.same_contents(self.pe_copy, image_pe))
                and (self.embeddings_copy is None or ops.same_contents(self.embeddings_copy, image_embeddings)))


@implements(MaskDecoder)
def mask_decoder(self: MaskDecoder, image_embeddings: np.ndarray, image_pe: np.ndarray,
                 sparse_prompt_embeddings: np.ndarray, dense_prompt_embeddings: np.ndarray,
                 multimask_output: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Replaces MaskDecoder.forward: the masks it returns, and only those, made
    as predict_masks makes them -> [B, 3 or 1, 4H, 4W], [B, 3 or 1].
    NOTE(reference): multimask returns mask tokens 1..3, single-mask token 0;
    the official predict_masks makes all four and forward slices. Each mask
    token's final attention, norm_final_attn, hypernetwork and mask product
    read no other mask token, so the others are not made: the final attention
    on 4 tokens (or 2) instead of 5. The same computations as predict_masks'
    for the masks returned, but its products have fewer columns: within the
    tolerances (tests/test_fast_vs_reference.py), and every caller of forward
    (the predictor, the automatic mask generator's fast twin: see
    returned_masks) gets the same bits."""
    multimask_output = check_bool("multimask_output", multimask_output)
    args = check_decoder_inputs(self.transformer_dim, self.iou_token.weight.dtype, image_embeddings, image_pe,
                                sparse_prompt_embeddings, dense_prompt_embeddings)
    return decode(self, *args, returned_masks(self, multimask_output))[:2]


def returned_masks(self: MaskDecoder, multimask_output: bool) -> range:
    """The mask tokens MaskDecoder.forward returns (see mask_decoder)."""
    return range(1, self.num_mask_tokens) if multimask_output else range(0, 1)


def final_tokens(masks: range) -> tuple:
    """The tokens the final attention runs for: the IoU token, then ``masks``' tokens."""
    return (0,) + tuple(1 + i for i in masks)


def hypernetworks(self: MaskDecoder, mask_tokens_out: np.ndarray, masks: range) -> np.ndarray:
    """hyper_in of ``masks``: mask_tokens_out [B, M', C] (their tokens, in order) -> [B, M', C/8]."""
    return np.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, k, :])
                     for k, i in enumerate(masks)], axis=1)  # M' x [B, C/8] -> [B, M', C/8]


@implements(MaskDecoder, "predict_masks")
def predict_masks(self: MaskDecoder, image_embeddings: np.ndarray, image_pe: np.ndarray,
                  sparse_prompt_embeddings: np.ndarray, dense_prompt_embeddings: np.ndarray
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Replaces MaskDecoder.predict_masks: the image side kept per image
    (image_rows: exact), the transformer as fused passes (fast/transformer.py:
    within the tolerances) and the upscaling with the mask product per pixel
    (upscaled_masks: within the tolerances) -> [B, M, 4H, 4W], [B, M]."""
    return decode(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                  range(self.num_mask_tokens))[:2]


def decode(self: MaskDecoder, image_embeddings: np.ndarray, image_pe: np.ndarray,
           sparse_prompt_embeddings: np.ndarray, dense_prompt_embeddings: np.ndarray, masks: range,
           keep: Optional[Callable[[np.ndarray], np.ndarray]] = None, work: Optional[threads.WorkArrays] = None,
           rows: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """predict_masks for the mask tokens ``masks``, checked inputs -> masks
    [B', M', 4H', 4W] of the prompts upscaled, iou_pred [B, M'], those prompts
    [B'] (indices, increasing).

    By default every prompt, every image row. The automatic mask generator's
    fast twin asks for less (fast/automatic_mask_generator.py,
    decode_iou_first): ``keep`` (iou_pred -> prompt indices) chooses the
    prompts to upscale once the IoU predictions are made; ``rows`` upscales
    the first ``rows`` image rows only (H' = upscaled_rows(H, W, rows));
    ``work`` holds the batch's large arrays (the keys, the record, the masks).
    Every value returned is the one the whole call computes, bit for bit: the
    upscaling is per prompt, and per pixel row within it."""
    with threads.single_threaded_blas():  # the fused passes bring their own threads
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = np.concatenate([self.iou_token.weight, self.mask_tokens.weight], axis=0)  # -> [1+M, C]
        output_tokens = np.broadcast_to(output_tokens[None], (b,) + output_tokens.shape)  # -> [B, 1+M, C]
        tokens = np.concatenate([output_tokens, sparse_prompt_embeddings], axis=1)  # -> [B, T, C]
        src, pos_src, per_image = image_rows(self, image_embeddings, image_pe, dense_prompt_embeddings)
        _, c, h, w = image_embeddings.shape
        keys = None if work is None else work.get("keys", (b, h * w, c), src.dtype)
        # every row recorded: layer 1's step (2) reads the record (fast/transformer.py, _chain_block)
        record, image_side = step4_record(self, src, per_image, tokens.shape[:2], h * w, work)

        hs, keys = forward_rows(self.transformer, src, pos_src, tokens, per_image, keys, record,
                                keys_wanted=record is None, final_tokens=final_tokens(masks))
        # -> [B, 1+M', C] (the IoU token and these mask tokens), [B, HW, C] (or None)
        iou_pred = self.iou_prediction_head(hs[:, 0, :])[:, masks.start:masks.stop]  # [B, C] -> [B, M] -> [B, M']
        prompts = np.arange(b) if keep is None else keep(iou_pred)
        hyper_in = hypernetworks(self, hs[:, 1:, :], masks)  # [B, M', C] -> [B, M', C/8]
        if len(prompts) == 0:
            return np.zeros((0, len(masks), 4 * h, 4 * w), dtype=hs.dtype), iou_pred, prompts  # (no row is read)
        shape = (len(prompts), len(masks), 4 * upscaled_rows(h, w, rows), 4 * w)
        out = None if work is None else work.get("low_res", shape, hs.dtype)
        # the upscaling reads the keys, or the record; the chosen prompts' rows of the batch's, in place
        out = upscaled_masks(self, src if keys is None else keys, hyper_in, h, w, prompts, out=out, rows=rows,
                             record=record, image_side=image_side)  # -> [B', M', 4H', 4W]
        return out, iou_pred, prompts


def image_rows(self: MaskDecoder, image_embeddings: np.ndarray, image_pe: np.ndarray,
               dense_prompt_embeddings: np.ndarray) -> Tuple[np.ndarray, np.ndarray, Optional[PerImage]]:
    """src = image_embeddings + dense_prompt_embeddings and the PE, as rows
    [1 or B, HW, C], and the transformer's per-image record (None when src is
    per prompt).

    NOTE(reference): official repeat_interleave's the (batch-1) image embedding
    once per prompt; adding the dense embedding makes the copies. When the
    dense embedding is one per-channel constant for every prompt (the
    broadcast no-mask embedding), src stays one image, shared by the prompts,
    and is kept (ImageRows): keyed on the identity of image_embeddings and
    image_pe (held, so an identity cannot be reused), on the dense embedding's
    values, and, for writeable inputs, on their contents. Exact: a hit returns
    what the computation would.

    The image is kept at its first call, even for a single prompt. Without
    the per-image work a cold process decodes its first prompt about 10 ms
    faster (measured, alternated processes: fewer fresh pages). But that
    first call would then use the other association of layer 0's
    products, so the masks would depend, by rounding, on the history of
    calls. The CLI and the library would also disagree in the last bit.
    """
    b, c, h, w = dense_prompt_embeddings.shape
    constant = dense_prompt_embeddings.strides[0] == 0 or b == 1
    constant = constant and dense_prompt_embeddings.strides[2:] == (0, 0)  # the no-mask embedding, broadcast
    if not constant:
        check_finite("image_embeddings", image_embeddings)
        check_finite("image_pe", image_pe)
        src = image_embeddings + dense_prompt_embeddings  # [1, C, H, W] + [B, C, H, W] -> [B, C, H, W]
        src = src.reshape(b, c, h * w).transpose(0, 2, 1)  # -> [B, HW, C]
        return src, image_pe.reshape(1, c, h * w).transpose(0, 2, 1), None  # -> [1, HW, C]
    dense = np.array(dense_prompt_embeddings[0, :, 0, 0])  # [C], the same at every location and prompt
    kept: Optional[ImageRows] = self.__dict__.get("image_rows_kept")
    if kept is not None and kept.answers(image_embeddings, image_pe, dense):
        return kept.src, kept.pos_src, kept.transformer
    check_finite("image_embeddings", image_embeddings)  # a hit above was checked when it was kept
    check_finite("image_pe", image_pe)
    # [1, C, H, W] + [C, 1, 1] -> [C, HW] -> [1, HW, C], added while transposed
    src = ops.transpose(image_embeddings.reshape(c, h * w), add=dense)[None]
    # The PE as rows: get_dense_pe's is a [C, H, W] view of an [H, W, C] array
    # (as official, a permute), so this is a view of it; any other is copied.
    pos_src = image_pe[0].transpose(1, 2, 0).reshape(1, h * w, c)  # [1, C, H, W] -> [1, HW, C]
    if image_pe.flags.writeable or not pos_src.flags.c_contiguous:
        pos_src = np.array(pos_src)
    for x in (src, pos_src):
        x.flags.writeable = False
    emb_copy, pe_copy = (x.copy() if x.flags.writeable else None for x in (image_embeddings, image_pe))
    kept = ImageRows(image_embeddings, image_pe, dense, emb_copy, pe_copy, src, pos_src)
    object.__setattr__(self, "image_rows_kept", kept)
    return kept.src, kept.pos_src, kept.transformer


def step4_record(self: MaskDecoder, src: np.ndarray, per_image: Optional[PerImage], batch: Tuple[int, int],
                 rows: int, work: Optional[threads.WorkArrays] = None
                 ) -> Tuple[Optional[Step4Record], Optional[np.ndarray]]:
    """(record, image_side) for upscaled_masks to compute its first product
    from what the transformer's steps (4) compute (see there), on the first
    ``rows`` image rows of a batch of (B, T) prompts and tokens: with one image
    for every prompt (``per_image``) and a chain (UpscalingDerived); (None,
    None) otherwise (the product then reads the keys)."""
    if per_image is None or not self.derived.chain_weights:
        return None, None
    return (Step4Record.empty(self.transformer, *batch, rows, src.dtype, work),
            upscaling_image_side(self, per_image, src))


def upscaling_image_side(self: MaskDecoder, per_image: PerImage, src: np.ndarray) -> np.ndarray:
    """src [1, HW, C] @ chain_weights[0] -> [HW, 2*2*O1] (read-only), the image
    rows' part of the upscaling's first product, kept with the image
    (per_image) for the weights it was made with. Blocks of 512 rows, fixed
    whatever the number of threads."""
    kept = per_image.upscaling
    if kept is None or kept[0] is not self.derived:
        w0 = self.derived.chain_weights[0]
        hw = src.shape[1]
        side = np.empty((hw, w0.shape[1]), src.dtype)
        with threads.single_threaded_blas():
            threads.parallel_blocks(lambda lo, hi: np.matmul(src[0, lo:hi], w0, out=side[lo:hi]), hw, 512,
                                    threads=threads.row_threads())
        side.flags.writeable = False
        kept = per_image.upscaling = (self.derived, side)
    return kept[1]


# Input pixels per block of the upscaling pass (its y2 is 16x as many rows):
# 8 rows of a 64x64 embedding. Fewer, larger blocks mean fewer calls from the
# threads, which share the GIL (one prompt decodes 7% faster with 2048), but
# "segment everything" upscales only the rows its masks read (``rows``), in
# whole blocks: 48 of 64 rows for a 3:2 photo with blocks of 8 rows, all 64
# with blocks of 32.
UPSCALE_PIXELS = 512


def upscaled_rows(h: int, w: int, rows: Optional[int]) -> int:
    """The image rows upscaled_masks computes when ``rows`` of h are needed:
    whole blocks of UPSCALE_PIXELS // w rows."""
    if rows is None:
        return h
    block_rows = _upscale_block_rows(w)
    return min(h, -(-min(max(rows, 1), h) // block_rows) * block_rows)


def _upscale_block_rows(w: int) -> int:
    """Image rows per block of the upscaling pass (UPSCALE_PIXELS pixels)."""
    return max(1, UPSCALE_PIXELS // w)


def upscaled_masks(self: MaskDecoder, src: np.ndarray, hyper_in: np.ndarray, h: int, w: int,
                   prompts: Optional[np.ndarray] = None, mask_slice: slice = slice(None),
                   out: Optional[np.ndarray] = None, rows: Optional[int] = None,
                   record: Optional[Step4Record] = None, image_side: Optional[np.ndarray] = None) -> np.ndarray:
    """hyper_in @ output_upscaling(src), per pixel: src [B, HW, C], hyper_in
    [B, M, C/8] -> masks [B, M, 4H, 4W].

    ``prompts`` (indices into B) upscales those prompts only, and
    ``mask_slice`` keeps those of the M masks: -> [len(prompts), M', 4H, 4W],
    the same bits as the whole call's rows (the block's products are the same:
    the mask product still runs on all M, the slice is taken as it is stored),
    without copying the selected prompts' [HW, C] rows out of src first.
    ``out``: a C-contiguous array of that shape and dtype to write them to.
    ``rows``: only the first ``rows`` image rows are needed: the blocks that
    cover them run, the others do not -> [..., 4H', 4W] with H' the rows of
    those blocks (the same bits as the whole call's first 4H' rows).

    The same computation as output_upscaling followed by the product with the
    hypernetwork weights, without interleaving pixels: a 2x2 stride-2
    transposed convolution gives every input pixel its own 2x2 output block,
    so it is one matrix product per pixel whose columns, ordered (i, j, O),
    are the block's four output pixels. LayerNorm2d and GELU are per pixel,
    the second convolution and the mask product too, so every step works on
    rows of pixels in (h, w, i, j[, k, l]) order and only the final masks are
    put in image order, row 4h + 2i + k, column 4w + 2j + l.

    So it runs as one pass over blocks of whole image rows, every step of a
    block in cache, blocks spread over threads (BLAS single-threaded inside).

    With a ``record`` (a Step4Record of these prompts, transformer.py) and
    ``image_side`` (upscaling_image_side), the first product is not read from
    the keys (src may then be the image rows [1, HW, C]: only their number
    and width are read) but assembled from what each layer's step (4) computed, row by
    row (UpscalingDerived's names; p_i the row's softmax weights, vo_i the
    prompt's token side, mean_i and rstd_i norm4's statistics):

        keys_(i+1) W_(i+1) = rstd_i * (keys_i W_i + p_i^T vo_i W_i - mean_i 1^T W_i)
                             + b_i W_(i+1),        keys_0 = the image rows,

    the same mathematics in another association (chain_bias is b_(L-1) W_L
    + b1c: see UpscalingDerived). keys_0 W_0 is kept per
    image; each layer adds a product of h*T + 1 = 57 terms a row, where
    keys_L @ w1c has C = 256: 45% of the multiply-adds, and within the
    tolerances (tests/test_fast_vs_reference.py).
    """
    conv1, ln, _, conv2, _ = (self.output_upscaling[i] for i in range(5))
    prompts = np.arange(hyper_in.shape[0]) if prompts is None else np.asarray(prompts)
    b, (hw, c) = len(prompts), src.shape[1:]
    o1, o2, m = conv1.out_channels, conv2.out_channels, hyper_in.shape[1]
    w1c, b1c, w2 = self.derived[:3]
    m_out = len(range(m)[mask_slice])
    block_rows = _upscale_block_rows(w)
    h_out = upscaled_rows(h, w, rows)
    per_image = -(-h_out // block_rows)  # blocks per prompt
    masks = np.empty((b, m_out, 4 * h_out, 4 * w), dtype=src.dtype) if out is None else out
    if record is not None:
        if record.rows < h_out * w:
            raise ValueError(f"record: expected at least the {h_out * w} image rows upscaled, got {record.rows}")
        values = _chain_values(self.derived, record, prompts)  # [L, b, h*T + 1, 4*O1]

    wide_b2, wide_ln = ops.wide_row(conv2.bias), ops.wide_rows(ln.weight, ln.bias)  # see ops.row_op

    def work(start, stop):
        for j in range(start, stop):
            i, r0, r1 = threads.image_rows(j, per_image, block_rows, h)
            p = prompts[i]  # the prompt in src and hyper_in; i, its row in masks
            n = (r1 - r0) * w  # pixels in this block; its arrays are this thread's work arrays (threads.scratch)
            y1 = threads.scratch("upscale.y1", (n, 4 * o1), src.dtype)
            if record is None:
                np.matmul(src[p, r0 * w:r1 * w], w1c, out=y1)  # [R, C] @ [C, 4*O1] -> [R, 4*O1]
                y1 = y1.reshape(-1, o1)  # -> [R*4, O1], centred
                y1 += b1c
            else:
                _chain_rows(self.derived, record, values[:, i], image_side, p, r0 * w, r1 * w, y1)  # -> [R, 4*O1]
                y1 = y1.reshape(-1, o1)  # -> [R*4, O1], centred, with b1c
            # LayerNorm2d: over O1, per pixel (rows centred by the weights)
            ops.layer_norm_rows(y1, ln.weight, ln.bias, ln.eps, out=y1, centred=True, wide=wide_ln)
            ops.gelu_block(y1, y1)
            y2 = np.matmul(y1, w2, out=threads.scratch("upscale.y2", (4 * n, 4 * o2), src.dtype))
            y2 = y2.reshape(-1, o2)  # [R*4, O1] @ [O1, 4*O2] -> [R*16, O2]
            ops.row_op(np.add, y2, conv2.bias, y2, wide_b2)
            ops.gelu_block(y2, y2)
            # the pixels as the long side of the product: twice as fast as hyper_in @ y2.T;
            # into y1's work array, read by now (the masks need a quarter of it)
            blk = np.matmul(y2, hyper_in[p].T, out=threads.scratch("upscale.y1", (16 * n, m), src.dtype))
            # [R*16, C/8] @ [C/8, M] -> [R*16, M], rows in (h, w, i, j, k, l) order
            blk = blk.reshape(r1 - r0, w, 2, 2, 2, 2, m).transpose(6, 0, 2, 4, 1, 3, 5)  # -> [M, h, i, k, w, j, l]
            blk = blk[mask_slice]  # -> [M', h, i, k, w, j, l]
            masks[i, :, 4 * r0:4 * r1].reshape(blk.shape)[...] = blk

    threads.parallel_rows(work, b * per_image, threads=threads.row_threads())
    return masks


def _chain_values(d: UpscalingDerived, record: Step4Record, prompts: np.ndarray) -> np.ndarray:
    """Each layer's [vo_i W_i + shift_i; -1^T W_i] for the prompts -> [L, b, h*T + 1, 4*O1]."""
    nl, b = len(d.chain_weights), len(prompts)
    ht = record.weights.shape[2] - 1
    out = np.empty((nl, b, ht + 1, d.chain_weights[0].shape[1]), record.weights.dtype)

    def work(start, stop):
        for k in range(start, stop):
            i, q = divmod(k, b)
            np.matmul(record.values[i][prompts[q]], d.chain_weights[i], out=out[i, q, :ht])  # [h*T, C] @ [C, 4*O1]
            out[i, q, :ht] += d.chain_shifts[i]
            out[i, q, ht] = d.chain_mean_rows[i]

    threads.parallel_rows(work, nl * b, threads=threads.row_threads())
    return out


def _chain_rows(d: UpscalingDerived, record: Step4Record, values: np.ndarray, image_side: np.ndarray,
                p: int, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """keys_L @ w1c + b1c on image rows [lo, hi) of prompt p, from the record
    (see upscaled_masks): ``values`` [L, h*T + 1, 4*O1] the prompt's
    _chain_values -> ``out`` [R, 4*O1]."""
    weights = record.weights[:, p, :, lo:hi].transpose(0, 2, 1)  # [L, R, h*T + 1]: the softmax weights, the mean
    np.matmul(weights[0], values[0], out=out)  # [R, h*T + 1] @ [h*T + 1, 4*O1] -> [R, 4*O1]
    out += image_side[lo:hi]  # + keys_0 W_0
    out *= record.rstd[0, p, lo:hi, None]
    for i in range(1, len(values)):
        out += np.matmul(weights[i], values[i], out=threads.scratch("upscale.chain", out.shape, out.dtype))
        out *= record.rstd[i, p, lo:hi, None]
    out += d.chain_bias
    return out
