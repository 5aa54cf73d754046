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

from ..fast import threads
from ..kernels import ops
from .common import LayerNorm2d, MLPBlock
from ..kernels.nn import GELU, Conv2d, LayerNorm, Linear, Module, ModuleList, Sequential

# At most this many attention logits per thread exist at once (4 MB in
# float32). The global blocks of ViT-B at 1024x1024 would otherwise hold
# 12 x 4096 x 4096 logits (805 MB) plus as much again for the softmax. A global
# block's attention is 7-13% faster in chunks of 1M logits than of 4M (the
# softmax's passes stay nearer the cores); 256K makes its products slower.
ATTENTION_CHUNK_ELEMENTS = 1 << 20


class ImageEncoderViT(Module):
    """Mirror of image_encoder.py: ImageEncoderViT.

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
        """[B, in_chans, S, S] -> [B, out_chans, S/P, S/P].

        ``progress(done_blocks, total_blocks)``, if given, is called after each block.
        """
        dtype = self.patch_embed.proj.weight.dtype
        x = self._check_input(x).astype(dtype, copy=False)
        x = self.patch_embed(x)  # [B, 3, S, S] -> [B, H, W, C]
        if self.use_abs_pos:
            x += self.pos_embed  # [B, H, W, C] + [1, H, W, C]

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
    """Mirror of image_encoder.py: Block (pre-norm attention and MLP, both residual),
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
        shortcut = x  # [B, H, W, C]
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)  # -> [B*nW, ws, ws, C]

        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))  # -> [B, H, W, C]

        x += shortcut  # official: x = shortcut + x
        # Tokens as one [B*H*W, C] matrix: np.matmul runs one GEMM per leading
        # index, so [B, H, W, C] @ [C, M] would be B*H small, slow products.
        with threads.single_threaded_blas():  # MLPBlock's fused row pass brings its own threads
            y = self.mlp(self.norm2(x).reshape(-1, x.shape[-1]))  # [BHW, C] -> [BHW, M] -> [BHW, C]
        y = y.reshape(x.shape)  # -> [B, H, W, C]
        y += x  # official: x = x + self.mlp(self.norm2(x))
        return y

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}"


