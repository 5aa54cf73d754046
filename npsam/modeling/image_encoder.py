"""Mirror of segment_anything/modeling/image_encoder.py: the ViT image encoder.

ViTDet backbone: a 16x16 patch embedding, ``depth`` transformer blocks (most
attend within 14x14 windows, a few globally), decomposed relative position
embeddings, and a convolutional neck down to 256 channels.

Dimension letters:
    B  images in the batch    S  input side (1024)          P  patch size (16)
    H, W  token grid (S/P = 64)   C  embed_dim (768)         O  out_chans (256)
    h  heads (12)   D  channels per head = C / h (64)        N = H*W tokens
    ws  window size (14)   Hp, Wp  grid padded to a multiple of ws   nW  windows
    G  batch of attention maps (B*h, or B*nW*h)               M  MLP hidden dim
    q_h, q_w / k_h, k_w  query / key grid   L  rel-pos table length (2*max(q,k)-1)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from ..kernels import ops
from .common import LayerNorm2d, MLPBlock
from ..kernels.nn import GELU, Conv2d, LayerNorm, Linear, Module, ModuleList, Sequential


class ImageEncoderViT(Module):
    """Mirror of modeling/image_encoder.py: ImageEncoderViT.

    ``norm_eps`` stands in for the official ``norm_layer`` argument, which SAM
    sets to ``partial(torch.nn.LayerNorm, eps=1e-6)``; the activation is always
    the exact GELU (``act_layer=nn.GELU``).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        # rel_pos_zero_init only chooses the official initial values; weights are loaded.
        del rel_pos_zero_init

        self.patch_embed = PatchEmbed(kernel_size=patch_size, stride=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        self.use_abs_pos = use_abs_pos
        if use_abs_pos:
            # NOTE(reference): the absolute embedding has the pretraining grid size
            # [1, S/P, S/P, C] and is added without interpolation.
            self.register_parameter("pos_embed", (1, img_size // patch_size, img_size // patch_size, embed_dim))

        grid = (img_size // patch_size, img_size // patch_size)
        self.blocks = ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_eps=norm_eps,
                use_rel_pos=use_rel_pos,
                window_size=window_size if i not in global_attn_indexes else 0,
                input_size=grid,
            )
            for i in range(depth)
        )

        # NOTE(reference): both neck convolutions have no bias; indexes 0..3 are the state_dict keys.
        self.neck = Sequential([
            Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        ])

    def forward(self, x: np.ndarray, progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
        """Mirror of modeling/image_encoder.py: ImageEncoderViT.forward.

        [B, in_chans, S, S] -> [B, out_chans, S/P, S/P].

        ``progress(done_blocks, total_blocks)``, if given, is called after each block.
        """
        dtype = self.patch_embed.proj.weight.dtype
        x = self._check_input(x).astype(dtype, copy=False)
        x = self.patch_embed(x)  # [B, 3, S, S] -> [B, H, W, C]
        if self.use_abs_pos:
            x = x + self.pos_embed  # [B, H, W, C] + [1, H, W, C]

        for i, blk in enumerate(self.blocks):
            x = blk(x)  # [B, H, W, C] -> [B, H, W, C]
            if progress is not None:
                progress(i + 1, len(self.blocks))

        return self.neck(x.transpose(0, 3, 1, 2))  # [B, C, H, W] -> [B, O, H, W]

    def _check_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x: expected an image batch of shape [B, {self.in_chans}, H, W], got shape {x.shape}")
        if x.dtype.kind not in "fiu":
            raise ValueError(f"x: expected a real-valued array, got dtype {x.dtype}")
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"x: expected height and width that are multiples of the patch size {p}, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        if self.use_abs_pos and x.shape[2:] != (self.img_size, self.img_size):
            raise ValueError(f"x: expected {self.img_size}x{self.img_size} images (the absolute position "
                             f"embedding's size), got {x.shape[2]}x{x.shape[3]}")
        return x

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}, embed_dim={self.embed_dim}"


class Block(Module):
    """Mirror of modeling/image_encoder.py: Block (pre-norm attention and MLP, both residual),
    attending within windows when ``window_size > 0``, globally otherwise."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        # NOTE(reference): the ViT's LayerNorms use eps 1e-6, not nn.LayerNorm's 1e-5.
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        # NOTE(reference): windowed blocks size their rel-pos tables for the window,
        # global blocks for the whole pretraining grid.
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        # NOTE(reference): the ViT MLP uses the exact (erf) GELU; mlp_dim is int(dim * mlp_ratio).
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=GELU)
        self.window_size = window_size

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Mirror of modeling/image_encoder.py: Block.forward."""
        shortcut = x  # [B, H, W, C]
        x = self.norm1(x)
        # Window partition
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)  # -> [B*nW, ws, ws, C]

        x = self.attn(x)
        # Reverse window partition
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))  # -> [B, H, W, C]

        x = shortcut + x
        x = x + self.mlp(self.norm2(x))  # [B, H, W, C] -> [B, H, W, M] -> [B, H, W, C]
        return x

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}"


