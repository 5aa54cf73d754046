"""Mirror of segment_anything/modeling/mask_decoder.py: MaskDecoder, MLP.

Dimension letters:
    B  prompts in the batch     T  tokens = 1 IoU token + M mask tokens + sparse prompts
    M  mask tokens (num_multimask_outputs + 1 = 4)      C  transformer_dim (256)
    H, W  image embedding size (64)    4H, 4W  upscaled size (256)
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..kernels import nn
from ..fast import threads
from ..kernels import ops
from ..kernels.checks import check_array, check_bool, check_finite, check_same
from .common import LayerNorm2d
from ..kernels.nn import GELU, ConvTranspose2d, Embedding, Linear, Module, ModuleList, Sequential


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
        # image_embeddings and image_pe are checked for NaN and inf by _image_rows,
        # once per image (a pass over a million values costs as much as a step)
        emb = check_array("image_embeddings", image_embeddings, (1, c, "H", "W"), finite=False)
        h, w = emb.shape[2:]
        pe = check_array("image_pe", image_pe, (1, c, h, w), finite=False)
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
        with threads.single_threaded_blas():  # the fused passes bring their own threads (see ops.py)
            return self._predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)

    def _predict_masks(self, image_embeddings: np.ndarray, image_pe: np.ndarray, sparse_prompt_embeddings: np.ndarray,
                       dense_prompt_embeddings: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = np.concatenate([self.iou_token.weight, self.mask_tokens.weight], axis=0)  # -> [1+M, C]
        output_tokens = np.broadcast_to(output_tokens[None], (b,) + output_tokens.shape)  # -> [B, 1+M, C]
        tokens = np.concatenate([output_tokens, sparse_prompt_embeddings], axis=1)  # -> [B, T, C]

        src, pos_src, per_image = self._image_rows(image_embeddings, image_pe, dense_prompt_embeddings)
        _, c, h, w = image_embeddings.shape

        hs, src = self.transformer.forward_rows(src, pos_src, tokens, per_image)  # -> [B, T, C], [B, HW, C]
        iou_token_out = hs[:, 0, :]  # -> [B, C]
        mask_tokens_out = hs[:, 1:(1 + self.num_mask_tokens), :]  # -> [B, M, C]

        hyper_in = np.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(self.num_mask_tokens)],
            axis=1)  # M x [B, C/8] -> [B, M, C/8]
        if nn._hook is None:
            masks = self._upscaled_masks(src, hyper_in, h, w)  # -> [B, M, 4H, 4W]
        else:  # tracing: run output_upscaling as a module so it is recorded
            src = src.transpose(0, 2, 1).reshape(b, c, h, w)  # [B, HW, C] -> [B, C, H, W]
            upscaled_embedding = self.output_upscaling(src)  # -> [B, C/8, 4H, 4W]
            b, c8, h4, w4 = upscaled_embedding.shape
            masks = hyper_in @ upscaled_embedding.reshape(b, c8, h4 * w4)  # [B, M, C/8] @ [B, C/8, 16HW] -> [B, M, 16HW]
            masks = masks.reshape(b, -1, h4, w4)  # -> [B, M, 4H, 4W]

        iou_pred = self.iou_prediction_head(iou_token_out)  # [B, C] -> [B, M]
        return masks, iou_pred

    def _image_rows(self, image_embeddings: np.ndarray, image_pe: np.ndarray,
                    dense_prompt_embeddings: np.ndarray):
        """src = image_embeddings + dense_prompt_embeddings and the PE, as rows
        [1 or B, HW, C], and a dict for the transformer's per-image work (None
        when src is per prompt).

        NOTE(reference): official repeat_interleave's the (batch-1) image embedding
        once per prompt; adding the dense embedding makes the copies. When the
        dense embedding is one per-channel constant for every prompt (the
        broadcast no-mask embedding), src stays one image, shared by the prompts,
        and is kept per image: keyed on the identity of image_embeddings and
        image_pe (held by the cache, so an identity cannot be reused), on the
        dense embedding's values, and, for a writeable image_embeddings, on its
        contents. Exact: a hit returns what the computation would.

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
        cached = self.__dict__.get("_rows_cache")
        if cached is not None and cached[0] is image_embeddings and cached[1] is image_pe \
                and np.array_equal(cached[2], dense) \
                and (not image_pe.flags.writeable or ops.same_contents(cached[4], image_pe)) \
                and (not image_embeddings.flags.writeable or ops.same_contents(cached[3], image_embeddings)):
            return cached[5], cached[6], cached[7]
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
        copies = tuple(x.copy() if x.flags.writeable else None for x in (image_embeddings, image_pe))
        per_image = {}  # for the transformer's per-image work
        object.__setattr__(self, "_rows_cache", (image_embeddings, image_pe, dense) + copies + (src, pos_src, per_image))
        return src, pos_src, per_image

    def _upscaled_masks(self, src: np.ndarray, hyper_in: np.ndarray, h: int, w: int) -> np.ndarray:
        """hyper_in @ output_upscaling(src), per pixel: src [B, HW, C], hyper_in
        [B, M, C/8] -> masks [B, M, 4H, 4W].

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
        b, hw, c = src.shape
        o1, o2, m = conv1.out_channels, conv2.out_channels, hyper_in.shape[1]
        w1c, b1c, w2 = self._upscaling_weights()
        masks = np.empty((b, m, 4 * h, 4 * w), dtype=src.dtype)
        rows = max(1, self.UPSCALE_PIXELS // w)  # image rows per block
        per_image = -(-h // rows)

        def work(start, stop):
            for j in range(start, stop):
                p, r0, r1 = threads.image_rows(j, per_image, rows, h)
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
                masks[p, :, 4 * r0:4 * r1].reshape(blk.shape)[...] = blk

        threads.parallel_rows(work, b * per_image, threads=threads.row_threads())
        return masks

    def _upscaling_weights(self):
        """The transposed convolutions' weights as matrices, kept while the weight
        arrays are the same: [C, 2*2*O1] (columns (i, j, O1)) and [O1, 2*2*O2].

        The first is centred for LayerNorm2d, which subtracts each output pixel's
        mean over its O1 channels: that mean is linear in the input, so
        subtracting each input channel's mean over O1 from its weights (and the
        bias's mean from the bias) gives x - mean(x) in the product itself,
        computed in float64 and rounded once. Same mathematics; it saves
        LayerNorm2d's two passes for the mean.
        """
        conv1, conv2 = self.output_upscaling[0], self.output_upscaling[3]
        key = (conv1.weight, conv1.bias, conv2.weight)
        kept = self.__dict__.get("_upscaling_kept")
        if kept is None or any(a is not b for a, b in zip(kept[0], key)):
            c, o1 = conv1.in_channels, conv1.out_channels
            w1 = conv1.weight.transpose(0, 2, 3, 1).reshape(c, 4, o1).astype(np.float64)  # (C, O1, 2, 2) -> [C, 2*2, O1]
            w1 -= w1.mean(axis=2, keepdims=True)
            b1 = conv1.bias.astype(np.float64)
            dt = conv1.weight.dtype
            w2 = conv2.weight.transpose(0, 2, 3, 1).reshape(o1, -1)  # (O1, O2, 2, 2) -> [O1, 2*2*O2]
            kept = (key, w1.reshape(c, 4 * o1).astype(dt), (b1 - b1.mean()).astype(dt), np.ascontiguousarray(w2))
            object.__setattr__(self, "_upscaling_kept", kept)
        return kept[1:]

    # Input pixels per block of the upscaling pass (its y2 is 16x as many rows):
    # half of a 64x64 embedding, one block per thread for one prompt. Fewer,
    # larger blocks mean fewer calls from the threads, which share the GIL: one
    # prompt decodes 7% faster than with 512 (GELU still runs in 64K pieces).
    UPSCALE_PIXELS = 2048
