"""Argument checks shared by the public entry points.

Every check raises ValueError naming the argument, what was expected and what
came, before anything is computed.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

Dim = Union[int, str, None]  # an int must match; a str names a free size (for the message); None: anything


def describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"array of shape {list(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def check_array(name: str, x, shape: Sequence[Dim], *, finite: bool = True, numeric: bool = True) -> np.ndarray:
    """``x`` as an ndarray with ``len(shape)`` dims, fixed sizes where ints are given."""
    expected = "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
    if x is None:
        raise ValueError(f"{name}: expected an array of shape {expected}, got None")
    try:
        arr = np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: expected an array of shape {expected}, got {type(x).__name__}") from e
    if numeric and not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name}: expected a numeric array of shape {expected}, got {describe(arr)}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected a real array of shape {expected}, got {describe(arr)}")
    if arr.ndim != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape, arr.shape)):
        raise ValueError(f"{name}: expected shape {expected}, got {list(arr.shape)}")
    if finite:
        check_finite(name, arr)
    return arr


def check_finite(name: str, arr: np.ndarray) -> None:
    """No NaN or inf in a float array. Axes of stride 0 (a broadcast array, such
    as the no-mask dense embedding) are looked at once, not once per index."""
    if arr.dtype.kind != "f":
        return
    distinct = arr[tuple(slice(0, 1) if st == 0 else slice(None) for st in arr.strides)]
    # min and max propagate NaN and show an inf: two reading passes, where
    # isfinite would write a boolean array as large as the input
    if distinct.size and not (np.isfinite(distinct.min()) and np.isfinite(distinct.max())):
        raise ValueError(f"{name}: expected finite values, got NaN or inf (shape {list(arr.shape)})")


def check_same(name_a: str, a: int, name_b: str, b: int, what: str) -> None:
    if a != b:
        raise ValueError(f"{name_a} and {name_b} must have the same {what}, got {a} and {b}")


def check_bool(name: str, x) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {x!r}")
    return bool(x)


def check_decoder_inputs(transformer_dim: int, dtype, image_embeddings, image_pe, sparse_prompt_embeddings,
                         dense_prompt_embeddings):
    """MaskDecoder's inputs, checked and cast to ``dtype``: image_embeddings and
    image_pe [1, C, H, W], sparse [B, N, C], dense [B or 1, C, H, W]. NaN and inf
    in the image embedding and PE are left to predict_masks (the fast path
    checks them once per image: a pass over a million values costs as much as a step)."""
    c = transformer_dim
    emb = check_array("image_embeddings", image_embeddings, (1, c, "H", "W"), finite=False)
    h, w = emb.shape[2:]
    pe = check_array("image_pe", image_pe, (1, c, h, w), finite=False)
    sparse = check_array("sparse_prompt_embeddings", sparse_prompt_embeddings, ("B", "N", c))
    dense = check_array("dense_prompt_embeddings", dense_prompt_embeddings, ("B", c, h, w))
    if dense.shape[0] != 1:
        check_same("sparse_prompt_embeddings", sparse.shape[0], "dense_prompt_embeddings", dense.shape[0], "batch size")
    return tuple(x.astype(dtype, copy=False) for x in (emb, pe, sparse, dense))
