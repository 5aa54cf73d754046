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
    pe = PromptEncoder.get_dense_pe.reference(self)  # [1, C, H, W], a view of [H, W, C]
    pe.flags.writeable = False
    return PromptEncoderDerived(pe)


@implements(PromptEncoder, "get_dense_pe")
def get_dense_pe(self: PromptEncoder) -> np.ndarray:
    """Replaces PromptEncoder.get_dense_pe: it depends on the weights only, so it
    is computed when they load and the same read-only array is returned each
    time (bit for bit the reference's value), which also lets the mask decoder
    recognise it and read it as [HW, C] rows without a copy (fast/mask_decoder.py)."""
    return self.derived.dense_pe
