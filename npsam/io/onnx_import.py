"""Recover the official state_dict from SAM's ONNX exports.

An ONNX export keeps every weight but not always under its name: torch's
exporter renames what it folds. This module reads the graph (with
npsam/onnx_proto.py, no `onnx` package) and puts each weight back under its
official key, identified by graph structure (which node consumes what) and,
where the file has them, checked against node names such as
``/transformer/layers.0/self_attn/q_proj/MatMul``.

- ``import_sam_onnx``: the official ``SamOnnxModel`` export (prompt encoder +
  mask decoder) -> ``prompt_encoder.*`` and ``mask_decoder.*`` keys.
- ``import_encoder_onnx``: MobileSAM's TinyViT exported with every BatchNorm
  folded into its conv -> ``image_encoder.*`` keys, in the layout the official
  ``Conv2d_BN.fuse()`` produces (``P.weight``, ``P.bias`` for each Conv2d_BN
  at path ``P``, in place of ``P.c.weight`` and ``P.bn.*``).

Dimension letters:
    C  channels           O, I  Linear out/in features     K  kernel size
    h  heads              N  tokens in one window (r*r)    r  window size
    M  mask tokens        A  attention offsets (r*r)
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Callable, Optional

import numpy as np

from .checkpoint import CheckpointError, _reading, _show, preview
from .onnx_proto import Model, Node, load_model
from ..modeling.tiny_vit_sam import attention_bias_idxs

Shapes = dict[str, tuple[int, ...]]

# ---------------------------------------------------------------- expected keys


def sam_decoder_shapes(
    transformer_dim: int = 256,
    depth: int = 2,
    mlp_dim: int = 2048,
    attention_downsample_rate: int = 2,
    num_multimask_outputs: int = 3,
    iou_head_depth: int = 3,
    iou_head_hidden_dim: int = 256,
    mask_in_chans: int = 16,
) -> Shapes:
    """Official keys and shapes of ``prompt_encoder.*`` and ``mask_decoder.*``.

    Mirror of build_sam.py (_build_sam: PromptEncoder, MaskDecoder,
    TwoWayTransformer); the defaults are the ones every SAM size uses.
    """
    C = transformer_dim
    s: Shapes = {}

    def linear(prefix: str, i: int, o: int) -> None:
        s[f"{prefix}.weight"], s[f"{prefix}.bias"] = (o, i), (o,)

    def norm(prefix: str, c: int) -> None:
        s[f"{prefix}.weight"], s[f"{prefix}.bias"] = (c,), (c,)

    def attention(prefix: str, downsample: int) -> None:
        inner = C // downsample
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear(f"{prefix}.{proj}", C, inner)
        linear(f"{prefix}.out_proj", inner, C)

    pe = "prompt_encoder"
    s[f"{pe}.pe_layer.positional_encoding_gaussian_matrix"] = (2, C // 2)
    for i in range(4):  # NOTE(reference): pos/neg point + 2 box corners
        s[f"{pe}.point_embeddings.{i}.weight"] = (1, C)
    s[f"{pe}.not_a_point_embed.weight"] = (1, C)
    # mask_downscaling: Conv2d(0), LayerNorm2d(1), GELU(2), Conv2d(3), LayerNorm2d(4), GELU(5), Conv2d(6)
    s[f"{pe}.mask_downscaling.0.weight"], s[f"{pe}.mask_downscaling.0.bias"] = (mask_in_chans // 4, 1, 2, 2), (mask_in_chans // 4,)
    norm(f"{pe}.mask_downscaling.1", mask_in_chans // 4)
    s[f"{pe}.mask_downscaling.3.weight"], s[f"{pe}.mask_downscaling.3.bias"] = (mask_in_chans, mask_in_chans // 4, 2, 2), (mask_in_chans,)
    norm(f"{pe}.mask_downscaling.4", mask_in_chans)
    s[f"{pe}.mask_downscaling.6.weight"], s[f"{pe}.mask_downscaling.6.bias"] = (C, mask_in_chans, 1, 1), (C,)
    s[f"{pe}.no_mask_embed.weight"] = (1, C)

    md = "mask_decoder"
    for i in range(depth):
        layer = f"{md}.transformer.layers.{i}"
        attention(f"{layer}.self_attn", 1)
        norm(f"{layer}.norm1", C)
        attention(f"{layer}.cross_attn_token_to_image", attention_downsample_rate)
        norm(f"{layer}.norm2", C)
        linear(f"{layer}.mlp.lin1", C, mlp_dim)
        linear(f"{layer}.mlp.lin2", mlp_dim, C)
        norm(f"{layer}.norm3", C)
        norm(f"{layer}.norm4", C)
        attention(f"{layer}.cross_attn_image_to_token", attention_downsample_rate)
    attention(f"{md}.transformer.final_attn_token_to_image", attention_downsample_rate)
    norm(f"{md}.transformer.norm_final_attn", C)
    M = num_multimask_outputs + 1
    s[f"{md}.iou_token.weight"] = (1, C)
    s[f"{md}.mask_tokens.weight"] = (M, C)
    # output_upscaling: ConvTranspose2d(0), LayerNorm2d(1), GELU(2), ConvTranspose2d(3), GELU(4)
    s[f"{md}.output_upscaling.0.weight"], s[f"{md}.output_upscaling.0.bias"] = (C, C // 4, 2, 2), (C // 4,)
    norm(f"{md}.output_upscaling.1", C // 4)
    s[f"{md}.output_upscaling.3.weight"], s[f"{md}.output_upscaling.3.bias"] = (C // 4, C // 8, 2, 2), (C // 8,)
    for m in range(M):
        dims = [C, C, C, C // 8]  # MLP(C, C, C // 8, 3)
        for j in range(3):
            linear(f"{md}.output_hypernetworks_mlps.{m}.layers.{j}", dims[j], dims[j + 1])
    dims = [C] + [iou_head_hidden_dim] * (iou_head_depth - 1) + [M]
    for j in range(iou_head_depth):
        linear(f"{md}.iou_prediction_head.layers.{j}", dims[j], dims[j + 1])
    return s


def tinyvit_folded_shapes(
    embed_dims: tuple[int, ...] = (64, 128, 160, 320),
    depths: tuple[int, ...] = (2, 2, 6, 2),
    num_heads: tuple[int, ...] = (2, 4, 5, 10),
    window_sizes: tuple[int, ...] = (7, 7, 14, 7),
    mlp_ratio: int = 4,
    mbconv_expand_ratio: int = 4,
    in_chans: int = 3,
    out_chans: int = 256,
) -> tuple[Shapes, list[str], list[tuple[str, int, int]]]:
    """Official ``image_encoder.*`` keys and shapes of MobileSAM's TinyViT
    ("vit_t"), with every Conv2d_BN in its fused layout.

    Mirror of mobile_sam/modeling/tiny_vit_sam.py (TinyViT.__init__) with the
    arguments build_sam.py passes for "vit_t". Returns (key -> shape, the
    Conv2d_BN paths in forward order, (attention path, h, r) in forward order).

    NOTE(reference): TinyViT builds `norm_head` and `head` (a 1000-class
    classifier) but its forward never calls them (the calls are commented
    out), so exports drop them; they are not listed here.
    """
    s: Shapes = {}
    conv_bns: list[str] = []
    attentions: list[tuple[str, int, int]] = []
    p = "image_encoder"

    def conv_bn(path: str, o: int, i_per_group: int, k: int) -> None:
        # Conv2d_BN.fuse(): a Conv2d with bias replaces the conv + BatchNorm pair.
        s[f"{path}.weight"], s[f"{path}.bias"] = (o, i_per_group, k, k), (o,)
        conv_bns.append(path)

    def pair(path: str, shape_w: tuple[int, ...], c: int) -> None:
        s[f"{path}.weight"], s[f"{path}.bias"] = shape_w, (c,)

    d0 = embed_dims[0]
    conv_bn(f"{p}.patch_embed.seq.0", d0 // 2, in_chans, 3)  # seq: Conv2d_BN(0), GELU(1), Conv2d_BN(2)
    conv_bn(f"{p}.patch_embed.seq.2", d0, d0 // 2, 3)
    for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
        layer = f"{p}.layers.{i}"
        for b in range(depth):
            block = f"{layer}.blocks.{b}"
            if i == 0:  # ConvLayer of MBConv blocks
                hidden = dim * mbconv_expand_ratio
                conv_bn(f"{block}.conv1", hidden, dim, 1)
                conv_bn(f"{block}.conv2", hidden, 1, 3)  # depthwise
                conv_bn(f"{block}.conv3", dim, hidden, 1)
                continue
            h, r = num_heads[i], window_sizes[i]
            # NOTE(reference): TinyViTBlock builds Attention(dim, dim // h, h, attn_ratio=1).
            s[f"{block}.attn.attention_biases"] = (h, r * r)
            pair(f"{block}.attn.norm", (dim,), dim)
            pair(f"{block}.attn.qkv", (3 * dim, dim), 3 * dim)
            pair(f"{block}.attn.proj", (dim, dim), dim)
            attentions.append((f"{block}.attn", h, r))
            hidden = dim * mlp_ratio
            pair(f"{block}.mlp.norm", (dim,), dim)
            pair(f"{block}.mlp.fc1", (hidden, dim), hidden)
            pair(f"{block}.mlp.fc2", (dim, hidden), dim)
            conv_bn(f"{block}.local_conv", dim, 1, 3)  # depthwise
        if i < len(embed_dims) - 1:  # PatchMerging
            out = embed_dims[i + 1]
            conv_bn(f"{layer}.downsample.conv1", out, dim, 1)
            conv_bn(f"{layer}.downsample.conv2", out, 1, 3)  # depthwise
            conv_bn(f"{layer}.downsample.conv3", out, out, 1)
    # neck: Conv2d(0, no bias), LayerNorm2d(1), Conv2d(2, no bias), LayerNorm2d(3)
    s[f"{p}.neck.0.weight"] = (out_chans, embed_dims[-1], 1, 1)
    pair(f"{p}.neck.1", (out_chans,), out_chans)
    s[f"{p}.neck.2.weight"] = (out_chans, out_chans, 3, 3)
    pair(f"{p}.neck.3", (out_chans,), out_chans)
    return s, conv_bns, attentions


# ---------------------------------------------------------------- graph index

_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.\w+)+$")


class _Graph:
    """Constants (initializers and Constant nodes), producers and consumers."""

    def __init__(self, model: Model, what: str):
        self.what = what
        self.nodes = model.graph.nodes
        self.inputs = set(model.graph.inputs)
        self.constants: dict[str, np.ndarray] = {t.name: t.array for t in model.graph.initializers}
        self.producer: dict[str, Node] = {}
        self.consumers: dict[str, list[Node]] = defaultdict(list)
        for node in self.nodes:
            if node.op_type == "Constant" and "value" in node.attributes:
                self.constants[node.outputs[0]] = node.attributes["value"].value.array
            for out in node.outputs:
                self.producer[out] = node
            for inp in node.inputs:
                self.consumers[inp].append(node)

    def produced_by(self, name: str, op_type: str) -> Optional[Node]:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def consumed_by(self, name: str, op_type: str) -> list[Node]:
        return [n for n in self.consumers.get(name, []) if n.op_type == op_type]

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.what}: {message}")


def _other(node: Node, name: str) -> str:
    """The input of a two-input node that is not `name`."""
    a, b = node.inputs
    return b if a == name else a


def _scope(node: Node) -> Optional[str]:
    """Module path from a torch export's node name, or None.

    "/transformer/layers.0/self_attn/q_proj/MatMul" -> "transformer.layers.0.self_attn.q_proj";
    a Sequential's children repeat its name: "/neck/neck.1/Mul" -> "neck.1".
    """
    parts = node.name.strip("/").split("/")[:-1]
    path: list[str] = []
    for part in parts:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    joined = ".".join(path)
    return joined if _MODULE_PATH.match(joined) or re.match(r"^[A-Za-z_]\w*$", joined) else None


def _agree(g: _Graph, node: Node, structural: str, scope_key: Optional[str]) -> None:
    """When the node carries a module scope, it must name the same module."""
    if scope_key is not None and scope_key != structural:
        raise g.error(f"node {_show(node.name)}: its graph position says {_show(structural)} but its name says {_show(scope_key)}")


# ---------------------------------------------------------------- shared patterns


def _linears(g: _Graph, to_key: Callable[[str], Optional[str]], scope_key: Callable[[Node], Optional[str]]) -> dict[str, np.ndarray]:
    """Linear layers exported as MatMul (+ Add) or Gemm with an unnamed weight.

    NOTE(reference): torch exports a Linear on a 3-D input as MatMul by the
    transposed weight ([I, O]) and an Add of the bias; the bias usually keeps
    its name (`X.bias`), which names the Linear `X`.
    """
    out: dict[str, np.ndarray] = {}
    for node in g.nodes:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        w_name = node.inputs[1]
        w = g.constants.get(w_name)
        if w is None or w.ndim != 2 or to_key(w_name) is not None:
            continue  # activations, or a weight that kept its name
        if node.op_type == "MatMul":
            adds = g.consumed_by(node.outputs[0], "Add")
            if len(adds) != 1:
                raise g.error(f"MatMul {_show(node.name)} (weight {_show(w_name)}): expected one Add of a bias after it, found {len(adds)}")
            b_name = _other(adds[0], node.outputs[0])
            weight = w.T  # [I, O] -> [O, I]
        else:
            if len(node.inputs) < 3:
                raise g.error(f"Gemm {_show(node.name)} (weight {_show(w_name)}): expected a bias input")
            b_name = node.inputs[2]
            trans_b = node.attributes["transB"].value if "transB" in node.attributes else 0
            weight = w if trans_b else w.T  # [O, I] as stored with transB=1; [I, O] -> [O, I] otherwise
        bias = g.constants.get(b_name)
        if bias is None or bias.shape != (weight.shape[0],):
            raise g.error(f"{_show(node.op_type)} {_show(node.name)}: expected a constant bias of shape ({weight.shape[0]},), got {_show(b_name)}")
        b_key = to_key(b_name)
        module = b_key[: -len(".bias")] if b_key is not None and b_key.endswith(".bias") else None
        from_scope = scope_key(node)
        if module is None and from_scope is None:
            raise g.error(f"{_show(node.op_type)} {_show(node.name)} (weight {_show(w_name)}): cannot tell which Linear it is: "
                          f"its bias {_show(b_name)} is unnamed and the node name has no module scope")
        if module is None:
            module = from_scope
        _agree(g, node, module, from_scope)
        out[f"{module}.weight"] = weight
        out[f"{module}.bias"] = bias
    return out


def _layer_norms_2d(g: _Graph, to_key: Callable[[str], Optional[str]], scope_key: Callable[[Node], Optional[str]]) -> dict[str, np.ndarray]:
    """LayerNorm2d affines, exported as Mul/Add constants of shape [C, 1, 1].

    Mirror of LayerNorm2d.forward: u = mean(x); s = mean((x - u)^2);
    x = (x - u) / sqrt(s + eps); weight[:, None, None] * x + bias[:, None, None].
    The LayerNorm2d follows a conv at index n of its Sequential, so it is
    module n + 1 there (mask_downscaling.1/.4, output_upscaling.1, neck.1/.3).
    """
    out: dict[str, np.ndarray] = {}
    for mul in g.nodes:
        if mul.op_type != "Mul" or len(mul.inputs) != 2:
            continue
        names = [n for n in mul.inputs if n in g.constants and g.constants[n].ndim == 3
                 and g.constants[n].shape[1:] == (1, 1) and to_key(n) is None]
        if len(names) != 1:
            continue
        w_name = names[0]
        div = g.produced_by(_other(mul, w_name), "Div")
        sub = g.produced_by(div.inputs[0], "Sub") if div is not None else None
        conv = None
        if sub is not None:
            conv = g.produced_by(sub.inputs[0], "Conv") or g.produced_by(sub.inputs[0], "ConvTranspose")
        if conv is None:
            continue  # a [C, 1, 1] scale that is not a LayerNorm2d
        adds = g.consumed_by(mul.outputs[0], "Add")
        b_names = [_other(a, mul.outputs[0]) for a in adds]
        b_names = [n for n in b_names if n in g.constants and g.constants[n].shape == g.constants[w_name].shape]
        if len(b_names) != 1:
            raise g.error(f"LayerNorm2d scale {_show(w_name)} (node {_show(mul.name)}): expected one Add of a [C, 1, 1] shift after it")
        C = g.constants[w_name].shape[0]
        if conv.op_type == "Conv":
            conv_out = g.constants[conv.inputs[1]].shape[0] if conv.inputs[1] in g.constants else C
        else:
            conv_out = g.constants[conv.inputs[1]].shape[1] if conv.inputs[1] in g.constants else C
        if conv_out != C:
            raise g.error(f"LayerNorm2d scale {_show(w_name)}: {C} channels after a conv with {conv_out} outputs")
        conv_key = to_key(conv.inputs[1])
        from_scope = scope_key(mul)
        module = None
        if conv_key is not None:
            m = re.match(r"^(.*)\.(\d+)\.weight$", conv_key)
            if m is None:
                raise g.error(f"LayerNorm2d scale {_show(w_name)}: the conv before it ({_show(conv_key)}) is not in a Sequential")
            module = f"{m.group(1)}.{int(m.group(2)) + 1}"
        if module is None and from_scope is None:
            raise g.error(f"LayerNorm2d scale {_show(w_name)} (node {_show(mul.name)}): cannot tell which module it belongs to")
        module = module or from_scope
        _agree(g, mul, module, from_scope)
        out[f"{module}.weight"] = g.constants[w_name].reshape(C)  # [C, 1, 1] -> [C]
        out[f"{module}.bias"] = g.constants[b_names[0]].reshape(C)  # [C, 1, 1] -> [C]
    return out


def _finish(found: dict[str, np.ndarray], expected: Shapes, what: str) -> dict[str, np.ndarray]:
    """Check the recovered keys and shapes against the official ones; float32, official order."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(f"{what}: could not find {len(missing)} official weight(s) in the graph: {preview(missing, 12)}")
    extra = sorted(k for k in found if k not in expected)
    if extra:
        raise CheckpointError(f"{what}: the graph holds {len(extra)} weight(s) that are not official keys: "
                              f"{preview([_show(k) for k in extra], 12)}")
    for k, shape in expected.items():
        if tuple(found[k].shape) != tuple(shape):
            raise CheckpointError(f"{what}: {k}: expected shape {tuple(shape)}, the graph holds {tuple(found[k].shape)}")
        if found[k].dtype != np.float32:
            raise CheckpointError(f"{what}: {k}: expected float32, the graph holds {found[k].dtype}")
    return {k: np.ascontiguousarray(found[k]) for k in expected}


