"""Fast twins of the torch.nn layers in :mod:`npsam.kernels.nn`.

Each replaces a layer's reference ``forward`` (or the in-place ``forward_``
of an activation) with the fast kernel of :mod:`npsam.fast.ops` that stands
for the reference kernel it calls.
"""

from __future__ import annotations

import numpy as np

from ..kernels.nn import GELU, Conv2d, LayerNorm, Linear, ReLU
from . import implements, ops


@implements(Linear)
def linear(self: Linear, x: np.ndarray) -> np.ndarray:
    """Replaces Linear.forward (ops.linear): fast ops.linear, the same products
    (weight @ x.T for a few rows and a large weight), within the tolerances.
    Modules that call a small Linear on a few rows pass it a kept weight.T
    themselves (fast/transformer.py, fast/mask_decoder.py)."""
    return ops.linear(x, self.weight, self.bias if self.has_bias else None)  # [..., in] -> [..., out]


@implements(LayerNorm)
def layer_norm(self: LayerNorm, x: np.ndarray) -> np.ndarray:
    """Replaces LayerNorm.forward: fast ops.layer_norm, blocks of rows over
    threads, within the tolerances."""
    return ops.layer_norm(x, self.weight, self.bias, self.eps)


@implements(GELU)
def gelu(self: GELU, x: np.ndarray) -> np.ndarray:
    """Replaces GELU.forward: fast ops.gelu (float32: the polynomial sigmoid
    form, within the tolerances; float64 and ``precise``: the reference)."""
    return ops.gelu(x, precise=self.precise)


@implements(GELU, "forward_")
def gelu_(self: GELU, x: np.ndarray) -> np.ndarray:
    """Replaces GELU.forward_ (the module call): gelu written into x, one pass
    over memory instead of two and no new array (TinyViT's layer 0, 256
    channels of 256x256: 29 against 51 ms per GELU). The same values as
    :func:`gelu`, bit for bit."""
    return ops.gelu(x, out=x, precise=self.precise)


@implements(ReLU, "forward_")
def relu_(self: ReLU, x: np.ndarray) -> np.ndarray:
    """Replaces ReLU.forward_ (the module call): max(x, 0) written into x, bit for bit."""
    return np.maximum(x, 0, out=x)


@implements(Conv2d)
def conv2d(self: Conv2d, x: np.ndarray) -> np.ndarray:
    """Replaces Conv2d.forward (kernels/ops.py: conv2d_patchify, conv2d). A KxK
    convolution (K > 1, groups 1, not a patchify one), and a 1x1 one on the
    [B, C, H, W] view of channels-last memory (the encoders' necks get their
    tokens so), run through fast ops.conv2d: im2col blocks over npsam's threads
    with BLAS single-threaded, where the reference kernel's 1x1 product runs on
    OpenBLAS's own threads, which then spin for a while and take the core the
    next pass's thread needs (TinyViT's neck: 66 against 38 ms for its four
    steps timed apart). The same products over other blocks: within the
    tolerances. Everything else is the reference kernel."""
    k, bias = self.kernel_size, (self.bias if self.has_bias else None)
    channels_last = ops.is_channels_last(x)
    if self.groups == 1 and ((k > 1 and not (k == self.stride and self.padding == 0)) or
                             (k == 1 and self.stride == 1 and self.padding == 0 and channels_last)):
        return ops.conv2d(x, self.weight, bias, self.stride, self.padding)
    return self.forward(x)
