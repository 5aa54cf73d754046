"""Mirror of segment_anything/build_sam.py (and MobileSAM's ``vit_t``): configurations,
``sam_model_registry``, and strict loading of the official state_dict.

    sam = sam_model_registry["vit_b"](checkpoint="decoder.safetensors", dtype=np.float32)

``checkpoint`` is a safetensors file (or a PyTorch checkpoint, read without
torch), or a list of them whose keys are merged (e.g. the shipped encoder and
decoder files). Each of the three parts (image_encoder, prompt_encoder,
mask_decoder) must be either complete or absent; anything else raises one
ValueError listing every missing, unexpected and mis-shaped key. Every weight
must be floating point and finite (``check_weight_values``).

Dimension letters: none; shapes appear only as (official key -> shape) tables.
"""

from __future__ import annotations

import os
from typing import Dict, NamedTuple, Sequence, Tuple, Union

import numpy as np

from .modeling.mask_decoder import MaskDecoder
from .modeling.prompt_encoder import PromptEncoder
from .modeling.sam import Sam
from .modeling.transformer import TwoWayTransformer

PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
PathLike = Union[str, os.PathLike]


class SamConfig(NamedTuple):
    """One entry of the official model table (build_sam.py).

    (A NamedTuple, not a frozen dataclass: importing dataclasses costs a cold
    process about 10 ms, a twentieth of its whole budget.)
    """

    name: str
    encoder: str  # "vit" (SAM) or "tiny_vit" (MobileSAM)
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    # MobileSAM TinyViT (mobile_sam/build_sam.py: build_sam_vit_t)
    tiny_embed_dims: Tuple[int, ...] = (64, 128, 160, 320)
    tiny_depths: Tuple[int, ...] = (2, 2, 6, 2)
    tiny_num_heads: Tuple[int, ...] = (2, 4, 5, 10)
    tiny_window_sizes: Tuple[int, ...] = (7, 7, 14, 7)
    # shared by every SAM (build_sam.py: _build_sam)
    prompt_embed_dim: int = 256
    image_size: int = 1024
    vit_patch_size: int = 16

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.vit_patch_size