def _load(path: str | os.PathLike, what: str) -> Model:
    try:
        return load_model(path)
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from None


def _importing(path: str | os.PathLike, label: str, recover: Callable[[Model, str], dict[str, np.ndarray]]):
    """Load the file and recover its weights; any failure is one CheckpointError
    naming the file (a node with missing inputs, outputs or attributes raises
    IndexError or AttributeError deep in a pattern: the file is malformed)."""
    what = f"{label} {os.fspath(path)!r}"
    model = _load(path, what)
    return _reading(label, os.fspath(path), lambda: recover(model, what))


# ---------------------------------------------------------------- SamOnnxModel


def _decoder_key(name: str) -> Optional[str]:
    """Initializer name -> official key, or None when the exporter renamed it.

    NOTE(reference): SamOnnxModel holds the Sam as `self.model` and its mask
    decoder again as `self.mask_decoder`, so names come as
    `model.prompt_encoder.*` and `mask_decoder.*` (or `model.mask_decoder.*`).
    """
    key = name[len("model."):] if name.startswith("model.") else name
    if key.startswith(("prompt_encoder.", "mask_decoder.")) and _MODULE_PATH.match(key):
        return key
    return None


_PROMPT_ENCODER_MODULES = ("pe_layer", "point_embeddings", "not_a_point_embed", "mask_downscaling", "no_mask_embed")


