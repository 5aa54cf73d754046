"""The fast layer of modeling/tiny_vit_sam.py (MobileSAM's TinyViT encoder).

Each function here is registered against the reference ``forward`` it
replaces (:func:`npsam.fast.implements`) and says why its result is the same.
What makes them faster than the reference:

- **BatchNorm folded** into each Conv2d_BN's convolution, once, when the
  weights load (:func:`fold_batch_norm`, the official ``Conv2d_BN.fuse()``):
  one convolution with a bias instead of a convolution and a BatchNorm pass.
- **Convolutions**: 1x1 convolutions as one matrix product in NCHW (no
  transposes); 3x3 ones as im2col products per block of output rows, and
  depthwise ones as sums of shifted planes per block of channels, the blocks
  spread over worker threads (ops.conv2d, ops.depthwise_conv2d).
- **GELU in place** on each convolution's or linear layer's fresh output (one
  pass over memory instead of two, and no new array; the float32 GELU is the
  fast sigmoid form of fast_ops.gelu).
- **Attention**: the bias gather ``attention_biases[:, attention_bias_idxs]``
  done once at load (the official ``eval()`` caches it as ``ab`` too), the
  softmax in place.
- **C-order copies**: the tokens after the local convolution copied once into
  [B, N, C] order, which the MLP's LayerNorm and the residual both read.

Dimension letters: as in modeling/tiny_vit_sam.py (B, C, H, W, N, h, D, d, E, O).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import derives, implements
from . import ops as fast_ops
from ..kernels import ops
from ..modeling.tiny_vit_sam import (Attention, Conv2d_BN, MBConv, Mlp, PatchEmbed, PatchMerging,
                                     TinyViTBlock)


class FoldedConv(NamedTuple):
    """A Conv2d_BN as the one convolution its ``fuse()`` returns."""

    weight: np.ndarray  # [O, C/groups, K, K]
    bias: np.ndarray  # [O]


class AttentionBiases(NamedTuple):
    ab: np.ndarray  # [h, N, N]: attention_biases[:, attention_bias_idxs]


@derives(Conv2d_BN)
def fold_batch_norm(m: Conv2d_BN):
    """Mirror of tiny_vit_sam.py: Conv2d_BN.fuse(), computed in float64 and cast
    to the model's dtype: ``weight * g`` and ``bn.bias - running_mean * g`` with
    ``g = bn.weight / sqrt(running_var + eps)``. A checkpoint folded already
    (``folded_bn``) gives its weight and bias as they are. None until loaded."""
    if not m.is_loaded():
        return None
    if m.folded_bn:
        return FoldedConv(m.weight, m.bias)
    c, bn = m.c, m.bn
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    g = f64(bn.weight) / (f64(bn.running_var) + bn.eps) ** 0.5  # [O]
    weight = f64(c.weight) * g[:, None, None, None]  # [O, C/groups, K, K]
    bias = f64(bn.bias) - f64(bn.running_mean) * f64(bn.weight) / (f64(bn.running_var) + bn.eps) ** 0.5  # [O]
    dtype = c.weight.dtype
    return FoldedConv(np.ascontiguousarray(weight, dtype=dtype), np.ascontiguousarray(bias, dtype=dtype))


@derives(Attention)
def gather_attention_biases(m: Attention):
    """The official eval()'s ``ab`` buffer: attention_biases[:, attention_bias_idxs]."""
    if "attention_biases" not in m._params:
        return None
    return AttentionBiases(np.ascontiguousarray(m.attention_biases[:, m.attention_bias_idxs]))  # -> [h, N, N]


