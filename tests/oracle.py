"""Import the official PyTorch code (the test oracle) without torchvision or timm.

``segment_anything/__init__.py`` imports ``predictor`` and
``automatic_mask_generator``, which import torchvision; there is no CPU build
of torchvision here. We register bare package objects whose ``__path__`` is the
installed folder (found with ``find_spec``, which does not execute the package),
so that ``segment_anything.modeling``, ``.build_sam`` and ``.utils.*`` import
normally. The official transforms, predictor and mask generator call three
torchvision functions; ``_stub_torchvision`` supplies them. MobileSAM's TinyViT imports four names from timm (which also needs
torchvision); at inference DropPath is the identity, so small stand-ins do.

Also provides a float64-capable official prompt encoder: the official
``PositionEmbeddingRandom`` hard-codes float32 (``dtype=torch.float32`` in the
grid and ``.to(torch.float)`` in ``forward_with_coords``); ``float64_pe`` makes
both follow the buffer's dtype, which is identical in float32.
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import torch

# The runtime versions of the import trick and the float64 PE live in
# npsam.tools.crosscheck (which needs them without the tests); the oracle reuses them.
from npsam.tools.crosscheck import bare_package, float64_pe, stub_timm  # noqa: F401  (float64_pe re-exported)


def _stub_torchvision() -> None:
    """The three torchvision functions the official code calls, as torchvision
    does them for these inputs (test-only; there is no CPU torchvision here).

    - ``to_pil_image(uint8 HxWxC array)`` is ``PIL.Image.fromarray``;
    - ``resize(pil_image, (h, w))`` with the default interpolation is
      ``img.resize((w, h), Image.BILINEAR)`` (torchvision's ``F_pil.resize``);
    - ``batched_nms``/``box_area``: torchvision's semantics (greedy NMS by
      descending score, suppress IoU > threshold, boxes only suppress boxes of
      their own category), written in torch.
    """
    if "torchvision" in sys.modules:
        return
    from PIL import Image

    def to_pil_image(pic, mode=None):
        return Image.fromarray(np.asarray(pic), mode=mode)

    def resize(img, size, interpolation=None, max_size=None, antialias=True):
        h, w = size
        return img.resize((w, h), Image.BILINEAR)

    def box_area(boxes):
        return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def nms(boxes, scores, iou_threshold):
        order = torch.argsort(scores, descending=True, stable=True)
        boxes = boxes.to(torch.float64)
        area = box_area(boxes)
        keep, suppressed = [], torch.zeros(len(order), dtype=torch.bool)
        for i_pos, i in enumerate(order.tolist()):
            if suppressed[i]:
                continue
            keep.append(i)
            lt = torch.maximum(boxes[i, :2], boxes[:, :2])
            rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
            wh = (rb - lt).clamp(min=0)
            inter = wh[:, 0] * wh[:, 1]
            iou = inter / (area[i] + area - inter)
            suppressed |= iou > iou_threshold
        return torch.tensor(keep, dtype=torch.int64)

    def batched_nms(boxes, scores, idxs, iou_threshold):
        if boxes.numel() == 0:
            return torch.empty((0,), dtype=torch.int64)
        # torchvision's coordinate trick: offset each category so boxes never overlap across them
        offsets = idxs.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_threshold)

    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    fn = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    bx = types.ModuleType("torchvision.ops.boxes")
    fn.resize, fn.to_pil_image = resize, to_pil_image
    bx.batched_nms, bx.box_area, bx.nms = batched_nms, box_area, nms
    tv.transforms, tr.functional, tv.ops, ops.boxes = tr, fn, ops, bx
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tr,
                        "torchvision.transforms.functional": fn, "torchvision.ops": ops,
                        "torchvision.ops.boxes": bx})


def segment_anything():
    """The official package with modeling, build_sam and utils importable."""
    _stub_torchvision()
    pkg = bare_package("segment_anything", "the tests")
    for sub in ("modeling", "build_sam", "utils.transforms", "utils.amg", "utils.onnx",
                "predictor", "automatic_mask_generator"):
        importlib.import_module(f"segment_anything.{sub}")
    return pkg


def mobile_sam():
    """MobileSAM's package (mobilesam-mirror) with timm stubbed."""
    stub_timm()
    _stub_torchvision()
    pkg = bare_package("mobile_sam", "the tests")
    for sub in ("modeling", "build_sam", "utils.transforms"):
        importlib.import_module(f"mobile_sam.{sub}")
    return pkg


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Draw every parameter and floating buffer at random, like PyTorch's default
    initialisation, but with the LayerNorm/BatchNorm affine perturbed (default
    init leaves them at 1/0, which hides bugs such as a swapped weight and bias).

    - matrices (Linear/conv weights): normal with the std of the default
      kaiming-uniform init, 1/sqrt(3 fan_in), times ``scale``;
    - biases: uniform in +-1/sqrt(fan_in), as the default init;
    - embeddings, tokens, the PE matrix: N(0, 1), as nn.Embedding/randn;
    - norm scales 1 + 0.2 N(0, 1), norm shifts 0.2 N(0, 1); BatchNorm running
      means 0.2 N(0, 1) and variances in [0.5, 1.5); TinyViT attention biases,
      the ViT's pos_embed and rel_pos: 0.2 N(0, 1).

    Parameters are picked by module type (nn.Embedding, the norms), never by
    name fragments: "token" also matches cross_attn_token_to_image. On these
    weights the official decoder's own float32 output stays within ~5e-7 of its
    float64 output, so the float32 bar is meaningful; test_decoder checks that.
    """
    g = torch.Generator().manual_seed(seed)

    def normal(shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    norm_weights, embeddings = set(), set()
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, (torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.GroupNorm)) or \
                type(mod).__name__ == "LayerNorm2d":
            norm_weights.update({prefix + "weight", prefix + "bias"})
        if isinstance(mod, torch.nn.Embedding):
            embeddings.add(prefix + "weight")
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                value = torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5
            elif name.endswith("running_mean"):
                value = 0.2 * normal(p.shape)
            elif name in norm_weights:
                value = (1.0 if name.endswith("weight") else 0.0) + 0.2 * normal(p.shape)
            elif name in embeddings or name.endswith("positional_encoding_gaussian_matrix"):
                value = normal(p.shape)
            elif p.ndim >= 2 and not any(s in name for s in ("attention_biases", "pos_embed", "rel_pos")):
                fan_in = int(np.prod(p.shape[1:]))
                value = normal(p.shape) * scale / np.sqrt(3 * fan_in)
            elif name.endswith("bias") and p.ndim == 1:
                fan_in = _fan_in_of_bias(module, name)
                bound = 1 / np.sqrt(fan_in)
                value = (torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
            else:  # attention biases, pos_embed, rel_pos, other vectors
                value = 0.2 * normal(p.shape)
            p.copy_(value.to(p.dtype))
    return module


def _fan_in_of_bias(module: torch.nn.Module, bias_name: str) -> int:
    weight_name = bias_name[: -len("bias")] + "weight"
    params = dict(module.named_parameters())
    w = params.get(weight_name)
    if w is None or w.ndim < 2:
        return 1
    if isinstance(_owner(module, bias_name), torch.nn.ConvTranspose2d):
        return int(w.shape[1] * np.prod(w.shape[2:]))  # (in, out, kH, kW): torch uses out*k*k
    return int(np.prod(w.shape[1:]))


def _owner(module: torch.nn.Module, param_name: str) -> torch.nn.Module:
    owner = module
    for part in param_name.split(".")[:-1]:
        owner = getattr(owner, part)
    return owner


def state_dict_numpy(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
