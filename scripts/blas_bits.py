"""Which float32 matrix products keep their bits when the call around a row changes.

    python scripts/blas_bits.py
    OPENBLAS_CORETYPE=Haswell python scripts/blas_bits.py
    OPENBLAS_CORETYPE=SkylakeX python scripts/blas_bits.py   # on an AVX-512 CPU

For [R, K] @ [K, N] products it counts the shapes where rows of the product
differ in their last bits between
- the same call on 1 and on 2 OpenBLAS threads;
- one call on 4096 rows and calls on a part of them (another extent or offset);
- ``W @ x.T`` and ``x @ W.T`` (the other orientation).
Every count is 0 where a kernel is deterministic in that respect. On OpenBLAS's
Haswell kernels none is; this is why npsam's fused passes cut blocks fixed by
their sizes and run BLAS on one thread in every block (docs/threads-and-blas.md).
"""

from __future__ import annotations

import itertools

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info


def main() -> None:
    kernel = next((i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"), None)
    print(f"OpenBLAS kernel: {kernel or 'none found'}")
    blas = ThreadpoolController()
    rng = np.random.default_rng(0)
    shapes = list(itertools.product([64, 256, 2048], [8, 32, 256], [8, 32, 256]))  # (R, N, K)
    threads = extent = orientation = 0
    for r, n, k in shapes:
        a = rng.standard_normal((4096, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        with blas.limit(limits=1, user_api="blas"):
            one = a[:r] @ b
            whole = a @ b
            parts = np.concatenate([a[lo:min(lo + 100, r)] @ b for lo in range(0, r, 100)])
            other = (b.T @ a[:r].T).T
        with blas.limit(limits=2, user_api="blas"):
            two = a[:r] @ b
        threads += not np.array_equal(one, two)
        extent += not (np.array_equal(one, whole[:r]) and np.array_equal(one, parts))
        orientation += not np.array_equal(one, other)
    print(f"of {len(shapes)} shapes, the last bits change with: OpenBLAS threads {threads}, "
          f"the call's extent or offset {extent}, the orientation {orientation}")


if __name__ == "__main__":
    main()
