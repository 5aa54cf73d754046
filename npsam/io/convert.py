"""Convert an official checkpoint to safetensors with the official keys.

Reads a PyTorch checkpoint (``torch.save``, zip or legacy; never imports
torch, never runs code from the pickle), a safetensors file, or an ONNX export
(through :mod:`npsam.io.onnx_import`), recognises the model from its keys and
shapes, checks the state_dict strictly against that model's expected keys and
shapes, and writes safetensors. Conversion changes the container, not the
content: keys, layouts and buffers are the official state_dict's; only the
floating dtype may change on request.

Models: ``vit_b``/``vit_l``/``vit_h`` (SAM ViT image encoder, told apart by
``image_encoder.patch_embed.proj.weight`` of shape [C, 3, 16, 16] with C =
768/1024/1280), ``vit_t`` (MobileSAM TinyViT, ``image_encoder.layers.*``),
and ``decoder`` (only ``prompt_encoder.*`` and ``mask_decoder.*``).

Notation: C = ViT embedding width.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from npsam import __version__
from npsam.io.checkpoint import CheckpointError, load_safetensors, load_torch_checkpoint, save_safetensors, show_name

__all__ = [
    "PARTS",
    "MODEL_TYPES",
    "StateDictMismatchError",
    "read_state_dict",
    "detect_model",
    "detect_folded_bn",
    "expected_state_shapes",
    "check_state_dict",
    "convert",
    "add_convert_arguments",
    "run_convert",
]

PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "vit_t", "decoder")
DTYPES = ("float16", "float32", "float64")

# image_encoder.patch_embed.proj.weight [C, 3, 16, 16]: C -> model type (build_sam.py presets).
_VIT_WIDTHS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}

# NOTE(reference): Sam registers pixel_mean/pixel_std with persistent=False, so
# the official state_dict leaves them out; files written by other tools may
# carry them. Always accepted (with this shape), never required, and kept
# alongside the image encoder.
OPTIONAL_KEYS = {"pixel_mean": (3, 1, 1), "pixel_std": (3, 1, 1)}

_LIST_LIMIT = 10  # entries shown per list in a mismatch error


class StateDictMismatchError(ValueError):
    """Missing, unexpected and mis-shaped keys against one model, all in one message."""

    def __init__(self, model: str, missing: List[str], unexpected: List[str], mismatched: List[str]) -> None:
        self.model, self.missing, self.unexpected, self.mismatched = model, missing, unexpected, mismatched
        lines = [f"state_dict does not match the expected model {model}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                shown = ", ".join(items[:_LIST_LIMIT])
                more = f", ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
                lines.append(f"  {len(items)} {title}: {shown}{more}")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------
# Reading any supported source
# --------------------------------------------------------------------------

def _source_format(path: str) -> str:
    """'torch', 'safetensors' or 'onnx', from the file's content (not its name)."""
    from npsam.io.checkpoint import describe_unknown, detect_format

    with open(path, "rb") as f:
        head = f.read(16)
    kind = detect_format(head, os.path.getsize(path))
    if kind is None:
        raise CheckpointError(f"src: {describe_unknown(path, head)}")
    return "torch" if kind in ("zip", "pickle") else kind


def _read_onnx(path: str) -> Dict[str, np.ndarray]:
    try:
        from npsam.io import onnx_import
    except ImportError as e:
        raise CheckpointError(f"src: {path!r} is an ONNX file, but npsam.io.onnx_import is not available ({e})") from None
    try:
        return onnx_import.import_sam_onnx(path)
    except ValueError as decoder_error:
        try:
            return onnx_import.import_encoder_onnx(path)
        except ValueError as encoder_error:
            raise CheckpointError(
                f"src: {path!r} is neither a SamOnnxModel export ({decoder_error}) "
                f"nor an image encoder export ({encoder_error})"
            ) from None


def read_state_dict(src) -> Tuple[Dict[str, np.ndarray], str]:
    """(state_dict, source format) for a torch, safetensors or ONNX file."""
    state_dict, kind, _ = _read_source(src)
    return state_dict, kind