def _decoder_scope(node: Node) -> Optional[str]:
    """Node scope -> official module path (scopes are relative to SamOnnxModel)."""
    scope = _scope(node)
    if scope is None:
        return None
    scope = scope[len("model."):] if scope.startswith("model.") else scope
    if scope.startswith(("prompt_encoder.", "mask_decoder.")):
        return scope
    owner = "prompt_encoder" if scope.split(".")[0] in _PROMPT_ENCODER_MODULES else "mask_decoder"
    return f"{owner}.{scope}"


def _output_tokens(g: _Graph, num_mask_tokens: int) -> dict[str, np.ndarray]:
    """iou_token and mask_tokens, merged by the exporter into one [1, 1 + M, C] constant.

    Mirror of MaskDecoder.predict_masks: output_tokens = cat([iou_token.weight,
    mask_tokens.weight]); output_tokens.unsqueeze(0).expand(B, -1, -1).
    """
    found = []
    for expand in g.nodes:
        if expand.op_type != "Expand":
            continue
        t = g.constants.get(expand.inputs[0])
        if t is None or _decoder_key(expand.inputs[0]) is not None:
            continue
        if t.ndim == 3 and t.shape[0] == 1 and t.shape[1] == 1 + num_mask_tokens and g.consumed_by(expand.outputs[0], "Concat"):
            found.append(t)
    if len(found) != 1:
        raise g.error(f"expected one [1, {1 + num_mask_tokens}, C] token constant expanded and concatenated with the prompts "
                      f"(iou_token + mask_tokens), found {len(found)}")
    tokens = found[0]
    return {
        "mask_decoder.iou_token.weight": tokens[0, :1],  # [1, 1 + M, C] -> [1, C]
        "mask_decoder.mask_tokens.weight": tokens[0, 1:],  # [1, 1 + M, C] -> [M, C]
    }


