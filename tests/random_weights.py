"""Random weights with the official keys and shapes, for tests, demos and
benchmarks (not part of the runtime package). Scripts import it with
``tests/`` on sys.path.
"""

from __future__ import annotations

from typing import Dict, Iterable

import numpy as np

from npsam.build_sam import expected_shapes


def random_state_dict(model_type: str = "vit_b", *, parts: Iterable[str] = ("prompt_encoder", "mask_decoder"),
                      seed: int = 0, folded_bn: bool = False) -> Dict[str, np.ndarray]:
    """Random weights with the official keys and shapes (for demos and benchmarks):
    fan-in scaled normals for matrices, values near 1 for norm scales."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in expected_shapes(model_type, folded_bn=folded_bn).items():
        if key.split(".", 1)[0] not in parts:
            continue
        if key.endswith("num_batches_tracked"):
            out[key] = np.zeros(shape, np.int64)
        elif key.endswith("running_var"):
            out[key] = (0.5 + rng.random(shape)).astype(np.float32)
        elif len(shape) >= 2 and "embed" not in key and "token" not in key and "gaussian" not in key:
            out[key] = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        elif key.endswith("weight") and len(shape) == 1:
            out[key] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[key] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    return out