def _read_source(src) -> Tuple[Dict[str, np.ndarray], str, Dict[str, str]]:
    """(state_dict, source format, the file's own metadata): a safetensors file's
    ``__metadata__``, an ONNX model's ``metadata_props`` (with its producer), or
    nothing for a torch checkpoint, which has no such field."""
    src = os.fspath(src)
    if not os.path.isfile(src):
        raise CheckpointError(f"src: expected an existing file, got {src!r}")
    kind = _source_format(src)
    if kind == "torch":
        return load_torch_checkpoint(src), kind, {}
    if kind == "safetensors":
        state_dict, metadata = load_safetensors(src)
        return state_dict, kind, dict(metadata or {})
    state_dict = _read_onnx(src)
    return state_dict, kind, _onnx_metadata(src)


def _onnx_metadata(path: str) -> Dict[str, str]:
    """An ONNX model's metadata_props (licence, author, ... as its exporter set
    them) and, when set, its producer as ``producer``."""
    from npsam.io import onnx_proto

    model = onnx_proto.load_model(path)
    metadata = {str(k): str(v) for k, v in model.metadata.items()}
    if model.producer_name:
        metadata.setdefault("producer", " ".join(filter(None, (model.producer_name, model.producer_version))))
    return metadata


def carried_metadata(source: Dict[str, str], own: Dict[str, str]) -> Dict[str, str]:
    """``own`` (npsam's keys) and the source file's metadata (its licence, author,
    description, ...), kept as they were; a source key npsam's keys already use
    is kept as ``source.KEY``."""
    out = dict(own)
    for key, value in source.items():
        if not isinstance(key, str) or not isinstance(value, str):
            continue  # safetensors metadata is str -> str; anything else is not carried
        out[key if key not in own else f"source.{key}"] = value
    return out


# --------------------------------------------------------------------------
# Which model, and does it match
# --------------------------------------------------------------------------

def _part(key: str) -> Optional[str]:
    head = key.split(".", 1)[0]
    return head if head in PARTS else None


def detect_model(state_dict: Dict[str, np.ndarray]) -> str:
    """'vit_b', 'vit_l', 'vit_h', 'vit_t' or 'decoder', from the keys and shapes."""
    proj = state_dict.get("image_encoder.patch_embed.proj.weight")
    if proj is not None:
        shape = tuple(proj.shape)  # [C, 3, 16, 16]
        if len(shape) == 4 and shape[1:] == (3, 16, 16) and shape[0] in _VIT_WIDTHS:
            return _VIT_WIDTHS[shape[0]]
        raise CheckpointError(
            "state_dict: image_encoder.patch_embed.proj.weight has shape "
            f"{shape}, expected [768|1024|1280, 3, 16, 16] (vit_b/vit_l/vit_h)"
        )
    if any(k.startswith("image_encoder.layers.") for k in state_dict):
        return "vit_t"
    parts = {_part(k) for k in state_dict}
    if "image_encoder" not in parts and parts & {"prompt_encoder", "mask_decoder"}:
        return "decoder"
    sample = ", ".join(sorted(state_dict)[:5]) or "no keys at all"
    raise CheckpointError(
        "state_dict: not a SAM or MobileSAM state_dict (expected image_encoder.patch_embed.proj.weight, "
        f"image_encoder.layers.*, or prompt_encoder.*/mask_decoder.* keys; found {sample})"
    )


def detect_folded_bn(state_dict: Dict[str, np.ndarray]) -> bool:
    """True when MobileSAM's Conv2d_BN layers come as the fused ``P.weight, P.bias``.

    NOTE(reference): tiny_vit_sam.py Conv2d_BN is a Sequential of ``c`` (Conv2d,
    no bias) and ``bn`` (BatchNorm2d): its state_dict has ``P.c.weight`` and
    ``P.bn.{weight,bias,running_mean,running_var,num_batches_tracked}``;
    ``Conv2d_BN.fuse()`` turns it into a Conv2d with ``P.weight, P.bias``.
    """
    return not any(k.startswith("image_encoder.") and k.endswith(".c.weight") for k in state_dict)