def _no_mask_embed(g: _Graph) -> dict[str, np.ndarray]:
    """no_mask_embed, exported as a [1, C, 1, 1] constant times (1 - has_mask_input).

    Mirror of SamOnnxModel._embed_masks: mask_embedding + (1 - has_mask_input)
    * no_mask_embed.weight.reshape(1, -1, 1, 1).
    """
    found = []
    for mul in g.nodes:
        if mul.op_type != "Mul" or len(mul.inputs) != 2:
            continue
        for name in mul.inputs:
            t = g.constants.get(name)
            if t is None or t.ndim != 4 or t.shape[0] != 1 or t.shape[2:] != (1, 1) or _decoder_key(name) is not None:
                continue
            sub = g.produced_by(_other(mul, name), "Sub")
            if sub is not None and "has_mask_input" in sub.inputs:
                found.append(t)
    if len(found) != 1:
        raise g.error(f"expected one [1, C, 1, 1] constant multiplied by (1 - has_mask_input) (no_mask_embed), found {len(found)}")
    return {"prompt_encoder.no_mask_embed.weight": found[0].reshape(1, -1)}  # [1, C, 1, 1] -> [1, C]


def import_sam_onnx(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Official ``prompt_encoder.*`` and ``mask_decoder.*`` state_dict from a
    ``segment_anything.utils.onnx.SamOnnxModel`` export (float32 arrays)."""
    return _importing(path, "SAM decoder ONNX", _recover_sam_decoder)


def _recover_sam_decoder(model: Model, what: str) -> dict[str, np.ndarray]:
    g = _Graph(model, what)
    if "has_mask_input" not in g.inputs:
        raise g.error("expected the SamOnnxModel inputs (image_embeddings, point_coords, ..., has_mask_input), "
                      f"got {preview([_show(n) for n in sorted(g.inputs)])}")
    expected = sam_decoder_shapes()
    found: dict[str, np.ndarray] = {}
    for name, array in g.constants.items():
        key = _decoder_key(name)
        if key is not None:
            found[key] = array
    found.update(_linears(g, _decoder_key, _decoder_scope))
    found.update(_layer_norms_2d(g, _decoder_key, _decoder_scope))
    found.update(_output_tokens(g, expected["mask_decoder.mask_tokens.weight"][0]))
    found.update(_no_mask_embed(g))
    return _finish(found, expected, what)


# ---------------------------------------------------------------- TinyViT


def _encoder_key(name: str) -> Optional[str]:
    """TinyViT initializer name -> official `image_encoder.*` key, or None when renamed."""
    key = name if name.startswith("image_encoder.") else f"image_encoder.{name}"
    return key if _MODULE_PATH.match(name) else None


def _encoder_scope(node: Node) -> Optional[str]:
    scope = _scope(node)
    if scope is None:
        return None
    return scope if scope.startswith("image_encoder.") else f"image_encoder.{scope}"


def _folded_conv_bns(g: _Graph, conv_bns: list[str], expected: Shapes) -> dict[str, np.ndarray]:
    """Conv2d_BN weights, BatchNorm folded in by the exporter: the unnamed
    (weight, bias) pairs of the Conv nodes, matched in forward order and
    checked by shape (and by node name where the file has one)."""
    convs = [n for n in g.nodes if n.op_type == "Conv" and len(n.inputs) == 3
             and n.inputs[1] in g.constants and _encoder_key(n.inputs[1]) is None]
    if len(convs) != len(conv_bns):
        raise g.error(f"expected {len(conv_bns)} convs with folded BatchNorm (unnamed weight and bias), found {len(convs)}")
    out: dict[str, np.ndarray] = {}
    for path, conv in zip(conv_bns, convs):
        weight, bias = g.constants[conv.inputs[1]], g.constants.get(conv.inputs[2])
        if weight.shape != expected[f"{path}.weight"] or bias is None or bias.shape != expected[f"{path}.bias"]:
            raise g.error(f"{path}: expected a conv of weight {expected[f'{path}.weight']} and bias {expected[f'{path}.bias']}, "
                          f"node {_show(conv.name)} has {weight.shape} and {None if bias is None else bias.shape}")
        scope = _encoder_scope(conv)
        _agree(g, conv, f"{path}.c", scope)  # Conv2d_BN's conv is its child `c`
        out[f"{path}.weight"], out[f"{path}.bias"] = weight, bias
    return out


def _attention_biases(g: _Graph, attentions: list[tuple[str, int, int]]) -> dict[str, np.ndarray]:
    """attention_biases [h, A] from the [h, N, N] tables the exporter materialised.

    NOTE(reference): in eval mode Attention adds `self.ab`, a copy of
    attention_biases[:, attention_bias_idxs]; every entry of the table must
    equal, bit for bit, the parameter entry of its offset.
    """
    tables = []
    for softmax in g.nodes:
        if softmax.op_type != "Softmax":
            continue
        add = g.produced_by(softmax.inputs[0], "Add")
        if add is None:
            continue
        consts = [n for n in add.inputs if n in g.constants and g.constants[n].ndim == 3]
        if len(consts) == 1:
            tables.append((add, g.constants[consts[0]]))
    if len(tables) != len(attentions):
        raise g.error(f"expected {len(attentions)} attention-bias tables [h, N, N] added before a Softmax, found {len(tables)}")
    out: dict[str, np.ndarray] = {}
    for (path, h, r), (add, table) in zip(attentions, tables):
        N = r * r
        if table.shape != (h, N, N):
            raise g.error(f"{path}: expected an attention-bias table of shape {(h, N, N)}, node {_show(add.name)} adds {table.shape}")
        _agree(g, add, path, _encoder_scope(add))
        idxs, _ = attention_bias_idxs((r, r))  # [N, N]
        first = np.unique(idxs.reshape(-1), return_index=True)[1]  # [A]: first (query, key) pair of each offset
        biases = table.reshape(h, N * N)[:, first]  # [h, N, N] -> [h, A]
        rebuilt = biases[:, idxs]  # [h, A] -> [h, N, N]
        if not np.array_equal(rebuilt.view(np.uint32), table.view(np.uint32)):
            bad = int(np.sum(rebuilt.view(np.uint32) != table.view(np.uint32)))
            raise g.error(f"{path}: the attention-bias table is not attention_biases[:, attention_bias_idxs] "
                          f"({bad} of {table.size} entries differ from their offset's first entry)")
        out[f"{path}.attention_biases"] = np.ascontiguousarray(biases)
    return out


def import_encoder_onnx(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Official ``image_encoder.*`` state_dict of MobileSAM's TinyViT ("vit_t")
    from an ONNX export with BatchNorm folded (float32 arrays).

    Each Conv2d_BN at path P comes as ``P.weight`` and ``P.bias``: the layout
    of the official ``Conv2d_BN.fuse()``. ``attention_bias_idxs`` is a
    non-persistent buffer in MobileSAM and is not included; ``norm_head`` and
    ``head`` are unused by the official forward and absent from exports.
    """
    return _importing(path, "TinyViT encoder ONNX", _recover_tinyvit)


def _recover_tinyvit(model: Model, what: str) -> dict[str, np.ndarray]:
    g = _Graph(model, what)
    expected, conv_bns, attentions = tinyvit_folded_shapes()
    found: dict[str, np.ndarray] = {}
    for t in model.graph.initializers:
        key = _encoder_key(t.name)
        if key is not None:
            found[key] = t.array
    found.update(_folded_conv_bns(g, conv_bns, expected))
    found.update(_linears(g, _encoder_key, _encoder_scope))
    found.update(_layer_norms_2d(g, _encoder_key, _encoder_scope))
    found.update(_attention_biases(g, attentions))
    return _finish(found, expected, what)