class Attention(Module):
    """Mirror of modeling/image_encoder.py: Attention (multi-head, with decomposed
    relative position embeddings)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5

        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)

        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            assert input_size is not None, "Input size must be provided if using relative positional encoding."
            self.register_parameter("rel_pos_h", (2 * input_size[0] - 1, head_dim))
            self.register_parameter("rel_pos_w", (2 * input_size[1] - 1, head_dim))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Mirror of modeling/image_encoder.py: Attention.forward."""
        B, H, W, _ = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B, H * W, 3, h, -1).transpose(2, 0, 3, 1, 4)  # [B, H, W, C] -> [3, B, h, N, D]
        q, k, v = qkv.reshape(3, B * h, H * W, -1)  # -> 3 x [G, N, D]
        # NOTE(reference): q is scaled before the product, and the relative
        # position terms use the unscaled q.
        attn = (q * q.dtype.type(self.scale)) @ k.swapaxes(-2, -1)  # [G, N, D] @ [G, D, N] -> [G, N, N]
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        attn = ops.softmax(attn, axis=-1)
        x = (attn @ v).reshape(B, h, H, W, -1).transpose(0, 2, 3, 1, 4).reshape(B, H, W, -1)  # -> [B, H, W, C]
        return self.proj(x)  # [B, H, W, C] -> same