def expected_state_shapes(model_type: str, *, folded_bn: bool = False, include_optional: bool = True) -> Dict[str, Tuple[int, ...]]:
    """The official state_dict's keys and shapes for a model type (``decoder``
    = the prompt encoder and mask decoder, the same in every SAM and MobileSAM).

    ``include_optional=False`` leaves out the keys a file may omit because
    inference never reads them (pixel_mean/pixel_std, TinyViT's classifier
    head), as :func:`npsam.build_sam.expected_shapes` marks them.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    # Imported here so that the converter needs only checkpoint.py to import.
    from npsam.build_sam import expected_shapes

    if model_type == "decoder":
        full = expected_shapes("vit_b", include_optional=include_optional)
        return {k: tuple(v) for k, v in full.items() if _part(k) in ("prompt_encoder", "mask_decoder")}
    shapes = expected_shapes(model_type, folded_bn=folded_bn, include_optional=include_optional)
    return {k: tuple(v) for k, v in shapes.items()}


def _default_parts(state_dict: Dict[str, np.ndarray]) -> Tuple[str, ...]:
    """A full model, an image encoder alone, or a prompt encoder + mask decoder."""
    present = {_part(k) for k in state_dict}
    if "image_encoder" not in present:
        return ("prompt_encoder", "mask_decoder")
    if not present & {"prompt_encoder", "mask_decoder"}:
        return ("image_encoder",)
    return PARTS


def check_state_dict(
    state_dict: Dict[str, np.ndarray],
    model: str,
    expected: Dict[str, Tuple[int, ...]],
    parts: Iterable[str],
    optional: Iterable[str] = (),
) -> None:
    """Raise StateDictMismatchError listing every problem at once.

    Every key of ``parts`` must be present, except ``optional`` ones (and
    pixel_mean/pixel_std); every key present (kept or not) must be an
    expected key with the expected shape.
    """
    parts = set(parts)
    expected = {**OPTIONAL_KEYS, **expected}
    optional = set(optional) | set(OPTIONAL_KEYS)
    missing = sorted(k for k in expected if _part(k) in parts and k not in state_dict and k not in optional)
    unexpected, mismatched = [], []
    for key in sorted(state_dict):
        got = tuple(state_dict[key].shape)
        if key not in expected:
            unexpected.append(show_name(key))  # from the file: escaped if need be
        elif got != tuple(expected[key]):
            mismatched.append(f"{key} {list(got)} (expected {list(expected[key])})")
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(model, missing, unexpected, mismatched)


# --------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------

def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_parts(parts) -> Optional[Tuple[str, ...]]:
    if parts is None:
        return None
    if isinstance(parts, str):
        parts = [p.strip() for p in parts.split(",") if p.strip()]
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if not parts or bad:
        raise ValueError(f"parts: expected a non-empty subset of {', '.join(PARTS)}, got {', '.join(map(str, parts)) or 'nothing'}")
    return tuple(p for p in PARTS if p in parts)  # official order, no repeats


def convert(src, dst, *, parts=None, dtype: str = "float32", model_type: Optional[str] = None) -> dict:
    """Convert ``src`` (torch checkpoint, safetensors or ONNX) to safetensors at ``dst``.

    ``parts``: which of image_encoder, prompt_encoder, mask_decoder to keep
    (a list or a comma-separated string; default: what the source holds, a
    full model, an encoder alone, or the two decoder parts; every part when
    ``model_type`` names a ViT). ``dtype``: the
    floating dtype written (integer buffers such as num_batches_tracked keep
    theirs). ``model_type``: check against this model instead of detecting it.

    The metadata written: npsam's (format, model_type, folded_bn, parts, dtype,
    source_format, source_name, source_sha256, npsam_version) and the source
    file's own (a safetensors ``__metadata__``, an ONNX model's metadata_props
    and producer: licence fields and the like), unchanged, under ``source.KEY``
    where npsam's keys already use KEY.

    Returns a report: model_type, folded_bn, tensors, parameters, parts, dtype,
    source_sha256, seconds. ``dst`` is written atomically, with the mode a new
    file gets under the umask; on error nothing is left at ``dst`` that was not
    there before.
    """
    start = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    parts = _parse_parts(parts)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"dst: must differ from src, got {dst!r} for both")

    from npsam.build_sam import check_weight_values

    state_dict, source_format, source_metadata = _read_source(src)
    model = model_type or detect_model(state_dict)
    folded_bn = model == "vit_t" and detect_folded_bn(state_dict)
    if parts is None and model == "decoder":
        parts = ("prompt_encoder", "mask_decoder")
    elif parts is None:
        # A model named by the caller is checked whole; a detected one as the source holds it.
        parts = PARTS if model_type else _default_parts(state_dict)
    if model == "decoder" and "image_encoder" in parts:
        raise ValueError(f"parts: a decoder-only model has no image_encoder, got {', '.join(parts)}")
    expected = expected_state_shapes(model, folded_bn=folded_bn)
    optional = set(expected) - set(expected_state_shapes(model, folded_bn=folded_bn, include_optional=False))
    check_state_dict(state_dict, model, expected, parts, optional)
    check_weight_values(state_dict)  # never int weights under float metadata, never NaN

    keep_optional = "image_encoder" in parts
    out = {}
    for key, array in state_dict.items():
        part = _part(key)
        if part in parts or (part is None and keep_optional):
            out[key] = array.astype(dtype, copy=False) if np.issubdtype(array.dtype, np.floating) else array
    del state_dict

    metadata = {
        "format": "npsam",
        "model_type": model,
        "folded_bn": str(bool(folded_bn)).lower(),
        "parts": ",".join(parts),
        "dtype": dtype,
        "source_format": source_format,
        "source_name": os.path.basename(src),
        "source_sha256": _sha256(src),
        "npsam_version": __version__,
    }
    metadata = carried_metadata(source_metadata, metadata)
    save_safetensors(dst, out, metadata)
    return {
        "model_type": model,
        "folded_bn": bool(folded_bn),
        "tensors": len(out),
        "parameters": int(sum(a.size for a in out.values())),
        "parts": list(parts),
        "dtype": dtype,
        "source_sha256": metadata["source_sha256"],
        "dst": dst,
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------
# Command line (mounted by npsam.tools.cli as `npsam convert`)
# --------------------------------------------------------------------------

EXAMPLES = """examples:
  npsam convert sam_vit_b_01ec64.pth sam_vit_b.safetensors
  npsam convert sam_vit_h_4b8939.pth decoder.safetensors --parts prompt_encoder,mask_decoder
  npsam convert mobile_sam.pt mobile_sam.safetensors --dtype float16
