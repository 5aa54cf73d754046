"""Wall time and peak memory of an image encoder (SAM ViT-B/L/H, or MobileSAM's
TinyViT) at 1024x1024, float32: npsam against the official PyTorch module, each
in its own fresh process (two engines in one process fight over the cores, and
peak RSS is per process).

    python scripts/measure_encoders.py                 # ViT-B, both engines, a table
    python scripts/measure_encoders.py --model vit_t   # MobileSAM's TinyViT
    python scripts/measure_encoders.py --engine npsam --model vit_h  # one measurement here, as JSON
    python scripts/measure_encoders.py --model vit_l --repeat 2

Weights are random (timing and memory do not depend on their values): npsam
gets ``tests/random_weights.py``'s ``random_state_dict`` (TinyViT: unfolded BatchNorm, folded
at load), torch the official initialisation in eval mode. Peak RSS is the
process's ru_maxrss, so it includes the interpreter, the libraries and the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_npsam(model: str, repeat: int) -> dict:
    import numpy as np

    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    from npsam.build_sam import CONFIGS, build_modules
    from random_weights import random_state_dict  # tests/, put on sys.path above

    t0 = time.perf_counter()
    encoder = build_modules(CONFIGS[model]).image_encoder
    sd = random_state_dict(model, parts=("image_encoder",))
    encoder.load_state_dict({k[len("image_encoder."):]: v for k, v in sd.items()}, dtype=np.float32)
    del sd
    build_s = time.perf_counter() - t0
    x = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    rss_loaded = _rss_mb()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = encoder(x)
        times.append(time.perf_counter() - t0)
    assert out.shape == (1, 256, 64, 64)
    return dict(engine="npsam", model=model, build_s=build_s, forward_s=times, rss_loaded_mb=rss_loaded,
                peak_rss_mb=_peak_mb())


def measure_torch(model: str, repeat: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import oracle

    if model == "vit_t":  # MobileSAM's TinyViT (official initialisation, eval mode)
        sam_model_registry = oracle.mobile_sam().build_sam.sam_model_registry
    else:
        sam_model_registry = oracle.segment_anything().build_sam.sam_model_registry

    t0 = time.perf_counter()
    encoder = sam_model_registry[model]().image_encoder.eval()
    build_s = time.perf_counter() - t0
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    rss_loaded = _rss_mb()
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = encoder(x)
            times.append(time.perf_counter() - t0)
    assert tuple(out.shape) == (1, 256, 64, 64)
    return dict(engine=f"torch {torch.__version__} ({threads} threads)", model=model, build_s=build_s,
                forward_s=times, rss_loaded_mb=rss_loaded, peak_rss_mb=_peak_mb())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["npsam", "torch"], help="measure one engine in this process")
    parser.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_t"],
                        help="vit_t is MobileSAM's TinyViT (default vit_b)")
    parser.add_argument("--repeat", type=int, default=1, help="forward passes (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        raise ValueError(f"--repeat: expected a positive count, got {args.repeat}")

    if args.engine == "npsam":
        print(json.dumps(measure_npsam(args.model, args.repeat)))
        return
    if args.engine == "torch":
        print(json.dumps(measure_torch(args.model, args.repeat, args.threads)))
        return

    rows = []
    for engine in ("npsam", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--model", args.model,
               "--repeat", str(args.repeat), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.model} image encoder, 1x3x1024x1024 float32, os.cpu_count()={os.cpu_count()}")
    print(f"{'engine':<28} {'forward s (each)':<22} {'RSS loaded MB':>14} {'peak RSS MB':>12}")
    for r in rows:
        each = ", ".join(f"{t:.2f}" for t in r["forward_s"])
        print(f"{r['engine']:<28} {each:<22} {r['rss_loaded_mb']:>14.0f} {r['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
