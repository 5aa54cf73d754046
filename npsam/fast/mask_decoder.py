"""Fast twin of modeling/mask_decoder.py: MaskDecoder.predict_masks with the
image kept per image, the transformer's fused passes (fast/transformer.py)
and the upscaling as one pass over pixel rows; MLP.forward on kept
transposed weights.

Dimension letters as in modeling/mask_decoder.py; O1, O2 the upscaling's
channels (C/4, C/8); R pixels of a block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Tuple

import numpy as np

from ..kernels import ops as ref_ops
from ..kernels.checks import check_finite
from ..modeling.mask_decoder import MLP, MaskDecoder
from . import derives, implements, ops, threads
from .transformer import PerImage, forward_rows


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
    """
    w1c: np.ndarray
    b1c: np.ndarray
    w2: np.ndarray


@derives(MaskDecoder)
def upscaling_weights(self: MaskDecoder) -> UpscalingDerived:
    conv1, conv2 = self.output_upscaling[0], self.output_upscaling[3]
    c, o1 = conv1.in_channels, conv1.out_channels
    dt = conv1.weight.dtype
    w1 = conv1.weight.transpose(0, 2, 3, 1).reshape(c, 4, o1).astype(np.float64)  # (C, O1, 2, 2) -> [C, 2*2, O1]
    w1 -= w1.mean(axis=2, keepdims=True)
    b1 = conv1.bias.astype(np.float64)
    w2 = conv2.weight.transpose(0, 2, 3, 1).reshape(o1, -1)  # (O1, O2, 2, 2) -> [O1, 2*2*O2]
    return UpscalingDerived(w1.reshape(c, 4 * o1).astype(dt), (b1 - b1.mean()).astype(dt), np.ascontiguousarray(w2))


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


@implements(MaskDecoder, "predict_masks")
def predict_masks(self: MaskDecoder, image_embeddings: np.ndarray, image_pe: np.ndarray,
                  sparse_prompt_embeddings: np.ndarray, dense_prompt_embeddings: np.ndarray
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Replaces MaskDecoder.predict_masks: the image side kept per image
    (image_rows: exact), the transformer as fused passes (fast/transformer.py:
    within the tolerances) and the upscaling with the mask product per pixel
    (upscaled_masks: within the tolerances) -> [B, M, 4H, 4W], [B, M]."""
    with threads.single_threaded_blas():  # the fused passes bring their own threads
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = np.concatenate([self.iou_token.weight, self.mask_tokens.weight], axis=0)  # -> [1+M, C]
        output_tokens = np.broadcast_to(output_tokens[None], (b,) + output_tokens.shape)  # -> [B, 1+M, C]
        tokens = np.concatenate([output_tokens, sparse_prompt_embeddings], axis=1)  # -> [B, T, C]
        src, pos_src, per_image = image_rows(self, image_embeddings, image_pe, dense_prompt_embeddings)
        _, c, h, w = image_embeddings.shape

        hs, src = forward_rows(self.transformer, src, pos_src, tokens, per_image)  # -> [B, T, C], [B, HW, C]
        iou_token_out = hs[:, 0, :]  # -> [B, C]
        mask_tokens_out = hs[:, 1:(1 + self.num_mask_tokens), :]  # -> [B, M, C]
        hyper_in = np.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                             for i in range(self.num_mask_tokens)], axis=1)  # M x [B, C/8] -> [B, M, C/8]
        masks = upscaled_masks(self, src, hyper_in, h, w)  # -> [B, M, 4H, 4W]
        iou_pred = self.iou_prediction_head(iou_token_out)  # [B, C] -> [B, M]
        return masks, iou_pred


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
                   out: Optional[np.ndarray] = None, rows: Optional[int] = None) -> np.ndarray:
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
    """
    conv1, ln, _, conv2, _ = (self.output_upscaling[i] for i in range(5))
    prompts = np.arange(src.shape[0]) if prompts is None else np.asarray(prompts)
    b, (hw, c) = len(prompts), src.shape[1:]
    o1, o2, m = conv1.out_channels, conv2.out_channels, hyper_in.shape[1]
    w1c, b1c, w2 = self.derived
    m_out = len(range(m)[mask_slice])
    block_rows = _upscale_block_rows(w)
    h_out = upscaled_rows(h, w, rows)
    per_image = -(-h_out // block_rows)  # blocks per prompt
    masks = np.empty((b, m_out, 4 * h_out, 4 * w), dtype=src.dtype) if out is None else out

    def work(start, stop):
        for j in range(start, stop):
            i, r0, r1 = threads.image_rows(j, per_image, block_rows, h)
            p = prompts[i]  # the prompt in src and hyper_in; i, its row in masks
            n = (r1 - r0) * w  # pixels in this block; its arrays are this thread's work arrays (threads.scratch)
            y1 = np.matmul(src[p, r0 * w:r1 * w], w1c, out=threads.scratch("upscale.y1", (n, 4 * o1), src.dtype))
            y1 = y1.reshape(-1, o1)  # [R, C] @ [C, 4*O1] -> [R*4, O1], centred
            y1 += b1c
            # LayerNorm2d: over O1, per pixel (rows centred by the weights)
            ops.layer_norm_rows(y1, ln.weight, ln.bias, ln.eps, out=y1, centred=True)
            ops.gelu_block(y1, y1)
            y2 = np.matmul(y1, w2, out=threads.scratch("upscale.y2", (4 * n, 4 * o2), src.dtype))
            y2 = y2.reshape(-1, o2)  # [R*4, O1] @ [O1, 4*O2] -> [R*16, O2]
            y2 += conv2.bias
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