CONFIGS: Dict[str, SamConfig] = {
    "vit_h": SamConfig("vit_h", "vit", 1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamConfig("vit_l", "vit", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamConfig("vit_b", "vit", 768, 12, 12, (2, 5, 8, 11)),
    "vit_t": SamConfig("vit_t", "tiny_vit"),
}


def build_modules(config: SamConfig, *, folded_bn: bool = False) -> Sam:
    """The module tree of one configuration, without weights (mirror of _build_sam)."""
    prompt_embed_dim = config.prompt_embed_dim
    image_embedding_size = config.image_embedding_size
    if config.encoder == "vit":
        from .modeling.image_encoder import ImageEncoderViT

        image_encoder = ImageEncoderViT(
            depth=config.encoder_depth,
            embed_dim=config.encoder_embed_dim,
            img_size=config.image_size,
            mlp_ratio=4,
            norm_eps=1e-6,  # NOTE(reference): partial(torch.nn.LayerNorm, eps=1e-6)
            num_heads=config.encoder_num_heads,
            patch_size=config.vit_patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=config.encoder_global_attn_indexes,
            window_size=14,
            out_chans=prompt_embed_dim,
        )
    else:
        from .modeling.tiny_vit_sam import TinyViT

        image_encoder = TinyViT(
            img_size=config.image_size, in_chans=3, num_classes=1000,
            embed_dims=list(config.tiny_embed_dims), depths=list(config.tiny_depths),
            num_heads=list(config.tiny_num_heads), window_sizes=list(config.tiny_window_sizes),
            mlp_ratio=4.0, mbconv_expand_ratio=4.0, local_conv_size=3, folded_bn=folded_bn,
        )
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        model_type=config.name,
    )
    return sam.set_names()


def expected_shapes(model_type: str, *, folded_bn: bool = False, include_optional: bool = True) -> Dict[str, Tuple[int, ...]]:
    """Official state_dict key -> shape for a model type (vit_b/l/h/t)."""
    sam = build_modules(_config(model_type), folded_bn=folded_bn)
    shapes = sam.state_dict_shapes()
    if not include_optional:
        for key in sam.optional_keys():
            shapes.pop(key, None)
    return shapes


def _config(model_type: str) -> SamConfig:
    if model_type == "default":
        model_type = "vit_h"
    if model_type not in CONFIGS:
        raise ValueError(f"model_type: expected one of {sorted(CONFIGS) + ['default']}, got {model_type!r}")
    return CONFIGS[model_type]


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def read_state_dict(checkpoint: Union[PathLike, Sequence[PathLike]]) -> Dict[str, np.ndarray]:
    """Read and merge one or more checkpoint files (safetensors or PyTorch); a dict
    of arrays passes through."""
    if isinstance(checkpoint, dict):
        return dict(checkpoint)
    paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    if not paths:
        raise ValueError("checkpoint: expected a path or a non-empty list of paths, got an empty list")
    merged: Dict[str, np.ndarray] = {}
    for path in paths:
        sd = _read_one(path)
        overlap = sorted(set(sd) & set(merged))
        if overlap:
            from .io.checkpoint import show_name

            raise ValueError(f"checkpoint: {os.fspath(path)} repeats keys of an earlier file: "
                             f"{_preview([show_name(k) for k in overlap])}")
        merged.update(sd)
    return merged


def _read_one(path: PathLike) -> Dict[str, np.ndarray]:
    """One file, its format told by its content (not its name)."""
    from .io.checkpoint import CheckpointError, describe_unknown, detect_format, load_safetensors, load_torch_checkpoint

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: no such file: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    kind = detect_format(head, os.path.getsize(path))
    if kind in ("zip", "pickle"):  # torch.save, zip or legacy
        return load_torch_checkpoint(path)
    if kind == "safetensors":
        tensors, _metadata = load_safetensors(path)
        return tensors
    if kind == "onnx":
        raise CheckpointError(f"checkpoint: {path!r} is an ONNX export; convert it first "
                              "('npsam convert model.onnx model.safetensors') and load the safetensors file")
    raise CheckpointError(f"checkpoint: {describe_unknown(path, head)}")


def is_folded_bn(state_dict: Dict[str, np.ndarray]) -> bool:
    """True when MobileSAM's Conv2d_BN layers appear as fused convs (Conv2d_BN.fuse()
    layout: ``P.weight``/``P.bias``) rather than ``P.c.weight`` + ``P.bn.*``."""
    enc = [k for k in state_dict if k.startswith("image_encoder.")]
    return bool(enc) and not any(".c.weight" in k for k in enc)


def check_state_dict(sam: Sam, state_dict: Dict[str, np.ndarray]) -> None:
    """Strict check: each part complete or absent; one error lists every problem."""
    expected = sam.state_dict_shapes()
    optional = sam.optional_keys()
    present_parts = {p for p in PARTS if any(k.startswith(p + ".") for k in state_dict)}
    missing = sorted(
        k for k in expected
        if k not in state_dict and k not in optional and k.split(".", 1)[0] in present_parts
    )
    from .io.checkpoint import show_name

    unexpected = sorted(show_name(k) for k in state_dict if k not in expected)
    mismatched = sorted(
        f"{k}: expected {list(expected[k])}, got {list(np.shape(state_dict[k]))}"
        for k in state_dict if k in expected and tuple(np.shape(state_dict[k])) != expected[k]
    )
    if not present_parts:
        raise ValueError(f"checkpoint: no keys of {', '.join(PARTS)} found for model {sam.model_type!r} "
                         f"(got {len(state_dict)} keys: {_preview(sorted(map(show_name, state_dict)))})")
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not fit model {sam.model_type!r}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {len(items)} {title}: {_preview(items)}")
        raise ValueError("\n".join(lines))


# NOTE(reference): the only integer entries of an official state_dict are
# BatchNorm's num_batches_tracked counters (MobileSAM's unfused Conv2d_BN).
INTEGER_BUFFERS = ("num_batches_tracked",)


def check_weight_values(state_dict: Dict[str, np.ndarray], n: int = 5) -> None:
    """Weights that load but cannot be right: refused, naming the keys.

    Every weight must be floating point (float16, float32, float64; bfloat16
    is widened to float32 when read), converted to the model's dtype when
    loaded; integer and bool arrays are refused (only ``num_batches_tracked``
    is an integer). Every value must be finite: a NaN or infinity gives NaN
    scores or empty masks with confident scores, never a useful result.
    Lists at most ``n`` keys per problem, then "and N more".
    """
    from .io.checkpoint import CheckpointError, preview, show_name

    not_arrays = sorted(show_name(k) for k, v in state_dict.items() if not isinstance(v, np.ndarray))
    if not_arrays:
        raise CheckpointError(f"checkpoint: {len(not_arrays)} entries are not NumPy arrays: {preview(not_arrays, n)}")
    not_float, not_finite = [], []
    for key in sorted(state_dict):
        array = state_dict[key]
        if array.dtype.kind != "f":
            if array.dtype.kind in "iu" and key.rsplit(".", 1)[-1] in INTEGER_BUFFERS:
                continue
            not_float.append(f"{show_name(key)} ({array.dtype})")
        elif array.size and not (np.isfinite(array.min()) and np.isfinite(array.max())):
            # (min and max propagate NaN and reach +-inf: two reductions, no temporary array)
            not_finite.append(show_name(key))
    problems = []
    if not_float:
        problems.append(f"{len(not_float)} keys hold integer or bool values where SAM's weights are floating point: "
                        f"{preview(not_float, n)}")
    if not_finite:
        problems.append(f"{len(not_finite)} keys hold NaN or infinite values: {preview(not_finite, n)}")
    if problems:
        raise CheckpointError("checkpoint: " + "; ".join(problems))


def _preview(items: Sequence[str], n: int = 12) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _build_sam(model_type: str, checkpoint=None, dtype=np.float32) -> Sam:
    config = _config(model_type)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype: expected np.float32 or np.float64, got {dtype}")
    state_dict = read_state_dict(checkpoint) if checkpoint is not None else None
    folded = config.encoder == "tiny_vit" and state_dict is not None and is_folded_bn(state_dict)
    sam = build_modules(config, folded_bn=folded)
    if state_dict is not None:
        check_state_dict(sam, state_dict)
        check_weight_values(state_dict)
        sam.load_state_dict(state_dict, dtype=dtype)
    return sam


def build_sam_vit_h(checkpoint=None, dtype=np.float32) -> Sam:
    return _build_sam("vit_h", checkpoint, dtype)


def build_sam_vit_l(checkpoint=None, dtype=np.float32) -> Sam:
    return _build_sam("vit_l", checkpoint, dtype)


def build_sam_vit_b(checkpoint=None, dtype=np.float32) -> Sam:
    return _build_sam("vit_b", checkpoint, dtype)


def build_sam_vit_t(checkpoint=None, dtype=np.float32) -> Sam:
    """MobileSAM (TinyViT image encoder), as mobile_sam/build_sam.py registers it."""
    return _build_sam("vit_t", checkpoint, dtype)


build_sam = build_sam_vit_h

sam_model_registry = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_t": build_sam_vit_t,
}

