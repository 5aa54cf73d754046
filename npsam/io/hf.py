"""Hugging Face ``transformers`` SamModel checkpoints <-> the official state_dict keys.

    official = hf_to_official(hf_state_dict)     # then sam_model_registry[...](checkpoint=official)
    hf = official_to_hf(official_state_dict)     # loads into transformers.SamModel

The tensors are the same; only the names differ (transformers renamed the
official modules when it ported SAM; its ``convert_sam_to_hf.py`` holds the
same table in the other direction). Both directions are exact inverses on the
keys either side holds; ``tests/test_crosscheck.py`` checks the round trip on
real ``SamModel`` and official state_dicts.

NOTE(reference): HF keeps the positional Gaussian matrix twice
(``shared_image_embedding.positional_embedding`` for the image-wide PE and
``prompt_encoder.shared_embedding.positional_embedding`` for the points, tied);
the official model has one (``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``).
NOTE(reference): HF's ``SamFeedForward`` names its first and last Linear
``proj_in``/``proj_out`` and the hidden ones ``layers.{i-1}``; the official
``MLP`` has ``layers.0 .. layers.{n-1}``. SAM's MLPs all have 3 layers.
NOTE(reference): the official ``pixel_mean``/``pixel_std`` buffers have no HF
key (the HF processor normalises); they are dropped going to HF.

No dimension letters: this file renames, it changes no shape.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Tuple

import numpy as np

# (official pattern, hf replacement), (hf pattern, official replacement); patterns
# match whole dotted components and are applied in order, first match wins per rule list.
_PAIRS: List[Tuple[str, str]] = [
    # -- image encoder (ViT) ------------------------------------------------------
    (r"^image_encoder\.blocks\.(\d+)\.norm(\d)", r"vision_encoder.layers.\1.layer_norm\2"),
    (r"^image_encoder\.blocks\.(\d+)", r"vision_encoder.layers.\1"),
    (r"^image_encoder\.patch_embed\.proj", r"vision_encoder.patch_embed.projection"),
    (r"^image_encoder\.neck\.0", r"vision_encoder.neck.conv1"),
    (r"^image_encoder\.neck\.1", r"vision_encoder.neck.layer_norm1"),
    (r"^image_encoder\.neck\.2", r"vision_encoder.neck.conv2"),
    (r"^image_encoder\.neck\.3", r"vision_encoder.neck.layer_norm2"),
    (r"^image_encoder", r"vision_encoder"),
    # -- prompt encoder -----------------------------------------------------------
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix",
     r"prompt_encoder.shared_embedding.positional_embedding"),
    (r"^prompt_encoder\.pe_layer", r"prompt_encoder.shared_embedding"),
    (r"^prompt_encoder\.point_embeddings", r"prompt_encoder.point_embed"),
    (r"^prompt_encoder\.mask_downscaling\.0", r"prompt_encoder.mask_embed.conv1"),
    (r"^prompt_encoder\.mask_downscaling\.1", r"prompt_encoder.mask_embed.layer_norm1"),
    (r"^prompt_encoder\.mask_downscaling\.3", r"prompt_encoder.mask_embed.conv2"),
    (r"^prompt_encoder\.mask_downscaling\.4", r"prompt_encoder.mask_embed.layer_norm2"),
    (r"^prompt_encoder\.mask_downscaling\.6", r"prompt_encoder.mask_embed.conv3"),
    (r"^prompt_encoder\.mask_downscaling", r"prompt_encoder.mask_embed"),
    # -- mask decoder -------------------------------------------------------------
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)", r"mask_decoder.transformer.layers.\1.layer_norm\2"),
    (r"^mask_decoder\.transformer\.norm_final_attn", r"mask_decoder.transformer.layer_norm_final_attn"),
    (r"^mask_decoder\.output_upscaling\.0", r"mask_decoder.upscale_conv1"),
    (r"^mask_decoder\.output_upscaling\.1", r"mask_decoder.upscale_layer_norm"),
    (r"^mask_decoder\.output_upscaling\.3", r"mask_decoder.upscale_conv2"),
    # 3-layer MLPs: layers.0 -> proj_in, layers.1 -> layers.0, layers.2 -> proj_out
    (r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.0", r"mask_decoder.\1.proj_in"),
    (r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.1", r"mask_decoder.\1.layers.0"),
    (r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.2", r"mask_decoder.\1.proj_out"),
]

# The inverse rules, written out (not derived) so each direction reads plainly.
_INVERSE: List[Tuple[str, str]] = [
    (r"^vision_encoder\.layers\.(\d+)\.layer_norm(\d)", r"image_encoder.blocks.\1.norm\2"),
    (r"^vision_encoder\.layers\.(\d+)", r"image_encoder.blocks.\1"),
    (r"^vision_encoder\.patch_embed\.projection", r"image_encoder.patch_embed.proj"),
    (r"^vision_encoder\.neck\.conv1", r"image_encoder.neck.0"),
    (r"^vision_encoder\.neck\.layer_norm1", r"image_encoder.neck.1"),
    (r"^vision_encoder\.neck\.conv2", r"image_encoder.neck.2"),
    (r"^vision_encoder\.neck\.layer_norm2", r"image_encoder.neck.3"),
    (r"^vision_encoder", r"image_encoder"),
    (r"^prompt_encoder\.shared_embedding\.positional_embedding",
     r"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^shared_image_embedding\.positional_embedding", r"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.shared_embedding", r"prompt_encoder.pe_layer"),
    (r"^shared_image_embedding", r"prompt_encoder.pe_layer"),
    (r"^prompt_encoder\.point_embed", r"prompt_encoder.point_embeddings"),
    (r"^prompt_encoder\.mask_embed\.conv1", r"prompt_encoder.mask_downscaling.0"),
    (r"^prompt_encoder\.mask_embed\.layer_norm1", r"prompt_encoder.mask_downscaling.1"),
    (r"^prompt_encoder\.mask_embed\.conv2", r"prompt_encoder.mask_downscaling.3"),
    (r"^prompt_encoder\.mask_embed\.layer_norm2", r"prompt_encoder.mask_downscaling.4"),
    (r"^prompt_encoder\.mask_embed\.conv3", r"prompt_encoder.mask_downscaling.6"),
    (r"^prompt_encoder\.mask_embed", r"prompt_encoder.mask_downscaling"),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)", r"mask_decoder.transformer.layers.\1.norm\2"),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn", r"mask_decoder.transformer.norm_final_attn"),
    (r"^mask_decoder\.upscale_conv1", r"mask_decoder.output_upscaling.0"),
    (r"^mask_decoder\.upscale_layer_norm", r"mask_decoder.output_upscaling.1"),
    (r"^mask_decoder\.upscale_conv2", r"mask_decoder.output_upscaling.3"),
    (r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.proj_in", r"mask_decoder.\1.layers.0"),
    (r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.0", r"mask_decoder.\1.layers.1"),
    (r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.proj_out", r"mask_decoder.\1.layers.2"),
]

_OFFICIAL_ONLY = ("pixel_mean", "pixel_std")
_HF_TIED_COPY = "shared_image_embedding.positional_embedding"
_HF_POINT_PE = "prompt_encoder.shared_embedding.positional_embedding"


def _rename(name: str, rules: List[Tuple[str, str]]) -> str:
    for pattern, repl in rules:
        # (?=\.|$): a rule matches whole dotted components only
        new, n = re.subn(pattern + r"(?=\.|$)", repl, name, count=1)
        if n:
            return new
    return name


def official_name_to_hf(name: str) -> str:
    """One official key or module path -> its HF name (unchanged if the same)."""
    return _rename(name, _PAIRS)


def hf_name_to_official(name: str) -> str:
    """One HF key or module path -> its official name (unchanged if the same)."""
    return _rename(name, _INVERSE)


def is_hf_state_dict(state_dict: Mapping[str, object]) -> bool:
    """True when the keys are HF SamModel's (``vision_encoder.``, ``*.layer_norm*`` ...)."""
    return any(k.startswith(("vision_encoder.", "shared_image_embedding.")) or ".mask_embed." in k
               or ".upscale_conv" in k or k.startswith("prompt_encoder.shared_embedding.") for k in state_dict)


def hf_to_official(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """HF SamModel state_dict -> official keys (same arrays).

    The two tied copies of the positional matrix must be equal; one is kept."""
    out: Dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key == _HF_TIED_COPY and _HF_POINT_PE in state_dict:
            if not np.array_equal(np.asarray(value), np.asarray(state_dict[_HF_POINT_PE])):
                raise ValueError(f"state_dict: expected {_HF_TIED_COPY} equal to its tied copy {_HF_POINT_PE}, "
                                 "got different values")
            continue
        new = hf_name_to_official(key)
        if new in out:
            raise ValueError(f"state_dict: two HF keys map to the official key {new!r} (second: {key!r})")
        out[new] = value
    return out


def official_to_hf(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Official state_dict -> HF SamModel keys (same arrays); drops pixel_mean/pixel_std,
    writes the positional matrix under both of HF's tied names."""
    out: Dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key in _OFFICIAL_ONLY:
            continue
        new = official_name_to_hf(key)
        out[new] = value
        if new == _HF_POINT_PE:
            out[_HF_TIED_COPY] = value
    return out
