"""Mirror of segment_anything/modeling/common.py: MLPBlock, LayerNorm2d.

Dimension letters: B batch, N tokens, C channels, M mlp_dim, H/W height/width.
"""

from __future__ import annotations

import numpy as np

from ..kernels import ops
from ..kernels.nn import GELU, Linear, Module


class MLPBlock(Module):
    """Mirror of modeling/common.py: MLPBlock.forward (lin1 -> act -> lin2).

    NOTE(reference): the TwoWayTransformer builds it with ReLU; the ViT with GELU.
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act=GELU) -> None:
        super().__init__()
        self.lin1 = Linear(embedding_dim, mlp_dim)
        self.lin2 = Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.lin2(self.act(self.lin1(x)))  # [..., C] -> [..., M] -> [..., C]


class LayerNorm2d(Module):
    """Mirror of modeling/common.py: LayerNorm2d.forward, normalising C of [B, C, H, W].

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
