"""Mirror of segment_anything/modeling/common.py: MLPBlock, LayerNorm2d.

Dimension letters: B batch, N tokens, C channels, H/W height/width.
"""

from __future__ import annotations

import numpy as np

from ..kernels import nn
from ..fast import threads
from ..kernels import ops
from ..kernels.nn import GELU, Linear, Module


class MLPBlock(Module):
    """Mirror of modeling/common.py: MLPBlock (lin1 -> act -> lin2).

    NOTE(reference): the TwoWayTransformer builds it with ReLU; the ViT with GELU.
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act=GELU) -> None:
        super().__init__()
        self.lin1 = Linear(embedding_dim, mlp_dim)
        self.lin2 = Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: np.ndarray) -> np.ndarray:
        rows = int(np.prod(x.shape[:-1]))
        if rows >= 2 * self.MIN_ROWS and threads.blas_is_single() and nn._hook is None:
            return self._forward_rows(x)
        return self.lin2(self.act(self.lin1(x)))  # [..., C] -> [..., mlp_dim] -> [..., C]

    # Rows per block of the fused pass, at most. The ViT-B MLP (768 -> 3072 -> 768
    # on 4096 rows, 2 threads) takes 180 ms in blocks of 1024 rows against 210 ms
    # in blocks of 256: the products run nearer BLAS's peak on more rows (lin1
    # 118 against 137 GFLOP/s on one core), and the [1024, 3072] hidden block,
    # 12 MB, still stays in the 48 MB L3 between lin1 and lin2. In the whole
    # encoder, alternated in one process: 9.93 against 10.72 s (median of 6).
    ROWS = 1024
    MIN_ROWS = 256  # the fused pass needs twice this many rows

    def _forward_rows(self, x: np.ndarray) -> np.ndarray:
        """forward() a block of rows at a time, lin1 -> act -> lin2 while the block's
        hidden activations are in cache, blocks spread over threads (BLAS
        single-threaded inside, see threads.single_threaded_blas)."""
        x2 = x.reshape(-1, x.shape[-1])  # [..., C] -> [R, C]
        out = np.empty((x2.shape[0], self.lin2.out_features), dtype=x.dtype)

        act = getattr(self.act, "forward_", self.act)  # in place where the activation can be
        lin2 = self.lin2

        def work(start, stop):
            for lo, hi in threads.blocks(start, stop, self.ROWS):
                hidden = act(self.lin1(x2[lo:hi]))  # [r, C] -> [r, M], activated in place: a fresh array
                # lin2 straight into the result
                ops.linear(hidden, lin2.weight, lin2.bias if lin2.has_bias else None, out=out[lo:hi])  # -> [r, C]

        threads.parallel_rows(work, x2.shape[0], min_rows=self.MIN_ROWS)
        return out.reshape(x.shape[:-1] + (out.shape[1],))  # -> [..., C]


class LayerNorm2d(Module):
    """Mirror of modeling/common.py: LayerNorm2d, normalising C of [B, C, H, W].

    NOTE(reference): eps defaults to 1e-6, unlike nn.LayerNorm's 1e-5.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_channels, self.eps = num_channels, eps
        self.register_parameter("weight", (num_channels,))
        self.register_parameter("bias", (num_channels,))

    def forward(self, x: np.ndarray) -> np.ndarray:
        return ops.layer_norm_2d(x, self.weight, self.bias, self.eps)  # [B, C, H, W] -> same

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"