"""


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add SRC, DST, --parts, --dtype, --model-type to a (sub)parser."""
    parser.add_argument("src", metavar="SRC", help="checkpoint: .pth/.pt (torch.save), .safetensors or .onnx")
    parser.add_argument("dst", metavar="DST", help="output .safetensors file")
    parser.add_argument("--parts", default=None,
                        help=f"comma-separated subset of {','.join(PARTS)} to keep (default: all in SRC)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="floating dtype written (default float32)")
    parser.add_argument("--model-type", default=None, choices=MODEL_TYPES,
                        help="check against this model instead of detecting it")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed ``convert`` command: one summary line, 0; or one error line on stderr, 2."""
    try:
        report = convert(args.src, args.dst, parts=args.parts, dtype=args.dtype, model_type=args.model_type)
    except (ValueError, OSError) as e:
        message = " ".join(str(e).split("\n", 1)[0].split()) if isinstance(e, OSError) else str(e).replace("\n", " ")
        print(f"npsam convert: error: {message}", file=sys.stderr)
        return 2
    print(
        f"{args.src} -> {report['dst']}: {report['model_type']}"
        f"{' (BatchNorm folded)' if report['folded_bn'] else ''}, {report['tensors']} tensors, "
        f"{report['parameters']:,} values, {report['dtype']}, parts {','.join(report['parts'])}, "
        f"{report['seconds']:.2f} s"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m npsam.io.convert", description=__doc__.split("\n", 1)[0],
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return run_convert(add_convert_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
