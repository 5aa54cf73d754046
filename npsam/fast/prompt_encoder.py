"""Fast twin of modeling/prompt_encoder.py: the dense positional encoding,
computed once when the weights load.

Dimension letters as in modeling/prompt_encoder.py.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..modeling.prompt_encoder import PromptEncoder
from . import derives, implements


class PromptEncoderDerived(NamedTuple):
    dense_pe: np.ndarray  # [1, C, H, W], read-only: PromptEncoder.get_dense_pe's value


@derives(PromptEncoder)
def dense_pe(self: PromptEncoder) -> PromptEncoderDerived:
    """PromptEncoder.get_dense_pe's value: the reference's grid of pixel centres
    and PositionEmbeddingRandom._pe_encoding, with sin and cos written into the
    two halves of one [H, W, C] array where the reference concatenates two
    temporaries (5 against 11 ms when a cold process loads its weights, fewer
    fresh pages). Each element goes through the same operations in the same
    order: bit for bit the reference's value (tests/test_fast_vs_reference.py)."""
    gauss = self.pe_layer.positional_encoding_gaussian_matrix  # [2, P]
    dtype, p = gauss.dtype, gauss.shape[1]
    h, w = self.image_embedding_size
    y_embed = (np.arange(h, dtype=dtype) + dtype.type(0.5)) / dtype.type(h)  # [H]
    x_embed = (np.arange(w, dtype=dtype) + dtype.type(0.5)) / dtype.type(w)  # [W]
    grid = np.empty((h, w, 2), dtype=dtype)
    grid[..., 0] = x_embed[None, :]
    grid[..., 1] = y_embed[:, None]
    coords = dtype.type(2 * np.pi) * ((2 * grid - 1) @ gauss)  # [H, W, 2] @ [2, P] -> [H, W, P]
    pe = np.empty((h, w, 2 * p), dtype=dtype)  # torch.cat([sin, cos], dim=-1), each half in place
    np.sin(coords, out=pe[..., :p])
    np.cos(coords, out=pe[..., p:])
    pe = pe.transpose(2, 0, 1)[None]  # [H, W, C] -> [1, C, H, W], a view as the reference's
    pe.flags.writeable = False
    return PromptEncoderDerived(pe)


@implements(PromptEncoder, "get_dense_pe")
def get_dense_pe(self: PromptEncoder) -> np.ndarray:
    """Replaces PromptEncoder.get_dense_pe: it depends on the weights only, so it
    is computed when they load and the same read-only array is returned each
    time (bit for bit the reference's value), which also lets the mask decoder
    recognise it and read it as [HW, C] rows without a copy (fast/mask_decoder.py)."""
    return self.derived.dense_pe