def window_partition(x: np.ndarray, window_size: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Mirror of modeling/image_encoder.py: window_partition.

    [B, H, W, C] -> ([B*nW, ws, ws, C], (Hp, Wp)).
    NOTE(reference): the grid is zero-padded at the bottom and right to a multiple
    of the window size; the padded (zero, i.e. after norm1) tokens take part in
    the attention of their windows.
    """
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))  # -> [B, Hp, Wp, C]
    Hp, Wp = H + pad_h, W + pad_w

    x = x.reshape(B, Hp // window_size, window_size, Wp // window_size, window_size, C)  # -> [B, Hp/ws, ws, Wp/ws, ws, C]
    windows = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)  # -> [B*nW, ws, ws, C]
    return windows, (Hp, Wp)


def window_unpartition(windows: np.ndarray, window_size: int, pad_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> np.ndarray:
    """Mirror of modeling/image_encoder.py: window_unpartition.

    [B*nW, ws, ws, C] -> [B, H, W, C], cropping the padding (bottom and right).
    """
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.reshape(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)  # -> [B, Hp/ws, Wp/ws, ws, ws, C]
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)  # -> [B, Hp, Wp, C]
    if Hp > H or Wp > W:
        x = np.ascontiguousarray(x[:, :H, :W, :])  # -> [B, H, W, C]
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: np.ndarray) -> np.ndarray:
    """Mirror of modeling/image_encoder.py: get_rel_pos.

    Relative position embeddings for every (query, key) pair along one axis:
    rel_pos [L, D] -> [q_size, k_size, D].
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        # NOTE(reference): a table of another length (a grid other than the
        # pretraining one) is resized with F.interpolate(mode="linear"), align_corners=False.
        rel_pos_resized = _interpolate_linear(rel_pos, max_rel_dist)  # [L, D] -> [2*max(q,k)-1, D]
    else:
        rel_pos_resized = rel_pos

    # NOTE(reference): when q and k differ, the shorter axis's coordinates are
    # stretched. The official coordinates are float32 (torch's default dtype,
    # whatever the dtype of rel_pos), truncated by .long().
    f32 = np.float32
    q_coords = np.arange(q_size, dtype=f32)[:, None] * f32(max(k_size / q_size, 1.0))  # [q, 1]
    k_coords = np.arange(k_size, dtype=f32)[None, :] * f32(max(q_size / k_size, 1.0))  # [1, k]
    relative_coords = (q_coords - k_coords) + f32((k_size - 1) * max(q_size / k_size, 1.0))  # [q, k]
    return rel_pos_resized[relative_coords.astype(np.int64)]  # [L, D] -> [q, k, D]


def _interpolate_linear(x: np.ndarray, size: int) -> np.ndarray:
    """Mirror of F.interpolate(x.T[None], size, mode="linear", align_corners=False)
    along the first axis of x [L, D] -> [size, D].

    As PyTorch's CPU kernel: scale = L / size in x's dtype, source index
    src = scale * (i + 0.5) - 0.5 clamped at 0, weights t = src - floor(src) and
    1 - t on rows floor(src) and the next one (the last row repeats).
    NOTE(reference): the compiled kernel fuses two steps into multiply-adds,
    rounding once: src = fma(scale, i + 0.5, -0.5) and out = fma(x0, 1 - t, x1 * t).
    We compute those in a wider type and round once: exact for float32 (bit for
    bit with torch), within an ulp for float64 (via long double).
    """
    dt = x.dtype.type
    wide = np.float64 if x.dtype == np.float32 else np.longdouble
    L = x.shape[0]
    scale = dt(L) / dt(size)
    src = (wide(scale) * (np.arange(size, dtype=wide) + wide(0.5)) - wide(0.5)).astype(x.dtype)  # [size]
    src = np.maximum(src, dt(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), L - 1)  # [size]
    i1 = np.minimum(i0 + 1, L - 1)  # [size]
    lambda1 = np.clip(src - i0.astype(x.dtype), dt(0), dt(1))[:, None]  # [size, 1]
    lambda0 = dt(1) - lambda1
    x0, x1 = x[i0], x[i1]  # [L, D] -> 2 x [size, D]
    return (x0.astype(wide) * lambda0.astype(wide) + x1 * lambda1).astype(x.dtype)  # -> [size, D]


def add_decomposed_rel_pos(attn: np.ndarray, q: np.ndarray, rel_pos_h: np.ndarray, rel_pos_w: np.ndarray,
                           q_size: Tuple[int, int], k_size: Tuple[int, int]) -> np.ndarray:
    """Mirror of modeling/image_encoder.py: add_decomposed_rel_pos (from MViTv2).

    attn [G, q_h*q_w, k_h*k_w], q [G, q_h*q_w, D] (unscaled) ->
    attn[g, (i, j), (y, x)] + rel_h[g, i, j, y] + rel_w[g, i, j, x].
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)  # -> [q_h, k_h, D]
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)  # -> [q_w, k_w, D]

    G, _, dim = q.shape
    r_q = q.reshape(G, q_h, q_w, dim)  # [G, N, D] -> [G, q_h, q_w, D]
    # the einsums "bhwc,hkc->bhwk" and "bhwc,wkc->bhwk" as batched products
    rel_h = r_q @ Rh.transpose(0, 2, 1)  # [G, q_h, q_w, D] @ [q_h, D, k_h] -> [G, q_h, q_w, k_h]
    rel_w = (r_q.transpose(0, 2, 1, 3) @ Rw.transpose(0, 2, 1)).transpose(0, 2, 1, 3)  # -> [G, q_h, q_w, k_w]
    attn = (
        attn.reshape(G, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    ).reshape(G, q_h * q_w, k_h * k_w)  # -> [G, N, Nk]
    return attn


class PatchEmbed(Module):
    """Mirror of modeling/image_encoder.py: PatchEmbed (a P x P stride-P convolution)."""

    def __init__(self, kernel_size: int = 16, stride: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        assert kernel_size == stride, "SAM's patch embedding has kernel == stride and no padding"
        self.proj = Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Mirror of modeling/image_encoder.py: PatchEmbed.forward."""
        x = self.proj(x)  # [B, 3, S, S] -> [B, C, H, W]
        return x.transpose(0, 2, 3, 1)  # -> [B, H, W, C]
