"""Fast twin of modeling/common.py: MLPBlock.forward as a fused pass over row blocks.

Dimension letters as in modeling/common.py.
"""

from __future__ import annotations

import numpy as np

from ..modeling.common import MLPBlock
from . import implements, ops, threads

# Rows per block of the fused pass, at most. The ViT-B MLP (768 -> 3072 -> 768
# on 4096 rows, 2 threads) takes 180 ms in blocks of 1024 rows against 210 ms
# in blocks of 256: the products run nearer BLAS's peak on more rows (lin1
# 118 against 137 GFLOP/s on one core), and the [1024, 3072] hidden block,
# 12 MB, still stays in the 48 MB L3 between lin1 and lin2. In the whole
# encoder, alternated in one process: 9.93 against 10.72 s (median of 6).
ROWS = 1024
# The fused pass needs twice this many rows: the two-way transformer's token
# MLP (256 -> 2048 -> 256) on a "segment everything" batch of 64 prompts has
# 448 rows, 10 ms of one core per layer while the other waits.
MIN_ROWS = 128


@implements(MLPBlock)
def mlp_block(self: MLPBlock, x: np.ndarray) -> np.ndarray:
    """Replaces MLPBlock.forward, lin2(act(lin1(x))). With many rows (and BLAS
    single-threaded by the caller, see threads.single_threaded_blas): a block
    of rows at a time, lin1 -> act -> lin2 while the block's hidden activations
    are in cache, blocks spread over threads. Row by row the same products and
    activation, so equal to the module path within the tolerances of the fast
    kernels (bit for bit for the same kernels). The hidden activations are a
    fresh array: the activation runs in place (forward_) where it can."""
    act = getattr(self.act, "forward_", self.act)
    rows = int(np.prod(x.shape[:-1]))
    if not (rows >= 2 * MIN_ROWS and threads.blas_is_single()):
        return self.lin2(act(self.lin1(x)))  # [..., C] -> [..., M] -> [..., C]
    x2 = x.reshape(-1, x.shape[-1])  # [..., C] -> [R, C]
    out = np.empty((x2.shape[0], self.lin2.out_features), dtype=x.dtype)
    lin2 = self.lin2

    def block(lo, hi):
        hidden = act(self.lin1(x2[lo:hi]))  # [r, C] -> [r, M], activated in place: a fresh array
        ops.linear(hidden, lin2.weight, lin2.bias if lin2.has_bias else None, out=out[lo:hi])  # -> [r, C]

    # Blocks of ROWS rows, or halves of fewer than 2 * ROWS rows (so two threads
    # share them): fixed by the number of rows alone, so that threads change no bit.
    threads.parallel_blocks(block, x2.shape[0], min(ROWS, -(-x2.shape[0] // 2)))
    return out.reshape(x.shape[:-1] + (out.shape[1],))  # -> [..., C]