class Attention(Module):
    """Mirror of image_encoder.py: Attention (multi-head, with decomposed
    relative position embeddings).

    Same mathematics as the official forward, but the [G, N, N] attention map is
    never held whole: :func:`attention` takes it a block of query rows at a time.
    """

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
        B, H, W, _ = x.shape
        h = self.num_heads
        qkv = self.qkv(x.reshape(B * H * W, -1))  # [B*N, C] -> [B*N, 3C] (one GEMM, see Block.forward)
        # Official reshapes to [3, B*h, N, D], a copy; here q, k, v stay views of
        # the projection (the attention's products take strided operands as fast)
        q, k, v = qkv.reshape(B, H * W, 3, h, -1).transpose(2, 0, 3, 1, 4)  # -> 3 x [B, h, N, D]

        # NOTE(reference): q is scaled before the product, (q * scale) @ k^T, and the
        # relative position terms use the unscaled q.
        q_scaled = q * q.dtype.type(self.scale)  # [B, h, N, D]
        rel_h = rel_w = None
        if self.use_rel_pos:
            rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        # The output written straight in the layout proj reads: [B, N, h, D] = [B*N, C]
        out = np.empty((B, H * W, h, q.shape[-1]), dtype=q.dtype)
        with threads.single_threaded_blas():  # its steps bring their own threads; the projections keep BLAS's
            attention(q_scaled, k, v, rel_h, rel_w, out=out.transpose(0, 2, 1, 3))  # -> [B, h, N, D] view
        return self.proj(out.reshape(B * H * W, -1)).reshape(B, H, W, -1)  # [B*N, C] -> [B, H, W, C]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, rel_h: Optional[np.ndarray] = None,
              rel_w: Optional[np.ndarray] = None, chunk_elements: int = ATTENTION_CHUNK_ELEMENTS,
              out: Optional[np.ndarray] = None) -> np.ndarray:
    """softmax(q @ k^T + rel_h + rel_w) @ v, a block of query rows at a time.

    The rest of Attention.forward: ``attn = q @ k^T``, ``add_decomposed_rel_pos``,
    ``attn.softmax(dim=-1)``, ``attn @ v``. q [B, h, N, D] (already scaled), k, v
    [B, h, Nk, D]; rel_h [B, h, q_h, q_w, k_h] and rel_w [B, h, q_h, q_w, k_w]
    from :func:`decomposed_rel_pos` (N = q_h * q_w), or None. Any of them may be
    strided views (the matrix products take them as they are). Returns
    [B, h, N, D], written into ``out`` when given.

    Windowed blocks take several windows' maps per step; global ones take whole
    rows of the token grid of one map, so at most ``chunk_elements`` logits exist.
    """
    A, M, N, D = q.shape  # A batches (images or windows) of M maps (heads)
    Nk = k.shape[2]
    q_w = rel_h.shape[3] if rel_h is not None else 1
    kT = k.transpose(0, 1, 3, 2)  # [A, M, Nk, D] -> [A, M, D, Nk]
    if out is None:
        out = np.empty((A, M, N, v.shape[3]), dtype=q.dtype)
    # A step: ta batches x tm maps x tn query rows, at most chunk_elements logits
    if N * Nk > chunk_elements:  # whole grid rows (q_w queries each) of one map, so the rel-pos terms slice cleanly
        ta, tm, tn = 1, 1, max(1, chunk_elements // (Nk * q_w)) * q_w
    elif M * N * Nk > chunk_elements:
        ta, tm, tn = 1, chunk_elements // (N * Nk), N
    else:
        ta, tm, tn = chunk_elements // (M * N * Nk), M, N
    steps_m, steps_n = -(-M // tm), -(-N // tn)

    def work(start, stop):
        for step in range(start, stop):
            a0, rest = divmod(step, steps_m * steps_n)
            m0, n0 = divmod(rest, steps_n)
            a0, m0, n0 = a0 * ta, m0 * tm, n0 * tn
            a, m, n = slice(a0, a0 + ta), slice(m0, m0 + tm), slice(n0, min(N, n0 + tn))
            attn = q[a, m, n] @ kT[a, m]  # [a, m, n, D] @ [a, m, D, Nk] -> [a, m, n, Nk]
            if rel_h is not None:
                rows = slice(n.start // q_w, n.stop // q_w)
                add_decomposed_rel_pos(attn, rel_h[a, m, rows], rel_w[a, m, rows])
            # softmax(dim=-1), in place
            ops.exp_below_max_(attn, attn.max(axis=-1, keepdims=True))  # minus the row max, no subnormals
            denom = attn.sum(axis=-1, keepdims=True)  # [a, m, n, Nk] -> [a, m, n, 1]
            # Dividing the [n, D] product rather than the [n, Nk] probabilities:
            # the same mathematics, D/Nk as many divisions (rounding differs by an ulp or so).
            o = np.matmul(attn, v[a, m], out=out[a, m, n])  # [a, m, n, Nk] @ [a, m, Nk, D] -> [a, m, n, D]
            o /= denom

    # steps over threads (BLAS single-threaded inside, see threads.single_threaded_blas)
    threads.parallel_rows(work, -(-A // ta) * steps_m * steps_n,
                      threads=threads.row_threads() if threads.blas_is_single() else 1)
    return out


def window_partition(x: np.ndarray, window_size: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Mirror of image_encoder.py: window_partition.

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
    """Mirror of image_encoder.py: window_unpartition.

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
    """Mirror of image_encoder.py: get_rel_pos.

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


def decomposed_rel_pos(q: np.ndarray, rel_pos_h: np.ndarray, rel_pos_w: np.ndarray,
                       q_size: Tuple[int, int], k_size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Mirror of the first half of image_encoder.py: add_decomposed_rel_pos (from MViTv2).

    q [..., q_h*q_w, D] (any leading axes: [G, N, D] or [B, h, N, D]) ->
    rel_h [..., q_h, q_w, k_h], rel_w [..., q_h, q_w, k_w]: the official einsums
    "bhwc,hkc->bhwk" and "bhwc,wkc->bhwk", as batched matmuls.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)  # -> [q_h, k_h, D]
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)  # -> [q_w, k_w, D]

    r_q = q.reshape(q.shape[:-2] + (q_h, q_w, q.shape[-1]))  # [..., N, D] -> [..., q_h, q_w, D]
    rel_h = r_q @ Rh.transpose(0, 2, 1)  # [..., q_h, q_w, D] @ [q_h, D, k_h] -> [..., q_h, q_w, k_h]
    rel_w = r_q.swapaxes(-3, -2) @ Rw.transpose(0, 2, 1)  # [..., q_w, q_h, D] @ [q_w, D, k_w] -> [..., q_w, q_h, k_w]
    return rel_h, rel_w.swapaxes(-3, -2)  # -> [..., q_h, q_w, k_w]


def add_decomposed_rel_pos(attn: np.ndarray, rel_h: np.ndarray, rel_w: np.ndarray) -> np.ndarray:
    """Mirror of the second half of image_encoder.py: add_decomposed_rel_pos, in place.

    attn [..., n_h*q_w, k_h*k_w] for a block of n_h query rows of the grid, with
    their rel_h [..., n_h, q_w, k_h] and rel_w [..., n_h, q_w, k_w]:
    attn[..., (i, j), (y, x)] += rel_h[..., i, j, y] + rel_w[..., i, j, x].
    """
    n_h, q_w, k_h = rel_h.shape[-3:]
    k_w = rel_w.shape[-1]
    view = attn.reshape(attn.shape[:-2] + (n_h, q_w, k_h, k_w))  # [..., n, Nk] -> [..., n_h, q_w, k_h, k_w] (a view)
    view += rel_h[..., None]
    view += rel_w[..., None, :]
    return attn


class PatchEmbed(Module):
    """Mirror of image_encoder.py: PatchEmbed (a P x P stride-P convolution)."""

    def __init__(self, kernel_size: int = 16, stride: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        assert kernel_size == stride, "SAM's patch embedding has kernel == stride and no padding"
        self.proj = Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self.proj(x)  # [B, 3, S, S] -> [B, C, H, W]
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # -> [B, H, W, C]
