"""Wall time and peak memory of MobileSAM's TinyViT image encoder at 1024x1024,
float32: npsam against the official PyTorch module, each in its own fresh
process (two engines in one process fight over the cores, and peak RSS is per
process).

    python scripts/measure_tiny_vit.py                  # both, one after the other, a table
    python scripts/measure_tiny_vit.py --engine npsam   # one measurement here, as JSON
    python scripts/measure_tiny_vit.py --repeat 3 --threads 2

Weights are random (timing and memory do not depend on their values): npsam
gets ``npsam.build_sam.random_state_dict("vit_t")`` (unfolded BatchNorm, folded
at load), torch the official initialisation in eval mode. Peak RSS is the
process's ru_maxrss, so it includes the interpreter, the libraries and the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_npsam(repeat: int) -> dict:
    import numpy as np

    sys.path.insert(0, ROOT)
    from npsam.build_sam import CONFIGS, build_modules, random_state_dict

    t0 = time.perf_counter()
    encoder = build_modules(CONFIGS["vit_t"]).image_encoder
    sd = random_state_dict("vit_t", parts=("image_encoder",))
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
    assert out.shape == (1, 256, 64, 64) and out.dtype == np.float32
    return dict(engine="npsam", build_s=build_s, forward_s=times, rss_loaded_mb=rss_loaded, peak_rss_mb=_peak_mb())


def measure_torch(repeat: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import oracle

    t0 = time.perf_counter()
    encoder = oracle.mobile_sam().build_sam.sam_model_registry["vit_t"]().image_encoder.eval()
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
    return dict(engine=f"torch {torch.__version__} ({threads} threads)", build_s=build_s, forward_s=times,
                rss_loaded_mb=rss_loaded, peak_rss_mb=_peak_mb())


def run_fresh(engine: str, repeat: int, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--repeat", str(repeat),
           "--threads", str(threads)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["npsam", "torch"],
                        help="measure one engine in this process and print JSON (default: both, each in a fresh process)")
    parser.add_argument("--repeat", type=int, default=2, help="forward passes to time (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the official module (default 2)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        raise ValueError(f"--repeat: expected at least 1, got {args.repeat}")
    if args.engine == "npsam":
        print(json.dumps(measure_npsam(args.repeat)))
        return
    if args.engine == "torch":
        print(json.dumps(measure_torch(args.repeat, args.threads)))
        return
    print(f"TinyViT (vit_t) image encoder, 1024x1024 float32, load average {os.getloadavg()[0]:.1f}")
    print(f"{'engine':<28} {'first s':>8} {'median s':>9} {'loaded MB':>10} {'peak MB':>8}")
    for engine in ("npsam", "torch"):
        r = run_fresh(engine, args.repeat, args.threads)
        t = r["forward_s"]
        print(f"{r['engine']:<28} {t[0]:>8.2f} {statistics.median(t):>9.2f} {r['rss_loaded_mb']:>10.0f} "
              f"{r['peak_rss_mb']:>8.0f}")


if __name__ == "__main__":
    main()