def conv1x1(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """F.conv2d with a 1x1 kernel, stride 1: one matrix product in NCHW, no transposes."""
    b, c, h, w = x.shape
    o = weight.shape[0]
    y = weight.reshape(o, c) @ x.reshape(b, c, h * w)  # [O, C] @ [B, C, HW] -> [B, O, HW]
    y += bias[:, None]
    return y.reshape(b, o, h, w)  # -> [B, O, H, W]


@implements(Conv2d_BN)
def conv2d_bn_forward(self: Conv2d_BN, x: np.ndarray) -> np.ndarray:
    """Replaces Conv2d_BN.forward (conv, then BatchNorm): the folded conv, one
    pass. BatchNorm at inference is an affine map per channel, so folding it
    into the weights is exact up to rounding: within the encoder tolerances."""
    folded = getattr(self, "derived", None)
    if folded is None:
        return self.forward(x)  # not loaded: the reference raises WeightsMissingError
    if self.ks == 1 and self.stride == 1 and self.groups == 1:
        return conv1x1(x, folded.weight, folded.bias)  # [B, C, H, W] -> [B, O, H, W]
    return ops.conv2d(x, folded.weight, folded.bias, self.stride, self.pad, self.groups)  # -> [B, O, Ho, Wo]


def gelu_(x: np.ndarray) -> np.ndarray:
    """nn.GELU() written into x (a fresh array nothing else holds)."""
    return fast_ops.gelu(x, out=x)


@implements(PatchEmbed)
def patch_embed_forward(self: PatchEmbed, x: np.ndarray) -> np.ndarray:
    """Replaces PatchEmbed.forward (self.seq(x)): the same steps, the GELU in place."""
    x = gelu_(self.seq[0](x))  # [B, 3, S, S] -> [B, C0/2, S/2, S/2]
    return self.seq[2](x)  # -> [B, C0, S/4, S/4]


@implements(MBConv)
def mbconv_forward(self: MBConv, x: np.ndarray) -> np.ndarray:
    """Replaces MBConv.forward: the same steps, each GELU in place on its
    convolution's fresh output."""
    shortcut = x
    x = gelu_(self.conv1(x))  # [B, C, H, W] -> [B, E, H, W]
    x = gelu_(self.conv2(x))  # depthwise 3x3: same shape
    x = self.conv3(x)  # [B, E, H, W] -> [B, C, H, W]
    x += shortcut
    return gelu_(x)


@implements(PatchMerging)
def patch_merging_forward(self: PatchMerging, x: np.ndarray) -> np.ndarray:
    """Replaces PatchMerging.forward: the same steps, each GELU in place."""
    if x.ndim == 3:  # tokens from a BasicLayer
        h, w = self.input_resolution
        x = x.reshape(len(x), h, w, -1).transpose(0, 3, 1, 2)  # [B, N, C] -> [B, C, H, W]
    x = gelu_(self.conv1(x))  # [B, C, H, W] -> [B, O, H, W]
    x = gelu_(self.conv2(x))  # -> [B, O, H/stride, W/stride]
    x = self.conv3(x)  # same shape
    b, o = x.shape[:2]
    return x.reshape(b, o, -1).transpose(0, 2, 1)  # [B, O, H', W'] -> [B, N', O]


@implements(Mlp)
def mlp_forward(self: Mlp, x: np.ndarray) -> np.ndarray:
    """Replaces Mlp.forward: the same steps, the GELU in place on fc1's output."""
    x = self.norm(x)
    x = gelu_(self.fc1(x))  # [..., C] -> [..., E]
    return self.fc2(x)  # [..., E] -> [..., C]


@implements(Attention)
def attention_forward(self: Attention, x: np.ndarray) -> np.ndarray:
    """Replaces Attention.forward: the same products in the same order; the
    bias gather kept from load (the same values), the logits scaled and biased
    in place, the softmax in place with exponents clamped far below each row's
    maximum (fast_ops.exp_below_max_: weights under exp(-43) are raised to it, far
    below what float32 can see in a row whose largest weight is 1)."""
    b, n, _ = x.shape
    x = self.norm(x)
    qkv = self.qkv(x)  # [B, N, C] -> [B, N, h*(2D + d)]
    qkv = qkv.reshape(b, n, self.num_heads, -1)  # -> [B, N, h, 2D + d]
    q = qkv[..., : self.key_dim].transpose(0, 2, 1, 3)  # -> [B, h, N, D]
    k = qkv[..., self.key_dim : 2 * self.key_dim].transpose(0, 2, 1, 3)  # -> [B, h, N, D]
    v = qkv[..., 2 * self.key_dim :].transpose(0, 2, 1, 3)  # -> [B, h, N, d]
    attn = q @ k.swapaxes(-1, -2)  # [B, h, N, D] @ [B, h, D, N] -> [B, h, N, N]
    attn *= x.dtype.type(self.scale)
    attn += self.derived.ab  # [h, N, N] broadcast over B
    attn = fast_ops.softmax_(attn, axis=-1)
    x = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, self.dh)  # [B, h, N, d] -> [B, N, h*d]
    return self.proj(x)  # [B, N, h*d] -> [B, N, C]


@implements(TinyViTBlock)
def tiny_vit_block_forward(self: TinyViTBlock, x: np.ndarray) -> np.ndarray:
    """Replaces TinyViTBlock.forward: the same steps; the tokens after the local
    convolution copied once into C order (the MLP's LayerNorm and the residual
    would each copy or stride through the transposed view): bit for bit the
    reference's values, read faster."""
    h, w = self.input_resolution
    b, n, c = x.shape
    assert n == h * w, "input feature has wrong size"
    ws = self.window_size
    res_x = x
    if h == ws and w == ws:
        x = self.attn(x)  # one window: [B, N, C] -> same
    else:
        x = x.reshape(b, h, w, c)  # [B, N, C] -> [B, H, W, C]
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = np.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))  # -> [B, pH, pW, C]
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5)  # -> [B, nH, nW, ws, ws, C]
        x = self.attn(x.reshape(b * nh * nw, ws * ws, c))  # window partition -> [B*nW, ws*ws, C]
        x = x.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)  # -> [B, nH, ws, nW, ws, C]
        x = x.reshape(b, ph, pw, c)[:, :h, :w].reshape(b, n, c)  # window reverse, crop -> [B, N, C]
    x = res_x + x
    x = x.transpose(0, 2, 1).reshape(b, c, h, w)  # [B, N, C] -> [B, C, H, W]
    x = self.local_conv(x)  # depthwise 3x3: same shape, no residual
    x = np.ascontiguousarray(x.reshape(b, c, n).transpose(0, 2, 1))  # [B, C, H, W] -> [B, N, C], C order
    return x + self.mlp(x)
